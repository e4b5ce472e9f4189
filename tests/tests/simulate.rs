//! `workspace-coordinator simulate` and `replay` as a user runs them, and
//! the simulator's fidelity: the first 100 jobs of the KTH SP2 trace,
//! 5,000 times faster, replayed on a real coordinator (the local batch
//! system, pilots on sim nodes) and in the simulator, must start each lease
//! at the same time within a stated tolerance (docs/SIMULATION.md).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wsp_e2e::{bin, Cluster, Options, TOKEN};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../coordinator/src/sim/testdata")
        .join(name)
}

fn coordinator(args: &[&str]) -> Output {
    Command::new(bin("workspace-coordinator"))
        .args(args)
        .output()
        .expect("workspace-coordinator runs")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("json written");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn simulate_prints_the_figures_and_writes_them_as_json_and_a_plot() {
    let dir = tempfile::tempdir().expect("dir");
    let (j, s) = (dir.path().join("r.json"), dir.path().join("u.svg"));
    let trace = testdata("kth-sp2-first-200.swf");
    let o = coordinator(&[
        "simulate",
        "--trace",
        trace.to_str().expect("path"),
        "--jobs",
        "50",
        "--json",
        j.to_str().expect("path"),
        "--svg",
        s.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for line in [
        "leases: 50 requested",
        "utilization:",
        "wait: mean",
        "bounded slowdown",
        "our overhead per lease",
        "virtual events",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    let r = json(&j);
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["leases"]["ran"], 50);
    assert_eq!(r["requests"].as_array().map(Vec::len), Some(50));
    let svg = std::fs::read_to_string(&s).expect("svg");
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
}

#[test]
fn a_bad_trace_or_config_is_refused_with_what_and_where_and_exit_2() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("bad.swf");
    std::fs::write(&bad, "; a header\n1 0 1 10 4 -1 -1 4 60 -1 1 1 1 -1 -1 -1 -1 -1\n2 5 1 x 4 -1 -1 4 60 -1 1 1 1 -1 -1 -1 -1 -1\n").expect("write");
    let o = coordinator(&["simulate", "--trace", bad.to_str().expect("path")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 3: field 4 (run time) is not a number: \"x\""),
        "{err}"
    );
    assert!(
        o.stdout.is_empty(),
        "no figure for a bad trace: {}",
        text(&o)
    );

    let cfg = dir.path().join("model.toml");
    std::fs::write(&cfg, "[nodes]\nboot = 5\n").expect("write");
    let trace = testdata("kth-sp2-first-200.swf");
    let o = coordinator(&[
        "simulate",
        "--trace",
        trace.to_str().expect("path"),
        "--config",
        cfg.to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown field `boot`"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_simulation_cut_short_says_so_and_exits_1() {
    let dir = tempfile::tempdir().expect("dir");
    let j = dir.path().join("r.json");
    let trace = testdata("kth-sp2-first-200.swf");
    let o = coordinator(&[
        "simulate",
        "--trace",
        trace.to_str().expect("path"),
        "--max-wall-s",
        "0",
        "--json",
        j.to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("INCOMPLETE: the wall-clock limit of 0 s was reached."),
        "{out}"
    );
    assert_eq!(json(&j)["complete"], false);
}

/// Seconds between the real and the simulated start of a lease that are
/// still "the same time": a fixed part for what a busy 2-core host adds to
/// one lease (pilot processes starting, 50 ms ticks), and a share of the
/// lease's start for what a chain of queued leases accumulates.
fn tolerance(start_s: f64) -> f64 {
    1.0 + 0.02 * start_s
}

/// Leases that may be beyond [`tolerance`] (but within three times it):
/// on a 2-core host a burst of other work (a compiler, another test binary)
/// delays one pilot start by a second or two. A model that is wrong moves
/// many leases, or one by much more, and fails.
const OUTLIERS: usize = 3;

#[test]
fn the_simulator_starts_leases_when_the_real_coordinator_does() {
    let c = Cluster::start(Options {
        nodes: 8,
        ..Options::default()
    });
    let dir = tempfile::tempdir().expect("dir");
    let (real, sim) = (dir.path().join("real.json"), dir.path().join("sim.json"));
    let trace = testdata("kth-sp2-first-200.swf");
    let model = testdata("fidelity.toml");
    let common = [
        "--trace",
        trace.to_str().expect("path"),
        "--config",
        model.to_str().expect("path"),
        "--jobs",
        "100",
        "--time-scale",
        "5000",
        "--cores-per-node",
        "8",
    ];
    let mut args = vec!["replay"];
    args.extend(common);
    args.extend([
        "--url",
        &c.url,
        "--token",
        TOKEN,
        "--limit-s",
        "240",
        "--json",
    ]);
    args.push(real.to_str().expect("path"));
    let o = coordinator(&args);
    assert!(o.status.success(), "replay: {}\n{}", text(&o), c.log());
    let mut args = vec!["simulate", "--nodes", "8", "--quiet"];
    args.extend(common);
    args.extend(["--json", sim.to_str().expect("path")]);
    let o = coordinator(&args);
    assert!(o.status.success(), "simulate: {}", text(&o));
    c.assert_nodes_restored();

    let (real, sim) = (json(&real), json(&sim));
    let (real, sim) = (
        real["requests"].as_array().expect("requests").clone(),
        sim["requests"].as_array().expect("requests").clone(),
    );
    assert_eq!(real.len(), 100);
    assert_eq!(sim.len(), 100);
    let mut diffs = Vec::new();
    let mut worst = (0.0, String::new());
    let mut outliers = Vec::new();
    for (r, s) in real.iter().zip(&sim) {
        assert_eq!(r["job"], s["job"]);
        assert_eq!(r["state"], s["state"], "job {}: {r} vs {s}", r["job"]);
        let (Some(a), Some(b)) = (r["start_s"].as_f64(), s["start_s"].as_f64()) else {
            assert_eq!(
                r["start_s"], s["start_s"],
                "job {}: ran in one only",
                r["job"]
            );
            continue;
        };
        let d = (a - b).abs();
        diffs.push(d);
        let (wa, wb) = (
            r["wait_s"].as_f64().unwrap_or(0.0),
            s["wait_s"].as_f64().unwrap_or(0.0),
        );
        let off = d.max((wa - wb).abs());
        if off > tolerance(b) {
            outliers.push(format!(
                "job {}: started at {a:.2} s, simulated {b:.2} s; waited {wa:.2} s, simulated {wb:.2} s",
                r["job"]
            ));
        }
        if off - 3.0 * tolerance(b) > worst.0 {
            worst = (
                off - 3.0 * tolerance(b),
                outliers.last().cloned().unwrap_or_default(),
            );
        }
    }
    diffs.sort_by(f64::total_cmp);
    let pct = |p: f64| diffs[((p / 100.0) * diffs.len() as f64).ceil() as usize - 1];
    eprintln!(
        "fidelity: {} leases; |real - simulated| start: median {:.3} s, p95 {:.3} s, max {:.3} s",
        diffs.len(),
        pct(50.0),
        pct(95.0),
        pct(100.0)
    );
    assert!(
        worst.0 <= 0.0,
        "beyond three times the tolerance: {}",
        worst.1
    );
    assert!(
        outliers.len() <= OUTLIERS,
        "{} leases beyond tolerance (at most {OUTLIERS} may be):\n{}",
        outliers.len(),
        outliers.join("\n")
    );
    assert!(diffs.len() >= 90, "most leases ran on both sides");
}
