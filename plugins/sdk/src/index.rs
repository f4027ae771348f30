//! Offset bookkeeping every storage plugin needs: which stored batch holds
//! an offset, what a truncation or prefix delete removes, and whether an
//! append is well-formed and contiguous. Plugins keep their bytes where
//! they like; this keeps the offsets right.

use std::collections::VecDeque;

use crate::{BatchHeader, HeaderError, batches};

/// An offset outside the log's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange;

/// Where one batch lives, as the plugin chooses to describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<L> {
    pub base: u64,
    pub next: u64,
    pub leader_epoch: u32,
    pub len: u32,
    pub loc: L,
}

/// Batches of one log in offset order.
#[derive(Debug, Clone)]
pub struct OffsetIndex<L> {
    entries: VecDeque<Entry<L>>,
    log_start: u64,
    log_end: u64,
}

impl<L> OffsetIndex<L> {
    /// An empty log whose next offset is `log_end` (and starts there).
    pub fn empty_at(log_end: u64) -> Self {
        OffsetIndex {
            entries: VecDeque::new(),
            log_start: log_end,
            log_end,
        }
    }

    pub fn log_start(&self) -> u64 {
        self.log_start
    }

    pub fn log_end(&self) -> u64 {
        self.log_end
    }

    pub fn entries(&self) -> impl ExactSizeIterator<Item = &Entry<L>> + DoubleEndedIterator {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record an appended batch; `entry.base` must be the log end.
    pub fn push(&mut self, entry: Entry<L>) {
        debug_assert_eq!(entry.base, self.log_end);
        if self.entries.is_empty() && self.log_start == self.log_end {
            self.log_start = entry.base;
        }
        self.log_end = entry.next;
        self.entries.push_back(entry);
    }

    /// Where each batch lives, oldest first, to rewrite locations (a
    /// buffer uploaded as an object, say); offsets cannot change here.
    pub fn locs_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut L> {
        self.entries.iter_mut().map(|e| &mut e.loc)
    }

    /// Position of the batch that holds `offset`.
    pub fn find(&self, offset: u64) -> Option<usize> {
        let i = self.entries.partition_point(|e| e.next <= offset);
        match self.entries.get(i) {
            Some(e) if e.base <= offset => Some(i),
            _ => None,
        }
    }

    pub fn get(&self, i: usize) -> Option<&Entry<L>> {
        self.entries.get(i)
    }

    /// The batches a read at `offset` with `max_bytes` returns: from the one
    /// holding `offset`, while the total stays within `max_bytes`, but
    /// always at least one. `Err` when `offset` is outside the bounds.
    pub fn read_range(
        &self,
        offset: u64,
        max_bytes: u32,
    ) -> Result<std::ops::Range<usize>, OutOfRange> {
        if offset < self.log_start || offset > self.log_end {
            return Err(OutOfRange);
        }
        if offset == self.log_end {
            return Ok(0..0);
        }
        let first = self.find(offset).ok_or(OutOfRange)?;
        let mut total = 0u64;
        let mut last = first;
        for (i, e) in self.entries.iter().enumerate().skip(first) {
            total += u64::from(e.len);
            if i > first && total > u64::from(max_bytes) {
                break;
            }
            last = i + 1;
        }
        Ok(first..last)
    }

    /// Drop every batch whose last offset is >= `offset`; returns the
    /// removed entries (oldest first). The new log end is the base of the
    /// first removed batch, so it is <= `offset`.
    pub fn truncate(&mut self, offset: u64) -> Vec<Entry<L>> {
        let keep = self.entries.partition_point(|e| e.next <= offset);
        let removed: Vec<_> = self.entries.drain(keep..).collect();
        if let Some(first) = removed.first() {
            self.log_end = first.base;
            if self.log_start > self.log_end {
                self.log_start = self.log_end;
            }
        } else if offset < self.log_end {
            // Only reachable when `offset` lies below every stored batch.
            self.log_end = offset.max(self.log_start);
        }
        removed
    }

    /// Move the log start to `offset` and return the batches that now lie
    /// wholly below it. Past the log end the log is emptied and restarts at
    /// `offset` (a follower resetting to its leader's log start).
    pub fn delete_prefix(&mut self, offset: u64) -> Vec<Entry<L>> {
        let cut = self.entries.partition_point(|e| e.next <= offset);
        let removed: Vec<_> = self.entries.drain(..cut).collect();
        self.log_start = self.log_start.max(offset);
        self.log_end = self.log_end.max(offset);
        removed
    }

    /// Restore a log start recorded earlier (never below the first batch).
    pub fn set_log_start(&mut self, offset: u64) {
        self.log_start = offset.min(self.log_end);
    }
}

/// Why an append was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// The bytes are not whole, well-formed batches.
    Invalid(HeaderError),
    /// The data is empty.
    Empty,
    /// A batch does not start where the previous one (or the log) ends.
    NotContiguous { expected: u64, found: u64 },
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Invalid(e) => write!(f, "invalid batch: {e}"),
            AppendError::Empty => write!(f, "append of zero bytes"),
            AppendError::NotContiguous { expected, found } => write!(
                f,
                "batch base offset {found} is not the log end offset {expected}"
            ),
        }
    }
}

/// One batch inside the bytes of an append: its header and byte range.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    pub header: BatchHeader,
    pub start: usize,
}

/// Check the bytes of an append (one or more batches back to back) against
/// the log end: framing of every batch, contiguous offsets. CRCs are left
/// to the host, which computed them and checks them on every read.
pub fn check_append(bytes: &[u8], log_end: u64) -> Result<Vec<Located>, AppendError> {
    if bytes.is_empty() {
        return Err(AppendError::Empty);
    }
    let mut out = Vec::new();
    let mut expected = log_end;
    let mut start = 0usize;
    for b in batches(bytes, false) {
        let (header, _) = b.map_err(AppendError::Invalid)?;
        if header.base_offset != expected {
            return Err(AppendError::NotContiguous {
                expected,
                found: header.base_offset,
            });
        }
        expected = header.next_offset();
        out.push(Located { header, start });
        start += header.batch_len as usize;
    }
    Ok(out)
}

/// Remove the leader-epoch entries that start at or after `log_end`.
pub fn truncate_epochs<E>(entries: &mut Vec<E>, log_end: u64, start_of: impl Fn(&E) -> u64) {
    entries.retain(|e| start_of(e) < log_end);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(base: u64, n: u64) -> Entry<()> {
        Entry {
            base,
            next: base + n,
            leader_epoch: 0,
            len: 100,
            loc: (),
        }
    }

    fn index() -> OffsetIndex<()> {
        let mut ix = OffsetIndex::empty_at(0);
        ix.push(entry(0, 3));
        ix.push(entry(3, 2));
        ix.push(entry(5, 5));
        ix
    }

    #[test]
    fn find_and_read_range() {
        let ix = index();
        assert_eq!(ix.find(0), Some(0));
        assert_eq!(ix.find(4), Some(1));
        assert_eq!(ix.find(9), Some(2));
        assert_eq!(ix.find(10), None);
        assert_eq!(ix.read_range(4, 150), Ok(1..2));
        assert_eq!(
            ix.read_range(4, 10),
            Ok(1..2),
            "first batch always returned"
        );
        assert_eq!(ix.read_range(0, 300), Ok(0..3));
        assert_eq!(ix.read_range(10, 300), Ok(0..0));
        assert_eq!(ix.read_range(11, 300), Err(OutOfRange));
    }

    #[test]
    fn truncate_mid_batch_removes_whole_batch() {
        let mut ix = index();
        let removed = ix.truncate(4);
        assert_eq!(removed.len(), 2);
        assert_eq!(ix.log_end(), 3);
        let mut ix = index();
        assert!(ix.truncate(10).is_empty());
        assert_eq!(ix.log_end(), 10);
    }

    #[test]
    fn prefix_delete_moves_start() {
        let mut ix = index();
        assert_eq!(ix.delete_prefix(4).len(), 1);
        assert_eq!(ix.log_start(), 4);
        assert_eq!(ix.read_range(3, 100), Err(OutOfRange));
        assert_eq!(ix.read_range(4, 100), Ok(0..1));
        assert_eq!(ix.delete_prefix(20).len(), 2);
        assert_eq!((ix.log_start(), ix.log_end()), (20, 20));
        assert!(ix.is_empty());
    }
}
