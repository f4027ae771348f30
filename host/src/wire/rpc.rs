//! Control and client RPCs: one request and one response per QUIC stream.
//!
//! Payload layout: `u32 header length`, a JSON header ([`Request`] or
//! [`Response`]), then an opaque body (record batches for produce and
//! read), which is sliced out of the frame without a copy. JSON keeps the
//! control plane readable and versionable; the bulk bytes never go through
//! it. Decoding is bounded by the frame cap and never panics.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::frame::FrameError;
use crate::core::{Acks, ReplicaId};
use crate::metadata::PartitionState;

/// Longest a node parks a [`Request::Read`] waiting for new records.
pub const MAX_READ_WAIT_MS: u64 = 30_000;

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Frame kinds of the RPC streams (the fetch kinds are 1 and 2).
pub mod kind {
    pub const REQUEST: u8 = 10;
    pub const RESPONSE: u8 = 11;
}

/// Who a peer says it is in its hello; checked against its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Claim {
    Node { id: ReplicaId },
    Client,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first request on every connection.
    Hello { claim: Claim },
    CreateTopic {
        topic: String,
        partitions: u32,
        replication_factor: u32,
        /// min.insync.replicas for the topic; `None`: the nodes' default.
        #[serde(default)]
        min_insync: Option<u32>,
    },
    /// Body: one record batch (see [`crate::batch`]) holding the records;
    /// its base offset and epoch are ignored, the leader assigns them.
    Produce {
        topic: String,
        partition: u32,
        acks: Acks,
        timeout_ms: u64,
        /// Its place in its producer's order, for a producer with several
        /// requests in flight (the leader appends them in the order sent).
        /// Left out when `None` (one request in flight), so nodes from
        /// before it still take those; they refuse requests that carry it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sequence: Option<crate::core::Sequence>,
    },
    /// Committed records (below this replica's high watermark) from
    /// `offset`, whole batches within `max_bytes`. Served by any replica.
    Read {
        topic: String,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        /// With nothing committed from `offset` yet, answer once something
        /// is, or after this long with no records (a long poll, as a
        /// Kafka fetch's `max.wait.ms`; the node bounds it by
        /// [`MAX_READ_WAIT_MS`]). Left out when 0 (answer at once), so
        /// nodes from before it still take those reads.
        #[serde(default, skip_serializing_if = "is_zero")]
        max_wait_ms: u64,
    },
    /// An operator's unclean election (`replicator partition elect
    /// --unclean`), sent to `replica` itself: it leads the next epoch
    /// alone, with an empty ELR. Refused while the leader, or any in-sync
    /// or eligible replica, is alive (the failover elects those without
    /// losing writes), and while `replica` is not ready to lead.
    ElectUnclean {
        topic: String,
        partition: u32,
        replica: ReplicaId,
    },
    /// An operator's preferred leader election (`replicator partition
    /// elect --preferred`), sent to the partition's leader: it hands the
    /// partition to its preferred replica (the first in assignment order)
    /// now, as the leader rebalance would at its next check. Refused
    /// unless that replica is in the ISR, heard, and fetching caught up.
    ElectPreferred { topic: String, partition: u32 },
    /// This node's view of every partition it holds.
    Status {},
    /// Metadata: brokers and partitions as the store has them.
    Metadata {},
    /// Node to node only: "I am alive" (answered with the receiver's own
    /// [`Response::Heartbeat`]). `changed`: the sender just changed
    /// partition metadata (an election), so re-read it now. `suspects`:
    /// the nodes the sender counts as failed (a leader is replaced only
    /// once a majority does). Nodes from before it refuse the field: a
    /// sender that gets that refusal marks the peer as one without views
    /// (see [`crate::core::FailureDetector::mark_legacy`]) and sends
    /// without it. A stopping node sends none either.
    Heartbeat {
        broker_epoch: u64,
        #[serde(default)]
        changed: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        suspects: Option<Vec<ReplicaId>>,
    },
}

/// Errors a node answers with. `leader` hints where to retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum RpcError {
    #[error("node {node} is not the leader of this partition ({})", match leader {
        Some(l) => format!("node {l} leads it"),
        None => "no leader is known to it".to_string(),
    })]
    NotLeader {
        node: ReplicaId,
        leader: Option<ReplicaId>,
    },
    #[error("{}", unknown_partition(*.node, .topic, *.partition, .not_open.as_deref()))]
    UnknownPartition {
        node: ReplicaId,
        topic: String,
        partition: u32,
        /// The partition is assigned to the node, but its log does not
        /// open: why (the last attempt's error). Sent only when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_open: Option<String>,
    },
    #[error("topic {0} already exists")]
    TopicExists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not authorized: {0}")]
    Unauthorized(String),
    #[error("offset {offset} is out of range [{log_start}, {high_watermark}]")]
    OffsetOutOfRange {
        offset: u64,
        log_start: u64,
        high_watermark: u64,
    },
    /// A replication error code from the core (NotEnoughReplicas, timeouts,
    /// storage errors, ...).
    #[error("{code:?}: {message}")]
    Replication {
        code: crate::core::ErrorCode,
        message: String,
    },
    #[error("metadata store: {0}")]
    Metadata(String),
    #[error("node is shutting down")]
    ShuttingDown,
    /// The leader appended the records (or may have), then could not
    /// acknowledge them (a timeout, leadership lost, the ISR shrank, the
    /// node stopped): they may or may not survive. Never retried; clients
    /// report it as ambiguous.
    #[error("{code:?} after the append: {message}")]
    AfterAppend {
        code: crate::core::ErrorCode,
        message: String,
    },
}

impl RpcError {
    /// Whether retrying the same request is safe and may succeed: the
    /// node refused it before doing anything. Outcomes after an append
    /// (timeouts, leadership lost before the commit) are not: a retry
    /// could write the records twice.
    pub fn retriable(&self) -> bool {
        match self {
            RpcError::NotLeader { .. }
            | RpcError::UnknownPartition { .. }
            | RpcError::Metadata(_)
            | RpcError::ShuttingDown => true,
            RpcError::Replication { code, .. } => matches!(
                code,
                crate::core::ErrorCode::NotEnoughReplicas
                    | crate::core::ErrorCode::StorageBacklog
                    | crate::core::ErrorCode::OutOfOrderSequence
            ),
            _ => false,
        }
    }
}

fn unknown_partition(
    node: ReplicaId,
    topic: &str,
    partition: u32,
    not_open: Option<&str>,
) -> String {
    match not_open {
        Some(why) => {
            format!("node {node} cannot open its log of {topic}/{partition} (it retries): {why}")
        }
        None => format!("unknown topic or partition {topic}/{partition} on node {node}"),
    }
}

/// [`ReplicaStatus::role`] of a replica whose storage is being
/// recovered: it cannot lead, and its offsets may be from before the fault.
pub const ROLE_RECOVERING: &str = "recovering";

/// The message of the `StorageError` refusal a replica answers reads and
/// writes with while it recovers its log: the refusal passes (leadership
/// moves off it, or it comes back), unlike a damaged batch's.
pub const STORAGE_RECOVERING: &str = "storage is recovering";

/// A partition whose stored record could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadablePartition {
    pub topic: String,
    pub partition: u32,
    pub error: String,
}

/// A partition assigned to a node that could not open its log (it retries
/// with backoff), and why, for `status`: a replica missing from a node's
/// answer is otherwise a bare `?`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotOpen {
    pub topic: String,
    pub partition: u32,
    /// The last attempt's error.
    pub error: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// One replica's view of a partition, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub topic: String,
    pub partition: u32,
    pub node: ReplicaId,
    /// "leader", "follower", "idle" (no leader to follow, or stepped
    /// down), or [`ROLE_RECOVERING`] while its storage is being recovered
    /// after a fault.
    pub role: String,
    pub leader: Option<ReplicaId>,
    pub leader_epoch: Option<u32>,
    pub high_watermark: u64,
    pub log_start: u64,
    pub log_end: u64,
    /// The leader epoch of the newest batch in this replica's log
    /// ([`crate::core::EpochCache::last_written`]: a leader's own epoch
    /// counts once it wrote in it); `None` for an empty log. With the log
    /// end it says how up to date the log is, as Raft's last term and
    /// index do: what an unclean election compares (KIP-966).
    #[serde(default)]
    pub last_epoch: Option<u32>,
    /// The leader's ISR (empty on followers).
    pub isr: Vec<ReplicaId>,
    pub replicas: Vec<ReplicaId>,
    /// On the leader: each follower's log end as its fetches showed it.
    pub follower_log_ends: Vec<(ReplicaId, Option<u64>)>,
    /// While [`ROLE_RECOVERING`]: the storage fault it recovers from (a
    /// full disk shows here, not only in the node's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_fault: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Hello {
        node: ReplicaId,
    },
    Created {
        partitions: Vec<PartitionState>,
    },
    /// The offset of the first record; the rest follow contiguously.
    Produced {
        base_offset: u64,
        count: u32,
    },
    /// Body: whole batches; the reader drops records at or past
    /// `high_watermark`.
    Records {
        high_watermark: u64,
        log_start: u64,
        log_end: u64,
    },
    Status {
        node: ReplicaId,
        partitions: Vec<ReplicaStatus>,
        /// Partitions assigned to this node whose log does not open.
        /// Serialized only when there are some: a node or client from
        /// before the field refuses unknown fields.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        not_open: Vec<NotOpen>,
    },
    Metadata {
        brokers: Vec<crate::metadata::Broker>,
        partitions: Vec<PartitionState>,
        /// Brokers the answering node's failure detector counts as failed:
        /// a client does not send to a leader listed here, it waits for
        /// the election instead.
        #[serde(default)]
        failed: Vec<ReplicaId>,
        /// Partitions whose record the store holds but the node could not
        /// read (a corrupt file, a record that breaks the rules): left out
        /// of `partitions`, so that one bad record does not fail every
        /// request. Serialized only when there are some.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unreadable: Vec<UnreadablePartition>,
        /// Set when the node could not read the store (why): brokers and
        /// partitions are then its last view of it, as a Kafka broker
        /// answers from its metadata cache, so clients still find leaders
        /// while the store is down. A client prefers a fresh answer from
        /// another node. Sent only when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stale: Option<String>,
    },
    Heartbeat {
        node: ReplicaId,
        broker_epoch: u64,
        /// The nodes the answering node counts as failed (see
        /// [`Request::Heartbeat`]); only to a request that carried its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        suspects: Option<Vec<ReplicaId>>,
    },
    /// The state an unclean election wrote.
    Elected {
        state: PartitionState,
    },
    Error {
        error: RpcError,
    },
}

fn bad(what: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        what,
        why: why.into(),
    }
}

/// `header` as JSON, then `body`, in one buffer: a payload for tests and
/// tools that write a frame by hand. The transport sends [`frame_parts`].
pub fn encode<T: Serialize>(header: &T, body: &[u8]) -> Result<Bytes, FrameError> {
    let json = header_json(header)?;
    let mut out = BytesMut::with_capacity(json.len() + body.len());
    out.put_slice(&json);
    out.put_slice(body);
    Ok(out.freeze())
}

/// A whole RPC frame of `kind` as two parts to write back to back: the
/// frame header, the length and the JSON header in the first, `body` as it
/// is in the second. A produce's record batches go out without the copy
/// that [`encode`] makes.
pub fn frame_parts<T: Serialize>(
    kind: u8,
    header: &T,
    body: Bytes,
) -> Result<[Bytes; 2], FrameError> {
    let json = header_json(header)?;
    let frame_header = super::frame::header(kind, json.len() + body.len())?;
    let mut head = BytesMut::with_capacity(frame_header.len() + json.len());
    head.put_slice(&frame_header);
    head.put_slice(&json);
    Ok([head.freeze(), body])
}

/// The header's length, then the header as JSON.
fn header_json<T: Serialize>(header: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, header).map_err(|e| bad("rpc header", e.to_string()))?;
    let len = u32::try_from(out.len() - 4).map_err(|_| bad("rpc header", "over 4 GiB"))?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Split a payload into its decoded header and its body (no copy).
pub fn decode<T: for<'de> Deserialize<'de>>(mut payload: Bytes) -> Result<(T, Bytes), FrameError> {
    if payload.len() < 4 {
        return Err(bad("rpc", "shorter than its header length"));
    }
    let len = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    if len > payload.len() - 4 {
        return Err(bad(
            "rpc",
            format!("header of {len} bytes in a {}-byte payload", payload.len()),
        ));
    }
    let _ = payload.split_to(4);
    let json = payload.split_to(len);
    let header = serde_json::from_slice(&json).map_err(|e| bad("rpc header", e.to_string()))?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Refusals name nodes as an operator would, not as Rust's `Debug`
    /// prints an `Option` ("leader: None" read as a node named None).
    #[test]
    fn a_refusal_names_the_leader_in_words() {
        let e = |leader| RpcError::NotLeader { node: 1, leader }.to_string();
        assert_eq!(
            e(Some(2)),
            "node 1 is not the leader of this partition (node 2 leads it)"
        );
        assert_eq!(
            e(None),
            "node 1 is not the leader of this partition (no leader is known to it)"
        );
    }

    #[test]
    fn requests_round_trip_with_their_body() {
        let req = Request::Produce {
            topic: "t".into(),
            partition: 3,
            acks: Acks::All,
            timeout_ms: 500,
            sequence: None,
        };
        let wire = encode(&req, b"batch bytes").unwrap();
        let (back, body): (Request, Bytes) = decode(wire).unwrap();
        assert_eq!(back, req);
        assert_eq!(&body[..], b"batch bytes");
    }

    #[test]
    fn frame_parts_are_the_frame_encode_makes_with_the_body_not_copied() {
        let req = Request::Produce {
            topic: "t".into(),
            partition: 3,
            acks: Acks::All,
            timeout_ms: 500,
            sequence: None,
        };
        let body = Bytes::from(b"batch bytes".to_vec());
        let [head, out] = frame_parts(kind::REQUEST, &req, body.clone()).unwrap();
        assert_eq!(out.as_ptr(), body.as_ptr(), "the body is not copied");
        let mut wire = BytesMut::new();
        wire.put_slice(&head);
        wire.put_slice(&out);
        let frame = super::super::frame::decode(&mut wire, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(frame.kind, kind::REQUEST);
        assert_eq!(frame.payload, encode(&req, b"batch bytes").unwrap());
        assert!(
            wire.is_empty(),
            "the frame header's length covers both parts"
        );
    }

    #[test]
    fn a_decoded_body_is_the_only_handle_on_its_buffer() {
        // So a leader can restamp a produce's batches in place.
        let req = Request::Status {};
        let (_, body): (Request, Bytes) = decode(encode(&req, b"batch bytes").unwrap()).unwrap();
        assert!(body.is_unique());
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let wire = encode(&serde_json::json!({"type": "status", "extra": 1}), b"").unwrap();
        assert!(decode::<Request>(wire).is_err());
        let wire = encode(&serde_json::json!({"type": "format_disk"}), b"").unwrap();
        assert!(decode::<Request>(wire).is_err());
    }

    #[test]
    fn a_read_without_a_wait_is_sent_as_before_it_had_one() {
        // Nodes from before the long poll refuse unknown fields: a read
        // that does not wait must not carry the field.
        let read = |max_wait_ms| Request::Read {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            max_bytes: 1024,
            max_wait_ms,
        };
        let json = |r: &Request| serde_json::to_value(r).unwrap();
        assert_eq!(
            json(&read(0)),
            serde_json::json!({"type": "read", "topic": "t", "partition": 0, "offset": 7, "max_bytes": 1024})
        );
        assert_eq!(json(&read(500))["max_wait_ms"], 500);
        let old = encode(&json(&read(0)), b"").unwrap();
        assert_eq!(decode::<Request>(old).unwrap().0, read(0));
    }

    #[test]
    fn a_heartbeat_without_a_view_is_sent_as_before_views() {
        let hb = |suspects| Request::Heartbeat {
            broker_epoch: 3,
            changed: false,
            suspects,
        };
        let json = |r: &Request| serde_json::to_value(r).unwrap();
        assert_eq!(
            json(&hb(None)),
            serde_json::json!({"type": "heartbeat", "broker_epoch": 3, "changed": false})
        );
        // An empty view is still a view: sent, so the receiver knows.
        assert_eq!(json(&hb(Some(vec![])))["suspects"], serde_json::json!([]));
        let old = encode(&json(&hb(None)), b"").unwrap();
        assert_eq!(decode::<Request>(old).unwrap().0, hb(None));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<Request>(Bytes::from(bytes.clone()));
            let _ = decode::<Response>(Bytes::from(bytes));
        }
    }
}
