//! `[urgency] batch_priority` against the real batch systems (issue 17,
//! docs/POOL.md "Urgent leases: the batch queue"): a real Slurm (two nodes,
//! scripts/slurm-up.sh) and a real Grid Engine cell (one host, two slots,
//! scripts/sge-up.sh), the real coordinator and pilots on simulated nodes.
//!
//! Each test fills the cluster with blocker jobs of its own (not ours:
//! plain batch jobs), queues a best-effort lease, then an urgent one
//! (urgency 1; no lease of ours runs, so none is suspended), and frees room
//! for one of them. With `own` or `operator` the urgent lease's pilot job
//! starts first; with `off` the queue is first come, first served, and the
//! best-effort lease starts first: the same steps, the other order, so the
//! tests fail if the feature breaks.

use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use wsp_e2e::*;

/// One batch system at a time: they share the two cores with everything.
static TURN: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Batch {
    Slurm,
    GridEngine,
}

/// How the test talks to the batch system (its own commands, as root).
struct Site {
    batch: Batch,
    env: Vec<(String, String)>,
}

impl Site {
    fn start(batch: Batch) -> Site {
        let script = match batch {
            Batch::Slurm => "slurm-up.sh",
            Batch::GridEngine => "sge-up.sh",
        };
        let out = Command::new(repo().join("scripts").join(script))
            .output()
            .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
        assert!(
            out.status.success(),
            "{batch:?} did not start (scripts/test.sh installs it: scripts/install-lrm.sh):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = match batch {
            Batch::Slurm => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let conf = stdout
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("export SLURM_CONF="))
                    .expect("slurm-up prints SLURM_CONF")
                    .to_string();
                vec![("SLURM_CONF".to_string(), conf)]
            }
            Batch::GridEngine => vec![
                ("SGE_ROOT".to_string(), "/var/lib/gridengine".to_string()),
                ("SGE_CELL".to_string(), "default".to_string()),
            ],
        };
        Site { batch, env }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Blocker jobs that fill the cluster: Slurm, one job on both nodes
    /// (exclusive); Grid Engine, one job per slot of the host (two).
    fn fill(&self) -> Vec<String> {
        let ids: Vec<String> = match self.batch {
            Batch::Slurm => vec![self
                .run(
                    "sbatch",
                    &[
                        "--parsable",
                        "--nodes=2",
                        "--exclusive",
                        "--job-name=blocker",
                        "--output=/dev/null",
                        "--wrap=sleep 900",
                    ],
                )
                .trim()
                .to_string()],
            Batch::GridEngine => (0..2)
                .map(|_| {
                    self.run(
                        "qsub",
                        &[
                            "-terse",
                            "-b",
                            "y",
                            "-N",
                            "blocker",
                            "-o",
                            "/dev/null",
                            "-j",
                            "y",
                            "sleep",
                            "900",
                        ],
                    )
                    .trim()
                    .to_string()
                })
                .collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ids.iter().all(|id| self.running(id)) {
            assert!(
                Instant::now() < deadline,
                "blockers {ids:?} not running after 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        ids
    }

    fn running(&self, id: &str) -> bool {
        match self.batch {
            Batch::Slurm => {
                self.run("squeue", &["--noheader", "--format=%T", "--jobs", id])
                    .trim()
                    == "RUNNING"
            }
            Batch::GridEngine => self.run("qstat", &["-u", "*"]).lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&id) && f.get(4) == Some(&"r")
            }),
        }
    }

    fn cancel(&self, id: &str) {
        match self.batch {
            Batch::Slurm => self.run("scancel", &[id]),
            Batch::GridEngine => self.run("qdel", &[id]),
        };
    }

    /// The coordinator's `lrm` line and section for this batch system.
    fn toml(&self) -> (String, Vec<String>) {
        match self.batch {
            Batch::Slurm => (
                format!(
                    "lrm = \"slurm\"\n[cluster]\nnodes = 2\ncores_per_node = 2\nmemory_mb_per_node = 1000\n[slurm]\nkill_wait_s = 5\nenv = {{ SLURM_CONF = \"{}\" }}\n",
                    self.env[0].1
                ),
                vec!["n1".into(), "n2".into()],
            ),
            Batch::GridEngine => (
                "lrm = \"gridengine\"\n[cluster]\nnodes = 1\ncores_per_node = 2\nmemory_mb_per_node = 1000\n[gridengine]\nparallel_environment = \"wsp\"\nnotify_s = 5\nenv = { SGE_ROOT = \"/var/lib/gridengine\", SGE_CELL = \"default\" }\n".into(),
                vec!["localhost".into()],
            ),
        }
    }
}

/// A lease of one VM per node of the cluster (Slurm: two; Grid Engine: one).
fn spec(name: &str, vms: u32, urgency: u8) -> String {
    format!(
        "name = \"{name}\"\nduration = \"1h\"\nurgency = {urgency}\n[[group]]\nname = \"g\"\ncount = {vms}\nmemory_mb = 512\ncpus = 1\nimage = \"worker.qcow2\"\n"
    )
}

/// A lease as `ops` (an admin, who asks for both leases here) sees it.
fn view(c: &Cluster, id: &str) -> Value {
    c.get_as(ADMIN_TOKEN, id).body
}

/// Waits (bounded) until `pred` holds of the lease's view.
fn wait(c: &Cluster, id: &str, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let v = view(c, id);
        if pred(&v) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not {what} within {limit:?}: {v:#}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn id_of(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

/// What the test saw: which lease ran first, both views then, the urgent
/// lease's timeline.
struct Seen {
    first: &'static str,
    urgent: Value,
    best_effort: Value,
    urgent_timeline: Vec<String>,
}

/// Blockers fill the cluster; a best-effort lease queues, then an urgent
/// one; room for one lease is freed; which runs first?
fn race(batch: Batch, mode: &str) -> Seen {
    let site = Site::start(batch);
    let (lrm_toml, nodes) = site.toml();
    let vms = nodes.len() as u32;
    let c = Cluster::start(Options {
        memory_mb: 1000,
        lrm: Some(OtherLrm {
            toml: lrm_toml,
            nodes,
        }),
        // `ops` may ask for urgency 2; the queue mode under test.
        extra: format!("max_urgency = 2\n\n[urgency]\nbatch_priority = \"{mode}\"\n"),
        ..Options::default()
    });
    let blockers = site.fill();
    let submitted = |id: &str| {
        wait(&c, id, "submitted", Duration::from_secs(30), |v| {
            v["slots"][0]["job_id"].is_string()
        });
    };
    let be = id_of(&c.create_as(ADMIN_TOKEN, &spec("batchy", vms, 0)));
    submitted(&be);
    let urgent = id_of(&c.create_as(ADMIN_TOKEN, &spec("urgent", vms, 1)));
    submitted(&urgent);
    // Both wait behind the blockers for a few scheduler cycles (1 s each).
    std::thread::sleep(Duration::from_secs(3));
    for id in [&be, &urgent] {
        let v = view(&c, id);
        assert_eq!(v["state"], "pending", "{v:#}");
    }
    // Slurm: the one blocker on both nodes ends. Grid Engine: one of the
    // two slots frees; the other blocker keeps the second.
    site.cancel(&blockers[0]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let first = loop {
        let (u, b) = (view(&c, &urgent), view(&c, &be));
        if u["state"] == "running" {
            break "urgent";
        }
        if b["state"] == "running" {
            break "best-effort";
        }
        assert!(
            Instant::now() < deadline,
            "neither lease runs 90 s after the blocker ended:\n{u:#}\n{b:#}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The other one is still waiting for the batch system (its node is taken).
    std::thread::sleep(Duration::from_secs(2));
    let seen = Seen {
        first,
        urgent: view(&c, &urgent),
        best_effort: view(&c, &be),
        urgent_timeline: c
            .timeline_as(ADMIN_TOKEN, &urgent)
            .iter()
            .map(|e| e["detail"].as_str().unwrap_or("").to_string())
            .collect(),
    };
    for id in [&be, &urgent] {
        let r = c.destroy_as(ADMIN_TOKEN, id);
        assert!(r.status < 300, "{}", r.body);
    }
    for b in &blockers[1..] {
        site.cancel(b);
    }
    for id in [&be, &urgent] {
        wait(&c, id, "settled", Duration::from_secs(60), |v| {
            v["settled"] == true
        });
    }
    seen
}

fn assert_urgent_first(s: &Seen, asked: &str) {
    assert_eq!(
        s.first, "urgent",
        "urgent:\n{:#}\nbest-effort:\n{:#}",
        s.urgent, s.best_effort
    );
    assert_eq!(s.best_effort["state"], "pending", "{:#}", s.best_effort);
    assert!(
        s.urgent_timeline
            .iter()
            .any(|d| d.starts_with("urgency 1: asked the") && d.contains(asked)),
        "{:#?}",
        s.urgent_timeline
    );
    assert!(
        !s.urgent_timeline.iter().any(|d| d.contains("refused that")),
        "{:#?}",
        s.urgent_timeline
    );
}

fn assert_fifo(s: &Seen) {
    assert_eq!(
        s.first, "best-effort",
        "urgent:\n{:#}\nbest-effort:\n{:#}",
        s.urgent, s.best_effort
    );
    assert_eq!(s.urgent["state"], "pending", "{:#}", s.urgent);
    assert!(
        !s.urgent_timeline.iter().any(|d| d.contains("asked the")),
        "{:#?}",
        s.urgent_timeline
    );
}

#[test]
fn slurm_own_moves_the_urgent_pilot_job_to_the_top_of_ours_with_scontrol_top() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    assert_urgent_first(&race(Batch::Slurm, "own"), "scontrol top");
}

#[test]
fn slurm_operator_submits_the_urgent_pilot_job_at_priority_top() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    assert_urgent_first(&race(Batch::Slurm, "operator"), "sbatch --priority=TOP");
}

#[test]
fn slurm_off_runs_the_earlier_best_effort_pilot_job_first() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    assert_fifo(&race(Batch::Slurm, "off"));
}

#[test]
fn gridengine_own_queues_our_best_effort_pilot_jobs_below_the_urgent_one() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    assert_urgent_first(&race(Batch::GridEngine, "own"), "qsub -p 0");
}

#[test]
fn gridengine_operator_submits_the_urgent_pilot_job_at_priority_1024() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    assert_urgent_first(&race(Batch::GridEngine, "operator"), "qsub -p 1024");
}

#[test]
fn gridengine_off_runs_the_earlier_best_effort_pilot_job_first() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    assert_fifo(&race(Batch::GridEngine, "off"));
}
