//! Whole simulations of small excerpts of the shared traces (the first 200
//! jobs of each, in `testdata/`), and of the full traces when they are
//! present, checked against what the model promises.

use super::batch::Scheduler;
use super::config::SimConfig;
use super::run::Limits;
use super::trace::{self, Format};
use super::{report::Report, simulate};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

fn excerpt(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/sim/testdata")
        .join(name)
}

fn limits() -> Limits {
    Limits {
        max_wall: None,
        stop: Arc::new(AtomicBool::new(false)),
    }
}

fn run(name: &str, cfg: &SimConfig) -> Report {
    let path = excerpt(name);
    let t = trace::read(&path, Format::guess(&path)).expect("trace");
    simulate(&t, cfg, &limits(), |_, _| {}).expect("simulated")
}

fn small(jobs: usize) -> SimConfig {
    let mut cfg = SimConfig::default();
    cfg.trace.jobs = Some(jobs);
    cfg
}

#[test]
fn an_excerpt_replays_whole_and_every_lease_ends_as_its_time_runs_out() {
    let r = run("kth-sp2-first-200.swf", &small(60));
    assert!(r.complete, "{:?}", r.incomplete_because);
    let l = &r.leases;
    assert_eq!((l.requested, l.ran, l.expired), (60, 60, 60), "{l:?}");
    assert_eq!(
        l.rejected + l.failed + l.preempted + l.unsettled,
        0,
        "{l:?}"
    );
    assert!(
        r.utilization > 0.0 && r.utilization <= r.held_utilization,
        "{r:?}"
    );
    assert!(r.held_utilization <= 1.0, "{r:?}");
    assert!(r.wait_s.p50 <= r.wait_s.p95 && r.wait_s.p95 <= r.wait_s.max);
    assert!(r.bounded_slowdown.mean >= 1.0);
    // Every lease waited at least for its nodes to be reserved and its VMs booted.
    let least = r.model.batch.start_latency_s + r.model.nodes.reserve_s;
    for q in &r.requests {
        let (Some(start), Some(wait)) = (q.start_s, q.wait_s) else {
            panic!("{q:?} did not run");
        };
        assert!(wait + 1e-6 >= least, "{q:?}");
        assert!((start - q.submit_s - wait).abs() < 1e-6, "{q:?}");
    }
    assert!(r.overhead_s_per_lease > 0.0 && r.startup_s_per_lease > 0.0);
    assert!(r.svg("t").contains("<polyline"), "a plot");
}

#[test]
fn fifo_starts_leases_in_the_order_they_were_asked_for() {
    let mut cfg = small(120);
    cfg.batch.scheduler = Scheduler::Fifo;
    cfg.cluster.nodes = Some(40);
    let r = run("kth-sp2-first-200.swf", &cfg);
    assert!(r.complete, "{:?}", r.incomplete_because);
    let starts: Vec<f64> = r.requests.iter().filter_map(|q| q.start_s).collect();
    assert_eq!(starts.len(), r.leases.ran);
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1] + 1e-6),
        "out of order: {starts:?}"
    );
    // Requests larger than the cluster are refused, with the reason.
    assert!(r.leases.rejected > 0, "{:?}", r.leases);
    assert!(
        r.leases.rejected_why[0].0.contains("does not fit"),
        "{:?}",
        r.leases.rejected_why
    );
}

#[test]
fn easy_backfill_lets_a_small_job_pass_and_waits_less_than_fifo() {
    let mut fifo = small(200);
    fifo.batch.scheduler = Scheduler::Fifo;
    let easy = small(200);
    let (f, e) = (
        run("kth-sp2-first-200.swf", &fifo),
        run("kth-sp2-first-200.swf", &easy),
    );
    assert!(f.complete && e.complete);
    assert!(
        e.wait_s.mean < f.wait_s.mean,
        "EASY {} s, FIFO {} s",
        e.wait_s.mean,
        f.wait_s.mean
    );
    let passed = e
        .requests
        .windows(2)
        .any(|w| match (w[0].start_s, w[1].start_s) {
            (Some(a), Some(b)) => b < a,
            _ => false,
        });
    assert!(passed, "a later request started first somewhere");
}

#[test]
fn injected_failures_end_leases_as_the_rules_say() {
    let mut cfg = small(20);
    cfg.failures.reserve = 1.0;
    let r = run("kth-sp2-first-200.swf", &cfg);
    assert!(r.complete, "{:?}", r.incomplete_because);
    assert_eq!((r.leases.failed, r.leases.ran), (20, 0), "{:?}", r.leases);

    // Every job is preempted at a time drawn within its estimate; those
    // whose lease is over by then end as they would have.
    let mut cfg = small(20);
    cfg.failures.preempt = 1.0;
    let r = run("kth-sp2-first-200.swf", &cfg);
    assert!(r.complete, "{:?}", r.incomplete_because);
    assert_eq!(r.leases.preempted + r.leases.expired, 20, "{:?}", r.leases);
    assert!(r.leases.preempted > 0, "{:?}", r.leases);

    // A pilot that dies says nothing: its lease fails once it has been
    // silent for pilot_silence_s, and the others of its slot are released.
    let mut cfg = small(20);
    cfg.failures.pilot_lost = 1.0;
    let r = run("kth-sp2-first-200.swf", &cfg);
    assert!(r.complete, "{:?}", r.incomplete_because);
    assert_eq!(r.leases.failed + r.leases.expired, 20, "{:?}", r.leases);
    assert!(r.leases.failed > 0, "{:?}", r.leases);
}

#[test]
fn a_run_cut_short_says_so_before_any_figure() {
    let path = excerpt("kth-sp2-first-200.swf");
    let t = trace::read(&path, Format::Swf).expect("trace");
    let stop = Limits {
        max_wall: None,
        stop: Arc::new(AtomicBool::new(true)),
    };
    let r = simulate(&t, &SimConfig::default(), &stop, |_, _| {}).expect("ran");
    assert!(!r.complete);
    assert_eq!(r.incomplete_because.as_deref(), Some("interrupted"));
    assert!(
        r.text("t").starts_with("INCOMPLETE: interrupted."),
        "{}",
        r.text("t")
    );
    assert!(r.svg("t").contains("INCOMPLETE"));
    let cut = Limits {
        max_wall: Some(Duration::ZERO),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let r = simulate(&t, &SimConfig::default(), &cut, |_, _| {}).expect("ran");
    assert!(r
        .incomplete_because
        .as_deref()
        .unwrap_or("")
        .contains("wall-clock limit"));
}

#[test]
fn the_other_excerpts_replay_whole() {
    for name in ["sdsc-blue-first-200.swf", "anl-jazz-first-200.csv"] {
        let r = run(name, &small(80));
        assert!(r.complete, "{name}: {:?}", r.incomplete_because);
        assert_eq!(r.leases.ran, 80, "{name}: {:?}", r.leases);
    }
}

#[test]
fn runtime_overhead_and_image_deploys_lengthen_what_a_lease_holds() {
    let base = run("kth-sp2-first-200.swf", &small(40));
    let mut cfg = small(40);
    cfg.policy.runtime_overhead_pct = 10.0;
    cfg.nodes.deploy_images = true;
    let slower = run("kth-sp2-first-200.swf", &cfg);
    assert!(slower.complete);
    // 600 MB at 100 Mb/s before each boot.
    assert!(
        slower.startup_s_per_lease > base.startup_s_per_lease + 40.0,
        "{} vs {}",
        slower.startup_s_per_lease,
        base.startup_s_per_lease
    );
    let held = |r: &Report| r.held_utilization * r.span_s;
    assert!(held(&slower) > held(&base));
}

/// The full shared traces, when this machine has them (`../shared/traces`).
#[test]
#[ignore = "replays a whole shared trace (30 s in a debug build); cargo test --release -p wsp-coordinator --lib -- --ignored"]
fn the_full_anl_jazz_trace_replays_whole_when_present() {
    let Some(full) = shared_trace("ANL-Jazz-june-haizea.csv") else {
        eprintln!(
            "skipped: the shared traces are not on this machine (../shared/traces, or WSP_TRACES)"
        );
        return;
    };
    let t = trace::read(&full, Format::Haizea).expect("trace");
    let mut cfg = SimConfig::default();
    cfg.cluster.nodes = Some(350);
    let r = simulate(&t, &cfg, &limits(), |_, _| {}).expect("simulated");
    assert!(r.complete, "{:?}", r.incomplete_because);
    assert_eq!(r.leases.requested, t.jobs.len());
    assert_eq!(
        r.leases.ran + r.leases.rejected,
        t.jobs.len(),
        "{:?}",
        r.leases
    );
}

/// A shared trace: in `$WSP_TRACES`, or `../shared/traces` beside the
/// repository (its checkout, or the directory above a worktree's).
fn shared_trace(name: &str) -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = std::env::var_os("WSP_TRACES")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(repo.join("../shared/traces"));
    dirs.push(repo.join("../../shared/traces"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[test]
fn injected_requests_arrive_on_top_of_the_trace_and_are_counted_apart() {
    let mut cfg = small(30);
    let extra = "[[inject]]\nat_s = 600\ncount = 3\nevery_s = 3600\nnodes = 4\nrun_s = 120\n";
    cfg.inject = SimConfig::parse(extra).expect("inject").inject;
    let r = run("kth-sp2-first-200.swf", &cfg);
    assert!(r.complete, "{:?}", r.incomplete_because);
    assert_eq!((r.trace.replayed, r.trace.injected), (30, 3));
    let injected: Vec<_> = r.requests.iter().filter(|q| q.injected).collect();
    let at: Vec<f64> = injected.iter().map(|q| q.submit_s).collect();
    assert_eq!(at, [600.0, 4200.0, 7800.0]);
    assert!(
        injected
            .iter()
            .all(|q| q.nodes == 4 && q.state == "expired"),
        "{injected:?}"
    );
}

#[test]
fn with_suspend_resume_preempted_leases_are_suspended_resumed_and_run_their_whole_time() {
    // The same preemptions, without and with a checkpoint store on the nodes.
    let mut cfg = small(20);
    cfg.failures.preempt = 0.5;
    cfg.batch.grace_s = 60.0;
    let without = run("kth-sp2-first-200.swf", &cfg);
    assert!(without.complete, "{:?}", without.incomplete_because);
    assert!(without.leases.preempted > 0, "{:?}", without.leases);

    cfg.policy.suspend_resume = true;
    let with = run("kth-sp2-first-200.swf", &cfg);
    assert!(with.complete, "{:?}", with.incomplete_because);
    assert_eq!(with.leases.preempted, 0, "{:?}", with.leases);
    assert_eq!(with.leases.expired, 20, "{:?}", with.leases);

    // A save that cannot fit the grace is not attempted: preempted as before.
    cfg.batch.grace_s = 1.0;
    cfg.nodes.save_mb_per_s = 1.0;
    let slow = run("kth-sp2-first-200.swf", &cfg);
    assert!(slow.complete, "{:?}", slow.incomplete_because);
    assert_eq!(
        slow.leases.preempted, without.leases.preempted,
        "{:?}",
        slow.leases
    );
}

/// `[reservations] best_effort_order = "largest_first"` in virtual time:
/// the real engine submits each best-effort pilot job with its node-time and
/// the batch model queues by it, as the local batch system does.
#[test]
fn largest_first_starts_the_larger_waiting_lease_before_the_earlier_smaller_one() {
    use super::trace::{Job, Trace};
    let job = |id: u64, submit_s: f64, processors: u32, run_s: f64| Job {
        line: id as usize,
        id,
        submit_s,
        processors,
        run_s,
        requested_s: run_s,
        memory_mb: None,
        image: None,
        reservation: false,
        start_s: None,
    };
    // Two nodes; the first lease holds both; then a small one, then a large one.
    let t = Trace {
        jobs: vec![
            job(1, 0.0, 2, 600.0),
            job(2, 10.0, 1, 60.0),
            job(3, 20.0, 2, 1200.0),
            job(4, 30.0, 1, 300.0),
        ],
        skipped: 0,
        max_nodes: Some(2),
        max_procs: None,
        unix_start_s: None,
    };
    // When each lease started (s), by trace job.
    let starts = |largest_first: bool| -> Vec<f64> {
        let mut cfg = SimConfig::default();
        cfg.batch.scheduler = Scheduler::Fifo;
        cfg.policy.largest_first = largest_first;
        let r = simulate(&t, &cfg, &limits(), |_, _| {}).expect("simulated");
        assert!(r.complete, "{:?}", r.incomplete_because);
        let mut by_job: Vec<(u64, f64)> = r
            .requests
            .iter()
            .map(|l| (l.job, l.start_s.expect("ran")))
            .collect();
        by_job.sort_by_key(|j| j.0);
        by_job.into_iter().map(|j| j.1).collect()
    };
    // By arrival: 2 (1 node) at 600 s, 3 (both nodes) after it, 4 after 3.
    let s = starts(false);
    assert!(s[1] < s[2] && s[2] < s[3], "{s:?}");
    // Largest first: 3 (2400 node-s) at 600 s, then 4 (300) and 2 (60) beside each other.
    let s = starts(true);
    assert!(s[2] < s[1] && s[2] < s[3] && s[3] <= s[1], "{s:?}");
    assert!((s[2] - s[0] - 600.0).abs() < 30.0, "{s:?}");
}

#[test]
fn the_span_floor_is_the_latest_request_end_or_the_work_left_after_any_moment() {
    use super::report::span_floor;
    use super::Request;
    let req = |submit_s: u64, nodes: u32, lease_s: u64, start_s: Option<u64>| Request {
        id: 0,
        line: 0,
        submit_ms: submit_s * 1000,
        nodes,
        run_ms: lease_s * 1000,
        lease_ms: lease_s * 1000,
        estimate_ms: lease_s * 1000,
        memory_mb: 512,
        image: String::new(),
        injected: false,
        urgency: 0,
        reservation: start_s.is_some(),
        start_ms: start_s.map(|s| s * 1000),
    };
    // 4 nodes. 400 node-s asked at 10 s can end no sooner than 110 s.
    let a = [req(0, 1, 20, None), req(10, 4, 100, None)];
    assert_eq!(span_floor(&a, 0, 4.0), 110_000.0);
    // A long lease asked late ends the span by itself.
    let b = [req(0, 1, 20, None), req(50, 1, 300, None)];
    assert_eq!(span_floor(&b, 0, 4.0), 350_000.0);
    // An AR counts from its start, not from when it was asked.
    let c = [req(0, 1, 20, None), req(5, 2, 60, Some(200))];
    assert_eq!(span_floor(&c, 0, 4.0), 260_000.0);
    // Spread work: 8 x 100 node-s from 0 on 4 nodes is 200 s.
    let d: Vec<Request> = (0..8).map(|_| req(0, 1, 100, None)).collect();
    assert_eq!(span_floor(&d, 0, 4.0), 200_000.0);
}
