//! The slot pool end to end (issue 17): a real coordinator with `[pool]`,
//! the local batch system, real pilots started with `--pool` on simulated
//! nodes, driven by the `workspace` CLI as an admin and a scientist would.
//! An urgent lease starts on an idle pool slot without a batch job of its
//! own, the lease's end unbinds the slot (its batch job goes on), the admin
//! view and `/metrics` show the pool, and a coordinator restart keeps it.
//! A lease queued in the batch system moves onto a pool slot that becomes
//! idle, and its batch job is cancelled.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const URGENT: &str = r#"
name = "urgent"
duration = 600
urgency = 1
[[group]]
name = "solver"
count = 1
memory_mb = 512
image = "debian-12"
"#;

fn workspace(c: &Cluster, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("workspace"))
        .args(args)
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", token)
        .output()
        .expect("run workspace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The details of a workspace's timeline, read with `token`.
fn timeline(c: &Cluster, token: &str, id: &str) -> Vec<String> {
    let v: Value = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/workspaces/{id}/events?after=0", c.url))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .and_then(|r| r.json())
        .expect("timeline");
    v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["detail"].as_str().unwrap_or("").to_string())
        .collect()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `workspace admin pool --json`, as the admin.
fn pool(c: &Cluster) -> Value {
    let (code, out, err) = workspace(c, ADMIN_TOKEN, &["admin", "pool", "--json"]);
    assert_eq!(code, 0, "{err}");
    json(&out)
}

fn slots_in(p: &Value, state: &str) -> Vec<Value> {
    p["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .filter(|s| s["state"] == state)
        .cloned()
        .collect()
}

/// Waits until the pool has `n` idle slots.
fn wait_idle(c: &Cluster, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pool(c);
        if slots_in(&p, "idle").len() >= n {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not reach {n} idle slot(s): {p:#}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(c: &Cluster) -> String {
    reqwest::blocking::Client::new()
        .get(format!("{}/metrics", c.url))
        .timeout(Duration::from_secs(30))
        .send()
        .and_then(|r| r.text())
        .expect("GET /metrics")
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn pool_cluster() -> Cluster {
    Cluster::start(Options {
        // Into the admin's [[users]] entry, then the pool.
        extra: "max_urgency = 2\n[pool]\nmin_idle_nodes = 1\nmax_nodes = 2\nwalltime_s = 3600\nidle_timeout_s = 600\n".into(),
        ..Options::default()
    })
}

#[test]
fn an_urgent_lease_starts_on_an_idle_pool_slot_and_gives_it_back_at_its_end() {
    let mut c = pool_cluster();
    let p = wait_idle(&c, 1);
    let idle = slots_in(&p, "idle").remove(0);
    let (slot, node) = (
        idle["slot_id"].as_str().expect("slot").to_string(),
        idle["node"].as_str().expect("node").to_string(),
    );
    let job = idle["job_id"].as_str().expect("a pool job").to_string();
    // The admin's table says the same, for people.
    let (code, out, _) = workspace(&c, ADMIN_TOKEN, &["admin", "pool"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("1 idle, 0 bound") && out.contains(&slot),
        "{out}"
    );
    // Nobody else may look.
    let (code, _, err) = workspace(&c, TOKEN, &["admin", "pool"]);
    assert_ne!(code, 0);
    assert!(err.contains("not an admin"), "{err}");
    // The holder of the pool's slots is not a lease anyone sees.
    let (_, out, _) = workspace(&c, ADMIN_TOKEN, &["list", "--json"]);
    assert_eq!(json(&out)["workspaces"], serde_json::json!([]), "{out}");

    let spec = c.root().join("urgent.toml");
    std::fs::write(&spec, URGENT).expect("spec");
    let asked = Instant::now();
    let (code, out, err) = workspace(
        &c,
        ADMIN_TOKEN,
        &[
            "create",
            "--file",
            spec.to_str().expect("path"),
            "--wait",
            "--json",
        ],
    );
    let took = asked.elapsed();
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["state"], "running", "{v:#}");
    println!(
        "urgent lease running from an idle pool slot in {} ms",
        took.as_millis()
    );
    let vm = &v["vms"][0];
    assert_eq!(vm["node"], node.as_str());
    assert_eq!(vm["slot_id"], slot.as_str());
    // The VM runs on the pool pilot's node, under the pool slot's name.
    let n = c.node(&node);
    let names: Vec<&str> = n["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(names.contains(&vm["name"].as_str().expect("name")), "{n:#}");
    // No batch job of its own: the pool's; the timeline says where it came from.
    assert_eq!(vm["job_id"], job.as_str(), "{v:#}");
    let text = timeline(&c, ADMIN_TOKEN, &id);
    assert!(
        text.iter()
            .any(|t| t.contains(&format!("from idle pool slot {slot} on node {node}"))),
        "{text:#?}"
    );
    let p = pool(&c);
    let bound = slots_in(&p, "bound");
    assert_eq!(bound.len(), 1, "{p:#}");
    assert_eq!(bound[0]["bound_to"], id.as_str());
    // The pool grows back to one idle slot through the batch system.
    wait_idle(&c, 1);
    let m = metrics(&c);
    assert_eq!(
        sample(&m, "wsp_pool_slots{state=\"bound\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "wsp_pool_slots{state=\"idle\"}"),
        Some(1.0),
        "{m}"
    );

    // A crash and restart keep the bound slot and the idle one; none is
    // held twice, no pool job is submitted again.
    c.kill_coordinator();
    c.restart_coordinator();
    let p = pool(&c);
    assert_eq!(slots_in(&p, "bound").len(), 1, "{p:#}");
    assert_eq!(slots_in(&p, "idle").len(), 1, "{p:#}");
    assert_eq!(slots_in(&p, "growing").len(), 0, "{p:#}");
    assert_eq!(c.get_as(ADMIN_TOKEN, &id).body["state"], "running");

    // The lease's end unbinds: the VM goes, the pool job goes on.
    let (code, out, err) = workspace(&c, ADMIN_TOKEN, &["destroy", &id, "--wait", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["state"], "destroyed", "{out}");
    let n = c.node(&node);
    assert!(
        n["domains"].as_array().is_none_or(|d| d.is_empty()),
        "{n:#}"
    );
    let p = wait_idle(&c, 2);
    let back = p["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .find(|s| s["slot_id"] == slot.as_str())
        .cloned()
        .expect("the slot is still in the pool");
    assert_eq!(back["state"], "idle", "{p:#}");
    assert_eq!(back["leases"], 1);
    assert_eq!(back["job_id"], job.as_str(), "the same batch job");
    assert!(
        !c.pilot_pids(Some(&slot)).is_empty(),
        "its pilot still runs"
    );
}

/// The local batch system's state of job `id` (`queued`, `running`,
/// `cancelled`, ...), or `None` when it has no such job.
fn job_state(c: &Cluster, id: &str) -> Option<String> {
    c.local_jobs()["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["id"] == id)
        .map(|j| j["state"]["state"].as_str().unwrap_or("?").to_string())
}

#[test]
fn a_lease_queued_behind_a_full_cluster_moves_onto_the_pool_slot_its_predecessor_leaves() {
    // A pool of one slot, kept for urgent leases; 4 nodes in all.
    let c = Cluster::start(Options {
        extra: "max_urgency = 2\n[pool]\nmin_idle_nodes = 1\nmax_nodes = 1\nwalltime_s = 3600\nidle_timeout_s = 600\n".into(),
        ..Options::default()
    });
    let p = wait_idle(&c, 1);
    let idle = slots_in(&p, "idle").remove(0);
    let slot = idle["slot_id"].as_str().expect("slot").to_string();
    let node = idle["node"].as_str().expect("node").to_string();
    let pool_job = idle["job_id"].as_str().expect("a pool job").to_string();
    let create = |token: &str, name: &str, spec: &str, wait: bool| -> Value {
        let path = c.root().join(name);
        std::fs::write(&path, spec).expect("spec");
        let mut args = vec!["create", "--file", path.to_str().expect("path"), "--json"];
        if wait {
            args.push("--wait");
        }
        let (code, out, err) = workspace(&c, token, &args);
        assert_eq!(code, 0, "{err}\n{}", c.log());
        json(&out)
    };
    // A holds the pool slot; a plain lease fills the other three nodes.
    let a = create(ADMIN_TOKEN, "a.toml", URGENT, true);
    assert_eq!(a["vms"][0]["slot_id"], slot.as_str(), "{a:#}");
    // (All the cores of each node: the local batch system packs by cores.)
    let fill = URGENT
        .replace("urgency = 1\n", "")
        .replace("count = 1", "count = 3\ncpus = 2");
    let full = create(TOKEN, "fill.toml", &fill, true);
    assert_eq!(full["state"], "running", "{full:#}");
    // B waits in the batch queue behind them.
    let b = create(ADMIN_TOKEN, "b.toml", URGENT, false);
    let b_id = b["id"].as_str().expect("id").to_string();
    let queued_job = b["vms"][0]["job_id"]
        .as_str()
        .expect("B's batch job")
        .to_string();
    std::thread::sleep(Duration::from_millis(500));
    let (_, out, _) = workspace(&c, ADMIN_TOKEN, &["status", &b_id, "--json"]);
    assert_eq!(json(&out)["state"], "pending", "{out}");
    assert_eq!(job_state(&c, &queued_job).as_deref(), Some("queued"));

    // A ends: its slot goes back to the pool, and B moves onto it.
    let a_id = a["id"].as_str().expect("id");
    let (code, _, err) = workspace(&c, ADMIN_TOKEN, &["destroy", a_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    let freed = Instant::now();
    let v = loop {
        let v = c.get_as(ADMIN_TOKEN, &b_id).body;
        if v["state"] == "running" {
            break v;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(30),
            "B did not move onto the freed pool slot: {v:#}\n{:#?}\n{}",
            timeline(&c, ADMIN_TOKEN, &b_id),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "queued lease running on the freed pool slot {} ms after its predecessor was destroyed",
        freed.elapsed().as_millis()
    );
    // `workspace status` shows it as for a lease placed at create.
    let (code, out, err) = workspace(&c, ADMIN_TOKEN, &["status", &b_id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let st = json(&out);
    let vm = &st["vms"][0];
    assert_eq!(vm["slot_id"], slot.as_str(), "{st:#}");
    assert_eq!(vm["node"], node.as_str(), "{st:#}");
    assert_eq!(vm["job_id"], pool_job.as_str(), "{st:#}");
    assert!(
        vm["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("wsp-{slot}-"))),
        "{st:#}"
    );
    let (_, text, _) = workspace(&c, ADMIN_TOKEN, &["status", &b_id]);
    assert!(text.contains(&node) && text.contains(&pool_job), "{text}");
    let names: Vec<String> = c.node(&node)["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        names.contains(&vm["name"].as_str().expect("name").to_string()),
        "{names:?}"
    );
    // Its batch job is gone: cancelled while queued, never started.
    assert_eq!(job_state(&c, &queued_job).as_deref(), Some("cancelled"));
    let text = timeline(&c, ADMIN_TOKEN, &b_id);
    let moved = format!(
        "moved from the batch queue to idle pool slot {slot} on node {node} (batch job {queued_job} cancelled)"
    );
    assert!(text.iter().any(|t| t.contains(&moved)), "{text:#?}");
    assert_eq!(v["state"], "running");
    let p = pool(&c);
    let bound = slots_in(&p, "bound");
    assert_eq!(bound.len(), 1, "{p:#}");
    assert_eq!(bound[0]["bound_to"], b_id.as_str(), "{p:#}");
    assert_eq!(bound[0]["leases"], 2, "{p:#}");
    // The filling lease was never touched.
    let f = c.get_as(TOKEN, full["id"].as_str().expect("id")).body;
    assert_eq!(f["state"], "running", "{f:#}");
}

#[test]
fn an_ordinary_lease_leaves_the_minimum_idle_for_urgent_ones() {
    let c = pool_cluster();
    wait_idle(&c, 1);
    let spec = c.root().join("plain.toml");
    std::fs::write(&spec, URGENT.replace("urgency = 1\n", "")).expect("spec");
    let (code, out, err) = workspace(
        &c,
        TOKEN,
        &[
            "create",
            "--file",
            spec.to_str().expect("path"),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let id = v["id"].as_str().expect("id");
    let text = timeline(&c, TOKEN, id);
    assert!(
        text.iter().any(|t| t.contains("through the batch system")),
        "{text:#?}"
    );
    assert_eq!(slots_in(&pool(&c), "idle").len(), 1);
    // An urgency above the user's allowance is refused with the reason.
    std::fs::write(&spec, URGENT).expect("spec");
    let (code, _, err) = workspace(
        &c,
        TOKEN,
        &["create", "--file", spec.to_str().expect("path")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("urgency 1 refused"), "{err}");
}

/// A cluster whose nodes share a checkpoint store, with a pool of one idle
/// slot holding 512 MB that keeps a warm snapshot of `debian-12`.
fn warm_cluster() -> (Cluster, tempfile::TempDir) {
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
    let c = Cluster::start(Options {
        node_config: Some(node_cfg.display().to_string()),
        extra: "max_urgency = 2\n[pool]\nmin_idle_nodes = 1\nmax_nodes = 2\nwalltime_s = 3600\nidle_memory_mb = 512\nwarm_images = [\"debian-12\"]\n".into(),
        ..Options::default()
    });
    (c, store)
}

/// Waits until the warm snapshot of `image` is ready and a slot is idle.
fn wait_warm(c: &Cluster, image: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pool(c);
        let ready = p["warm"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w["image"] == image && w["state"] == "ready")
        });
        if ready && !slots_in(&p, "idle").is_empty() {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no warm snapshot of {image}: {p:#}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lease_of_a_warm_image_starts_from_the_clean_snapshot_on_a_pool_slot() {
    let (c, _store) = warm_cluster();
    let p = wait_warm(&c, "debian-12");
    let (code, out, _) = workspace(&c, ADMIN_TOKEN, &["admin", "pool"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warm image \"debian-12\"") && out.contains("ready"),
        "{out}"
    );
    let checkpoint = p["warm"][0]["checkpoint"]
        .as_str()
        .expect("checkpoint")
        .to_string();
    let spec = c.root().join("urgent.toml");
    std::fs::write(&spec, URGENT).expect("spec");
    let (code, out, err) = workspace(
        &c,
        ADMIN_TOKEN,
        &[
            "create",
            "--file",
            spec.to_str().expect("path"),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["state"], "running", "{v:#}");
    let id = v["id"].as_str().expect("id");
    let text = timeline(&c, ADMIN_TOKEN, id);
    assert!(
        text.iter()
            .any(|t| t.contains(&format!("warm from the clean snapshot {checkpoint}"))),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("warm: restored from the clean snapshot")),
        "{text:#?}"
    );
}

/// The checkpoints in the store (`ws-…/vm-…/gN`), complete or not.
fn stored(ckdir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ws in names(ckdir) {
        for vm in names(&ckdir.join(&ws)) {
            for g in names(&ckdir.join(&ws).join(&vm)) {
                out.push(format!("{ws}/{vm}/{g}"));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_remade_warm_snapshot_leaves_only_itself_in_the_store() {
    let (c, store) = warm_cluster();
    let ckdir = store.path().join("checkpoints");
    let p = wait_warm(&c, "debian-12");
    let first = p["warm"][0]["checkpoint"]
        .as_str()
        .expect("checkpoint")
        .to_string();
    assert_eq!(stored(&ckdir), vec![first.clone()]);
    // The snapshot goes bad: the next lease is cold-booted and the
    // coordinator makes a new one.
    let file = ckdir.join(&first).join("sim-state");
    let mut bytes = std::fs::read(&file).expect("sim-state");
    bytes[100] ^= 0xff;
    std::fs::write(&file, bytes).expect("corrupt");
    let spec = c.root().join("urgent.toml");
    std::fs::write(&spec, URGENT).expect("spec");
    let (code, out, err) = workspace(
        &c,
        ADMIN_TOKEN,
        &[
            "create",
            "--file",
            spec.to_str().expect("path"),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let p = pool(&c);
        let w = &p["warm"][0];
        if w["state"] == "ready" && w["checkpoint"] != first.as_str() {
            break w["checkpoint"].as_str().expect("checkpoint").to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no new snapshot: {p:#}\n{:#?}",
            timeline(&c, ADMIN_TOKEN, &id)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        stored(&ckdir),
        vec![second],
        "the superseded snapshot {first} is deleted"
    );
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One urgent request to running, as `token`: (client-observed ms, from
/// POST to a GET that says running; coordinator ms, from its `requested`
/// entry to its `running` entry). Destroys it after and waits for it to settle.
fn request_to_running(c: &Cluster, token: &str, spec: &str) -> (f64, f64) {
    let t0 = Instant::now();
    let r = c.create_as(token, spec);
    assert!(r.status == 201 || r.status == 200, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.get_as(token, &id).body;
        if v["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "not running: {v:#}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let client = t0.elapsed().as_secs_f64() * 1000.0;
    let v: Value = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/workspaces/{id}/events?after=0", c.url))
        .bearer_auth(token)
        .send()
        .and_then(|r| r.json())
        .expect("timeline");
    let at = |phase: &str| {
        v["events"]
            .as_array()
            .expect("events")
            .iter()
            .find(|e| e["phase"] == phase)
            .and_then(|e| e["recorded_ms"].as_f64())
            .unwrap_or_else(|| panic!("no {phase} entry: {v:#}"))
    };
    let server = at("running") - at("requested");
    let d = c.destroy_as(token, &id);
    assert_eq!(d.status, 200, "{}", d.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get_as(token, &id).body["settled"] != true {
        assert!(Instant::now() < deadline, "{id} did not settle");
        std::thread::sleep(Duration::from_millis(10));
    }
    (client, server)
}

/// Urgent request to VMs running, three ways, on the local batch system with
/// sim nodes: from a warm snapshot on an idle pool slot, on an idle pool
/// slot booted from its image, and through the batch system (no pool).
/// Medians over `WSP_BENCH_RUNS` (default 7) each. The sim node boots and
/// restores in no time, so this is the coordinator's and the pilot's own
/// part (HTTP, SQLite, the batch system, the pilot's round trips); the
/// guest's part is BENCHMARKS.md "Warm VMs" (real QEMU).
///
/// `cargo test -p wsp-e2e --test pool -- --ignored --nocapture bench_`
#[test]
#[ignore = "a benchmark: run it by name"]
fn bench_urgent_request_to_running_warm_idle_pilot_and_batch_system() {
    let runs: usize = std::env::var("WSP_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let (c, _store) = warm_cluster();
    let cold_spec = URGENT.replace("debian-12", "alpine-3");
    let mut warm = (Vec::new(), Vec::new());
    let mut cold = (Vec::new(), Vec::new());
    for _ in 0..runs {
        wait_warm(&c, "debian-12");
        let (a, b) = request_to_running(&c, ADMIN_TOKEN, URGENT);
        warm.0.push(a);
        warm.1.push(b);
        wait_warm(&c, "debian-12");
        let (a, b) = request_to_running(&c, ADMIN_TOKEN, &cold_spec);
        cold.0.push(a);
        cold.1.push(b);
    }
    drop(c);
    let batch_cluster = Cluster::start(Options::default());
    let plain = URGENT.replace("urgency = 1\n", "");
    let mut batch = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (a, b) = request_to_running(&batch_cluster, TOKEN, &plain);
        batch.0.push(a);
        batch.1.push(b);
    }
    let (wc, ws) = (median(&mut warm.0), median(&mut warm.1));
    let (cc, cs) = (median(&mut cold.0), median(&mut cold.1));
    let (bc, bs) = (median(&mut batch.0), median(&mut batch.1));
    println!("urgent request -> VMs running, sim nodes, local batch system, medians of {runs}:");
    println!("| path | client (POST to GET running) | coordinator (requested to running) |");
    println!("|---|---|---|");
    println!("| warm snapshot on an idle pool slot | {wc:.1} ms | {ws:.1} ms |");
    println!("| idle pool slot, booted from its image | {cc:.1} ms | {cs:.1} ms |");
    println!("| through the batch system (no pool) | {bc:.1} ms | {bs:.1} ms |");
    println!(
        "batch / idle pool slot: x{:.1} (coordinator), x{:.1} (client)",
        bs / cs.max(0.1),
        bc / cc.max(0.1)
    );
}

#[test]
fn end_leases_on_exit_gives_the_pools_slots_back_too() {
    let mut c = Cluster::start(Options {
        serve_args: vec!["--end-leases-on-exit".into()],
        extra: "max_urgency = 2\n[pool]\nmin_idle_nodes = 1\nmax_nodes = 2\nwalltime_s = 3600\n"
            .into(),
        ..Options::default()
    });
    wait_idle(&c, 1);
    // One lease on a pool slot, the pool grown back to one idle slot.
    let r = c.create_as(ADMIN_TOKEN, URGENT);
    assert!(r.status == 201 || r.status == 200, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.get_as(ADMIN_TOKEN, &id).body["state"] != "running" {
        assert!(Instant::now() < deadline, "not running\n{}", c.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_idle(&c, 1);
    let code = c.terminate_coordinator(Duration::from_secs(30));
    assert_eq!(code, Some(0), "coordinator log:\n{}", c.log());
    c.assert_nodes_restored();
    assert!(
        c.pilot_pids(None).is_empty(),
        "every pilot exited, pool pilots too"
    );
}
