//! Part 4: the greedy mapper (`coordinator::policy::map_vms`) with 100,000
//! VMs onto the nodes of 10,000 slots (10 nodes each, one VM per node, the
//! exact-fit shape the coordinator produces).

use crate::stats::Summary;
use anyhow::{bail, Result};
use coordinator::policy::{map_vms, NodeRoom, VmNeed};
use protocol::{SlotId, VmId};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct MapResult {
    pub vms: usize,
    pub slots: usize,
    pub repeats: usize,
    pub ms: Summary,
}

pub fn run(vms: usize, slots: usize, repeats: usize) -> Result<MapResult> {
    let per_slot = vms.div_ceil(slots);
    let mut needs = Vec::with_capacity(vms);
    let mut rooms = Vec::with_capacity(vms);
    for _ in 0..slots {
        let slot = SlotId::generate();
        for j in 0..per_slot {
            if needs.len() == vms {
                break;
            }
            needs.push(VmNeed {
                vm: VmId::generate(),
                slot: slot.clone(),
                memory_mb: 1024,
                cpus: 1,
            });
            rooms.push(NodeRoom {
                slot: slot.clone(),
                node: format!("node{j}"),
                memory_mb: 1024,
                cpus: 1,
            });
        }
    }
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        let m = map_vms(&needs, &rooms);
        let took = t.elapsed().as_secs_f64() * 1000.0;
        match m {
            Ok(m) if m.len() == vms => {}
            Ok(m) => bail!("mapper placed {} of {vms} VMs", m.len()),
            Err(e) => bail!("mapper failed: {e}"),
        }
        samples.push(took);
    }
    let ms = Summary::of(&samples).ok_or_else(|| anyhow::anyhow!("no repeat"))?;
    Ok(MapResult {
        vms,
        slots,
        repeats,
        ms,
    })
}
