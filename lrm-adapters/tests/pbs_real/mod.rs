//! Shared by `openpbs_real.rs` and `torque_real.rs`: the PBS adapter of one
//! flavour against its real server on this host (scripts/pbs-up.sh), jobs
//! owned by the service user, as a site runs them.
//!
//! The server is started once per test binary and stopped when the binary
//! exits if this binary started it. Skipped, with the reason, only when
//! the flavour is neither built nor buildable (no source tarball); a server
//! that is built but does not come up fails the tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wsp_lrm_adapters::pbs::{Flavour, Pbs, PbsConfig};
use wsp_lrm_adapters::{JobId, JobState, JobStatus, Lrm, SlotJob};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn script_name(f: Flavour) -> &'static str {
    match f {
        Flavour::Torque => "torque",
        Flavour::PbsPro => "openpbs",
    }
}

/// A running server: where its commands are and who submits.
pub struct Server {
    pub flavour: Flavour,
    pub prefix: PathBuf,
    pub user: String,
    /// The execution hosts (`pbsn1`, `pbsn2`), each a mom in a network and
    /// UTS namespace of its own (scripts/pbs-common.sh).
    pub nodes: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// qsub/qstat/qdel wrappers that run the real ones as `user`.
    pub wrappers: PathBuf,
}

static STARTED: OnceLock<Flavour> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(f) = STARTED.get() {
        let _ = Command::new(repo_root().join("scripts/pbs-down.sh"))
            .arg(script_name(*f))
            .output();
    }
}

/// The server of `flavour`, started if needed; `None` (after saying why)
/// when the flavour is neither built nor has a source to build from.
pub fn server(flavour: Flavour) -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Option<Server>, String>> = OnceLock::new();
    let r = SERVER.get_or_init(|| start(flavour));
    match r {
        Ok(Some(s)) => Some(s),
        Ok(None) => None,
        Err(e) => panic!(
            "real {} is needed for this test and did not come up: {e}",
            script_name(flavour)
        ),
    }
}

fn start(flavour: Flavour) -> Result<Option<Server>, String> {
    let name = script_name(flavour);
    let out = Command::new(repo_root().join("scripts/pbs-up.sh"))
        .arg(name)
        .output()
        .map_err(|e| format!("cannot run scripts/pbs-up.sh: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(2) {
        // Not built: a failure when its source is there, a skip otherwise.
        let src = Command::new(repo_root().join("scripts/pbs-build.sh"))
            .args(["source", name])
            .output()
            .map_err(|e| format!("cannot run scripts/pbs-build.sh: {e}"))?;
        if src.status.success() {
            return Err(format!(
                "{name} is not built but its source is at {}: run scripts/pbs-build.sh {name} (scripts/test.sh does). {text}",
                String::from_utf8_lossy(&src.stdout).trim()
            ));
        }
        eprintln!("SKIPPED: {name} is not built and no source tarball was found (set WSP_{}_TARBALL or put shared/lrm beside the repo): {text}", name.to_uppercase());
        return Ok(None);
    }
    if !out.status.success() {
        return Err(format!(
            "scripts/pbs-up.sh {name} failed ({}): {text}",
            out.status
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("export ").map(str::to_string))
        .ok_or(format!("no export line: {text}"))?;
    let vars: BTreeMap<String, String> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if vars.get("WSP_PBS_STARTED").map(String::as_str) == Some("1") {
        let _ = STARTED.set(flavour);
        // SAFETY: registers a plain extern "C" function, once.
        unsafe { nix::libc::atexit(stop_at_exit) };
    }
    let prefix = PathBuf::from(&vars["WSP_PBS_PREFIX"]);
    let user = vars["WSP_PBS_USER"].clone();
    let env: BTreeMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("PBS_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let wrappers =
        std::env::temp_dir().join(format!("wsp-pbs-{name}-wrappers-{}", std::process::id()));
    std::fs::create_dir_all(&wrappers).map_err(|e| e.to_string())?;
    for cmd in ["qsub", "qstat", "qdel"] {
        let w = wrappers.join(cmd);
        std::fs::write(
            &w,
            format!(
                "#!/bin/sh\n# {cmd} as the service user, as a site's coordinator runs it\nexec /usr/sbin/runuser -u {user} -- {} \"$@\"\n",
                prefix.join("bin").join(cmd).display()
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
    }
    Ok(Some(Server {
        flavour,
        prefix,
        nodes: vars["WSP_PBS_NODES"]
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
        user,
        env,
        wrappers,
    }))
}

/// One test at a time: they share the node, and one stops the server.
pub async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

impl Server {
    pub fn config(&self) -> PbsConfig {
        PbsConfig {
            qsub: Some(self.wrappers.join("qsub")),
            qstat: Some(self.wrappers.join("qstat")),
            qdel: Some(self.wrappers.join("qdel")),
            pbsdsh: Some(self.prefix.join("bin/pbsdsh")),
            kill_delay_s: Some(5),
            command_timeout_s: Some(20),
            env: self.env.clone(),
            ..PbsConfig::default()
        }
    }

    pub fn lrm(&self) -> Pbs {
        Pbs::new(self.flavour, self.config()).unwrap()
    }

    /// A work directory the service user owns.
    pub fn workdir(&self) -> tempfile::TempDir {
        let d = tempfile::Builder::new()
            .prefix("wsp-pbs-test-")
            .tempdir()
            .unwrap();
        let u = nix::unistd::User::from_name(&self.user).unwrap().unwrap();
        std::os::unix::fs::chown(d.path(), Some(u.uid.as_raw()), Some(u.gid.as_raw())).unwrap();
        d
    }

    /// Runs a PBS command as root (an admin's qdel, qstat).
    pub fn admin(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new(self.prefix.join("bin").join(cmd))
            .args(args)
            .envs(&self.env)
            .output()
            .unwrap()
    }

    /// PID of pbs_server (the process running the prefix's binary).
    pub fn server_pid(&self) -> i32 {
        let bin = match self.flavour {
            Flavour::Torque => self.prefix.join("sbin/pbs_server"),
            Flavour::PbsPro => self.prefix.join("sbin/pbs_server.bin"),
        };
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == bin))
            .unwrap_or_else(|| panic!("no process runs {}", bin.display()))
    }
}

/// Cancels its jobs as root (`qdel`) when dropped: a failed test leaves nothing.
pub struct Cleanup<'a>(pub &'a Server, pub Vec<JobId>);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.1.is_empty() {
            let ids: Vec<&str> = self.1.iter().map(|i| i.0.as_str()).collect();
            let _ = self.0.admin("qdel", &ids);
        }
    }
}

/// A stand-in pilot: records its node, its second argument and SIGTERM.
/// Mode (third argument): `trap` ignores SIGTERM (waits for SIGKILL),
/// `term` exits on it, `clean` takes 2 s to "clean up" after it (then
/// writes `cleaned-<node>` and exits 0; like the real pilot it ignores
/// further signals while it cleans up: OpenPBS signals a pilot on the first
/// host twice, once from its mom and once from pbsdsh), `exit0` ends at once
/// with status 0.
/// The trap is set before `starts` is written: a test that signals the job
/// once it sees `starts` never races it.
pub const PILOT: &str = r#"#!/bin/sh
d=$1
node=$(hostname)
case $3 in
exit0) ;;
term) trap 'echo "TERM $(date +%s.%N)" >> "$d/signals-$node"; exit 0' TERM ;;
clean) trap 'trap "" TERM; echo "TERM $(date +%s.%N)" >> "$d/signals-$node"; sleep 2; echo done > "$d/cleaned-$node"; exit 0' TERM ;;
*) trap 'echo "TERM $(date +%s.%N)" >> "$d/signals-$node"' TERM ;;
esac
printf '%s\n' "$2" > "$d/arg-$node"
echo "$node $$" >> "$d/starts"
[ "$3" = exit0 ] && exit 0
# A trapped signal ends `wait` at once; the sleeps are killed with the job.
while :; do sleep 1 & wait $!; done
"#;

pub fn pilot_job(dir: &Path, name: &str, nodes: u32, walltime: Duration, mode: &str) -> SlotJob {
    let pilot = dir.join("pilot.sh");
    std::fs::write(&pilot, PILOT).unwrap();
    std::fs::set_permissions(&pilot, std::fs::Permissions::from_mode(0o755)).unwrap();
    SlotJob {
        name: name.into(),
        nodes,
        cores_per_node: 1,
        memory_mb_per_node: 64,
        walltime,
        pilot_argv: vec![
            pilot.display().to_string(),
            dir.display().to_string(),
            "it's %n --x".into(),
            mode.into(),
        ],
        workdir: dir.to_path_buf(),
    }
}

pub async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> Duration {
    let t = Instant::now();
    while !f().await {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.elapsed()
}

pub async fn one(lrm: &dyn Lrm, id: &JobId) -> JobStatus {
    lrm.status(std::slice::from_ref(id))
        .await
        .unwrap()
        .remove(id)
        .unwrap()
}

/// Processes whose command line names `dir` (the stand-in pilots, and on
/// Torque pbsdsh and the loop beside it): none may outlive their job.
/// OpenPBS's qsub leaves a helper for 60 s (`qsub <script>`, waiting for
/// the user's next submission): not ours, not counted.
pub fn processes_of(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| alive(*pid))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let qsub_helper = cmd.split(' ').next().is_some_and(|a| a.ends_with("/qsub"));
            (cmd.contains(&dir) && !qsub_helper).then(|| format!("{pid} {cmd}"))
        })
        .collect()
}

/// Waits (10 s at most) until no process names `dir`.
pub async fn assert_nothing_left(dir: &Path) {
    let t = Instant::now();
    while !processes_of(dir).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "left behind by a finished job: {:?}",
            processes_of(dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

// ---------------------------------------------------------------------------
// The scenarios, run by both flavours' test files.

/// Pilots start through pbsdsh on the node with their argv intact; qdel
/// (through cancel) sends SIGTERM at once and SIGKILL after kill_delay; the
/// job then reads as Cancelled, and a second cancel is fine.
pub async fn cancel_sends_sigterm_then_sigkill_after_kill_delay(s: &Server) {
    let lrm = s.lrm();
    let dir = s.workdir();
    let d = dir.path();
    let id = lrm
        .submit(&pilot_job(
            d,
            "wsp-sl-cancel",
            1,
            Duration::from_secs(600),
            "trap",
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(s, vec![id.clone()]);
    assert!(id.0.contains('.'), "ids are N.server: {id}");
    wait_for("the pilot to start", Duration::from_secs(60), || async {
        d.join("starts").exists()
    })
    .await;
    let starts = std::fs::read_to_string(d.join("starts")).unwrap();
    assert_eq!(
        starts.lines().count(),
        1,
        "one pilot for a one-node job: {starts}"
    );
    let (node, pid) = starts.trim().split_once(' ').unwrap();
    let pid: i32 = pid.parse().unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join(format!("arg-{node}"))).unwrap(),
        "it's %n --x\n",
        "argv intact through pbsdsh"
    );
    assert_eq!(one(&lrm, &id).await, JobStatus::Known(JobState::Running));
    let listed = lrm.list_jobs().await.unwrap().unwrap();
    assert!(
        listed.contains(&(id.clone(), "wsp-sl-cancel".to_string())),
        "{listed:?}"
    );

    let t0 = Instant::now();
    lrm.cancel(&id).await.unwrap();
    let sigterm = wait_for("SIGTERM at the pilot", Duration::from_secs(10), || async {
        d.join(format!("signals-{node}")).exists()
    })
    .await;
    assert!(
        sigterm < Duration::from_secs(3),
        "SIGTERM after {sigterm:?}"
    );
    let deadline = t0 + Duration::from_secs(30);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pilot {pid} still alive 30 s after qdel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = t0.elapsed();
    assert!(
        killed >= Duration::from_secs(4) && killed < Duration::from_secs(15),
        "a pilot that ignores SIGTERM is SIGKILLed after kill_delay (5 s): {killed:?}"
    );
    wait_for(
        "the job to read as cancelled",
        Duration::from_secs(60),
        || async { one(&lrm, &id).await == JobStatus::Known(JobState::Cancelled) },
    )
    .await;
    assert!(
        !lrm.list_jobs()
            .await
            .unwrap()
            .unwrap()
            .iter()
            .any(|(i, _)| *i == id),
        "finished jobs are not listed"
    );
    lrm.cancel(&id)
        .await
        .expect("cancelling a finished job is fine");
    assert_nothing_left(d).await;
    eprintln!(
        "{}: SIGTERM {sigterm:?} after qdel, pilot SIGKILLed after {killed:?}",
        script_name(s.flavour)
    );
}

/// A pilot that needs 2 s to clean up after qdel's SIGTERM gets them (the
/// grace is kill_delay, 5 s); the job then reads as cancelled (on Torque
/// as soon as the pilot is done) and nothing of it is left.
pub async fn qdel_leaves_the_pilot_its_cleanup_and_the_job_ends_with_it(s: &Server) {
    let lrm = s.lrm();
    let dir = s.workdir();
    let d = dir.path();
    let id = lrm
        .submit(&pilot_job(
            d,
            "wsp-sl-clean",
            1,
            Duration::from_secs(600),
            "clean",
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(s, vec![id.clone()]);
    wait_for("the pilot to start", Duration::from_secs(60), || async {
        d.join("starts").exists()
    })
    .await;
    let starts = std::fs::read_to_string(d.join("starts")).unwrap();
    let node = starts.split_whitespace().next().unwrap().to_string();
    let t0 = Instant::now();
    let out = s.admin("qdel", &[&id.0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the job to read as cancelled",
        Duration::from_secs(30),
        || async { one(&lrm, &id).await == JobStatus::Known(JobState::Cancelled) },
    )
    .await;
    let ended = t0.elapsed();
    assert!(
        d.join(format!("cleaned-{node}")).exists(),
        "the pilot finished its 2 s cleanup before the job ended (ended after {ended:?})"
    );
    // Torque: the job script ends when pbsdsh has seen every pilot end.
    // OpenPBS keeps the job until its MOM's own SIGKILL, kill_delay after
    // qdel but checked only at its next poll (seen: 10-12 s).
    let limit = match s.flavour {
        Flavour::Torque => Duration::from_secs(5),
        Flavour::PbsPro => Duration::from_secs(20),
    };
    assert!(
        ended >= Duration::from_secs(2) && ended < limit,
        "the job ends with its pilot, within {limit:?}: {ended:?}"
    );
    assert_nothing_left(d).await;
    eprintln!(
        "{}: the pilot cleaned up for 2 s after qdel, job ended after {ended:?}",
        script_name(s.flavour)
    );
}

/// A two-node job: pbsdsh starts one pilot on each execution host (each
/// sees its own host name with its argv intact), and qdel ends the job and
/// leaves nothing. OpenPBS: SIGTERM reaches both pilots there and each gets
/// its 2 s of cleanup. Torque 6.1: its mom SIGKILLs the tasks of a
/// multi-node job at qdel whatever kill_delay says (docs/LRM.md, "Torque:
/// no grace for multi-node jobs"), so neither pilot finishes its cleanup and
/// the job ends at once: should a Torque do better, this fails and the docs
/// and the coordinator's warning go.
pub async fn two_nodes_get_a_pilot_each_and_qdel_ends_both(s: &Server) {
    assert_eq!(
        s.nodes.len(),
        2,
        "scripts/pbs-up.sh starts two execution hosts"
    );
    let lrm = s.lrm();
    let dir = s.workdir();
    let d = dir.path();
    let id = lrm
        .submit(&pilot_job(
            d,
            "wsp-sl-two",
            2,
            Duration::from_secs(600),
            "clean",
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(s, vec![id.clone()]);
    let lines = || {
        std::fs::read_to_string(d.join("starts"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_for("both pilots to start", Duration::from_secs(60), || async {
        lines() >= 2
    })
    .await;
    let starts = std::fs::read_to_string(d.join("starts")).unwrap();
    let mut nodes: Vec<&str> = starts
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    nodes.sort();
    assert_eq!(nodes, s.nodes, "one pilot on each host: {starts}");
    for n in &nodes {
        assert_eq!(
            std::fs::read_to_string(d.join(format!("arg-{n}"))).unwrap(),
            "it's %n --x\n",
            "argv intact through pbsdsh on {n}"
        );
    }
    assert_eq!(one(&lrm, &id).await, JobStatus::Known(JobState::Running));
    let t0 = Instant::now();
    let out = s.admin("qdel", &[&id.0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the job to read as cancelled",
        Duration::from_secs(30),
        || async { one(&lrm, &id).await == JobStatus::Known(JobState::Cancelled) },
    )
    .await;
    let ended = t0.elapsed();
    let files: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let output = std::fs::read_to_string(d.join("wsp-sl-two.out")).unwrap_or_default();
    if s.flavour == Flavour::Torque {
        for n in &nodes {
            assert!(
                !d.join(format!("cleaned-{n}")).exists(),
                "Torque gave the pilot on {n} its cleanup: update docs/LRM.md and the adapter's warning"
            );
        }
        assert!(
            ended < Duration::from_secs(4),
            "the job ends at once, long before kill_delay (5 s): {ended:?}"
        );
        assert_nothing_left(d).await;
        eprintln!("torque: two hosts, qdel SIGKILLed both pilots, job ended after {ended:?}");
        return;
    }
    for n in &nodes {
        assert!(
            d.join(format!("signals-{n}")).exists(),
            "the pilot on {n} got SIGTERM (job ended after {ended:?}; files {files:?}; job output: {output})"
        );
        assert!(
            d.join(format!("cleaned-{n}")).exists(),
            "the pilot on {n} finished its 2 s cleanup before the job ended (after {ended:?}; signals: {:?})",
            std::fs::read_to_string(d.join(format!("signals-{n}"))).unwrap_or_default()
        );
    }
    assert_nothing_left(d).await;
    eprintln!(
        "{}: two hosts, both pilots cleaned up after qdel, job ended after {ended:?}",
        script_name(s.flavour)
    );
}

/// One status query answers a running, a finished, an unknown and a bogus id.
pub async fn batched_status_of_live_finished_and_unknown_ids(s: &Server) {
    let lrm = s.lrm();
    let (a, b) = (s.workdir(), s.workdir());
    let live = lrm
        .submit(&pilot_job(
            a.path(),
            "wsp-sl-live",
            1,
            Duration::from_secs(600),
            "term",
        ))
        .await
        .unwrap();
    let done = lrm
        .submit(&pilot_job(
            b.path(),
            "wsp-sl-done",
            1,
            Duration::from_secs(600),
            "exit0",
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(s, vec![live.clone(), done.clone()]);
    wait_for(
        "the short job to complete",
        Duration::from_secs(60),
        || async { one(&lrm, &done).await == JobStatus::Known(JobState::Completed) },
    )
    .await;
    wait_for("the long job to run", Duration::from_secs(60), || async {
        one(&lrm, &live).await == JobStatus::Known(JobState::Running)
    })
    .await;
    let server = live.0.split_once('.').map(|(_, s)| s).unwrap_or_default();
    let unknown = JobId(format!("987654.{server}"));
    let bogus = JobId("-x".into());
    let answer = lrm
        .status(&[live.clone(), done.clone(), unknown.clone(), bogus.clone()])
        .await
        .unwrap();
    assert_eq!(answer[&live], JobStatus::Known(JobState::Running));
    assert_eq!(answer[&done], JobStatus::Known(JobState::Completed));
    assert_eq!(answer[&unknown], JobStatus::NotFound);
    assert_eq!(answer[&bogus], JobStatus::NotFound);
    assert_eq!(answer.len(), 4);
    // Only unknown ids: still an answer for each.
    let answer = lrm.status(std::slice::from_ref(&unknown)).await.unwrap();
    assert_eq!(answer[&unknown], JobStatus::NotFound);
    lrm.cancel(&live).await.unwrap();
}

/// A job past its walltime is ended by the mom and reads as Timeout.
pub async fn walltime_ends_the_job_as_timeout(s: &Server) {
    let lrm = s.lrm();
    let dir = s.workdir();
    let d = dir.path();
    let id = lrm
        .submit(&pilot_job(
            d,
            "wsp-sl-wall",
            1,
            Duration::from_secs(3),
            "term",
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(s, vec![id.clone()]);
    wait_for("the pilot to start", Duration::from_secs(60), || async {
        d.join("starts").exists()
    })
    .await;
    let t = wait_for("the walltime kill", Duration::from_secs(150), || async {
        one(&lrm, &id).await.clone() == JobStatus::Known(JobState::Timeout)
    })
    .await;
    let signals: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("signals-"))
        .collect();
    assert_eq!(signals.len(), 1, "the pilot got SIGTERM before the end");
    eprintln!(
        "{}: walltime 3 s, Timeout seen after {t:?}",
        script_name(s.flavour)
    );
}

/// While the server does not answer, cancel retries; it succeeds once the
/// server is back. When it never answers, cancel fails and the job is kept.
pub async fn cancel_is_retried_while_the_server_does_not_answer(s: &Server) {
    use nix::sys::signal::{kill, Signal};
    let lrm = Pbs::new(
        s.flavour,
        PbsConfig {
            command_timeout_s: Some(2),
            cancel_attempts: Some(4),
            ..s.config()
        },
    )
    .unwrap();
    let dir = s.workdir();
    let d = dir.path();
    let id = lrm
        .submit(&pilot_job(
            d,
            "wsp-sl-retry",
            1,
            Duration::from_secs(600),
            "term",
        ))
        .await
        .unwrap();
    let _cleanup = Cleanup(s, vec![id.clone()]);
    wait_for("the pilot to start", Duration::from_secs(60), || async {
        d.join("starts").exists()
    })
    .await;
    let server = nix::unistd::Pid::from_raw(s.server_pid());

    // Never back within the attempts: an error naming the timeout; the job is untouched.
    let short = Pbs::new(
        s.flavour,
        PbsConfig {
            command_timeout_s: Some(1),
            cancel_attempts: Some(2),
            ..s.config()
        },
    )
    .unwrap();
    kill(server, Signal::SIGSTOP).unwrap();
    let e = short.cancel(&id).await;
    kill(server, Signal::SIGCONT).unwrap();
    let e = e.expect_err("the server never answered");
    assert!(e.to_string().contains("did not finish"), "{e}");
    assert_eq!(
        one(&lrm, &id).await,
        JobStatus::Known(JobState::Running),
        "job kept"
    );

    // Back after 3 s: the second or third attempt gets through.
    kill(server, Signal::SIGSTOP).unwrap();
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        kill(server, Signal::SIGCONT).unwrap();
    });
    let t = Instant::now();
    let r = lrm.cancel(&id).await;
    resume.join().unwrap();
    r.expect("cancel gets through once the server answers");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "at least one attempt timed out: {:?}",
        t.elapsed()
    );
    wait_for("the job to end", Duration::from_secs(60), || async {
        matches!(
            one(&lrm, &id).await,
            JobStatus::Known(JobState::Cancelled) | JobStatus::NotFound
        )
    })
    .await;
}

/// The grace is checked against the queue's kill_delay (5 s, pbs-up.sh).
pub async fn grace_is_checked_against_the_queues_kill_delay(s: &Server) {
    let lrm = s.lrm();
    assert_eq!(lrm.warning().signal, "SIGTERM");
    assert_eq!(
        lrm.check_grace().await.unwrap(),
        Some(Duration::from_secs(5))
    );
    let too_long = Pbs::new(
        s.flavour,
        PbsConfig {
            kill_delay_s: Some(30),
            ..s.config()
        },
    )
    .unwrap();
    let e = too_long.check_grace().await.unwrap_err().to_string();
    assert!(e.contains("kill_delay is 5 s"), "{e}");
}

/// A submit the server refuses keeps qsub's message; nothing is queued.
pub async fn a_refused_submit_keeps_the_servers_message(s: &Server) {
    let lrm = Pbs::new(
        s.flavour,
        PbsConfig {
            queue: Some("nosuchq".into()),
            ..s.config()
        },
    )
    .unwrap();
    let dir = s.workdir();
    let e = lrm
        .submit(&pilot_job(
            dir.path(),
            "wsp-sl-refused",
            1,
            Duration::from_secs(60),
            "term",
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("queue"), "{e}");
}
