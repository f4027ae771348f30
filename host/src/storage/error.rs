//! The one error type of the storage layer, native or plugin.

use crate::storage::OffsetBounds;

/// Why a plugin instance was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The plugin trapped (panic, `unreachable`, out of bounds, stack
    /// overflow, memory limit with `trap_on_grow_failure`).
    Trap,
    /// A call ran past its deadline.
    Deadline,
    /// The plugin answered something the contract forbids (wrong offsets,
    /// bad CRC, non-monotonic epochs, ...).
    Violation,
    /// The component could not be instantiated or its log opened.
    Instantiate,
    /// A truncation or prefix delete failed midway (e.g. an I/O error):
    /// the host can no longer know the log's state.
    FailedMutation,
    /// An earlier fault has not been recovered from yet.
    NeedsRecovery,
    /// The task that owns the instance is gone.
    Closed,
    /// A batch read back failed its CRC or framing check: the stored log
    /// is damaged from offset `from` (the damaged batch's start, or the
    /// read's offset, inside it, when it was the first batch read).
    Damaged { from: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("offset out of range: the log holds offsets {}..{}", .0.log_start, .0.log_end)]
    OffsetOutOfRange(OffsetBounds),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("i/o error: {0}")]
    Io(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{0}")]
    Other(String),
    /// The plugin instance failed and was dropped. Nothing more is written
    /// to the partition until [`PartitionLog::recover`] re-reads its state.
    ///
    /// [`PartitionLog::recover`]: crate::storage::PartitionLog::recover
    #[error("storage fault ({kind:?}) in plugin `{plugin}`: {detail}")]
    Fault {
        plugin: String,
        kind: FaultKind,
        detail: String,
    },
}

impl StorageError {
    /// The error variant's name, as the conformance suite reports it.
    pub fn variant(&self) -> &'static str {
        match self {
            StorageError::NotFound(_) => "not-found",
            StorageError::OffsetOutOfRange(_) => "offset-out-of-range",
            StorageError::Corrupt(_) => "corrupt",
            StorageError::Io(_) => "io",
            StorageError::Conflict(_) => "conflict",
            StorageError::Unavailable(_) => "unavailable",
            StorageError::InvalidInput(_) => "invalid-input",
            StorageError::Other(_) => "other",
            StorageError::Fault { .. } => "fault",
        }
    }

    pub fn is_fault(&self) -> bool {
        matches!(self, StorageError::Fault { .. })
    }
}

pub type StorageResult<T> = Result<T, StorageError>;
