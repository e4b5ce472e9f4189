//! `workspace-bench`: proves (or disproves) the performance claims with one
//! command. Four parts: the published evaluation's breakdown at 1 to 1024
//! nodes on the local batch system (real coordinator, real pilots, `sim`
//! nodes with zero latency: what remains is our overhead), the same for 1
//! and 2 nodes on real Slurm, the coordinator alone under load from
//! simulated pilots, and the greedy mapper. Prints a table per part with the
//! targets and writes everything as JSON. Not a test: it judges, it does not fail.

mod breakdown;
mod limit;
mod load;
mod mapper;
mod marks;
mod stats;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use stats::{ms, verdict_above, verdict_below, Table};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Benchmark of workspace pilot: the published breakdown, the coordinator under load, the mapper.
///
/// Exit codes: 0 the run completed (targets missed are reported, not errors);
/// 1 a part could not run (the reason on stderr); 2 bad arguments.
#[derive(Parser, Debug)]
#[command(name = "workspace-bench", version)]
struct Args {
    /// Reduced run (N up to 64, fewer repeats, 1,000 pilots at most, no Slurm): under two minutes.
    #[arg(long)]
    quick: bool,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
    /// Parts to run (comma-separated): breakdown, slurm, load, map.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "breakdown,slurm,load,map"
    )]
    parts: Vec<String>,
    /// Cluster sizes for the breakdown (default 1,2,4,8,16,64,256,1024; --quick up to 64).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u32>,
    /// Repeats per size (default: 10 up to 16 nodes, fewer above; --quick 5/3).
    #[arg(long)]
    repeats: Option<usize>,
    /// Concurrent long-polling pilots for the load part (default 100,1000,10000; --quick 100,1000).
    #[arg(long, value_delimiter = ',')]
    pilots: Vec<usize>,
    /// Seconds of events per load level (default 10; --quick 3).
    #[arg(long)]
    load_seconds: Option<f64>,
    /// The `workspace-pilot` binary (default: next to this one).
    #[arg(long)]
    pilot: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Internal: the coordinator of the load part, run as a child process.
    #[command(hide = true)]
    LoadServer {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1800)]
        max_s: u64,
    },
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory_mb: u64,
    kernel: String,
    loadavg_at_start: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default(),
        memory_mb: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb / 1024)
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

#[derive(Serialize)]
struct Target {
    what: String,
    target: String,
    measured: String,
    verdict: String,
}

#[derive(Serialize, Default)]
struct Report {
    command: String,
    date: String,
    quick: bool,
    machine: Option<Machine>,
    breakdown: Vec<breakdown::SizeResult>,
    slurm: Vec<breakdown::SizeResult>,
    slurm_skipped: Option<String>,
    load: Vec<load::LoadResult>,
    map: Option<mapper::MapResult>,
    targets: Vec<Target>,
    total_s: f64,
}

fn main() {
    let args = Args::parse();
    init_tracing(args.cmd.is_some());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // As `workspace-coordinator serve`: tells its threads from the pilots'.
        .thread_name("wsp-coordinator")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("workspace-bench: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let r = rt.block_on(async {
        match &args.cmd {
            Some(Cmd::LoadServer { dir, max_s }) => load::serve(dir, *max_s).await,
            None => bench(&args).await,
        }
    });
    if let Err(e) = r {
        eprintln!("workspace-bench: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(child: bool) {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    let marks = (!child).then(|| {
        marks::LrmMarks
            .with_filter(Targets::new().with_target("wsp_lrm_adapters::local", LevelFilter::INFO))
    });
    tracing_subscriber::registry().with(fmt).with(marks).init();
}

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn default_repeats(quick: bool, n: u32) -> usize {
    match (quick, n) {
        (true, 0..=16) => 5,
        (true, _) => 3,
        (false, 0..=16) => 10,
        (false, 17..=64) => 7,
        (false, 65..=256) => 5,
        (false, _) => 3,
    }
}

async fn bench(args: &Args) -> Result<()> {
    let started = Instant::now();
    let mut rep = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: protocol::time::format_ms(protocol::now_ms()),
        quick: args.quick,
        machine: Some(machine()),
        ..Default::default()
    };
    let want = |p: &str| args.parts.iter().any(|x| x == p);
    let pilot = match &args.pilot {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no binary directory"))?
            .join("workspace-pilot"),
    };
    if (want("breakdown") || want("slurm")) && !pilot.is_file() {
        return Err(anyhow!(
            "{} is missing: build it first (scripts/bench.sh does: cargo build --release --bins)",
            pilot.display()
        ));
    }
    if let Some(m) = &rep.machine {
        eprintln!(
            "machine: {} x {}, {} MB, kernel {}, load {}",
            m.cpus, m.cpu_model, m.memory_mb, m.kernel, m.loadavg_at_start
        );
    }

    if want("breakdown") {
        let sizes = if !args.sizes.is_empty() {
            args.sizes.clone()
        } else if args.quick {
            vec![1, 2, 4, 8, 16, 64]
        } else {
            vec![1, 2, 4, 8, 16, 64, 256, 1024]
        };
        for n in sizes {
            let r = args
                .repeats
                .unwrap_or_else(|| default_repeats(args.quick, n));
            let limit = Duration::from_secs(60 + u64::from(n) / 4);
            eprintln!("breakdown: N = {n}, {r} repeats ...");
            let t = Instant::now();
            let res = breakdown::run_size(&pilot, &breakdown::Lrm::Local, n, r, limit).await?;
            eprintln!(
                "  done in {:.1} s (setup {:.1} s)",
                t.elapsed().as_secs_f64(),
                res.setup_ms / 1000.0
            );
            rep.breakdown.push(res);
        }
        breakdown::add_cluster_estimate(&mut rep.breakdown);
        println!(
            "{}",
            breakdown_table(
                "Part 1: breakdown, local batch system, sim hypervisor (zero latency)",
                &rep.breakdown
            )
        );
    }

    if want("slurm") {
        if args.quick {
            rep.slurm_skipped = Some("--quick".into());
        } else if which("slurmctld").is_none() {
            rep.slurm_skipped =
                Some("Slurm is not installed (scripts/install-lrm.sh slurm)".into());
        } else {
            match breakdown::slurm_up(&repo_root()) {
                Ok(lrm) => {
                    for n in [1u32, 2] {
                        let r = args.repeats.unwrap_or(5);
                        eprintln!("slurm: N = {n}, {r} repeats ...");
                        match breakdown::run_size(&pilot, &lrm, n, r, Duration::from_secs(90)).await
                        {
                            Ok(res) => rep.slurm.push(res),
                            Err(e) => {
                                rep.slurm_skipped = Some(format!("{e:#}"));
                                break;
                            }
                        }
                    }
                    breakdown::slurm_down(&repo_root());
                }
                Err(e) => rep.slurm_skipped = Some(format!("{e:#}")),
            }
        }
        if !rep.slurm.is_empty() {
            println!(
                "{}",
                breakdown_table(
                    "Part 2: the same on real Slurm (2 nodes on loopback)",
                    &rep.slurm
                )
            );
        }
        if let Some(why) = &rep.slurm_skipped {
            println!("Part 2 (Slurm) not run: {why}\n");
        }
    }

    if want("load") {
        let levels = if !args.pilots.is_empty() {
            args.pilots.clone()
        } else if args.quick {
            vec![100, 1000]
        } else {
            vec![100, 1000, 10_000]
        };
        let secs = args
            .load_seconds
            .unwrap_or(if args.quick { 3.0 } else { 10.0 });
        for k in levels {
            eprintln!("load: {k} pilots, {secs} s of events ...");
            let mut res = load::run_on_one_thread(k, secs)
                .await
                .with_context(|| format!("load with {k} pilots"))?;
            eprintln!("limit: the same rows written by a bare loop, {secs} s ...");
            let lim = tokio::task::spawn_blocking(move || {
                limit::run(k, load::PER_WS, load::SENDERS, secs)
            })
            .await?
            .with_context(|| format!("machine limit with {k} pilots"))?;
            res.fraction_of_limit = res.events_per_s / lim.events_per_s;
            res.limit = Some(lim);
            rep.load.push(res);
        }
        println!("{}", load_table(&rep.load));
    }

    if want("map") {
        let repeats = if args.quick { 7 } else { 21 };
        let m = mapper::run(100_000, 10_000, repeats)?;
        let mut t = Table::new(&["mapping", "median", "p95", "target", "verdict"]);
        t.row(vec![
            format!(
                "{} VMs onto {} slots x {} nodes",
                m.vms,
                m.slots,
                m.vms / m.slots
            ),
            ms(m.ms.median),
            ms(m.ms.p95),
            "< 50 ms".into(),
            verdict_below(m.ms.median, 50.0),
        ]);
        println!(
            "Part 4: the greedy mapper ({} repeats)\n{}",
            m.repeats,
            t.render()
        );
        rep.map = Some(m);
    }

    rep.targets = targets(&rep);
    let mut t = Table::new(&["target", "wanted", "measured", "verdict"]);
    for x in &rep.targets {
        t.row(vec![
            x.what.clone(),
            x.target.clone(),
            x.measured.clone(),
            x.verdict.clone(),
        ]);
    }
    println!("Targets\n{}", t.render());
    rep.total_s = started.elapsed().as_secs_f64();
    println!("total {:.0} s", rep.total_s);
    write_json(&args.json, &rep)?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

fn write_json(path: &Path, rep: &Report) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(rep)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn breakdown_table(title: &str, sizes: &[breakdown::SizeResult]) -> String {
    let mut header = vec!["phase (median / p95)".to_string()];
    header.extend(sizes.iter().map(|s| format!("N={}", s.nodes)));
    header.push("published (Xen 3.1, Torque 2.2)".into());
    let hdr: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(&hdr);
    let extra: Vec<(&str, &str, Option<&str>)> = breakdown::SLURM_ROWS
        .iter()
        .map(|(k, l)| (*k, *l, None))
        .collect();
    for (key, label, published) in breakdown::ROWS.iter().copied().chain(extra) {
        if !sizes.iter().any(|s| s.phases.contains_key(key)) {
            continue;
        }
        let mut row = vec![label.to_string()];
        for s in sizes {
            row.push(
                s.phases
                    .get(key)
                    .map(|p| format!("{} / {}", ms(p.median), ms(p.p95)))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        row.push(published.unwrap_or("").to_string());
        t.row(row);
    }
    let repeats: Vec<String> = sizes
        .iter()
        .map(|s| format!("N={}: {}", s.nodes, s.repeats))
        .collect();
    format!("{title}\nrepeats: {}\n{}", repeats.join(", "), t.render())
}

fn load_table(levels: &[load::LoadResult]) -> String {
    let mut t = Table::new(&[
        "pilots (long-polls open)",
        "events/s acked",
        "p50",
        "p99",
        "refused",
        "CPU/event: server, writer",
        "RSS idle",
        "RSS after",
        "limit (bare loop)",
        "fraction",
        "verdict",
    ]);
    for l in levels {
        t.row(vec![
            l.pilots.to_string(),
            format!("{:.0}", l.events_per_s),
            ms(l.p50_ms),
            ms(l.p99_ms),
            l.events_refused.to_string(),
            format!(
                "{:.0} us, {:.0} us",
                l.server_cpu_us_per_event, l.writer_cpu_us_per_event
            ),
            format!("{:.0} MB", l.rss_mb_idle),
            format!("{:.0} MB", l.rss_mb_after),
            l.limit
                .as_ref()
                .map(|m| format!("{:.0}/s", m.events_per_s))
                .unwrap_or_else(|| "-".into()),
            format!("{:.2}", l.fraction_of_limit),
            format!(
                "{}; p99 {}; fraction {}",
                verdict_above(l.events_per_s, 20_000.0),
                verdict_below(l.p99_ms, 20.0),
                verdict_above(l.fraction_of_limit, 0.5)
            ),
        ]);
    }
    format!(
        "Part 3: coordinator alone (child process, fake batch system), {} senders in closed loop, HTTP/1.1 keep-alive on loopback\n{}",
        load::SENDERS,
        t.render()
    )
}

fn targets(rep: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let phase = |n: u32, key: &str| {
        rep.breakdown
            .iter()
            .find(|s| s.nodes == n)
            .and_then(|s| s.phases.get(key))
            .map(|p| p.median)
    };
    let not = "not measured".to_string();
    for (key, how) in [
        ("overhead", "on this host"),
        ("overhead.cluster", "on N real nodes (estimate)"),
    ] {
        for (n, target) in [(16u32, 50.0), (1024, 1000.0)] {
            let v = phase(n, key);
            out.push(Target {
                what: format!("our overhead end to end, N = {n}, {how}"),
                target: format!("< {}", ms(target)),
                measured: v.map(ms).unwrap_or_else(|| not.clone()),
                verdict: v
                    .map(|v| verdict_below(v, target))
                    .unwrap_or_else(|| not.clone()),
            });
        }
        // Growth: exponent of overhead ~ N^k between N = 16 (or the smallest >= 16) and the largest N.
        let big: Vec<(u32, f64)> = rep
            .breakdown
            .iter()
            .filter(|s| s.nodes >= 16)
            .filter_map(|s| s.phases.get(key).map(|p| (s.nodes, p.median)))
            .collect();
        if let (Some(a), Some(b)) = (big.first(), big.last()) {
            if b.0 > a.0 && a.1 > 0.0 {
                let k = (b.1 / a.1).ln() / (f64::from(b.0) / f64::from(a.0)).ln();
                out.push(Target {
                    what: format!("overhead growth N = {} -> {}, {how}", a.0, b.0),
                    target: "sub-linear (exponent < 1)".into(),
                    measured: format!(
                        "x{:.1} for x{} nodes (exponent {k:.2})",
                        b.1 / a.1,
                        b.0 / a.0
                    ),
                    verdict: if k < 1.0 {
                        "ok".into()
                    } else {
                        format!("MISSED (exponent {k:.2})")
                    },
                });
            }
        }
    }
    for l in &rep.load {
        out.push(Target {
            what: format!("signed events/s, {} pilots", l.pilots),
            target: ">= 20000/s".into(),
            measured: format!("{:.0}/s", l.events_per_s),
            verdict: verdict_above(l.events_per_s, 20_000.0),
        });
        out.push(Target {
            what: format!("event path / machine limit, {} pilots", l.pilots),
            target: ">= 0.5".into(),
            measured: format!("{:.2}", l.fraction_of_limit),
            verdict: verdict_above(l.fraction_of_limit, 0.5),
        });
        out.push(Target {
            what: format!("event p99, {} pilots", l.pilots),
            target: "< 20 ms".into(),
            measured: ms(l.p99_ms),
            verdict: verdict_below(l.p99_ms, 20.0),
        });
    }
    let rss = rep.load.iter().find(|l| l.pilots == 10_000);
    out.push(Target {
        what: "coordinator RSS, 10,000 long-polling pilots".into(),
        target: "< 500 MB".into(),
        measured: rss
            .map(|l| format!("{:.0} MB (peak {:.0} MB)", l.rss_mb_after, l.hwm_mb))
            .unwrap_or_else(|| not.clone()),
        verdict: rss
            .map(|l| verdict_below(l.hwm_mb, 500.0))
            .unwrap_or_else(|| not.clone()),
    });
    if let Some(m) = &rep.map {
        out.push(Target {
            what: "mapping 100,000 VMs".into(),
            target: "< 50 ms".into(),
            measured: ms(m.ms.median),
            verdict: verdict_below(m.ms.median, 50.0),
        });
    }
    out
}
