//! Starting and stopping the hub: open the store, bind, serve every service, and on shutdown
//! drain in-flight calls and queued commits before the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::admin::AdminApi;
use crate::api::ingest::IngestApi;
use crate::api::query::QueryApi;
use crate::api::rectification::RectificationApi;
use crate::api::sync::SyncApi;
use crate::api::{HubState, Identity};
use crate::auth::{Principal, Registry, Role, Scope};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::pb::v1::admin_service_server::AdminServiceServer;
use crate::pb::v1::ingest_service_server::IngestServiceServer;
use crate::pb::v1::query_service_server::QueryServiceServer;
use crate::pb::v1::rectification_service_server::RectificationServiceServer;
use crate::pb::v1::sync_service_server::SyncServiceServer;
use crate::privacy::PiiKeys;
use crate::store::{PostgresStore, SqliteStore, Store, is_postgres_url};

/// Sets up the development PKI and privacy key when configured, and says so loudly.
fn prepare_dev_material(config: &Config) -> anyhow::Result<()> {
    if !config.tls.dev_pki {
        return Ok(());
    }
    let dir = &config.tls.dev_pki_dir;
    if !config.tls.insecure_plaintext {
        let created = crate::pki::init_dev(dir)
            .with_context(|| format!("creating the development PKI in {}", dir.display()))?;
        tracing::warn!(
            dir = %dir.display(),
            created,
            client = %dir.join(format!("{}.pem", crate::pki::DEV_ADMIN)).display(),
            "Using the DEVELOPMENT PKI (tls.dev_pki = true); not for production."
        );
    }
    if let Some(path) = config.privacy_keys().get(crate::config::DEV_PII_KEY_ID)
        && !path.starts_with("env:")
        && PiiKeys::create_key_file_for(
            std::path::Path::new(path),
            config
                .privacy
                .algorithms
                .get(crate::config::DEV_PII_KEY_ID)
                .copied()
                .unwrap_or_default(),
        )
        .with_context(|| format!("creating the development privacy key {path}"))?
    {
        tracing::warn!(
            path,
            "Created a DEVELOPMENT privacy key; production keys come from your key management."
        );
    }
    Ok(())
}

/// Who is who under `config`: its principals (and the development admin), or in plaintext
/// mode one principal for everyone.
pub(crate) fn identity(config: &Config) -> anyhow::Result<Identity> {
    let quotas = config.limits.quotas();
    if config.tls.insecure_plaintext {
        tracing::error!(
            principal = %config.server.plaintext_source_system,
            "INSECURE: tls.insecure_plaintext is set. No TLS, no authentication: every caller \
             is this principal with every role. Development only."
        );
        return Ok(Identity::Plaintext(Arc::new(Principal::new(
            config.server.plaintext_source_system.clone(),
            Role::ALL.into_iter().collect(),
            Scope::national(),
            quotas,
        ))));
    }
    let mut registry = Registry::from_config(&config.principals, quotas)?;
    if config.tls.dev_pki && registry.get(crate::pki::DEV_ADMIN).is_none() {
        registry.insert(Principal::new(
            crate::pki::DEV_ADMIN.into(),
            Role::ALL.into_iter().collect(),
            Scope::national(),
            quotas,
        ));
    }
    tracing::info!(principals = registry.len(), "Principals registered.");
    Ok(Identity::Mtls(std::sync::RwLock::new(Arc::new(registry))))
}

/// A hub that is serving. Drop does not stop it: call [`RunningHub::shutdown`].
pub struct RunningHub {
    pub local_addr: SocketAddr,
    /// Where /metrics is served, when it is.
    pub ops_addr: Option<SocketAddr>,
    /// Where the public results site is served, when it is.
    pub public_addr: Option<SocketAddr>,
    state: Arc<HubState>,
    store: Arc<dyn Store>,
    relay: Arc<crate::relay::Relay>,
    rules: Arc<crate::rules::engine::RulesEngine>,
    rules_task: JoinHandle<()>,
    /// Signs the rating log's heads.
    log_task: JoinHandle<()>,
    health: HealthReporter,
    health_task: JoinHandle<()>,
    stopping: tokio::sync::watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
}

/// Evidence uploads and downloads under way at once, over all callers: each holds up to a
/// file (`limits.evidence_max_mb`) in memory, twice while it is sealed or opened.
const EVIDENCE_TRANSFERS: usize = 4;

/// The names health reports on: the server as a whole ("", what load balancers usually ask)
/// and each hub service. All of them follow the database.
const HEALTH_NAMES: [&str; 6] = [
    "",
    <IngestServiceServer<IngestApi> as NamedService>::NAME,
    <QueryServiceServer<QueryApi> as NamedService>::NAME,
    <AdminServiceServer<AdminApi> as NamedService>::NAME,
    <SyncServiceServer<SyncApi> as NamedService>::NAME,
    <RectificationServiceServer<RectificationApi> as NamedService>::NAME,
];

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Asks the database every `every` whether it answers (and, while commits fail for a storage
/// reason such as a full disk, whether a probe write commits), and reports NOT_SERVING while
/// it does not: a load balancer in front of several instances then sends calls to those that
/// can commit them (an instance cut off from its database, or whose disk is full, would
/// answer every call UNAVAILABLE). SERVING again once it answers.
async fn follow_database_health(reporter: HealthReporter, store: Arc<dyn Store>, every: Duration) {
    let mut serving = true;
    loop {
        let answer = match tokio::time::timeout(every, store.ping()).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} s", every.as_secs())),
        };
        match answer {
            Err(error) if serving => {
                tracing::warn!(%error, "The database does not answer or cannot commit; health is NOT_SERVING.");
                set_health(&reporter, ServingStatus::NotServing).await;
                serving = false;
            }
            Ok(()) if !serving => {
                tracing::info!("The database answers and commits again; health is SERVING.");
                set_health(&reporter, ServingStatus::Serving).await;
                serving = true;
            }
            _ => {}
        }
        tokio::time::sleep(every).await;
    }
}

/// Opens the store `storage.url` names: PostgreSQL for a `postgres://` URL, else the SQLite
/// file, with the embedded migrations run.
pub async fn open_store(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Arc<dyn Store>> {
    let opened: Result<Arc<dyn Store>, _> = if is_postgres_url(&config.storage.url) {
        PostgresStore::open(&config.postgres_options(), clock)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    } else {
        SqliteStore::open(&config.sqlite_options(), clock)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    };
    opened.with_context(|| format!("opening the database {}", config.storage.display_url()))
}

/// Opens the store and starts serving on `config.server.listen` (port 0 picks a free port).
pub async fn start(config: &Config) -> anyhow::Result<RunningHub> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(
    config: &Config,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningHub> {
    prepare_dev_material(config)?;
    let pii = Arc::new(PiiKeys::load_with(
        &config.privacy.active_key,
        &config.privacy_keys(),
        &config.privacy.algorithms,
    )?);
    tracing::info!(
        active_key = %config.privacy.active_key,
        algorithm = pii.algorithm().as_str(),
        "Personal data is sealed at rest."
    );
    let identity = identity(config)?;
    let tls = if config.tls.insecure_plaintext {
        None
    } else {
        Some(crate::tls::server_config(&config.tls.files()?)?)
    };
    // The operations listener's, with mutual TLS: the same certificate, client check and CRL
    // watcher, over HTTP/1.1 (the gRPC configuration offers only h2).
    let ops_tls = match (&tls, config.ops.mtls) {
        (Some(t), true) => {
            let mut c = (**t).clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(c))
        }
        _ => None,
    };
    let store = open_store(config, clock.clone()).await?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let local_addr = listener.local_addr()?;

    let mut metrics = crate::metrics::Metrics::default();
    if let Some(w) = store.writer_metrics() {
        metrics.register_writer(w);
    }
    let metrics = Arc::new(metrics);
    metrics.watch_files(watched_files(config)?);
    let log_key = match config.rating_log_key() {
        Some(path) => {
            if config.tls.dev_pki && config.rating_log.key.is_empty() && !path.exists() {
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                opts.open(&path)
                    .and_then(|mut f| {
                        std::io::Write::write_all(
                            &mut f,
                            crate::tree_head::SigningKey::generate(config.rating_log.signature)
                                .as_bytes(),
                        )
                    })
                    .with_context(|| {
                        format!("creating the development log key {}", path.display())
                    })?;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("rating_log.key: reading {}", path.display()))?;
            Some(
                crate::tree_head::SigningKey::parse(config.rating_log.signature, &text)
                    .map_err(|e| anyhow::anyhow!("rating_log.key {}: {e}", path.display()))?,
            )
        }
        None => {
            tracing::warn!(
                "rating_log.key is not set: the rating log's tree heads are not signed."
            );
            None
        }
    };
    if let Some(k) = &log_key {
        tracing::info!(public_key = %k.public().to_text(), "Rating log heads are signed with this key.");
    }
    let tree_log = Arc::new(crate::tree_head::TreeLog::new(
        store.clone(),
        clock.clone(),
        log_key,
        Duration::from_secs(config.rating_log.sign_interval_secs.max(1)),
    ));
    let relay = crate::relay::Relay::start(
        &config.upstreams,
        store.clone(),
        pii.clone(),
        clock.clone(),
        crate::relay::Lease {
            holder: config.storage.instance_name(),
            ttl: Duration::from_secs(config.storage.lease_secs),
        },
        config.ops.attempt_log_days,
        metrics.clone(),
        Some(tree_log.clone()),
    )
    .await
    .context("starting upstream delivery")?;
    if config.rating_log.self_check {
        tree_log
            .clone()
            .spawn_self_check(config.storage.url.clone(), metrics.clone());
    }
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let rules = Arc::new(
        crate::rules::engine::RulesEngine::new(
            store.clone(),
            config.rules.profiles()?,
            config.rules.calendar()?,
            clock.clone(),
            config.ingest_rules(),
            pii.clone(),
        )
        .with_calendar_source_of(&config.rules)
        .with_metrics(metrics.clone()),
    );
    let rules_task = rules.clone().spawn(
        Duration::from_secs(config.rules.tick_secs),
        stopping.clone(),
    );
    let log_task = tree_log.clone().spawn(stopping.clone());
    let state = Arc::new(HubState {
        store: store.clone(),
        clock,
        limits: std::sync::RwLock::new(Arc::new(crate::api::Limits::of(config))),
        identity,
        pii,
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.limits.max_in_flight)),
        relay: relay.clone(),
        engine: rules.clone(),
        log: tree_log,
        peer_reports: Default::default(),
        watched_peers: Default::default(),
        evidence_slots: Arc::new(tokio::sync::Semaphore::new(EVIDENCE_TRANSFERS)),
        metrics,
        config_file: config.source_file.clone(),
        started_tls: (config.tls.dev_pki, config.tls.insecure_plaintext),
        restart_only: crate::config::restart_only(config),
        shutdown_grace: Duration::from_secs(config.server.shutdown_grace_secs),
        reloading: tokio::sync::Mutex::new(()),
        stopping,
    });
    state.watch_peer_logs().await;
    let max_msg = config.server.max_message_bytes;
    let ingest = IngestServiceServer::new(IngestApi::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let query = QueryServiceServer::new(QueryApi::new(state.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let admin = AdminServiceServer::new(AdminApi::new(state.clone()));
    let rectification = RectificationServiceServer::new(RectificationApi::new(state.clone()));
    let sync =
        SyncServiceServer::new(SyncApi::new(state.clone())).max_encoding_message_size(64 << 20);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::Serving).await;
    let health_task = tokio::spawn(follow_database_health(
        health_reporter.clone(),
        store.clone(),
        Duration::from_secs(config.server.health_check_secs),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(ingest)
        .add_service(query)
        .add_service(admin)
        .add_service(sync)
        .add_service(rectification);
    let signal = async move {
        let _ = stopped.await;
    };
    let serving = match tls {
        Some(tls) => {
            let timeout = Duration::from_secs(config.tls.handshake_timeout_secs);
            let incoming = crate::tls::incoming(listener, tls, timeout);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
        None => tokio::spawn(
            // TCP_NODELAY as on the TLS path (a listener passed in ignores the builder's).
            router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            ),
        ),
    };
    // The operations listener: metrics are worth serving, not worth refusing to start for
    // (a port taken by another instance on the host).
    let ops_addr = match config
        .ops
        .addr()
        .map_err(crate::config::ConfigError::Invalid)?
    {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let addr = l.local_addr()?;
                tokio::spawn(crate::metrics::serve(
                    l,
                    state.clone(),
                    ops_tls.clone(),
                    stopping_tx.subscribe(),
                ));
                tracing::info!(metrics_addr = %addr, mtls = config.ops.mtls, "Metrics at /metrics.");
                Some(addr)
            }
            Err(e) => {
                tracing::warn!(metrics_addr = %addr, error = %e, "Cannot listen for operations; serving without /metrics.");
                None
            }
        },
    };
    if !config.alerts.webhook_url.is_empty() {
        let notifier = crate::alerts::Notifier::new(&config.alerts)?;
        let (state, alerts, instance, stop) = (
            state.clone(),
            config.alerts.clone(),
            config.storage.instance_name(),
            stopping_tx.subscribe(),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::alerts::run(state, alerts, notifier, instance, stop).await {
                tracing::error!(error = %e, "The alert notifier stopped.");
            }
        });
        tracing::info!("Alerts go to the configured webhook.");
    }
    // The public site (评价结果公开): configured on purpose, so a port it cannot have stops
    // the start, unlike metrics.
    let public_addr = match config
        .public
        .addr()
        .map_err(crate::config::ConfigError::Invalid)?
    {
        None => None,
        Some(addr) => {
            let tls = crate::public::tls_config(&config.public)?;
            let tls_on = tls.is_some();
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("public.listen {addr}: {e}"))?;
            let addr = l.local_addr()?;
            let (state, public, stop) = (
                state.clone(),
                config.public.clone(),
                stopping_tx.subscribe(),
            );
            tokio::spawn(async move {
                if let Err(e) = crate::public::serve(l, state, public, tls, stop).await {
                    tracing::error!(error = %e, "The public site stopped.");
                }
            });
            tracing::info!(public_addr = %addr, tls = tls_on, "Public results site.");
            Some(addr)
        }
    };
    tracing::info!(
        addr = %local_addr,
        mtls = !config.tls.insecure_plaintext,
        database = %config.storage.display_url(),
        durability = store.durability(),
        "Listening."
    );
    Ok(RunningHub {
        local_addr,
        ops_addr,
        public_addr,
        state: state.clone(),
        store,
        relay,
        rules,
        rules_task,
        log_task,
        health: health_reporter,
        health_task,
        stopping: stopping_tx,
        stop: Some(stop),
        serving,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
    })
}

impl RunningHub {
    /// Reads the configuration file again and puts its principals in force (SIGHUP, or
    /// AdminService.ReloadConfig).
    pub async fn reload(&self) -> Result<crate::api::Reloaded, String> {
        self.state.reload().await
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The rules engine (tests tick it by hand with a manual clock).
    pub fn rules(&self) -> Arc<crate::rules::engine::RulesEngine> {
        self.rules.clone()
    }

    /// Stops accepting calls, lets in-flight calls finish (up to the grace period), commits
    /// everything already queued for the writer, and closes the database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        // Load balancers stop sending calls here while in-flight calls finish: health checks
        // answer NOT_SERVING, and health watches get NOT_SERVING and then end (the status
        // channels they follow are replaced), so they do not hold the shutdown for its grace.
        self.health_task.abort();
        let _ = (&mut self.health_task).await;
        set_health(&self.health, ServingStatus::NotServing).await;
        for name in HEALTH_NAMES {
            self.health.clear_service_status(name).await;
        }
        set_health(&self.health, ServingStatus::NotServing).await;
        // Endless streams (Subscribe) end themselves; finite calls run to completion.
        let _ = self.stopping.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(self.grace, &mut self.serving).await {
            Ok(joined) => joined.context("server task")??,
            Err(_) => {
                tracing::warn!(
                    grace_secs = self.grace.as_secs(),
                    "Calls still running after the grace period; cutting them off."
                );
                self.serving.abort();
            }
        }
        let _ = (&mut self.rules_task).await;
        let _ = (&mut self.log_task).await;
        self.relay.shutdown(self.grace).await;
        self.store.close().await;
        tracing::info!("Stopped; every queued commit finished.");
        Ok(())
    }
}

/// The certificates and CRLs whose expiry and age the metrics report (read again by a
/// reload: upstreams come and go).
pub fn watched_files(config: &Config) -> anyhow::Result<crate::metrics::WatchedFiles> {
    let mut files = crate::metrics::WatchedFiles::default();
    if !config.tls.insecure_plaintext {
        let tls = config.tls.files()?;
        files.certificates.push(("server".into(), tls.cert.clone()));
        files
            .certificates
            .push(("ca".into(), tls.client_ca.clone()));
        files.crls = tls.crls.clone();
    }
    if let Some((cert, _)) = config.public.tls() {
        files.certificates.push(("public".into(), cert));
    }
    for (name, u) in &config.upstreams {
        if !u.cert.is_empty() {
            files
                .certificates
                .push((format!("upstream:{name}"), u.cert.clone().into()));
        }
    }
    Ok(files)
}
