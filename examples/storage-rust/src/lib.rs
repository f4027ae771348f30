//! A minimal Replicator storage plugin: each partition's log lives in the
//! wasm instance's memory. Start here when writing your first backend.
//!
//! The host loads this component once and creates one *instance* per
//! partition; inside it, it calls `open` once and then the methods of the
//! returned `partition-log`, one call at a time. Nothing here survives the
//! instance: after a restart (or a trap, which makes the host drop the
//! instance) the replica starts empty and replication refills it. A real
//! backend would keep its data under `/data`, the only directory it sees.
//!
//! The contract is in `../../wit/storage.wit`; `docs/plugins.md` explains it.

use std::cell::RefCell;

use replicator_plugin_sdk::index::{self, AppendError, Entry, OffsetIndex};

// Generate Rust traits and types from the WIT. `Guest` and
// `GuestPartitionLog` below are what a storage plugin implements.
wit_bindgen::generate!({ world: "storage-plugin", path: "../../wit" });

use exports::replicator::plugin::storage::{EpochEntry, Guest, GuestPartitionLog, PartitionLog};
use replicator::plugin::host::{LogLevel, log};
use replicator::plugin::types::{OffsetBounds, PluginError};

/// The component's export: it names the type behind `partition-log`.
struct Plugin;

impl Guest for Plugin {
    type PartitionLog = MemoryLog;
}

/// One partition's log. The host calls it from one task, so a `RefCell` is
/// all the synchronisation needed (wasm instances are single-threaded).
struct MemoryLog(RefCell<State>);

struct State {
    /// The batches in offset order, with their byte copies. `OffsetIndex`
    /// (from the SDK) keeps log start / log end and finds batches by offset.
    batches: OffsetIndex<Vec<u8>>,
    /// Checkpoints the host stores through us and reads back after restart.
    high_watermark: u64,
    epochs: Vec<EpochEntry>,
}

impl State {
    fn bounds(&self) -> OffsetBounds {
        OffsetBounds {
            log_start: self.batches.log_start(),
            log_end: self.batches.log_end(),
        }
    }
}

impl GuestPartitionLog for MemoryLog {
    /// Called once per instance. Validate the configuration here: unknown
    /// keys are `invalid-input`, never silently ignored.
    fn open(
        topic: String,
        partition: u32,
        config: Vec<(String, String)>,
    ) -> Result<PartitionLog, PluginError> {
        if let Some((key, _)) = config.first() {
            return Err(PluginError::InvalidInput(format!(
                "unknown setting `{key}`"
            )));
        }
        log(
            LogLevel::Debug,
            &format!("opening an empty in-memory log for {topic}/{partition}"),
        );
        Ok(PartitionLog::new(MemoryLog(RefCell::new(State {
            batches: OffsetIndex::empty_at(0),
            high_watermark: 0,
            epochs: Vec::new(),
        }))))
    }

    /// `batch` holds one or more whole batches back to back. Check every
    /// header and that offsets continue at the log end, then keep them all,
    /// or nothing: a refused append must leave the log unchanged.
    fn append(&self, batch: Vec<u8>) -> Result<u64, PluginError> {
        let mut s = self.0.borrow_mut();
        let located = index::check_append(&batch, s.batches.log_end()).map_err(|e| match e {
            // Not at the log end: the host's view of the log is stale.
            AppendError::NotContiguous { .. } => PluginError::Conflict(e.to_string()),
            AppendError::Invalid(_) | AppendError::Empty => {
                PluginError::InvalidInput(e.to_string())
            }
        })?;
        for l in located {
            let h = l.header;
            s.batches.push(Entry {
                base: h.base_offset,
                next: h.next_offset(),
                leader_epoch: h.leader_epoch,
                len: h.batch_len,
                loc: batch[l.start..l.start + h.batch_len as usize].to_vec(),
            });
        }
        // The answer is the new log end; the host checks it.
        Ok(s.batches.log_end())
    }

    /// Whole batches from the one holding `offset`, up to `max_bytes` (but
    /// always at least one), returned byte for byte as they were appended:
    /// the host verifies their CRCs.
    fn read(&self, offset: u64, max_bytes: u32) -> Result<Vec<u8>, PluginError> {
        let s = self.0.borrow();
        let range = s
            .batches
            .read_range(offset, max_bytes)
            .map_err(|_| PluginError::OffsetOutOfRange(s.bounds()))?;
        let mut out = Vec::new();
        for i in range {
            if let Some(e) = s.batches.get(i) {
                out.extend_from_slice(&e.loc);
            }
        }
        Ok(out)
    }

    fn bounds(&self) -> OffsetBounds {
        self.0.borrow().bounds()
    }

    /// Drop every batch at or past `offset` (a follower cutting a divergent
    /// tail). Epoch entries past the new end go with them.
    fn truncate(&self, offset: u64) -> Result<u64, PluginError> {
        let mut s = self.0.borrow_mut();
        if offset < s.batches.log_start() || offset > s.batches.log_end() {
            return Err(PluginError::OffsetOutOfRange(s.bounds()));
        }
        s.batches.truncate(offset);
        let end = s.batches.log_end();
        index::truncate_epochs(&mut s.epochs, end, |e| e.start_offset);
        Ok(end)
    }

    /// Retention: move the log start up to `offset`.
    fn delete_prefix(&self, offset: u64) -> Result<(), PluginError> {
        self.0.borrow_mut().batches.delete_prefix(offset);
        Ok(())
    }

    /// Start over, empty, at `offset` (a follower whose log lies wholly
    /// past its leader's end); the epoch cache goes too.
    fn reset(&self, offset: u64) -> Result<(), PluginError> {
        let mut s = self.0.borrow_mut();
        s.batches = OffsetIndex::empty_at(offset);
        s.epochs.clear();
        Ok(())
    }

    fn high_watermark(&self) -> Result<u64, PluginError> {
        Ok(self.0.borrow().high_watermark)
    }

    fn set_high_watermark(&self, offset: u64) -> Result<(), PluginError> {
        self.0.borrow_mut().high_watermark = offset;
        Ok(())
    }

    fn leader_epochs(&self) -> Result<Vec<EpochEntry>, PluginError> {
        Ok(self.0.borrow().epochs.clone())
    }

    fn set_leader_epochs(&self, entries: Vec<EpochEntry>) -> Result<(), PluginError> {
        self.0.borrow_mut().epochs = entries;
        Ok(())
    }

    /// Memory is as durable as this plugin gets: nothing to do.
    fn flush(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

// Export `Plugin` as the component's implementation of the storage world.
export!(Plugin);
