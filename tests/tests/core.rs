//! The core slice end to end: real coordinator, local batch system, real
//! pilots on simulated nodes, real kill-all.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn slot_of(view: &Value, group: &str) -> (String, String) {
    let s = view["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["group"] == group)
        .expect("slot of group");
    (
        s["id"].as_str().unwrap().to_string(),
        s["job_id"].as_str().unwrap_or_default().to_string(),
    )
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

#[test]
fn ensemble_runs_on_distinct_nodes_and_destroy_restores_every_node() {
    let c = Cluster::start(Options::default());
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4);
    let nodes: HashSet<&str> = vms.iter().map(|vm| vm["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 4, "one VM per node: {v:#}");
    for vm in vms {
        assert_eq!(vm["state"], "running");
        assert!(vm["job_id"].is_string(), "VM shows its batch job: {vm}");
        assert!(vm["name"].as_str().unwrap().starts_with("wsp-sl-"));
    }
    // Each node really runs its VM, with dom0 ballooned down by the VM's memory.
    for vm in vms {
        let n = c.node(vm["node"].as_str().unwrap());
        let doms = n["domains"].as_array().unwrap();
        assert_eq!(doms.len(), 1);
        assert_eq!(doms[0]["name"], vm["name"]);
        assert_eq!(
            n["dom0"]["current_mb"].as_u64().unwrap(),
            4096 - vm["memory_mb"].as_u64().unwrap()
        );
    }
    let r = c.destroy_as(TOKEN, &id);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed");
    for s in v["slots"].as_array().unwrap() {
        assert_eq!(s["state"], "released", "{s}");
    }
    c.assert_nodes_restored();
    c.assert_pilots_exited();
    // The timeline shows every phase of the lease.
    let phases: Vec<String> = c
        .timeline(&id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap().to_string())
        .collect();
    for p in [
        "requested",
        "slot_submitted",
        "pilot_started",
        "memory_reserved",
        "vm_start_sent",
        "vm_started",
        "running",
        "destroy_requested",
        "memory_restored",
        "slot_released",
        "ended",
    ] {
        assert!(
            phases.iter().any(|x| x == p),
            "phase {p} missing from {phases:?}"
        );
    }
}

#[test]
fn sigterm_to_a_pilot_preempts_the_workspace_and_restores_memory_before_grace_ends() {
    let grace = 4;
    let c = Cluster::start(Options {
        kill_grace_s: grace,
        ..Options::default()
    });
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let (slot, _) = slot_of(&v, "head");
    let node = node_of_group(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    let t = Instant::now();
    signal(pid, Signal::SIGTERM);
    let gone = wait_gone(pid, Duration::from_secs(grace + 2)).expect("pilot exits");
    assert!(
        gone < Duration::from_secs(grace),
        "pilot took {gone:?}, longer than the {grace} s grace period"
    );
    // Its node is clean as soon as it is gone.
    let n = c.node(&node);
    assert_eq!(n["dom0"]["current_mb"], n["dom0"]["max_mb"], "{n:#}");
    assert_eq!(n["domains"].as_array().unwrap().len(), 0);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    assert!(v["reason"].as_str().unwrap().contains("SIGTERM"), "{v:#}");
    for vm in v["vms"].as_array().unwrap() {
        assert!(
            vm["state"] == "preempted" || vm["state"] == "destroyed",
            "{vm}"
        );
    }
    c.assert_nodes_restored();
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn walltime_expiry_ends_the_lease_with_every_node_restored() {
    // The queue allows 3 s: the batch system's SIGTERM comes long before the lease ends.
    let c = Cluster::start(Options {
        max_walltime_s: Some(3),
        kill_grace_s: 3,
        ..Options::default()
    });
    let id = ws_id(&c.create(ENSEMBLE));
    c.wait_running(&id);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    c.assert_nodes_restored();
    c.assert_pilots_exited();
}

#[test]
fn lease_duration_over_releases_every_slot() {
    let c = Cluster::start(Options::default());
    let id = ws_id(&c.create(&ENSEMBLE.replace("\"2h\"", "2")));
    c.wait_running(&id);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "expired", "{v:#}");
    c.assert_nodes_restored();
}

#[test]
fn preempted_pilot_cleans_up_in_time_while_the_coordinator_is_unreachable() {
    let grace = 4;
    // The pilot's `released` stays in its outbox (the coordinator was frozen
    // until it exited): the slot waits report_wait_s for it, then names the node.
    let c = Cluster::start(Options {
        kill_grace_s: grace,
        report_wait_s: 3,
        ..Options::default()
    });
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let (slot, _) = slot_of(&v, "head");
    let node = node_of_group(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    // Freeze the coordinator: connections are accepted by the kernel but never answered.
    signal(c.coordinator_pid(), Signal::SIGSTOP);
    signal(pid, Signal::SIGTERM);
    let gone = wait_gone(pid, Duration::from_secs(grace + 2));
    signal(c.coordinator_pid(), Signal::SIGCONT);
    let gone = gone.expect("pilot exits");
    assert!(
        gone < Duration::from_secs(grace),
        "pilot took {gone:?} (grace {grace} s)"
    );
    let n = c.node(&node);
    assert_eq!(n["dom0"]["current_mb"], n["dom0"]["max_mb"], "{n:#}");
    assert_eq!(n["domains"].as_array().unwrap().len(), 0, "{n:#}");
    // Once back, the coordinator ends the workspace and the other nodes too.
    let v = c.wait_settled(&id);
    assert!(v["state"] == "preempted" || v["state"] == "failed", "{v:#}");
    c.assert_nodes_restored();
}

#[test]
fn kill_all_restores_a_node_whose_pilot_was_sigkilled_and_dry_run_changes_nothing() {
    // A SIGKILLed pilot never reports: its slot waits report_wait_s, then fails.
    let c = Cluster::start(Options {
        report_wait_s: 3,
        ..Options::default()
    });
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let (slot, _) = slot_of(&v, "head");
    let node = node_of_group(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    signal(pid, Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(5)).expect("pilot killed");
    let before = std::fs::read(c.sim_dir(&node).join("node.json")).unwrap();
    let n = c.node(&node);
    assert_eq!(
        n["domains"].as_array().unwrap().len(),
        1,
        "the killed pilot left its VM: {n:#}"
    );
    assert_eq!(n["dom0"]["current_mb"].as_u64(), Some(4096 - 2048));

    let kill_all = |extra: &[&str]| {
        let out = Command::new(bin("workspace-kill-all"))
            .args(["--hypervisor", "sim", "--sim-dir"])
            .arg(c.sim_dir(&node))
            .arg("--state-dir")
            .arg(c.state_dir(&node))
            .args(extra)
            .output()
            .expect("run kill-all");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = kill_all(&["--dry-run"]);
    assert_eq!(code, Some(0), "dry run: {out} {err}");
    assert_eq!(
        std::fs::read(c.sim_dir(&node).join("node.json")).unwrap(),
        before,
        "--dry-run changed the node"
    );
    let (code, out, err) = kill_all(&["--json"]);
    assert_eq!(code, Some(0), "kill-all: {out} {err}");
    let _: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let n = c.node(&node);
    assert_eq!(
        n["dom0"]["current_mb"].as_u64(),
        Some(4096),
        "memory back to the original: {n:#}"
    );
    assert_eq!(n["domains"].as_array().unwrap().len(), 0);
    // The coordinator notices through the batch system and ends the lease.
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    c.assert_nodes_restored();
}

#[test]
fn bad_requests_get_a_clear_4xx_and_change_nothing() {
    let c = Cluster::start(Options::default());
    let before = c.db_counts();
    // Too big for 4 nodes.
    let big = ENSEMBLE.replace("count = 3", "count = 4");
    let r = c.create(&big);
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("5 nodes"),
        "{}",
        r.body
    );
    // More memory than a node has.
    let r = c.create(&ENSEMBLE.replace("memory_mb = 2048", "memory_mb = 8192"));
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("head"),
        "{}",
        r.body
    );
    // Malformed specs name the field.
    let r = c.create(&ENSEMBLE.replace("count = 3", "count = -1"));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = c.create(&ENSEMBLE.replace("cpus = 2", "cpus = 0"));
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .starts_with("group[1].cpus"),
        "{}",
        r.body
    );
    let r = c.create("this is not a spec");
    assert_eq!(r.status, 400);
    // No token, a wrong token.
    assert_eq!(c.create_as("", ENSEMBLE).status, 401);
    assert_eq!(c.create_as("nope", ENSEMBLE).status, 401);
    assert_eq!(c.db_counts(), before, "refused requests stored something");
    assert!(c.pilot_pids(None).is_empty(), "no pilot job was started");
    let jobs = std::fs::read_dir(c.root().join("coordinator/jobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(jobs, 0, "no job script was written");
}

#[test]
fn forged_and_replayed_pilot_events_are_refused_and_change_nothing() {
    let c = Cluster::start(Options::default());
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let (slot, _) = slot_of(&v, "head");
    let (other_slot, _) = slot_of(&v, "worker");
    let (ev_slot, body) = c.stored_event("reserved");
    let before = c.db_counts();
    let key = c.slot_key(&ev_slot);
    let events = protocol::pilot::EVENTS_PATH;
    // Replay of a real event, correctly signed: refused as a replay.
    let r = c.pilot_post(
        events,
        Some(&ev_slot),
        Some(&key.sign(body.as_bytes())),
        body.as_bytes(),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("replayed"),
        "{}",
        r.body
    );
    // A new event with a forged signature.
    let mut forged: Value = serde_json::from_str(&body).unwrap();
    forged["seq"] = Value::from(999);
    forged["kind"] = serde_json::json!({"type": "preempting", "signal": "SIGTERM", "coordinator_wait_ms": 0, "cleanup_deadline_ms": 0});
    let forged = serde_json::to_vec(&forged).unwrap();
    let r = c.pilot_post(events, Some(&ev_slot), Some(&"00".repeat(32)), &forged);
    assert_eq!(r.status, 403, "{}", r.body);
    // Signed with another slot's key.
    let wrong = if ev_slot == slot { &other_slot } else { &slot };
    let r = c.pilot_post(
        events,
        Some(wrong),
        Some(&c.slot_key(wrong).sign(&forged)),
        &forged,
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // No signature, garbage JSON with a valid signature, stale timestamp.
    assert_eq!(
        c.pilot_post(events, Some(&ev_slot), None, &forged).status,
        403
    );
    let r = c.pilot_post(
        events,
        Some(&ev_slot),
        Some(&key.sign(b"{not json")),
        b"{not json",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let mut stale: Value = serde_json::from_slice(&forged).unwrap();
    stale["ts_ms"] = Value::from(1_000u64);
    let stale = serde_json::to_vec(&stale).unwrap();
    let r = c.pilot_post(events, Some(&ev_slot), Some(&key.sign(&stale)), &stale);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        c.db_counts(),
        before,
        "a refused pilot request changed the database"
    );
    assert_eq!(c.get(&id)["state"], "running");
    // Another user cannot see or destroy it.
    assert_eq!(c.get_as(OTHER_TOKEN, &id).status, 404);
    assert_eq!(c.destroy_as(OTHER_TOKEN, &id).status, 404);
    assert_eq!(
        c.list_as(OTHER_TOKEN).body["workspaces"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_settled(&id);
    c.assert_nodes_restored();
}

#[test]
fn a_workspace_waits_in_the_queue_and_destroy_before_it_runs_cancels_its_jobs() {
    // Two nodes only: the second ensemble-of-two must wait for the first.
    let c = Cluster::start(Options {
        nodes: 2,
        ..Options::default()
    });
    let pair = ENSEMBLE.replace("count = 3", "count = 1");
    let first = ws_id(&c.create(&pair));
    c.wait_running(&first);
    let second = ws_id(&c.create(&pair));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.get(&second)["state"], "pending");
    assert_eq!(c.destroy_as(TOKEN, &second).status, 200);
    let v = c.wait_settled(&second);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    assert_eq!(
        c.get(&first)["state"],
        "running",
        "the other lease is untouched"
    );
    assert_eq!(c.destroy_as(TOKEN, &first).status, 200);
    c.wait_settled(&first);
    c.assert_nodes_restored();
}

#[test]
fn a_pilot_that_goes_silent_fails_its_workspace_and_kill_all_restores_its_node() {
    let c = Cluster::start(
        Options {
            kill_grace_s: 1,
            extra: String::new(),
            ..Options::default()
        }
        .with_top("pilot_silence_s = 7\n"),
    );
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let (slot, _) = slot_of(&v, "head");
    let node = node_of_group(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    // Frozen: alive for the batch system, silent for the coordinator.
    signal(pid, Signal::SIGSTOP);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert!(v["reason"].as_str().unwrap().contains("silent"), "{v:#}");
    let phases: Vec<String> = c
        .timeline(&id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap().to_string())
        .collect();
    assert!(phases.iter().any(|p| p == "pilot_lost"), "{phases:?}");
    // The job was cancelled: the frozen pilot got SIGKILL after the grace period.
    wait_gone(pid, Duration::from_secs(10)).expect("the lost pilot's job is cancelled");
    // The admin names only the node's state dir: the pilots recorded which
    // hypervisor and which simulated node they used.
    let out = Command::new(bin("workspace-kill-all"))
        .arg("--state-dir")
        .arg(c.state_dir(&node))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_nodes_restored();
}

#[test]
fn an_admin_sees_every_users_workspaces_and_users_see_only_their_own() {
    let c = Cluster::start(Options::default());
    let pair = ENSEMBLE.replace("count = 3", "count = 1");
    let a = ws_id(&c.create_as(TOKEN, &pair));
    let b = ws_id(&c.create_as(OTHER_TOKEN, &pair));
    let ids = |token: &str| -> Vec<String> {
        let r = c.list_as(token);
        assert_eq!(r.status, 200);
        r.body["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(TOKEN), vec![a.clone()]);
    assert_eq!(ids(OTHER_TOKEN), vec![b.clone()]);
    let mut all = ids(ADMIN_TOKEN);
    all.sort();
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(all, both);
    assert_eq!(
        c.get_as(TOKEN, &b).status,
        404,
        "alice cannot see bob's workspace"
    );
    assert_eq!(c.get_as(ADMIN_TOKEN, &a).status, 200);
    // The admin may end anyone's lease.
    assert_eq!(c.destroy_as(ADMIN_TOKEN, &b).status, 200);
    assert_eq!(c.destroy_as(TOKEN, &a).status, 200);
    c.wait_settled(&a);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.get_as(ADMIN_TOKEN, &b).body["settled"] != true {
        assert!(Instant::now() < deadline, "bob's workspace did not settle");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.assert_nodes_restored();
}

#[test]
fn no_secret_is_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start(Options::default());
    let id = ws_id(&c.create(ENSEMBLE));
    let v = c.wait_running(&id);
    let data = c.root().join("coordinator");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("keys")), 0o700, "keys dir");
    assert_eq!(mode(&data.join("master.key")), 0o600, "master key");
    let mut keys = Vec::new();
    for e in std::fs::read_dir(data.join("keys")).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        keys.push(std::fs::read_to_string(&p).unwrap().trim().to_string());
    }
    assert!(!keys.is_empty());
    // Job scripts name the key file but never contain a key.
    for slot in v["slots"].as_array().unwrap() {
        let dir = data.join("jobs").join(slot["id"].as_str().unwrap());
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            for k in &keys {
                assert!(
                    !text.contains(k.as_str()),
                    "{} contains a slot key",
                    p.display()
                );
            }
        }
    }
    // Pilots' node state files are private too.
    for n in &c.nodes {
        for e in std::fs::read_dir(c.state_dir(n)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
        }
    }
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_settled(&id);
}

#[test]
fn coordinator_sigterm_with_end_leases_on_exit_gives_every_node_back_before_exiting() {
    let mut c = Cluster::start(Options {
        serve_args: vec!["--end-leases-on-exit".into()],
        ..Options::default()
    });
    let id = ws_id(&c.create(ENSEMBLE));
    c.wait_running(&id);
    let code = c.terminate_coordinator(Duration::from_secs(30));
    assert_eq!(code, Some(0), "coordinator log:\n{}", c.log());
    c.assert_nodes_restored();
    c.assert_pilots_exited();
    let db = rusqlite::Connection::open(c.root().join("coordinator/coordinator.db")).unwrap();
    let state: String = db
        .query_row("SELECT state FROM workspaces", [], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "destroyed");
}

#[test]
fn every_vm_gets_a_distinct_address_from_the_pools_and_gives_it_back() {
    let c = Cluster::start(Options {
        extra: "[network.private]\ncidr = \"10.99.0.0/24\"\ngateway = \"10.99.0.1\"\n[network.public]\ncidr = \"192.0.2.0/28\"\ngateway = \"192.0.2.1\"\n".into(),
        ..Options::default()
    });
    let spec = ENSEMBLE.replace("cpus = 2\n", "cpus = 2\npublic_ip = true\n");
    let id = ws_id(&c.create(&spec));
    let v = c.wait_running(&id);
    let mut ips = HashSet::new();
    for vm in v["vms"].as_array().unwrap() {
        let nics = vm["nics"].as_array().unwrap();
        let want = if vm["group"] == "head" { 2 } else { 1 };
        assert_eq!(nics.len(), want, "{vm}");
        for nic in nics {
            let ip = nic["ip"].as_str().unwrap().to_string();
            assert!(
                ip.starts_with("10.99.0.") || ip.starts_with("192.0.2."),
                "{ip}"
            );
            assert_ne!(ip, "10.99.0.1", "the gateway is never handed out");
            assert!(ips.insert(ip.clone()), "{ip} given twice");
            assert!(
                nic["mac"].as_str().unwrap().starts_with("02:"),
                "locally administered: {nic}"
            );
        }
        // The simulated node records what its pilot was told.
        let node = c.node(vm["node"].as_str().unwrap());
        assert_eq!(node["domains"][0]["nics"], vm["nics"], "{node:#}");
    }
    assert_eq!(ips.len(), 5);
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_settled(&id);
    for vm in v["vms"].as_array().unwrap() {
        assert!(
            vm["nics"].as_array().is_none_or(|n| n.is_empty()),
            "address kept after destroy: {vm}"
        );
    }
    c.assert_nodes_restored();
}
