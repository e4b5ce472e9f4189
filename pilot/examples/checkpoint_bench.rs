//! Suspend and resume times per GB of guest memory with real QEMU (TCG where
//! the host has no usable KVM), ours against bare QEMU (see BENCHMARKS.md).
//!
//! `scripts/bench-checkpoint.sh [--sizes 256,512,1024,2048] [--repeats 5]
//! [--fill-percent 50] [--compressors zstd,none]`
//!
//! For each guest size one VM boots (scripts/kvm-payload.sh's kernel and
//! initramfs; `wsp.fill` fills that share of its memory with random data,
//! which neither QEMU's zero-page detection nor zstd can shrink). Each
//! repeat, for each compressor, on the same VM:
//! - baseline save: QMP `stop`, `migrate` to `exec:zstd -1 -q > FILE` (or
//!   `exec:cat > FILE`), poll until completed, `cont`: the recipe an admin
//!   would use by hand (no hashing, no fsync); then the file's fsync, timed
//!   apart ("bare+fsync": the same durability as ours);
//! - ours: the kvm driver's save into the checkpoint store (pipe, hashing,
//!   fsync, manifest), the guest destroyed;
//! - baseline restore: QEMU with the VM's arguments plus
//!   `-incoming exec:zstd -dcq FILE`, poll until loaded, `cont`, quit;
//! - ours: the driver's restore from the store (verified as read, `-S`,
//!   `cont` only after), under a new name; the VM lives on as that one.
//!
//! Times are medians over the repeats; "per GB" divides by the guest size.

use pilot::checkpoint::{ManifestInfo, Store, WriterInfo};
use pilot::files::lock_exclusive;
use pilot::hypervisor::kvm::qmp::{MigrationInfo, Qmp};
use pilot::hypervisor::kvm::{Kvm, KvmConfig, VmMeta};
use pilot::hypervisor::{HvOptions, Hypervisor};
use protocol::pilot::{CheckpointId, VmLaunch};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";

struct Args {
    sizes: Vec<u64>,
    repeats: usize,
    fill_percent: u64,
    compressors: Vec<String>,
    json: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        sizes: vec![256, 512, 1024, 2048],
        repeats: 5,
        fill_percent: 50,
        compressors: vec!["zstd".into(), "none".into()],
        json: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--sizes" => a.sizes = v.split(',').filter_map(|s| s.parse().ok()).collect(),
            "--repeats" => a.repeats = v.parse().unwrap_or(5).max(1),
            "--fill-percent" => a.fill_percent = v.parse().unwrap_or(50).min(90),
            "--compressors" => a.compressors = v.split(',').map(str::to_string).collect(),
            "--json" => a.json = Some(PathBuf::from(v)),
            other => {
                eprintln!("checkpoint-bench: unknown argument {other}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn payload(repo: &Path) -> PathBuf {
    let out = Command::new(repo.join("scripts/kvm-payload.sh"))
        .output()
        .expect("run scripts/kvm-payload.sh");
    assert!(
        out.status.success(),
        "scripts/kvm-payload.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_serial(kvm: &Kvm, name: &str, pat: &str, limit: Duration) {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(kvm.serial_path(name)).unwrap_or_default();
        if text.contains(pat) {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "no {pat:?} from {name} within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bare QEMU: stop, migrate to `exec:<cmd> > file`, poll, cont. Returns ms.
fn baseline_save(run_dir: &Path, name: &str, file: &Path, zstd: bool) -> f64 {
    let mut q = Qmp::connect(
        &run_dir.join(format!("{name}.qmp")),
        Duration::ZERO,
        Duration::from_secs(30),
    )
    .expect("QMP");
    let t = Instant::now();
    q.execute("stop", None).unwrap();
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 10_737_418_240u64 })),
    )
    .unwrap();
    let cmd = if zstd { "zstd -1 -q" } else { "cat" };
    q.execute(
        "migrate",
        Some(json!({ "uri": format!("exec:{cmd} > '{}'", file.display()) })),
    )
    .unwrap();
    loop {
        let m: MigrationInfo = q.query("query-migrate").unwrap();
        match m.status.as_deref() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => {
                panic!("baseline save failed: {:?}", m.error_desc)
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    q.execute("cont", None).unwrap();
    ms
}

/// Bare QEMU: the VM's arguments plus `-incoming exec:...`, poll, cont.
/// Returns ms from spawn to running; the QEMU is quit afterwards.
fn baseline_restore(run_dir: &Path, meta: &VmMeta, file: &Path, zstd: bool) -> f64 {
    let sock = run_dir.join(format!("{}.qmp", meta.name));
    let _ = std::fs::remove_file(&sock);
    let cmd = if zstd { "zstd -dcq" } else { "cat" };
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(&meta.argv)
        .arg("-incoming")
        .arg(format!("exec:{cmd} '{}'", file.display()))
        .current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn QEMU");
    let mut q = Qmp::connect(&sock, Duration::from_secs(30), Duration::from_secs(30)).expect("QMP");
    loop {
        let s = q.status().unwrap();
        match s.status.as_str() {
            "inmigrate" | "prelaunch" => std::thread::sleep(Duration::from_millis(5)),
            "paused" | "postmigrate" | "running" => break,
            other => panic!("baseline restore: state {other}"),
        }
    }
    q.execute("cont", None).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = q.quit();
    let _ = child.wait();
    ms
}

#[derive(Default)]
struct Samples {
    base_save: Vec<f64>,
    base_save_fsync: Vec<f64>,
    ours_save: Vec<f64>,
    ours_suspend: Vec<f64>,
    base_restore: Vec<f64>,
    ours_restore: Vec<f64>,
    base_bytes: Vec<f64>,
    ours_bytes: Vec<f64>,
}

fn main() {
    let args = parse_args();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let _lock = lock_exclusive(Path::new(TEST_LOCK), Duration::from_secs(1800))
        .unwrap_or_else(|_| panic!("{TEST_LOCK} held for 30 minutes"));
    let p = payload(&repo);
    let tmp = tempfile::Builder::new()
        .prefix("wsp-ckbench-")
        .tempdir()
        .unwrap();
    let store = Store::at(&tmp.path().join("store")).unwrap();
    let mk = |compressor: &str| {
        let mut cfg = KvmConfig {
            run_dir: tmp.path().join("kvm").display().to_string(),
            kernel: Some(p.join("vmlinux").display().to_string()),
            initrd: Some(p.join("initrd.gz").display().to_string()),
            compressor: compressor.to_string(),
            ..KvmConfig::default()
        };
        cfg.start_timeout_s = 60;
        cfg.append = "console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.fill=FILL".into();
        cfg
    };
    let mut rows = Vec::new();
    let mut failed = false;
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "checkpoint bench: sizes {:?} MB, {}% filled with random data, {} repeats, compressors {:?}",
        args.sizes, args.fill_percent, args.repeats, args.compressors
    );
    for &mb in &args.sizes {
        let fill = mb * args.fill_percent / 100;
        let mut cfg0 = mk("zstd");
        cfg0.append = cfg0.append.replace("FILL", &fill.to_string());
        let opts = HvOptions {
            node_name: "bench".into(),
            ..Default::default()
        };
        let drivers: Vec<(String, Kvm)> = args
            .compressors
            .iter()
            .map(|c| {
                let mut cfg = cfg0.clone();
                cfg.compressor = c.clone();
                (
                    c.clone(),
                    Kvm::open(&cfg, &opts).expect("open the kvm driver"),
                )
            })
            .collect();
        let kvm0 = &drivers[0].1;
        let m = kvm0.dom0_memory().unwrap();
        let page_mb = 2;
        kvm0.set_dom0_target(m.current_mb - mb - page_mb)
            .expect("reserve hugepages");
        // Whatever happens to this size, its VMs and pages go back.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bench_size(&args, &drivers, &store, tmp.path(), mb, fill)
        }));
        for (_, kvm) in &drivers {
            for d in kvm.domains().unwrap_or_default() {
                let _ = kvm.destroy(&d.name);
            }
        }
        let m = kvm0.dom0_memory().unwrap();
        let _ = kvm0.set_dom0_target(m.max_mb);
        match outcome {
            Ok(r) => rows.extend(r),
            Err(_) => {
                eprintln!(
                    "{mb} MB: FAILED (see above); its VMs destroyed and its pages given back"
                );
                failed = true;
            }
        }
    }
    let out = json!({
        "host": host,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "accelerator": pilot::hypervisor::kvm::host_claims_kvm().1,
        "fill_percent": args.fill_percent,
        "rows": rows,
    });
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| repo.join("target/checkpoint-bench.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("JSON: {}", path.display());
    if failed {
        std::process::exit(1);
    }
}

/// One guest size on a booted-for-it VM: the repeats for each compressor.
/// Returns a row per compressor.
fn bench_size(
    args: &Args,
    drivers: &[(String, Kvm)],
    store: &Store,
    tmp: &Path,
    mb: u64,
    fill: u64,
) -> Vec<serde_json::Value> {
    let kvm0 = &drivers[0].1;
    let mut rows = Vec::new();
    let vm_id = VmId::generate();
    let mut vm = VmLaunch::basic(
        vm_id.clone(),
        VmName::new(SlotId::generate(), vm_id.clone()).to_string(),
        mb,
        1,
        "kernel:".into(),
    );
    let t = Instant::now();
    kvm0.create(&vm).expect("boot");
    wait_serial(kvm0, &vm.name, "WSP-VM-READY", Duration::from_secs(600));
    eprintln!(
        "{mb} MB: booted and filled {fill} MB in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let run_dir = kvm0.run_dir().to_path_buf();
    for (comp, kvm) in drivers {
        let zstd = comp == "zstd";
        let mut s = Samples::default();
        for r in 0..args.repeats {
            // Baseline save (the VM goes on running after it).
            let file = tmp.join("baseline.state");
            let bare = baseline_save(&run_dir, &vm.name, &file, zstd);
            // What the bare save's file still needs to be on disk, as ours is.
            let t = Instant::now();
            std::fs::File::open(&file).unwrap().sync_all().unwrap();
            s.base_save.push(bare);
            s.base_save_fsync
                .push(bare + t.elapsed().as_secs_f64() * 1000.0);
            s.base_bytes
                .push(std::fs::metadata(&file).unwrap().len() as f64);
            let meta: VmMeta = serde_json::from_slice(
                &std::fs::read(run_dir.join(format!("{}.vm.json", vm.name))).unwrap(),
            )
            .unwrap();

            // Ours: save into the store, commit, destroy.
            let id = CheckpointId {
                workspace_id: WorkspaceId::generate(),
                vm_id: vm_id.clone(),
                generation: r as u32 + 1,
            };
            let t = Instant::now();
            let mut w = store
                .begin(
                    &id,
                    WriterInfo {
                        node: "bench".into(),
                        slot: "sl-00000000".into(),
                        pid: std::process::id(),
                        started_ms: 0,
                    },
                )
                .unwrap();
            let driver = kvm
                .save(&vm.name, &mut w, Instant::now() + Duration::from_secs(600))
                .expect("save");
            let save_ms = t.elapsed().as_secs_f64() * 1000.0;
            let c = w
                .commit(ManifestInfo {
                    warm: false,
                    vm_name: vm.name.clone(),
                    hypervisor: kvm.name().to_string(),
                    memory_mb: mb,
                    cpus: 1,
                    image: vm.image.clone(),
                    image_sha256: None,
                    node: "bench".into(),
                    slot: SlotId::generate(),
                    save_ms: save_ms as u64,
                    driver,
                })
                .unwrap();
            kvm.destroy(&vm.name).expect("destroy");
            s.ours_save.push(save_ms);
            s.ours_suspend.push(t.elapsed().as_secs_f64() * 1000.0);
            s.ours_bytes.push(c.bytes as f64);

            // Baseline restore (then quit), ours restore (the VM lives on).
            s.base_restore
                .push(baseline_restore(&run_dir, &meta, &file, zstd));
            let _ = std::fs::remove_file(&file);
            let mut next = vm.clone();
            next.name = VmName::new(SlotId::generate(), vm_id.clone()).to_string();
            let from = store.open_verified(&id, Some(&c.sha256)).unwrap();
            let t = Instant::now();
            kvm.restore(&next, &from, Instant::now() + Duration::from_secs(600))
                .expect("restore");
            s.ours_restore.push(t.elapsed().as_secs_f64() * 1000.0);
            store.delete(&id).unwrap();
            // The old name's files are gone with its destroy; go on with the new one.
            let _ = std::fs::remove_file(run_dir.join(format!("{}.serial", vm.name)));
            vm = next;
        }
        let gb = mb as f64 / 1024.0;
        let row = json!({
            "memory_mb": mb,
            "filled_mb": fill,
            "compressor": comp,
            "repeats": args.repeats,
            "baseline_save_ms": median(&mut s.base_save),
            "baseline_save_fsync_ms": median(&mut s.base_save_fsync),
            "ours_save_ms": median(&mut s.ours_save),
            "ours_suspend_ms": median(&mut s.ours_suspend),
            "baseline_restore_ms": median(&mut s.base_restore),
            "ours_restore_ms": median(&mut s.ours_restore),
            "baseline_bytes": median(&mut s.base_bytes),
            "ours_bytes": median(&mut s.ours_bytes),
        });
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
                "{mb:>5} MB {comp:>4}: suspend ours {:>6.0} ms (save {:>6.0}) vs bare {:>6.0} ms, bare+fsync {:>6.0} ms = x{:.2}, {:>5.0} ms/GB; \
                 resume ours {:>6.0} ms vs bare {:>6.0} ms = x{:.2}, {:>5.0} ms/GB; {:.0} MB stored",
                f("ours_suspend_ms"),
                f("ours_save_ms"),
                f("baseline_save_ms"),
                f("baseline_save_fsync_ms"),
                f("ours_suspend_ms") / f("baseline_save_fsync_ms"),
                f("ours_suspend_ms") / gb,
                f("ours_restore_ms"),
                f("baseline_restore_ms"),
                f("ours_restore_ms") / f("baseline_restore_ms"),
                f("ours_restore_ms") / gb,
                f("ours_bytes") / 1e6,
            );
        rows.push(row);
    }
    rows
}
