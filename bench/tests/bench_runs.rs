//! The benchmark itself, end to end, at a size a test can afford: the
//! breakdown at N = 1 and 2 (real coordinator, local batch system, real
//! pilot processes on sim nodes) and the load part with 50 long-polling
//! pilots for a second. It checks that every figure the issue asks for is
//! measured and sane, so a change that breaks a part of the benchmark
//! fails here rather than in the next full run. Timings are not judged:
//! this is a debug build on a shared machine.
//!
//! Needs the workspace's binaries (`cargo build --workspace --bins`, as
//! scripts/test.sh does): the bench starts `workspace-pilot` from its own
//! directory.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

fn median(size: &Value, phase: &str) -> f64 {
    size["phases"][phase]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("N = {}: no median for {phase}: {size}", size["nodes"]))
}

#[test]
fn a_small_run_measures_every_part_it_is_asked_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_workspace-bench"))
        .args([
            "--parts",
            "breakdown,load",
            "--sizes",
            "1,2",
            "--repeats",
            "2",
        ])
        .args(["--pilots", "50", "--load-seconds", "1", "--json"])
        .arg(&json)
        .output()
        .expect("run workspace-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "workspace-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(started.elapsed() < Duration::from_secs(300));
    let rep: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");

    // Part 1: every phase of the published breakdown, per size.
    let sizes = rep["breakdown"].as_array().expect("breakdown results");
    assert_eq!(sizes.len(), 2, "{}", rep["breakdown"]);
    for (size, n) in sizes.iter().zip([1, 2]) {
        assert_eq!(size["nodes"], n);
        assert_eq!(size["lrm"], "local");
        for phase in [
            "slot.submit",
            "slot.lrm_start",
            "slot.pilot_reserve",
            "slot.notify",
            "slot.total",
            "vm.invoke",
            "vm.total",
            "down.destroy",
            "down.lrm_end",
            "e2e.up",
            "e2e.down",
            "e2e.settled",
            "cpu.ours",
            "cpu.pilot",
        ] {
            let m = median(size, phase);
            assert!(m.is_finite() && m >= 0.0, "N = {n}: {phase} = {m}");
        }
        // Per repeat: our overhead is the lease's time up and down, less the
        // batch system's and the hypervisor's shares.
        let samples = |phase: &str| -> Vec<f64> {
            size["phases"][phase]["samples"]
                .as_array()
                .unwrap_or_else(|| panic!("N = {n}: no samples for {phase}"))
                .iter()
                .map(|v| v.as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let (up, down, ours) = (samples("e2e.up"), samples("e2e.down"), samples("overhead"));
        for i in 0..ours.len() {
            assert!(up[i] > 0.0, "N = {n}: a lease took no time: {up:?}");
            assert!(
                ours[i] > 0.0 && ours[i] <= up[i] + down[i] + 1e-6,
                "N = {n}, repeat {i}: our overhead {} ms is not within the lease's {} + {} ms",
                ours[i],
                up[i],
                down[i]
            );
        }
        assert!(
            median(size, "cpu.pilot") > 0.0,
            "N = {n}: pilot CPU not measured"
        );
        // The estimate for real nodes: OURS(1) plus our extra CPU at N.
        let estimate = median(size, "overhead.cluster");
        assert!(estimate.is_finite(), "N = {n}: no estimate for real nodes");
        if n == 1 {
            assert_eq!(estimate, median(size, "overhead"));
        }
        assert_eq!(
            size["phases"]["e2e.up"]["samples"].as_array().map(Vec::len),
            Some(2),
            "N = {n}: one sample per repeat"
        );
    }

    // Part 3: the coordinator under load; every event acknowledged.
    let load = rep["load"].as_array().expect("load results");
    assert_eq!(load.len(), 1, "{}", rep["load"]);
    let l = &load[0];
    assert_eq!(l["pilots"], 50);
    assert_eq!(l["polls_open"], 50, "every pilot holds a long-poll");
    assert_eq!(l["events_refused"], 0, "{l}");
    assert!(l["events_acked"].as_u64().unwrap_or(0) > 0, "{l}");
    for k in ["events_per_s", "p50_ms", "p99_ms", "rss_mb_after"] {
        assert!(l[k].as_f64().unwrap_or(0.0) > 0.0, "{k}: {l}");
    }
    // The machine's limit, measured in the same run, and the fraction of it.
    assert!(
        l["limit"]["events_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{l}"
    );
    let fraction = l["fraction_of_limit"].as_f64().unwrap_or(0.0);
    assert!(fraction > 0.0 && fraction.is_finite(), "{l}");
    assert!(
        l["writer_cpu_us_per_event"].as_f64().unwrap_or(0.0)
            <= l["server_cpu_us_per_event"].as_f64().unwrap_or(0.0),
        "the writer is a thread of the server: {l}"
    );

    // The targets table names each measured target with a verdict, and
    // says which were not measured in this run.
    let targets = rep["targets"].as_array().expect("targets");
    let verdict = |prefix: &str| -> String {
        targets
            .iter()
            .find(|t| t["what"].as_str().unwrap_or("").starts_with(prefix))
            .and_then(|t| t["verdict"].as_str())
            .unwrap_or_else(|| panic!("no target {prefix:?} in {targets:?}"))
            .to_string()
    };
    assert!(
        verdict("signed events/s, 50 pilots").starts_with("ok")
            || verdict("signed events/s, 50 pilots").starts_with("MISSED"),
        "{targets:?}"
    );
    assert_eq!(
        verdict("our overhead end to end, N = 16, on this host"),
        "not measured"
    );
    assert!(
        verdict("event path / machine limit, 50 pilots").starts_with("ok")
            || verdict("event path / machine limit, 50 pilots").starts_with("MISSED"),
        "{targets:?}"
    );
    assert!(stdout.contains("Targets"), "{stdout}");
}
