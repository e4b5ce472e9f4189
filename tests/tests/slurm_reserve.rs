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
        extra: format!("\n[reservations]\nlead_s = {LEAD_S}\nhorizon_s = 86400\n"),
        ..Options::default()
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
