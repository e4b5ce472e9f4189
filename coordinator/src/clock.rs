//! Where the engine's rules and timers take the time from.
//!
//! The server runs on [`WallClock`] (milliseconds since the Unix epoch, as
//! pilots stamp their events); the simulator and the rule tests on a
//! [`ManualClock`] they move themselves, so the same rules run in virtual
//! time, a year of trace in seconds. Only waits that bound a request (a
//! long-poll held open, an LRM command's timeout) stay on real time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch, from somewhere.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now_ms(&self) -> u64 {
        protocol::now_ms()
    }
}

/// A clock that moves only when told to, and never backwards.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self {
            ms: AtomicU64::new(start_ms),
        }
    }

    /// Moves the clock to `ms`; a time before the current one is ignored.
    pub fn set(&self, ms: u64) {
        self.ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_forward_and_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(500);
        c.set(1_200);
        assert_eq!(c.now_ms(), 1_500, "never backwards");
        c.set(9_000);
        assert_eq!(c.now_ms(), 9_000);
    }
}
