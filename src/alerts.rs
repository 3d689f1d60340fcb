//! Alerts for sites without Prometheus: the conditions of the shipped alert rules
//! (deploy/prometheus/rating-hub-alerts.yml), checked every `check_secs` and sent to a webhook
//! once per change of state — `firing` when a condition starts, `resolved` when it ends. A
//! webhook that does not answer gets the same events again at the next check, in order (at
//! most 1,000 waiting; older ones are dropped and said). The body is JSON; with a secret, its
//! HMAC-SHA256 is in `X-RatingHub-Signature` (hex). No rater data: upstream names, counts,
//! certificate labels and the upstreams' own answers with numbers masked.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::HubState;

/// `[alerts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Where to POST alert events; empty turns the notifier off.
    pub webhook_url: String,
    /// For an https webhook: the CA its certificate chains to (PEM).
    pub webhook_ca: String,
    /// A file holding the shared secret for `X-RatingHub-Signature`; empty: unsigned.
    pub webhook_secret_file: String,
    pub check_secs: u64,
    /// An upstream this far behind (seconds) is lagging.
    pub lag_limit_secs: u64,
    /// A certificate expiring within this many days is expiring.
    pub certificate_warning_days: u64,
    /// A condition is sent once it has held this long (the rules' `for:`): a single failed
    /// send or a moment's lag is not an alert.
    pub hold_secs: u64,
}

impl AlertsConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.webhook_url.is_empty() {
            return Ok(());
        }
        let url = reqwest::Url::parse(&self.webhook_url)
            .map_err(|e| format!("alerts.webhook_url: {e}"))?;
        match url.scheme() {
            "https" if self.webhook_ca.is_empty() => {
                return Err(
                    "alerts.webhook_ca: an https webhook needs the CA its certificate chains to"
                        .into(),
                );
            }
            "https" | "http" => {}
            other => {
                return Err(format!(
                    "alerts.webhook_url: scheme {other:?} is not http or https"
                ));
            }
        }
        if self.check_secs == 0 || self.lag_limit_secs == 0 {
            return Err("alerts.check_secs and alerts.lag_limit_secs must be at least 1".into());
        }
        if !(1..=365).contains(&self.certificate_warning_days) {
            return Err("alerts.certificate_warning_days must be 1 to 365".into());
        }
        Ok(())
    }
}

/// One change of state, as sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AlertEvent {
    /// "firing" or "resolved".
    pub status: String,
    /// database_unreachable, upstream_failing, upstream_lagging, upstream_paused,
    /// dead_letters_open, calendar_missing, certificate_expiring, crl_stale.
    pub alert: String,
    /// What it is about: an upstream's name, a certificate's label, a CRL's file name; empty
    /// for the hub as a whole.
    pub subject: String,
    /// In Chinese, for a person.
    pub summary: String,
    /// The instance that saw it.
    pub instance: String,
    /// When (China Standard Time).
    pub at: String,
}

/// The conditions in force now, (alert, subject) → summary, and the subjects that could not
/// be looked at.
async fn conditions(
    state: &HubState,
    cfg: &AlertsConfig,
) -> (BTreeMap<(String, String), String>, Vec<String>) {
    let mut unknown = Vec::new();
    let mut now_firing = BTreeMap::new();
    let mut fire = |alert: &str, subject: &str, summary: String| {
        now_firing.insert((alert.to_owned(), subject.to_owned()), summary);
    };
    // `ping`: a trivial query on a connection of its own, not behind a busy reader pool.
    let database = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    let database_up = matches!(database, Ok(Ok(_)));
    if !database_up {
        fire(
            "database_unreachable",
            "",
            "数据库无法连接：评价暂不能写入（已确认的评价不会丢失）".into(),
        );
    }
    for name in state.relay.names() {
        if !database_up {
            unknown.push(name);
            continue;
        }
        {
            let Ok(s) = state.relay.status(&name).await else {
                unknown.push(name);
                continue;
            };
            if s.paused {
                fire(
                    "upstream_paused",
                    &name,
                    format!("上级平台 {name} 已暂停推送"),
                );
            }
            if let Some((e, _)) = &s.last_error {
                fire(
                    "upstream_failing",
                    &name,
                    // The upstream's words were cleaned where they arrived
                    // (clean_upstream_text: numbers however written masked).
                    format!("向上级平台 {name} 推送失败：{e}"),
                );
            }
            // While paused, the lag grows by an operator's choice: not an alert of its own.
            if !s.paused && s.lag_seconds > cfg.lag_limit_secs as f64 {
                fire(
                    "upstream_lagging",
                    &name,
                    format!(
                        "上级平台 {name} 有 {} 条待推送，最早已等待 {:.0} 秒",
                        s.lag_records, s.lag_seconds
                    ),
                );
            }
            if s.open_dead_letters > 0 {
                fire(
                    "dead_letters_open",
                    &name,
                    format!("上级平台 {name} 拒收 {} 条（死信）", s.open_dead_letters),
                );
            }
        }
    }
    let missing = state.metrics.calendar_missing_years.get();
    if missing > 0 {
        fire(
            "calendar_missing",
            "",
            format!("有 {missing} 个年度尚未载入国务院节假日安排，期限按临时日历计算"),
        );
    }
    let now = state.clock.now_micros() / 1_000_000;
    for (label, expiry) in state.metrics.certificate_expiries() {
        let left = expiry - now;
        if left < 0 {
            fire(
                "certificate_expired",
                &label,
                format!("证书 {label} 已过期"),
            );
        } else if left < (cfg.certificate_warning_days * 86_400) as i64 {
            fire(
                "certificate_expiring",
                &label,
                format!("证书 {label} 将在 {} 天内到期", left / 86_400 + 1),
            );
        }
    }
    for (crl, next) in state.metrics.crl_next_updates() {
        if next - now < 3 * 86_400 {
            fire("crl_stale", &crl, format!("证书吊销列表 {crl} 需要更新"));
        }
    }
    (now_firing, unknown)
}

/// What the notifier sends with: built before the hub says it listens, so a CA or secret
/// file that does not load stops the start instead of silently turning alerts off.
pub struct Notifier {
    client: reqwest::Client,
    secret: Option<Vec<u8>>,
}

impl Notifier {
    pub fn new(cfg: &AlertsConfig) -> anyhow::Result<Self> {
        let secret = if cfg.webhook_secret_file.is_empty() {
            None
        } else {
            let raw = std::fs::read_to_string(PathBuf::from(&cfg.webhook_secret_file))
                .map_err(|e| anyhow::anyhow!("alerts.webhook_secret_file: {e}"))?;
            // `echo secret > file` ends it with a newline that is not part of it.
            let s = raw.trim();
            if s.is_empty() {
                anyhow::bail!("alerts.webhook_secret_file: the file is empty");
            }
            Some(s.as_bytes().to_vec())
        };
        Ok(Self {
            client: client(cfg).map_err(|e| anyhow::anyhow!("alerts.webhook_ca: {e:#}"))?,
            secret,
        })
    }
}

fn client(cfg: &AlertsConfig) -> anyhow::Result<reqwest::Client> {
    // A redirect would turn the POST into a GET that "succeeds": none are followed.
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if !cfg.webhook_ca.is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        // read_certs refuses a file with no certificate in it (every send would fail).
        for c in crate::tls::read_certs(std::path::Path::new(&cfg.webhook_ca))? {
            roots.add(c)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        b = b.use_preconfigured_tls(tls);
    } else {
        // Plain http: reqwest still wants a TLS configuration to build.
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        b = b.use_preconfigured_tls(tls);
    }
    Ok(b.build()?)
}

/// Checks the conditions every `check_secs` and sends their changes, until `stop`.
pub async fn run(
    state: Arc<HubState>,
    cfg: AlertsConfig,
    notifier: Notifier,
    instance: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use hmac::{Mac, SimpleHmac};
    let Notifier { client, secret } = notifier;
    let hold = Duration::from_secs(cfg.hold_secs);
    // Conditions seen but not yet held for `hold_secs`, since when.
    let mut seen: BTreeMap<(String, String), std::time::Instant> = BTreeMap::new();
    let mut firing: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut pending: VecDeque<AlertEvent> = VecDeque::new();
    let mut every = tokio::time::interval(Duration::from_secs(cfg.check_secs));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        let (mut now, unknown) = conditions(&state, &cfg).await;
        // A subject that could not be looked at (the database down, a status unreadable)
        // keeps what was firing for it: no false "resolved".
        for (key, summary) in &firing {
            if unknown.contains(&key.1) && key.0.starts_with("upstream_")
                || unknown.contains(&key.1) && key.0 == "dead_letters_open"
            {
                now.entry(key.clone()).or_insert_with(|| summary.clone());
            }
        }
        // A condition fires once it has held for `hold_secs` (the rules' `for:`).
        seen.retain(|k, _| now.contains_key(k));
        let now: BTreeMap<(String, String), String> = now
            .into_iter()
            .filter(|(k, _)| {
                firing.contains_key(k)
                    || seen
                        .entry(k.clone())
                        .or_insert_with(std::time::Instant::now)
                        .elapsed()
                        >= hold
            })
            .collect();
        let at = crate::time::format_cst_micros(state.clock.now_micros());
        let event = |status: &str, (alert, subject): &(String, String), summary: &str| AlertEvent {
            status: status.to_owned(),
            alert: alert.clone(),
            subject: subject.clone(),
            summary: summary.to_owned(),
            instance: instance.clone(),
            at: at.clone(),
        };
        for (key, summary) in &now {
            if !firing.contains_key(key) {
                pending.push_back(event("firing", key, summary));
            }
        }
        for (key, summary) in &firing {
            if !now.contains_key(key) {
                pending.push_back(event("resolved", key, summary));
            }
        }
        firing = now;
        while pending.len() > 1_000 {
            pending.pop_front();
            if let Some(suppressed) = crate::telemetry::throttle("alerts.dropped") {
                tracing::warn!(
                    suppressed,
                    "Alert events dropped: the webhook has not answered for long."
                );
            }
        }
        // In order; the first that fails waits for the next check with the rest.
        while let Some(e) = pending.front() {
            let body = serde_json::to_vec(e).expect("serialisable");
            let mut req = client
                .post(&cfg.webhook_url)
                .header("content-type", "application/json");
            if let Some(secret) = &secret {
                let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(secret).expect("any key");
                mac.update(&body);
                req = req.header(
                    "x-ratinghub-signature",
                    hex::encode(mac.finalize().into_bytes()),
                );
            }
            match req.body(body).send().await {
                Ok(r) if r.status().is_success() => {
                    pending.pop_front();
                }
                Ok(r) => {
                    if let Some(suppressed) = crate::telemetry::throttle("alerts.webhook") {
                        tracing::warn!(
                            status = r.status().as_u16(),
                            suppressed,
                            "The alert webhook refused an event; will send it again."
                        );
                    }
                    break;
                }
                Err(e) => {
                    if let Some(suppressed) = crate::telemetry::throttle("alerts.webhook") {
                        tracing::warn!(error = %e.without_url(), suppressed, "The alert webhook did not answer; will send again.");
                    }
                    break;
                }
            }
        }
    }
}
