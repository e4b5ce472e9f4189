//! The Grid Engine adapter against a real Son of Grid Engine cell on this
//! host, started by `scripts/sge-up.sh` (Debian's gridengine-master,
//! gridengine-exec, gridengine-client: `scripts/install-lrm.sh gridengine`).
//! Fails, never skips, when the cell cannot come up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wsp_lrm_adapters::gridengine::{GridEngine, GridEngineConfig};
use wsp_lrm_adapters::{JobId, JobState, JobStatus, Lrm, SlotJob};

fn cell_env() -> &'static BTreeMap<String, String> {
    static ENV: OnceLock<Result<BTreeMap<String, String>, String>> = OnceLock::new();
    let r = ENV.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("scripts/sge-up.sh");
        let out = std::process::Command::new(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!("scripts/sge-up.sh failed ({}): {text}", out.status));
        }
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("export "))
            .ok_or(format!("no export line: {text}"))?;
        Ok(line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    });
    r.as_ref().unwrap_or_else(|e| {
        panic!("real Grid Engine is needed for this test and did not come up: {e}")
    })
}

fn lrm() -> GridEngine {
    GridEngine::new(GridEngineConfig {
        env: cell_env().clone(),
        ..GridEngineConfig::default()
    })
    .unwrap()
}

struct Cleanup(Vec<JobId>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("qdel")
            .args(self.0.iter().map(|i| i.0.clone()))
            .envs(cell_env())
            .output();
    }
}

const PILOT: &str = r#"#!/bin/sh
d=$1
echo "$WSP_NODE" >> "$d/starts"
printf '%s\n' "$2" > "$d/arg"
trap 'echo USR2 >> "$d/signals"' USR2
while :; do sleep 0.2; done
"#;

fn job(dir: &Path) -> SlotJob {
    std::fs::write(dir.join("pilot.sh"), PILOT).unwrap();
    SlotJob {
        name: "wsp-sl-sge".into(),
        nodes: 1,
        cores_per_node: 1,
        memory_mb_per_node: 100,
        walltime: Duration::from_secs(600),
        pilot_argv: vec![
            "/bin/sh".into(),
            dir.join("pilot.sh").display().to_string(),
            dir.display().to_string(),
            "it's %n".into(),
        ],
        workdir: PathBuf::from(dir),
    }
}

async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) {
    let t = Instant::now();
    while !f().await {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pilot_runs_through_qrsh_inherit_gets_sigusr2_on_cancel_and_vanishes() {
    let lrm = lrm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let id = lrm.submit(&job(d)).await.unwrap();
    let _cleanup = Cleanup(vec![id.clone()]);
    let l = &lrm;
    let i = &id;
    wait_for(
        "the pilot to start",
        Duration::from_secs(60),
        || async move { d.join("arg").exists() },
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(d.join("arg")).unwrap(),
        "it's %n\n",
        "argv intact through qrsh -inherit"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("starts"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    let bogus = JobId("999999".into());
    let answer = lrm
        .status(&[id.clone(), bogus.clone(), JobId("x".into())])
        .await
        .unwrap();
    assert_eq!(answer[&id], JobStatus::Known(JobState::Running));
    assert_eq!(answer[&bogus], JobStatus::NotFound);
    lrm.cancel(&id).await.unwrap();
    wait_for(
        "SIGUSR2 at the pilot",
        Duration::from_secs(20),
        || async move { d.join("signals").exists() },
    )
    .await;
    wait_for("the job to leave qstat after notify", Duration::from_secs(40), || async move {
        l.status(std::slice::from_ref(i)).await.unwrap()[i] == JobStatus::NotFound
    })
    .await;
    lrm.cancel(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_is_checked_against_the_queues_notify() {
    let lrm = lrm();
    assert_eq!(lrm.warning().signal, "SIGUSR2");
    assert_eq!(lrm.check_grace().await.unwrap(), Duration::from_secs(5));
    let too_long = GridEngine::new(GridEngineConfig {
        notify_s: 60,
        env: cell_env().clone(),
        ..GridEngineConfig::default()
    })
    .unwrap();
    assert!(too_long
        .check_grace()
        .await
        .unwrap_err()
        .to_string()
        .contains("notify"));
}

/// Issue 19 item 9: a job that cannot start yet (more slots than the cell
/// has free) is queued, and its reason is its qstat state in words.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_job_says_why_in_grid_engines_terms() {
    let lrm = lrm();
    let dir = tempfile::tempdir().unwrap();
    let mut big = job(dir.path());
    big.name = "wsp-sl-sge-wait".into();
    big.nodes = 64;
    let id = lrm.submit(&big).await.unwrap();
    let _cleanup = Cleanup(vec![id.clone()]);
    let l = &lrm;
    let i = &id;
    wait_for("qstat to list it", Duration::from_secs(20), || async move {
        matches!(
            l.status(std::slice::from_ref(i)).await.unwrap()[i],
            JobStatus::Known(_)
        )
    })
    .await;
    let r = lrm
        .status_with_reasons(std::slice::from_ref(&id))
        .await
        .unwrap();
    assert_eq!(r[&id].status, JobStatus::Known(JobState::Queued), "{r:?}");
    assert_eq!(
        r[&id].reason.as_deref(),
        Some("qw: waiting for free slots"),
        "{r:?}"
    );
    lrm.cancel(&id).await.unwrap();
}
