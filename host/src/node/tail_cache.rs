//! The tail of one partition's log as it was handed to storage: the most
//! recent appends, kept in memory so that a leader answers follower
//! fetches for them without a storage call (Kafka serves them from the
//! page cache). A fetch reads what was appended moments ago, so a few MiB
//! cover it; anything older goes to the storage plugin as before.
//!
//! Why this is the storage's content: the core asks for a read only below
//! the log end the storage acknowledged, and every append passes through
//! here when it is issued, in order. A truncation, reset or storage fault
//! empties the cache, so nothing cut away or unconfirmed is ever served.
//!
//! Memory: only a leader's appends are kept (they are its own restamped
//! copies; a follower's are slices of whole fetch-response frames, which
//! caching would keep alive), at most [`TAIL_CACHE_BYTES`] per partition,
//! and all partitions of a node together stay within
//! [`NODE_TAIL_CACHE_BYTES`] beyond each one's newest append.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use replicator_plugin_sdk::batches;

use crate::core::Records;

/// Bytes of recent appends kept per partition (the newest append is kept
/// whatever its size).
pub const TAIL_CACHE_BYTES: usize = 8 << 20;

/// Bytes all tail caches of one node may keep together, beyond each one's
/// newest append: past this, every cache that grows evicts its oldest.
pub const NODE_TAIL_CACHE_BYTES: usize = 256 << 20;

/// A read spanning several appends answers with slices of those at least
/// this long and copies the shorter ones together. Each piece becomes a
/// chunk in quinn's send buffer, and below a few KiB a chunk costs more
/// than copying its bytes (measured: with every piece sliced, 1 KiB
/// producer messages went 5-10% slower; 64 KiB batches went 4-17% faster).
const SLICE_AT_LEAST: usize = 16 << 10;

struct Chunk {
    base: u64,
    next: u64,
    data: Bytes,
}

pub struct TailCache {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    cap: usize,
    /// Bytes held by every tail cache of the node, this one included.
    node: Arc<AtomicUsize>,
    node_cap: usize,
}

impl TailCache {
    pub fn new(cap: usize, node: Arc<AtomicUsize>, node_cap: usize) -> Self {
        TailCache {
            chunks: VecDeque::new(),
            bytes: 0,
            cap,
            node,
            node_cap,
        }
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
        self.node.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }

    /// An append of `data` (whole batches) was issued to storage. One
    /// that does not continue the cached tail starts the cache over.
    pub fn appended(&mut self, data: &Bytes) {
        let mut range: Option<(u64, u64)> = None;
        for b in batches(data, false) {
            match b {
                Ok((h, _)) => {
                    let base = range.map_or(h.base_offset, |(b, _)| b);
                    range = Some((base, h.next_offset()));
                }
                // Storage will refuse it too; serve nothing from here.
                Err(_) => return self.clear(),
            }
        }
        let Some((base, next)) = range else { return };
        if self.chunks.back().is_some_and(|c| c.next != base) {
            self.clear();
        }
        self.bytes += data.len();
        self.node.fetch_add(data.len(), Ordering::Relaxed);
        self.chunks.push_back(Chunk {
            base,
            next,
            data: data.clone(),
        });
        while (self.bytes > self.cap || self.node.load(Ordering::Relaxed) > self.node_cap)
            && self.chunks.len() > 1
        {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.data.len();
                self.node.fetch_sub(old.data.len(), Ordering::Relaxed);
            }
        }
    }

    /// What a storage read of `offset` with `max_bytes` would return, cut
    /// before `end`: whole batches from the one holding `offset`, at least
    /// one. `None` when the cache does not hold `offset`. A read within
    /// one append is a slice of it; one that spans several is answered
    /// with slices of the long parts and a copy of runs of short ones
    /// ([`SLICE_AT_LEAST`]), in order.
    pub fn read(&self, offset: u64, max_bytes: u32, end: u64) -> Option<Records> {
        let first = self.chunks.front()?;
        let last = self.chunks.back()?;
        if offset < first.base || offset >= last.next {
            return None;
        }
        let max_bytes = max_bytes as usize;
        let start = self.chunks.partition_point(|c| c.next <= offset);
        // (chunk, byte range) pieces, in order.
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        let mut taken = 0usize;
        'chunks: for (i, c) in self.chunks.iter().enumerate().skip(start) {
            let mut at = 0usize;
            for b in batches(&c.data, false) {
                let Ok((h, raw)) = b else { break 'chunks };
                let (from, to) = (at, at + raw.len());
                at = to;
                if h.next_offset() <= offset {
                    continue;
                }
                if h.base_offset >= end || (taken > 0 && taken + raw.len() > max_bytes) {
                    break 'chunks;
                }
                taken += raw.len();
                match pieces.last_mut() {
                    Some((pc, _, pto)) if *pc == i && *pto == from => *pto = to,
                    _ => pieces.push((i, from, to)),
                }
            }
        }
        let mut records = Records::default();
        if let [(i, from, to)] = pieces[..] {
            records.push(self.chunks[i].data.slice(from..to));
            return Some(records);
        }
        // Sized once: a run of short appends is copied exactly once.
        let short_len = pieces
            .iter()
            .map(|(_, from, to)| to - from)
            .filter(|&len| len < SLICE_AT_LEAST)
            .sum();
        let mut short = BytesMut::with_capacity(short_len);
        for (i, from, to) in pieces {
            let data = &self.chunks[i].data;
            if to - from < SLICE_AT_LEAST {
                short.extend_from_slice(&data[from..to]);
                continue;
            }
            records.push(short.split().freeze());
            records.push(data.slice(from..to));
        }
        records.push(short.freeze());
        Some(records)
    }
}

impl Drop for TailCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{self, Record};
    use crate::storage::PartitionLog;
    use crate::storage::memory::MemoryLog;

    fn batch_at(base: u64, records: usize, size: usize) -> Bytes {
        let recs: Vec<Record> = (0..records)
            .map(|i| Record {
                value: Bytes::from(vec![(base as usize + i) as u8; size]),
                ..Default::default()
            })
            .collect();
        batch::encode(base, 1, &recs).expect("encodes")
    }

    /// Whatever is asked, the cache answers exactly what the storage does
    /// (cut before `end`), or nothing. With records `scale` times larger:
    /// at 1 every append is shorter than [`SLICE_AT_LEAST`], at 100 most
    /// are longer.
    async fn check_against_storage(scale: usize) -> Outcome {
        let log = MemoryLog::new();
        let mut cache = TailCache::new(3000 * scale, Default::default(), usize::MAX);
        let mut next = 0u64;
        // Single batches and multi-batch appends of varied sizes.
        for (i, n) in [1usize, 3, 2, 1, 4, 1, 2].into_iter().enumerate() {
            let parts: Vec<Bytes> = (0..n)
                .map(|k| {
                    let b = batch_at(next, 1 + (i + k) % 3, (100 + 37 * k) * scale);
                    next += (1 + (i + k) % 3) as u64;
                    b
                })
                .collect();
            let data = Bytes::from(parts.concat());
            cache.appended(&data);
            log.append(data).await.expect("appends");
        }
        let mut seen = Outcome::default();
        for offset in 0..next + 2 {
            for max_bytes in [1, 150, 400, 1000, 1 << 20] {
                let max_bytes = (max_bytes * scale).min(u32::MAX as usize) as u32;
                for end in [offset, offset + 1, offset + 5, next] {
                    let Some(got) = cache.read(offset, max_bytes, end) else {
                        continue;
                    };
                    seen.served += 1;
                    seen.most_pieces = seen.most_pieces.max(got.pieces().len());
                    let want =
                        batch::before(&log.read(offset, max_bytes).await.expect("reads"), end);
                    assert_eq!(
                        got.into_contiguous(),
                        want,
                        "offset {offset} max {max_bytes} end {end}"
                    );
                }
            }
        }
        assert!(seen.served > 100, "the cache served only {seen:?}");
        // The oldest appends were evicted: those reads go to storage.
        assert!(cache.read(0, 1 << 30, next).is_none());
        assert!(cache.read(next - 1, 1 << 30, next).is_some());
        assert!(cache.read(next, 1 << 30, next + 1).is_none());
        seen
    }

    #[derive(Debug, Default)]
    struct Outcome {
        served: usize,
        most_pieces: usize,
    }

    #[tokio::test]
    async fn answers_exactly_as_the_storage_would() {
        // Short appends are copied together into one piece...
        assert_eq!(check_against_storage(1).await.most_pieces, 1);
        // ... long ones are sliced, not copied (a run of short ones
        // between them is one piece).
        assert!(check_against_storage(100).await.most_pieces >= 3);
    }

    #[test]
    fn a_gap_or_a_clear_starts_over() {
        let mut cache = TailCache::new(1 << 20, Default::default(), usize::MAX);
        cache.appended(&batch_at(0, 2, 10));
        cache.appended(&batch_at(2, 2, 10));
        assert!(cache.read(0, 1 << 20, 4).is_some());
        // Not contiguous (say, after a truncation it was not told of).
        cache.appended(&batch_at(10, 1, 10));
        assert!(cache.read(0, 1 << 20, 11).is_none());
        assert!(cache.read(10, 1 << 20, 11).is_some());
        cache.clear();
        assert!(cache.read(10, 1 << 20, 11).is_none());
        // Garbage is not cached.
        cache.appended(&Bytes::from_static(b"not a batch"));
        assert!(cache.read(0, 1 << 20, 1).is_none());
    }

    #[test]
    fn the_node_budget_holds_across_partitions() {
        let node = Arc::new(AtomicUsize::new(0));
        let one = batch_at(0, 1, 1000).len();
        let mut a = TailCache::new(1 << 20, node.clone(), 5 * one);
        let mut b = TailCache::new(1 << 20, node.clone(), 5 * one);
        for i in 0..10 {
            a.appended(&batch_at(i, 1, 1000));
            b.appended(&batch_at(i, 1, 1000));
            // Over the node's budget only by each cache's newest append.
            assert!(node.load(Ordering::Relaxed) <= 5 * one + 2 * one);
        }
        // Both still serve their newest append.
        assert!(a.read(9, 1 << 20, 10).is_some() && b.read(9, 1 << 20, 10).is_some());
        assert!(a.read(0, 1 << 20, 10).is_none());
        drop(a);
        b.clear();
        assert_eq!(
            node.load(Ordering::Relaxed),
            0,
            "dropped and cleared caches give back"
        );
    }
}
