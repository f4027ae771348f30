//! This node's certificate running out: warnings ahead of its `notAfter`,
//! and a stop shortly before it.
//!
//! TLS checks a certificate's validity at the handshake only, so a node
//! whose certificate expires keeps its open connections, stays in every
//! ISR and can be elected, while no client and no restarted peer can
//! reach it any more (an operator's run had a controlled shutdown hand a
//! partition to such a node, and its clients lost the partition). So it
//! stops [`STOP_AHEAD`] before the expiry, with a controlled shutdown
//! while peers still accept it, and says why; its next start refuses the
//! expired certificate, naming the file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::transport::tls::{duration_text as left_text, rfc3339 as utc};

/// How long before its certificate's `notAfter` a node stops: room for a
/// controlled shutdown (bounded by what is left of this, see
/// [`CertExpiry::left`]) while its handshakes still succeed, and for a
/// little clock skew between nodes.
pub const STOP_AHEAD: Duration = Duration::from_secs(30);

/// When a node warns of its certificate's expiry: at start when it is
/// this near, then again as each mark is passed.
const WARN_AHEAD: [Duration; 4] = [
    Duration::from_secs(30 * 86_400),
    Duration::from_secs(7 * 86_400),
    Duration::from_secs(86_400),
    Duration::from_secs(3_600),
];

/// The longest a watch sleeps before it reads the clock again: its
/// timer counts monotonic time, the expiry is on the wall clock (a host
/// suspended or a clock stepped would otherwise move it).
const RECHECK: Duration = Duration::from_secs(3_600);

/// The node's certificate and when it expires.
#[derive(Debug, Clone)]
pub struct CertExpiry {
    path: PathBuf,
    not_after: SystemTime,
}

/// What the watch does next, at `now`.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Warn: the certificate expires within `WARN_AHEAD[mark]`.
    Warn { mark: usize },
    /// Stop the node.
    Stop,
    /// Nothing until then.
    Sleep(Duration),
}

impl CertExpiry {
    pub fn new(path: &Path, not_after: SystemTime) -> Self {
        CertExpiry {
            path: path.to_path_buf(),
            not_after,
        }
    }

    /// When the node stops: [`STOP_AHEAD`] before the expiry.
    fn stop_at(&self) -> SystemTime {
        self.not_after
            .checked_sub(STOP_AHEAD)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// What comes next at `now`, the marks before `warned` already warned
    /// of.
    fn step(&self, now: SystemTime, warned: usize) -> Step {
        let stop_at = self.stop_at();
        let Ok(to_stop) = stop_at.duration_since(now) else {
            return Step::Stop;
        };
        if to_stop.is_zero() {
            return Step::Stop;
        }
        let left = self.not_after.duration_since(now).unwrap_or_default();
        // The nearest mark already passed is the one to warn of (a start
        // 3 days ahead warns once, of the 7-day mark, not of the 30-day
        // one too).
        if let Some(mark) = (warned..WARN_AHEAD.len())
            .rev()
            .find(|&m| left <= WARN_AHEAD[m])
        {
            return Step::Warn { mark };
        }
        let next_mark = WARN_AHEAD
            .get(warned)
            .map_or(to_stop, |m| left.saturating_sub(*m));
        Step::Sleep(next_mark.min(to_stop).min(RECHECK))
    }

    /// Refuse a start this near the expiry: the node would stop at once.
    pub fn check_at_start(&self, now: SystemTime) -> Result<(), String> {
        if self.step(now, WARN_AHEAD.len()) == Step::Stop {
            return Err(format!(
                "it expires at {} ({} from now): a node stops {} s before its certificate expires, while peers still accept it. Issue a new one (`replicator cluster cert`)",
                utc(self.not_after),
                left_text(self.not_after.duration_since(now).unwrap_or_default()),
                STOP_AHEAD.as_secs(),
            ));
        }
        Ok(())
    }

    /// Resolves when the node must stop; warns on the way as each mark is
    /// passed (the first warning at once, if the start is within one).
    pub async fn watch(&self) -> String {
        let mut warned = 0;
        loop {
            let now = SystemTime::now();
            match self.step(now, warned) {
                Step::Warn { mark } => {
                    warned = mark + 1;
                    warn!(
                        "this node's certificate {} expires at {} ({} from now): issue a new one (`replicator cluster cert`) and restart the node before then; {} s before it expires the node stops, as peers and clients would refuse it after",
                        self.path.display(),
                        utc(self.not_after),
                        left_text(self.not_after.duration_since(now).unwrap_or_default()),
                        STOP_AHEAD.as_secs(),
                    );
                }
                Step::Stop => {
                    return format!(
                        "this node's certificate {} expires at {}: the node stops while peers still accept it, as no client and no peer could connect to it after. Issue a new certificate (`replicator cluster cert`) and start the node again",
                        self.path.display(),
                        utc(self.not_after),
                    );
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// The time left until the expiry (zero once past).
    pub fn left(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// `notAfter` in seconds since the epoch (a metric).
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn expiring_in(now: SystemTime, secs: u64) -> CertExpiry {
        CertExpiry::new(Path::new("node-1.pem"), now + Duration::from_secs(secs))
    }

    /// A year ahead: nothing to say, and the watch reads the clock again
    /// within the hour.
    #[test]
    fn a_distant_expiry_sleeps_in_bounded_steps() {
        let now = SystemTime::now();
        assert_eq!(
            expiring_in(now, 365 * DAY).step(now, 0),
            Step::Sleep(RECHECK)
        );
        assert!(expiring_in(now, 365 * DAY).check_at_start(now).is_ok());
    }

    /// Each mark is warned of once, the nearest passed one only, and the
    /// watch wakes up at the next.
    #[test]
    fn each_mark_warns_once() {
        let now = SystemTime::now();
        let c = expiring_in(now, 3 * DAY);
        // Within 7 days at start: one warning, of the 7-day mark.
        assert_eq!(c.step(now, 0), Step::Warn { mark: 1 });
        // Then quiet until the 1-day mark (within RECHECK steps).
        assert_eq!(c.step(now, 2), Step::Sleep(RECHECK));
        let at_one_day = now + Duration::from_secs(2 * DAY);
        assert_eq!(c.step(at_one_day, 2), Step::Warn { mark: 2 });
        // 90 minutes left: the hour mark is 30 minutes away.
        let c = expiring_in(now, 5_400);
        assert_eq!(c.step(now, 3), Step::Sleep(Duration::from_secs(1_800)));
        // Every mark passed: the stop, STOP_AHEAD before the expiry.
        let c = expiring_in(now, 3_000);
        assert_eq!(c.step(now, 4), Step::Sleep(Duration::from_secs(3_000 - 30)));
    }

    /// STOP_AHEAD before the expiry the watch stops the node, and a start
    /// that near is refused, saying when it expires.
    #[test]
    fn the_node_stops_ahead_of_the_expiry() {
        let now = SystemTime::now();
        let c = expiring_in(now, 100);
        assert_eq!(c.step(now, 4), Step::Sleep(Duration::from_secs(70)));
        assert_eq!(c.step(now + Duration::from_secs(70), 4), Step::Stop);
        assert_eq!(c.step(now + Duration::from_secs(200), 4), Step::Stop);
        assert!(c.check_at_start(now).is_ok());
        let e = expiring_in(now, 20)
            .check_at_start(now)
            .expect_err("refused");
        assert!(
            e.contains("20 s from now") && e.contains("stops 30 s before"),
            "{e}"
        );
    }

    #[test]
    fn times_read_as_utc_and_durations_in_units() {
        assert_eq!(
            utc(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 + 61)),
            "1970-01-02T00:01:01Z"
        );
        assert_eq!(left_text(Duration::from_secs(45)), "45 s");
        assert_eq!(left_text(Duration::from_secs(600)), "10 min");
        assert_eq!(left_text(Duration::from_secs(5 * 3_600)), "5 h");
        assert_eq!(left_text(Duration::from_secs(9 * DAY)), "9 days");
        assert_eq!(left_text(Duration::from_secs(3_599)), "60 min");
        assert_eq!(left_text(Duration::from_secs(10 * DAY - 5)), "10 days");
        // The unit after rounding: not "120 min" nor "48 h".
        assert_eq!(left_text(Duration::from_secs(7_190)), "2 h");
        assert_eq!(left_text(Duration::from_secs(2 * DAY - 100)), "2 days");
    }
}
