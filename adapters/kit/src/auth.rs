//! Authentication of the callbacks an adapter takes over HTTP (SMS and IVR gateways, self-built
//! platforms), the way gateways sign them: an HMAC-SHA256 with a shared secret over the
//! timestamp, the method and path, and the body, checked within a time window, each
//! signature taken once.
//!
//! - `X-Timestamp`: Unix seconds when the caller signed;
//! - `X-Signature`: hex HMAC-SHA256(secret, `"{timestamp}\n{METHOD}\n{path}\n{body}"`), the
//!   path as requested (with its query string, if any).
//!
//! The method and path are signed so a request signed for one route cannot be sent to
//! another (an SMS reply's body posted as an IVR result).
//!
//! A request without them, signed with another secret, outside the window (±`window_secs`),
//! or with a signature already used in the window is refused with HTTP 401 and a reason, and
//! nothing of it is taken. Before, anyone who could reach the port could post ratings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The largest callback body read (a gateway's batch of replies is far smaller).
const MAX_BODY: usize = 1 << 20;

/// How callbacks are authenticated (adapter config `[callback_auth]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackAuthConfig {
    /// A file holding the shared secret (its bytes, trimmed; at least 16). Required unless
    /// `insecure_no_auth`.
    #[serde(default)]
    pub secret_file: String,
    /// How far a request's timestamp may be from the adapter's clock, in seconds.
    #[serde(default = "d_window")]
    pub window_secs: i64,
    /// Take unsigned callbacks (a gateway that cannot sign, on a network only it reaches).
    /// Off by default; said loudly at start.
    #[serde(default)]
    pub insecure_no_auth: bool,
    /// Serve the callback port over TLS with this certificate (PEM) and `tls_key`. Empty:
    /// plain HTTP (inside the department network only).
    #[serde(default)]
    pub tls_cert: String,
    #[serde(default)]
    pub tls_key: String,
    /// With TLS: callers must present a certificate from this CA (mTLS). Then, without a
    /// `secret_file`, no signature is asked (the certificate authenticates the caller); with
    /// one, signatures are required as well.
    #[serde(default)]
    pub tls_client_ca: String,
    /// Source addresses or networks allowed to connect ("10.1.2.0/24", "10.1.3.7"); empty:
    /// any. Checked before anything else, on every connection.
    #[serde(default)]
    pub allow_from: Vec<String>,
}

fn d_window() -> i64 {
    300
}

impl Default for CallbackAuthConfig {
    fn default() -> Self {
        Self {
            secret_file: String::new(),
            window_secs: d_window(),
            insecure_no_auth: false,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            allow_from: Vec::new(),
        }
    }
}

/// The verifier an adapter's router runs before its callback routes.
#[derive(Clone)]
pub struct CallbackAuth {
    secret: Option<Arc<Vec<u8>>>,
    window_secs: i64,
    /// Signatures taken, and when: each is taken once within the window.
    seen: Arc<Mutex<HashMap<Vec<u8>, i64>>>,
}

impl CallbackAuth {
    pub fn from_config(c: &CallbackAuthConfig) -> anyhow::Result<Self> {
        let secret = if c.secret_file.is_empty() {
            let mtls = !c.tls_client_ca.is_empty();
            anyhow::ensure!(
                c.insecure_no_auth || mtls,
                "[callback_auth] secret_file is required: callbacks must be signed (HMAC-SHA256) \
                 or come with a client certificate (tls_client_ca); set insecure_no_auth = true \
                 only on a network no one else reaches"
            );
            if !mtls {
                tracing::warn!("Callbacks are taken UNSIGNED ([callback_auth] insecure_no_auth).");
            }
            None
        } else {
            let bytes = std::fs::read(&c.secret_file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", c.secret_file))?;
            let secret = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
            anyhow::ensure!(
                secret.len() >= 16,
                "{}: the callback secret must be at least 16 bytes",
                c.secret_file
            );
            Some(Arc::new(secret))
        };
        anyhow::ensure!(
            (1..=3600).contains(&c.window_secs),
            "[callback_auth] window_secs must be 1 to 3600"
        );
        Ok(Self {
            secret,
            window_secs: c.window_secs,
            seen: Arc::default(),
        })
    }

    /// Checks a request's timestamp and signature against its body at `now` (Unix seconds),
    /// and that the signature was not used before. Returns the signature to `mark_used` once
    /// the request was taken (a request answered with an error may be sent again as it was).
    pub fn check(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        target: (&str, &str),
        body: &[u8],
        now: i64,
    ) -> Result<Option<(Vec<u8>, i64)>, &'static str> {
        let Some(secret) = &self.secret else {
            return Ok(None);
        };
        let at = self.check_time(timestamp, now)?;
        let Some(sig) = signature else {
            return Err("X-Timestamp and X-Signature are required");
        };
        let given = hex::decode(sig.trim()).map_err(|_| "X-Signature is not hex")?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "the secret cannot key an HMAC")?;
        mac.update(timestamp.unwrap_or_default().trim().as_bytes());
        mac.update(b"\n");
        mac.update(target.0.as_bytes());
        mac.update(b"\n");
        mac.update(target.1.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac.verify_slice(&given)
            .map_err(|_| "X-Signature does not match the request")?;
        if self.lock_seen(now).contains_key(&given) {
            return Err("this signature was already used (a replayed request)");
        }
        Ok(Some((given, at)))
    }

    /// The timestamp, within the window (checked before the body is even read).
    fn check_time(&self, timestamp: Option<&str>, now: i64) -> Result<i64, &'static str> {
        let Some(ts) = timestamp else {
            return Err("X-Timestamp and X-Signature are required");
        };
        let at: i64 = ts
            .trim()
            .parse()
            .map_err(|_| "X-Timestamp is not Unix seconds")?;
        if now.abs_diff(at) > self.window_secs.unsigned_abs() {
            return Err("X-Timestamp is outside the accepted window");
        }
        Ok(at)
    }

    /// The used signatures, with those whose signed time has left the window forgotten (a
    /// forgotten one is refused by the window anyway).
    fn lock_seen(&self, now: i64) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, i64>> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window_secs.unsigned_abs();
        seen.retain(|_, at| now.abs_diff(*at) <= window);
        seen
    }

    /// Records a signature as used (its request was taken), keyed to its signed time.
    pub fn mark_used(&self, used: Option<(Vec<u8>, i64)>, now: i64) -> bool {
        match used {
            Some((sig, at)) => self.lock_seen(now).insert(sig, at).is_none(),
            None => true,
        }
    }

    /// The axum middleware: refuses what `check` refuses, passes the rest on with its body,
    /// and marks the signature used once the route answered with success.
    pub async fn middleware(State(auth): State<Self>, request: Request, next: Next) -> Response {
        let (parts, body) = request.into_parts();
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let refuse = |why: &'static str| {
            tracing::warn!(path = %parts.uri.path(), why, "Callback refused: not authenticated.");
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"code": 401, "msg": why})),
            )
                .into_response()
        };
        // Unsigned or stale requests are refused before their body is read.
        if auth.secret.is_some()
            && let Err(why) = auth.check_time(header("x-timestamp"), now)
        {
            return refuse(why);
        }
        let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large").into_response();
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |p| p.as_str());
        let used = match auth.check(
            header("x-timestamp"),
            header("x-signature"),
            (parts.method.as_str(), path),
            &bytes,
            now,
        ) {
            Ok(used) => used,
            Err(why) => return refuse(why),
        };
        let response = next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
        if response.status().is_success() && !auth.mark_used(used, now) {
            // Two copies of one request raced; both were taken, and the spool's keys make the
            // second a re-send.
            tracing::info!("A signed callback arrived twice at once; the second was a re-send.");
        }
        response
    }
}

/// Signs a request as a gateway does: (X-Timestamp, X-Signature) for `method` on `path`
/// (with its query string, if any) with `body`. For clients and tests.
pub fn sign(
    secret: &[u8],
    timestamp: i64,
    method: &str,
    path: &str,
    body: &[u8],
) -> (String, String) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(method.as_bytes());
    mac.update(b"\n");
    mac.update(path.as_bytes());
    mac.update(b"\n");
    mac.update(body);
    (
        timestamp.to_string(),
        hex::encode(mac.finalize().into_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> CallbackAuth {
        CallbackAuth {
            secret: Some(Arc::new(b"0123456789abcdef-secret".to_vec())),
            window_secs: 300,
            seen: Arc::default(),
        }
    }

    #[test]
    fn a_signed_request_passes_once_and_nothing_else_passes() {
        let a = auth();
        let secret = b"0123456789abcdef-secret";
        let body = br#"[{"content":"1"}]"#;
        let to = ("POST", "/sms/mo");
        let (ts, sig) = sign(secret, 1_000, "POST", "/sms/mo", body);
        let used = a.check(Some(&ts), Some(&sig), to, body, 1_010).unwrap();
        assert!(used.is_some());
        // Not taken yet (the route failed): the same request may come again.
        let used = a.check(Some(&ts), Some(&sig), to, body, 1_011).unwrap();
        assert!(a.mark_used(used, 1_011));
        let replayed = a.check(Some(&ts), Some(&sig), to, body, 1_012).unwrap_err();
        assert!(replayed.contains("already used"));
        // Stamped ahead of the clock: remembered while its own time is in the window.
        let (ts5, sig5) = sign(secret, 1_290, "POST", "/sms/mo", body);
        let used = a.check(Some(&ts5), Some(&sig5), to, body, 1_000).unwrap();
        assert!(a.mark_used(used, 1_000));
        let replayed = a
            .check(Some(&ts5), Some(&sig5), to, body, 1_250)
            .unwrap_err();
        assert!(replayed.contains("already used"));
        // Another body, another secret, a stale time, nothing at all.
        let (ts2, sig2) = sign(secret, 1_000, "POST", "/sms/mo", br#"[{"content":"5"}]"#);
        let e = a
            .check(Some(&ts2), Some(&sig2), to, body, 1_010)
            .unwrap_err();
        assert!(e.contains("does not match"));
        // The same request sent to another route.
        let e = a
            .check(Some(&ts), Some(&sig), ("POST", "/ivr"), body, 1_010)
            .unwrap_err();
        assert!(e.contains("does not match"));
        let e = a
            .check(Some(&ts), Some(&sig), ("PUT", "/sms/mo"), body, 1_010)
            .unwrap_err();
        assert!(e.contains("does not match"));
        let (ts3, sig3) = sign(
            b"another secret of enough bytes",
            1_000,
            "POST",
            "/sms/mo",
            body,
        );
        let e = a
            .check(Some(&ts3), Some(&sig3), to, body, 1_010)
            .unwrap_err();
        assert!(e.contains("does not match"));
        let e = a.check(Some(&ts), Some(&sig), to, body, 2_000).unwrap_err();
        assert!(e.contains("window"));
        assert!(
            a.check(None, None, to, body, 1_010)
                .unwrap_err()
                .contains("required")
        );
        // An absurd timestamp is refused, not overflowed.
        assert!(
            a.check(Some(&i64::MIN.to_string()), Some(&sig), to, body, 1_000)
                .is_err()
        );
    }
}
