//! Seed 002's experiment (issue 18): a seeded generator of its 36-trace
//! grid (batch duration x AR consumption x batch/AR mix), its five
//! configurations as simulator options, and the run of every trace under
//! every configuration through the real engine (`simulate`), written as a
//! markdown table and an SVG plot (`workspace-coordinator experiment`).
//!
//! The distributions are ours (the seed does not give its generator); they
//! are written down in docs/SIMULATION.md, "Seed 002's experiment".

use super::config::SimConfig;
use super::report::{IdleShares, Report, Stat};
use super::run::Limits;
use super::trace::{Job, Trace};
use super::{simulate, SimError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;

/// Seed 002's cluster: 8 nodes of 2 CPUs and 1024 MB, 2 VMs per node. The
/// model's unit is one VM slot (1 CPU, 512 MB): 16 of them.
pub const SLOTS: u32 = 16;
/// Memory of each VM (MB).
pub const VM_MB: u64 = 512;
/// Images in the trace, each 600 MB.
pub const IMAGES: usize = 6;

/// Average batch request duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchLen {
    Short,
    Medium,
    Long,
}

impl BatchLen {
    pub const ALL: [BatchLen; 3] = [BatchLen::Short, BatchLen::Medium, BatchLen::Long];
    fn mean_s(self) -> f64 {
        match self {
            BatchLen::Short => 300.0,
            BatchLen::Medium => 600.0,
            BatchLen::Long => 900.0,
        }
    }
    fn name(self) -> &'static str {
        match self {
            BatchLen::Short => "short",
            BatchLen::Medium => "medium",
            BatchLen::Long => "long",
        }
    }
}

/// AR consumption bands: the share of the nodes each AR asks for (%).
pub const AR_BANDS: [(u32, u32); 4] = [(0, 25), (25, 50), (50, 75), (75, 100)];
/// Batch/AR mixes, as the batch share of the requested time (%).
pub const MIXES: [u32; 3] = [25, 50, 75];

/// One trace of the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    pub batch: BatchLen,
    pub ar_band: (u32, u32),
    pub batch_pct: u32,
}

impl Cell {
    pub fn name(&self) -> String {
        format!(
            "{} batch, AR {}-{} %, {}/{}",
            self.batch.name(),
            self.ar_band.0,
            self.ar_band.1,
            self.batch_pct,
            100 - self.batch_pct
        )
    }
}

/// The 36 cells, in the seed's order.
pub fn grid() -> Vec<Cell> {
    let mut out = Vec::new();
    for batch in BatchLen::ALL {
        for ar_band in AR_BANDS {
            for batch_pct in MIXES {
                out.push(Cell {
                    batch,
                    ar_band,
                    batch_pct,
                });
            }
        }
    }
    out
}

/// Generates the trace of `cell`, `hours` long, from `seed`:
///
/// - The requested time (VM-seconds) of the whole trace is the cluster's
///   `SLOTS x hours` (load 1.0), split between batch and ARs by the mix.
/// - ARs: each asks for a uniform whole number of VM slots within the band
///   (at least 1), for a uniform 30 to 60 minutes, drawn until their work
///   is as close to the AR share as whole ARs get; they are laid one after
///   the other through the trace, each in its own window of equal length
///   (never two at once, as in the seed: consumption is per AR), shortened
///   to leave 15 minutes of its window free (the batch system's
///   reservation is longer than the lease: lead, margins, grace, overhead),
///   at a uniform offset in its window; each is asked for a uniform 30 to
///   90 minutes before its start (not before the trace begins).
/// - Batch: Poisson arrivals over the trace's length; each asks for a
///   uniform 1 to 4 VM slots for an exponential time of the cell's mean (at
///   least 60 s), asked for exactly (the lease is the run time). Requests
///   are added until the batch share is reached.
/// - Every request uses one of the six images, uniformly.
pub fn generate(cell: Cell, hours: f64, seed: u64) -> Trace {
    let mut rng = StdRng::seed_from_u64(seed);
    let length = hours * 3600.0;
    let total = f64::from(SLOTS) * length;
    let batch_work = total * f64::from(cell.batch_pct) / 100.0;
    let ar_work = total - batch_work;
    let image = |rng: &mut StdRng| Some(format!("image-{}", rng.gen_range(0..IMAGES)));
    let mut jobs = Vec::new();
    // ARs: draw until their work is reached, then lay them out.
    let lo = ((cell.ar_band.0 * SLOTS).div_ceil(100)).max(1);
    let hi = (cell.ar_band.1 * SLOTS / 100).max(lo);
    let mut ars: Vec<(u32, f64)> = Vec::new();
    let mut drawn = 0.0;
    while drawn < ar_work && cell.batch_pct < 100 {
        let n = rng.gen_range(lo..=hi);
        let d = rng.gen_range(1800.0..3600.0_f64).round();
        let w = f64::from(n) * d;
        // The last one only if it brings the share closer.
        if drawn + w > ar_work && drawn + w - ar_work > ar_work - drawn && !ars.is_empty() {
            break;
        }
        drawn += w;
        ars.push((n, d));
    }
    let window = length / ars.len().max(1) as f64;
    for (k, (n, d)) in ars.iter().enumerate() {
        // Fit in its window with room for the batch system's reservation
        // around it (the staging lead before, the coordinator's margins
        // and the grace after: 6.5 min) and the runtime overhead (10 %).
        let d = d.min((window - 900.0) / 1.1).max(60.0).round();
        let start = k as f64 * window + rng.gen_range(0.0..(window - d).max(1.0));
        let start = start.round().max(900.0);
        let ahead = rng.gen_range(1800.0..5400.0_f64);
        jobs.push(Job {
            line: 0,
            id: 0,
            submit_s: (start - ahead).max(0.0).round(),
            processors: *n,
            run_s: d,
            requested_s: d,
            memory_mb: Some(VM_MB),
            image: image(&mut rng),
            reservation: true,
            start_s: Some(start),
        });
    }
    // Batch: Poisson arrivals over the trace until the share is asked for.
    let mut asked = 0.0;
    let mean_size = 2.5;
    let rate = batch_work / (cell.batch.mean_s() * mean_size) / length; // per second
    let mut t = 0.0;
    while asked < batch_work && rate > 0.0 {
        t += -rng.gen::<f64>().max(1e-12).ln() / rate;
        let n = rng.gen_range(1..=4u32);
        let d = (-rng.gen::<f64>().max(1e-12).ln() * cell.batch.mean_s())
            .max(60.0)
            .round();
        asked += f64::from(n) * d;
        jobs.push(Job {
            line: 0,
            id: 0,
            submit_s: t.min(length).round(),
            processors: n,
            run_s: d,
            requested_s: d,
            memory_mb: Some(VM_MB),
            image: image(&mut rng),
            reservation: false,
            start_s: None,
        });
    }
    // Requests are replayed from the trace's first submit: anchor it at 0.
    jobs.push(Job {
        line: 0,
        id: 0,
        submit_s: 0.0,
        processors: 1,
        run_s: 60.0,
        requested_s: 60.0,
        memory_mb: Some(VM_MB),
        image: image(&mut rng),
        reservation: false,
        start_s: None,
    });
    jobs.sort_by(|a, b| a.submit_s.total_cmp(&b.submit_s));
    for (i, j) in jobs.iter_mut().enumerate() {
        j.line = i + 1;
        j.id = i as u64 + 1;
    }
    Trace {
        jobs,
        skipped: 0,
        max_nodes: Some(SLOTS),
        max_procs: None,
        unix_start_s: None,
    }
}

/// Seed 002's five configurations, and ours: the best of them with
/// suspended leases resumed ahead of the queue (`policy.resume_first`), or
/// with the batch work queued largest first (`policy.largest_first`).
pub const CONFIGS: [&str; 7] = [
    "noVM_nosuspend",
    "VM_nosuspend",
    "VM_nosuspend_ov10",
    "VM_suspend_ov10",
    "VM_suspend_cache_ov10",
    "ours_resume_first",
    "ours_largest_first",
];

/// The model of configuration `name` on seed 002's cluster, or `None` for
/// a name that is not one of [`CONFIGS`].
pub fn config(name: &str) -> Option<SimConfig> {
    let mut cfg = SimConfig::default();
    cfg.cluster.nodes = Some(SLOTS);
    cfg.cluster.cores_per_node = 1;
    // A VM slot: its VM's 512 MB plus dom0's minimum.
    cfg.cluster.memory_mb_per_node = VM_MB + cfg.coordinator.min_dom0_mb;
    cfg.trace.vm_memory_mb = Some(VM_MB);
    let (vm, overhead, suspend, cache) = match name {
        "noVM_nosuspend" => (false, 0.0, false, 0),
        "VM_nosuspend" => (true, 0.0, false, 0),
        "VM_nosuspend_ov10" => (true, 10.0, false, 0),
        "VM_suspend_ov10" => (true, 10.0, true, 0),
        "VM_suspend_cache_ov10" | "ours_resume_first" | "ours_largest_first" => {
            (true, 10.0, true, 3)
        }
        _ => return None,
    };
    cfg.nodes.deploy_images = vm;
    cfg.nodes.image_mb = 600;
    cfg.nodes.network_mbps = 100.0;
    cfg.nodes.image_cache = cache;
    cfg.policy.runtime_overhead_pct = overhead;
    cfg.policy.suspend_resume = suspend;
    // As Haizea schedules (the seed's suspend runs): best effort runs on a
    // reservation's nodes until it begins, and is suspended then.
    cfg.batch.preempt_for_reservations = suspend;
    cfg.policy.resume_first = name == "ours_resume_first";
    cfg.policy.largest_first = name == "ours_largest_first";
    Some(cfg)
}

/// One trace under one configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub trace: String,
    pub config: String,
    pub utilization: f64,
    /// Nodes held by pilot jobs (VMs running or not), the same scale.
    pub held_utilization: f64,
    /// The free node-time, by why.
    pub idle: IdleShares,
    pub span_s: f64,
    /// The shortest span any scheduler could reach ([`Report::span_floor_s`]).
    pub span_floor_s: f64,
    /// From request to VMs running, over the leases that ran (s).
    pub wait_s: Stat,
    pub bounded_slowdown: Stat,
    pub batch_done_s: Option<f64>,
    pub reservations: usize,
    pub reservations_refused: usize,
    pub vm_saves: u64,
    pub vm_restores: u64,
    /// Leases the engine refused (reservations included).
    pub rejected: usize,
    pub complete: bool,
}

impl Outcome {
    fn of(trace: &str, config: &str, r: &Report) -> Self {
        Self {
            trace: trace.into(),
            config: config.into(),
            utilization: r.utilization,
            held_utilization: r.held_utilization,
            idle: r.idle,
            span_s: r.span_s,
            span_floor_s: r.span_floor_s,
            wait_s: r.wait_s.clone(),
            bounded_slowdown: r.bounded_slowdown.clone(),
            batch_done_s: r.batch_done_s,
            reservations: r.trace.reservations,
            reservations_refused: r.reservations_refused,
            vm_saves: r.vm_saves,
            vm_restores: r.vm_restores,
            rejected: r.leases.rejected,
            complete: r.complete,
        }
    }
}

/// Runs `trace` under every configuration.
pub fn run_all(
    name: &str,
    trace: &Trace,
    configs: &[(&str, SimConfig)],
    limits: &Limits,
) -> Result<Vec<Outcome>, SimError> {
    configs
        .iter()
        .map(|(c, cfg)| {
            let r = simulate(trace, cfg, limits, |_, _| {})?;
            Ok(Outcome::of(name, c, &r))
        })
        .collect()
}

/// The markdown table: one row per trace, per configuration utilization
/// and time to complete all batch requests (and refused ARs, when any).
pub fn table(results: &[Outcome]) -> String {
    let mut traces: Vec<&str> = Vec::new();
    for r in results {
        if !traces.contains(&r.trace.as_str()) {
            traces.push(&r.trace);
        }
    }
    let mut o = String::new();
    let _ = write!(o, "| trace |");
    for c in CONFIGS {
        let _ = write!(o, " {c} |");
    }
    o.push('\n');
    o.push_str("|---|");
    for _ in CONFIGS {
        o.push_str("---|");
    }
    o.push('\n');
    for t in traces {
        let _ = write!(o, "| {t} |");
        for c in CONFIGS {
            match results.iter().find(|r| r.trace == t && r.config == c) {
                Some(r) => {
                    let done = r
                        .batch_done_s
                        .map_or("-".to_string(), |s| format!("{:.0} min", s / 60.0));
                    let _ = write!(o, " {:.0} %, {done}", r.utilization * 100.0);
                    if r.reservations_refused > 0 {
                        let _ = write!(
                            o,
                            ", {}/{} AR refused",
                            r.reservations_refused, r.reservations
                        );
                    }
                    if !r.complete {
                        o.push_str(", INCOMPLETE");
                    }
                    o.push_str(" |");
                }
                None => o.push_str(" n/a |"),
            }
        }
        o.push('\n');
    }
    o
}

/// Where each trace's node-time went under `configs` (issue 18's account):
/// VMs running (the utilization), pilot jobs holding nodes without running
/// VMs (image copies, boot, save and restore, cleanup), free nodes while a
/// best-effort job waited, free nodes with nothing waiting, free nodes of a
/// begun reservation; and the ceiling no schedule passes on that trace
/// ([`super::report::span_floor`]). Shares of the cluster's node-time.
pub fn loss_table(results: &[Outcome], configs: &[&str]) -> String {
    let mut o = String::from(
        "| trace | configuration | VMs running | held, no VM | free, work waiting | free, nothing waiting | free, in a reservation | ceiling |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results
        .iter()
        .filter(|r| configs.contains(&r.config.as_str()))
    {
        let pct = |v: f64| format!("{:.1} %", v * 100.0);
        let ceiling = r.utilization * r.span_s / r.span_floor_s.max(1e-9);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.trace,
            r.config,
            pct(r.utilization),
            pct(r.held_utilization - r.utilization),
            pct(r.idle.waiting),
            pct(r.idle.nothing),
            pct(r.idle.reserved),
            pct(ceiling.min(1.0)),
        );
    }
    o
}

/// A bar chart: per trace, one bar per configuration's utilization.
pub fn svg(results: &[Outcome], title: &str) -> String {
    let mut traces: Vec<&str> = Vec::new();
    for r in results {
        if !traces.contains(&r.trace.as_str()) {
            traces.push(&r.trace);
        }
    }
    let colors = [
        "#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf",
    ];
    let row_h = 14.0 * CONFIGS.len() as f64 + 12.0;
    let (left, width) = (260.0, 500.0);
    let height = 60.0 + row_h * traces.len() as f64 + 20.0 * CONFIGS.len() as f64;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"10\" y=\"20\" font-size=\"14\">{}</text>\n",
        left + width + 80.0,
        xml(title)
    );
    for pct in [0, 25, 50, 75, 100] {
        let x = left + width * f64::from(pct) / 100.0;
        let _ = writeln!(
            o,
            "<line x1=\"{x}\" y1=\"35\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"32\" text-anchor=\"middle\">{pct} %</text>",
            40.0 + row_h * traces.len() as f64
        );
    }
    for (i, t) in traces.iter().enumerate() {
        let y0 = 40.0 + row_h * i as f64;
        let _ = writeln!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y0 + row_h / 2.0,
            xml(t)
        );
        for (k, c) in CONFIGS.iter().enumerate() {
            let Some(r) = results.iter().find(|r| r.trace == *t && r.config == *c) else {
                continue;
            };
            let w = width * r.utilization.clamp(0.0, 1.0);
            let y = y0 + 14.0 * k as f64;
            let _ = writeln!(
                o,
                "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{:.0} %</text>",
                colors[k],
                left + w + 4.0,
                y + 10.0,
                r.utilization * 100.0
            );
        }
    }
    let ly = 50.0 + row_h * traces.len() as f64;
    for (k, c) in CONFIGS.iter().enumerate() {
        let y = ly + 18.0 * k as f64;
        let _ = writeln!(
            o,
            "<rect x=\"{left}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{c}</text>",
            colors[k],
            left + 18.0,
            y + 10.0
        );
    }
    o.push_str("</svg>\n");
    o
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_seeded_and_meets_its_shares() {
        let cell = Cell {
            batch: BatchLen::Long,
            ar_band: (75, 100),
            batch_pct: 75,
        };
        let a = generate(cell, 4.0, 7);
        let b = generate(cell, 4.0, 7);
        assert_eq!(a.jobs.len(), b.jobs.len());
        assert!(a
            .jobs
            .iter()
            .zip(&b.jobs)
            .all(|(x, y)| x.submit_s == y.submit_s && x.run_s == y.run_s));
        let work = |ar: bool| -> f64 {
            a.jobs
                .iter()
                .filter(|j| j.reservation == ar)
                .map(|j| f64::from(j.processors) * j.run_s)
                .sum()
        };
        let (batch, ar) = (work(false), work(true));
        let share = batch / (batch + ar);
        assert!((0.65..0.85).contains(&share), "batch share {share}");
        for j in a.jobs.iter().filter(|j| j.reservation) {
            assert!((12..=16).contains(&j.processors), "{j:?}");
            let start = j.start_s.expect("an AR has a start");
            assert!(start >= j.submit_s + 60.0, "asked ahead: {j:?}");
        }
        let mut ars: Vec<(f64, f64)> = a
            .jobs
            .iter()
            .filter_map(|j| j.start_s.map(|s| (s, s + j.run_s)))
            .collect();
        ars.sort_by(|x, y| x.0.total_cmp(&y.0));
        assert!(
            ars.windows(2).all(|w| w[0].1 <= w[1].0),
            "ARs never overlap"
        );
        assert_eq!(grid().len(), 36);
        assert!(config("nope").is_none());
    }

    #[test]
    fn an_unknown_cell_or_configuration_is_refused_before_anything_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = |only: Option<&str>, configs: &[&str]| super::super::cli::ExperimentArgs {
            out: dir.path().to_path_buf(),
            seed: 2,
            quick: false,
            traces: None,
            only: only.map(String::from),
            configs: configs.iter().map(|c| c.to_string()).collect(),
        };
        assert_eq!(
            super::super::cli::experiment(args(Some("no such cell"), &[])),
            2
        );
        assert_eq!(
            super::super::cli::experiment(args(
                Some("long batch"),
                &["VM_suspend_cache_ov10", "nope"]
            )),
            2
        );
        assert!(!dir.path().join("results.md").exists(), "nothing written");
    }

    #[test]
    fn the_quick_experiment_writes_a_computed_table_and_plot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let code = super::super::cli::experiment(super::super::cli::ExperimentArgs {
            out: dir.path().to_path_buf(),
            seed: 2,
            quick: true,
            traces: None,
            only: None,
            configs: Vec::new(),
        });
        assert_eq!(code, 0);
        let text = std::fs::read_to_string(dir.path().join("results.json")).expect("json");
        let results: Vec<serde_json::Value> = serde_json::from_str(&text).expect("parse");
        assert_eq!(results.len(), 2 * CONFIGS.len());
        let get = |trace: &str, config: &str, key: &str| -> f64 {
            results
                .iter()
                .find(|r| {
                    r["trace"].as_str().is_some_and(|t| t.starts_with(trace))
                        && r["config"] == config
                })
                .and_then(|r| r[key].as_f64())
                .unwrap_or_else(|| panic!("{trace} {config} {key}"))
        };
        // Without ARs, deploying images costs time: no VM packs at least as well.
        let u = |c| get("short batch, no ar", c, "utilization");
        let done = |c| get("short batch, no ar", c, "batch_done_s");
        assert!(u("noVM_nosuspend") >= u("VM_nosuspend"), "{text}");
        assert!(done("noVM_nosuspend") < done("VM_nosuspend"), "{text}");
        // The runtime overhead makes the batch work end later.
        assert!(done("VM_nosuspend_ov10") > done("VM_nosuspend"), "{text}");
        // The AR trace's reservations were replayed as reservations, and honoured.
        assert!(get("long batch", "VM_suspend_ov10", "reservations") >= 1.0);
        assert_eq!(
            get("long batch", "VM_suspend_ov10", "reservations_refused"),
            0.0
        );
        for r in &results {
            let u = r["utilization"].as_f64().expect("utilization");
            assert!(u > 0.2 && u <= 1.0, "{r}");
            assert_eq!(r["complete"], true, "{r}");
            // The loss accounting covers the cluster: nodes are held or free.
            let f = |k: &str| r["idle"][k].as_f64().expect("idle share");
            let held = r["held_utilization"].as_f64().expect("held");
            let whole = held + f("reserved") + f("waiting") + f("nothing");
            assert!((whole - 1.0).abs() < 0.005, "{whole}: {r}");
            // No schedule beats the floor; this one is not better than it.
            let floor = r["span_floor_s"].as_f64().expect("floor");
            assert!(
                floor > 0.0 && floor <= r["span_s"].as_f64().expect("span"),
                "{r}"
            );
        }
        let md = std::fs::read_to_string(dir.path().join("results.md")).expect("md");
        assert!(md.contains("| short batch, no ar |") && md.contains("VM_suspend_cache_ov10"));
        assert!(
            md.contains("## Where the node-time went") && md.contains("| ours_largest_first | "),
            "{md}"
        );
        let svg = std::fs::read_to_string(dir.path().join("utilization.svg")).expect("svg");
        assert_eq!(
            svg.matches("<rect").count(),
            2 * CONFIGS.len() + CONFIGS.len()
        );
    }
}
