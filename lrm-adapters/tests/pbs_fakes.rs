//! The Torque and PBS Pro adapters against fake `qsub`/`qstat`/`qdel`/
//! `pbsdsh` (tests/fixtures/bin-pbs) that print what the real servers print
//! (sources: tests/fixtures/README.md). Neither LRM installs on Debian 12.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wsp_lrm_adapters::pbspro::{PbsPro, PbsProConfig};
use wsp_lrm_adapters::torque::{Torque, TorqueConfig};
use wsp_lrm_adapters::{JobId, JobState, JobStatus, Lrm, SlotJob};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    Torque,
    PbsPro,
}

/// An adapter whose commands are the fakes, with their state in `dir`.
fn adapter(flavour: Flavour, dir: &Path) -> Arc<dyn Lrm> {
    let bin = fixtures().join("bin-pbs");
    let name = if flavour == Flavour::Torque {
        "torque"
    } else {
        "pbspro"
    };
    let env = BTreeMap::from([
        ("FAKE_PBS_DIR".to_string(), dir.display().to_string()),
        ("FAKE_PBS_FLAVOUR".to_string(), name.to_string()),
    ]);
    match flavour {
        Flavour::Torque => Arc::new(
            Torque::new(TorqueConfig {
                qsub: bin.join("qsub"),
                qstat: bin.join("qstat"),
                qdel: bin.join("qdel"),
                pbsdsh: bin.join("pbsdsh"),
                env,
                command_timeout_s: 10,
                ..TorqueConfig::default()
            })
            .unwrap(),
        ),
        Flavour::PbsPro => Arc::new(
            PbsPro::new(PbsProConfig {
                qsub: bin.join("qsub"),
                qstat: bin.join("qstat"),
                qdel: bin.join("qdel"),
                pbsdsh: bin.join("pbsdsh"),
                env,
                command_timeout_s: 10,
                ..PbsProConfig::default()
            })
            .unwrap(),
        ),
    }
}

fn job(workdir: &Path, argv: Vec<String>) -> SlotJob {
    SlotJob {
        name: "wsp-sl-0123abcd".into(),
        nodes: 2,
        cores_per_node: 4,
        memory_mb_per_node: 1024,
        walltime: Duration::from_secs(3600),
        pilot_argv: argv,
        workdir: workdir.to_path_buf(),
    }
}

fn set_state(state_dir: &Path, seq: &str, state: &str) {
    let f = state_dir.join("jobs").join(seq);
    let text = std::fs::read_to_string(&f).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("    job_state = ") {
                format!("    job_state = {state}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(f, text + "\n").unwrap();
}

fn calls(state_dir: &Path, cmd: &str) -> usize {
    std::fs::read_to_string(state_dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(cmd))
        .count()
}

async fn one(lrm: &dyn Lrm, id: &JobId) -> JobStatus {
    lrm.status(std::slice::from_ref(id))
        .await
        .unwrap()
        .remove(id)
        .unwrap()
}

async fn life_of_a_job(flavour: Flavour, finished: &str) {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        state.path().join("qsub.banner"),
        "NOTICE: project wsp has 1200 core-hours left\n",
    )
    .unwrap();
    let lrm = adapter(flavour, state.path());
    let id = lrm
        .submit(&job(work.path(), vec!["/opt/wsp/pilot".into()]))
        .await
        .unwrap();
    let server = if flavour == Flavour::Torque {
        "torque01.cluster.example.org"
    } else {
        "pbs01"
    };
    assert_eq!(
        id.0,
        format!("100.{server}"),
        "the id line, not the site's banner"
    );
    assert!(
        work.path().join("wsp-sl-0123abcd.pbs").exists(),
        "script written into the workdir"
    );
    assert_eq!(one(&*lrm, &id).await, JobStatus::Known(JobState::Queued));
    set_state(state.path(), "100", "R");
    assert_eq!(one(&*lrm, &id).await, JobStatus::Known(JobState::Running));
    lrm.cancel(&id).await.unwrap();
    assert_eq!(
        one(&*lrm, &id).await,
        JobStatus::Known(JobState::Cancelled),
        "{finished} with exit status 271"
    );
    // Cancelling a finished job is not an error ("invalid state ... COMPLETE" / "Job has finished").
    lrm.cancel(&id).await.unwrap();
    // The server forgets finished jobs: NotFound, and cancel is still fine.
    std::fs::remove_file(state.path().join("jobs/100")).unwrap();
    assert_eq!(one(&*lrm, &id).await, JobStatus::NotFound);
    lrm.cancel(&id).await.unwrap();
}

#[tokio::test]
async fn torque_job_is_submitted_seen_running_cancelled_and_forgotten() {
    life_of_a_job(Flavour::Torque, "C").await;
}

#[tokio::test]
async fn pbspro_job_is_submitted_seen_running_cancelled_and_forgotten() {
    life_of_a_job(Flavour::PbsPro, "F").await;
}

async fn one_query_answers_live_unknown_and_bogus_ids(flavour: Flavour) {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let lrm = adapter(flavour, state.path());
    let a = lrm
        .submit(&job(work.path(), vec!["/bin/true".into()]))
        .await
        .unwrap();
    let b = lrm
        .submit(&job(work.path(), vec!["/bin/true".into()]))
        .await
        .unwrap();
    set_state(state.path(), "101", "H");
    // 100 with a short server name (qstat printed the long one), 4242 purged, and junk.
    let short_a = JobId("100.torque01".into());
    let ids = vec![
        short_a.clone(),
        b.clone(),
        JobId("4242.torque01".into()),
        JobId("-a".into()),
        JobId("x.y".into()),
    ];
    let before = calls(state.path(), "qstat");
    let answer = lrm.status(&ids).await.unwrap();
    assert_eq!(
        calls(state.path(), "qstat") - before,
        1,
        "one qstat for the whole batch"
    );
    assert_eq!(answer.len(), ids.len());
    assert_eq!(
        answer[&short_a],
        JobStatus::Known(JobState::Queued),
        "matched by sequence number: {a}"
    );
    assert_eq!(answer[&b], JobStatus::Known(JobState::Held));
    for gone in &ids[2..] {
        assert_eq!(answer[gone], JobStatus::NotFound, "{gone}");
    }
}

#[tokio::test]
async fn torque_one_query_answers_live_unknown_and_bogus_ids() {
    one_query_answers_live_unknown_and_bogus_ids(Flavour::Torque).await;
}

#[tokio::test]
async fn pbspro_one_query_answers_live_unknown_and_bogus_ids() {
    one_query_answers_live_unknown_and_bogus_ids(Flavour::PbsPro).await;
}

/// Replays a recorded qstat answer: stdout, stderr, exit code.
fn replay(state: &Path, out: &str, err: &str, rc: i32) {
    std::fs::write(state.join("qstat.out"), out).unwrap();
    std::fs::write(state.join("qstat.err"), err).unwrap();
    std::fs::write(state.join("qstat.rc"), rc.to_string()).unwrap();
}

#[tokio::test]
async fn torque_partial_output_with_nonzero_exit_still_answers_every_id() {
    let state = tempfile::tempdir().unwrap();
    let lrm = adapter(Flavour::Torque, state.path());
    let recorded = std::fs::read_to_string(fixtures().join("torque/qstat-f-mixed.txt")).unwrap();
    let unknown = std::fs::read_to_string(fixtures().join("torque/qstat-unknown.stderr")).unwrap();
    replay(state.path(), &recorded, &unknown, 153);
    let ids: Vec<JobId> = [
        "103.torque01.cluster.example.org",
        "107.torque01",
        "108.torque01.cluster.example.org",
        "4242.torque01",
        "4243.torque01",
    ]
    .iter()
    .map(|s| JobId(s.to_string()))
    .collect();
    let answer = lrm.status(&ids).await.unwrap();
    assert_eq!(answer[&ids[0]], JobStatus::Known(JobState::Running));
    assert_eq!(answer[&ids[1]], JobStatus::Known(JobState::Timeout));
    assert_eq!(answer[&ids[2]], JobStatus::Known(JobState::Cancelled));
    assert_eq!(answer[&ids[3]], JobStatus::NotFound);
    assert_eq!(answer[&ids[4]], JobStatus::NotFound);
}

#[tokio::test]
async fn pbspro_finished_without_history_is_not_found() {
    let state = tempfile::tempdir().unwrap();
    let lrm = adapter(Flavour::PbsPro, state.path());
    let recorded = std::fs::read_to_string(fixtures().join("pbspro/qstat-xf-mixed.txt")).unwrap();
    let gone = std::fs::read_to_string(fixtures().join("pbspro/qstat-gone.stderr")).unwrap();
    replay(state.path(), &recorded, &gone, 35);
    let ids: Vec<JobId> = ["2003.pbs01", "2007.pbs01", "3001.pbs01", "3002.pbs01"]
        .iter()
        .map(|s| JobId(s.to_string()))
        .collect();
    let answer = lrm.status(&ids).await.unwrap();
    assert_eq!(answer[&ids[0]], JobStatus::Known(JobState::Running));
    assert_eq!(answer[&ids[1]], JobStatus::Known(JobState::Timeout));
    assert_eq!(answer[&ids[2]], JobStatus::NotFound);
    assert_eq!(answer[&ids[3]], JobStatus::NotFound);
}

#[tokio::test]
async fn a_server_that_does_not_answer_fails_the_query_with_its_message() {
    let state = tempfile::tempdir().unwrap();
    let lrm = adapter(Flavour::Torque, state.path());
    replay(state.path(), "", "Connection refused\nqstat: cannot connect to server torque01 (errno=111) Connection refused\n", 111);
    let e = lrm
        .status(&[JobId("100.torque01".into())])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot connect to server"), "{e}");
}

#[tokio::test]
async fn cancel_retries_until_the_server_answers_and_reports_when_it_never_does() {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let lrm = adapter(Flavour::Torque, state.path());
    let id = lrm
        .submit(&job(work.path(), vec!["/bin/true".into()]))
        .await
        .unwrap();
    std::fs::write(state.path().join("qdel.fail"), "2").unwrap();
    lrm.cancel(&id).await.unwrap();
    assert_eq!(calls(state.path(), "qdel"), 3);
    let id2 = lrm
        .submit(&job(work.path(), vec!["/bin/true".into()]))
        .await
        .unwrap();
    std::fs::write(state.path().join("qdel.fail"), "10").unwrap();
    let e = lrm.cancel(&id2).await.unwrap_err().to_string();
    assert!(e.contains("cannot connect to server"), "{e}");
    assert_eq!(
        one(&*lrm, &id2).await,
        JobStatus::Known(JobState::Queued),
        "the job is still there for a later retry"
    );
}

#[tokio::test]
async fn a_rejected_submit_keeps_the_qsub_message() {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        state.path().join("qsub.reject"),
        "qsub: submit error (Job exceeds queue resource limits MSG=cannot locate feasible nodes (nodes file is empty or all systems are busy))\n",
    )
    .unwrap();
    let lrm = adapter(Flavour::Torque, state.path());
    let e = lrm
        .submit(&job(work.path(), vec!["/bin/true".into()]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot locate feasible nodes"), "{e}");
}

/// Runs the rendered script as the MOM would, with the fake pbsdsh.
async fn script_starts_one_pilot_per_node(flavour: Flavour, nodefile: &str) {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let lrm = adapter(flavour, state.path());
    let rec = work.path().join("rec.sh");
    std::fs::write(
        &rec,
        "#!/bin/sh\nprintf '%s|%s\\n' \"$WSP_NODE\" \"$*\" >> \"$(dirname \"$0\")/started\"\n",
    )
    .unwrap();
    let argv = vec![
        "/bin/sh".into(),
        rec.display().to_string(),
        "--node=%n".into(),
        "-v".into(),
        "it's".into(),
    ];
    let script = lrm.render_script(&job(work.path(), argv));
    std::fs::write(work.path().join("nodes"), nodefile).unwrap();
    let flavour_name = if flavour == Flavour::Torque {
        "torque"
    } else {
        "pbspro"
    };
    let out = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .env("PBS_NODEFILE", work.path().join("nodes"))
        .env("FAKE_PBS_FLAVOUR", flavour_name)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        script
    );
    let mut started: Vec<String> = std::fs::read_to_string(work.path().join("started"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    started.sort();
    assert_eq!(
        started,
        ["cn001|--node=%n -v it's", "cn002|--node=%n -v it's"]
    );
}

#[tokio::test]
async fn torque_script_starts_one_pilot_per_unique_node() {
    script_starts_one_pilot_per_node(
        Flavour::Torque,
        "cn001\ncn001\ncn001\ncn001\ncn002\ncn002\ncn002\ncn002\n",
    )
    .await;
}

#[tokio::test]
async fn pbspro_script_starts_one_pilot_per_chunk() {
    script_starts_one_pilot_per_node(Flavour::PbsPro, "cn001\ncn002\n").await;
}
