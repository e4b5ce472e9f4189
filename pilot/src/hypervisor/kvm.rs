//! `kvm`: real VMs, one `qemu-system-x86_64` process per VM (KVM where the
//! host really has it, TCG otherwise), controlled over QMP on a unix socket.
//!
//! The node's "dom0 memory" is the host memory not held as hugepages by this
//! node: reserving = adding hugepages to the host pool (see [`hugepages`]).
//! Each VM's files (`<name>.pid/.qmp/.vm.json/.qcow2/.serial/.log`) live in the
//! run dir, so a later process (kill-all) finds and removes them. Saving to
//! and restoring from a checkpoint (suspend, resume, warm snapshots) is in
//! [`checkpoint`]; CPU shares (a cgroup per VM) in [`cpu`].

pub mod checkpoint;
pub mod cpu;
pub mod hugepages;
pub mod net;
pub mod qmp;
pub mod seed;

use super::{Dom0Memory, Domain, HvError, HvOptions, Hypervisor};
use crate::files::write_atomic;
use crate::node::expand_node;
use crate::tools;
use hugepages::HugePages;
use protocol::pilot::{CpuControl, CpuShare, VmLaunch};
use qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `[kvm]` section of the node config. Every key is optional; paths may use
/// `%n` (the node name). See docs/KVM.md for each key.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvmConfig {
    /// QEMU system emulator.
    pub qemu: String,
    /// qemu-img (per-VM overlays, image format detection).
    pub qemu_img: String,
    /// Sockets, pid files, overlays, serial logs, the hugepage ledger.
    pub run_dir: String,
    /// Where relative image names are looked up.
    pub image_dir: String,
    /// Reserve real hugepages (false: accounting only).
    pub hugepages: bool,
    /// Hugepage size: `2M`, `1G` or `<n>k`.
    pub page_size: String,
    /// Host-wide lock held around every change of the hugepage pool.
    pub hugepages_lock: String,
    /// Memory (MB) the host keeps available: a reservation that would leave
    /// less is refused before the kernel is asked.
    pub host_reserve_mb: u64,
    /// Prefix for the privileged write of nr_hugepages (e.g. `["sudo", "-n"]`).
    pub privileged_prefix: Vec<String>,
    /// `auto`, `kvm` or `tcg`.
    pub accelerator: String,
    /// Kernel for `kernel:` images (and the KVM canary boot).
    pub kernel: Option<String>,
    /// Initrd for `kernel:` images.
    pub initrd: Option<String>,
    /// Kernel command line for kernel boots; `%v` is the VM name.
    pub append: String,
    /// QEMU machine type (empty: QEMU's default).
    pub machine: String,
    /// QEMU CPU model (empty: QEMU's default; never `host` unless you mean it).
    pub cpu: String,
    /// Extra QEMU arguments, appended as given.
    pub extra_args: Vec<String>,
    /// Bound for QEMU to start and answer on QMP.
    pub start_timeout_s: u64,
    /// Bound for a graceful `system_powerdown` before `quit` (0: no powerdown).
    pub shutdown_timeout_s: u64,
    /// Bound between QMP `quit` and SIGKILL.
    pub kill_timeout_s: u64,
    /// Bound for qemu-img and other commands.
    pub command_timeout_s: u64,
    /// The driver's own bound on one checkpoint save or restore (the
    /// pilot's deadline, e.g. the grace period's budget, may be shorter).
    pub save_timeout_s: u64,
    /// Checkpoint memory compression: `zstd` (level 1, the `zstd` program) or `none`.
    pub compressor: String,
    /// The `zstd` program.
    pub zstd: String,
    /// Bound for the KVM canary boot.
    pub canary_timeout_s: u64,
    /// Serial line the canary boot must print.
    pub canary_marker: String,
    /// Bridge the VMs' taps join (the site's; never created here). Needed
    /// when VMs have NICs (`[network]` in the coordinator's config).
    pub bridge: String,
    /// Bridge for NICs from the public pool (default: `bridge`).
    pub public_bridge: String,
    /// Run ip, nft, dnsmasq and QEMU inside this network namespace
    /// (`ip netns exec`); empty: the host's.
    pub netns: String,
    /// `ip` (iproute2).
    pub ip: String,
    /// `nft` (nftables).
    pub nft: String,
    /// `dnsmasq`, one per node, DHCP only.
    pub dnsmasq: String,
    /// `--user` for dnsmasq (empty: its default, usually `nobody`, which must
    /// be able to read the run dir).
    pub dnsmasq_user: String,
    /// Anti-spoofing table (nftables bridge family).
    pub guard: bool,
    /// Its name (`%n` = node; other characters than letters and digits
    /// become `_`). Nodes sharing a run dir (one host) share it.
    pub nft_table: String,
    /// Seed image tools (dosfstools, mtools).
    pub mkfs_vfat: String,
    pub mcopy: String,
    /// CPU shares: `auto` (a cgroup per VM, v2 or v1, see [`cpu`]) or `off`.
    pub cgroup: String,
    /// Where the VMs' cgroups go, relative to the hierarchy's root; each
    /// node gets `<cgroup_parent>/<node>/<vm name>`.
    pub cgroup_parent: String,
    /// Serial line that says a booting guest is ready (a warm snapshot is
    /// taken once it shows).
    pub ready_marker: String,
}

impl Default for KvmConfig {
    fn default() -> Self {
        Self {
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            run_dir: "/run/workspace-pilot/%n/kvm".into(),
            image_dir: "/var/lib/workspace-pilot/images".into(),
            hugepages: true,
            page_size: "2M".into(),
            hugepages_lock: "/run/lock/wsp-hugepages.lock".into(),
            host_reserve_mb: 512,
            privileged_prefix: Vec::new(),
            accelerator: "auto".into(),
            kernel: None,
            initrd: None,
            append: "console=ttyS0 quiet panic=-1 wsp.hostname=%v".into(),
            machine: String::new(),
            cpu: String::new(),
            extra_args: Vec::new(),
            start_timeout_s: 20,
            shutdown_timeout_s: 0,
            kill_timeout_s: 5,
            command_timeout_s: 60,
            save_timeout_s: 600,
            compressor: "zstd".into(),
            zstd: "zstd".into(),
            canary_timeout_s: 15,
            canary_marker: "WSP-VM-READY".into(),
            bridge: String::new(),
            public_bridge: String::new(),
            netns: String::new(),
            ip: "ip".into(),
            nft: "nft".into(),
            dnsmasq: "dnsmasq".into(),
            dnsmasq_user: String::new(),
            guard: true,
            nft_table: "wsp_%n".into(),
            mkfs_vfat: "mkfs.vfat".into(),
            mcopy: "mcopy".into(),
            cgroup: "auto".into(),
            cgroup_parent: "workspace-pilot".into(),
            ready_marker: "WSP-VM-READY".into(),
        }
    }
}

/// How QEMU runs guests on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Parses `2M`, `1G`, `2048k`, `2048kB` into kB.
pub fn parse_page_size(s: &str) -> Result<u64, HvError> {
    let t = s.trim().trim_end_matches(['B', 'b']);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024),
        Some('g' | 'G') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| n * mult)
        .ok_or_else(|| HvError::Config(format!("[kvm] page_size {s:?}: expected e.g. 2M or 1G")))
}

/// Runs `cmd` with an optional stdin, bounded by `timeout`; returns stdout.
/// On failure the error keeps the raw stderr (and stdout).
pub(crate) fn run_bounded(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    shown: &str,
) -> Result<String, HvError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let fail = |message: String, output: String| HvError::KvmCommand {
        command: shown.to_string(),
        message,
        output,
    };
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .map_err(|e| match tools::spawn_error(&program, &e) {
            Some(m) => HvError::from(m),
            None => fail(format!("cannot start: {e}"), String::new()),
        })?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(&bytes);
    }
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    format!("timed out after {} ms", timeout.as_millis()),
                    String::new(),
                ));
            }
            Err(e) => return Err(fail(format!("wait: {e}"), String::new())),
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(fail(
            format!("exited with {status}"),
            format!("{}{}", stderr.trim(), stdout.trim()),
        ))
    }
}

/// How a VM boots, from its `image`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// `-kernel`/`-initrd`/`-append`; a kernel directory may add a disk
    /// (`disk.qcow2` or `disk.img`), used through a per-VM overlay.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        disk: Option<PathBuf>,
    },
    /// A disk image, used through a per-VM copy-on-write overlay.
    Disk { base: PathBuf },
}

impl Boot {
    /// The image the VM's copy-on-write overlay sits on, if it has a disk.
    pub fn disk_base(&self) -> Option<&Path> {
        match self {
            Boot::Kernel { disk, .. } => disk.as_deref(),
            Boot::Disk { base } => Some(base),
        }
    }
}

/// What the run dir keeps about one VM (`<name>.vm.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmMeta {
    pub name: String,
    pub memory_mb: u64,
    pub cpus: u32,
    pub image: String,
    pub accel: Accel,
    /// QEMU's arguments (without the program), to restore a suspended VM.
    pub argv: Vec<String>,
    pub overlay: Option<PathBuf>,
    pub created_ms: u64,
    /// Its taps on the node (recorded before they are created).
    #[serde(default)]
    pub taps: Vec<net::TapRecord>,
    /// Its NoCloud seed image.
    #[serde(default)]
    pub seed: Option<PathBuf>,
    /// Its cgroup (CPU shares), when the node has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Its CPU share as last applied (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuShare>,
    /// The warm layout: a VM generation id device (this guid) and the seed
    /// and NICs at fixed PCI slots, so a snapshot of it can be restored and
    /// given another identity by plugging them in ([`Layout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed_slots: bool,
}

/// PCI slot of the seed disk in the warm layout; NIC `i` is at the next ones.
pub const SEED_SLOT: u32 = 0x10;
/// The warm layout has room for this many NICs (slots up to 0x1f).
pub const MAX_FIXED_NICS: usize = 15;

/// How a VM's devices are laid out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// The seed at [`SEED_SLOT`], NIC `i` at `SEED_SLOT + 1 + i`: the same
    /// whether they were on QEMU's command line or plugged in later.
    pub fixed_slots: bool,
    /// A `vmgenid` device with this guid: a guest restored under a new one
    /// knows it is a copy (Linux reseeds its random number generator).
    pub vmgenid: Option<String>,
}

/// A random RFC 4122 (version 4) UUID, for `vmgenid`.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        // Never two the same within a process even then.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The kvm driver for one node.
pub struct Kvm {
    cfg: KvmConfig,
    node: String,
    run_dir: PathBuf,
    image_dir: PathBuf,
    accel: Accel,
    accel_reason: String,
    /// `accelerator = "kvm"` on a host without usable KVM: why (VM starts
    /// are refused with it; kill-all still works).
    accel_problem: Option<String>,
    pages: HugePages,
    /// The most "dom0" may hold: host memory minus the hugepages other nodes
    /// (and the host itself) held when this driver opened.
    max_mb: u64,
    /// QEMU processes this process started, to reap them.
    children: Mutex<HashMap<String, Child>>,
    /// Taps, DHCP and anti-spoofing of the node's VMs.
    net: net::Net,
    /// The VMs' cgroups, for CPU shares.
    cpu: cpu::CpuCgroups,
}

static HOST_KVM: OnceLock<HardwareKvm> = OnceLock::new();

/// Whether hardware KVM works on this host, as far as can be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HardwareKvm {
    /// The static checks pass and a canary boot under `-accel kvm` printed
    /// its marker.
    Works(String),
    /// The static checks pass; no `[kvm] kernel` to confirm it with a
    /// canary boot.
    Unconfirmed(String),
    /// Not usable: module, CPU flag, `/dev/kvm`, `kvm_pvm`, or the canary.
    Unusable(String),
}

impl HardwareKvm {
    pub fn reason(&self) -> &str {
        match self {
            HardwareKvm::Works(r) | HardwareKvm::Unconfirmed(r) | HardwareKvm::Unusable(r) => r,
        }
    }
}

/// One external program the driver runs, and what for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolUse {
    /// As configured (a bare name or a path).
    pub program: String,
    /// The `[kvm]` key that sets it.
    pub key: &'static str,
    pub purpose: &'static str,
    /// Run through `privileged_prefix` (sudo also looks in the sbin dirs).
    pub privileged: bool,
}

fn io(path: &Path, source: std::io::Error) -> HvError {
    HvError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether the host claims usable KVM (hardware virtualization module and
/// CPU flag; `kvm_pvm` does not count). Returns the reason either way.
pub fn host_claims_kvm() -> (bool, String) {
    let module = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists());
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    // QEMU opens it read-write: a pilot's user outside group kvm cannot.
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("absent".to_string()),
        Err(e) => Err(format!("present but cannot be opened ({e})")),
    };
    match (module, flags, &dev) {
        (Some(m), true, Ok(())) => (true, format!("{m} loaded, vmx/svm present, /dev/kvm opens")),
        _ => (
            false,
            format!(
                "no usable KVM: kvm_intel/kvm_amd {}, vmx/svm {}, /dev/kvm {}{}",
                module.map_or("absent", |_| "loaded"),
                if flags { "present" } else { "absent" },
                dev.as_ref().err().map_or("opens", String::as_str),
                if pvm {
                    "; it is kvm_pvm's, which cannot run stock kernels"
                } else {
                    ""
                }
            ),
        ),
    }
}

fn is_zombie_or_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether `pid` is a live QEMU started with `-name <name>`.
pub fn is_our_qemu(pid: u32, name: &str) -> bool {
    if pid == 0 || is_zombie_or_gone(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

impl Kvm {
    /// Opens the driver: creates the run dir, reads the host memory and this
    /// node's hugepage ledger, and chooses the accelerator (cached per process).
    pub fn open(cfg: &KvmConfig, opts: &HvOptions) -> Result<Self, HvError> {
        let node = if opts.node_name.is_empty() {
            "localhost".to_string()
        } else {
            opts.node_name.clone()
        };
        let run_dir = expand_node(&cfg.run_dir, &node);
        let image_dir = expand_node(&cfg.image_dir, &node);
        if run_dir.display().to_string().contains(',') {
            return Err(HvError::Config(format!(
                "[kvm] run_dir {} may not contain a comma (QEMU option syntax)",
                run_dir.display()
            )));
        }
        std::fs::create_dir_all(&run_dir).map_err(|e| io(&run_dir, e))?;
        let page_kb = parse_page_size(&cfg.page_size)?;
        let pages = HugePages {
            enabled: cfg.hugepages,
            page_kb,
            sysfs: PathBuf::from("/sys/kernel/mm/hugepages"),
            lock_path: expand_node(&cfg.hugepages_lock, &node),
            ledger_path: run_dir.join("hugepages.json"),
            privileged: cfg.privileged_prefix.clone(),
            host_reserve_mb: cfg.host_reserve_mb,
        };
        if cfg.hugepages && !pages.count_path().exists() {
            return Err(HvError::Config(format!(
                "[kvm] page_size {}: this kernel has no {} (set hugepages = false for accounting only)",
                cfg.page_size,
                pages.count_path().display()
            )));
        }
        let ledger = pages.ledger()?;
        let total_mb = hugepages::meminfo_kb("MemTotal")? / 1024;
        let mine_mb = ledger.held_pages * ledger.page_kb.max(1) / 1024;
        let others_mb = pages.host_total_mb()?.saturating_sub(mine_mb);
        let max_mb = total_mb.saturating_sub(others_mb);
        let mut accel_problem = None;
        let (accel, accel_reason) = match cfg.accelerator.as_str() {
            "kvm" => {
                let (claims, why) = host_claims_kvm();
                if !claims {
                    accel_problem = Some(why);
                }
                (Accel::Kvm, "configured (accelerator = \"kvm\")".to_string())
            }
            "tcg" => (Accel::Tcg, "configured (accelerator = \"tcg\")".to_string()),
            "auto" => match hardware_kvm(cfg, &node) {
                HardwareKvm::Works(r) | HardwareKvm::Unconfirmed(r) => (Accel::Kvm, r),
                HardwareKvm::Unusable(r) => (Accel::Tcg, r),
            },
            other => {
                return Err(HvError::Config(format!(
                    "[kvm] accelerator {other:?}: expected auto, kvm or tcg"
                )))
            }
        };
        tracing::info!(
            node = %node,
            accelerator = accel.as_str(),
            reason = %accel_reason,
            hugepages = cfg.hugepages,
            page_kb,
            max_mb,
            held_mb = ledger.held_mb,
            "kvm driver ready"
        );
        let net = net::Net::new(cfg, &node, &run_dir);
        let cpu = cpu::CpuCgroups::detect(
            &cfg.cgroup,
            &cfg.cgroup_parent,
            &node,
            &cfg.privileged_prefix,
        );
        Ok(Self {
            cfg: cfg.clone(),
            node,
            run_dir,
            image_dir,
            accel,
            accel_reason,
            accel_problem,
            pages,
            max_mb,
            children: Mutex::new(HashMap::new()),
            net,
            cpu,
        })
    }

    /// The accelerator VMs run under, and why it was chosen.
    pub fn accelerator(&self) -> (Accel, &str) {
        (self.accel, &self.accel_reason)
    }

    /// Every program this node's VMs may need, as configured: QEMU,
    /// qemu-img (disk images), the seed tools (every VM the coordinator
    /// starts has a seed), zstd (suspend files), and with `bridge` set the
    /// network tools. `workspace-pilot check` lists them.
    pub fn tools(c: &KvmConfig) -> Vec<ToolUse> {
        let mut t = qemu_tools(c);
        t.push(tool(
            &c.qemu_img,
            "qemu_img",
            "overlays of disk images",
            false,
        ));
        t.extend(seed_tools(c));
        if c.compressor == "zstd" {
            t.push(tool("zstd", "compressor", "suspend files", false));
        }
        if !c.bridge.is_empty() {
            t.extend(net_tools(c));
        }
        if c.hugepages {
            t.extend(prefix_tool(c, "the privileged write of nr_hugepages"));
        }
        dedup(t)
    }

    /// What starting this VM runs, given how it boots.
    fn tools_for(&self, vm: &VmLaunch, boot: &Boot) -> Vec<ToolUse> {
        let c = &self.cfg;
        let mut t = qemu_tools(c);
        if matches!(boot, Boot::Disk { .. }) {
            t.push(tool(
                &c.qemu_img,
                "qemu_img",
                "overlays of disk images",
                false,
            ));
        }
        if vm.context.is_some() || !vm.nics.is_empty() {
            t.extend(seed_tools(c));
        }
        if !vm.nics.is_empty() {
            t.extend(net_tools(c));
        }
        dedup(t)
    }

    /// The programs of `uses` that cannot be found.
    pub fn missing(uses: &[ToolUse]) -> Vec<tools::Missing> {
        uses.iter()
            .filter_map(|u| {
                if u.privileged {
                    tools::find_privileged(&u.program).err()
                } else {
                    tools::find(&u.program).err()
                }
            })
            .collect()
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The file the VM's serial console is written to.
    pub fn serial_path(&self, name: &str) -> PathBuf {
        self.file(name, "serial")
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.{ext}"))
    }

    fn timeout(s: u64) -> Duration {
        Duration::from_secs(s.max(1))
    }

    /// Where an image name points: absolute, else under `image_dir`.
    fn image_path(&self, image: &str) -> PathBuf {
        let p = Path::new(image);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.image_dir.join(p)
        }
    }

    fn kernel_dir(dir: &Path) -> Result<Boot, HvError> {
        let kernel = ["vmlinux", "vmlinuz", "bzImage"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                HvError::Config(format!(
                    "{}: no vmlinux, vmlinuz or bzImage in this kernel directory",
                    dir.display()
                ))
            })?;
        let initrd = ["initrd.gz", "initrd.img", "initrd"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file());
        let disk = ["disk.qcow2", "disk.img"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file());
        Ok(Boot::Kernel {
            kernel,
            initrd,
            disk,
        })
    }

    /// The image convention: `kernel:` (the node config's kernel + initrd),
    /// `kernel:DIR` or a directory (its vmlinux/vmlinuz + initrd.gz, and
    /// `disk.qcow2`/`disk.img` as its disk if present), else a qcow2/raw
    /// disk image file.
    pub fn resolve_image(&self, image: &str) -> Result<Boot, HvError> {
        if let Some(rest) = image.strip_prefix("kernel:") {
            if rest.is_empty() || rest == "default" {
                let kernel = self.cfg.kernel.as_deref().ok_or_else(|| {
                    HvError::Config(format!(
                        "image {image:?} needs [kvm] kernel in the node config"
                    ))
                })?;
                let kernel = expand_node(kernel, &self.node);
                if !kernel.is_file() {
                    return Err(HvError::Config(format!(
                        "[kvm] kernel {} does not exist",
                        kernel.display()
                    )));
                }
                let initrd = self
                    .cfg
                    .initrd
                    .as_deref()
                    .map(|i| expand_node(i, &self.node));
                if let Some(i) = initrd.as_ref().filter(|i| !i.is_file()) {
                    return Err(HvError::Config(format!(
                        "[kvm] initrd {} does not exist",
                        i.display()
                    )));
                }
                return Ok(Boot::Kernel {
                    kernel,
                    initrd,
                    disk: None,
                });
            }
            return Self::kernel_dir(&self.image_path(rest));
        }
        let p = self.image_path(image);
        if p.is_dir() {
            return Self::kernel_dir(&p);
        }
        if !p.is_file() {
            return Err(HvError::Config(format!(
                "image {image:?}: {} does not exist (relative names are looked up in [kvm] image_dir)",
                p.display()
            )));
        }
        Ok(Boot::Disk { base: p })
    }

    /// The disk format of `base` as qemu-img sees it (`qcow2`, `raw`, ...).
    fn image_format(&self, base: &Path) -> Result<String, HvError> {
        let mut cmd = Command::new(&self.cfg.qemu_img);
        cmd.args(["info", "--output=json"]).arg(base);
        let shown = format!(
            "{} info --output=json {}",
            self.cfg.qemu_img,
            base.display()
        );
        let out = run_bounded(cmd, None, Self::timeout(self.cfg.command_timeout_s), &shown)?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| HvError::KvmCommand {
            command: shown.clone(),
            message: format!("unreadable answer: {e}"),
            output: out.clone(),
        })?;
        v["format"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| HvError::KvmCommand {
                command: shown,
                message: "no format in the answer".into(),
                output: out,
            })
    }

    /// `qemu-img create -f qcow2 -F <fmt> -b <base> <overlay>`.
    fn make_overlay(&self, base: &Path, overlay: &Path) -> Result<(), HvError> {
        let fmt = self.image_format(base)?;
        let mut cmd = Command::new(&self.cfg.qemu_img);
        cmd.args(["create", "-q", "-f", "qcow2", "-F", &fmt, "-b"])
            .arg(base)
            .arg(overlay);
        let shown = format!(
            "{} create -f qcow2 -F {fmt} -b {} {}",
            self.cfg.qemu_img,
            base.display(),
            overlay.display()
        );
        run_bounded(cmd, None, Self::timeout(self.cfg.command_timeout_s), &shown).map(|_| ())
    }

    /// Memory given to QEMU: the VM's, rounded up to whole hugepages.
    fn vm_memory_mb(&self, mb: u64) -> u64 {
        if !self.cfg.hugepages {
            return mb.max(1);
        }
        let page_mb = (self.pages.page_kb / 1024).max(1);
        mb.max(1).div_ceil(page_mb) * page_mb
    }

    /// QEMU's arguments for a VM (without the program): its memory, CPUs,
    /// serial, QMP, boot and disk; the seed, NICs and generation id come
    /// from [`Kvm::prepare`].
    pub fn qemu_args(&self, vm: &VmLaunch, boot: &Boot, overlay: Option<&Path>) -> Vec<String> {
        let name = &vm.name;
        let mem = self.vm_memory_mb(vm.memory_mb);
        let mut a: Vec<String> = vec![
            "-name".into(),
            name.clone(),
            "-accel".into(),
            self.accel.as_str().into(),
            "-m".into(),
            format!("{mem}M"),
            "-smp".into(),
            vm.cpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-chardev".into(),
            format!(
                "file,id=wsp-serial,path={},append=on",
                self.file(name, "serial").display()
            ),
            "-serial".into(),
            "chardev:wsp-serial".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                self.file(name, "qmp").display()
            ),
        ];
        if !self.cfg.cpu.is_empty() {
            a.extend(["-cpu".into(), self.cfg.cpu.clone()]);
        }
        let mut machine: Vec<String> = Vec::new();
        if !self.cfg.machine.is_empty() {
            machine.push(self.cfg.machine.clone());
        }
        if self.cfg.hugepages {
            a.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=wsp-mem,size={mem}M,hugetlb=on,hugetlbsize={}K,share=on,prealloc=on",
                    self.pages.page_kb
                ),
            ]);
            machine.push("memory-backend=wsp-mem".into());
        }
        if !machine.is_empty() {
            a.extend(["-machine".into(), machine.join(",")]);
        }
        if let Boot::Kernel { kernel, initrd, .. } = boot {
            a.extend(["-kernel".into(), kernel.display().to_string()]);
            if let Some(i) = initrd {
                a.extend(["-initrd".into(), i.display().to_string()]);
            }
            a.extend(["-append".into(), self.cfg.append.replace("%v", name)]);
        }
        if let Some(o) = overlay {
            a.extend([
                "-drive".into(),
                format!("file={},format=qcow2,if=virtio", o.display()),
            ]);
        }
        a.extend(self.cfg.extra_args.iter().cloned());
        a
    }

    fn read_meta(&self, name: &str) -> Result<Option<VmMeta>, HvError> {
        let p = self.file(name, "vm.json");
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| HvError::Corrupt {
                    path: p,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, e)),
        }
    }

    fn write_meta(&self, m: &VmMeta) -> Result<(), HvError> {
        let p = self.file(&m.name, "vm.json");
        let text = serde_json::to_vec_pretty(m).map_err(|e| HvError::Corrupt {
            path: p.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&p, &text, 0o644).map_err(|e| io(&p, e))
    }

    fn read_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.file(name, "pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// Whether the VM's QEMU is gone (reaping it if this process started it).
    fn gone(&self, name: &str, pid: u32) -> bool {
        if let Ok(mut children) = self.children.lock() {
            if let Some(c) = children.get_mut(name) {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => {
                        children.remove(name);
                        return true;
                    }
                    Ok(None) => return false,
                }
            }
        }
        !is_our_qemu(pid, name)
    }

    fn wait_gone(&self, name: &str, pid: u32, bound: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.gone(name, pid) {
                return true;
            }
            if start.elapsed() >= bound {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn qmp(&self, name: &str) -> Result<Qmp, HvError> {
        Qmp::connect(
            &self.file(name, "qmp"),
            Duration::ZERO,
            Duration::from_secs(5),
        )
        .map_err(|e| qmp_err(name, e))
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.file(name, "log")).unwrap_or_default();
        let t = text.trim();
        t[t.len().saturating_sub(600)..].to_string()
    }

    /// Spawns QEMU for `name` with `args`, records its pid, waits until QMP
    /// answers. On failure the process is killed and reaped.
    fn spawn_qemu(&self, name: &str, args: &[String]) -> Result<Qmp, HvError> {
        let sock = self.file(name, "qmp");
        if sock.as_os_str().len() >= 108 {
            return Err(HvError::Config(format!(
                "QMP socket path {} is too long for a unix socket (max 107 bytes): shorten [kvm] run_dir",
                sock.display()
            )));
        }
        let _ = std::fs::remove_file(&sock);
        let log_path = self.file(name, "log");
        let log = std::fs::File::create(&log_path).map_err(|e| io(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| io(&log_path, e))?;
        let mut cmd = if self.cfg.netns.is_empty() {
            Command::new(&self.cfg.qemu)
        } else {
            let mut c = Command::new(&self.cfg.ip);
            c.args(["netns", "exec", &self.cfg.netns, &self.cfg.qemu]);
            c
        };
        cmd.args(args)
            .current_dir(&self.run_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // The batch system's warning goes to every process of the job
        // (Slurm's proctrack follows the pilot's children whatever their
        // process group), and QEMU quits on SIGTERM, SIGINT and SIGHUP: the
        // guest would die before the pilot saves it. QEMU keeps a blocked
        // mask across exec and never unblocks these, so it lives on until
        // the pilot saves or destroys it (or the batch system's SIGKILL).
        let mut keep = nix::sys::signal::SigSet::empty();
        for sig in [
            nix::sys::signal::Signal::SIGTERM,
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGHUP,
        ] {
            keep.add(sig);
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls pthread_sigmask, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::signal::pthread_sigmask(
                    nix::sys::signal::SigmaskHow::SIG_BLOCK,
                    Some(&keep),
                    None,
                )
                .map_err(std::io::Error::from)
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .map_err(|e| match tools::spawn_error(&program, &e) {
                Some(m) => HvError::from(m),
                None => HvError::KvmCommand {
                    command: format!("{} -name {name} ...", self.cfg.qemu),
                    message: format!("cannot start: {e}"),
                    output: String::new(),
                },
            })?;
        let pid = child.id();
        if let Ok(mut c) = self.children.lock() {
            c.insert(name.to_string(), child);
        }
        let pid_path = self.file(name, "pid");
        write_atomic(&pid_path, format!("{pid}\n").as_bytes(), 0o644)
            .map_err(|e| io(&pid_path, e))?;
        let start = Instant::now();
        let bound = Self::timeout(self.cfg.start_timeout_s);
        loop {
            if self.gone(name, pid) {
                let _ = std::fs::remove_file(&pid_path);
                return Err(HvError::KvmCommand {
                    command: format!("{} -name {name} ...", self.cfg.qemu),
                    message: "exited at start".into(),
                    output: self.log_tail(name),
                });
            }
            if sock.exists() {
                if let Ok(q) = Qmp::connect(&sock, Duration::ZERO, Duration::from_secs(5)) {
                    return Ok(q);
                }
            }
            if start.elapsed() >= bound {
                self.kill_and_reap(name, pid);
                return Err(HvError::KvmTimeout {
                    what: format!("QEMU {name} starting (QMP on {})", sock.display()),
                    after_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill_and_reap(&self, name: &str, pid: u32) {
        use nix::sys::signal::{kill, Signal};
        if is_our_qemu(pid, name) {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        self.wait_gone(name, pid, Duration::from_secs(5));
    }

    fn remove_files(&self, name: &str, keep_disk: bool) {
        let mut exts = vec!["pid", "qmp", "serial", "log"];
        if !keep_disk {
            exts.extend(["qcow2", "seed.img", "vm.json"]);
        }
        for ext in exts {
            let p = self.file(name, ext);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(vm = name, path = %p.display(), error = %e, "cannot remove")
                }
            }
        }
    }

    /// Stops the VM's QEMU: graceful powerdown (if configured, bounded),
    /// QMP `quit` (bounded), then SIGKILL. Waits until it is gone.
    fn stop_process(&self, name: &str, pid: u32) -> Result<(), HvError> {
        use nix::sys::signal::{kill, Signal};
        if self.gone(name, pid) {
            return Ok(());
        }
        if self.cfg.shutdown_timeout_s > 0 {
            if let Ok(mut q) = self.qmp(name) {
                let _ = q.execute("system_powerdown", None);
            }
            if self.wait_gone(name, pid, Duration::from_secs(self.cfg.shutdown_timeout_s)) {
                return Ok(());
            }
            tracing::info!(vm = name, "no powerdown within the bound; quitting");
        }
        if let Ok(mut q) = self.qmp(name) {
            let _ = q.quit();
        }
        if self.wait_gone(name, pid, Self::timeout(self.cfg.kill_timeout_s)) {
            return Ok(());
        }
        tracing::warn!(vm = name, pid, "QEMU still alive after quit; SIGKILL");
        if is_our_qemu(pid, name) {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if self.wait_gone(name, pid, Duration::from_secs(5)) {
            return Ok(());
        }
        Err(HvError::KvmTimeout {
            what: format!("QEMU {name} (pid {pid}) dying after SIGKILL"),
            after_ms: 5000,
        })
    }

    /// The VM's run state as QMP reports it (`running`, `paused`, ...).
    pub fn status(&self, name: &str) -> Result<String, HvError> {
        let mut q = self.qmp(name)?;
        q.status().map(|s| s.status).map_err(|e| qmp_err(name, e))
    }

    /// Freezes the VM's CPUs (QMP `stop`).
    pub fn pause(&self, name: &str) -> Result<(), HvError> {
        let mut q = self.qmp(name)?;
        q.execute("stop", None).map_err(|e| qmp_err(name, e))?;
        tracing::info!(node = %self.node, vm = name, "VM paused");
        Ok(())
    }

    /// Lets a paused VM run again (QMP `cont`).
    pub fn resume(&self, name: &str) -> Result<(), HvError> {
        let mut q = self.qmp(name)?;
        q.execute("cont", None).map_err(|e| qmp_err(name, e))?;
        tracing::info!(node = %self.node, vm = name, "VM resumed");
        Ok(())
    }

    /// Every tap of the node's VM records, except `skip`'s.
    fn node_taps(&self, skip: Option<&str>) -> Vec<net::TapRecord> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.run_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(n) = file.strip_suffix(".vm.json") else {
                continue;
            };
            if Some(n) == skip {
                continue;
            }
            if let Ok(Some(m)) = self.read_meta(n) {
                out.extend(m.taps);
            }
        }
        out
    }

    /// Removes the VM's taps and guard entries (and the node's dnsmasq and
    /// table with the last VM). Returns what could not be removed.
    fn remove_network(&self, name: &str) -> Vec<String> {
        let taps = self
            .read_meta(name)
            .ok()
            .flatten()
            .map(|m| m.taps)
            .unwrap_or_default();
        if taps.is_empty() {
            return self.net.sweep(&|| self.node_taps(Some(name)));
        }
        let forget = || {
            if let Ok(Some(mut m)) = self.read_meta(name) {
                m.taps.clear();
                if let Err(e) = self.write_meta(&m) {
                    tracing::warn!(vm = name, error = %e, "cannot record the taps as removed");
                }
            }
        };
        self.net
            .teardown(name, &taps, &forget, &|| self.node_taps(Some(name)))
    }

    /// With no VM left that has NICs: stops the node's dnsmasq and deletes
    /// its nftables table (kill-all runs this after destroying VMs).
    pub fn sweep_network(&self) -> Vec<String> {
        self.net.sweep(&|| self.node_taps(None))
    }

    /// The node's nftables table name (`wsp_<node>`).
    pub fn net_table(&self) -> &str {
        self.net.table()
    }

    fn create_inner(&self, vm: &VmLaunch, boot: &Boot, layout: &Layout) -> Result<(), HvError> {
        let name = &vm.name;
        let overlay = match boot.disk_base() {
            Some(base) => {
                let o = self.file(name, "qcow2");
                self.make_overlay(base, &o)?;
                Some(o)
            }
            None => None,
        };
        let meta = self.prepare(vm, boot, overlay, layout)?;
        let mut q = self.launch_qemu(&meta, &[])?;
        let s = q.status().map_err(|e| qmp_err(name, e))?;
        if !s.running {
            return Err(HvError::Qmp {
                vm: name.clone(),
                message: format!("started but its state is {}", s.status),
            });
        }
        Ok(())
    }

    /// The VM's record: QEMU's arguments (its overlay, seed image and taps
    /// included), the seed built, the taps planned (not yet created).
    fn prepare(
        &self,
        vm: &VmLaunch,
        boot: &Boot,
        overlay: Option<PathBuf>,
        layout: &Layout,
    ) -> Result<VmMeta, HvError> {
        let name = &vm.name;
        if layout.fixed_slots && vm.nics.len() > MAX_FIXED_NICS {
            return Err(HvError::Config(format!(
                "{name}: {} NICs; the warm layout has room for {MAX_FIXED_NICS}",
                vm.nics.len()
            )));
        }
        let mut args = self.qemu_args(vm, boot, overlay.as_deref());
        if let Some(guid) = &layout.vmgenid {
            args.extend([
                "-device".into(),
                format!("vmgenid,id=wsp-genid,guid={guid}"),
            ]);
        }
        let taps = self.net.plan(name, vm.hostname.as_deref(), &vm.nics)?;
        let seed = if vm.context.is_some() || !vm.nics.is_empty() {
            let p = self.file(name, "seed.img");
            let t = Self::timeout(self.cfg.command_timeout_s);
            seed::build(vm, &p, &self.cfg.mkfs_vfat, &self.cfg.mcopy, t)?;
            args.extend(seed_args(&p, layout.fixed_slots));
            Some(p)
        } else {
            None
        };
        args.extend(nic_args(&taps, layout.fixed_slots));
        Ok(VmMeta {
            name: name.clone(),
            memory_mb: vm.memory_mb,
            cpus: vm.cpus,
            image: vm.image.clone(),
            accel: self.accel,
            argv: args,
            overlay,
            created_ms: protocol::now_ms(),
            taps,
            seed,
            cgroup: self.cpu.vm_dir(name),
            cpu: vm.cpu.filter(|c| !c.is_default()),
            vmgenid: layout.vmgenid.clone(),
            fixed_slots: layout.fixed_slots,
        })
    }

    /// Records the VM, sets up its taps and cgroup and starts QEMU with its
    /// arguments plus `extra` (in its cgroup, with its CPU share); returns
    /// once QMP answers.
    fn launch_qemu(&self, meta: &VmMeta, extra: &[&str]) -> Result<Qmp, HvError> {
        self.write_meta(meta)?;
        if !meta.taps.is_empty() {
            self.net
                .setup(&meta.name, &meta.taps, &|| self.node_taps(None))?;
        }
        if let Some(cg) = &meta.cgroup {
            self.cpu.create(cg)?;
            self.cpu.apply(cg, &meta.cpu.unwrap_or_default())?;
        }
        let mut args = meta.argv.clone();
        args.extend(extra.iter().map(|a| a.to_string()));
        let q = self.spawn_qemu(&meta.name, &args)?;
        if let (Some(cg), Some(pid)) = (&meta.cgroup, self.read_pid(&meta.name)) {
            if let Err(e) = self.cpu.attach(cg, pid) {
                self.kill_and_reap(&meta.name, pid);
                return Err(e);
            }
        }
        Ok(q)
    }

    /// Checks that a launch's CPU share can be applied here, before anything
    /// of the VM exists.
    fn check_share(&self, vm: &VmLaunch) -> Result<(), HvError> {
        match &vm.cpu {
            Some(c) if !c.is_default() && !self.cpu.available() => Err(HvError::NoCpuControl(
                self.cpu.control().reason.unwrap_or_default(),
            )),
            Some(c) => c.validate().map_err(HvError::Config),
            None => Ok(()),
        }
    }

    /// The VM's cgroup, as the driver sees it now (for tests and checks).
    pub fn cpu_share_of(&self, name: &str) -> Result<CpuShare, HvError> {
        let dir = self
            .read_meta(name)?
            .and_then(|m| m.cgroup)
            .ok_or_else(|| HvError::NoSuchDomain {
                name: name.to_string(),
            })?;
        self.cpu.read(&dir)
    }
}

/// The seed disk's QEMU arguments (at [`SEED_SLOT`] in the warm layout).
fn seed_args(seed: &Path, fixed: bool) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=wsp-seed,format=raw,readonly=on",
            seed.display()
        ),
        "-device".into(),
        if fixed {
            format!("virtio-blk-pci,drive=wsp-seed,addr={SEED_SLOT:#x}")
        } else {
            "virtio-blk-pci,drive=wsp-seed".into()
        },
    ]
}

/// The NICs' QEMU arguments (after the seed's slot in the warm layout).
fn nic_args(taps: &[net::TapRecord], fixed: bool) -> Vec<String> {
    let mut a = Vec::new();
    for (i, t) in taps.iter().enumerate() {
        a.extend([
            "-netdev".into(),
            format!("tap,id=wsp-n{i},ifname={},script=no,downscript=no", t.tap),
            "-device".into(),
            if fixed {
                format!(
                    "virtio-net-pci,netdev=wsp-n{i},mac={},addr={:#x}",
                    t.mac,
                    nic_slot(i)
                )
            } else {
                format!("virtio-net-pci,netdev=wsp-n{i},mac={}", t.mac)
            },
        ]);
    }
    a
}

/// PCI slot of NIC `i` in the warm layout.
fn nic_slot(i: usize) -> u32 {
    SEED_SLOT + 1 + i as u32
}

fn qemu_tools(c: &KvmConfig) -> Vec<ToolUse> {
    let mut t = vec![tool(&c.qemu, "qemu", "runs the VMs", false)];
    if !c.netns.is_empty() {
        t.push(tool(&c.ip, "ip", "ip netns exec", false));
    }
    t
}

fn seed_tools(c: &KvmConfig) -> Vec<ToolUse> {
    vec![
        tool(&c.mkfs_vfat, "mkfs_vfat", "the VMs' seed images", false),
        tool(&c.mcopy, "mcopy", "the VMs' seed images", false),
    ]
}

fn net_tools(c: &KvmConfig) -> Vec<ToolUse> {
    let p = !c.privileged_prefix.is_empty();
    let mut t: Vec<ToolUse> = prefix_tool(c, "the VMs' network").into_iter().collect();
    t.push(tool(&c.ip, "ip", "the VMs' taps", p));
    t.push(tool(&c.dnsmasq, "dnsmasq", "DHCP for the VMs", p));
    if c.guard {
        t.push(tool(&c.nft, "nft", "anti-spoofing (guard)", p));
    }
    t
}

fn prefix_tool(c: &KvmConfig, purpose: &'static str) -> Option<ToolUse> {
    c.privileged_prefix
        .first()
        .map(|p| tool(p, "privileged_prefix", purpose, false))
}

fn tool(program: &str, key: &'static str, purpose: &'static str, privileged: bool) -> ToolUse {
    ToolUse {
        program: program.to_string(),
        key,
        purpose,
        privileged,
    }
}

/// Keeps the first use of each program.
fn dedup(uses: impl IntoIterator<Item = ToolUse>) -> Vec<ToolUse> {
    let mut out: Vec<ToolUse> = Vec::new();
    for u in uses {
        if !out.iter().any(|o| o.program == u.program) {
            out.push(u);
        }
    }
    out
}

fn qmp_err(vm: &str, e: QmpError) -> HvError {
    HvError::Qmp {
        vm: vm.to_string(),
        message: e.to_string(),
    }
}

/// Whether hardware KVM works here, decided once per process: the static
/// checks ([`host_claims_kvm`]), then a canary boot with the configured
/// kernel when they pass.
pub fn hardware_kvm(cfg: &KvmConfig, node: &str) -> HardwareKvm {
    HOST_KVM.get_or_init(|| detect_kvm(cfg, node)).clone()
}

fn detect_kvm(cfg: &KvmConfig, node: &str) -> HardwareKvm {
    let (claims, why) = host_claims_kvm();
    if !claims {
        return HardwareKvm::Unusable(why);
    }
    let Some(kernel) = cfg.kernel.as_deref().map(|k| expand_node(k, node)) else {
        return HardwareKvm::Unconfirmed(format!(
            "{why}; no [kvm] kernel configured for a canary boot"
        ));
    };
    let dir = std::env::temp_dir().join(format!("wsp-kvm-canary-{}", std::process::id()));
    let result = canary_boot(cfg, node, &kernel, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(ms) => HardwareKvm::Works(format!("{why}; canary boot in {ms} ms")),
        Err(e) => HardwareKvm::Unusable(format!("{why}, but the canary boot failed: {e}")),
    }
}

fn canary_boot(cfg: &KvmConfig, node: &str, kernel: &Path, dir: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let serial = dir.join("serial");
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args([
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-no-reboot", "-serial"])
    .arg(format!("file:{}", serial.display()))
    .arg("-kernel")
    .arg(kernel);
    if let Some(i) = cfg.initrd.as_deref() {
        cmd.arg("-initrd").arg(expand_node(i, node));
    }
    cmd.args([
        "-append",
        "console=ttyS0 quiet panic=-1 wsp.hostname=canary",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| match tools::spawn_error(&cfg.qemu, &e) {
            Some(m) => m.to_string(),
            None => format!("cannot start QEMU: {e}"),
        })?;
    let start = Instant::now();
    let bound = Duration::from_secs(cfg.canary_timeout_s.max(1));
    let result = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains(&cfg.canary_marker) {
            break Ok(start.elapsed().as_millis() as u64);
        }
        if let Ok(Some(s)) = child.try_wait() {
            break Err(format!(
                "QEMU exited with {s} before {:?}",
                cfg.canary_marker
            ));
        }
        if start.elapsed() >= bound {
            break Err(format!(
                "no {:?} within {} ms",
                cfg.canary_marker,
                bound.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

impl Hypervisor for Kvm {
    fn name(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "kvm (kvm)",
            Accel::Tcg => "kvm (tcg)",
        }
    }

    /// "dom0" = host memory not held as hugepages by this node's pilots (see
    /// the module docs); the pool change is synchronous, so target = current.
    fn dom0_memory(&self) -> Result<Dom0Memory, HvError> {
        let l = self.pages.ledger()?;
        let current = self.max_mb.saturating_sub(l.held_mb);
        Ok(Dom0Memory {
            current_mb: current,
            target_mb: current,
            max_mb: self.max_mb,
        })
    }

    fn set_dom0_target(&self, mb: u64) -> Result<(), HvError> {
        if mb > self.max_mb {
            return Err(HvError::AboveMax {
                target_mb: mb,
                max_mb: self.max_mb,
            });
        }
        let want = self.max_mb - mb;
        let (before, after) = self.pages.set_held_mb(want, &self.node)?;
        tracing::info!(
            node = %self.node,
            held_mb = want,
            nr_hugepages_before = before,
            nr_hugepages_after = after,
            "node hugepages set"
        );
        Ok(())
    }

    fn domains(&self) -> Result<Vec<Domain>, HvError> {
        let entries = std::fs::read_dir(&self.run_dir).map_err(|e| io(&self.run_dir, e))?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".vm.json") else {
                continue;
            };
            let meta = match self.read_meta(name) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(vm = name, error = %err, "unreadable VM record; listed as dead");
                    VmMeta {
                        name: name.to_string(),
                        memory_mb: 0,
                        cpus: 0,
                        image: String::new(),
                        accel: self.accel,
                        argv: Vec::new(),
                        overlay: None,
                        created_ms: 0,
                        taps: Vec::new(),
                        seed: None,
                        cgroup: None,
                        cpu: None,
                        vmgenid: None,
                        fixed_slots: false,
                    }
                }
            };
            let alive = self.read_pid(name).filter(|p| is_our_qemu(*p, name));
            let state = match alive {
                Some(_) => self
                    .qmp(name)
                    .and_then(|mut q| q.status().map_err(|e| qmp_err(name, e)))
                    .map(|s| s.status)
                    .unwrap_or_else(|_| "running".to_string()),
                None => "dead".to_string(),
            };
            out.push(Domain {
                name: name.to_string(),
                memory_mb: meta.memory_mb,
                cpus: meta.cpus,
                state,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create(&self, vm: &VmLaunch) -> Result<(), HvError> {
        self.create_with(vm, &Layout::default())
    }

    /// A template has no identity to plug out; it gets the warm layout.
    fn create_template(&self, vm: &VmLaunch) -> Result<(), HvError> {
        if !vm.nics.is_empty() || vm.context.is_some() {
            return Err(HvError::Config(format!(
                "{}: a warm template has no NICs and no context (each warm start plugs in its own)",
                vm.name
            )));
        }
        let layout = Layout {
            fixed_slots: true,
            vmgenid: Some(random_uuid()),
        };
        self.create_with(vm, &layout)
    }

    /// The guest printed `[kvm] ready_marker` on its serial console.
    fn is_ready(&self, name: &str) -> Result<bool, HvError> {
        let alive = self.read_pid(name).is_some_and(|p| is_our_qemu(p, name));
        if !alive {
            return Err(HvError::KvmCommand {
                command: format!("{} -name {name} ...", self.cfg.qemu),
                message: "exited before the guest was ready".into(),
                output: self.log_tail(name),
            });
        }
        let serial = std::fs::read(self.serial_path(name)).unwrap_or_default();
        let marker = self.cfg.ready_marker.as_bytes();
        Ok(!marker.is_empty() && serial.windows(marker.len()).any(|w| w == marker))
    }

    fn cpu_control(&self) -> CpuControl {
        self.cpu.control()
    }

    /// Writes the share into the VM's cgroup (made, and QEMU moved into
    /// it, if the VM started without one).
    fn set_cpu(&self, name: &str, cpu: &CpuShare, _urgency: u8) -> Result<String, HvError> {
        cpu.validate().map_err(HvError::Config)?;
        let mut meta = self.read_meta(name)?.ok_or_else(|| HvError::NoSuchDomain {
            name: name.to_string(),
        })?;
        let pid = self
            .read_pid(name)
            .filter(|p| is_our_qemu(*p, name))
            .ok_or_else(|| HvError::NoSuchDomain {
                name: name.to_string(),
            })?;
        let dir = match &meta.cgroup {
            Some(d) => d.clone(),
            None => {
                let d = self.cpu.vm_dir(name).ok_or_else(|| {
                    HvError::NoCpuControl(self.cpu.control().reason.unwrap_or_default())
                })?;
                meta.cgroup = Some(d.clone());
                self.write_meta(&meta)?;
                self.cpu.create(&d)?;
                self.cpu.attach(&d, pid)?;
                d
            }
        };
        self.cpu.apply(&dir, cpu)?;
        meta.cpu = Some(*cpu).filter(|c| !c.is_default());
        self.write_meta(&meta)?;
        tracing::info!(node = %self.node, vm = name, cpu = %cpu, cgroup = %dir.display(), "CPU share applied");
        Ok(self.cpu.control().mechanism)
    }
    fn restore_warm(
        &self,
        vm: &VmLaunch,
        from: &crate::checkpoint::CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        self.restore_warm_checkpoint(vm, from, deadline)
    }

    fn sweep_node(&self) -> Vec<String> {
        self.sweep_impl()
    }

    fn save(
        &self,
        name: &str,
        out: &mut crate::checkpoint::CheckpointWriter,
        deadline: Instant,
    ) -> Result<serde_json::Value, HvError> {
        self.save_checkpoint(name, out, deadline)
    }

    fn resume_after_save(&self, name: &str) -> Result<(), HvError> {
        self.resume(name)
    }

    fn restore(
        &self,
        vm: &VmLaunch,
        from: &crate::checkpoint::CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        self.restore_checkpoint(vm, from, deadline)
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        let meta = self.read_meta(name).ok().flatten();
        let pid = self.read_pid(name);
        if meta.is_none() && pid.is_none() && !self.file(name, "qmp").exists() {
            return Err(HvError::NoSuchDomain {
                name: name.to_string(),
            });
        }
        let t0 = Instant::now();
        if let Some(pid) = pid {
            self.stop_process(name, pid)?;
        }
        let mut problems = self.remove_network(name);
        problems.extend(self.remove_cgroup(name));
        self.remove_files(name, false);
        if !problems.is_empty() {
            return Err(HvError::KvmCommand {
                command: format!("cleaning up after {name} (network, cgroup)"),
                message: problems.join("; "),
                output: String::new(),
            });
        }
        tracing::info!(
            node = %self.node,
            vm = name,
            destroy_ms = t0.elapsed().as_millis() as u64,
            "VM destroyed"
        );
        Ok(())
    }
}

impl Kvm {
    fn create_with(&self, vm: &VmLaunch, layout: &Layout) -> Result<(), HvError> {
        let name = &vm.name;
        if !valid_name(name) {
            return Err(HvError::Config(format!(
                "VM name {name:?}: only letters, digits, '-', '_' and '.' are allowed"
            )));
        }
        if self.read_meta(name)?.is_some() {
            if self.read_pid(name).is_some_and(|p| is_our_qemu(p, name)) {
                return Err(HvError::DomainExists { name: name.clone() });
            }
            tracing::warn!(vm = %name, "removing the files of a dead VM of the same name");
            self.remove_files(name, false);
        }
        if let Some(why) = &self.accel_problem {
            return Err(HvError::Config(format!(
                "[kvm] accelerator = \"kvm\" but this host has {why}: set accelerator = \"auto\" \
                 or \"tcg\", or make KVM work (workspace-pilot check --hypervisor kvm)"
            )));
        }
        let t0 = Instant::now();
        let boot = self.resolve_image(&vm.image)?;
        // Before anything is written: a missing tool names itself and its
        // package, not "No such file or directory" halfway through.
        let missing = Self::missing(&self.tools_for(vm, &boot));
        if !missing.is_empty() {
            return Err(HvError::ToolsMissing(missing));
        }
        self.check_share(vm)?;
        match self.create_inner(vm, &boot, layout) {
            Ok(()) => {
                tracing::info!(
                    node = %self.node,
                    vm = %name,
                    vm_id = %vm.vm_id,
                    accelerator = self.accel.as_str(),
                    memory_mb = vm.memory_mb,
                    start_ms = t0.elapsed().as_millis() as u64,
                    "QEMU started"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(node = %self.node, vm = %name, error = %e, "VM not started; cleaning its files");
                if let Some(pid) = self.read_pid(name) {
                    self.kill_and_reap(name, pid);
                }
                self.remove_network(name);
                self.remove_cgroup(name);
                self.remove_files(name, false);
                Err(e)
            }
        }
    }

    /// Removes the VM's cgroup (its QEMU is gone); logs what it cannot.
    fn remove_cgroup(&self, name: &str) -> Option<String> {
        let dir = self
            .read_meta(name)
            .ok()
            .flatten()
            .and_then(|m| m.cgroup)
            .or_else(|| self.cpu.vm_dir(name))?;
        match self.cpu.remove(&dir) {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(vm = name, cgroup = %dir.display(), error = %e, "cgroup not removed");
                Some(format!("cgroup {}: {e}", dir.display()))
            }
        }
    }
}

impl Kvm {
    fn sweep_impl(&self) -> Vec<String> {
        self.sweep_network()
    }
}

impl Drop for Kvm {
    /// Reaps QEMU children that already exited; running VMs are left running
    /// (they outlive the pilot on purpose and are found by their files).
    fn drop(&mut self) {
        if let Ok(mut c) = self.children.lock() {
            for (_, child) in c.iter_mut() {
                let _ = child.try_wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_parse_in_kb() {
        assert_eq!(parse_page_size("2M").unwrap(), 2048);
        assert_eq!(parse_page_size("1G").unwrap(), 1048576);
        assert_eq!(parse_page_size("2048kB").unwrap(), 2048);
        assert!(parse_page_size("huge").is_err());
        assert!(parse_page_size("0M").is_err());
    }

    #[test]
    fn names_that_could_escape_the_run_dir_are_refused() {
        assert!(valid_name("wsp-sl-1a2b3c4d-vm-00aa11bb"));
        assert!(!valid_name("../etc/passwd"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(".hidden"));
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: KvmConfig = toml::from_str("hugepages = false\npage_size = \"1G\"").unwrap();
        assert!(!c.hugepages);
        assert_eq!(c.accelerator, "auto");
        assert!(toml::from_str::<KvmConfig>("hugepage = true").is_err());
    }
}
