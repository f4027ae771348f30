//! Replication settings: the reference API's `Config` with Kafka's
//! defaults, plus `min_insync_replicas` and unclean election.

use std::time::Duration;

/// The most one partition's part of a fetch may carry.
pub const MAX_FETCH_BYTES: u32 = 32 << 20;

/// Replication settings for one broker. `Default` gives Kafka's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A follower fetch waits until this many bytes are available...
    pub fetch_min_bytes: u32,
    /// ...or this long (long poll).
    pub fetch_max_wait_ms: u64,
    /// Most bytes one fetch response carries (at least one batch is sent).
    pub fetch_max_bytes: u32,
    /// Pause between a follower's fetches when the previous one returned
    /// data immediately; 0 fetches again at once.
    pub fetcher_interval_ms: u64,
    /// Optional message-count lag rule for ISR shrink. Off by default, as in
    /// Kafka since 0.9 (KIP-16): bursts shrank the ISR needlessly, and a
    /// dead replica of a quiet partition went unseen.
    pub replica_lag_max_messages: Option<u64>,
    /// A follower that has not caught up to the leader's log end for this
    /// long leaves the ISR.
    pub replica_lag_time_max_ms: u64,
    /// How often the high watermark is persisted (a recovery hint only).
    pub high_watermark_checkpoint_interval_ms: u64,
    /// Fetch connections per leader a follower broker uses.
    pub num_fetcher_threads: u32,
    /// Fetches a follower keeps in flight to one leader.
    pub max_inflight_fetches: u32,
    /// Pause after a failed fetch.
    pub fetch_backoff_ms: u64,
    /// An acks=all produce is refused while the ISR is smaller than this.
    pub min_insync_replicas: u32,
    /// Allow electing a replica outside the ISR (may lose committed data).
    pub unclean_leader_election: bool,
    /// Keep at least this many bytes of each partition's log and delete
    /// older batches once they are committed (Kafka's `retention.bytes`,
    /// per partition, whole segments of a sixteenth of it at a time).
    /// Unset keeps everything, as Kafka does by default; an in-memory log
    /// then grows for as long as the node runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            fetch_min_bytes: 1,
            fetch_max_wait_ms: 500,
            fetch_max_bytes: 1024 * 1024,
            fetcher_interval_ms: 0,
            replica_lag_max_messages: None,
            replica_lag_time_max_ms: 30_000,
            high_watermark_checkpoint_interval_ms: 5_000,
            num_fetcher_threads: 1,
            max_inflight_fetches: 1,
            fetch_backoff_ms: 1_000,
            min_insync_replicas: 1,
            unclean_leader_election: false,
            retention_bytes: None,
        }
    }
}

/// A setting out of range, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replication setting `{field}`: {why}")]
pub struct ConfigError {
    pub field: &'static str,
    pub why: String,
}

impl Config {
    /// Check relations between settings that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, why: &str| {
            Err(ConfigError {
                field,
                why: why.to_string(),
            })
        };
        if self.fetch_max_bytes == 0 || self.fetch_max_bytes > MAX_FETCH_BYTES {
            return bad(
                "fetch_max_bytes",
                "must be 1..=33554432 (32 MiB): a fetch response must fit one frame",
            );
        }
        if self.fetch_min_bytes > self.fetch_max_bytes {
            return bad("fetch_min_bytes", "must not exceed fetch_max_bytes");
        }
        if self.min_insync_replicas == 0 {
            return bad("min_insync_replicas", "must be at least 1");
        }
        if self.replica_lag_time_max_ms == 0 {
            return bad("replica_lag_time_max_ms", "must be positive");
        }
        if self.num_fetcher_threads == 0 {
            return bad("num_fetcher_threads", "must be at least 1");
        }
        if self.max_inflight_fetches == 0 {
            return bad("max_inflight_fetches", "must be at least 1");
        }
        if self.fetch_max_wait_ms >= self.replica_lag_time_max_ms {
            return bad(
                "fetch_max_wait_ms",
                "must be below replica_lag_time_max_ms, or idle followers would drop out of the ISR",
            );
        }
        if self
            .fetch_max_wait_ms
            .saturating_add(self.fetcher_interval_ms)
            >= self.replica_lag_time_max_ms
        {
            return bad(
                "fetcher_interval_ms",
                "plus fetch_max_wait_ms must be below replica_lag_time_max_ms: a follower pauses this long after every fetch, so idle followers would drop out of the ISR",
            );
        }
        if let Some(r) = self.retention_bytes
            && r < u64::from(self.fetch_max_bytes)
        {
            return bad(
                "retention_bytes",
                &format!(
                    "{r} is less than fetch_max_bytes ({}): a log must keep at least one fetch's worth, or a follower one fetch behind would find its position deleted; leave it unset to keep everything",
                    self.fetch_max_bytes
                ),
            );
        }
        Ok(())
    }

    pub fn fetch_max_wait(&self) -> Duration {
        Duration::from_millis(self.fetch_max_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_pausing_past_the_lag_limit_is_refused() {
        let c = Config {
            fetcher_interval_ms: 29_500,
            ..Config::default()
        };
        let e = c.validate().expect_err("500 + 29,500 reaches 30,000");
        assert_eq!(e.field, "fetcher_interval_ms");
        let c = Config {
            fetcher_interval_ms: 29_499,
            ..Config::default()
        };
        assert!(c.validate().is_ok());
    }

    /// Each zero is named by its own field (`max_inflight_fetches = 0`
    /// was reported as `num_fetcher_threads`).
    #[test]
    fn a_zero_fetch_setting_is_named() {
        for field in ["num_fetcher_threads", "max_inflight_fetches"] {
            let mut c = Config::default();
            match field {
                "num_fetcher_threads" => c.num_fetcher_threads = 0,
                _ => c.max_inflight_fetches = 0,
            }
            assert_eq!(c.validate().expect_err(field).field, field);
        }
    }

    #[test]
    fn retention_must_hold_a_fetch() {
        let mut c = Config {
            retention_bytes: Some(64 << 20),
            ..Config::default()
        };
        assert_eq!(c.validate(), Ok(()));
        c.retention_bytes = Some(1000);
        let e = c.validate().expect_err("below fetch_max_bytes");
        assert_eq!(e.field, "retention_bytes");
        assert!(e.why.contains("fetch_max_bytes (1048576)"), "{}", e.why);
        c.retention_bytes = None;
        assert_eq!(c.validate(), Ok(()));
    }
}
