//! Prometheus metrics on the operations listener (`[ops] listen`, loopback by default), from
//! the `prometheus-client` crate. No label ever carries rater data: principals, RPC names,
//! outcomes and upstream names only.
//!
//! Counters move where things happen (ingest, denials, the rules engine); gauges that mirror
//! state (the feed head, each upstream's cursor, lag and dead letters) are read at scrape.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RatingLabels {
    pub rpc: String,
    pub principal: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerHeadLabels {
    /// The lower hub's principal.
    pub peer: String,
    /// accepted, inconsistent, self_check, bad_signature
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The lower hub's principal.
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// role, scope, quota, shed
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub upstream: String,
    /// delivered, rejected, partly_rejected, failed, unreadable, ambiguous
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// server, ca, or upstream:<name>
    pub certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrlLabels {
    /// The CRL file's name (not its directory).
    pub crl: String,
}

/// Files whose expiry or age the metrics report, read at each scrape (they are small).
#[derive(Debug, Clone, Default)]
pub struct WatchedFiles {
    /// (label, PEM certificate file): the first certificate's notAfter.
    pub certificates: Vec<(String, std::path::PathBuf)>,
    /// CRL files (PEM or DER): seconds since their thisUpdate.
    pub crls: Vec<std::path::PathBuf>,
}

/// The hub's metrics.
pub struct Metrics {
    registry: Registry,
    /// Ratings (and 办件 events) answered, by RPC, principal and outcome.
    pub ratings: Family<RatingLabels, Counter>,
    /// Calls refused before their work: a missing role, outside the scope, over quota, shed.
    pub denials: Family<DenialLabels, Counter>,
    /// Tree heads lower hubs reported, by what checking them found.
    pub peer_heads: Family<PeerHeadLabels, Counter>,
    /// 1 while this hub's own check found its stored ratings differ from its log.
    pub log_self_check_failed: Gauge,
    /// The signing time of the newest head accepted from each lower hub with a registered
    /// log key (before its first: when this hub started or registered its key).
    pub peer_last_accepted: Family<PeerLabels, Gauge>,
    pub rules_ticks: Counter,
    pub invitations: Counter,
    pub default_ratings: Counter,
    /// Default ratings held back because their deadline needs a year without the notice.
    pub calendar_gaps: Gauge,
    /// Years without the State Council's notice that deadlines now reach (this year, or from
    /// October the next).
    pub calendar_missing_years: Gauge,
    /// 差评 cases whose deadlines were recounted when a calendar was reloaded.
    pub deadlines_recounted: Counter,
    feed_head: Gauge,
    upstream_cursor: Family<UpstreamLabels, Gauge>,
    upstream_lag_records: Family<UpstreamLabels, Gauge>,
    upstream_lag_seconds: Family<UpstreamLabels, Gauge<f64, AtomicU64>>,
    upstream_dead_letters: Family<UpstreamLabels, Gauge>,
    upstream_paused: Family<UpstreamLabels, Gauge>,
    upstream_delivering_here: Family<UpstreamLabels, Gauge>,
    /// Sends to each upstream, by result.
    pub upstream_attempts: Family<AttemptLabels, Counter>,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    crl_age: Family<CrlLabels, Gauge<f64, AtomicU64>>,
    database_bytes: Gauge,
    database_up: Gauge,
    files: std::sync::Mutex<WatchedFiles>,
    crl_next_update: Family<CrlLabels, Gauge>,
    /// The status page's last rendering (src/status.rs).
    pub status_page: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rating_hub");
        let m = Self {
            ratings: Family::default(),
            denials: Family::default(),
            peer_heads: Family::default(),
            log_self_check_failed: Gauge::default(),
            peer_last_accepted: Family::default(),
            rules_ticks: Counter::default(),
            invitations: Counter::default(),
            default_ratings: Counter::default(),
            calendar_gaps: Gauge::default(),
            calendar_missing_years: Gauge::default(),
            deadlines_recounted: Counter::default(),
            feed_head: Gauge::default(),
            upstream_cursor: Family::default(),
            upstream_lag_records: Family::default(),
            upstream_lag_seconds: Family::default(),
            upstream_dead_letters: Family::default(),
            upstream_paused: Family::default(),
            upstream_delivering_here: Family::default(),
            upstream_attempts: Family::default(),
            certificate_expiry: Family::default(),
            crl_age: Family::default(),
            database_bytes: Gauge::default(),
            database_up: Gauge::default(),
            files: Default::default(),
            crl_next_update: Family::default(),
            status_page: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ratings",
            "Ratings and 办件 events answered, by RPC, principal and outcome",
            m.ratings.clone(),
        );
        registry.register(
            "denials",
            "Calls refused before their work, by reason (role, scope, quota, shed)",
            m.denials.clone(),
        );
        registry.register("rules_ticks", "Rules engine passes", m.rules_ticks.clone());
        registry.register(
            "invitations",
            "Invitations (reminders) issued",
            m.invitations.clone(),
        );
        registry.register(
            "default_ratings",
            "Default ratings recorded",
            m.default_ratings.clone(),
        );
        registry.register(
            "calendar_gaps",
            "Default ratings waiting for a year's State Council notice (last tick)",
            m.calendar_gaps.clone(),
        );
        registry.register(
            "calendar_missing_years",
            "Years deadlines reach that have no State Council notice loaded (provisional)",
            m.calendar_missing_years.clone(),
        );
        registry.register(
            "deadlines_recounted",
            "差评 cases whose deadlines a reloaded calendar moved",
            m.deadlines_recounted.clone(),
        );
        registry.register(
            "log_peer_heads",
            "Rating log heads lower hubs reported, by what checking them found",
            m.peer_heads.clone(),
        );
        registry.register(
            "log_self_check_failed",
            "1 while this hub's stored ratings differ from its rating log (rating-hub log verify)",
            m.log_self_check_failed.clone(),
        );
        registry.register(
            "log_peer_head_timestamp_seconds",
            "The signing time of the newest rating log head accepted from each lower hub (before \
             its first: when this hub started or registered its key)",
            m.peer_last_accepted.clone(),
        );
        registry.register("feed_head", "The feed's last sequence", m.feed_head.clone());
        registry.register(
            "upstream_cursor",
            "Each upstream's delivery cursor (feed sequence)",
            m.upstream_cursor.clone(),
        );
        registry.register(
            "upstream_lag_records",
            "Ratings not yet delivered to each upstream",
            m.upstream_lag_records.clone(),
        );
        registry.register(
            "upstream_lag_seconds",
            "How long the oldest undelivered rating has waited, per upstream",
            m.upstream_lag_seconds.clone(),
        );
        registry.register(
            "upstream_dead_letters",
            "Open dead letters per upstream",
            m.upstream_dead_letters.clone(),
        );
        registry.register(
            "upstream_paused",
            "1 while an upstream is paused",
            m.upstream_paused.clone(),
        );
        registry.register(
            "upstream_delivering_here",
            "1 when this instance holds the upstream's lease and delivers",
            m.upstream_delivering_here.clone(),
        );
        registry.register(
            "delivery_attempts",
            "Sends to each upstream, by result (delivered, rejected, partly_rejected, failed, unreadable, ambiguous)",
            m.upstream_attempts.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate the hub uses expires (server, ca, upstream:<name>)",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "crl_age_seconds",
            "Seconds since each configured CRL was issued (its thisUpdate)",
            m.crl_age.clone(),
        );
        registry.register(
            "crl_next_update_timestamp_seconds",
            "When each configured CRL says the next one is due (its nextUpdate)",
            m.crl_next_update.clone(),
        );
        registry.register(
            "database_bytes",
            "The database's size on disk",
            m.database_bytes.clone(),
        );
        registry.register(
            "database_up",
            "1 when the database answered the scrape's query",
            m.database_up.clone(),
        );
        Self { registry, ..m }
    }
}

/// The first certificate's notAfter in a PEM file, as Unix seconds.
fn certificate_not_after(path: &std::path::Path) -> Option<i64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A CRL file's oldest thisUpdate and earliest nextUpdate (PEM with one or more CRLs, or
/// DER), as Unix seconds.
fn crl_dates(path: &std::path::Path) -> Option<(i64, Option<i64>)> {
    use x509_parser::prelude::FromDer;
    let bytes = std::fs::read(path).ok()?;
    let ders: Vec<Vec<u8>> = if bytes.starts_with(b"-----") {
        x509_parser::pem::Pem::iter_from_buffer(&bytes)
            .filter_map(Result::ok)
            .map(|p| p.contents)
            .collect()
    } else {
        vec![bytes]
    };
    let mut this: Option<i64> = None;
    let mut next: Option<i64> = None;
    for der in &ders {
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der).ok()?;
        let t = crl.last_update().timestamp();
        this = Some(this.map_or(t, |x| x.min(t)));
        if let Some(n) = crl.next_update().map(|n| n.timestamp()) {
            next = Some(next.map_or(n, |x| x.min(n)));
        }
    }
    Some((this?, next))
}

impl Metrics {
    /// Counts a batch of answered items: one counter update per outcome present, not one
    /// per item (the ingest path is hot).
    pub fn ratings(&self, rpc: &str, principal: &str, results: &[crate::pb::v1::ItemResult]) {
        let mut counts: Vec<(i32, u64)> = Vec::with_capacity(2);
        for r in results {
            match counts.iter_mut().find(|(o, _)| *o == r.outcome) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.outcome, 1)),
            }
        }
        for (outcome, n) in counts {
            let outcome = crate::pb::v1::Outcome::try_from(outcome)
                .map(|o| {
                    o.as_str_name()
                        .trim_start_matches("OUTCOME_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| "unknown".into());
            self.ratings
                .get_or_create(&RatingLabels {
                    rpc: rpc.to_owned(),
                    principal: principal.to_owned(),
                    outcome,
                })
                .inc_by(n);
        }
    }

    /// Registers the store writer's commit histograms (group size, commit time).
    pub fn register_writer(&mut self, w: crate::store::writer::WriterMetrics) {
        self.registry.register(
            "writer_group_items",
            "Items (ratings, 办件 events, audit records, relay writes) per group commit of the store's writer",
            w.group_items,
        );
        self.registry.register_with_unit(
            "writer_commit",
            "Time of each group commit of the store's writer, failed ones included",
            prometheus_client::registry::Unit::Seconds,
            w.commit_seconds,
        );
    }

    /// Each watched certificate's expiry (Unix seconds), for the status page.
    pub fn certificate_expiries(&self) -> Vec<(String, i64)> {
        let files = self.files.lock().expect("files").clone();
        files
            .certificates
            .iter()
            .filter_map(|(label, path)| Some((label.clone(), certificate_not_after(path)?)))
            .collect()
    }

    /// Each watched CRL file's earliest nextUpdate (Unix seconds), for the alert notifier.
    pub fn crl_next_updates(&self) -> Vec<(String, i64)> {
        let files = self.files.lock().expect("files").clone();
        files
            .crls
            .iter()
            .filter_map(|path| {
                let (_, next) = crl_dates(path)?;
                Some((path.file_name()?.to_string_lossy().into_owned(), next?))
            })
            .collect()
    }

    /// The certificate and CRL files to report on.
    pub fn watch_files(&self, files: WatchedFiles) {
        *self.files.lock().expect("files") = files;
        // A certificate no longer watched (an upstream removed by a reload) has no series.
        self.certificate_expiry.clear();
        self.crl_age.clear();
        self.crl_next_update.clear();
    }

    /// An upstream removed by a reload: its state gauges go (its attempt counters stay, as
    /// counters do).
    pub fn forget_upstream(&self, name: &str) {
        let l = UpstreamLabels {
            upstream: name.to_owned(),
        };
        self.upstream_cursor.remove(&l);
        self.upstream_lag_records.remove(&l);
        self.upstream_lag_seconds.remove(&l);
        self.upstream_dead_letters.remove(&l);
        self.upstream_paused.remove(&l);
        self.upstream_delivering_here.remove(&l);
    }

    /// One send to an upstream, by its result.
    pub fn attempt(&self, upstream: &str, result: &str) {
        self.upstream_attempts
            .get_or_create(&AttemptLabels {
                upstream: upstream.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn denied(&self, reason: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The text exposition, with the state gauges read now.
    pub async fn render(&self, state: &crate::api::HubState) -> String {
        self.feed_head.set(*state.store.feed_head().borrow() as i64);
        // The database first, quickly: when it does not answer, the upstreams' stored state
        // is not read either (each read would wait its own timeout, and the scrape outlast
        // Prometheus's).
        // Reachability by `ping` (its own connection, not behind a busy reader pool); the
        // size when the database answers.
        let second = std::time::Duration::from_secs(1);
        let database_answered = matches!(
            tokio::time::timeout(second, state.store.ping()).await,
            Ok(Ok(()))
        );
        self.database_up.set(i64::from(database_answered));
        if database_answered
            && let Ok(Ok(n)) = tokio::time::timeout(second, state.store.database_bytes()).await
        {
            self.database_bytes.set(n as i64);
        }
        let names = state.relay.names();
        for name in names.clone() {
            let l = UpstreamLabels {
                upstream: name.clone(),
            };
            // An upstream whose stored state cannot be read (the database down) has no
            // series rather than this instance's stale copy, which an alert would trust
            // (zero dead letters, zero lag); its absence is the signal.
            let status = if database_answered {
                state.relay.status(&name).await.ok()
            } else {
                None
            };
            let Some(u) = status.filter(|u| u.stored_state_read) else {
                self.forget_upstream(&l.upstream);
                continue;
            };
            {
                let l = UpstreamLabels {
                    upstream: u.name.clone(),
                };
                self.upstream_cursor.get_or_create(&l).set(u.cursor as i64);
                self.upstream_lag_records
                    .get_or_create(&l)
                    .set(u.lag_records as i64);
                self.upstream_lag_seconds
                    .get_or_create(&l)
                    .set(u.lag_seconds);
                self.upstream_dead_letters
                    .get_or_create(&l)
                    .set(u.open_dead_letters as i64);
                self.upstream_paused
                    .get_or_create(&l)
                    .set(i64::from(u.paused));
                self.upstream_delivering_here
                    .get_or_create(&l)
                    .set(i64::from(u.delivering_here));
            }
        }
        // An upstream a reload removed while its state was read here: the gauges just set
        // for it go again.
        let still = state.relay.names();
        for gone in names.iter().filter(|n| !still.contains(n)) {
            self.forget_upstream(gone);
        }
        let files = self.files.lock().expect("files").clone();
        let now = state.clock.now_micros() / 1_000_000;
        for (label, path) in &files.certificates {
            let l = CertificateLabels {
                certificate: label.clone(),
            };
            match certificate_not_after(path) {
                Some(t) => {
                    self.certificate_expiry.get_or_create(&l).set(t);
                }
                None => {
                    self.certificate_expiry.remove(&l);
                }
            }
        }
        for path in &files.crls {
            let l = CrlLabels {
                crl: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            match crl_dates(path) {
                Some((t, next)) => {
                    self.crl_age.get_or_create(&l).set((now - t) as f64);
                    match next {
                        Some(n) => {
                            self.crl_next_update.get_or_create(&l).set(n);
                        }
                        None => {
                            self.crl_next_update.remove(&l);
                        }
                    }
                }
                None => {
                    self.crl_age.remove(&l);
                    self.crl_next_update.remove(&l);
                }
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// TLS handshakes under way at once on the mutual-TLS operations listener, and per address.
const OPS_HANDSHAKES: usize = 16;
const OPS_HANDSHAKES_PER_ADDRESS: usize = 4;
/// Admitted (ops-role) connections at once.
const OPS_CONNECTIONS: usize = 32;

/// Serves `GET /metrics` and `GET /status` on `listener` until `stop` turns true: plain (on
/// loopback), or with mutual TLS (`tls`: the hub's server configuration, which asks for and
/// checks client certificates), each connection's certificate naming a principal with the
/// `ops` role.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<crate::api::HubState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::routing::get;
    let page_state = state.clone();
    let state_for_tls = state.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let state = state.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        state.metrics.render(&state).await,
                    )
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let state = page_state.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        crate::status::page(&state).await,
                    )
                }
            }),
        );
    let Some(tls) = tls else {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            })
            .await;
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    // Handshakes are counted apart from the connections they admit, and per address: a
    // client without a certificate can hold a few handshake slots for a few seconds, never
    // the slots of the scrapers already in.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(OPS_HANDSHAKES));
    let admitted = Arc::new(tokio::sync::Semaphore::new(OPS_CONNECTIONS));
    let pending: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(handshake_slot) = handshakes.clone().try_acquire_owned() else {
            continue;
        };
        {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            let n = p.entry(peer.ip()).or_default();
            if *n >= OPS_HANDSHAKES_PER_ADDRESS {
                continue;
            }
            *n += 1;
        }
        let (acceptor, app, state) = (acceptor.clone(), app.clone(), state_for_tls.clone());
        let (admitted, pending) = (admitted.clone(), pending.clone());
        connections.spawn(async move {
            let handshake = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                acceptor.accept(tcp),
            )
            .await;
            drop(handshake_slot);
            {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = p.get_mut(&peer.ip()) {
                    *n -= 1;
                    if *n == 0 {
                        p.remove(&peer.ip());
                    }
                }
            }
            let Ok(Ok(tls)) = handshake else {
                return;
            };
            let allowed = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|certs| state.certificate_has_role(certs, crate::auth::Role::Ops));
            if !allowed {
                if let Some(suppressed) = crate::telemetry::throttle("ops.denied") {
                    tracing::warn!(%peer, suppressed, "Operations listener: the certificate names no principal with the ops role.");
                }
                return;
            }
            let Ok(_slot) = admitted.try_acquire_owned() else {
                return;
            };
            use tower::ServiceExt;
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            // A connection lasts at most two minutes (a scraper then opens another), so a
            // principal whose certificate was revoked loses access within that time.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(120),
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service),
            )
            .await;
        });
    }
    connections.shutdown().await;
}
