//! The results of `replicator bench`: the ratios the benchmark issue sets
//! targets for, a table for people, JSON for machines, and an SVG bar chart.

use std::fmt::Write as _;

use anyhow::Context as _;
use serde::Serialize;

use super::fresh_memory::FreshMemory;
use super::raw_quinn::RawQuinn;
use super::workload::{FailoverResult, WorkloadResult};

#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub nodes: u32,
    pub replication_factor: u32,
    pub min_insync: u32,
    pub acks: &'static str,
    pub message_bytes: usize,
    pub warmup_s: f64,
    pub window_s: f64,
    pub cores: usize,
    /// Rounds measured; each figure is the best round's (see
    /// [`best_rounds`]).
    pub rounds: u32,
    /// Log each node keeps per partition (MiB); 0 keeps everything.
    pub retention_mb: u64,
    /// `--storage-config` settings given to the storage plugin.
    pub storage_config: Vec<(String, String)>,
    /// Worker threads each node runs (`node --worker-threads`).
    pub node_workers: usize,
}

/// A ratio with the target it is held to.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    /// `>=` or `<=`.
    pub op: &'static str,
    pub target: f64,
    pub met: bool,
    pub detail: String,
    /// With `--rounds` ≥ 2: the same ratio taken within each round, in
    /// order (see `Report::by_round`); the detail says against what.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_round: Vec<f64>,
}

impl Check {
    fn new(name: String, value: f64, op: &'static str, target: f64, detail: String) -> Check {
        let met = match op {
            ">=" => value >= target,
            _ => value <= target,
        };
        Check {
            name,
            value,
            op,
            target,
            met,
            detail,
            by_round: Vec::new(),
        }
    }

    /// Add the ratio round by round, `how` saying what each is taken
    /// against ("; round by round, <how>: 0.241, 0.266" in the detail).
    fn with_rounds(mut self, how: &str, ratios: Option<Vec<f64>>) -> Check {
        if let Some(r) = ratios {
            let each: Vec<String> = r.iter().map(|x| format!("{x:.3}")).collect();
            let _ = write!(self.detail, "; round by round, {how}: {}", each.join(", "));
            self.by_round = r;
        }
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub setup: Setup,
    /// The best raw-quinn run: the baseline the checks divide by.
    pub raw_quinn: RawQuinn,
    /// Every raw-quinn run, one at the start of each round, in order.
    pub raw_quinn_rounds: Vec<RawQuinn>,
    /// First touch of fresh memory on this machine (best round).
    pub fresh_memory: FreshMemory,
    /// The best round of each (storage, workload): what the table shows
    /// and the checks judge.
    pub workloads: Vec<WorkloadResult>,
    /// Every round as measured.
    pub all_rounds: Vec<WorkloadResult>,
    pub failover: Vec<FailoverResult>,
    pub checks: Vec<Check>,
}

/// The best round of each (storage, workload), in the order first run:
/// the highest MB/s, or for the latency floor (a) the lowest p99. A busy
/// neighbour, steal or a page-cache flush only ever makes a round worse,
/// so the best of several is the estimate of what this machine does; its
/// figures are kept together (one round's, never a mix).
pub fn best_rounds(all: &[WorkloadResult]) -> Vec<WorkloadResult> {
    let mut best: Vec<WorkloadResult> = Vec::new();
    for r in all {
        match best
            .iter_mut()
            .find(|b| b.storage == r.storage && b.workload == r.workload)
        {
            None => best.push(r.clone()),
            Some(b) => {
                let better = if r.workload == "a" {
                    r.latency_ms.p99 < b.latency_ms.p99
                } else {
                    r.mb_per_s > b.mb_per_s
                };
                if better {
                    *b = r.clone();
                }
            }
        }
    }
    best
}

/// Steal above this (percent of the machine's CPU time) gets a warning.
const STEAL_WARN_PCT: f64 = 5.0;

/// Throughput workloads: everything but the one-in-flight latency floor.
const THROUGHPUT: [&str; 3] = ["b", "c", "d"];

impl Report {
    /// A report of every round measured (`all_rounds`, in the order run)
    /// and the raw-quinn run each round began with (`raw_runs[k - 1]` for
    /// round k); the best of those is the baseline.
    pub fn new(
        setup: Setup,
        raw_runs: Vec<RawQuinn>,
        fresh_memory: FreshMemory,
        all_rounds: Vec<WorkloadResult>,
        failover: Vec<FailoverResult>,
    ) -> anyhow::Result<Report> {
        let raw_quinn = raw_runs
            .iter()
            .max_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s))
            .cloned()
            .context("no raw-quinn run")?;
        let mut r = Report {
            setup,
            raw_quinn,
            raw_quinn_rounds: raw_runs,
            fresh_memory,
            workloads: best_rounds(&all_rounds),
            all_rounds,
            failover,
            checks: Vec::new(),
        };
        r.checks = r.compute_checks();
        Ok(r)
    }

    fn find(&self, storage: &str, workload: &str) -> Option<&WorkloadResult> {
        self.workloads
            .iter()
            .find(|w| w.storage == storage && w.workload == workload)
    }

    /// The storages, then the workloads, in the order they were run.
    fn storages(&self) -> Vec<&str> {
        distinct(self.workloads.iter().map(|w| w.storage.as_str()))
    }

    fn workload_keys(&self) -> Vec<&str> {
        distinct(self.workloads.iter().map(|w| w.workload.as_str()))
    }

    /// A ratio taken within each round (`f(round, that round's raw run)`),
    /// its two sides minutes apart rather than rounds apart: how far it
    /// moves from round to round. None with a single round, where the
    /// check's own figure is that round's.
    fn by_round(&self, f: impl Fn(u32, &RawQuinn) -> Option<f64>) -> Option<Vec<f64>> {
        if self.raw_quinn_rounds.len() < 2 {
            return None;
        }
        let ratios: Vec<f64> = self
            .raw_quinn_rounds
            .iter()
            .zip(1u32..)
            .filter_map(|(raw, round)| f(round, raw))
            .filter(|r| r.is_finite())
            .collect();
        (!ratios.is_empty()).then_some(ratios)
    }

    /// The highest MB/s of `storage` in `round` among `workloads`.
    fn best_in_round(&self, round: u32, storage: &str, workloads: &[&str]) -> Option<f64> {
        self.all_rounds
            .iter()
            .filter(|w| {
                w.round == round && w.storage == storage && workloads.contains(&w.workload.as_str())
            })
            .map(|w| w.mb_per_s)
            .max_by(f64::total_cmp)
    }

    fn compute_checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        for storage in self.storages() {
            // Replicated throughput against raw QUIC: the best throughput
            // workload. Each byte crosses QUIC three times, so 1/3 is
            // where the cluster would stop if every crossing cost what the
            // raw run's does. It is not a hard ceiling: a crossing inside
            // the cluster has measured cheaper than the raw run's (2.5 raw
            // crossings' worth for all three in a CI run).
            if let Some(best) = THROUGHPUT
                .iter()
                .filter_map(|k| self.find(storage, k))
                .max_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s))
                && self.raw_quinn.mb_per_s > 0.0
            {
                checks.push(Check::new(
                    format!("{storage}: replicated / raw quinn"),
                    best.mb_per_s / self.raw_quinn.mb_per_s,
                    ">=",
                    0.25,
                    format!(
                        "workload {} {:.1} MB/s vs {:.1} MB/s (0.33 if each of its 3 QUIC crossings cost what the raw run's does); its nodes and client spent {:.1} CPU s/GB, {:.1} raw QUIC crossings' worth{}",
                        best.workload,
                        best.mb_per_s,
                        self.raw_quinn.mb_per_s,
                        best.node_cpu_s_per_gb + best.client_cpu_s_per_gb,
                        (best.node_cpu_s_per_gb + best.client_cpu_s_per_gb)
                            / self.raw_quinn.cpu_s_per_gb.max(f64::MIN_POSITIVE),
                        // Without retention every byte kept lands in fresh
                        // memory; with it, only the first `retention_mb`.
                        if self.setup.retention_mb == 0 {
                            format!(
                                ", about {:.1} of it first touch of the memory that keeps the data",
                                self.fresh_memory.cpu_s_per_gb_rf3
                            )
                        } else {
                            String::new()
                        },
                    ),
                )
                .with_rounds(
                    "against the raw run each began with",
                    self.by_round(|round, raw| {
                        Some(self.best_in_round(round, storage, &THROUGHPUT)? / raw.mb_per_s)
                    }),
                ));
            }
            if let Some(a) = self.find(storage, "a") {
                checks.push(Check::new(
                    format!("{storage}: one-in-flight p99 commit latency (ms)"),
                    a.latency_ms.p99,
                    "<=",
                    1.5,
                    format!(
                        "p50 {:.2} ms, max {:.2} ms",
                        a.latency_ms.p50, a.latency_ms.max
                    ),
                ));
            }
        }
        // The plugin boundary must not be the bottleneck: the wasm memory
        // plugin against native in-process storage, same workloads.
        for k in THROUGHPUT {
            if let (Some(wasm), Some(native)) = (self.find("memory", k), self.find("native", k))
                && native.mb_per_s > 0.0
            {
                checks.push(
                    Check::new(
                        format!("wasm memory / native, workload {k}"),
                        wasm.mb_per_s / native.mb_per_s,
                        ">=",
                        0.9,
                        format!("{:.1} vs {:.1} MB/s", wasm.mb_per_s, native.mb_per_s),
                    )
                    .with_rounds(
                        "each against native in the same round",
                        self.by_round(|round, _| {
                            Some(
                                self.best_in_round(round, "memory", &[k])?
                                    / self.best_in_round(round, "native", &[k])?,
                            )
                        }),
                    ),
                );
            }
        }
        checks
    }

    pub fn all_met(&self) -> bool {
        self.checks.iter().all(|c| c.met)
    }

    /// Failed produce requests in any round.
    pub fn failed_requests(&self) -> u64 {
        self.all_rounds.iter().map(|w| w.failed).sum()
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let s = &self.setup;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} nodes, RF {}, min.insync {}, acks={}, {} B incompressible messages; {} s warm-up + {} s measured per workload; {} cores; {}\nCPU columns: CPU seconds per GB committed, of the three nodes together and of the producing client; TOP NODE: cores the busiest node used; IDLE% and STEAL%: the machine's CPU time that was idle and that the hypervisor took",
            s.nodes,
            s.replication_factor,
            s.min_insync,
            s.acks,
            s.message_bytes,
            s.warmup_s,
            s.window_s,
            s.cores,
            if s.retention_mb == 0 {
                "every node keeps everything written (no retention)".to_string()
            } else {
                format!("retention {} MiB per partition per node", s.retention_mb)
            }
        );
        if !s.storage_config.is_empty() {
            let settings: Vec<String> = s
                .storage_config
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "storage plugin settings: {}", settings.join(", "));
        }
        if s.rounds > 1 {
            let _ = writeln!(
                out,
                "best of {} rounds per row (highest MB/s; lowest p99 for a); every round is in results.json",
                s.rounds
            );
        }
        let _ = writeln!(
            out,
            "raw quinn, one connection between two processes: {:.1} MB/s ({} MB in {:.2} s), {:.1} CPU s/GB (both ends; {} + {} worker threads, each node {}){}",
            self.raw_quinn.mb_per_s,
            self.raw_quinn.bytes / 1_000_000,
            self.raw_quinn.seconds,
            self.raw_quinn.cpu_s_per_gb,
            self.raw_quinn.sender_workers,
            self.raw_quinn.sink_workers,
            s.node_workers,
            if self.raw_quinn_rounds.len() > 1 {
                let runs: Vec<String> = self
                    .raw_quinn_rounds
                    .iter()
                    .map(|r| format!("{:.1}", r.mb_per_s))
                    .collect();
                format!(
                    "; the best of {} runs, one per round: {} MB/s",
                    runs.len(),
                    runs.join(", ")
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "fresh memory, first touch: {:.2} GB/s ({:.2} us per 4 KiB page): keeping each replicated GB on three nodes costs {:.1} CPU s here; raw quinn keeps nothing{}\n",
            self.fresh_memory.gb_per_s,
            self.fresh_memory.us_per_page,
            self.fresh_memory.cpu_s_per_gb_rf3,
            if self.setup.retention_mb == 0 {
                String::new()
            } else {
                format!(
                    "; with retention a node pays it only until each log holds {} MiB, then reuses what retention deleted",
                    self.setup.retention_mb
                )
            }
        );
        let _ = writeln!(
            out,
            "{:<8} {:<36} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6} {:>6} {:>6}",
            "STORAGE",
            "WORKLOAD",
            "MSG/S",
            "MB/S",
            "P50 MS",
            "P99 MS",
            "P99.9 MS",
            "MAX MS",
            "NODE CPU",
            "CLNT CPU",
            "TOP NODE",
            "IDLE%",
            "STEAL%",
            "FAILED"
        );
        for w in &self.workloads {
            let _ = writeln!(
                out,
                "{:<8} {:<36} {:>9.0} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>8.2} {:>6.1} {:>6.1} {:>6}",
                w.storage,
                format!("{}: {}", w.workload, w.title),
                w.msgs_per_s,
                w.mb_per_s,
                w.latency_ms.p50,
                w.latency_ms.p99,
                w.latency_ms.p999,
                w.latency_ms.max,
                w.node_cpu_s_per_gb,
                w.client_cpu_s_per_gb,
                w.busiest_node_cores,
                w.idle_pct,
                w.steal_pct,
                w.failed
            );
        }
        for f in &self.failover {
            let rounds: Vec<String> = f.rounds_ms.iter().map(|r| format!("{r:.0}")).collect();
            let _ = writeln!(
                out,
                "\nfailover ({}): SIGKILL of the leader to the first acks=all write on its successor: p50 {:.0} ms, max {:.0} ms (rounds: {} ms)",
                f.storage,
                f.p50_ms,
                f.max_ms,
                rounds.join(", ")
            );
            let rounds: Vec<String> = f
                .handover_rounds_ms
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect();
            let _ = writeln!(
                out,
                "handover ({}): SIGTERM of the leader (controlled shutdown) to the first acks=all write on its successor: p50 {:.0} ms, max {:.0} ms (rounds: {} ms)",
                f.storage,
                f.handover_p50_ms,
                f.handover_max_ms,
                rounds.join(", ")
            );
        }
        if let Some(w) = self
            .workloads
            .iter()
            .max_by(|a, b| a.steal_pct.total_cmp(&b.steal_pct))
            .filter(|w| w.steal_pct > STEAL_WARN_PCT)
        {
            let _ = writeln!(
                out,
                "\nwarning: the hypervisor took up to {:.0}% of this machine's CPU time during a workload ({}/{}); these figures understate what the machine can do; run again when it is quiet",
                w.steal_pct, w.storage, w.workload
            );
        }
        for w in self
            .workloads
            .iter()
            .filter(|w| w.nodes_with_slow_writes > 0)
        {
            let _ = writeln!(
                out,
                "\nnote: in {}/{}, {} node(s) logged a storage write slower than 10 ms in the kernel; each then wrote on the blocking pool for a second, which costs more CPU per byte (a busy disk, or too much dirty memory on the machine)",
                w.storage, w.workload, w.nodes_with_slow_writes
            );
        }
        let _ = writeln!(out, "\ntargets:");
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  [{}] {}: {:.3} (target {} {}; {})",
                if c.met { "met" } else { "MISSED" },
                c.name,
                c.value,
                c.op,
                c.target,
                c.detail
            );
        }
        for w in self.workloads.iter().filter(|w| w.failed > 0) {
            let _ = writeln!(
                out,
                "\n{} requests failed in {}/{}; first: {}",
                w.failed,
                w.storage,
                w.workload,
                w.first_error.as_deref().unwrap_or("?")
            );
        }
        out
    }

    /// A grouped bar chart of MB/s per workload and storage, with the raw
    /// quinn figure and the 0.25x target as lines. Plain SVG written here:
    /// a chart library would add a font stack for a dozen rectangles.
    pub fn svg(&self) -> String {
        let storages = self.storages();
        let keys = self.workload_keys();
        let max_mb = self
            .workloads
            .iter()
            .map(|w| w.mb_per_s)
            .fold(self.raw_quinn.mb_per_s * 0.34, f64::max)
            .max(1.0);
        let (w, h, left, top, bottom) = (900.0, 430.0, 70.0, 40.0, 72.0);
        let plot_h = h - top - bottom;
        let group_w = (w - left - 20.0) / keys.len().max(1) as f64;
        let bar_w = (group_w * 0.8) / storages.len().max(1) as f64;
        let y = |mb: f64| top + plot_h * (1.0 - mb / max_mb);
        let colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2"];
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14">replicated acks=all throughput (MB/s), 3 nodes, RF 3, {} B messages; raw quinn {:.0} MB/s</text>"#,
            self.setup.message_bytes, self.raw_quinn.mb_per_s
        );
        for (gi, key) in keys.iter().enumerate() {
            let gx = left + gi as f64 * group_w + group_w * 0.1;
            for (si, storage) in storages.iter().enumerate() {
                if let Some(r) = self.find(storage, key) {
                    let x = gx + si as f64 * bar_w;
                    let top_y = y(r.mb_per_s);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{top_y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {:.1} MB/s</title></rect>"#,
                        bar_w * 0.95,
                        (top + plot_h - top_y).max(0.0),
                        colors[si % colors.len()],
                        xml_escape(storage),
                        xml_escape(key),
                        r.mb_per_s
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{:.0}</text>"#,
                        x + bar_w * 0.47,
                        top_y - 3.0,
                        r.mb_per_s
                    );
                    // How far the rounds were apart: a line inside the
                    // bar from the slowest round up to the best.
                    let rounds: Vec<f64> = self
                        .all_rounds
                        .iter()
                        .filter(|w| w.storage == *storage && w.workload == *key)
                        .map(|w| w.mb_per_s)
                        .collect();
                    if rounds.len() > 1 {
                        let slowest = rounds.iter().copied().fold(f64::INFINITY, f64::min);
                        let (cx, low_y) = (x + bar_w * 0.47, y(slowest));
                        let each: Vec<String> = rounds.iter().map(|m| format!("{m:.1}")).collect();
                        let _ = writeln!(
                            s,
                            r##"<g class="rounds" stroke="#222"><title>{} {}, each round: {} MB/s</title><line x1="{cx:.1}" x2="{cx:.1}" y1="{low_y:.1}" y2="{top_y:.1}"/><line x1="{:.1}" x2="{:.1}" y1="{low_y:.1}" y2="{low_y:.1}"/></g>"##,
                            xml_escape(storage),
                            xml_escape(key),
                            each.join(", "),
                            cx - bar_w * 0.2,
                            cx + bar_w * 0.2,
                        );
                    }
                }
            }
            let title = self
                .workloads
                .iter()
                .find(|r| r.workload == *key)
                .map_or("", |r| r.title.as_str());
            let _ = writeln!(
                s,
                // The key on one line, the title smaller below it, so that
                // neighbouring groups' labels do not run into each other.
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}<tspan x="{x:.1}" dy="13" font-size="9">{}</tspan></text>"#,
                h - bottom + 16.0,
                xml_escape(key),
                xml_escape(title),
                x = left + gi as f64 * group_w + group_w / 2.0,
            );
        }
        for (label, mb, dash) in [
            ("raw quinn", self.raw_quinn.mb_per_s, ""),
            (
                "0.25 x raw quinn (target)",
                self.raw_quinn.mb_per_s * 0.25,
                r#" stroke-dasharray="6,4""#,
            ),
        ] {
            if mb <= max_mb {
                let ly = y(mb);
                let _ = writeln!(
                    s,
                    r##"<line x1="{left}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="#333"{dash}/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}: {mb:.0} MB/s</text>"##,
                    w - 20.0,
                    w - 22.0,
                    ly - 4.0
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{left}" y1="{top}" y2="{:.1}" stroke="#333"/><line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#333"/>"##,
            top + plot_h,
            w - 20.0,
            top + plot_h,
            top + plot_h
        );
        for i in 0..=4 {
            let mb = max_mb * f64::from(i) / 4.0;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{mb:.0}</text>"#,
                left - 6.0,
                y(mb) + 4.0
            );
        }
        for (si, storage) in storages.iter().enumerate() {
            let lx = left + 10.0 + si as f64 * 140.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                h - 26.0,
                colors[si % colors.len()],
                lx + 16.0,
                h - 16.0,
                xml_escape(storage)
            );
        }
        if self.raw_quinn_rounds.len() > 1 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">bar: best of {} rounds; line in it: slowest round to best</text>"#,
                w - 22.0,
                h - 16.0,
                self.raw_quinn_rounds.len()
            );
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

/// `items` without repeats, first occurrences in order.
fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::workload::Latency;

    fn result(storage: &str, workload: &str, mb: f64, p99: f64) -> WorkloadResult {
        WorkloadResult {
            round: 1,
            storage: storage.into(),
            workload: workload.into(),
            title: format!("w{workload}"),
            messages: 1,
            bytes: 1,
            seconds: 1.0,
            msgs_per_s: 1.0,
            mb_per_s: mb,
            latency_ms: Latency {
                p99,
                ..Latency::default()
            },
            node_cpu_s_per_gb: 1.0,
            client_cpu_s_per_gb: 1.0,
            steal_pct: 0.0,
            idle_pct: 0.0,
            busiest_node_cores: 0.0,
            failed: 0,
            first_error: None,
            nodes_with_slow_writes: 0,
        }
    }

    /// A throughput row measured in `round`.
    fn in_round(round: u32, storage: &str, workload: &str, mb: f64) -> WorkloadResult {
        WorkloadResult {
            round,
            ..result(storage, workload, mb, 5.0)
        }
    }

    fn raw(mb_per_s: f64) -> RawQuinn {
        RawQuinn {
            bytes: 1,
            seconds: 1.0,
            mb_per_s,
            cpu_s_per_gb: 4.0,
            sender_workers: 1,
            sink_workers: 1,
        }
    }

    fn report(workloads: Vec<WorkloadResult>) -> Report {
        report_of_rounds(vec![raw(400.0)], workloads)
    }

    fn report_of_rounds(raw_runs: Vec<RawQuinn>, workloads: Vec<WorkloadResult>) -> Report {
        Report::new(
            Setup {
                nodes: 3,
                replication_factor: 3,
                min_insync: 2,
                acks: "all",
                message_bytes: 1024,
                warmup_s: 1.0,
                window_s: 5.0,
                cores: 2,
                rounds: raw_runs.len() as u32,
                retention_mb: 64,
                storage_config: Vec::new(),
                node_workers: 1,
            },
            raw_runs,
            FreshMemory {
                gb_per_s: 2.0,
                us_per_page: 2.0,
                cpu_s_per_gb_rf3: 1.5,
            },
            workloads,
            Vec::new(),
        )
        .expect("a report of at least one raw run")
    }

    #[test]
    fn the_best_round_of_each_row_is_kept_whole() {
        let mut slow_a = result("native", "a", 2.0, 0.9);
        slow_a.node_cpu_s_per_gb = 7.0;
        let all = vec![
            result("native", "a", 3.0, 1.8),
            result("native", "d", 100.0, 30.0),
            slow_a,
            result("native", "d", 120.0, 40.0),
            result("native", "d", 110.0, 20.0),
        ];
        let best = best_rounds(&all);
        assert_eq!(best.len(), 2, "one row per (storage, workload)");
        // a: the lowest p99, with that round's other figures.
        assert_eq!(best[0].latency_ms.p99, 0.9);
        assert_eq!(best[0].mb_per_s, 2.0);
        assert_eq!(best[0].node_cpu_s_per_gb, 7.0);
        // d: the highest MB/s, whatever its p99.
        assert_eq!(best[1].mb_per_s, 120.0);
        assert_eq!(best[1].latency_ms.p99, 40.0);
        // Failures of any round count.
        let mut failing = result("native", "d", 1.0, 1.0);
        failing.failed = 3;
        let mut rounds = all.clone();
        rounds.push(failing);
        assert_eq!(report(rounds).failed_requests(), 3);
    }

    #[test]
    fn checks_use_the_best_throughput_workload_and_compare_wasm_to_native() {
        let r = report(vec![
            result("native", "a", 1.0, 1.2),
            result("native", "b", 90.0, 5.0),
            result("native", "d", 120.0, 5.0),
            result("memory", "a", 1.0, 2.0),
            result("memory", "b", 60.0, 5.0),
            result("memory", "d", 110.0, 5.0),
        ]);
        let get = |name: &str| {
            r.checks
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no check {name}: {:?}", r.checks))
        };
        let raw = get("memory: replicated / raw quinn");
        assert!((raw.value - 110.0 / 400.0).abs() < 1e-9 && raw.met);
        // Node and client CPU (1 + 1 s/GB) against raw quinn's 4 s/GB.
        assert!(
            raw.detail.contains("0.5 raw QUIC crossings' worth"),
            "{}",
            raw.detail
        );
        assert!(!get("memory: one-in-flight p99 commit latency (ms)").met);
        assert!(get("native: one-in-flight p99 commit latency (ms)").met);
        let b = get("wasm memory / native, workload b");
        assert!((b.value - 60.0 / 90.0).abs() < 1e-9 && !b.met);
        assert!(get("wasm memory / native, workload d").met);
        assert!(!r.all_met());
        let table = r.table();
        assert!(
            table.contains("MISSED") && table.contains("[met]"),
            "{table}"
        );
    }

    #[test]
    fn the_baseline_is_the_best_raw_run_and_each_round_is_also_paired_with_its_own() {
        let r = report_of_rounds(
            vec![raw(400.0), raw(500.0)],
            vec![
                in_round(1, "memory", "b", 90.0),
                in_round(1, "memory", "d", 110.0),
                in_round(2, "memory", "d", 100.0),
                in_round(2, "memory", "b", 120.0),
                // Not a throughput workload: never the best of a round.
                in_round(2, "memory", "a", 900.0),
                in_round(1, "native", "d", 130.0),
                in_round(2, "native", "d", 80.0),
            ],
        );
        assert_eq!(r.raw_quinn.mb_per_s, 500.0);
        assert_eq!(r.raw_quinn_rounds.len(), 2);
        let memory = r
            .checks
            .iter()
            .find(|c| c.name == "memory: replicated / raw quinn")
            .expect("memory's check");
        // The check: the best row (120, round 2) against the best raw run.
        assert!((memory.value - 120.0 / 500.0).abs() < 1e-9 && !memory.met);
        // Round 1: 110 / 400; round 2: 120 / 500.
        assert_eq!(memory.by_round, [110.0 / 400.0, 120.0 / 500.0]);
        assert!(
            memory
                .detail
                .ends_with("round by round, against the raw run each began with: 0.275, 0.240"),
            "{}",
            memory.detail
        );
        // Native: 130 / 400 in round 1, 80 / 500 in round 2.
        let native = r
            .checks
            .iter()
            .find(|c| c.name == "native: replicated / raw quinn");
        assert!(
            native.is_some_and(|c| c.detail.ends_with("began with: 0.325, 0.160")),
            "{native:?}"
        );
        // wasm / native: the best rows (120 of memory b has no native b),
        // and round by round, d against d of the same round.
        let d = r
            .checks
            .iter()
            .find(|c| c.name == "wasm memory / native, workload d")
            .expect("d's check");
        assert!((d.value - 110.0 / 130.0).abs() < 1e-9);
        assert!(
            d.detail
                .ends_with("round by round, each against native in the same round: 0.846, 1.250"),
            "{}",
            d.detail
        );
        assert!(
            r.table()
                .contains("the best of 2 runs, one per round: 400.0, 500.0 MB/s"),
            "{}",
            r.table()
        );
        // One round: no per-round figures.
        let mut one = report(vec![result("memory", "d", 110.0, 5.0)]);
        assert!(!one.table().contains("round by round") && !one.table().contains("best of"));
        assert!(one.checks.iter().all(|c| c.by_round.is_empty()));
        // Fractions of a second are printed as given.
        one.setup.warmup_s = 0.5;
        assert!(
            one.table().contains("0.5 s warm-up + 5 s measured"),
            "{}",
            one.table()
        );
        // No raw run at all is an error, not a division by nothing.
        let none = Report::new(
            one.setup.clone(),
            Vec::new(),
            one.fresh_memory.clone(),
            Vec::new(),
            Vec::new(),
        );
        assert!(none.is_err());
    }

    #[test]
    fn the_table_shows_how_busy_the_busiest_node_and_the_machine_were() {
        let mut w = result("memory", "d", 60.0, 5.0);
        w.busiest_node_cores = 0.873;
        w.idle_pct = 12.46;
        w.steal_pct = 0.2;
        let table = report(vec![w]).table();
        let header = table
            .lines()
            .find(|l| l.starts_with("STORAGE"))
            .expect("header");
        let row = table
            .lines()
            .find(|l| l.starts_with("memory "))
            .expect("row");
        // Each value sits under its own heading.
        for (heading, value) in [("TOP NODE", "0.87"), ("IDLE%", "12.5"), ("STEAL%", "0.2")] {
            let end = header.find(heading).expect(heading) + heading.len();
            assert_eq!(
                row.get(end - value.len()..end),
                Some(value),
                "{header}\n{row}"
            );
        }
        assert!(
            table.contains("TOP NODE: cores the busiest node used"),
            "{table}"
        );
    }

    /// The table of a report with one plain row, and of the same report
    /// with a second row (`storage`/d) that `change` altered.
    fn plain_and_with(storage: &str, change: impl FnOnce(&mut WorkloadResult)) -> (String, String) {
        let plain = report(vec![result("memory", "b", 60.0, 5.0)]).table();
        let mut row = result(storage, "d", 60.0, 5.0);
        change(&mut row);
        let with = report(vec![result("memory", "b", 60.0, 5.0), row]).table();
        (plain, with)
    }

    #[test]
    fn rows_whose_nodes_wrote_on_the_pool_are_called_out() {
        let (plain, with) = plain_and_with("file", |r| r.nodes_with_slow_writes = 2);
        assert!(!plain.contains("slower than 10 ms"), "{plain}");
        assert!(
            with.contains("in file/d, 2 node(s) logged a storage write slower than 10 ms"),
            "{with}"
        );
        assert!(!with.contains("in memory/b"), "{with}");
    }

    #[test]
    fn a_contended_machine_is_called_out() {
        let (quiet, noisy) = plain_and_with("memory", |r| r.steal_pct = 31.4);
        assert!(!quiet.contains("warning: the hypervisor"), "{quiet}");
        assert!(
            noisy.contains(
                "hypervisor took up to 31% of this machine's CPU time during a workload (memory/d)"
            ),
            "{noisy}"
        );
    }

    #[test]
    fn the_chart_has_a_bar_per_result_and_the_target_line() {
        let r = report(vec![
            result("memory", "b", 60.0, 5.0),
            result("file", "b", 50.0, 5.0),
            result("memory", "d<&>", 70.0, 5.0),
        ]);
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 3);
        assert!(svg.contains("0.25 x raw quinn (target): 100 MB/s"));
        assert!(!svg.contains("d<&>") && svg.contains("memory d&lt;&amp;&gt;: 70.0 MB/s"));
        // One round: nothing to spread.
        assert!(!svg.contains(r#"class="rounds""#) && !svg.contains("best of"));
    }

    #[test]
    fn the_chart_shows_how_far_the_rounds_were_apart() {
        let r = report_of_rounds(
            vec![raw(400.0), raw(400.0)],
            vec![
                in_round(1, "memory", "d", 100.0),
                in_round(1, "native", "d", 120.0),
                in_round(2, "native", "d", 60.0),
                in_round(2, "memory", "d", 150.0),
            ],
        );
        let svg = r.svg();
        assert_eq!(svg.matches(r#"class="rounds""#).count(), 2, "{svg}");
        assert!(
            svg.contains("memory d, each round: 100.0, 150.0 MB/s"),
            "{svg}"
        );
        assert!(
            svg.contains("native d, each round: 120.0, 60.0 MB/s"),
            "{svg}"
        );
        assert!(svg.contains("bar: best of 2 rounds"));
        // The bar is the best round; the line runs from the slowest up to it.
        let bar_top = |label: &str| -> f64 {
            let at = svg.find(label).expect("bar title");
            let rect = &svg[svg[..at].rfind("<rect").expect("rect")..at];
            let y = rect
                .split(r#" y=""#)
                .nth(1)
                .and_then(|v| v.split('"').next());
            y.and_then(|v| v.parse().ok()).expect("y of the bar")
        };
        let line = svg
            .split(r#"class="rounds""#)
            .nth(2)
            .and_then(|g| g.split("<line ").nth(1))
            .expect("native's line");
        let attr = |name: &str| -> f64 {
            line.split(&format!(r#"{name}=""#))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .and_then(|v| v.parse().ok())
                .expect("attribute")
        };
        assert_eq!(attr("y2"), bar_top("native d: 120.0 MB/s"));
        assert!(
            attr("y1") > attr("y2"),
            "the slowest round is lower: {line}"
        );
    }
}
