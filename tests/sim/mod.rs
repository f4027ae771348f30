//! Deterministic simulation of a partition replicated by the real core:
//! N replicas; asynchronous simulated storage (machine crashes lose what
//! was not flushed); a metadata store with compare-and-set that answers
//! after a delay and fences crashed brokers; a network with delay, loss,
//! reordering and partitions; crashes and restarts; acks=all producers.
//! The checker reads the committed prefix as a consumer would. Everything
//! is driven by one seeded RNG, so a seed replays exactly. After every step
//! the checker asserts the invariants of `shared/reference/kafka-semantics.md`;
//! after the faults stop, the cluster must acknowledge writes again and
//! every replica must converge (liveness).

pub mod checker;
pub mod cluster;
pub mod rng;
pub mod storage;

pub use cluster::{Options, Sim};
