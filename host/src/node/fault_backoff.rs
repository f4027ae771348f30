//! How long a partition waits before it recovers its log from a storage
//! fault, and before it retries a recovery that failed.
//!
//! Why: a disk that keeps failing (its directory removed, a dying device)
//! recovers "successfully" and fails again at the next write. With a fixed
//! pause the replica looped fault, recover, fault five times a second, and
//! each loop stepped it down, logged a warning and rewrote the partition's
//! ISR in the metadata store. The pauses double instead while faults keep
//! coming soon after recoveries, up to [`MAX_PAUSE`], and start over once
//! a recovered log has stayed healthy for [`HEALTHY_AFTER`]. The ISR's
//! only member's pauses stop at [`SOLE_MEMBER_MAX_PAUSE`] (the partition
//! waits for it alone); see `partition.rs`, which also runs each pause on a
//! timer of its own so a shutdown never waits one out.

use std::time::{Duration, Instant};

/// The pause before recovering from a first fault.
pub const FIRST_FAULT_PAUSE: Duration = Duration::from_millis(200);
/// The pause before retrying a failed recovery the first time.
pub const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause of either kind.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);
/// The longest pause before the ISR's only member recovers from a fault:
/// the partition is unavailable until it does, so shorter than
/// [`MAX_PAUSE`]; but not 200 ms for ever, which a full disk made a loop
/// of five new epochs and metadata writes a second.
pub const SOLE_MEMBER_MAX_PAUSE: Duration = Duration::from_secs(2);
/// A fault this long after the last recovery starts a new streak.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// `first` doubled `n` times, at most [`MAX_PAUSE`].
fn doubled(first: Duration, n: u32) -> Duration {
    first.saturating_mul(1u32 << n.min(16)).min(MAX_PAUSE)
}

/// One partition's streak of faults and failed recoveries.
#[derive(Debug, Default)]
pub struct FaultBackoff {
    /// Faults in a row, each within [`HEALTHY_AFTER`] of the recovery
    /// before it.
    faults: u32,
    /// Failed recoveries since the last fault.
    failed_recoveries: u32,
    recovered_at: Option<Instant>,
}

impl FaultBackoff {
    /// A fault at `now` of the ISR's only member: the pause before
    /// recovering, at most [`SOLE_MEMBER_MAX_PAUSE`].
    pub fn sole_member_fault(&mut self, now: Instant) -> Duration {
        self.fault(now).min(SOLE_MEMBER_MAX_PAUSE)
    }

    /// A fault at `now`: the pause before recovering.
    pub fn fault(&mut self, now: Instant) -> Duration {
        let streak_goes_on = self
            .recovered_at
            .is_some_and(|at| now.saturating_duration_since(at) < HEALTHY_AFTER);
        self.faults = if streak_goes_on {
            self.faults.saturating_add(1)
        } else {
            0
        };
        self.failed_recoveries = 0;
        doubled(FIRST_FAULT_PAUSE, self.faults)
    }

    /// A recovery failed: the pause before the next try.
    pub fn recovery_failed(&mut self) -> Duration {
        let pause = doubled(FIRST_RETRY_PAUSE, self.failed_recoveries);
        self.failed_recoveries = self.failed_recoveries.saturating_add(1);
        pause
    }

    /// The log recovered at `now`.
    pub fn recovered(&mut self, now: Instant) {
        self.recovered_at = Some(now);
        self.failed_recoveries = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_soon_after_recoveries_double_the_pause_up_to_the_cap() {
        let mut b = FaultBackoff::default();
        let t0 = Instant::now();
        let mut pauses = Vec::new();
        let mut now = t0;
        for _ in 0..10 {
            pauses.push(b.fault(now).as_millis());
            now += Duration::from_secs(1);
            b.recovered(now);
            now += Duration::from_secs(1);
        }
        assert_eq!(
            pauses,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        // Healthy for a minute: the next fault starts over.
        now += HEALTHY_AFTER;
        assert_eq!(b.fault(now), FIRST_FAULT_PAUSE);
    }

    /// The ISR's only member backs off too, but only to 2 s: the
    /// partition waits for it alone.
    #[test]
    fn the_only_in_sync_member_backs_off_to_two_seconds() {
        let mut b = FaultBackoff::default();
        let mut now = Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..7 {
            pauses.push(b.sole_member_fault(now).as_millis());
            now += Duration::from_millis(300);
            b.recovered(now);
        }
        assert_eq!(pauses, [200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn failed_recoveries_back_off_and_a_new_fault_resets_them() {
        let mut b = FaultBackoff::default();
        let now = Instant::now();
        b.fault(now);
        let retries: Vec<u128> = (0..7)
            .map(|_| b.recovery_failed().as_secs() as u128)
            .collect();
        assert_eq!(retries, [1, 2, 4, 8, 16, 30, 30]);
        b.recovered(now);
        b.fault(now);
        assert_eq!(b.recovery_failed(), FIRST_RETRY_PAUSE);
    }

    #[test]
    fn the_pause_saturates_instead_of_overflowing() {
        let mut b = FaultBackoff::default();
        let now = Instant::now();
        for _ in 0..100 {
            b.fault(now);
            b.recovered(now);
        }
        assert_eq!(b.fault(now), MAX_PAUSE);
        for _ in 0..100 {
            b.recovery_failed();
        }
        assert_eq!(b.recovery_failed(), MAX_PAUSE);
    }
}
