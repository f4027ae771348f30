//! Deterministic simulation of a partition replicated by the real core:
//! N replicas, simulated storage and metadata store (compare-and-set),
//! a network with delay, loss, reordering and partitions, crashes and
//! restarts, acks=all producers and a consumer. Everything is driven by
//! one seeded RNG, so a seed replays exactly. After every step the
//! checker asserts the invariants of `shared/reference/kafka-semantics.md`.

pub mod checker;
pub mod cluster;
pub mod rng;
pub mod storage;

pub use cluster::{Options, Sim};
