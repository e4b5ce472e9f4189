//! `workspace-coordinator demo`: the whole product on one machine.
//!
//! A coordinator with the `local` batch system (4 virtual nodes, 2 cores and
//! 4 GiB each) and pilots on the `sim` hypervisor, in a temporary directory:
//! lease an ensemble, destroy it, lease another and preempt one of its pilot
//! jobs through the batch system, print the timelines, and check that every
//! node ended with its original dom0 memory and no VM.

use crate::client::{Client, ClientError};
use crate::config::{Config, User};
use crate::server::{self, ServerError};
use crate::timeline::{fmt_stamp_ms, format_entry, in_time_order, phase_summary};
use lrm_adapters::JobId;
use protocol::view::{TimelineEntry, WorkspaceState, WorkspaceView};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Step(String),
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
}

pub struct DemoOptions {
    pub nodes: u32,
    pub hypervisor: crate::config::Hypervisor,
    /// Keep the working directory (database, logs, node states) afterwards.
    pub keep: bool,
}

pub const ENSEMBLE: &str = protocol::spec::EXAMPLE;

/// The ensemble for `--hypervisor kvm`: real QEMU VMs, so small ones (a
/// kernel + busybox initramfs from scripts/kvm-payload.sh, image `kernel:`).
pub const KVM_ENSEMBLE: &str = r#"
name = "demo-ensemble"
duration = "1h"
[[group]]
name = "worker"
count = 3
memory_mb = 128
cpus = 1
image = "kernel:"
[[group]]
name = "head"
count = 1
memory_mb = 256
cpus = 1
image = "kernel:"
"#;

const TOKEN: &str = "demo-token";
const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

fn nr_hugepages() -> Option<u64> {
    std::fs::read_to_string(NR_HUGEPAGES)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes the node config for `--hypervisor kvm`: the payload built by
/// scripts/kvm-payload.sh ($WSP_KVM_PAYLOAD, else its versioned default).
fn kvm_node_config(root: &std::path::Path) -> Result<PathBuf, DemoError> {
    let payload = PathBuf::from(
        std::env::var("WSP_KVM_PAYLOAD").unwrap_or_else(|_| "/var/cache/wsp-kvm-payload/v5".into()),
    );
    let (kernel, initrd) = (payload.join("vmlinux"), payload.join("initrd.gz"));
    if !kernel.is_file() || !initrd.is_file() {
        return Err(DemoError::Step(format!(
            "no VM payload in {}: run scripts/kvm-payload.sh first",
            payload.display()
        )));
    }
    let path = root.join("node.toml");
    std::fs::write(
        &path,
        format!(
            "[kvm]\nrun_dir = \"{}/nodes/%n/kvm\"\nkernel = \"{}\"\ninitrd = \"{}\"\n",
            root.display(),
            kernel.display(),
            initrd.display()
        ),
    )?;
    Ok(path)
}

/// QEMU processes started for this demo (their arguments point into `root`).
fn demo_qemus(root: &std::path::Path) -> usize {
    let root = root.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.starts_with("qemu-system") && c.contains(&root))
        .count()
}

/// Waits (bounded) until `done(view)` holds; prints state changes.
async fn wait_until(
    client: &Client,
    id: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&WorkspaceView) -> bool,
) -> Result<(WorkspaceView, Vec<TimelineEntry>), DemoError> {
    let started = Instant::now();
    let mut after = 0;
    let mut entries = Vec::new();
    loop {
        let page = client.events(id, after, Duration::from_millis(500)).await?;
        if let Some(last) = page.events.last() {
            after = last.seq;
        }
        entries.extend(page.events);
        let view = client.get(id).await?;
        if done(&view) {
            return Ok((view, entries));
        }
        if started.elapsed() > limit {
            return Err(DemoError::Step(format!(
                "workspace {id} did not become {what} within {limit:?} (state {}, reason {:?})",
                view.state, view.reason
            )));
        }
    }
}

fn print_timeline(title: &str, entries: &[TimelineEntry]) {
    println!("\n== {title}");
    let mut entries = entries.to_vec();
    in_time_order(&mut entries);
    let t0 = entries.first().map(|e| e.ts_ms).unwrap_or(0);
    for e in &entries {
        println!("{}", format_entry(e, t0));
    }
    println!("   phases:");
    for (label, ms) in phase_summary(&entries) {
        println!(
            "   {:<52} {:>10}",
            label,
            ms.map(|ms| fmt_stamp_ms(ms.round() as u64))
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// Reads a simulated node through `workspace-pilot sim show`.
async fn sim_node(program: &PathBuf, dir: &str) -> Result<serde_json::Value, DemoError> {
    let args = vec![
        "sim".to_string(),
        "show".into(),
        "--dir".into(),
        dir.to_string(),
    ];
    let out = lrm_adapters::command::run(program, &args, None, Duration::from_secs(10))
        .await
        .map_err(|e| DemoError::Step(e.to_string()))?;
    let out = lrm_adapters::command::check(out).map_err(|e| DemoError::Step(e.to_string()))?;
    serde_json::from_str(&out.stdout).map_err(|e| DemoError::Step(format!("sim show {dir}: {e}")))
}

/// Runs the demo; `Ok(true)` when every node ended exactly as it started.
pub async fn run(opts: DemoOptions) -> Result<bool, DemoError> {
    let tmp = tempfile::Builder::new().prefix("wsp-demo-").tempdir()?;
    let root = tmp.path().to_path_buf();
    let mut cfg = Config {
        data_dir: root.join("coordinator"),
        listen: "127.0.0.1:0".into(),
        tick_ms: 50,
        lrm_poll_s: 1.0,
        users: vec![User {
            name: "demo".into(),
            token_sha256: protocol::auth::token_hash(TOKEN),
            admin: false,
            ..Default::default()
        }],
        ..Config::default()
    };
    cfg.local.nodes = opts.nodes;
    cfg.local.cores_per_node = 2;
    cfg.local.memory_mb_per_node = 4096;
    cfg.local.kill_grace_s = 5;
    cfg.pilot.hypervisor = opts.hypervisor;
    cfg.pilot.state_dir = root.join("nodes/%n/state").display().to_string();
    cfg.pilot.sim_dir = root.join("nodes/%n/sim").display().to_string();
    cfg.pilot.poll_wait_ms = 10_000;
    let kvm = opts.hypervisor == crate::config::Hypervisor::Kvm;
    let hugepages_before = nr_hugepages();
    if kvm {
        cfg.pilot.node_config = Some(kvm_node_config(&root)?.display().to_string());
    }
    let ensemble = if kvm { KVM_ENSEMBLE } else { ENSEMBLE };
    let program = cfg.pilot_program();
    let node_names: Vec<String> = (1..=opts.nodes)
        .map(|i| format!("{}{}", cfg.local.node_prefix, i))
        .collect();
    let sim_dir = cfg.pilot.sim_dir.clone();

    println!(
        "workspace pilot demo: local batch system ({} nodes x 2 cores x 4096 MB), {} hypervisor",
        opts.nodes, opts.hypervisor
    );
    println!("working directory: {}", root.display());
    let running = server::start(cfg, None).await?;
    println!("coordinator: {}", running.url);
    let client = Client::new(&running.url, TOKEN)?;

    let result = scenario(&client, &running, ensemble).await;

    running.stop().await;
    // Check every node whatever happened above.
    let mut all_ok = true;
    println!("\n== nodes after the demo");
    if !kvm {
        println!(
            "   {:<8} {:>12} {:>12} {:>8}",
            "node", "dom0 now MB", "original MB", "guests"
        );
    }
    if kvm {
        // Real VMs: the host's hugepage pool is back and no QEMU is left.
        let deadline = Instant::now() + Duration::from_secs(10);
        while demo_qemus(&root) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (now, qemus) = (nr_hugepages(), demo_qemus(&root));
        let ok = now == hugepages_before && qemus == 0;
        all_ok &= ok;
        println!(
            "   hugepages {:?} (before the demo {:?}), QEMU processes left {qemus}  {}",
            now,
            hugepages_before,
            if ok { "ok" } else { "NOT RESTORED" }
        );
    }
    for n in node_names.iter().filter(|_| !kvm) {
        let dir = sim_dir.replace("%n", n);
        match sim_node(&program, &dir).await {
            Ok(v) => {
                let cur = v["dom0"]["current_mb"].as_u64().unwrap_or(0);
                let max = v["dom0"]["max_mb"].as_u64().unwrap_or(0);
                let guests = v["domains"]
                    .as_array()
                    .map(|a| a.len())
                    .unwrap_or(usize::MAX);
                let ok = cur == max && guests == 0;
                all_ok &= ok;
                println!(
                    "   {:<8} {:>12} {:>12} {:>8}  {}",
                    n,
                    cur,
                    max,
                    guests,
                    if ok { "ok" } else { "NOT RESTORED" }
                );
            }
            Err(e) => {
                all_ok = false;
                println!("   {n:<8} cannot read node: {e}");
            }
        }
    }
    if opts.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    match result {
        Ok(()) => {
            println!(
                "\n{}",
                if all_ok {
                    "demo OK: every node has its original dom0 memory and no VM"
                } else {
                    "demo FAILED: a node was not restored"
                }
            );
            Ok(all_ok)
        }
        Err(e) => Err(e),
    }
}

async fn scenario(
    client: &Client,
    running: &server::Running,
    ensemble: &str,
) -> Result<(), DemoError> {
    // 1. Lease an ensemble, wait for it to run, destroy it. Durations are
    // printed once, from the timeline's summary (not also timed here).
    let ws = client.create(ensemble).await?;
    println!("\n[1] created {} ({}): 3 workers + 1 head", ws.id, ws.name);
    let (view, _) = wait_until(
        client,
        ws.id.as_str(),
        "running",
        Duration::from_secs(60),
        |v| v.state == WorkspaceState::Running || v.state.is_terminal(),
    )
    .await?;
    if view.state != WorkspaceState::Running {
        return Err(DemoError::Step(format!(
            "workspace {} ended {}: {:?}",
            view.id, view.state, view.reason
        )));
    }
    println!("    running (durations in the timeline below)");
    for vm in &view.vms {
        println!(
            "    {:<32} {:<7} {:<7} job {:<4} {}",
            vm.name,
            vm.group,
            vm.node.clone().unwrap_or_default(),
            vm.job_id.clone().unwrap_or_default(),
            vm.state.as_str()
        );
    }
    client.destroy(ws.id.as_str()).await?;
    let (view, entries) = wait_until(
        client,
        ws.id.as_str(),
        "settled",
        Duration::from_secs(60),
        |v| v.settled,
    )
    .await?;
    println!("    destroyed and settled ({})", view.state);
    let mut all = client
        .events(ws.id.as_str(), 0, Duration::ZERO)
        .await?
        .events;
    if all.len() < entries.len() {
        all = entries;
    }
    print_timeline(
        &format!("timeline of {} (create, run, destroy)", ws.id),
        &all,
    );

    // 2. Lease another; the batch system preempts the head node's pilot job.
    let ws = client.create(ensemble).await?;
    println!(
        "\n[2] created {}; will preempt one of its pilot jobs",
        ws.id
    );
    let (view, _) = wait_until(
        client,
        ws.id.as_str(),
        "running",
        Duration::from_secs(60),
        |v| v.state == WorkspaceState::Running || v.state.is_terminal(),
    )
    .await?;
    let slot = view
        .slots
        .iter()
        .find(|s| s.group == "head")
        .ok_or_else(|| DemoError::Step("no head slot".into()))?;
    let job = slot
        .job_id
        .clone()
        .ok_or_else(|| DemoError::Step("head slot has no job id".into()))?;
    println!("    batch system preempts job {job} (SIGTERM to its pilot, SIGKILL after the grace period)");
    running
        .engine
        .lrm()
        .cancel(&JobId(job))
        .await
        .map_err(|e| DemoError::Step(format!("preempting: {e}")))?;
    let (view, _) = wait_until(
        client,
        ws.id.as_str(),
        "settled",
        Duration::from_secs(60),
        |v| v.settled,
    )
    .await?;
    println!(
        "    workspace {}: {}",
        view.state,
        view.reason.clone().unwrap_or_default()
    );
    let all = client
        .events(ws.id.as_str(), 0, Duration::ZERO)
        .await?
        .events;
    print_timeline(
        &format!("timeline of {} (create, run, preempted)", ws.id),
        &all,
    );
    if view.state != WorkspaceState::Preempted {
        return Err(DemoError::Step(format!(
            "expected the workspace to be preempted, it is {}",
            view.state
        )));
    }
    Ok(())
}
