//! The hub's one clock. Tests (and the rules' default-rating timers) swap in their own.

use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn now_micros(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default()
    }
}

/// A clock that moves only when told to: for tests and simulations of deadlines.
#[derive(Debug, Default)]
pub struct ManualClock {
    micros: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    pub fn at(micros: i64) -> Self {
        Self {
            micros: std::sync::atomic::AtomicI64::new(micros),
        }
    }

    pub fn set(&self, micros: i64) {
        self.micros
            .store(micros, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.micros
            .fetch_add(by.as_micros() as i64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> i64 {
        self.micros.load(std::sync::atomic::Ordering::SeqCst)
    }
}
