//! Suspend and resume on the xen stand-in (issue 16): the real coordinator,
//! the local batch system, real pilots driving the real `xen` driver over a
//! xenstored stand-in and the fake `xl` per node, one checkpoint store. A
//! preempted pilot's guest is saved with `xl save`, the other member with
//! `suspend_vm`; both are restored with `xl restore` in new slots; every
//! node ends as it began.

#[path = "../../xen-standin/src/harness.rs"]
mod harness;

use harness::Standin;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;
use wsp_e2e::*;

const PAIR: &str = r#"
name = "pair"
duration = "1h"
[[group]]
name = "head"
count = 1
memory_mb = 512
image = "head.qcow2"
[[group]]
name = "worker"
count = 1
memory_mb = 512
image = "worker.qcow2"
"#;

#[test]
fn a_preempted_xen_ensemble_is_saved_with_xl_and_restored_in_new_slots() {
    let dir = tempfile::Builder::new()
        .prefix("wsp-e2e-xensus-")
        .tempdir()
        .expect("dir");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("store");
    let nodes: Vec<(String, Standin)> = (1..=4)
        .map(|i| {
            let name = format!("node{i}");
            let s = Standin::start(&dir.path().join(&name), &["--total-mb", "4096"]);
            for img in ["worker.qcow2", "head.qcow2"] {
                std::fs::write(s.image_dir.join(img), b"disk").expect("image");
            }
            s.write_node_config(&format!(
                "xl = \"{}\"\n[checkpoints]\ndir = \"{}\"\nsave_mb_per_s = 500",
                s.bin_dir.join("xl").display(),
                store.display()
            ));
            (name, s)
        })
        .collect();
    let node = |n: &str| &nodes.iter().find(|(m, _)| m == n).expect("node").1;
    let c = Cluster::start(
        Options {
            kill_grace_s: 8,
            hypervisor: "xen".into(),
            node_config: Some(format!("{}/%n/node.toml", dir.path().display())),
            ..Options::default()
        }
        .with_top(&format!("checkpoint_dir = \"{}\"\n", store.display())),
    );
    let r = c.create(PAIR);
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let v = c.wait_running(&id);
    let vm_of = |v: &Value, g: &str| {
        v["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .find(|vm| vm["group"] == g)
            .expect("vm")
            .clone()
    };
    let head = vm_of(&v, "head");
    let pid = c.pilot_pid_on(
        head["slot_id"].as_str().expect("slot"),
        head["node"].as_str().expect("node"),
    );
    signal(pid, Signal::SIGTERM);
    let v = c.wait_for(&id, "running again", Duration::from_secs(60), |v| {
        v["state"] == "running" && v["slots"].as_array().is_some_and(|s| s.len() == 4)
    });
    for g in ["head", "worker"] {
        let vm = vm_of(&v, g);
        let n = node(vm["node"].as_str().expect("node"));
        assert!(
            n.guests()
                .contains(&vm["name"].as_str().expect("name").to_string()),
            "{g} runs on its new node: {vm}"
        );
        assert_eq!(vm["placements"].as_array().map(Vec::len), Some(2), "{vm}");
    }
    // The checkpoints resumed from are deleted by the pilots holding the VMs.
    c.wait_for(&id, "checkpoints deleted", Duration::from_secs(20), |_| {
        c.timeline(&id)
            .iter()
            .filter(|e| e["phase"] == "checkpoint_deleted")
            .count()
            == 2
    });
    let phases: Vec<String> = c
        .timeline(&id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap_or_default().to_string())
        .collect();
    for (p, n) in [("vm_suspended", 2), ("vm_resumed", 2), ("suspended", 1)] {
        assert_eq!(
            phases.iter().filter(|x| *x == p).count(),
            n,
            "{p}: {phases:?}"
        );
    }
    c.destroy_as(TOKEN, &id);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed");
    for (name, s) in &nodes {
        assert_eq!(
            s.dom0(),
            (4096, 4096),
            "{name}: dom0 back to all its memory"
        );
        assert!(s.guests().is_empty(), "{name}: no guest left");
    }
    let ws_dir = store.join(&id);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !ws_dir.exists()
    });
    assert!(gone, "checkpoints removed with the lease");
}
