//! `read_frame` over a real QUIC stream between two endpoints of this
//! process: frames larger than its first allocation, back to back on one
//! stream and written in uneven pieces, come back byte for byte and are not
//! read into each other; a frame cut short is an error that says where.

use std::net::SocketAddr;

use super::*;
use crate::transport::tls::GeneratedCa;
use crate::wire::rpc::kind as rpc_kind;

fn material(dir: &std::path::Path, ca: &GeneratedCa, id: Identity) -> TlsMaterial {
    let (cert, key) = ca.issue(id).expect("issue");
    let name = id.dns_name();
    let paths = TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&paths.ca, &ca.cert_pem).expect("write ca");
    std::fs::write(&paths.cert, cert).expect("write cert");
    std::fs::write(&paths.key, key).expect("write key");
    TlsMaterial::load(&paths).expect("load tls")
}

/// A byte pattern that differs at every offset a misplaced copy would land.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

#[tokio::test]
async fn frames_beyond_the_first_allocation_arrive_whole_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = GeneratedCa::new("read-frame").expect("ca");
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let bind = |id, serve| {
        Transport::bind(loopback, &material(dir.path(), &ca, id), id, serve).expect("bind")
    };
    let server = bind(Identity::Node(1), true);
    let client = bind(Identity::Node(2), false);
    let addr = server.local_addr().expect("addr");

    let big = pattern(2 * FIRST_ALLOC + 12_345, 1);
    // Past 8 times the first allocation: the buffer grows in steps.
    let huge = pattern(40 * FIRST_ALLOC + 3, 5);
    // Just past the first allocation: growing a buffer by a little can
    // give it room for much more, which must not be read into.
    let mid = pattern(FIRST_ALLOC + 10, 4);
    let small = pattern(3, 2);
    let cut_len = FIRST_ALLOC + 4096;
    let cut_sent = FIRST_ALLOC + 100;
    let cut = pattern(cut_sent, 3);

    let writer = {
        let (big, huge, mid, small, cut) = (
            big.clone(),
            huge.clone(),
            mid.clone(),
            small.clone(),
            cut.clone(),
        );
        let endpoint = client.endpoint().clone();
        tokio::spawn(async move {
            let conn = endpoint
                .connect(addr, &Identity::Node(1).dns_name())
                .expect("connect")
                .await
                .expect("handshake");
            let (mut send, _recv) = conn.open_bi().await.expect("open");
            let mut bytes = Vec::new();
            for (payload, declared) in [
                (&big, big.len()),
                (&huge, huge.len()),
                (&mid, mid.len()),
                (&small, small.len()),
                (&cut, cut_len),
            ] {
                let header = frame::header(rpc_kind::REQUEST, declared).expect("header");
                bytes.extend_from_slice(&header);
                bytes.extend_from_slice(payload);
            }
            // Uneven pieces, so frame boundaries fall inside writes.
            for piece in bytes.chunks(7_001) {
                send.write_all(piece).await.expect("write");
            }
            send.finish().expect("finish");
            // Keep the connection open until the reader is done with it.
            conn.closed().await;
        })
    };

    let conn = server
        .endpoint()
        .accept()
        .await
        .expect("incoming")
        .await
        .expect("accept");
    let (_send, mut recv) = conn.accept_bi().await.expect("stream");
    for (name, want) in [
        ("big", &big),
        ("huge", &huge),
        ("mid", &mid),
        ("small", &small),
    ] {
        let (kind, got) = read_frame(&mut recv, frame::DEFAULT_MAX_PAYLOAD)
            .await
            .unwrap_or_else(|e| panic!("the {name} frame: {e}"))
            .unwrap_or_else(|| panic!("the stream ended before the {name} frame"));
        assert_eq!(kind, rpc_kind::REQUEST);
        assert_eq!(got.len(), want.len(), "the {name} frame's length");
        assert!(got[..] == want[..], "the {name} frame's bytes differ");
    }
    match read_frame(&mut recv, frame::DEFAULT_MAX_PAYLOAD).await {
        Err(TransportError::Read(why)) => assert_eq!(
            why,
            format!("stream ended {cut_sent} bytes into a {cut_len}-byte frame")
        ),
        other => panic!("expected a cut-short frame, got {other:?}"),
    }
    conn.close(0u32.into(), b"done");
    writer.await.expect("writer");
}

#[test]
fn a_buffer_never_reserves_more_than_eight_times_what_arrived() {
    for len in [
        FIRST_ALLOC + 1,
        1 << 20,
        (1 << 20) + 99,
        8 * FIRST_ALLOC + 1,
        64 << 20,
    ] {
        let mut filled = FIRST_ALLOC.min(len);
        let mut steps = 0;
        while filled < len {
            let cap = grown(filled, len);
            assert!(
                cap > filled && cap <= len,
                "{filled} of {len}: grew to {cap}"
            );
            assert!(cap <= 8 * filled, "{filled} of {len}: grew to {cap}");
            filled = cap;
            steps += 1;
        }
        // What the data path sends (fetch answers up to 1 MiB and change)
        // grows once.
        if len <= 2 << 20 {
            assert_eq!(steps, 1, "{len}");
        }
    }
}
