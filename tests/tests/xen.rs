//! The core demo scenario with `hypervisor = "xen"`: the real coordinator,
//! the local batch system, real pilots driving the real `xen` driver, one
//! xenstored stand-in (and the fake `xl`) per node, real kill-all.
//! Lease 1: create an ensemble, run it, destroy it. Lease 2: create one and
//! have the head's pilot preempted (SIGTERM). Every node ends as it began.

#[path = "../../xen-standin/src/harness.rs"]
mod harness;

use harness::Standin;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

/// One stand-in per node; the pilots' node config is `<dir>/%n/node.toml`.
struct XenNodes {
    dir: tempfile::TempDir,
    nodes: Vec<(String, Standin)>,
}

impl XenNodes {
    fn start(n: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wsp-e2e-xen-")
            .tempdir()
            .unwrap();
        let nodes = (1..=n)
            .map(|i| {
                let name = format!("node{i}");
                let s = Standin::start(&dir.path().join(&name), &["--total-mb", "4096"]);
                for img in ["worker.qcow2", "head.qcow2"] {
                    std::fs::write(s.image_dir.join(img), b"disk").unwrap();
                }
                // The absolute fake xl: the pilots inherit the coordinator's PATH.
                s.write_node_config(&format!("xl = \"{}\"", s.bin_dir.join("xl").display()));
                (name, s)
            })
            .collect();
        Self { dir, nodes }
    }

    fn pattern(&self) -> String {
        format!("{}/%n/node.toml", self.dir.path().display())
    }

    fn node(&self, name: &str) -> &Standin {
        &self.nodes.iter().find(|(n, _)| n == name).expect("node").1
    }

    fn assert_restored(&self) {
        for (name, s) in &self.nodes {
            assert_eq!(
                s.dom0(),
                (4096, 4096),
                "{name}: dom0 back to all its memory"
            );
            assert!(
                s.guests().is_empty(),
                "{name}: no guest left: {:?}",
                s.guests()
            );
        }
    }
}

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn slot_of(view: &Value, group: &str) -> String {
    let s = view["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["group"] == group)
        .expect("slot of group");
    s["id"].as_str().unwrap().to_string()
}

fn node_of_group(view: &Value, group: &str) -> String {
    view["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["group"] == group)
        .unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string()
}

fn cluster(x: &XenNodes, grace: u64) -> Cluster {
    Cluster::start(Options {
        kill_grace_s: grace,
        hypervisor: "xen".into(),
        node_config: Some(x.pattern()),
        ..Options::default()
    })
}

fn kill_all_reports_nothing_to_do(x: &XenNodes, c: &Cluster, node: &str) {
    let out = Command::new(bin("workspace-kill-all"))
        .arg("--state-dir")
        .arg(c.state_dir(node))
        .args(["--hypervisor", "xen", "--node", node])
        .arg("--node-config")
        .arg(x.node(node).dir.join("node.toml"))
        .output()
        .expect("run kill-all");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("nothing to do"), "{text}");
}

#[test]
fn demo_scenario_on_xen_runs_destroys_and_preempts_with_every_node_restored() {
    let x = XenNodes::start(4);
    let c = cluster(&x, 4);
    // Lease 1: run, then destroy.
    let t = Instant::now();
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let run_ms = t.elapsed().as_millis();
    let vms = v["vms"].as_array().unwrap();
    let nodes: HashSet<&str> = vms.iter().map(|vm| vm["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 4, "one VM per node: {v:#}");
    for vm in vms {
        let s = x.node(vm["node"].as_str().unwrap());
        assert_eq!(s.guests(), vec![vm["name"].as_str().unwrap().to_string()]);
        let mem = vm["memory_mb"].as_u64().unwrap();
        assert_eq!(
            s.dom0(),
            (4096 - mem, 4096 - mem),
            "dom0 ballooned by the VM's memory"
        );
        let cfg = std::fs::read_to_string(
            s.run_dir
                .join(format!("{}.cfg", vm["name"].as_str().unwrap())),
        )
        .unwrap();
        assert!(cfg.contains(&format!("memory = {mem}")), "{cfg}");
    }
    let t = Instant::now();
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_settled(&id);
    let destroy_ms = t.elapsed().as_millis();
    assert_eq!(v["state"], "destroyed", "{v:#}");
    x.assert_restored();

    // Lease 2: run, then the batch system preempts the head's pilot.
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let node = node_of_group(&v, "head");
    let pid = c.pilot_pid_on(&slot_of(&v, "head"), &node);
    let t = Instant::now();
    signal(pid, Signal::SIGTERM);
    let gone = wait_gone(pid, Duration::from_secs(6)).expect("pilot exits");
    assert!(
        gone < Duration::from_secs(4),
        "pilot took {gone:?}, longer than the grace period"
    );
    assert_eq!(
        x.node(&node).dom0(),
        (4096, 4096),
        "the head's node is clean once its pilot is gone"
    );
    assert!(x.node(&node).guests().is_empty());
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    let preempt_ms = t.elapsed().as_millis();
    x.assert_restored();
    assert!(c.pilot_pids(None).is_empty(), "every pilot exited");
    kill_all_reports_nothing_to_do(&x, &c, &node);
    eprintln!("xen demo: lease running after {run_ms} ms, destroyed in {destroy_ms} ms, preempted lease settled in {preempt_ms} ms");
}

#[test]
fn kill_all_on_xen_cleans_a_node_whose_pilot_was_sigkilled() {
    let x = XenNodes::start(4);
    let c = cluster(&x, 2);
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let node = node_of_group(&v, "head");
    let pid = c.pilot_pid_on(&slot_of(&v, "head"), &node);
    signal(pid, Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(5)).expect("pilot dies");
    let s = x.node(&node);
    assert_eq!(s.guests().len(), 1, "a SIGKILLed pilot leaves its VM");
    let out = Command::new(bin("workspace-kill-all"))
        .arg("--state-dir")
        .arg(c.state_dir(&node))
        .args(["--hypervisor", "xen", "--node", &node, "--json"])
        .arg("--node-config")
        .arg(s.dir.join("node.toml"))
        .output()
        .expect("run kill-all");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(s.guests().is_empty());
    assert_eq!(s.dom0(), (4096, 4096));
    let _ = c.destroy_as(TOKEN, &id);
    c.wait_settled(&id);
    x.assert_restored();
}
