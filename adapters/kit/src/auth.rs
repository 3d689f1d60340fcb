//! Authentication of the callbacks an adapter takes over HTTP (SMS and IVR gateways, self-built
//! platforms), the way gateways sign them: an HMAC-SHA256 with a shared secret over the
//! timestamp and the body, checked within a time window, each signature taken once.
//!
//! - `X-Timestamp`: Unix seconds when the caller signed;
//! - `X-Signature`: hex HMAC-SHA256(secret, `"{timestamp}\n{body}"`).
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

/// The largest callback body read (the routes refuse larger ones anyway).
const MAX_BODY: usize = 8 << 20;

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
            anyhow::ensure!(
                c.insecure_no_auth,
                "[callback_auth] secret_file is required: callbacks must be signed (HMAC-SHA256); \
                 set insecure_no_auth = true only on a network no one else reaches"
            );
            tracing::warn!("Callbacks are taken UNSIGNED ([callback_auth] insecure_no_auth).");
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

    /// Checks a request's timestamp and signature against its body at `now` (Unix seconds).
    pub fn check(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), &'static str> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let (Some(ts), Some(sig)) = (timestamp, signature) else {
            return Err("X-Timestamp and X-Signature are required");
        };
        let at: i64 = ts
            .trim()
            .parse()
            .map_err(|_| "X-Timestamp is not Unix seconds")?;
        if (now - at).abs() > self.window_secs {
            return Err("X-Timestamp is outside the accepted window");
        }
        let given = hex::decode(sig.trim()).map_err(|_| "X-Signature is not hex")?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "the secret cannot key an HMAC")?;
        mac.update(ts.trim().as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac.verify_slice(&given)
            .map_err(|_| "X-Signature does not match the body")?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| (now - *t).abs() <= self.window_secs);
        if seen.insert(given, now).is_some() {
            return Err("this signature was already used (a replayed request)");
        }
        Ok(())
    }

    /// The axum middleware: refuses what `check` refuses, passes the rest on with its body.
    pub async fn middleware(State(auth): State<Self>, request: Request, next: Next) -> Response {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large").into_response();
        };
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Err(why) = auth.check(header("x-timestamp"), header("x-signature"), &bytes, now) {
            tracing::warn!(path = %parts.uri.path(), why, "Callback refused: not authenticated.");
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"code": 401, "msg": why})),
            )
                .into_response();
        }
        next.run(Request::from_parts(parts, Body::from(bytes)))
            .await
    }
}

/// Signs a body as a gateway does: (X-Timestamp, X-Signature). For clients and tests.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> (String, String) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
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
        let body = br#"[{"content":"1"}]"#;
        let (ts, sig) = sign(b"0123456789abcdef-secret", 1_000, body);
        assert_eq!(a.check(Some(&ts), Some(&sig), body, 1_010), Ok(()));
        assert!(
            a.check(Some(&ts), Some(&sig), body, 1_011)
                .unwrap_err()
                .contains("already used")
        );
        let (ts2, sig2) = sign(b"0123456789abcdef-secret", 1_000, br#"[{"content":"5"}]"#);
        assert!(
            a.check(Some(&ts2), Some(&sig2), body, 1_010)
                .unwrap_err()
                .contains("does not match")
        );
        let (ts3, sig3) = sign(b"another secret of enough bytes", 1_000, body);
        assert!(
            a.check(Some(&ts3), Some(&sig3), body, 1_010)
                .unwrap_err()
                .contains("does not match")
        );
        let (ts4, sig4) = sign(b"0123456789abcdef-secret", 1_000, body);
        assert!(
            a.check(Some(&ts4), Some(&sig4), body, 2_000)
                .unwrap_err()
                .contains("window")
        );
        assert!(
            a.check(None, None, body, 1_010)
                .unwrap_err()
                .contains("required")
        );
    }
}
