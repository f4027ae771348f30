//! A simulated partition log: batches in memory, checkpoints kept as the
//! driver persists them. `flushed` batches are on disk: a process crash
//! keeps everything (the page cache survives), a machine crash keeps only
//! the flushed prefix. Truncations are durable at once, as the file plugin
//! makes them.

use bytes::{Bytes, BytesMut};
use replicator::core::ReadSpec;
use replicator::storage::{EpochEntry, LogState, OffsetBounds};
use replicator_plugin_sdk::batches;

#[derive(Default, Clone)]
pub struct SimLog {
    /// (base, next, leader epoch, bytes)
    pub batches: Vec<(u64, u64, u32, Bytes)>,
    pub log_start: u64,
    pub hw_checkpoint: u64,
    pub epochs: Vec<EpochEntry>,
    /// How many batches are on disk.
    pub flushed: usize,
}

impl SimLog {
    pub fn log_end(&self) -> u64 {
        self.batches.last().map_or(self.log_start, |b| b.1)
    }

    /// Append whole batches; an append that does not continue the log is
    /// refused (as every storage plugin does) and reported.
    pub fn append(&mut self, bytes: &Bytes) -> Result<u64, String> {
        let mut at = 0usize;
        for b in batches(bytes, true) {
            let (h, _) = b.map_err(|e| format!("the core appended a bad batch: {e}"))?;
            if h.base_offset != self.log_end() {
                return Err(format!(
                    "the core appended at {} to a log ending at {}",
                    h.base_offset,
                    self.log_end()
                ));
            }
            let len = h.batch_len as usize;
            self.batches.push((
                h.base_offset,
                h.next_offset(),
                h.leader_epoch,
                bytes.slice(at..at + len),
            ));
            at += len;
        }
        Ok(self.log_end())
    }

    /// Remove batches whose last offset is >= `offset`.
    pub fn truncate(&mut self, offset: u64) -> u64 {
        // A plugin refuses it (`offset-out-of-range`), and the node then
        // faults the partition: the core must never ask.
        assert!(
            offset >= self.log_start,
            "truncation to {offset}, below the log start {}",
            self.log_start
        );
        self.batches.retain(|b| b.1 <= offset);
        self.flushed = self.flushed.min(self.batches.len());
        self.log_end()
    }

    pub fn reset(&mut self, offset: u64) {
        self.batches.clear();
        self.flushed = 0;
        self.log_start = offset;
    }

    /// Retention: drop the batches below `offset`, the new log start.
    /// Durable at once, as the file plugin's start checkpoint is.
    pub fn delete_prefix(&mut self, offset: u64) {
        let gone = self.batches.partition_point(|b| b.1 <= offset);
        self.batches.drain(..gone);
        self.flushed = self.flushed.saturating_sub(gone);
        self.log_start = self.log_start.max(offset);
    }

    pub fn flush(&mut self) {
        self.flushed = self.batches.len();
    }

    /// A machine crash: what was not flushed is gone. Returns how many
    /// batches were lost.
    pub fn lose_unflushed(&mut self) -> usize {
        let lost = self.batches.len() - self.flushed;
        self.batches.truncate(self.flushed);
        lost
    }

    pub fn read(&self, spec: &ReadSpec) -> Bytes {
        let mut out = BytesMut::new();
        for (base, next, _, b) in &self.batches {
            if *next <= spec.offset || *base >= spec.end {
                continue;
            }
            if !out.is_empty() && out.len() + b.len() > spec.max_bytes as usize {
                break;
            }
            out.extend_from_slice(b);
        }
        out.freeze()
    }

    pub fn state(&self) -> LogState {
        LogState {
            bounds: OffsetBounds {
                log_start: self.log_start,
                log_end: self.log_end(),
            },
            high_watermark: self.hw_checkpoint.min(self.log_end()),
            leader_epochs: self.epochs.clone(),
        }
    }

    /// (epoch, crc) of the batch holding `offset`, for comparisons.
    pub fn entry_at(&self, offset: u64) -> Option<(u32, u32)> {
        let i = self.batches.partition_point(|b| b.1 <= offset);
        self.batches
            .get(i)
            .filter(|b| b.0 <= offset)
            .map(|b| (b.2, replicator_plugin_sdk::read_u32_le(&b.3, 12)))
    }
}
