//! The `http-json` sink: a provincial/national-style HTTPS JSON push interface.
//!
//! Each upstream has its own field names and code tables, so both are configuration. The
//! defaults follow the national style seen in vendor code (`projectNo`, `satisfaction` with
//! 5 = 非常满意, `pf` 1 PC … 7 短信, `assessTime` as `yyyy-MM-dd HH:mm:ss` in UTC+8); a value
//! with no entry in its code table is never passed through as a bare number — the rating is
//! rejected (dead-lettered) naming the missing code. An answer that the record already exists
//! ("已存在该条服务信息") is success: upstreams behave as idempotent upserts.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::UpstreamConfig;
use super::sink::{Delivery, SendError, Sink};
use crate::domain::codes::redact_numbers;
use crate::pb::v1 as pb;
use crate::rules::date::civil_from_days;

/// The start of an upstream's answer, safe to log and store: numbers that may be a rater's
/// phone or ID (if the upstream echoes what it was sent) are redacted.
fn snippet(text: &str) -> String {
    redact_numbers(&text.chars().take(300).collect::<String>())
}

/// `[upstreams.<name>.http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJsonConfig {
    /// The request body: "array" (`[{…}, …]`) or "wrapped" (`{"<wrapper_key>": [{…}, …]}`).
    #[serde(default = "d_body")]
    pub body: String,
    #[serde(default = "d_wrapper")]
    pub wrapper_key: String,
    /// Upstream field name → canonical field. Replaces the default (national) mapping when set.
    /// Canonical fields: hub_id, source_key, case_number, item_code, item_name, org_credit_code,
    /// org_name, region_code, hall_id, window_id, staff_id, staff_name, channel, level,
    /// detail_codes (comma-joined), text, rated_at, service_completed_at, assess_number
    /// (1 first, 2 follow-up), is_default (1/0), rater.kind, rater.name, rater.id_number,
    /// rater.credit_code, rater.phone, attributes.<key>.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Fixed values added to every record, e.g. dataSource = "101".
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// LEVEL_* name → upstream code. Entries override the national defaults.
    #[serde(default)]
    pub level_codes: BTreeMap<String, String>,
    /// CHANNEL_* name → upstream code (`pf`). Entries override the national defaults.
    #[serde(default)]
    pub channel_codes: BTreeMap<String, String>,
    /// RATER_KIND_* name → upstream code (`userProp`). Entries override the defaults.
    #[serde(default)]
    pub rater_kind_codes: BTreeMap<String, String>,
    /// "yyyy-MM-dd HH:mm:ss" (UTC+8, default), "rfc3339" or "unix-millis".
    #[serde(default = "d_time_format")]
    pub time_format: String,
    /// JSON field of the answer holding the result code, and the codes meaning success.
    #[serde(default = "d_code_field")]
    pub code_field: String,
    #[serde(default = "d_success")]
    pub success_codes: Vec<String>,
    /// JSON field of the answer holding the message.
    #[serde(default = "d_message_field")]
    pub message_field: String,
    /// Optional JSON field of the answer with one {code, msg} per record, in order.
    #[serde(default)]
    pub results_field: String,
    /// A message containing one of these means the record already exists: success.
    #[serde(default = "d_exists")]
    pub already_exists_markers: Vec<String>,
    /// Extra request headers (e.g. an API key the platform issued).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn d_body() -> String {
    "array".into()
}
fn d_wrapper() -> String {
    "data".into()
}
fn d_time_format() -> String {
    "yyyy-MM-dd HH:mm:ss".into()
}
fn d_code_field() -> String {
    "code".into()
}
fn d_success() -> Vec<String> {
    vec!["0".into(), "200".into()]
}
fn d_message_field() -> String {
    "msg".into()
}
fn d_exists() -> Vec<String> {
    vec!["已存在该条服务信息".into(), "已存在".into()]
}

fn table(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The national-style field mapping.
pub fn national_fields() -> BTreeMap<String, String> {
    table(&[
        ("hubId", "hub_id"),
        ("projectNo", "case_number"),
        ("taskCode", "item_code"),
        ("taskName", "item_name"),
        ("deptCode", "org_credit_code"),
        ("deptName", "org_name"),
        ("areaCode", "region_code"),
        ("pf", "channel"),
        ("satisfaction", "level"),
        ("evalDetail", "detail_codes"),
        ("writingEvaluation", "text"),
        ("assessTime", "rated_at"),
        ("assessNumber", "assess_number"),
        ("userName", "rater.name"),
        ("userProp", "rater.kind"),
        ("certKey", "rater.id_number"),
        ("mobile", "rater.phone"),
    ])
}

/// `satisfaction`: 1 非常不满意 … 5 非常满意.
pub fn national_levels() -> BTreeMap<String, String> {
    table(&[
        ("LEVEL_VERY_DISSATISFIED", "1"),
        ("LEVEL_DISSATISFIED", "2"),
        ("LEVEL_BASICALLY_SATISFIED", "3"),
        ("LEVEL_SATISFIED", "4"),
        ("LEVEL_VERY_SATISFIED", "5"),
    ])
}

/// `pf`: 1 PC, 2 移动端, 3 二维码, 4 政务大厅平板电脑, 5 大厅其他终端/自助终端, 6 电话, 7 短信.
/// Paper forms and system defaults have no national code: configure them per upstream.
pub fn national_channels() -> BTreeMap<String, String> {
    table(&[
        ("CHANNEL_PC_WEB", "1"),
        ("CHANNEL_MOBILE_APP", "2"),
        ("CHANNEL_MINI_PROGRAM", "2"),
        ("CHANNEL_QR_CODE", "3"),
        ("CHANNEL_HALL_DEVICE", "4"),
        ("CHANNEL_SELF_SERVICE_TERMINAL", "5"),
        ("CHANNEL_HOTLINE_VOICE", "6"),
        ("CHANNEL_SMS", "7"),
    ])
}

/// `userProp`: 1 个人, 2 法人.
pub fn national_rater_kinds() -> BTreeMap<String, String> {
    table(&[
        ("RATER_KIND_NATURAL_PERSON", "1"),
        ("RATER_KIND_ENTERPRISE_LEGAL_PERSON", "2"),
        ("RATER_KIND_PUBLIC_INSTITUTION_LEGAL_PERSON", "2"),
        ("RATER_KIND_SOCIAL_ORGANIZATION_LEGAL_PERSON", "2"),
        ("RATER_KIND_ADMINISTRATIVE_ORGAN", "2"),
        ("RATER_KIND_OTHER_ORGANIZATION", "2"),
        ("RATER_KIND_LEGAL_PERSON", "2"),
        ("RATER_KIND_UNINCORPORATED_ENTERPRISE", "2"),
    ])
}

/// `yyyy-MM-dd HH:mm:ss` in China Standard Time (UTC+8).
pub fn format_cst(seconds: i64) -> String {
    let local = seconds + 8 * 3600;
    let (y, m, d) = civil_from_days(local.div_euclid(86_400));
    let s = local.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn format_rfc3339(ts: &prost_types::Timestamp) -> String {
    let (y, m, d) = civil_from_days(ts.seconds.div_euclid(86_400));
    let s = ts.seconds.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

pub struct HttpJsonSink {
    client: reqwest::Client,
    endpoint: String,
    cfg: HttpJsonConfig,
    fields: BTreeMap<String, String>,
    levels: BTreeMap<String, String>,
    channels: BTreeMap<String, String>,
    rater_kinds: BTreeMap<String, String>,
    permanent_statuses: Vec<u16>,
}

fn tls_config(cfg: &UpstreamConfig) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if cfg.ca.is_empty() {
        anyhow::bail!("an http-json upstream needs `ca`: the CA its server certificate chains to");
    }
    for c in CertificateDer::pem_file_iter(&cfg.ca)? {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    Ok(if cfg.cert.is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs = CertificateDer::pem_file_iter(&cfg.cert)?.collect::<Result<Vec<_>, _>>()?;
        builder.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&cfg.key)?)?
    })
}

impl HttpJsonSink {
    pub fn new(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let http = cfg
            .http
            .clone()
            .ok_or_else(|| anyhow::anyhow!("http-json needs an http mapping"))?;
        if !matches!(http.body.as_str(), "array" | "wrapped") {
            anyhow::bail!("http.body must be \"array\" or \"wrapped\"");
        }
        if !matches!(
            http.time_format.as_str(),
            "yyyy-MM-dd HH:mm:ss" | "rfc3339" | "unix-millis"
        ) {
            anyhow::bail!(
                "http.time_format must be \"yyyy-MM-dd HH:mm:ss\", \"rfc3339\" or \"unix-millis\""
            );
        }
        let merged = |mut base: BTreeMap<String, String>, over: &BTreeMap<String, String>| {
            base.extend(over.clone());
            base
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(cfg)?)
            .timeout(cfg.timeout())
            .build()?;
        let mut permanent_statuses = Vec::new();
        for s in &cfg.permanent_errors {
            permanent_statuses.push(
                s.parse::<u16>().map_err(|_| {
                    anyhow::anyhow!("permanent_errors: {s:?} is not an HTTP status")
                })?,
            );
        }
        Ok(Self {
            client,
            endpoint: cfg.endpoint.clone(),
            fields: if http.fields.is_empty() {
                national_fields()
            } else {
                http.fields.clone()
            },
            levels: merged(national_levels(), &http.level_codes),
            channels: merged(national_channels(), &http.channel_codes),
            rater_kinds: merged(national_rater_kinds(), &http.rater_kind_codes),
            permanent_statuses,
            cfg: http,
        })
    }

    fn time(&self, ts: &Option<prost_types::Timestamp>) -> Value {
        let Some(ts) = ts else { return Value::Null };
        match self.cfg.time_format.as_str() {
            "rfc3339" => Value::String(format_rfc3339(ts)),
            "unix-millis" => Value::from(ts.seconds * 1000 + i64::from(ts.nanos / 1_000_000)),
            _ => Value::String(format_cst(ts.seconds)),
        }
    }

    fn code(table: &BTreeMap<String, String>, what: &str, name: &str) -> Result<Value, String> {
        table
            .get(name)
            .map(|c| Value::String(c.clone()))
            .ok_or_else(|| format!("no upstream code for {name} in {what}; add it to the mapping"))
    }

    /// One record in the upstream's shape, or why it cannot be expressed.
    pub fn record(&self, r: &pb::Rating) -> Result<Map<String, Value>, String> {
        let rater = r.rater.clone().unwrap_or_default();
        let mut out = Map::new();
        for (target, source) in &self.fields {
            let s = |v: &str| Value::String(v.to_owned());
            let value = match source.as_str() {
                "hub_id" => s(&r.hub_id),
                "source_key" => s(&r.source_key),
                "case_number" => s(&r.case_number),
                "item_code" => s(&r.item_code),
                "item_name" => s(&r.item_name),
                "org_credit_code" => s(&r.org_credit_code),
                "org_name" => s(&r.org_name),
                "region_code" => s(&r.region_code),
                "hall_id" => s(&r.hall_id),
                "window_id" => s(&r.window_id),
                "staff_id" => s(&r.staff_id),
                "staff_name" => s(&r.staff_name),
                "visit_id" => s(&r.visit_id),
                "batch_id" => s(&r.batch_id),
                "theme_id" => s(&r.theme_id),
                "text" => s(&r.text),
                "detail_codes" => s(&r.detail_codes.join(",")),
                "rated_at" => self.time(&r.rated_at),
                "service_completed_at" => self.time(&r.service_completed_at),
                "assess_number" => s(if r.follow_up_of.is_empty() { "1" } else { "2" }),
                "is_default" => s(if r.is_default { "1" } else { "0" }),
                "level" => {
                    let name = pb::Level::try_from(r.level).map_or("?", |l| l.as_str_name());
                    Self::code(&self.levels, "level_codes", name)?
                }
                "channel" => {
                    let name = pb::Channel::try_from(r.channel).map_or("?", |c| c.as_str_name());
                    Self::code(&self.channels, "channel_codes", name)?
                }
                "rater.kind" => {
                    let kind = pb::RaterKind::try_from(rater.kind).unwrap_or_default();
                    if kind == pb::RaterKind::Unspecified {
                        Value::Null
                    } else {
                        Self::code(&self.rater_kinds, "rater_kind_codes", kind.as_str_name())?
                    }
                }
                "rater.name" => s(&rater.name),
                "rater.id_number" => s(if rater.id_number.is_empty() {
                    &rater.credit_code
                } else {
                    &rater.id_number
                }),
                "rater.credit_code" => s(&rater.credit_code),
                "rater.phone" => s(&rater.phone),
                other => match other.strip_prefix("attributes.") {
                    Some(key) => r.attributes.get(key).map_or(Value::Null, |v| s(v)),
                    None => return Err(format!("mapping names unknown field {other:?}")),
                },
            };
            out.insert(target.clone(), value);
        }
        for (k, v) in &self.cfg.constants {
            out.insert(k.clone(), Value::String(v.clone()));
        }
        Ok(out)
    }

    fn answer_text(&self, v: &Value) -> (String, String) {
        let text = |field: &str| match v.get(field) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        (text(&self.cfg.code_field), text(&self.cfg.message_field))
    }

    /// What an answer says of the one record it is about: success, "already exists"
    /// (success: upstreams are idempotent upserts), or a rejection.
    fn judge(&self, v: &Value) -> Delivery {
        let (code, msg) = self.answer_text(v);
        if self.cfg.success_codes.contains(&code) || self.already_exists(&msg) {
            Delivery::Delivered
        } else {
            Delivery::Rejected(redact_numbers(&format!("upstream code {code}: {msg}")))
        }
    }

    fn already_exists(&self, msg: &str) -> bool {
        self.cfg
            .already_exists_markers
            .iter()
            .any(|m| msg.contains(m.as_str()))
    }

    /// Posts records and reads the answer as JSON.
    async fn post(&self, records: Vec<Value>) -> Result<Value, SendError> {
        let body = match self.cfg.body.as_str() {
            "wrapped" => {
                let mut m = Map::new();
                m.insert(self.cfg.wrapper_key.clone(), Value::Array(records));
                Value::Object(m)
            }
            _ => Value::Array(records),
        };
        let mut request = self
            .client
            .post(&self.endpoint)
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_string());
        for (k, v) in &self.cfg.headers {
            request = request.header(k, v);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SendError::Retryable(format!("request failed: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| SendError::Retryable(format!("reading the answer: {e}")))?;
        if !status.is_success() {
            let msg = format!("HTTP {status}: {}", snippet(&text));
            return Err(if self.permanent_statuses.contains(&status.as_u16()) {
                SendError::Permanent(msg)
            } else {
                SendError::Retryable(msg)
            });
        }
        serde_json::from_str(&text)
            .map_err(|_| SendError::Retryable(format!("answer is not JSON: {}", snippet(&text))))
    }

    /// What became of each of `n` posted records, from the answer. With `results_field`
    /// set, the answer must carry one result per record, in order; anything else is an
    /// answer the hub cannot read (never a success). Without it, the answer is about the
    /// whole request: `None` when it says "already exists" of a request of several
    /// records, which does not tell which of them exist (the relay then sends them one by
    /// one).
    fn read_answer(&self, answer: &Value, n: usize) -> Result<Option<Vec<Delivery>>, SendError> {
        if !self.cfg.results_field.is_empty() {
            let items = answer
                .get(&self.cfg.results_field)
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    let (code, msg) = self.answer_text(answer);
                    SendError::Malformed(redact_numbers(&format!(
                        "answer has no {:?} list (upstream code {code}: {msg})",
                        self.cfg.results_field
                    )))
                })?;
            if items.len() != n {
                return Err(SendError::Malformed(format!(
                    "answer's {:?} has {} results for {n} records",
                    self.cfg.results_field,
                    items.len()
                )));
            }
            return Ok(Some(items.iter().map(|v| self.judge(v)).collect()));
        }
        let (code, msg) = self.answer_text(answer);
        if self.cfg.success_codes.contains(&code) {
            return Ok(Some(vec![Delivery::Delivered; n]));
        }
        if n > 1 && self.already_exists(&msg) {
            return Ok(None);
        }
        Ok(Some(vec![self.judge(answer); n]))
    }
}

#[async_trait]
impl Sink for HttpJsonSink {
    async fn send(&self, ratings: &[pb::Rating]) -> Result<Vec<Delivery>, SendError> {
        // Ratings that cannot be expressed are rejected here; the rest go in one request.
        let mut outcomes: Vec<Option<Delivery>> = vec![None; ratings.len()];
        let mut records = Vec::new();
        let mut positions = Vec::new();
        for (i, r) in ratings.iter().enumerate() {
            match self.record(r) {
                Ok(rec) => {
                    records.push(Value::Object(rec));
                    positions.push(i);
                }
                Err(e) => outcomes[i] = Some(Delivery::Rejected(e)),
            }
        }
        if !records.is_empty() {
            let n = records.len();
            let answer = self.post(records).await?;
            let Some(judged) = self.read_answer(&answer, n)? else {
                let (code, msg) = self.answer_text(&answer);
                return Err(SendError::Ambiguous(redact_numbers(&format!(
                    "upstream code {code}: {msg}, said of {n} records at once"
                ))));
            };
            for (i, d) in positions.into_iter().zip(judged) {
                outcomes[i] = Some(d);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Delivery::Rejected("not sent".into())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cst_time_format() {
        // 2026-03-01T15:30:00Z is 23:30 in Beijing; 16:30Z is past midnight.
        assert_eq!(format_cst(1_772_379_000), "2026-03-01 23:30:00");
        assert_eq!(format_cst(1_772_382_600), "2026-03-02 00:30:00");
        assert_eq!(format_cst(0), "1970-01-01 08:00:00");
        assert_eq!(format_cst(951_782_400), "2000-02-29 08:00:00");
    }

    #[test]
    fn national_satisfaction_runs_opposite_to_gb_t_39046() {
        assert_eq!(national_levels()["LEVEL_VERY_SATISFIED"], "5");
        assert_eq!(national_levels()["LEVEL_VERY_DISSATISFIED"], "1");
    }
}
