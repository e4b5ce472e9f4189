//! The `simulate` and `replay` subcommands of `workspace-coordinator`:
//! their flags, and turning a run into text, JSON, SVG and an exit code
//! (0 a complete run; 1 a run cut short, a lease left unsettled, or a
//! failure; 2 a bad trace, config or flag).

use super::config::SimConfig;
use super::trace::{self, Format};
use super::{cluster_size, requests, run::Limits, simulate as run_simulation, SimError};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Swf,
    Haizea,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SchedulerArg {
    Fifo,
    Easy,
}

/// What both subcommands read: the trace and how it becomes requests.
#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// The trace: SWF (Parallel Workloads Archive) or Haizea's `;`-separated lease file.
    #[arg(long)]
    pub trace: PathBuf,
    /// Its format (default: `.csv` is Haizea's, anything else SWF).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// The model, as TOML (docs/SIMULATION.md lists every key); the flags below win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replay only the first N jobs.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Divide every time of the trace by this (100: a hundred times faster).
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Processors per node (a job of P processors asks ceil(P / this) nodes).
    #[arg(long)]
    pub cores_per_node: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Nodes of the cluster (default: the trace's MaxProcs or MaxNodes).
    #[arg(long)]
    pub nodes: Option<u32>,
    /// The batch system's scheduler.
    #[arg(long, value_enum)]
    pub scheduler: Option<SchedulerArg>,
    /// Seed of the injected failures.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the figures (and every request's fate) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write utilization over time as an SVG plot here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Stop after this many seconds of real time (the run is then reported as cut short).
    #[arg(long)]
    pub max_wall_s: Option<u64>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Run three times, the `[[inject]]` requests at urgency 0, 1 and 2
    /// (checkpoint stores on the nodes), and print one table (issue 17).
    #[arg(long)]
    pub by_urgency: bool,
    /// With --by-urgency: run each pool size (`[pool] min_idle_nodes`, 0:
    /// no pool) at each urgency, e.g. `--pool-sizes 0,1,2,4`; one table.
    #[arg(long, value_delimiter = ',', requires = "by_urgency")]
    pub pool_sizes: Vec<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// The coordinator's URL.
    #[arg(long, env = "WORKSPACE_URL")]
    pub url: String,
    /// A client token of the coordinator's.
    #[arg(long, env = "WORKSPACE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Write every request's fate as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up waiting for the leases to settle after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub limit_s: u64,
}

/// What went wrong before anything ran (exit code 2), or during (1).
fn fail(e: &dyn std::fmt::Display, code: i32) -> i32 {
    eprintln!("workspace-coordinator: {e}");
    code
}

fn load(t: &TraceArgs) -> Result<(trace::Trace, SimConfig), SimError> {
    let mut cfg = match &t.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| super::config::ConfigError(format!("reading {}: {e}", p.display())))?;
            SimConfig::parse(&text)
                .map_err(|e| super::config::ConfigError(format!("{}: {}", p.display(), e.0)))?
        }
        None => SimConfig::default(),
    };
    if let Some(n) = t.jobs {
        cfg.trace.jobs = Some(n);
    }
    if let Some(s) = t.time_scale {
        cfg.trace.time_scale = s;
    }
    if let Some(c) = t.cores_per_node {
        cfg.cluster.cores_per_node = c;
    }
    let format = match t.format {
        Some(FormatArg::Swf) => Format::Swf,
        Some(FormatArg::Haizea) => Format::Haizea,
        None => Format::guess(&t.trace),
    };
    let trace = trace::read(&t.trace, format)?;
    cfg.validate()?;
    Ok((trace, cfg))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Sets `stop` on the first SIGINT or SIGTERM, from a thread of its own.
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = std::thread::Builder::new()
        .name("simulate-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                flag.store(true, Ordering::SeqCst);
            });
        });
    stop
}

/// `workspace-coordinator simulate`; returns the exit code.
pub fn simulate(args: SimulateArgs) -> i32 {
    quiet_sqlite();
    let (trace, mut cfg) = match load(&args.trace) {
        Ok(x) => x,
        Err(e) => return fail(&e, 2),
    };
    if let Some(n) = args.nodes {
        cfg.cluster.nodes = Some(n);
    }
    if let Some(s) = args.scheduler {
        cfg.batch.scheduler = match s {
            SchedulerArg::Fifo => super::batch::Scheduler::Fifo,
            SchedulerArg::Easy => super::batch::Scheduler::Easy,
        };
    }
    if let Some(seed) = args.seed {
        cfg.failures.seed = seed;
    }
    if let Err(e) = cfg.validate() {
        return fail(&e, 2);
    }
    let name = args.trace.trace.file_name().map_or_else(
        || args.trace.trace.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let size = cluster_size(&trace, &cfg);
    if !args.quiet {
        eprintln!(
            "simulate: {} requests from {name} on {} nodes ({}) ...",
            requests(&trace, &cfg).len(),
            size.nodes,
            size.from
        );
    }
    let limits = Limits {
        max_wall: args.max_wall_s.map(Duration::from_secs),
        stop: stop_on_signal(),
    };
    if args.by_urgency {
        return match super::urgent::by_urgency(&trace, &cfg, &args.pool_sizes, &limits) {
            Ok(rows) => {
                print!("{}", super::urgent::table(&rows));
                if let Some(p) = &args.json {
                    let json = match serde_json::to_string_pretty(&rows) {
                        Ok(j) => j,
                        Err(e) => return fail(&e, 1),
                    };
                    if let Err(e) = write(p, &json) {
                        return fail(&e, 1);
                    }
                }
                0
            }
            Err(e @ (SimError::Trace(_) | SimError::Config(_))) => fail(&e, 2),
            Err(e) => fail(&e, 1),
        };
    }
    let quiet = args.quiet;
    let progress = |virtual_ms: u64, arrived: usize| {
        if !quiet {
            eprintln!(
                "  {} of virtual time, {arrived} requests in",
                super::report::human_s(virtual_ms as f64 / 1000.0)
            );
        }
    };
    let report = match run_simulation(&trace, &cfg, &limits, progress) {
        Ok(r) => r,
        Err(e @ (SimError::Trace(_) | SimError::Config(_))) => return fail(&e, 2),
        Err(e) => return fail(&e, 1),
    };
    print!("{}", report.text(&name));
    if let Some(p) = &args.json {
        let json = match serde_json::to_string_pretty(&report) {
            Ok(j) => j,
            Err(e) => return fail(&e, 1),
        };
        if let Err(e) = write(p, &json) {
            return fail(&e, 1);
        }
    }
    if let Some(p) = &args.svg {
        let title = format!(
            "{name}: utilization over time ({} nodes, {:?})",
            size.nodes, cfg.batch.scheduler
        );
        if let Err(e) = write(p, &report.svg(&title)) {
            return fail(&e, 1);
        }
    }
    if report.complete {
        0
    } else {
        1
    }
}

/// `workspace-coordinator replay`; returns the exit code.
pub fn replay(args: ReplayArgs) -> i32 {
    let (trace, cfg) = match load(&args.trace) {
        Ok(x) => x,
        Err(e) => return fail(&e, 2),
    };
    let reqs = requests(&trace, &cfg);
    let client = match crate::client::Client::new(&args.url, &args.token) {
        Ok(c) => c,
        Err(e) => return fail(&e, 2),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e, 1),
    };
    eprintln!("replay: {} requests to {} ...", reqs.len(), args.url);
    let limit = Duration::from_secs(args.limit_s);
    let report = match rt.block_on(super::replay::replay(&client, &reqs, limit, |m| {
        eprintln!("  {m}")
    })) {
        Ok(r) => r,
        Err(e) => return fail(&e, 1),
    };
    let ran = report
        .requests
        .iter()
        .filter(|l| l.start_s.is_some())
        .count();
    if let Some(why) = &report.incomplete_because {
        println!("INCOMPLETE: {why}.");
    }
    println!("{} requests sent, {ran} ran", report.requests.len());
    if let Some(p) = &args.json {
        let json = match serde_json::to_string_pretty(&report) {
            Ok(j) => j,
            Err(e) => return fail(&e, 1),
        };
        if let Err(e) = write(p, &json) {
            return fail(&e, 1);
        }
    }
    if report.complete {
        0
    } else {
        1
    }
}

/// Turns off SQLite's memory statistics for this process: they take a
/// global lock around every allocation, a tenth of a simulation's time, and
/// nothing here reads them. SQLite allows this only before its first use
/// and with no other thread in it: the first thing `simulate` does.
fn quiet_sqlite() {
    // SAFETY: called before this process has used SQLite, from its only
    // thread doing so; with SQLite already initialized it changes nothing
    // and returns SQLITE_MISUSE, which is ignored.
    unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int);
    }
}

#[derive(Args, Debug, Clone)]
pub struct ExperimentArgs {
    /// Where to write `results.md`, `results.json` and `utilization.svg`.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the trace generator.
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
    /// Two one-hour traces (one without ARs, seed 002's headline cell),
    /// no shared traces: a check that runs in seconds.
    #[arg(long)]
    pub quick: bool,
    /// The shared real traces' folder: its Haizea traces (with ARs and
    /// images) are run under every configuration.
    #[arg(long)]
    pub traces: Option<PathBuf>,
    /// Only the grid's traces whose name contains this (e.g. "long batch,
    /// AR 75-100 %, 75/25"); no shared traces then.
    #[arg(long)]
    pub only: Option<String>,
    /// Only these configurations (comma-separated names; default: all).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
}

/// `workspace-coordinator experiment`: seed 002's grid; returns the exit code.
pub fn experiment(args: ExperimentArgs) -> i32 {
    use super::experiment as x;
    quiet_sqlite();
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return fail(&format!("creating {}: {e}", args.out.display()), 2);
    }
    let limits = Limits {
        max_wall: None,
        stop: stop_on_signal(),
    };
    let (cells, hours) = if args.quick {
        (
            vec![
                (
                    0,
                    x::Cell {
                        batch: x::BatchLen::Short,
                        ar_band: (0, 0),
                        batch_pct: 100,
                    },
                ),
                (
                    1,
                    x::Cell {
                        batch: x::BatchLen::Long,
                        ar_band: (75, 100),
                        batch_pct: 75,
                    },
                ),
            ],
            1.0,
        )
    } else {
        // Each keeps its place in the grid: its trace's seed.
        let mut cells: Vec<(usize, x::Cell)> = x::grid().into_iter().enumerate().collect();
        if let Some(only) = &args.only {
            cells.retain(|(_, c)| c.name().contains(only.as_str()));
            if cells.is_empty() {
                return fail(
                    &format!("--only {only:?}: no trace of the grid is named so"),
                    2,
                );
            }
        }
        (cells, 4.0)
    };
    if let Some(bad) = args.configs.iter().find(|c| x::config(c).is_none()) {
        return fail(
            &format!(
                "--configs: {bad:?} is not a configuration (one of {})",
                x::CONFIGS.join(", ")
            ),
            2,
        );
    }
    let configs: Vec<(&str, SimConfig)> = x::CONFIGS
        .iter()
        .filter(|c| args.configs.is_empty() || args.configs.iter().any(|a| a == *c))
        .filter_map(|c| x::config(c).map(|cfg| (*c, cfg)))
        .collect();
    let mut results = Vec::new();
    let total = cells.len();
    for (k, (i, cell)) in cells.iter().enumerate() {
        let name = if cell.batch_pct == 100 {
            format!("{:?} batch, no AR", cell.batch).to_lowercase()
        } else {
            cell.name()
        };
        let trace = x::generate(*cell, hours, args.seed.wrapping_mul(1000) + *i as u64);
        eprintln!(
            "experiment: trace {} of {total}: {name} ({} requests)",
            k + 1,
            trace.jobs.len()
        );
        match x::run_all(&name, &trace, &configs, &limits) {
            Ok(r) => results.extend(r),
            Err(e) => return fail(&e, 1),
        }
        if limits.stop.load(Ordering::SeqCst) {
            return fail(&"interrupted", 1);
        }
    }
    if !args.quick && args.only.is_none() {
        let dir = args
            .traces
            .clone()
            .unwrap_or_else(|| PathBuf::from("../shared/traces"));
        let shared = std::fs::read_dir(&dir)
            .map(|d| {
                let mut v: Vec<PathBuf> = d
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| matches!(Format::guess(p), Format::Haizea))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        for path in shared {
            let t = match trace::read(&path, Format::Haizea) {
                Ok(t) => t,
                Err(e) => return fail(&e, 2),
            };
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            eprintln!(
                "experiment: shared trace {name} ({} requests)",
                t.jobs.len()
            );
            // Its own cluster (Jazz: 350 nodes) and VM memory.
            let mem = t
                .jobs
                .iter()
                .filter_map(|j| j.memory_mb)
                .max()
                .unwrap_or(x::VM_MB);
            let own: Vec<(&str, SimConfig)> = configs
                .iter()
                .map(|(c, cfg)| {
                    let mut cfg = cfg.clone();
                    cfg.cluster.nodes = Some(350);
                    cfg.trace.vm_memory_mb = None;
                    cfg.cluster.memory_mb_per_node = mem + cfg.coordinator.min_dom0_mb;
                    (*c, cfg)
                })
                .collect();
            match x::run_all(&name, &t, &own, &limits) {
                Ok(r) => results.extend(r),
                Err(e) => return fail(&e, 1),
            }
        }
    }
    let table = x::table(&results);
    let title = format!(
        "Seed 002's experiment: utilization per trace and configuration (seed {})",
        args.seed
    );
    let loss = x::loss_table(&results, &["VM_suspend_cache_ov10", "ours_largest_first"]);
    let md = format!(
        "# {title}\n\nEach cell: utilization, time to complete all batch requests.\n\n{table}\n## Where the node-time went\n\nThe best of seed 002's configurations and ours (docs/SIMULATION.md, \"Where the points are lost\").\n\n{loss}"
    );
    let json = match serde_json::to_string_pretty(&results) {
        Ok(j) => j,
        Err(e) => return fail(&e, 1),
    };
    for (file, text) in [
        ("results.md", md.as_str()),
        ("results.json", json.as_str()),
        ("utilization.svg", x::svg(&results, &title).as_str()),
    ] {
        if let Err(e) = write(&args.out.join(file), text) {
            return fail(&e, 1);
        }
    }
    print!("{table}");
    if results.iter().all(|r| r.complete) {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(extra: &[&str]) -> Result<SimulateArgs, clap::Error> {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sim/testdata");
        let trace = data.join("kth-sp2-first-200.swf");
        let config = data.join("urgent-pool.toml");
        let mut argv = vec![
            "simulate".to_string(),
            "--trace".into(),
            trace.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--jobs".into(),
            "60".into(),
            "--nodes".into(),
            "8".into(),
            "--quiet".into(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    /// `simulate --by-urgency --pool-sizes 0,1` as a user types it: one row
    /// per pool size and urgency, in the table and the JSON, idle cost only
    /// with a pool; `--pool-sizes` alone is refused.
    #[test]
    fn pool_sizes_from_the_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("rows.json");
        let json_arg = json.display().to_string();
        let args =
            parse(&["--by-urgency", "--pool-sizes", "0,1", "--json", &json_arg]).expect("parses");
        assert_eq!(args.pool_sizes, vec![0, 1]);
        assert_eq!(simulate(args), 0);
        let text = std::fs::read_to_string(&json).expect("the JSON");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&text).expect("rows");
        assert_eq!(rows.len(), 6, "{text}");
        for r in &rows {
            let pool = r["pool_nodes"].as_u64().expect("pool_nodes");
            let idle = r["pool_idle_node_hours"].as_f64().expect("idle");
            assert_eq!(pool == 1, idle > 0.0, "{r}");
        }
        let e = parse(&["--pool-sizes", "0,1"]).expect_err("refused");
        assert!(e.to_string().contains("--by-urgency"), "{e}");
    }
}
