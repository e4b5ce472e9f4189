//! CPU shares and warm VMs with real QEMU (TCG where the host has no usable
//! KVM): `workspace-pilot run --hypervisor kvm` and its fake coordinator.
//!
//! CPU: two guests that burn a CPU (payload `wsp.burn=1`) pinned to one
//! host CPU; the CPU time of each QEMU is read from /proc over a window.
//! Warm: a template of the payload (`wsp.warm=1 wsp.disk=1`) is snapshotted;
//! two users' VMs are started from it on a bridge in a network namespace,
//! each gets its own name and address from the seed and NIC plugged in
//! after the restore, writes its name on its disk and in its memory, and
//! the second never sees the first's. The tests hold the kvm tests'
//! host-wide lock and fail loudly without QEMU, the payload, or (for CPU
//! shares) a cgroup hierarchy with the cpu controller.

use nix::sys::signal::Signal;
use pilot::checkpoint::Store;
use protocol::pilot::{
    CheckpointId, CommandKind, Context, CpuControl, CpuShare, EventKind, Nic, RestoreFrom,
    ResumeFailure, VmLaunch, WarmOutcome,
};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::Coord;

const PILOT: &str = env!("CARGO_BIN_EXE_workspace-pilot");
const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";
const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("number")
}

fn logs() -> Stdio {
    if std::env::var_os("WSP_TEST_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run a command");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The payload directory (built by scripts/kvm-payload.sh); panics with why.
fn payload() -> PathBuf {
    assert!(
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok(),
        "qemu-system-x86_64 is missing: run scripts/install-deps.sh"
    );
    let out = Command::new(repo().join("scripts/kvm-payload.sh"))
        .output()
        .expect("run scripts/kvm-payload.sh");
    assert!(
        out.status.success(),
        "scripts/kvm-payload.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A network namespace with the bridge `wspbr0` (10.77.0.1/24); deleted,
/// with every process in it, when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Self {
        let name = format!("wsp-pool-{:08x}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        for cmd in [
            "ip link set lo up",
            "ip link add wspbr0 type bridge",
            "ip link set wspbr0 type bridge stp_state 0 forward_delay 0",
            "ip addr add 10.77.0.1/24 dev wspbr0",
            "ip link set wspbr0 up",
        ] {
            run(Command::new("ip")
                .args(["netns", "exec", &ns.0])
                .args(cmd.split(' ')));
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if let Ok(pid) = p.parse::<i32>() {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The test's host-wide lock, its directory, the image (the payload's
/// kernel and initrd, and a vfat disk labelled WSPDATA), one node: its
/// fake coordinator and pilot arguments. Dropping it kills any QEMU of the
/// test and removes its cgroup parent.
struct Site {
    tmp: tempfile::TempDir,
    store: PathBuf,
    config: PathBuf,
    state_dir: PathBuf,
    key_file: PathBuf,
    slot: SlotId,
    coord: Arc<Coord>,
    url: String,
    cgroup_parent: String,
    original_pages: u64,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Site {
    /// `kvm` is the rest of the node config's `[kvm]` section.
    async fn new(kvm: &str) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TEST_LOCK)
            .expect("open the kvm test lock");
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("take the kvm test lock");
        let p = payload();
        let tmp = tempfile::Builder::new()
            .prefix("wsp-kvmpool-")
            .tempdir()
            .unwrap();
        let guest = tmp.path().join("images").join("guest");
        std::fs::create_dir_all(&guest).unwrap();
        for f in ["vmlinux", "initrd.gz"] {
            std::os::unix::fs::symlink(p.join(f), guest.join(f)).unwrap();
        }
        run(Command::new("mkfs.vfat")
            .args(["-C", "-n", "WSPDATA"])
            .arg(guest.join("disk.img"))
            .arg("8192"));
        let store = tmp.path().join("store");
        let cgroup_parent = format!("wsp-test-{}", std::process::id());
        let config = tmp.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[kvm]\nrun_dir = \"{t}/kvm\"\nimage_dir = \"{t}/images\"\ncompressor = \"none\"\n\
                 accelerator = \"tcg\"\ncgroup_parent = \"{cgroup_parent}\"\n{kvm}\n\
                 [checkpoints]\ndir = \"{store}\"\n",
                t = tmp.path().display(),
                store = store.display(),
            ),
        )
        .unwrap();
        let key_file = tmp.path().join("slot.key");
        let (coord, url) = Coord::start(&key_file).await;
        Self {
            store,
            config,
            state_dir: tmp.path().join("state"),
            key_file,
            slot: coord.slot.clone(),
            coord,
            url,
            cgroup_parent,
            original_pages: nr_hugepages(),
            tmp,
            _lock: lock,
        }
    }

    fn pilot(&self, memory_mb: u64, extra: &[&str]) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(PILOT);
        cmd.args([
            "run",
            "--slot",
            self.slot.as_str(),
            "--coordinator",
            &self.url,
        ])
        .arg("--key-file")
        .arg(&self.key_file)
        .args(["--memory-mb", &memory_mb.to_string(), "--duration-s", "600"])
        .args(["--grace-s", "20", "--margin-s", "1"])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .args(["--node", "n1", "--hypervisor", "kvm"])
        .arg("--node-config")
        .arg(&self.config)
        .args(["--notify-timeout-ms", "500", "--poll-wait-ms", "500"])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(logs())
        .kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("kvm")
    }

    fn launch(&self, vm_id: &VmId, memory_mb: u64) -> VmLaunch {
        VmLaunch::basic(
            vm_id.clone(),
            VmName::new(self.slot.clone(), vm_id.clone()).to_string(),
            memory_mb,
            1,
            "guest".into(),
        )
    }

    fn serial(&self, name: &str) -> String {
        std::fs::read_to_string(self.run_dir().join(format!("{name}.serial"))).unwrap_or_default()
    }

    async fn wait_serial(&self, name: &str, what: &str) -> String {
        let t = Instant::now();
        loop {
            let text = self.serial(name);
            if text.contains(what) {
                return text;
            }
            assert!(
                t.elapsed() < WAIT,
                "no {what:?} from {name} within {WAIT:?}; console:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn qemu_pid(&self, name: &str) -> i32 {
        std::fs::read_to_string(self.run_dir().join(format!("{name}.pid")))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    fn qemus(&self) -> Vec<i32> {
        let needle = self.tmp.path().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.contains("qemu-system") && c.contains(&needle)
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    async fn nth(&self, name: &str, n: usize) -> EventKind {
        self.coord.wait_for_nth(name, n, WAIT).await.kind
    }

    async fn reserved(&self) -> EventKind {
        let t = Instant::now();
        loop {
            for e in self.coord.events() {
                match e.kind {
                    k @ EventKind::Reserved { .. } => return k,
                    EventKind::ReserveFailed { reason } => panic!("not reserved: {reason}"),
                    _ => {}
                }
            }
            assert!(t.elapsed() < WAIT, "{:?}", self.coord.kinds());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for pid in self.qemus() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu"] {
            let p = Path::new(root).join(&self.cgroup_parent);
            let _ = std::fs::remove_dir(p.join("n1"));
            let _ = std::fs::remove_dir(p);
        }
    }
}

async fn exit_code(child: &mut tokio::process::Child, timeout: Duration) -> i32 {
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap_or_else(|_| panic!("pilot still running after {timeout:?}"))
        .unwrap();
    status.code().unwrap_or(-1)
}

/// CPU time (user + system, all threads) of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Each process's CPU over `window`, in CPUs (1.0 = one whole CPU).
async fn cpu_use(pids: &[i32], window: Duration) -> Vec<f64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| (cpu_ticks(*p) - b) as f64 / hz / secs)
        .collect()
}

/// Pins every thread of `pid` to host CPU `cpu`.
fn pin(pid: i32, cpu: u32) {
    run(Command::new("taskset").args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()]));
}

/// The node's cgroup directory from `reserved`'s cpu_control.
fn cgroup_dir(ctl: &CpuControl) -> PathBuf {
    assert!(
        ctl.available,
        "CPU shares are not available on this host: {:?}",
        ctl.reason
    );
    PathBuf::from(
        ctl.mechanism
            .split_once(' ')
            .and_then(|(_, r)| r.split_once(' '))
            .map(|(_, path)| path)
            .expect("cgroup vN <dir>"),
    )
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The cap and weight files of a VM's cgroup, as the kernel holds them.
fn cgroup_share(dir: &Path) -> (String, String) {
    if dir.join("cpu.max").exists() {
        (
            read_trim(&dir.join("cpu.max")),
            read_trim(&dir.join("cpu.weight")),
        )
    } else {
        (
            read_trim(&dir.join("cpu.cfs_quota_us")),
            read_trim(&dir.join("cpu.shares")),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kvm_urgent_vm_gets_its_share_of_a_contended_cpu_while_the_other_is_capped() {
    let site = Site::new(
        "hugepages = false\n\
         append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.burn=1\"",
    )
    .await;
    let mut child = site.pilot(512, &[]);
    let ctl = match site.reserved().await {
        EventKind::Reserved { cpu_control, .. } => cpu_control.expect("reported"),
        _ => unreachable!(),
    };
    let node_dir = cgroup_dir(&ctl);
    eprintln!("CPU shares through {}", ctl.mechanism);

    // A VM runs, burning its CPU.
    let (other, urgent) = (VmId::generate(), VmId::generate());
    let lo = site.launch(&other, 128);
    site.coord.command(CommandKind::StartVm(lo.clone()));
    site.nth("vm_started", 1).await;
    site.wait_serial(&lo.name, "WSP-VM-READY").await;

    // An urgent lease shares the node: the running VM is capped at 10 % of
    // a CPU, the urgent one starts with weight 900 (90 % of a contended CPU).
    let cap = CpuShare {
        weight: None,
        cap_pct: Some(10),
    };
    site.coord.command(CommandKind::SetCpu {
        vm_id: other.clone(),
        cpu: cap,
    });
    match site.nth("vm_cpu_set", 1).await {
        EventKind::VmCpuSet { mechanism, .. } => assert_eq!(mechanism, ctl.mechanism),
        other => panic!("{other:?}"),
    }
    let mut lu = site.launch(&urgent, 128);
    lu.urgency = 2;
    lu.cpu = Some(CpuShare {
        weight: Some(900),
        cap_pct: None,
    });
    site.coord.command(CommandKind::StartVm(lu.clone()));
    site.nth("vm_started", 2).await;
    site.wait_serial(&lu.name, "WSP-VM-READY").await;
    let (po, pu) = (site.qemu_pid(&lo.name), site.qemu_pid(&lu.name));
    let (cg_o, cg_u) = (node_dir.join(&lo.name), node_dir.join(&lu.name));
    for (dir, pid) in [(&cg_o, po), (&cg_u, pu)] {
        let procs = read_trim(&dir.join("cgroup.procs"));
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "QEMU {pid} is in {}: {procs}",
            dir.display()
        );
    }
    let (o_cap, _) = cgroup_share(&cg_o);
    let (_, u_weight) = cgroup_share(&cg_u);
    assert!(
        o_cap == "10000" || o_cap == "10000 100000",
        "cap file: {o_cap}"
    );
    assert!(
        u_weight == "9216" || u_weight == "900",
        "weight file: {u_weight}"
    );

    // Both on one host CPU: they contend.
    pin(po, 0);
    pin(pu, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let w = Duration::from_secs(4);
    let u = cpu_use(&[pu, po], w).await;
    let share = u[0] / (u[0] + u[1]);
    eprintln!(
        "capped: urgent {:.3} CPU, other {:.3} CPU; urgent's share {share:.3}",
        u[0], u[1]
    );
    assert!(
        u[1] <= 0.10 * 1.25 + 0.02,
        "the capped VM used {:.3} of a CPU (cap 0.10)",
        u[1]
    );
    assert!(
        share >= 0.85,
        "the urgent VM got {share:.3} of the contended CPU (configured 0.90)"
    );

    // The urgent lease ends: both back to the default share, and they split
    // the CPU evenly (the control: the pinning does make them contend).
    for vm in [&other, &urgent] {
        site.coord.command(CommandKind::SetCpu {
            vm_id: vm.clone(),
            cpu: CpuShare::default(),
        });
    }
    site.nth("vm_cpu_set", 3).await;
    let (o_cap, o_weight) = cgroup_share(&cg_o);
    assert!(o_cap == "-1" || o_cap == "max 100000", "lifted: {o_cap}");
    assert!(
        o_weight == "1024" || o_weight == "100",
        "default weight: {o_weight}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let u = cpu_use(&[pu, po], w).await;
    let share = u[0] / (u[0] + u[1]);
    eprintln!(
        "lifted: urgent {:.3} CPU, other {:.3} CPU; urgent's share {share:.3}",
        u[0], u[1]
    );
    assert!(
        (0.35..=0.65).contains(&share),
        "equal shares split the CPU about evenly: {share:.3}"
    );
    assert!(u[1] > 0.25, "uncapped, the other VM runs: {:.3}", u[1]);

    site.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    assert!(site.qemus().is_empty());
    assert!(!cg_o.exists() && !cg_u.exists(), "VM cgroups removed");
}

fn nic(mac: &str, ip: &str) -> Nic {
    Nic {
        mac: mac.into(),
        ip: ip.parse().unwrap(),
        prefix_len: 24,
        gateway: None,
        pool: "private".into(),
    }
}

/// User `host`'s VM from the warm snapshot: its workspace, NIC and name.
fn user_launch(site: &Site, ws: &WorkspaceId, host: &str, n: Nic, from: &RestoreFrom) -> VmLaunch {
    let vm = VmId::generate();
    let mut l = site.launch(&vm, 128);
    l.hostname = Some(host.into());
    l.context = Some(Context {
        workspace_id: ws.to_string(),
        workspace_name: host.into(),
        group: "worker".into(),
        peers: Vec::new(),
        ssh_key: None,
    });
    l.nics = vec![n];
    l.restore = Some(from.clone());
    l
}

/// What follows `marker` on its first line of the console, trimmed.
fn line_after(text: &str, marker: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(marker))
        .unwrap_or_else(|| panic!("no {marker} line in:\n{text}"))
        .trim()
        .to_string()
}

fn vmgenid(site: &Site, name: &str) -> String {
    let meta: serde_json::Value =
        serde_json::from_str(&read_trim(&site.run_dir().join(format!("{name}.vm.json")))).unwrap();
    meta["vmgenid"]
        .as_str()
        .expect("a warm VM has a generation id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn kvm_warm_vms_get_a_fresh_overlay_and_their_own_identity_and_never_the_previous_users() {
    let ns = Netns::create();
    let site = Site::new(&format!(
        "append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.warm=1 wsp.disk=1\"\n\
         bridge = \"wspbr0\"\nnetns = \"{}\"\ndnsmasq_user = \"root\"\nnft_table = \"wsp_pool_test\"",
        ns.0
    ))
    .await;
    // A pool slot whose idle reservation holds the template.
    let mut child = site.pilot(128, &["--pool"]);
    site.reserved().await;
    assert_eq!(nr_hugepages(), site.original_pages + 64);

    let t = VmId::generate();
    let to = CheckpointId {
        workspace_id: WorkspaceId::parse("ws-00000a4e").unwrap(),
        vm_id: t.clone(),
        generation: 1,
    };
    site.coord.command(CommandKind::PrepareWarm {
        launch: site.launch(&t, 128),
        to: to.clone(),
        ready_timeout_s: 60,
    });
    let sha = match site.nth("warm_prepared", 1).await {
        EventKind::WarmPrepared {
            sha256,
            boot_ms,
            save_ms,
            bytes,
            ..
        } => {
            eprintln!("warm snapshot: boot {boot_ms} ms, save {save_ms} ms, {bytes} bytes");
            sha256
        }
        other => panic!("{other:?}"),
    };
    assert!(site.qemus().is_empty(), "the template is gone");
    let store = Store::at(&site.store).unwrap();
    store
        .open_verified(&to, Some(&sha))
        .unwrap()
        .verify_all()
        .unwrap();
    let from = RestoreFrom {
        checkpoint: to.clone(),
        sha256: sha.clone(),
        warm: true,
    };

    // User A: restored, named, addressed, writes its name on disk and in memory.
    let (wa, wb) = (WorkspaceId::generate(), WorkspaceId::generate());
    site.coord.command(CommandKind::Bind {
        workspace_id: wa.clone(),
        memory_mb: 128,
    });
    site.nth("bound", 1).await;
    let la = user_launch(
        &site,
        &wa,
        "usera-0",
        nic("02:00:00:77:00:0a", "10.77.0.10"),
        &from,
    );
    site.coord.command(CommandKind::StartVm(la.clone()));
    match site.nth("vm_started", 1).await {
        EventKind::VmStarted {
            warm: Some(WarmOutcome::Restored { restore_ms, .. }),
            create_ms,
            ..
        } => eprintln!("user A: restore {restore_ms} ms, start command to running {create_ms} ms"),
        other => panic!("{other:?}"),
    }
    let text = site.wait_serial(&la.name, "WSP-FILES").await;
    assert!(text.contains("WSP-IDENTITY usera-0 10.77.0.10"), "{text}");
    assert_eq!(line_after(&text, "WSP-USERS"), "usera-0", "{text}");
    assert!(
        line_after(&text, "WSP-FILES").contains("wsp-user-usera-0"),
        "{text}"
    );
    assert!(
        !text.contains("WSP-VM-READY"),
        "restored, not booted:\n{text}"
    );
    let genid_a = vmgenid(&site, &la.name);

    // A's lease ends; B's VM comes from the same snapshot.
    site.coord.command(CommandKind::Unbind {
        workspace_id: wa,
        memory_mb: 128,
    });
    site.nth("unbound", 1).await;
    site.coord.command(CommandKind::Bind {
        workspace_id: wb.clone(),
        memory_mb: 128,
    });
    site.nth("bound", 2).await;
    let lb = user_launch(
        &site,
        &wb,
        "userb-0",
        nic("02:00:00:77:00:0b", "10.77.0.11"),
        &from,
    );
    site.coord.command(CommandKind::StartVm(lb.clone()));
    assert!(matches!(
        site.nth("vm_started", 2).await,
        EventKind::VmStarted {
            warm: Some(WarmOutcome::Restored { .. }),
            ..
        }
    ));
    let text = site.wait_serial(&lb.name, "WSP-FILES").await;
    assert!(text.contains("WSP-IDENTITY userb-0 10.77.0.11"), "{text}");
    assert_eq!(
        line_after(&text, "WSP-USERS"),
        "userb-0",
        "B's memory holds only B:\n{text}"
    );
    let files = line_after(&text, "WSP-FILES");
    assert!(
        files.contains("wsp-user-userb-0") && !files.contains("usera"),
        "B's disk has no file of A's: {files}"
    );
    assert_ne!(
        vmgenid(&site, &lb.name),
        genid_a,
        "each copy has its own generation id"
    );
    store
        .open_verified(&to, Some(&sha))
        .unwrap()
        .verify_all()
        .unwrap();

    // A corrupt snapshot: refused by checksum, the VM is booted instead.
    let mem = store.path(&to).join("memory");
    let mut data = std::fs::read(&mem).unwrap();
    let i = data.len() / 3;
    data[i] ^= 0x40;
    std::fs::write(&mem, &data).unwrap();
    site.coord.command(CommandKind::Reserve { memory_mb: 256 });
    site.nth("reservation_changed", 1).await;
    let lc = user_launch(
        &site,
        &wb,
        "userb-1",
        nic("02:00:00:77:00:0c", "10.77.0.12"),
        &from,
    );
    site.coord.command(CommandKind::StartVm(lc.clone()));
    match site.nth("vm_started", 3).await {
        EventKind::VmStarted {
            warm: Some(WarmOutcome::ColdBooted { cause, reason, .. }),
            ..
        } => {
            assert_eq!(cause, ResumeFailure::ChecksumMismatch, "{reason}");
            assert!(reason.contains("memory has sha256"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let text = site.wait_serial(&lc.name, "WSP-VM-READY").await;
    assert!(!text.contains("WSP-USERS"), "a fresh boot:\n{text}");

    // The coordinator makes a new snapshot (as after a cold_booted answer):
    // the old one leaves the store, the new one is whole.
    site.coord.command(CommandKind::Reserve { memory_mb: 384 });
    site.nth("reservation_changed", 2).await;
    let t2 = VmId::generate();
    let to2 = CheckpointId {
        workspace_id: to.workspace_id.clone(),
        vm_id: t2.clone(),
        generation: 2,
    };
    site.coord.command(CommandKind::PrepareWarm {
        launch: site.launch(&t2, 128),
        to: to2.clone(),
        ready_timeout_s: 60,
    });
    let sha2 = match site.nth("warm_prepared", 2).await {
        EventKind::WarmPrepared { sha256, .. } => sha256,
        other => panic!("{other:?}"),
    };
    let listed: Vec<CheckpointId> = store.list().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(
        listed,
        vec![to2.clone()],
        "the superseded snapshot {to} is deleted"
    );
    store
        .open_verified(&to2, Some(&sha2))
        .unwrap()
        .verify_all()
        .unwrap();

    site.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    assert!(site.qemus().is_empty());
    assert_eq!(nr_hugepages(), site.original_pages);
    let left: Vec<String> = std::fs::read_dir(site.run_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wsp-"))
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The warm-vs-cold bench (scripts/bench-warm.sh; BENCHMARKS.md): on one
/// pool slot, `WSP_BENCH_REPEATS` (5) times each, a lease's VM started from
/// the warm snapshot and one booted from its image. Timed: the pilot's
/// `create_ms` (start command to `vm_started`) and, from the moment the
/// command is queued, until the guest says it is usable ("WSP-IDENTITY"
/// once the hot-plugged seed is read after a restore, "WSP-VM-READY" after
/// a boot). Prints medians; `WSP_BENCH_JSON=path` also writes them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: scripts/bench-warm.sh"]
async fn bench_warm_start_against_cold_boot() {
    let repeats: usize = std::env::var("WSP_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let site = Site::new(
        "append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.warm=1 wsp.disk=1\"",
    )
    .await;
    let mut child = site.pilot(128, &["--pool"]);
    site.reserved().await;
    let t = VmId::generate();
    let to = CheckpointId {
        workspace_id: WorkspaceId::parse("ws-0000be4c").unwrap(),
        vm_id: t.clone(),
        generation: 1,
    };
    site.coord.command(CommandKind::PrepareWarm {
        launch: site.launch(&t, 128),
        to: to.clone(),
        ready_timeout_s: 60,
    });
    let (sha, prep) = match site.nth("warm_prepared", 1).await {
        EventKind::WarmPrepared {
            sha256,
            boot_ms,
            save_ms,
            bytes,
            ..
        } => (sha256, (boot_ms, save_ms, bytes)),
        other => panic!("{other:?}"),
    };
    let from = RestoreFrom {
        checkpoint: to,
        sha256: sha,
        warm: true,
    };
    let (mut warm_cmd, mut warm_ready, mut cold_cmd, mut cold_ready) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut n = 0;
    for i in 0..repeats {
        for warm in [true, false] {
            n += 1;
            let ws = WorkspaceId::generate();
            site.coord.command(CommandKind::Bind {
                workspace_id: ws.clone(),
                memory_mb: 128,
            });
            site.nth("bound", n).await;
            let vm = VmId::generate();
            let mut l = site.launch(&vm, 128);
            let host = format!("bench{i}{}", if warm { "w" } else { "c" });
            l.hostname = Some(host.clone());
            l.context = Some(Context {
                workspace_id: ws.to_string(),
                workspace_name: host,
                group: "worker".into(),
                peers: Vec::new(),
                ssh_key: None,
            });
            l.restore = warm.then(|| from.clone());
            let t0 = Instant::now();
            site.coord.command(CommandKind::StartVm(l.clone()));
            let create_ms = match site.nth("vm_started", n).await {
                EventKind::VmStarted {
                    create_ms, warm: w, ..
                } => {
                    assert_eq!(
                        matches!(w, Some(WarmOutcome::Restored { .. })),
                        warm,
                        "{w:?}"
                    );
                    create_ms as f64
                }
                other => panic!("{other:?}"),
            };
            site.wait_serial(&l.name, if warm { "WSP-IDENTITY" } else { "WSP-VM-READY" })
                .await;
            let ready = t0.elapsed().as_secs_f64() * 1000.0;
            if warm {
                warm_cmd.push(create_ms);
                warm_ready.push(ready);
            } else {
                cold_cmd.push(create_ms);
                cold_ready.push(ready);
            }
            site.coord.command(CommandKind::Unbind {
                workspace_id: ws,
                memory_mb: 128,
            });
            site.nth("unbound", n).await;
        }
    }
    let m = [
        median(&mut warm_cmd),
        median(&mut warm_ready),
        median(&mut cold_cmd),
        median(&mut cold_ready),
    ];
    println!(
        "warm snapshot of a 128 MB guest: boot {} ms, save {} ms, {} bytes",
        prep.0, prep.1, prep.2
    );
    println!("medians of {repeats}: start command to vm_started / to the guest usable");
    println!("warm restore: {:.0} ms / {:.0} ms", m[0], m[1]);
    println!("cold boot:    {:.0} ms / {:.0} ms", m[2], m[3]);
    println!("cold / warm:  x{:.2} / x{:.2}", m[2] / m[0], m[3] / m[1]);
    if let Ok(p) = std::env::var("WSP_BENCH_JSON") {
        let j = serde_json::json!({
            "repeats": repeats, "guest_mb": 128,
            "warm_vm_started_ms": m[0], "warm_usable_ms": m[1],
            "cold_vm_started_ms": m[2], "cold_usable_ms": m[3],
        });
        std::fs::write(p, j.to_string()).unwrap();
    }
    site.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
}
