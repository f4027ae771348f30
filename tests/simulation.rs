//! Seeded, deterministic simulation of the replication core (see
//! `tests/sim/`). `REPLICATOR_SIM_SEEDS=N` runs N seeds (CI: 500);
//! `REPLICATOR_SIM_SEED=S` replays one seed with its event trace.

mod sim;

use replicator::core::Faults;
use sim::{Options, Sim};

fn seeds() -> u64 {
    std::env::var("REPLICATOR_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// Run `opts` over the seed budget; the first failing seed, if any.
fn first_failure(opts: &Options) -> Option<(u64, String, Vec<String>)> {
    if let Some(seed) = std::env::var("REPLICATOR_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let mut sim = Sim::new(seed, opts.clone());
        return sim.run().err().map(|e| (seed, e, sim.trace));
    }
    (0..seeds()).find_map(|seed| {
        let mut sim = Sim::new(seed, opts.clone());
        sim.run().err().map(|e| (seed, e, sim.trace))
    })
}

/// How often the first 50 seeds' traces mention each of `what`.
fn exercised(opts: &Options, what: &[&str]) -> (u64, Vec<usize>) {
    let mut acked = 0;
    let mut counts = vec![0; what.len()];
    for seed in 0..seeds().min(50) {
        let mut sim = Sim::new(seed, opts.clone());
        let _ = sim.run();
        acked += sim.acked_count;
        for (n, w) in counts.iter_mut().zip(what) {
            *n += sim.trace.iter().filter(|t| t.contains(w)).count();
        }
    }
    (acked, counts)
}

#[test]
fn invariants_hold_across_seeds() {
    let opts = Options::default();
    // What the seeds exercised, so a run that silently stopped doing
    // anything interesting shows up.
    let (acked, n) = exercised(&opts, &[" elect ", "truncates", " cut "]);
    let (elections, truncations, cuts) = (n[0], n[1], n[2]);
    println!(
        "first 50 seeds: {acked} acks=all writes, {elections} elections, {truncations} truncations, {cuts} link cuts"
    );
    assert!(acked > 0 && elections > 50 && truncations > 0 && cuts > 0);
    assert_invariants(&opts);
}

/// Retention far below what a node accepts (`Config::validate` wants at
/// least `fetch_max_bytes`, 4 KiB here): 1 KiB per replica in segments of
/// 64 B, so deletions follow every few commits and the uncommitted tail
/// is often longer than what retention keeps. Safety must not depend on
/// the limit.
const TINY_RETENTION: u64 = 1024;

/// The same faults with retention on: replicas delete committed prefixes
/// while leaders fail, and followers that fall behind a leader's log start
/// restart there.
#[test]
fn invariants_hold_with_retention() {
    let opts = Options {
        retention_bytes: Some(TINY_RETENTION),
        ..Options::default()
    };
    let (acked, n) = exercised(&opts, &["deletes below", "resets to", " elect "]);
    let (deletions, resets, elections) = (n[0], n[1], n[2]);
    println!(
        "first 50 seeds: {acked} acks=all writes, {deletions} retention deletions, {resets} resets to a leader's log start, {elections} elections"
    );
    assert!(acked > 0 && deletions > 100 && resets > 0 && elections > 50);
    assert_invariants(&opts);
}

fn assert_invariants(opts: &Options) {
    if let Some((seed, err, trace)) = first_failure(opts) {
        let keep = std::env::var("REPLICATOR_SIM_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        let tail: Vec<_> = trace.iter().rev().take(keep).rev().collect();
        panic!(
            "seed {seed} failed: {err}\nreplay: REPLICATOR_SIM_SEED={seed} cargo test --release --test simulation\nlast events:\n{tail:#?}"
        );
    }
}

#[test]
fn the_simulation_makes_progress() {
    // A checker that passes because nothing happens proves nothing.
    let mut sim = Sim::new(7, Options::default());
    sim.run().expect("seed 7 runs clean");
    assert!(
        sim.acked_count > 100,
        "only {} acknowledged writes",
        sim.acked_count
    );
    assert!(
        sim.trace.iter().any(|t| t.contains("crash")),
        "no crash happened"
    );
    assert!(
        sim.trace.iter().filter(|t| t.contains("elect")).count() > 1,
        "no failover happened"
    );
}

/// Each negative control reintroduces a reference-package bug; the checker
/// must catch it within the seed budget.
fn must_be_caught(name: &str, opts: Options) {
    match first_failure(&opts) {
        Some((seed, err, _)) => println!("{name}: caught at seed {seed}: {err}"),
        None => panic!(
            "{name}: the checker did not catch the bug in {} seeds",
            seeds()
        ),
    }
}

#[test]
fn negative_control_retention_ignores_hw() {
    must_be_caught(
        "retention ignores the HW",
        Options {
            faults: Faults {
                retention_ignores_hw: true,
                ..Faults::default()
            },
            retention_bytes: Some(TINY_RETENTION),
            ..Options::default()
        },
    );
}

#[test]
fn negative_control_new_leader_truncates_to_hw() {
    must_be_caught(
        "leader truncates to HW",
        Options {
            faults: Faults {
                leader_truncates_to_hw: true,
                ..Faults::default()
            },
            ..Options::default()
        },
    );
}

#[test]
fn negative_control_hw_ignores_isr() {
    must_be_caught(
        "HW ignores the ISR",
        Options {
            faults: Faults {
                hw_ignores_isr: true,
                ..Faults::default()
            },
            ..Options::default()
        },
    );
}

#[test]
fn negative_control_follower_truncates_to_hw() {
    must_be_caught(
        "follower truncates to HW",
        Options {
            faults: Faults {
                follower_truncates_to_hw: true,
                ..Faults::default()
            },
            ..Options::default()
        },
    );
}

#[test]
fn negative_control_election_outside_isr() {
    must_be_caught(
        "election outside the ISR",
        Options {
            elect_outside_isr: true,
            ..Options::default()
        },
    );
}

/// KIP-966: the last ISR member may crash losing unflushed records while
/// a replica that left the ISR below min.insync (the ELR) still holds
/// them. The ELR member must lead, and the restarted one must not.
#[test]
fn eligible_replicas_keep_what_the_last_in_sync_replica_lost() {
    // More crashes and cuts than the default, so that the last ISR member
    // often fails while the ELR is not empty.
    let opts = kip966_faults();
    let (acked, n) = exercised(
        &opts,
        &["elect from the elr", "(intact false)", "elr [", "elr []"],
    );
    let (from_elr, not_intact) = (n[0], n[1]);
    let with_elr = n[2] - n[3];
    println!(
        "first 50 seeds: {acked} acks=all writes, {with_elr} events with a non-empty ELR, {from_elr} elections from the ELR, {not_intact} restarts that gave up claims with records lost"
    );
    assert!(from_elr > 0 && not_intact > 0 && with_elr > 0);
    assert_invariants(&opts);
}

#[test]
fn negative_control_a_sole_isr_member_leads_after_losing_records() {
    // Before KIP-966: nothing is eligible outside the ISR, and a restarted
    // sole ISR member leads with what its log kept; the replica that left
    // the ISR last truncates the acknowledged writes it held.
    must_be_caught(
        "a sole ISR member leads after losing records",
        Options {
            eligible_leaders: false,
            ..kip966_faults()
        },
    );
}

fn kip966_faults() -> Options {
    Options {
        crash_percent: 4,
        cut_percent: 4,
        ..Options::default()
    }
}

/// Controlled shutdown: half the node failures are graceful stops, in
/// which the node first hands leadership to an in-sync replica it heard
/// and leaves the ISR (the host's `FailoverCoordinator::step_down`), then
/// exits with its log flushed; among crashes, cuts and lossy links.
#[test]
fn controlled_shutdowns_lose_no_acknowledged_write() {
    let opts = controlled_stops();
    let (acked, n) = exercised(&opts, &["stops: hands over to", "stops: leaves the isr"]);
    println!(
        "first 50 seeds: {acked} acks=all writes, {} hand-overs by a stopping leader, {} stopping followers leaving the ISR",
        n[0], n[1]
    );
    assert!(acked > 0 && n[0] > 0 && n[1] > 0);
    assert_invariants(&opts);
}

#[test]
fn negative_control_a_stopping_leader_hands_over_outside_the_isr() {
    must_be_caught(
        "a stopping leader hands over outside the ISR",
        Options {
            hand_over_outside_isr: true,
            ..controlled_stops()
        },
    );
}

/// A rolling restart meets failures: a node stops or crashes while others
/// are down, until one is left (never two that lost unflushed data). The
/// ELR and the step-down decide through double faults the earlier tests
/// never reach.
#[test]
fn overlapping_stops_and_crashes_lose_no_acknowledged_write() {
    let opts = Options {
        overlap: true,
        ..controlled_stops()
    };
    let (acked, n) = exercised(
        &opts,
        &[
            "overlap: 1 down",
            "overlap: 1 down (lossy true)",
            "stops: hands over to",
            "elect from the elr",
        ],
    );
    println!(
        "first 50 seeds: {acked} acks=all writes, {} faults while another node was down ({} of them after a lossy crash), {} hand-overs by a stopping leader, {} elections from the ELR",
        n[0], n[1], n[2], n[3]
    );
    assert!(acked > 0 && n[0] > n[1] && n[1] > 0 && n[2] > 0 && n[3] > 0);
    assert_invariants(&opts);
}

/// Preferred leader election among crashes, stops and cuts: the leader
/// often hands a partition back to its preferred replica, which must hold
/// everything acknowledged.
#[test]
fn leader_rebalances_lose_no_acknowledged_write() {
    let opts = rebalancing();
    let (acked, n) = exercised(&opts, &["rebalance: "]);
    println!(
        "first 50 seeds: {acked} acks=all writes, {} hand-overs to the preferred replica",
        n[0]
    );
    assert!(acked > 0 && n[0] > 20);
    assert_invariants(&opts);
}

#[test]
fn negative_control_the_rebalance_hands_over_outside_the_isr() {
    must_be_caught(
        "the rebalance hands over outside the ISR",
        Options {
            prefer_outside_isr: true,
            ..rebalancing()
        },
    );
}

fn rebalancing() -> Options {
    Options {
        rebalance_percent: 5,
        overlap: true,
        ..controlled_stops()
    }
}

fn controlled_stops() -> Options {
    Options {
        crash_percent: 4,
        stop_percent: 50,
        ..Options::default()
    }
}
