//! The rules in process and in virtual time: a real engine (SQLite on disk,
//! so it can be restarted) on a [`ManualClock`], a batch system scripted in
//! memory, and pilots that are this test's calls into the typed entry. A
//! minute of lease time passes in a call; every test runs in milliseconds.

use super::{Caller, Engine, EngineError, Incoming, Outcome, Parts};
use crate::clock::{Clock, ManualClock};
use crate::config::Config;
use crate::policy::ExactFit;
use async_trait::async_trait;
use lrm_adapters::{Capacity, JobId, JobState, JobStatus, Lrm, LrmError, SlotJob, Warning};
use protocol::pilot::{CommandKind, EventKind, PilotEvent, ReleaseReason};
use protocol::spec::WorkspaceSpec;
use protocol::view::{Phase, SlotState, VmState, WorkspaceState, WorkspaceView};
use protocol::{PilotId, SlotId, WorkspaceId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// 2023-11-14T22:13:20Z: any fixed start will do.
const T0: u64 = 1_700_000_000_000;

/// A batch system in memory that does only what the test says: jobs stay
/// queued until told otherwise, cancels can be made to fail.
#[derive(Default)]
struct ScriptedLrm {
    jobs: Mutex<HashMap<JobId, (String, JobState)>>,
    failing_cancels: AtomicU32,
    cancels_tried: AtomicU32,
    /// Submits refused from now on (the batch system refusing a job).
    failing_submits: AtomicU32,
    /// It grants every advance reservation asked (off: it has none).
    reserves: std::sync::atomic::AtomicBool,
    /// Where each job asked to stand in the queue, in order ([`Lrm::submit_at`]).
    standings: Mutex<Vec<(lrm_adapters::Standing, lrm_adapters::BatchPriority)>>,
    /// Priority asks refused (a coordinator without the rights).
    refuse_priority: std::sync::atomic::AtomicBool,
}

impl ScriptedLrm {
    fn set(&self, id: &str, state: JobState) {
        if let Some(j) = self.jobs.lock().expect("lock").get_mut(&JobId(id.into())) {
            j.1 = state;
        }
    }
    fn state(&self, id: &str) -> Option<JobState> {
        self.jobs
            .lock()
            .expect("lock")
            .get(&JobId(id.into()))
            .map(|j| j.1.clone())
    }
}

#[async_trait]
impl Lrm for ScriptedLrm {
    fn kind(&self) -> &'static str {
        "scripted"
    }
    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: Duration::from_secs(5),
        }
    }
    fn capacity(&self) -> Option<Capacity> {
        Some(Capacity {
            nodes: 8,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        })
    }
    fn render_script(&self, _job: &SlotJob) -> String {
        String::new()
    }
    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        if self.failing_submits.load(Ordering::SeqCst) > 0 {
            self.failing_submits.fetch_sub(1, Ordering::SeqCst);
            return Err(LrmError::Config {
                lrm: "scripted",
                message: "sbatch: error: QOSMaxSubmitJobPerUserLimit".into(),
            });
        }
        let mut jobs = self.jobs.lock().expect("lock");
        let id = JobId((jobs.len() + 1).to_string());
        jobs.insert(id.clone(), (job.name.clone(), JobState::Queued));
        Ok(id)
    }
    /// Urgent jobs ask `scripted top <id>` unless `off`; refused when told.
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: lrm_adapters::Standing,
        mode: lrm_adapters::BatchPriority,
    ) -> Result<lrm_adapters::Submitted, LrmError> {
        self.standings.lock().expect("lock").push((standing, mode));
        let id = self.submit(job).await?;
        let urgent = matches!(standing, lrm_adapters::Standing::Urgent { .. });
        if !urgent || mode == lrm_adapters::BatchPriority::Off {
            return Ok(lrm_adapters::Submitted::plain(id));
        }
        let refused = self
            .refuse_priority
            .load(Ordering::SeqCst)
            .then(|| "scripted top: Access/permission denied".to_string());
        Ok(lrm_adapters::Submitted {
            asked: Some(format!("scripted top {id}")),
            id,
            refused,
        })
    }
    fn check_batch_priority(&self, _mode: lrm_adapters::BatchPriority) -> Result<(), String> {
        Ok(())
    }
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        let jobs = self.jobs.lock().expect("lock");
        Ok(ids
            .iter()
            .map(|i| {
                let st = jobs
                    .get(i)
                    .map_or(JobStatus::NotFound, |j| JobStatus::Known(j.1.clone()));
                (i.clone(), st)
            })
            .collect())
    }
    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        self.cancels_tried.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing_cancels.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_cancels.store(failing - 1, Ordering::SeqCst);
            return Err(LrmError::Config {
                lrm: "scripted",
                message: "qdel: server busy".into(),
            });
        }
        self.set(&id.0, JobState::Cancelled);
        Ok(())
    }
    fn reservations(&self) -> Option<&dyn lrm_adapters::reserve::Reservations> {
        if self.reserves.load(Ordering::SeqCst) {
            Some(self)
        } else {
            None
        }
    }
}

/// Reservations as the test wants them: every one granted, its jobs queued.
#[async_trait]
impl lrm_adapters::reserve::Reservations for ScriptedLrm {
    async fn create(
        &self,
        req: &lrm_adapters::reserve::ReservationRequest,
    ) -> Result<lrm_adapters::reserve::Reservation, lrm_adapters::reserve::ReserveError> {
        Ok(lrm_adapters::reserve::Reservation {
            id: req.name.clone(),
            start_ms: req.start_ms,
            end_ms: req.start_ms + req.duration.as_millis() as u64,
            nodes: Vec::new(),
        })
    }
    async fn query(
        &self,
        _id: &str,
    ) -> Result<Option<lrm_adapters::reserve::Reservation>, LrmError> {
        Ok(None)
    }
    async fn delete(&self, _id: &str) -> Result<(), LrmError> {
        Ok(())
    }
    async fn submit_into(&self, job: &SlotJob, _id: &str) -> Result<JobId, LrmError> {
        self.submit(job).await
    }
}

/// A pilot as the test plays it: its instance id, last sequence number, and
/// the last command id it received.
type Pilot = (PilotId, u64, u64);

/// One engine on a manual clock, its scripted batch system, and the pilots'
/// sequence numbers and command cursors (kept across a restart, as pilots
/// keep theirs).
struct Rig {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    lrm: Arc<ScriptedLrm>,
    engine: Arc<Engine>,
    pilots: Mutex<HashMap<(SlotId, String), Pilot>>,
    last: Mutex<Option<PilotEvent>>,
    /// Changes to the default test config (kept across a restart).
    tweak: fn(&mut Config),
}

fn admin() -> Caller {
    Caller {
        user: "tester".into(),
        admin: true,
    }
}

fn open(
    dir: &std::path::Path,
    clock: &Arc<ManualClock>,
    lrm: &Arc<ScriptedLrm>,
    tweak: fn(&mut Config),
) -> Arc<Engine> {
    let mut cfg = Config {
        data_dir: dir.join("data"),
        pilot_silence_s: 90,
        checkpoint_dir: Some(dir.join("store")),
        ..Config::default()
    };
    tweak(&mut cfg);
    let parts = Parts {
        clock: clock.clone(),
        policy: Arc::new(ExactFit),
        in_memory: false,
        ..Parts::default()
    };
    Engine::with_parts(cfg, lrm.clone(), "http://127.0.0.1:1".into(), parts).expect("engine")
}

impl Rig {
    fn new() -> Rig {
        Rig::with(|_| {})
    }

    /// A rig whose config is the default test config changed by `tweak`.
    fn with(tweak: fn(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(T0));
        let lrm = Arc::new(ScriptedLrm::default());
        let engine = open(dir.path(), &clock, &lrm, tweak);
        Rig {
            dir,
            clock,
            lrm,
            engine,
            pilots: Mutex::new(HashMap::new()),
            last: Mutex::new(None),
            tweak,
        }
    }

    /// Stops this engine and opens a new one on the same database, as a
    /// coordinator restarted by its admin would.
    fn restart(&mut self) {
        self.engine = open(self.dir.path(), &self.clock, &self.lrm, self.tweak);
    }

    async fn lease(&self, nodes: u32, duration_s: u64) -> WorkspaceView {
        let spec = format!(
            "name = \"t\"\nduration = {duration_s}\n[[group]]\nname = \"g\"\ncount = {nodes}\nmemory_mb = 512\nimage = \"i\"\n"
        );
        let spec = WorkspaceSpec::parse(&spec).expect("spec");
        self.engine.create(&admin(), spec).await.expect("created")
    }

    fn view(&self, id: &WorkspaceId) -> WorkspaceView {
        self.engine.get(&admin(), id).expect("view")
    }

    /// The pilot of (slot, node) says `kind`, through the typed entry.
    fn send(&self, slot: &SlotId, node: &str, kind: EventKind) -> Outcome {
        self.send_made_at(slot, node, kind, self.clock.now_ms())
    }

    /// [`Rig::send`] of an event the pilot made at `ts_ms` (a letter from
    /// its outbox, delivered late).
    fn send_made_at(&self, slot: &SlotId, node: &str, kind: EventKind, ts_ms: u64) -> Outcome {
        let seq = {
            let mut pilots = self.pilots.lock().expect("lock");
            let p = pilots
                .entry((slot.clone(), node.to_string()))
                .or_insert_with(|| (PilotId::generate(), 0, 0));
            p.1 += 1;
            (p.0.clone(), p.1)
        };
        let event = PilotEvent {
            slot_id: slot.clone(),
            pilot_id: seq.0,
            node: node.into(),
            seq: seq.1,
            ts_ms,
            kind,
        };
        *self.last.lock().expect("lock") = Some(event.clone());
        self.resend(event)
    }

    fn resend(&self, event: PilotEvent) -> Outcome {
        let incoming = Incoming::new(event, self.clock.now_ms()).expect("incoming");
        let mut out = self.engine.apply_events(&[incoming]);
        out.pop().expect("one outcome")
    }

    /// The pilot's new commands (and it counts as heard from).
    fn commands(&self, slot: &SlotId, node: &str) -> Vec<CommandKind> {
        let mut pilots = self.pilots.lock().expect("lock");
        let p = pilots
            .entry((slot.clone(), node.to_string()))
            .or_insert_with(|| (PilotId::generate(), 0, 0));
        let cmds = self
            .engine
            .pilot_commands(slot, node, p.2)
            .expect("commands");
        if let Some(c) = cmds.last() {
            p.2 = c.id;
        }
        cmds.into_iter().map(|c| c.kind).collect()
    }

    /// Every pilot starts and reserves; every VM it is told to start runs.
    fn bring_up(&self, ws: &WorkspaceView) {
        for s in &ws.slots {
            for n in 1..=s.nodes {
                let node = format!("node{n}");
                self.send(&s.id, &node, started()).expect("started");
                self.send(&s.id, &node, reserved()).expect("reserved");
            }
        }
        for s in &ws.slots {
            for n in 1..=s.nodes {
                let node = format!("node{n}");
                for c in self.commands(&s.id, &node) {
                    if let CommandKind::StartVm(l) = c {
                        let kind = EventKind::VmStarted {
                            vm_id: l.vm_id,
                            name: l.name,
                            create_ms: 5,
                            stage_ms: None,
                            cache_hit: None,
                            warm: None,
                        };
                        self.send(&s.id, &node, kind).expect("vm started");
                    }
                }
            }
        }
        assert_eq!(self.view(&ws.id).state, WorkspaceState::Running);
    }

    /// Every pilot of the workspace releases.
    fn release_all(&self, ws: &WorkspaceView, reason: ReleaseReason) {
        for s in &ws.slots {
            for n in 1..=s.nodes {
                let node = format!("node{n}");
                let out = self.send(&s.id, &node, released(reason));
                out.expect("released");
            }
        }
    }

    /// Every pilot of the workspace polls (as live pilots do every few seconds).
    fn poll_all(&self, ws: &WorkspaceView) {
        for s in &ws.slots {
            for n in 1..=s.nodes {
                self.commands(&s.id, &format!("node{n}"));
            }
        }
    }

    fn job_of(&self, ws: &WorkspaceView) -> String {
        self.view(&ws.id).slots[0].job_id.clone().expect("a job id")
    }

    async fn phases(&self, ws: &WorkspaceView) -> Vec<Phase> {
        let page = self
            .engine
            .events(&admin(), &ws.id, 0, Duration::ZERO)
            .await;
        page.expect("events")
            .events
            .into_iter()
            .map(|e| e.phase)
            .collect()
    }
}

fn started() -> EventKind {
    EventKind::Started {
        pid: 1,
        hypervisor: "sim".into(),
        job_id: None,
    }
}

fn reserved() -> EventKind {
    EventKind::Reserved {
        dom0_before_mb: 4096,
        dom0_after_mb: 3584,
        reserved_mb: 512,
        balloon_ms: 1,
        cached_images: Vec::new(),
        checkpoints: None,
        deadline_ms: None,
        idle: false,
        cpu_control: None,
    }
}

fn released(reason: ReleaseReason) -> EventKind {
    EventKind::Released {
        reason,
        vms_destroyed: Vec::new(),
        dom0_restored_mb: 4096,
        restore_ms: 1,
        clean: true,
        problems: Vec::new(),
        vms_suspended: Vec::new(),
    }
}

#[path = "suspend_tests.rs"]
mod suspend_tests;

#[path = "pool_tests.rs"]
mod pool_tests;
#[path = "queue_priority_tests.rs"]
mod queue_priority_tests;
#[path = "urgent_tests.rs"]
mod urgent_tests;

#[tokio::test]
async fn preempted_while_destroying_ends_preempted_with_every_vm_preempted() {
    let rig = Rig::new();
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let slot = ws.slots[0].id.clone();
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    assert_eq!(rig.view(&ws.id).state, WorkspaceState::Destroying);
    assert!(rig.commands(&slot, "node1").contains(&CommandKind::Release));

    // The batch system takes node1 back while its pilot destroys.
    rig.clock.advance(200);
    let preempting = EventKind::Preempting {
        signal: "SIGTERM".into(),
        coordinator_wait_ms: 2_000,
        cleanup_deadline_ms: rig.clock.now_ms() + 4_000,
        suspending: Vec::new(),
        not_suspending: None,
    };
    rig.send(&slot, "node1", preempting).expect("preempting");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Preempted);
    assert!(
        v.reason.as_deref().unwrap_or("").contains("preempted"),
        "{v:?}"
    );

    rig.send(&slot, "node1", released(ReleaseReason::Preempted))
        .expect("released");
    rig.send(&slot, "node2", released(ReleaseReason::Commanded))
        .expect("released");
    let v = rig.view(&ws.id);
    assert!(
        v.vms.iter().all(|vm| vm.state == VmState::Preempted),
        "{v:?}"
    );
    assert_eq!(v.slots[0].state, SlotState::Released);
    assert!(!v.settled, "the slot's job is owed a cancel");
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert!(v.settled, "{v:?}");
    let phases = rig.phases(&ws).await;
    assert!(phases.contains(&Phase::Preempting) && phases.ends_with(&[Phase::Ended]));
}

/// The timeline's details, in order.
async fn details(rig: &Rig, ws: &WorkspaceView) -> Vec<(Phase, String)> {
    let page = rig.engine.events(&admin(), &ws.id, 0, Duration::ZERO).await;
    page.expect("events")
        .events
        .into_iter()
        .map(|e| (e.phase, e.detail))
        .collect()
}

fn preempting(now: u64) -> EventKind {
    EventKind::Preempting {
        signal: "SIGTERM".into(),
        coordinator_wait_ms: 0,
        cleanup_deadline_ms: now + 4_000,
        suspending: Vec::new(),
        not_suspending: None,
    }
}

#[tokio::test]
async fn a_job_that_ends_before_its_pilots_report_waits_for_them_then_names_the_nodes() {
    let rig = Rig::new();
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let job = rig.job_of(&ws);
    rig.clock.advance(60_000);
    rig.lrm.set(&job, JobState::Completed);
    rig.engine.housekeeping(false).await;
    assert_eq!(
        rig.view(&ws.id).state,
        WorkspaceState::Running,
        "no status asked yet"
    );

    rig.engine.housekeeping(true).await;
    let v = rig.view(&ws.id);
    // The batch system cannot say how the nodes ended; the pilots' reports
    // (late, from their outboxes) can: nothing is decided before they come.
    assert_eq!(v.slots[0].state, SlotState::AwaitingReport, "{v:?}");
    assert_eq!(v.state, WorkspaceState::Running);
    assert!(!v.settled);
    let due = T0 + 60_000 + 60_000;
    assert_eq!(
        rig.engine.next_report_deadline_ms().expect("due"),
        Some(due)
    );
    rig.clock.set(due - 1);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.view(&ws.id).slots[0].state, SlotState::AwaitingReport);
    let said = details(&rig, &ws).await;
    assert!(
        !said.iter().any(|(_, d)| d.contains("kill-all")),
        "no kill-all advice while reports may come: {said:#?}"
    );

    rig.clock.set(due);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Failed);
    assert!(
        v.reason
            .as_deref()
            .unwrap_or("")
            .contains(&format!("batch job {job} ended"))
            && v.reason.as_deref().unwrap_or("").contains("node1, node2"),
        "{v:?}"
    );
    assert_eq!(v.slots[0].state, SlotState::Unreported);
    assert!(v.settled, "nothing is owed to a job that ended: {v:?}");
    let said = details(&rig, &ws).await;
    let note = said
        .iter()
        .find(|(p, _)| *p == Phase::SlotReleased)
        .expect("the slot's end is on the timeline");
    assert!(
        note.1.contains("node1, node2") && note.1.contains("kill-all"),
        "{note:?}"
    );
    let (phase, end) = said.last().expect("an end");
    assert_eq!(*phase, Phase::Ended);
    assert!(
        !end.contains("every slot given back") && end.contains("node1, node2"),
        "{end}"
    );

    // node1's report comes after all (kill-all delivered it): recorded, the
    // advice for node1 withdrawn; the slot and the workspace do not move.
    let made = T0 + 61_000;
    rig.clock.advance(3_600_000);
    rig.send_made_at(
        &ws.slots[0].id,
        "node1",
        released(ReleaseReason::Preempted),
        made,
    )
    .expect("a late report is taken");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Failed);
    assert_eq!(v.slots[0].state, SlotState::Unreported);
    let said = details(&rig, &ws).await;
    let (_, last) = said.last().expect("entries");
    assert!(
        last.contains("late report from the pilot on node1")
            && last.contains("no workspace-kill-all needed"),
        "{said:#?}"
    );
}

#[tokio::test]
async fn reports_that_arrive_after_a_long_outage_correct_the_record_of_a_destroy() {
    let mut rig = Rig::new();
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let slot = ws.slots[0].id.clone();
    let job = rig.job_of(&ws);
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    for node in ["node1", "node2"] {
        assert!(rig.commands(&slot, node).contains(&CommandKind::Release));
    }
    // The coordinator goes away; the pilots destroy, restore, write their
    // reports to their outboxes and exit; the job ends. 45 s later it is back
    // and asks the batch system first.
    let made = rig.clock.now_ms() + 500;
    let vms = rig.view(&ws.id).vms;
    rig.clock.advance(45_000);
    rig.lrm.set(&job, JobState::Completed);
    rig.restart();
    rig.engine.housekeeping(true).await;
    let v = rig.view(&ws.id);
    assert_eq!(
        v.state,
        WorkspaceState::Destroying,
        "not destroyed before it knows"
    );
    assert_eq!(v.slots[0].state, SlotState::AwaitingReport);
    assert!(!details(&rig, &ws)
        .await
        .iter()
        .any(|(p, _)| *p == Phase::Ended));

    // The letters arrive (the next pilot on each node delivers them), in the
    // order and with the times they were made.
    rig.clock.advance(5_000);
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        let at = made + 100 * i as u64;
        for vm in vms.iter().filter(|vm| vm.node.as_deref() == Some(node)) {
            let kind = EventKind::VmDestroyed {
                vm_id: vm.id.clone(),
                destroy_ms: 20,
            };
            rig.send_made_at(&slot, node, kind, at)
                .expect("vm_destroyed");
        }
        rig.send_made_at(&slot, node, released(ReleaseReason::Commanded), at + 50)
            .expect("released");
    }
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Destroyed, "{v:?}");
    assert_eq!(v.slots[0].state, SlotState::Released);
    assert!(v.settled, "{v:?}");
    let page = rig
        .engine
        .events(&admin(), &ws.id, 0, Duration::ZERO)
        .await
        .expect("events");
    let said: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.phase, e.detail.clone()))
        .collect();
    assert!(
        !said.iter().any(|(_, d)| d.contains("kill-all")),
        "no false kill-all advice: {said:#?}"
    );
    let late: Vec<u64> = page
        .events
        .iter()
        .filter(|e| matches!(e.phase, Phase::VmDestroyed | Phase::MemoryRestored))
        .map(|e| e.ts_ms)
        .collect();
    assert_eq!(late.len(), 4, "{said:#?}");
    assert!(
        late.windows(2).all(|w| w[0] <= w[1]),
        "in time order: {late:?}"
    );
    assert!(
        late.iter().all(|t| *t < made + 1_000),
        "their own times: {late:?}"
    );
    let (phase, end) = said.last().expect("an end");
    assert_eq!(
        (*phase, end.as_str()),
        (Phase::Ended, "destroyed: every slot given back")
    );
}

#[tokio::test]
async fn a_preemption_reported_late_ends_the_lease_preempted_naming_node_and_signal() {
    let mut rig = Rig::new();
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let slot = ws.slots[0].id.clone();
    let job = rig.job_of(&ws);
    // SIGTERM while the coordinator is away; the local batch system only
    // knows that the job's processes are gone.
    let made = rig.clock.now_ms() + 100;
    rig.clock.advance(40_000);
    rig.lrm.set(&job, JobState::Completed);
    rig.restart();
    rig.engine.housekeeping(true).await;
    assert_eq!(rig.view(&ws.id).state, WorkspaceState::Running);
    for node in ["node2", "node1"] {
        rig.send_made_at(&slot, node, preempting(made), made)
            .expect("preempting");
        rig.send_made_at(&slot, node, released(ReleaseReason::Preempted), made + 900)
            .expect("released");
    }
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Preempted, "{v:?}");
    let reason = v.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("node2") && reason.contains("SIGTERM") && !reason.contains("completed"),
        "{reason}"
    );
    assert!(
        v.vms.iter().all(|vm| vm.state == VmState::Preempted),
        "{v:?}"
    );
    assert!(v.settled, "{v:?}");
    let said = details(&rig, &ws).await;
    assert!(
        !said.iter().any(|(_, d)| d.contains("kill-all")),
        "{said:#?}"
    );
}

#[tokio::test]
async fn a_silent_pilot_is_lost_its_lease_fails_and_its_job_is_cancelled() {
    let rig = Rig::new();
    // Past the grace a restarted coordinator gives every pilot.
    rig.clock.advance(100_000);
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let slot = ws.slots[0].id.clone();
    // node2 keeps polling; node1 says nothing more.
    rig.clock.advance(60_000);
    rig.commands(&slot, "node2");
    rig.clock.advance(29_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(
        rig.view(&ws.id).state,
        WorkspaceState::Running,
        "89 s is not 90"
    );
    rig.clock.advance(2_000);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Failed);
    assert!(
        v.reason
            .as_deref()
            .unwrap_or("")
            .contains("node1 went silent"),
        "{v:?}"
    );
    let lost: Vec<&str> = v.slots[0]
        .pilots
        .iter()
        .filter(|p| p.last_event == "lost")
        .map(|p| p.node.as_str())
        .collect();
    assert_eq!(lost, ["node1"]);
    assert_eq!(rig.commands(&slot, "node2"), [CommandKind::Release]);
    rig.send(&slot, "node2", released(ReleaseReason::Commanded))
        .expect("released");
    // A lost pilot that speaks again changes nothing: its node stays named.
    rig.send(&slot, "node1", released(ReleaseReason::Commanded))
        .expect("stored");
    let v = rig.view(&ws.id);
    assert_eq!(v.slots[0].state, SlotState::Failed, "{v:?}");
    let job = rig.job_of(&ws);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    assert!(rig.view(&ws.id).settled);
}

#[tokio::test]
async fn a_cancel_the_batch_system_refuses_is_retried_every_second_until_taken() {
    let rig = Rig::new();
    let ws = rig.lease(2, 3600).await;
    let job = rig.job_of(&ws);
    rig.lrm.failing_cancels.store(2, Ordering::SeqCst);
    // Destroyed while queued: no pilot holds anything, the job is cancelled.
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    assert_eq!(rig.engine.next_cancel_ms().expect("due"), Some(T0));
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.cancels_tried.load(Ordering::SeqCst), 1);
    assert_eq!(
        rig.engine.next_cancel_ms().expect("due"),
        Some(T0 + 1_000),
        "a refused cancel is due again a second later"
    );
    rig.clock.advance(999);
    rig.engine.housekeeping(false).await;
    assert_eq!(
        rig.lrm.cancels_tried.load(Ordering::SeqCst),
        1,
        "not before"
    );
    rig.clock.advance(1);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.cancels_tried.load(Ordering::SeqCst), 2);
    assert!(!rig.view(&ws.id).settled, "still owed");
    rig.clock.advance(1_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.cancels_tried.load(Ordering::SeqCst), 3);
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Destroyed);
    assert!(v.settled, "{v:?}");
    assert_eq!(rig.engine.next_cancel_ms().expect("due"), None);
}

#[tokio::test]
async fn a_lease_ends_when_its_time_is_over_and_not_a_millisecond_before() {
    let rig = Rig::new();
    let ws = rig.lease(2, 600).await;
    rig.clock.advance(1_234);
    rig.bring_up(&ws);
    let end = T0 + 1_234 + 600_000;
    assert_eq!(rig.engine.next_lease_end_ms().expect("due"), Some(end));
    rig.clock.set(end - 1);
    rig.poll_all(&ws);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.view(&ws.id).state, WorkspaceState::Running);
    rig.clock.set(end);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Expired);
    assert_eq!(rig.engine.next_lease_end_ms().expect("due"), None);
    let slot = ws.slots[0].id.clone();
    assert_eq!(rig.commands(&slot, "node1"), [CommandKind::Release]);
    rig.release_all(&ws, ReleaseReason::Commanded);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert!(
        v.vms.iter().all(|vm| vm.state == VmState::Destroyed),
        "{v:?}"
    );
    assert!(v.settled, "{v:?}");
}

#[tokio::test]
async fn a_coordinator_restarted_mid_lease_keeps_the_lease_its_end_and_its_pilots() {
    let mut rig = Rig::new();
    let ws = rig.lease(2, 600).await;
    rig.bring_up(&ws);
    let before = rig.view(&ws.id);
    let end = rig.engine.next_lease_end_ms().expect("due");
    let last = rig.last.lock().expect("lock").clone().expect("an event");
    rig.clock.advance(30_000);
    rig.restart();
    assert_eq!(rig.view(&ws.id), before, "rebuilt from the database");
    assert_eq!(rig.engine.next_lease_end_ms().expect("due"), end);
    // A pilot resends what it did not see acknowledged: a duplicate.
    let again = rig.resend(last);
    assert!(
        matches!(again, Err(EngineError::Duplicate { .. })),
        "{again:?}"
    );
    // Silence counts from the restart, not from the pilots' last word.
    rig.clock.advance(80_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.view(&ws.id).state, WorkspaceState::Running);
    rig.clock.set(end.expect("an end"));
    let slot = ws.slots[0].id.clone();
    rig.commands(&slot, "node1");
    rig.commands(&slot, "node2");
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.view(&ws.id).state, WorkspaceState::Expired);
    assert_eq!(rig.commands(&slot, "node2"), [CommandKind::Release]);
    rig.release_all(&ws, ReleaseReason::Commanded);
    rig.engine.housekeeping(false).await;
    assert!(rig.view(&ws.id).settled);
}

#[tokio::test]
async fn a_pilots_commands_in_process_are_what_it_gets_over_http() {
    let rig = Rig::new();
    let ws = rig.lease(3, 600).await;
    rig.bring_up(&ws);
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    let slot = ws.slots[0].id.clone();
    for node in ["node1", "node2", "node3"] {
        let typed = rig.engine.pilot_commands(&slot, node, 0).expect("typed");
        let wire = rig
            .engine
            .with_store(|s| {
                let rows = crate::store::commands_after(s.conn(), &slot, node, 0)?;
                Ok(super::signed::poll_answer(s.conn(), rows)?)
            })
            .expect("wire");
        let wire: protocol::pilot::PollResponse =
            serde_json::from_str(&wire.0).expect("a poll response");
        assert_eq!(typed, wire.commands, "{node}");
        let peers = match &typed[0].kind {
            CommandKind::StartVm(l) => l.context.as_ref().map_or(0, |c| c.peers.len()),
            other => panic!("a launch first, not {other:?}"),
        };
        assert_eq!(peers, 3, "every VM gets every peer");
        assert_eq!(typed.last().map(|c| &c.kind), Some(&CommandKind::Release));
    }
}

/// Issue 19 item 7: after a pilot is lost, its VM is unknown (it may still
/// run), not destroyed; the other node's VM, signalled by our own cancel, is
/// destroyed, not preempted; and the scientist is not told to run kill-all.
#[tokio::test]
async fn a_lost_pilots_vm_is_unknown_and_our_cancel_is_not_a_preemption() {
    let rig = Rig::new();
    rig.clock.advance(100_000);
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let slot = ws.slots[0].id.clone();
    rig.clock.advance(60_000);
    rig.commands(&slot, "node2");
    rig.clock.advance(31_000);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Failed);
    let on = |v: &WorkspaceView, node: &str| {
        v.vms
            .iter()
            .find(|vm| vm.node.as_deref() == Some(node))
            .expect("a VM there")
            .state
    };
    assert_eq!(on(&v, "node1"), VmState::Unknown, "{v:?}");
    // Our cancel of the job reaches node2's pilot as SIGTERM.
    let job = rig.job_of(&ws);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    let preempting = EventKind::Preempting {
        signal: "SIGTERM".into(),
        coordinator_wait_ms: 2_000,
        cleanup_deadline_ms: rig.clock.now_ms() + 4_000,
        suspending: Vec::new(),
        not_suspending: None,
    };
    rig.send(&slot, "node2", preempting).expect("preempting");
    rig.send(&slot, "node2", released(ReleaseReason::Preempted))
        .expect("released");
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert!(v.settled, "{v:?}");
    assert_eq!(v.state, WorkspaceState::Failed, "not preempted: {v:?}");
    assert_eq!(on(&v, "node2"), VmState::Destroyed, "{v:?}");
    assert_eq!(on(&v, "node1"), VmState::Unknown, "still: {v:?}");
    let page = rig
        .engine
        .events(&admin(), &ws.id, 0, Duration::ZERO)
        .await
        .expect("events");
    let mut said: Vec<&str> = page.events.iter().map(|e| e.detail.as_str()).collect();
    said.push(v.reason.as_deref().unwrap_or(""));
    for s in &said {
        assert!(!s.contains("run workspace-kill-all"), "{s}");
        assert!(!s.contains("from the batch system"), "{s}");
    }
    assert!(said.iter().any(|s| s.contains("admins")), "{said:?}");
    // A late report from the lost pilot (kill-all delivers it) settles its VM.
    rig.send(&slot, "node1", released(ReleaseReason::Commanded))
        .expect("stored");
    assert_eq!(on(&rig.view(&ws.id), "node1"), VmState::Destroyed);
}

/// The admin's list of nodes that need kill-all: a release that was not
/// clean, and a job that ended under its pilot; each leaves the list when an
/// admin says the node was cleaned. Scientists may not read it.
#[tokio::test]
async fn unclean_releases_and_stuck_pilots_are_listed_for_kill_all_until_cleaned() {
    let rig = Rig::new();
    let ws = rig.lease(2, 3600).await;
    rig.bring_up(&ws);
    let slot = ws.slots[0].id.clone();
    let v = rig.engine.cluster_view(&admin()).expect("view");
    assert_eq!(v.nodes.len(), 2, "{v:?}");
    assert!(v.nodes.iter().all(|n| n.state == "in_use" && n.vms == 1));
    assert!(v.needs_kill_all.is_empty());
    let scientist = Caller {
        user: "sci".into(),
        admin: false,
    };
    assert!(matches!(
        rig.engine.cluster_view(&scientist),
        Err(EngineError::Forbidden(_))
    ));

    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    let mut unclean = released(ReleaseReason::Commanded);
    if let EventKind::Released {
        clean, problems, ..
    } = &mut unclean
    {
        *clean = false;
        problems.push("guest wsp-x still there".into());
    }
    rig.send(&slot, "node1", unclean).expect("released");
    // node2's pilot never says it released; the job ends under it, and the
    // slot gives up waiting for its late report.
    let job = rig.job_of(&ws);
    rig.lrm.set(&job, JobState::Completed);
    rig.engine.housekeeping(true).await;
    assert!(
        rig.engine
            .cluster_view(&admin())
            .expect("view")
            .needs_kill_all
            .iter()
            .all(|k| k.node != "node2"),
        "not listed while its report may still come"
    );
    rig.clock.advance((rig.engine.cfg.report_wait_s + 1) * 1000);
    rig.engine.housekeeping(true).await;
    let v = rig.engine.cluster_view(&admin()).expect("view");
    let todo: Vec<(&str, &str)> = v
        .needs_kill_all
        .iter()
        .map(|k| (k.node.as_str(), k.why.as_str()))
        .collect();
    assert_eq!(
        todo,
        [
            ("node1", "released, not clean"),
            ("node2", "batch job ended under its pilot")
        ],
        "{v:?}"
    );
    assert!(v.needs_kill_all[0]
        .command
        .starts_with("workspace-kill-all --node node1 --state-dir "));
    assert!(v.needs_kill_all[0]
        .command
        .ends_with(&format!("--slot {slot}")));
    let page = rig
        .engine
        .events(&admin(), &ws.id, 0, Duration::ZERO)
        .await
        .expect("events");
    assert!(page
        .events
        .iter()
        .all(|e| !e.detail.contains("run workspace-kill-all")));

    assert!(matches!(
        rig.engine.node_cleaned(&scientist, "node1"),
        Err(EngineError::Forbidden(_))
    ));
    let done = rig.engine.node_cleaned(&admin(), "node1").expect("cleaned");
    assert_eq!(done.pilots, 1);
    let v = rig.engine.cluster_view(&admin()).expect("view");
    assert_eq!(v.needs_kill_all.len(), 1, "node2 still: {v:?}");
    assert!(matches!(
        rig.engine.node_cleaned(&admin(), "node1"),
        Err(EngineError::NotFound(_))
    ));
    rig.engine.node_cleaned(&admin(), "node2").expect("cleaned");
    assert!(rig
        .engine
        .cluster_view(&admin())
        .expect("view")
        .needs_kill_all
        .is_empty());
}

#[tokio::test]
async fn a_create_repeated_with_its_key_gets_the_same_workspace_for_a_day_and_per_user() {
    let rig = Rig::new();
    let spec = || {
        WorkspaceSpec::parse(
            "name = \"t\"\nduration = 600\n[[group]]\nname = \"g\"\ncount = 1\nmemory_mb = 512\nimage = \"i\"\n",
        )
        .expect("spec")
    };
    let key = "wsk-0123456789abcdef";
    let (first, again) = rig
        .engine
        .create_idempotent(&admin(), spec(), key)
        .await
        .expect("created");
    assert!(!again);
    rig.clock.advance(30_000);
    let (second, again) = rig
        .engine
        .create_idempotent(&admin(), spec(), key)
        .await
        .expect("answered");
    assert!(again, "a retry");
    assert_eq!(second.id, first.id);
    assert_eq!(
        rig.lrm.jobs.lock().expect("lock").len(),
        1,
        "submitted once"
    );

    // Another spec under the same key is refused; another user's key is theirs.
    let mut other = spec();
    other.name = "u".into();
    let refused = rig.engine.create_idempotent(&admin(), other, key).await;
    assert!(
        matches!(refused, Err(EngineError::KeyReused(_))),
        "{refused:?}"
    );
    let bob = Caller {
        user: "bob".into(),
        admin: false,
    };
    let (bobs, again) = rig
        .engine
        .create_idempotent(&bob, spec(), key)
        .await
        .expect("bob's");
    assert!(!again && bobs.id != first.id);

    // A day later the key is forgotten: a new workspace.
    rig.clock.advance(super::client::IDEMPOTENCY_TTL_MS);
    let (later, again) = rig
        .engine
        .create_idempotent(&admin(), spec(), key)
        .await
        .expect("created");
    assert!(!again && later.id != first.id);
    for bad in ["short", "has space in it", &"x".repeat(129)] {
        let r = rig.engine.create_idempotent(&admin(), spec(), bad).await;
        assert!(matches!(r, Err(EngineError::BadRequest(_))), "{bad}: {r:?}");
    }
}

#[test]
fn largest_first_is_refused_on_a_batch_system_that_cannot_order_its_queue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = Config {
        data_dir: dir.path().join("data"),
        reservations: crate::config::ReservationsConfig {
            best_effort_order: crate::config::BestEffortOrder::LargestFirst,
            ..Default::default()
        },
        ..Config::default()
    };
    let lrm = Arc::new(ScriptedLrm::default());
    let e = Engine::with_parts(cfg, lrm, "http://127.0.0.1:1".into(), Parts::default())
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("best_effort_order") && e.to_string().contains("scripted"),
        "{e}"
    );
}

/// A batch system without advance reservations (Torque, this scripted one):
/// a reservation or immediate lease is refused naming the adapter, no job
/// is submitted and nothing is stored.
#[tokio::test]
async fn a_guaranteed_lease_on_a_batch_system_without_reservations_is_refused_and_nothing_stored() {
    let rig = Rig::new();
    for extra in ["start = \"+1h\"", "kind = \"immediate\""] {
        let spec = WorkspaceSpec::parse(&format!(
            "{extra}\nname = \"t\"\nduration = 600\n[[group]]\nname = \"g\"\ncount = 1\nmemory_mb = 512\nimage = \"i\"\n"
        ))
        .expect("spec");
        let r = rig.engine.create(&admin(), spec).await;
        let Err(EngineError::Refused(refusal)) = r else {
            panic!("{extra}: {r:?}");
        };
        assert!(
            refusal.to_string().contains(
                "the scripted batch system adapter cannot make advance reservations, so nothing can be guaranteed"
            ),
            "{refusal}"
        );
        assert_eq!(refusal.earliest_ms, None);
    }
    assert!(rig.engine.list(&admin()).expect("list").is_empty());
    assert!(rig.lrm.jobs.lock().expect("lock").is_empty());
}
