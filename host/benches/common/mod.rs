//! What the benchmarks share: the 1 KiB-message batch they append and the
//! MB/s arithmetic.

use std::time::Duration;

use bytes::Bytes;
use replicator::batch::{self, Record};

pub const MESSAGE: usize = 1024;
pub const PER_BATCH: usize = 64;

/// One encoded batch of `PER_BATCH` incompressible-looking `MESSAGE`-byte
/// records; appends reuse its bytes with a new base offset (the CRC does
/// not cover it), so encoding cost stays out of the figures.
pub fn template() -> Vec<u8> {
    let records: Vec<Record> = (0..PER_BATCH)
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
