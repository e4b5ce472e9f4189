//! Guaranteed leases on a real Grid Engine cell (one exec host,
//! `localhost`, two slots, started by scripts/sge-up.sh with
//! `max_advance_reservations`; run under the system lock): `qrsub` as root
//! (a manager), pilot jobs with `qsub -ar`. Fails with the reason when the
//! cell cannot start.
//!
//! Tolerance: the VM runs no earlier than the staging lead (10 s) before
//! the start and no later than 5 s after it.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use wsp_e2e::*;

static SGE: Mutex<()> = Mutex::new(());

const LEAD_S: i64 = 10;
const ROOT: &str = "/var/lib/gridengine";

fn cluster() -> Cluster {
    cluster_with(Options::default())
}

fn cluster_with(opts: Options) -> Cluster {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/sge-up.sh");
    let out = Command::new(script)
        .output()
        .expect("run scripts/sge-up.sh");
    assert!(
        out.status.success(),
        "Grid Engine did not start (scripts/test.sh installs it: scripts/install-lrm.sh gridengine):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = format!(
        r#"lrm = "gridengine"
[cluster]
nodes = 1
cores_per_node = 2
memory_mb_per_node = 1000
[gridengine]
parallel_environment = "wsp"
notify_s = 5
env = {{ SGE_ROOT = "{ROOT}", SGE_CELL = "default" }}
"#
    );
    Cluster::start(Options {
        memory_mb: 1000,
        lrm: Some(OtherLrm {
            toml,
            nodes: vec!["localhost".into()],
        }),
        extra: format!("\n[reservations]\nlead_s = {LEAD_S}\nhorizon_s = 86400\n"),
        ..opts
    })
}

fn one(extra: &str, duration: &str) -> String {
    format!(
        r#"{extra}
name = "one"
duration = "{duration}"
[[group]]
name = "head"
count = 1
memory_mb = 256
cpus = 1
image = "head.qcow2"
"#
    )
}

/// The cell's advance reservations (`qrstat`), without the header and
/// without those being deleted (state `d`: gone once their jobs are).
fn ars() -> String {
    let out = Command::new("qrstat")
        .env("SGE_ROOT", ROOT)
        .env("SGE_CELL", "default")
        .output()
        .expect("qrstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("wsp-") && l.split_whitespace().nth(3) != Some("d"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn offered_start(error: &str) -> String {
    let (_, rest) = error
        .split_once("(start = \"")
        .unwrap_or_else(|| panic!("no offered start in {error:?}"));
    rest.split('"').next().unwrap().to_string()
}

fn released(c: &Cluster, id: &str) {
    c.wait_for(id, "released", Duration::from_secs(30), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
}

#[test]
fn grid_engine_reservation_runs_its_vm_at_its_start_and_is_deleted_after() {
    let _turn = SGE.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster();
    let r = c.create(&one("start = \"+25s\"", "1h"));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let start = r.body["start_ms"].as_u64().unwrap();
    assert!(
        r.body["reservation"]
            .as_str()
            .unwrap()
            .starts_with("gridengine "),
        "{}",
        r.body
    );
    assert_ne!(ars(), "", "the AR is in the cell");
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    assert!(
        protocol::now_ms() < start + 5000,
        "running {} ms after its start",
        protocol::now_ms().saturating_sub(start)
    );
    let off = v["vms"][0]["start_offset_ms"].as_i64().expect("offset");
    assert!((-LEAD_S * 1000..=5000).contains(&off), "{off} ms: {v:#}");
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_settled(&id);
    released(&c, &id);
    assert_eq!(ars(), "", "the cell's AR deleted");
    c.assert_nodes_restored();
}

#[test]
fn grid_engine_refuses_with_the_earliest_start_and_a_reservation_cancelled_before_its_start_is_deleted(
) {
    let _turn = SGE.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster();
    // Two best-effort leases hold both slots for their h_rt.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let b = c.create(&one("", "2m"));
        assert_eq!(b.status, 201, "{}", b.body);
        let id = b.body["id"].as_str().unwrap().to_string();
        c.wait_for(&id, "running", Duration::from_secs(60), |v| {
            v["state"] == "running"
        });
        busy.push(id);
    }
    let r = c.create(&one("start = \"+30s\"", "10m"));
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("reservation refused: gridengine: qrsub for 1 node(s)")
            && error.contains("no suitable queues"),
        "{error}"
    );
    assert_eq!(ars(), "", "no probe left behind");
    let offered = offered_start(error);
    let r = c.create(&one(&format!("start = \"{offered}\""), "10m"));
    assert_eq!(r.status, 201, "offered {offered}: {}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_ne!(ars(), "");
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    released(&c, &id);
    assert_eq!(ars(), "", "the cell's AR deleted");
    for b in &busy {
        assert_eq!(c.destroy_as(TOKEN, b).status, 200);
        c.wait_settled(b);
    }
}

/// Grid Engine cannot reserve slots that running jobs' h_rt reaches into,
/// and cannot be told they will end (docs/RESERVATIONS.md): a reservation
/// over suspendable best-effort leases is refused, saying so, and they keep
/// running.
#[test]
fn grid_engine_refuses_a_reservation_over_suspendable_best_effort_leases_saying_why() {
    let _turn = SGE.lock().unwrap_or_else(|p| p.into_inner());
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
    let c = cluster_with(
        Options {
            node_config: Some(node_cfg.display().to_string()),
            ..Options::default()
        }
        .with_top(&format!("checkpoint_dir = \"{}\"\n", ckdir.display())),
    );
    let mut busy = Vec::new();
    for _ in 0..2 {
        let b = c.create(&one("", "10m"));
        assert_eq!(b.status, 201, "{}", b.body);
        let id = b.body["id"].as_str().unwrap().to_string();
        c.wait_for(&id, "running", Duration::from_secs(60), |v| {
            v["state"] == "running"
        });
        busy.push(id);
    }
    let r = c.create(&one("start = \"+30s\"", "10m"));
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("reservation refused: gridengine: qrsub for 1 node(s)")
            && error.contains("2 running best-effort lease(s) could be suspended for it, but Grid Engine grants an advance reservation only on slots that no running job's h_rt reaches into"),
        "{error}"
    );
    offered_start(error);
    assert_eq!(ars(), "", "no AR or probe left behind");
    for b in &busy {
        assert_eq!(c.get(b)["state"], "running", "not suspended for nothing");
        assert_eq!(c.destroy_as(TOKEN, b).status, 200);
        c.wait_settled(b);
    }
}
