//! Size-based retention (Kafka's `retention.bytes`): how far a replica may
//! move its log start. The replica records each append as it hands it to
//! the storage; this index groups appends into segments and names the
//! newest segment end that may go while what stays is still at least the
//! limit. Like Kafka, only whole segments go and only below the high
//! watermark, so nothing uncommitted is ever deleted; every replica
//! applies it to its own log.

use std::collections::VecDeque;

/// Appends are grouped into segments of about 1/16 of the limit, so a log
/// holds between the limit and a sixteenth more, and the storage sees
/// one deletion per sixteenth of the limit written, not one per append.
const SEGMENTS_PER_LIMIT: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    /// Offset after its last batch.
    end: u64,
    /// Bytes of its batches; 0 when unknown (what the storage held when
    /// the replica started, or what a truncation left of a segment).
    bytes: u64,
    /// Whether `bytes` counts the whole segment (appends may join it).
    known: bool,
}

/// The segments of a log, oldest first.
#[derive(Debug, Clone, Default)]
pub struct RetentionIndex {
    start: u64,
    segments: VecDeque<Segment>,
    /// Sum of the segments' known bytes.
    total: u64,
}

impl RetentionIndex {
    /// A log holding `[log_start, log_end)` of unknown size. Counted as
    /// nothing, it goes as a whole once newer appends alone reach the
    /// limit.
    pub fn new(log_start: u64, log_end: u64) -> Self {
        let mut segments = VecDeque::new();
        if log_end > log_start {
            segments.push_back(Segment {
                end: log_end,
                bytes: 0,
                known: false,
            });
        }
        RetentionIndex {
            start: log_start,
            segments,
            total: 0,
        }
    }

    /// Bytes counted: what the log holds past its oldest unknown part.
    pub fn known_bytes(&self) -> u64 {
        self.total
    }

    /// How many segments the log is counted in.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Batches of `bytes` bytes were handed to the storage, ending at `end`.
    pub fn appended(&mut self, end: u64, bytes: u64, limit: Option<u64>) {
        let segment = limit.map_or(u64::MAX, |l| (l / SEGMENTS_PER_LIMIT).max(1));
        self.total += bytes;
        match self.segments.back_mut() {
            Some(last) if last.known && last.bytes < segment => {
                last.end = end;
                last.bytes += bytes;
            }
            _ => self.segments.push_back(Segment {
                end,
                bytes,
                known: true,
            }),
        }
    }

    /// The log now ends at `offset` (a truncation). The segment it cuts
    /// keeps its start and an unknown size: counting less than the log
    /// holds only ever keeps more.
    pub fn truncated(&mut self, offset: u64) {
        while let Some(last) = self.segments.back().copied() {
            let start = self.segment_start(self.segments.len() - 1);
            if start >= offset {
                self.total -= last.bytes;
                self.segments.pop_back();
                continue;
            }
            if last.end > offset
                && let Some(l) = self.segments.back_mut()
            {
                self.total -= l.bytes;
                *l = Segment {
                    end: offset,
                    bytes: 0,
                    known: false,
                };
            }
            break;
        }
    }

    /// The log was emptied to restart at `offset`.
    pub fn reset(&mut self, offset: u64) {
        *self = RetentionIndex::new(offset, offset);
    }

    /// The newest segment end the log start may move to: segments end at
    /// or below `upto` (the high watermark), and the bytes after it are
    /// still at least `limit`. `None` when nothing may go.
    pub fn deletable(&self, limit: u64, upto: u64) -> Option<u64> {
        let mut after = self.total;
        let mut to = None;
        for s in &self.segments {
            if s.end > upto {
                break;
            }
            after -= s.bytes;
            if after < limit {
                break;
            }
            to = Some(s.end);
        }
        to
    }

    /// The log start moved to `offset` (a segment end from `deletable`).
    pub fn deleted(&mut self, offset: u64) {
        while let Some(first) = self.segments.front().copied() {
            if first.end > offset {
                break;
            }
            self.total -= first.bytes;
            self.segments.pop_front();
        }
        self.start = self.start.max(offset);
    }

    fn segment_start(&self, i: usize) -> u64 {
        if i == 0 {
            self.start
        } else {
            self.segments[i - 1].end
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Appends of `size` bytes, one offset each, from `from`.
    fn fill(ix: &mut RetentionIndex, from: u64, n: u64, size: u64, limit: u64) {
        for o in from..from + n {
            ix.appended(o + 1, size, Some(limit));
        }
    }

    #[test]
    fn keeps_at_least_the_limit_and_at_most_a_segment_more() {
        let limit = 16 * MIB;
        let mut ix = RetentionIndex::new(0, 0);
        fill(&mut ix, 0, 1000, 64 << 10, limit); // 62.5 MiB
        let to = ix.deletable(limit, 1000).expect("far over the limit");
        ix.deleted(to);
        let kept = ix.known_bytes();
        assert!(kept >= limit, "kept {kept}");
        assert!(kept <= limit + limit / SEGMENTS_PER_LIMIT, "kept {kept}");
        // 64 KiB appends of one offset each: what stays is 64 KiB per offset.
        assert_eq!((1000 - to) * (64 << 10), kept);
        assert_eq!(ix.deletable(limit, 1000), None, "nothing more may go");
    }

    #[test]
    fn never_past_the_high_watermark() {
        let limit = MIB;
        let mut ix = RetentionIndex::new(0, 0);
        fill(&mut ix, 0, 100, 64 << 10, limit);
        // Everything is over the limit, but only offsets below 10 are
        // committed.
        let to = ix.deletable(limit, 10).expect("the first segments");
        assert!(to <= 10, "{to}");
        assert_eq!(ix.deletable(limit, 0), None);
    }

    #[test]
    fn a_recovered_log_goes_once_newer_data_reaches_the_limit() {
        let limit = MIB;
        let mut ix = RetentionIndex::new(5, 500);
        fill(&mut ix, 500, 15, 64 << 10, limit); // 960 KiB: under the limit
        assert_eq!(ix.deletable(limit, 515), None);
        fill(&mut ix, 515, 1, 64 << 10, limit); // now exactly 1 MiB
        assert_eq!(ix.deletable(limit, 516), Some(500));
    }

    #[test]
    fn truncation_and_reset_cut_the_count() {
        let limit = MIB;
        let mut ix = RetentionIndex::new(0, 0);
        fill(&mut ix, 0, 40, 64 << 10, limit); // 40 appends, 64 KiB segments
        ix.truncated(30);
        assert_eq!(ix.known_bytes(), 30 * (64 << 10));
        assert_eq!(ix.segments(), 30);
        // Cut inside a joined segment: its size becomes unknown.
        let mut joined = RetentionIndex::new(0, 0);
        fill(&mut joined, 0, 40, 1 << 10, limit);
        let before = joined.segments();
        joined.truncated(30);
        assert!(joined.known_bytes() < 30 << 10);
        assert!(joined.segments() <= before);
        // Truncating to the start empties it.
        joined.truncated(0);
        assert_eq!((joined.known_bytes(), joined.segments()), (0, 0));
        ix.reset(1000);
        assert_eq!((ix.known_bytes(), ix.segments()), (0, 0));
        fill(&mut ix, 1000, 17, 64 << 10, limit);
        assert_eq!(ix.deletable(limit, 2000), Some(1001));
    }

    #[test]
    fn without_a_limit_appends_join_one_segment() {
        let mut ix = RetentionIndex::new(0, 0);
        for o in 0..1000 {
            ix.appended(o + 1, 1 << 20, None);
        }
        assert_eq!(ix.segments(), 1);
    }
}
