//! For adapters' integration tests (feature `testing`): a real hub on loopback with a test
//! PKI, and clients for it. Not for production use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rating_hub::clock::Clock;
use rating_hub::config::Config;
use rating_hub::pb::v1 as pb;
use rating_hub::pki;
use rating_hub::privacy::PiiKeys;
use rating_hub::server::RunningHub;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::HubConnection;

/// A hub on `port` (0: any free port) with a test PKI in `dir/pki`, a privacy key, and two
/// principals: `adapter` (submit, pull, read-pii) and `tester` (submit, read, read-pii, pull,
/// rectify).
pub async fn start_hub(dir: &Path, port: u16, clock: Arc<dyn Clock>) -> RunningHub {
    // HTTP clients in the tests use rustls without a built-in provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki_dir = dir.join("pki");
    if !pki_dir.join(pki::CA_CERT).exists() {
        pki::create_ca(&pki_dir, "test CA").unwrap();
        pki::issue_server(
            &pki_dir,
            &["localhost", "127.0.0.1"],
            pki::Validity::days(5),
        )
        .unwrap();
        pki::issue_client(&pki_dir, "adapter", pki::Validity::days(5)).unwrap();
        pki::issue_client(&pki_dir, "tester", pki::Validity::days(5)).unwrap();
    }
    PiiKeys::create_key_file(&dir.join("pii.key")).unwrap();
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
[ops]
listen = "127.0.0.1:0"
[storage]
url = "{db}"
[tls]
dev_pki = false
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
[privacy]
active_key = "t"
[privacy.keys]
t = "{pii}"
[rules]
tick_secs = 86400
[principals.adapter]
roles = ["submit", "pull", "read-pii"]
all_regions = true
[principals.tester]
roles = ["submit", "read", "read-pii", "pull", "rectify"]
all_regions = true
"#,
        db = dir.join("hub.db").display(),
        cert = p(pki::SERVER_CERT),
        key = p(pki::SERVER_KEY),
        ca = p(pki::CA_CERT),
        pii = dir.join("pii.key").display(),
    );
    let config = Config::from_layers(Some(("hub.toml", &text)), std::iter::empty()).unwrap();
    rating_hub::server::start_with_clock(&config, clock)
        .await
        .unwrap()
}

/// The adapter's `[hub]` section for a hub started by `start_hub` in `dir`.
pub fn hub_connection(dir: &Path, port: u16) -> HubConnection {
    let p = |f: &str| dir.join("pki").join(f).display().to_string();
    HubConnection {
        endpoint: format!("https://127.0.0.1:{port}"),
        ca: p(pki::CA_CERT),
        cert: p("adapter.pem"),
        key: p("adapter.key"),
        domain: "localhost".into(),
        timeout_ms: 3000,
    }
}

/// An mTLS channel as `tester`.
pub async fn tester_channel(dir: &Path, port: u16) -> Channel {
    let read = |f: &str| std::fs::read(dir.join("pki").join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(pki::CA_CERT)))
        .identity(Identity::from_pem(read("tester.pem"), read("tester.key")))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Every rating at the hub, in feed order.
pub async fn all_ratings(dir: &Path, port: u16) -> Vec<pb::Rating> {
    let mut query =
        pb::query_service_client::QueryServiceClient::new(tester_channel(dir, port).await);
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = query
            .list_ratings(pb::ListRatingsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.ratings);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Waits (at most `limit`, polling every 20 ms) until the hub holds at least `n` ratings.
pub async fn wait_for_ratings(dir: &Path, port: u16, n: usize, limit: Duration) -> Vec<pb::Rating> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let all = all_ratings(dir, port).await;
        if all.len() >= n {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub holds {} ratings after {limit:?}, expected {n}",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared secret adapters' tests sign callbacks with.
pub const CALLBACK_SECRET: &str = "test-callback-secret-0123456789";

/// `[callback_auth]` for a test adapter: the test secret, written into `dir`.
pub fn callback_auth(dir: &Path) -> crate::CallbackAuthConfig {
    let file = dir.join("callback.secret");
    std::fs::write(&file, CALLBACK_SECRET).unwrap();
    crate::CallbackAuthConfig {
        secret_file: file.display().to_string(),
        ..Default::default()
    }
}

/// Headers signing a POST of `body` to `path` as a gateway does; a body signed again gets a moment of its own
/// (two identical bodies sent in one second are two requests, not a replay).
pub fn signed_headers(path: &str, body: &[u8]) -> [(&'static str, String); 2] {
    // A body signed again signs a time of its own (now, or the latest second before it not
    // yet used for this body): the same body sent twice is then two requests, not a replay.
    // (A counter subtracted from the clock collided when a second call came a second after
    // the first.)
    static USED: std::sync::Mutex<std::collections::BTreeSet<(i64, Vec<u8>)>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut used = USED.lock().unwrap_or_else(|p| p.into_inner());
    let mut at = now;
    while used.contains(&(at, body.to_vec())) {
        at -= 1;
    }
    assert!(
        now - at < 250,
        "one body signed more often than the window holds"
    );
    used.insert((at, body.to_vec()));
    drop(used);
    let (ts, sig) = crate::auth::sign(CALLBACK_SECRET.as_bytes(), at, "POST", path, body);
    [("x-timestamp", ts), ("x-signature", sig)]
}

/// A TCP gate in front of a hub, for tests that need the hub unreachable and then back on
/// the same address. Closed, it accepts each connection and drops it at once (the adapter
/// sees the hub unreachable); open, it forwards both ways. Dropping the gate stops it.
pub struct Gate {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A closed gate on a free loopback port, forwarding to `target` once opened.
    pub async fn start(target: std::net::SocketAddr) -> Gate {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (o, r) = (open.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    r.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Gate {
            port,
            open,
            refused,
            task,
        }
    }

    /// Lets new connections through.
    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections the closed gate dropped.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The rows of an adapter's spool file by state (0 waiting, 1 delivered, 2 refused) and the
/// hub's recorded outcome, counted; read on a connection of its own while the adapter runs.
/// `None` while the file or its table cannot be read yet (not created, or busy).
pub async fn spool_counts(path: &Path) -> Option<std::collections::BTreeMap<(i64, String), u64>> {
    use sqlx::Connection;
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.ok()?;
    let rows: Option<Vec<(i64, String, i64)>> =
        sqlx::query_as("SELECT state, outcome, COUNT(*) FROM spool GROUP BY state, outcome")
            .fetch_all(&mut conn)
            .await
            .ok();
    let _ = conn.close().await;
    Some(
        rows?
            .into_iter()
            .map(|(s, o, n)| ((s, o), n as u64))
            .collect(),
    )
}
