//! Native in-process [`PartitionLog`]: the same contract as the wasm memory
//! plugin without the wasm boundary. It is the benchmark baseline and the
//! reference the conformance suite's model is checked against.

use std::future::{Future, ready};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use replicator_plugin_sdk::index::{self, AppendError, Entry, OffsetIndex};

use super::{EpochEntry, LogState, OffsetBounds, PartitionLog, StorageError, StorageResult};

struct State {
    index: OffsetIndex<Bytes>,
    high_watermark: u64,
    epochs: Vec<EpochEntry>,
}

pub struct MemoryLog(Mutex<State>);

impl Default for MemoryLog {
    fn default() -> Self {
        MemoryLog(Mutex::new(State {
            index: OffsetIndex::empty_at(0),
            high_watermark: 0,
            epochs: Vec::new(),
        }))
    }
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> StorageResult<T>) -> StorageResult<T> {
        // A poisoned lock means a panic mid-update: the state is suspect.
        let mut s = self
            .0
            .lock()
            .map_err(|_| StorageError::Corrupt("memory log lock poisoned".into()))?;
        f(&mut s)
    }
}

fn bounds(s: &State) -> OffsetBounds {
    OffsetBounds {
        log_start: s.index.log_start(),
        log_end: s.index.log_end(),
    }
}

pub(crate) fn append_error(e: AppendError) -> StorageError {
    match e {
        AppendError::NotContiguous { .. } => StorageError::Conflict(e.to_string()),
        AppendError::Invalid(_) | AppendError::Empty => StorageError::InvalidInput(e.to_string()),
    }
}

impl MemoryLog {
    /// [`PartitionLog::append`] without its CRC pass (see
    /// `PluginLog::append_sealed`): for the node's own appends.
    pub(crate) fn append_sealed(
        &self,
        batches: Bytes,
    ) -> impl Future<Output = StorageResult<u64>> + Send {
        ready(self.append_now(batches))
    }

    fn append_now(&self, batches: Bytes) -> StorageResult<u64> {
        self.with(|s| {
            let located = index::check_append(&batches, s.index.log_end()).map_err(append_error)?;
            for l in located {
                let h = l.header;
                s.index.push(Entry {
                    base: h.base_offset,
                    next: h.next_offset(),
                    leader_epoch: h.leader_epoch,
                    len: h.batch_len,
                    loc: batches.slice(l.start..l.start + h.batch_len as usize),
                });
            }
            Ok(s.index.log_end())
        })
    }
}

// Each call does its work when it is made and returns a ready future, so
// calls take effect in call order, as the trait promises.
impl PartitionLog for MemoryLog {
    fn append(&self, batches: Bytes) -> impl Future<Output = StorageResult<u64>> + Send {
        // Checked before the lock is taken: a CRC pass is the slow part.
        ready(super::check_sealed(&batches).and_then(|()| self.append_now(batches)))
    }

    fn read(
        &self,
        offset: u64,
        max_bytes: u32,
    ) -> impl Future<Output = StorageResult<Bytes>> + Send {
        ready(self.with(|s| {
            let range = s
                .index
                .read_range(offset, max_bytes)
                .map_err(|_: index::OutOfRange| StorageError::OffsetOutOfRange(bounds(s)))?;
            if range.len() == 1 {
                return Ok(s
                    .index
                    .get(range.start)
                    .map(|e| e.loc.clone())
                    .unwrap_or_default());
            }
            let mut out = BytesMut::new();
            for i in range {
                if let Some(e) = s.index.get(i) {
                    out.extend_from_slice(&e.loc);
                }
            }
            Ok(out.freeze())
        }))
    }

    fn bounds(&self) -> impl Future<Output = StorageResult<OffsetBounds>> + Send {
        ready(self.with(|s| Ok(bounds(s))))
    }

    fn truncate(&self, offset: u64) -> impl Future<Output = StorageResult<u64>> + Send {
        ready(self.with(|s| {
            if offset < s.index.log_start() || offset > s.index.log_end() {
                return Err(StorageError::OffsetOutOfRange(bounds(s)));
            }
            s.index.truncate(offset);
            let end = s.index.log_end();
            index::truncate_epochs(&mut s.epochs, end, |e| e.start_offset);
            Ok(end)
        }))
    }

    fn delete_prefix(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        ready(self.with(|s| {
            s.index.delete_prefix(offset);
            Ok(())
        }))
    }

    fn reset(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        ready(self.with(|s| {
            s.index = index::OffsetIndex::empty_at(offset);
            s.epochs.clear();
            Ok(())
        }))
    }

    fn high_watermark(&self) -> impl Future<Output = StorageResult<u64>> + Send {
        ready(self.with(|s| Ok(s.high_watermark)))
    }

    fn set_high_watermark(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        ready(self.with(|s| {
            s.high_watermark = offset;
            Ok(())
        }))
    }

    fn leader_epochs(&self) -> impl Future<Output = StorageResult<Vec<EpochEntry>>> + Send {
        ready(self.with(|s| Ok(s.epochs.clone())))
    }

    fn set_leader_epochs(
        &self,
        entries: Vec<EpochEntry>,
    ) -> impl Future<Output = StorageResult<()>> + Send {
        ready(self.with(|s| {
            s.epochs = entries;
            Ok(())
        }))
    }

    fn flush(&self) -> impl Future<Output = StorageResult<()>> + Send {
        ready(Ok(()))
    }

    fn recover(&self) -> impl Future<Output = StorageResult<LogState>> + Send {
        ready(self.with(|s| {
            Ok(LogState {
                bounds: bounds(s),
                high_watermark: s.high_watermark,
                leader_epochs: s.epochs.clone(),
            })
        }))
    }
}
