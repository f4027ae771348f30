//! The storage linker's own `wasi:filesystem` `descriptor.write`, in place
//! of wasmtime-wasi's, so that a positional write goes from the guest's
//! memory straight into the page cache.
//!
//! Why: wasmtime-wasi lifts the buffer into a fresh `Vec<u8>` first (a
//! copy and an allocation per call, so the call can move to tokio's
//! blocking pool), then writes it. A file-backed plugin writes every
//! append this way on every node: in a `perf` profile of workload d the
//! lift was 1.3% of all CPU samples, plus its `malloc`/`free`. A store on
//! its own thread may block (`Sandbox::own_thread`), so it writes the
//! guest's bytes in place: nothing else runs on that store while its guest
//! waits in this call, so the memory cannot change or move under the
//! write. A store on the node's runtime keeps wasmtime-wasi's behaviour (a
//! copy, written on the blocking pool).
//!
//! Everything else wasmtime-wasi checks or returns is kept: the
//! descriptor must be a file (`bad-descriptor` otherwise), the preopen must
//! allow writes (`not-permitted`), OS errors map to the same error codes
//! (`insufficient-space` for ENOSPC), and the result is the bytes written.

use std::future::Future;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList};
use wasmtime_wasi::filesystem::Descriptor;
use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode;

use super::sandbox::PluginState;

/// The interface wasmtime-wasi defines `descriptor.write` in. A guest
/// built against any 0.2.x imports it through semver matching.
const INTERFACE: &str = "wasi:filesystem/types@0.2.12";
const FUNCTION: &str = "[method]descriptor.write";

/// Replace wasmtime-wasi's `descriptor.write` in `linker` (which must
/// already hold wasmtime-wasi's p2 interfaces).
pub(crate) fn shadow(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    // First without shadowing, which must fail: wasmtime-wasi defined the
    // function already. If it does not, INTERFACE names a version
    // wasmtime-wasi no longer links (after an upgrade), and guests would
    // quietly get its write, or an instance holding nothing but this one
    // function. Every plugin load fails instead, until INTERFACE is fixed.
    linker.allow_shadowing(false);
    if linker
        .instance(INTERFACE)
        .and_then(|mut types| types.func_wrap_async(FUNCTION, write))
        .is_ok()
    {
        wasmtime::bail!(
            "{INTERFACE} {FUNCTION} was not defined by wasmtime-wasi: set INTERFACE in \
             host/src/plugin/wasi_write.rs to the wasi:filesystem version it links"
        );
    }
    linker.allow_shadowing(true);
    let defined = linker
        .instance(INTERFACE)
        .and_then(|mut types| types.func_wrap_async(FUNCTION, write));
    // Back to the default, so nothing else replaces a definition unawares.
    linker.allow_shadowing(false);
    defined
}

/// `descriptor.write(buffer, offset)`.
fn write(
    store: StoreContextMut<'_, PluginState>,
    (fd, buffer, offset): (Resource<Descriptor>, WasmList<u8>, u64),
) -> Box<dyn Future<Output = wasmtime::Result<(Written,)>> + Send + '_> {
    let state = store.data();
    let file = match state.table().get(&fd) {
        Ok(Descriptor::File(f)) => f,
        Ok(Descriptor::Dir(_)) => return ready(Err(ErrorCode::BadDescriptor)),
        // A handle the guest does not own is a trap, as in wasmtime-wasi.
        Err(e) => return Box::new(std::future::ready(Err(e.into()))),
    };
    if file.perms.write_not_permitted() {
        return ready(Err(ErrorCode::NotPermitted));
    }
    if state.inline_io() {
        let bytes = buffer.as_le_slice(&store);
        let written = std::os::unix::fs::FileExt::write_at(&*file.file, bytes, offset);
        return ready(written.map(|n| n as u64).map_err(ErrorCode::from));
    }
    let bytes = buffer.as_le_slice(&store).to_vec();
    let file = file.file.clone();
    Box::new(async move {
        let written = tokio::task::spawn_blocking(move || {
            std::os::unix::fs::FileExt::write_at(&*file, &bytes, offset)
        })
        .await?;
        Ok((written.map(|n| n as u64).map_err(ErrorCode::from),))
    })
}

type Written = Result<u64, ErrorCode>;

fn ready(r: Written) -> Box<dyn Future<Output = wasmtime::Result<(Written,)>> + Send + 'static> {
    Box::new(std::future::ready(Ok((r,))))
}
