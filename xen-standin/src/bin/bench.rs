//! `wsp-xen-bench`: our own overhead on Xen's three slow steps, against the
//! stand-in with zero balloon delay, next to the published figures.
//!
//! reserve = read dom0 + set target + verify (the pilot's path, in-process);
//! restore = set target back + verify; kill-all = the real
//! `workspace-kill-all --hypervisor xen` process destroying 8 tagged guests
//! in parallel and restoring dom0. Medians and p95 over `--runs`.

use pilot::hypervisor::xen::{Xen, XenConfig};
use pilot::hypervisor::{set_dom0_target_and_wait, HvOptions, Hypervisor};
use protocol::pilot::VmLaunch;
use protocol::{SlotId, VmId, VmName};
use serde_json::json;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PUBLISHED_RESERVE_MS: f64 = 743.6;
const PUBLISHED_RESTORE_MS: f64 = 1317.2;
const PUBLISHED_KILL_ALL_MS: f64 = 2336.27;

fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe
        .parent()
        .ok_or("no directory for the bench binary")?
        .join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: cargo build --workspace --bins (same profile)",
            p.display()
        ))
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.95))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run() -> Result<(), String> {
    let mut runs = 100usize;
    let mut json_out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).ok_or("--runs N")?,
            "--json" => json_out = Some(args.next().ok_or("--json FILE")?.into()),
            other => {
                return Err(format!(
                    "unknown argument {other} (use --runs N --json FILE)"
                ))
            }
        }
    }
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let socket = tmp.path().join("xenstored.sock");
    let daemon = Daemon(
        Command::new(sibling("wsp-xenstored-standin")?)
            .arg("--socket")
            .arg(&socket)
            .args(["--total-mb", "16384", "--cpus", "8"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    let start = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err("the stand-in did not start".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
    std::fs::write(images.join("img.raw"), b"disk").map_err(|e| e.to_string())?;
    let xl = sibling("wsp-fake-xl")?;
    let cfg = XenConfig {
        xl: xl.display().to_string(),
        command_prefix: Vec::new(),
        xenstored_path: Some(socket.clone()),
        run_dir: Some(tmp.path().join("run")),
        image_dir: images.clone(),
        ..XenConfig::default()
    };
    // Still single-threaded here: the driver may export XENSTORED_PATH.
    let xen = Xen::open(
        &cfg,
        &HvOptions {
            node_name: "bench".into(),
            ..HvOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let node_toml = tmp.path().join("node.toml");
    std::fs::write(
        &node_toml,
        format!(
            "[xen]\nxl = \"{}\"\ncommand_prefix = []\nxenstored_path = \"{}\"\nrun_dir = \"{}\"\nimage_dir = \"{}\"\n",
            xl.display(),
            socket.display(),
            tmp.path().join("run").display(),
            images.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let state_dir = tmp.path().join("state");
    std::fs::create_dir_all(&state_dir).map_err(|e| e.to_string())?;
    let kill_all = sibling("workspace-kill-all")?;
    let timeout = Duration::from_secs(10);
    let take_mb = 8 * 1024;

    let (mut reserve, mut restore, mut reserve_xl, mut kill) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t = Instant::now();
        let m = xen.dom0_memory().map_err(|e| e.to_string())?;
        set_dom0_target_and_wait(&xen, m.current_mb - take_mb, timeout)
            .map_err(|e| e.to_string())?;
        reserve.push(ms(t.elapsed()));
        let t = Instant::now();
        set_dom0_target_and_wait(&xen, m.current_mb, timeout).map_err(|e| e.to_string())?;
        restore.push(ms(t.elapsed()));
    }
    // The `xl mem-set 0` fallback, for comparison with the paper's `xm mem-set`.
    let mut cfg_xl = cfg.clone();
    cfg_xl.use_xl_mem_set = true;
    let xen_xl = Xen::open(&cfg_xl, &HvOptions::default()).map_err(|e| e.to_string())?;
    for _ in 0..runs {
        let t = Instant::now();
        let m = xen_xl.dom0_memory().map_err(|e| e.to_string())?;
        set_dom0_target_and_wait(&xen_xl, m.current_mb - take_mb, timeout)
            .map_err(|e| e.to_string())?;
        reserve_xl.push(ms(t.elapsed()));
        set_dom0_target_and_wait(&xen_xl, m.current_mb, timeout).map_err(|e| e.to_string())?;
    }
    for _ in 0..runs {
        let m = xen.dom0_memory().map_err(|e| e.to_string())?;
        set_dom0_target_and_wait(&xen, m.max_mb - take_mb, timeout).map_err(|e| e.to_string())?;
        let slot = SlotId::generate();
        for _ in 0..8 {
            let vm_id = VmId::generate();
            xen.create(&VmLaunch {
                name: VmName::new(slot.clone(), vm_id.clone()).to_string(),
                vm_id,
                memory_mb: 1024,
                cpus: 1,
                image: "img.raw".into(),
                image_source: None,
                nics: Vec::new(),
                hostname: None,
                context: None,
                on_preempt: Default::default(),
                restore: None,
                urgency: 0,
                cpu: None,
            })
            .map_err(|e| e.to_string())?;
        }
        let t = Instant::now();
        let out = Command::new(&kill_all)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--node-config")
            .arg(&node_toml)
            .args(["--hypervisor", "xen", "--node", "bench"])
            .output()
            .map_err(|e| e.to_string())?;
        kill.push(ms(t.elapsed()));
        if !out.status.success() {
            return Err(format!(
                "kill-all failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        if !xen.domains().map_err(|e| e.to_string())?.is_empty() {
            return Err("kill-all left guests".into());
        }
    }
    drop(daemon);
    let rows = [
        ("reserve (xenstore)", stats(reserve), PUBLISHED_RESERVE_MS),
        (
            "reserve (xl mem-set fallback)",
            stats(reserve_xl),
            PUBLISHED_RESERVE_MS,
        ),
        ("restore (xenstore)", stats(restore), PUBLISHED_RESTORE_MS),
        (
            "kill-all, 8 VMs (process)",
            stats(kill),
            PUBLISHED_KILL_ALL_MS,
        ),
    ];
    println!("{runs} runs each, stand-in with zero balloon delay (our own overhead)");
    println!(
        "{:<32} {:>10} {:>10} {:>14}",
        "step", "median ms", "p95 ms", "published ms"
    );
    for (name, (med, p95), published) in &rows {
        println!("{name:<32} {med:>10.3} {p95:>10.3} {published:>14}");
    }
    if let Some(path) = json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|(name, (med, p95), published)| {
                json!({"step": name, "median_ms": med, "p95_ms": p95, "published_ms": published, "runs": runs})
            })
            .collect();
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("wsp-xen-bench: {e}");
        std::process::exit(1);
    }
}
