//! Thin helpers over `wasi:filesystem` used directly (not through std):
//! positional reads and writes are one host call each, where std's stream
//! path splits writes into 4 KiB calls. Owns atomic small-file writes.

use wasip2::filesystem::types::{
    Descriptor, DescriptorFlags, DescriptorType, ErrorCode, OpenFlags, PathFlags,
};

/// Most bytes asked for per read call: what Replicator's host returns at
/// most. Other hosts may return less (wasmtime-wasi's own read stops at
/// 64 KiB); a short read is read on from where it ended.
const READ_CHUNK: u64 = 1 << 20;

pub type FsResult<T> = Result<T, String>;

pub fn err(what: &str, name: &str, e: ErrorCode) -> String {
    format!("{what} {name}: {}", e.message())
}

/// The one directory the host preopened for this partition.
pub fn data_dir() -> FsResult<Descriptor> {
    let mut dirs = wasip2::filesystem::preopens::get_directories();
    if dirs.is_empty() {
        return Err("no data directory was preopened for this partition".into());
    }
    Ok(dirs.swap_remove(0).0)
}

pub fn open(dir: &Descriptor, name: &str, create: bool, truncate: bool) -> FsResult<Descriptor> {
    let mut flags = OpenFlags::empty();
    if create {
        flags |= OpenFlags::CREATE;
    }
    if truncate {
        flags |= OpenFlags::TRUNCATE;
    }
    dir.open_at(
        PathFlags::empty(),
        name,
        flags,
        DescriptorFlags::READ | DescriptorFlags::WRITE,
    )
    .map_err(|e| err("open", name, e))
}

/// Names of the regular files in `dir`.
pub fn list(dir: &Descriptor) -> FsResult<Vec<String>> {
    let stream = dir.read_directory().map_err(|e| err("list", ".", e))?;
    let mut names = Vec::new();
    while let Some(entry) = stream
        .read_directory_entry()
        .map_err(|e| err("list", ".", e))?
    {
        if entry.type_ == DescriptorType::RegularFile {
            names.push(entry.name);
        }
    }
    Ok(names)
}

pub fn size(file: &Descriptor, name: &str) -> FsResult<u64> {
    Ok(file.stat().map_err(|e| err("stat", name, e))?.size)
}

/// Read exactly `len` bytes at `offset` into `out`, in host-sized chunks.
pub fn read_exact_at(
    file: &Descriptor,
    name: &str,
    offset: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> FsResult<()> {
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(READ_CHUNK);
        let (chunk, eof) = file
            .read(want, offset + done)
            .map_err(|e| err("read", name, e))?;
        if chunk.is_empty() && eof {
            return Err(format!(
                "read {name}: unexpected end of file at {}",
                offset + done
            ));
        }
        done += chunk.len() as u64;
        if out.is_empty() && chunk.len() as u64 == len {
            *out = chunk;
        } else {
            out.extend_from_slice(&chunk);
        }
    }
    Ok(())
}

/// A write that failed: why, and whether it was for want of space.
pub struct WriteFailed {
    pub message: String,
    pub out_of_space: bool,
}

impl From<WriteFailed> for String {
    fn from(w: WriteFailed) -> String {
        w.message
    }
}

/// Write all of `bytes` at `offset`.
pub fn write_all_at(
    file: &Descriptor,
    name: &str,
    offset: u64,
    bytes: &[u8],
) -> Result<(), WriteFailed> {
    let mut done = 0usize;
    while done < bytes.len() {
        let n = file
            .write(&bytes[done..], offset + done as u64)
            .map_err(|e| WriteFailed {
                message: err("write", name, e),
                out_of_space: matches!(e, ErrorCode::InsufficientSpace | ErrorCode::Quota),
            })?;
        if n == 0 {
            return Err(WriteFailed {
                message: format!("write {name}: no progress"),
                out_of_space: false,
            });
        }
        done += n as usize;
    }
    Ok(())
}

pub fn sync(file: &Descriptor, name: &str) -> FsResult<()> {
    file.sync_data().map_err(|e| err("sync", name, e))
}

pub fn remove(dir: &Descriptor, name: &str) -> FsResult<()> {
    match dir.unlink_file_at(name) {
        Ok(()) | Err(ErrorCode::NoEntry) => Ok(()),
        Err(e) => Err(err("remove", name, e)),
    }
}

/// Replace `name` with `bytes` atomically: write a temporary file, sync
/// it, rename it over `name`, sync the directory. A crash leaves either
/// the old or the new content, never a mix.
pub fn write_atomic(dir: &Descriptor, name: &str, bytes: &[u8]) -> FsResult<()> {
    let tmp = format!("{name}.tmp");
    let file = open(dir, &tmp, true, true)?;
    write_all_at(&file, &tmp, 0, bytes)?;
    sync(&file, &tmp)?;
    drop(file);
    dir.rename_at(&tmp, dir, name)
        .map_err(|e| err("rename", &tmp, e))?;
    // Durable on return is the promise (a checkpoint, an index).
    sync_dir_checked(dir, name)
}

/// Make creations, renames and removals in `dir` durable. Not supported
/// everywhere; each change is atomic anyway, only its durability
/// depends on this, so a refusal is ignored.
pub fn sync_dir(dir: &Descriptor) {
    let _ = dir.sync();
}

/// [`sync_dir`] where an acknowledgement waits on it (a new segment's
/// name): a refusal of the kind a file system without directory syncs
/// gives is still ignored, a failure (EIO) is not.
pub fn sync_dir_checked(dir: &Descriptor, name: &str) -> FsResult<()> {
    match dir.sync() {
        Ok(()) | Err(ErrorCode::Unsupported | ErrorCode::Invalid | ErrorCode::NotPermitted) => {
            Ok(())
        }
        Err(e) => Err(err("sync directory for", name, e)),
    }
}

/// The whole content of a small file, or `None` if it does not exist.
pub fn read_small(dir: &Descriptor, name: &str) -> FsResult<Option<Vec<u8>>> {
    let file = match dir.open_at(
        PathFlags::empty(),
        name,
        OpenFlags::empty(),
        DescriptorFlags::READ,
    ) {
        Ok(f) => f,
        Err(ErrorCode::NoEntry) => return Ok(None),
        Err(e) => return Err(err("open", name, e)),
    };
    let len = size(&file, name)?;
    let mut out = Vec::new();
    read_exact_at(&file, name, 0, len, &mut out)?;
    Ok(Some(out))
}
