//! The follower broker's fetch scheduler (the reference API's `Fetcher`):
//! takes the per-partition fetches its replicas ask for and sends them as
//! multi-partition fetches, one stream of them per (leader, fetcher
//! thread), with at most `max_inflight_fetches` outstanding on each and
//! `fetch_backoff_ms` after a failure. Sans-IO like the rest of the core.

use std::collections::{BTreeMap, BTreeSet};

use super::config::Config;
use super::types::{FetchRequest, ReplicaId};

/// How long the next fetch to a leader waits for the partitions of the
/// previous response to ask again.
pub const GATHER_MS: u64 = 20;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: u32) -> Self {
        TopicPartition {
            topic: topic.to_string(),
            partition,
        }
    }

    /// The fetcher thread serving this partition: a stable hash.
    fn thread(&self, threads: u32) -> u32 {
        // FNV-1a: stable across runs and platforms, unlike the std hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in self
            .topic
            .as_bytes()
            .iter()
            .chain(&self.partition.to_le_bytes())
        {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h % threads.max(1)
    }
}

/// One multi-partition fetch to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiFetch {
    pub id: u64,
    pub to: ReplicaId,
    pub thread: u32,
    pub partitions: Vec<(TopicPartition, FetchRequest)>,
}

#[derive(Debug)]
struct Target {
    leader: ReplicaId,
    queued: Option<FetchRequest>,
    backoff_until: u64,
}

#[derive(Debug)]
pub struct Fetcher {
    config: Config,
    partitions: BTreeMap<TopicPartition, Target>,
    /// Outstanding fetch id -> (leader, thread, partitions in it).
    inflight: BTreeMap<u64, (ReplicaId, u32, BTreeSet<TopicPartition>)>,
    /// After a response: the partitions it carried, per (leader, thread),
    /// and until when to wait for them to ask again (see [`GATHER_MS`]).
    gathering: BTreeMap<(ReplicaId, u32), (BTreeSet<TopicPartition>, u64)>,
    next_id: u64,
}

impl Fetcher {
    pub fn new(config: Config) -> Self {
        Fetcher {
            config,
            partitions: BTreeMap::new(),
            inflight: BTreeMap::new(),
            gathering: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// Replicate `tp` from `leader` (replacing any earlier leader). A fetch
    /// still queued for the old leader is returned: tell its replica with
    /// `fetch_failed`, or it waits for an answer that never comes. A fetch
    /// in flight to the old leader no longer holds `tp` back: a dead
    /// leader's fetch may not end until the connection times out, and the
    /// replica ignores its late answer (stale correlation id).
    pub fn add_partition(&mut self, tp: TopicPartition, leader: ReplicaId) -> Option<FetchRequest> {
        if self.partitions.get(&tp).is_some_and(|t| t.leader != leader) {
            self.release_inflight(&tp);
        }
        let old = self.partitions.insert(
            tp,
            Target {
                leader,
                queued: None,
                backoff_until: 0,
            },
        );
        old.and_then(|t| t.queued)
    }

    /// Stop replicating `tp`; returns its queued fetch, as `add_partition`.
    /// A fetch still in flight no longer holds `tp` (it may follow again
    /// before that fetch ends).
    pub fn remove_partition(&mut self, tp: &TopicPartition) -> Option<FetchRequest> {
        self.release_inflight(tp);
        self.partitions.remove(tp).and_then(|t| t.queued)
    }

    /// No fetch in flight holds `tp` back any more.
    fn release_inflight(&mut self, tp: &TopicPartition) {
        for (_, _, set) in self.inflight.values_mut() {
            set.remove(tp);
        }
    }

    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// A replica asked to fetch (its `Action::SendFetch`). A newer request
    /// for the same partition replaces a queued one. An unknown partition
    /// gives the request back (answer it with `fetch_failed`).
    pub fn enqueue(
        &mut self,
        tp: &TopicPartition,
        request: FetchRequest,
    ) -> Result<(), FetchRequest> {
        match self.partitions.get_mut(tp) {
            Some(t) => {
                t.queued = Some(request);
                Ok(())
            }
            None => Err(request),
        }
    }

    fn busy(&self, leader: ReplicaId, thread: u32) -> usize {
        self.inflight
            .values()
            .filter(|(l, t, _)| *l == leader && *t == thread)
            .count()
    }

    /// The fetches to send now: queued requests grouped per (leader,
    /// thread), within the in-flight limit, skipping partitions in backoff.
    pub fn poll(&mut self, now: u64) -> Vec<MultiFetch> {
        let threads = self.config.num_fetcher_threads;
        let mut groups: BTreeMap<(ReplicaId, u32), Vec<TopicPartition>> = BTreeMap::new();
        let in_flight: BTreeSet<&TopicPartition> =
            self.inflight.values().flat_map(|(_, _, s)| s).collect();
        for (tp, t) in &self.partitions {
            if t.queued.is_some() && now >= t.backoff_until && !in_flight.contains(tp) {
                groups
                    .entry((t.leader, tp.thread(threads)))
                    .or_default()
                    .push(tp.clone());
            }
        }
        let mut out = Vec::new();
        for ((leader, thread), tps) in groups {
            if self.busy(leader, thread) >= self.config.max_inflight_fetches as usize {
                continue;
            }
            if let Some((expected, until)) = self.gathering.get(&(leader, thread)) {
                let missing = expected.iter().any(|tp| {
                    self.partitions
                        .get(tp)
                        .is_some_and(|t| t.leader == leader && t.queued.is_none())
                });
                if missing && now < *until {
                    continue; // still gathering the last response's partitions
                }
                self.gathering.remove(&(leader, thread));
            }
            let partitions: Vec<(TopicPartition, FetchRequest)> = tps
                .into_iter()
                .filter_map(|tp| {
                    let req = self.partitions.get_mut(&tp)?.queued.take()?;
                    Some((tp, req))
                })
                .collect();
            self.next_id += 1;
            let set = partitions.iter().map(|(tp, _)| tp.clone()).collect();
            self.inflight.insert(self.next_id, (leader, thread, set));
            out.push(MultiFetch {
                id: self.next_id,
                to: leader,
                thread,
                partitions,
            });
        }
        out
    }

    /// The next time after `now` at which [`poll`](Self::poll) may send a
    /// fetch it would not send at `now`, with no call in between: a queued
    /// partition's backoff ending, or a wait for the last response's
    /// partitions running out. `None`: only a call (enqueue, an answer)
    /// can change what `poll` sends. Like quinn-proto's `poll_timeout`, so
    /// a driver sleeps until then instead of polling on a timer. Every
    /// time it returns is after `now`, so a driver that polls at it and
    /// asks again never spins.
    pub fn next_deadline(&self, now: u64) -> Option<u64> {
        let backoffs = self
            .partitions
            .values()
            .filter(|t| t.queued.is_some())
            .map(|t| t.backoff_until);
        let gathers = self.gathering.values().map(|(_, until)| *until);
        backoffs.chain(gathers).filter(|&at| at > now).min()
    }

    /// The response to fetch `id` arrived at `now` (hand each partition's
    /// part to its replica). The next fetch to that leader waits until
    /// those partitions have asked again, for at most [`GATHER_MS`]: one
    /// that is still appending what it got would otherwise miss the next
    /// fetch and wait behind its long poll (Kafka's fetcher thread builds
    /// the next request only after processing the whole response).
    pub fn completed(&mut self, id: u64, now: u64) {
        if let Some((leader, thread, tps)) = self.inflight.remove(&id) {
            self.gathering
                .insert((leader, thread), (tps, now.saturating_add(GATHER_MS)));
        }
    }

    /// Fetch `id` failed (timeout, connection lost): its partitions back
    /// off, and their replicas must be told with `fetch_failed`.
    pub fn failed(&mut self, id: u64, now: u64) -> Vec<TopicPartition> {
        let Some((_, _, tps)) = self.inflight.remove(&id) else {
            return Vec::new();
        };
        for tp in &tps {
            if let Some(t) = self.partitions.get_mut(tp) {
                t.backoff_until = now + self.config.fetch_backoff_ms;
            }
        }
        tps.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(offset: u64) -> FetchRequest {
        FetchRequest {
            replica_id: 2,
            replica_epoch: 1,
            correlation_id: offset,
            current_leader_epoch: 1,
            fetch_offset: offset,
            last_fetched_epoch: None,
            max_bytes: 1024,
            min_bytes: 1,
            max_wait_ms: 100,
        }
    }

    #[test]
    fn groups_per_leader_and_thread_within_inflight_limits() {
        let config = Config {
            num_fetcher_threads: 2,
            max_inflight_fetches: 1,
            ..Config::default()
        };
        let mut f = Fetcher::new(config);
        for p in 0..6 {
            f.add_partition(TopicPartition::new("t", p), if p < 4 { 1 } else { 3 });
            f.enqueue(&TopicPartition::new("t", p), req(u64::from(p)))
                .unwrap();
        }
        let sent = f.poll(0);
        // Leader 1 and leader 3, each split over at most 2 threads.
        assert!(sent.len() >= 2 && sent.len() <= 4, "{sent:?}");
        let total: usize = sent.iter().map(|m| m.partitions.len()).sum();
        assert_eq!(total, 6, "every queued partition goes out once");
        for m in &sent {
            assert!(
                m.partitions
                    .iter()
                    .all(|(tp, _)| (tp.partition < 4) == (m.to == 1))
            );
        }
        // One in flight per (leader, thread): nothing more until answered.
        for p in 0..6 {
            f.enqueue(&TopicPartition::new("t", p), req(10 + u64::from(p)))
                .unwrap();
        }
        assert!(f.poll(1).is_empty());
        f.completed(sent[0].id, 0);
        let next = f.poll(2);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].to, sent[0].to);
        assert_eq!(next[0].thread, sent[0].thread);
    }

    #[test]
    fn a_new_leader_is_fetched_from_while_the_old_leaders_fetch_hangs() {
        let mut f = Fetcher::new(Config::default());
        let tp = TopicPartition::new("t", 0);
        f.add_partition(tp.clone(), 1);
        f.enqueue(&tp, req(0)).unwrap();
        let hung = f.poll(0);
        assert_eq!(hung.len(), 1);
        // Leader 1 died with the fetch outstanding; node 2 was elected.
        assert_eq!(f.add_partition(tp.clone(), 2), None);
        f.enqueue(&tp, req(1)).unwrap();
        let sent = f.poll(1);
        assert_eq!(sent.len(), 1, "the hung fetch must not hold the partition");
        assert_eq!(sent[0].to, 2);
        // The old fetch failing later changes nothing for the partition.
        assert!(f.failed(hung[0].id, 5).is_empty());
    }

    #[test]
    fn failures_back_off() {
        let config = Config {
            fetch_backoff_ms: 100,
            ..Config::default()
        };
        let mut f = Fetcher::new(config);
        let tp = TopicPartition::new("t", 0);
        f.add_partition(tp.clone(), 1);
        f.enqueue(&tp, req(0)).unwrap();
        let sent = f.poll(0);
        assert_eq!(f.failed(sent[0].id, 10), vec![tp.clone()]);
        f.enqueue(&tp, req(0)).unwrap();
        assert!(f.poll(50).is_empty(), "still backing off");
        assert_eq!(f.poll(110).len(), 1);
        // Re-targeting hands back what was queued; unknown partitions refuse.
        f.enqueue(&tp, req(1)).unwrap();
        assert_eq!(
            f.add_partition(tp.clone(), 2).map(|r| r.fetch_offset),
            Some(1)
        );
        assert!(f.enqueue(&TopicPartition::new("other", 0), req(2)).is_err());
    }

    /// A driver that polls only after a call and at `next_deadline`
    /// sends the same fetches at the same times as one that polls every
    /// millisecond, over random enqueues, answers, failures and leader
    /// moves.
    #[test]
    fn polling_at_the_next_deadline_misses_nothing() {
        use proptest::prelude::*;
        #[derive(Debug, Clone)]
        enum Op {
            Enqueue(u32),
            Complete(usize),
            Fail(usize),
            Move(u32, ReplicaId),
        }
        let op = prop_oneof![
            4 => (0u32..6).prop_map(Op::Enqueue),
            2 => (0usize..4).prop_map(Op::Complete),
            1 => (0usize..4).prop_map(Op::Fail),
            1 => (0u32..6, 1u32..4).prop_map(|(p, l)| Op::Move(p, l)),
        ];
        let script = proptest::collection::vec((0u64..40, op), 1..60);
        proptest!(ProptestConfig::with_cases(300), |(script in script)| {
            let config = Config {
                fetch_backoff_ms: 37,
                max_inflight_fetches: 2,
                num_fetcher_threads: 2,
                ..Config::default()
            };
            let (mut every_ms, mut at_deadline) =
                (Fetcher::new(config.clone()), Fetcher::new(config));
            for f in [&mut every_ms, &mut at_deadline] {
                for p in 0..6 {
                    f.add_partition(TopicPartition::new("t", p), 1 + p % 2);
                }
            }
            let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
            let mut due: Option<u64> = None;
            let mut wakeups = 0;
            let mut now = 0;
            let apply = |f: &mut Fetcher, op: &Op, now: u64, sent: &[(u64, MultiFetch)]| {
                let inflight: Vec<u64> = sent
                    .iter()
                    .map(|(_, m)| m.id)
                    .filter(|id| f.inflight.contains_key(id))
                    .collect();
                match op {
                    Op::Enqueue(p) => {
                        let _ = f.enqueue(&TopicPartition::new("t", *p), req(now));
                    }
                    Op::Complete(i) => {
                        if let Some(id) = inflight.get(*i) {
                            f.completed(*id, now);
                        }
                    }
                    Op::Fail(i) => {
                        if let Some(id) = inflight.get(*i) {
                            f.failed(*id, now);
                        }
                    }
                    Op::Move(p, leader) => {
                        f.add_partition(TopicPartition::new("t", *p), *leader);
                    }
                }
            };
            for (gap, op) in &script {
                // Time passes: one driver polls each ms, the other only
                // at its deadlines.
                for _ in 0..*gap {
                    now += 1;
                    sent_a.extend(every_ms.poll(now).into_iter().map(|m| (now, m)));
                    if due.is_some_and(|d| d <= now) {
                        wakeups += 1;
                        sent_b.extend(at_deadline.poll(now).into_iter().map(|m| (now, m)));
                        due = at_deadline.next_deadline(now);
                        prop_assert!(due.is_none_or(|d| d > now), "a deadline that is already due spins");
                    }
                }
                // Both see the call and poll after it.
                apply(&mut every_ms, op, now, &sent_a);
                apply(&mut at_deadline, op, now, &sent_b);
                sent_a.extend(every_ms.poll(now).into_iter().map(|m| (now, m)));
                sent_b.extend(at_deadline.poll(now).into_iter().map(|m| (now, m)));
                due = at_deadline.next_deadline(now);
            }
            prop_assert_eq!(&sent_a, &sent_b);
            prop_assert!(wakeups <= sent_b.len() * 2 + script.len(), "{} wake-ups", wakeups);
        });
    }

    #[test]
    fn the_next_fetch_waits_for_the_last_responses_partitions() {
        let config = Config::default();
        let mut f = Fetcher::new(config);
        let (a, b) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        f.add_partition(a.clone(), 1);
        f.add_partition(b.clone(), 1);
        f.enqueue(&a, req(0)).unwrap();
        f.enqueue(&b, req(0)).unwrap();
        let sent = f.poll(0);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].partitions.len(), 2);
        f.completed(sent[0].id, 100);
        // `b` (empty answer) asks again at once; `a` is still appending.
        f.enqueue(&b, req(0)).unwrap();
        assert!(f.poll(101).is_empty(), "waits for `a` to ask again");
        f.enqueue(&a, req(5)).unwrap();
        let next = f.poll(102);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].partitions.len(), 2, "both in one fetch");
        // A partition that does not ask again (backing off) holds the
        // others back for at most GATHER_MS.
        f.completed(next[0].id, 200);
        f.enqueue(&b, req(0)).unwrap();
        assert!(f.poll(200 + GATHER_MS - 1).is_empty());
        let late = f.poll(200 + GATHER_MS);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].partitions.len(), 1);
    }
}
