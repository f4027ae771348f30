//! Encoding of the replication messages inside frames: multi-partition
//! fetch requests and responses. Records stay opaque batch bytes and are
//! sliced out of the frame without a copy. Decoding checks every length
//! against what is left, so garbage is an error, never a panic or a large
//! allocation.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::FrameError;
use crate::core::{DivergingEpoch, ErrorCode, FetchRequest, FetchResponse, TopicPartition};

/// Frame kinds.
pub mod kind {
    pub const FETCH: u8 = 1;
    pub const FETCH_RESPONSE: u8 = 2;
}

fn bad(what: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        what,
        why: why.into(),
    }
}

struct Reader {
    buf: Bytes,
    what: &'static str,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, FrameError> {
        if self.buf.len() < n {
            return Err(bad(
                self.what,
                format!("needs {n} more bytes, {} left", self.buf.len()),
            ));
        }
        Ok(self.buf.split_to(n))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad(self.what, "topic is not UTF-8"))
    }
    /// A count of items each at least `min_item` bytes long: refused if the
    /// rest of the payload could not hold them (bounds the allocation).
    fn count(&mut self, min_item: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(bad(
                self.what,
                format!("{n} items cannot fit in {} bytes", self.buf.len()),
            ));
        }
        Ok(n)
    }
    fn finish(self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(bad(self.what, format!("{} trailing bytes", self.buf.len())))
        }
    }
}

fn error_code(e: Option<ErrorCode>) -> u8 {
    match e {
        None => 0,
        Some(ErrorCode::NotLeader) => 1,
        Some(ErrorCode::FencedLeaderEpoch) => 2,
        Some(ErrorCode::UnknownLeaderEpoch) => 3,
        Some(ErrorCode::OffsetOutOfRange) => 4,
        Some(ErrorCode::NotEnoughReplicas) => 5,
        Some(ErrorCode::NotEnoughReplicasAfterAppend) => 6,
        Some(ErrorCode::UnknownReplica) => 7,
        Some(ErrorCode::StaleBrokerEpoch) => 8,
        Some(ErrorCode::RequestTimedOut) => 9,
        Some(ErrorCode::IsrUpdateRejected) => 10,
        Some(ErrorCode::StorageError) => 11,
    }
}

fn decode_error(c: u8) -> Result<Option<ErrorCode>, FrameError> {
    Ok(Some(match c {
        0 => return Ok(None),
        1 => ErrorCode::NotLeader,
        2 => ErrorCode::FencedLeaderEpoch,
        3 => ErrorCode::UnknownLeaderEpoch,
        4 => ErrorCode::OffsetOutOfRange,
        5 => ErrorCode::NotEnoughReplicas,
        6 => ErrorCode::NotEnoughReplicasAfterAppend,
        7 => ErrorCode::UnknownReplica,
        8 => ErrorCode::StaleBrokerEpoch,
        9 => ErrorCode::RequestTimedOut,
        10 => ErrorCode::IsrUpdateRejected,
        11 => ErrorCode::StorageError,
        other => return Err(bad("fetch response", format!("unknown error code {other}"))),
    }))
}

fn put_tp(out: &mut BytesMut, tp: &TopicPartition) -> Result<(), FrameError> {
    let len = u16::try_from(tp.topic.len()).map_err(|_| bad("topic", "longer than 65535 bytes"))?;
    out.put_u16_le(len);
    out.put_slice(tp.topic.as_bytes());
    out.put_u32_le(tp.partition);
    Ok(())
}

/// Smallest encoded fetch entry: topic length + partition + fixed fields.
const MIN_FETCH_ENTRY: usize = 2 + 4 + 4 + 8 + 8 + 4 + 8 + 1 + 4 + 4 + 8;

/// Encode a multi-partition fetch.
pub fn encode_fetch(parts: &[(TopicPartition, FetchRequest)]) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::new();
    out.put_u32_le(parts.len() as u32);
    for (tp, r) in parts {
        put_tp(&mut out, tp)?;
        out.put_u32_le(r.replica_id);
        out.put_u64_le(r.replica_epoch);
        out.put_u64_le(r.correlation_id);
        out.put_u32_le(r.current_leader_epoch);
        out.put_u64_le(r.fetch_offset);
        match r.last_fetched_epoch {
            Some(e) => {
                out.put_u8(1);
                out.put_u32_le(e);
            }
            None => {
                out.put_u8(0);
                out.put_u32_le(0);
            }
        }
        out.put_u32_le(r.max_bytes);
        out.put_u32_le(r.min_bytes);
        out.put_u64_le(r.max_wait_ms);
    }
    Ok(out.freeze())
}

pub fn decode_fetch(payload: Bytes) -> Result<Vec<(TopicPartition, FetchRequest)>, FrameError> {
    let mut r = Reader {
        buf: payload,
        what: "fetch",
    };
    let n = r.count(MIN_FETCH_ENTRY)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let topic = r.string()?;
        let partition = r.u32()?;
        let replica_id = r.u32()?;
        let replica_epoch = r.u64()?;
        let correlation_id = r.u64()?;
        let current_leader_epoch = r.u32()?;
        let fetch_offset = r.u64()?;
        let has_epoch = r.u8()?;
        let epoch = r.u32()?;
        let last_fetched_epoch = match has_epoch {
            0 => None,
            1 => Some(epoch),
            other => return Err(bad("fetch", format!("bad option tag {other}"))),
        };
        out.push((
            TopicPartition { topic, partition },
            FetchRequest {
                replica_id,
                replica_epoch,
                correlation_id,
                current_leader_epoch,
                fetch_offset,
                last_fetched_epoch,
                max_bytes: r.u32()?,
                min_bytes: r.u32()?,
                max_wait_ms: r.u64()?,
            },
        ));
    }
    r.finish()?;
    Ok(out)
}

const MIN_RESPONSE_ENTRY: usize = 2 + 4 + 8 + 4 + 1 + 8 + 8 + 8 + 1 + 4 + 8 + 4;

/// Encode the responses to a multi-partition fetch as a list of chunks:
/// the fixed fields of each part, then its record batches as they came
/// from storage (shared, not copied). Written with one vectored write.
pub fn encode_fetch_response_chunks(
    parts: &[(TopicPartition, FetchResponse)],
) -> Result<Vec<Bytes>, FrameError> {
    let mut chunks = Vec::with_capacity(1 + parts.len() * 2);
    let mut out = BytesMut::with_capacity(4 + parts.len() * 80);
    out.put_u32_le(parts.len() as u32);
    for (tp, r) in parts {
        put_tp(&mut out, tp)?;
        out.put_u64_le(r.correlation_id);
        out.put_u32_le(r.leader_epoch);
        out.put_u8(error_code(r.error));
        out.put_u64_le(r.high_watermark);
        out.put_u64_le(r.log_start_offset);
        out.put_u64_le(r.log_end_offset);
        match r.diverging_epoch {
            Some(d) => {
                out.put_u8(1);
                out.put_u32_le(d.epoch);
                out.put_u64_le(d.end_offset);
            }
            None => {
                out.put_u8(0);
                out.put_u32_le(0);
                out.put_u64_le(0);
            }
        }
        let len = u32::try_from(r.records.len()).map_err(|_| bad("records", "over 4 GiB"))?;
        out.put_u32_le(len);
        if !r.records.is_empty() {
            chunks.push(out.split().freeze());
            chunks.push(r.records.clone());
        }
    }
    if !out.is_empty() {
        chunks.push(out.freeze());
    }
    Ok(chunks)
}

/// Encode the responses to a multi-partition fetch in one buffer.
pub fn encode_fetch_response(
    parts: &[(TopicPartition, FetchResponse)],
) -> Result<Bytes, FrameError> {
    let chunks = encode_fetch_response_chunks(parts)?;
    let mut out = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in chunks {
        out.put_slice(&c);
    }
    Ok(out.freeze())
}

pub fn decode_fetch_response(
    payload: Bytes,
) -> Result<Vec<(TopicPartition, FetchResponse)>, FrameError> {
    let mut r = Reader {
        buf: payload,
        what: "fetch response",
    };
    let n = r.count(MIN_RESPONSE_ENTRY)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let topic = r.string()?;
        let partition = r.u32()?;
        let correlation_id = r.u64()?;
        let leader_epoch = r.u32()?;
        let error = decode_error(r.u8()?)?;
        let high_watermark = r.u64()?;
        let log_start_offset = r.u64()?;
        let log_end_offset = r.u64()?;
        let has_div = r.u8()?;
        let (epoch, end_offset) = (r.u32()?, r.u64()?);
        let diverging_epoch = match has_div {
            0 => None,
            1 => Some(DivergingEpoch { epoch, end_offset }),
            other => return Err(bad("fetch response", format!("bad option tag {other}"))),
        };
        let len = r.u32()? as usize;
        let records = r.take(len)?;
        out.push((
            TopicPartition { topic, partition },
            FetchResponse {
                correlation_id,
                leader_epoch,
                error,
                high_watermark,
                log_start_offset,
                log_end_offset,
                diverging_epoch,
                records,
            },
        ));
    }
    r.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_tp() -> impl Strategy<Value = TopicPartition> {
        ("[a-z.]{0,12}", any::<u32>())
            .prop_map(|(topic, partition)| TopicPartition { topic, partition })
    }

    fn arb_request() -> impl Strategy<Value = FetchRequest> {
        (
            (
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
            ),
            (
                proptest::option::of(any::<u32>()),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
            ),
        )
            .prop_map(|((a, b, c, d, e), (f, g, h, i))| FetchRequest {
                replica_id: a,
                replica_epoch: b,
                correlation_id: c,
                current_leader_epoch: d,
                fetch_offset: e,
                last_fetched_epoch: f,
                max_bytes: g,
                min_bytes: h,
                max_wait_ms: i,
            })
    }

    fn arb_error() -> impl Strategy<Value = Option<ErrorCode>> {
        (0u8..12).prop_map(|c| decode_error(c).unwrap())
    }

    fn arb_response() -> impl Strategy<Value = FetchResponse> {
        (
            (
                any::<u64>(),
                any::<u32>(),
                arb_error(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
            proptest::option::of((any::<u32>(), any::<u64>())),
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(|((c, e, err, hw, ls, le), d, recs)| FetchResponse {
                correlation_id: c,
                leader_epoch: e,
                error: err,
                high_watermark: hw,
                log_start_offset: ls,
                log_end_offset: le,
                diverging_epoch: d.map(|(epoch, end_offset)| DivergingEpoch { epoch, end_offset }),
                records: Bytes::from(recs),
            })
    }

    proptest! {
        #[test]
        fn fetches_round_trip(parts in proptest::collection::vec((arb_tp(), arb_request()), 0..5)) {
            let bytes = encode_fetch(&parts).unwrap();
            prop_assert_eq!(decode_fetch(bytes).unwrap(), parts);
        }

        #[test]
        fn responses_round_trip(parts in proptest::collection::vec((arb_tp(), arb_response()), 0..5)) {
            let bytes = encode_fetch_response(&parts).unwrap();
            prop_assert_eq!(decode_fetch_response(bytes).unwrap(), parts);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_fetch(Bytes::from(bytes.clone()));
            let _ = decode_fetch_response(Bytes::from(bytes));
        }

        #[test]
        fn every_truncation_of_a_valid_message_is_refused(parts in proptest::collection::vec((arb_tp(), arb_response()), 1..3), cut in 1usize..50) {
            let bytes = encode_fetch_response(&parts).unwrap();
            let cut = cut.min(bytes.len());
            prop_assert!(decode_fetch_response(bytes.slice(..bytes.len() - cut)).is_err());
        }
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut b = BytesMut::new();
        b.put_u32_le(u32::MAX);
        assert!(matches!(
            decode_fetch(b.freeze()),
            Err(FrameError::Malformed { .. })
        ));
    }
}
