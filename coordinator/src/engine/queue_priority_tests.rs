//! `[urgency] batch_priority` in process (engine::order): what the engine
//! asks of the batch system for an urgent lease's pilot job, what the
//! lease's timeline says of it, a refusal that leaves the lease waiting
//! (not failed), and a mode the batch system cannot do refused at start.

use super::*;
use crate::config::User;
use lrm_adapters::{BatchPriority, Standing};

fn with_mode(cfg: &mut Config, mode: BatchPriority) {
    cfg.urgency.batch_priority = mode;
    cfg.users = vec![User {
        name: "tester".into(),
        token_sha256: "0".repeat(64),
        admin: true,
        max_vms: None,
        max_memory_mb: None,
        max_lease_s: None,
        max_workspaces: None,
        max_urgency: 2,
    }];
}

async fn urgent_lease(rig: &Rig, urgency: u8) -> WorkspaceView {
    let spec = format!(
        "name = \"u\"\nduration = 600\nurgency = {urgency}\n[[group]]\nname = \"g\"\ncount = 1\nmemory_mb = 512\nimage = \"i\"\n"
    );
    let spec = WorkspaceSpec::parse(&spec).expect("spec");
    rig.engine.create(&admin(), spec).await.expect("created")
}

#[tokio::test]
async fn an_urgent_pilot_job_is_asked_ahead_and_its_timeline_says_how() {
    let rig = Rig::with(|c| with_mode(c, BatchPriority::Own));
    let be = rig.lease(1, 600).await;
    let u = urgent_lease(&rig, 1).await;
    let standings = rig.lrm.standings.lock().expect("lock").clone();
    assert_eq!(
        standings,
        vec![
            (Standing::BestEffort { size: None }, BatchPriority::Own),
            (Standing::Urgent { urgency: 1 }, BatchPriority::Own),
        ]
    );
    let lines = details(&rig, &u).await;
    assert!(
        lines.iter().any(|(p, d)| *p == Phase::SlotSubmitted
            && d == "urgency 1: asked the scripted batch system to run pilot job 2 first: scripted top 2"),
        "{lines:?}"
    );
    let be_lines = details(&rig, &be).await;
    assert!(
        !be_lines.iter().any(|(_, d)| d.contains("asked")),
        "nothing asked for the best-effort job here: {be_lines:?}"
    );
}

#[tokio::test]
async fn a_refused_priority_is_a_timeline_line_and_the_lease_still_waits_for_its_job() {
    let rig = Rig::with(|c| with_mode(c, BatchPriority::Operator));
    rig.lrm
        .refuse_priority
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let u = urgent_lease(&rig, 2).await;
    let lines = details(&rig, &u).await;
    assert!(
        lines.iter().any(|(_, d)| d.contains("refused that (scripted top: Access/permission denied): pilot job 1 waits in the order it was submitted (urgency.batch_priority = \"operator\")")),
        "{lines:?}"
    );
    let v = rig.view(&u.id);
    assert_eq!(v.state, WorkspaceState::Pending, "{v:?}");
    assert_eq!(
        rig.lrm.state("1"),
        Some(JobState::Queued),
        "the job is queued"
    );
}

#[tokio::test]
async fn with_off_nothing_is_asked() {
    let rig = Rig::with(|c| with_mode(c, BatchPriority::Off));
    let u = urgent_lease(&rig, 1).await;
    let lines = details(&rig, &u).await;
    assert!(!lines.iter().any(|(_, d)| d.contains("asked")), "{lines:?}");
}

#[test]
fn a_mode_the_batch_system_cannot_do_is_refused_at_start() {
    for mode in [BatchPriority::Own, BatchPriority::Operator] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        cfg.urgency.batch_priority = mode;
        let lrm = Arc::new(lrm_adapters::memory::MemoryLrm::new(Capacity {
            nodes: 1,
            cores_per_node: 1,
            memory_mb_per_node: 4096,
        }));
        let e = Engine::with_parts(cfg, lrm, "http://127.0.0.1:1".into(), Parts::default())
            .err()
            .expect("refused");
        let e = e.to_string();
        assert!(
            e.contains(&format!("urgency.batch_priority = \"{}\"", mode.as_str()))
                && e.contains("cannot order its queue for urgent leases")
                && e.contains("leave it \"off\""),
            "{e}"
        );
    }
}
