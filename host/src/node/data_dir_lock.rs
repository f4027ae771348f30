//! A node's claim on its data directory: an exclusive lock on
//! `<data_dir>/.lock`, held for as long as the node runs, so two node
//! processes (a copied config still naming another node's directory) never
//! write the same partition logs. The kernel drops the lock when the
//! process exits, however it exits, so a killed node leaves nothing stale.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held while the node runs; dropping it releases the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    /// The directories `lock` made, deepest first: the data directory
    /// itself first, if it was made.
    made: Vec<PathBuf>,
}

impl Drop for DataDirLock {
    /// A start that fails before the node writes anything (a wrong
    /// certificate, a port in use, a store that never answered) takes back
    /// the directories it made: a typo in `data_dir` or `node_id` would
    /// otherwise leave an empty directory holding only `.lock`. A node
    /// that got as far as registering has written its identity there, so
    /// this never removes one that holds anything else.
    fn drop(&mut self) {
        let Some(dir) = self.made.first() else {
            return;
        };
        let only_the_lock = std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<Vec<_>, _>>()
                .is_ok_and(|names| names.len() == 1 && names[0] == ".lock")
        });
        // Removed while still locked, so no second node can have taken
        // the file meanwhile; a directory that is no longer empty (someone
        // else's create) stays, as `remove_dir` refuses it.
        if only_the_lock && std::fs::remove_file(dir.join(".lock")).is_ok() {
            for d in &self.made {
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot create the data directory {dir}: {error}")]
    Create { dir: PathBuf, error: std::io::Error },
    #[error(
        "data directory {dir} is in use by another node process{holder} (it holds {dir}/.lock): two nodes must not share a data_dir; check `data_dir` in this node's config"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("cannot lock {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "cannot create files in the data directory {dir}: {error}; the node writes its logs and records there (a read-only mount, an immutable attribute, permissions?)"
    )]
    NotWritable { dir: PathBuf, error: std::io::Error },
}

/// The name of [`check_writable`]'s probe, removed again at once.
const PROBE: &str = ".write-check";

/// Whether files can be made (and removed) in `dir`. Asked before the node
/// registers: a start that fails after registering has renewed, or failed
/// to renew, its clean-shutdown record under the new broker epoch, and a
/// record left at the old one makes the next start distrust every log,
/// as a directory restored from a backup would.
pub fn check_writable(dir: &Path) -> Result<(), LockError> {
    let path = dir.join(PROBE);
    let made = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"probe"));
    // Removed whether or not the write went through (a full disk).
    let removed = std::fs::remove_file(&path);
    made.and(removed).map_err(|error| LockError::NotWritable {
        dir: dir.to_path_buf(),
        error,
    })
}

/// Lock `dir` (created if missing) for this process, and write its pid
/// into the lock file so that a refused second node can name the first.
pub fn lock(dir: &Path) -> Result<DataDirLock, LockError> {
    let mut made = Vec::new();
    // A few tries: each loses only to a failed start that took back the
    // directory between this open and this lock (see `lock_once`).
    for _ in 0..5 {
        let made_now =
            crate::durable_dir::create_dir_all_made(dir).map_err(|error| LockError::Create {
                dir: dir.to_path_buf(),
                error,
            })?;
        for d in made_now {
            if !made.contains(&d) {
                made.push(d);
            }
        }
        if let Some(file) = lock_once(dir)? {
            return Ok(DataDirLock { _file: file, made });
        }
    }
    Err(LockError::Io {
        path: dir.join(".lock"),
        error: std::io::Error::other("the lock file was removed under each of 5 tries"),
    })
}

/// Lock `dir/.lock`; `None` if the file locked was no longer the one of
/// that name by then: a failed start that made the directory removes it
/// (see `Drop`), and a lock on an unlinked file would guard nothing while
/// a third start locked a new `.lock`.
fn lock_once(dir: &Path) -> Result<Option<File>, LockError> {
    let path = dir.join(".lock");
    let io = |error| LockError::Io {
        path: path.clone(),
        error,
    };
    // Not truncated on open: the holder's pid is still in it if locked.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let holder = if pid.is_empty() || pid.len() > 20 {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            return Err(LockError::InUse {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let held = file.metadata().map_err(io)?;
        let same = std::fs::metadata(&path)
            .is_ok_and(|named| named.dev() == held.dev() && named.ino() == held.ino());
        if !same {
            return Ok(None);
        }
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_has_one_node_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("node-1");
        let first = lock(&data).expect("a fresh directory, created");
        // Another open of the file is another claimant, as a second
        // process would be.
        let e = lock(&data)
            .expect_err("the same directory twice")
            .to_string();
        assert!(e.contains("is in use by another node process"), "{e}");
        assert!(
            e.contains(&format!("(pid {})", std::process::id())),
            "names the holder: {e}"
        );
        drop(first);
        let again = lock(&data).expect("free once the first is gone");
        drop(again);
    }

    #[test]
    fn a_directory_where_no_file_can_be_made_is_named_before_registering() {
        let dir = tempfile::tempdir().expect("tempdir");
        check_writable(dir.path()).expect("a fresh directory");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            0,
            "the probe is removed"
        );
        // Root writes through permissions; a directory in the probe's
        // place fails the create as a read-only mount would.
        std::fs::create_dir_all(dir.path().join(PROBE).join("x")).expect("mkdir");
        let e = check_writable(dir.path())
            .expect_err("cannot create")
            .to_string();
        assert!(
            e.contains("cannot create files in the data directory"),
            "{e}"
        );
    }

    #[test]
    fn a_start_that_wrote_nothing_takes_back_the_directories_it_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Made here, parents and all, and nothing written: all removed.
        let fresh = dir.path().join("typo/node-9");
        drop(lock(&fresh).expect("made"));
        assert!(!dir.path().join("typo").exists(), "left behind");
        // Made here and then written to: kept, lock file and all.
        let used = dir.path().join("node-1");
        let held = lock(&used).expect("made");
        std::fs::write(used.join("identity"), b"node 1").expect("write");
        drop(held);
        assert!(used.join("identity").exists() && used.join(".lock").exists());
        // There before: kept, even with nothing but the lock in it.
        let before = dir.path().join("node-2");
        std::fs::create_dir(&before).expect("mkdir");
        drop(lock(&before).expect("there"));
        assert!(before.join(".lock").exists());
        // A parent that was there before stays when only the leaf was made.
        let leaf = before.join("sub");
        drop(lock(&leaf).expect("made"));
        assert!(!leaf.exists() && before.is_dir());
    }
}
