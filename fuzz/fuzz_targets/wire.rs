//! Every decoder a peer's bytes reach: frames (header checks and the
//! cap), multi-partition fetches and responses, and RPC headers. None may
//! panic or allocate past the frame cap, whatever the input.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use replicator::wire::{frame, messages, rpc};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = frame::decode(&mut buf, 1 << 20) {
        let _ = messages::decode_fetch(f.payload.clone());
        let _ = messages::decode_fetch_response(f.payload.clone());
        let _ = rpc::decode::<rpc::Request>(f.payload.clone());
        let _ = rpc::decode::<rpc::Response>(f.payload);
    }
    let raw = Bytes::copy_from_slice(data);
    let _ = messages::decode_fetch(raw.clone());
    let _ = messages::decode_fetch_response(raw.clone());
    let _ = rpc::decode::<rpc::Request>(raw);
});
