//! Storage: the batch-level [`PartitionLog`] contract (what the WIT
//! `partition-log` resource offers, as a Rust trait), its native in-process
//! implementation, and the message-level traits mirroring the reference
//! API (`StorageReader`, `StorageWriter`, `StorageAdapter`).

mod epoch_check;
mod error;
pub mod memory;
pub mod messages;

use std::future::Future;

use bytes::Bytes;

pub use error::{FaultKind, StorageError, StorageResult};

/// Log start (first readable offset) and log end (next offset to write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OffsetBounds {
    pub log_start: u64,
    pub log_end: u64,
}

/// Leader epoch `epoch` began at `start_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    pub epoch: u32,
    pub start_offset: u64,
}

/// What a log holds after opening or recovering: all a replica must re-read
/// before it acknowledges anything again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    pub bounds: OffsetBounds,
    /// The checkpointed high watermark as stored. It may be past the log
    /// end (a crash undid appends it counted): the replica caps it, and
    /// stores the capped one (`ReplicationManager::new`).
    pub high_watermark: u64,
    pub leader_epochs: Vec<EpochEntry>,
}

/// The log of one partition, at batch level. Batches are the opaque,
/// host-encoded bytes described in `wit/storage.wit` and [`crate::batch`].
///
/// Implemented by the wasm plugin host ([`crate::plugin::PluginLog`]) and by
/// the native [`memory::MemoryLog`]. Every method mirrors the WIT function
/// of the same name; see there for the exact contract.
///
/// Calls take effect in the order they are *made*, not awaited: a caller
/// may issue several appends and await them afterwards (pipelining).
pub trait PartitionLog: Send + Sync {
    /// Append one or more whole, contiguous, sealed batches starting at the
    /// log end. Returns the new log end. A batch whose CRC (or position
    /// check) fails is refused with [`StorageError::InvalidInput`] before
    /// anything is stored: taken, it would read back as damage at its
    /// offset.
    fn append(&self, batches: Bytes) -> impl Future<Output = StorageResult<u64>> + Send;
    /// Whole batches from the one holding `offset`, within `max_bytes`
    /// (at least one batch).
    fn read(
        &self,
        offset: u64,
        max_bytes: u32,
    ) -> impl Future<Output = StorageResult<Bytes>> + Send;
    fn bounds(&self) -> impl Future<Output = StorageResult<OffsetBounds>> + Send;
    /// Remove batches whose last offset is >= `offset`; returns the new end.
    fn truncate(&self, offset: u64) -> impl Future<Output = StorageResult<u64>> + Send;
    fn delete_prefix(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send;
    /// Empty the log and restart it at `offset`, below its start too (a
    /// follower whose log lies wholly past its leader's end); the epoch
    /// cache goes with it.
    fn reset(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send;
    fn high_watermark(&self) -> impl Future<Output = StorageResult<u64>> + Send;
    fn set_high_watermark(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send;
    fn leader_epochs(&self) -> impl Future<Output = StorageResult<Vec<EpochEntry>>> + Send;
    fn set_leader_epochs(
        &self,
        entries: Vec<EpochEntry>,
    ) -> impl Future<Output = StorageResult<()>> + Send;
    fn flush(&self) -> impl Future<Output = StorageResult<()>> + Send;
    /// After a [`StorageError::Fault`]: start a fresh instance, reopen the
    /// log and return what it now holds. Until this succeeds every other
    /// call fails with a fault.
    fn recover(&self) -> impl Future<Output = StorageResult<LogState>> + Send;
}

pub use epoch_check::checked as with_checked_epochs;

/// Read the state a replica needs on open: bounds, HW (as stored: the
/// replica caps it at the log end) and the epoch cache as the plugin keeps
/// it (see [`with_checked_epochs`]).
pub async fn load_state<L: PartitionLog>(log: &L) -> StorageResult<LogState> {
    let bounds = log.bounds().await?;
    let high_watermark = log.high_watermark().await?;
    let leader_epochs = log.leader_epochs().await?;
    Ok(LogState {
        bounds,
        high_watermark,
        leader_epochs,
    })
}

/// Refuse `batches` unless every batch's CRC and position check hold: what
/// both logs check before an append. A follower appends what its leader
/// read back (checked there), a leader what it just sealed; the check is
/// for callers of the library, whose bad batch would otherwise be stored
/// and then fault the partition at its first read. One CRC-32C pass
/// (hardware, on the host side of the plugin boundary).
pub(crate) fn check_sealed(batches: &[u8]) -> StorageResult<()> {
    for b in replicator_plugin_sdk::batches(batches, true) {
        if let Err(e) = b {
            return Err(StorageError::InvalidInput(format!(
                "append of a batch that is not sealed: {e}"
            )));
        }
    }
    Ok(())
}
