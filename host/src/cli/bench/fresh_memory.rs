//! A machine baseline of `replicator bench`: what first touching fresh
//! memory costs here. Every byte a node keeps (the in-memory logs, the
//! wasm plugin's linear memory, the page cache under the file plugin)
//! lands in pages the kernel must fault in and zero, and on a VM whose
//! host backs guest memory lazily that is several times slower than on
//! bare metal (this machine: about 2 us per 4 KiB page, 2 GB/s). The raw
//! quinn baseline keeps nothing, so it never pays this; the report shows
//! the figure next to it so a low replicated / raw ratio can be read.

use std::time::Instant;

use serde::Serialize;

const PAGE: usize = 4096;
const BYTES: usize = 256 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct FreshMemory {
    /// Bytes of fresh memory faulted in per second.
    pub gb_per_s: f64,
    pub us_per_page: f64,
    /// CPU seconds per GB replicated spent faulting in the pages that
    /// hold it on all three nodes.
    pub cpu_s_per_gb_rf3: f64,
}

/// Fault in 256 MiB of memory never touched before (an allocation that
/// large is a fresh mapping), one write per page, and time it.
pub fn measure() -> FreshMemory {
    let start = Instant::now();
    let mut buf: Vec<u8> = Vec::with_capacity(BYTES);
    let spare = buf.spare_capacity_mut();
    for i in (0..spare.len()).step_by(PAGE) {
        spare[i].write(1);
    }
    // Keep the writes: the buffer is dropped unread.
    std::hint::black_box(&mut *spare);
    let s = start.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
    FreshMemory {
        gb_per_s: BYTES as f64 / s / 1e9,
        us_per_page: s * 1e6 / (BYTES / PAGE) as f64,
        cpu_s_per_gb_rf3: 3.0 * s * 1e9 / BYTES as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_are_really_touched() {
        let f = measure();
        // Skipped writes would leave only the mapping: hundreds of TB/s.
        assert!(
            f.gb_per_s > 0.01 && f.gb_per_s < 1000.0,
            "{f:?} is not a page-fault rate"
        );
        let per_page = PAGE as f64 / (f.gb_per_s * 1e3);
        assert!(
            (f.us_per_page - per_page).abs() < 1e-6 * per_page.max(1.0),
            "{f:?}"
        );
        assert!(
            (f.cpu_s_per_gb_rf3 - 3.0 / f.gb_per_s).abs() < 1e-9,
            "{f:?}"
        );
    }
}
