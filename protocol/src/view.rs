//! What clients read: workspace, slot and VM states, the timeline.
//!
//! These are the JSON shapes of the client API (`workspace status --json`,
//! `workspace list --json`, the event stream). Field names are stable:
//! scripts depend on them.

use crate::ids::{SlotId, VmId, WorkspaceId};
use crate::spec::WorkspaceSpec;
use serde::{Deserialize, Serialize};

/// Life of a workspace. Terminal: destroyed, preempted, expired, failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    /// Pilot jobs submitted; waiting for every slot to be reserved.
    Pending,
    /// Every slot reserved; VMs are being started.
    Starting,
    /// Every VM runs.
    Running,
    /// Its VMs are being saved to checkpoints (preemption or `workspace
    /// suspend`); the lease's clock is stopped.
    Suspending,
    /// Every VM is a checkpoint; the workspace holds no slot.
    Suspended,
    /// New slots asked for (or held) and the VMs being restored into them.
    Resuming,
    /// The client asked for destroy; VMs and slots are being given back.
    Destroying,
    Destroyed,
    /// A pilot job was preempted by the batch system: the lease ended early.
    Preempted,
    /// The lease duration ran out.
    Expired,
    /// Something failed (a slot could not be reserved, a VM did not start).
    Failed,
}

impl WorkspaceState {
    /// Every state, in the order of a workspace's life (for gauges that must
    /// show each state, zero included).
    pub const ALL: [WorkspaceState; 11] = [
        Self::Pending,
        Self::Starting,
        Self::Running,
        Self::Suspending,
        Self::Suspended,
        Self::Resuming,
        Self::Destroying,
        Self::Destroyed,
        Self::Preempted,
        Self::Expired,
        Self::Failed,
    ];
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Destroyed | Self::Preempted | Self::Expired | Self::Failed
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Resuming => "resuming",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Preempted => "preempted",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

impl std::fmt::Display for WorkspaceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Life of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Pending,
    Starting,
    Running,
    /// Being saved to a checkpoint.
    Suspending,
    /// A checkpoint in the store; on no node.
    Suspended,
    /// Being restored from its checkpoint on a new node.
    Resuming,
    Destroying,
    Destroyed,
    Preempted,
    Failed,
    /// Its pilot went silent: the VM may still run on its node until an
    /// admin runs kill-all there, or a late report from the pilot says it
    /// is gone. Not terminal: that report moves it on.
    Unknown,
}

impl VmState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Destroyed | Self::Preempted | Self::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Resuming => "resuming",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Preempted => "preempted",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// Life of a slot (one pilot job, one pilot per node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Submitted to the batch system; no pilot has reported yet.
    Submitted,
    /// At least one pilot started; not all have reserved.
    Reserving,
    /// Every pilot reserved its node.
    Reserved,
    /// Release sent (or preempted); waiting for pilots and the job to end.
    Releasing,
    /// Every pilot released (or the job ended) and the batch job is gone.
    Released,
    /// The slot could not be had (submit or reservation failed), or a pilot
    /// was lost or reported its node not clean.
    Failed,
    /// The batch job ended before every pilot reported how its node ended:
    /// waiting (`report_wait_s`) for their reports, which a pilot's outbox
    /// delivers late (the pilot after a coordinator outage, the next pilot
    /// on the node, or kill-all).
    AwaitingReport,
    /// The batch job ended and some pilots never reported within
    /// `report_wait_s`: their nodes are named for kill-all. A report that
    /// still arrives is recorded (and withdraws that advice on the timeline),
    /// but the slot stays unreported.
    Unreported,
}

impl SlotState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Released | Self::Failed | Self::Unreported)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Reserving => "reserving",
            Self::Reserved => "reserved",
            Self::Releasing => "releasing",
            Self::Released => "released",
            Self::Failed => "failed",
            Self::AwaitingReport => "awaiting_report",
            Self::Unreported => "unreported",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub id: VmId,
    /// Hypervisor name, `wsp-<slot>-<vm>`.
    pub name: String,
    pub group: String,
    pub node: Option<String>,
    pub slot_id: SlotId,
    pub job_id: Option<String>,
    pub state: VmState,
    pub memory_mb: u64,
    pub cpus: u32,
    /// Host name inside the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Addresses assigned to the VM (freed, and so empty, once it is gone).
    #[serde(default)]
    pub nics: Vec<crate::pilot::Nic>,
    /// Guaranteed leases: when the VM started running relative to the
    /// lease's start, ms (negative: early, positive: late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_offset_ms: Option<i64>,
    /// Its latest checkpoint (`ws-…/vm-…/g<n>`), once it was suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Where it ran, oldest first: one entry per slot and node it was
    /// started or resumed on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<Placement>,
    /// A CPU cap (put on it for an urgent lease, issue 17) that its node
    /// refused to lift; the coordinator keeps trying while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_lift_pending: Option<CapLiftPending>,
}

/// A cap the coordinator could not lift yet (docs/POOL.md "Urgent leases").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapLiftPending {
    /// The first refused (or unanswered) lift, epoch ms.
    pub since_ms: u64,
    /// Lifts refused or unanswered since then.
    pub failures: u32,
    /// The last one's reason.
    pub reason: String,
    /// The next try, epoch ms (none while one is out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ms: Option<u64>,
}

/// One stay of a VM on a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub slot_id: SlotId,
    pub node: String,
    /// When it was sent there.
    pub since_ms: u64,
    /// When it left (suspended, destroyed); none while it is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// The checkpoint it was restored from, if it was a resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PilotView {
    pub node: String,
    pub pilot_id: String,
    /// Last event type seen from this pilot (`reserved`, `released`, ...).
    pub last_event: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotView {
    pub id: SlotId,
    pub group: String,
    pub job_id: Option<String>,
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
    pub state: SlotState,
    pub pilots: Vec<PilotView>,
    /// Why its batch job waits in the queue, in the batch system's words
    /// (Slurm's REASON: `Resources`, `Priority`; PBS's comment; Grid
    /// Engine's state), as of the coordinator's last batch-system poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceView {
    pub id: WorkspaceId,
    pub name: String,
    pub owner: String,
    pub state: WorkspaceState,
    /// Why the workspace ended or failed, in words.
    pub reason: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// When the lease ends (set once the workspace runs).
    pub expires_ms: Option<u64>,
    /// `best_effort`, `reservation` or `immediate`.
    #[serde(default)]
    pub kind: crate::lease::LeaseKind,
    /// When a guaranteed lease starts (a reservation's start, an immediate
    /// lease's acceptance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// The batch system's reservation that holds it: `<lrm> <id> (held|released)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// True once the state is terminal and every slot is released or failed:
    /// nothing of this workspace is left on any node or in the batch system.
    pub settled: bool,
    pub vms: Vec<VmView>,
    pub slots: Vec<SlotView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceList {
    pub workspaces: Vec<WorkspaceView>,
}

/// One step in a workspace's life, for the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Requested,
    /// The batch system granted the reservation of a guaranteed lease.
    ReservationGranted,
    /// The batch system's reservation was deleted (lease over or cancelled).
    ReservationReleased,
    SlotSubmitted,
    PilotStarted,
    MemoryReserved,
    ReserveFailed,
    VmStartSent,
    /// The pilot staged the VM's image into its node cache.
    ImageStaged,
    VmStarted,
    VmFailed,
    Running,
    DestroyRequested,
    LeaseExpired,
    Preempting,
    /// A pilot stopped talking past `pilot_silence_s`.
    PilotLost,
    VmDestroyed,
    MemoryRestored,
    SlotReleased,
    JobEnded,
    /// A suspend began (preemption or the client); the lease's clock stops.
    Suspending,
    /// One VM saved to its checkpoint (bytes, time).
    VmSuspended,
    /// One VM could not be saved.
    SuspendFailed,
    /// Every VM is a checkpoint.
    Suspended,
    /// New slots asked for to resume into.
    Resuming,
    /// One VM restored from its checkpoint (bytes, time).
    VmResumed,
    /// One VM could not be restored.
    ResumeFailed,
    /// A checkpoint removed from the store.
    CheckpointDeleted,
    Ended,
    /// The lease was renewed (`workspace renew`).
    Renewed,
    /// An urgent lease and a best-effort one share a node: who yielded to
    /// whom (CPU caps set or lifted, memory lent or given back).
    Yielded,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::ReservationGranted => "reservation_granted",
            Self::ReservationReleased => "reservation_released",
            Self::SlotSubmitted => "slot_submitted",
            Self::PilotStarted => "pilot_started",
            Self::MemoryReserved => "memory_reserved",
            Self::ReserveFailed => "reserve_failed",
            Self::VmStartSent => "vm_start_sent",
            Self::ImageStaged => "image_staged",
            Self::VmStarted => "vm_started",
            Self::VmFailed => "vm_failed",
            Self::Running => "running",
            Self::DestroyRequested => "destroy_requested",
            Self::LeaseExpired => "lease_expired",
            Self::Preempting => "preempting",
            Self::PilotLost => "pilot_lost",
            Self::VmDestroyed => "vm_destroyed",
            Self::MemoryRestored => "memory_restored",
            Self::SlotReleased => "slot_released",
            Self::JobEnded => "job_ended",
            Self::Suspending => "suspending",
            Self::VmSuspended => "vm_suspended",
            Self::SuspendFailed => "suspend_failed",
            Self::Suspended => "suspended",
            Self::Resuming => "resuming",
            Self::VmResumed => "vm_resumed",
            Self::ResumeFailed => "resume_failed",
            Self::CheckpointDeleted => "checkpoint_deleted",
            Self::Ended => "ended",
            Self::Renewed => "renewed",
            Self::Yielded => "yielded",
        }
    }
}

/// One timeline entry. `ts_ms` is when it happened where it happened (the
/// pilot's clock for pilot events); `recorded_ms` is the coordinator's clock
/// when it stored the entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// 1, 2, 3… per workspace: the cursor of the event stream.
    pub seq: u64,
    pub ts_ms: u64,
    pub recorded_ms: u64,
    pub phase: Phase,
    pub slot_id: Option<SlotId>,
    pub node: Option<String>,
    pub vm_id: Option<VmId>,
    pub detail: String,
}

/// A page of the event stream (`GET /api/v1/workspaces/{id}/events?after=N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<TimelineEntry>,
    pub state: WorkspaceState,
    pub settled: bool,
}

/// Body of `POST /api/v1/workspaces/{id}/renew`: how much longer the lease
/// should run, in seconds. The answer is the view (its new `expires_ms`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub by_s: u64,
}

/// Body of `POST /api/v1/workspaces` is a [`WorkspaceSpec`]; the answer is the view.
pub type CreateRequest = WorkspaceSpec;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_strings() {
        for s in [
            WorkspaceState::Pending,
            WorkspaceState::Preempted,
            WorkspaceState::Failed,
        ] {
            assert_eq!(WorkspaceState::parse(s.as_str()), Some(s));
        }
        assert_eq!(SlotState::parse("releasing"), Some(SlotState::Releasing));
        assert_eq!(VmState::parse("nope"), None);
        assert_eq!(Phase::MemoryRestored.as_str(), "memory_restored");
        assert_eq!(
            serde_json::to_string(&Phase::VmStartSent).unwrap(),
            "\"vm_start_sent\""
        );
    }
}
