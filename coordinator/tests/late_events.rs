//! The acceptance rule for pilot events that arrive late (resent from a
//! pilot's durable outbox after an outage, or delivered by the next pilot or
//! kill-all): a correctly signed, new event of the slot is taken however old
//! it is, as long as it is not older than its slot; timestamps ahead of the
//! coordinator's clock, and polls, keep the `max_clock_skew_s` window.

use coordinator::config::{Config, User};
use coordinator::engine::{Caller, Engine, EngineError};
use lrm_adapters::memory::MemoryLrm;
use lrm_adapters::Capacity;
use protocol::auth::{token_hash, SlotKey};
use protocol::pilot::{EventKind, PilotEvent, PollRequest, ReleaseReason};
use protocol::spec::WorkspaceSpec;
use protocol::{now_ms, PilotId};
use std::sync::Arc;
use std::time::Duration;

const SPEC: &str = r#"name = "late"
duration = "1h"
[[group]]
name = "w"
count = 1
memory_mb = 512
cpus = 1
image = "x"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_older_than_the_skew_window_is_accepted_once_if_it_is_newer_than_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().join("data"),
        max_clock_skew_s: 1,
        users: vec![User {
            name: "alice".into(),
            token_sha256: token_hash("t"),
            admin: false,
            ..Default::default()
        }],
        ..Config::default()
    };
    let engine = Engine::new(
        cfg,
        Arc::new(MemoryLrm::new(Capacity {
            nodes: 2,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        })),
        "http://127.0.0.1:1".into(),
    )
    .unwrap();
    let alice = Caller {
        user: "alice".into(),
        admin: false,
    };
    let before_create = now_ms();
    let ws = engine
        .create(&alice, WorkspaceSpec::parse(SPEC).unwrap())
        .await
        .unwrap();
    let slot = ws.slots[0].id.clone();
    let master = std::fs::read_to_string(dir.path().join("data/master.key")).unwrap();
    let master = hex::decode(master.trim()).unwrap();
    let key = SlotKey::derive(&master, &slot).unwrap();
    let pilot = PilotId::generate();
    let event = |seq: u64, ts_ms: u64, kind: EventKind| {
        let e = PilotEvent {
            slot_id: slot.clone(),
            pilot_id: pilot.clone(),
            node: "node1".into(),
            seq,
            ts_ms,
            kind,
        };
        serde_json::to_vec(&e).unwrap()
    };
    let send = |body: &[u8]| engine.pilot_event(Some(slot.as_str()), Some(&key.sign(body)), body);

    // The pilot made its events at once, the coordinator hears them 2.5 s
    // later: more than twice its skew window.
    let started = event(
        1,
        before_create + 10,
        EventKind::Started {
            pid: 7,
            hypervisor: "sim".into(),
            job_id: None,
        },
    );
    let reserved = event(
        2,
        before_create + 20,
        EventKind::Reserved {
            dom0_before_mb: 4096,
            dom0_after_mb: 3584,
            reserved_mb: 512,
            balloon_ms: 5,
            cached_images: vec![],
            checkpoints: None,
            deadline_ms: None,
            idle: false,
            cpu_control: None,
        },
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(send(&started).unwrap().seq, 1);
    assert_eq!(send(&reserved).unwrap().seq, 2);
    let v = engine.get(&alice, &ws.id).unwrap();
    assert_eq!(v.slots[0].pilots[0].last_event, "reserved", "{v:?}");
    assert_eq!(
        serde_json::to_value(v.slots[0].state).unwrap(),
        "reserved",
        "{v:?}"
    );
    let counts = engine.row_counts().unwrap();

    // Once only: the same late event again is a replay.
    assert!(matches!(
        send(&reserved),
        Err(EngineError::Duplicate { seq: 2, .. })
    ));
    // Not older than its slot (less the skew): a signature made for this
    // slot cannot carry such a time honestly.
    let released = |ts_ms| {
        event(
            3,
            ts_ms,
            EventKind::Released {
                reason: ReleaseReason::Preempted,
                vms_destroyed: vec![],
                dom0_restored_mb: 4096,
                restore_ms: 5,
                clean: true,
                problems: vec![],
                vms_suspended: vec![],
            },
        )
    };
    match send(&released(before_create - 5_000)) {
        Err(EngineError::Forbidden(m)) => assert!(m.contains("before slot"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Not from the future.
    match send(&released(now_ms() + 5_000)) {
        Err(EngineError::Forbidden(m)) => assert!(m.contains("ahead of"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        engine.row_counts().unwrap(),
        counts,
        "refusals stored nothing"
    );
    // A poll is live: it keeps the window both ways.
    let poll = serde_json::to_vec(&PollRequest {
        slot_id: slot.clone(),
        pilot_id: pilot.clone(),
        node: "node1".into(),
        after: 0,
        wait_ms: 0,
        ts_ms: now_ms() - 2_000,
    })
    .unwrap();
    match engine
        .pilot_poll(Some(slot.as_str()), Some(&key.sign(&poll)), &poll)
        .await
    {
        Err(EngineError::Forbidden(m)) => assert!(m.contains("behind"), "{m}"),
        other => panic!("{:?}", other.map(|a| a.0)),
    }
    // The late report of the end is taken too.
    assert_eq!(send(&released(before_create + 30)).unwrap().seq, 3);
}
