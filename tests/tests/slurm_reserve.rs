//! Guaranteed leases on a real Slurm (2 nodes, n1 and n2, started by
//! scripts/slurm-up.sh; run under the system lock): `scontrol create
//! reservation` as the coordinator's user (root here, a Slurm operator),
//! pilot jobs with `sbatch --reservation`. Fails with the reason when Slurm
//! cannot start.
//!
//! Tolerance: the VMs run no earlier than the staging lead (10 s) before
//! the start and no later than 5 s after it.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use wsp_e2e::*;

/// Two nodes: the tests take turns.
static SLURM: Mutex<()> = Mutex::new(());

const LEAD_S: i64 = 10;

fn slurm_conf() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/slurm-up.sh");
    let out = Command::new(script)
        .output()
        .expect("run scripts/slurm-up.sh");
    assert!(
        out.status.success(),
        "Slurm did not start (scripts/test.sh installs it: scripts/install-lrm.sh slurm):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .expect("slurm-up prints SLURM_CONF")
        .to_string()
}

fn cluster() -> (Cluster, String) {
    cluster_with(Options::default(), "")
}

/// The cluster, with more options and `[reservations]` lines.
fn cluster_with(opts: Options, reservations: &str) -> (Cluster, String) {
    let conf = slurm_conf();
    let toml = format!(
        r#"lrm = "slurm"
[cluster]
nodes = 2
cores_per_node = 2
memory_mb_per_node = 1000
[slurm]
kill_wait_s = 5
env = {{ SLURM_CONF = "{conf}" }}
"#
    );
    let c = Cluster::start(Options {
        memory_mb: 1000,
        lrm: Some(OtherLrm {
            toml,
            nodes: vec!["n1".into(), "n2".into()],
        }),
        extra: format!("\n[reservations]\nlead_s = {LEAD_S}\nhorizon_s = 86400\n{reservations}"),
        ..opts
    });
    (c, conf)
}

fn pair(extra: &str, duration: &str) -> String {
    format!(
        r#"{extra}
name = "pair"
duration = "{duration}"
[[group]]
name = "worker"
count = 2
memory_mb = 512
cpus = 1
image = "worker.qcow2"
"#
    )
}

/// Slurm's reservations (`scontrol show reservation`), one line each.
fn slurm_reservations(conf: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "reservation", "--oneliner"])
        .env("SLURM_CONF", conf)
        .output()
        .expect("scontrol");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ReservationName=wsp-"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `workspace` CLI against this cluster: (exit code, stdout, stderr).
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

fn offered_start(error: &str) -> String {
    let (_, rest) = error
        .split_once("(start = \"")
        .unwrap_or_else(|| panic!("no offered start in {error:?}"));
    rest.split('"').next().unwrap().to_string()
}

#[test]
fn slurm_reservation_runs_its_vms_at_its_start_and_is_deleted_after() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let (c, conf) = cluster();
    let r = c.create(&pair("start = \"+25s\"", "1h"));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let start = r.body["start_ms"].as_u64().unwrap();
    let held = slurm_reservations(&conf);
    assert!(
        held.contains("NodeCnt=2") && held.contains("Users=root"),
        "{held}"
    );
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    assert!(
        protocol::now_ms() < start + 5000,
        "running {} ms after its start",
        protocol::now_ms().saturating_sub(start)
    );
    for vm in v["vms"].as_array().unwrap() {
        let off = vm["start_offset_ms"].as_i64().expect("offset");
        assert!((-LEAD_S * 1000..=5000).contains(&off), "{off} ms: {v:#}");
    }
    let job = v["slots"][0]["job_id"].as_str().unwrap().to_string();
    let out = Command::new("scontrol")
        .args(["show", "job", &job, "--oneliner"])
        .env("SLURM_CONF", &conf)
        .output()
        .expect("scontrol show job");
    let job_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        job_text.contains(&format!("Reservation={}", "wsp-")),
        "the pilot job runs in our reservation: {job_text}"
    );
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    c.wait_for(&id, "released", Duration::from_secs(30), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
    assert_eq!(slurm_reservations(&conf), "", "Slurm's reservation deleted");
    c.assert_nodes_restored();
}

#[test]
fn slurm_refuses_with_the_earliest_start_and_a_reservation_cancelled_before_its_start_is_deleted() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let (c, conf) = cluster();
    // A best-effort lease holds both nodes for its time limit.
    let busy = c.create(&pair("", "2m"));
    assert_eq!(busy.status, 201, "{}", busy.body);
    let busy_id = busy.body["id"].as_str().unwrap().to_string();
    c.wait_for(&busy_id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let r = c.create(&pair("start = \"+30s\"", "10m"));
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("reservation refused: slurm: scontrol create reservation for 2 node(s)")
            && error.contains("Requested nodes are busy"),
        "{error}"
    );
    let imm = c.create(&pair("kind = \"immediate\"", "10m"));
    assert_eq!(imm.status, 409, "{}", imm.body);
    assert_eq!(slurm_reservations(&conf), "", "no probe left behind");
    // The offered start is granted when asked for, then cancelled before it.
    let offered = offered_start(error);
    let r = c.create(&pair(&format!("start = \"{offered}\""), "10m"));
    assert_eq!(r.status, 201, "offered {offered}: {}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_ne!(slurm_reservations(&conf), "");
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_for(&id, "released", Duration::from_secs(30), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
    assert_eq!(slurm_reservations(&conf), "", "Slurm's reservation deleted");
    assert_eq!(c.destroy_as(TOKEN, &busy_id).status, 200);
    c.wait_settled(&busy_id);
}

#[test]
fn slurm_reservation_over_a_suspendable_best_effort_lease_suspends_it_and_it_resumes_after() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
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
    let (c, conf) = cluster_with(
        Options {
            node_config: Some(node_cfg.display().to_string()),
            ..Options::default()
        }
        .with_top(&format!("checkpoint_dir = \"{}\"\n", ckdir.display())),
        "suspend_before_s = 6\n",
    );
    // A best-effort lease holds both nodes for 10 minutes.
    let be = c.create(&pair("", "10m"));
    assert_eq!(be.status, 201, "{}", be.body);
    let be_id = be.body["id"].as_str().unwrap().to_string();
    let before = c.wait_for(&be_id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let be_jobs: Vec<String> = before["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["job_id"].as_str().map(str::to_string))
        .collect();
    let vm_ids = |v: &serde_json::Value| {
        let mut ids: Vec<String> = v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    // Both nodes are busy until after the start, but the lease on them can
    // be suspended: Slurm grants the nodes by name over its jobs. Asked for
    // from the CLI, as a user would.
    let spec = c.root().join("reservation.toml");
    std::fs::write(&spec, pair("start = \"+30s\"", "1h")).expect("spec");
    let (code, out, err) = workspace(&c, &["create", "--file", spec.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("create --json prints the view");
    let id = r["id"].as_str().unwrap().to_string();
    let start = r["start_ms"].as_u64().unwrap();
    let held = slurm_reservations(&conf);
    assert!(
        held.contains("Nodes=n[1-2]") && held.contains("IGNORE_JOBS"),
        "{held}"
    );
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    for vm in v["vms"].as_array().unwrap() {
        let off = vm["start_offset_ms"].as_i64().expect("offset");
        assert!((-LEAD_S * 1000..=5000).contains(&off), "{off} ms: {v:#}");
    }
    assert!(
        protocol::now_ms() < start + 5000,
        "running {} ms after its start",
        protocol::now_ms().saturating_sub(start)
    );
    // The best-effort lease was saved, its pilot jobs ended, and it waits
    // for new slots (Slurm keeps them out of the reservation).
    let suspended = c.get(&be_id);
    assert!(
        ["suspended", "resuming"].contains(&suspended["state"].as_str().unwrap()),
        "{suspended:#}"
    );
    let (code, out, _) = workspace(&c, &["status", &id]);
    assert_eq!(code, 0);
    assert!(
        out.contains("batch system reservation slurm wsp-") && out.contains("(held)"),
        "{out}"
    );
    for job in &be_jobs {
        let out = Command::new("squeue")
            .args(["-h", "-j", job, "-o", "%T"])
            .env("SLURM_CONF", &conf)
            .output()
            .expect("squeue");
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            !["RUNNING", "PENDING", "SUSPENDED"].contains(&state.as_str()),
            "the suspended lease's job {job} is {state}"
        );
    }
    assert!(
        c.timeline(&id).iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("best-effort workspace {be_id} suspended"))),
        "the reservation's timeline names its victim"
    );
    // Once the reservation gives its nodes back, the lease resumes: the same VMs.
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let after = c.wait_for(&be_id, "running again", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    assert_eq!(vm_ids(&after), vm_ids(&before));
    c.wait_for(&id, "released", Duration::from_secs(60), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
    assert_eq!(slurm_reservations(&conf), "", "Slurm's reservation deleted");
    assert_eq!(c.destroy_as(TOKEN, &be_id).status, 200);
    c.wait_settled(&be_id);
}
