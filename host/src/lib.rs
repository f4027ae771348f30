//! Replicator: Kafka-style replication of partitioned logs whose storage
//! and metadata backends are WebAssembly components.
//!
//! # Modules
//!
//! The replication itself, sans-IO (no tokio, quinn or wasmtime):
//! - [`core`]: one partition replica's state machine
//!   ([`core::ReplicationManager`]: leader, follower, ISR, high watermark,
//!   leader epochs, KIP-101/279/320 reconciliation), the fetch planner,
//!   failover decisions, metrics. Each call takes a clock value and queues
//!   [`core::Action`]s for its driver to carry out.
//! - [`batch`]: record batches as they cross the plugin boundary and the
//!   wire ([`batch::Validated`] is what a leader takes from a producer).
//!
//! Drivers around it:
//! - [`node`]: a whole node ([`node::run`]): the QUIC server, the fetcher,
//!   heartbeats and failover, the partitions' actors over their logs.
//! - [`client`]: [`client::Client`], for topics, produce, reads and status.
//! - [`producer`]: a producer that keeps several requests in flight, in order.
//! - [`storage`]: the batch-level [`storage::PartitionLog`] contract, the
//!   native in-memory log, and the reference API's message-level traits.
//! - [`plugin`]: the sandboxed wasmtime host that runs storage and metadata
//!   plugins ([`plugin::StoragePlugin`], [`plugin::MetadataPlugin`]).
//! - [`metadata`]: the metadata store contract (brokers, partition state
//!   by compare-and-set) the metadata plugins implement.
//! - [`transport`]: QUIC with mutual TLS (quinn, rustls), certificates
//!   ([`transport::tls::GeneratedCa`]); [`wire`]: the frames and messages on it.
//!
//! Tools: [`conformance`] (the storage conformance suite, `replicator
//! plugin check`), [`history`] (checks a produce/read history for lost or
//! duplicated acknowledged writes), [`durable_dir`] (fsynced directory
//! operations), [`ports`] (port choice and in-use hints).
//!
//! # Embedding a node
//!
//! `replicator cluster init --dir DIR --nodes 3` writes certificates and
//! one config per node (min.insync.replicas 2 for 3 or more nodes). A
//! program then runs a node and a client in process; see `docs/api-mapping.md`
//! for the reference API's names.
//!
//! ```no_run
//! use std::time::Duration;
//! use replicator::{batch::Record, client::Client, core::Acks, node};
//!
//! # async fn example() -> anyhow::Result<()> {
//! let config = node::NodeConfig::load("cluster/node-1.toml".as_ref())?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! // Stopped by completing the shutdown future (a controlled shutdown);
//! // dropping the future stops it as a crash would.
//! let running = tokio::spawn(node::run(config, async { let _ = stopped.await; }, None));
//!
//! let client = Client::new(&node::ClientConfig::load("cluster/client.toml".as_ref())?)?;
//! client.create_topic("orders", 1, 3, None).await?;
//! let records = [Record { value: "hello".into(), ..Default::default() }];
//! let offset = client
//!     .produce("orders", 0, &records, Acks::All, Duration::from_secs(30))
//!     .await?;
//! println!("committed at {offset}");
//! client.close().await;
//! let _ = stop.send(());
//! running.await??;
//! # Ok(())
//! # }
//! ```
//!
//! A [`node::NodeConfig`] built in code is checked by [`node::run`] as a
//! loaded one is, but its relative paths are not resolved against a
//! config file's directory ([`node::NodeConfig::load`] does that): they
//! are relative to the current directory. Its `[replication]` defaults are Kafka's, so
//! `min_insync_replicas` is 1 unless set: set it to 2 for replication
//! factor 3, as `cluster init` does, or acks=all waits for the leader
//! alone once the ISR has shrunk to it.
//!
//! # Driving the core yourself
//!
//! `tests/core_scenarios.rs` drives replicas in one thread (scripted
//! KIP-101/279/320 cases), and `tests/sim/` a whole cluster under a seeded
//! clock and network, each over an in-memory log of its own
//! (`tests/sim/storage.rs`): they show how each [`core::Action`] is
//! carried out and how results go back in. The node's own driver, over a
//! [`storage::PartitionLog`], is `host/src/node/partition.rs`.

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
