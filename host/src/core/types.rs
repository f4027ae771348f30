//! Messages and outputs of the replication core: fetch requests and
//! responses, error codes, acks, and the actions a driver carries out.

use bytes::Bytes;

use crate::storage::EpochEntry;

pub type ReplicaId = u32;

/// Longest topic name, in bytes (Kafka's limit). Creation refuses longer
/// names, so a longer one on the wire is garbage.
pub const MAX_TOPIC_LEN: usize = 249;

/// The largest leader epoch a partition may reach: far above what
/// elections reach, with room below `u32::MAX` for the next ones and for
/// the jumps above a restored store (`node::shared::EPOCH_JUMP`). Epochs
/// only grow and are saturated, not wrapped, so a record or a log at
/// `u32::MAX` could never be led past; anything a plugin hands the host
/// above this is refused where it enters.
pub const MAX_LEADER_EPOCH: u32 = u32::MAX - (1 << 24);
/// Identifies one produce request to its caller.
pub type ProduceId = u64;

/// Kafka's error codes for replication and produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorCode {
    /// This replica is not the partition's leader.
    NotLeader,
    /// The requester's leader epoch is older than the leader's (KIP-320).
    FencedLeaderEpoch,
    /// The requester's leader epoch is newer than the leader's (KIP-320).
    UnknownLeaderEpoch,
    /// The fetch offset is outside the leader's log.
    OffsetOutOfRange,
    /// acks=all refused: the ISR is smaller than min.insync.replicas.
    NotEnoughReplicas,
    /// Appended, but the ISR shrank below min.insync.replicas before the
    /// write was committed: it may or may not survive.
    NotEnoughReplicasAfterAppend,
    /// The requester is not a replica of this partition.
    UnknownReplica,
    /// The fetch came from an older incarnation of the follower broker.
    StaleBrokerEpoch,
    /// A wait ran past its deadline.
    RequestTimedOut,
    /// The metadata store refused an ISR change without fencing the leader
    /// (stale version, or a member it will not admit).
    IsrUpdateRejected,
    /// The records could not be appended (storage fault, bad batch).
    StorageError,
    /// Refused before the append: the leader holds more appends than it
    /// accepts ahead of its storage. Retriable once the storage catches up.
    /// Also a fetch from an offset the leader took but has not stored yet.
    StorageBacklog,
    /// Refused before the append: a request of the same producer sent
    /// before this one has not arrived (see [`crate::core::Sequencer`]).
    /// Retriable: send it again (after the earlier one).
    OutOfOrderSequence,
}

/// How much replication a producer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Acks {
    /// No acknowledgement beyond acceptance.
    None,
    /// The leader appended it.
    Leader,
    /// Every ISR member has it (the high watermark passed it).
    All,
}

/// A follower's fetch for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub replica_id: ReplicaId,
    /// The follower broker's epoch (its incarnation, KIP-380): a fetch
    /// from an older incarnation is stale and refused.
    pub replica_epoch: u64,
    /// Matches the response to this request; stale responses are ignored.
    pub correlation_id: u64,
    /// The epoch the follower believes the leader has (KIP-320).
    pub current_leader_epoch: u32,
    pub fetch_offset: u64,
    /// Epoch of the last batch in the follower's log (KIP-595).
    pub last_fetched_epoch: Option<u32>,
    pub max_bytes: u32,
    pub min_bytes: u32,
    pub max_wait_ms: u64,
}

/// Where the follower's log diverges: `epoch` ends at `end_offset` on the
/// leader (KIP-595).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DivergingEpoch {
    pub epoch: u32,
    pub end_offset: u64,
}

/// Record batches in a fetch answer: whole batches in offset order, held
/// as pieces that are each a run of whole batches. A leader answers from
/// several recent appends by listing them, not by copying them into one
/// buffer; the wire carries the pieces back to back, so a follower always
/// receives one.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pieces: Vec<Bytes>,
}

impl Records {
    /// Total bytes of all pieces.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The pieces, in order; none is empty.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// Add a piece after the others (an empty one is dropped).
    pub fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.pieces.push(piece);
        }
    }

    /// The batches as one buffer: no copy when there is one piece.
    pub fn into_contiguous(mut self) -> Bytes {
        match self.pieces.len() {
            0 => Bytes::new(),
            1 => self.pieces.swap_remove(0),
            _ => Bytes::from(self.pieces.concat()),
        }
    }
}

impl From<Bytes> for Records {
    fn from(piece: Bytes) -> Self {
        let mut r = Records::default();
        r.push(piece);
        r
    }
}

/// Equal when the bytes are, however they are split into pieces.
impl PartialEq for Records {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .pieces
                .iter()
                .flat_map(|p| p.iter())
                .eq(other.pieces.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Records {}

/// The leader's answer. The driver fills `records` from the leader's log
/// as [`Action::RespondFetch`] describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResponse {
    pub correlation_id: u64,
    pub leader_epoch: u32,
    pub error: Option<ErrorCode>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    pub diverging_epoch: Option<DivergingEpoch>,
    pub records: Records,
}

/// What the driver reads from the leader's log for a fetch response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSpec {
    pub offset: u64,
    pub max_bytes: u32,
    /// Never return records at or past this offset (the leader's log end
    /// when the response was decided).
    pub end: u64,
}

/// What the core asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Append these batches; report with `log_appended`.
    Append { batches: Bytes },
    /// Remove everything at or after `offset`; report with `log_truncated`.
    Truncate { offset: u64 },
    /// Empty the log and restart it at `offset`; report with `log_reset`.
    ResetLog { offset: u64 },
    /// Delete the batches below `offset`, the new log start (retention;
    /// already below the HW); report with `log_prefix_deleted`.
    DeletePrefix { offset: u64 },
    /// Persist the leader-epoch cache.
    PersistEpochs(Vec<EpochEntry>),
    /// Persist the high watermark (a recovery hint).
    PersistHighWatermark(u64),
    /// Send a fetch to the leader.
    SendFetch {
        to: ReplicaId,
        request: FetchRequest,
    },
    /// Answer a follower's fetch, reading `read` from the log if present.
    RespondFetch {
        to: ReplicaId,
        response: FetchResponse,
        read: Option<ReadSpec>,
    },
    /// A produce finished: the base offset of its batch, or why not.
    ProduceDone {
        id: ProduceId,
        result: Result<u64, ErrorCode>,
    },
    /// A `wait_for_isr` finished: the HW passed the offset, or why not.
    IsrWaitDone {
        id: u64,
        result: Result<(), ErrorCode>,
    },
    /// Ask the metadata store to set the ISR, as a compare-and-set on the
    /// leader epoch and partition version; report with `isr_update_done`.
    UpdateIsr {
        leader_epoch: u32,
        isr: Vec<ReplicaId>,
        expected_version: u64,
        /// Broker epochs of members being added, as their fetches showed
        /// them: the store refuses a member whose broker epoch is not its
        /// current registration (KIP-903), so a stale fetch from before a
        /// crash cannot vouch for a restarted replica.
        added: Vec<(ReplicaId, u64)>,
    },
}
