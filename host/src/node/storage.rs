//! What a node keeps its partition logs in: a wasm storage plugin (always,
//! in production), or the native in-process memory log (`plugin =
//! "native"`), the baseline `replicator bench` measures the plugin
//! boundary against. Both are [`PartitionLog`]s; the partition actor does
//! not know which it has.

use std::path::Path;

use bytes::{Bytes, BytesMut};

use crate::plugin::{PluginLog, StoragePlugin};
use crate::storage::memory::MemoryLog;
use crate::storage::{EpochEntry, LogState, OffsetBounds, PartitionLog, StorageResult};

/// The `[storage] plugin` name of the native baseline. Not a wasm plugin:
/// it keeps nothing across restarts and is meant for benchmarks only.
pub const NATIVE: &str = "native";

#[derive(Clone)]
pub enum NodeStorage {
    Plugin(StoragePlugin),
    Native,
}

impl NodeStorage {
    pub fn name(&self) -> &str {
        match self {
            NodeStorage::Plugin(p) => p.name(),
            NodeStorage::Native => NATIVE,
        }
    }

    pub async fn open(
        &self,
        topic: &str,
        partition: u32,
        config: Vec<(String, String)>,
        data_dir: Option<&Path>,
    ) -> StorageResult<NodeLog> {
        match self {
            NodeStorage::Plugin(p) => Ok(NodeLog::Plugin(
                p.open(topic, partition, config, data_dir).await?,
            )),
            NodeStorage::Native => Ok(NodeLog::Native(MemoryLog::new())),
        }
    }
}

pub enum NodeLog {
    Plugin(PluginLog),
    Native(MemoryLog),
}

/// Forward a [`PartitionLog`] call to whichever log this is. The call is
/// made before the returned future is awaited, as the trait requires for
/// pipelining.
macro_rules! forward {
    ($self:ident . $method:ident ( $($arg:ident),* )) => {{
        let call: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> = match $self {
            NodeLog::Plugin(l) => Box::pin(l.$method($($arg),*)),
            NodeLog::Native(l) => Box::pin(l.$method($($arg),*)),
        };
        call
    }};
}

impl NodeLog {
    /// Release a plugin's log now and wait until the plugin has (its
    /// files closed, its destructor run); later calls get `Closed` faults.
    /// The native log has nothing to release.
    pub async fn close(&self) {
        if let NodeLog::Plugin(l) = self {
            l.clone().close().await;
        }
    }

    /// Append `parts` (contiguous, in order, sealed by this node's leader
    /// or checked by its core as a follower) as one group commit: one
    /// result per part. A plugin gets them as one call, joined in
    /// `scratch` (the WIT call takes one buffer), and every part gets
    /// that call's result; the native log takes each part as it is (no
    /// copy) and reports each on its own.
    pub async fn append_all(
        &self,
        mut parts: Vec<Bytes>,
        scratch: &mut BytesMut,
    ) -> Vec<StorageResult<u64>> {
        match self {
            NodeLog::Native(l) => {
                let mut out = Vec::with_capacity(parts.len());
                for p in parts {
                    out.push(l.append_sealed(p).await);
                }
                out
            }
            NodeLog::Plugin(l) => {
                let n = parts.len();
                let data = if n == 1 {
                    parts.pop().unwrap_or_default()
                } else {
                    scratch.reserve(parts.iter().map(Bytes::len).sum());
                    for p in &parts {
                        scratch.extend_from_slice(p);
                    }
                    scratch.split().freeze()
                };
                let r = l.append_sealed(data).await;
                vec![r; n]
            }
        }
    }
}

impl PartitionLog for NodeLog {
    fn append(&self, batches: Bytes) -> impl Future<Output = StorageResult<u64>> + Send {
        forward!(self.append(batches))
    }
    fn read(
        &self,
        offset: u64,
        max_bytes: u32,
    ) -> impl Future<Output = StorageResult<Bytes>> + Send {
        forward!(self.read(offset, max_bytes))
    }
    fn bounds(&self) -> impl Future<Output = StorageResult<OffsetBounds>> + Send {
        forward!(self.bounds())
    }
    fn truncate(&self, offset: u64) -> impl Future<Output = StorageResult<u64>> + Send {
        forward!(self.truncate(offset))
    }
    fn delete_prefix(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        forward!(self.delete_prefix(offset))
    }
    fn reset(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        forward!(self.reset(offset))
    }
    fn high_watermark(&self) -> impl Future<Output = StorageResult<u64>> + Send {
        forward!(self.high_watermark())
    }
    fn set_high_watermark(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        forward!(self.set_high_watermark(offset))
    }
    fn leader_epochs(&self) -> impl Future<Output = StorageResult<Vec<EpochEntry>>> + Send {
        forward!(self.leader_epochs())
    }
    fn set_leader_epochs(
        &self,
        entries: Vec<EpochEntry>,
    ) -> impl Future<Output = StorageResult<()>> + Send {
        forward!(self.set_leader_epochs(entries))
    }
    fn flush(&self) -> impl Future<Output = StorageResult<()>> + Send {
        forward!(self.flush())
    }
    fn recover(&self) -> impl Future<Output = StorageResult<LogState>> + Send {
        forward!(self.recover())
    }
}
