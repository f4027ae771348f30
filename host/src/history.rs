//! A Jepsen-style history checker: what producers were told (acknowledged
//! writes) against what consumers and the replicas' final logs show.
//! Writes must carry unique values, so a value identifies its write.
//!
//! Anomalies it finds:
//! - **lost write**: acknowledged, yet in no replica's final log;
//! - **unseen at end**: acknowledged and in some replica's final log but
//!   missing from another's (a replica never converged);
//! - **inconsistent offset**: one (partition, offset) observed with two
//!   values (acks, reads and final logs all count);
//! - **duplicate**: one value at two offsets;
//! - **nonmonotonic read**: a reader saw an offset not above the last one
//!   it saw on that partition (its position went back).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;

/// One acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
    pub value: Bytes,
}

/// Records one reader got back from one poll, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub reader: String,
    pub partition: u32,
    pub records: Vec<(u64, Bytes)>,
}

/// A replica's whole committed log of a partition, read at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Final {
    pub replica: u32,
    pub partition: u32,
    pub records: Vec<(u64, Bytes)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    LostWrite {
        partition: u32,
        offset: u64,
    },
    UnseenAtEnd {
        partition: u32,
        offset: u64,
        missing_on: Vec<u32>,
    },
    InconsistentOffset {
        partition: u32,
        offset: u64,
        values: usize,
    },
    Duplicate {
        partition: u32,
        offsets: Vec<u64>,
    },
    NonMonotonic {
        reader: String,
        partition: u32,
        previous: u64,
        next: u64,
    },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::LostWrite { partition, offset } => {
                write!(
                    f,
                    "lost write: {partition}/{offset} was acknowledged and is on no replica"
                )
            }
            Anomaly::UnseenAtEnd {
                partition,
                offset,
                missing_on,
            } => write!(
                f,
                "unseen at end: {partition}/{offset} was acknowledged but replicas {missing_on:?} lack it"
            ),
            Anomaly::InconsistentOffset {
                partition,
                offset,
                values,
            } => write!(
                f,
                "inconsistent offset: {partition}/{offset} was seen with {values} values"
            ),
            Anomaly::Duplicate { partition, offsets } => {
                write!(
                    f,
                    "duplicate: one value at offsets {offsets:?} of partition {partition}"
                )
            }
            Anomaly::NonMonotonic {
                reader,
                partition,
                previous,
                next,
            } => write!(
                f,
                "nonmonotonic read: {reader} read {partition}/{next} after {partition}/{previous}"
            ),
        }
    }
}

/// Everything observed during a run.
#[derive(Debug, Default, Clone)]
pub struct History {
    pub acks: Vec<Ack>,
    pub reads: Vec<Read>,
    pub finals: Vec<Final>,
}

/// What [`History::check`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub acknowledged: usize,
    pub read_records: usize,
    pub anomalies: Vec<Anomaly>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.anomalies.is_empty()
    }
}

impl History {
    pub fn check(&self) -> Report {
        let mut anomalies = Vec::new();
        // Every observation of (partition, offset) -> value.
        let mut seen: BTreeMap<(u32, u64), BTreeSet<&Bytes>> = BTreeMap::new();
        // Every value -> the (partition, offset)s it was observed at.
        let mut places: BTreeMap<&Bytes, BTreeSet<(u32, u64)>> = BTreeMap::new();
        fn observe<'a>(
            seen: &mut BTreeMap<(u32, u64), BTreeSet<&'a Bytes>>,
            p: u32,
            o: u64,
            v: &'a Bytes,
        ) {
            seen.entry((p, o)).or_default().insert(v);
        }
        for a in &self.acks {
            observe(&mut seen, a.partition, a.offset, &a.value);
        }
        let mut read_records = 0;
        let mut position: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for r in &self.reads {
            for (o, v) in &r.records {
                read_records += 1;
                observe(&mut seen, r.partition, *o, v);
                let key = (r.reader.as_str(), r.partition);
                if let Some(prev) = position.get(&key)
                    && *o <= *prev
                {
                    anomalies.push(Anomaly::NonMonotonic {
                        reader: r.reader.clone(),
                        partition: r.partition,
                        previous: *prev,
                        next: *o,
                    });
                }
                position.insert(key, *o);
            }
        }
        for f in &self.finals {
            for (o, v) in &f.records {
                observe(&mut seen, f.partition, *o, v);
            }
        }
        for ((p, o), values) in &seen {
            if values.len() > 1 {
                anomalies.push(Anomaly::InconsistentOffset {
                    partition: *p,
                    offset: *o,
                    values: values.len(),
                });
            }
            for v in values {
                places.entry(*v).or_default().insert((*p, *o));
            }
        }
        for at in places.values() {
            if at.len() > 1 {
                let partition = at.iter().next().map_or(0, |(p, _)| *p);
                anomalies.push(Anomaly::Duplicate {
                    partition,
                    offsets: at.iter().map(|(_, o)| *o).collect(),
                });
            }
        }
        // Final logs: which replicas hold each acknowledged write.
        let mut replicas: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        let mut holds: BTreeMap<(u32, u64, u32), &Bytes> = BTreeMap::new();
        for f in &self.finals {
            replicas.entry(f.partition).or_default().insert(f.replica);
            for (o, v) in &f.records {
                holds.insert((f.partition, *o, f.replica), v);
            }
        }
        for a in &self.acks {
            let all = replicas.get(&a.partition).cloned().unwrap_or_default();
            let missing: Vec<u32> = all
                .iter()
                .copied()
                .filter(|r| holds.get(&(a.partition, a.offset, *r)) != Some(&&a.value))
                .collect();
            if missing.len() == all.len() {
                anomalies.push(Anomaly::LostWrite {
                    partition: a.partition,
                    offset: a.offset,
                });
            } else if !missing.is_empty() {
                anomalies.push(Anomaly::UnseenAtEnd {
                    partition: a.partition,
                    offset: a.offset,
                    missing_on: missing,
                });
            }
        }
        Report {
            acknowledged: self.acks.len(),
            read_records,
            anomalies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn log(replica: u32, values: &[&str]) -> Final {
        Final {
            replica,
            partition: 0,
            records: values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as u64, b(v)))
                .collect(),
        }
    }

    fn ack(offset: u64, v: &str) -> Ack {
        Ack {
            partition: 0,
            offset,
            value: b(v),
        }
    }

    #[test]
    fn a_clean_history_has_no_anomalies() {
        let h = History {
            acks: vec![ack(0, "a"), ack(1, "b")],
            reads: vec![Read {
                reader: "c1".into(),
                partition: 0,
                records: vec![(0, b("a")), (1, b("b"))],
            }],
            // An unacknowledged write may survive (it was in flight).
            finals: vec![log(1, &["a", "b", "c"]), log(2, &["a", "b", "c"])],
        };
        let r = h.check();
        assert!(r.ok(), "{:?}", r.anomalies);
        assert_eq!((r.acknowledged, r.read_records), (2, 2));
    }

    #[test]
    fn each_anomaly_is_found() {
        let h = History {
            acks: vec![ack(0, "a"), ack(1, "b"), ack(2, "x")],
            reads: vec![
                Read {
                    reader: "c1".into(),
                    partition: 0,
                    records: vec![(0, b("a")), (1, b("b"))],
                },
                Read {
                    reader: "c1".into(),
                    partition: 0,
                    records: vec![(1, b("b"))],
                },
            ],
            // "x" acked at 2 is on no replica; replica 2 lacks "b"; offset
            // 2 differs between ack and logs; "a" also sits at offset 3.
            finals: vec![log(1, &["a", "b", "y", "a"]), log(2, &["a"])],
        };
        let r = h.check();
        let kinds: BTreeSet<&str> = r
            .anomalies
            .iter()
            .map(|a| match a {
                Anomaly::LostWrite { .. } => "lost",
                Anomaly::UnseenAtEnd { .. } => "unseen",
                Anomaly::InconsistentOffset { .. } => "inconsistent",
                Anomaly::Duplicate { .. } => "duplicate",
                Anomaly::NonMonotonic { .. } => "nonmonotonic",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "duplicate",
                "inconsistent",
                "lost",
                "nonmonotonic",
                "unseen"
            ]
            .into_iter()
            .collect()
        );
        assert!(r.anomalies.contains(&Anomaly::LostWrite {
            partition: 0,
            offset: 2
        }));
        assert!(r.anomalies.contains(&Anomaly::UnseenAtEnd {
            partition: 0,
            offset: 1,
            missing_on: vec![2]
        }));
        assert!(r.anomalies.contains(&Anomaly::Duplicate {
            partition: 0,
            offsets: vec![0, 3]
        }));
        for a in &r.anomalies {
            assert!(!a.to_string().is_empty());
        }
    }
}
