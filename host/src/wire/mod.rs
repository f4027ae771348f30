//! The replication wire protocol (sans-IO): frames and the messages they
//! carry. The QUIC transport moves these bytes; nothing here does I/O.

pub mod frame;
pub mod messages;
pub mod rpc;
pub mod session;

pub use frame::{DEFAULT_MAX_PAYLOAD, Frame, FrameError, VERSION};
