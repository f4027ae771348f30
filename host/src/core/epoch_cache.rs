//! The leader-epoch cache (KIP-101/279): which epoch started at which
//! offset, and the end offset of any epoch as a leader answers it.

use crate::storage::EpochEntry;

/// Epoch → start offset, strictly increasing in both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    pub fn from_entries(entries: Vec<EpochEntry>) -> Self {
        EpochCache { entries }
    }

    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The newest epoch in the log, if any.
    pub fn latest(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    /// The epoch of the newest batch below `log_end`: the newest entry
    /// that starts there. A leader enters its epoch at the log end before
    /// it writes anything, so the latest entry may hold no batch yet.
    pub fn last_written(&self, log_end: u64) -> Option<u32> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.start_offset < log_end)
            .map(|e| e.epoch)
    }

    /// Record that `epoch` starts at `offset` (a batch of a newer epoch was
    /// appended there). Returns whether the cache changed. An older or equal
    /// epoch is ignored: epochs never decrease along a log.
    pub fn assign(&mut self, epoch: u32, offset: u64) -> bool {
        match self.entries.last() {
            Some(last) if epoch <= last.epoch => false,
            _ => {
                // A newer epoch cannot start before an older one ended:
                // drop entries that start at or past `offset` (stale).
                self.entries.retain(|e| e.start_offset < offset);
                self.entries.push(EpochEntry {
                    epoch,
                    start_offset: offset,
                });
                true
            }
        }
    }

    /// KIP-279: for a requested epoch, the largest epoch <= it that this log
    /// knows and the offset where that epoch ends (the start of the next
    /// epoch, or `log_end` for the newest). For an epoch older than every
    /// one the cache holds, that epoch itself, ending where the oldest
    /// known one starts (Kafka's `LeaderEpochFileCache.endOffsetFor`): the
    /// cache says nothing of the offsets below, and a requester holding
    /// them keeps them. `None` only for an empty cache.
    ///
    /// Why not "truncate to your start" for an older epoch: a leader
    /// whose cache lost its early entries (a checkpoint file gone, the
    /// batches still there) then told every follower to throw away its
    /// whole log, committed records included, and the ISR kept them.
    pub fn end_offset_for(&self, epoch: u32, log_end: u64) -> Option<(u32, u64)> {
        let i = self.entries.partition_point(|e| e.epoch <= epoch);
        if i == 0 {
            return self
                .entries
                .first()
                .map(|first| (epoch, first.start_offset));
        }
        let found = self.entries[i - 1];
        let end = self
            .entries
            .get(i)
            .map_or(log_end, |next| next.start_offset);
        Some((found.epoch, end))
    }

    /// Drop entries that start at or after `log_end` (after a truncation).
    /// Returns whether the cache changed.
    pub fn truncate_to(&mut self, log_end: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < log_end);
        self.entries.len() != before
    }

    /// Drop entries of `epoch` and later: an empty log is about to take
    /// batches of `epoch`, and what it remembers of later epochs describes
    /// no batch it holds (Kafka's cache drops such conflicting entries).
    /// Returns whether the cache changed.
    pub fn truncate_from_epoch(&mut self, epoch: u32) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.epoch < epoch);
        self.entries.len() != before
    }

    /// Forget everything (the log was reset to start at a new offset).
    pub fn clear(&mut self) -> bool {
        let changed = !self.entries.is_empty();
        self.entries.clear();
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> EpochCache {
        let mut c = EpochCache::default();
        c.assign(1, 0);
        c.assign(3, 10);
        c.assign(4, 25);
        c
    }

    #[test]
    fn the_last_written_epoch_is_the_newest_with_batches() {
        let mut c = cache();
        assert_eq!(c.last_written(30), Some(4));
        // Epoch 5 entered at the log end, nothing written in it yet.
        c.assign(5, 30);
        assert_eq!(c.last_written(30), Some(4));
        assert_eq!(c.last_written(31), Some(5));
        assert_eq!(c.last_written(0), None);
        assert_eq!(EpochCache::default().last_written(10), None);
    }

    #[test]
    fn end_offsets_follow_kip_279() {
        let c = cache();
        assert_eq!(c.end_offset_for(1, 40), Some((1, 10)));
        assert_eq!(
            c.end_offset_for(2, 40),
            Some((1, 10)),
            "unknown epoch: the largest below"
        );
        assert_eq!(c.end_offset_for(3, 40), Some((3, 25)));
        assert_eq!(c.end_offset_for(4, 40), Some((4, 40)));
        assert_eq!(c.end_offset_for(9, 40), Some((4, 40)));
        // Older than every known epoch: it ends where the oldest starts.
        assert_eq!(c.end_offset_for(0, 40), Some((0, 0)));
        let mut late = EpochCache::default();
        late.assign(3, 20);
        assert_eq!(late.end_offset_for(1, 40), Some((1, 20)));
        assert_eq!(EpochCache::default().end_offset_for(1, 40), None);
    }

    #[test]
    fn assign_ignores_older_epochs_and_truncate_drops_suffix() {
        let mut c = cache();
        assert!(!c.assign(2, 30));
        assert!(!c.assign(4, 30));
        assert!(c.truncate_to(25));
        assert_eq!(c.latest().map(|e| e.epoch), Some(3));
        assert!(
            c.assign(5, 20),
            "a new epoch at a lower offset after truncation"
        );
        assert_eq!(c.end_offset_for(3, 22), Some((3, 20)));
    }
}
