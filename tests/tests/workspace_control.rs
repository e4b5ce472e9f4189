//! Workspace control with real VMs: a 3-VM ensemble (2 workers, a head with
//! a public address) through the real coordinator, local batch system,
//! pilots and the `kvm` driver (TCG here). Everything that touches bridges,
//! taps, dnsmasq and nftables runs inside a network namespace this test
//! creates (`[kvm] netns`) and deletes at the end, even on failure; nothing
//! touches the host's interfaces.
//!
//! The guest init (scripts/kvm-payload.sh, `wsp.net=1`) does DHCP on every
//! NIC, reads the NoCloud seed, prints its addresses and peers, pings them,
//! and `worker-1` then spoofs its IP, then its MAC (`wsp.spoof=worker-1`).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn sh(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace of this test, with a bridge; deleted (and every
/// process in it killed) when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Self {
        let name = format!(
            "wsp-test-{:08x}",
            std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        for cmd in [
            "ip link set lo up",
            "ip link add wspbr0 type bridge",
            "ip link set wspbr0 type bridge stp_state 0 forward_delay 0",
            "ip addr add 10.77.0.1/24 dev wspbr0",
            "ip addr add 10.78.0.1/24 dev wspbr0",
            "ip link set wspbr0 up",
        ] {
            let mut a = vec!["ip", "netns", "exec", &ns.0];
            a.extend(cmd.split(' '));
            sh(&a);
        }
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn taps(&self) -> Vec<String> {
        self.exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("wt"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pids = Command::new("ip").args(["netns", "pids", &self.0]).output();
        if let Ok(o) = pids {
            for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if let Ok(pid) = p.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn need_tools() {
    for tool in [
        "qemu-system-x86_64",
        "dnsmasq",
        "nft",
        "mkfs.vfat",
        "mcopy",
        "ip",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            let st = Command::new(repo().join("scripts/install-deps.sh")).status();
            assert!(
                matches!(st, Ok(s) if s.success()),
                "{tool} is missing and scripts/install-deps.sh could not install it"
            );
        }
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the workspace control test creates a network namespace: run it as root"
    );
}

struct Setup {
    c: Cluster,
    tmp: tempfile::TempDir,
    ns: Netns,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Setup {
    fn start() -> Self {
        need_tools();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TEST_LOCK)
            .expect("open the kvm test lock");
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("take the kvm test lock");
        let out = Command::new(repo().join("scripts/kvm-payload.sh"))
            .output()
            .expect("run scripts/kvm-payload.sh");
        assert!(
            out.status.success(),
            "scripts/kvm-payload.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let payload = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ns = Netns::create();
        let tmp = tempfile::Builder::new()
            .prefix("wsp-wc-")
            .tempdir()
            .expect("temp dir");
        let node_cfg = tmp.path().join("node.toml");
        // The three batch "nodes" are one host: one run dir, one dnsmasq,
        // one guard table on one bridge.
        std::fs::write(
            &node_cfg,
            format!(
                r#"[kvm]
run_dir = "{t}/kvm"
hugepages = false
accelerator = "tcg"
kernel = "{p}/vmlinux"
initrd = "{p}/initrd.gz"
append = "console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.net=1 wsp.spoof=worker-1"
bridge = "wspbr0"
netns = "{ns}"
dnsmasq_user = "root"
nft_table = "wsp_test"
[images]
cache_dir = "{t}/cache"
"#,
                t = tmp.path().display(),
                p = payload,
                ns = ns.0
            ),
        )
        .expect("write node config");
        let c = Cluster::start(Options {
            hypervisor: "kvm".into(),
            node_config: Some(node_cfg.display().to_string()),
            nodes: 3,
            extra: "[network.private]\ncidr = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\nrange = \"10.77.0.10-10.77.0.20\"\n[network.public]\ncidr = \"10.78.0.0/24\"\ngateway = \"10.78.0.1\"\nrange = \"10.78.0.10-10.78.0.20\"\n".into(),
            ..Options::default()
        });
        Setup {
            c,
            tmp,
            ns,
            _lock: lock,
        }
    }

    fn serial(&self, vm: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join("kvm").join(format!("{vm}.serial")))
            .unwrap_or_default()
    }

    fn wait_serial(&self, vm: &str, marker: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let s = self.serial(vm);
            if s.contains(marker) {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "{vm}: no {marker:?} within {limit:?}; console:\n{s}\ncoordinator log tail:\n{}",
                tail(&self.c.log())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn dnsmasq_alive(&self) -> bool {
        let pidfile = self.tmp.path().join("kvm/dnsmasq.pid");
        std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(|p| alive(p) && !is_zombie(p))
    }

    fn table(&self) -> bool {
        !self
            .ns
            .exec(&["nft", "list", "table", "bridge", "wsp_test"])
            .is_empty()
    }

    fn assert_network_gone(&self, when: &str) {
        let t = Instant::now();
        while (self.dnsmasq_alive() || self.table() || !self.ns.taps().is_empty())
            && t.elapsed() < Duration::from_secs(15)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            self.ns.taps(),
            Vec::<String>::new(),
            "taps left after {when}"
        );
        assert!(!self.dnsmasq_alive(), "dnsmasq left after {when}");
        assert!(!self.table(), "nft table left after {when}");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.c.stop();
        for n in self.c.nodes.clone() {
            let _ = Command::new(bin("workspace-kill-all"))
                .args(["--hypervisor", "kvm", "--node", &n, "--node-config"])
                .arg(self.tmp.path().join("node.toml"))
                .arg("--state-dir")
                .arg(self.c.state_dir(&n))
                .output();
        }
    }
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(3000)..]
}

const ENSEMBLE: &str = r#"
name = "wc"
duration = "1h"
ssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIwsptest test@wsp"
[[group]]
name = "worker"
count = 2
memory_mb = 128
image = "kernel:"
[[group]]
name = "head"
count = 1
memory_mb = 128
image = "kernel:"
public_ip = true
"#;

fn nics(view: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for vm in view["vms"].as_array().expect("vms") {
        for n in vm["nics"].as_array().expect("nics") {
            out.push((
                vm["hostname"].as_str().unwrap_or_default().to_string(),
                n["ip"].as_str().unwrap_or_default().to_string(),
                vm["name"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

#[test]
fn ensemble_gets_its_addresses_sees_its_peers_and_cannot_spoof_then_leaves_nothing() {
    let s = Setup::start();
    let r = s.c.create(ENSEMBLE);
    assert_eq!(r.status, 201, "create: {}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let view = s.c.wait_running(&id);
    let nics = nics(&view);
    assert_eq!(
        nics.len(),
        4,
        "2 workers + head private + head public: {view}"
    );
    let names: Vec<&str> = view["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let t0 = Instant::now();
    for vm in view["vms"].as_array().unwrap() {
        let name = vm["name"].as_str().unwrap();
        let host = vm["hostname"].as_str().unwrap();
        let ips: Vec<&str> = vm["nics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["ip"].as_str().unwrap())
            .collect();
        let console = s.wait_serial(name, "WSP-VM-READY", Duration::from_secs(90));
        let net_line = format!("WSP-NET {host} {}", ips.join(","));
        assert!(
            console.contains(&net_line),
            "{name}: want {net_line:?}; console:\n{console}\ndnsmasq log:\n{}\npilot log:\n{}",
            std::fs::read_to_string(s.tmp.path().join("kvm/dnsmasq.log")).unwrap_or_default(),
            tail(&s.c.log())
        );
        for (peer, ip, _) in &nics {
            if !ip.starts_with("10.77.") {
                continue;
            }
            assert!(
                console.contains(&format!("WSP-PEER {peer} ")) && console.contains(ip.as_str()),
                "{name} does not list peer {peer} {ip}:\n{console}"
            );
            if peer != host {
                assert!(
                    console.contains(&format!("WSP-PING {ip} ok")),
                    "{name} cannot ping {peer} ({ip}):\n{console}\nall consoles:\n{}\ndnsmasq log:\n{}",
                    names.iter().map(|n| format!("--- {n}\n{}", s.serial(n))).collect::<String>(),
                    std::fs::read_to_string(s.tmp.path().join("kvm/dnsmasq.log")).unwrap_or_default()
                );
            }
        }
        if host == "worker-1" {
            let c = s.wait_serial(name, "WSP-SPOOF mac", Duration::from_secs(60));
            assert!(
                c.contains("WSP-SPOOF ip reached=0"),
                "IP spoofing reached a peer:\n{c}"
            );
            assert!(
                c.contains("WSP-SPOOF mac reached=0"),
                "MAC spoofing reached a peer:\n{c}"
            );
        }
    }
    eprintln!("ensemble checked {:?} after running", t0.elapsed());
    // The timeline shows no staging (kernel: boots) but every VM started.
    assert!(s.ns.taps().len() == 4 && s.dnsmasq_alive() && s.table());
    // Destroy: nothing left, addresses freed.
    let r = s.c.destroy_as(TOKEN, &id);
    assert!(r.status < 300, "destroy: {}", r.body);
    let v = s.c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed");
    for vm in v["vms"].as_array().unwrap() {
        assert_eq!(
            vm["nics"],
            serde_json::json!([]),
            "address still assigned: {vm}"
        );
    }
    s.assert_network_gone("destroy");
    let db = rusqlite::Connection::open(s.c.root().join("coordinator/coordinator.db")).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM addresses", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0, "addresses left assigned in the database");
    let _ = names;
}
