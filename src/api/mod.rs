//! The gRPC edge: one file per service, plus what every service shares — admitting a call
//! (identity, role, quota, load), and the one mapping from errors to `tonic::Status`.

pub mod admin;
pub mod ingest;
pub mod query;
pub mod rectification;
pub mod sync;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::{Principal, Registry, RetryAfter, Role};
use crate::clock::Clock;
use crate::domain::{IngestRules, Violation};
use crate::pb::v1 as pb;
use crate::privacy::PiiKeys;
use crate::store::{Store, StoreError};

/// How callers are identified.
pub enum Identity {
    /// The certificate's CN names a registered principal (replaced whole by a reload).
    Mtls(std::sync::RwLock<Arc<Registry>>),
    /// Development only: everyone is this principal.
    Plaintext(Arc<Principal>),
}

/// What every service needs: the store, the rules and limits, the clock, who is who.
pub struct HubState {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// The limits in force (replaced whole by a reload; a call keeps the ones it began with).
    pub limits: std::sync::RwLock<Arc<Limits>>,
    pub identity: Identity,
    pub pii: Arc<PiiKeys>,
    pub in_flight: Arc<Semaphore>,
    pub relay: Arc<crate::relay::Relay>,
    pub engine: Arc<crate::rules::engine::RulesEngine>,
    /// The rating log's heads and proofs.
    pub log: Arc<crate::tree_head::TreeLog>,
    /// Lower hubs' head reports, checked one at a time per lower hub (in this process; see
    /// [`HubState::peer_report_lock`]).
    pub peer_reports: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The lower hubs whose heads are expected (a gauge each).
    pub watched_peers: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Prometheus metrics (served on the operations listener).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The configuration file a reload reads again (with the environment over it).
    pub config_file: Option<std::path::PathBuf>,
    /// The TLS settings the hub started with: a reload that changes them is refused (the
    /// listener's certificates are not reloaded, and the development admin must not appear
    /// under a production CA).
    pub started_tls: (bool, bool),
    /// The settings only a restart changes, as the hub started with them: a reload names
    /// those its file changes.
    pub restart_only: Vec<(&'static str, String)>,
    /// How long a reload waits for a removed or changed upstream's worker to stop.
    pub shutdown_grace: Duration,
    /// One reload at a time.
    pub reloading: tokio::sync::Mutex<()>,
    /// Evidence uploads and downloads under way at once (each holds up to a file in memory).
    pub evidence_slots: Arc<Semaphore>,
    /// Becomes true when the hub starts shutting down: endless streams end themselves.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// An admitted call: who is calling, and its slot among the calls in flight.
pub struct Caller {
    pub principal: Arc<Principal>,
    _slot: OwnedSemaphorePermit,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.principal.name
    }
}

fn retry_status(code: Code, message: String, wait: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(wait));
    Status::with_error_details(code, message, details)
}

pub fn over_quota(principal: &str, what: &str, RetryAfter(wait): RetryAfter) -> Status {
    retry_status(
        Code::ResourceExhausted,
        format!(
            "principal {principal} is over its {what} quota; retry after {} ms",
            wait.as_millis().max(1)
        ),
        wait,
    )
}

/// Text with the credentials of any URL in it (`scheme://user:password@host`) masked: a
/// configuration error may quote the line it is about, `storage.url` with its password.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(cred) => {
                out.push_str("***");
                rest = &tail[cred..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// The limits a reload changes: each call reads them once, when it starts.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch: usize,
    pub stream_window: usize,
    pub stream_window_bytes: usize,
    pub max_in_flight: usize,
    /// The largest evidence file taken, in bytes.
    pub evidence_max_bytes: usize,
    pub quality: crate::store::QualityThresholds,
    pub rules: IngestRules,
}

impl Limits {
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            max_batch: config.server.max_batch,
            stream_window: config.server.stream_window,
            stream_window_bytes: config.server.stream_window_bytes,
            max_in_flight: config.limits.max_in_flight,
            evidence_max_bytes: config.limits.evidence_max_mb as usize * 1024 * 1024,
            quality: config.quality.thresholds(),
            rules: config.ingest_rules(),
        }
    }

    /// The settings that differ in `new`, by their names in the configuration file.
    fn changes(&self, new: &Limits) -> Vec<String> {
        let pairs: [(&str, String, String); 7] = [
            (
                "server.max_batch",
                self.max_batch.to_string(),
                new.max_batch.to_string(),
            ),
            (
                "server.stream_window",
                self.stream_window.to_string(),
                new.stream_window.to_string(),
            ),
            (
                "server.stream_window_bytes",
                self.stream_window_bytes.to_string(),
                new.stream_window_bytes.to_string(),
            ),
            (
                "limits.max_in_flight",
                self.max_in_flight.to_string(),
                new.max_in_flight.to_string(),
            ),
            (
                "limits.evidence_max_mb",
                self.evidence_max_bytes.to_string(),
                new.evidence_max_bytes.to_string(),
            ),
            (
                "quality",
                format!("{:?}", self.quality),
                format!("{:?}", new.quality),
            ),
            (
                "validation",
                format!("{:?}", self.rules),
                format!("{:?}", new.rules),
            ),
        ];
        pairs
            .into_iter()
            .filter(|(_, a, b)| a != b)
            .map(|(n, _, _)| n.to_owned())
            .collect()
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub principals: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub upstreams_added: Vec<String>,
    pub upstreams_removed: Vec<String>,
    /// Upstreams whose configuration (or a file or secret it names) changed: their workers
    /// were restarted with it.
    pub upstreams_changed: Vec<String>,
    /// Limits put in force for the next call.
    pub limits_changed: Vec<String>,
    /// Settings the file changes that only a restart puts in force.
    pub restart_needed: Vec<String>,
    /// What could not be done once the new configuration was accepted (an upstream whose
    /// stored state could not be read stays stopped).
    pub warnings: Vec<String>,
}

impl HubState {
    /// The limits in force now.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The lock a lower hub's head reports (and re-baselines) are checked under in this
    /// process: one per lower hub, so one slow check does not hold up the others'.
    ///
    /// Waits at most 45 s (longer than the database's lock wait, 40 s): `UNAVAILABLE` after,
    /// so reports a slow check holds up do not pile up behind it without end.
    pub async fn peer_report_lock(
        &self,
        principal: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, Status> {
        let lock = self
            .peer_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(principal.to_owned())
            .or_default()
            .clone();
        tokio::time::timeout(std::time::Duration::from_secs(45), lock.lock_owned())
            .await
            .map_err(|_| {
                Status::unavailable(
                    "another report of this lower hub is still being checked: report again later",
                )
            })
    }

    /// Every relay principal with a registered log key is a lower hub whose heads are
    /// expected; its gauge of the newest accepted head's time starts from the last head
    /// stored for it (or, before its first, from now: the absence alert then waits the
    /// rule's window). A principal no longer expected loses its gauge.
    pub async fn watch_peer_logs(&self) {
        let registry = match &self.identity {
            Identity::Mtls(r) => r.read().unwrap_or_else(|p| p.into_inner()).clone(),
            Identity::Plaintext(_) => return,
        };
        let expected: std::collections::BTreeSet<String> = registry
            .names()
            .filter(|n| {
                registry
                    .get(n)
                    .is_some_and(|p| p.log_key.is_some() && p.has(Role::Relay))
            })
            .map(str::to_owned)
            .collect();
        let family = &self.metrics.peer_last_accepted;
        let before = std::mem::replace(
            &mut *self.watched_peers.lock().unwrap_or_else(|p| p.into_inner()),
            expected.clone(),
        );
        for gone in before.difference(&expected) {
            family.remove(&crate::metrics::PeerLabels { peer: gone.clone() });
        }
        for name in expected.difference(&before) {
            let since = match self.store.last_accepted_head(name).await {
                Ok(Some((_, _, time, _))) => time,
                _ => self.clock.now_micros(),
            };
            family
                .get_or_create(&crate::metrics::PeerLabels { peer: name.clone() })
                .set(since / 1_000_000);
        }
    }

    /// Reads the configuration file again and, when all of it loads and validates (every
    /// upstream's certificates, profile and keys read, its sink built), puts in force for the
    /// next call its principals (and their quotas), its limits, and its upstreams: added ones
    /// start delivering, removed ones stop (their cursors and dead letters stay stored),
    /// changed ones restart with the new settings from their stored cursors; the others go
    /// on untouched. Calls already admitted and open streams go on. A file that does not
    /// load changes nothing, and the reason is the error. Settings only a restart changes are
    /// named in the report.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let Ok(_one) = self.reloading.try_lock() else {
            return Err("a reload is under way".into());
        };
        let file = self.config_file.clone();
        let config = tokio::task::spawn_blocking(move || {
            crate::config::Config::load(file.as_deref()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("reading the configuration failed: {e}"))??;
        if (config.tls.dev_pki, config.tls.insecure_plaintext) != self.started_tls {
            return Err(
                "tls.dev_pki or tls.insecure_plaintext changed: TLS changes need a restart".into(),
            );
        }
        // Everything is checked before anything changes.
        let registry = match &self.identity {
            Identity::Plaintext(_) => None,
            Identity::Mtls(_) => match crate::server::identity(&config)
                .map_err(|e| redact_urls(&format!("{e:#}")))?
            {
                Identity::Mtls(new) => Some(new.into_inner().unwrap_or_else(|p| p.into_inner())),
                Identity::Plaintext(_) => {
                    return Err(
                        "the new configuration sets tls.insecure_plaintext; restart to change that"
                            .into(),
                    );
                }
            },
        };
        let files =
            crate::server::watched_files(&config).map_err(|e| redact_urls(&format!("{e:#}")))?;
        let mut plan = self
            .relay
            .plan(&config.upstreams)
            .await
            .map_err(|e| redact_urls(&e))?;
        let limits = Limits::of(&config);

        let mut report = Reloaded {
            restart_needed: crate::config::restart_only(&config)
                .into_iter()
                .zip(&self.restart_only)
                .filter(|((_, new), (_, old))| new != old)
                .map(|((name, _), _)| name.to_owned())
                .collect(),
            ..Default::default()
        };
        if let (Some(new), Identity::Mtls(current)) = (registry, &self.identity) {
            let mut slot = current.write().unwrap_or_else(|p| p.into_inner());
            let names = |r: &Registry| -> std::collections::BTreeSet<String> {
                r.names().map(str::to_owned).collect()
            };
            let (before, after) = (names(&slot), names(&new));
            report.principals = new.len();
            report.added = after.difference(&before).cloned().collect();
            report.removed = before.difference(&after).cloned().collect();
            *slot = new;
        }
        self.watch_peer_logs().await;
        {
            let mut slot = self.limits.write().unwrap_or_else(|p| p.into_inner());
            report.limits_changed = slot.changes(&limits);
            let (old, new) = (slot.max_in_flight, limits.max_in_flight);
            if new > old {
                self.in_flight.add_permits(new - old);
            } else if new < old {
                // The calls in flight finish; their slots are then retired until the
                // difference is gone.
                let slots = self.in_flight.clone();
                // At most MAX_IN_FLIGHT apart (the configuration's bound): fits a u32.
                let retire = u32::try_from(old - new).expect("bounded by the configuration");
                tokio::spawn(async move {
                    if let Ok(p) = slots.acquire_many_owned(retire).await {
                        p.forget();
                    }
                });
            }
            *slot = Arc::new(limits);
        }
        self.metrics.watch_files(files);
        if !plan.is_empty()
            && let Err(e) = self.relay.apply(&mut plan, self.shutdown_grace).await
        {
            report.warnings.push(redact_urls(&e));
        }
        report.upstreams_added = plan.added;
        report.upstreams_removed = plan.removed;
        report.upstreams_changed = plan.changed;
        tracing::info!(
            principals = report.principals,
            added = ?report.added,
            removed = ?report.removed,
            upstreams_added = ?report.upstreams_added,
            upstreams_removed = ?report.upstreams_removed,
            upstreams_changed = ?report.upstreams_changed,
            limits_changed = ?report.limits_changed,
            restart_needed = ?report.restart_needed,
            "Configuration reloaded."
        );
        for w in &report.warnings {
            tracing::error!(warning = %w, "Configuration reloaded, but not all of it is in force.");
        }
        Ok(report)
    }

    /// Whether a client certificate names a registered principal with `role` (the
    /// operations listener's check, outside gRPC).
    pub fn certificate_has_role(
        &self,
        certs: &[rustls::pki_types::CertificateDer<'_>],
        role: Role,
    ) -> bool {
        let Identity::Mtls(registry) = &self.identity else {
            return false;
        };
        let Some(name) = crate::tls::principal_name(certs) else {
            return false;
        };
        let registry = registry.read().unwrap_or_else(|p| p.into_inner()).clone();
        registry.get(&name).is_some_and(|p| p.has(role))
    }

    fn identify<T>(&self, req: &Request<T>) -> Result<Arc<Principal>, Status> {
        match &self.identity {
            Identity::Plaintext(p) => Ok(p.clone()),
            Identity::Mtls(registry) => {
                let certs = req
                    .peer_certs()
                    .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
                let name = crate::tls::principal_name(&certs).ok_or_else(|| {
                    Status::unauthenticated("the client certificate has no subject common name")
                })?;
                let registry = registry.read().unwrap_or_else(|p| p.into_inner()).clone();
                registry.get(&name).ok_or_else(|| {
                    if let Some(suppressed) =
                        crate::telemetry::throttle_for("api.denied_unknown", &name)
                    {
                        tracing::warn!(principal = %name, suppressed, "Denied: certificate names no registered principal.");
                    }
                    Status::permission_denied(format!(
                        "certificate CN {name:?} is not a registered principal"
                    ))
                })
            }
        }
    }

    /// Admits a call: identifies the caller, checks the role, takes one call from its quota
    /// and a slot among the calls in flight (shedding load when there is none).
    pub fn admit<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        role: Role,
    ) -> Result<Caller, Status> {
        self.admit_any(req, rpc, role, None)
    }

    /// Admits a call that `role` or else `or` (when given) may make.
    pub fn admit_any<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        role: Role,
        or: Option<Role>,
    ) -> Result<Caller, Status> {
        let principal = self.identify(req)?;
        if !principal.has(role) && !or.is_some_and(|r| principal.has(r)) {
            if let Some(suppressed) =
                crate::telemetry::throttle_for("api.denied_role", &principal.name)
            {
                tracing::warn!(principal = %principal.name, rpc, %role, suppressed, "Denied: role missing.");
            }
            self.metrics.denied("role");
            return Err(Status::permission_denied(format!(
                "principal {} lacks the {role} role that {rpc} needs",
                principal.name
            )));
        }
        if let Err(wait) = principal.check_request() {
            if let Some(suppressed) =
                crate::telemetry::throttle_for("api.over_quota", &principal.name)
            {
                tracing::info!(principal = %principal.name, rpc, suppressed, "Over request quota.");
            }
            self.metrics.denied("quota");
            return Err(over_quota(&principal.name, "request", wait));
        }
        let slot = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            self.metrics.denied("shed");
            let max = self.limits().max_in_flight;
            if let Some(suppressed) = crate::telemetry::throttle("api.shed") {
                tracing::warn!(
                    rpc,
                    max,
                    suppressed,
                    "Shedding load: too many calls in flight."
                );
            }
            retry_status(
                Code::Unavailable,
                format!("the hub is overloaded ({max} calls in flight); retry with backoff"),
                Duration::from_millis(100),
            )
        })?;
        Ok(Caller {
            principal,
            _slot: slot,
        })
    }
}

impl HubState {
    /// Puts the raters' personal data back into stored ratings: masked, or in full for
    /// read-pii callers — after the audit records of those reads committed.
    pub async fn reveal(
        &self,
        caller: &Caller,
        rpc: &str,
        rows: Vec<crate::store::StoredRating>,
    ) -> Result<Vec<pb::Rating>, Status> {
        let unmasked = caller.principal.has(Role::ReadPii);
        let mut audited = Vec::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut rating = row.rating;
            if let Some(sealed) = &row.pii {
                let hub_id = uuid::Uuid::parse_str(&rating.hub_id)
                    .map_err(|_| Status::internal("stored hub id is not a UUID"))?;
                self.pii.reveal_persons(
                    rating.rater.as_mut(),
                    rating.agent.as_mut(),
                    sealed,
                    &crate::store::rating_aad(&hub_id),
                    unmasked,
                )?;
                if unmasked {
                    audited.push(hub_id);
                }
            }
            out.push(rating);
        }
        self.store
            .record_pii_access(caller.name(), rpc, &audited)
            .await?;
        Ok(out)
    }
}

/// INVALID_ARGUMENT with a google.rpc.BadRequest detail listing every violation.
pub fn bad_request(violations: &[Violation]) -> Status {
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    let summary = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    Status::with_error_details(Code::InvalidArgument, summary, details)
}

pub fn violation(field: impl Into<String>, description: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        description: description.into(),
    }
}

pub fn field_violations(violations: Vec<Violation>) -> Vec<pb::FieldViolation> {
    violations
        .into_iter()
        .map(|v| pb::FieldViolation {
            field: v.field,
            description: v.description,
        })
        .collect()
}

/// Parses a page size: 0 means `default`, above `max` is refused.
pub fn page_size(raw: u32, default: u32, max: u32) -> Result<u32, Status> {
    match raw {
        0 => Ok(default),
        n if n > max => Err(bad_request(&[violation(
            "page_size",
            format!("must be at most {max}"),
        )])),
        n => Ok(n),
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        // The writer logs each failed commit (at most once a second, with a count of the
        // lines it held back); a caller's failure is not logged again here.
        match e {
            StoreError::ShuttingDown => Status::unavailable(
                "the hub is shutting down; retry against another instance or later",
            ),
            StoreError::Database(ref db) if StoreError::is_connection(db) => {
                if let Some(suppressed) = crate::telemetry::throttle("api.db_unreachable") {
                    tracing::error!(error = %e, suppressed, "The database is unreachable.");
                }
                Status::unavailable("the database is unreachable; nothing was acknowledged, retry")
            }
            StoreError::Unavailable(_) => {
                Status::unavailable("the database is unreachable; nothing was acknowledged, retry")
            }
            StoreError::Storage(ref cause) => {
                // The cause as it is (no personal data: a database error names no values).
                let cause = cause.split(':').next().unwrap_or("storage failure");
                Status::unavailable(format!(
                    "the hub cannot write to its storage ({cause}); nothing was acknowledged, \
                     retry later or against another instance"
                ))
            }
            StoreError::Refused(_) => {
                Status::internal("the database refused the write; nothing was acknowledged")
            }
            // Corrupt data is never held back.
            StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "Stored data is corrupt.");
                Status::internal("storage failure; nothing was acknowledged, retry later")
            }
            other => {
                if let Some(suppressed) = crate::telemetry::throttle("api.store_failure") {
                    tracing::error!(error = %other, suppressed, "Store failure.");
                }
                Status::internal("storage failure; nothing was acknowledged, retry later")
            }
        }
    }
}

impl From<crate::privacy::PrivacyError> for Status {
    fn from(e: crate::privacy::PrivacyError) -> Self {
        tracing::error!(error = %e, "Cannot open sealed personal data.");
        Status::internal("cannot open stored personal data (privacy key configuration)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_urls_are_masked_in_reload_errors() {
        let e =
            "TOML parse error at line 3\n  |\n3 | url = \"postgres://hub:s3cret@db:5432/hub\"x\n";
        let r = super::redact_urls(e);
        assert!(!r.contains("s3cret") && !r.contains("hub:"), "{r}");
        assert!(r.contains("postgres://***@db:5432/hub"), "{r}");
        assert_eq!(super::redact_urls("http://host/path"), "http://host/path");
    }
}
