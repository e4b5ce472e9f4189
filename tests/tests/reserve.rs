//! Guaranteed leases (issue 18) on the local batch system, end to end: the
//! real coordinator and pilots (sim nodes), specs posted over HTTP.
//!
//! Tolerance: a reservation's VMs run no earlier than the staging lead
//! before its start and no later than 2 s after it.

use serde_json::Value;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const LEAD_S: i64 = 6;

fn cluster(nodes: u32) -> Cluster {
    Cluster::start(Options {
        nodes,
        extra: format!("\n[reservations]\nlead_s = {LEAD_S}\nhorizon_s = 3600\n"),
        ..Options::default()
    })
}

fn pair(extra: &str) -> String {
    format!(
        r#"{extra}
name = "pair"
duration = "1h"
[[group]]
name = "worker"
count = 2
memory_mb = 512
cpus = 1
image = "worker.qcow2"
"#
    )
}

fn ids(c: &Cluster) -> Vec<String> {
    let r = c.list_as(TOKEN);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_string())
        .collect()
}

fn phases(c: &Cluster, id: &str) -> Vec<String> {
    c.timeline(id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The `start = "..."` the refusal offers.
fn offered_start(error: &str) -> String {
    let (_, rest) = error
        .split_once("(start = \"")
        .unwrap_or_else(|| panic!("no offered start in {error:?}"));
    rest.split('"').next().unwrap().to_string()
}

fn assert_vms_on_time(v: &Value) {
    let start = v["start_ms"].as_u64().expect("start_ms");
    for vm in v["vms"].as_array().unwrap() {
        let off = vm["start_offset_ms"].as_i64().expect("start_offset_ms");
        assert!(
            (-LEAD_S * 1000..=2000).contains(&off),
            "VM {} ran {off} ms from its start {start}",
            vm["id"]
        );
    }
    assert_eq!(
        v["expires_ms"].as_u64(),
        Some(start + 3_600_000),
        "the lease ends at its start + duration"
    );
}

#[test]
fn reservation_runs_its_vms_at_its_start_and_releases_the_batch_reservation_after() {
    let c = cluster(4);
    let created = c.create(&pair("start = \"+15s\""));
    assert_eq!(created.status, 201, "{}", created.body);
    let v = &created.body;
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["kind"], "reservation");
    let start = v["start_ms"].as_u64().unwrap();
    let now = protocol::now_ms();
    assert!(
        (now + 12_000..now + 16_000).contains(&start),
        "start {start} now {now}"
    );
    assert!(
        v["reservation"].as_str().unwrap().starts_with("local R"),
        "{v}"
    );
    assert!(phases(&c, &id).contains(&"reservation_granted".to_string()));
    // Nothing runs before the batch system's reservation begins (start - lead).
    std::thread::sleep(Duration::from_secs(5));
    let early = c.get(&id);
    assert_eq!(early["state"], "pending", "{early:#}");
    let v = c.wait_for(&id, "running", Duration::from_secs(40), |v| {
        v["state"] == "running"
    });
    assert!(
        protocol::now_ms() < start + 2000,
        "running only {} ms after its start",
        protocol::now_ms() - start
    );
    assert_vms_on_time(&v);
    let out = std::process::Command::new(bin("workspace"))
        .args(["status", &id])
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", TOKEN)
        .output()
        .expect("run workspace");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reservation lease; starts"), "{text}");
    assert!(
        text.contains("AT START") && text.contains(" early"),
        "{text}"
    );
    let d = c.destroy_as(TOKEN, &id);
    assert_eq!(d.status, 200, "{}", d.body);
    c.wait_settled(&id);
    let v = c.wait_for(&id, "released", Duration::from_secs(10), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
    assert!(
        phases(&c, &id).contains(&"reservation_released".to_string()),
        "{v}"
    );
    c.assert_nodes_restored();
}

#[test]
fn a_reservation_that_cannot_be_guaranteed_is_refused_with_the_earliest_start_and_nothing_stored() {
    let c = cluster(2);
    // A best-effort lease holds both nodes for its walltime.
    let busy = c.create(&pair("").replace("\"1h\"", "\"2m\""));
    assert_eq!(busy.status, 201, "{}", busy.body);
    let busy_id = busy.body["id"].as_str().unwrap().to_string();
    c.wait_running(&busy_id);
    let r = c.create(&pair("start = \"+20s\""));
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.body["error"].as_str().unwrap().to_string();
    assert!(
        error.starts_with(
            "reservation refused: local: the local batch system has 0 of the 2 node(s) free"
        ),
        "{error}"
    );
    assert_eq!(
        r.body["earliest_start"].as_str(),
        Some(offered_start(&error).as_str()),
        "the offer as a field too"
    );
    let imm = c.create(&pair("kind = \"immediate\""));
    assert_eq!(imm.status, 409, "{}", imm.body);
    let imm_error = imm.body["error"].as_str().unwrap();
    assert!(
        imm_error.starts_with("immediate lease refused"),
        "{imm_error}"
    );
    assert_eq!(ids(&c), vec![busy_id.clone()], "nothing stored");
    // The offered start is true: asked for, it is granted.
    let offered = offered_start(&error);
    let r = c.create(&pair(&format!("start = \"{offered}\"")));
    assert_eq!(r.status, 201, "offered {offered}: {}", r.body);
    // Overlapping reservations past capacity: the second is refused.
    let r2 = c.create(&pair(&format!("start = \"{offered}\"")));
    assert_eq!(r2.status, 409, "{}", r2.body);
    let later = offered_start(r2.body["error"].as_str().unwrap());
    assert!(later > offered, "{later} after {offered}");
}

#[test]
fn a_reservation_cancelled_before_its_start_releases_what_it_held() {
    let c = cluster(2);
    let r = c.create(&pair("start = \"+60s\""));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    // The nodes are held at +60 s: another reservation then is refused.
    let other = c.create(&pair("start = \"+70s\""));
    assert_eq!(other.status, 409, "{}", other.body);
    let d = c.destroy_as(TOKEN, &id);
    assert_eq!(d.status, 200, "{}", d.body);
    c.wait_settled(&id);
    c.wait_for(&id, "released", Duration::from_secs(10), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
    let jobs = c.local_jobs();
    assert!(
        jobs["reservations"].as_array().unwrap().is_empty(),
        "{jobs:#}"
    );
    let again = c.create(&pair("start = \"+70s\""));
    assert_eq!(again.status, 201, "{}", again.body);
}

#[test]
fn bad_reservation_input_is_refused_naming_the_field_and_nothing_is_stored() {
    let c = cluster(2);
    let cases = [
        (
            "start = \"2020-01-01T00:00:00Z\"",
            "start: 2020-01-01T00:00:00.000Z is in the past",
        ),
        ("start = \"+2h\"", "start: "),
        ("start = \"tomorrow\"", "start: \"tomorrow\" is not a time"),
        ("start = \"2026-12-01T10:00:00\"", "start: "),
        (
            "kind = \"reservation\"",
            "start: a reservation needs a start",
        ),
        (
            "kind = \"immediate\"\nstart = \"+1m\"",
            "start: only a reservation has a start",
        ),
        ("kind = \"later\"", "kind: unknown variant `later`"),
    ];
    for (line, want) in cases {
        let r = c.create(&pair(line));
        assert_eq!(r.status, 400, "{line}: {}", r.body);
        let e = r.body["error"].as_str().unwrap();
        assert!(e.starts_with(want), "{line}: {e}");
    }
    let far = c.create(&pair("start = \"+2h\""));
    assert!(
        far.body["error"]
            .as_str()
            .unwrap()
            .contains("horizon of 1h"),
        "{}",
        far.body
    );
    assert!(ids(&c).is_empty(), "nothing stored");
    // An offset is kept as UTC.
    let t = protocol::now_ms() / 1000 + 1800;
    let utc = protocol::time::format_ms(t * 1000);
    let plus2 = protocol::time::format_ms((t + 7200) * 1000).replace('Z', "+02:00");
    let r = c.create(&pair(&format!("start = \"{plus2}\"")));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["start_ms"].as_u64(), Some(t * 1000), "{utc}");
}

#[test]
fn an_accepted_reservation_survives_a_coordinator_restart() {
    let mut c = cluster(2);
    let r = c.create(&pair("start = \"+15s\""));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    c.kill_coordinator();
    let t = Instant::now();
    c.restart_coordinator();
    assert!(t.elapsed() < Duration::from_secs(10));
    let v = c.wait_for(&id, "running", Duration::from_secs(40), |v| {
        v["state"] == "running"
    });
    assert_vms_on_time(&v);
    assert!(
        v["reservation"].as_str().unwrap().ends_with("(held)"),
        "{v}"
    );
}

#[test]
fn a_reservation_suspends_the_best_effort_lease_on_its_nodes_which_resumes_after_it() {
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
            nodes: 2,
            kill_grace_s: 8,
            node_config: Some(node_cfg.display().to_string()),
            extra: format!(
                "\n[reservations]\nlead_s = {LEAD_S}\nhorizon_s = 3600\nsuspend_before_s = 6\n"
            ),
            ..Options::default()
        }
        .with_top(&format!("checkpoint_dir = \"{}\"\n", ckdir.display())),
    );
    let be = c.create(&pair(""));
    assert_eq!(be.status, 201, "{}", be.body);
    let be_id = be.body["id"].as_str().unwrap().to_string();
    let before = c.wait_running(&be_id);
    let vms = |v: &Value| {
        let mut ids: Vec<String> = v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    // Both nodes are busy, but the lease on them can be suspended.
    let r = c.create(&pair("start = \"+25s\""));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    assert_vms_on_time(&v);
    let suspended = c.get(&be_id);
    assert!(
        ["suspended", "resuming"].contains(&suspended["state"].as_str().unwrap()),
        "{suspended:#}"
    );
    assert!(
        c.timeline(&id).iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("best-effort workspace {be_id} suspended"))),
        "the reservation's timeline names its victim"
    );
    // Once the reservation gives its nodes back, the lease resumes, the same VMs.
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let after = c.wait_for(&be_id, "running again", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    assert_eq!(vms(&after), vms(&before));
    assert!(
        phases(&c, &be_id).contains(&"resumed".to_string())
            || phases(&c, &be_id).iter().any(|p| p.starts_with("resum")),
        "{:?}",
        phases(&c, &be_id)
    );
}

#[test]
fn an_immediate_lease_runs_now_when_the_nodes_are_free() {
    let c = cluster(2);
    let t0 = protocol::now_ms();
    let r = c.create(&pair("kind = \"immediate\""));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["kind"], "immediate");
    let id = r.body["id"].as_str().unwrap().to_string();
    let start = r.body["start_ms"].as_u64().unwrap();
    assert!(
        (t0..t0 + 2000).contains(&start),
        "start {start}, asked at {t0}"
    );
    let v = c.wait_running(&id);
    for vm in v["vms"].as_array().unwrap() {
        let off = vm["start_offset_ms"].as_i64().expect("offset");
        assert!((0..5000).contains(&off), "{off} ms after acceptance");
    }
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_settled(&id);
    c.wait_for(&id, "released", Duration::from_secs(10), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
}
