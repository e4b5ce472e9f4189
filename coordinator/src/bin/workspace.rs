//! `workspace`: the client. Create, inspect, list, watch, reach and destroy
//! workspaces on a coordinator.
//!
//! Output: tables or `--json` on stdout; progress and errors on stderr
//! (progress as plain lines when stderr is not a terminal). An error is one
//! line, each cause once, then a `hint:` line saying what to do.

use clap::{CommandFactory, Parser, Subcommand};
use coordinator::client::{Client, ClientConfig, ClientError};
use coordinator::timeline::{fmt_stamp_ms, format_entry, in_time_order};
use protocol::view::{TimelineEntry, VmState, VmView, WorkspaceState, WorkspaceView};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const EXIT_CODES: &str = "Settings: each of --url, --token, --ca-file comes from the flag, else
the environment (WORKSPACE_URL, WORKSPACE_TOKEN, WORKSPACE_CA_FILE), else
the config file (--config, WORKSPACE_CONFIG, default
~/.config/workspace/config.toml: keys url, token, ca_file).

Exit codes:
  0    success
  1    the coordinator refused or could not be reached (message on stderr)
  2    bad arguments, id or client config
  3    --wait: the workspace ended failed, preempted or expired instead
       (suspend/resume --wait: it did not reach suspended/running)
  4    --wait: timed out (the workspace goes on; its id was printed first)
  130  --wait: interrupted (Ctrl-C; the workspace goes on)";

#[derive(Parser)]
#[command(name = "workspace", version, about = "Lease virtual clusters from a workspace coordinator", after_help = EXIT_CODES)]
struct Cli {
    /// Coordinator URL [default: http://127.0.0.1:8750].
    #[arg(long, env = "WORKSPACE_URL", global = true)]
    url: Option<String>,
    /// Bearer token.
    #[arg(long, env = "WORKSPACE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// CA certificate (PEM) of an https coordinator.
    #[arg(long, env = "WORKSPACE_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Client config file [default: ~/.config/workspace/config.toml].
    #[arg(long, env = "WORKSPACE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print JSON on stdout (one document; `watch`: one entry per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a workspace from a spec file (TOML, or JSON); prints its id first.
    Create {
        #[arg(long)]
        file: PathBuf,
        /// Wait until every VM runs (shows progress on stderr).
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Print only the id (for scripts: `id=$(workspace create -q --file f)`).
        #[arg(long, short)]
        quiet: bool,
        /// The create's idempotency key [default: a new random one]. A create
        /// sent again with the same key and spec (within a day) answers with
        /// the workspace the first one made instead of making a second.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// While the coordinator cannot be reached, or its answer is lost,
        /// send the create again (same key) for this many seconds.
        #[arg(long, default_value_t = 60)]
        retry_for: u64,
    },
    /// Show one workspace: state, and per VM its host name, addresses, node and job.
    Status { id: String },
    /// List your workspaces (all of them for admins).
    List,
    /// Destroy a workspace.
    Destroy {
        id: String,
        /// Wait until every slot is given back (shows what happens meanwhile).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Suspend a running workspace: every VM saved to a checkpoint, its
    /// slots given back, its lease clock stopped, until `workspace resume`.
    Suspend {
        id: String,
        /// Wait until every VM is saved (shows what happens meanwhile).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Resume a suspended workspace: new slots from the batch system, every
    /// VM restored from its checkpoint (the same guests, no reboot).
    Resume {
        id: String,
        /// Wait until every VM runs again (shows what happens meanwhile).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Follow a workspace's timeline until it settles.
    Watch { id: String },
    /// Make a running lease end later (within the walltime its pilot jobs
    /// were given, see the spec's max_duration, and your max_lease_s).
    Renew {
        id: String,
        /// How much longer: "1h", "30m", "1h 30m" or seconds.
        #[arg(long, value_parser = parse_by)]
        by: Duration,
    },
    /// Cluster-wide views and actions for admins.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Log in to a VM with ssh (its public address if it has one, else its
    /// private one; the key is the spec's ssh_key).
    Ssh {
        id: String,
        /// Host name (worker-0), VM name or VM id [default: the first VM].
        vm: Option<String>,
        /// User to log in as (cloud images: debian, ubuntu, ...).
        #[arg(long, short = 'l')]
        user: Option<String>,
        /// Print the ssh command instead of running it.
        #[arg(long)]
        print: bool,
        /// More arguments for ssh (after `--`).
        #[arg(last = true)]
        ssh_args: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages (workspace.1 and one per subcommand) into a directory.
    Man {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Nodes in use, slots with their pilots and queue reasons, and the
    /// nodes that need kill-all with the command to run there.
    Nodes,
    /// The slot pool ([pool] in the coordinator's config): each pool slot,
    /// its node, state (idle, bound, growing, draining), how long it has
    /// been idle, the walltime it has left and the lease it serves.
    Pool,
    /// Say that kill-all cleaned NODE: it is no longer listed, and the VMs
    /// whose fate was unknown there count as destroyed.
    Cleaned { node: String },
}

fn parse_by(text: &str) -> Result<Duration, String> {
    let d = protocol::spec::parse_duration(text)?;
    if d.as_secs() == 0 {
        return Err("must be at least one second".into());
    }
    Ok(d)
}

/// An error with its exit code and, when there is one, what to do.
struct Failure {
    message: String,
    hint: Option<String>,
    code: i32,
}

impl Failure {
    fn usage(message: impl Into<String>, hint: Option<&str>) -> Self {
        Failure {
            message: message.into(),
            hint: hint.map(str::to_string),
            code: 2,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure {
            message: coordinator::report::one_line(&e),
            hint: e.hint().map(str::to_string),
            code: if e.is_usage() { 2 } else { 1 },
        }
    }
}

/// Writes to stdout; a closed pipe (`workspace list | head -1`) ends the
/// program quietly, as it does for other Unix tools.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let r = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.write_all(b"\n"))
        .and_then(|_| stdout.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("workspace: writing to stdout: {e}");
        std::process::exit(1);
    }
}

fn out_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(text) => out(&text),
        Err(e) => {
            eprintln!("workspace: encoding JSON: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "workspace", &mut buf);
            out(String::from_utf8_lossy(&buf).trim_end());
            0
        }
        Cmd::Man { ref dir } => match write_man_pages(dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("workspace: {e}");
                1
            }
        },
        _ => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("workspace: starting the async runtime: {e}");
                    std::process::exit(1);
                }
            };
            match rt.block_on(run(cli)) {
                Ok(code) => code,
                Err(f) => {
                    eprintln!("workspace: {}", f.message);
                    if let Some(h) = f.hint {
                        eprintln!("hint: {h}");
                    }
                    f.code
                }
            }
        }
    };
    std::process::exit(code);
}

fn write_man_pages(dir: &Path) -> Result<(), String> {
    for path in coordinator::manpages::write(Cli::command(), dir)? {
        out(&path.display().to_string());
    }
    Ok(())
}

/// Flags, else environment (clap did both), else the config file.
fn connect(cli: &Cli) -> Result<Client, Failure> {
    let (path, required) = match &cli.config {
        Some(p) => (Some(p.clone()), true),
        None => (ClientConfig::default_path(), false),
    };
    let file = match &path {
        Some(p) => ClientConfig::load(p, required)
            .map_err(|e| Failure::usage(coordinator::report::one_line(&e), None))?,
        None => None,
    }
    .unwrap_or_default();
    if let (Some(p), Some(_)) = (&path, &file.token) {
        if ClientConfig::readable_by_others(p) {
            eprintln!(
                "workspace: warning: {} holds a token and others can read it (chmod 600 {})",
                p.display(),
                p.display()
            );
        }
    }
    let url = cli
        .url
        .clone()
        .or(file.url)
        .unwrap_or_else(|| "http://127.0.0.1:8750".into());
    let token = cli.token.clone().or(file.token).ok_or_else(|| {
        Failure::usage(
            "no token",
            Some("set WORKSPACE_TOKEN, --token, or token in ~/.config/workspace/config.toml"),
        )
    })?;
    let ca = match cli.ca_file.clone().or(file.ca_file) {
        Some(p) => Some(std::fs::read(&p).map_err(|e| {
            Failure::usage(format!("reading the CA file {}: {e}", p.display()), None)
        })?),
        None => None,
    };
    Ok(Client::with_ca(&url, &token, ca.as_deref())?)
}

/// A table with no borders, columns two spaces apart, no trailing blanks.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for col in t.column_iter_mut() {
        col.set_padding((0, 2));
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `10.77.0.2 (private), 192.0.2.3 (public)`.
fn addresses(vm: &VmView) -> String {
    if vm.nics.is_empty() {
        return "-".into();
    }
    vm.nics
        .iter()
        .map(|n| format!("{} ({})", n.ip, n.pool))
        .collect::<Vec<_>>()
        .join(", ")
}

fn host(vm: &VmView) -> String {
    vm.hostname.clone().unwrap_or_else(|| "-".into())
}

/// "in 1 h 59 min" / "5 min ago", from now.
fn from_now(ms: u64) -> String {
    let now = protocol::now_ms();
    if ms >= now {
        format!("in {}", fmt_stamp_ms(ms - now))
    } else {
        format!("{} ago", fmt_stamp_ms(now - ms))
    }
}

fn utc(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_view(v: &WorkspaceView) {
    let mut head = format!("{}  {}  {}", v.id, v.name, v.state);
    if let Some(r) = &v.reason {
        head.push_str(&format!("  ({r})"));
    }
    out(&head);
    let mut facts = vec![
        format!("owner {}", v.owner),
        format!("created {}", from_now(v.created_ms)),
    ];
    if v.state.is_terminal() {
        facts.push(format!("ended {}", from_now(v.updated_ms)));
    } else if let Some(exp) = v.expires_ms {
        facts.push(format!("lease ends {} ({})", from_now(exp), utc(exp)));
    } else if matches!(
        v.state,
        WorkspaceState::Suspending | WorkspaceState::Suspended | WorkspaceState::Resuming
    ) {
        facts.push("lease clock stopped while suspended".into());
    }
    if v.state.is_terminal() && !v.settled {
        facts.push("not settled yet: slots are still being given back".into());
    }
    out(&format!("  {}", facts.join("; ")));
    if v.kind != protocol::spec::LeaseKind::BestEffort {
        let mut lease = format!("  {} lease", v.kind);
        if let Some(start) = v.start_ms {
            lease.push_str(&format!("; starts {} ({})", from_now(start), utc(start)));
        }
        if let Some(r) = &v.reservation {
            lease.push_str(&format!("; batch system reservation {r}"));
        }
        out(&lease);
    }
    let guaranteed = v.vms.iter().any(|vm| vm.start_offset_ms.is_some());
    let rows = v
        .vms
        .iter()
        .map(|vm| {
            let mut row = vec![
                host(vm),
                vm.group.clone(),
                vm.state.as_str().to_string(),
                addresses(vm),
                vm.node.clone().unwrap_or_else(|| "-".into()),
                vm.job_id.clone().unwrap_or_else(|| "-".into()),
                vm.memory_mb.to_string(),
                vm.cpus.to_string(),
                vm.name.clone(),
            ];
            if guaranteed {
                row.push(vm.start_offset_ms.map_or("-".into(), early_late));
            }
            row
        })
        .collect();
    let mut header = vec![
        "HOST",
        "GROUP",
        "STATE",
        "ADDRESSES",
        "NODE",
        "JOB",
        "MB",
        "CPUS",
        "VM NAME",
    ];
    if guaranteed {
        header.push("AT START");
    }
    out(&table(&header, rows));
    for vm in &v.vms {
        if let Some(p) = &vm.cap_lift_pending {
            let next = p.next_ms.map_or("a try is out".into(), |n| {
                format!("next try {}", from_now(n))
            });
            out(&format!(
                "  VM {} ({}): capped: lift pending since {} ({}); {} failed tr{}, last: {}; {next}",
                vm.id,
                host(vm),
                utc(p.since_ms),
                from_now(p.since_ms),
                p.failures,
                if p.failures == 1 { "y" } else { "ies" },
                p.reason
            ));
        }
    }
}

/// A VM's running time against its lease's start: `12.3 s early`, `850 ms late`.
fn early_late(offset_ms: i64) -> String {
    let word = if offset_ms <= 0 { "early" } else { "late" };
    format!("{} {word}", fmt_stamp_ms(offset_ms.unsigned_abs()))
}

/// `workspace admin nodes`: the summary, nodes, slots, then what to clean.
fn print_cluster(c: &protocol::admin::ClusterView) {
    let live: Vec<String> = c
        .workspaces
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    out(&format!(
        "{} batch system: {} node(s) of {} core(s), {} MB; {} in use; workspaces: {}",
        c.batch_system,
        c.capacity.nodes,
        c.capacity.cores_per_node,
        c.capacity.memory_mb_per_node,
        c.nodes.iter().filter(|n| n.state == "in_use").count(),
        if live.is_empty() {
            "none".into()
        } else {
            live.join(", ")
        }
    ));
    out("");
    let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    out(&table(
        &["NODE", "STATE", "VMS", "VM MB", "SLOTS"],
        c.nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.state.clone(),
                    n.vms.to_string(),
                    n.vm_memory_mb.to_string(),
                    dash(
                        n.slots
                            .iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ]
            })
            .collect(),
    ));
    out("");
    out(&table(
        &[
            "SLOT",
            "WORKSPACE",
            "OWNER",
            "STATE",
            "JOB",
            "REASON",
            "PILOTS",
        ],
        c.slots
            .iter()
            .map(|s| {
                vec![
                    s.id.to_string(),
                    s.workspace_id.to_string(),
                    s.owner.clone(),
                    s.state.as_str().to_string(),
                    match &s.job_id {
                        Some(j) => format!("{j} ({})", s.job_state),
                        None => s.job_state.clone(),
                    },
                    s.queue_reason.clone().unwrap_or_else(|| "-".into()),
                    dash(
                        s.pilots
                            .iter()
                            .map(|p| format!("{}:{}", p.node, p.state))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ]
            })
            .collect(),
    ));
    if !c.needs_kill_all.is_empty() {
        out("");
        out("Nodes that need kill-all (run as root on the node, then `workspace admin cleaned NODE`):");
        for k in &c.needs_kill_all {
            out(&format!(
                "  {}: {} (workspace {}, {} unknown VM(s))\n    {}",
                k.node,
                k.why,
                k.workspace_id,
                k.unknown_vms.len(),
                k.command
            ));
        }
    }
}

/// `workspace admin pool` for people.
fn print_pool(p: &coordinator::engine::pool::PoolView) {
    use coordinator::engine::pool::PoolSlotState;
    if !p.enabled {
        out("No slot pool: [pool] min_idle_nodes is 0 in the coordinator's config.");
    } else {
        out(&format!(
            "Slot pool: at least {} idle, at most {} node(s) ({}% of the cluster at most); idle slots given back after {} s; {} MB held while idle; pool jobs of {} s",
            p.min_idle_nodes,
            p.max_nodes,
            (p.max_share * 100.0).round(),
            p.idle_timeout_s,
            p.idle_memory_mb,
            p.walltime_s
        ));
    }
    let count = |s: PoolSlotState| p.slots.iter().filter(|x| x.state == s).count();
    out(&format!(
        "{} idle, {} bound, {} growing, {} draining",
        count(PoolSlotState::Idle),
        count(PoolSlotState::Bound),
        count(PoolSlotState::Growing),
        count(PoolSlotState::Draining)
    ));
    for w in &p.warm {
        out(&format!(
            "warm image {:?}: snapshot {} {} ({} MB, made on {}){}",
            w.image,
            w.checkpoint,
            w.state,
            w.memory_mb,
            w.node,
            w.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
    }
    if p.slots.is_empty() {
        return;
    }
    out("");
    let secs = |ms: u64| format!("{} s", ms / 1000);
    out(&table(
        &[
            "SLOT",
            "NODE",
            "STATE",
            "JOB",
            "IDLE FOR",
            "WALLTIME LEFT",
            "LEASE",
            "LEASES SERVED",
        ],
        p.slots
            .iter()
            .map(|s| {
                vec![
                    s.slot_id.to_string(),
                    s.node.clone().unwrap_or_else(|| "-".into()),
                    match s.phase.as_str() {
                        "free" | "bound" => s.state.as_str().to_string(),
                        phase => format!("{} ({phase})", s.state.as_str()),
                    },
                    s.job_id.clone().unwrap_or_else(|| "-".into()),
                    if s.state == PoolSlotState::Idle {
                        secs(p.now_ms.saturating_sub(s.since_ms))
                    } else {
                        "-".into()
                    },
                    s.deadline_ms
                        .map(|d| secs(d.saturating_sub(p.now_ms)))
                        .unwrap_or_else(|| "-".into()),
                    s.bound_to
                        .as_ref()
                        .map(|w| w.to_string())
                        .unwrap_or_else(|| "-".into()),
                    s.leases.to_string(),
                ]
            })
            .collect(),
    ));
}

/// `head-0 10.77.0.5, worker-0 10.77.0.2, ... (+N)`: the first address of
/// each VM that has one, at most four.
fn list_addresses(v: &WorkspaceView) -> String {
    let all: Vec<String> = v
        .vms
        .iter()
        .filter_map(|vm| vm.nics.first().map(|n| format!("{} {}", host(vm), n.ip)))
        .collect();
    if all.is_empty() {
        return "-".into();
    }
    let shown = all.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > 4 {
        format!("{shown}, ... (+{})", all.len() - 4)
    } else {
        shown
    }
}

/// How progress is shown on stderr: a spinner on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_status: String,
    t0: Option<u64>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            last_status: String::new(),
            t0: None,
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// New timeline entries, in time order, relative to the first seen.
    fn entries(&mut self, mut es: Vec<TimelineEntry>) {
        in_time_order(&mut es);
        for e in &es {
            let t0 = *self.t0.get_or_insert(e.ts_ms);
            self.line(&format_entry(e, t0));
        }
    }

    /// The state and VM count: the spinner's message, or a line when it changed.
    fn status(&mut self, v: &WorkspaceView, started: Instant) {
        let running = v
            .vms
            .iter()
            .filter(|vm| vm.state == VmState::Running)
            .count();
        let mut status = format!("{}: {}/{} VMs running", v.state, running, v.vms.len());
        if let (WorkspaceState::Pending, Some(why)) = (v.state, &v.reason) {
            status.push_str(&format!(" ({why})"));
        }
        match &self.bar {
            Some(b) => b.set_message(format!(
                "{status}, {}",
                fmt_stamp_ms(started.elapsed().as_millis() as u64)
            )),
            None if status != self.last_status => eprintln!("{status}"),
            None => {}
        }
        self.last_status = status;
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// How a wait ended.
enum Waited {
    Done(WorkspaceView),
    TimedOut(WorkspaceView),
    Interrupted(WorkspaceView),
}

/// Follows the event stream after `after` until `done`, the timeout, or Ctrl-C.
async fn wait(
    client: &Client,
    id: &str,
    mut after: u64,
    timeout: Duration,
    progress: &mut Progress,
    done: impl Fn(&WorkspaceView) -> bool,
) -> Result<Waited, ClientError> {
    let started = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let step = async {
            let page = client
                .events(id, after, left.min(Duration::from_secs(2)))
                .await?;
            let v = client.get(id).await?;
            Ok::<_, ClientError>((page, v))
        };
        let (page, v) = tokio::select! {
            r = step => r?,
            _ = &mut ctrl_c => {
                progress.finish();
                return Ok(Waited::Interrupted(client.get(id).await?));
            }
        };
        if let Some(last) = page.events.last() {
            after = last.seq;
        }
        progress.entries(page.events);
        progress.status(&v, started);
        if done(&v) {
            progress.finish();
            return Ok(Waited::Done(v));
        }
        if started.elapsed() >= timeout {
            progress.finish();
            return Ok(Waited::TimedOut(v));
        }
    }
}

/// After a suspend or resume: the view, or (`--wait`) progress until `done`;
/// exit 0 when it ended `wanted`, 3 when not, 4 on timeout.
#[allow(clippy::too_many_arguments)]
async fn change(
    client: &Client,
    id: &str,
    v: WorkspaceView,
    w: bool,
    after: u64,
    timeout: u64,
    json: bool,
    done: impl Fn(&WorkspaceView) -> bool,
    wanted: impl Fn(&WorkspaceView) -> bool,
) -> Result<i32, Failure> {
    if !w {
        if json {
            out_json(&v);
        } else {
            print_view(&v);
        }
        return Ok(0);
    }
    let mut progress = Progress::new(false);
    let waited = wait(
        client,
        id,
        after,
        Duration::from_secs(timeout),
        &mut progress,
        done,
    )
    .await?;
    let (v, code, left) = match waited {
        Waited::Done(v) => {
            let code = if wanted(&v) { 0 } else { 3 };
            (v, code, None)
        }
        Waited::TimedOut(v) => {
            let how = format!("still {} after {timeout} s", v.state);
            (v, 4, Some(how))
        }
        Waited::Interrupted(v) => (v, 130, Some("stopped waiting".to_string())),
    };
    if json {
        out_json(&v);
    } else {
        print_view(&v);
    }
    if let Some(how) = left {
        still_going(&v, &how);
    } else if code == 3 {
        eprintln!(
            "workspace: {} is {}{}",
            v.id,
            v.state,
            v.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    Ok(code)
}

/// The suspend and resume entries of a timeline (bytes saved, time each took).
fn print_suspensions(events: &[TimelineEntry]) {
    use protocol::view::Phase as P;
    let mut es: Vec<TimelineEntry> = events
        .iter()
        .filter(|e| {
            matches!(
                e.phase,
                P::Suspending
                    | P::VmSuspended
                    | P::SuspendFailed
                    | P::Suspended
                    | P::Resuming
                    | P::VmResumed
                    | P::ResumeFailed
                    | P::CheckpointDeleted
            )
        })
        .cloned()
        .collect();
    if es.is_empty() {
        return;
    }
    in_time_order(&mut es);
    let t0 = es[0].ts_ms;
    out(&format!("suspend and resume (from {}):", utc(t0)));
    for e in &es {
        out(&format!("  {}", format_entry(e, t0)));
    }
}

/// Says (on stderr) what a workspace a wait left behind is doing, and how
/// to act on it.
fn still_going(v: &WorkspaceView, how: &str) {
    let doing = match v.state {
        WorkspaceState::Pending => "is still queued in the batch system",
        WorkspaceState::Starting => "is still starting its VMs",
        WorkspaceState::Destroying => "is still giving its slots back",
        WorkspaceState::Suspending => "is still saving its VMs",
        WorkspaceState::Suspended => "is suspended (`workspace resume` brings it back)",
        WorkspaceState::Resuming => "is still waiting for new slots or restoring its VMs",
        s if s.is_terminal() => "has ended but still holds slots being given back",
        _ => "goes on",
    };
    eprintln!("workspace: {how}: {} {doing} (state {})", v.id, v.state);
    eprintln!(
        "hint: follow it with `workspace watch {id}`; give it up with `workspace destroy {id}`",
        id = v.id
    );
}

/// The largest timeline seq so far (to show only what comes after).
async fn last_seq(client: &Client, id: &str) -> Result<u64, ClientError> {
    let page = client.events(id, 0, Duration::ZERO).await?;
    Ok(page.events.iter().map(|e| e.seq).max().unwrap_or(0))
}

fn read_spec(file: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(file)
        .map_err(|e| Failure::usage(format!("reading {}: {e}", file.display()), None))
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let client = connect(&cli)?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Create {
            file,
            wait: w,
            timeout,
            quiet,
            idempotency_key,
            retry_for,
        } => {
            let text = read_spec(&file)?;
            let key = idempotency_key.unwrap_or_else(coordinator::client::new_idempotency_key);
            let retried = |e: &ClientError, left: Duration| {
                eprintln!(
                    "workspace: {}; sending the create again with the same key ({} s left)",
                    coordinator::report::one_line(e),
                    left.as_secs()
                );
            };
            let created = client
                .create_retrying(&text, &key, Duration::from_secs(retry_for), retried)
                .await;
            let v = match created {
                Ok(v) => v,
                Err(e @ ClientError::Unreachable { .. }) => {
                    let mut f = Failure::from(e);
                    f.hint = Some(format!(
                        "the workspace may have been created: `workspace create --file {} --idempotency-key {key}` answers with it if it was, and creates it if not",
                        file.display()
                    ));
                    return Err(f);
                }
                Err(e) => return Err(e.into()),
            };
            // The id first, before any wait, as sbatch does: whatever
            // happens next, the user knows what to destroy.
            if quiet {
                out(v.id.as_str());
            } else if !json {
                out(&format!(
                    "created {} ({}): {} VMs, {}",
                    v.id,
                    v.name,
                    v.vms.len(),
                    v.state
                ));
            }
            if !w {
                if json {
                    out_json(&v);
                }
                return Ok(0);
            }
            let mut progress = Progress::new(quiet);
            let waited = wait(
                &client,
                v.id.as_str(),
                0,
                Duration::from_secs(timeout),
                &mut progress,
                |v| v.state == WorkspaceState::Running || v.state.is_terminal(),
            )
            .await?;
            let (v, code, left) = match waited {
                Waited::Done(v) => {
                    let code = if v.state == WorkspaceState::Running {
                        0
                    } else {
                        3
                    };
                    (v, code, None)
                }
                Waited::TimedOut(v) => (v, 4, Some(format!("not running after {timeout} s"))),
                Waited::Interrupted(v) => (v, 130, Some("stopped waiting".to_string())),
            };
            if json {
                out_json(&v);
            } else if !quiet {
                print_view(&v);
            }
            if let Some(how) = left {
                still_going(&v, &how);
            } else if code == 3 && !json {
                eprintln!(
                    "workspace: {} ended {}{}",
                    v.id,
                    v.state,
                    v.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
            }
            Ok(code)
        }
        Cmd::Renew { id, by } => {
            let v = client.renew(&id, by).await?;
            if json {
                out_json(&v);
            } else {
                let ends = v
                    .expires_ms
                    .map(|e| format!("{} ({})", from_now(e), utc(e)))
                    .unwrap_or_else(|| "-".into());
                out(&format!("renewed {}: lease ends {ends}", v.id));
            }
            Ok(0)
        }
        Cmd::Admin(AdminCmd::Nodes) => {
            let c = client.cluster().await?;
            if json {
                out_json(&c);
            } else {
                print_cluster(&c);
            }
            Ok(0)
        }
        Cmd::Admin(AdminCmd::Pool) => {
            let p = client.pool().await?;
            if json {
                out_json(&p);
            } else {
                print_pool(&p);
            }
            Ok(0)
        }
        Cmd::Admin(AdminCmd::Cleaned { node }) => {
            let a = client.node_cleaned(&node).await?;
            if json {
                out_json(&a);
            } else {
                out(&format!(
                    "{}: {} pilot record(s) settled, {} unknown VM(s) counted destroyed",
                    a.node,
                    a.pilots,
                    a.vms.len()
                ));
            }
            Ok(0)
        }
        Cmd::Status { id } => {
            let v = client.get(&id).await?;
            if json {
                out_json(&v);
            } else {
                print_view(&v);
                print_suspensions(&client.events(&id, 0, Duration::ZERO).await?.events);
            }
            Ok(0)
        }
        Cmd::Suspend {
            id,
            wait: w,
            timeout,
        } => {
            let after = if w { last_seq(&client, &id).await? } else { 0 };
            let v = client.suspend(&id).await?;
            let done = |v: &WorkspaceView| v.state != WorkspaceState::Suspending;
            let wanted = |v: &WorkspaceView| v.state == WorkspaceState::Suspended;
            change(&client, &id, v, w, after, timeout, json, done, wanted).await
        }
        Cmd::Resume {
            id,
            wait: w,
            timeout,
        } => {
            let after = if w { last_seq(&client, &id).await? } else { 0 };
            let v = client.resume(&id).await?;
            let done = |v: &WorkspaceView| v.state != WorkspaceState::Resuming;
            let wanted = |v: &WorkspaceView| v.state == WorkspaceState::Running;
            change(&client, &id, v, w, after, timeout, json, done, wanted).await
        }
        Cmd::List => {
            let l = client.list().await?;
            if json {
                out_json(&l);
            } else {
                let rows = l
                    .workspaces
                    .iter()
                    .map(|v| {
                        vec![
                            v.id.to_string(),
                            v.name.clone(),
                            v.state.to_string(),
                            v.vms.len().to_string(),
                            v.owner.clone(),
                            v.expires_ms
                                .filter(|_| !v.state.is_terminal())
                                .map(from_now)
                                .unwrap_or_else(|| "-".into()),
                            list_addresses(v),
                        ]
                    })
                    .collect();
                out(&table(
                    &[
                        "ID",
                        "NAME",
                        "STATE",
                        "VMS",
                        "OWNER",
                        "LEASE ENDS",
                        "ADDRESSES",
                    ],
                    rows,
                ));
            }
            Ok(0)
        }
        Cmd::Destroy {
            id,
            wait: w,
            timeout,
        } => {
            let after = if w { last_seq(&client, &id).await? } else { 0 };
            let v = client.destroy(&id).await?;
            if !w {
                if json {
                    out_json(&v);
                } else {
                    print_view(&v);
                }
                return Ok(0);
            }
            let mut progress = Progress::new(false);
            let waited = wait(
                &client,
                &id,
                after,
                Duration::from_secs(timeout),
                &mut progress,
                |v| v.settled,
            )
            .await?;
            let (v, code, left) = match waited {
                Waited::Done(v) => (v, 0, None),
                Waited::TimedOut(v) => (v, 4, Some(format!("not settled after {timeout} s"))),
                Waited::Interrupted(v) => (v, 130, Some("stopped waiting".to_string())),
            };
            if json {
                out_json(&v);
            } else {
                print_view(&v);
            }
            if let Some(how) = left {
                still_going(&v, &how);
            }
            Ok(code)
        }
        Cmd::Watch { id } => {
            let mut after = 0;
            let mut t0 = None;
            loop {
                let page = client.events(&id, after, Duration::from_secs(20)).await?;
                let mut es = page.events;
                if let Some(last) = es.iter().map(|e| e.seq).max() {
                    after = last;
                }
                in_time_order(&mut es);
                for e in &es {
                    if json {
                        match serde_json::to_string(e) {
                            Ok(line) => out(&line),
                            Err(err) => eprintln!("workspace: encoding JSON: {err}"),
                        }
                    } else {
                        let base = *t0.get_or_insert(e.ts_ms);
                        out(&format_entry(e, base));
                    }
                }
                if page.settled {
                    if !json {
                        out(&format!("settled: {}", page.state));
                    }
                    return Ok(0);
                }
            }
        }
        Cmd::Ssh {
            id,
            vm,
            user,
            print,
            ssh_args,
        } => {
            let v = client.get(&id).await?;
            ssh(&v, vm.as_deref(), user.as_deref(), print, &ssh_args)
        }
        Cmd::Completions { .. } | Cmd::Man { .. } => Ok(0),
    }
}

/// Runs (execs) ssh to a VM of `v`, or prints the command.
fn ssh(
    v: &WorkspaceView,
    which: Option<&str>,
    user: Option<&str>,
    print: bool,
    extra: &[String],
) -> Result<i32, Failure> {
    let vm = match which {
        None => v.vms.first(),
        Some(w) => v
            .vms
            .iter()
            .find(|vm| vm.hostname.as_deref() == Some(w) || vm.name == w || vm.id.as_str() == w),
    };
    let Some(vm) = vm else {
        let hosts: Vec<String> = v.vms.iter().map(host).collect();
        return Err(Failure::usage(
            format!(
                "{} has no VM {:?} (its VMs: {})",
                v.id,
                which.unwrap_or(""),
                hosts.join(", ")
            ),
            None,
        ));
    };
    if vm.state != VmState::Running {
        return Err(Failure {
            message: format!(
                "{} of {} is {}, not running",
                host(vm),
                v.id,
                vm.state.as_str()
            ),
            hint: Some(format!("`workspace status {}` shows its VMs", v.id)),
            code: 1,
        });
    }
    let nic = vm
        .nics
        .iter()
        .find(|n| n.pool == "public")
        .or_else(|| vm.nics.first());
    let Some(nic) = nic else {
        return Err(Failure {
            message: format!("{} of {} has no address", host(vm), v.id),
            hint: Some(
                "the coordinator assigns addresses only with a [network.private] or [network.public] pool; ask its admin".into(),
            ),
            code: 1,
        });
    };
    let mut args: Vec<String> = Vec::new();
    if let Some(u) = user {
        args.push("-l".into());
        args.push(u.to_string());
    }
    args.extend(extra.iter().cloned());
    args.push(nic.ip.to_string());
    let shown = std::iter::once("ssh".to_string())
        .chain(args.iter().map(|a| lrm_adapters::shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    if print {
        out(&shown);
        return Ok(0);
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("ssh").args(&args).exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        out(&shown);
        return Err(Failure {
            message: "ssh is not installed here; the command is above".into(),
            hint: Some(
                "run it where an ssh client is (the address must be reachable from there)".into(),
            ),
            code: 1,
        });
    }
    Err(Failure {
        message: format!("running ssh: {err}"),
        hint: None,
        code: 1,
    })
}
