//! Scheduling policy: how a workspace becomes resource slots, and how VMs
//! are mapped onto reserved nodes.
//!
//! A policy is a [`Policy`]: a function from what the coordinator knows to a
//! plan, which the engine carries out (the server and the simulator alike).
//! The one here is [`ExactFit`]: one VM per node, one slot (pilot job) per
//! group sized exactly for that group's VMs, and a greedy mapping of VMs
//! onto the nodes of their slot. Pure functions, no I/O: easy to test and
//! bench. Policies to come (bind slots of a warm pool, suspend a victim,
//! start a reservation at its time) add [`Action`]s and fields, not engines.

use lrm_adapters::Capacity;
use protocol::spec::WorkspaceSpec;
use protocol::{SlotId, VmId};
use std::collections::HashMap;

/// One pilot job to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    pub group: String,
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
}

/// The request cannot be met by this cluster.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FitError {
    #[error("group {group:?} asks {asked} CPUs per VM, but nodes have {has}")]
    Cpus { group: String, asked: u32, has: u32 },
    #[error("group {group:?} asks {asked} MB per VM, but a node can give at most {has} MB ({node} MB less the {min_dom0} MB dom0 keeps)")]
    Memory {
        group: String,
        asked: u64,
        has: u64,
        node: u64,
        min_dom0: u64,
    },
    #[error(
        "the workspace needs {asked} nodes at once (one VM per node), but the cluster has {has}"
    )]
    Nodes { asked: u64, has: u32 },
}

/// What the coordinator knows of the cluster when it plans a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub capacity: Capacity,
    /// Memory dom0 keeps on every node (`pilot.min_dom0_mb`).
    pub min_dom0_mb: u64,
}

/// One step of a lease's plan, carried out by the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Submit a pilot job for a new slot.
    Submit(SlotPlan),
}

/// How a lease gets its capacity: the engine stores the lease and its slots,
/// then carries out the actions in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasePlan {
    pub actions: Vec<Action>,
}

/// Where the VMs of a lease go once every slot is reserved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// (VM, node) pairs: the engine tells each node's pilot to start its VMs.
    pub starts: Vec<(VmId, String)>,
}

/// A scheduling policy. Pure: it reads what it is given and returns a plan.
pub trait Policy: Send + Sync {
    /// Its name, as configured (`"exact-fit"`).
    fn name(&self) -> &'static str;
    /// How a new lease gets its capacity, or why this cluster cannot give it.
    fn plan_lease(&self, spec: &WorkspaceSpec, cluster: &Cluster) -> Result<LeasePlan, FitError>;
    /// Where the lease's VMs go, onto the nodes its pilots reserved;
    /// `prefer(vm, node)` holds when the node's image cache has the VM's image.
    fn place(
        &self,
        vms: &[VmNeed],
        nodes: &[NodeRoom],
        prefer: &dyn Fn(&VmId, &str) -> bool,
    ) -> Result<Placement, MapError>;
}

/// Today's policy: exact fit (one slot per group, one VM per node) and the
/// greedy mapping, preferring nodes that hold the VM's image.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExactFit;

impl Policy for ExactFit {
    fn name(&self) -> &'static str {
        "exact-fit"
    }

    fn plan_lease(&self, spec: &WorkspaceSpec, cluster: &Cluster) -> Result<LeasePlan, FitError> {
        let slots = plan_slots(spec, &cluster.capacity, cluster.min_dom0_mb)?;
        Ok(LeasePlan {
            actions: slots.into_iter().map(Action::Submit).collect(),
        })
    }

    fn place(
        &self,
        vms: &[VmNeed],
        nodes: &[NodeRoom],
        prefer: &dyn Fn(&VmId, &str) -> bool,
    ) -> Result<Placement, MapError> {
        Ok(Placement {
            starts: map_vms_preferring(vms, nodes, prefer)?,
        })
    }
}

/// The policy of that name (`exact-fit`, the only one so far).
pub fn by_name(name: &str) -> Option<std::sync::Arc<dyn Policy>> {
    match name {
        "exact-fit" => Some(std::sync::Arc::new(ExactFit)),
        _ => None,
    }
}

/// Exact fit: one slot per group, one node per VM.
pub fn plan_slots(
    spec: &WorkspaceSpec,
    cap: &Capacity,
    min_dom0_mb: u64,
) -> Result<Vec<SlotPlan>, FitError> {
    let usable = cap.memory_mb_per_node.saturating_sub(min_dom0_mb);
    let mut plans = Vec::with_capacity(spec.groups.len());
    for g in &spec.groups {
        if g.cpus > cap.cores_per_node {
            return Err(FitError::Cpus {
                group: g.name.clone(),
                asked: g.cpus,
                has: cap.cores_per_node,
            });
        }
        if g.memory_mb > usable {
            return Err(FitError::Memory {
                group: g.name.clone(),
                asked: g.memory_mb,
                has: usable,
                node: cap.memory_mb_per_node,
                min_dom0: min_dom0_mb,
            });
        }
        plans.push(SlotPlan {
            group: g.name.clone(),
            nodes: g.count,
            cores_per_node: g.cpus,
            memory_mb_per_node: g.memory_mb,
        });
    }
    let total: u64 = plans.iter().map(|p| u64::from(p.nodes)).sum();
    if total > u64::from(cap.nodes) {
        return Err(FitError::Nodes {
            asked: total,
            has: cap.nodes,
        });
    }
    Ok(plans)
}

/// A VM waiting for a node: it belongs to one slot and needs this much room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNeed {
    pub vm: VmId,
    pub slot: SlotId,
    pub memory_mb: u64,
    pub cpus: u32,
}

/// A reserved node of a slot, with the room its pilot reserved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoom {
    pub slot: SlotId,
    pub node: String,
    pub memory_mb: u64,
    pub cpus: u32,
}

/// Not every VM found a node.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no reserved node has room for VM {vm} of slot {slot}")]
pub struct MapError {
    pub vm: VmId,
    pub slot: SlotId,
}

/// Greedy mapping: largest VMs first, each onto the first node of its slot
/// that still has room. Returns (vm, node) pairs; all or nothing.
pub fn map_vms(vms: &[VmNeed], nodes: &[NodeRoom]) -> Result<Vec<(VmId, String)>, MapError> {
    map_vms_preferring(vms, nodes, &|_, _| false)
}

/// [`map_vms`], but among the nodes of its slot that have room a VM goes
/// first to one where `prefer(vm, node)` holds (a node whose image cache
/// already has the VM's image), else to the first with room as before.
pub fn map_vms_preferring(
    vms: &[VmNeed],
    nodes: &[NodeRoom],
    prefer: &dyn Fn(&VmId, &str) -> bool,
) -> Result<Vec<(VmId, String)>, MapError> {
    let mut by_slot: HashMap<&SlotId, Vec<(usize, u64, u32)>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        by_slot
            .entry(&n.slot)
            .or_default()
            .push((i, n.memory_mb, n.cpus));
    }
    let mut order: Vec<&VmNeed> = vms.iter().collect();
    order.sort_by(|a, b| b.memory_mb.cmp(&a.memory_mb).then(b.cpus.cmp(&a.cpus)));
    let mut out = Vec::with_capacity(vms.len());
    for v in order {
        let rooms = by_slot.get_mut(&v.slot);
        let found = rooms.and_then(|rooms| {
            let fits = |r: &(usize, u64, u32)| r.1 >= v.memory_mb && r.2 >= v.cpus;
            let pick = rooms
                .iter()
                .position(|r| fits(r) && prefer(&v.vm, &nodes[r.0].node))
                .or_else(|| rooms.iter().position(fits))?;
            rooms.get_mut(pick).map(|room| {
                room.1 -= v.memory_mb;
                room.2 -= v.cpus;
                room.0
            })
        });
        match found {
            Some(i) => out.push((v.vm.clone(), nodes[i].node.clone())),
            None => {
                return Err(MapError {
                    vm: v.vm.clone(),
                    slot: v.slot.clone(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> WorkspaceSpec {
        WorkspaceSpec::parse(text).unwrap()
    }

    const ENSEMBLE: &str = r#"
name = "e"
duration = 60
[[group]]
name = "worker"
count = 3
memory_mb = 1024
image = "w"
[[group]]
name = "head"
count = 1
memory_mb = 2048
cpus = 2
image = "h"
"#;

    fn cap(nodes: u32) -> Capacity {
        Capacity {
            nodes,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        }
    }

    #[test]
    fn exact_fit_plans_one_submit_per_group_and_places_greedily() {
        let cluster = Cluster {
            capacity: cap(4),
            min_dom0_mb: 100,
        };
        let plan = ExactFit.plan_lease(&spec(ENSEMBLE), &cluster).unwrap();
        let want: Vec<Action> = plan_slots(&spec(ENSEMBLE), &cap(4), 100)
            .unwrap()
            .into_iter()
            .map(Action::Submit)
            .collect();
        assert_eq!(plan.actions, want);
        assert!(ExactFit
            .plan_lease(
                &spec(ENSEMBLE),
                &Cluster {
                    capacity: cap(3),
                    ..cluster
                }
            )
            .is_err());
        assert_eq!(by_name("exact-fit").map(|p| p.name()), Some("exact-fit"));
        assert!(by_name("pack").is_none());
    }

    #[test]
    fn ensemble_gets_one_exact_slot_per_group() {
        let p = plan_slots(&spec(ENSEMBLE), &cap(4), 100).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].nodes, p[0].cores_per_node, p[0].memory_mb_per_node),
            (3, 1, 1024)
        );
        assert_eq!(
            (p[1].nodes, p[1].cores_per_node, p[1].memory_mb_per_node),
            (1, 2, 2048)
        );
    }

    #[test]
    fn too_big_requests_name_what_does_not_fit() {
        assert!(matches!(
            plan_slots(&spec(ENSEMBLE), &cap(3), 100),
            Err(FitError::Nodes { asked: 4, has: 3 })
        ));
        let big = ENSEMBLE.replace("memory_mb = 2048", "memory_mb = 4000");
        let e = plan_slots(&spec(&big), &cap(4), 100).unwrap_err();
        assert!(e.to_string().contains("\"head\" asks 4000 MB"), "{e}");
        let many = ENSEMBLE.replace("cpus = 2", "cpus = 3");
        assert!(matches!(
            plan_slots(&spec(&many), &cap(4), 100),
            Err(FitError::Cpus { .. })
        ));
    }

    #[test]
    fn greedy_mapping_puts_one_vm_per_exact_node() {
        let s1 = SlotId::generate();
        let vms: Vec<VmNeed> = (0..3)
            .map(|_| VmNeed {
                vm: VmId::generate(),
                slot: s1.clone(),
                memory_mb: 1024,
                cpus: 1,
            })
            .collect();
        let nodes: Vec<NodeRoom> = (1..=3)
            .map(|i| NodeRoom {
                slot: s1.clone(),
                node: format!("node{i}"),
                memory_mb: 1024,
                cpus: 1,
            })
            .collect();
        let m = map_vms(&vms, &nodes).unwrap();
        let mut used: Vec<_> = m.iter().map(|(_, n)| n.clone()).collect();
        used.sort();
        assert_eq!(used, vec!["node1", "node2", "node3"]);
    }

    #[test]
    fn mapping_prefers_nodes_whose_cache_holds_the_image() {
        let s1 = SlotId::generate();
        let vm = VmId::generate();
        let vms = vec![VmNeed {
            vm: vm.clone(),
            slot: s1.clone(),
            memory_mb: 1024,
            cpus: 1,
        }];
        let nodes: Vec<NodeRoom> = ["node1", "node2", "node3"]
            .iter()
            .map(|n| NodeRoom {
                slot: s1.clone(),
                node: n.to_string(),
                memory_mb: 1024,
                cpus: 1,
            })
            .collect();
        let m = map_vms_preferring(&vms, &nodes, &|_, n| n == "node3").unwrap();
        assert_eq!(m, vec![(vm.clone(), "node3".to_string())]);
        // A preferred node without room is passed over; no preference = first fit.
        let small = vec![
            nodes[0].clone(),
            NodeRoom {
                memory_mb: 512,
                ..nodes[2].clone()
            },
        ];
        let m = map_vms_preferring(&vms, &small, &|_, n| n == "node3").unwrap();
        assert_eq!(m[0].1, "node1");
        assert_eq!(map_vms(&vms, &nodes).unwrap()[0].1, "node1");
    }

    #[test]
    fn mapping_fails_whole_when_a_vm_has_no_room() {
        let s1 = SlotId::generate();
        let vms = vec![
            VmNeed {
                vm: VmId::generate(),
                slot: s1.clone(),
                memory_mb: 1024,
                cpus: 1,
            },
            VmNeed {
                vm: VmId::generate(),
                slot: s1.clone(),
                memory_mb: 1024,
                cpus: 1,
            },
        ];
        let nodes = vec![NodeRoom {
            slot: s1,
            node: "n".into(),
            memory_mb: 1024,
            cpus: 1,
        }];
        assert!(map_vms(&vms, &nodes).is_err());
    }
}
