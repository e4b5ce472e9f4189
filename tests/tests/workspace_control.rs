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
//!
//! Then the other ends of a networked VM's life: preemption (SIGTERM to a
//! pilot) and kill-all after SIGKILLed pilots leave no tap, dnsmasq, nft
//! table, QEMU or address behind; and images: two pilots staging the same
//! image from an HTTP repository the test serves on 127.0.0.1 download it
//! once and both VMs boot from it; a corrupted image fails its VM with a
//! checksum mismatch and leaves nothing in the cache.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wsp_e2e::*;

const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";
const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
/// The coordinator's address pools (the bridge has .1 of each).
const POOLS: &str = "[network.private]\ncidr = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\nrange = \"10.77.0.10-10.77.0.20\"\n[network.public]\ncidr = \"10.78.0.0/24\"\ngateway = \"10.78.0.1\"\nrange = \"10.78.0.10-10.78.0.20\"\n";

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("nr_hugepages is a number")
}

fn sh(args: &[&str]) -> std::process::Output {
    let out = run_tool(args);
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
    wsp_e2e::need_tools(&[
        "qemu-system-x86_64",
        "qemu-img",
        "dnsmasq",
        "nft",
        "mkfs.vfat",
        "mcopy",
        "ip",
    ]);
    assert!(
        nix::unistd::geteuid().is_root(),
        "the workspace control test creates a network namespace: run it as root"
    );
}

/// What a test's cluster looks like.
struct Conf {
    nodes: u32,
    /// `[kvm] hugepages`: real pages (the kill-all test checks they come back).
    hugepages: bool,
    /// Extra keys of the node config's `[kvm]` (`{payload}` = payload dir).
    kvm_extra: String,
    /// Appended to the coordinator's config (address pools, `[images]`).
    coordinator_extra: String,
}

impl Conf {
    /// `nodes` batch nodes on one host with the test's address pools.
    fn network(nodes: u32) -> Self {
        Conf {
            nodes,
            hugepages: false,
            kvm_extra: String::new(),
            coordinator_extra: POOLS.into(),
        }
    }
}

struct Setup {
    c: Cluster,
    tmp: tempfile::TempDir,
    ns: Netns,
    /// The host's hugepage count before the test.
    original_pages: u64,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Setup {
    fn start() -> Self {
        Self::start_with(Conf::network(3))
    }

    fn start_with(conf: Conf) -> Self {
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
        // The batch "nodes" are one host: one run dir, one dnsmasq, one
        // guard table on one bridge, one image cache.
        std::fs::write(
            &node_cfg,
            format!(
                r#"[kvm]
run_dir = "{t}/kvm"
hugepages = {hp}
accelerator = "tcg"
kernel = "{p}/vmlinux"
initrd = "{p}/initrd.gz"
append = "console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.net=1 wsp.spoof=worker-1"
bridge = "wspbr0"
netns = "{ns}"
dnsmasq_user = "root"
nft_table = "wsp_test"
{extra}
[images]
cache_dir = "{t}/cache"
"#,
                t = tmp.path().display(),
                p = payload,
                ns = ns.0,
                hp = conf.hugepages,
                extra = conf.kvm_extra.replace("{payload}", &payload),
            ),
        )
        .expect("write node config");
        let original_pages = nr_hugepages();
        let c = Cluster::start(Options {
            hypervisor: "kvm".into(),
            node_config: Some(node_cfg.display().to_string()),
            nodes: conf.nodes,
            extra: conf.coordinator_extra,
            ..Options::default()
        });
        Setup {
            c,
            tmp,
            ns,
            original_pages,
            _lock: lock,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("kvm")
    }

    fn cache_dir(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    /// PIDs of QEMU processes whose arguments point into this test's dir.
    fn qemus(&self) -> Vec<i32> {
        qemus_under(self.tmp.path())
    }

    /// Waits (bounded) until no QEMU of the test is left.
    fn assert_no_qemu(&self, when: &str) {
        let t = Instant::now();
        while !self.qemus().is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.qemus(), Vec::<i32>::new(), "QEMU left after {when}");
    }

    /// Rows of the coordinator's `addresses` table.
    fn db_addresses(&self) -> i64 {
        self.c
            .db_counts()
            .into_iter()
            .find(|(t, _)| t == "addresses")
            .map(|(_, n)| n)
            .expect("db_counts has the addresses table")
    }

    /// Every VM of the view has no address and the database holds none.
    fn assert_addresses_freed(&self, view: &Value, when: &str) {
        for vm in view["vms"].as_array().expect("vms") {
            assert_eq!(
                vm["nics"],
                serde_json::json!([]),
                "address still assigned after {when}: {vm}"
            );
        }
        assert_eq!(
            self.db_addresses(),
            0,
            "addresses left assigned in the database after {when}"
        );
    }

    /// `workspace-kill-all --hypervisor kvm` for `node`: exit code, stdout, stderr.
    fn kill_all(&self, node: &str) -> (Option<i32>, String, String) {
        let out = Command::new(bin("workspace-kill-all"))
            .args(["--hypervisor", "kvm", "--node", node, "--node-config"])
            .arg(self.tmp.path().join("node.toml"))
            .arg("--state-dir")
            .arg(self.c.state_dir(node))
            .output()
            .expect("run workspace-kill-all");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
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
        let left: Vec<String> = [
            "dnsmasq.pid",
            "dnsmasq.hosts",
            "dnsmasq.leases",
            "dnsmasq.log",
            "net.json",
        ]
        .into_iter()
        .filter(|f| self.run_dir().join(f).exists())
        .map(String::from)
        .collect();
        assert!(
            left.is_empty(),
            "node network files left after {when}: {left:?}"
        );
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.c.stop();
        for n in self.c.nodes.clone() {
            let _ = self.kill_all(&n);
        }
        for pid in self.qemus() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
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
    s.assert_addresses_freed(&v, "destroy");
    let _ = names;
}

/// A worker and a head with a public address: 2 VMs, 3 addresses.
const PAIR: &str = r#"
name = "wc-pair"
duration = "1h"
[[group]]
name = "worker"
count = 1
memory_mb = 128
image = "kernel:"
[[group]]
name = "head"
count = 1
memory_mb = 128
image = "kernel:"
public_ip = true
"#;

/// The VM of `group` in a view: (name, node, slot).
fn vm_of(view: &Value, group: &str) -> (String, String, String) {
    let vm = view["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["group"] == group)
        .unwrap_or_else(|| panic!("no VM of group {group}: {view}"));
    (
        vm["name"].as_str().expect("name").to_string(),
        vm["node"].as_str().expect("node").to_string(),
        vm["slot_id"].as_str().expect("slot_id").to_string(),
    )
}

#[test]
fn preemption_of_one_pilot_leaves_no_tap_dnsmasq_table_or_address() {
    let s = Setup::start_with(Conf::network(2));
    let r = s.c.create(PAIR);
    assert_eq!(r.status, 201, "create: {}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let view = s.c.wait_running(&id);
    assert_eq!(
        nics(&view).len(),
        3,
        "worker + head private + public: {view}"
    );
    assert_eq!(s.db_addresses(), 3, "3 addresses assigned");
    assert!(
        s.ns.taps().len() == 3 && s.dnsmasq_alive() && s.table(),
        "network up while running: taps {:?}",
        s.ns.taps()
    );
    // Preempt the head's pilot (the batch system's SIGTERM): it destroys its
    // VM; the coordinator then ends the workspace and the worker's pilot
    // destroys the other one.
    let (_, node, slot) = vm_of(&view, "head");
    let pid = s.c.pilot_pid_on(&slot, &node);
    signal(pid, Signal::SIGTERM);
    wait_gone(pid, Duration::from_secs(10)).expect("the preempted pilot exits");
    let v = s.c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    s.assert_network_gone("preemption");
    s.assert_no_qemu("preemption");
    s.assert_addresses_freed(&v, "preemption");
}

#[test]
fn kill_all_after_sigkilled_pilots_removes_taps_dnsmasq_table_qemu_and_gives_hugepages_back() {
    let s = Setup::start_with(Conf {
        hugepages: true,
        ..Conf::network(1)
    });
    let spec = "name = \"wc-one\"\nduration = \"1h\"\n[[group]]\nname = \"head\"\ncount = 1\nmemory_mb = 128\nimage = \"kernel:\"\npublic_ip = true\n";
    let r = s.c.create(spec);
    assert_eq!(r.status, 201, "create: {}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let view = s.c.wait_running(&id);
    assert_eq!(nics(&view).len(), 2, "private + public: {view}");
    assert_eq!(
        nr_hugepages(),
        s.original_pages + 64,
        "128 MB held as 2 MB pages"
    );
    let pilots = s.c.pilot_pids(None);
    assert!(!pilots.is_empty(), "no pilot found");
    for pid in &pilots {
        signal(*pid, Signal::SIGKILL);
    }
    for pid in &pilots {
        wait_gone(*pid, Duration::from_secs(5)).expect("pilot killed");
    }
    // The killed pilots left everything behind.
    assert_eq!(s.ns.taps().len(), 2, "taps of the killed pilot's VM");
    assert!(s.dnsmasq_alive(), "dnsmasq outlives a SIGKILLed pilot");
    assert!(s.table(), "the guard table outlives a SIGKILLed pilot");
    assert_eq!(s.qemus().len(), 1, "QEMU outlives a SIGKILLed pilot");
    for n in &s.c.nodes {
        let (code, out, err) = s.kill_all(n);
        assert_eq!(code, Some(0), "kill-all {n}: {out}\n{err}");
    }
    s.assert_network_gone("kill-all");
    s.assert_no_qemu("kill-all");
    assert_eq!(
        nr_hugepages(),
        s.original_pages,
        "hugepages not back at their original count after kill-all"
    );
    // The coordinator notices the dead jobs and frees the addresses.
    let v = s.c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    s.assert_addresses_freed(&v, "the pilots were killed");
}

/// A tiny HTTP image repository on 127.0.0.1: serves fixed files (after a
/// delay, so that concurrent downloads would overlap) and counts requests.
struct ImageServer {
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ImageServer {
    fn start(files: HashMap<String, Vec<u8>>, delay: Duration) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the image server");
        l.set_nonblocking(true).expect("nonblocking listener");
        let port = l.local_addr().expect("local address").port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let files = Arc::new(files);
        let (h, st) = (Arc::clone(&hits), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((sock, _)) => {
                        let (files, hits) = (Arc::clone(&files), Arc::clone(&h));
                        std::thread::spawn(move || serve(sock, &files, &hits, delay));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => break,
                }
            }
        });
        ImageServer {
            port,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits")
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut sock: std::net::TcpStream,
    files: &HashMap<String, Vec<u8>>,
    hits: &Mutex<Vec<String>>,
    delay: Duration,
) {
    let _ = sock.set_nonblocking(false);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req);
    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
    if let Ok(mut h) = hits.lock() {
        h.push(path.clone());
    }
    std::thread::sleep(delay);
    let _ = match files.get(&path) {
        Some(body) => sock
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .and_then(|_| sock.write_all(body)),
        None => sock.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
    };
}

/// A 4 MiB raw disk with an MBR of three partitions: a guest kernel that
/// reads it prints `vdX: vdX1 vdX2 vdX3` (the seed has no partition table).
fn disk_image() -> Vec<u8> {
    let mut d = vec![0u8; 4 << 20];
    for (i, start) in [2048u32, 4096, 6144].into_iter().enumerate() {
        let e = 446 + i * 16;
        d[e + 4] = 0x83;
        d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
    }
    d[510] = 0x55;
    d[511] = 0xaa;
    d[2048 * 512..2048 * 512 + 16].copy_from_slice(b"wsp staged image");
    d
}

fn sha256_of(data: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("blob");
    std::fs::write(&p, data).expect("write blob");
    let out = sh(&["sha256sum", &p.display().to_string()]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_string()
}

/// Disk images boot the payload kernel (QEMU's `-kernel` through
/// `extra_args`) with the disk attached; `wsp.net=1` loads virtio_blk.
const DISK_BOOT: &str = r#"extra_args = ["-kernel", "{payload}/vmlinux", "-initrd", "{payload}/initrd.gz", "-append", "console=ttyS0 panic=-1 wsp.net=1"]"#;

fn image_setup(server: &ImageServer, nodes: u32) -> Setup {
    Setup::start_with(Conf {
        nodes,
        hugepages: false,
        kvm_extra: DISK_BOOT.into(),
        coordinator_extra: format!("[images]\nrepository = \"{}\"\n", server.url()),
    })
}

fn image_spec(name: &str, count: u32, image: &str, sha: &str) -> String {
    format!(
        "name = \"{name}\"\nduration = \"1h\"\n[[group]]\nname = \"worker\"\ncount = {count}\nmemory_mb = 128\nimage = \"{image}\"\nimage_sha256 = \"{sha}\"\n"
    )
}

#[test]
fn two_pilots_staging_one_image_download_it_once_and_both_vms_boot_from_it() {
    let disk = disk_image();
    let sha = sha256_of(&disk);
    let server = ImageServer::start(
        HashMap::from([("/disk.raw".to_string(), disk.clone())]),
        Duration::from_millis(1500),
    );
    let s = image_setup(&server, 2);
    let r = s.c.create(&image_spec("wc-img", 2, "disk.raw", &sha));
    assert_eq!(r.status, 201, "create: {}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let view = s.c.wait_running(&id);
    let vms = view["vms"].as_array().expect("vms").clone();
    assert_eq!(vms.len(), 2);
    assert_ne!(
        vms[0]["node"], vms[1]["node"],
        "the two VMs run on two nodes (two pilots): {view}"
    );
    assert_eq!(
        server.hits("/disk.raw"),
        1,
        "one download for two pilots sharing the cache"
    );
    // The timeline: one fetched, one found in the cache.
    let staged: Vec<String> =
        s.c.timeline(&id)
            .iter()
            .filter(|e| e["phase"] == "image_staged")
            .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
            .collect();
    eprintln!("image_staged: {staged:?}");
    assert_eq!(staged.len(), 2, "an image_staged phase per VM: {staged:?}");
    assert_eq!(
        staged.iter().filter(|d| d.contains("fetched into")).count(),
        1,
        "{staged:?}"
    );
    assert_eq!(
        staged
            .iter()
            .filter(|d| d.contains("already in the node cache"))
            .count(),
        1,
        "{staged:?}"
    );
    // QEMU runs on an overlay whose backing file is the cached image, and
    // has that base open.
    let base = s.cache_dir().join("sha256").join(&sha);
    for vm in &vms {
        let name = vm["name"].as_str().expect("name");
        let overlay = s.run_dir().join(format!("{name}.qcow2"));
        let info = sh(&[
            "qemu-img",
            "info",
            "-U",
            "--output=json",
            &overlay.display().to_string(),
        ]);
        let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
        assert_eq!(
            info["backing-filename"].as_str(),
            Some(base.display().to_string().as_str()),
            "{name}: overlay backing file: {info}"
        );
        let pid: i32 = std::fs::read_to_string(s.run_dir().join(format!("{name}.pid")))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        let opened = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("QEMU's fds")
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == base));
        assert!(opened, "{name}: QEMU does not hold {}", base.display());
    }
    // Both guests boot and their kernels read the staged disk's partition table.
    let t0 = Instant::now();
    for vm in &vms {
        let name = vm["name"].as_str().expect("name");
        let console = s.wait_serial(name, "WSP-VM-READY", Duration::from_secs(60));
        let read = console.lines().find(|l| {
            ["vda", "vdb"]
                .iter()
                .any(|d| l.contains(&format!("{d}: {d}1 {d}2 {d}3")))
        });
        let Some(line) = read else {
            panic!("{name}: the guest did not read the staged disk's partitions:\n{console}");
        };
        eprintln!("{name}: {}", line.trim());
    }
    eprintln!("both VMs booted {:?} after running", t0.elapsed());
    let r = s.c.destroy_as(TOKEN, &id);
    assert!(r.status < 300, "destroy: {}", r.body);
    let v = s.c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    s.assert_no_qemu("destroy");
    assert_eq!(
        std::fs::read(&base).expect("the cached image stays"),
        disk,
        "the cached base image changed"
    );
    assert_eq!(server.hits("/disk.raw"), 1);
}

#[test]
fn a_corrupted_image_fails_its_vm_with_a_checksum_mismatch_and_caches_nothing() {
    let good = disk_image();
    let sha = sha256_of(&good);
    let mut bad = good.clone();
    bad[4096] ^= 0xff;
    let server = ImageServer::start(
        HashMap::from([("/bad.raw".to_string(), bad)]),
        Duration::ZERO,
    );
    let s = image_setup(&server, 1);
    let r = s.c.create(&image_spec("wc-bad", 1, "bad.raw", &sha));
    assert_eq!(r.status, 201, "create: {}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let v = s.c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("checksum mismatch")),
        "the workspace says why: {v:#}"
    );
    eprintln!("reason: {}", v["reason"]);
    assert_eq!(server.hits("/bad.raw"), 1);
    for sub in ["sha256", "tmp", "by-url"] {
        let left: Vec<_> = std::fs::read_dir(s.cache_dir().join(sub))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "cache {sub}/ holds {left:?}");
    }
    s.assert_no_qemu("the failed start");
}
