//! The machine's limit for the event path, measured in the same run as the
//! load part: a bare loop that writes the rows a `vm_destroyed` event writes
//! (the replay mark, the event log, the pilot's row, the VM's row through
//! its state table, a timeline entry), through the same store functions, with the same group
//! commit (one transaction per batch, one savepoint per event), on a fresh
//! database of the same size, on one thread. No HTTP, signature, JSON
//! parsing, rules or reads: what the event path could reach if everything
//! but SQLite cost nothing. The load part's events/s over this is the
//! fraction of the machine the event path uses, a figure that travels
//! between machines where absolute events/s do not.

use anyhow::Result;
use coordinator::lifecycle::vm::Input::Gone;
use coordinator::store::{self, Store, VmRow};
use protocol::pilot::{EventKind, PilotEvent};
use protocol::view::{Phase, VmState};
use protocol::{now_ms, PilotId, SlotId, VmId, VmName, WorkspaceId};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct LimitResult {
    pub pilots: usize,
    /// Events per transaction: the most the load part's senders can have queued at once.
    pub batch: usize,
    pub seconds: f64,
    pub events: u64,
    pub events_per_s: f64,
}

struct Row {
    ws: WorkspaceId,
    slot: SlotId,
    node: String,
    pilot: PilotId,
    vm: VmId,
    seq: u64,
}

/// Writes `batch` events per transaction for `seconds`, over `pilots` pilots
/// laid out as in the load part (workspaces of `per_ws` VMs, one slot each).
pub fn run(pilots: usize, per_ws: usize, batch: usize, seconds: f64) -> Result<LimitResult> {
    anyhow::ensure!(
        pilots > 0 && per_ws > 0 && batch > 0,
        "the limit needs pilots, workspaces and a batch"
    );
    let dir = tempfile::Builder::new()
        .prefix("wsp-bench-limit-")
        .tempdir()?;
    let mut st = Store::open(&dir.path().join("limit.db"))?;
    let mut rows = Vec::with_capacity(pilots);
    st.tx(|tx| {
        for chunk in 0..pilots.div_ceil(per_ws) {
            let (ws, slot) = (WorkspaceId::generate(), SlotId::generate());
            for j in 0..per_ws.min(pilots - chunk * per_ws) {
                let vm = VmId::generate();
                store::insert_vm(
                    tx,
                    &VmRow {
                        name: VmName::new(slot.clone(), vm.clone()).to_string(),
                        id: vm.clone(),
                        workspace_id: ws.clone(),
                        slot_id: slot.clone(),
                        group: "p".into(),
                        idx: j as u32,
                        node: Some(format!("node{}", j + 1)),
                        state: VmState::Running,
                        memory_mb: 512,
                        cpus: 1,
                        image: "x".into(),
                    },
                )?;
                let r = Row {
                    ws: ws.clone(),
                    slot: slot.clone(),
                    node: format!("node{}", j + 1),
                    pilot: PilotId::generate(),
                    vm,
                    seq: 1,
                };
                store::touch_pilot(tx, &r.slot, &r.node, r.pilot.as_str(), "started", now_ms())?;
                rows.push(r);
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(seconds);
    let mut events = 0u64;
    let mut next = 0usize;
    while Instant::now() < end {
        let mut items = Vec::with_capacity(batch);
        for _ in 0..batch {
            let idx = next % pilots;
            next += 1;
            let r = &mut rows[idx];
            r.seq += 1;
            let e = PilotEvent {
                slot_id: r.slot.clone(),
                pilot_id: r.pilot.clone(),
                node: r.node.clone(),
                seq: r.seq,
                ts_ms: now_ms(),
                kind: EventKind::VmDestroyed {
                    vm_id: r.vm.clone(),
                    destroy_ms: 1,
                },
            };
            let body = serde_json::to_string(&e)?;
            items.push((idx, e, body));
        }
        let rows_ref = &rows;
        let out = st.tx_each(&items, |c, (i, e, body)| {
            let r = &rows_ref[*i];
            let now = now_ms();
            store::insert_pilot_event(c, e, body, now)?;
            store::touch_pilot(c, &r.slot, &r.node, r.pilot.as_str(), "vm_destroyed", now)?;
            store::advance_vm(c, &r.vm, Gone { preempted: false })?;
            store::push_timeline(
                c,
                &r.ws,
                e.ts_ms,
                now,
                Phase::VmDestroyed,
                Some(&r.slot),
                Some(&r.node),
                Some(&r.vm),
                "destroyed in 1 ms",
            )?;
            Ok::<_, store::StoreError>(())
        })?;
        events += out.iter().filter(|o| o.is_ok()).count() as u64;
    }
    let took = t0.elapsed().as_secs_f64();
    Ok(LimitResult {
        pilots,
        batch,
        seconds: took,
        events,
        events_per_s: events as f64 / took,
    })
}
