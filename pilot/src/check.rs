//! `workspace-pilot check` (part of the binary, not the library): is this
//! node fit for pilots? Every check prints `ok`, `warn` or `FAIL`, with
//! what to fix.
//!
//! Generic checks (driver opens, dom0 figures, guests listable, coordinator
//! reachable, key accepted) apply to every driver; `xen` adds its own
//! (xl present and safe, sudo without a password, xenstore reachable);
//! `kvm` each program it runs (with its package) and whether hardware KVM
//! really works. A node is fit when nothing FAILs; warnings do not change
//! the exit code (see docs/KVM.md for what TCG-only means).

use clap::Args;
use pilot::hypervisor::kvm::{self, HardwareKvm, Kvm};
use pilot::hypervisor::xen::{Check, Xen};
use pilot::hypervisor::{self, HvOptions, Hypervisor};
use pilot::node::{expand_node, node_name};
use protocol::auth::SlotKey;
use protocol::{PilotId, SlotId};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct CheckArgs {
    /// The driver the pilots on this node use: sim, kvm or xen.
    #[arg(long)]
    hypervisor: String,
    /// Directory of the simulated node (`%n` = node name).
    #[arg(long)]
    sim_dir: Option<String>,
    /// Node configuration (`%n` = node name).
    #[arg(long)]
    node_config: Option<String>,
    /// Node name (default: $WSP_NODE, $SLURMD_NODENAME, hostname).
    #[arg(long)]
    node: Option<String>,
    /// Coordinator base URL: check it answers /healthz.
    #[arg(long)]
    coordinator: Option<String>,
    /// Slot key file: check it parses (and, with --slot, that the coordinator accepts it).
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long)]
    slot: Option<SlotId>,
    /// One JSON array on stdout instead of lines.
    #[arg(long)]
    json: bool,
}

fn fail(detail: impl std::fmt::Display, fix: &str) -> Result<String, (String, String)> {
    Err((detail.to_string(), fix.to_string()))
}

/// Runs every check, prints them, returns the exit code.
pub fn check(a: CheckArgs) -> i32 {
    let node = node_name(a.node.as_deref());
    let mut checks: Vec<Check> = Vec::new();
    let node_cfg = match a.node_config.as_deref() {
        None => Ok(hypervisor::NodeConfig::default()),
        Some(p) => hypervisor::NodeConfig::load(&expand_node(p, &node)),
    };
    let node_cfg = match node_cfg {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::new(
                "node config",
                fail(e, "fix the file given with --node-config (see docs/XEN.md)"),
            ));
            hypervisor::NodeConfig::default()
        }
    };
    let opts = HvOptions {
        sim_dir: a.sim_dir.as_deref().map(|d| expand_node(d, &node)),
        node: node_cfg,
        node_name: node.clone(),
    };
    // Opened first: the xen driver applies xenstored_path before any thread starts.
    let hv = if a.hypervisor == "kvm" {
        // Once, as the Kvm itself: its checks need more than the trait.
        Kvm::open(&opts.node.kvm, &opts).map(|k| Box::new(k) as Box<dyn Hypervisor>)
    } else {
        hypervisor::open(&a.hypervisor, &opts)
    };
    match hv {
        Ok(hv) => {
            checks.push(Check::new(
                "hypervisor driver opens",
                Ok(hv.name().to_string()),
            ));
            match a.hypervisor.as_str() {
                "xen" => match Xen::open(&opts.node.xen, &opts) {
                    Ok(x) => checks.extend(x.checks()),
                    Err(e) => checks.push(Check::new(
                        "xen driver",
                        fail(e, "fix [xen] in the node config"),
                    )),
                },
                "kvm" => {
                    generic_checks(hv.as_ref(), &mut checks);
                    kvm_checks(&opts.node.kvm, &node, &mut checks);
                }
                _ => generic_checks(hv.as_ref(), &mut checks),
            }
        }
        Err(e) => checks.push(Check::new(
            "hypervisor driver opens",
            fail(
                e,
                "pass --hypervisor sim|xen|kvm with its --sim-dir or --node-config",
            ),
        )),
    }
    if let Some(url) = &a.coordinator {
        coordinator_checks(url, &a, &node, &mut checks);
    } else if let Some(kf) = &a.key_file {
        checks.push(key_check(kf).1);
    }
    let ok = checks.iter().all(|c| c.ok);
    let warnings = checks.iter().filter(|c| c.warning).count();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).unwrap_or_default()
        );
    } else {
        for c in &checks {
            let label = match (c.ok, c.warning) {
                (false, _) => "FAIL",
                (true, true) => "warn",
                (true, false) => "ok",
            };
            println!("{label:<5} {}: {}", c.name, c.detail);
            if let (Some(fix), true) = (&c.fix, !c.ok || c.warning) {
                println!("      fix: {fix}");
            }
        }
        match (ok, warnings) {
            (false, _) => println!("node is NOT fit"),
            (true, 0) => println!("node is fit"),
            (true, n) => println!(
                "node is fit, with {n} warning{}",
                if n == 1 { "" } else { "s" }
            ),
        }
    }
    if ok {
        0
    } else {
        1
    }
}

fn generic_checks(hv: &dyn Hypervisor, checks: &mut Vec<Check>) {
    checks.push(Check::new(
        "dom0 memory figures sane",
        match hv.dom0_memory() {
            Ok(m) if m.current_mb > 0 && m.target_mb <= m.max_mb => Ok(format!(
                "current {} MB, target {} MB, max {} MB",
                m.current_mb, m.target_mb, m.max_mb
            )),
            Ok(m) => fail(
                format!("{m:?}"),
                "repair the node (workspace-kill-all restores dom0)",
            ),
            Err(e) => fail(e, "repair the node or pass the right driver options"),
        },
    ));
    checks.push(Check::new(
        "guests listable",
        hv.domains()
            .map(|d| format!("{} guests", d.len()))
            .or_else(|e| fail(e, "repair the node or pass the right driver options")),
    ));
}

/// Each program the kvm driver runs (named with its package when missing),
/// and whether hardware KVM really works here.
fn kvm_checks(cfg: &kvm::KvmConfig, node: &str, checks: &mut Vec<Check>) {
    for u in Kvm::tools(cfg) {
        let name = format!("{} ({})", u.program, u.purpose);
        let found = if u.privileged {
            pilot::tools::find_privileged(&u.program)
        } else {
            pilot::tools::find(&u.program)
        };
        checks.push(Check::new(
            &name,
            found
                .map(|p| p.display().to_string())
                .map_err(|m| (m.to_string(), tool_fix(&u, &m))),
        ));
    }
    let name = "hardware KVM";
    let hw = kvm::hardware_kvm(cfg, node);
    let enable = "enable VT-x/AMD-V in the firmware, load kvm_intel or kvm_amd, and let the \
                  pilot's user open /dev/kvm (group kvm)";
    checks.push(match (cfg.accelerator.as_str(), &hw) {
        ("tcg", HardwareKvm::Works(r)) => Check::warn(
            name,
            format!("works ({r}), but [kvm] accelerator = \"tcg\": VMs run emulated"),
            "set [kvm] accelerator = \"auto\" to use it".into(),
        ),
        ("tcg", hw) => Check::new(
            name,
            Ok(format!(
                "not used: [kvm] accelerator = \"tcg\", VMs run under TCG emulation ({})",
                hw.reason()
            )),
        ),
        (_, HardwareKvm::Works(r)) => Check::new(name, Ok(format!("works: {r}"))),
        (_, HardwareKvm::Unconfirmed(r)) => Check::warn(
            name,
            format!("claimed, not confirmed: {r}"),
            "set [kvm] kernel (and initrd) to a kernel printing canary_marker, so check and \
             the pilot confirm KVM with a canary boot"
                .into(),
        ),
        ("kvm", HardwareKvm::Unusable(r)) => Check::new(
            name,
            fail(
                format!("[kvm] accelerator = \"kvm\" but it does not work here: {r}"),
                &format!("{enable}; or set [kvm] accelerator = \"tcg\" to run VMs emulated"),
            ),
        ),
        (_, HardwareKvm::Unusable(r)) => Check::warn(
            name,
            format!("{r}; VMs will run under TCG emulation, several times slower"),
            format!(
                "to use KVM: {enable}; to accept TCG on this node: set [kvm] accelerator = \"tcg\""
            ),
        ),
    });
}

fn tool_fix(u: &kvm::ToolUse, m: &pilot::tools::Missing) -> String {
    if u.key == "compressor" {
        return format!(
            "apt-get install {}, or set [kvm] compressor = \"none\"",
            m.package.unwrap_or("zstd")
        );
    }
    if let Some(at) = &m.elsewhere {
        return format!(
            "add {} to the pilot's PATH, or set [kvm] {} = \"{}\"",
            at.parent().unwrap_or(std::path::Path::new("/")).display(),
            u.key,
            at.display()
        );
    }
    let install = m.package.map_or_else(
        || format!("install {}", u.program),
        |p| format!("apt-get install {p}"),
    );
    match u.key {
        "privileged_prefix" => format!("{install}, or change [kvm] privileged_prefix"),
        key => format!("{install}, or set [kvm] {key} to the program's path"),
    }
}

fn key_check(kf: &std::path::Path) -> (Option<SlotKey>, Check) {
    let path = kf.display().to_string();
    let r = std::fs::read_to_string(kf)
        .map_err(|e| e.to_string())
        .and_then(|t| SlotKey::from_hex(&path, &t).map_err(|e| e.to_string()));
    match r {
        Ok(k) => (Some(k), Check::new("key file valid", Ok(path))),
        Err(e) => (
            None,
            Check::new(
                "key file valid",
                fail(
                    e,
                    "use the slot key file the coordinator wrote (64 hex digits)",
                ),
            ),
        ),
    }
}

fn coordinator_checks(url: &str, a: &CheckArgs, node: &str, checks: &mut Vec<Check>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            checks.push(Check::new("coordinator reachable", fail(e, "retry")));
            return;
        }
    };
    let base = url.trim_end_matches('/').to_string();
    let health = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let r = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(format!("{base}/healthz {}", r.status()))
        } else {
            Err(format!("{base}/healthz answered {}", r.status()))
        }
    });
    checks.push(Check::new(
        "coordinator reachable",
        health.or_else(|e| {
            fail(
                e,
                "check the URL, the head node's firewall, and that the coordinator runs",
            )
        }),
    ));
    let Some(kf) = &a.key_file else { return };
    let (key, c) = key_check(kf);
    checks.push(c);
    let (Some(key), Some(slot)) = (key, a.slot.clone()) else {
        return;
    };
    let answer = rt.block_on(async {
        let n = pilot::notify::Notifier::new(
            url,
            key,
            slot,
            PilotId::generate(),
            node.to_string(),
            Duration::from_secs(3),
            None,
        )
        .map_err(|e| e.to_string())?;
        n.poll(u64::MAX, Duration::ZERO)
            .await
            .map_err(|e| e.to_string())
    });
    checks.push(Check::new(
        "coordinator accepts the key",
        answer
            .map(|_| "signed poll answered".to_string())
            .or_else(|e| {
                fail(
                    e,
                    "the key must be this slot's key from the coordinator's data_dir",
                )
            }),
    ));
}
