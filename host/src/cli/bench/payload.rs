//! Incompressible benchmark payloads: pseudo-random bytes from a seeded
//! splitmix64, so runs are repeatable and nothing on the path can win by
//! compressing.

use bytes::Bytes;
use replicator::batch::Record;

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `count` distinct requests of `per_request` records of `size` random
/// bytes each. Producers cycle through them; the values are built once, so
/// the client allocates no payload per message.
pub fn requests(count: usize, per_request: usize, size: usize, seed: u64) -> Vec<Vec<Record>> {
    (0..count)
        .map(|r| {
            (0..per_request)
                .map(|i| Record {
                    key: None,
                    value: Bytes::from(random_bytes(
                        size,
                        seed ^ ((r * per_request + i) as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
                    )),
                    timestamp: 0,
                    headers: Vec::new(),
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_repeatable_distinct_and_do_not_compress() {
        assert_eq!(random_bytes(100, 1), random_bytes(100, 1));
        assert_ne!(random_bytes(100, 1), random_bytes(100, 2));
        let reqs = requests(4, 3, 1024, 9);
        assert_eq!(reqs.len(), 4);
        assert!(reqs.iter().all(|r| r.len() == 3));
        assert_ne!(reqs[0][0].value, reqs[0][1].value);
        assert_ne!(reqs[0][0].value, reqs[1][0].value);
        // Random bytes: every byte value shows up, none dominates.
        let v = random_bytes(1 << 16, 3);
        let mut counts = [0u32; 256];
        for b in &v {
            counts[*b as usize] += 1;
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(min > Some(&150) && max < Some(&400), "{min:?} {max:?}");
    }
}
