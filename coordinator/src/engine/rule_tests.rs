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
}

fn admin() -> Caller {
    Caller {
        user: "tester".into(),
        admin: true,
    }
}

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>, lrm: &Arc<ScriptedLrm>) -> Arc<Engine> {
    let cfg = Config {
        data_dir: dir.join("data"),
        pilot_silence_s: 90,
        checkpoint_dir: Some(dir.join("store")),
        ..Config::default()
    };
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
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(T0));
        let lrm = Arc::new(ScriptedLrm::default());
        let engine = open(dir.path(), &clock, &lrm);
        Rig {
            dir,
            clock,
            lrm,
            engine,
            pilots: Mutex::new(HashMap::new()),
            last: Mutex::new(None),
        }
    }

    /// Stops this engine and opens a new one on the same database, as a
    /// coordinator restarted by its admin would.
    fn restart(&mut self) {
        self.engine = open(self.dir.path(), &self.clock, &self.lrm);
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
            ts_ms: self.clock.now_ms(),
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

#[tokio::test]
async fn a_job_that_ends_before_its_pilots_release_fails_the_lease_and_names_the_nodes() {
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
    assert_eq!(v.state, WorkspaceState::Failed);
    assert!(
        v.reason
            .as_deref()
            .unwrap_or("")
            .contains(&format!("batch job {job} ended")),
        "{v:?}"
    );
    assert_eq!(v.slots[0].state, SlotState::Failed);
    assert!(v.settled, "nothing is owed to a job that ended: {v:?}");
    let page = rig
        .engine
        .events(&admin(), &ws.id, 0, Duration::ZERO)
        .await
        .expect("events");
    let note = page
        .events
        .iter()
        .find(|e| e.phase == Phase::SlotReleased)
        .expect("the slot's end is on the timeline");
    assert!(
        note.detail.contains("node1, node2") && note.detail.contains("kill-all"),
        "{note:?}"
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
