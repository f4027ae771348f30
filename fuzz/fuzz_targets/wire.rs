//! Every decoder a peer's bytes reach: frames (header checks and the
//! cap), fetch-session messages on both ends (with session state carried
//! from frame to frame, as on a real stream), and RPC headers. None may
//! panic or allocate past the frame cap, whatever the input.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use replicator::core::{FetchRequest, TopicPartition};
use replicator::wire::session::{FollowerSession, LeaderSession};
use replicator::wire::{frame, rpc};

fn asked() -> Vec<(TopicPartition, FetchRequest)> {
    (0..3)
        .map(|p| {
            (
                TopicPartition::new("t", p),
                FetchRequest {
                    replica_id: 2,
                    replica_epoch: 1,
                    correlation_id: u64::from(p),
                    current_leader_epoch: 1,
                    fetch_offset: 0,
                    last_fetched_epoch: None,
                    max_bytes: 1 << 20,
                    min_bytes: 1,
                    max_wait_ms: 500,
                },
            )
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut leader = LeaderSession::new();
    let mut follower = FollowerSession::new();
    let asked = asked();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = frame::decode(&mut buf, 1 << 20) {
        let _ = leader.decode_fetch(f.payload.clone(), 2, 1);
        if let Ok((_, pending, _)) = follower.encode_fetch(&asked) {
            let _ = follower.decode_response(f.payload.clone(), pending);
        }
        let _ = rpc::decode::<rpc::Request>(f.payload.clone());
        let _ = rpc::decode::<rpc::Response>(f.payload);
    }
    let raw = Bytes::copy_from_slice(data);
    let _ = LeaderSession::new().decode_fetch(raw.clone(), 2, 1);
    let _ = rpc::decode::<rpc::Request>(raw);
});
