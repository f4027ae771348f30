//! Storage plugin that keeps one partition's log in the wasm instance's own
//! memory. Nothing survives the instance: a restart or a trap starts the
//! replica empty, and replication refills it. It is the plugin-boundary
//! baseline in the benchmarks and the simplest complete storage backend.

use std::cell::RefCell;
use std::rc::Rc;

use replicator_plugin_sdk::index::{self, AppendError, Entry, OffsetIndex};

wit_bindgen::generate!({ world: "storage-plugin", path: "../../wit" });

use exports::replicator::plugin::storage::{EpochEntry, Guest, GuestPartitionLog, PartitionLog};
use replicator::plugin::types::{OffsetBounds, PluginError};

struct Plugin;

impl Guest for Plugin {
    type PartitionLog = MemoryLog;
}

/// Where a batch lives: the append it came in (kept whole, as the host
/// wrote it into this instance's memory) and its byte offset there. An
/// append of many batches (a group commit, a follower's fetch) is stored
/// without copying; its buffer is freed with the last of its batches.
type Loc = (Rc<Vec<u8>>, usize);

struct State {
    index: OffsetIndex<Loc>,
    high_watermark: u64,
    epochs: Vec<EpochEntry>,
}

struct MemoryLog(RefCell<State>);

impl MemoryLog {
    fn bounds(state: &State) -> OffsetBounds {
        OffsetBounds {
            log_start: state.index.log_start(),
            log_end: state.index.log_end(),
        }
    }
}

fn append_error(e: AppendError) -> PluginError {
    match e {
        AppendError::NotContiguous { .. } => PluginError::Conflict(e.to_string()),
        AppendError::Invalid(_) | AppendError::Empty => PluginError::InvalidInput(e.to_string()),
    }
}

impl GuestPartitionLog for MemoryLog {
    fn open(
        _topic: String,
        _partition: u32,
        config: Vec<(String, String)>,
    ) -> Result<PartitionLog, PluginError> {
        if let Some((k, _)) = config.first() {
            return Err(PluginError::InvalidInput(format!(
                "storage-memory takes no configuration, got `{k}`"
            )));
        }
        Ok(PartitionLog::new(MemoryLog(RefCell::new(State {
            index: OffsetIndex::empty_at(0),
            high_watermark: 0,
            epochs: Vec::new(),
        }))))
    }

    fn append(&self, batch: Vec<u8>) -> Result<u64, PluginError> {
        let mut s = self.0.borrow_mut();
        let located = index::check_append(&batch, s.index.log_end()).map_err(append_error)?;
        // The host's buffer is kept as is: no copy, and no fresh pages to
        // fault in beyond the ones the host already wrote.
        let chunk = Rc::new(batch);
        for l in located {
            let h = l.header;
            s.index.push(Entry {
                base: h.base_offset,
                next: h.next_offset(),
                leader_epoch: h.leader_epoch,
                len: h.batch_len,
                loc: (chunk.clone(), l.start),
            });
        }
        Ok(s.index.log_end())
    }

    fn read(&self, offset: u64, max_bytes: u32) -> Result<Vec<u8>, PluginError> {
        let s = self.0.borrow();
        let range = s
            .index
            .read_range(offset, max_bytes)
            .map_err(|_: index::OutOfRange| PluginError::OffsetOutOfRange(Self::bounds(&s)))?;
        let total: usize = range
            .clone()
            .filter_map(|i| s.index.get(i))
            .map(|e| e.len as usize)
            .sum();
        let mut out = Vec::with_capacity(total);
        for i in range {
            if let Some(Entry {
                len,
                loc: (chunk, start),
                ..
            }) = s.index.get(i)
            {
                out.extend_from_slice(&chunk[*start..*start + *len as usize]);
            }
        }
        Ok(out)
    }

    fn bounds(&self) -> OffsetBounds {
        Self::bounds(&self.0.borrow())
    }

    fn truncate(&self, offset: u64) -> Result<u64, PluginError> {
        let mut s = self.0.borrow_mut();
        if offset < s.index.log_start() || offset > s.index.log_end() {
            return Err(PluginError::OffsetOutOfRange(Self::bounds(&s)));
        }
        s.index.truncate(offset);
        let end = s.index.log_end();
        index::truncate_epochs(&mut s.epochs, end, |e| e.start_offset);
        Ok(end)
    }

    fn delete_prefix(&self, offset: u64) -> Result<(), PluginError> {
        let mut s = self.0.borrow_mut();
        s.index.delete_prefix(offset);
        Ok(())
    }

    fn reset(&self, offset: u64) -> Result<(), PluginError> {
        let mut s = self.0.borrow_mut();
        s.index = OffsetIndex::empty_at(offset);
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

    fn flush(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

export!(Plugin);
