//! The Slurm adapter against a real Slurm: a two-node cluster (n1, n2) on
//! loopback started by `scripts/slurm-up.sh` (Debian's slurm-wlm and munge
//! must be installed: `scripts/install-lrm.sh slurm`). Fails, never skips,
//! when Slurm cannot come up. The walltime test takes about 1.5 minutes
//! (Slurm's smallest time limit is one minute, checked every 30 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wsp_lrm_adapters::slurm::{Slurm, SlurmConfig};
use wsp_lrm_adapters::{JobId, JobState, JobStatus, Lrm, SlotJob};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Starts the cluster once per test binary; returns its SLURM_CONF.
fn slurm_conf() -> &'static str {
    static CONF: OnceLock<Result<String, String>> = OnceLock::new();
    let r = CONF.get_or_init(|| {
        let out = std::process::Command::new(repo_root().join("scripts/slurm-up.sh"))
            .output()
            .map_err(|e| format!("cannot run scripts/slurm-up.sh: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "scripts/slurm-up.sh failed ({}): {stderr}{stdout}",
                out.status
            ));
        }
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("export SLURM_CONF="))
            .map(str::to_string)
            .ok_or_else(|| format!("scripts/slurm-up.sh printed no SLURM_CONF: {stdout}{stderr}"))
    });
    match r {
        Ok(c) => c,
        Err(e) => panic!("real Slurm is needed for this test and did not come up: {e}"),
    }
}

fn config() -> SlurmConfig {
    SlurmConfig {
        env: BTreeMap::from([("SLURM_CONF".to_string(), slurm_conf().to_string())]),
        ..SlurmConfig::default()
    }
}

/// Cancels the jobs it holds when dropped (a failed test leaves nothing running).
struct Cleanup(Vec<JobId>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let _ = std::process::Command::new("scancel")
            .args(self.0.iter().map(|i| i.0.clone()))
            .env("SLURM_CONF", slurm_conf())
            .status();
    }
}

/// A stand-in pilot: records its node, its arguments and the signal it gets.
const PILOT: &str = r#"#!/bin/sh
d=$1; node=$SLURMD_NODENAME
echo "$node" >> "$d/starts"
printf '%s\n' "$2" > "$d/arg-$node"
trap 'echo TERM > "$d/term-$node"; exit 0' TERM
while :; do sleep 0.2; done
"#;

fn pilot_job(dir: &Path, name: &str, nodes: u32, walltime: Duration) -> SlotJob {
    std::fs::write(dir.join("pilot.sh"), PILOT).unwrap();
    SlotJob {
        name: name.into(),
        nodes,
        cores_per_node: 1,
        memory_mb_per_node: 100,
        walltime,
        pilot_argv: vec![
            "/bin/sh".into(),
            dir.join("pilot.sh").display().to_string(),
            dir.display().to_string(),
            "it's %n".into(),
        ],
        workdir: dir.to_path_buf(),
    }
}

async fn state(lrm: &Slurm, id: &JobId) -> JobStatus {
    lrm.status(std::slice::from_ref(id))
        .await
        .unwrap()
        .remove(id)
        .unwrap()
}

/// Polls `f` every 200 ms until it is true or `limit` passes.
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

fn starts(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(dir.join("starts"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn two_node_job_runs_one_pilot_per_node_and_cancel_delivers_sigterm() {
    let lrm = Slurm::new(config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = pilot_job(dir.path(), "wsp-sl-twonode", 2, Duration::from_secs(600));
    let id = lrm.submit(&job).await.unwrap();
    let _cleanup = Cleanup(vec![id.clone()]);
    let (d, l, i) = (dir.path(), &lrm, &id);

    wait_for(
        "both pilots to start",
        Duration::from_secs(60),
        || async move { starts(d).len() >= 2 },
    )
    .await;
    assert_eq!(state(&lrm, &id).await, JobStatus::Known(JobState::Running));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        starts(dir.path()),
        ["n1", "n2"],
        "exactly one pilot per node"
    );
    // The argument with a quote and a space arrived intact (%n is the pilot's to expand).
    assert_eq!(
        std::fs::read_to_string(dir.path().join("arg-n1")).unwrap(),
        "it's %n\n"
    );

    lrm.cancel(&id).await.unwrap();
    wait_for(
        "SIGTERM at both pilots",
        Duration::from_secs(20),
        || async move { d.join("term-n1").exists() && d.join("term-n2").exists() },
    )
    .await;
    wait_for(
        "the job to end as cancelled",
        Duration::from_secs(30),
        || async move { state(l, i).await == JobStatus::Known(JobState::Cancelled) },
    )
    .await;
    // Cancelling a job that ended is not an error.
    lrm.cancel(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn walltime_expiry_sends_sigterm_and_ends_in_timeout() {
    // Slurm's smallest limit is 1 minute, enforced every 30 s: ~60-95 s.
    let lrm = Slurm::new(config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = pilot_job(dir.path(), "wsp-sl-walltime", 1, Duration::from_secs(60));
    let script = lrm.render_script(&job);
    assert!(script.contains("#SBATCH --time=1\n"), "{script}");
    let id = lrm.submit(&job).await.unwrap();
    let _cleanup = Cleanup(vec![id.clone()]);
    let (d, l, i) = (dir.path(), &lrm, &id);
    wait_for(
        "the pilot to start",
        Duration::from_secs(60),
        || async move { !starts(d).is_empty() },
    )
    .await;
    let node = starts(dir.path()).remove(0);
    let n = node.as_str();
    wait_for(
        "SIGTERM at walltime",
        Duration::from_secs(150),
        || async move { d.join(format!("term-{n}")).exists() },
    )
    .await;
    wait_for(
        "the job to end in TIMEOUT",
        Duration::from_secs(30),
        || async move { state(l, i).await == JobStatus::Known(JobState::Timeout) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_of_live_and_bogus_ids_answers_each_id() {
    let lrm = Slurm::new(config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = lrm
        .submit(&pilot_job(
            dir.path(),
            "wsp-sl-mixed",
            1,
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(vec![id.clone()]);
    let bogus = ["999999", "abc", "--all", "1.2"].map(|s| JobId(s.into()));
    let mut ids = vec![id.clone()];
    ids.extend(bogus.iter().cloned());
    let answer = lrm.status(&ids).await.unwrap();
    assert_eq!(answer.len(), ids.len());
    assert!(
        matches!(
            answer[&id],
            JobStatus::Known(JobState::Queued | JobState::Running)
        ),
        "live job: {:?}",
        answer[&id]
    );
    for b in &bogus {
        assert_eq!(answer[b], JobStatus::NotFound, "{b}");
    }
    // Only unknown ids: squeue itself fails ("Invalid job id specified"); still one answer each.
    let only_bogus = [JobId("999998".into()), JobId("999999".into())];
    let answer = lrm.status(&only_bogus).await.unwrap();
    assert!(
        only_bogus.iter().all(|b| answer[b] == JobStatus::NotFound),
        "{answer:?}"
    );
    // Cancelling an id Slurm never had is not an error either.
    lrm.cancel(&JobId("999999".into())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_to_a_missing_partition_fails_with_sbatch_message() {
    let lrm = Slurm::new(SlurmConfig {
        partition: Some("nosuchpartition".into()),
        ..config()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = lrm
        .submit(&pilot_job(
            dir.path(),
            "wsp-sl-badpart",
            1,
            Duration::from_secs(60),
        ))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("sbatch") && msg.to_lowercase().contains("partition"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_is_checked_against_the_clusters_kill_wait() {
    let lrm = Slurm::new(config()).unwrap();
    assert_eq!(lrm.check_grace().await.unwrap(), Duration::from_secs(5));
    assert_eq!(lrm.warning().signal, "SIGTERM");
    let too_long = Slurm::new(SlurmConfig {
        kill_wait_s: 60,
        ..config()
    })
    .unwrap();
    let e = too_long.check_grace().await.unwrap_err().to_string();
    assert!(e.contains("KillWait"), "{e}");
}
