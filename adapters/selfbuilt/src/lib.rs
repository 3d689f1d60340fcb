//! Webhook adapter for a department's own rating platform. The platform POSTs its ratings
//! as JSON (one object, an array, or {"ratings": [...]}) to `/ratings`; a declarative mapping
//! file says where each canonical field is (JSON paths) and how its scales translate (stars,
//! 4-level, 很好…很差). Each item is validated with the hub's rules and spooled; the answer
//! has one result per item. The spool forwards to the hub, riding out outages.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use rating_hub_adapter_kit::{
    Forwarder, HubConnection, Mapping, Metrics, Spool, Spooled, source_key,
};

fn d_listen() -> String {
    "127.0.0.1:8082".into()
}
fn d_spool() -> String {
    "selfbuilt-spool.db".into()
}
fn d_prefix() -> String {
    "selfbuilt".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfbuiltConfig {
    #[serde(default = "d_listen")]
    pub listen: String,
    #[serde(default = "d_spool")]
    pub spool: String,
    /// Prefix of derived source keys (one per platform).
    #[serde(default = "d_prefix")]
    pub key_prefix: String,
    pub hub: HubConnection,
    pub mapping: Mapping,
    /// How the platform's posts are authenticated (signed by default).
    #[serde(default)]
    pub callback_auth: rating_hub_adapter_kit::CallbackAuthConfig,
    /// Sealing of personal data in the spool, and how long delivered ratings are kept.
    #[serde(default)]
    pub at_rest: rating_hub_adapter_kit::AtRestConfig,
}

impl SelfbuiltConfig {
    pub fn load(path: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }
}

/// The value at a dotted JSON path ("evaluation.score", "items.0.code") as text.
pub fn json_path(v: &Value, path: &str) -> Option<String> {
    let mut cur = v;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match cur {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

struct Inner {
    cfg: SelfbuiltConfig,
    spool: Spool,
    metrics: Arc<Metrics>,
}

impl Inner {
    async fn take(&self, index: usize, item: &Value) -> anyhow::Result<Value> {
        let key = match self
            .cfg
            .mapping
            .source_of("source_key")
            .and_then(|p| json_path(item, p))
        {
            Some(id) => source_key(&self.cfg.key_prefix, &[&id]),
            // No id in the record: its whole content is its identity.
            None => source_key(&self.cfg.key_prefix, &[&item.to_string()]),
        };
        let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
        match self
            .cfg
            .mapping
            .rating(key.clone(), &|p| json_path(item, p), now)
        {
            Ok(rating) => {
                let outcome = match self.spool.put(&rating).await? {
                    Spooled::Stored => "accepted",
                    Spooled::AlreadyThere => "duplicate",
                    // The key was taken by a different record: not received.
                    Spooled::Conflict => "conflict",
                };
                self.metrics.inc(&format!("{outcome}_total"));
                Ok(json!({"index": index, "source_key": key, "outcome": outcome}))
            }
            Err(violations) => {
                self.metrics.inc("invalid_total");
                let v: Vec<Value> = violations
                    .into_iter()
                    .map(|x| json!({"field": x.field, "description": x.description}))
                    .collect();
                Ok(
                    json!({"index": index, "source_key": key, "outcome": "invalid", "violations": v}),
                )
            }
        }
    }
}

async fn ratings(
    State(inner): State<Arc<Inner>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let items: Vec<Value> = match body {
        Value::Array(a) => a,
        Value::Object(ref m) if m.get("ratings").is_some_and(Value::is_array) => {
            m["ratings"].as_array().cloned().unwrap_or_default()
        }
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(
                    json!({"error": "the body must be a rating object, an array of them, or {\"ratings\": [...]}"}),
                ),
            );
        }
    };
    let mut results = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match inner.take(i, item).await {
            Ok(r) => results.push(r),
            Err(e) => {
                // Not stored: the caller must retry (items before this one are stored).
                tracing::error!(error = %e, "Spool write failed.");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": "storage unavailable; retry", "results": results})),
                );
            }
        }
    }
    (StatusCode::OK, Json(json!({ "results": results })))
}

pub struct Selfbuilt {
    pub addr: SocketAddr,
    pub spool: Spool,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// This adapter is the only one on its spool while this is open.
    _lock: std::fs::File,
}

pub async fn start(cfg: SelfbuiltConfig) -> anyhow::Result<Selfbuilt> {
    let auth = rating_hub_adapter_kit::CallbackAuth::from_config(&cfg.callback_auth)?;
    let at_rest = Arc::new(rating_hub_adapter_kit::AtRest::load(
        &cfg.at_rest,
        &cfg.spool,
    )?);
    let lock = rating_hub_adapter_kit::runtime::exclusive(&cfg.spool)?;
    let spool = Spool::open(&cfg.spool, at_rest).await?;
    let metrics = Arc::new(Metrics::default());
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
    let inner = Arc::new(Inner {
        cfg,
        spool: spool.clone(),
        metrics: metrics.clone(),
    });
    let m = metrics.clone();
    let app = Router::new()
        .route("/ratings", post(ratings))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            rating_hub_adapter_kit::CallbackAuth::middleware,
        ))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        rating_hub_adapter_kit::metrics::CONTENT_TYPE,
                    )],
                    m.render("rating_selfbuilt"),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(inner);
    let mut stop_http = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_http.changed().await;
            })
            .await;
    }));
    tracing::info!(%addr, "Self-built platform adapter listening.");
    Ok(Selfbuilt {
        _lock: lock,
        addr,
        spool,
        stop,
        tasks,
    })
}

impl Selfbuilt {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        rating_hub_adapter_kit::runtime::stop_tasks(self.tasks).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        let v = json!({"a": {"b": [ {"c": 5}, {"c": "x"} ]}, "n": null, "codes": ["501", 502]});
        assert_eq!(json_path(&v, "a.b.0.c").as_deref(), Some("5"));
        assert_eq!(json_path(&v, "a.b.1.c").as_deref(), Some("x"));
        assert_eq!(json_path(&v, "codes").as_deref(), Some("501,502"));
        assert_eq!(json_path(&v, "n"), None);
        assert_eq!(json_path(&v, "a.z"), None);
        assert_eq!(json_path(&v, "a.b.9"), None);
    }
}
