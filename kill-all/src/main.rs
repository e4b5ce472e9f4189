//! `workspace-kill-all`: an admin's tool to give a node back after pilots left things behind.
//!
//! It reads the node state files, SIGKILLs pilots still alive (so they cannot
//! create more VMs), destroys the slots' guests in parallel (by state file and
//! `wsp-` name tag; `--all` for every guest), restores dom0 memory, removes
//! checkpoints a killed pilot left unfinished, delivers the reports departed
//! pilots left in the outbox to their coordinator, and prints what it did.
//! It is not a pilot: it signs nothing.
//!
//! Which driver to open comes from `--hypervisor`, else from what the node's
//! pilots recorded in the state dir (`hypervisor.json`, the slot files); it
//! refuses to guess when nothing says, or when the records disagree.
//!
//! Exit codes: 0 everything succeeded (or nothing to do), 1 something failed,
//! 2 usage error (bad flags, hypervisor unknown or unusable, state dir unusable), 3 the node is
//! restored but some pilot reports could not be delivered (kept; run again).

mod checkpoints;

use clap::Parser;
use pilot::hypervisor::{self, set_dom0_target_and_wait, HvOptions, Hypervisor};
use pilot::node::{expand_node, hypervisor_kind, node_name, HypervisorRecord};
use pilot::outbox::{self, DeliverOptions, Delivery, Outcome};
use pilot::state::{list_state_files, remove_state_file, NodeLock, NodeStateFile, VmRecordState};
use protocol::{SlotId, VmName};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const EXIT_HELP: &str = "Exit codes:
  0  everything succeeded, or there was nothing to do
  1  something could not be undone (see the report)
  2  usage error: bad flags, hypervisor unknown or unusable, state directory unusable
  3  the node is restored, but reports the pilots left for the coordinator
     could not all be delivered (they stay in the outbox: run again later)";

/// Destroy what workspace pilots left on this node and restore dom0 memory.
#[derive(Parser)]
#[command(name = "workspace-kill-all", version, after_help = EXIT_HELP)]
pub(crate) struct Cli {
    /// Directory of the pilots' node state files (`%n` = node name).
    #[arg(long, default_value = "/run/workspace-pilot/%n/state")]
    state_dir: String,
    /// sim, kvm or xen. Default: what the node's pilots recorded in the
    /// state dir; refused when nothing recorded one.
    #[arg(long)]
    hypervisor: Option<String>,
    /// Directory of the simulated node (`%n` = node name; default: recorded).
    #[arg(long)]
    sim_dir: Option<String>,
    /// Node configuration, the same file the pilot uses (`%n` = node name;
    /// default: the one the pilots recorded).
    #[arg(long)]
    node_config: Option<String>,
    /// Node name (default: $WSP_NODE, $SLURMD_NODENAME, hostname).
    #[arg(long)]
    node: Option<String>,
    /// Only this slot's pilots, guests and state files.
    #[arg(long)]
    slot: Option<SlotId>,
    /// Destroy every guest except dom0, not only the pilots'.
    #[arg(long, conflicts_with = "slot")]
    all: bool,
    /// Print the plan; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON report on stdout instead of lines.
    #[arg(long)]
    json: bool,
    /// Bound on the dom0 balloon, ms.
    #[arg(long, default_value_t = 10000)]
    balloon_timeout_ms: u64,
    /// Do not deliver the reports departed pilots left (in <state-dir>/outbox).
    #[arg(long)]
    no_deliver: bool,
    /// Bound on delivering those reports to their coordinator, seconds.
    #[arg(long, default_value_t = 10)]
    deliver_timeout_s: u64,
    /// Also remove the complete checkpoints the state files name (suspended
    /// VMs a coordinator could still resume); unfinished ones always go.
    #[arg(long)]
    purge_checkpoints: bool,
    /// Write the man page (workspace-kill-all.1) into this directory, and
    /// do nothing else.
    #[arg(long, value_name = "DIR")]
    man: Option<PathBuf>,
}

#[derive(Serialize)]
struct Action {
    /// kill-pilot, destroy, restore-memory, remove-state-file, read-state-file.
    action: &'static str,
    target: String,
    /// planned, ok, failed.
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct Report {
    node: String,
    dry_run: bool,
    ok: bool,
    actions: Vec<Action>,
    /// The pilots' undelivered events, and what became of each.
    deliveries: Vec<Delivery>,
}

impl Report {
    pub(crate) fn record(
        &mut self,
        action: &'static str,
        target: String,
        outcome: Option<Result<(), String>>,
    ) -> bool {
        let (result, error, ok) = match outcome {
            None => ("planned", None, true),
            Some(Ok(())) => ("ok", None, true),
            Some(Err(e)) => ("failed", Some(e), false),
        };
        self.ok &= ok;
        self.actions.push(Action {
            action,
            target,
            result,
            error,
        });
        ok
    }
}

fn main() {
    let cli = Cli::parse();
    if let Some(dir) = &cli.man {
        match pilot::manpages::write(<Cli as clap::CommandFactory>::command(), dir) {
            Ok(files) => files.iter().for_each(|f| println!("{}", f.display())),
            Err(e) => {
                eprintln!("workspace-kill-all: {e}");
                std::process::exit(1);
            }
        }
        std::process::exit(0);
    }
    let node = node_name(cli.node.as_deref());
    let state_dir = expand_node(&cli.state_dir, &node);
    let driver = match which_driver(&cli, &state_dir) {
        Ok(d) => d,
        Err(e) => usage(e),
    };
    let opts = HvOptions {
        sim_dir: cli
            .sim_dir
            .as_deref()
            .map(|d| expand_node(d, &node))
            .or(driver.sim_dir),
        node: match cli
            .node_config
            .as_deref()
            .map(|p| expand_node(p, &node))
            .or(driver.node_config)
            .map(|p| hypervisor::NodeConfig::load(&p))
        {
            None => hypervisor::NodeConfig::default(),
            Some(Ok(c)) => c,
            Some(Err(e)) => usage(e),
        },
        node_name: node.clone(),
    };
    let hv = match hypervisor::open(&driver.kind, &opts) {
        Ok(hv) => hv,
        Err(e) => usage(e),
    };
    // Drivers that connect lazily (xen) show here whether the node answers.
    if let Err(e) = hv.dom0_memory() {
        usage(format!("node not usable: {e}"));
    }
    let checkpoints = opts.node.checkpoints.clone();
    let files = match list_state_files(&state_dir) {
        Ok(f) => f,
        Err(e) => usage(e),
    };
    let mut report = Report {
        node,
        dry_run: cli.dry_run,
        ok: true,
        actions: Vec::new(),
        deliveries: Vec::new(),
    };
    kill_all(
        &cli,
        hv.as_ref(),
        &state_dir,
        files,
        &checkpoints,
        &mut report,
    );
    if !cli.no_deliver {
        deliver(&cli, &state_dir, &mut report);
    }
    if cli.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("workspace-kill-all: cannot encode the report: {e}"),
        }
    } else {
        print_lines(&report);
    }
    let kept = report
        .deliveries
        .iter()
        .any(|d| matches!(d.outcome, Outcome::Kept { .. }));
    std::process::exit(match (report.ok, kept) {
        (false, _) => 1,
        (true, true) => 3,
        (true, false) => 0,
    });
}

/// Delivers the events departed pilots left in the outbox (after the node is
/// restored: that comes first), each pilot's in order, to the coordinator
/// each letter names. Needs no key: the letters are signed.
fn deliver(cli: &Cli, state_dir: &std::path::Path, r: &mut Report) {
    let opts = DeliverOptions {
        slot: cli.slot.clone(),
        skip: None,
        request_timeout: Duration::from_secs(cli.deliver_timeout_s.clamp(1, 5)),
        dry_run: cli.dry_run,
    };
    let dir = outbox::outbox_dir(state_dir);
    match outbox::deliver_left_behind_blocking(
        &dir,
        &opts,
        Duration::from_secs(cli.deliver_timeout_s),
    ) {
        Ok(d) => r.deliveries = d,
        Err(e) => {
            r.record(
                "deliver-reports",
                dir.display().to_string(),
                Some(Err(e.to_string())),
            );
        }
    }
}

/// The driver to open and the files the pilots used with it.
struct Driver {
    kind: String,
    node_config: Option<PathBuf>,
    sim_dir: Option<PathBuf>,
}

/// `--hypervisor`, else what the pilots recorded: `hypervisor.json` and the
/// `hypervisor` of each slot file this run handles. Refuses when nothing
/// says, when the records disagree, or when `--hypervisor` contradicts one
/// (the wrong driver finds none of the recorded VMs, and the records would
/// then be removed as if the node were clean).
fn which_driver(cli: &Cli, state_dir: &std::path::Path) -> Result<Driver, String> {
    let record = HypervisorRecord::read(state_dir)?;
    let mut said: Vec<(String, String)> = Vec::new();
    if let Some(r) = &record {
        said.push((
            r.kind.clone(),
            HypervisorRecord::path(state_dir).display().to_string(),
        ));
    }
    for path in list_state_files(state_dir).map_err(|e| e.to_string())? {
        // Unreadable files are reported (and kept) by kill_all.
        if let Ok(f) = NodeStateFile::read(&path) {
            if slot_matches(cli, &f.slot_id) {
                let kind = hypervisor_kind(&f.hypervisor).to_string();
                said.push((kind, path.display().to_string()));
            }
        }
    }
    let how = "pass --hypervisor sim|kvm|xen (with --sim-dir or --node-config as the pilots \
               were given them)";
    let kind = match &cli.hypervisor {
        Some(h) => {
            if let Some((k, file)) = said.iter().find(|(k, _)| k != h) {
                return Err(format!(
                    "--hypervisor {h}, but {file} records {k}: the {h} driver would find none \
                     of the recorded VMs; pass --hypervisor {k}, or remove the file if it is stale"
                ));
            }
            h.clone()
        }
        None => {
            let kinds: BTreeSet<&str> = said.iter().map(|(k, _)| k.as_str()).collect();
            match kinds.len() {
                0 => {
                    return Err(format!(
                        "cannot tell which hypervisor this node uses: no pilot recorded one in {} \
                         (no {} or slot-*.json); {how}, or --state-dir if the pilots use another",
                        state_dir.display(),
                        HypervisorRecord::FILE
                    ))
                }
                1 => said[0].0.clone(),
                _ => {
                    let list: Vec<String> =
                        said.iter().map(|(k, f)| format!("{k} in {f}")).collect();
                    return Err(format!(
                        "the records disagree about this node's hypervisor ({}); {how} \
                         and --slot for the slots of each",
                        list.join(", ")
                    ));
                }
            }
        }
    };
    let record = record.filter(|r| r.kind == kind);
    Ok(Driver {
        kind,
        node_config: record.as_ref().and_then(|r| r.node_config.clone()),
        sim_dir: record.and_then(|r| r.sim_dir),
    })
}

fn usage(e: impl std::fmt::Display) -> ! {
    eprintln!("workspace-kill-all: {e}");
    std::process::exit(2)
}

fn print_lines(r: &Report) {
    let verb = if r.dry_run { "would" } else { "did" };
    if r.actions.is_empty() && r.deliveries.is_empty() {
        println!("{}: nothing to do", r.node);
    }
    for a in &r.actions {
        match (&a.error, a.result) {
            (Some(e), _) => println!("{}: {} {} FAILED: {e}", r.node, a.action, a.target),
            (None, "planned") => println!("{}: {verb} {} {}", r.node, a.action, a.target),
            (None, _) => println!("{}: {} {} ok", r.node, a.action, a.target),
        }
    }
    for d in &r.deliveries {
        let what = format!(
            "report {} #{} of pilot {} (slot {}) to {}",
            d.kind,
            d.seq,
            d.pilot_id,
            d.slot_id
                .as_ref()
                .map_or("?".to_string(), |s| s.to_string()),
            d.coordinator
        );
        let result = match &d.outcome {
            Outcome::Delivered => "delivered".to_string(),
            Outcome::AlreadyDelivered => "delivered (the coordinator had it)".to_string(),
            Outcome::Refused { status, error } => {
                format!("REFUSED by the coordinator (HTTP {status}: {error}); dropped")
            }
            Outcome::Kept { error } => format!("NOT DELIVERED ({error}); kept for later"),
            Outcome::Planned => "would be delivered".to_string(),
            Outcome::PilotAlive => "left to its pilot, which still runs".to_string(),
            Outcome::Unreadable { error } => format!("UNREADABLE ({error}); moved aside"),
        };
        println!("{}: {what}: {result}", r.node);
    }
}

/// Whether `slot` is one this run handles (every slot unless --slot).
fn slot_matches(cli: &Cli, slot: &SlotId) -> bool {
    match &cli.slot {
        Some(only) => only == slot,
        None => true,
    }
}

/// Whether `pid` runs `workspace-pilot` (by /proc/<pid>/cmdline).
fn is_live_pilot(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let exe = String::from_utf8_lossy(argv0);
    exe.rsplit('/')
        .next()
        .is_some_and(|name| name == "workspace-pilot")
}

fn kill_pilot(pid: u32) -> Result<(), String> {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    kill(p, Signal::SIGKILL).map_err(|e| format!("SIGKILL: {e}"))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if kill(p, None).is_err() || !is_live_pilot(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("still alive 5 s after SIGKILL".to_string())
}

fn kill_all(
    cli: &Cli,
    hv: &dyn Hypervisor,
    state_dir: &std::path::Path,
    files: Vec<PathBuf>,
    checkpoints: &pilot::checkpoint::CheckpointsConfig,
    r: &mut Report,
) {
    let dry = cli.dry_run;
    // 1. State files of the slots we handle.
    let mut handled: Vec<(PathBuf, NodeStateFile)> = Vec::new();
    for path in files {
        match NodeStateFile::read(&path) {
            Ok(f) if slot_matches(cli, &f.slot_id) => handled.push((path, f)),
            Ok(_) => {}
            Err(e) => {
                r.record(
                    "read-state-file",
                    path.display().to_string(),
                    Some(Err(e.to_string())),
                );
            }
        }
    }
    // 2. Stop live pilots first so they cannot create more VMs.
    for (_, f) in &handled {
        if f.pid != std::process::id() && is_live_pilot(f.pid) {
            let target = format!("pid {} (slot {})", f.pid, f.slot_id);
            r.record("kill-pilot", target, (!dry).then(|| kill_pilot(f.pid)));
        }
    }
    // 3. Guests: tagged ours (this slot if --slot), named in state files, or all.
    let named: BTreeSet<String> = handled
        .iter()
        .flat_map(|(_, f)| {
            f.vms
                .iter()
                .filter(|v| !matches!(v.state, VmRecordState::Destroyed | VmRecordState::Suspended))
                .map(|v| v.name.clone())
        })
        .collect();
    let domains = match hv.domains() {
        Ok(d) => d,
        Err(e) => {
            r.record(
                "list-domains",
                hv.name().to_string(),
                Some(Err(e.to_string())),
            );
            Vec::new()
        }
    };
    let victims: Vec<String> = domains
        .into_iter()
        .map(|d| d.name)
        .filter(|name| {
            cli.all
                || named.contains(name)
                || VmName::parse(name).is_some_and(|n| slot_matches(cli, &n.slot))
        })
        .collect();
    let results: Vec<(String, Option<Result<(), String>>)> = if dry {
        victims.into_iter().map(|v| (v, None)).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = victims
                .into_iter()
                .map(|name| {
                    let n = name.clone();
                    let h = scope.spawn(move || hv.destroy(&n).map_err(|e| e.to_string()));
                    (name, h)
                })
                .collect();
            handles
                .into_iter()
                .map(|(name, h)| {
                    let res = h
                        .join()
                        .unwrap_or_else(|_| Err("destroy thread panicked".to_string()));
                    (name, Some(res))
                })
                .collect()
        })
    };
    let mut destroyed_all = true;
    for (name, res) in results {
        destroyed_all &= r.record("destroy", name, res);
    }
    // 4. Node-wide pieces no VM needs any more (kvm: dnsmasq, nft table).
    if !dry && destroyed_all {
        let problems = hv.sweep_node();
        if !problems.is_empty() {
            destroyed_all = false;
            r.record(
                "sweep-network",
                hv.name().to_string(),
                Some(Err(problems.join("; "))),
            );
        }
    }
    // 5. Memory.
    let restored = restore_memory(cli, hv, state_dir, &handled, r);
    // 6. Checkpoints left unfinished (never restorable, but they take space).
    let node = r.node.clone();
    let stored = checkpoints::clean(cli, checkpoints, &node, &handled, r);
    // 7. State files whose slot is fully undone.
    if destroyed_all && restored && stored {
        for (path, _) in &handled {
            let outcome = (!dry).then(|| remove_state_file(path).map_err(|e| e.to_string()));
            r.record("remove-state-file", path.display().to_string(), outcome);
        }
    }
}

/// Restores dom0: with --slot, by adding back what that slot took; without,
/// by adding back what every handled slot took, and at least to the smallest
/// recorded original (a pilot killed mid-balloon may not have recorded what
/// it took yet), else to its maximum. An original alone is not enough: a
/// pilot that reserved while another slot held memory recorded dom0 without
/// that memory, and the other slot may since have given it back. Never
/// lowers dom0's target. Returns false if it failed.
fn restore_memory(
    cli: &Cli,
    hv: &dyn Hypervisor,
    state_dir: &std::path::Path,
    handled: &[(PathBuf, NodeStateFile)],
    r: &mut Report,
) -> bool {
    let m = match hv.dom0_memory() {
        Ok(m) => m,
        Err(e) => {
            return r.record(
                "restore-memory",
                "dom0".to_string(),
                Some(Err(e.to_string())),
            )
        }
    };
    let taken_back = m.target_mb + handled.iter().map(|(_, f)| f.taken_mb).sum::<u64>();
    let wanted = if cli.slot.is_some() {
        taken_back
    } else if hv.name().starts_with("kvm") {
        // kvm: the maximum is "no hugepages held by this node" (the driver
        // keeps a per-node ledger); recorded originals may predate other
        // nodes' changes of the host-wide pool.
        m.max_mb
    } else {
        handled
            .iter()
            .map(|(_, f)| f.original_dom0_mb)
            .filter(|mb| *mb > 0)
            .min()
            .unwrap_or(m.max_mb)
            .max(taken_back)
    };
    let target = wanted.min(m.max_mb).max(m.target_mb);
    if target == m.target_mb && m.current_mb == target {
        return true;
    }
    let label = format!("dom0 {} MB -> {target} MB", m.current_mb);
    if cli.dry_run {
        return r.record("restore-memory", label, None);
    }
    let timeout = Duration::from_millis(cli.balloon_timeout_ms);
    let outcome = NodeLock::acquire(state_dir, timeout)
        .map_err(|e| e.to_string())
        .and_then(|_lock| {
            set_dom0_target_and_wait(hv, target, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    r.record("restore-memory", label, Some(outcome))
}
