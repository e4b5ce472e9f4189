//! The coordinator with `lrm = "slurm"`: a real Slurm (2 nodes, n1 and n2, on
//! loopback, started by scripts/slurm-up.sh), real pilots under srun on
//! simulated nodes. Fails with the reason when Slurm cannot start.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use wsp_e2e::*;

/// Two nodes: the tests take turns.
static SLURM: Mutex<()> = Mutex::new(());

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
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("export SLURM_CONF="))
        .expect("slurm-up prints SLURM_CONF");
    line.trim_start_matches("export SLURM_CONF=").to_string()
}

fn cluster(top: &str) -> Cluster {
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
    Cluster::start(
        Options {
            memory_mb: 1000,
            lrm: Some(OtherLrm {
                toml,
                nodes: vec!["n1".into(), "n2".into()],
            }),
            ..Options::default()
        }
        .with_top(top),
    )
}

const PAIR: &str = r#"
name = "pair"
duration = "1h"
[[group]]
name = "worker"
count = 2
memory_mb = 512
cpus = 1
image = "worker.qcow2"
"#;

fn squeue_ours(conf_hint: &Cluster) -> String {
    let _ = conf_hint;
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%j %T"])
        .env("SLURM_CONF", slurm_conf())
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("wsp-") && !l.contains("COMPLETED") && !l.contains("CANCELLED"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn id_of(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

#[test]
fn slurm_two_node_workspace_runs_on_both_nodes_and_destroy_restores_them() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("");
    let id = id_of(&c.create(PAIR));
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let mut nodes: Vec<&str> = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["n1", "n2"],
        "one pilot and one VM per Slurm node: {v:#}"
    );
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "destroyed", "{v:#}");
    c.assert_nodes_restored();
    assert_eq!(squeue_ours(&c), "", "no pilot job left running");
}

#[test]
fn scancel_of_a_pilot_job_is_handled_as_preemption() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("");
    let id = id_of(&c.create(PAIR));
    let v = c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let job = v["slots"][0]["job_id"].as_str().unwrap().to_string();
    let pids = c.pilot_pids(None);
    assert_eq!(pids.len(), 2, "two pilots under srun");
    let out = Command::new("scancel")
        .arg(&job)
        .env("SLURM_CONF", slurm_conf())
        .output()
        .expect("scancel");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // KillWait is 5 s: both pilots must be gone before Slurm's SIGKILL.
    for pid in pids {
        let t = wait_gone(pid, Duration::from_secs(8)).expect("pilot exits");
        assert!(
            t < Duration::from_secs(5),
            "pilot {pid} took {t:?}, past KillWait"
        );
    }
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "preempted", "{v:#}");
    c.assert_nodes_restored();
}

#[test]
fn slurm_lease_end_releases_both_nodes_and_ends_the_pilot_job() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    // Slurm's own time limit (SIGTERM at walltime) is tested at the adapter level
    // (lrm-adapters/tests/slurm_real.rs); here the lease ends first, as designed.
    let c = cluster("");
    let id = id_of(&c.create(&PAIR.replace("\"1h\"", "5")));
    c.wait_for(&id, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "expired", "{v:#}");
    c.assert_nodes_restored();
    assert_eq!(squeue_ours(&c), "", "no pilot job left running");
}

#[test]
fn coordinator_refuses_a_grace_longer_than_slurms_killwait() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let conf = slurm_conf();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{d}/data"
lrm = "slurm"
[cluster]
nodes = 2
cores_per_node = 2
memory_mb_per_node = 1000
[slurm]
kill_wait_s = 30
env = {{ SLURM_CONF = "{conf}" }}
[[users]]
name = "a"
token_sha256 = "{h}"
"#,
            d = dir.path().display(),
            h = protocol::auth::token_hash("t")
        ),
    )
    .unwrap();
    let out = Command::new(bin("workspace-coordinator"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KillWait is 5"),
        "the message names the cluster's setting: {err}"
    );
}

#[test]
fn a_batch_job_named_as_ours_that_no_slot_owns_is_cancelled_and_another_coordinators_is_not() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("");
    let conf = slurm_conf();
    let master = std::fs::read_to_string(c.root().join("coordinator/master.key")).unwrap();
    let ours = format!("{}sl-0000abcd", prefix_of(master.trim()));
    let theirs = "wsp-ffffffff-sl-0000abcd".to_string();
    let sbatch = |name: &str| -> String {
        let out = Command::new("sbatch")
            .args([
                "--parsable",
                "-N1",
                "-J",
                name,
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 300",
            ])
            .env("SLURM_CONF", &conf)
            .output()
            .expect("sbatch");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let state = |id: &str| -> String {
        let out = Command::new("squeue")
            .args(["--noheader", "-t", "all", "--format=%T", "--jobs", id])
            .env("SLURM_CONF", &conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // As if an earlier coordinator died between sbatch and recording the id.
    let orphan = sbatch(&ours);
    let foreign = sbatch(&theirs);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !state(&orphan).contains("CANCELLED") {
        assert!(
            std::time::Instant::now() < deadline,
            "orphan job {orphan} not cancelled: {}\n{}",
            state(&orphan),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !state(&foreign).contains("CANCELLED"),
        "another coordinator's job must be left alone"
    );
    let _ = Command::new("scancel")
        .arg(&foreign)
        .env("SLURM_CONF", &conf)
        .status();
    assert!(
        c.log().contains("orphan batch job"),
        "the coordinator logs what it cancelled"
    );
}

/// The job-name prefix a coordinator derives from its master secret.
fn prefix_of(master_hex: &str) -> String {
    let digest = protocol::auth::token_hash(&format!("wsp-coordinator\n{master_hex}"));
    format!("wsp-{}-", &digest[..8])
}

/// Issue 19 item 9: a workspace waiting in Slurm's queue says why, in
/// Slurm's own words (squeue's REASON), not `reason: null`.
#[test]
fn a_workspace_waiting_in_slurms_queue_shows_squeues_reason() {
    let _turn = SLURM.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("");
    let first = id_of(&c.create(PAIR));
    c.wait_for(&first, "running", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    // Both nodes' memory is taken: the next waits for resources, the one
    // after it behind it.
    let second = id_of(&c.create(PAIR));
    let third = id_of(&c.create(PAIR));
    let v2 = c.wait_for(
        &second,
        "given Slurm's reason",
        Duration::from_secs(30),
        |v| v["slots"][0]["queue_reason"].is_string(),
    );
    let v3 = c.wait_for(
        &third,
        "given Slurm's reason",
        Duration::from_secs(30),
        |v| v["slots"][0]["queue_reason"].is_string(),
    );
    assert_eq!(v2["state"], "pending");
    let job = v2["slots"][0]["job_id"].as_str().unwrap();
    let reason = v2["slots"][0]["queue_reason"].as_str().unwrap();
    assert!(
        reason == "Resources" || reason == "Priority",
        "Slurm's reason: {v2:#}"
    );
    assert_eq!(v2["reason"], format!("batch job {job} waits: {reason}"));
    // What squeue itself says of that job (with this cluster's config:
    // slurm_conf() would start a new Slurm).
    let cfg = std::fs::read_to_string(c.root().join("coordinator.toml")).unwrap();
    let conf = cfg
        .split("SLURM_CONF = \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("SLURM_CONF in the coordinator's config")
        .to_string();
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%r", "--jobs", job])
        .env("SLURM_CONF", &conf)
        .output()
        .expect("squeue");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        reason,
        "squeue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r3 = v3["slots"][0]["queue_reason"].as_str().unwrap();
    assert!(r3 == "Resources" || r3 == "Priority", "{v3:#}");
    for id in [&third, &second, &first] {
        assert_eq!(c.destroy_as(TOKEN, id).status, 200);
    }
    for id in [&first, &second, &third] {
        c.wait_for(id, "settled", Duration::from_secs(60), |v| {
            v["settled"] == true
        });
    }
    c.assert_nodes_restored();
    let out = Command::new("squeue")
        .args(["--noheader", "--states=PENDING,RUNNING", "--format=%j"])
        .env("SLURM_CONF", &conf)
        .output()
        .expect("squeue");
    let left = String::from_utf8_lossy(&out.stdout);
    assert!(!left.contains("wsp-"), "no pilot job left: {left}");
}
