//! Suspend and resume end to end (issue 16): a real coordinator, the local
//! batch system, real pilots on simulated nodes with a checkpoint store.
//! The batch system's warning suspends the whole ensemble and the
//! coordinator resumes it in new slots; a client suspends and resumes by
//! the CLI. The sim guest's boot id survives a save and a restore, and is
//! new after a reboot: the same guest runs on.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use wsp_e2e::*;

const PAIR: &str = r#"
name = "pair"
duration = 3600
[[group]]
name = "head"
count = 1
memory_mb = 512
image = "debian-12"
[[group]]
name = "worker"
count = 1
memory_mb = 512
image = "debian-12"
"#;

/// A cluster whose nodes share a checkpoint store, which the coordinator
/// mounts too (so it removes the checkpoints of leases that ended).
fn cluster_with_store() -> (Cluster, tempfile::TempDir) {
    let store = tempfile::Builder::new()
        .prefix("wsp-store-")
        .tempdir()
        .expect("store");
    let node_cfg = store.path().join("node.toml");
    let ckdir = store.path().join("checkpoints");
    std::fs::create_dir_all(&ckdir).expect("checkpoint dir");
    std::fs::write(
        &node_cfg,
        format!(
            "[checkpoints]\ndir = \"{}\"\nsave_mb_per_s = 500\n",
            ckdir.display()
        ),
    )
    .expect("node config");
    let c = Cluster::start(
        Options {
            kill_grace_s: 8,
            node_config: Some(node_cfg.display().to_string()),
            ..Options::default()
        }
        .with_top(&format!("checkpoint_dir = \"{}\"\n", ckdir.display())),
    );
    (c, store)
}

/// Boot ids of the workspace's guests, by VM id, read from their nodes.
fn boot_ids(c: &Cluster, v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for vm in v["vms"].as_array().expect("vms") {
        let node = vm["node"].as_str().expect("node");
        let n = c.node(node);
        let d = n["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .find(|d| d["name"] == vm["name"])
            .unwrap_or_else(|| panic!("{} not on {node}: {n:#}", vm["name"]));
        out.push((
            vm["id"].as_str().expect("id").to_string(),
            d["boot_id"].as_str().expect("boot id").to_string(),
        ));
    }
    out.sort();
    out
}

fn phases(c: &Cluster, id: &str) -> Vec<String> {
    c.timeline(id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn workspace(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("workspace"))
        .args(args)
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", TOKEN)
        .output()
        .expect("run workspace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_preempted_ensemble_is_suspended_whole_and_resumed_in_new_slots_as_the_same_guests() {
    let (c, store) = cluster_with_store();
    let r = c.create(PAIR);
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let v = c.wait_running(&id);
    let before = boot_ids(&c, &v);
    let slots_before: Vec<String> = v["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    // The batch system takes the head's node back: its pilot gets SIGTERM.
    let head = v["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|vm| vm["group"] == "head")
        .expect("head")
        .clone();
    let pid = c.pilot_pid_on(
        head["slot_id"].as_str().expect("slot"),
        head["node"].as_str().expect("node"),
    );
    signal(pid, Signal::SIGTERM);
    let v = c.wait_for(&id, "running again", Duration::from_secs(60), |v| {
        v["state"] == "running"
            && v["slots"].as_array().is_some_and(|s| s.len() == 4)
            && v["vms"]
                .as_array()
                .is_some_and(|vms| vms.iter().all(|vm| vm["state"] == "running"))
    });
    let after = boot_ids(&c, &v);
    assert_eq!(before, after, "the same guests run on, not rebooted ones");
    for vm in v["vms"].as_array().expect("vms") {
        let slot = vm["slot_id"].as_str().expect("slot");
        assert!(!slots_before.iter().any(|s| s == slot), "a new slot: {vm}");
        assert_eq!(vm["placements"].as_array().map(Vec::len), Some(2), "{vm}");
    }
    let p = phases(&c, &id);
    for ph in [
        "preempting",
        "suspending",
        "vm_suspended",
        "suspended",
        "resuming",
        "vm_resumed",
    ] {
        assert!(p.iter().any(|x| x == ph), "{ph} missing from {p:?}");
    }
    // Every old slot is given back, and the lease still has its hour.
    let left =
        v["expires_ms"].as_u64().expect("lease end") as i64 - protocol::time::now_ms() as i64;
    assert!(
        left > 3_500_000,
        "suspended time is not charged: {left} ms left"
    );
    c.destroy_as(TOKEN, &id);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed");
    c.assert_nodes_restored();
    let ws_dir = store.path().join("checkpoints").join(&id);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !ws_dir.exists()
    });
    assert!(
        gone,
        "checkpoints of an ended lease are removed: {ws_dir:?}"
    );
}

#[test]
fn a_client_suspends_and_resumes_with_the_cli_and_status_shows_bytes_and_times() {
    let (c, _store) = cluster_with_store();
    let r = c.create(PAIR);
    let id = r.body["id"].as_str().expect("id").to_string();
    let v = c.wait_running(&id);
    let before = boot_ids(&c, &v);

    let (code, out, err) = workspace(&c, &["suspend", &id, "--wait", "--timeout", "60"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("suspended"), "{out}");
    let v = c.wait_settled_slots(&id);
    assert_eq!(v["state"], "suspended");
    assert!(v["expires_ms"].is_null(), "the lease clock is stopped");
    c.assert_nodes_restored();
    assert!(
        c.pilot_pids(None).is_empty(),
        "a suspended lease holds no node"
    );

    let (code, out, _) = workspace(&c, &["status", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("suspend and resume"), "{out}");
    assert!(out.contains("vm_suspended") && out.contains(" ms"), "{out}");

    // Twice is refused, with the reason.
    let (code, _, err) = workspace(&c, &["suspend", &id]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only a running workspace"), "{err}");

    let (code, out, err) = workspace(&c, &["resume", &id, "--wait", "--timeout", "60"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let v = c.get(&id);
    assert_eq!(v["state"], "running");
    assert_eq!(before, boot_ids(&c, &v), "the same guests");
    c.destroy_as(TOKEN, &id);
    c.wait_settled(&id);
    c.assert_nodes_restored();
}

trait SettledSlots {
    fn wait_settled_slots(&self, id: &str) -> Value;
}

impl SettledSlots for Cluster {
    /// Waits until every slot of the workspace is given back.
    fn wait_settled_slots(&self, id: &str) -> Value {
        self.wait_for(id, "without slots", Duration::from_secs(30), |v| {
            v["slots"].as_array().is_some_and(|s| {
                s.iter()
                    .all(|s| s["state"] == "released" || s["state"] == "failed")
            })
        })
    }
}
