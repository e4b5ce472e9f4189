//! CPU shares on the node: `set_cpu` changes a running VM's weight and cap
//! (an urgent VM arrives beside it), and the default share lifts them (it
//! left). The drivers apply them (kvm: the VM's cgroup; xen: `xl
//! sched-credit`; sim: recorded). A launch's own share is applied by the
//! driver when the VM starts. Not the policy of who gets what (the
//! coordinator's).

use super::{hv_call, End, Pilot};
use crate::state::VmRecordState;
use protocol::pilot::{CpuShare, EventKind};
use protocol::VmId;
use std::time::Duration;
use tokio::time::Instant;

impl Pilot {
    pub(super) async fn set_cpu(
        &mut self,
        vm_id: VmId,
        cpu: CpuShare,
        deadline: Instant,
    ) -> Result<(), End> {
        let fail = |p: &mut Pilot, reason: String| {
            tracing::warn!(vm_id = %vm_id, cpu = %cpu, reason = %reason, "CPU share not applied");
            p.push(EventKind::VmCpuSetFailed {
                vm_id: vm_id.clone(),
                cpu,
                reason,
            });
        };
        if let Err(e) = cpu.validate() {
            fail(self, e);
            return Ok(());
        }
        let Some(name) = self
            .record
            .vms
            .iter()
            .find(|v| v.vm_id == vm_id && v.state == VmRecordState::Running)
            .map(|v| v.name.clone())
        else {
            fail(self, format!("no VM {vm_id} runs on this slot"));
            return Ok(());
        };
        let urgency = self.launches.get(&vm_id).map_or(0, |l| l.urgency);
        let bound = deadline.max(Instant::now() + Duration::from_secs(1));
        let r = hv_call(&self.hv, bound, "setting a CPU share", move |hv| {
            hv.set_cpu(&name, &cpu, urgency)
        })
        .await;
        match r {
            Ok(mechanism) => {
                if let Some(l) = self.launches.get_mut(&vm_id) {
                    l.cpu = Some(cpu).filter(|c| !c.is_default());
                }
                tracing::info!(vm_id = %vm_id, cpu = %cpu, mechanism = %mechanism, "CPU share applied");
                self.push(EventKind::VmCpuSet {
                    vm_id,
                    cpu,
                    mechanism,
                });
            }
            Err(e) => fail(self, e.to_string()),
        }
        Ok(())
    }
}
