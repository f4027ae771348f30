//! The message-level storage traits of the reference API
//! (`StorageReader`, `StorageWriter`, `StorageAdapter`, `StorageMessage`),
//! implemented once over any batch-level [`PartitionLog`] by
//! [`MessageLog`]. Handles are per partition, so the reference API's
//! `partition` arguments are gone.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;

use super::{PartitionLog, StorageError, StorageResult};
use crate::batch::{self, Record};

/// A message with its offset, as the reference API's `StorageMessage`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageMessage {
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Nanoseconds since the Unix epoch.
    pub timestamp: i64,
    pub headers: Vec<(String, Bytes)>,
}

/// Reads the reference API's replicator needs.
pub trait StorageReader: Send + Sync {
    /// Messages with offsets in `start..end` (`end` capped at the log end).
    fn read_range(
        &self,
        start: u64,
        end: u64,
    ) -> impl Future<Output = StorageResult<Vec<StorageMessage>>> + Send;
    /// The next offset to be written.
    fn log_end_offset(&self) -> impl Future<Output = StorageResult<u64>> + Send;
    /// The checkpointed high watermark, capped at the log end.
    fn high_watermark(&self) -> impl Future<Output = StorageResult<u64>> + Send;
}

/// Writes a follower needs. `log_end_offset` comes from [`StorageReader`].
pub trait StorageWriter: Send + Sync {
    /// Append messages whose offsets continue the log exactly (the first is
    /// the log end, each next one +1), as one batch.
    fn append_messages(
        &self,
        messages: &[StorageMessage],
    ) -> impl Future<Output = StorageResult<()>> + Send;
    fn set_high_watermark(&self, hw: u64) -> impl Future<Output = StorageResult<()>> + Send;
    /// Remove every message at or after `offset` (whole batches).
    fn truncate(&self, offset: u64) -> impl Future<Output = StorageResult<u64>> + Send;
}

/// Both halves, as the reference API's `StorageAdapter`.
pub trait StorageAdapter: StorageReader + StorageWriter {}
impl<T: StorageReader + StorageWriter> StorageAdapter for T {}

/// How much one plugin read asks for while serving `read_range`.
const READ_CHUNK: u32 = 1024 * 1024;

/// Message-level view of a [`PartitionLog`]; appended batches carry the
/// leader epoch set with [`MessageLog::set_leader_epoch`].
pub struct MessageLog<L> {
    log: L,
    epoch: AtomicU32,
}

impl<L: PartitionLog> MessageLog<L> {
    pub fn new(log: L, leader_epoch: u32) -> Self {
        MessageLog {
            log,
            epoch: AtomicU32::new(leader_epoch),
        }
    }

    pub fn set_leader_epoch(&self, epoch: u32) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    pub fn inner(&self) -> &L {
        &self.log
    }
}

impl<L: PartitionLog> StorageReader for MessageLog<L> {
    async fn read_range(&self, start: u64, end: u64) -> StorageResult<Vec<StorageMessage>> {
        let end = end.min(self.log.bounds().await?.log_end);
        let mut out = Vec::new();
        let mut next = start;
        while next < end {
            let bytes = self.log.read(next, READ_CHUNK).await?;
            let records =
                batch::decode(&bytes).map_err(|e| StorageError::Corrupt(e.to_string()))?;
            let before = next;
            for r in records {
                if r.offset >= next && r.offset < end {
                    next = r.offset + 1;
                    out.push(StorageMessage {
                        offset: r.offset,
                        key: r.record.key,
                        value: r.record.value,
                        timestamp: r.record.timestamp,
                        headers: r.record.headers,
                    });
                }
            }
            if next == before {
                return Err(StorageError::Corrupt(format!(
                    "read at offset {next} made no progress"
                )));
            }
        }
        Ok(out)
    }

    async fn log_end_offset(&self) -> StorageResult<u64> {
        Ok(self.log.bounds().await?.log_end)
    }

    async fn high_watermark(&self) -> StorageResult<u64> {
        let hw = self.log.high_watermark().await?;
        Ok(hw.min(self.log.bounds().await?.log_end))
    }
}

impl<L: PartitionLog> StorageWriter for MessageLog<L> {
    async fn append_messages(&self, messages: &[StorageMessage]) -> StorageResult<()> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        if let Some((i, m)) = messages
            .iter()
            .enumerate()
            .find(|(i, m)| first.offset.checked_add(*i as u64) != Some(m.offset))
        {
            return Err(StorageError::InvalidInput(format!(
                "message {i} has offset {}, expected {} + {i}",
                m.offset, first.offset
            )));
        }
        let records: Vec<Record> = messages
            .iter()
            .map(|m| Record {
                key: m.key.clone(),
                value: m.value.clone(),
                timestamp: m.timestamp,
                headers: m.headers.clone(),
            })
            .collect();
        let bytes = batch::encode(first.offset, self.epoch.load(Ordering::Relaxed), &records)
            .map_err(|e| StorageError::InvalidInput(e.to_string()))?;
        self.log.append(bytes).await.map(|_| ())
    }

    async fn set_high_watermark(&self, hw: u64) -> StorageResult<()> {
        self.log.set_high_watermark(hw).await
    }

    async fn truncate(&self, offset: u64) -> StorageResult<u64> {
        self.log.truncate(offset).await
    }
}
