//! The fake upstream: a rating-hub-shaped IngestService that records what it receives.

use super::*;

// ---------------------------------------------------------------- fake upstream sink

pub(crate) struct Sink {
    pub(crate) down: AtomicBool,
    pub(crate) received: Mutex<HashMap<String, Instant>>,
}

pub(crate) struct SinkService(Arc<Sink>);

#[tonic::async_trait]
impl IngestService for SinkService {
    async fn report_tree_head(
        &self,
        _request: tonic::Request<pb::ReportTreeHeadRequest>,
    ) -> Result<tonic::Response<pb::ReportTreeHeadResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the benchmark's upstream takes no log heads",
        ))
    }

    async fn submit_ratings(
        &self,
        req: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        if self.0.down.load(Ordering::Relaxed) {
            return Err(Status::unavailable("sink down"));
        }
        let now = Instant::now();
        let ratings = req.into_inner().ratings;
        let mut got = self.0.received.lock().unwrap();
        let results = ratings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                got.entry(r.hub_id.clone()).or_insert(now);
                accepted(i, r, 0)
            })
            .collect();
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = Acks;

    async fn stream_ratings(
        &self,
        _: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Acks>, Status> {
        Err(Status::unimplemented("sink"))
    }

    async fn report_service_cases(
        &self,
        _: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
}

pub(crate) async fn start_sink() -> anyhow::Result<(String, Arc<Sink>)> {
    let sink = Arc::new(Sink {
        down: AtomicBool::new(false),
        received: Mutex::new(HashMap::new()),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    let svc =
        IngestServiceServer::new(SinkService(sink.clone())).max_decoding_message_size(64 << 20);
    // Its own thread and runtime: receipt is timestamped when the upstream gets the batch,
    // not when the load generator's busy runtime gets round to it.
    std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sink runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("sink listener");
                let _ = Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(nodelay(listener))
                    .await;
            });
        })?;
    Ok((url, sink))
}
