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
pub struct DenialLabels {
    /// role, scope, quota, shed
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

/// The hub's metrics.
pub struct Metrics {
    registry: Registry,
    /// Ratings (and 办件 events) answered, by RPC, principal and outcome.
    pub ratings: Family<RatingLabels, Counter>,
    /// Calls refused before their work: a missing role, outside the scope, over quota, shed.
    pub denials: Family<DenialLabels, Counter>,
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
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rating_hub");
        let m = Self {
            ratings: Family::default(),
            denials: Family::default(),
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
        Self { registry, ..m }
    }
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
        let names: Vec<String> = state.relay.names().map(str::to_owned).collect();
        for name in names {
            let l = UpstreamLabels {
                upstream: name.clone(),
            };
            // An upstream whose stored state cannot be read (the database down) has no
            // series rather than this instance's stale copy, which an alert would trust
            // (zero dead letters, zero lag); its absence is the signal.
            let Some(u) = state
                .relay
                .status(&name)
                .await
                .ok()
                .filter(|u| u.stored_state_read)
            else {
                self.upstream_cursor.remove(&l);
                self.upstream_lag_records.remove(&l);
                self.upstream_lag_seconds.remove(&l);
                self.upstream_dead_letters.remove(&l);
                self.upstream_paused.remove(&l);
                self.upstream_delivering_here.remove(&l);
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
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<crate::api::HubState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::routing::get;
    let app = axum::Router::new().route(
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
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
}
