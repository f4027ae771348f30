//! Length-prefixed, versioned frames: the unit every QUIC stream carries.
//!
//! Layout (little-endian): `u8 version`, `u8 kind`, `u16 flags` (0),
//! `u32 payload length`, then the payload. A decoder never allocates more
//! than the cap it is given and never panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Wire format version; the QUIC ALPN names it too.
pub const VERSION: u8 = 2;
/// Header size in bytes.
pub const HEADER_LEN: usize = 8;
/// Default cap on one frame's payload: a fetch response of 16 MiB batches
/// plus headroom.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported wire version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: u32, max: u32 },
    #[error("reserved flags {0:#06x} set")]
    Flags(u16),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

/// A decoded frame: its kind and payload (sharing the input's memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Bytes,
}

/// Append one frame to `out`.
pub fn encode(kind: u8, payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    let header = header(kind, payload.len())?;
    out.reserve(HEADER_LEN + payload.len());
    out.put_slice(&header);
    out.put_slice(payload);
    Ok(())
}

/// Check a frame header: returns the kind and payload length, refusing a
/// wrong version, reserved flags or a length over `max_payload`.
pub fn parse_header(header: &[u8; HEADER_LEN], max_payload: u32) -> Result<(u8, u32), FrameError> {
    let version = header[0];
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = header[1];
    let flags = u16::from_le_bytes([header[2], header[3]]);
    if flags != 0 {
        return Err(FrameError::Flags(flags));
    }
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > max_payload {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    Ok((kind, len))
}

/// The header of a frame of `kind` with `len` payload bytes (for writers
/// that send the payload as separate chunks too); a length the header
/// cannot hold is refused.
pub fn header(kind: u8, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let l = u32::try_from(len)
        .map_err(|_| FrameError::TooLarge {
            len: u32::MAX,
            max: DEFAULT_MAX_PAYLOAD,
        })?
        .to_le_bytes();
    Ok([VERSION, kind, 0, 0, l[0], l[1], l[2], l[3]])
}

/// Take one whole frame off the front of `buf` if it holds one.
/// `Ok(None)`: more bytes needed (nothing is consumed). A frame whose
/// declared length is over `max_payload` is refused from its header alone,
/// before any of it is buffered.
pub fn decode(buf: &mut BytesMut, max_payload: u32) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let (kind, len) = parse_header(&header, max_payload)?;
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len as usize).freeze();
    Ok(Some(Frame { kind, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip_in_any_chunking(
            frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8),
            chunk in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for (k, p) in &frames {
                encode(*k, p, &mut wire).unwrap();
            }
            let wire = wire.freeze();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = decode(&mut buf, 1024).unwrap() {
                    got.push((f.kind, f.payload.to_vec()));
                }
            }
            prop_assert_eq!(got, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode(&mut buf, 64);
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let mut buf = BytesMut::new();
        buf.put_u8(VERSION);
        buf.put_u8(1);
        buf.put_u16_le(0);
        buf.put_u32_le(u32::MAX);
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_PAYLOAD),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_PAYLOAD
            })
        );
        let mut wrong = BytesMut::from(&[9u8, 1, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut wrong, 10), Err(FrameError::Version(9)));
    }
}
