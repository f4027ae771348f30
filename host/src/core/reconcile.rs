//! Log reconciliation (the reference API's `LogReconciliation`), done by
//! leader epoch as KIP-101/279/595 prescribe, never by comparing lengths:
//! where a follower's log diverges from its leader's, what a new leader
//! does (nothing: it never truncates), and a consistency check of a log.

use replicator_plugin_sdk::batches;

use super::epoch_cache::EpochCache;
use super::types::DivergingEpoch;

/// Where a follower must truncate, given the leader's answer to its last
/// fetched epoch: Kafka's `getOffsetTruncationState`.
///
/// If the follower has the leader's epoch, the logs agree up to where that
/// epoch ends on both sides; if not, up to where the follower's largest
/// epoch below it ends (another fetch then checks again). Never above the
/// follower's log end, never below its log start.
pub fn divergence_point(
    local: &EpochCache,
    local_leo: u64,
    log_start: u64,
    leader: DivergingEpoch,
) -> u64 {
    let target = match local.end_offset_for(leader.epoch, local_leo) {
        Some((e, end)) if e == leader.epoch => end.min(leader.end_offset),
        Some((_, end)) => end,
        None => log_start,
    };
    target.min(local_leo).max(log_start)
}

/// What a newly elected leader does to its log: nothing. Its log holds
/// everything committed (it was in the ISR); its uncommitted suffix is
/// either kept or truncated later by whoever leads next. The new epoch
/// starts at its log end, which is returned. (The reference package
/// truncated to the HW here, deleting committed data.)
pub fn reconcile_as_new_leader(local_leo: u64) -> u64 {
    local_leo
}

/// Why a log is not consistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistency {
    #[error("batch at byte {at} is malformed: {why}")]
    Malformed { at: usize, why: String },
    #[error("batch at offset {found} follows one ending at {expected}")]
    Gap { expected: u64, found: u64 },
    #[error("epoch {epoch} at offset {offset} after epoch {previous}")]
    EpochWentBack {
        offset: u64,
        epoch: u32,
        previous: u32,
    },
    #[error("the epoch cache says epoch {epoch} starts at {cached}, the log at {actual}")]
    CacheDisagrees {
        epoch: u32,
        cached: u64,
        actual: u64,
    },
}

/// Check a log's batches (back to back, as read from storage) against
/// itself and its epoch cache: CRCs, contiguous offsets, epochs that never
/// decrease, and every epoch starting where the cache says.
pub fn validate_consistency(log: &[u8], cache: &EpochCache) -> Result<(), Inconsistency> {
    let mut expected: Option<u64> = None;
    let mut previous: Option<u32> = None;
    let mut at = 0usize;
    for b in batches(log, true) {
        let (h, _) = b.map_err(|e| Inconsistency::Malformed {
            at,
            why: e.to_string(),
        })?;
        if let Some(e) = expected
            && h.base_offset != e
        {
            return Err(Inconsistency::Gap {
                expected: e,
                found: h.base_offset,
            });
        }
        if let Some(p) = previous
            && h.leader_epoch < p
        {
            return Err(Inconsistency::EpochWentBack {
                offset: h.base_offset,
                epoch: h.leader_epoch,
                previous: p,
            });
        }
        if previous != Some(h.leader_epoch)
            && let Some(entry) = cache.entries().iter().find(|e| e.epoch == h.leader_epoch)
            && entry.start_offset != h.base_offset
            && expected.is_some()
        {
            return Err(Inconsistency::CacheDisagrees {
                epoch: h.leader_epoch,
                cached: entry.start_offset,
                actual: h.base_offset,
            });
        }
        previous = Some(h.leader_epoch);
        expected = Some(h.next_offset());
        at += h.batch_len as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Record, encode};

    fn cache(entries: &[(u32, u64)]) -> EpochCache {
        let mut c = EpochCache::default();
        for (e, s) in entries {
            c.assign(*e, *s);
        }
        c
    }

    #[test]
    fn same_length_logs_can_diverge_and_epochs_find_it() {
        // Both logs end at 10 (the reference compared lengths and saw no
        // divergence); the follower's epoch 2 never existed on the leader.
        let follower = cache(&[(1, 0), (2, 6)]);
        let leader_answer = DivergingEpoch {
            epoch: 1,
            end_offset: 8,
        };
        assert_eq!(divergence_point(&follower, 10, 0, leader_answer), 6);
    }

    #[test]
    fn truncation_stops_at_the_smaller_end_of_a_shared_epoch() {
        let follower = cache(&[(1, 0), (3, 5)]);
        assert_eq!(
            divergence_point(
                &follower,
                12,
                0,
                DivergingEpoch {
                    epoch: 3,
                    end_offset: 9
                }
            ),
            9
        );
        assert_eq!(
            divergence_point(
                &follower,
                7,
                0,
                DivergingEpoch {
                    epoch: 3,
                    end_offset: 9
                }
            ),
            7
        );
        // No common epoch at all: from the log start.
        let young = cache(&[(5, 3)]);
        assert_eq!(
            divergence_point(
                &young,
                9,
                3,
                DivergingEpoch {
                    epoch: 2,
                    end_offset: 4
                }
            ),
            3
        );
    }

    #[test]
    fn a_new_leader_keeps_its_log() {
        assert_eq!(reconcile_as_new_leader(42), 42);
    }

    #[test]
    fn consistency_check_finds_gaps_and_epoch_regressions() {
        let r = [Record::default()];
        let mut log = encode(0, 1, &r).unwrap().to_vec();
        log.extend_from_slice(&encode(1, 2, &r).unwrap());
        assert_eq!(
            validate_consistency(&log, &cache(&[(1, 0), (2, 1)])),
            Ok(())
        );
        assert!(matches!(
            validate_consistency(&log, &cache(&[(1, 0), (2, 5)])),
            Err(Inconsistency::CacheDisagrees { .. })
        ));
        let mut gap = log.clone();
        gap.extend_from_slice(&encode(5, 2, &r).unwrap());
        assert!(matches!(
            validate_consistency(&gap, &EpochCache::default()),
            Err(Inconsistency::Gap { .. })
        ));
        let mut back = log.clone();
        back.extend_from_slice(&encode(2, 1, &r).unwrap());
        assert!(matches!(
            validate_consistency(&back, &EpochCache::default()),
            Err(Inconsistency::EpochWentBack { .. })
        ));
    }
}
