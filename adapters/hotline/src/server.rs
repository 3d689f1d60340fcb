//! The adapter's HTTP side (gateway callbacks, IVR results, metrics), the invitation poller
//! and the forwarder, wired together.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use rating_hub::pb::v1 as pb;
use rating_hub::rules::Date;
use rating_hub_adapter_kit::{Forwarder, Metrics, Spool, Spooled, source_key};

use crate::config::{GatewayConfig, HotlineConfig};
use crate::reply::{Reply, Scale, parse_ivr, parse_sms};
use crate::surveys::{Surveys, now_micros};

struct Inner {
    cfg: HotlineConfig,
    sms_scale: Scale,
    ivr_scale: Scale,
    spool: Spool,
    surveys: Surveys,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
}

/// A running adapter.
pub struct Hotline {
    pub addr: SocketAddr,
    pub spool: Spool,
    pub surveys: Surveys,
    pub metrics: Arc<Metrics>,
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// This adapter is the only one on its spool while this is open.
    _lock: std::fs::File,
}

/// One SMS the gateway received (its MO callback item).
#[derive(Debug, Clone, Deserialize)]
pub struct MoMessage {
    pub phone_number: String,
    #[serde(default)]
    pub send_time: String,
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub dest_code: String,
    #[serde(default)]
    pub sequence_id: String,
}

/// One IVR key result.
#[derive(Debug, Clone, Deserialize)]
pub struct IvrResult {
    pub call_id: String,
    pub phone: String,
    #[serde(default)]
    pub key: String,
    /// The survey's reference (its reply code).
    pub survey: String,
}

/// A phone number's digits, without China's country code: "+86 139 1234 5678",
/// "008613912345678" and "13912345678" are the same phone (gateways report either).
fn digits(s: &str) -> String {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    match (d.len(), d.strip_prefix("0086"), d.strip_prefix("86")) {
        (15, Some(rest), _) | (13, _, Some(rest)) => rest.to_owned(),
        _ => d,
    }
}

/// `yyyy-MM-dd HH:mm:ss` in China Standard Time → microseconds.
fn parse_cst(s: &str) -> Option<i64> {
    let (date, time) = s.trim().split_once(' ')?;
    let d = Date::parse(date)?;
    let mut hms = time.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, sec) = (
        hms.next()??,
        hms.next()??,
        hms.next().flatten().unwrap_or(0),
    );
    if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..60).contains(&sec) {
        return None;
    }
    Some(d.start_micros() + ((h * 60 + m) * 60 + sec) * 1_000_000)
}

impl Inner {
    /// Turns one reply into a spooled rating or a kept unmatched reply. Errors only when the
    /// reply could not be stored durably (then the gateway is told to retry).
    async fn take_reply(&self, incoming: Incoming<'_>) -> anyhow::Result<&'static str> {
        let Incoming {
            channel,
            dest_code,
            phone,
            at,
            reply,
            content,
        } = incoming;
        let ch = if channel == pb::Channel::Sms {
            "sms"
        } else {
            "ivr"
        };
        let keep = |reason: String| async move {
            self.surveys
                // Kept for an operator to read: numbers that could be a phone or an ID masked.
                .keep_unmatched(ch, dest_code, &reason, &crate::reply::masked(content))
                .await?;
            self.metrics.inc(&format!("{ch}_not_rated_total"));
            tracing::info!(channel = ch, dest_code, reason, "Reply kept, not a rating.");
            Ok::<_, anyhow::Error>("kept")
        };
        let level = match reply {
            Reply::Rating(level) => level,
            Reply::Replay => return keep("replay key: not a rating".into()).await,
            Reply::NoKey => return keep("no key: not a rating".into()).await,
            Reply::Unrecognized(why) => return keep(format!("not understood: {why}")).await,
        };
        let Some(survey) = self.surveys.by_code(dest_code).await? else {
            return keep("unknown reply code: no such survey".into()).await;
        };
        let now = now_micros();
        if now > survey.expires_at {
            return keep("the survey expired".into()).await;
        }
        if survey.answered {
            return keep("the survey was already answered".into()).await;
        }
        if digits(phone) != digits(&survey.phone) {
            return keep("reply from another phone than the survey's".into()).await;
        }
        let mut attributes = BTreeMap::new();
        attributes.insert("survey".to_owned(), survey.dest_code.clone());
        // The rater's own words, when the reply is more than a key: the reason of a 差评
        // (the hub needs none, but the case's verification starts from it). Numbers long
        // enough to be a phone or an ID are masked; control characters dropped.
        let words = if channel == pb::Channel::Sms {
            crate::reply::reply_text(content)
        } else {
            String::new()
        };
        // The key is the survey's: one rating per survey, whatever the gateway numbers its
        // messages (a gateway that restarts its sequence, an IVR without call ids: before,
        // a second survey's reply with a reused gateway id was dropped while the gateway was
        // told 接收成功). A re-send of the same reply finds it; a different one is refused,
        // whichever channel it came by (an SMS and an IVR reply to one survey are one
        // rating, not two).
        // With the invitation: a reply code whose survey was pruned after the retention period
        // may be drawn again, and the new survey's rating is not the old one's.
        let key = source_key(
            "survey",
            &[&survey.dest_code, &survey.invitation_id.to_string()],
        );
        let rating = pb::Rating {
            text: words,
            source_key: key,
            channel: channel as i32,
            level: level as i32,
            rated_at: Some(rating_hub::time::timestamp_from_micros(
                at.unwrap_or(now).min(now),
            )),
            rater: Some(pb::Rater {
                kind: pb::RaterKind::NaturalPerson as i32,
                // The reply came from the applicant's own phone on record for this case: a
                // rating by a known person (实名), whom the callback can reach.
                real_name: true,
                phone: digits(phone),
                ..Default::default()
            }),
            attributes,
            ..rating_hub::domain::rating_for_case(&survey.case)
        };
        match self.spool.put(&rating).await? {
            Spooled::Stored | Spooled::AlreadyThere => {}
            // Another reply to this survey was spooled before the survey was marked answered
            // (a crash in between): one rating per survey; this one is kept, not lost.
            Spooled::Conflict => {
                self.surveys.mark_answered(survey.id).await?;
                return keep("the survey was already answered (a different reply)".into()).await;
            }
        }
        self.surveys.mark_answered(survey.id).await?;
        self.metrics.inc(&format!("{ch}_ratings_total"));
        tracing::info!(
            channel = ch,
            dest_code,
            level = level.as_str_name(),
            "Rating spooled."
        );
        Ok("rated")
    }

    async fn take_mo(&self, m: &MoMessage) -> anyhow::Result<&'static str> {
        self.take_reply(Incoming {
            channel: pb::Channel::Sms,
            dest_code: &m.dest_code,
            phone: &m.phone_number,
            at: parse_cst(&m.send_time),
            reply: parse_sms(&m.content, self.sms_scale),
            content: &m.content,
        })
        .await
    }

    /// Sends a survey's invitation SMS and marks it sent. A message the gateway refuses (a
    /// number it will not reach: HTTP 400 or 422) leaves the survey unsent, counted and logged —
    /// not holding up the invitations after it; unsent surveys are tried again at each poll
    /// while they are open and unanswered. `Ok(false)` when the gateway itself failed (no
    /// answer, 5xx): the caller stops sending this round rather than wait out every timeout.
    /// Only a failure to record the sending is an error.
    async fn send_survey(&self, survey: &crate::surveys::Survey) -> anyhow::Result<bool> {
        let Some(gw) = &self.cfg.gateway else {
            return Ok(true);
        };
        match self
            .send_sms(gw, &survey.phone, &survey.case.item_name, &survey.dest_code)
            .await
        {
            Ok(()) => {
                self.surveys.mark_sent(survey.id).await?;
                self.metrics.inc("invitations_sent_total");
                Ok(true)
            }
            Err(e) => {
                self.metrics.inc("invitations_send_failed_total");
                let refused = e.downcast_ref::<SmsRefused>().is_some();
                if let Some(held) = rating_hub::telemetry::throttle("hotline.sms_send") {
                    tracing::warn!(survey = survey.id, error = %e, refused, held, "Invitation SMS not sent; will try again.");
                }
                Ok(refused)
            }
        }
    }

    /// Pulls new invitations, opens their surveys and sends the invitation SMS (and sends
    /// again those an earlier poll could not).
    async fn poll_invitations(&self) -> anyhow::Result<u64> {
        // Whether the gateway answers this poll: once it fails itself (no answer, 5xx, or a
        // refusal of the adapter rather than of one number), nothing more is sent until the
        // next poll — neither the unsent surveys nor the new ones, each of which would wait out
        // its own timeout.
        let mut gateway_up = self.cfg.gateway.is_some();
        if gateway_up {
            for survey in self.surveys.unsent(now_micros()).await? {
                if !self.send_survey(&survey).await? {
                    gateway_up = false;
                    break;
                }
            }
        }
        let mut sync = self.cfg.hub.sync()?;
        let mut after = self.surveys.cursor("invitations").await?;
        let mut opened = 0;
        loop {
            let page = sync
                .list_invitations(pb::ListInvitationsRequest {
                    after_id: after,
                    limit: 200,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            if page.invitations.is_empty() {
                return Ok(opened);
            }
            for inv in page.invitations {
                let case = inv.service_case.unwrap_or_default();
                let phone = case
                    .applicant
                    .as_ref()
                    .map(|a| a.phone.clone())
                    .unwrap_or_default();
                if phone.is_empty() || phone.contains('*') {
                    self.metrics.inc("invitations_without_phone_total");
                    tracing::warn!(
                        invitation = inv.id,
                        "Invitation has no usable phone (the adapter needs read-pii); skipped."
                    );
                } else {
                    let ttl = Duration::from_secs(self.cfg.survey_ttl_hours * 3600);
                    let prefix = self
                        .cfg
                        .gateway
                        .as_ref()
                        .map(|g| g.extension_prefix.clone())
                        .unwrap_or_default();
                    let (survey, to_send) = self
                        .surveys
                        .open_survey(inv.id, &case, &phone, &prefix, ttl)
                        .await?;
                    opened += 1;
                    if to_send && gateway_up {
                        // A gateway that is down leaves this one unsent, for the next poll.
                        gateway_up = self.send_survey(&survey).await?;
                    }
                }
                after = inv.id;
                self.surveys.set_cursor("invitations", after).await?;
            }
        }
    }

    async fn send_sms(
        &self,
        gw: &GatewayConfig,
        phone: &str,
        item: &str,
        code: &str,
    ) -> anyhow::Result<()> {
        let content = gw.template.replace("{item}", item);
        let r = self
            .http
            .post(&gw.url)
            .header("content-type", "application/json; charset=utf-8")
            .body(
                json!({ "phone_number": phone, "content": content, "extension": code }).to_string(),
            )
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("the SMS gateway did not answer: {}", e.without_url()))?;
        // A refusal of this number (400, 422) is passed by; 401, 403, 404 and 429 refuse the
        // adapter itself (credentials, a wrong URL, rate), like a failure of the gateway.
        if matches!(r.status().as_u16(), 400 | 422) {
            return Err(SmsRefused(r.status().as_u16()).into());
        }
        anyhow::ensure!(
            r.status().is_success(),
            "the SMS gateway answered HTTP {}",
            r.status()
        );
        Ok(())
    }
}

/// The gateway refused one message (HTTP 400 or 422: a number it will not reach), as opposed to
/// failing itself.
#[derive(Debug)]
struct SmsRefused(u16);

impl std::fmt::Display for SmsRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the SMS gateway refused the message (HTTP {})", self.0)
    }
}

impl std::error::Error for SmsRefused {}

type Shared = State<Arc<Inner>>;

/// One reply as it arrived, before it is matched to a survey.
struct Incoming<'a> {
    channel: pb::Channel,
    dest_code: &'a str,
    phone: &'a str,
    /// When the rater answered, if the gateway said.
    at: Option<i64>,
    reply: Reply,
    content: &'a str,
}

fn gateway_answer(result: anyhow::Result<()>) -> impl IntoResponse {
    match result {
        // The gateway's contract: anything but this makes it retry.
        Ok(()) => (StatusCode::OK, Json(json!({"code": 0, "msg": "接收成功"}))),
        Err(e) => {
            tracing::error!(error = %e, "Reply not stored; the gateway will retry.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"code": 1, "msg": "暂时无法接收，请重试"})),
            )
        }
    }
}

async fn sms_json(State(inner): Shared, Json(messages): Json<Vec<MoMessage>>) -> impl IntoResponse {
    let mut result = Ok(());
    for m in &messages {
        if let Err(e) = inner.take_mo(m).await {
            result = Err(e);
            break;
        }
    }
    gateway_answer(result)
}

async fn sms_form(State(inner): Shared, Form(m): Form<MoMessage>) -> impl IntoResponse {
    gateway_answer(inner.take_mo(&m).await.map(drop))
}

async fn ivr(State(inner): Shared, Json(r): Json<IvrResult>) -> impl IntoResponse {
    let reply = parse_ivr(&r.key, inner.ivr_scale);
    let result = inner
        .take_reply(Incoming {
            channel: pb::Channel::HotlineVoice,
            dest_code: &r.survey,
            phone: &r.phone,
            at: None,
            reply,
            content: &r.key,
        })
        .await;
    match result {
        Ok(outcome) => (StatusCode::OK, Json(json!({"code": 0, "result": outcome}))),
        Err(e) => {
            tracing::error!(error = %e, "IVR result not stored.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"code": 1, "msg": "retry"})),
            )
        }
    }
}

async fn metrics_text(State(inner): Shared) -> impl axum::response::IntoResponse {
    match inner.spool.counts().await {
        Ok(c) => {
            for (state, n) in [
                ("waiting", c.waiting),
                ("delivered", c.delivered),
                ("refused", c.refused),
            ] {
                inner.metrics.set_gauge("spool", "state", state, n as i64);
            }
        }
        Err(_) => inner.metrics.clear_gauge("spool"),
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            rating_hub_adapter_kit::metrics::CONTENT_TYPE,
        )],
        inner.metrics.render("rating_hotline"),
    )
}

/// Opens the spool and state, binds, and starts the HTTP side, the forwarder and the poller.
pub async fn start(cfg: HotlineConfig) -> anyhow::Result<Hotline> {
    let (sms_scale, ivr_scale) = cfg.scales()?;
    let auth = rating_hub_adapter_kit::CallbackAuth::from_config(&cfg.callback_auth)?;
    // reqwest's rustls needs a process-wide provider; the hub uses ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let at_rest = Arc::new(rating_hub_adapter_kit::AtRest::load(
        &cfg.at_rest,
        &cfg.spool,
    )?);
    let lock = rating_hub_adapter_kit::runtime::exclusive(&cfg.spool)?;
    let spool = Spool::open(&cfg.spool, at_rest.clone()).await?;
    let surveys = Surveys::open(&cfg.state, at_rest).await?;
    let metrics = Arc::new(Metrics::default());
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(gw) = &cfg.gateway
        && !gw.ca.is_empty()
    {
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&gw.ca)?)?);
    }
    let inner = Arc::new(Inner {
        sms_scale,
        ivr_scale,
        spool: spool.clone(),
        surveys: surveys.clone(),
        metrics: metrics.clone(),
        http: http.build()?,
        cfg: cfg.clone(),
    });
    // TLS when configured, and only from the allowed addresses. Bound before anything
    // starts: a configuration that cannot serve leaves nothing running.
    let listener = rating_hub_adapter_kit::listen::CallbackListener::bind(
        &cfg.listen,
        rating_hub_adapter_kit::listen::tls_config(&cfg.callback_auth)?,
        rating_hub_adapter_kit::listen::Allow::parse(&cfg.callback_auth.allow_from)?,
        metrics.clone(),
    )
    .await?;
    let addr = axum::serve::Listener::local_addr(&listener)?;
    let (stop, stop_rx) = watch::channel(false);
    let forwarder = Forwarder {
        spool: spool.clone(),
        client: cfg.hub.ingest()?,
        batch: 200,
        metrics: metrics.clone(),
    };
    let mut tasks = vec![tokio::spawn(forwarder.run(stop_rx.clone()))];
    if cfg.poll_invitations_secs > 0 {
        let inner = inner.clone();
        let mut stop = stop_rx.clone();
        let every = Duration::from_secs(cfg.poll_invitations_secs);
        tasks.push(tokio::spawn(async move {
            loop {
                if let Err(e) = inner.poll_invitations().await {
                    tracing::warn!(error = %e, "Cannot pull invitations; will retry.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    {
        // Answered and expired surveys, and unmatched replies, leave after the retention
        // period (checked hourly).
        let surveys = surveys.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = stop.changed() => return,
                }
                match surveys.prune(now_micros()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "Pruned finished surveys and replies."),
                    Err(e) => tracing::warn!(error = %e, "Cannot prune surveys; will try again."),
                }
            }
        }));
    }
    let app = Router::new()
        .route("/sms/mo", post(sms_json))
        .route("/sms/mo-form", post(sms_form))
        .route("/ivr", post(ivr))
        // Only signed callbacks reach the routes above (metrics and health stay open).
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            rating_hub_adapter_kit::CallbackAuth::middleware,
        ))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(inner.clone());
    let mut stop_http = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_http.changed().await;
            })
            .await;
    }));
    tracing::info!(%addr, "Hotline adapter listening.");
    Ok(Hotline {
        _lock: lock,
        addr,
        spool,
        surveys,
        metrics,
        inner,
        stop,
        tasks,
    })
}

impl Hotline {
    /// One pull of the hub's invitations (the poller does this every poll interval).
    pub async fn poll_invitations_once(&self) -> anyhow::Result<u64> {
        self.inner.poll_invitations().await
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        rating_hub_adapter_kit::runtime::stop_tasks(self.tasks).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_times_are_china_standard_time() {
        let at = parse_cst("2025-10-09 08:30:00").unwrap();
        assert_eq!(
            at,
            Date::parse("2025-10-09").unwrap().start_micros() + 8 * 3_600_000_000 + 30 * 60_000_000
        );
        assert!(parse_cst("2025-10-09").is_none());
        assert!(parse_cst("2025-10-09 25:00:00").is_none());
    }
}
