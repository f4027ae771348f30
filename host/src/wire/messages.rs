//! The pieces the replication messages are built from: frame kinds, a
//! bounds-checked reader, error codes and partition names. The fetch and
//! fetch-response layouts themselves live in [`super::session`], since
//! what a message carries depends on the session. Decoding checks every
//! length against what is left, so garbage is an error, never a panic or
//! a large allocation.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::FrameError;
use crate::core::{ErrorCode, MAX_TOPIC_LEN, TopicPartition};

/// Frame kinds.
pub mod kind {
    pub const FETCH: u8 = 1;
    pub const FETCH_RESPONSE: u8 = 2;
}

pub(super) fn bad(what: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        what,
        why: why.into(),
    }
}

pub(super) struct Reader {
    pub(super) buf: Bytes,
    pub(super) what: &'static str,
}

impl Reader {
    pub(super) fn take(&mut self, n: usize) -> Result<Bytes, FrameError> {
        if self.buf.len() < n {
            return Err(bad(
                self.what,
                format!("needs {n} more bytes, {} left", self.buf.len()),
            ));
        }
        Ok(self.buf.split_to(n))
    }
    pub(super) fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(super) fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(super) fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
    /// A topic name: refused past [`MAX_TOPIC_LEN`], which no created
    /// topic has, so a session cannot be made to hold (and re-encode in
    /// every answer) 64 KiB names.
    pub(super) fn topic(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        topic_len_ok(self.what, n)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad(self.what, "topic is not UTF-8"))
    }
    pub(super) fn tp(&mut self) -> Result<TopicPartition, FrameError> {
        let topic = self.topic()?;
        let partition = self.u32()?;
        Ok(TopicPartition { topic, partition })
    }
    /// A count of items each at least `min_item` bytes long: refused if the
    /// rest of the payload could not hold them (bounds the allocation).
    pub(super) fn count(&mut self, min_item: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(bad(
                self.what,
                format!("{n} items cannot fit in {} bytes", self.buf.len()),
            ));
        }
        Ok(n)
    }
    pub(super) fn finish(self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(bad(self.what, format!("{} trailing bytes", self.buf.len())))
        }
    }
}

pub(super) fn error_code(e: Option<ErrorCode>) -> u8 {
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
        Some(ErrorCode::StorageBacklog) => 12,
        Some(ErrorCode::OutOfOrderSequence) => 13,
    }
}

pub(super) fn decode_error(c: u8) -> Result<Option<ErrorCode>, FrameError> {
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
        12 => ErrorCode::StorageBacklog,
        13 => ErrorCode::OutOfOrderSequence,
        other => return Err(bad("fetch response", format!("unknown error code {other}"))),
    }))
}

/// Topic names past [`MAX_TOPIC_LEN`] are refused both when read and
/// when sent (what the reader would refuse is not sent).
fn topic_len_ok(what: &'static str, n: usize) -> Result<(), FrameError> {
    if n > MAX_TOPIC_LEN {
        return Err(bad(
            what,
            format!("a {n}-byte topic name (at most {MAX_TOPIC_LEN})"),
        ));
    }
    Ok(())
}

pub(super) fn put_tp(out: &mut BytesMut, tp: &TopicPartition) -> Result<(), FrameError> {
    topic_len_ok("topic", tp.topic.len())?;
    // At most MAX_TOPIC_LEN, so it fits.
    out.put_u16_le(tp.topic.len() as u16);
    out.put_slice(tp.topic.as_bytes());
    out.put_u32_le(tp.partition);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_tp(topic_len: usize) -> Result<TopicPartition, FrameError> {
        let mut out = BytesMut::new();
        out.put_u16_le(u16::try_from(topic_len).unwrap_or(u16::MAX));
        out.put_slice(&vec![b'a'; topic_len]);
        out.put_u32_le(7);
        Reader {
            buf: out.freeze(),
            what: "fetch",
        }
        .tp()
    }

    #[test]
    fn topic_names_past_the_limit_are_refused_both_ways() {
        let ok = read_tp(MAX_TOPIC_LEN).expect("the longest topic name reads");
        assert_eq!((ok.topic.len(), ok.partition), (MAX_TOPIC_LEN, 7));
        let mut out = BytesMut::new();
        assert!(put_tp(&mut out, &ok).is_ok());

        let err = read_tp(MAX_TOPIC_LEN + 1).expect_err("one byte too long");
        assert!(err.to_string().contains("a 250-byte topic name"), "{err}");
        let long = TopicPartition::new(&"a".repeat(MAX_TOPIC_LEN + 1), 0);
        let err = put_tp(&mut out, &long).expect_err("not sent either");
        assert!(err.to_string().contains("a 250-byte topic name"), "{err}");
    }
}
