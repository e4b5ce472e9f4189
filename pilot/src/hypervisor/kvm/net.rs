//! Workspace networking for kvm VMs on one node: a tap per NIC on the
//! site's bridge, one `dnsmasq` per node answering each MAC with exactly its
//! assigned address, and an nftables bridge-family table (`wsp_<node>`)
//! that lets a tap send only from its own MAC and IPv4 address.
//!
//! What is set up is recorded before it is done: each VM's taps in its
//! `<name>.vm.json`, the node's dnsmasq and table in `<run_dir>/net.json`.
//! Destroying a VM removes its taps and table elements and reloads dnsmasq;
//! the last VM's destroy (or [`Net::sweep`], run by kill-all) stops dnsmasq
//! (removing its hosts, lease and log files) and deletes the table. The bridge is the site's: never created or removed.
//! With `[kvm] netns`, every command runs under `ip netns exec <netns>`.

use super::{run_bounded, KvmConfig};
use crate::files::{lock_exclusive, write_atomic, FileLock, LockError};
use crate::hypervisor::HvError;
use protocol::pilot::Nic;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A NIC as set up on the node (kept in the VM's record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapRecord {
    pub tap: String,
    pub bridge: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Host name given with the DHCP answer (first NIC only).
    #[serde(default)]
    pub hostname: Option<String>,
}

/// The node-wide pieces (`<run_dir>/net.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNet {
    pub netns: String,
    pub table: Option<String>,
    pub dnsmasq_pid: Option<u32>,
    /// Subnets dnsmasq serves (`network/prefix/gateway`); a new one restarts it.
    pub subnets: Vec<String>,
}

/// Networking of one node's kvm VMs.
pub struct Net {
    cfg: KvmConfig,
    run_dir: PathBuf,
    table: String,
    child: Mutex<Option<Child>>,
}

fn io(path: &Path, source: std::io::Error) -> HvError {
    HvError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Tap device name of NIC `idx` of VM `name`: `wt` + 10 hex digits + idx
/// (at most 15 bytes, as Linux wants).
pub fn tap_name(name: &str, idx: usize) -> String {
    let h = crate::images::sha256_hex(name.as_bytes());
    format!("wt{}{}", &h[..10], idx.min(9))
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn network_of(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & u32::from(netmask(prefix)))
}

impl Net {
    pub fn new(cfg: &KvmConfig, node: &str, run_dir: &Path) -> Self {
        let table: String = cfg
            .nft_table
            .replace("%n", node)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Self {
            cfg: cfg.clone(),
            run_dir: run_dir.to_path_buf(),
            table,
            child: Mutex::new(None),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The command prefix: privileged prefix, then `ip netns exec NS`.
    pub fn prefix(&self) -> Vec<String> {
        let mut p = self.cfg.privileged_prefix.clone();
        if !self.cfg.netns.is_empty() {
            p.extend([
                self.cfg.ip.clone(),
                "netns".into(),
                "exec".into(),
                self.cfg.netns.clone(),
            ]);
        }
        p
    }

    fn command(&self, argv: &[String]) -> (Command, String) {
        let mut full = self.prefix();
        full.extend(argv.iter().cloned());
        let mut cmd = Command::new(&full[0]);
        cmd.args(&full[1..]);
        (cmd, full.join(" "))
    }

    fn run(&self, argv: &[&str], stdin: Option<String>) -> Result<String, HvError> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let (cmd, shown) = self.command(&argv);
        run_bounded(
            cmd,
            stdin.map(String::into_bytes),
            Duration::from_secs(self.cfg.command_timeout_s.max(1)),
            &shown,
        )
    }

    fn lock(&self) -> Result<FileLock, HvError> {
        let p = self.run_dir.join("net.lock");
        lock_exclusive(&p, Duration::from_secs(30)).map_err(|e| match e {
            LockError::Io(err) => io(&p, err),
            LockError::Timeout(w) => HvError::KvmTimeout {
                what: format!("taking {}", p.display()),
                after_ms: w.as_millis() as u64,
            },
        })
    }

    fn state_path(&self) -> PathBuf {
        self.run_dir.join("net.json")
    }

    fn read_state(&self) -> NodeNet {
        std::fs::read_to_string(self.state_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn write_state(&self, s: &NodeNet) -> Result<(), HvError> {
        let p = self.state_path();
        let text = serde_json::to_vec_pretty(s).map_err(|e| HvError::Corrupt {
            path: p.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&p, &text, 0o644).map_err(|e| io(&p, e))
    }

    /// The taps a VM's NICs get (nothing is done yet).
    pub fn plan(
        &self,
        name: &str,
        hostname: Option<&str>,
        nics: &[Nic],
    ) -> Result<Vec<TapRecord>, HvError> {
        if nics.is_empty() {
            return Ok(Vec::new());
        }
        if self.cfg.bridge.is_empty() {
            return Err(HvError::Config(format!(
                "VM {name} has {} NIC(s) but [kvm] bridge is not set in the node config",
                nics.len()
            )));
        }
        Ok(nics
            .iter()
            .enumerate()
            .map(|(i, n)| TapRecord {
                tap: tap_name(name, i),
                bridge: if n.pool == "public" && !self.cfg.public_bridge.is_empty() {
                    self.cfg.public_bridge.clone()
                } else {
                    self.cfg.bridge.clone()
                },
                mac: n.mac.clone(),
                ip: n.ip,
                prefix_len: n.prefix_len,
                gateway: n.gateway,
                hostname: (i == 0).then(|| hostname.map(str::to_string)).flatten(),
            })
            .collect())
    }

    /// Creates the taps, installs the guard elements, (re)loads dnsmasq.
    /// `all()` gives every NIC of the node's VMs (this one included); it is
    /// read under the node's net lock, so concurrent pilots never write the
    /// DHCP hosts file from a stale view.
    pub fn setup(
        &self,
        vm: &str,
        taps: &[TapRecord],
        all: &dyn Fn() -> Vec<TapRecord>,
    ) -> Result<(), HvError> {
        if taps.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        let all = all();
        let uid = nix::unistd::geteuid().to_string();
        for t in taps {
            self.run(&[&self.cfg.ip, "link", "show", "dev", &t.bridge], None)
                .map_err(|e| HvError::Config(format!(
                    "bridge {} of [kvm] bridge/public_bridge is not there (the site provides it): {e}",
                    t.bridge
                )))?;
            let _ = self.run(&[&self.cfg.ip, "link", "del", "dev", &t.tap], None);
            self.run(
                &[
                    &self.cfg.ip,
                    "tuntap",
                    "add",
                    "dev",
                    &t.tap,
                    "mode",
                    "tap",
                    "user",
                    &uid,
                ],
                None,
            )?;
            self.run(
                &[
                    &self.cfg.ip,
                    "link",
                    "set",
                    "dev",
                    &t.tap,
                    "master",
                    &t.bridge,
                ],
                None,
            )?;
            self.run(&[&self.cfg.ip, "link", "set", "dev", &t.tap, "up"], None)?;
        }
        let mut state = self.read_state();
        state.netns = self.cfg.netns.clone();
        if self.cfg.guard {
            if state.table.is_none()
                || self
                    .run(
                        &[&self.cfg.nft, "list", "table", "bridge", &self.table],
                        None,
                    )
                    .is_err()
            {
                state.table = Some(self.table.clone());
                self.write_state(&state)?;
                self.run(&[&self.cfg.nft, "-f", "-"], Some(self.table_def()))?;
            }
            let mut batch = String::new();
            for t in taps {
                batch.push_str(&format!(
                    "add element bridge {tb} ports {{ \"{tap}\" }}\nadd element bridge {tb} macs {{ \"{tap}\" . {mac} }}\nadd element bridge {tb} ips {{ \"{tap}\" . {ip} }}\n",
                    tb = self.table, tap = t.tap, mac = t.mac, ip = t.ip
                ));
            }
            self.run(&[&self.cfg.nft, "-f", "-"], Some(batch))?;
        }
        self.dhcp(&mut state, &all)?;
        tracing::info!(vm, taps = ?taps.iter().map(|t| &t.tap).collect::<Vec<_>>(), "VM network set up");
        Ok(())
    }

    fn table_def(&self) -> String {
        format!(
            r#"table bridge {t} {{
  set ports {{ type ifname; }}
  set macs {{ type ifname . ether_addr; }}
  set ips {{ type ifname . ipv4_addr; }}
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    iifname @ports jump guard
  }}
  chain guard {{
    iifname . ether saddr != @macs counter drop
    ether type arp iifname . arp saddr ether != @macs counter drop
    ether type arp iifname . arp saddr ip != @ips counter drop
    ether type ip ip saddr 0.0.0.0 udp dport 67 accept
    ether type ip iifname . ip saddr != @ips counter drop
    ether type ip6 counter drop
  }}
}}
"#,
            t = self.table
        )
    }

    fn hosts_path(&self) -> PathBuf {
        self.run_dir.join("dnsmasq.hosts")
    }

    fn pid_path(&self) -> PathBuf {
        self.run_dir.join("dnsmasq.pid")
    }

    fn leases_path(&self) -> PathBuf {
        self.run_dir.join("dnsmasq.leases")
    }

    fn log_path(&self) -> PathBuf {
        self.run_dir.join("dnsmasq.log")
    }

    /// Whether `pid` is the dnsmasq of this run dir (by its pid-file argument).
    fn is_our_dnsmasq(&self, pid: u32) -> bool {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        let want = format!("--pid-file={}", self.pid_path().display());
        !zombie && cmd.split(|b| *b == 0).any(|a| a == want.as_bytes())
    }

    fn running_dnsmasq(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.is_our_dnsmasq(pid).then_some(pid)
    }

    /// Writes the hosts file from `all`, starts dnsmasq or makes it re-read.
    fn dhcp(&self, state: &mut NodeNet, all: &[TapRecord]) -> Result<(), HvError> {
        let mut hosts = String::new();
        let mut subnets: Vec<String> = Vec::new();
        let mut bridges: Vec<String> = Vec::new();
        for t in all {
            match &t.hostname {
                Some(h) => hosts.push_str(&format!("{},{},{h}\n", t.mac, t.ip)),
                None => hosts.push_str(&format!("{},{}\n", t.mac, t.ip)),
            }
            let s = format!(
                "{}/{}/{}",
                network_of(t.ip, t.prefix_len),
                t.prefix_len,
                t.gateway.map(|g| g.to_string()).unwrap_or_default()
            );
            if !subnets.contains(&s) {
                subnets.push(s);
            }
            if !bridges.contains(&t.bridge) {
                bridges.push(t.bridge.clone());
            }
        }
        let hp = self.hosts_path();
        write_atomic(&hp, hosts.as_bytes(), 0o644).map_err(|e| io(&hp, e))?;
        subnets.sort();
        if let Some(pid) = self.running_dnsmasq() {
            if state.subnets == subnets {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGHUP,
                );
                return Ok(());
            }
            self.stop_dnsmasq(pid);
        }
        let mut argv: Vec<String> = vec![
            self.cfg.dnsmasq.clone(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            "--port=0".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--log-dhcp".into(),
            format!("--log-facility={}", self.log_path().display()),
            format!("--pid-file={}", self.pid_path().display()),
            format!("--dhcp-leasefile={}", self.leases_path().display()),
            format!("--dhcp-hostsfile={}", hp.display()),
        ];
        if !self.cfg.dnsmasq_user.is_empty() {
            argv.push(format!("--user={}", self.cfg.dnsmasq_user));
        }
        for b in &bridges {
            argv.push(format!("--interface={b}"));
        }
        for (i, s) in subnets.iter().enumerate() {
            let mut parts = s.split('/');
            let (net, prefix, gw) = (
                parts.next().unwrap_or_default(),
                parts
                    .next()
                    .and_then(|p| p.parse::<u8>().ok())
                    .unwrap_or(24),
                parts.next().unwrap_or_default(),
            );
            argv.push(format!(
                "--dhcp-range=set:wsp{i},{net},static,{},12h",
                netmask(prefix)
            ));
            if !gw.is_empty() {
                argv.push(format!("--dhcp-option=tag:wsp{i},option:router,{gw}"));
            }
        }
        let _ = std::fs::remove_file(self.pid_path());
        let (mut cmd, shown) = self.command(&argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .current_dir(&self.run_dir);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        state.subnets = subnets;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .map_err(|e| match crate::tools::spawn_error(&program, &e) {
                Some(m) => HvError::from(m),
                None => HvError::KvmCommand {
                    command: shown.clone(),
                    message: format!("cannot start: {e}"),
                    output: String::new(),
                },
            })?;
        state.dnsmasq_pid = Some(child.id());
        self.write_state(state)?;
        let mut child = child;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(HvError::KvmCommand {
                    command: shown,
                    message: format!("exited at start ({status})"),
                    output: err,
                });
            }
            if let Some(pid) = self.running_dnsmasq() {
                state.dnsmasq_pid = Some(pid);
                self.write_state(state)?;
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HvError::KvmTimeout {
                    what: format!("dnsmasq writing {}", self.pid_path().display()),
                    after_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(mut c) = self.child.lock() {
            *c = Some(child);
        }
        Ok(())
    }

    fn stop_dnsmasq(&self, pid: u32) {
        use nix::sys::signal::{kill, Signal};
        let p = nix::unistd::Pid::from_raw(pid as i32);
        let _ = kill(p, Signal::SIGTERM);
        let start = Instant::now();
        while self.is_our_dnsmasq(pid) && start.elapsed() < Duration::from_secs(5) {
            self.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.is_our_dnsmasq(pid) {
            let _ = kill(p, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
        }
        self.reap();
        let _ = std::fs::remove_file(self.pid_path());
    }

    fn reap(&self) {
        if let Ok(mut c) = self.child.lock() {
            if let Some(ch) = c.as_mut() {
                if let Ok(Some(_)) = ch.try_wait() {
                    *c = None;
                }
            }
        }
    }

    /// Removes a VM's taps and guard elements. Under the node's net lock,
    /// `forget()` drops the VM's taps from its record and `rest()` gives
    /// every NIC of the VMs left; with none left, dnsmasq and the table go.
    pub fn teardown(
        &self,
        vm: &str,
        taps: &[TapRecord],
        forget: &dyn Fn(),
        rest: &dyn Fn() -> Vec<TapRecord>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let _lock = match self.lock() {
            Ok(l) => Some(l),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        forget();
        let rest = rest();
        let mut state = self.read_state();
        for t in taps {
            if let Some(tb) = &state.table {
                for (set, key) in [
                    ("ports", format!("\"{}\"", t.tap)),
                    ("macs", format!("\"{}\" . {}", t.tap, t.mac)),
                    ("ips", format!("\"{}\" . {}", t.tap, t.ip)),
                ] {
                    let _ = self.run(
                        &[
                            &self.cfg.nft,
                            "delete",
                            "element",
                            "bridge",
                            tb,
                            set,
                            &format!("{{ {key} }}"),
                        ],
                        None,
                    );
                }
            }
            if let Err(e) = self.run(&[&self.cfg.ip, "link", "del", "dev", &t.tap], None) {
                if self
                    .run(&[&self.cfg.ip, "link", "show", "dev", &t.tap], None)
                    .is_ok()
                {
                    problems.push(format!("tap {}: {e}", t.tap));
                }
            }
        }
        if rest.is_empty() {
            problems.extend(self.stop_node(&mut state));
        } else if let Err(e) = self.dhcp(&mut state, &rest) {
            problems.push(format!("dnsmasq reload: {e}"));
        }
        if !taps.is_empty() {
            tracing::info!(vm, "VM network removed");
        }
        problems
    }

    fn stop_node(&self, state: &mut NodeNet) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(pid) = self
            .running_dnsmasq()
            .or(state.dnsmasq_pid.filter(|p| self.is_our_dnsmasq(*p)))
        {
            self.stop_dnsmasq(pid);
            if self.is_our_dnsmasq(pid) {
                problems.push(format!("dnsmasq pid {pid} still alive"));
            }
        }
        state.dnsmasq_pid = None;
        state.subnets.clear();
        if let Some(tb) = state.table.clone() {
            match self.run(&[&self.cfg.nft, "delete", "table", "bridge", &tb], None) {
                Ok(_) => state.table = None,
                Err(e) => {
                    if self
                        .run(&[&self.cfg.nft, "list", "table", "bridge", &tb], None)
                        .is_ok()
                    {
                        problems.push(format!("nft table {tb}: {e}"));
                    } else {
                        state.table = None;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(self.hosts_path());
        // dnsmasq's lease and log files go with it (a new one starts afresh).
        if self.running_dnsmasq().is_none() {
            for f in [self.leases_path(), self.log_path()] {
                if let Err(e) = std::fs::remove_file(&f) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        problems.push(format!("{}: {e}", f.display()));
                    }
                }
            }
        }
        if problems.is_empty() {
            let _ = std::fs::remove_file(self.state_path());
        } else if let Err(e) = self.write_state(state) {
            problems.push(e.to_string());
        }
        problems
    }

    /// kill-all's sweep: with no VM NICs left on the node, stops dnsmasq and
    /// deletes the table (whatever a killed pilot left).
    pub fn sweep(&self, rest: &dyn Fn() -> Vec<TapRecord>) -> Vec<String> {
        if !self.state_path().exists() && self.running_dnsmasq().is_none() {
            return Vec::new();
        }
        let _lock = self.lock();
        if !rest().is_empty() {
            return Vec::new();
        }
        let mut state = self.read_state();
        self.stop_node(&mut state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_linux_and_differ_per_vm_and_nic() {
        let a = tap_name("wsp-sl-00000001-vm-00000001", 0);
        assert!(a.len() <= 15 && a.starts_with("wt"), "{a}");
        assert_ne!(a, tap_name("wsp-sl-00000001-vm-00000001", 1));
        assert_ne!(a, tap_name("wsp-sl-00000001-vm-00000002", 0));
    }

    #[test]
    fn masks_and_networks() {
        assert_eq!(netmask(24).to_string(), "255.255.255.0");
        assert_eq!(
            network_of("10.77.0.9".parse().unwrap(), 28).to_string(),
            "10.77.0.0"
        );
    }
}
