//! Part 3: the coordinator alone under load from simulated pilots.
//!
//! The coordinator runs as a child process (this binary's hidden
//! `load-server` subcommand: the real engine and HTTP router, with a batch
//! system faked in memory so nothing but the coordinator works). K simulated
//! pilots on loopback each hold a signed command long-poll open on its own
//! connection; meanwhile a fixed number of senders post correctly signed
//! events (fresh sequence numbers, valid slots and VMs) as fast as they are
//! acknowledged. Measured: acknowledged events per second, p50/p99 latency,
//! and the child's RSS with every long-poll open.

use crate::stats::percentile;
use anyhow::{anyhow, bail, Context, Result};
use lrm_adapters::memory::MemoryLrm;
use lrm_adapters::Capacity;
use protocol::auth::{SlotKey, SIGNATURE_HEADER, SLOT_HEADER};
use protocol::pilot::{EventKind, PilotEvent, PollRequest, EVENTS_PATH, POLL_PATH};
use protocol::{now_ms, PilotId, SlotId, VmId};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TOKEN: &str = "bench-load-token";
/// VMs (pilots) per workspace.
pub const PER_WS: usize = 100;
/// Events in flight at once.
pub const SENDERS: usize = 32;

/// Raises the open-files limit to `want` (or the most allowed).
pub fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    // Root may raise the hard limit too; others get what the hard limit allows.
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        return Ok(want);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(want), hard)?;
    Ok(hard.min(want))
}

/// The child: a coordinator on loopback with the fake batch system. Prints
/// `url=<url>` and serves until stdin closes (the parent is gone) or `max_s` passes.
pub async fn serve(dir: &Path, max_s: u64) -> Result<()> {
    raise_nofile(65_536)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let cfg = coordinator::config::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.join("data"),
        users: vec![coordinator::config::User {
            name: "bench".into(),
            token_sha256: protocol::auth::token_hash(TOKEN),
            admin: false,
            max_urgency: 0,
        }],
        pilot: coordinator::config::PilotConfig {
            poll_wait_ms: 30_000,
            ..Default::default()
        },
        pilot_silence_s: 120,
        ..Default::default()
    };
    let engine = coordinator::engine::Engine::new(
        cfg,
        Arc::new(MemoryLrm::new(Capacity {
            nodes: PER_WS as u32,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        })),
        url.clone(),
    )?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ticks = tokio::spawn(engine.clone().run_ticks(stop_rx));
    let app = coordinator::api::router(engine);
    let http = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("url={url}");
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(max_s), async {
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let _ = stop_tx.send(true);
    http.abort();
    let _ = ticks.await;
    Ok(())
}

/// One keep-alive HTTP/1.1 connection, just enough for our two POST routes.
struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    host: String,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
            host: addr.to_string(),
        })
    }

    /// POSTs a signed body; returns the status.
    async fn post(&mut self, path: &str, slot: &str, sig: &str, body: &[u8]) -> Result<u16> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n{SLOT_HEADER}: {slot}\r\n{SIGNATURE_HEADER}: {sig}\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body);
        self.w.write_all(&msg).await?;
        let mut line = String::new();
        if self.r.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
        let mut len = 0usize;
        loop {
            line.clear();
            if self.r.read_line(&mut line).await? == 0 {
                bail!("connection closed in headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).await?;
        Ok(status)
    }
}

struct Pilot {
    slot: SlotId,
    key: SlotKey,
    node: String,
    pilot_id: PilotId,
    vm: VmId,
    seq: AtomicU64,
}

impl Pilot {
    fn event(&self, kind: EventKind) -> Result<(Vec<u8>, String)> {
        let e = PilotEvent {
            slot_id: self.slot.clone(),
            pilot_id: self.pilot_id.clone(),
            node: self.node.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            ts_ms: now_ms(),
            kind,
        };
        let body = serde_json::to_vec(&e)?;
        let sig = self.key.sign(&body);
        Ok((body, sig))
    }

    fn poll(&self) -> Result<(Vec<u8>, String)> {
        let p = PollRequest {
            slot_id: self.slot.clone(),
            pilot_id: self.pilot_id.clone(),
            node: self.node.clone(),
            after: 0,
            wait_ms: 30_000,
            ts_ms: now_ms(),
        };
        let body = serde_json::to_vec(&p)?;
        let sig = self.key.sign(&body);
        Ok((body, sig))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub pilots: usize,
    pub senders: usize,
    pub seconds: f64,
    pub events_acked: u64,
    pub events_refused: u64,
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub polls_open: usize,
    /// Long-polls answered during the measurement (no command is ever queued, so ~0).
    pub polls_answered: u64,
    /// CPU time of the whole coordinator process per acknowledged event, µs.
    pub server_cpu_us_per_event: f64,
    /// CPU time of its event writer thread (the serial path) per event, µs.
    pub writer_cpu_us_per_event: f64,
    pub rss_mb_idle: f64,
    pub rss_mb_after: f64,
    pub hwm_mb: f64,
    pub setup_s: f64,
    /// The machine's limit for these rows, measured right after (see `limit`).
    pub limit: Option<crate::limit::LimitResult>,
    /// `events_per_s` over the limit's events/s.
    pub fraction_of_limit: f64,
}

fn rss_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU time (user + system, ms) of process `pid`, and of its thread named
/// `thread` if there is one. Clock ticks of `/proc` (10 ms each here): over
/// a measurement of seconds, a resolution of about 1 %.
fn cpu_ms(pid: u32, thread: &str) -> (f64, f64) {
    let ticks = |stat: &str| -> Option<f64> {
        // Fields after the command name, which ends at the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64);
    let to_ms = |t: f64| t * 1000.0 / hz;
    let process = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(f64::NAN, to_ms);
    let writer = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == thread))
        .and_then(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .and_then(|s| ticks(&s))
        .map_or(f64::NAN, to_ms);
    (process, writer)
}

/// Kills the child when dropped (every exit path).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`run`] on a thread of its own with a single-threaded runtime. The load
/// generator stands in for pilots on other hosts, yet shares this host's 2
/// cores with the coordinator: on one thread it takes less of them than on
/// the multi-threaded runtime, whose wake-ups between its threads cost CPU
/// (paired runs: +10-30 % events/s, and less coordinator CPU per event).
pub async fn run_on_one_thread(pilots: usize, seconds: f64) -> Result<LoadResult> {
    let thread = std::thread::Builder::new()
        .name("load-generator".into())
        .spawn(move || -> Result<LoadResult> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run(pilots, seconds))
        })?;
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow!("the load generator's thread panicked"))?
}

/// Runs one load level: `pilots` long-polls, events for `seconds`.
async fn run(pilots: usize, seconds: f64) -> Result<LoadResult> {
    let setup = Instant::now();
    raise_nofile((pilots as u64) * 2 + 4096)?;
    let dir = tempfile::Builder::new()
        .prefix("wsp-bench-load-")
        .tempdir()?;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let mut child = std::process::Command::new(exe)
        .args(["load-server", "--dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting the load server")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let guard = ChildGuard(child);
    let pid = guard.0.id();
    let url = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        }),
    )
    .await
    .map_err(|_| anyhow!("load server did not start in 20 s"))???;
    let url = url
        .trim()
        .strip_prefix("url=")
        .ok_or_else(|| anyhow!("load server said {url:?}"))?
        .to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let master = hex::decode(std::fs::read_to_string(dir.path().join("data/master.key"))?.trim())?;

    // Workspaces of PER_WS VMs each: one slot, one pilot per node.
    let client = coordinator::client::Client::new(&url, TOKEN)?;
    let mut all = Vec::new();
    let mut left = pilots;
    while left > 0 {
        let n = left.min(PER_WS);
        left -= n;
        let spec = format!("name = \"load\"\nduration = \"1h\"\n[[group]]\nname = \"p\"\ncount = {n}\nmemory_mb = 512\ncpus = 1\nimage = \"x\"\n");
        let v = client.create(&spec).await?;
        let slot = v
            .slots
            .first()
            .ok_or_else(|| anyhow!("no slot"))?
            .id
            .clone();
        let key = SlotKey::derive(&master, &slot)?;
        for (j, vm) in v.vms.iter().enumerate() {
            all.push(Arc::new(Pilot {
                slot: slot.clone(),
                key: key.clone(),
                node: format!("node{}", j + 1),
                pilot_id: PilotId::generate(),
                vm: vm.id.clone(),
                seq: AtomicU64::new(0),
            }));
        }
    }
    let all = Arc::new(all);

    // Every pilot says `started` (creates its pilot row), SENDERS at a time.
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SENDERS.min(pilots) {
        let (all, next, addr) = (all.clone(), next.clone(), addr.clone());
        tasks.spawn(async move {
            let mut c = Conn::open(&addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = all.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let (body, sig) = p.event(EventKind::Started {
                    pid: 1,
                    hypervisor: "sim".into(),
                    job_id: None,
                })?;
                let st = c.post(EVENTS_PATH, p.slot.as_str(), &sig, &body).await?;
                if st != 200 {
                    bail!("started event refused: HTTP {st}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }

    // K long-polls, opened 200 at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let mut polls = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for p in all.iter() {
        let (p, addr, open, answered, stop, gate) = (
            p.clone(),
            addr.clone(),
            open.clone(),
            answered.clone(),
            stop.clone(),
            gate.clone(),
        );
        polls.spawn(async move {
            let permit = gate.acquire_owned().await;
            let mut c = Conn::open(&addr).await?;
            drop(permit);
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let (body, sig) = p.poll()?;
                if first {
                    open.fetch_add(1, Ordering::Relaxed);
                    first = false;
                }
                let st = c.post(POLL_PATH, p.slot.as_str(), &sig, &body).await?;
                if st != 200 {
                    bail!("poll refused: HTTP {st}");
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while open.load(Ordering::Relaxed) < pilots {
        if Instant::now() > deadline {
            bail!(
                "only {} of {pilots} long-polls open after 60 s",
                open.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the server take the last requests in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_mb_idle = rss_mb(pid, "VmRSS:");
    let setup_s = setup.elapsed().as_secs_f64();
    let answered_before = answered.load(Ordering::Relaxed);

    // The measurement: SENDERS closed loops for `seconds`.
    let lat = Arc::new(Mutex::new(Vec::<f64>::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_ms(pid, "event-writer");
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..SENDERS {
        let (all, addr, lat, refused) = (all.clone(), addr.clone(), lat.clone(), refused.clone());
        tasks.spawn(async move {
            let mut c = Conn::open(&addr).await?;
            let mut mine = Vec::new();
            // Each sender owns every SENDERS-th pilot: like a real pilot,
            // none has two events in flight (the coordinator relies on it).
            let owned: Vec<&Arc<Pilot>> = all.iter().skip(s).step_by(SENDERS).collect();
            let mut i = 0;
            while !owned.is_empty() && Instant::now() < end {
                let p = owned[i % owned.len()];
                i += 1;
                let (body, sig) = p.event(EventKind::VmDestroyed {
                    vm_id: p.vm.clone(),
                    destroy_ms: 1,
                })?;
                let t = Instant::now();
                let st = c.post(EVENTS_PATH, p.slot.as_str(), &sig, &body).await?;
                if st == 200 {
                    mine.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
            Ok::<_, anyhow::Error>(())
        });
    }
    let bound = Duration::from_secs_f64(seconds) + Duration::from_secs(60);
    tokio::time::timeout(bound, async {
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .map_err(|_| anyhow!("senders did not finish within {bound:?}"))??;
    let took = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ms(pid, "event-writer");
    let rss_mb_after = rss_mb(pid, "VmRSS:");
    let hwm_mb = rss_mb(pid, "VmHWM:");
    let polls_answered = answered.load(Ordering::Relaxed) - answered_before;
    stop.store(true, Ordering::Relaxed);
    polls.abort_all();
    drop(guard);
    let mut l = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
    l.sort_by(f64::total_cmp);
    let acked = l.len() as u64;
    Ok(LoadResult {
        pilots,
        senders: SENDERS,
        seconds: took,
        events_acked: acked,
        events_refused: refused.load(Ordering::Relaxed),
        events_per_s: acked as f64 / took,
        p50_ms: percentile(&l, 50.0),
        p99_ms: percentile(&l, 99.0),
        server_cpu_us_per_event: (cpu1.0 - cpu0.0) * 1000.0 / acked.max(1) as f64,
        writer_cpu_us_per_event: (cpu1.1 - cpu0.1) * 1000.0 / acked.max(1) as f64,
        polls_open: pilots,
        polls_answered,
        rss_mb_idle,
        rss_mb_after,
        hwm_mb,
        setup_s,
        limit: None,
        fraction_of_limit: f64::NAN,
    })
}
