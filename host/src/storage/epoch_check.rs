//! Checking the leader-epoch cache a log reports against the batches it
//! holds, and rebuilding the cache from the batches when they disagree.
//!
//! Why: every batch carries the epoch it was written in, so the batches
//! are the truth and the cache a summary a plugin keeps on the side (the
//! file plugin in a `leader-epochs` checkpoint). A cache that lost
//! entries (the file deleted or restored from an older copy, a plugin that
//! forgot it) silently changes what KIP-101 reconciliation decides: a
//! leader with a cache that starts late, or ends at an older epoch than
//! its last batch, misjudges where a follower diverges. The check costs
//! one small read per open; the rebuild reads the whole log and happens
//! only when the check fails. It does not read where the newest epoch
//! starts: a damaged batch there faulted the plugin inside the open, and
//! the damage was no longer cut and fetched again (tried, reverted).

use tracing::warn;

use super::{EpochEntry, LogState, OffsetBounds, PartitionLog, StorageError, StorageResult};
use crate::core::{EpochCache, MAX_LEADER_EPOCH};

/// How much one read of the rebuild asks for.
const REBUILD_READ: u32 = 1 << 20;

/// `state` with its epoch cache checked against `log`'s batches, rebuilt
/// from them (and written back) if it does not describe them.
pub async fn checked<L: PartitionLog>(
    log: &L,
    mut state: LogState,
    label: &str,
) -> StorageResult<LogState> {
    let Some(why) = disagreement(log, state.bounds, &state.leader_epochs).await? else {
        return Ok(state);
    };
    warn!(
        "{label}: the leader-epoch cache does not describe the log ({why}); rebuilding it from the batches' epochs"
    );
    let rebuilt = from_batches(log, state.bounds, &state.leader_epochs).await?;
    // Not written back (a full disk, say): the replica works from the
    // rebuilt cache all the same, writes it with its next epoch change,
    // and the next open rebuilds it again. Failing the open would take a
    // replica whose batches are fine out of service.
    if let Err(e) = log.set_leader_epochs(rebuilt.clone()).await {
        warn!("{label}: cannot write the rebuilt leader-epoch cache back: {e}");
    }
    warn!(
        "{label}: leader-epoch cache rebuilt: {}",
        rebuilt
            .iter()
            .map(|e| format!("epoch {} from {}", e.epoch, e.start_offset))
            .collect::<Vec<_>>()
            .join(", ")
    );
    state.leader_epochs = rebuilt;
    Ok(state)
}

/// Why `entries` do not describe the batches of `log`, or `None`.
async fn disagreement<L: PartitionLog>(
    log: &L,
    bounds: OffsetBounds,
    entries: &[EpochEntry],
) -> StorageResult<Option<String>> {
    if bounds.log_end <= bounds.log_start {
        return Ok(None);
    }
    let Some(first) = entries.first() else {
        return Ok(Some("it is empty".into()));
    };
    if first.start_offset > bounds.log_start {
        return Ok(Some(format!(
            "it starts at offset {}, the log at {}",
            first.start_offset, bounds.log_start
        )));
    }
    // The newest batch's epoch must be the newest the cache gives a batch.
    let last = log.read(bounds.log_end - 1, 1).await?;
    let mut newest = None;
    for b in replicator_plugin_sdk::batches(&last, false) {
        let (h, _) = b.map_err(|e| StorageError::Corrupt(format!("last batch: {e}")))?;
        newest = Some(h.leader_epoch);
    }
    let cached = EpochCache::from_entries(entries.to_vec()).last_written(bounds.log_end);
    Ok(match newest {
        Some(epoch) if Some(epoch) != cached => Some(format!(
            "its newest epoch with batches is {}, the log's last batch is of epoch {epoch}",
            cached.map_or("none".to_string(), |e| e.to_string())
        )),
        Some(_) => None,
        None => Some("the last batch could not be read".into()),
    })
}

/// The cache the batches of `log` imply; an entry of `kept` after the
/// last batch's epoch that starts at the log end (a leader's epoch with no
/// batch yet) is kept.
async fn from_batches<L: PartitionLog>(
    log: &L,
    bounds: OffsetBounds,
    kept: &[EpochEntry],
) -> StorageResult<Vec<EpochEntry>> {
    let mut cache = EpochCache::default();
    let mut at = bounds.log_start;
    while at < bounds.log_end {
        let bytes = log.read(at, REBUILD_READ).await?;
        let mut next = at;
        for b in replicator_plugin_sdk::batches(&bytes, false) {
            let (h, _) = b.map_err(|e| StorageError::Corrupt(format!("batch at {next}: {e}")))?;
            if h.leader_epoch > MAX_LEADER_EPOCH {
                // No leader writes such a batch (see MAX_LEADER_EPOCH).
                return Err(StorageError::Corrupt(format!(
                    "batch at {} has leader epoch {}, past the largest a partition can reach",
                    h.base_offset, h.leader_epoch
                )));
            }
            cache.assign(h.leader_epoch, h.base_offset);
            next = h.next_offset();
        }
        if next <= at {
            return Err(StorageError::Corrupt(format!(
                "rebuilding the leader-epoch cache: a read at {at} returned no batch past it"
            )));
        }
        at = next;
    }
    if let Some(e) = kept.last()
        && e.start_offset == bounds.log_end
    {
        cache.assign(e.epoch, e.start_offset);
    }
    Ok(cache.entries().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryLog;

    /// A memory log with batches of epochs 1 (offsets 0..3), 1 (3..6)
    /// and 3 (6..9).
    async fn log() -> MemoryLog {
        let log = MemoryLog::default();
        for (base, epoch) in [(0, 1), (3, 1), (6, 3)] {
            let records: Vec<_> = (0..3)
                .map(|i| crate::batch::Record {
                    value: format!("m{}", base + i).into(),
                    ..Default::default()
                })
                .collect();
            let batch = crate::batch::encode(base, epoch, &records).expect("encode");
            log.append(batch).await.expect("append");
        }
        log
    }

    fn entries(pairs: &[(u32, u64)]) -> Vec<EpochEntry> {
        pairs
            .iter()
            .map(|&(epoch, start_offset)| EpochEntry {
                epoch,
                start_offset,
            })
            .collect()
    }

    async fn check(log: &MemoryLog, cache: &[(u32, u64)]) -> Vec<EpochEntry> {
        log.set_leader_epochs(entries(cache)).await.expect("set");
        let state = super::super::load_state(log).await.expect("state");
        checked(log, state, "t/0")
            .await
            .expect("checked")
            .leader_epochs
    }

    #[tokio::test]
    async fn a_cache_that_does_not_describe_the_batches_is_rebuilt_from_them() {
        let log = log().await;
        let truth = entries(&[(1, 0), (3, 6)]);
        // Lost, started late, or behind the last batch: rebuilt and
        // written back.
        for broken in [&[][..], &[(3, 6)], &[(1, 0)], &[(1, 0), (2, 6)]] {
            assert_eq!(check(&log, broken).await, truth, "{broken:?}");
            assert_eq!(log.leader_epochs().await.expect("epochs"), truth);
        }
        // A good one is left as it is, with a leader's epoch entered at
        // the log end and no batch yet; and such an entry survives a
        // rebuild.
        let led = entries(&[(1, 0), (3, 6), (4, 9)]);
        assert_eq!(check(&log, &[(1, 0), (3, 6), (4, 9)]).await, led);
        assert_eq!(check(&log, &[(4, 9)]).await, led);
        // Retention at or past the newest epoch's start: a right cache is
        // left alone (its start may no longer be read).
        let kept = MemoryLog::default();
        for (base, epoch) in [(0, 1), (3, 3), (6, 3)] {
            let r = vec![crate::batch::Record::default(); 3];
            let batch = crate::batch::encode(base, epoch, &r).expect("encode");
            kept.append(batch).await.expect("append");
        }
        for start in [3, 6] {
            kept.delete_prefix(start).await.expect("retention");
            assert_eq!(
                check(&kept, &[(1, 0), (3, 3)]).await,
                entries(&[(1, 0), (3, 3)]),
                "log start {start}"
            );
        }
        // An empty log has nothing to check.
        let empty = MemoryLog::default();
        assert_eq!(check(&empty, &[(2, 0)]).await, entries(&[(2, 0)]));
    }
}
