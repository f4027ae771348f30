//! The clean-shutdown record, `<data_dir>/clean-shutdown.toml`: which
//! partitions a node flushed and closed at its last stop, and where each
//! log ended. KIP-966's unclean-shutdown detection, per partition.
//!
//! Why: a restarted replica may lead, or stay eligible to lead (the ELR),
//! only if its log still holds everything it held before. A node that
//! crashed cannot vouch for that (`fsync = interval` loses the last second
//! on a power cut), and neither can a log that now ends earlier than it did
//! (the memory plugin keeps nothing across a restart). So the record is
//! written only after every log was flushed and closed, and a node reads
//! it at start and deletes it before it opens any log: a crash of this run
//! then finds no record, however long the run was.
//!
//! The record also names the broker epoch of the run that wrote it, and a
//! start compares it with the epoch the metadata store last registered
//! this node under (KIP-966 compares the same two): a record from an
//! earlier run than the store's last means the data directory is older
//! than that run, restored from a backup or copied from elsewhere, and its
//! logs may lack what the later run acknowledged. A restored directory
//! carried a record that matched its own logs, and its replica was elected
//! from the ELR over the logs that held the later writes, which were then
//! truncated on every replica (exploratory run). Such a record vouches for
//! nothing.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::TopicPartition;

const FILE: &str = "clean-shutdown.toml";

#[derive(Debug, thiserror::Error)]
#[error("clean-shutdown record {path}: {error}")]
pub struct RecordError {
    path: PathBuf,
    error: std::io::Error,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    topic: String,
    partition: u32,
    log_end: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    /// The broker epoch of the run that wrote it; absent in records from
    /// before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    broker_epoch: Option<u64>,
    #[serde(default)]
    partition: Vec<Entry>,
}

/// What the last stop recorded; empty after a crash.
#[derive(Debug, Default, Clone)]
pub struct CleanShutdown {
    ends: HashMap<TopicPartition, u64>,
    broker_epoch: Option<u64>,
    /// A record was read (and is not consumed yet).
    present: bool,
}

impl CleanShutdown {
    /// Read the record in `dir`. No record: the node did not stop cleanly,
    /// and nothing counts as intact. A record that does not parse counts as
    /// none (with a warning).
    pub fn read(dir: &Path) -> Result<CleanShutdown, RecordError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CleanShutdown::default());
            }
            Err(error) => return Err(RecordError { path, error }),
        };
        let file: File = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "ignoring unreadable {} (every log counts as possibly incomplete): {e}",
                    path.display()
                );
                return Ok(CleanShutdown::default());
            }
        };
        let ends = file
            .partition
            .into_iter()
            .map(|e| (TopicPartition::new(&e.topic, e.partition), e.log_end))
            .collect();
        Ok(CleanShutdown {
            ends,
            broker_epoch: file.broker_epoch,
            present: true,
        })
    }

    /// Rewrite the record, if there is one, as vouching for what it still
    /// vouches for under `broker_epoch`, this start's registration: a start
    /// that fails before consuming it leaves one that the next start's
    /// comparison accepts, where the old epoch would look like a backup.
    pub fn renew(&mut self, dir: &Path, broker_epoch: u64) -> Result<(), RecordError> {
        if !self.present {
            return Ok(());
        }
        let ends: Vec<(TopicPartition, u64)> = self
            .ends
            .iter()
            .map(|(tp, end)| (tp.clone(), *end))
            .collect();
        Self::write(dir, broker_epoch, &ends)?;
        self.broker_epoch = Some(broker_epoch);
        Ok(())
    }

    /// Compare the record with `registered`, the broker epoch the store
    /// last registered this node under (before this start registers
    /// again). A record from an earlier run vouches for nothing from here
    /// on; returns the record's epoch then. A record without an epoch
    /// (from before it was kept), or a store with no registration, leaves
    /// it as it is.
    pub fn check_run(&mut self, registered: Option<u64>) -> Option<u64> {
        let (Some(recorded), Some(registered)) = (self.broker_epoch, registered) else {
            return None;
        };
        if recorded < registered && !self.ends.is_empty() {
            self.ends.clear();
            return Some(recorded);
        }
        None
    }

    /// Delete the record in `dir`, durably, before this run opens a log. A
    /// record that cannot be deleted is an error: a crash later in this run
    /// would look like a clean stop.
    pub fn consume(dir: &Path) -> Result<(), RecordError> {
        let path = dir.join(FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(RecordError { path, error }),
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|error| RecordError { path, error })
    }

    /// Whether `tp`'s log, which opened ending at `log_end`, holds all it
    /// held at the last clean stop.
    pub fn intact(&self, tp: &TopicPartition, log_end: u64) -> bool {
        self.ends.get(tp) == Some(&log_end)
    }

    /// Record `ends` in `dir`, durably and atomically (written aside, synced,
    /// renamed, the directory synced).
    pub fn write(
        dir: &Path,
        broker_epoch: u64,
        ends: &[(TopicPartition, u64)],
    ) -> Result<(), RecordError> {
        let path = dir.join(FILE);
        let err = |error| RecordError {
            path: path.clone(),
            error,
        };
        let file = File {
            broker_epoch: Some(broker_epoch),
            partition: ends
                .iter()
                .map(|(tp, end)| Entry {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    log_end: *end,
                })
                .collect(),
        };
        let text = toml::to_string(&file).map_err(|e| err(std::io::Error::other(e)))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        tmp.write_all(text.as_bytes()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(&path).map_err(|e| err(e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_vouches_only_for_the_same_log_end_until_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (TopicPartition::new("a", 0), TopicPartition::new("b", 3));
        CleanShutdown::write(dir.path(), 4, &[(a.clone(), 120), (b.clone(), 0)]).unwrap();
        let rec = CleanShutdown::read(dir.path()).unwrap();
        assert!(rec.intact(&a, 120));
        assert!(!rec.intact(&a, 0), "a log that lost its records");
        assert!(rec.intact(&b, 0));
        assert!(!rec.intact(&TopicPartition::new("a", 1), 0), "not recorded");
        // A start that fails before opening logs keeps it for the next.
        assert!(CleanShutdown::read(dir.path()).unwrap().intact(&a, 120));
        // Consumed: a crash of this run finds nothing.
        CleanShutdown::consume(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists());
        assert!(!CleanShutdown::read(dir.path()).unwrap().intact(&a, 120));
        CleanShutdown::consume(dir.path()).unwrap();
    }

    /// A record from the run the store last registered vouches; one from
    /// an earlier run (a restored backup) does not; one without an epoch
    /// (an older node's), or with no registration to compare, does.
    #[test]
    fn a_record_from_an_earlier_run_than_the_stores_last_vouches_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = TopicPartition::new("a", 0);
        CleanShutdown::write(dir.path(), 4, &[(a.clone(), 120)]).unwrap();
        let read = || CleanShutdown::read(dir.path()).unwrap();
        let mut same = read();
        assert_eq!(same.check_run(Some(4)), None);
        assert!(same.intact(&a, 120));
        let mut none = read();
        assert_eq!(none.check_run(None), None);
        assert!(none.intact(&a, 120));
        let mut restored = read();
        assert_eq!(restored.check_run(Some(5)), Some(4));
        assert!(!restored.intact(&a, 120));
        // Renewed at a registration, it is what the next start finds.
        let mut renewed = read();
        renewed.renew(dir.path(), 6).unwrap();
        let mut next = read();
        assert_eq!(next.check_run(Some(6)), None);
        assert!(next.intact(&a, 120));
        CleanShutdown::consume(dir.path()).unwrap();
        let mut none = read();
        none.renew(dir.path(), 7).unwrap();
        assert!(!dir.path().join(FILE).exists(), "no record, none written");
        std::fs::write(
            dir.path().join(FILE),
            "[[partition]]\ntopic = \"a\"\npartition = 0\nlog_end = 120\n",
        )
        .unwrap();
        let mut legacy = read();
        assert_eq!(legacy.check_run(Some(9)), None);
        assert!(legacy.intact(&a, 120));
    }

    #[test]
    fn an_unreadable_record_vouches_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "partition = 7").unwrap();
        let rec = CleanShutdown::read(dir.path()).unwrap();
        assert!(!rec.intact(&TopicPartition::new("a", 0), 0));
    }
}
