//! The record-batch header that host and storage plugins share, and the
//! form of a cluster id that host and metadata plugins share
//! ([`cluster_id`]).
//!
//! This crate owns the byte layout documented in `wit/storage.wit`: the host
//! encodes batches with it and plugins read base offset, length, epoch and
//! record count from it without parsing records. It has no dependencies on
//! wasmtime or wit-bindgen so it builds for `wasm32-wasip2` and natively.

#![forbid(unsafe_code)]

use std::fmt;

pub mod cluster_id;
pub mod index;

/// Size of the fixed batch header in bytes.
pub const HEADER_LEN: usize = 44;
/// The only batch format version this crate reads and writes.
pub const MAGIC: u8 = 1;
/// Largest batch accepted anywhere (header included): 16 MiB.
pub const MAX_BATCH_LEN: u32 = 16 * 1024 * 1024;

const CRC_START: usize = 16;

/// Why a byte slice is not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header (or than `batch-length`) needs.
    Short { needed: usize, have: usize },
    /// `batch-length` below the header size or above [`MAX_BATCH_LEN`].
    BadLength(u32),
    /// Unknown format version.
    BadMagic(u8),
    /// A batch must hold at least one record.
    NoRecords,
    /// `base-offset + record-count` does not fit in a u64.
    OffsetOverflow,
    /// The stored CRC does not match the bytes.
    Crc { stored: u32, computed: u32 },
    /// The base offset or length is not the one the batch was sealed
    /// with (see [`position_check`]): it was moved or relabelled.
    Position {
        base_offset: u64,
        stored: u16,
        computed: u16,
    },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Short { needed, have } => {
                write!(f, "batch truncated: needs {needed} bytes, have {have}")
            }
            HeaderError::BadLength(len) => write!(
                f,
                "batch length {len} outside {HEADER_LEN}..={MAX_BATCH_LEN}"
            ),
            HeaderError::BadMagic(m) => write!(f, "unknown batch format version {m}"),
            HeaderError::NoRecords => write!(f, "batch holds no records"),
            HeaderError::OffsetOverflow => write!(f, "batch offsets overflow u64"),
            HeaderError::Crc { stored, computed } => write!(
                f,
                "batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            HeaderError::Position {
                base_offset,
                stored,
                computed,
            } => write!(
                f,
                "batch labelled base offset {base_offset} was sealed at another offset or length (position check stored {stored:#06x}, computed {computed:#06x}): it was moved or relabelled"
            ),
        }
    }
}

impl std::error::Error for HeaderError {}

/// The decoded fixed header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub batch_len: u32,
    pub crc: u32,
    pub leader_epoch: u32,
    pub record_count: u32,
    pub first_timestamp: i64,
    pub max_timestamp: i64,
}

impl BatchHeader {
    /// Parse and check the header at the start of `bytes`. Checks framing
    /// only (lengths, version, counts), not the CRC: see [`verify_crc`].
    /// `bytes` may hold more than this batch.
    pub fn parse(bytes: &[u8]) -> Result<BatchHeader, HeaderError> {
        if bytes.len() < HEADER_LEN {
            return Err(HeaderError::Short {
                needed: HEADER_LEN,
                have: bytes.len(),
            });
        }
        let header = BatchHeader {
            base_offset: read_u64_le(bytes, 0),
            batch_len: read_u32_le(bytes, 8),
            crc: read_u32_le(bytes, 12),
            leader_epoch: read_u32_le(bytes, 20),
            record_count: read_u32_le(bytes, 24),
            first_timestamp: read_u64_le(bytes, 28) as i64,
            max_timestamp: read_u64_le(bytes, 36) as i64,
        };
        if (header.batch_len as usize) < HEADER_LEN || header.batch_len > MAX_BATCH_LEN {
            return Err(HeaderError::BadLength(header.batch_len));
        }
        if bytes[16] != MAGIC {
            return Err(HeaderError::BadMagic(bytes[16]));
        }
        if header.record_count == 0 {
            return Err(HeaderError::NoRecords);
        }
        header
            .base_offset
            .checked_add(u64::from(header.record_count))
            .ok_or(HeaderError::OffsetOverflow)?;
        if bytes.len() < header.batch_len as usize {
            return Err(HeaderError::Short {
                needed: header.batch_len as usize,
                have: bytes.len(),
            });
        }
        Ok(header)
    }

    /// One past the last offset in the batch.
    pub fn next_offset(&self) -> u64 {
        // parse() checked this cannot overflow.
        self.base_offset + u64::from(self.record_count)
    }

    /// The last offset in the batch.
    pub fn last_offset(&self) -> u64 {
        self.next_offset() - 1
    }

    /// Write this header into the first [`HEADER_LEN`] bytes of `out`.
    /// The CRC field is written as stored in `self`; see [`seal`].
    pub fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.base_offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.batch_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.crc.to_le_bytes());
        out[16] = MAGIC;
        out[17] = 0;
        out[18..20].copy_from_slice(&[0, 0]);
        out[20..24].copy_from_slice(&self.leader_epoch.to_le_bytes());
        out[24..28].copy_from_slice(&self.record_count.to_le_bytes());
        out[28..36].copy_from_slice(&self.first_timestamp.to_le_bytes());
        out[36..44].copy_from_slice(&self.max_timestamp.to_le_bytes());
    }
}

/// CRC-32C (Castagnoli), the checksum used for batches and plugin files.
pub fn crc32c(bytes: &[u8]) -> u32 {
    ::crc32c::crc32c(bytes)
}

/// Compute the CRC of a whole batch (its bytes 16..batch-length).
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c(&batch[CRC_START..])
}

/// Where the position check is stored: bytes 18..20, inside the CRC.
const POSITION_AT: usize = 18;

/// The position check of a batch header (at least [`HEADER_LEN`] bytes):
/// the low 16 bits of the CRC-32C of bytes 0..12 (base offset, length)
/// and 20..44 (epoch, count, timestamps), never 0.
///
/// Why: as in Kafka, the CRC leaves out the base offset, so a batch with
/// another batch's offset written over its own still passed every check,
/// and a storage plugin that served the batch of offset 0 labelled as
/// offset 4 (an index bug, or a plugin rebuilding headers from its own
/// index) had consumers read the wrong records without an error. The
/// check ties the offset and length to the rest of the header, and the
/// CRC ties it to the records. 0 means "none": batches sealed before it
/// existed carry 0 there and are not checked.
pub fn position_check(header: &[u8]) -> u16 {
    let crc = ::crc32c::crc32c_append(crc32c(&header[..12]), &header[20..HEADER_LEN]);
    (crc as u16).max(1)
}

/// Fill in the position check and the CRC of a whole, otherwise
/// complete batch.
pub fn seal(batch: &mut [u8]) {
    let check = position_check(batch);
    batch[POSITION_AT..POSITION_AT + 2].copy_from_slice(&check.to_le_bytes());
    let crc = compute_crc(batch);
    batch[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Check the CRC of one whole batch (`batch.len()` == its batch-length),
/// and its position check if it has one.
pub fn verify_crc(header: &BatchHeader, batch: &[u8]) -> Result<(), HeaderError> {
    let computed = compute_crc(&batch[..header.batch_len as usize]);
    if computed != header.crc {
        return Err(HeaderError::Crc {
            stored: header.crc,
            computed,
        });
    }
    let stored = u16::from_le_bytes([batch[POSITION_AT], batch[POSITION_AT + 1]]);
    if stored != 0 {
        let computed = position_check(batch);
        if computed != stored {
            return Err(HeaderError::Position {
                base_offset: header.base_offset,
                stored,
                computed,
            });
        }
    }
    Ok(())
}

/// Iterate over the batches packed back to back in `bytes`, checking
/// framing (and CRCs when `check_crc`). Stops at the first error.
pub fn batches(bytes: &[u8], check_crc: bool) -> Batches<'_> {
    Batches {
        rest: bytes,
        check_crc,
    }
}

/// Iterator returned by [`batches`]: yields `(header, whole batch bytes)`.
pub struct Batches<'a> {
    rest: &'a [u8],
    check_crc: bool,
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), HeaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = match BatchHeader::parse(self.rest) {
            Ok(h) => h,
            Err(e) => {
                self.rest = &[];
                return Some(Err(e));
            }
        };
        let (batch, rest) = self.rest.split_at(header.batch_len as usize);
        if self.check_crc
            && let Err(e) = verify_crc(&header, batch)
        {
            self.rest = &[];
            return Some(Err(e));
        }
        self.rest = rest;
        Some(Ok((header, batch)))
    }
}

/// Little-endian u32 at `at` (panics if out of bounds: callers check lengths).
pub fn read_u32_le(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Little-endian u64 at `at` (panics if out of bounds: callers check lengths).
pub fn read_u64_le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: u64, count: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN + payload.len()];
        BatchHeader {
            base_offset: base,
            batch_len: b.len() as u32,
            crc: 0,
            leader_epoch: 3,
            record_count: count,
            first_timestamp: 1,
            max_timestamp: 2,
        }
        .write(&mut b);
        b[HEADER_LEN..].copy_from_slice(payload);
        seal(&mut b);
        b
    }

    #[test]
    fn round_trip_and_iterate() {
        let mut bytes = batch(10, 2, b"hello");
        bytes.extend(batch(12, 1, b"x"));
        let got: Vec<_> = batches(&bytes, true).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.base_offset, 10);
        assert_eq!(got[0].0.next_offset(), 12);
        assert_eq!(got[1].0.leader_epoch, 3);
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let mut b = batch(0, 1, b"payload");
        let n = b.len();
        b[n - 1] ^= 1;
        let h = BatchHeader::parse(&b).unwrap();
        assert!(matches!(verify_crc(&h, &b), Err(HeaderError::Crc { .. })));
        let b = batch(0, 1, b"payload");
        assert!(matches!(
            BatchHeader::parse(&b[..n - 2]),
            Err(HeaderError::Short { .. })
        ));
        let mut z = batch(0, 1, b"");
        z[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(BatchHeader::parse(&z), Err(HeaderError::NoRecords));
    }
}
