//! Boots a real hub and hands out typed clients and valid test data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rating_hub::clock::Clock;
use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use rating_hub::config::Config;
use rating_hub::domain::codes::{credit_code_with_check, id_number_with_check};
use rating_hub::pb::v1 as pb;
use rating_hub::pki;
use rating_hub::privacy::PiiKeys;
use rating_hub::server::RunningHub;
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

pub use pb::ingest_service_client::IngestServiceClient;
pub use pb::query_service_client::QueryServiceClient;

/// What a test hub is started with: principals and config overrides, as TOML.
#[derive(Clone)]
pub struct HubBuilder {
    table: toml::Table,
    clock: Option<Arc<dyn Clock>>,
}

fn set(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    match path {
        [last] => {
            table.insert(last.to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            set(entry.as_table_mut().expect("a table"), rest, value);
        }
        [] => unreachable!(),
    }
}

/// A principal's scope in a test.
pub enum TestScope<'a> {
    National,
    Orgs(&'a [String]),
    Regions(&'a [&'a str]),
}

impl HubBuilder {
    /// The default: principal "tester" with every role and the whole country.
    pub fn new() -> Self {
        Self {
            table: toml::Table::new(),
            clock: None,
        }
        .principal(
            "tester",
            &["submit", "read", "read-pii", "pull", "rectify", "admin"],
            TestScope::National,
        )
    }

    pub fn principal(mut self, name: &str, roles: &[&str], scope: TestScope<'_>) -> Self {
        let mut p = toml::Table::new();
        p.insert(
            "roles".into(),
            toml::Value::Array(
                roles
                    .iter()
                    .map(|r| toml::Value::String(r.to_string()))
                    .collect(),
            ),
        );
        match scope {
            TestScope::National => {
                p.insert("all_regions".into(), toml::Value::Boolean(true));
            }
            TestScope::Orgs(orgs) => {
                p.insert(
                    "org_credit_codes".into(),
                    toml::Value::Array(
                        orgs.iter()
                            .map(|o| toml::Value::String(o.clone()))
                            .collect(),
                    ),
                );
            }
            TestScope::Regions(regions) => {
                p.insert(
                    "region_prefixes".into(),
                    toml::Value::Array(
                        regions
                            .iter()
                            .map(|r| toml::Value::String(r.to_string()))
                            .collect(),
                    ),
                );
            }
        }
        set(
            &mut self.table,
            &["principals", name],
            toml::Value::Table(p),
        );
        self
    }

    /// Sets `section.key` (dotted path) to a TOML value written as text, e.g. ("limits.max_in_flight", "1").
    pub fn set(mut self, path: &str, value: &str) -> Self {
        let v: toml::Table = toml::from_str(&format!("v = {value}")).expect("a TOML value");
        let parts: Vec<&str> = path.split('.').collect();
        set(&mut self.table, &parts, v["v"].clone());
        self
    }

    /// Runs the hub on this clock (e.g. a `ManualClock` for deadlines).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    pub async fn start(self) -> TestHub {
        let dir = tempfile::tempdir().expect("temp dir");
        self.start_in(Arc::new(dir)).await
    }

    /// Starts in a directory the test prepared (e.g. with its PKI already in `pki/`).
    pub async fn start_in_dir(self, dir: TempDir) -> TestHub {
        self.start_in(Arc::new(dir)).await
    }

    async fn start_in(self, dir: Arc<TempDir>) -> TestHub {
        self.try_start_in(dir).await.expect("hub starts")
    }

    /// Starts a hub, or returns why it did not start.
    pub async fn try_start(self) -> anyhow::Result<TestHub> {
        let dir = tempfile::tempdir().expect("temp dir");
        self.try_start_in(Arc::new(dir)).await
    }

    async fn try_start_in(self, dir: Arc<TempDir>) -> anyhow::Result<TestHub> {
        let hub = start_hub(dir.path(), &self.table, self.clock.clone()).await?;
        Ok(TestHub {
            hub,
            dir,
            builder: self,
        })
    }
}

pub struct TestHub {
    pub hub: RunningHub,
    pub dir: Arc<TempDir>,
    builder: HubBuilder,
}

/// A stopped hub whose directory (database, PKI, key) is kept for a restart.
pub struct StoppedHub {
    pub dir: Arc<TempDir>,
    builder: HubBuilder,
}

impl StoppedHub {
    /// Starts a new hub on the same database file, PKI and key.
    pub async fn restart(self) -> TestHub {
        self.builder.start_in(self.dir).await
    }

    /// As [`StoppedHub::restart`], returning why the hub did not start.
    pub async fn try_restart(self) -> anyhow::Result<TestHub> {
        self.builder.try_start_in(self.dir).await
    }

    /// As [`StoppedHub::restart_with`], giving the stopped hub back with the reason when the
    /// hub does not start.
    pub async fn try_restart_with(
        self,
        change: impl FnOnce(HubBuilder) -> HubBuilder,
    ) -> Result<TestHub, (anyhow::Error, StoppedHub)> {
        let original = self.builder.clone();
        match change(self.builder).try_start_in(self.dir.clone()).await {
            Ok(hub) => Ok(hub),
            Err(e) => Err((
                e,
                StoppedHub {
                    dir: self.dir,
                    builder: original,
                },
            )),
        }
    }

    /// Starts a new hub on the same directory with its configuration changed by `change`.
    pub async fn restart_with(self, change: impl FnOnce(HubBuilder) -> HubBuilder) -> TestHub {
        change(self.builder).start_in(self.dir).await
    }
}

impl TestHub {
    /// A fresh hub on a fresh database, principal "tester" with every role.
    pub async fn start() -> Self {
        HubBuilder::new().start().await
    }

    /// A fresh hub with config overrides: (section, key, TOML value).
    pub async fn start_with(overrides: &[(&str, &str, &str)]) -> Self {
        let mut b = HubBuilder::new();
        for (section, key, value) in overrides {
            b = b.set(&format!("{section}.{key}"), value);
        }
        b.start().await
    }

    /// A hub that serves at most `n` calls at once.
    pub async fn builder_max_in_flight(n: usize) -> Self {
        HubBuilder::new()
            .set("limits.max_in_flight", &n.to_string())
            .start()
            .await
    }

    /// Another instance of the same hub: same configuration, database, PKI and keys, its
    /// own port. (On PostgreSQL the two share the database; see tests/it/cluster.rs.)
    pub async fn peer(&self) -> TestHub {
        self.builder.clone().start_in(self.dir.clone()).await
    }

    /// Another instance as `peer`, named `instance` in relay leases, so a test can tell
    /// which of its hubs holds a lease.
    pub async fn peer_as(&self, instance: &str) -> TestHub {
        self.builder
            .clone()
            .set("storage.instance", &format!("{instance:?}"))
            .start_in(self.dir.clone())
            .await
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.hub.local_addr.port())
    }

    /// The PEM files of a client certificate for `name`, issued by the hub's CA on first use.
    pub fn client_files(&self, name: &str) -> pki::IssuedPair {
        let dir = self.pki_dir();
        let cert = dir.join(format!("{name}.pem"));
        if cert.exists() {
            return pki::IssuedPair {
                cert,
                key: dir.join(format!("{name}.key")),
            };
        }
        pki::issue_client(&dir, name, pki::Validity::days(30)).expect("issue client certificate")
    }

    /// An mTLS endpoint presenting `name`'s certificate (`None`: no client certificate).
    pub fn endpoint(&self, identity: Option<&pki::IssuedPair>) -> Endpoint {
        let ca = std::fs::read(self.pki_dir().join(pki::CA_CERT)).unwrap();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some(pair) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&pair.cert).unwrap(),
                std::fs::read(&pair.key).unwrap(),
            ));
        }
        Endpoint::from_shared(self.url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
    }

    pub async fn channel_as(&self, name: &str) -> Channel {
        let pair = self.client_files(name);
        self.endpoint(Some(&pair))
            .connect()
            .await
            .expect("mTLS connect")
    }

    pub async fn ingest(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::new(self.channel_as("tester").await)
    }

    pub async fn query(&self) -> QueryServiceClient<Channel> {
        QueryServiceClient::new(self.channel_as("tester").await)
    }

    /// The running hub, and what restarts it after it stopped (for shutting down while a
    /// test still holds clients).
    pub fn split_for_shutdown(self) -> (RunningHub, StoppedHub) {
        (
            self.hub,
            StoppedHub {
                dir: self.dir,
                builder: self.builder,
            },
        )
    }

    /// Graceful stop; the directory (database, PKI, key) stays for a restart.
    pub async fn stop(self) -> StoppedHub {
        self.hub.shutdown().await.expect("clean shutdown");
        StoppedHub {
            dir: self.dir,
            builder: self.builder,
        }
    }
}

/// Writes the test PKI and privacy key (once per directory) and starts a hub on them.
pub async fn start_hub(
    dir: &Path,
    overrides: &toml::Table,
    clock: Option<Arc<dyn Clock>>,
) -> anyhow::Result<RunningHub> {
    // Hub logs show with a failing test's output (RUST_LOG=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let pki_dir = dir.join("pki");
    if !pki_dir.join(pki::CA_CERT).exists() {
        pki::create_ca(&pki_dir, "rating-hub test CA").unwrap();
        pki::issue_server(
            &pki_dir,
            &["localhost", "127.0.0.1"],
            pki::Validity::days(30),
        )
        .unwrap();
    }
    let key = dir.join("pii.key");
    PiiKeys::create_key_file(&key).unwrap();
    let p = |path: PathBuf| toml::Value::String(path.display().to_string());
    let mut table = toml::Table::new();
    set(
        &mut table,
        &["server", "listen"],
        toml::Value::String("127.0.0.1:0".into()),
    );
    set(
        &mut table,
        &["ops", "listen"],
        toml::Value::String("127.0.0.1:0".into()),
    );
    set(
        &mut table,
        &["storage", "url"],
        toml::Value::String(crate::pg::storage_url(dir)),
    );
    // Tests tick the rules engine by hand.
    set(
        &mut table,
        &["rules", "tick_secs"],
        toml::Value::Integer(86_400),
    );
    set(&mut table, &["tls", "dev_pki"], toml::Value::Boolean(false));
    set(
        &mut table,
        &["tls", "cert"],
        p(pki_dir.join(pki::SERVER_CERT)),
    );
    set(
        &mut table,
        &["tls", "key"],
        p(pki_dir.join(pki::SERVER_KEY)),
    );
    set(
        &mut table,
        &["tls", "client_ca"],
        p(pki_dir.join(pki::CA_CERT)),
    );
    set(
        &mut table,
        &["tls", "crl_files"],
        toml::Value::Array(vec![p(pki_dir.join(pki::CRL))]),
    );
    set(
        &mut table,
        &["privacy", "active_key"],
        toml::Value::String("test".into()),
    );
    set(&mut table, &["privacy", "keys", "test"], p(key));
    merge(&mut table, overrides.clone());
    let text = toml::to_string(&table).unwrap();
    let mut config =
        Config::from_layers(Some(("test.toml", &text)), std::iter::empty()).expect("test config");
    // On disk too: what a reload (ReloadConfig, SIGHUP) reads again.
    let file = dir.join("hub.toml");
    std::fs::write(&file, &text).unwrap();
    config.source_file = Some(file);
    match clock {
        Some(clock) => rating_hub::server::start_with_clock(&config, clock).await,
        None => rating_hub::server::start(&config).await,
    }
}

fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (k, v) in layer {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

pub fn now() -> Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: 0,
    }
}

pub fn ts(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

/// A valid organisation credit code, distinct per `n`.
pub fn org(n: u32) -> String {
    credit_code_with_check(&format!("11530100MA{n:07}")).unwrap()
}

/// A valid resident ID number.
pub fn id_number() -> String {
    id_number_with_check("53010219800101123").unwrap()
}

/// A valid item rating of org(1) in Kunming (530102), rated now.
pub fn rating(key: &str) -> pb::Rating {
    pb::Rating {
        source_key: key.to_owned(),
        channel: pb::Channel::HallDevice as i32,
        level: pb::Level::VerySatisfied as i32,
        target_kind: pb::TargetKind::Item as i32,
        case_number: format!("CASE-{key}"),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        org_name: "五华区政务服务中心".into(),
        hall_id: "H1".into(),
        window_id: "W3".into(),
        staff_id: "S007".into(),
        rated_at: Some(now()),
        rater: Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            real_name: true,
            name: "张三".into(),
            id_number: id_number(),
            phone: "13800138000".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn submit(
    client: &mut IngestServiceClient<Channel>,
    ratings: Vec<pb::Rating>,
) -> Vec<pb::ItemResult> {
    client
        .submit_ratings(pb::SubmitRatingsRequest { ratings })
        .await
        .expect("SubmitRatings succeeds")
        .into_inner()
        .results
}

/// Submits `n` new ratings (keys `prefix`-i, batches of 50); each must be accepted. Returns
/// their hub ids.
pub async fn submit_new(
    client: &mut IngestServiceClient<Channel>,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let all: Vec<_> = (0..n).map(|i| rating(&format!("{prefix}-{i}"))).collect();
    let mut ids = Vec::new();
    for chunk in all.chunks(50) {
        for r in submit(client, chunk.to_vec()).await {
            assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
            ids.push(r.hub_id);
        }
    }
    ids
}

/// Submits one rating and returns its result.
pub async fn submit_one(
    client: &mut IngestServiceClient<Channel>,
    r: pb::Rating,
) -> pb::ItemResult {
    submit(client, vec![r]).await.remove(0)
}

pub fn outcome(r: &pb::ItemResult) -> pb::Outcome {
    pb::Outcome::try_from(r.outcome).unwrap()
}

/// The field names of a BadRequest detail on a status.
pub fn bad_request_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let br = details
        .bad_request()
        .expect("a google.rpc.BadRequest detail");
    br.field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

/// Reads a subscription until it has `n` ratings: (feed sequence, hub id) in arrival order.
/// A subscription read from cursor 0 saw feed sequences 1..=n once each, in order, and
/// exactly the ratings `ids`.
pub fn assert_whole_feed(
    got: Vec<(u64, String)>,
    n: usize,
    ids: &std::collections::HashSet<String>,
    who: &str,
) {
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=n as u64).collect::<Vec<_>>(),
        "{who}: every sequence once, in order"
    );
    assert_eq!(
        &got.into_iter()
            .map(|(_, id)| id)
            .collect::<std::collections::HashSet<_>>(),
        ids,
        "{who}: exactly the acknowledged ratings"
    );
}

pub async fn read_subscription(
    sub: &mut tonic::Streaming<pb::SubscribeResponse>,
    n: usize,
) -> Vec<(u64, String)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            tokio_stream::StreamExt::next(sub),
        )
        .await
        .unwrap_or_else(|_| panic!("subscription stalled at {} of {n}", got.len()))
        .expect("subscription open")
        .expect("subscription healthy")
        .rating
        .unwrap();
        got.push((r.feed_sequence, r.hub_id));
    }
    got
}

/// One upstream's status from `ListUpstreams` on `channel` (a principal allowed to list them).
pub async fn upstream_status(channel: Channel, name: &str) -> pb::UpstreamStatus {
    pb::admin_service_client::AdminServiceClient::new(channel)
        .list_upstreams(pb::ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .upstreams
        .into_iter()
        .find(|u| u.name == name)
        .unwrap_or_else(|| panic!("upstream {name} listed"))
}

/// What grpc.health.v1 `Check` answers for `service` ("": the server as a whole).
pub async fn health(
    hub: &TestHub,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let status = tonic_health::pb::health_client::HealthClient::new(hub.channel_as("tester").await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    tonic_health::pb::health_check_response::ServingStatus::try_from(status).unwrap()
}
