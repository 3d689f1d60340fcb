//! The `http-json` sink: a provincial or national platform's HTTPS interface, described by
//! data. Every sink of this kind has the same rooms:
//!
//! - `profile`: the protocol file (record kinds, code tables, computed values), checked
//!   whole at start, and the older inline mapping read as a profile;
//! - `template`: how each upstream field is made from the canonical record;
//! - `envelope`: the request around the records — body, headers, and the values computed
//!   per request (times, SM4 data keys, SM2/SM4 ciphertexts, signatures, HMACs);
//! - `crypto`: secrets and keys from files or the environment;
//! - `reply`: what the answer says of each record.
//!
//! A value that cannot be expressed (a code missing from a table, a required field left
//! empty) is a rejection naming the field, never a guess. "Already exists" is success.

pub mod crypto;
pub mod envelope;
pub mod profile;
pub mod reply;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value};

use self::crypto::Keyring;
use self::profile::{Profile, RecordKind};
use super::config::UpstreamConfig;
use super::sink::{CaseRecord, Delivery, SendError, Sink, UpdateRecord};
use crate::domain::codes::redact_numbers;
use crate::pb::v1 as pb;

pub use self::template::format_cst;

/// The start of an upstream's answer, safe to log and store: numbers that may be a rater's
/// phone or ID (if the upstream echoes what it was sent) are redacted.
fn snippet(text: &str) -> String {
    redact_numbers(&text.chars().take(300).collect::<String>())
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

/// Reads and checks an upstream's protocol: its profile file, or its inline mapping. Every
/// error names the upstream, and where in the profile and why.
pub fn load_profile(name: &str, cfg: &UpstreamConfig) -> Result<(Profile, Keyring), String> {
    let at = |m: String| format!("upstreams.{name}: {m}");
    let keys = profile::load_keyring(&cfg.secrets, &cfg.keys).map_err(at)?;
    let file = match (&cfg.profile, &cfg.http) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| at(format!("profile {path}: cannot read it: {}", e.kind())))?;
            toml::from_str::<profile::ProfileFile>(&text).map_err(|e| {
                at(format!(
                    "profile {path}: {}",
                    e.to_string().trim_end().replace('\n', " ")
                ))
            })?
        }
        (None, Some(http)) => http.to_profile().map_err(at)?,
        (Some(_), Some(_)) => {
            return Err(at(
                "give either `profile` or an inline [http] mapping, not both".into(),
            ));
        }
        (None, None) => {
            return Err(at(
                "kind = \"http-json\" needs `profile = \"<file>\"` or an [upstreams.<name>.http] mapping"
                    .into(),
            ));
        }
    };
    let where_ = cfg.profile.as_deref().unwrap_or("[http]");
    let profile = Profile::build(&file, &cfg.tables, &keys)
        .map_err(|e| at(format!("profile {where_}: {e}")))?;
    Ok((profile, keys))
}

/// The longest answer read from a platform.
const MAX_ANSWER: usize = 1 << 20;

pub struct HttpSink {
    client: reqwest::Client,
    endpoint: String,
    profile: Profile,
    keys: Keyring,
    permanent_statuses: Vec<u16>,
}

impl HttpSink {
    pub fn new(name: &str, cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let (profile, keys) = load_profile(name, cfg).map_err(anyhow::Error::msg)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(cfg)?)
            .timeout(cfg.timeout())
            .build()?;
        let mut permanent_statuses = Vec::new();
        for s in &cfg.permanent_errors {
            permanent_statuses.push(s.parse::<u16>().map_err(|_| {
                anyhow::anyhow!("upstreams.{name}: permanent_errors: {s:?} is not an HTTP status")
            })?);
        }
        Ok(Self {
            client,
            endpoint: cfg.endpoint.trim_end_matches('/').to_owned(),
            profile,
            keys,
            permanent_statuses,
        })
    }

    /// One record in the upstream's shape, or why it cannot be expressed.
    fn record(&self, kind: &RecordKind, view: &Value) -> Result<Value, String> {
        let mut out = Map::new();
        for (field, template) in &kind.fields {
            if let Some(v) = template
                .eval(view, &self.profile.tables)
                .map_err(|e| format!("{field}: {e}"))?
            {
                out.insert(field.clone(), v);
            }
        }
        Ok(Value::Object(out))
    }

    /// Posts one request and reads the answer as JSON.
    async fn post(&self, kind: &RecordKind, records: Value, n: usize) -> Result<Value, SendError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let (body, headers) = kind
            .envelope
            .render(records, n, &self.keys, now)
            // A set-up fault (a key that fails), not the records': retried, not dead-lettered.
            .map_err(SendError::Retryable)?;
        let url = if kind.path.is_empty() {
            self.endpoint.clone()
        } else {
            format!("{}{}", self.endpoint, kind.path)
        };
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json; charset=utf-8")
            .body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SendError::Retryable(format!("request failed: {e}")))?;
        let status = response.status();
        // At most MAX_ANSWER bytes: a platform that echoes a whole batch back, or anything
        // that answers on its port, cannot make the worker hold or scan more.
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| SendError::Retryable(format!("reading the answer: {e}")))?
        {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(SendError::Retryable(format!(
                    "HTTP {status}: the answer is longer than {MAX_ANSWER} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
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

    /// Sends records of one kind: the inexpressible ones are rejected here; the rest go in
    /// one request (or one each, for a `single` kind).
    async fn send_views(
        &self,
        kind: &RecordKind,
        views: Vec<Value>,
    ) -> Result<Vec<Delivery>, SendError> {
        let mut outcomes: Vec<Option<Delivery>> = vec![None; views.len()];
        let mut records = Vec::new();
        let mut positions = Vec::new();
        // The people's data in these records: removed from anything the upstream says back
        // (a platform that echoes a passport number the pattern redaction would not catch).
        let pii = Scrub::of(&views);
        for (i, view) in views.iter().enumerate() {
            if !kind.send_if.iter().all(|c| c.holds(view)) {
                // Not for this upstream (e.g. a 受理 event where only 办结 records go).
                outcomes[i] = Some(Delivery::Delivered);
                continue;
            }
            match self.record(kind, view) {
                Ok(rec) => {
                    records.push(rec);
                    positions.push(i);
                }
                Err(e) => outcomes[i] = Some(Delivery::Rejected(e)),
            }
        }
        let groups: Vec<Vec<(usize, Value)>> = if kind.single {
            positions
                .into_iter()
                .zip(records)
                .map(|p| vec![p])
                .collect()
        } else if records.is_empty() {
            Vec::new()
        } else {
            vec![positions.into_iter().zip(records).collect()]
        };
        for group in groups {
            let n = group.len();
            let (positions, records): (Vec<usize>, Vec<Value>) = group.into_iter().unzip();
            let payload = if kind.single {
                records.into_iter().next().expect("one record")
            } else {
                Value::Array(records)
            };
            let answer = self
                .post(kind, payload, n)
                .await
                .map_err(|e| pii.error(e))?;
            let judged = kind.reply.read(&answer, n).map_err(|e| pii.error(e))?;
            let Some(judged) = judged else {
                return Err(SendError::Ambiguous(pii.text(&format!(
                    "the answer {} is said of {n} records at once",
                    snippet(&answer.to_string())
                ))));
            };
            for (i, d) in positions.into_iter().zip(judged) {
                outcomes[i] = Some(match d {
                    Delivery::Rejected(e) => Delivery::Rejected(pii.text(&e)),
                    d => d,
                });
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                Some(Delivery::Rejected(e)) => Delivery::Rejected(pii.text(&e)),
                Some(d) => d,
                None => Delivery::Rejected("not sent".into()),
            })
            .collect())
    }
}

/// The names, document numbers and phones of a batch's people (rater or applicant, agent),
/// to take out of texts that go to dead letters, the attempt log and logs.
struct Scrub(Vec<String>);

impl Scrub {
    fn of(views: &[Value]) -> Self {
        let mut found = Vec::new();
        for v in views {
            for person in ["rater", "applicant", "agent"] {
                for field in ["name", "id_number", "phone"] {
                    if let Some(s) = v[person][field].as_str()
                        && s.chars().count() >= 2
                    {
                        found.push(s.to_owned());
                    }
                }
            }
        }
        // Longest first, so a number is not half-replaced by a shorter one inside it.
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        found.dedup();
        Self(found)
    }

    fn text(&self, t: &str) -> String {
        let mut out = t.to_owned();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        redact_numbers(&out)
    }

    fn error(&self, e: SendError) -> SendError {
        match e {
            SendError::Retryable(m) => SendError::Retryable(self.text(&m)),
            SendError::Permanent(m) => SendError::Permanent(self.text(&m)),
            SendError::Malformed(m) => SendError::Malformed(self.text(&m)),
            SendError::Ambiguous(m) => SendError::Ambiguous(self.text(&m)),
        }
    }
}

#[async_trait]
impl Sink for HttpSink {
    async fn send(&self, ratings: &[pb::Rating]) -> Result<Vec<Delivery>, SendError> {
        let views = ratings
            .iter()
            .map(|r| template::rating_view(r, false))
            .collect();
        self.send_views(&self.profile.rating, views).await
    }

    fn relays_cases(&self) -> bool {
        self.profile.case.is_some()
    }

    fn relays_updates(&self) -> bool {
        self.profile.update.is_some()
    }

    fn wants_case(&self, c: &CaseRecord) -> bool {
        self.profile.case.as_ref().is_some_and(|k| {
            k.send_if.is_empty() || {
                let view = template::case_view(&c.case, &c.source_system, c.id, false);
                k.send_if.iter().all(|cond| cond.holds(&view))
            }
        })
    }

    fn wants_update(&self, u: &UpdateRecord) -> bool {
        self.profile.update.as_ref().is_some_and(|k| {
            k.send_if.is_empty() || {
                let view = template::update_view(&u.rating, u.reason, u.at_micros, u.seq, false);
                k.send_if.iter().all(|cond| cond.holds(&view))
            }
        })
    }

    async fn send_updates(&self, updates: &[UpdateRecord]) -> Result<Vec<Delivery>, SendError> {
        let Some(kind) = &self.profile.update else {
            return Err(SendError::Permanent(
                "the profile has no records.rating_update".into(),
            ));
        };
        let views = updates
            .iter()
            .map(|u| template::update_view(&u.rating, u.reason, u.at_micros, u.seq, false))
            .collect();
        self.send_views(kind, views).await
    }

    async fn send_cases(&self, cases: &[CaseRecord]) -> Result<Vec<Delivery>, SendError> {
        let Some(kind) = &self.profile.case else {
            return Err(SendError::Permanent(
                "the profile has no records.case".into(),
            ));
        };
        let views = cases
            .iter()
            .map(|c| template::case_view(&c.case, &c.source_system, c.id, false))
            .collect();
        self.send_views(kind, views).await
    }
}

/// Code tables of the inline mapping's national defaults, for tools and tests.
pub fn national_tables() -> BTreeMap<&'static str, BTreeMap<String, String>> {
    BTreeMap::from([
        ("levels", profile::national_levels()),
        ("channels", profile::national_channels()),
        ("rater_kinds", profile::national_rater_kinds()),
    ])
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
        let t = national_tables();
        assert_eq!(t["levels"]["LEVEL_VERY_SATISFIED"], "5");
        assert_eq!(t["levels"]["LEVEL_VERY_DISSATISFIED"], "1");
    }
}
