//! What an admin reads of the whole cluster (`GET /api/v1/admin/nodes`,
//! `workspace admin nodes`, the status page): nodes in use, live slots with
//! their pilots and queue reasons, the capacity, and the nodes that need
//! kill-all with the command to run there. Field names are stable.

use crate::ids::{SlotId, VmId, WorkspaceId};
use crate::view::SlotState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// `local`, `slurm`, `gridengine`, `torque`, `pbspro`.
    pub batch_system: String,
    pub capacity: NodeSize,
    /// When the view was read (coordinator clock, ms).
    pub generated_ms: u64,
    /// Workspaces per state (every state, zero included).
    pub workspaces: BTreeMap<String, u64>,
    /// Nodes a live pilot holds or that need kill-all, by name.
    pub nodes: Vec<NodeView>,
    /// Slots whose batch job may still run or whose pilots hold nodes.
    pub slots: Vec<AdminSlotView>,
    /// Nodes left unclean, with what to run there.
    pub needs_kill_all: Vec<CleanupView>,
}

/// The batch system's node size and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSize {
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    /// `in_use` (a pilot holds it for a slot) or `needs_kill_all`.
    pub state: String,
    pub slots: Vec<SlotId>,
    /// VMs the coordinator places there that are not over (unknown included).
    pub vms: u32,
    /// Memory those VMs hold, MB.
    pub vm_memory_mb: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminSlotView {
    pub id: SlotId,
    pub workspace_id: WorkspaceId,
    pub owner: String,
    pub group: String,
    pub state: SlotState,
    pub job_id: Option<String>,
    /// The batch job as the coordinator knows it: `unsubmitted`, `live`,
    /// `cancel_owed`, `cancelled`, `ended`, `never`.
    pub job_state: String,
    /// Why the batch job waits, in the batch system's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_reason: Option<String>,
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
    pub pilots: Vec<AdminPilotView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminPilotView {
    pub node: String,
    /// `started`, `reserved`, `preempting`, `released`, `failed`, `lost`.
    pub state: String,
    pub last_event: String,
    pub last_seen_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CleanupView {
    pub node: String,
    pub slot_id: SlotId,
    pub workspace_id: WorkspaceId,
    /// `pilot lost`, `released not clean`, `job ended under its pilot`.
    pub why: String,
    /// VMs there whose fate nobody knows.
    pub unknown_vms: Vec<VmId>,
    /// Last word from the pilot (coordinator clock, ms).
    pub last_seen_ms: u64,
    /// What to run, as root, on the node.
    pub command: String,
}

/// Answer of `POST /api/v1/admin/nodes/{node}/cleaned`: what was settled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CleanedAnswer {
    pub node: String,
    /// Pilots of that node no longer listed as needing kill-all.
    pub pilots: u32,
    /// Unknown VMs now counted as destroyed (kill-all destroyed them).
    pub vms: Vec<VmId>,
}
