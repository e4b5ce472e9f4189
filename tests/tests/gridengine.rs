//! The coordinator with `lrm = "gridengine"`: a real Son of Grid Engine cell
//! (one exec host, `localhost`, started by scripts/sge-up.sh), pilots started
//! through `qrsh -inherit`, preemption by `qdel` delivered as SIGUSR2
//! thanks to `qsub -notify`. Fails with the reason when the cell cannot start.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use wsp_e2e::*;

static SGE: Mutex<()> = Mutex::new(());

fn sge_env() -> (String, String) {
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
    ("/var/lib/gridengine".into(), "default".into())
}

fn cluster() -> Cluster {
    let (root, cell) = sge_env();
    let toml = format!(
        r#"lrm = "gridengine"
[cluster]
nodes = 1
cores_per_node = 2
memory_mb_per_node = 1000
[gridengine]
parallel_environment = "wsp"
notify_s = 5
env = {{ SGE_ROOT = "{root}", SGE_CELL = "{cell}" }}
"#
    );
    Cluster::start(Options {
        memory_mb: 1000,
        lrm: Some(OtherLrm {
            toml,
            nodes: vec!["localhost".into()],
        }),
        ..Options::default()
    })
}

const ONE: &str = r#"
name = "one"
duration = "1h"
[[group]]
name = "head"
count = 1
memory_mb = 512
cpus = 1
image = "head.qcow2"
"#;

fn id_of(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

#[test]
fn gridengine_workspace_runs_through_qrsh_inherit_and_destroy_restores_the_node() {
    let _turn = SGE.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster();
    let id = id_of(&c.create(ONE));
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    assert_eq!(v["vms"][0]["node"], "localhost", "{v:#}");
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "destroyed", "{v:#}");
    c.assert_nodes_restored();
    c.assert_pilots_exited();
}

#[test]
fn qdel_of_a_pilot_job_reaches_the_pilot_as_sigusr2_and_is_handled_as_preemption() {
    let _turn = SGE.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster();
    let id = id_of(&c.create(ONE));
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let job = v["slots"][0]["job_id"].as_str().unwrap().to_string();
    let pids = c.pilot_pids(None);
    assert_eq!(pids.len(), 1);
    let out = Command::new("qdel")
        .arg(&job)
        .env("SGE_ROOT", "/var/lib/gridengine")
        .env("SGE_CELL", "default")
        .output()
        .expect("qdel");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The queue's notify time is 5 s: the pilot must be gone before SIGKILL.
    let t = wait_gone(pids[0], Duration::from_secs(8)).expect("pilot exits");
    assert!(
        t < Duration::from_secs(5),
        "pilot took {t:?}, past the notify time"
    );
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "preempted", "{v:#}");
    assert!(v["reason"].as_str().unwrap().contains("SIGUSR2"), "{v:#}");
    c.assert_nodes_restored();
}
