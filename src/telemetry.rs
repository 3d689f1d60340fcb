//! Logging. Events carry fields first and a short message last. Rater PII (names, ID
//! numbers, phones) is never a field: the types that hold it print masked or redacted.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber (once; later calls are no-ops). `RUST_LOG` wins over the
/// configured filter when set. Logs go to stderr.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// How often a throttled line may be written.
const THROTTLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Rate-limits a log line that can repeat many times a second (a failed commit, a refused
/// handshake, a denied call): `Some(n)` when the line for `key` may be written now, `n` being
/// how many were held back since the last one; `None` to hold this one back. One line per
/// key and second at most, so a storm of one cause writes one line a second with a count,
/// and a distinct cause (another key) still gets its own line.
pub fn throttle(key: &'static str) -> Option<u64> {
    throttle_for(key, "")
}

/// As [`throttle`], for one cause of `key` among several: each principal's denials, each
/// upstream's retries, each peer's refused certificate has its own line a second. At most
/// [`THROTTLE_KEYS`] causes are kept; past that, the ones quiet for an interval are forgotten.
pub fn throttle_for(key: &'static str, cause: &str) -> Option<u64> {
    static LINES: std::sync::OnceLock<Throttle> = std::sync::OnceLock::new();
    LINES
        .get_or_init(Throttle::default)
        .check(key, cause, std::time::Instant::now())
}

/// The state behind [`throttle_for`]: when each cause last wrote and how many it held back
/// since. Its own type so a test has its own, and says what time it is.
#[derive(Default)]
pub struct Throttle {
    causes: std::sync::Mutex<Causes>,
}

#[derive(Default)]
struct Causes {
    last: std::collections::HashMap<(&'static str, String), (std::time::Instant, u64)>,
    /// When quiet causes were last forgotten: at most once an interval, so a flood of new
    /// causes (a new peer address per connection) is not a scan per line.
    swept: Option<std::time::Instant>,
}

impl Throttle {
    /// [`throttle_for`] at `now`.
    pub fn check(&self, key: &'static str, cause: &str, now: std::time::Instant) -> Option<u64> {
        let mut c = self.causes.lock().unwrap_or_else(|p| p.into_inner());
        if c.last.len() >= THROTTLE_KEYS
            && c.swept
                .is_none_or(|at| now.saturating_duration_since(at) >= THROTTLE_INTERVAL)
        {
            // Forget the quiet causes, but not one that held lines back: its next line
            // must still say how many.
            c.last.retain(|_, (at, held)| {
                *held > 0 || now.saturating_duration_since(*at) < THROTTLE_INTERVAL
            });
            c.swept = Some(now);
        }
        let mut k = (key, cause.to_owned());
        if c.last.len() >= THROTTLE_KEYS && !c.last.contains_key(&k) {
            // More causes at once than are kept: the new ones share one line a second.
            k.1 = OVERFLOW_CAUSE.to_owned();
        }
        match c.last.get_mut(&k) {
            Some((at, held)) if now.saturating_duration_since(*at) < THROTTLE_INTERVAL => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                c.last.insert(k, (now, 0));
                Some(0)
            }
        }
    }
}

/// The cause the causes past [`THROTTLE_KEYS`] share.
const OVERFLOW_CAUSE: &str = "(more causes than are kept)";

/// Most throttled causes remembered at once.
const THROTTLE_KEYS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_storm_of_one_line_writes_one_a_second_with_a_count_and_other_keys_still_write() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.check("storm", "", start), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.check("storm", "", start), None);
        }
        assert_eq!(
            t.check("other", "", start),
            Some(0),
            "another cause has its own line"
        );
        let later = start + THROTTLE_INTERVAL;
        assert_eq!(
            t.check("storm", "", later),
            Some(1000),
            "the next line counts what was held"
        );
        assert_eq!(t.check("storm", "", later), None);
    }

    /// A flood of distinct causes (a new peer address per connection) keeps the map bounded
    /// and writes a bounded number of lines: the causes past the limit share one.
    #[test]
    fn a_flood_of_distinct_causes_stays_bounded() {
        let t = Throttle::default();
        let now = Instant::now();
        let written = (0..3 * THROTTLE_KEYS)
            .filter(|i| t.check("flood", &format!("peer-{i}"), now).is_some())
            .count();
        // Each cause kept writes once; all the others share one line.
        assert_eq!(written, THROTTLE_KEYS + 1, "{written} lines");
        assert!(t.causes.lock().unwrap().last.len() <= THROTTLE_KEYS + 1);
    }

    /// A full map forgets quiet causes, but never the count a cause held back: the flood
    /// that fills the map must not swallow the storm's "1000 held" line (CI found the
    /// global map, shared by two tests, doing exactly that).
    #[test]
    fn forgetting_quiet_causes_keeps_a_count_still_owed() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.check("storm", "", start), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.check("storm", "", start), None);
        }
        for i in 0..2 * THROTTLE_KEYS {
            t.check("flood", &format!("peer-{i}"), start);
        }
        let later = start + THROTTLE_INTERVAL;
        // The first check past the interval sweeps the map.
        assert_eq!(t.check("flood", "peer-new", later), Some(0));
        assert_eq!(t.check("storm", "", later), Some(1000));
    }
}
