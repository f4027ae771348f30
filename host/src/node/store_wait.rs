//! The pauses of a starting node that waits for its metadata store.
//!
//! Why: nodes and their store are often started together (a service
//! manager, a test script, a laptop after a reboot), and etcd may answer a
//! few seconds after the nodes first ask. A node used to exit at the first
//! "unavailable", so the operator had to order the starts by hand. It now
//! tries again, with pauses that double from [`FIRST_PAUSE`] to
//! [`MAX_PAUSE`], until `[metadata] start_wait_ms` is spent.

use std::time::{Duration, Instant};

/// The pause after the first failure.
pub const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause: a store that comes up is noticed within this.
pub const MAX_PAUSE: Duration = Duration::from_secs(4);

/// One start's wait for its store.
#[derive(Debug)]
pub struct StoreWait {
    until: Instant,
    next: Duration,
}

impl StoreWait {
    /// A wait of at most `limit` from now.
    pub fn new(limit: Duration) -> Self {
        StoreWait {
            until: Instant::now() + limit,
            next: FIRST_PAUSE,
        }
    }

    /// The pause before the next try, or none once the wait is spent. The
    /// last pause is cut to end with the wait, so a try is made at its end.
    pub fn next_pause(&mut self) -> Option<Duration> {
        let left = self.left();
        if left.is_zero() {
            return None;
        }
        let pause = self.next.min(left);
        self.next = (self.next * 2).min(MAX_PAUSE);
        Some(pause)
    }

    /// What is left of the wait.
    pub fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_a_spent_wait_gives_none() {
        let mut w = StoreWait::new(Duration::from_secs(3600));
        let pauses: Vec<u128> = (0..7)
            .map(|_| w.next_pause().map_or(0, |p| p.as_millis()))
            .collect();
        assert_eq!(pauses, vec![250, 500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(StoreWait::new(Duration::ZERO).next_pause(), None);
    }

    #[test]
    fn the_last_pause_ends_with_the_wait() {
        let mut w = StoreWait::new(Duration::from_millis(100));
        let p = w.next_pause().expect("a pause");
        assert!(p <= Duration::from_millis(100), "{p:?}");
    }
}
