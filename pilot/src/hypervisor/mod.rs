//! The hypervisor seam: one small synchronous trait, one file per driver.
//!
//! A driver reads and sets dom0's memory target and lists, creates and
//! destroys guests, and saves a guest into a checkpoint and restores one
//! from it (one argument order for every driver: the guest, then the
//! checkpoint); it applies a guest's CPU share and says when a booting
//! guest is ready (for warm snapshots). The pilot and kill-all only talk to a node through it.
//! The shared bounded "set target and wait for the balloon" lives here once.
//! Drivers do not know about slots, state files or the coordinator.

pub mod kvm;
pub mod sim;
pub mod xen;

use crate::checkpoint::{CheckpointReader, CheckpointWriter, CkError};
use protocol::pilot::{CpuControl, CpuShare, VmLaunch};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// dom0's memory as the hypervisor reports it, in MB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dom0Memory {
    /// What dom0 holds now.
    pub current_mb: u64,
    /// What the balloon driver is asked to reach.
    pub target_mb: u64,
    /// The most dom0 may hold (static max).
    pub max_mb: u64,
}

/// One guest (never dom0 itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub name: String,
    pub memory_mb: u64,
    pub cpus: u32,
    pub state: String,
}

/// Errors of hypervisor drivers; messages name the thing and the figures.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("hypervisor {kind:?} is not built yet (available: sim)")]
    NotBuilt { kind: String },
    #[error("unknown hypervisor {kind:?} (expected sim, xen or kvm)")]
    Unknown { kind: String },
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sim node {path} is not valid: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("sim node {path} stayed locked by another process for {waited_ms} ms")]
    Busy { path: PathBuf, waited_ms: u64 },
    #[error("a domain named {name:?} already exists")]
    DomainExists { name: String },
    #[error("no domain named {name:?}")]
    NoSuchDomain { name: String },
    #[error(
        "not enough free memory for {name:?}: needs {needed_mb} MB, {free_mb} MB free \
         (node {total_mb} MB, dom0 {dom0_mb} MB, guests {guests_mb} MB)"
    )]
    NoMemory {
        name: String,
        needed_mb: u64,
        free_mb: u64,
        total_mb: u64,
        dom0_mb: u64,
        guests_mb: u64,
    },
    #[error("dom0 target {target_mb} MB is above its maximum {max_mb} MB")]
    AboveMax { target_mb: u64, max_mb: u64 },
    #[error(
        "dom0 balloon did not reach {target_mb} MB within {timeout_ms} ms: \
         current {current_mb} MB, target {target_now_mb} MB"
    )]
    BalloonTimeout {
        target_mb: u64,
        timeout_ms: u64,
        current_mb: u64,
        target_now_mb: u64,
    },
    /// A program the driver runs is not installed or not on PATH; each is
    /// named with its package (`qemu-img not found: install qemu-utils`).
    #[error("{}", crate::tools::describe(.0))]
    ToolsMissing(Vec<crate::tools::Missing>),
    /// kvm: an external command (qemu, qemu-img, a privileged write) failed;
    /// `output` keeps its raw stderr/stdout.
    #[error("{command} failed: {message}{}", if output.is_empty() { String::new() } else { format!(": {output:?}") })]
    KvmCommand {
        command: String,
        message: String,
        output: String,
    },
    /// kvm: the kernel gave fewer hugepages than asked; the count was put back.
    #[error(
        "the kernel gave {got} of {asked} hugepages of {page_kb} kB \
         (memory fragmented or short); nr_hugepages put back to {restored_to}"
    )]
    HugepagesShort {
        asked: u64,
        got: u64,
        page_kb: u64,
        restored_to: u64,
    },
    /// kvm: a QMP exchange with a VM's QEMU failed.
    #[error("QMP {vm}: {message}")]
    Qmp { vm: String, message: String },
    /// kvm: a bounded wait ran out.
    #[error("{what} did not finish within {after_ms} ms")]
    KvmTimeout { what: String, after_ms: u64 },
    /// xen: a xenstore request failed or timed out.
    #[error("xenstore {op} {path}: {message} (socket {socket})")]
    Xenstore {
        op: String,
        path: String,
        socket: String,
        message: String,
    },
    /// xen: an `xl` command failed; `output` keeps its raw stderr and stdout.
    #[error("`{command}` {status}: {output:?}")]
    XlCommand {
        command: String,
        status: String,
        output: String,
    },
    /// xen: an `xl` command ran past its bound and was killed.
    #[error("`{command}` did not finish within {timeout_ms} ms (killed)")]
    XlTimeout { command: String, timeout_ms: u64 },
    /// xen: a create or destroy did not show in the domain list in time.
    #[error("{what} within {waited_ms} ms")]
    XenNotVerified { what: String, waited_ms: u64 },
    /// A bounded operation (save, restore) ran out of time.
    #[error("{what} did not finish within {after_ms} ms")]
    Timeout { what: String, after_ms: u64 },
    /// The driver has no such capability.
    #[error("the {driver} driver cannot {what}")]
    NotSupported { driver: String, what: String },
    /// Writing or reading a checkpoint failed (checksums included).
    #[error(transparent)]
    Checkpoint(#[from] CkError),
    /// A checkpoint cannot be restored as this launch asks (other shape,
    /// accelerator or disk layout).
    #[error("checkpoint does not fit this VM: {0}")]
    Incompatible(String),
    /// CPU shares cannot be applied on this node (the reason says why and
    /// what to change).
    #[error("CPU shares cannot be applied on this node: {0}")]
    NoCpuControl(String),
}

impl From<crate::tools::Missing> for HvError {
    fn from(m: crate::tools::Missing) -> Self {
        HvError::ToolsMissing(vec![m])
    }
}

/// What a node's hypervisor can do for the pilot. Calls may block (a real
/// driver runs commands); the async pilot calls them on blocking threads.
pub trait Hypervisor: Send + Sync {
    /// Short driver name (`sim`, `xen`, `kvm`), as reported in `Started`.
    fn name(&self) -> &'static str;
    fn dom0_memory(&self) -> Result<Dom0Memory, HvError>;
    /// Asks the balloon for `mb`; returns at once (see [`set_dom0_target_and_wait`]).
    fn set_dom0_target(&self, mb: u64) -> Result<(), HvError>;
    /// Every guest except dom0.
    fn domains(&self) -> Result<Vec<Domain>, HvError>;
    fn create(&self, vm: &VmLaunch) -> Result<(), HvError>;
    fn destroy(&self, name: &str) -> Result<(), HvError>;
    /// Removes node-wide pieces no VM needs any more (kvm: the node's
    /// dnsmasq and anti-spoofing table); returns what could not be removed.
    fn sweep_node(&self) -> Vec<String> {
        Vec::new()
    }
    /// Saves the running guest `name` into `out` and leaves it stopped: not
    /// running, still on the node, holding its memory. The caller then
    /// commits the checkpoint and destroys the guest, or, when it cannot
    /// commit, lets it run again with [`Hypervisor::resume_after_save`].
    /// Gives up by `deadline` (leaving the guest running where it can).
    /// Returns what a restore needs to know, for the manifest.
    fn save(
        &self,
        name: &str,
        out: &mut CheckpointWriter,
        deadline: Instant,
    ) -> Result<serde_json::Value, HvError> {
        let _ = (name, out, deadline);
        Err(HvError::NotSupported {
            driver: self.name().to_string(),
            what: "save guests".into(),
        })
    }
    /// Lets a guest that [`Hypervisor::save`] left stopped run again.
    fn resume_after_save(&self, name: &str) -> Result<(), HvError> {
        let _ = name;
        Err(HvError::NotSupported {
            driver: self.name().to_string(),
            what: "resume guests".into(),
        })
    }
    /// Starts `vm` (named, sized and networked as the launch says, as for
    /// [`Hypervisor::create`]) from checkpoint `from`: the same guest, not a
    /// boot. Every file is verified against the manifest before the guest
    /// runs; on any failure nothing of it is left on the node.
    fn restore(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let _ = (vm, from, deadline);
        Err(HvError::NotSupported {
            driver: self.name().to_string(),
            what: "restore guests".into(),
        })
    }
    /// Boots `vm` as the template of a warm snapshot (no identity: no
    /// NICs, no seed), laid out so that [`Hypervisor::restore_warm`] can
    /// give each copy its own. The default is a plain create.
    fn create_template(&self, vm: &VmLaunch) -> Result<(), HvError> {
        self.create(vm)
    }
    /// Starts `vm`, a new VM, from the clean snapshot `from` of its image:
    /// on a fresh copy of the snapshot's overlay, under the launch's name,
    /// with the launch's NICs and seed (a new identity, never the
    /// template's). The default restores the launch as it is.
    fn restore_warm(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        self.restore(vm, from, deadline)
    }
    /// Whether a guest started by [`Hypervisor::create_template`] is ready
    /// to be snapshotted (booted, its services up). The default: as soon
    /// as it runs.
    fn is_ready(&self, name: &str) -> Result<bool, HvError> {
        let _ = name;
        Ok(true)
    }
    /// Whether and how this node applies CPU shares.
    fn cpu_control(&self) -> CpuControl {
        CpuControl {
            available: false,
            mechanism: self.name().to_string(),
            reason: Some(format!("the {} driver has no CPU shares", self.name())),
        }
    }
    /// Applies `cpu` to the running guest `name` (the default share lifts
    /// caps); `urgency` is the launch's. Returns how it was applied.
    fn set_cpu(&self, name: &str, cpu: &CpuShare, urgency: u8) -> Result<String, HvError> {
        let _ = (name, cpu, urgency);
        Err(HvError::NoCpuControl(
            self.cpu_control()
                .reason
                .unwrap_or_else(|| "not supported".into()),
        ))
    }
}

/// Sets dom0's target and polls until its current memory equals it, at most
/// `timeout`. Returns how long the balloon took.
pub fn set_dom0_target_and_wait(
    hv: &dyn Hypervisor,
    target_mb: u64,
    timeout: Duration,
) -> Result<Duration, HvError> {
    let start = Instant::now();
    hv.set_dom0_target(target_mb)?;
    let mut pause = Duration::from_millis(1);
    loop {
        let m = hv.dom0_memory()?;
        if m.current_mb == target_mb {
            return Ok(start.elapsed());
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(HvError::BalloonTimeout {
                target_mb,
                timeout_ms: timeout.as_millis() as u64,
                current_mb: m.current_mb,
                target_now_mb: m.target_mb,
            });
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// A node's configuration file (`--node-config`), shared by the pilot and
/// kill-all: one section per real driver. Unknown keys are refused.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub xen: xen::XenConfig,
    pub kvm: kvm::KvmConfig,
    /// The node's image cache (`[images] cache_dir`, `max_bytes`).
    pub images: crate::images::ImagesConfig,
    /// The checkpoint store (`[checkpoints] dir`, ...).
    pub checkpoints: crate::checkpoint::CheckpointsConfig,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, HvError> {
        let text = std::fs::read_to_string(path).map_err(|source| HvError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text)
            .map_err(|e| HvError::Config(format!("node config {}: {e}", path.display())))
    }
}

/// Driver options from the command line and the node config.
#[derive(Clone, Debug, Default)]
pub struct HvOptions {
    /// Directory of the simulated node (`sim` only).
    pub sim_dir: Option<PathBuf>,
    /// The node config file's contents (defaults when none is given).
    pub node: NodeConfig,
    /// This node's name (drivers tag files and processes with it).
    pub node_name: String,
}

/// Opens the driver named `kind` (`sim`; `xen` and `kvm` are not built yet).
pub fn open(kind: &str, opts: &HvOptions) -> Result<Box<dyn Hypervisor>, HvError> {
    match kind {
        "sim" => {
            let dir: &Path = opts
                .sim_dir
                .as_deref()
                .ok_or_else(|| HvError::Config("hypervisor sim needs --sim-dir".to_string()))?;
            Ok(Box::new(sim::Sim::open(dir)?))
        }
        "xen" => Ok(Box::new(xen::Xen::open(&opts.node.xen, opts)?)),
        "kvm" => Ok(Box::new(kvm::Kvm::open(&opts.node.kvm, opts)?)),
        other => Err(HvError::Unknown {
            kind: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_drivers_and_sim_without_a_dir_are_refused() {
        // xen opens without touching the node (it connects on first use).
        assert!(open("xen", &HvOptions::default()).is_ok());
        assert!(matches!(
            open("vmware", &HvOptions::default()),
            Err(HvError::Unknown { .. })
        ));
        assert!(matches!(
            open("sim", &HvOptions::default()),
            Err(HvError::Config(_))
        ));
    }
}
