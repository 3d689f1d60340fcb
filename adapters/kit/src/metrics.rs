//! Counters and gauges an adapter exposes, encoded by `prometheus-client` (OpenMetrics text,
//! the same crate and format as the hub's). Names and counts only: never a phone number,
//! name or ID.
//!
//! Counters are named as they are counted (`forwarded_total`, `sms_ratings_total`); the
//! encoder writes the family without its `_total` and the sample with it, as OpenMetrics
//! asks.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<String, Counter>>,
    gauges: Mutex<BTreeMap<String, Family<Labels, Gauge>>>,
}

/// A counter's family name: its name without `_total`.
fn family(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Metrics {
    fn counter(&self, name: &str) -> Counter {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(family(name).to_owned())
            .or_default()
            .clone()
    }

    pub fn add(&self, name: &str, n: u64) {
        self.counter(name).inc_by(n);
    }

    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(family(name))
            .map_or(0, Counter::get)
    }

    /// Sets gauge `name{label=value}` (e.g. the spool's records by state).
    pub fn set_gauge(&self, name: &str, label: &str, value: &str, v: i64) {
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .get_or_create(&vec![(label.to_owned(), value.to_owned())])
            .set(v);
    }

    /// Forgets gauge `name` (a value that can no longer be read is no value: the series
    /// goes, rather than show the last one as current).
    pub fn clear_gauge(&self, name: &str) {
        if let Some(g) = self
            .gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            g.clear();
        }
    }

    /// The exposition, every name under `prefix` (e.g. `rating_hotline`).
    pub fn render(&self, prefix: &str) -> String {
        let mut registry = Registry::with_prefix(prefix);
        for (name, c) in self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            registry.register(name, name.replace('_', " "), c.clone());
        }
        for (name, g) in self.gauges.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            registry.register(name, name.replace('_', " "), g.clone());
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_encode_as_openmetrics() {
        let m = Metrics::default();
        m.inc("forwarded_total");
        m.add("forwarded_total", 2);
        m.inc("sms_ratings_total");
        m.set_gauge("spool", "state", "waiting", 4);
        assert_eq!(m.get("forwarded_total"), 3);
        let text = m.render("rating_test");
        assert!(
            text.contains("# TYPE rating_test_forwarded counter"),
            "{text}"
        );
        assert!(text.contains("rating_test_forwarded_total 3"), "{text}");
        assert!(text.contains("rating_test_sms_ratings_total 1"), "{text}");
        assert!(
            text.contains("rating_test_spool{state=\"waiting\"} 4"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
