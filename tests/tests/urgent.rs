//! Urgent leases end to end (issue 17, engine::urgent): a real coordinator,
//! the local batch system, real pilots on simulated nodes, leases asked
//! for with the `workspace` CLI. One node, so the urgent lease can only run
//! by sharing it (urgency 2) or by taking it from a suspended lease
//! (urgency 1). The sim node records each guest's CPU share.

use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use wsp_e2e::*;

/// Both cores of the node: the local batch system has no room for
/// another pilot job beside it (it places jobs by cores and memory).
const BEST_EFFORT: &str = r#"
name = "batchy"
duration = 3600
[[group]]
name = "work"
count = 1
cpus = 2
memory_mb = 512
image = "debian-12"
"#;

fn urgent_spec(urgency: u8) -> String {
    format!(
        "name = \"urgent\"\nduration = 600\nurgency = {urgency}\n[[group]]\nname = \"now\"\ncount = 1\nmemory_mb = 512\nimage = \"debian-12\"\n"
    )
}

/// `ops` may ask for urgency 2 (alice may not).
fn options() -> Options {
    Options {
        nodes: 1,
        extra: "max_urgency = 2\n".into(),
        ..Options::default()
    }
}

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

/// Creates a lease with the CLI and waits until it runs; its view.
fn create_running(c: &Cluster, token: &str, spec: &str) -> Value {
    let file = c.root().join(format!("spec-{}.toml", rand_suffix()));
    std::fs::write(&file, spec).expect("spec");
    let (code, out, err) = workspace(
        c,
        token,
        &[
            "create",
            "--file",
            file.to_str().expect("path"),
            "--wait",
            "--timeout",
            "60",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}\n{}", c.log());
    let v: Value = serde_json::from_str(&out).expect("create --json prints the view");
    assert_eq!(v["state"], "running", "{v:#}");
    v
}

fn rand_suffix() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// Whether the lease's timeline has a line with `text` (read as the
/// admin, who sees both users' leases).
fn says(c: &Cluster, id: &str, text: &str) -> bool {
    c.timeline_as(ADMIN_TOKEN, id)
        .iter()
        .any(|e| e["detail"].as_str().unwrap_or_default().contains(text))
}

/// The CPU share the sim node recorded for a VM (null: the default).
fn share_of(c: &Cluster, vm: &Value) -> Value {
    let node = c.node(vm["node"].as_str().expect("node"));
    node["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .find(|d| d["name"] == vm["name"])
        .unwrap_or_else(|| panic!("{} not on its node: {node:#}", vm["name"]))["cpu"]
        .clone()
}

/// Pilot jobs the local batch system was ever given.
fn job_count(c: &Cluster) -> usize {
    if !c.root().join("coordinator/local-lrm.json").exists() {
        return 0;
    }
    c.local_jobs()["jobs"].as_array().map_or(0, Vec::len)
}

/// The lease as the admin sees it.
fn view(c: &Cluster, id: &str) -> Value {
    let r = c.get_as(ADMIN_TOKEN, id);
    assert_eq!(r.status, 200, "get {id}: {}", r.body);
    r.body
}

/// Waits until the lease (read as the admin) satisfies `pred`.
fn wait_admin(c: &Cluster, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = view(c, id);
        if pred(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} not {what} within 60 s: {v:#}\n--- coordinator log ---\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

#[test]
fn an_urgency_2_lease_runs_beside_a_capped_best_effort_one_and_the_caps_are_lifted_after() {
    let c = Cluster::start(options());
    let be = create_running(&c, TOKEN, BEST_EFFORT);
    let be_id = id_of(&be);
    let urgent = create_running(&c, ADMIN_TOKEN, &urgent_spec(2));
    let u_id = id_of(&urgent);
    // On the best-effort lease's node, in its slot; no pilot job of its own.
    assert_eq!(urgent["vms"][0]["node"], be["vms"][0]["node"]);
    assert!(urgent["slots"].as_array().expect("slots").is_empty());
    assert_eq!(job_count(&c), 1, "{}", c.local_jobs());
    let be_vm = c.get(&be_id)["vms"][0].clone();
    assert_eq!(share_of(&c, &be_vm)["cap_pct"], 10);
    assert_eq!(share_of(&c, &urgent["vms"][0])["weight"], 900);
    assert!(says(
        &c,
        &be_id,
        &format!("capped to 10 % for urgent lease {u_id} (urgency 2)")
    ));
    assert!(says(
        &c,
        &u_id,
        &format!("beside best-effort lease {be_id}")
    ));

    let (code, out, err) = workspace(&c, ADMIN_TOKEN, &["destroy", &u_id, "--wait"]);
    assert_eq!(code, 0, "{out}\n{err}");
    wait_admin(&c, &u_id, "settled", |v| v["settled"] == true);
    c.wait_for(&be_id, "cap lifted", Duration::from_secs(20), |_| {
        says(&c, &be_id, "CPU cap lifted")
    });
    assert!(share_of(&c, &be_vm).is_null(), "the cap is lifted");
    let node = c.node(be_vm["node"].as_str().expect("node"));
    assert_eq!(
        node["domains"].as_array().map(Vec::len),
        Some(1),
        "{node:#}"
    );
    assert_eq!(c.get(&be_id)["state"], "running");
    let (code, _, err) = workspace(&c, TOKEN, &["destroy", &be_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    c.wait_settled(&be_id);
    c.assert_nodes_restored();
}

fn metrics(c: &Cluster) -> String {
    reqwest::blocking::Client::new()
        .get(format!("{}/metrics", c.url))
        .timeout(Duration::from_secs(30))
        .send()
        .and_then(|r| r.text())
        .expect("GET /metrics")
}

fn caps_stuck(c: &Cluster) -> Option<f64> {
    metrics(c)
        .lines()
        .find_map(|l| l.strip_prefix("wsp_cpu_caps_stuck ")?.trim().parse().ok())
}

/// Waits until the lease's timeline says `text`.
fn wait_says(c: &Cluster, id: &str, text: &str, seconds: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while !says(c, id, text) {
        assert!(
            std::time::Instant::now() < deadline,
            "{id}'s timeline has no {text:?} after {seconds} s: {:#?}\n{}",
            c.timeline_as(ADMIN_TOKEN, id),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sim node's fault knob: every CPU share change fails (or no more).
fn refuse_set_cpu(c: &Cluster, node: &str, reason: Option<&str>) {
    let dir = c.sim_dir(node);
    let mut cmd = Command::new(bin("workspace-pilot"));
    cmd.args(["sim", "refuse-set-cpu", "--dir", dir.to_str().expect("dir")]);
    match reason {
        Some(r) => cmd.args(["--reason", r]),
        None => cmd.arg("--off"),
    };
    let out = cmd.output().expect("run workspace-pilot sim");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_cap_the_node_would_not_lift_stays_visible_and_is_lifted_by_a_later_try() {
    let c = Cluster::start(options());
    let be = create_running(&c, TOKEN, BEST_EFFORT);
    let be_id = id_of(&be);
    let urgent = create_running(&c, ADMIN_TOKEN, &urgent_spec(2));
    let u_id = id_of(&urgent);
    let be_vm = c.get(&be_id)["vms"][0].clone();
    let node = be_vm["node"].as_str().expect("node").to_string();
    assert_eq!(share_of(&c, &be_vm)["cap_pct"], 10);

    // The node's cgroup refuses writes from now on: the lift fails.
    refuse_set_cpu(&c, &node, Some("cpu.max: permission denied (test fault)"));
    let (code, out, err) = workspace(&c, ADMIN_TOKEN, &["destroy", &u_id, "--wait"]);
    assert_eq!(code, 0, "{out}\n{err}");
    wait_says(&c, &be_id, "the CPU cap could NOT be lifted", 30);
    assert_eq!(share_of(&c, &be_vm)["cap_pct"], 10, "still capped");
    let (code, out, err) = workspace(&c, TOKEN, &["status", &be_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("capped: lift pending since"), "{out}");
    assert!(out.contains("permission denied (test fault)"), "{out}");
    assert_eq!(caps_stuck(&c), Some(1.0), "{}", metrics(&c));

    // The node heals: a later try lifts the cap (5 s, then 10 s, ...).
    refuse_set_cpu(&c, &node, None);
    wait_says(&c, &be_id, "CPU cap lifted", 60);
    assert!(share_of(&c, &be_vm).is_null(), "the cap is lifted");
    assert!(says(&c, &be_id, "failed tr"), "after failed tries");
    let refusals = c
        .timeline_as(ADMIN_TOKEN, &be_id)
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("could NOT be lifted")
        })
        .count();
    assert_eq!(refusals, 1, "once per failure streak");
    let (_, out, _) = workspace(&c, TOKEN, &["status", &be_id]);
    assert!(!out.contains("lift pending"), "{out}");
    assert_eq!(caps_stuck(&c), Some(0.0));
    let (code, _, err) = workspace(&c, TOKEN, &["destroy", &be_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    c.wait_settled(&be_id);
    c.assert_nodes_restored();
}

#[test]
fn the_best_effort_lease_ending_first_takes_the_urgent_vm_with_it_and_says_so() {
    let c = Cluster::start(options());
    let be = create_running(&c, TOKEN, BEST_EFFORT);
    let be_id = id_of(&be);
    let u_id = id_of(&create_running(&c, ADMIN_TOKEN, &urgent_spec(2)));
    let (code, _, err) = workspace(&c, TOKEN, &["destroy", &be_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    let u = wait_admin(&c, &u_id, "settled", |v| v["settled"] == true);
    assert_eq!(u["state"], "failed", "{u:#}");
    let reason = u["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("best-effort lease {be_id} ended first")),
        "{reason}"
    );
    c.wait_settled(&be_id);
    c.assert_nodes_restored();
}

#[test]
fn an_urgency_above_the_users_allowance_is_refused_with_both_figures() {
    let c = Cluster::start(options());
    let file = c.root().join("u.toml");
    std::fs::write(&file, urgent_spec(2)).expect("spec");
    let (code, out, err) = workspace(&c, TOKEN, &["create", "--file", file.to_str().expect("p")]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("urgency 2 refused") && err.contains("up to 0"),
        "{err}"
    );
    assert_eq!(job_count(&c), 0, "nothing submitted");
}

#[test]
fn an_urgency_1_lease_takes_a_suspended_leases_node_and_that_lease_resumes_after() {
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
            ..options()
        }
        .with_top(&format!("checkpoint_dir = \"{}\"\n", ckdir.display())),
    );
    let be_id = id_of(&create_running(&c, TOKEN, BEST_EFFORT));
    let urgent = create_running(&c, ADMIN_TOKEN, &urgent_spec(1));
    let u_id = id_of(&urgent);
    assert!(says(
        &c,
        &u_id,
        &format!("suspending best-effort lease(s) {be_id}")
    ));
    assert!(says(
        &c,
        &be_id,
        &format!("suspended for urgent lease {u_id}")
    ));
    let be = c.get(&be_id);
    assert!(
        be["state"] == "suspended" || be["state"] == "resuming",
        "waits for a node: {be:#}"
    );
    let (code, _, err) = workspace(&c, ADMIN_TOKEN, &["destroy", &u_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    let be = c.wait_for(&be_id, "resumed", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    assert_eq!(be["state"], "running");
    let (code, _, err) = workspace(&c, TOKEN, &["destroy", &be_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    c.wait_settled(&be_id);
    c.assert_nodes_restored();
    drop(store);
}
