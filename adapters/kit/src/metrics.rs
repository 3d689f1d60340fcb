//! Counters an adapter exposes (Prometheus text format). Names and counts only: never a
//! phone number, name or ID.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn add(&self, name: &str, n: u64) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default() += n;
    }

    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// `# TYPE x counter` / `x 3` lines, sorted by name.
    pub fn render(&self, prefix: &str) -> String {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, v) in counters.iter() {
            out.push_str(&format!(
                "# TYPE {prefix}_{name} counter\n{prefix}_{name} {v}\n"
            ));
        }
        out
    }
}
