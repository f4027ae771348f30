//! A storage plugin built against `replicator:plugin@0.2.0` (its own copy of
//! the WIT in `wit/`, identical to the host's but for the package version),
//! so the host's versioned rejection at load can be tested. Every call
//! answers an error: it is never meant to be instantiated.

wit_bindgen::generate!({ world: "storage-plugin", path: "wit" });

use exports::replicator::plugin::storage::{EpochEntry, Guest, GuestPartitionLog, PartitionLog};
use replicator::plugin::types::{OffsetBounds, PluginError};

struct Plugin;

impl Guest for Plugin {
    type PartitionLog = Stub;
}

struct Stub;

fn unsupported<T>() -> Result<T, PluginError> {
    Err(PluginError::Other(
        "test-wrong-version is a stub that only exists to be rejected".into(),
    ))
}

impl GuestPartitionLog for Stub {
    fn open(_: String, _: u32, _: Vec<(String, String)>) -> Result<PartitionLog, PluginError> {
        unsupported()
    }
    fn append(&self, _: Vec<u8>) -> Result<u64, PluginError> {
        unsupported()
    }
    fn read(&self, _: u64, _: u32) -> Result<Vec<u8>, PluginError> {
        unsupported()
    }
    fn bounds(&self) -> OffsetBounds {
        OffsetBounds {
            log_start: 0,
            log_end: 0,
        }
    }
    fn truncate(&self, _: u64) -> Result<u64, PluginError> {
        unsupported()
    }
    fn delete_prefix(&self, _: u64) -> Result<(), PluginError> {
        unsupported()
    }
    fn high_watermark(&self) -> Result<u64, PluginError> {
        unsupported()
    }
    fn set_high_watermark(&self, _: u64) -> Result<(), PluginError> {
        unsupported()
    }
    fn leader_epochs(&self) -> Result<Vec<EpochEntry>, PluginError> {
        unsupported()
    }
    fn set_leader_epochs(&self, _: Vec<EpochEntry>) -> Result<(), PluginError> {
        unsupported()
    }
    fn flush(&self) -> Result<(), PluginError> {
        unsupported()
    }
}

export!(Plugin);
