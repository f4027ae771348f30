//! Incremental fetch sessions (Kafka's KIP-227) on one replication stream.
//!
//! A follower fetches every partition it follows from a leader again and
//! again, and most of those partitions have not changed since the last
//! fetch. So the stream is a session, and both ends remember what the
//! other knows:
//!
//! - A fetch carries only the partitions whose request changed (new
//!   offset, epoch, ...; the correlation id does not count) and the ones
//!   that leave the session. Every partition already in the session is
//!   fetched again implicitly, with its last request.
//! - A response carries only the partitions with something to say:
//!   records, an error, or a leader epoch, high watermark, log start or
//!   log end that differs from the last one sent. The follower answers
//!   the others itself from what it last received, exactly as the leader
//!   would have.
//!
//! Correlation ids do not cross the wire: the follower knows which
//! request of each partition a fetch carried, and the leader gives each
//! fetch a fresh id of its own. The stream is ordered and carries one
//! fetch at a time, so both ends apply the same changes in the same
//! order; a new stream starts a new, empty session, and anything that
//! does not add up (a partition answered that was not asked, an entry
//! missing that the follower cannot fill in) is an error that ends the
//! stream rather than a guess.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::FrameError;
use super::messages::{Reader, bad, decode_error, error_code, put_tp};
use crate::core::{DivergingEpoch, ErrorCode, FetchRequest, FetchResponse, TopicPartition};

/// Most partitions one session holds: bounds what a follower can make a
/// leader remember.
pub const MAX_SESSION_PARTITIONS: usize = 65_536;

/// Why a leader refused a fetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchRefused {
    #[error(transparent)]
    Malformed(#[from] FrameError),
    /// The fetch names a replica other than the node that sent it.
    #[error("node-{from} sent a fetch as replica {replica}")]
    Impersonation { from: u32, replica: u32 },
}

/// A request's fields that the session compares (all but the id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestState {
    replica_id: u32,
    replica_epoch: u64,
    current_leader_epoch: u32,
    fetch_offset: u64,
    last_fetched_epoch: Option<u32>,
    max_bytes: u32,
    min_bytes: u32,
    max_wait_ms: u64,
}

impl RequestState {
    fn of(r: &FetchRequest) -> Self {
        RequestState {
            replica_id: r.replica_id,
            replica_epoch: r.replica_epoch,
            current_leader_epoch: r.current_leader_epoch,
            fetch_offset: r.fetch_offset,
            last_fetched_epoch: r.last_fetched_epoch,
            max_bytes: r.max_bytes,
            min_bytes: r.min_bytes,
            max_wait_ms: r.max_wait_ms,
        }
    }

    fn request(&self, correlation_id: u64) -> FetchRequest {
        FetchRequest {
            replica_id: self.replica_id,
            replica_epoch: self.replica_epoch,
            correlation_id,
            current_leader_epoch: self.current_leader_epoch,
            fetch_offset: self.fetch_offset,
            last_fetched_epoch: self.last_fetched_epoch,
            max_bytes: self.max_bytes,
            min_bytes: self.min_bytes,
            max_wait_ms: self.max_wait_ms,
        }
    }

    fn put(&self, out: &mut BytesMut) {
        out.put_u32_le(self.replica_id);
        out.put_u64_le(self.replica_epoch);
        out.put_u32_le(self.current_leader_epoch);
        out.put_u64_le(self.fetch_offset);
        out.put_u8(u8::from(self.last_fetched_epoch.is_some()));
        out.put_u32_le(self.last_fetched_epoch.unwrap_or(0));
        out.put_u32_le(self.max_bytes);
        out.put_u32_le(self.min_bytes);
        out.put_u64_le(self.max_wait_ms);
    }

    fn read(r: &mut Reader) -> Result<Self, FrameError> {
        let replica_id = r.u32()?;
        let replica_epoch = r.u64()?;
        let current_leader_epoch = r.u32()?;
        let fetch_offset = r.u64()?;
        let has_epoch = r.u8()?;
        let epoch = r.u32()?;
        let last_fetched_epoch = match has_epoch {
            0 => None,
            1 => Some(epoch),
            other => return Err(bad("fetch", format!("bad option tag {other}"))),
        };
        Ok(RequestState {
            replica_id,
            replica_epoch,
            current_leader_epoch,
            fetch_offset,
            last_fetched_epoch,
            max_bytes: r.u32()?,
            min_bytes: r.u32()?,
            max_wait_ms: r.u64()?,
        })
    }
}

/// A response's fields that the session compares (all but the id and the
/// records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResponseState {
    leader_epoch: u32,
    error: Option<ErrorCode>,
    high_watermark: u64,
    log_start_offset: u64,
    log_end_offset: u64,
    diverging_epoch: Option<DivergingEpoch>,
}

impl ResponseState {
    fn of(r: &FetchResponse) -> Self {
        ResponseState {
            leader_epoch: r.leader_epoch,
            error: r.error,
            high_watermark: r.high_watermark,
            log_start_offset: r.log_start_offset,
            log_end_offset: r.log_end_offset,
            diverging_epoch: r.diverging_epoch,
        }
    }

    fn response(&self, correlation_id: u64, records: Bytes) -> FetchResponse {
        FetchResponse {
            correlation_id,
            leader_epoch: self.leader_epoch,
            error: self.error,
            high_watermark: self.high_watermark,
            log_start_offset: self.log_start_offset,
            log_end_offset: self.log_end_offset,
            diverging_epoch: self.diverging_epoch,
            records: records.into(),
        }
    }

    /// An answer the follower can rebuild on its own: no records, no
    /// error, nothing new.
    fn is_quiet(&self) -> bool {
        self.error.is_none() && self.diverging_epoch.is_none()
    }
}

/// Smallest encoded request entry: topic length, partition, fields.
const MIN_UPSERT: usize = 2 + 4 + 4 + 8 + 4 + 8 + 1 + 4 + 4 + 4 + 8;
/// Smallest encoded response entry.
const MIN_ANSWER: usize = 2 + 4 + 4 + 1 + 8 + 8 + 8 + 1 + 4 + 8 + 4;

/// How much one fetch or response left out (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts {
    /// Partitions written out in full.
    pub sent: u64,
    /// Partitions left out because the other end already knows them.
    pub omitted: u64,
}

/// The follower's end of a session.
#[derive(Debug, Default)]
pub struct FollowerSession {
    /// Per partition in the session: the request the leader holds, and
    /// the last answer it sent (none before the first).
    parts: HashMap<TopicPartition, (RequestState, Option<ResponseState>)>,
}

/// What a fetch in flight asked: each partition's correlation id.
#[derive(Debug)]
pub struct PendingFetch {
    asked: Vec<(TopicPartition, u64)>,
}

impl FollowerSession {
    pub fn new() -> Self {
        Self::default()
    }

    /// Partitions in the session.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Encode the fetch of `parts`: the changed entries and the
    /// partitions that leave the session. Every other partition of
    /// `parts` is already in the session as it is.
    pub fn encode_fetch(
        &mut self,
        parts: &[(TopicPartition, FetchRequest)],
    ) -> Result<(Bytes, PendingFetch, SessionCounts), FrameError> {
        let wanted: HashSet<&TopicPartition> = parts.iter().map(|(tp, _)| tp).collect();
        if wanted.len() != parts.len() {
            return Err(bad("fetch", "a partition appears twice"));
        }
        let forget: Vec<TopicPartition> = self
            .parts
            .keys()
            .filter(|tp| !wanted.contains(tp))
            .cloned()
            .collect();
        let mut out = BytesMut::with_capacity(8 + parts.len() * MIN_UPSERT);
        out.put_u32_le(0); // the count of entries, filled in below
        let mut counts = SessionCounts::default();
        for (tp, r) in parts {
            let state = RequestState::of(r);
            let changed = match self.parts.get_mut(tp) {
                Some((held, _)) if *held == state => false,
                Some((held, _)) => {
                    *held = state;
                    true
                }
                None => {
                    self.parts.insert(tp.clone(), (state, None));
                    true
                }
            };
            if changed {
                put_tp(&mut out, tp)?;
                state.put(&mut out);
                counts.sent += 1;
            } else {
                counts.omitted += 1;
            }
        }
        if self.parts.len() - forget.len() > MAX_SESSION_PARTITIONS {
            return Err(bad(
                "fetch",
                format!("more than {MAX_SESSION_PARTITIONS} partitions in one session"),
            ));
        }
        out[..4].copy_from_slice(&(counts.sent as u32).to_le_bytes());
        out.put_u32_le(forget.len() as u32);
        for tp in &forget {
            self.parts.remove(tp);
            put_tp(&mut out, tp)?;
        }
        let asked = parts
            .iter()
            .map(|(tp, r)| (tp.clone(), r.correlation_id))
            .collect();
        Ok((out.freeze(), PendingFetch { asked }, counts))
    }

    /// Decode the leader's answer to `pending`: one response per
    /// partition asked, the left-out ones rebuilt from the session.
    pub fn decode_response(
        &mut self,
        payload: Bytes,
        pending: PendingFetch,
    ) -> Result<(Vec<(TopicPartition, FetchResponse)>, SessionCounts), FrameError> {
        let mut r = Reader {
            buf: payload,
            what: "fetch response",
        };
        let n = r.count(MIN_ANSWER)?;
        let ids: HashMap<&TopicPartition, u64> =
            pending.asked.iter().map(|(tp, c)| (tp, *c)).collect();
        let mut out = Vec::with_capacity(pending.asked.len());
        let mut answered = HashSet::with_capacity(n);
        for _ in 0..n {
            let tp = r.tp()?;
            let state = read_response_state(&mut r)?;
            let len = r.u32()? as usize;
            let records = r.take(len)?;
            let Some(&correlation_id) = ids.get(&tp) else {
                return Err(bad(
                    "fetch response",
                    format!("answers {}/{}, which was not asked", tp.topic, tp.partition),
                ));
            };
            if !answered.insert(tp.clone()) {
                return Err(bad(
                    "fetch response",
                    format!("answers {}/{} twice", tp.topic, tp.partition),
                ));
            }
            if let Some((_, last)) = self.parts.get_mut(&tp) {
                *last = Some(state);
            }
            out.push((tp, state.response(correlation_id, records)));
        }
        r.finish()?;
        let mut counts = SessionCounts {
            sent: n as u64,
            omitted: 0,
        };
        for (tp, correlation_id) in pending.asked {
            if answered.contains(&tp) {
                continue;
            }
            let last = self.parts.get(&tp).and_then(|(_, last)| *last);
            let Some(last) = last.filter(ResponseState::is_quiet) else {
                return Err(bad(
                    "fetch response",
                    format!(
                        "leaves out {}/{}, which has no earlier answer to repeat",
                        tp.topic, tp.partition
                    ),
                ));
            };
            counts.omitted += 1;
            out.push((tp, last.response(correlation_id, Bytes::new())));
        }
        Ok((out, counts))
    }
}

/// The leader's end of a session.
#[derive(Debug, Default)]
pub struct LeaderSession {
    /// Per partition in the session: the follower's request, and the last
    /// answer sent (none before the first).
    parts: BTreeMap<TopicPartition, (RequestState, Option<ResponseState>)>,
}

impl LeaderSession {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply a fetch from replica `from` to the session and return every
    /// partition's request, each with correlation id `fetch_id`.
    pub fn decode_fetch(
        &mut self,
        payload: Bytes,
        from: u32,
        fetch_id: u64,
    ) -> Result<Vec<(TopicPartition, FetchRequest)>, FetchRefused> {
        let mut r = Reader {
            buf: payload,
            what: "fetch",
        };
        let n = r.count(MIN_UPSERT)?;
        let mut upserts = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        for _ in 0..n {
            let tp = r.tp()?;
            let state = RequestState::read(&mut r)?;
            if state.replica_id != from {
                return Err(FetchRefused::Impersonation {
                    from,
                    replica: state.replica_id,
                });
            }
            if !seen.insert(tp.clone()) {
                return Err(FetchRefused::from(bad(
                    "fetch",
                    format!("{}/{} appears twice", tp.topic, tp.partition),
                )));
            }
            upserts.push((tp, state));
        }
        let m = r.count(2 + 4)?;
        let mut forgets = Vec::with_capacity(m);
        for _ in 0..m {
            let tp = r.tp()?;
            if seen.contains(&tp) || !self.parts.contains_key(&tp) {
                return Err(FetchRefused::from(bad(
                    "fetch",
                    format!(
                        "forgets {}/{}, which is not in the session",
                        tp.topic, tp.partition
                    ),
                )));
            }
            forgets.push(tp);
        }
        r.finish()?;
        for tp in &forgets {
            self.parts.remove(tp);
        }
        for (tp, state) in upserts {
            match self.parts.get_mut(&tp) {
                Some((held, _)) => *held = state,
                None => {
                    if self.parts.len() >= MAX_SESSION_PARTITIONS {
                        return Err(FetchRefused::from(bad(
                            "fetch",
                            format!("more than {MAX_SESSION_PARTITIONS} partitions in one session"),
                        )));
                    }
                    self.parts.insert(tp, (state, None));
                }
            }
        }
        Ok(self
            .parts
            .iter()
            .map(|(tp, (state, _))| (tp.clone(), state.request(fetch_id)))
            .collect())
    }

    /// Encode the answers to a fetch as chunks (record batches shared,
    /// not copied), leaving out the partitions with nothing new.
    pub fn encode_response(
        &mut self,
        parts: &[(TopicPartition, FetchResponse)],
    ) -> Result<(Vec<Bytes>, SessionCounts), FrameError> {
        // The count leads the payload; its chunk is filled in at the end.
        let mut chunks = Vec::with_capacity(2 + parts.len() * 2);
        chunks.push(Bytes::new());
        let mut counts = SessionCounts::default();
        let mut out = BytesMut::with_capacity(parts.len() * MIN_ANSWER);
        for (tp, r) in parts {
            let state = ResponseState::of(r);
            let Some((_, last)) = self.parts.get_mut(tp) else {
                return Err(bad(
                    "fetch response",
                    format!("{}/{} is not in the session", tp.topic, tp.partition),
                ));
            };
            if r.records.is_empty() && state.is_quiet() && *last == Some(state) {
                counts.omitted += 1;
                continue;
            }
            *last = Some(state);
            counts.sent += 1;
            put_tp(&mut out, tp)?;
            put_response_state(&mut out, &state);
            let len = u32::try_from(r.records.len()).map_err(|_| bad("records", "over 4 GiB"))?;
            out.put_u32_le(len);
            if !r.records.is_empty() {
                chunks.push(out.split().freeze());
                chunks.extend(r.records.pieces().iter().cloned());
            }
        }
        if !out.is_empty() {
            chunks.push(out.freeze());
        }
        chunks[0] = Bytes::copy_from_slice(&(counts.sent as u32).to_le_bytes());
        Ok((chunks, counts))
    }
}

fn put_response_state(out: &mut BytesMut, s: &ResponseState) {
    out.put_u32_le(s.leader_epoch);
    out.put_u8(error_code(s.error));
    out.put_u64_le(s.high_watermark);
    out.put_u64_le(s.log_start_offset);
    out.put_u64_le(s.log_end_offset);
    match s.diverging_epoch {
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
}

fn read_response_state(r: &mut Reader) -> Result<ResponseState, FrameError> {
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
    Ok(ResponseState {
        leader_epoch,
        error,
        high_watermark,
        log_start_offset,
        log_end_offset,
        diverging_epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Records;
    use proptest::prelude::*;

    fn tp(p: u32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    fn request(corr: u64, offset: u64) -> FetchRequest {
        FetchRequest {
            replica_id: 2,
            replica_epoch: 7,
            correlation_id: corr,
            current_leader_epoch: 3,
            fetch_offset: offset,
            last_fetched_epoch: Some(3),
            max_bytes: 1 << 20,
            min_bytes: 1,
            max_wait_ms: 500,
        }
    }

    fn quiet(hw: u64) -> FetchResponse {
        FetchResponse {
            correlation_id: 0,
            leader_epoch: 3,
            error: None,
            high_watermark: hw,
            log_start_offset: 0,
            log_end_offset: hw,
            diverging_epoch: None,
            records: Records::default(),
        }
    }

    fn join(chunks: Vec<Bytes>) -> Bytes {
        chunks.concat().into()
    }

    /// One fetch through both ends: what the leader's partitions saw, and
    /// what the follower's replicas get back.
    #[allow(clippy::type_complexity)]
    fn round(
        f: &mut FollowerSession,
        l: &mut LeaderSession,
        parts: &[(TopicPartition, FetchRequest)],
        answer: impl Fn(&TopicPartition, &FetchRequest) -> FetchResponse,
        fetch_id: u64,
    ) -> (
        Vec<(TopicPartition, FetchRequest)>,
        Vec<(TopicPartition, FetchResponse)>,
        Bytes,
        Bytes,
    ) {
        let (payload, pending, _) = f.encode_fetch(parts).unwrap();
        let seen = l.decode_fetch(payload.clone(), 2, fetch_id).unwrap();
        let answers: Vec<_> = seen
            .iter()
            .map(|(tp, r)| (tp.clone(), answer(tp, r)))
            .collect();
        let (chunks, _) = l.encode_response(&answers).unwrap();
        let resp = join(chunks);
        let (got, _) = f.decode_response(resp.clone(), pending).unwrap();
        (seen, got, payload, resp)
    }

    #[test]
    fn idle_partitions_cost_nothing_after_the_first_fetch() {
        let (mut f, mut l) = (FollowerSession::new(), LeaderSession::new());
        let parts: Vec<_> = (0..100).map(|p| (tp(p), request(p as u64, 10))).collect();
        let (seen, got, first_fetch, first_resp) =
            round(&mut f, &mut l, &parts, |_, _| quiet(10), 1);
        assert_eq!(seen.len(), 100);
        assert_eq!(got.len(), 100);
        assert!(first_fetch.len() > 100 * MIN_UPSERT);
        assert!(first_resp.len() > 100 * MIN_ANSWER);

        // Same requests (new correlation ids), nothing new on the leader:
        // both messages are empty, and every replica still gets its answer.
        let again: Vec<_> = (0..100)
            .map(|p| (tp(p), request(1000 + p as u64, 10)))
            .collect();
        let (seen, got, fetch, resp) = round(&mut f, &mut l, &again, |_, _| quiet(10), 2);
        assert_eq!(fetch.len(), 8, "two empty counts");
        assert_eq!(resp.len(), 4, "one empty count");
        assert_eq!(seen.len(), 100, "the leader still serves every partition");
        assert!(seen.iter().all(|(_, r)| r.correlation_id == 2));
        let mut got = got;
        got.sort_by_key(|(tp, _)| tp.partition);
        for (p, (t, r)) in got.iter().enumerate() {
            assert_eq!(*t, tp(p as u32));
            assert_eq!(r.correlation_id, 1000 + p as u64);
            assert_eq!(
                *r,
                FetchResponse {
                    correlation_id: 1000 + p as u64,
                    ..quiet(10)
                }
            );
        }

        // One partition moves: only it crosses, both ways.
        let mut moved = again.clone();
        moved[7].1.fetch_offset = 11;
        let (_, got, fetch, resp) = round(
            &mut f,
            &mut l,
            &moved,
            |t, _| {
                if t.partition == 7 {
                    quiet(11)
                } else {
                    quiet(10)
                }
            },
            3,
        );
        assert_eq!(fetch.len(), 8 + 2 + 1 + 4 + MIN_UPSERT - 6);
        assert!(resp.len() < 4 + MIN_ANSWER + 8);
        assert_eq!(
            got.iter()
                .find(|(t, _)| t.partition == 7)
                .map(|(_, r)| r.high_watermark),
            Some(11)
        );
    }

    #[test]
    fn a_partition_that_sits_out_a_fetch_is_forgotten_and_sent_again_in_full() {
        let (mut f, mut l) = (FollowerSession::new(), LeaderSession::new());
        let parts = vec![(tp(0), request(1, 5)), (tp(1), request(2, 5))];
        round(&mut f, &mut l, &parts, |_, _| quiet(5), 1);
        let (seen, got, _, _) = round(&mut f, &mut l, &parts[..1], |_, _| quiet(5), 2);
        assert_eq!(seen.len(), 1, "partition 1 left the leader's session");
        assert_eq!(got.len(), 1);
        assert_eq!(f.len(), 1);
        let (seen, got, fetch, _) = round(&mut f, &mut l, &parts, |_, _| quiet(5), 3);
        assert_eq!(seen.len(), 2);
        assert_eq!(got.len(), 2);
        assert!(fetch.len() > MIN_UPSERT, "partition 1 went in full");
    }

    #[test]
    fn errors_and_diverging_epochs_always_cross() {
        let (mut f, mut l) = (FollowerSession::new(), LeaderSession::new());
        let parts = vec![(tp(0), request(1, 5))];
        let failing = |_: &TopicPartition, _: &FetchRequest| FetchResponse {
            error: Some(ErrorCode::NotLeader),
            ..quiet(5)
        };
        for id in 1..4 {
            let (_, got, _, resp) = round(&mut f, &mut l, &parts, failing, id);
            assert!(resp.len() > 4);
            assert_eq!(got[0].1.error, Some(ErrorCode::NotLeader));
        }
    }

    #[test]
    fn records_cross_even_when_the_state_is_unchanged() {
        let (mut f, mut l) = (FollowerSession::new(), LeaderSession::new());
        let parts = vec![(tp(0), request(1, 5))];
        round(&mut f, &mut l, &parts, |_, _| quiet(5), 1);
        let with_records = |_: &TopicPartition, _: &FetchRequest| FetchResponse {
            records: Bytes::from_static(b"batch").into(),
            ..quiet(5)
        };
        let (_, got, _, _) = round(&mut f, &mut l, &parts, with_records, 2);
        assert_eq!(got[0].1.records, Bytes::from_static(b"batch").into());
    }

    /// A leader answers from several appends without joining them: the
    /// pieces go out as chunks and arrive as one run of bytes, in order.
    #[test]
    fn records_in_pieces_arrive_as_one() {
        let (mut f, mut l) = (FollowerSession::new(), LeaderSession::new());
        let parts = vec![(tp(0), request(1, 5))];
        let in_pieces = |_: &TopicPartition, _: &FetchRequest| {
            let mut records = Records::default();
            for piece in [&b"one "[..], b"", b"two ", b"three"] {
                records.push(Bytes::from_static(piece));
            }
            FetchResponse {
                records,
                ..quiet(5)
            }
        };
        let (_, got, _, _) = round(&mut f, &mut l, &parts, in_pieces, 1);
        assert_eq!(got[0].1.records.pieces().len(), 1);
        assert_eq!(
            got[0].1.records.clone().into_contiguous(),
            Bytes::from_static(b"one two three")
        );
    }

    #[test]
    fn the_leader_refuses_what_does_not_add_up() {
        let mut f = FollowerSession::new();
        let (payload, _, _) = f.encode_fetch(&[(tp(0), request(1, 0))]).unwrap();
        // Impersonation.
        assert_eq!(
            LeaderSession::new().decode_fetch(payload.clone(), 3, 1),
            Err(FetchRefused::Impersonation {
                from: 3,
                replica: 2
            })
        );
        // Forgetting a partition the session does not hold.
        let mut forget = BytesMut::new();
        forget.put_u32_le(0);
        forget.put_u32_le(1);
        put_tp(&mut forget, &tp(9)).unwrap();
        assert!(matches!(
            LeaderSession::new().decode_fetch(forget.freeze(), 2, 1),
            Err(FetchRefused::Malformed(_))
        ));
        // A partition twice.
        let mut twice = BytesMut::new();
        twice.put_u32_le(2);
        for _ in 0..2 {
            put_tp(&mut twice, &tp(0)).unwrap();
            RequestState::of(&request(0, 0)).put(&mut twice);
        }
        twice.put_u32_le(0);
        assert!(
            LeaderSession::new()
                .decode_fetch(twice.freeze(), 2, 1)
                .is_err()
        );
        // Trailing bytes and every truncation.
        let mut long = BytesMut::from(&payload[..]);
        long.put_u8(0);
        assert!(
            LeaderSession::new()
                .decode_fetch(long.freeze(), 2, 1)
                .is_err()
        );
        for cut in 1..payload.len() {
            assert!(
                LeaderSession::new()
                    .decode_fetch(payload.slice(..cut), 2, 1)
                    .is_err()
            );
        }
    }

    #[test]
    fn the_follower_refuses_answers_it_cannot_trust() {
        let parts = vec![(tp(0), request(1, 0))];
        // An answer for a partition it did not ask about.
        let mut f = FollowerSession::new();
        let (_, pending, _) = f.encode_fetch(&parts).unwrap();
        let mut other = LeaderSession::new();
        let (p, _, _) = FollowerSession::new()
            .encode_fetch(&[(tp(5), request(1, 0))])
            .unwrap();
        other.decode_fetch(p, 2, 1).unwrap();
        let (chunks, _) = other.encode_response(&[(tp(5), quiet(0))]).unwrap();
        assert!(f.decode_response(join(chunks), pending).is_err());
        // An empty answer before any answer it could repeat.
        let mut f = FollowerSession::new();
        let (_, pending, _) = f.encode_fetch(&parts).unwrap();
        let mut empty = BytesMut::new();
        empty.put_u32_le(0);
        assert!(f.decode_response(empty.freeze(), pending).is_err());
    }

    #[test]
    fn sessions_are_bounded() {
        let mut f = FollowerSession::new();
        let parts: Vec<_> = (0..=MAX_SESSION_PARTITIONS as u32)
            .map(|p| (tp(p), request(0, 0)))
            .collect();
        assert!(f.encode_fetch(&parts).is_err());
    }

    /// A leader's answer in brief: HW, error code, diverging epoch, and
    /// whether it carries records.
    type Answer = (u64, Option<u8>, Option<u32>, bool);

    fn arb_state() -> impl Strategy<Value = Answer> {
        // Small domains so repeats (and omissions) are common.
        (
            0u64..3,
            proptest::option::weighted(0.2, 1u8..12),
            proptest::option::weighted(0.1, 0u32..2),
            proptest::bool::weighted(0.3),
        )
    }

    proptest! {
        /// Whatever the sequence of fetches, the leader's partitions see
        /// exactly the requests the follower made (with the leader's id),
        /// and the follower's replicas get exactly the leader's answers
        /// (with their own ids): the session changes the bytes, never the
        /// meaning.
        #[test]
        fn sessions_change_the_bytes_never_the_meaning(
            rounds in proptest::collection::vec(
                proptest::collection::vec(
                    (0u32..6, 0u64..3, proptest::option::of(0u32..2), arb_state()),
                    0..6,
                ),
                1..12,
            )
        ) {
            let (mut f, mut l) = (FollowerSession::new(), LeaderSession::new());
            let mut corr = 0u64;
            for (i, round_parts) in rounds.into_iter().enumerate() {
                let mut parts: Vec<(TopicPartition, FetchRequest, Answer)> = Vec::new();
                for (p, offset, last_epoch, state) in round_parts {
                    if parts.iter().any(|(t, _, _)| t.partition == p) {
                        continue;
                    }
                    corr += 1;
                    let mut r = request(corr, offset);
                    r.last_fetched_epoch = last_epoch;
                    parts.push((tp(p), r, state));
                }
                let asked: Vec<_> = parts.iter().map(|(t, r, _)| (t.clone(), r.clone())).collect();
                let answer_of = |t: &TopicPartition| {
                    let (hw, err, div, records) = parts
                        .iter()
                        .find(|(x, _, _)| x == t)
                        .map(|(_, _, s)| *s)
                        .unwrap();
                    FetchResponse {
                        correlation_id: 0,
                        leader_epoch: 3,
                        error: err.map(|c| decode_error(c).unwrap().unwrap()),
                        high_watermark: hw,
                        log_start_offset: 0,
                        log_end_offset: hw + 1,
                        diverging_epoch: div.map(|epoch| DivergingEpoch { epoch, end_offset: 1 }),
                        records: if records {
                            Bytes::from(vec![i as u8; 3]).into()
                        } else {
                            Records::default()
                        },
                    }
                };
                let fetch_id = 100 + i as u64;
                let (payload, pending, _) = f.encode_fetch(&asked).unwrap();
                let seen = l.decode_fetch(payload, 2, fetch_id).unwrap();
                let mut want_seen: Vec<_> = asked
                    .iter()
                    .map(|(t, r)| (t.clone(), FetchRequest { correlation_id: fetch_id, ..*r }))
                    .collect();
                want_seen.sort_by(|a, b| a.0.cmp(&b.0));
                prop_assert_eq!(&seen, &want_seen);
                let answers: Vec<_> = seen.iter().map(|(t, _)| (t.clone(), answer_of(t))).collect();
                let (chunks, _) = l.encode_response(&answers).unwrap();
                let (mut got, _) = f.decode_response(join(chunks), pending).unwrap();
                got.sort_by(|a, b| a.0.cmp(&b.0));
                let mut want: Vec<_> = asked
                    .iter()
                    .map(|(t, r)| (t.clone(), FetchResponse { correlation_id: r.correlation_id, ..answer_of(t) }))
                    .collect();
                want.sort_by(|a, b| a.0.cmp(&b.0));
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = LeaderSession::new().decode_fetch(Bytes::from(bytes.clone()), 2, 1);
            let mut f = FollowerSession::new();
            let (_, pending, _) = f.encode_fetch(&[(tp(0), request(1, 0))]).unwrap();
            let _ = f.decode_response(Bytes::from(bytes), pending);
        }
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut b = BytesMut::new();
        b.put_u32_le(u32::MAX);
        assert!(matches!(
            LeaderSession::new().decode_fetch(b.freeze(), 2, 1),
            Err(FetchRefused::Malformed(FrameError::Malformed { .. }))
        ));
    }
}
