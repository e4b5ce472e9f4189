//! `workspace-kill-all` delivers the events departed pilots left in the
//! node's outbox: the real binary, letters written by the pilot's own
//! notifier and outbox (as `workspace-pilot run` writes them when its
//! coordinator is down), and the fake coordinator of the pilot's tests.

#[path = "../../pilot/tests/common/mod.rs"]
mod common;

use common::Coord;
use pilot::hypervisor::sim::{Sim, SimNode};
use pilot::notify::{Notifier, NotifyError};
use pilot::outbox::{outbox_dir, Outbox};
use protocol::auth::SlotKey;
use protocol::pilot::{EventKind, ReleaseReason};
use protocol::{PilotId, SlotId};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

const KILL_ALL: &str = env!("CARGO_BIN_EXE_workspace-kill-all");

/// A pilot of `slot` that made `kinds` of events while its coordinator was
/// down, and exited; returns its id. The key file is removed afterwards.
async fn departed_pilot(url: &str, key_file: &Path, slot: &SlotId, state_dir: &Path) -> PilotId {
    let text = std::fs::read_to_string(key_file).unwrap();
    let key = SlotKey::from_hex("key", &text).unwrap();
    let id = PilotId::generate();
    let outbox = Outbox::open(&outbox_dir(state_dir), &id).unwrap();
    let mut n = Notifier::new(
        url,
        key,
        slot.clone(),
        id.clone(),
        "n1".into(),
        Duration::from_millis(300),
        None,
    )
    .unwrap()
    .with_outbox(outbox);
    n.push(EventKind::Started {
        pid: 1,
        hypervisor: "sim".into(),
        job_id: None,
    })
    .unwrap();
    n.push(EventKind::Preempting {
        signal: "SIGTERM".into(),
        coordinator_wait_ms: 0,
        cleanup_deadline_ms: 0,
        suspending: vec![],
        not_suspending: None,
    })
    .unwrap();
    n.push(EventKind::Released {
        reason: ReleaseReason::Preempted,
        vms_destroyed: vec![],
        dom0_restored_mb: 4096,
        restore_ms: 3,
        clean: true,
        problems: vec![],
        vms_suspended: vec![],
    })
    .unwrap();
    let r = n
        .flush_unless_down(tokio::time::Instant::now() + Duration::from_secs(2))
        .await;
    assert!(matches!(r, Err(NotifyError::Down { .. })), "{r:?}");
    drop(n);
    std::fs::remove_file(key_file).unwrap();
    id
}

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    sim_dir: PathBuf,
    state_dir: PathBuf,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let sim_dir = root.join("sim");
        Sim::init(&sim_dir, &SimNode::new(4096, 2, None), false).unwrap();
        Self {
            state_dir: root.join("state"),
            sim_dir,
            root,
            _tmp: tmp,
        }
    }

    async fn kill_all(&self, extra: &[&str]) -> (i32, serde_json::Value) {
        let out = tokio::process::Command::new(KILL_ALL)
            .args(["--hypervisor", "sim", "--node", "n1", "--json"])
            .arg("--sim-dir")
            .arg(&self.sim_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--deliver-timeout-s", "5"])
            .args(extra)
            .output()
            .await
            .unwrap();
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "report is not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), report)
    }

    fn letters(&self) -> usize {
        std::fs::read_dir(outbox_dir(&self.state_dir))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0)
    }
}

fn results(report: &serde_json::Value) -> Vec<(String, u64, String)> {
    report["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["seq"].as_u64().unwrap(),
                d["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_all_delivers_what_departed_pilots_left_in_order_and_keeps_what_it_cannot() {
    let node = Node::new();
    let key1 = node.root.join("slot1.key");
    let key2 = node.root.join("slot2.key");
    let (coord, url) = Coord::start(&key1).await;
    let slot1 = coord.slot.clone();
    let slot2 = coord.add_slot(&key2);
    coord.go_down().await;
    let first = departed_pilot(&url, &key1, &slot1, &node.state_dir).await;
    let second = departed_pilot(&url, &key2, &slot2, &node.state_dir).await;
    assert_eq!(node.letters(), 6);

    // The coordinator is still down: the node is fine, the reports are kept.
    let (code, report) = node.kill_all(&[]).await;
    assert_eq!(code, 3, "{report:#}");
    assert!(report["ok"].as_bool().unwrap());
    let r = results(&report);
    assert_eq!(r.len(), 6, "{report:#}");
    assert!(r.iter().all(|(_, _, result)| result == "kept"), "{r:?}");
    let error = report["deliveries"][0]["error"].as_str().unwrap();
    assert!(error.contains("refused"), "{error}");
    assert_eq!(node.letters(), 6);

    // A dry run says what it would send and sends nothing.
    coord.come_back();
    let (code, report) = node.kill_all(&["--dry-run"]).await;
    assert_eq!(code, 0, "{report:#}");
    assert!(results(&report).iter().all(|(_, _, res)| res == "planned"));
    assert!(coord.events().is_empty());

    // One slot only, then the rest; each pilot's events in order, as made.
    let (code, report) = node.kill_all(&["--slot", slot1.as_str()]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        results(&report),
        vec![
            ("started".to_string(), 1, "delivered".to_string()),
            ("preempting".to_string(), 2, "delivered".to_string()),
            ("released".to_string(), 3, "delivered".to_string()),
        ]
    );
    assert_eq!(node.letters(), 3);
    let (code, report) = node.kill_all(&[]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(results(&report).len(), 3);
    for pilot in [&first, &second] {
        let events = coord.events_of(pilot);
        let kinds: Vec<_> = events.iter().map(|e| e.kind.name()).collect();
        assert_eq!(kinds, vec!["started", "preempting", "released"]);
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }
    assert_eq!(coord.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(coord.out_of_order.load(Ordering::SeqCst), 0);
    assert_eq!(node.letters(), 0);
    let left: Vec<_> = std::fs::read_dir(outbox_dir(&node.state_dir))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "lock files go with the last letter: {left:?}"
    );

    // Nothing left: nothing to do.
    let (code, report) = node.kill_all(&[]).await;
    assert_eq!(code, 0);
    assert!(results(&report).is_empty());
    assert!(report["actions"].as_array().unwrap().is_empty());
}
