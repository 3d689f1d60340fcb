//! A fake upstream platform: a real tonic `IngestService` on loopback that records what it
//! receives (deduplicating by hub id, as a real upstream does) and can be told to fail, slow
//! down, reject chosen ratings, or stop and start again on the same port.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::ingest_service_server::{IngestService, IngestServiceServer};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Accept,
    Unavailable,
    Slow(Duration),
}

pub struct FakeState {
    mode: Mutex<Mode>,
    /// hub id → times received
    received: Mutex<HashMap<String, u32>>,
    /// origin source keys to reject permanently
    reject: Mutex<HashSet<String>>,
    /// bumped when a call comes in and again when an answered call has taken its ratings
    /// (what `wait_until` wakes on)
    events: watch::Sender<u64>,
    /// bumped once per call, when it comes in (what `wait_calls` counts)
    calls: watch::Sender<u64>,
}

impl FakeState {
    fn bump(&self) {
        self.events.send_modify(|v| *v += 1);
    }
}

struct FakeIngest(Arc<FakeState>);

type Acks = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::StreamRatingsResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl IngestService for FakeIngest {
    /// Like an upper hub from before the rating log.
    async fn report_tree_head(
        &self,
        _request: Request<pb::ReportTreeHeadRequest>,
    ) -> Result<Response<pb::ReportTreeHeadResponse>, Status> {
        Err(Status::unimplemented("fake upstream: no rating log heads"))
    }

    async fn submit_ratings(
        &self,
        request: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        // Counted under the mode's lock: a mark taken after `set_mode` (which takes it too)
        // never counts a call that read the mode before.
        let mode = {
            let mode = self.0.mode.lock().unwrap();
            self.0.calls.send_modify(|v| *v += 1);
            mode.clone()
        };
        self.0.bump();
        match mode {
            Mode::Unavailable => {
                return Err(Status::unavailable("fake upstream: down for maintenance"));
            }
            Mode::Slow(d) => tokio::time::sleep(d).await,
            Mode::Accept => {}
        }
        let mut results = Vec::new();
        for (i, r) in request.into_inner().ratings.into_iter().enumerate() {
            let rejected = self.0.reject.lock().unwrap().contains(&r.origin_source_key);
            let result = if rejected {
                pb::ItemResult {
                    index: i as u32,
                    outcome: pb::Outcome::Invalid as i32,
                    violations: vec![pb::FieldViolation {
                        field: "item_code".into(),
                        // Platforms echo what they were sent: the rater's phone and ID.
                        description: format!(
                            "fake upstream: unknown item (rater {} {})",
                            r.rater.as_ref().map_or("", |p| p.phone.as_str()),
                            r.rater.as_ref().map_or("", |p| p.id_number.as_str()),
                        ),
                    }],
                    ..Default::default()
                }
            } else {
                let mut received = self.0.received.lock().unwrap();
                let n = received.entry(r.hub_id.clone()).or_insert(0);
                *n += 1;
                pb::ItemResult {
                    index: i as u32,
                    hub_id: r.hub_id,
                    outcome: if *n == 1 {
                        pb::Outcome::Accepted
                    } else {
                        pb::Outcome::Duplicate
                    } as i32,
                    ..Default::default()
                }
            };
            results.push(result);
        }
        self.0.bump();
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = Acks;

    async fn stream_ratings(
        &self,
        _: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Acks>, Status> {
        Err(Status::unimplemented(
            "the fake upstream only takes SubmitRatings",
        ))
    }

    async fn report_service_cases(
        &self,
        _: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        Err(Status::unimplemented(
            "the fake upstream only takes SubmitRatings",
        ))
    }
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let (events, _) = watch::channel(0);
        let (calls, _) = watch::channel(0);
        let state = Arc::new(FakeState {
            mode: Mutex::new(Mode::Accept),
            received: Mutex::new(HashMap::new()),
            reject: Mutex::new(HashSet::new()),
            events,
            calls,
        });
        Self::serve("127.0.0.1:0".parse().unwrap(), state).await
    }

    async fn serve(addr: SocketAddr, state: Arc<FakeState>) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = IngestServiceServer::new(FakeIngest(state.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    // TCP_NODELAY, as real servers set it: with Nagle on, a small answer
                    // can wait for the hub's delayed ACK (40 ms).
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    pub fn reject_origin_keys(&self, keys: impl IntoIterator<Item = String>) {
        *self.state.reject.lock().unwrap() = keys.into_iter().collect();
    }

    pub fn received(&self) -> HashMap<String, u32> {
        self.state.received.lock().unwrap().clone()
    }

    /// Stops listening (connections are refused) until `restart`.
    pub async fn stop(mut self) -> (SocketAddr, Arc<FakeState>) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        (self.addr, self.state)
    }

    pub async fn restart(addr: SocketAddr, state: Arc<FakeState>) -> Self {
        Self::serve(addr, state).await
    }

    /// Waits (at most `limit`) until `pred` holds of what was received.
    pub async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&HashMap<String, u32>) -> bool,
    ) {
        let mut events = self.state.events.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if pred(&self.received()) {
                return;
            }
            if tokio::time::timeout_at(deadline, events.changed())
                .await
                .is_err()
            {
                panic!(
                    "fake upstream: timed out after {limit:?} waiting for {what}; received {}",
                    self.received().len()
                );
            }
        }
    }

    /// The calls the upstream has had so far: the mark [`FakeUpstream::wait_calls`] counts
    /// from. Take it before the action whose calls are awaited: calls made while the action
    /// ran count too. (A call is counted once, when it comes in: the second step an answered
    /// call makes, which `wait_until` wakes on, would count a call of an earlier phase that
    /// was still finishing.)
    pub fn mark(&self) -> u64 {
        let _mode = self.state.mode.lock().unwrap();
        *self.state.calls.borrow()
    }

    /// Waits until the upstream was called at least `n` times after `mark` (taken before the
    /// action: counting from when this is called missed calls already made, and a relay
    /// that then paused for a minute was never called again).
    pub async fn wait_calls(&self, mark: u64, n: u64, limit: Duration) {
        let mut calls = self.state.calls.subscribe();
        tokio::time::timeout(limit, async {
            while *calls.borrow_and_update() < mark + n {
                calls.changed().await.unwrap();
            }
        })
        .await
        .expect("the upstream is being called");
    }
}

/// Polls `check` every 20 ms until it is true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
