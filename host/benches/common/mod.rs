//! What the benchmarks share: the 1 KiB-message batch they append and the
//! MB/s arithmetic.

use std::time::Duration;

use bytes::Bytes;
use replicator::batch::{self, Record};

pub const MESSAGE: usize = 1024;
/// Records per batch: 64 (64 KiB batches, as workload d sends), or
/// `REPLICATOR_BENCH_RECORDS` (e.g. 13, about what a batching producer in
/// workload c sends, to price the per-call cost of the plugin boundary).
pub fn per_batch() -> usize {
    static RECORDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *RECORDS.get_or_init(|| {
        std::env::var("REPLICATOR_BENCH_RECORDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(64)
    })
}

/// One encoded batch of [`per_batch`] incompressible-looking `MESSAGE`-byte
/// records; appends reuse its bytes with a new base offset (the CRC does
/// not cover it), so encoding cost stays out of the figures.
pub fn template() -> Vec<u8> {
    let records: Vec<Record> = (0..per_batch())
        .map(|i| Record {
            value: Bytes::from(
                (0..MESSAGE)
                    .map(|j| ((i * 7919 + j * 104_729) % 251) as u8)
                    .collect::<Vec<u8>>(),
            ),
            timestamp: i as i64,
            ..Default::default()
        })
        .collect();
    batch::encode(0, 1, &records).expect("encode").to_vec()
}

pub fn mbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}
