//! Crash recovery end to end: the real coordinator is SIGKILLed at each step
//! of a lease's life and started again on the same config and data_dir. The
//! local batch system's pilots outlive it (orphaned), keep retrying, and
//! resend what was not acknowledged; the restarted coordinator rebuilds from
//! SQLite, adopts the batch jobs and reconciles. Every workspace must reach
//! its right end, settle, and leave no job, no pilot, no VM and every node's
//! memory back.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

/// Two slots (one per group), each taking a whole node (2 cores).
const PAIR: &str = r#"
name = "chaos"
duration = "2h"
[[group]]
name = "worker"
count = 1
memory_mb = 1024
cpus = 2
image = "worker.qcow2"
[[group]]
name = "head"
count = 1
memory_mb = 1024
cpus = 2
image = "head.qcow2"
"#;

const GRACE_S: u64 = 3;
/// How long the coordinator stays dead in the scenarios where pilots wait for it.
const DOWN: Duration = Duration::from_millis(1200);

fn cluster() -> Cluster {
    Cluster::start(Options {
        nodes: 2,
        kill_grace_s: GRACE_S,
        ..Options::default()
    })
}

/// Gives every simulated node hypervisor latencies (`--balloon-ms 1500` ...),
/// before any pilot runs.
fn slow_nodes(c: &Cluster, latency: &[&str]) {
    for n in &c.nodes {
        let out = Command::new(bin("workspace-pilot"))
            .args(["sim", "init", "--force", "--dir"])
            .arg(c.sim_dir(n))
            .args(["--memory-mb", "4096", "--cpus", "2"])
            .args(latency)
            .output()
            .expect("workspace-pilot sim init");
        assert!(
            out.status.success(),
            "sim init {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn phases(c: &Cluster, id: &str, phase: &str) -> usize {
    c.timeline(id)
        .iter()
        .filter(|e| e["phase"] == phase)
        .count()
}

/// Waits (bounded) for `n` timeline entries of `phase`.
fn wait_phase(c: &Cluster, id: &str, phase: &str, n: usize) {
    let t = Instant::now();
    while phases(c, id, phase) < n {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{n} x {phase} not reached: {:#?}\n{}",
            c.timeline(id),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn slot_and_node(v: &Value, group: &str) -> (String, String) {
    let vm = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["group"] == group)
        .expect("vm of group");
    (
        vm["slot_id"].as_str().unwrap().to_string(),
        vm["node"].as_str().unwrap().to_string(),
    )
}

/// Kills the coordinator, waits `down`, starts it again.
fn crash_and_restart(c: &mut Cluster, down: Duration) {
    c.kill_coordinator();
    std::thread::sleep(down);
    c.restart_coordinator();
}

/// The end every scenario must reach: settled, nothing left anywhere.
fn assert_nothing_left(c: &Cluster, v: &Value) {
    assert_eq!(v["settled"], true, "{v:#}");
    c.assert_pilots_exited();
    for n in &c.nodes {
        let v = c.node(n);
        let restored = v["dom0"]["current_mb"] == v["dom0"]["max_mb"]
            && v["domains"].as_array().is_some_and(|d| d.is_empty());
        assert!(
            restored,
            "{n} not restored: {v:#}\n--- pilot logs ---\n{}\n--- coordinator log ---\n{}",
            pilot_logs(c),
            c.log()
        );
    }
    c.assert_nodes_restored();
    // A cancelled job is being ended (SIGTERM, then SIGKILL after the grace)
    // when the workspace settles; it is gone within the grace.
    let t = Instant::now();
    loop {
        let jobs = c.local_jobs();
        let live: Vec<&Value> = jobs["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .filter(|j| {
                matches!(
                    j["state"]["state"].as_str().unwrap_or_default(),
                    "queued" | "running" | "completing" | "held"
                )
            })
            .collect();
        if live.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(GRACE_S + 2),
            "batch jobs left in the local batch system: {live:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in v["slots"].as_array().unwrap() {
        let ended = ["released", "failed", "unreported"];
        assert!(ended.iter().any(|e| s["state"] == *e), "{s}");
    }
}

/// Every pilot's output (the local batch system's per-node job logs).
fn pilot_logs(c: &Cluster) -> String {
    let mut out = String::new();
    let jobs = c.root().join("coordinator/jobs");
    for slot in std::fs::read_dir(&jobs).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(slot.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "log") {
                out.push_str(&format!(
                    "== {}\n{}\n",
                    f.path().display(),
                    std::fs::read_to_string(f.path()).unwrap_or_default()
                ));
            }
        }
    }
    out
}

/// A running workspace is destroyed and must settle clean.
fn destroy_and_check(c: &Cluster, id: &str) {
    let r = c.destroy_as(TOKEN, id);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = c.wait_settled(id);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    assert_nothing_left(c, &v);
}

#[test]
fn coordinator_killed_right_after_submit_picks_up_the_lease_on_restart() {
    let mut c = cluster();
    let id = ws_id(&c.create(PAIR));
    crash_and_restart(&mut c, DOWN);
    let v = c.wait_running(&id);
    // The jobs kept their ids: the restarted batch system adopted them.
    for s in v["slots"].as_array().unwrap() {
        assert_eq!(s["state"], "reserved", "{s}");
    }
    destroy_and_check(&c, &id);
}

#[test]
fn coordinator_killed_while_pilots_reserve_gets_their_resent_reservations() {
    let mut c = cluster();
    slow_nodes(&c, &["--balloon-ms", "1500"]);
    let id = ws_id(&c.create(PAIR));
    wait_phase(&c, &id, "pilot_started", 2);
    assert_eq!(
        phases(&c, &id, "memory_reserved"),
        0,
        "reservations came before the crash"
    );
    crash_and_restart(&mut c, DOWN);
    c.wait_running(&id);
    destroy_and_check(&c, &id);
}

#[test]
fn coordinator_killed_while_vms_start_learns_they_run_from_resent_events() {
    let mut c = cluster();
    slow_nodes(&c, &["--create-ms", "1500"]);
    let id = ws_id(&c.create(PAIR));
    wait_phase(&c, &id, "vm_start_sent", 2);
    assert_eq!(
        phases(&c, &id, "vm_started"),
        0,
        "VMs came up before the crash"
    );
    crash_and_restart(&mut c, DOWN);
    let v = c.wait_running(&id);
    assert!(v["expires_ms"].is_u64(), "the lease has an expiry: {v:#}");
    destroy_and_check(&c, &id);
}

#[test]
fn coordinator_killed_during_a_preemption_ends_the_workspace_preempted() {
    let mut c = cluster();
    let id = ws_id(&c.create(PAIR));
    let v = c.wait_running(&id);
    let (slot, node) = slot_and_node(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    signal(pid, Signal::SIGTERM);
    c.kill_coordinator();
    // Back within the pilot's wait for us: it resends `preempting` and we release the rest.
    std::thread::sleep(Duration::from_millis(300));
    c.restart_coordinator();
    let gone = wait_gone(pid, Duration::from_secs(GRACE_S + 2)).expect("preempted pilot exits");
    assert!(
        gone < Duration::from_secs(GRACE_S),
        "pilot took {gone:?} (grace {GRACE_S} s)"
    );
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    assert_nothing_left(&c, &v);
}

#[test]
fn coordinator_killed_during_destroy_finishes_the_destroy_on_restart() {
    let mut c = cluster();
    slow_nodes(&c, &["--destroy-ms", "1000"]);
    let id = ws_id(&c.create(PAIR));
    c.wait_running(&id);
    let r = c.destroy_as(TOKEN, &id);
    assert_eq!(r.status, 200, "{}", r.body);
    // Pilots fetch their release and start destroying, then we die.
    std::thread::sleep(Duration::from_millis(300));
    crash_and_restart(&mut c, Duration::from_millis(500));
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    assert_nothing_left(&c, &v);
}

#[test]
fn pilot_preempted_while_the_coordinator_is_down_longer_than_its_grace_cleans_up_and_its_unreported_node_is_named_until_kill_all_delivers(
) {
    // Nobody delivers the dead pilot's letters within report_wait_s: the
    // node is named for kill-all, which then delivers them and the record is
    // corrected.
    let mut c = Cluster::start(Options {
        nodes: 2,
        kill_grace_s: GRACE_S,
        report_wait_s: 3,
        ..Options::default()
    });
    let id = ws_id(&c.create(PAIR));
    let v = c.wait_running(&id);
    let (slot, node) = slot_and_node(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    c.kill_coordinator();
    signal(pid, Signal::SIGTERM);
    let gone = wait_gone(pid, Duration::from_secs(GRACE_S + 2)).expect("preempted pilot exits");
    assert!(
        gone < Duration::from_secs(GRACE_S),
        "pilot took {gone:?} (grace {GRACE_S} s)"
    );
    let n = c.node(&node);
    assert_eq!(n["dom0"]["current_mb"], n["dom0"]["max_mb"], "{n:#}");
    assert_eq!(n["domains"].as_array().unwrap().len(), 0, "{n:#}");
    c.restart_coordinator();
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(slot_state(&v, &slot), "unreported", "{v:#}");
    assert!(
        v["reason"].as_str().unwrap_or_default().contains(&node),
        "{v:#}"
    );
    let advice = c
        .timeline(&id)
        .iter()
        .filter_map(|e| e["detail"].as_str().map(str::to_string))
        .find(|d| d.contains("kill-all"))
        .expect("the node is named for kill-all");
    assert!(advice.contains(&node), "{advice}");
    assert_nothing_left(&c, &v);
    let out = Command::new(bin("workspace-kill-all"))
        .args([
            "--hypervisor",
            "sim",
            "--json",
            "--node",
            &node,
            "--sim-dir",
        ])
        .arg(c.sim_dir(&node))
        .arg("--state-dir")
        .arg(c.state_dir(&node))
        .output()
        .expect("run kill-all");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let last = c.timeline(&id).last().cloned().expect("entries");
    let said = last["detail"].as_str().unwrap_or_default();
    assert!(
        said.contains("late report") && said.contains("no workspace-kill-all needed"),
        "{last:#}"
    );
    assert_eq!(c.get(&id)["state"], "failed", "terminal states never move");
    assert_no_letter_left(&c);
}

#[test]
fn reports_a_preempted_pilot_left_during_a_long_outage_reach_the_coordinator_through_kill_all() {
    // An outage longer than the clock-skew window: the late events must
    // still be taken (signed, new, of the slot), however old they are.
    let mut c = Cluster::start(Options {
        nodes: 2,
        kill_grace_s: GRACE_S,
        top: "max_clock_skew_s = 1\n".into(),
        ..Options::default()
    });
    let id = ws_id(&c.create(PAIR));
    let v = c.wait_running(&id);
    let (slot, node) = slot_and_node(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    c.kill_coordinator();
    signal(pid, Signal::SIGTERM);
    wait_gone(pid, Duration::from_secs(GRACE_S + 2)).expect("preempted pilot exits");
    std::thread::sleep(Duration::from_millis(1500));
    c.restart_coordinator();
    let out = Command::new(bin("workspace-kill-all"))
        .args([
            "--hypervisor",
            "sim",
            "--json",
            "--node",
            &node,
            "--sim-dir",
        ])
        .arg(c.sim_dir(&node))
        .arg("--state-dir")
        .arg(c.state_dir(&node))
        .output()
        .expect("run kill-all");
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let delivered: Vec<(&str, &str)> = report["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["kind"].as_str().unwrap(), d["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        delivered,
        vec![("preempting", "delivered"), ("released", "delivered")],
        "{report:#}"
    );
    let v = c.get(&id);
    let pilot = &v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == slot.as_str())
        .unwrap()["pilots"][0];
    assert_eq!(pilot["last_event"], "released", "{v:#}");
    let v = c.wait_settled(&id);
    assert_nothing_left(&c, &v);
}

// ---- Outages of 30 s and more, one per phase of a lease ----------------
//
// Longer than any pilot's resend pause (2 s), its start-up wait if it had
// kept the old default (30 s), and the batch system's status poll, so every
// report the coordinator gets in these is a late one. They run in parallel.

/// How long the coordinator stays dead.
const OUTAGE: Duration = Duration::from_secs(31);

/// A single VM taking a whole node.
const ONE: &str = r#"
name = "one"
duration = "2h"
[[group]]
name = "solo"
count = 1
memory_mb = 1024
cpus = 2
image = "solo.qcow2"
"#;

/// Nothing on the workspace's timeline sends an admin to run kill-all.
fn assert_no_kill_all_advice(c: &Cluster, id: &str) {
    let advice: Vec<String> = c
        .timeline(id)
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .filter(|d| d.contains("kill-all"))
        .map(str::to_string)
        .collect();
    assert!(
        advice.is_empty(),
        "false kill-all advice: {advice:#?}\n{:#?}",
        c.timeline(id)
    );
}

/// Every event every pilot made was acknowledged: no letter is left in any
/// node's outbox (a letter goes only once the coordinator stored it).
fn assert_no_letter_left(c: &Cluster) {
    let t = Instant::now();
    loop {
        let left: Vec<String> = c
            .nodes
            .iter()
            .flat_map(|n| {
                std::fs::read_dir(c.state_dir(n).join("outbox"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|f| f.path().display().to_string())
                    .filter(|p| p.ends_with(".json"))
            })
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "letters never delivered: {:#?}\n--- pilot logs ---\n{}",
            left.iter()
                .map(|p| format!("{p}: {}", std::fs::read_to_string(p).unwrap_or_default()))
                .collect::<Vec<_>>(),
            pilot_logs(c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `memory_restored` entries of a workspace, by node.
fn restored_nodes(c: &Cluster, id: &str) -> Vec<String> {
    let mut nodes: Vec<String> = c
        .timeline(id)
        .iter()
        .filter(|e| e["phase"] == "memory_restored")
        .filter_map(|e| e["node"].as_str().map(str::to_string))
        .collect();
    nodes.sort();
    nodes
}

fn slot_state(v: &Value, slot: &str) -> String {
    v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == slot)
        .map(|s| s["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn an_outage_of_30_s_during_create_delays_the_leases_and_loses_nothing() {
    let mut c = Cluster::start(Options {
        nodes: 3,
        kill_grace_s: GRACE_S,
        ..Options::default()
    });
    let id = ws_id(&c.create(PAIR));
    c.kill_coordinator();
    // Its pilots start and wait for us; a client asks for another workspace
    // meanwhile and keeps sending the create (one idempotency key).
    let spec = c.root().join("one.toml");
    std::fs::write(&spec, ONE).unwrap();
    let client = Command::new(bin("workspace"))
        .args([
            "create",
            "--file",
            spec.to_str().unwrap(),
            "--retry-for",
            "120",
        ])
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run workspace");
    std::thread::sleep(OUTAGE);
    c.restart_coordinator();
    let out = client.wait_with_output().expect("workspace create");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("sending the create again"), "{stderr}");
    let id2 = stdout
        .split_whitespace()
        .nth(1)
        .expect("created <id>")
        .to_string();
    let all = c.list_as(TOKEN).body["workspaces"]
        .as_array()
        .expect("list")
        .len();
    assert_eq!(all, 2, "one workspace per create");
    for w in [&id, &id2] {
        c.wait_running(w);
        assert_no_kill_all_advice(&c, w);
    }
    for w in [&id, &id2] {
        let r = c.destroy_as(TOKEN, w);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for w in [&id, &id2] {
        let v = c.wait_settled(w);
        assert_eq!(v["state"], "destroyed", "{v:#}");
        assert_nothing_left(&c, &v);
    }
    assert_no_letter_left(&c);
}

#[test]
fn an_outage_of_30_s_through_a_preemption_ends_the_lease_preempted_from_the_next_pilots_delivery() {
    // The coordinator's default wait for late reports: time for the next
    // pilot on the node to start.
    let mut c = Cluster::start(Options {
        nodes: 2,
        kill_grace_s: GRACE_S,
        report_wait_s: 60,
        ..Options::default()
    });
    let id = ws_id(&c.create(PAIR));
    let v = c.wait_running(&id);
    let (slot, node) = slot_and_node(&v, "head");
    let pid = c.pilot_pid_on(&slot, &node);
    c.kill_coordinator();
    signal(pid, Signal::SIGTERM);
    wait_gone(pid, Duration::from_secs(GRACE_S + 2)).expect("preempted pilot exits");
    std::thread::sleep(OUTAGE);
    c.restart_coordinator();
    // The batch system says the job is over; how the node ended is in the
    // dead pilot's outbox: the slot waits for it, advising nothing.
    let t = Instant::now();
    while slot_state(&c.get(&id), &slot) != "awaiting_report" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{:#}\n{}",
            c.get(&id),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.get(&id)["state"], "running");
    // The next pilot on that node delivers the letters.
    let next = ws_id(&c.create(ONE));
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&node) && reason.contains("SIGTERM"),
        "the reason names the node and the signal: {reason}"
    );
    assert!(
        restored_nodes(&c, &id).contains(&node),
        "{:#?}",
        c.timeline(&id)
    );
    assert_no_kill_all_advice(&c, &id);
    let n = c.get(&next);
    assert_eq!(n["vms"][0]["node"], node.as_str(), "{n:#}");
    c.wait_running(&next);
    destroy_and_check(&c, &next);
    assert_nothing_left(&c, &v);
    assert_no_letter_left(&c);
}

#[test]
fn an_outage_of_30_s_during_a_release_is_ridden_out_by_the_pilots_reports() {
    let mut c = cluster();
    slow_nodes(&c, &["--destroy-ms", "1000"]);
    let id = ws_id(&c.create(PAIR));
    c.wait_running(&id);
    let r = c.destroy_as(TOKEN, &id);
    assert_eq!(r.status, 200, "{}", r.body);
    // Pilots fetch their release and start destroying, then we die, for
    // longer than pilots used to retry (about 5 s).
    std::thread::sleep(Duration::from_millis(300));
    c.kill_coordinator();
    std::thread::sleep(OUTAGE);
    c.restart_coordinator();
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    assert_no_kill_all_advice(&c, &id);
    let (destroyed, restored) = (
        phases(&c, &id, "vm_destroyed"),
        restored_nodes(&c, &id).len(),
    );
    assert_eq!((destroyed, restored), (2, 2), "{:#?}", c.timeline(&id));
    let end = c.timeline(&id).last().cloned().expect("entries");
    assert_eq!(end["detail"], "destroyed: every slot given back", "{end:#}");
    assert_nothing_left(&c, &v);
    assert_no_letter_left(&c);
}

#[test]
fn an_outage_of_30_s_across_the_end_of_a_lease_expires_it_on_return() {
    let mut c = cluster();
    let id = ws_id(&c.create(&PAIR.replace("duration = \"2h\"", "duration = \"8s\"")));
    c.wait_running(&id);
    c.kill_coordinator();
    std::thread::sleep(OUTAGE);
    c.restart_coordinator();
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "expired", "{v:#}");
    assert_no_kill_all_advice(&c, &id);
    assert_eq!(restored_nodes(&c, &id).len(), 2, "{:#?}", c.timeline(&id));
    assert_nothing_left(&c, &v);
    assert_no_letter_left(&c);
}
