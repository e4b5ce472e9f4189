//! The slot pool with real QEMU (TCG where the host has no usable KVM):
//! an urgent request to its VM running and usable, from a warm snapshot on
//! an idle pool slot, on an idle pool slot booted from its image, and
//! through the local batch system. A benchmark (ignored; run it by name
//! under the system lock): BENCHMARKS.md "Urgent request to VMs running".
//!
//! It changes the host's hugepage pool, so it holds the kvm tests' lock.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";

fn spec(urgency: u8, memory_mb: u64) -> String {
    format!(
        "name = \"urgent\"\nduration = 600\nurgency = {urgency}\n[[group]]\nname = \"solver\"\ncount = 1\nmemory_mb = {memory_mb}\ncpus = 1\nimage = \"guest\"\n"
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pool_json(c: &Cluster) -> Value {
    let out = Command::new(bin("workspace"))
        .args(["admin", "pool", "--json"])
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("workspace admin pool");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Waits until a pool slot is idle and, when `warm`, the snapshot is ready.
fn wait_pool(c: &Cluster, warm: bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let p = pool_json(c);
        let idle = p["slots"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["state"] == "idle"));
        let ready = p["warm"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["state"] == "ready"));
        let preparing = p["warm"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["state"] == "preparing"));
        if idle && (!warm || ready) && !preparing {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool not ready: {p:#}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request as `token`: ms to `running` (client) and to the guest's
/// marker on its console; destroys it and waits until it settled.
fn one(c: &Cluster, tmp: &std::path::Path, token: &str, spec: &str, marker: &str) -> (f64, f64) {
    let t0 = Instant::now();
    let r = c.create_as(token, spec);
    assert!(r.status == 201 || r.status == 200, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = c.get_as(token, &id).body;
        if v["state"] == "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "not running: {v:#}\n{}", c.log());
        std::thread::sleep(Duration::from_millis(5));
    };
    let running = t0.elapsed().as_secs_f64() * 1000.0;
    let vm = &v["vms"][0];
    let serial = tmp
        .join(vm["node"].as_str().expect("node"))
        .join("kvm")
        .join(format!("{}.serial", vm["name"].as_str().expect("name")));
    let usable = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains(marker) {
            break t0.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(
            Instant::now() < deadline,
            "no {marker} on {}: {text}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(c.destroy_as(token, &id).status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get_as(token, &id).body["settled"] != true {
        assert!(Instant::now() < deadline, "{id} did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
    (running, usable)
}

#[test]
#[ignore = "a benchmark with real QEMU: run it by name under the system lock"]
fn bench_kvm_urgent_request_to_running_warm_idle_pilot_and_batch_system() {
    let runs: usize = std::env::var("WSP_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(TEST_LOCK)
        .expect("open the kvm test lock");
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("take the kvm test lock");
    need_tools(&["qemu-system-x86_64", "qemu-img", "mkfs.vfat"]);
    let out = Command::new(repo().join("scripts/kvm-payload.sh"))
        .output()
        .expect("run scripts/kvm-payload.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let payload = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let tmp = tempfile::Builder::new()
        .prefix("wsp-kvm-pool-")
        .tempdir()
        .expect("temp dir");
    let guest = tmp.path().join("images").join("guest");
    std::fs::create_dir_all(&guest).expect("image dir");
    for f in ["vmlinux", "initrd.gz"] {
        std::os::unix::fs::symlink(payload.join(f), guest.join(f)).expect("link");
    }
    let st = Command::new("mkfs.vfat")
        .args(["-C", "-n", "WSPDATA"])
        .arg(guest.join("disk.img"))
        .arg("8192")
        .status()
        .expect("mkfs.vfat");
    assert!(st.success());
    let node_cfg = tmp.path().join("node.toml");
    std::fs::write(
        &node_cfg,
        format!(
            "[kvm]\nrun_dir = \"{t}/%n/kvm\"\nimage_dir = \"{t}/images\"\ncompressor = \"none\"\naccelerator = \"tcg\"\n\
             append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.warm=1 wsp.disk=1\"\n\
             [checkpoints]\ndir = \"{t}/store\"\n",
            t = tmp.path().display()
        ),
    )
    .expect("node config");
    // Two nodes: one for the pool (min 1, max 1), one for the batch system.
    // --end-leases-on-exit: the pool's idle slot is given back (its
    // hugepages with it) when the bench stops the coordinator.
    let mut c = Cluster::start(Options {
        hypervisor: "kvm".into(),
        node_config: Some(node_cfg.display().to_string()),
        nodes: 2,
        serve_args: vec!["--end-leases-on-exit".into()],
        extra: "max_urgency = 2\n[pool]\nmin_idle_nodes = 1\nmax_nodes = 1\nwalltime_s = 3600\nidle_memory_mb = 128\nwarm_images = [\"guest\"]\n".into(),
        ..Options::default()
    });
    let (mut warm, mut cold, mut batch) = (
        (Vec::new(), Vec::new()),
        (Vec::new(), Vec::new()),
        (Vec::new(), Vec::new()),
    );
    for _ in 0..runs {
        wait_pool(&c, true);
        let (a, b) = one(&c, tmp.path(), ADMIN_TOKEN, &spec(1, 128), "WSP-IDENTITY");
        warm.0.push(a);
        warm.1.push(b);
        // 160 MB: not the snapshot's size, so booted from the image.
        wait_pool(&c, true);
        let (a, b) = one(&c, tmp.path(), ADMIN_TOKEN, &spec(1, 160), "WSP-VM-READY");
        cold.0.push(a);
        cold.1.push(b);
        // Urgency 0 leaves the one idle slot (min_idle_nodes) alone.
        wait_pool(&c, true);
        let (a, b) = one(&c, tmp.path(), TOKEN, &spec(0, 160), "WSP-VM-READY");
        batch.0.push(a);
        batch.1.push(b);
    }
    println!("urgent request -> VM running / usable, real QEMU (TCG), local batch system, medians of {runs}:");
    println!("| path | to running | to usable (guest's marker) |");
    println!("|---|---|---|");
    for (name, v) in [
        ("warm snapshot on an idle pool slot", &mut warm),
        ("idle pool slot, booted from its image", &mut cold),
        ("through the batch system", &mut batch),
    ] {
        println!(
            "| {name} | {:.0} ms | {:.0} ms |",
            median(&mut v.0),
            median(&mut v.1)
        );
    }
    let code = c.terminate_coordinator(Duration::from_secs(60));
    assert_eq!(code, Some(0), "coordinator log:\n{}", c.log());
    assert!(
        c.pilot_pids(None).is_empty(),
        "every pilot exited, the pool's too"
    );
}
