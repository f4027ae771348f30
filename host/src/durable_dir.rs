//! Creating directories that survive a crash: each directory made is
//! synced into its parent.
//!
//! Why: `mkdir` changes the parent directory, and until the parent is
//! synced a power loss can drop the new entry, and with it every file
//! under it, synced or not. A partition's log directory is made when the
//! partition first opens, and its first acknowledged writes live in it;
//! Kafka syncs a new log directory's parent for the same reason.

use std::io;
use std::path::{Path, PathBuf};

/// Create `dir` and any missing parents, syncing each parent a directory
/// was made in. Nothing is synced when `dir` already exists.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    create_dir_all_with(dir, &mut sync_dir).map(drop)
}

/// [`create_dir_all`], returning the directories this call made, deepest
/// first (empty when `dir` already existed), for a caller that removes
/// them again if it fails before using them.
pub fn create_dir_all_made(dir: &Path) -> io::Result<Vec<PathBuf>> {
    create_dir_all_with(dir, &mut sync_dir)
}

fn create_dir_all_with(
    dir: &Path,
    sync: &mut dyn FnMut(&Path) -> io::Result<()>,
) -> io::Result<Vec<PathBuf>> {
    // The missing components, deepest first.
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", at.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(at);
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    let mut made = Vec::new();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => made.push(d.to_path_buf()),
            // Made meanwhile by someone else, whose sync may not have
            // happened yet: sync all the same.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
        let parent = d
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync(parent)?;
    }
    made.reverse();
    Ok(made)
}

/// fsync a directory. A file system that cannot (EINVAL) gets no
/// durability from it either way, and is not an error; nor is a parent
/// this process may write into but not open (mode 0733, say), where
/// `mkdir` alone used to do: a warning says the entry may not last.
fn sync_dir(dir: &Path) -> io::Result<()> {
    let opened = match std::fs::File::open(dir) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                "cannot open {} to sync a new directory into it ({e}); a power loss may drop the new directory",
                dir.display()
            );
            return Ok(());
        }
        other => other?,
    };
    match opened.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut synced = Vec::new();
        create_dir_all_with(dir, &mut |p| {
            synced.push(p.to_path_buf());
            Ok(())
        })?;
        Ok(synced)
    }

    #[test]
    fn each_directory_made_is_synced_into_its_parent_and_nothing_else() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        assert_eq!(
            made(&root.join("a/b/c")).expect("made"),
            vec![root.to_path_buf(), root.join("a"), root.join("a/b")]
        );
        assert!(root.join("a/b/c").is_dir());
        assert_eq!(
            made(&root.join("a/b/c")).expect("there"),
            Vec::<PathBuf>::new()
        );
        assert_eq!(made(&root.join("a/d")).expect("made"), vec![root.join("a")]);
        // A file in the way is an error, not a directory.
        std::fs::write(root.join("f"), b"x").expect("write");
        for path in [root.join("f"), root.join("f/g")] {
            assert!(made(&path).is_err(), "{path:?}");
        }
        // A failed sync fails the call: the directory may not last.
        let failed = create_dir_all_with(&root.join("e"), &mut |_| Err(io::Error::other("EIO")));
        assert!(failed.is_err());
        // The real sync, on a real directory; the made ones come back
        // deepest first, and none when it is there already.
        assert_eq!(
            create_dir_all_made(&root.join("h/i")).expect("made and synced"),
            vec![root.join("h/i"), root.join("h")]
        );
        assert!(root.join("h/i").is_dir());
        assert!(
            create_dir_all_made(&root.join("h/i"))
                .expect("there")
                .is_empty()
        );
    }
}
