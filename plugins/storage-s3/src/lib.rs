//! Storage plugin that keeps each partition's log as objects in an
//! S3-compatible store, reached over wasi:http with SigV4-signed requests.
//! The host lets it reach only its configured endpoint. See `log.rs` for
//! buffering, recovery and fencing, `layout.rs` for the object names,
//! `config.rs` for the settings.

use std::cell::RefCell;

mod config;
mod http;
mod layout;
mod log;
mod s3;
mod sigv4;

wit_bindgen::generate!({ world: "storage-plugin", path: "../../wit" });

use exports::replicator::plugin::storage::{EpochEntry, Guest, GuestPartitionLog, PartitionLog};
use replicator::plugin::host::{LogLevel, log as host_log};
use replicator::plugin::types::{OffsetBounds, PluginError};

struct Plugin;

impl Guest for Plugin {
    type PartitionLog = S3LogResource;
}

struct S3LogResource(RefCell<log::S3Log>);

impl S3LogResource {
    fn bounds_now(&self) -> OffsetBounds {
        let (log_start, log_end) = self.0.borrow().bounds();
        OffsetBounds { log_start, log_end }
    }

    fn map(&self, e: log::Error) -> PluginError {
        match e {
            log::Error::Conflict(m) | log::Error::Fenced(m) => PluginError::Conflict(m),
            log::Error::Invalid(m) => PluginError::InvalidInput(m),
            log::Error::OutOfRange => PluginError::OffsetOutOfRange(self.bounds_now()),
            log::Error::Io(m) | log::Error::Refused(m) => PluginError::Io(m),
            log::Error::Corrupt(m) => PluginError::Corrupt(m),
            log::Error::Unavailable(m) => PluginError::Unavailable(m),
        }
    }
}

/// Closing the log uploads what is still buffered, as closing a file keeps
/// what was written to it; a failure is logged (replication refills it).
impl Drop for S3LogResource {
    fn drop(&mut self) {
        if let Err(e) = self.0.get_mut().flush() {
            let why = match e {
                log::Error::Conflict(m)
                | log::Error::Fenced(m)
                | log::Error::Invalid(m)
                | log::Error::Io(m)
                | log::Error::Refused(m)
                | log::Error::Corrupt(m)
                | log::Error::Unavailable(m) => m,
                log::Error::OutOfRange => "out of range".into(),
            };
            host_log(
                LogLevel::Warn,
                &format!("closing: buffered batches not uploaded: {why}"),
            );
        }
    }
}

impl GuestPartitionLog for S3LogResource {
    fn open(
        topic: String,
        partition: u32,
        config: Vec<(String, String)>,
    ) -> Result<PartitionLog, PluginError> {
        let config = config::Config::parse(&config).map_err(PluginError::InvalidInput)?;
        let log = log::S3Log::open(config, &topic, partition).map_err(|e| match e {
            // At open, a refusal is a configuration problem: say so.
            log::Error::Refused(m) | log::Error::Invalid(m) => PluginError::InvalidInput(m),
            log::Error::Corrupt(m) => PluginError::Corrupt(m),
            log::Error::Io(m) => PluginError::Io(m),
            log::Error::Unavailable(m) => PluginError::Unavailable(m),
            log::Error::Conflict(m) | log::Error::Fenced(m) => PluginError::Conflict(m),
            log::Error::OutOfRange => PluginError::Other("recovery went out of range".into()),
        })?;
        for note in &log.notes {
            host_log(
                LogLevel::Warn,
                &format!("{topic}/{partition}: recovery: {note}"),
            );
        }
        Ok(PartitionLog::new(S3LogResource(RefCell::new(log))))
    }

    fn append(&self, batch: Vec<u8>) -> Result<u64, PluginError> {
        let r = self.0.borrow_mut().append(batch);
        r.map_err(|e| self.map(e))
    }

    fn read(&self, offset: u64, max_bytes: u32) -> Result<Vec<u8>, PluginError> {
        let r = self.0.borrow_mut().read(offset, max_bytes);
        r.map_err(|e| self.map(e))
    }

    fn bounds(&self) -> OffsetBounds {
        self.bounds_now()
    }

    fn truncate(&self, offset: u64) -> Result<u64, PluginError> {
        let r = self.0.borrow_mut().truncate(offset);
        r.map_err(|e| self.map(e))
    }

    fn delete_prefix(&self, offset: u64) -> Result<(), PluginError> {
        let r = self.0.borrow_mut().delete_prefix(offset);
        r.map_err(|e| self.map(e))
    }

    fn reset(&self, offset: u64) -> Result<(), PluginError> {
        let r = self.0.borrow_mut().reset(offset);
        r.map_err(|e| self.map(e))
    }

    fn high_watermark(&self) -> Result<u64, PluginError> {
        Ok(self.0.borrow().high_watermark())
    }

    fn set_high_watermark(&self, offset: u64) -> Result<(), PluginError> {
        let r = self.0.borrow_mut().set_high_watermark(offset);
        r.map_err(|e| self.map(e))
    }

    fn leader_epochs(&self) -> Result<Vec<EpochEntry>, PluginError> {
        Ok(self
            .0
            .borrow()
            .epochs()
            .iter()
            .map(|&(epoch, start_offset)| EpochEntry {
                epoch,
                start_offset,
            })
            .collect())
    }

    fn set_leader_epochs(&self, entries: Vec<EpochEntry>) -> Result<(), PluginError> {
        let epochs = entries.iter().map(|e| (e.epoch, e.start_offset)).collect();
        let r = self.0.borrow_mut().set_epochs(epochs);
        r.map_err(|e| self.map(e))
    }

    fn flush(&self) -> Result<(), PluginError> {
        let r = self.0.borrow_mut().flush();
        r.map_err(|e| self.map(e))
    }
}

export!(Plugin);
