//! Record batches as the host encodes them: the fixed header shared with
//! plugins (see `replicator-plugin-sdk` and `wit/storage.wit`) followed by
//! records that only the host reads.
//!
//! Record layout (little-endian), back to back after the header:
//! `u32 len` (bytes after this field), `i64 timestamp_ns`,
//! `i32 key_len` (-1: no key), key, `u32 value_len`, value,
//! `u32 header_count`, then per header `u16 name_len`, name (UTF-8),
//! `u32 value_len`, value. The offset of record `i` is `base_offset + i`.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
pub use replicator_plugin_sdk::{BatchHeader, HEADER_LEN, HeaderError, MAX_BATCH_LEN};

/// One record as producers and consumers see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Nanoseconds since the Unix epoch.
    pub timestamp: i64,
    pub headers: Vec<(String, Bytes)>,
}

/// A record read back from a log, with its offset and batch epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub leader_epoch: u32,
    pub record: Record,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("batch would be {0} bytes, over the {MAX_BATCH_LEN}-byte limit")]
    TooLarge(usize),
    #[error("a batch needs at least one record")]
    Empty,
    #[error("record {index} is malformed: {why}")]
    Record { index: u32, why: &'static str },
    #[error("batch has {0} bytes after its last record")]
    Trailing(usize),
    #[error("offsets from {0} would pass {MAX_OFFSET}, the end of the offset space")]
    OffsetSpace(u64),
}

/// One past the largest offset a log may hold: Kafka's offsets are
/// signed 64-bit. A plugin that reports a log end past it is broken, and
/// a leader assigns no offset beyond it.
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// Bytes `r` takes in an encoded batch.
pub fn record_len(r: &Record) -> usize {
    let headers: usize = r
        .headers
        .iter()
        .map(|(k, v)| 2 + k.len() + 4 + v.len())
        .sum();
    4 + 8 + 4 + r.key.as_ref().map_or(0, |k| k.len()) + 4 + r.value.len() + 4 + headers
}

/// Encode `records` as one batch starting at `base_offset`, in one
/// allocation, CRC sealed.
pub fn encode(
    base_offset: u64,
    leader_epoch: u32,
    records: &[Record],
) -> Result<Bytes, BatchError> {
    if records.is_empty() {
        return Err(BatchError::Empty);
    }
    let total = HEADER_LEN + records.iter().map(record_len).sum::<usize>();
    if total > MAX_BATCH_LEN as usize {
        return Err(BatchError::TooLarge(total));
    }
    for r in records {
        if r.headers.iter().any(|(k, _)| k.len() > u16::MAX as usize) {
            return Err(BatchError::Record {
                index: 0,
                why: "header name longer than 65535 bytes",
            });
        }
    }
    let mut buf = BytesMut::with_capacity(total);
    buf.resize(HEADER_LEN, 0);
    for r in records {
        // Lengths fit in u32: the whole batch is under MAX_BATCH_LEN.
        buf.extend_from_slice(&((record_len(r) - 4) as u32).to_le_bytes());
        buf.extend_from_slice(&r.timestamp.to_le_bytes());
        match &r.key {
            Some(k) => {
                buf.extend_from_slice(&(k.len() as i32).to_le_bytes());
                buf.extend_from_slice(k);
            }
            None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
        }
        buf.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        buf.extend_from_slice(&r.value);
        buf.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
        for (k, v) in &r.headers {
            buf.extend_from_slice(&(k.len() as u16).to_le_bytes());
            buf.extend_from_slice(k.as_bytes());
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
    }
    let first_timestamp = records[0].timestamp;
    let max_timestamp = records
        .iter()
        .map(|r| r.timestamp)
        .max()
        .unwrap_or(first_timestamp);
    BatchHeader {
        base_offset,
        batch_len: total as u32,
        crc: 0,
        leader_epoch,
        record_count: records.len() as u32,
        first_timestamp,
        max_timestamp,
    }
    .write(&mut buf[..HEADER_LEN]);
    replicator_plugin_sdk::seal(&mut buf);
    Ok(buf.freeze())
}

/// Rewrite the base offset of one encoded batch in place, and seal it
/// again (the position check covers the base offset).
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[0..8].copy_from_slice(&base_offset.to_le_bytes());
    replicator_plugin_sdk::seal(batch);
}

/// Reads fields from one batch's records as positions in the buffer: a
/// walk only checks framing, so it neither counts references to the
/// buffer nor allocates (a validating leader walks every record).
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<Range<usize>> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.end)?;
        let out = self.pos..end;
        self.pos = end;
        Some(out)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let r = self.take(N)?;
        self.buf[r].try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }
}

/// Where one record's fields lie in the walked buffer.
struct RecordSpans<'h> {
    offset: u64,
    leader_epoch: u32,
    timestamp: i64,
    key: Option<Range<usize>>,
    value: Range<usize>,
    /// Each header's name (checked to be UTF-8) and value.
    headers: &'h [(Range<usize>, Range<usize>)],
}

/// Decode every record of the batches in `bytes` (checking framing and
/// CRCs), sharing memory with `bytes`: keys and values are slices of it.
pub fn decode(bytes: &Bytes) -> Result<Vec<StoredRecord>, BatchError> {
    let mut out = Vec::new();
    for_each_record(bytes, |r| {
        let headers = r
            .headers
            .iter()
            .map(|(k, v)| {
                // The walk checked that the name is UTF-8.
                let name = String::from_utf8_lossy(&bytes[k.clone()]).into_owned();
                (name, bytes.slice(v.clone()))
            })
            .collect();
        out.push(StoredRecord {
            offset: r.offset,
            leader_epoch: r.leader_epoch,
            record: Record {
                key: r.key.map(|k| bytes.slice(k)),
                value: bytes.slice(r.value),
                timestamp: r.timestamp,
                headers,
            },
        });
    })?;
    Ok(out)
}

/// Check the batches in `bytes` as [`decode`] does (framing, CRCs, every
/// record's fields) without collecting anything; returns the number of
/// records. What a leader runs on a producer's batch before restamping it.
pub fn validate(bytes: &Bytes) -> Result<u32, BatchError> {
    let mut count = 0u32;
    for_each_record(bytes, |_| count += 1)?;
    Ok(count)
}

/// One or more batches that passed [`validate`] (framing, CRCs, position
/// checks, every record's fields), holding at least one record: what a
/// leader takes from a producer. [`restamp`] reseals the CRC over what it
/// is given, so bytes nobody checked would come out as a committed batch
/// with a good CRC and a record no one can decode (embedder run). Only
/// [`Validated::check`] and [`Validated::encode`] make one.
#[derive(Debug, Clone)]
pub struct Validated {
    bytes: Bytes,
    records: u32,
}

impl Validated {
    /// `bytes` if [`validate`] passes them and they hold a record.
    pub fn check(bytes: Bytes) -> Result<Self, BatchError> {
        match validate(&bytes)? {
            0 => Err(BatchError::Empty),
            records => Ok(Validated { bytes, records }),
        }
    }

    /// `records` as one batch, as a producer sends it (offset 0, epoch 0).
    pub fn encode(records: &[Record]) -> Result<Self, BatchError> {
        let bytes = encode(0, 0, records)?;
        let records =
            u32::try_from(records.len()).map_err(|_| BatchError::TooLarge(bytes.len()))?;
        Ok(Validated { bytes, records })
    }

    /// How many records the batches hold.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// Their length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true (a `Validated` holds a record); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The batches of `batches` with offsets from `base_offset` and
/// `leader_epoch` written into each header and the CRC resealed: how a
/// leader takes a producer's batch as it is, without decoding and
/// re-encoding its records. Returns the batches and the offset after their
/// last record.
///
/// When `batches` is the only handle on its buffer (a produce body sliced
/// out of the frame it arrived in) the headers are written in place;
/// otherwise the batches are copied first, so no other holder sees them
/// change.
pub fn restamp(
    batches: Validated,
    base_offset: u64,
    leader_epoch: u32,
) -> Result<(Bytes, u64), BatchError> {
    let mut out = batches
        .bytes
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let mut at = 0usize;
    let mut next = base_offset;
    while at < out.len() {
        let mut h = BatchHeader::parse(&out[at..])?;
        let end = at + h.batch_len as usize;
        // Parsing checked the producer's base offset, not this one.
        let after = next
            .checked_add(u64::from(h.record_count))
            .filter(|a| *a <= MAX_OFFSET)
            .ok_or(BatchError::OffsetSpace(next))?;
        h.base_offset = next;
        h.leader_epoch = leader_epoch;
        h.write(&mut out[at..at + HEADER_LEN]);
        replicator_plugin_sdk::seal(&mut out[at..end]);
        next = after;
        at = end;
    }
    Ok((out.freeze(), next))
}

/// Walk every record of the batches in `bytes`, checking framing and CRCs.
fn for_each_record(bytes: &[u8], mut each: impl FnMut(RecordSpans<'_>)) -> Result<(), BatchError> {
    let mut at = 0usize;
    // Reused across records: a record with headers allocates only once.
    let mut headers = Vec::new();
    for b in replicator_plugin_sdk::batches(bytes, true) {
        let (h, _) = b?;
        let start = at;
        at += h.batch_len as usize;
        let mut c = Cursor {
            buf: bytes,
            pos: start + HEADER_LEN,
            end: at,
        };
        for i in 0..h.record_count {
            let bad = |why| BatchError::Record { index: i, why };
            let len = c.u32().ok_or(bad("truncated length"))? as usize;
            let rec_end = c
                .pos
                .checked_add(len)
                .filter(|&e| e <= at)
                .ok_or(bad("length past batch end"))?;
            let timestamp = c.i64().ok_or(bad("truncated timestamp"))?;
            let key_len = c.u32().ok_or(bad("truncated key length"))? as i32;
            let key = match key_len {
                -1 => None,
                n if n >= 0 => Some(c.take(n as usize).ok_or(bad("key past record end"))?),
                _ => return Err(bad("negative key length")),
            };
            let vlen = c.u32().ok_or(bad("truncated value length"))? as usize;
            let value = c.take(vlen).ok_or(bad("value past record end"))?;
            let nh = c.u32().ok_or(bad("truncated header count"))?;
            headers.clear();
            for _ in 0..nh {
                let kl = c.u16().ok_or(bad("truncated header name"))? as usize;
                let k = c.take(kl).ok_or(bad("header name past end"))?;
                if std::str::from_utf8(&bytes[k.clone()]).is_err() {
                    return Err(bad("header name not UTF-8"));
                }
                let vl = c.u32().ok_or(bad("truncated header value"))? as usize;
                headers.push((k, c.take(vl).ok_or(bad("header value past end"))?));
            }
            if c.pos != rec_end {
                return Err(bad("record length disagrees with its fields"));
            }
            each(RecordSpans {
                offset: h.base_offset + u64::from(i),
                leader_epoch: h.leader_epoch,
                timestamp,
                key,
                value,
                headers: &headers,
            });
        }
        if c.pos != at {
            return Err(BatchError::Trailing(at - c.pos));
        }
    }
    Ok(())
}

/// The leading whole batches of `bytes` that start before `end`, sliced
/// without a copy. Used to keep a read below a bound (a fetch's log end,
/// a consumer's high watermark) when the log has grown since.
pub fn before(bytes: &Bytes, end: u64) -> Bytes {
    let mut keep = 0usize;
    for b in replicator_plugin_sdk::batches(bytes, false) {
        match b {
            Ok((h, raw)) if h.base_offset < end => keep += raw.len(),
            _ => break,
        }
    }
    bytes.slice(..keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::collection::vec(any::<u8>(), 0..200),
            any::<i64>(),
            proptest::collection::vec(
                ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..10)),
                0..3,
            ),
        )
            .prop_map(|(k, v, ts, h)| Record {
                key: k.map(Bytes::from),
                value: Bytes::from(v),
                timestamp: ts,
                headers: h.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect(),
            })
    }

    #[test]
    fn restamping_stops_at_the_end_of_the_offset_space() {
        let two = [Record::default(), Record::default()];
        let b = encode(0, 1, &two).expect("encodes");
        let (_, next) = restamp(Validated::check(b.clone()).unwrap(), MAX_OFFSET - 2, 3)
            .expect("the last two offsets");
        assert_eq!(next, MAX_OFFSET);
        let err = restamp(Validated::check(b).unwrap(), MAX_OFFSET - 1, 3)
            .expect_err("one offset too many");
        assert_eq!(err, BatchError::OffsetSpace(MAX_OFFSET - 1));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(base in 0u64..1 << 40, epoch in any::<u32>(),
                                    recs in proptest::collection::vec(arb_record(), 1..20)) {
            let b = encode(base, epoch, &recs).unwrap();
            let back = decode(&b).unwrap();
            prop_assert_eq!(back.len(), recs.len());
            for (i, (got, want)) in back.iter().zip(&recs).enumerate() {
                prop_assert_eq!(got.offset, base + i as u64);
                prop_assert_eq!(got.leader_epoch, epoch);
                prop_assert_eq!(&got.record, want);
            }
        }

        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn decode_rejects_any_flipped_byte(flip in 16usize..200) {
            let recs = vec![Record { value: Bytes::from(vec![7u8; 150]), ..Default::default() }];
            let mut b = encode(5, 1, &recs).unwrap().to_vec();
            let at = flip % b.len();
            b[at] ^= 0x5a;
            let b = Bytes::from(b);
            prop_assert!(decode(&b).is_err());
            prop_assert!(validate(&b).is_err());
        }
    }

    proptest! {
        #[test]
        fn restamping_equals_encoding_at_the_new_offset(
            base in 0u64..1 << 40, epoch in any::<u32>(),
            a in proptest::collection::vec(arb_record(), 1..10),
            b in proptest::collection::vec(arb_record(), 1..10)) {
            // Two batches as a producer sends them (offset 0, epoch 0).
            let mut body = encode(0, 0, &a).unwrap().to_vec();
            body.extend_from_slice(&encode(0, 0, &b).unwrap());
            let body = Bytes::from(body);
            prop_assert_eq!(validate(&body).unwrap() as usize, a.len() + b.len());
            let kept = body.clone();
            let (stamped, next) = restamp(Validated::check(body.clone()).unwrap(), base, epoch).unwrap();
            let mut want = encode(base, epoch, &a).unwrap().to_vec();
            want.extend_from_slice(&encode(base + a.len() as u64, epoch, &b).unwrap());
            prop_assert_eq!(&stamped[..], &want[..]);
            prop_assert_eq!(next, base + (a.len() + b.len()) as u64);
            // Shared, the batches were copied: the other handles still see
            // what the producer sent.
            prop_assert_ne!(stamped.as_ptr(), kept.as_ptr());
            prop_assert_eq!(validate(&kept).unwrap() as usize, a.len() + b.len());
            prop_assert_eq!(&body[..], &kept[..]);
            // The only handle: stamped in place, the same bytes.
            drop(kept);
            let at = body.as_ptr();
            let (in_place, _) = restamp(Validated::check(body).unwrap(), base, epoch).unwrap();
            prop_assert_eq!(in_place.as_ptr(), at);
            prop_assert_eq!(&in_place[..], &want[..]);
        }

        #[test]
        fn validate_agrees_with_decode_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let bytes = Bytes::from(bytes);
            prop_assert_eq!(validate(&bytes).ok(), decode(&bytes).ok().map(|r| r.len() as u32));
        }
    }

    /// What the leader restamps is checked first: a batch whose record
    /// framing and payload were changed (its CRC no longer matching) used
    /// to be resealed by `produce_batches` and committed with a good CRC
    /// and a record no one could decode (embedder run). An empty body
    /// holds no record.
    #[test]
    fn only_checked_batches_are_restamped() {
        let recs = vec![Record {
            value: Bytes::from_static(b"value"),
            ..Default::default()
        }];
        let good = encode(0, 0, &recs).unwrap();
        let mut bad = good.to_vec();
        bad[HEADER_LEN] ^= 0x7f; // the first record's length
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let bad = Bytes::from(bad);
        assert!(matches!(
            Validated::check(bad),
            Err(BatchError::Header(HeaderError::Crc { .. }))
        ));
        assert!(matches!(
            Validated::check(Bytes::new()),
            Err(BatchError::Empty)
        ));
        let v = Validated::check(good).unwrap();
        assert_eq!((v.records(), v.is_empty()), (1, false));
        let (stamped, next) = restamp(v, 5, 2).unwrap();
        assert_eq!((decode(&stamped).unwrap()[0].offset, next), (5, 6));
    }

    /// A batch relabelled with another base offset (the CRC leaves the
    /// offset out) fails its position check; restamping it is how the
    /// offset is changed. A batch sealed before the check existed (0
    /// there) is still read, as it always was.
    #[test]
    fn a_relabelled_batch_fails_its_position_check() {
        let recs = vec![Record {
            value: Bytes::from_static(b"v"),
            ..Default::default()
        }];
        let sealed = encode(0, 1, &recs).unwrap();
        let mut moved = sealed.to_vec();
        moved[0..8].copy_from_slice(&99u64.to_le_bytes());
        assert!(
            matches!(
                decode(&Bytes::from(moved.clone())),
                Err(BatchError::Header(HeaderError::Position {
                    base_offset: 99,
                    ..
                }))
            ),
            "{:?}",
            decode(&Bytes::from(moved.clone()))
        );
        let (restamped, next) = restamp(Validated::check(sealed.clone()).unwrap(), 99, 1).unwrap();
        assert_eq!((decode(&restamped).unwrap()[0].offset, next), (99, 100));
        // As sealed before the check: 0 in its place, the CRC over that.
        let mut old = sealed.to_vec();
        old[18..20].copy_from_slice(&[0, 0]);
        let crc = replicator_plugin_sdk::compute_crc(&old);
        old[12..16].copy_from_slice(&crc.to_le_bytes());
        old[0..8].copy_from_slice(&99u64.to_le_bytes());
        assert_eq!(decode(&Bytes::from(old)).unwrap()[0].offset, 99);
    }
}
