//! The `key = value` settings the file plugin accepts, with their defaults.

/// When appended data is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every append, before it returns.
    Always,
    /// On an append at least this many milliseconds after the last sync,
    /// on segment roll, and on `flush`.
    IntervalMs(u64),
    /// Only on `flush` and checkpoints; replication is the durability.
    Never,
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub segment_bytes: u64,
    pub fsync: Fsync,
}

pub const KEYS: &str = "segment.bytes, fsync (always|interval|never), fsync.interval.ms";

impl Config {
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, String> {
        let mut segment_bytes = 64 * 1024 * 1024;
        let mut mode = "interval".to_string();
        let mut interval_ms = 1000u64;
        for (k, v) in pairs {
            match k.as_str() {
                "segment.bytes" => {
                    segment_bytes = v
                        .parse()
                        .ok()
                        .filter(|n| (1024..=1 << 40).contains(n))
                        .ok_or_else(|| {
                            format!("segment.bytes = `{v}`: want a byte count from 1024 to 2^40")
                        })?;
                }
                "fsync" => mode = v.clone(),
                "fsync.interval.ms" => {
                    interval_ms = v.parse().ok().filter(|ms| *ms <= 86_400_000).ok_or_else(
                        || {
                            format!(
                                "fsync.interval.ms = `{v}`: want milliseconds from 0 to 86400000"
                            )
                        },
                    )?;
                }
                _ => return Err(format!("unknown setting `{k}`; storage-file takes {KEYS}")),
            }
        }
        let fsync = match mode.as_str() {
            "always" => Fsync::Always,
            "interval" => Fsync::IntervalMs(interval_ms),
            "never" => Fsync::Never,
            other => return Err(format!("fsync = `{other}`: want always, interval or never")),
        };
        Ok(Config {
            segment_bytes,
            fsync,
        })
    }
}
