//! Listening ports for local clusters (the demo, the bench, the tests)
//! and the kernel's ephemeral port range they must stay out of.
//!
//! Why: every outgoing TCP connection takes a local port from the
//! ephemeral range and keeps it through TIME_WAIT (60 s on Linux) after it
//! closes. The etcd metadata plugin makes one connection per request, so a
//! cluster on etcd holds thousands of those ports at any time. A node whose
//! listening port lies in that range may find it taken when it restarts,
//! and then cannot start ("Address already in use"). Kafka's 9092 and
//! etcd's 2379 sit below the range for the same reason.

use std::net::{TcpListener, UdpSocket};
use std::ops::RangeInclusive;

/// Where the first candidate block starts; blocks are 100 ports apart.
const FIRST_BASE: u16 = 10_000;
const BLOCK: u16 = 100;

/// The kernel's ephemeral port range, where it can be read (Linux:
/// `/proc/sys/net/ipv4/ip_local_port_range`); `None` elsewhere or if
/// unreadable.
pub fn ephemeral_range() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_range(&text)
}

fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi).then_some(lo..=hi)
}

/// The ports of `ports` that lie in `range`, as the first and last one.
fn overlap(ports: RangeInclusive<u16>, range: &RangeInclusive<u16>) -> Option<(u16, u16)> {
    let lo = (*ports.start()).max(*range.start());
    let hi = (*ports.end()).min(*range.end());
    (lo <= hi).then_some((lo, hi))
}

/// A warning for listening ports `ports` if some lie in this machine's
/// ephemeral range; `None` if none do (or the range is unknown).
pub fn ephemeral_warning(ports: RangeInclusive<u16>) -> Option<String> {
    let range = ephemeral_range()?;
    let (lo, hi) = overlap(ports, &range)?;
    Some(format!(
        "ports {lo}-{hi} lie in this machine's ephemeral port range ({}-{}): an outgoing connection (or its TIME_WAIT) may hold one while its node is down, and the node then cannot restart; choose ports below {}",
        range.start(),
        range.end(),
        range.start()
    ))
}

/// More words for a failed bind of `addr`: when the port is in use and
/// lies in the ephemeral range, the [`ephemeral_warning`] for it (empty
/// otherwise).
pub fn in_use_hint(addr: std::net::SocketAddr, error: &std::io::Error) -> String {
    if error.kind() != std::io::ErrorKind::AddrInUse {
        return String::new();
    }
    ephemeral_warning(addr.port()..=addr.port()).map_or_else(String::new, |w| format!(" ({w})"))
}

/// A base port `b` such that UDP ports `b..b+n` and TCP ports
/// `b+tcp_offset..b+tcp_offset+n` are free right now and none of them is
/// in the ephemeral range. Candidates are blocks of 100 from 10000 up;
/// `start` picks the block tried first, so callers running in parallel
/// spread out instead of racing for the same block.
pub fn free_block(n: u16, tcp_offset: u16, start: u32) -> Option<u16> {
    let span = tcp_offset.checked_add(n)?;
    if span > BLOCK {
        return None;
    }
    let avoid = ephemeral_range();
    let bases: Vec<u16> = (FIRST_BASE..=u16::MAX - BLOCK)
        .step_by(BLOCK as usize)
        .filter(|b| {
            avoid
                .as_ref()
                .is_none_or(|r| overlap(*b..=b + span - 1, r).is_none())
        })
        .collect();
    if bases.is_empty() {
        return None;
    }
    let first = start as usize % bases.len();
    bases
        .iter()
        .cycle()
        .skip(first)
        .take(bases.len())
        .copied()
        .find(|&b| {
            (0..n).all(|i| UdpSocket::bind(("127.0.0.1", b + i)).is_ok())
                && (0..n).all(|i| TcpListener::bind(("127.0.0.1", b + tcp_offset + i)).is_ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_range_parses_and_bad_text_is_none() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("32768"), None);
        assert_eq!(parse_range("a b"), None);
    }

    #[test]
    fn overlap_is_the_shared_part() {
        assert_eq!(overlap(100..=200, &(150..=300)), Some((150, 200)));
        assert_eq!(overlap(100..=200, &(201..=300)), None);
        assert_eq!(overlap(7101..=7103, &(32768..=60999)), None);
    }

    #[test]
    fn a_port_in_use_in_the_ephemeral_range_gets_a_hint() {
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let low: std::net::SocketAddr = "127.0.0.1:7101".parse().unwrap();
        assert_eq!(in_use_hint(low, &in_use), "");
        if let Some(r) = ephemeral_range() {
            let inside = std::net::SocketAddr::from(([127, 0, 0, 1], *r.start()));
            assert!(in_use_hint(inside, &in_use).contains("ephemeral port range"));
            assert_eq!(in_use_hint(inside, &denied), "");
            assert!(ephemeral_warning(*r.start()..=*r.start() + 2).is_some());
        }
        assert_eq!(ephemeral_warning(7101..=7103), None);
    }

    #[test]
    fn free_blocks_stay_out_of_the_ephemeral_range_and_are_free() {
        let range = ephemeral_range();
        for start in [0, 7, 150, 1000] {
            let b = free_block(3, 50, start).expect("a free block");
            if let Some(r) = &range {
                assert!(overlap(b..=b + 52, r).is_none(), "{b} overlaps {r:?}");
            }
            assert!(UdpSocket::bind(("127.0.0.1", b)).is_ok());
            assert!(TcpListener::bind(("127.0.0.1", b + 50)).is_ok());
        }
        // A block a listener holds is skipped.
        let b = free_block(1, 0, 3).expect("a free block");
        let _held = UdpSocket::bind(("127.0.0.1", b)).expect("bind");
        assert_ne!(free_block(1, 0, 3), Some(b));
        assert_eq!(free_block(3, 98, 0), None, "a span over 100 ports");
    }
}
