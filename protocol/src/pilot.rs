//! What pilots and the coordinator say to each other.
//!
//! Pilot -> coordinator: `POST /pilot/v1/events` with a [`PilotEvent`] body,
//! and `POST /pilot/v1/poll` with a [`PollRequest`] body (a long-poll for
//! [`Command`]s). Both bodies are signed with the slot key (see [`crate::auth`]).
//! The coordinator stores an event before it acknowledges it. A pilot numbers
//! its events 1, 2, 3… per pilot instance and sends them in order, one at a
//! time: the next only once the previous is acknowledged (or refused). The
//! coordinator relies on that: it keeps the highest sequence number stored
//! per pilot instance, and answers any event at or below it `409` with
//! [`EventAck::duplicate`] set, which the pilot treats as acknowledged (it
//! means an earlier try got through; from anyone else it is a replay).
//!
//! Suspend and resume (docs/CHECKPOINTS.md): a launch says what the pilot
//! does with its VM on the batch system's warning ([`VmLaunch::on_preempt`])
//! and may start it from a checkpoint instead of booting it
//! ([`VmLaunch::restore`]); [`CommandKind::SuspendVm`] and
//! [`CommandKind::DeleteCheckpoint`] act on the node's checkpoint store; the
//! pilot answers with `vm_suspended` / `vm_suspend_failed`, `vm_resumed` /
//! `vm_resume_failed` and `checkpoint_deleted` / `checkpoint_delete_failed`.
//!
//! Pool slots, CPU shares and warm VMs (docs/POOL.md): a pilot may start
//! idle (a pool slot) and be bound to a lease and unbound again with
//! [`CommandKind::Bind`] / [`CommandKind::Unbind`], its reservation changed
//! with each binding or by [`CommandKind::Reserve`]; every reservation says
//! when the slot ends ([`EventKind::Reserved::deadline_ms`]). A launch may
//! carry an urgency and a [`CpuShare`], and [`CommandKind::SetCpu`] changes a
//! running VM's share (and lifts it). [`CommandKind::PrepareWarm`] makes a
//! clean snapshot of an image; a launch whose [`RestoreFrom::warm`] is set
//! starts from it with a fresh overlay and its own identity, or cold-boots
//! when the snapshot cannot be used ([`WarmOutcome`]).

use crate::ids::{PilotId, SlotId, VmId, WorkspaceId};
use serde::{Deserialize, Serialize};

/// HTTP path for pilot events.
pub const EVENTS_PATH: &str = "/pilot/v1/events";
/// HTTP path for the command long-poll.
pub const POLL_PATH: &str = "/pilot/v1/poll";

/// One event from one pilot instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PilotEvent {
    pub slot_id: SlotId,
    pub pilot_id: PilotId,
    /// Node name as the pilot sees it (batch system node name).
    pub node: String,
    /// 1, 2, 3… per pilot instance.
    pub seq: u64,
    /// Milliseconds since the epoch (UTC) when the pilot made the event.
    pub ts_ms: u64,
    pub kind: EventKind,
}

/// Why a slot was given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The coordinator sent `release`.
    Commanded,
    /// The pilot's own deadline (slot duration minus safety margin).
    Deadline,
    /// The batch system's warning signal (SIGTERM, SIGUSR2) or SIGINT.
    Preempted,
    /// The pilot failed and cleaned up what it could.
    Failed,
}

/// The event payload. Serialized as `{"type": "...", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The pilot process is up on its node.
    Started {
        pid: u32,
        hypervisor: String,
        /// Batch job id as the pilot sees it in its environment, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
    },
    /// dom0 (or the host) gave up the slot's memory; VMs may start.
    Reserved {
        dom0_before_mb: u64,
        dom0_after_mb: u64,
        reserved_mb: u64,
        /// Time the balloon took to reach its target, measured by the pilot.
        balloon_ms: u64,
        /// Images in the node's cache (SHA-256 hex digests), so the
        /// coordinator can prefer nodes that already hold a VM's image.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        cached_images: Vec<String>,
        /// Whether this node can suspend VMs (a checkpoint store is
        /// configured) and how fast it expects to save; absent: it cannot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoints: Option<CheckpointCapability>,
        /// When the pilot gives the slot back on its own (epoch ms): its
        /// batch walltime less its margin. A lease that would end later
        /// does not fit this slot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
        /// A pool slot: reserved with no lease on it, waiting for `bind`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        idle: bool,
        /// Whether VMs' CPU shares can be applied on this node, and how.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_control: Option<CpuControl>,
    },
    /// The node could not be adapted; nothing is left reserved.
    ReserveFailed {
        reason: String,
    },
    VmStarted {
        vm_id: VmId,
        name: String,
        create_ms: u64,
        /// Time spent staging the VM's image into the node cache (part of
        /// `create_ms`); absent when the VM had no image to stage.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage_ms: Option<u64>,
        /// Whether the staged image was already in the node cache.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache_hit: Option<bool>,
        /// How a launch with a warm snapshot came up (absent: a plain boot).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warm: Option<WarmOutcome>,
    },
    VmFailed {
        vm_id: VmId,
        reason: String,
    },
    VmDestroyed {
        vm_id: VmId,
        destroy_ms: u64,
    },
    /// The batch system asked the pilot to stop. The pilot waits up to
    /// `coordinator_wait_ms` for the coordinator's commands, then cleans up
    /// itself; it will be gone by `cleanup_deadline_ms` (epoch ms).
    Preempting {
        signal: String,
        coordinator_wait_ms: u64,
        cleanup_deadline_ms: u64,
        /// VMs the pilot is suspending now (their launch said
        /// `on_preempt = suspend` and the save fits the grace period).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        suspending: Vec<VmId>,
        /// Why VMs whose launch asked for suspend will be destroyed instead
        /// (e.g. "save did not fit the grace: needs ~12.5 s, 4.1 s left").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_suspending: Option<String>,
    },
    /// The slot is given back: no VM of this slot left, memory restored.
    Released {
        reason: ReleaseReason,
        vms_destroyed: Vec<VmId>,
        dom0_restored_mb: u64,
        restore_ms: u64,
        /// False when something could not be undone (an admin should run kill-all).
        clean: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        problems: Vec<String>,
        /// VMs of this slot that left the node as checkpoints (not destroyed).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vms_suspended: Vec<VmId>,
    },
    /// The VM's state is in the checkpoint store and the VM is gone from the
    /// node; `sha256` is the digest of the checkpoint's manifest, which a
    /// resume must present ([`RestoreFrom::sha256`]).
    VmSuspended {
        vm_id: VmId,
        checkpoint: CheckpointId,
        sha256: String,
        /// Bytes stored (memory state and disk overlay).
        bytes: u64,
        memory_mb: u64,
        /// Time the hypervisor took to save the VM (pause to state written).
        save_ms: u64,
        /// The whole suspend, from the command or signal to the committed
        /// checkpoint and the VM destroyed.
        total_ms: u64,
        trigger: SuspendTrigger,
    },
    /// The VM could not be suspended; nothing usable was left in the store.
    VmSuspendFailed {
        vm_id: VmId,
        checkpoint: CheckpointId,
        cause: SuspendFailure,
        reason: String,
        /// Whether the VM still runs on the node (a commanded suspend that
        /// failed) or was destroyed (preemption: the slot is going away).
        vm_running: bool,
    },
    /// The VM runs again from its checkpoint (the same guest, not a reboot).
    VmResumed {
        vm_id: VmId,
        name: String,
        checkpoint: CheckpointId,
        /// Bytes read from the store.
        bytes: u64,
        /// Time the hypervisor took to load the state (verification included).
        restore_ms: u64,
        /// The whole resume, image staging included.
        total_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage_ms: Option<u64>,
    },
    /// The VM was not resumed; nothing of it runs on the node and the
    /// checkpoint is left as it was.
    VmResumeFailed {
        vm_id: VmId,
        checkpoint: CheckpointId,
        cause: ResumeFailure,
        reason: String,
    },
    CheckpointDeleted {
        checkpoint: CheckpointId,
        /// Bytes freed (0 when it did not exist).
        bytes: u64,
    },
    CheckpointDeleteFailed {
        checkpoint: CheckpointId,
        reason: String,
    },
    /// The slot now serves `workspace_id`, with `reserved_mb` reserved.
    Bound {
        workspace_id: WorkspaceId,
        #[serde(flatten)]
        reservation: ReservationChange,
    },
    /// The slot is idle again: the lease's VMs are destroyed (each also
    /// reported by `vm_destroyed`) and `reserved_mb` is held for the pool.
    Unbound {
        workspace_id: WorkspaceId,
        vms_destroyed: Vec<VmId>,
        #[serde(flatten)]
        reservation: ReservationChange,
    },
    /// The reservation changed (a `reserve` command); the binding did not.
    ReservationChanged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace_id: Option<WorkspaceId>,
        #[serde(flatten)]
        reservation: ReservationChange,
    },
    /// A `bind`, `unbind` or `reserve` was refused or failed; the slot holds
    /// `reserved_mb` and serves `bound_to` (none: idle), as before.
    ReservationRefused {
        command: ReservationCommand,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace_id: Option<WorkspaceId>,
        reason: String,
        reserved_mb: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bound_to: Option<WorkspaceId>,
        /// VMs still on the slot (an unbind that could not destroy them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vms_left: Vec<VmId>,
    },
    /// The VM's CPU share is now `cpu` (applied by `mechanism`).
    VmCpuSet {
        vm_id: VmId,
        cpu: CpuShare,
        mechanism: String,
    },
    /// The share could not be applied; the VM runs with its previous one.
    VmCpuSetFailed {
        vm_id: VmId,
        cpu: CpuShare,
        reason: String,
    },
    /// A clean snapshot of an image is in the checkpoint store; a warm
    /// start must present `sha256` ([`RestoreFrom::sha256`]).
    WarmPrepared {
        checkpoint: CheckpointId,
        sha256: String,
        bytes: u64,
        memory_mb: u64,
        /// Boot to the guest's ready signal.
        boot_ms: u64,
        save_ms: u64,
        total_ms: u64,
    },
    /// No snapshot was made; nothing of it is left on the node or in the store.
    WarmPrepareFailed {
        checkpoint: CheckpointId,
        reason: String,
    },
}

/// A reservation as it is after a `bind`, `unbind` or `reserve`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReservationChange {
    /// What the slot holds now for VMs, MB.
    pub reserved_mb: u64,
    pub dom0_before_mb: u64,
    pub dom0_after_mb: u64,
    /// Time the balloon took (0 when the reservation did not change).
    pub balloon_ms: u64,
    /// When the pilot gives the slot back on its own (epoch ms).
    pub deadline_ms: u64,
}

/// Which command a [`EventKind::ReservationRefused`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationCommand {
    Bind,
    Unbind,
    Reserve,
}

/// A VM's share of the node's CPUs, in the credit scheduler's terms, the
/// same on every hypervisor (docs/POOL.md has the mapping): kvm writes the
/// VM's cgroup (`cpu.weight` / `cpu.max`, or v1 `cpu.shares` /
/// `cpu.cfs_quota_us`), xen runs `xl sched-credit`, sim records it. The
/// default share (both `None`) lifts any cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuShare {
    /// Weight against the node's other VMs when they contend for CPUs,
    /// 1 to 10000; `None` is the default, 100 (a VM of weight 900 beside
    /// one of 100 gets 90 % of a CPU both want).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// At most this much CPU time, in percent of one host CPU (10: a tenth
    /// of a CPU; 200: two CPUs), even when the rest is idle, 1 to 100000.
    /// `None`: uncapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_pct: Option<u32>,
}

/// Default CPU weight ([`CpuShare::weight`]).
pub const DEFAULT_CPU_WEIGHT: u32 = 100;

impl CpuShare {
    pub fn is_default(&self) -> bool {
        self.weight.is_none() && self.cap_pct.is_none()
    }

    /// The weight to apply (the default when none is set).
    pub fn weight_or_default(&self) -> u32 {
        self.weight.unwrap_or(DEFAULT_CPU_WEIGHT)
    }

    /// Refuses values no driver can apply, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(w) = self.weight.filter(|w| !(1..=10_000).contains(w)) {
            return Err(format!("cpu.weight {w} is out of range (1 to 10000)"));
        }
        if let Some(c) = self.cap_pct.filter(|c| !(1..=100_000).contains(c)) {
            return Err(format!(
                "cpu.cap_pct {c} is out of range (1 to 100000, percent of one CPU)"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for CpuShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "weight {}", self.weight_or_default())?;
        match self.cap_pct {
            Some(c) => write!(f, ", cap {c} % of a CPU"),
            None => write!(f, ", uncapped"),
        }
    }
}

/// Whether a node can apply CPU shares, as its pilot reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuControl {
    pub available: bool,
    /// How shares are applied (`cgroup v2 /sys/fs/cgroup/workspace-pilot/n1`,
    /// `xl sched-credit`, `sim`), or what was looked for.
    pub mechanism: String,
    /// Why shares cannot be applied, when they cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How a launch whose [`RestoreFrom::warm`] is set came up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmOutcome {
    /// Restored from the clean snapshot, on a fresh copy of its overlay,
    /// with this launch's name, NICs and seed.
    Restored {
        checkpoint: CheckpointId,
        /// Bytes read from the store.
        bytes: u64,
        /// Time the hypervisor took to restore it (verification included).
        restore_ms: u64,
    },
    /// The snapshot could not be used (`cause`, `reason`), so the VM was
    /// booted from its image instead.
    ColdBooted {
        checkpoint: CheckpointId,
        cause: ResumeFailure,
        reason: String,
    },
}

/// A node's ability to suspend VMs, as its pilot reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointCapability {
    /// Guest memory the pilot expects to save per second (MB/s): the median
    /// of its recent saves on this node, else the configured assumption.
    pub save_mb_per_s: f64,
    /// Whether `save_mb_per_s` comes from saves measured on this node.
    pub measured: bool,
}

/// Names one checkpoint in the checkpoint store:
/// `<store>/<workspace_id>/<vm_id>/g<generation>/`. The coordinator picks a
/// new generation for each suspend of a VM, so a new checkpoint never
/// overwrites one a resume may still need.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckpointId {
    pub workspace_id: WorkspaceId,
    pub vm_id: VmId,
    pub generation: u32,
}

impl std::fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/g{}",
            self.workspace_id, self.vm_id, self.generation
        )
    }
}

impl std::str::FromStr for CheckpointId {
    type Err = String;
    /// Parses the `Display` form, `ws-…/vm-…/g<generation>`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("checkpoint {s:?}: expected ws-<hex>/vm-<hex>/g<generation>");
        let mut parts = s.split('/');
        let (Some(ws), Some(vm), Some(g), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Self {
            workspace_id: WorkspaceId::parse(ws).map_err(|e| e.to_string())?,
            vm_id: VmId::parse(vm).map_err(|e| e.to_string())?,
            generation: g
                .strip_prefix('g')
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?,
        })
    }
}

/// What the pilot does with a VM when the batch system warns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPreempt {
    /// Destroy it (the workspace ends `preempted`).
    #[default]
    End,
    /// Suspend it to this checkpoint if the save fits the grace period,
    /// else destroy it and say why.
    Suspend { to: CheckpointId },
}

impl OnPreempt {
    pub fn is_end(&self) -> bool {
        matches!(self, OnPreempt::End)
    }
}

/// A checkpoint to start a VM from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreFrom {
    pub checkpoint: CheckpointId,
    /// The manifest digest `vm_suspended` (or `warm_prepared`) reported;
    /// anything else is refused.
    pub sha256: String,
    /// A clean snapshot (`warm_prepared`), not a suspended VM: the launch
    /// is a new VM that starts from it with its own identity (name, NICs,
    /// seed) on a fresh copy of its overlay, and is booted from its image
    /// instead when the snapshot cannot be used. Answered by `vm_started`
    /// (with [`WarmOutcome`]) or `vm_failed`, not `vm_resumed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
}

/// What started a suspend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendTrigger {
    /// A `suspend_vm` command.
    Commanded,
    /// The batch system's warning signal (the launch's `on_preempt`).
    Preempted,
}

/// Why a suspend failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendFailure {
    /// The node has no checkpoint store configured.
    NoStore,
    /// The estimated save time did not fit what was left of the grace period.
    WouldNotFit,
    /// The save did not finish in time (grace period or save timeout).
    TimedOut,
    /// The VM is not on this node (unknown, already gone or suspended).
    NoSuchVm,
    /// The hypervisor or the store failed.
    Failed,
}

/// Why a resume failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeFailure {
    /// The node has no checkpoint store configured.
    NoStore,
    /// No such checkpoint in the store.
    NotFound,
    /// The checkpoint was never completed (no manifest, or files missing).
    Incomplete,
    /// The manifest or a file does not match its recorded SHA-256.
    ChecksumMismatch,
    /// The slot lacks the memory the checkpoint needs.
    NoMemory,
    /// Taken by another hypervisor, accelerator or VM shape than this launch.
    Incompatible,
    /// The hypervisor or the store failed.
    Failed,
}

impl EventKind {
    /// Short name of the event type, as used in logs and timelines.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Started { .. } => "started",
            EventKind::Reserved { .. } => "reserved",
            EventKind::ReserveFailed { .. } => "reserve_failed",
            EventKind::VmStarted { .. } => "vm_started",
            EventKind::VmFailed { .. } => "vm_failed",
            EventKind::VmDestroyed { .. } => "vm_destroyed",
            EventKind::Preempting { .. } => "preempting",
            EventKind::Released { .. } => "released",
            EventKind::VmSuspended { .. } => "vm_suspended",
            EventKind::VmSuspendFailed { .. } => "vm_suspend_failed",
            EventKind::VmResumed { .. } => "vm_resumed",
            EventKind::VmResumeFailed { .. } => "vm_resume_failed",
            EventKind::CheckpointDeleted { .. } => "checkpoint_deleted",
            EventKind::CheckpointDeleteFailed { .. } => "checkpoint_delete_failed",
            EventKind::Bound { .. } => "bound",
            EventKind::Unbound { .. } => "unbound",
            EventKind::ReservationChanged { .. } => "reservation_changed",
            EventKind::ReservationRefused { .. } => "reservation_refused",
            EventKind::VmCpuSet { .. } => "vm_cpu_set",
            EventKind::VmCpuSetFailed { .. } => "vm_cpu_set_failed",
            EventKind::WarmPrepared { .. } => "warm_prepared",
            EventKind::WarmPrepareFailed { .. } => "warm_prepare_failed",
        }
    }
}

/// Answer to an event POST.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventAck {
    pub seq: u64,
    /// True when this (pilot, seq) was already stored: nothing changed.
    #[serde(default)]
    pub duplicate: bool,
}

/// A VM the pilot is told to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmLaunch {
    pub vm_id: VmId,
    /// Hypervisor name (`wsp-<slot>-<vm>`), see [`crate::VmName`].
    pub name: String,
    pub memory_mb: u64,
    pub cpus: u32,
    pub image: String,
    /// Where the pilot fetches the image into its node cache. `None`: the
    /// driver resolves `image` itself (its own image dir, `kernel:` boots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_source: Option<ImageSource>,
    /// The VM's network interfaces, in order (eth0, eth1, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// Host name inside the VM (unique within its workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// What the VM learns about its workspace (cloud-init NoCloud seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    /// What the pilot does with the VM on the batch system's warning.
    #[serde(default, skip_serializing_if = "OnPreempt::is_end")]
    pub on_preempt: OnPreempt,
    /// Start the VM from this checkpoint (a resume, or a warm start when
    /// [`RestoreFrom::warm`]) instead of booting it. `name` is the VM's
    /// name in its new slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreFrom>,
    /// The lease's urgency, 0 to 2 (seed 004). Recorded on the node; on
    /// xen a VM of urgency 1 or 2 without a [`CpuShare::weight`] gets
    /// `[xen] urgent_sched_weight`. Shares are otherwise the coordinator's
    /// to set ([`VmLaunch::cpu`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub urgency: u8,
    /// The VM's CPU share from its start (absent: the node's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuShare>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Highest urgency ([`VmLaunch::urgency`]).
pub const MAX_URGENCY: u8 = 2;

/// An image to stage: `url` is `http(s)://...`, `file:///...` or an absolute path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    pub url: String,
    /// Expected SHA-256 (hex); without it the pilot trusts the transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// One network interface of a VM, as the coordinator assigned it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Locally administered unicast MAC, `02:xx:xx:xx:xx:xx`.
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Address pool it came from: `private` or `public`.
    pub pool: String,
}

/// A member of the VM's workspace (itself included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its host name.
    pub name: String,
    /// Its group (role) in the ensemble.
    pub group: String,
    pub ips: Vec<std::net::Ipv4Addr>,
}

/// Contextualization: who the VM is and who its peers are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub workspace_id: String,
    pub workspace_name: String,
    pub group: String,
    /// Every VM of the workspace, this one included, in a stable order.
    pub peers: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
}

impl VmLaunch {
    /// A launch with no image source, network or context (sim, tests).
    pub fn basic(vm_id: VmId, name: String, memory_mb: u64, cpus: u32, image: String) -> Self {
        Self {
            vm_id,
            name,
            memory_mb,
            cpus,
            image,
            image_source: None,
            nics: Vec::new(),
            hostname: None,
            context: None,
            on_preempt: OnPreempt::End,
            restore: None,
            urgency: 0,
            cpu: None,
        }
    }
}

/// What the coordinator tells a pilot to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// A command is decoded one at a time from JSON; boxing the launch would only
// change every construction site for no measurable gain.
#[allow(clippy::large_enum_variant)]
pub enum CommandKind {
    StartVm(VmLaunch),
    DestroyVm {
        vm_id: VmId,
    },
    /// Destroy every VM of the slot, restore memory, report, exit.
    Release,
    /// Save the VM to the checkpoint `to` and take it off the node
    /// (answered by `vm_suspended` or `vm_suspend_failed`).
    SuspendVm {
        vm_id: VmId,
        to: CheckpointId,
    },
    /// Remove a checkpoint from the store (answered by `checkpoint_deleted`
    /// or `checkpoint_delete_failed`).
    DeleteCheckpoint {
        checkpoint: CheckpointId,
    },
    /// An idle slot now serves `workspace_id` with `memory_mb` reserved
    /// (taken from or given back to dom0, verified); a slot already bound
    /// to that workspace only changes its reservation. Answered by `bound`
    /// or `reservation_refused`.
    Bind {
        workspace_id: WorkspaceId,
        memory_mb: u64,
    },
    /// The lease is over on this slot: destroy its VMs, hold `memory_mb`
    /// idle, wait for the next `bind`. Answered by `unbound` or
    /// `reservation_refused`.
    Unbind {
        workspace_id: WorkspaceId,
        memory_mb: u64,
    },
    /// Hold `memory_mb`, whatever the binding (never less than the VMs on
    /// the slot use). Answered by `reservation_changed` or `reservation_refused`.
    Reserve {
        memory_mb: u64,
    },
    /// Change a running VM's CPU share; the default share lifts caps.
    /// Answered by `vm_cpu_set` or `vm_cpu_set_failed`.
    SetCpu {
        vm_id: VmId,
        cpu: CpuShare,
    },
    /// Make a clean snapshot of an image: boot `launch` (no NICs, no
    /// context: a template has no identity), wait until the guest is ready
    /// (at most `ready_timeout_s`), save it to `to`, destroy it. Its memory
    /// comes from the slot's reservation. Answered by `warm_prepared` or
    /// `warm_prepare_failed`.
    PrepareWarm {
        launch: VmLaunch,
        to: CheckpointId,
        #[serde(default = "default_ready_timeout_s")]
        ready_timeout_s: u64,
    },
}

fn default_ready_timeout_s() -> u64 {
    120
}

/// A command with its per-pilot-node sequence number (1, 2, 3…).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: u64,
    pub kind: CommandKind,
}

/// Long-poll for commands after `after` (the last command id the pilot has
/// executed). Signed like events; `ts_ms` bounds replay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollRequest {
    pub slot_id: SlotId,
    pub pilot_id: PilotId,
    pub node: String,
    pub after: u64,
    /// How long the coordinator may hold the request open.
    pub wait_ms: u64,
    pub ts_ms: u64,
}

/// Commands for the polling pilot, oldest first (possibly none on timeout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollResponse {
    pub commands: Vec<Command>,
}

/// Error body of every non-2xx answer from the coordinator (clients and pilots).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_is_tagged_by_type() {
        let e = PilotEvent {
            slot_id: SlotId::parse("sl-0000abcd").unwrap(),
            pilot_id: PilotId::generate(),
            node: "node1".into(),
            seq: 1,
            ts_ms: 5,
            kind: EventKind::Preempting {
                signal: "SIGTERM".into(),
                coordinator_wait_ms: 100,
                cleanup_deadline_ms: 200,
                suspending: Vec::new(),
                not_suspending: None,
            },
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["kind"]["type"], "preempting");
        let back: PilotEvent = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn old_launch_json_still_reads_and_new_fields_are_additive() {
        let old = r#"{"vm_id":"vm-0000abcd","name":"n","memory_mb":1,"cpus":1,"image":"i"}"#;
        let l: VmLaunch = serde_json::from_str(old).unwrap();
        assert!(l.nics.is_empty() && l.context.is_none() && l.image_source.is_none());
        assert_eq!(serde_json::to_string(&l).unwrap(), old);
        let r: EventKind = serde_json::from_str(
            r#"{"type":"reserved","dom0_before_mb":1,"dom0_after_mb":0,"reserved_mb":1,"balloon_ms":0}"#,
        )
        .unwrap();
        assert!(matches!(r, EventKind::Reserved { cached_images, .. } if cached_images.is_empty()));
    }

    #[test]
    fn old_preempting_and_released_json_still_read() {
        let p: EventKind = serde_json::from_str(
            r#"{"type":"preempting","signal":"SIGTERM","coordinator_wait_ms":1,"cleanup_deadline_ms":2}"#,
        )
        .unwrap();
        assert!(
            matches!(p, EventKind::Preempting { suspending, not_suspending: None, .. } if suspending.is_empty())
        );
        let r: EventKind = serde_json::from_str(
            r#"{"type":"released","reason":"preempted","vms_destroyed":[],"dom0_restored_mb":1,"restore_ms":0,"clean":true}"#,
        )
        .unwrap();
        assert!(matches!(r, EventKind::Released { vms_suspended, .. } if vms_suspended.is_empty()));
    }

    #[test]
    fn a_resume_is_a_launch_with_a_checkpoint_and_suspend_commands_name_theirs() {
        let to = CheckpointId {
            workspace_id: WorkspaceId::parse("ws-0000abcd").unwrap(),
            vm_id: VmId::parse("vm-0000abcd").unwrap(),
            generation: 2,
        };
        assert_eq!(to.to_string(), "ws-0000abcd/vm-0000abcd/g2");
        assert_eq!(
            "ws-0000abcd/vm-0000abcd/g2".parse::<CheckpointId>(),
            Ok(to.clone())
        );
        for bad in [
            "ws-0000abcd/vm-0000abcd",
            "ws-0000abcd/vm-0000abcd/2",
            "../x/g1",
            "ws-0000abcd/vm-0000abcd/g1/x",
        ] {
            assert!(bad.parse::<CheckpointId>().is_err(), "{bad}");
        }
        let mut l = VmLaunch::basic(to.vm_id.clone(), "n".into(), 1, 1, "i".into());
        l.on_preempt = OnPreempt::Suspend { to: to.clone() };
        l.restore = Some(RestoreFrom {
            checkpoint: to.clone(),
            sha256: "ab".into(),
            warm: false,
        });
        let j = serde_json::to_value(&l).unwrap();
        assert_eq!(j["on_preempt"]["suspend"]["to"]["generation"], 2);
        assert_eq!(j["restore"]["checkpoint"]["workspace_id"], "ws-0000abcd");
        assert_eq!(serde_json::from_value::<VmLaunch>(j).unwrap(), l);
        let c = Command {
            id: 4,
            kind: CommandKind::SuspendVm {
                vm_id: to.vm_id.clone(),
                to: to.clone(),
            },
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains(r#""type":"suspend_vm""#), "{s}");
        assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), c);
        let e = EventKind::VmResumeFailed {
            vm_id: to.vm_id.clone(),
            checkpoint: to,
            cause: ResumeFailure::ChecksumMismatch,
            reason: "x".into(),
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["type"], "vm_resume_failed");
        assert_eq!(j["cause"], "checksum_mismatch");
    }

    #[test]
    fn pool_cpu_and_warm_messages_round_trip_and_stay_additive() {
        let ws = WorkspaceId::parse("ws-0000abcd").unwrap();
        let vm = VmId::parse("vm-0000abcd").unwrap();
        for kind in [
            CommandKind::Bind {
                workspace_id: ws.clone(),
                memory_mb: 512,
            },
            CommandKind::Unbind {
                workspace_id: ws.clone(),
                memory_mb: 0,
            },
            CommandKind::Reserve { memory_mb: 256 },
            CommandKind::SetCpu {
                vm_id: vm.clone(),
                cpu: CpuShare {
                    weight: Some(900),
                    cap_pct: None,
                },
            },
        ] {
            let c = Command { id: 9, kind };
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), c, "{s}");
        }
        let r = EventKind::Bound {
            workspace_id: ws.clone(),
            reservation: ReservationChange {
                reserved_mb: 512,
                dom0_before_mb: 4096,
                dom0_after_mb: 3584,
                balloon_ms: 3,
                deadline_ms: 99,
            },
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["type"], "bound");
        assert_eq!(
            j["reserved_mb"], 512,
            "the figures sit beside the type: {j}"
        );
        assert_eq!(serde_json::from_value::<EventKind>(j).unwrap(), r);
        // A prepare's ready timeout has a default; old launches and
        // reservations read as before, and new fields are left out when unset.
        let p: CommandKind = serde_json::from_str(
            r#"{"type":"prepare_warm","launch":{"vm_id":"vm-0000abcd","name":"n","memory_mb":1,"cpus":1,"image":"i"},"to":{"workspace_id":"ws-0000abcd","vm_id":"vm-0000abcd","generation":1}}"#,
        )
        .unwrap();
        assert!(matches!(
            p,
            CommandKind::PrepareWarm {
                ready_timeout_s: 120,
                ..
            }
        ));
        let old = r#"{"type":"reserved","dom0_before_mb":1,"dom0_after_mb":0,"reserved_mb":1,"balloon_ms":0}"#;
        let e: EventKind = serde_json::from_str(old).unwrap();
        assert!(matches!(
            &e,
            EventKind::Reserved {
                deadline_ms: None,
                idle: false,
                cpu_control: None,
                ..
            }
        ));
        assert_eq!(serde_json::to_string(&e).unwrap(), old);
        let mut l = VmLaunch::basic(vm.clone(), "n".into(), 1, 1, "i".into());
        l.urgency = 2;
        l.cpu = Some(CpuShare {
            weight: Some(900),
            cap_pct: Some(50),
        });
        let j = serde_json::to_value(&l).unwrap();
        assert_eq!(j["urgency"], 2);
        assert_eq!(j["cpu"]["cap_pct"], 50);
        assert_eq!(serde_json::from_value::<VmLaunch>(j).unwrap(), l);
        let o = WarmOutcome::ColdBooted {
            checkpoint: CheckpointId {
                workspace_id: ws,
                vm_id: vm,
                generation: 1,
            },
            cause: ResumeFailure::ChecksumMismatch,
            reason: "x".into(),
        };
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["cold_booted"]["cause"], "checksum_mismatch");
    }

    #[test]
    fn cpu_shares_out_of_range_are_refused_with_the_field() {
        assert!(CpuShare::default().validate().is_ok());
        assert!(CpuShare::default().is_default());
        let e = CpuShare {
            weight: Some(0),
            cap_pct: None,
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("cpu.weight 0"), "{e}");
        let e = CpuShare {
            weight: None,
            cap_pct: Some(0),
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("cpu.cap_pct 0"), "{e}");
        assert_eq!(
            CpuShare {
                weight: None,
                cap_pct: Some(10)
            }
            .to_string(),
            "weight 100, cap 10 % of a CPU"
        );
    }

    #[test]
    fn command_json_round_trip() {
        let c = Command {
            id: 3,
            kind: CommandKind::Release,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"id":3,"kind":{"type":"release"}}"#);
        assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), c);
    }
}
