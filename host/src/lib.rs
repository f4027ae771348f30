//! Replicator: Kafka-style replication of partitioned logs whose storage
//! and metadata backends are WebAssembly components.
//!
//! - [`batch`]: record batches as they cross the plugin boundary.
//! - [`storage`]: the batch-level `PartitionLog` contract, the native
//!   memory log, and the message-level traits of the reference API.
//! - [`plugin`]: the sandboxed wasmtime host that runs storage plugins.
//! - [`conformance`]: the storage conformance suite (`replicator plugin check`).

pub mod batch;
pub mod client;
pub mod conformance;
pub mod core;
pub mod durable_dir;
pub mod history;
pub mod metadata;
pub mod node;
pub mod plugin;
pub mod ports;
pub mod producer;
pub mod storage;
pub mod transport;
pub mod wire;
