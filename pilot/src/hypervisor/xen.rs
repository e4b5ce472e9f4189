//! `xen`: dom0's balloon through xenstore, guests through `xl`.
//!
//! dom0's target and static max are read from, and the target written to,
//! `/local/domain/0/memory/{target,static-max}` (KiB) with `xenstore-rs`'s
//! blocking client on a private worker thread, so every request is bounded.
//! dom0's current memory comes from the balloon driver's sysfs `current_kb`,
//! else xenstore `memory/current` (the stand-in), else `xl list 0`.
//! Guests are listed from xenstore (or `xl list -l`), created from a
//! generated xl config file, destroyed, paused, saved and restored through
//! `<command_prefix> xl ...` as an argv (never a shell), each command
//! bounded and its raw output kept for errors. A checkpoint holds what
//! `xl save -p` wrote (hashed once written); `xl restore -p` takes it with a
//! config generated for the guest's new name, after it was verified whole.
//! Not a libxl binding.

use super::{Dom0Memory, Domain, HvError, HvOptions, Hypervisor};
use crate::checkpoint::{CheckpointReader, CheckpointWriter};
use protocol::pilot::{CpuControl, CpuShare, VmLaunch, DEFAULT_CPU_WEIGHT};
use protocol::VmName;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use xenstore_rs::unix::XsUnix;
use xenstore_rs::Xs;

/// The only variable xenstore-rs takes its socket path from.
pub const XENSTORED_PATH_ENV: &str = "XENSTORED_PATH";
const DOM0_TARGET: &str = "/local/domain/0/memory/target";
const DOM0_STATIC_MAX: &str = "/local/domain/0/memory/static-max";
const DOM0_CURRENT: &str = "/local/domain/0/memory/current";

/// Where dom0's current memory is read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dom0Current {
    /// `current_kb_file` if it exists, else xenstore `memory/current`, else `xl list 0`.
    #[default]
    Auto,
    Sysfs,
    Xenstore,
    Xl,
}

/// Where the guest list comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListVia {
    /// `/local/domain/*/{name,memory/target,cpu}`: no process, no privilege beyond the socket.
    #[default]
    Xenstore,
    /// `xl list -l` (JSON) through the command prefix.
    Xl,
}

/// `[xen]` section of the node config (every key optional; see docs/XEN.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct XenConfig {
    /// The `xl` program (absolute for sudo; a bare name is looked up on PATH).
    pub xl: String,
    /// Put before every `xl` argv; `[]` when the pilot runs as root.
    pub command_prefix: Vec<String>,
    /// Set dom0's target with `xl mem-set 0 <N>m` instead of a xenstore write.
    pub use_xl_mem_set: bool,
    /// xenstored's socket; exported as XENSTORED_PATH while the process is single-threaded.
    pub xenstored_path: Option<PathBuf>,
    pub dom0_current: Dom0Current,
    /// The balloon driver's current allocation, KiB.
    pub current_kb_file: PathBuf,
    /// dom0 counts as at its target when within this many KiB of it.
    pub balloon_slack_kb: u64,
    pub list_domains: ListVia,
    /// Where generated xl configs go (default: `<tmp>/workspace-pilot-xen-<node>`).
    pub run_dir: Option<PathBuf>,
    /// Guest images are file names inside this directory.
    pub image_dir: PathBuf,
    /// Bridge of the guests' vifs (private pool); none: no network.
    pub bridge: Option<String>,
    /// Bridge for NICs from the public pool; default: `bridge`.
    pub public_bridge: Option<String>,
    /// xl `type` (pvh, pv, hvm).
    pub domain_type: String,
    pub kernel: Option<String>,
    pub ramdisk: Option<String>,
    /// Guest kernel command line (xl `extra`).
    pub extra: Option<String>,
    /// Lines appended verbatim to every generated config.
    pub domain_config_extra: Vec<String>,
    /// Credit scheduler weight / cap given to every guest (`xl sched-credit`).
    pub sched_weight: Option<u32>,
    pub sched_cap: Option<u32>,
    /// Weight for urgent guests (see [`Xen::set_sched_credit`]).
    pub urgent_sched_weight: u32,
    pub command_timeout_ms: u64,
    pub xenstore_timeout_ms: u64,
    /// Bound on a guest appearing after create / vanishing after destroy.
    pub verify_timeout_ms: u64,
}

impl Default for XenConfig {
    fn default() -> Self {
        Self {
            xl: "/usr/sbin/xl".into(),
            command_prefix: vec!["sudo".into(), "-n".into()],
            use_xl_mem_set: false,
            xenstored_path: None,
            dom0_current: Dom0Current::Auto,
            current_kb_file: "/sys/devices/system/xen_memory/xen_memory0/info/current_kb".into(),
            balloon_slack_kb: 1024,
            list_domains: ListVia::Xenstore,
            run_dir: None,
            image_dir: "/var/lib/workspace-pilot/images".into(),
            bridge: Some("xenbr0".into()),
            public_bridge: None,
            domain_type: "pvh".into(),
            kernel: None,
            ramdisk: None,
            extra: None,
            domain_config_extra: Vec::new(),
            sched_weight: None,
            sched_cap: None,
            urgent_sched_weight: 1024,
            command_timeout_ms: 30_000,
            xenstore_timeout_ms: 2_000,
            verify_timeout_ms: 10_000,
        }
    }
}

/// Number of threads of this process (from /proc; `None` if unknown).
fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// Makes `path` the socket xenstore-rs connects to. Setting a variable is
/// only sound while no other thread runs, so this refuses once the process
/// has more than one thread, unless XENSTORED_PATH already says `path`.
pub fn export_xenstored_path(path: &Path) -> Result<(), HvError> {
    if std::env::var_os(XENSTORED_PATH_ENV).as_deref() == Some(path.as_os_str()) {
        return Ok(());
    }
    match thread_count() {
        Some(1) => {
            std::env::set_var(XENSTORED_PATH_ENV, path);
            Ok(())
        }
        n => Err(HvError::Config(format!(
            "[xen] xenstored_path = {:?} must be applied before threads start, but this \
             process runs {} threads: export {XENSTORED_PATH_ENV}={} instead",
            path,
            n.map_or("an unknown number of".to_string(), |n| n.to_string()),
            path.display()
        ))),
    }
}

fn socket_label() -> String {
    std::env::var(XENSTORED_PATH_ENV)
        .map(|p| format!("{p} from {XENSTORED_PATH_ENV}"))
        .unwrap_or_else(|_| "/run/xenstored/socket, then /dev/xen/xenbus".into())
}

type Job = Box<dyn FnOnce(&mut Option<XsUnix>) + Send>;

/// One xenstore connection owned by a worker thread; callers wait at most
/// `timeout` for an answer. A worker stuck on a dead daemon is abandoned
/// and the next call starts a new one.
struct XsWorker {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    timeout: Duration,
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | UnexpectedEof | ConnectionReset | ConnectionAborted | NotConnected
    )
}

impl XsWorker {
    fn new(timeout: Duration) -> Self {
        Self {
            tx: Mutex::new(None),
            timeout,
        }
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>, HvError> {
        let mut guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = guard.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("xenstore".into())
            .spawn(move || {
                let mut conn: Option<XsUnix> = None;
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| HvError::Xenstore {
                op: "connect".into(),
                path: String::new(),
                socket: socket_label(),
                message: format!("cannot start the xenstore thread: {e}"),
            })?;
        *guard = Some(tx.clone());
        Ok(tx)
    }

    /// Runs `f` on the connection (reconnecting once if the daemon went away).
    fn call<T: Send + 'static>(
        &self,
        op: &str,
        path: &str,
        f: impl Fn(&XsUnix) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, HvError> {
        let err = |message: String| HvError::Xenstore {
            op: op.to_string(),
            path: path.to_string(),
            socket: socket_label(),
            message,
        };
        let (rtx, rrx) = mpsc::channel::<std::io::Result<T>>();
        let job: Job = Box::new(move |conn: &mut Option<XsUnix>| {
            let mut result = Err(std::io::Error::other("not connected"));
            for _attempt in 0..2 {
                if conn.is_none() {
                    match XsUnix::new() {
                        Ok(c) => *conn = Some(c),
                        Err(e) => {
                            result = Err(std::io::Error::new(
                                e.kind(),
                                format!("cannot connect: {e}"),
                            ));
                            break;
                        }
                    }
                }
                let Some(c) = conn.as_ref() else { break };
                result = f(c);
                match &result {
                    Err(e) if is_connection_error(e) => *conn = None,
                    _ => break,
                }
            }
            let _ = rtx.send(result);
        });
        if self.sender()?.send(job).is_err() {
            *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(err("the xenstore thread is gone".into()));
        }
        match rrx.recv_timeout(self.timeout) {
            Ok(r) => r.map_err(|e| err(e.to_string())),
            Err(_) => {
                *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(err(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }
}

fn read_opt(xs: &XsUnix, path: &str) -> std::io::Result<Option<String>> {
    match xs.read(path) {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_kb(path: &str, v: &str) -> std::io::Result<u64> {
    v.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{path} = {v:?} is not a number of KiB"),
        )
    })
}

/// Runs `argv` with a bound; returns stdout. Non-zero exit and timeouts keep
/// the raw output. On timeout: SIGTERM (sudo passes it on), SIGKILL after 1 s.
pub fn run_bounded(argv: &[String], timeout: Duration) -> Result<String, HvError> {
    let command = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Err(HvError::Config("empty command".into()));
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match crate::tools::spawn_error(program, &e) {
            Some(m) => HvError::from(m),
            None => HvError::XlCommand {
                command: command.clone(),
                status: "could not start".into(),
                output: e.to_string(),
            },
        })?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => {
                return Err(HvError::XlCommand {
                    command,
                    status: "could not be waited for".into(),
                    output: e.to_string(),
                })
            }
        }
        if start.elapsed() >= timeout {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(1) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(HvError::XlTimeout {
                command,
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        return Ok(stdout);
    }
    let mut output = format!("{}{}", stderr.trim(), stdout.trim());
    if output.len() > 2000 {
        output.truncate(2000);
    }
    Err(HvError::XlCommand {
        command,
        status: match status.code() {
            Some(c) => format!("exited {c}"),
            None => "was killed by a signal".into(),
        },
        output,
    })
}

/// Rejects what could break out of a quoted xl config string.
fn config_string(key: &str, v: &str) -> Result<String, HvError> {
    if v.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err(HvError::Config(format!(
            "{key} {v:?} holds a quote, backslash or control character"
        )));
    }
    Ok(format!("\"{v}\""))
}

/// A locally administered MAC in Xen's OUI, stable for a name.
pub fn mac_for(name: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!(
        "00:16:3e:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8 & 0x7f,
        (h >> 8) as u8,
        h as u8
    )
}

/// Guest names: the pilot's `wsp-<slot>-<vm>` or other plain names.
fn check_name(name: &str) -> Result<(), HvError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(HvError::Config(format!("bad domain name {name:?}")))
    }
}

impl XenConfig {
    /// The image as a path inside `image_dir` (a plain file name only).
    pub fn image_path(&self, image: &str) -> Result<PathBuf, HvError> {
        let plain = !image.is_empty()
            && image != "."
            && image != ".."
            && !image.contains('/')
            && !image.chars().any(|c| c.is_control());
        if !plain {
            return Err(HvError::Config(format!(
                "image {image:?} must be a file name inside [xen] image_dir {}",
                self.image_dir.display()
            )));
        }
        Ok(self.image_dir.join(image))
    }

    /// The xl config file for `vm`.
    pub fn domain_config(&self, vm: &VmLaunch, node: &str) -> Result<String, HvError> {
        check_name(&vm.name)?;
        let image = self.image_path(&vm.image)?;
        let image_s = image.to_string_lossy();
        let format = if image_s.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let mut c = String::new();
        let slot = VmName::parse(&vm.name)
            .map(|n| n.slot.to_string())
            .unwrap_or_else(|| "-".into());
        c.push_str(&format!(
            "# generated by workspace-pilot (node {node}, slot {slot}); do not edit\n"
        ));
        c.push_str(&format!("name = {}\n", config_string("name", &vm.name)?));
        c.push_str(&format!(
            "type = {}\n",
            config_string("domain_type", &self.domain_type)?
        ));
        c.push_str(&format!(
            "memory = {}\nmaxmem = {}\n",
            vm.memory_mb, vm.memory_mb
        ));
        c.push_str(&format!("vcpus = {}\n", vm.cpus.max(1)));
        for (key, v) in [
            ("kernel", &self.kernel),
            ("ramdisk", &self.ramdisk),
            ("extra", &self.extra),
        ] {
            if let Some(v) = v {
                c.push_str(&format!("{key} = {}\n", config_string(key, v)?));
            }
        }
        let disk = format!("format={format},vdev=xvda,access=rw,target={image_s}");
        c.push_str(&format!("disk = [ {} ]\n", config_string("image", &disk)?));
        if !vm.nics.is_empty() {
            // The coordinator's addresses: one vif per NIC with its MAC and
            // IP (vif-bridge's antispoof uses `ip=`), on the pool's bridge.
            let bridge = self.bridge.as_deref().ok_or_else(|| {
                HvError::Config("the VM has NICs but [xen] bridge is not set".into())
            })?;
            let mut vifs = Vec::with_capacity(vm.nics.len());
            for nic in &vm.nics {
                let br = match nic.pool.as_str() {
                    "public" => self.public_bridge.as_deref().unwrap_or(bridge),
                    _ => bridge,
                };
                let vif = format!("mac={},bridge={br},ip={}", nic.mac, nic.ip);
                vifs.push(config_string("vif", &vif)?);
            }
            c.push_str(&format!("vif = [ {} ]\n", vifs.join(", ")));
        } else if let Some(bridge) = &self.bridge {
            let vif = format!("mac={},bridge={bridge}", mac_for(&vm.name));
            c.push_str(&format!("vif = [ {} ]\n", config_string("bridge", &vif)?));
        }
        c.push_str("on_poweroff = \"destroy\"\non_reboot = \"destroy\"\non_crash = \"destroy\"\n");
        for line in &self.domain_config_extra {
            if line.contains('\n') {
                return Err(HvError::Config(format!(
                    "[xen] domain_config_extra line {line:?} holds a newline"
                )));
            }
            c.push_str(line);
            c.push('\n');
        }
        Ok(c)
    }
}

/// Guests from `xl list -l` JSON (dom0 left out).
pub fn parse_xl_list_long(json: &str) -> Result<Vec<Domain>, HvError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| HvError::XlCommand {
        command: "xl list -l".into(),
        status: "printed JSON that does not parse".into(),
        output: format!("{e}: {}", json.chars().take(300).collect::<String>()),
    })?;
    let mut out = Vec::new();
    for d in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        if d["domid"].as_u64() == Some(0) {
            continue;
        }
        let b = &d["config"]["b_info"];
        let Some(name) = d["config"]["c_info"]["name"].as_str() else {
            continue;
        };
        let kb = b["target_memkb"]
            .as_u64()
            .or_else(|| b["max_memkb"].as_u64())
            .unwrap_or(0);
        out.push(Domain {
            name: name.to_string(),
            memory_mb: kb / 1024,
            cpus: b["max_vcpus"].as_u64().unwrap_or(0) as u32,
            state: d["state"].as_str().unwrap_or("running").to_string(),
        });
    }
    Ok(out)
}

/// `xl list 0`'s Mem column (MB).
fn parse_xl_list_dom0_mb(text: &str) -> Option<u64> {
    text.lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"0")).then(|| f.get(2).and_then(|m| m.parse().ok()))
        })
        .flatten()
}

/// One check of `workspace-pilot check`.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// Passed, but the admin should know (e.g. VMs will run without KVM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
    pub detail: String,
    /// What to do when it failed (or warned).
    pub fix: Option<String>,
}

impl Check {
    pub fn new(name: &str, r: Result<String, (String, String)>) -> Self {
        match r {
            Ok(detail) => Self {
                name: name.into(),
                ok: true,
                warning: false,
                detail,
                fix: None,
            },
            Err((detail, fix)) => Self {
                name: name.into(),
                ok: false,
                warning: false,
                detail,
                fix: Some(fix),
            },
        }
    }

    /// A check that passes with a warning.
    pub fn warn(name: &str, detail: String, fix: String) -> Self {
        Self {
            name: name.into(),
            ok: true,
            warning: true,
            detail,
            fix: Some(fix),
        }
    }
}

/// The `xen` driver.
pub struct Xen {
    cfg: XenConfig,
    node: String,
    run_dir: PathBuf,
    xs: XsWorker,
}

fn kb_to_mb(kb: u64) -> u64 {
    kb / 1024
}

impl Xen {
    /// Applies `xenstored_path` (see [`export_xenstored_path`]); connects lazily.
    pub fn open(cfg: &XenConfig, opts: &HvOptions) -> Result<Self, HvError> {
        if let Some(p) = &cfg.xenstored_path {
            export_xenstored_path(p)?;
        }
        if cfg.xl.is_empty() {
            return Err(HvError::Config("[xen] xl must not be empty".into()));
        }
        if cfg.command_prefix.iter().any(|a| a.is_empty()) {
            return Err(HvError::Config(
                "[xen] command_prefix holds an empty argument".into(),
            ));
        }
        let node = if opts.node_name.is_empty() {
            "node".to_string()
        } else {
            opts.node_name.clone()
        };
        let run_dir = cfg
            .run_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("workspace-pilot-xen-{node}")));
        Ok(Self {
            xs: XsWorker::new(Duration::from_millis(cfg.xenstore_timeout_ms.max(1))),
            cfg: cfg.clone(),
            node,
            run_dir,
        })
    }

    pub fn config(&self) -> &XenConfig {
        &self.cfg
    }

    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut v = self.cfg.command_prefix.clone();
        v.push(self.cfg.xl.clone());
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Runs `<prefix> xl <args>` with the command bound.
    pub fn xl(&self, args: &[&str]) -> Result<String, HvError> {
        let t0 = Instant::now();
        let r = run_bounded(
            &self.argv(args),
            Duration::from_millis(self.cfg.command_timeout_ms.max(1)),
        );
        tracing::debug!(
            node = %self.node,
            args = ?args,
            ms = t0.elapsed().as_millis() as u64,
            ok = r.is_ok(),
            "xl"
        );
        r
    }

    fn dom0_current_kb(&self) -> Result<u64, HvError> {
        let file = &self.cfg.current_kb_file;
        let source = match self.cfg.dom0_current {
            Dom0Current::Auto if file.exists() => Dom0Current::Sysfs,
            Dom0Current::Auto => {
                let found = self
                    .xs
                    .call("read", DOM0_CURRENT, |xs| read_opt(xs, DOM0_CURRENT))?;
                if let Some(v) = found {
                    return parse_kb(DOM0_CURRENT, &v).map_err(|e| HvError::Xenstore {
                        op: "read".into(),
                        path: DOM0_CURRENT.into(),
                        socket: socket_label(),
                        message: e.to_string(),
                    });
                }
                Dom0Current::Xl
            }
            s => s,
        };
        match source {
            Dom0Current::Sysfs => {
                let text = std::fs::read_to_string(file).map_err(|source| HvError::Io {
                    path: file.clone(),
                    source,
                })?;
                text.trim().parse().map_err(|_| HvError::Io {
                    path: file.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{text:?} is not a number of KiB"),
                    ),
                })
            }
            Dom0Current::Xenstore => self.xs.call("read", DOM0_CURRENT, |xs| {
                parse_kb(DOM0_CURRENT, &xs.read(DOM0_CURRENT)?)
            }),
            _ => {
                let out = self.xl(&["list", "0"])?;
                parse_xl_list_dom0_mb(&out)
                    .map(|mb| mb * 1024)
                    .ok_or_else(|| HvError::XlCommand {
                        command: self.argv(&["list", "0"]).join(" "),
                        status: "printed no Domain-0 line".into(),
                        output: out,
                    })
            }
        }
    }

    /// Every guest's (name, domid) from xenstore, or from `xl list -l`.
    fn list(&self) -> Result<Vec<Domain>, HvError> {
        match self.cfg.list_domains {
            ListVia::Xl => parse_xl_list_long(&self.xl(&["list", "-l"])?),
            ListVia::Xenstore => self.xs.call("directory", "/local/domain", |xs| {
                let mut out = Vec::new();
                for id in xs.directory("/local/domain")?.iter() {
                    if id.as_ref() == "0" || id.parse::<u32>().is_err() {
                        continue;
                    }
                    let base = format!("/local/domain/{id}");
                    let Some(name) = read_opt(xs, &format!("{base}/name"))? else {
                        continue; // being built or torn down
                    };
                    let path = format!("{base}/memory/target");
                    let kb = match read_opt(xs, &path)? {
                        Some(v) => parse_kb(&path, &v)?,
                        None => 0,
                    };
                    let cpus = match xs.directory(&format!("{base}/cpu")) {
                        Ok(c) => c.len() as u32,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                        Err(e) => return Err(e),
                    };
                    out.push(Domain {
                        name,
                        memory_mb: kb_to_mb(kb),
                        cpus,
                        state: "running".into(),
                    });
                }
                Ok(out)
            }),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, HvError> {
        Ok(self.list()?.iter().any(|d| d.name == name))
    }

    /// Polls the list until `name` is present (`want`) or gone, bounded.
    fn wait_for(&self, name: &str, want: bool, what: &str) -> Result<(), HvError> {
        let bound = Duration::from_millis(self.cfg.verify_timeout_ms);
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            if self.exists(name)? == want {
                return Ok(());
            }
            if start.elapsed() >= bound {
                return Err(HvError::XenNotVerified {
                    what: format!("{name} {what}"),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.cfg"))
    }

    pub fn pause(&self, name: &str) -> Result<(), HvError> {
        check_name(name)?;
        self.xl(&["pause", name]).map(|_| ())
    }

    pub fn unpause(&self, name: &str) -> Result<(), HvError> {
        check_name(name)?;
        self.xl(&["unpause", name]).map(|_| ())
    }

    /// `xl <args>` bounded by `deadline` (and the configured command timeout).
    fn xl_until(&self, args: &[&str], deadline: Instant) -> Result<String, HvError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HvError::Timeout {
                what: format!("xl {}", args.join(" ")),
                after_ms: 0,
            });
        }
        let timeout = left.min(Duration::from_millis(self.cfg.command_timeout_ms));
        run_bounded(&self.argv(args), timeout)
    }

    /// Writes the guest's config file (for create and restore).
    fn write_config(&self, vm: &VmLaunch) -> Result<PathBuf, HvError> {
        let text = self.cfg.domain_config(vm, &self.node)?;
        std::fs::create_dir_all(&self.run_dir).map_err(|source| HvError::Io {
            path: self.run_dir.clone(),
            source,
        })?;
        let path = self.config_path(&vm.name);
        crate::files::write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| {
            HvError::Io {
                path: path.clone(),
                source,
            }
        })?;
        Ok(path)
    }

    /// Credit scheduler weight and cap (cap 0: none); `urgent` uses
    /// `urgent_sched_weight` when no weight is given.
    pub fn set_sched_credit(
        &self,
        name: &str,
        weight: Option<u32>,
        cap: Option<u32>,
        urgent: bool,
    ) -> Result<(), HvError> {
        check_name(name)?;
        let weight = weight.or(urgent.then_some(self.cfg.urgent_sched_weight));
        let (w, c) = (weight.map(|w| w.to_string()), cap.map(|c| c.to_string()));
        let mut args = vec!["sched-credit", "-d", name];
        if let Some(w) = &w {
            args.extend(["-w", w.as_str()]);
        }
        if let Some(c) = &c {
            args.extend(["-c", c.as_str()]);
        }
        if args.len() == 3 {
            return Ok(());
        }
        self.xl(&args).map(|_| ())
    }

    /// The credit scheduler's weight for a share: 256 is its default, as
    /// 100 is the share's; `urgent` VMs without a weight get
    /// `urgent_sched_weight`.
    fn credit_weight(&self, cpu: &CpuShare, urgent: bool) -> u32 {
        match cpu.weight {
            Some(w) => (u64::from(w) * 256 / u64::from(DEFAULT_CPU_WEIGHT)).clamp(1, 65535) as u32,
            None if urgent => self.cfg.urgent_sched_weight,
            None => 256,
        }
    }

    /// Applies a share with `xl sched-credit`: both the weight and the cap
    /// (0: none), so the default share lifts an earlier cap.
    fn apply_share(&self, name: &str, cpu: &CpuShare, urgent: bool) -> Result<(), HvError> {
        let w = self.credit_weight(cpu, urgent);
        self.set_sched_credit(name, Some(w), Some(cpu.cap_pct.unwrap_or(0)), false)
    }

    /// The scheduler settings of a new guest: the launch's share if it has
    /// one (an error if it cannot be applied), else the configured
    /// `sched_weight`/`sched_cap` and, for an urgent launch,
    /// `urgent_sched_weight` (a warning if they cannot).
    fn launch_sched(&self, vm: &VmLaunch) -> Result<(), HvError> {
        let urgent = vm.urgency > 0;
        if let Some(cpu) = &vm.cpu {
            return self.apply_share(&vm.name, cpu, urgent);
        }
        if self.cfg.sched_weight.is_some() || self.cfg.sched_cap.is_some() || urgent {
            if let Err(e) =
                self.set_sched_credit(&vm.name, self.cfg.sched_weight, self.cfg.sched_cap, urgent)
            {
                tracing::warn!(vm = %vm.name, error = %e, "scheduler settings not applied");
            }
        }
        Ok(())
    }

    /// Is this node fit for the pilot? Each check says what to fix.
    pub fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let xl_path = if self.cfg.command_prefix.is_empty() {
            crate::tools::find(&self.cfg.xl)
        } else {
            crate::tools::find_privileged(&self.cfg.xl)
        };
        out.push(Check::new(
            "xl found",
            xl_path
                .as_ref()
                .map(|p| p.display().to_string())
                .map_err(|m| {
                    (
                        m.to_string(),
                        "install Xen's tools or set [xen] xl to the xl program's absolute path"
                            .into(),
                    )
                }),
        ));
        let xl_path = xl_path.ok();
        if let Some(p) = &xl_path {
            out.push(Check::new(
                "xl not writable by others",
                xl_safe(p, !self.cfg.command_prefix.is_empty()),
            ));
        }
        let prefix = self.cfg.command_prefix.join(" ");
        out.push(Check::new(
            "privileged xl runs without a password",
            self.xl(&["info"])
                .map(|_| format!("`{}` ok", self.argv(&["info"]).join(" ")))
                .map_err(|e| {
                    (
                        e.to_string(),
                        if prefix.is_empty() {
                            "run the pilot as root or set [xen] command_prefix (default sudo -n)"
                                .into()
                        } else {
                            format!(
                                "install docs/sudoers.example as /etc/sudoers.d/workspace-pilot \
                             (check with visudo -cf) so `{prefix} {}` needs no password",
                                self.cfg.xl
                            )
                        },
                    )
                }),
        ));
        let figures = self.xs.call("read", DOM0_TARGET, |xs| {
            let t = parse_kb(DOM0_TARGET, &xs.read(DOM0_TARGET)?)?;
            let m = parse_kb(DOM0_STATIC_MAX, &xs.read(DOM0_STATIC_MAX)?)?;
            Ok((t, m))
        });
        out.push(Check::new(
            "xenstore reachable",
            figures.as_ref().map(|_| socket_label()).map_err(|e| {
                (
                    e.to_string(),
                    "start xenstored, set [xen] xenstored_path to its socket, and let the \
                     pilot's user open it (root, or a group with access to the socket)"
                        .into(),
                )
            }),
        ));
        if figures.is_ok() {
            out.push(Check::new(
                "dom0 memory figures sane",
                self.dom0_memory()
                    .map_err(|e| (e.to_string(), "see the error".to_string()))
                    .and_then(|m| {
                        let settled = m.current_mb == m.target_mb;
                        if m.current_mb == 0
                            || m.target_mb == 0
                            || m.max_mb < m.target_mb
                            || !settled
                        {
                            Err((
                            format!(
                                "current {} MB, target {} MB, static max {} MB",
                                m.current_mb, m.target_mb, m.max_mb
                            ),
                            "boot Xen with dom0_mem=<N>M,max:<M>M so dom0 has a fixed maximum, \
                             and let the balloon settle (xl mem-set 0 <target>)"
                                .into(),
                        ))
                        } else {
                            Ok(format!(
                                "current {} MB, target {} MB, static max {} MB",
                                m.current_mb, m.target_mb, m.max_mb
                            ))
                        }
                    }),
            ));
        }
        out.push(Check::new(
            "run dir writable",
            std::fs::create_dir_all(&self.run_dir)
                .and_then(|_| tempfile_probe(&self.run_dir))
                .map(|_| self.run_dir.display().to_string())
                .map_err(|e| {
                    (
                        format!("{}: {e}", self.run_dir.display()),
                        "set [xen] run_dir to a directory the pilot's user can write".into(),
                    )
                }),
        ));
        out.push(Check::new(
            "image dir exists",
            if self.cfg.image_dir.is_dir() {
                Ok(self.cfg.image_dir.display().to_string())
            } else {
                Err((
                    format!("{} is not a directory", self.cfg.image_dir.display()),
                    "create it and put the guest images there, or set [xen] image_dir".into(),
                ))
            },
        ));
        out
    }
}

fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&p, b"")?;
    std::fs::remove_file(&p)
}

fn xl_safe(p: &Path, run_as_root: bool) -> Result<String, (String, String)> {
    use std::os::unix::fs::MetadataExt;
    let fix = format!("chown root:root {0} && chmod 755 {0}", p.display());
    let real =
        std::fs::canonicalize(p).map_err(|e| (format!("{}: {e}", p.display()), fix.clone()))?;
    let mut bad = Vec::new();
    let mut at = Some(real.as_path());
    while let Some(cur) = at {
        let m =
            std::fs::metadata(cur).map_err(|e| (format!("{}: {e}", cur.display()), fix.clone()))?;
        let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
        if m.mode() & 0o002 != 0 && !sticky_dir {
            bad.push(format!("{} is writable by others", cur.display()));
        }
        if cur == real && m.mode() & 0o020 != 0 {
            bad.push(format!("{} is writable by its group", cur.display()));
        }
        if run_as_root && cur == real && m.uid() != 0 {
            bad.push(format!("{} is not owned by root", cur.display()));
        }
        at = cur.parent();
    }
    if bad.is_empty() {
        Ok(format!("{} safe", real.display()))
    } else {
        Err((bad.join("; "), fix))
    }
}

impl Hypervisor for Xen {
    fn name(&self) -> &'static str {
        "xen"
    }

    fn dom0_memory(&self) -> Result<Dom0Memory, HvError> {
        let (target_kb, max_kb) = self.xs.call("read", DOM0_TARGET, |xs| {
            let t = parse_kb(DOM0_TARGET, &xs.read(DOM0_TARGET)?)?;
            let m = parse_kb(DOM0_STATIC_MAX, &xs.read(DOM0_STATIC_MAX)?)?;
            Ok((t, m))
        })?;
        let current_kb = self.dom0_current_kb()?;
        // The balloon settles within a few pages of its target, not on it.
        let current_mb = if current_kb.abs_diff(target_kb) <= self.cfg.balloon_slack_kb {
            kb_to_mb(target_kb)
        } else {
            kb_to_mb(current_kb)
        };
        Ok(Dom0Memory {
            current_mb,
            target_mb: kb_to_mb(target_kb),
            max_mb: kb_to_mb(max_kb),
        })
    }

    fn set_dom0_target(&self, mb: u64) -> Result<(), HvError> {
        let max_mb = self.xs.call("read", DOM0_STATIC_MAX, |xs| {
            parse_kb(DOM0_STATIC_MAX, &xs.read(DOM0_STATIC_MAX)?)
        })? / 1024;
        if mb > max_mb {
            return Err(HvError::AboveMax {
                target_mb: mb,
                max_mb,
            });
        }
        tracing::info!(node = %self.node, target_mb = mb, via = if self.cfg.use_xl_mem_set { "xl mem-set" } else { "xenstore" }, "dom0 target");
        if self.cfg.use_xl_mem_set {
            return self.xl(&["mem-set", "0", &format!("{mb}m")]).map(|_| ());
        }
        let value = (mb * 1024).to_string();
        self.xs.call("write", DOM0_TARGET, move |xs| {
            xs.write(DOM0_TARGET, &value)
        })
    }

    fn domains(&self) -> Result<Vec<Domain>, HvError> {
        self.list()
    }

    fn create(&self, vm: &VmLaunch) -> Result<(), HvError> {
        let slot = VmName::parse(&vm.name)
            .map(|n| n.slot.to_string())
            .unwrap_or_default();
        self.cfg.domain_config(vm, &self.node)?;
        if self.exists(&vm.name)? {
            return Err(HvError::DomainExists {
                name: vm.name.clone(),
            });
        }
        let path = self.write_config(vm)?;
        let t0 = Instant::now();
        let p = path.to_string_lossy();
        self.xl(&["create", p.as_ref()])?;
        self.wait_for(&vm.name, true, "not listed after xl create")?;
        if let Err(e) = self.launch_sched(vm) {
            // Its share is part of the launch: not applied, not started.
            tracing::error!(slot = %slot, vm = %vm.name, error = %e, "CPU share not applied; destroying the guest");
            let _ = self.xl(&["destroy", &vm.name]);
            let _ = self.wait_for(&vm.name, false, "still listed after xl destroy");
            let _ = std::fs::remove_file(self.config_path(&vm.name));
            return Err(e);
        }
        tracing::info!(
            node = %self.node,
            slot = %slot,
            vm = %vm.name,
            memory_mb = vm.memory_mb,
            ms = t0.elapsed().as_millis() as u64,
            "xl create"
        );
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        check_name(name)?;
        if !self.exists(name)? {
            return Err(HvError::NoSuchDomain {
                name: name.to_string(),
            });
        }
        let t0 = Instant::now();
        if let Err(e) = self.xl(&["destroy", name]) {
            // Gone meanwhile (another cleaner won the race) is not a failure.
            if !self.exists(name)? {
                return Err(HvError::NoSuchDomain {
                    name: name.to_string(),
                });
            }
            return Err(e);
        }
        self.wait_for(name, false, "still listed after xl destroy")?;
        let _ = std::fs::remove_file(self.config_path(name));
        let slot = VmName::parse(name)
            .map(|n| n.slot.to_string())
            .unwrap_or_default();
        tracing::info!(node = %self.node, slot = %slot, vm = %name, ms = t0.elapsed().as_millis() as u64, "xl destroy");
        Ok(())
    }

    fn cpu_control(&self) -> CpuControl {
        CpuControl {
            available: true,
            mechanism: "xl sched-credit (credit scheduler weight and cap)".into(),
            reason: None,
        }
    }

    fn set_cpu(&self, name: &str, cpu: &CpuShare, urgency: u8) -> Result<String, HvError> {
        self.apply_share(name, cpu, urgency > 0)?;
        Ok("xl sched-credit".into())
    }

    /// `xl save -p`: the guest's state into the checkpoint, the guest left
    /// paused (and listed) until the caller destroys or unpauses it.
    fn save(
        &self,
        name: &str,
        out: &mut CheckpointWriter,
        deadline: Instant,
    ) -> Result<serde_json::Value, HvError> {
        check_name(name)?;
        if !self.exists(name)? {
            return Err(HvError::NoSuchDomain {
                name: name.to_string(),
            });
        }
        let t0 = Instant::now();
        let part = out.part_path(XL_SAVE)?;
        let p = part.to_string_lossy();
        let r = self
            .xl_until(&["save", "-p", name, p.as_ref()], deadline)
            .and_then(|_| out.adopt(XL_SAVE).map_err(HvError::from));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&part);
            if self.exists(name).unwrap_or(false) {
                if let Err(u) = self.unpause(name) {
                    tracing::error!(vm = name, error = %u, "guest not unpaused after a failed save");
                }
            }
            return Err(e);
        }
        tracing::info!(node = %self.node, vm = name, ms = t0.elapsed().as_millis() as u64, "xl save");
        Ok(serde_json::json!({ "file": XL_SAVE, "saved_with": "xl save -p" }))
    }

    fn resume_after_save(&self, name: &str) -> Result<(), HvError> {
        self.unpause(name)
    }

    /// `xl restore -p <config> <file>` with a config generated for the
    /// launch (its name in its new slot), once the file was verified whole;
    /// then the scheduler settings and `unpause`.
    fn restore(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let name = &vm.name;
        check_name(name)?;
        if self.exists(name)? {
            return Err(HvError::DomainExists { name: name.clone() });
        }
        let t0 = Instant::now();
        let file = from.verified_path(XL_SAVE)?;
        let cfg = self.write_config(vm)?;
        let (c, f) = (cfg.to_string_lossy(), file.to_string_lossy());
        let r = self
            .xl_until(&["restore", "-p", c.as_ref(), f.as_ref()], deadline)
            .and_then(|_| self.wait_for(name, true, "not listed after xl restore"))
            .and_then(|_| self.launch_sched(vm))
            .and_then(|_| self.unpause(name));
        if let Err(e) = r {
            if self.exists(name).unwrap_or(false) {
                let _ = self.xl(&["destroy", name]);
            }
            let _ = std::fs::remove_file(&cfg);
            return Err(e);
        }
        tracing::info!(node = %self.node, vm = %name, checkpoint = %from.id(), ms = t0.elapsed().as_millis() as u64, "xl restore");
        Ok(())
    }
}

/// The file `xl save` writes into a checkpoint.
const XL_SAVE: &str = "xl.save";

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{SlotId, VmId};

    fn launch(image: &str) -> VmLaunch {
        let vm_id = VmId::generate();
        VmLaunch {
            name: VmName::new(SlotId::generate(), vm_id.clone()).to_string(),
            vm_id,
            memory_mb: 512,
            cpus: 2,
            image: image.into(),
            image_source: None,
            nics: Vec::new(),
            hostname: None,
            context: None,
            on_preempt: Default::default(),
            restore: None,
            urgency: 0,
            cpu: None,
        }
    }

    #[test]
    fn generated_config_names_memory_vcpus_disk_bridge_and_kernel_args() {
        let cfg = XenConfig {
            image_dir: "/srv/img".into(),
            extra: Some("console=hvc0 root=/dev/xvda1".into()),
            domain_config_extra: vec!["vnc = 0".into()],
            ..XenConfig::default()
        };
        let vm = launch("debian.qcow2");
        let c = cfg.domain_config(&vm, "n1").unwrap();
        assert!(c.contains(&format!("name = \"{}\"\n", vm.name)), "{c}");
        assert!(c.contains("memory = 512\nmaxmem = 512\nvcpus = 2\n"), "{c}");
        assert!(
            c.contains(
                "disk = [ \"format=qcow2,vdev=xvda,access=rw,target=/srv/img/debian.qcow2\" ]"
            ),
            "{c}"
        );
        assert!(
            c.contains(&format!("mac={},bridge=xenbr0", mac_for(&vm.name))),
            "{c}"
        );
        assert!(
            c.contains("extra = \"console=hvc0 root=/dev/xvda1\"\n"),
            "{c}"
        );
        assert!(c.ends_with("vnc = 0\n"), "{c}");
    }

    #[test]
    fn assigned_nics_become_vifs_with_their_mac_ip_and_pool_bridge() {
        let cfg = XenConfig {
            public_bridge: Some("xenbr1".into()),
            ..XenConfig::default()
        };
        let mut vm = launch("a.img");
        vm.nics = vec![
            protocol::pilot::Nic {
                mac: "02:00:00:00:00:01".into(),
                ip: "10.1.0.5".parse().unwrap(),
                prefix_len: 24,
                gateway: None,
                pool: "private".into(),
            },
            protocol::pilot::Nic {
                mac: "02:00:00:00:00:02".into(),
                ip: "192.0.2.7".parse().unwrap(),
                prefix_len: 24,
                gateway: None,
                pool: "public".into(),
            },
        ];
        let c = cfg.domain_config(&vm, "n1").unwrap();
        assert!(
            c.contains("vif = [ \"mac=02:00:00:00:00:01,bridge=xenbr0,ip=10.1.0.5\", \"mac=02:00:00:00:00:02,bridge=xenbr1,ip=192.0.2.7\" ]"),
            "{c}"
        );
        let no_bridge = XenConfig {
            bridge: None,
            ..XenConfig::default()
        };
        assert!(no_bridge.domain_config(&vm, "n1").is_err());
    }

    #[test]
    fn images_outside_the_image_dir_and_quotes_are_refused() {
        let cfg = XenConfig::default();
        for bad in ["../etc/shadow", "/etc/shadow", "", "..", "a\nb"] {
            assert!(cfg.domain_config(&launch(bad), "n1").is_err(), "{bad:?}");
        }
        let cfg = XenConfig {
            extra: Some("x\" ; evil = \"1".into()),
            ..XenConfig::default()
        };
        assert!(cfg.domain_config(&launch("a.img"), "n1").is_err());
    }

    #[test]
    fn mac_is_stable_per_name_and_in_xens_range() {
        let a = mac_for("wsp-a");
        assert_eq!(a, mac_for("wsp-a"));
        assert_ne!(a, mac_for("wsp-b"));
        assert!(a.starts_with("00:16:3e:"));
        let fourth = u8::from_str_radix(&a[9..11], 16).unwrap();
        assert!(fourth < 0x80);
    }

    #[test]
    fn xl_list_long_json_gives_guests_without_dom0() {
        let json = r#"[
          {"domid": 0, "config": {"c_info": {"name": "Domain-0"}, "b_info": {"max_vcpus": 4, "target_memkb": 4194304}}},
          {"domid": 7, "config": {"c_info": {"name": "wsp-x"}, "b_info": {"max_vcpus": 2, "max_memkb": 1048576, "target_memkb": 1048576}}}
        ]"#;
        let d = parse_xl_list_long(json).unwrap();
        assert_eq!(
            d,
            vec![Domain {
                name: "wsp-x".into(),
                memory_mb: 1024,
                cpus: 2,
                state: "running".into()
            }]
        );
        assert!(parse_xl_list_long("not json").is_err());
    }

    #[test]
    fn xl_list_table_gives_dom0_memory() {
        let t = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                 Domain-0                                     0  3072     2     r-----     12.0\n";
        assert_eq!(parse_xl_list_dom0_mb(t), Some(3072));
    }

    #[test]
    fn node_config_section_parses_with_defaults_and_refuses_unknown_keys() {
        let c: XenConfig =
            toml::from_str("xl = \"xl\"\ncommand_prefix = []\nsched_weight = 512\n").unwrap();
        assert_eq!(c.xl, "xl");
        assert!(c.command_prefix.is_empty());
        assert_eq!(c.sched_weight, Some(512));
        assert_eq!(c.xenstore_timeout_ms, 2000);
        assert!(toml::from_str::<XenConfig>("xll = \"x\"").is_err());
    }

    #[test]
    fn bounded_command_is_killed_at_its_timeout_and_failures_keep_output() {
        let t0 = Instant::now();
        let e = run_bounded(&["sleep".into(), "5".into()], Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, HvError::XlTimeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        let e = run_bounded(
            &["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()],
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("exited 3") && e.to_string().contains("boom"),
            "{e}"
        );
        assert_eq!(
            run_bounded(&["echo".into(), "hi".into()], Duration::from_secs(5)).unwrap(),
            "hi\n"
        );
    }
}
