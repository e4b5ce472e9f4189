//! `workspace-pilot`: the command the batch job runs on each node of a slot.
//!
//! `run` adapts the node, follows the coordinator and cleans up (see the
//! library docs for the life and exit codes); `sim` sets up and inspects a
//! simulated node for demos and tests. Argument checks live here; the work
//! lives in the `pilot` library.

mod check;
mod checkpoint_cmd;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pilot::hypervisor::sim::{Sim, SimNode};
use pilot::hypervisor::{self, HvOptions};
use pilot::node::{expand_node, job_id_from_env, node_name, HypervisorRecord};
use pilot::run::RunConfig;
use protocol::auth::SlotKey;
use protocol::SlotId;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "workspace-pilot", version, about = "Workspace pilot: lease a batch node's memory for VMs", after_help = pilot::exit::HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Reserve this node for a slot, follow the coordinator, clean up, exit.
    #[command(after_help = pilot::exit::HELP)]
    Run(RunArgs),
    /// Set up or inspect a simulated node.
    #[command(subcommand)]
    Sim(SimCmd),
    /// Check this node is fit for pilots; print each check and what to fix (exit 0 all ok, 1 not).
    Check(check::CheckArgs),
    /// List, verify or delete checkpoints in the node's checkpoint store (exit 0 ok, 1 failed, 2 usage).
    #[command(subcommand)]
    Checkpoint(checkpoint_cmd::CheckpointCmd),
    /// Write man pages (workspace-pilot.1 and one per subcommand) into a directory.
    Man {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Slot id (sl-…).
    #[arg(long)]
    slot: SlotId,
    /// Coordinator base URL (http://head:8080, or https:// with --ca-file).
    #[arg(long)]
    coordinator: String,
    /// CA certificate (PEM) that signed an https coordinator's certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// File holding the slot key (64 hex digits).
    #[arg(long)]
    key_file: PathBuf,
    /// Memory to take from dom0, MB (with --pool: the idle reservation, 0 allowed).
    #[arg(long)]
    memory_mb: u64,
    /// Start as a pool slot: reserve --memory-mb, report `idle` and wait for
    /// the coordinator's `bind` (docs/POOL.md).
    #[arg(long)]
    pool: bool,
    /// Slot duration (batch walltime), seconds.
    #[arg(long)]
    duration_s: u64,
    /// Grace period between the batch system's warning signal and SIGKILL, seconds.
    #[arg(long)]
    grace_s: u64,
    /// Directory for node state files (`%n` = node name).
    #[arg(long)]
    state_dir: String,
    /// Node name (default: $WSP_NODE, $SLURMD_NODENAME, hostname).
    #[arg(long)]
    node: Option<String>,
    #[arg(long, default_value = "sim")]
    hypervisor: String,
    /// Directory of the simulated node (`%n` = node name).
    #[arg(long)]
    sim_dir: Option<String>,
    /// Node configuration (TOML with [xen] / [kvm] sections; `%n` = node name).
    #[arg(long)]
    node_config: Option<String>,
    /// Share of the grace period to wait for the coordinator after a signal.
    #[arg(long, default_value_t = 0.5)]
    coordinator_wait_fraction: f64,
    /// dom0 never goes below this, MB.
    #[arg(long, default_value_t = 100)]
    min_dom0_mb: u64,
    /// Release this long before the slot's walltime, seconds.
    #[arg(long, default_value_t = 5)]
    margin_s: u64,
    /// Timeout of each event request, ms.
    #[arg(long, default_value_t = 2000)]
    notify_timeout_ms: u64,
    /// Bound on each balloon move (reserve, restore), ms.
    #[arg(long, default_value_t = 10000)]
    balloon_timeout_ms: u64,
    /// How long the coordinator may hold a command poll, ms.
    #[arg(long, default_value_t = 20000)]
    poll_wait_ms: u64,
    /// How long to try reaching the coordinator at start, seconds.
    #[arg(long, default_value_t = 30)]
    startup_budget_s: u64,
    /// After giving the slot back, keep trying to report it for this long
    /// (never past the job's end), seconds. Reports still undelivered stay in
    /// the state directory's outbox for the next pilot or workspace-kill-all.
    #[arg(long, default_value_t = 600)]
    report_linger_s: u64,
}

#[derive(Subcommand)]
enum SimCmd {
    /// Create a simulated node (refuses to replace one unless --force).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Physical memory (dom0's maximum), MB.
        #[arg(long)]
        memory_mb: u64,
        #[arg(long)]
        cpus: u32,
        /// dom0's memory at start (default: all of it), MB.
        #[arg(long)]
        dom0_mb: Option<u64>,
        #[arg(long, default_value_t = 0)]
        balloon_ms: u64,
        #[arg(long, default_value_t = 0)]
        create_ms: u64,
        #[arg(long, default_value_t = 0)]
        destroy_ms: u64,
        /// Saving a guest to a checkpoint takes this long per GB of its memory.
        #[arg(long, default_value_t = 0)]
        save_ms_per_gb: u64,
        /// Restoring a guest from a checkpoint takes this long per GB.
        #[arg(long, default_value_t = 0)]
        restore_ms_per_gb: u64,
        /// A created guest is ready (booted) this long after its creation.
        #[arg(long, default_value_t = 0)]
        boot_ms: u64,
        /// The balloon never shrinks dom0 below this, MB.
        #[arg(long)]
        balloon_floor_mb: Option<u64>,
        #[arg(long)]
        force: bool,
    },
    /// Print node.json (dom0's memory brought up to date) as pretty JSON.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Add a guest that is not the pilot's.
    AddDomain {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        memory_mb: u64,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
    },
    /// Write a file on a guest's disk, as its user would (tests check
    /// whose files a guest sees).
    GuestWrite {
        #[arg(long)]
        dir: PathBuf,
        /// The guest's name (wsp-<slot>-<vm>).
        #[arg(long)]
        name: String,
        #[arg(long)]
        file: String,
    },
    /// Make every CPU share change fail with REASON, as a node whose cgroup
    /// refuses writes would (a fault for tests); `--off` heals it.
    RefuseSetCpu {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, required_unless_present = "off")]
        reason: Option<String>,
        #[arg(long, conflicts_with = "reason")]
        off: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The pilot's stderr is the batch job's output file: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written is dropped. Otherwise the
        // subscriber reports it with eprintln!, which panics when stderr is
        // gone: on a multi-node OpenPBS job stderr is a socket to pbs_demux,
        // which qdel's SIGTERM ends, so the pilot died mid-cleanup (exit 101)
        // on its first log line after the signal (tests/src/pbs.rs, two-node
        // qdel).
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let code = match cli.cmd {
        Cmd::Run(args) => run(args),
        Cmd::Check(args) => check::check(args),
        Cmd::Checkpoint(cmd) => checkpoint_cmd::checkpoint(cmd),
        Cmd::Man { dir } => {
            match pilot::manpages::write(<Cli as clap::CommandFactory>::command(), &dir) {
                Ok(files) => {
                    files.iter().for_each(|f| println!("{}", f.display()));
                    0
                }
                Err(e) => {
                    eprintln!("workspace-pilot: {e}");
                    1
                }
            }
        }
        Cmd::Sim(cmd) => match sim(cmd) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("workspace-pilot: {e:#}");
                pilot::exit::USAGE
            }
        },
    };
    // Exit without waiting for blocking threads a timed-out hypervisor call
    // may still occupy.
    std::process::exit(code);
}

fn usage(msg: impl std::fmt::Display) -> i32 {
    eprintln!("workspace-pilot: {msg}");
    pilot::exit::USAGE
}

fn run(a: RunArgs) -> i32 {
    let node = node_name(a.node.as_deref());
    let key_path = a.key_file.display().to_string();
    let key = match std::fs::read_to_string(&a.key_file) {
        Ok(text) => match SlotKey::from_hex(&key_path, &text) {
            Ok(k) => k,
            Err(e) => return usage(e),
        },
        Err(e) => return usage(format!("cannot read key file {key_path}: {e}")),
    };
    if a.memory_mb == 0 && !a.pool {
        return usage(
            "--memory-mb must be at least 1 (0 only with --pool: an idle slot holding nothing)",
        );
    }
    if a.duration_s == 0 || a.margin_s >= a.duration_s {
        return usage(format!(
            "--margin-s ({}) must be less than --duration-s ({})",
            a.margin_s, a.duration_s
        ));
    }
    if a.grace_s == 0 {
        return usage("--grace-s must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.coordinator_wait_fraction) {
        return usage("--coordinator-wait-fraction must be between 0 and 1");
    }
    if !(a.coordinator.starts_with("http://") || a.coordinator.starts_with("https://")) {
        return usage(format!(
            "--coordinator {:?} must be an http:// or https:// URL",
            a.coordinator
        ));
    }
    let opts = HvOptions {
        sim_dir: a.sim_dir.as_deref().map(|d| expand_node(d, &node)),
        node: match a
            .node_config
            .as_deref()
            .map(|p| hypervisor::NodeConfig::load(&expand_node(p, &node)))
        {
            None => hypervisor::NodeConfig::default(),
            Some(Ok(c)) => c,
            Some(Err(e)) => return usage(e),
        },
        node_name: node.clone(),
    };
    let hv: Arc<dyn hypervisor::Hypervisor> = match hypervisor::open(&a.hypervisor, &opts) {
        Ok(hv) => Arc::from(hv),
        Err(e) => return usage(e),
    };
    if let Err(e) = hv.dom0_memory() {
        return usage(format!("node not usable: {e}"));
    }
    let state_dir = expand_node(&a.state_dir, &node);
    let record = HypervisorRecord {
        kind: a.hypervisor.clone(),
        node_config: a
            .node_config
            .as_deref()
            .map(|p| absolute(&expand_node(p, &node))),
        sim_dir: opts.sim_dir.as_deref().map(absolute),
        updated_ms: protocol::now_ms(),
    };
    if let Err(e) = record.write(&state_dir) {
        return usage(format!(
            "cannot record the hypervisor in {}: {e}",
            HypervisorRecord::path(&state_dir).display()
        ));
    }
    let ca_pem = match &a.ca_file {
        None => None,
        Some(p) => match std::fs::read(p) {
            Ok(pem) => Some(pem),
            Err(e) => return usage(format!("--ca-file {}: {e}", p.display())),
        },
    };
    let cfg = RunConfig {
        ca_pem,
        slot: a.slot,
        coordinator: a.coordinator,
        key,
        memory_mb: a.memory_mb,
        pool: a.pool,
        duration: Duration::from_secs(a.duration_s),
        grace: Duration::from_secs(a.grace_s),
        state_dir,
        node,
        job_id: job_id_from_env(),
        coordinator_wait_fraction: a.coordinator_wait_fraction,
        min_dom0_mb: a.min_dom0_mb,
        margin: Duration::from_secs(a.margin_s),
        notify_timeout: Duration::from_millis(a.notify_timeout_ms.max(1)),
        balloon_timeout: Duration::from_millis(a.balloon_timeout_ms.max(1)),
        poll_wait: Duration::from_millis(a.poll_wait_ms),
        startup_budget: Duration::from_secs(a.startup_budget_s),
        images: opts.node.images.clone(),
        report_linger: Duration::from_secs(a.report_linger_s),
        checkpoints: opts.node.checkpoints.clone(),
    };
    // One thread is plenty for a pilot (hypervisor calls go to the blocking
    // pool) and starts faster: a node may start many pilots at once.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("workspace-pilot: cannot start the async runtime: {e}");
            return pilot::exit::INTERNAL;
        }
    };
    let code = rt.block_on(pilot::run::run(cfg, hv));
    // Do not drop the runtime: it would wait for stuck blocking calls.
    std::mem::forget(rt);
    code
}

/// `p` made absolute against the working directory (as given if that fails).
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn sim(cmd: SimCmd) -> anyhow::Result<()> {
    match cmd {
        SimCmd::Init {
            dir,
            memory_mb,
            cpus,
            dom0_mb,
            balloon_ms,
            create_ms,
            destroy_ms,
            save_ms_per_gb,
            restore_ms_per_gb,
            boot_ms,
            balloon_floor_mb,
            force,
        } => {
            anyhow::ensure!(
                memory_mb > 0 && cpus > 0,
                "--memory-mb and --cpus must be at least 1"
            );
            let mut node = SimNode::new(memory_mb, cpus, dom0_mb);
            node.latency.balloon_ms = balloon_ms;
            node.latency.create_ms = create_ms;
            node.latency.destroy_ms = destroy_ms;
            node.latency.save_ms_per_gb = save_ms_per_gb;
            node.latency.restore_ms_per_gb = restore_ms_per_gb;
            node.latency.boot_ms = boot_ms;
            node.balloon_floor_mb = balloon_floor_mb;
            Sim::init(&dir, &node, force)?;
        }
        SimCmd::Show { dir } => {
            let node = Sim::open(&dir)?.node()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&node).context("encoding node.json")?
            );
        }
        SimCmd::AddDomain {
            dir,
            name,
            memory_mb,
            cpus,
        } => {
            Sim::open(&dir)?.add_foreign_domain(&name, memory_mb, cpus)?;
        }
        SimCmd::GuestWrite { dir, name, file } => {
            Sim::open(&dir)?.write_guest_file(&name, &file)?;
        }
        SimCmd::RefuseSetCpu { dir, reason, off } => {
            Sim::open(&dir)?.refuse_set_cpu(reason.filter(|_| !off))?;
        }
    }
    Ok(())
}
