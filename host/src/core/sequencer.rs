//! A leader's ordering of one partition's produce requests per producer:
//! Kafka's producer sequence numbers (KIP-98) for order, without the
//! deduplication. A producer with several requests in flight sends each
//! on its own QUIC stream, and the leader reads and checks each on its own
//! task, so a later small request can reach the partition before an
//! earlier large one. Each request carries the producer's id, its sequence
//! number, and the lowest sequence number the producer still waits for;
//! a request that arrives ahead of its turn waits here until the ones
//! before it were appended. Sans-IO: the partition actor drives it.
//!
//! No state needs to survive a leader change: every request says where
//! its producer's turn is (`first_unacked`), so a new leader starts there.

use std::collections::BTreeMap;

/// Where a produce request stands in its producer's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    /// Chosen at random by the producer, once.
    pub producer: u64,
    /// This request's number: 0, 1, 2, ... in the order sent.
    pub seq: u64,
    /// The lowest number the producer was still waiting for when it sent
    /// this attempt (every number below it was acknowledged, or failed
    /// and given up): the leader appends nothing of this producer's after
    /// a number at or above it until that one was appended.
    pub first_unacked: u64,
}

/// The longest a request waits for its turn before it is refused as
/// retriable (its own timeout, if shorter): a predecessor that failed for
/// good is given up by the producer, and its next attempt says so.
pub const MAX_WAIT_MS: u64 = 1_000;

/// Producers a partition remembers while none of their requests waits.
/// Forgetting one costs nothing: its next request says where it stands.
pub const MAX_PRODUCERS: usize = 10_000;

#[derive(Debug)]
struct Producer<T> {
    /// The next number to append.
    next: u64,
    /// Requests ahead of their turn: number -> (request, deadline).
    waiting: BTreeMap<u64, (T, u64)>,
    last_used: u64,
}

/// Per-producer order of a partition's produce requests. `T` is the
/// driver's request (with its reply channel).
#[derive(Debug)]
pub struct Sequencer<T> {
    producers: BTreeMap<u64, Producer<T>>,
    /// Requests waiting, over all producers: the driver asks after every
    /// event, so this answers without a walk.
    waiting: usize,
    /// Waiting attempts a newer attempt of the same number replaced: the
    /// driver refuses them (retriable, nothing appended).
    displaced: Vec<T>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Sequencer {
            producers: BTreeMap::new(),
            waiting: 0,
            displaced: Vec::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// A request of a number already passed: its producer gave it up
    /// (a later attempt said so) or it was appended, and no caller waits
    /// for it; appended now, it would land after its successors. Refuse it
    /// instead of calling [`arrive`](Self::arrive).
    pub fn is_late(&self, s: &Sequence) -> bool {
        self.producers
            .get(&s.producer)
            .is_some_and(|p| s.seq < p.next)
    }

    /// Attempts replaced by a newer attempt of the same number: refuse
    /// them (retriable, nothing appended).
    pub fn take_displaced(&mut self) -> Vec<T> {
        std::mem::take(&mut self.displaced)
    }

    /// A request arrived at `now`. Returned: the requests that may be
    /// appended now, in order (this one, if it is its turn; none if it
    /// must wait, until `deadline` at most). Call [`appended`] for each
    /// one the log took, before the next call.
    ///
    /// [`appended`]: Self::appended
    pub fn arrive(&mut self, s: Sequence, request: T, deadline: u64, now: u64) -> Vec<(u64, T)> {
        self.forget_idle();
        let p = self.producers.entry(s.producer).or_insert(Producer {
            next: s.first_unacked,
            waiting: BTreeMap::new(),
            last_used: now,
        });
        p.last_used = now;
        // Everything below `first_unacked` is settled: the producer will
        // not send it again.
        p.next = p.next.max(s.first_unacked.min(s.seq));
        let mut go = Vec::new();
        if s.seq == p.next {
            // Sent again while the first attempt still waited: the new
            // attempt goes (the old one's caller has its answer).
            if let Some((old, _)) = p.waiting.remove(&s.seq) {
                self.waiting -= 1;
                self.displaced.push(old);
            }
        } else if let Some((r, _)) = p.waiting.remove(&p.next) {
            // The producer gave up the numbers before one that waited.
            self.waiting -= 1;
            go.push((p.next, r));
        }
        if s.seq > p.next {
            match p.waiting.insert(s.seq, (request, deadline)) {
                Some((old, _)) => self.displaced.push(old),
                None => self.waiting += 1,
            }
        } else {
            // Its turn (or a number already passed, which a driver that
            // asks `is_late` first never hands in): appended now.
            go.push((s.seq, request));
        }
        go
    }

    /// The log took request `seq` of `producer`, or refused it for good
    /// (its producer gives it up): the next number's turn. Returned:
    /// requests that waited for it and may be appended now.
    pub fn appended(&mut self, producer: u64, seq: u64) -> Vec<(u64, T)> {
        let Some(p) = self.producers.get_mut(&producer) else {
            return Vec::new();
        };
        if seq >= p.next {
            p.next = seq + 1;
        }
        match p.waiting.remove(&p.next) {
            Some((request, _)) => {
                self.waiting -= 1;
                vec![(p.next, request)]
            }
            None => Vec::new(),
        }
    }

    /// Requests whose wait ran out by `now` (their predecessor never
    /// came): refuse them as retriable, nothing appended.
    pub fn expire(&mut self, now: u64) -> Vec<T> {
        let mut out = Vec::new();
        if self.waiting == 0 {
            return out;
        }
        for p in self.producers.values_mut() {
            let due: Vec<u64> = p
                .waiting
                .iter()
                .filter(|(_, (_, deadline))| *deadline <= now)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in due {
                if let Some((request, _)) = p.waiting.remove(&seq) {
                    out.push(request);
                }
            }
        }
        self.waiting -= out.len();
        out
    }

    /// The earliest deadline of a waiting request.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.waiting == 0 {
            return None;
        }
        self.producers
            .values()
            .flat_map(|p| p.waiting.values().map(|(_, d)| *d))
            .min()
    }

    /// Every waiting request (leadership lost, shutting down): refuse them.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        for p in self.producers.values_mut() {
            out.extend(std::mem::take(&mut p.waiting).into_values().map(|(r, _)| r));
        }
        self.waiting = 0;
        out
    }

    pub fn is_waiting(&self) -> bool {
        self.waiting > 0 || !self.displaced.is_empty()
    }

    /// Past [`MAX_PRODUCERS`], forget the least recently used producers
    /// that have nothing waiting.
    fn forget_idle(&mut self) {
        if self.producers.len() < MAX_PRODUCERS {
            return;
        }
        let mut idle: Vec<(u64, u64)> = self
            .producers
            .iter()
            .filter(|(_, p)| p.waiting.is_empty())
            .map(|(id, p)| (p.last_used, *id))
            .collect();
        idle.sort_unstable();
        let excess = self.producers.len() + 1 - MAX_PRODUCERS;
        for (_, id) in idle.into_iter().take(excess.max(MAX_PRODUCERS / 10)) {
            self.producers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(seq: u64, first_unacked: u64) -> Sequence {
        Sequence {
            producer: 7,
            seq,
            first_unacked,
        }
    }

    /// Arrivals in any order are appended in the order sent, and each
    /// exactly once.
    #[test]
    fn requests_are_appended_in_the_order_sent_whatever_order_they_arrive_in() {
        proptest!(ProptestConfig::with_cases(500), |(order in Just((0u64..12).collect::<Vec<_>>()).prop_shuffle())| {
            let mut q = Sequencer::default();
            let mut log = Vec::new();
            for &seq in &order {
                // The producer waits for 0 until 0 is acknowledged, and
                // nothing is acknowledged before everything was sent.
                let mut go = q.arrive(s(seq, 0), seq, 1000, 0);
                while let Some((n, r)) = go.pop() {
                    log.push(r);
                    go.extend(q.appended(7, n));
                }
            }
            prop_assert_eq!(log, (0..12).collect::<Vec<_>>());
            prop_assert!(!q.is_waiting());
            prop_assert_eq!(q.next_deadline(), None);
        });
    }

    /// Some first attempts are refused before the append (the log did
    /// not take them) and sent again later: still appended in the order
    /// sent, each once.
    #[test]
    fn refused_requests_sent_again_keep_their_place() {
        let script = (
            Just((0u64..10).collect::<Vec<_>>()).prop_shuffle(),
            proptest::collection::btree_set(0u64..10, 0..4),
            proptest::collection::vec(0usize..20, 4),
        );
        proptest!(ProptestConfig::with_cases(500), |((order, refused, at) in script)| {
            // Arrivals: every number once, and each refused one again at
            // some point after its first attempt.
            let mut arrivals: Vec<(u64, bool)> = order.iter().map(|&n| (n, false)).collect();
            for (k, &n) in refused.iter().enumerate() {
                let first = arrivals.iter().position(|(m, _)| *m == n).unwrap_or(0);
                let pos = (first + 1 + at[k]).min(arrivals.len());
                arrivals.insert(pos, (n, true));
            }
            let mut q = Sequencer::default();
            let mut log = Vec::new();
            for (n, retry) in arrivals {
                let mut go: std::collections::VecDeque<_> = q.arrive(s(n, 0), (n, retry), 1000, 0).into();
                // A first attempt the retry replaced while it waited: it
                // is refused, never appended.
                for (m, again) in q.take_displaced() {
                    prop_assert!(!again && refused.contains(&m));
                }
                while let Some((seq, (m, again))) = go.pop_front() {
                    prop_assert_eq!(seq, m);
                    if refused.contains(&m) && !again {
                        continue; // refused: nothing appended
                    }
                    log.push(m);
                    go.extend(q.appended(7, seq));
                }
            }
            prop_assert_eq!(log, (0..10).collect::<Vec<_>>());
            prop_assert!(!q.is_waiting());
        });
    }

    #[test]
    fn a_late_request_is_refused_and_a_replaced_attempt_is_handed_back() {
        let mut q = Sequencer::default();
        assert_eq!(q.arrive(s(0, 0), "a", 100, 0), vec![(0, "a")]);
        assert!(q.appended(7, 0).is_empty());
        // 0 again, after 1 was sent: nobody waits for it.
        assert!(q.is_late(&s(0, 0)));
        assert!(!q.is_late(&s(1, 1)));
        // 2 waits; a second attempt of 2 replaces the first, which is
        // handed back to be refused rather than dropped.
        assert!(q.arrive(s(2, 1), "c", 100, 0).is_empty());
        assert!(q.arrive(s(2, 1), "c again", 100, 1).is_empty());
        assert_eq!(q.take_displaced(), vec!["c"]);
        assert_eq!(q.arrive(s(1, 1), "b", 100, 2), vec![(1, "b")]);
        assert_eq!(q.appended(7, 1), vec![(2, "c again")]);
        assert!(!q.is_waiting());
    }

    #[test]
    fn a_request_waits_for_a_refused_predecessor_to_be_sent_again() {
        let mut q = Sequencer::default();
        // 0 arrives and is refused (not appended): 1 waits for it.
        assert_eq!(q.arrive(s(0, 0), "a", 100, 0), vec![(0, "a")]);
        assert!(q.arrive(s(1, 0), "b", 100, 0).is_empty());
        // 0's retry is appended, then 1.
        assert_eq!(q.arrive(s(0, 0), "a again", 100, 5), vec![(0, "a again")]);
        assert_eq!(q.appended(7, 0), vec![(1, "b")]);
        assert!(q.appended(7, 1).is_empty());
        assert!(!q.is_waiting());
    }

    #[test]
    fn a_wait_ends_at_its_deadline_or_when_the_producer_gives_up_the_gap() {
        let mut q = Sequencer::default();
        assert!(q.arrive(s(3, 2), "d", 50, 0).is_empty());
        assert_eq!(q.next_deadline(), Some(50));
        assert!(q.expire(49).is_empty());
        assert_eq!(q.expire(50), vec!["d"]);
        assert_eq!(q.next_deadline(), None);
        // The producer gave 2 up: its next attempt of 3 says so.
        assert_eq!(q.arrive(s(3, 3), "d again", 100, 60), vec![(3, "d again")]);
        // A request that waited goes once a later one says the gap was
        // given up; the later one waits for it.
        assert!(q.arrive(s(6, 4), "g", 100, 61).is_empty());
        assert_eq!(q.arrive(s(7, 6), "h", 100, 62), vec![(6, "g")]);
        assert_eq!(q.appended(7, 6), vec![(7, "h")]);
        // A new leader knows nothing, and starts where the request says.
        let mut fresh = Sequencer::default();
        assert!(fresh.arrive(s(5, 4), "f", 100, 0).is_empty());
        assert_eq!(fresh.arrive(s(4, 4), "e", 100, 0), vec![(4, "e")]);
        assert_eq!(fresh.appended(7, 4), vec![(5, "f")]);
        assert_eq!(fresh.drain(), Vec::<&str>::new());
    }

    #[test]
    fn producers_are_independent_and_idle_ones_are_forgotten() {
        let mut q = Sequencer::default();
        let other = Sequence {
            producer: 8,
            seq: 1,
            first_unacked: 1,
        };
        assert!(q.arrive(s(1, 0), "x", 100, 0).is_empty());
        assert_eq!(q.arrive(other, "y", 100, 0), vec![(1, "y")]);
        for id in 0..MAX_PRODUCERS as u64 + 5 {
            let idle = Sequence {
                producer: 1000 + id,
                seq: 0,
                first_unacked: 0,
            };
            q.arrive(idle, "z", 100, 1 + id);
        }
        assert!(q.producers.len() <= MAX_PRODUCERS);
        // The one with a request waiting is kept.
        assert_eq!(q.drain(), vec!["x"]);
    }
}
