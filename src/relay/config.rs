//! `[upstreams.<name>]`: where and how the hub delivers its feed.

use std::time::Duration;

use serde::Deserialize;

/// What kind of platform an upstream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    /// Another rating-hub (city → province → nation): `IngestService.SubmitRatings` over mTLS.
    Grpc,
    /// A provincial/national-style HTTPS JSON interface with a field mapping and code tables.
    HttpJson,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Grpc => "grpc",
            SinkKind::HttpJson => "http-json",
        }
    }
}

fn d_records_per_sec() -> u32 {
    5000
}
fn d_records_burst() -> u32 {
    10_000
}
fn d_requests_per_sec() -> u32 {
    100
}
fn d_requests_burst() -> u32 {
    20
}
fn d_batch_size() -> u32 {
    500
}
fn d_in_flight() -> u32 {
    4
}
fn d_retry() -> Vec<u64> {
    vec![100, 500, 2000, 10_000, 30_000]
}
fn d_jitter() -> f64 {
    0.2
}
fn d_timeout() -> u64 {
    10_000
}

/// One upstream. Every field but `kind` and `endpoint` has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub kind: SinkKind,
    /// `https://host:port` (grpc) or the full URL of the push interface (http-json).
    pub endpoint: String,
    /// CA certificate(s) (PEM) the upstream's server certificate must chain to.
    #[serde(default)]
    pub ca: String,
    /// This hub's client certificate and key (PEM) for mTLS to the upstream.
    #[serde(default)]
    pub cert: String,
    #[serde(default)]
    pub key: String,
    /// Name to verify the upstream's certificate against, when it differs from the endpoint host.
    #[serde(default)]
    pub tls_domain: String,
    /// Outbound rate limit (governor): ratings per second and burst…
    #[serde(default = "d_records_per_sec")]
    pub records_per_sec: u32,
    #[serde(default = "d_records_burst")]
    pub records_burst: u32,
    /// …and requests per second and burst.
    #[serde(default = "d_requests_per_sec")]
    pub requests_per_sec: u32,
    #[serde(default = "d_requests_burst")]
    pub requests_burst: u32,
    /// Ratings per request.
    #[serde(default = "d_batch_size")]
    pub batch_size: u32,
    /// Requests in flight at once.
    #[serde(default = "d_in_flight")]
    pub in_flight: u32,
    /// Waits between retries of a failed request, in milliseconds; the last repeats forever.
    #[serde(default = "d_retry")]
    pub retry_schedule_ms: Vec<u64>,
    /// Each wait is randomised by ± this fraction, so many hubs do not retry in step.
    #[serde(default = "d_jitter")]
    pub retry_jitter: f64,
    /// Call-level errors that reject the whole batch for good (dead letters) instead of being
    /// retried: gRPC code names ("INVALID_ARGUMENT") for grpc, HTTP statuses ("400") for
    /// http-json. Per-rating rejections are always permanent.
    #[serde(default)]
    pub permanent_errors: Vec<String>,
    /// Per-request timeout in milliseconds (a timed-out request is retried).
    #[serde(default = "d_timeout")]
    pub request_timeout_ms: u64,
    /// http-json: the protocol profile file (record kinds, fields, code tables, envelopes,
    /// replies; see deploy/upstreams/), or…
    #[serde(default)]
    pub profile: Option<String>,
    /// …the older inline mapping.
    #[serde(default)]
    pub http: Option<super::http::profile::HttpJsonConfig>,
    /// Secrets the profile names, as "env:VARIABLE" or "file:/path" (never the value).
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// SM2 key files the profile names (PEM or hex; a private key also gives its public key).
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, String>,
    /// Code-table entries added to (or replacing those of) the profile's tables, e.g. this
    /// province's region remap.
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

impl UpstreamConfig {
    pub fn check(&self, name: &str) -> Result<(), String> {
        let fail = |m: String| Err(format!("upstreams.{name}: {m}"));
        if self.endpoint.is_empty() {
            return fail("endpoint is required".into());
        }
        if self.batch_size == 0 || self.in_flight == 0 {
            return fail("batch_size and in_flight must be at least 1".into());
        }
        if self.records_per_sec == 0 || self.requests_per_sec == 0 {
            return fail("records_per_sec and requests_per_sec must be at least 1".into());
        }
        if self.records_burst < self.batch_size {
            return fail(format!(
                "records_burst ({}) must be at least batch_size ({})",
                self.records_burst, self.batch_size
            ));
        }
        if self.retry_schedule_ms.is_empty() {
            return fail("retry_schedule_ms needs at least one wait".into());
        }
        if !(0.0..=1.0).contains(&self.retry_jitter) {
            return fail("retry_jitter must be within 0..1".into());
        }
        if self.cert.is_empty() != self.key.is_empty() {
            return fail("cert and key go together".into());
        }
        if self.kind == SinkKind::HttpJson && self.http.is_none() && self.profile.is_none() {
            return fail(
                "kind = \"http-json\" needs `profile = \"<file>\"` or an [upstreams.<name>.http] mapping"
                    .into(),
            );
        }
        if self.kind == SinkKind::Grpc {
            for code in &self.permanent_errors {
                if super::grpc::code_from_name(code).is_none() {
                    return fail(format!(
                        "permanent_errors: {code:?} is not a gRPC code name"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
