//! `workspace`: the client. Create, inspect, list, watch and destroy
//! workspaces on a coordinator.

use anyhow::Context;
use clap::{Parser, Subcommand};
use coordinator::client::{Client, ClientError};
use coordinator::timeline::{fmt_ms, format_entry};
use protocol::view::{WorkspaceState, WorkspaceView};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const EXIT_CODES: &str = "Exit codes:
  0  success
  1  the coordinator refused or could not be reached (message on stderr)
  2  bad arguments
  3  --wait: the workspace ended failed, preempted or expired instead
  4  --wait: timed out";

#[derive(Parser)]
#[command(name = "workspace", version, about = "Lease virtual clusters from a workspace coordinator", after_help = EXIT_CODES)]
struct Cli {
    /// Coordinator URL.
    #[arg(long, env = "WORKSPACE_URL", default_value = "http://127.0.0.1:8750")]
    url: String,
    /// Bearer token.
    #[arg(long, env = "WORKSPACE_TOKEN", hide_env_values = true)]
    token: String,
    /// CA certificate (PEM) of an https coordinator.
    #[arg(long, env = "WORKSPACE_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a workspace from a spec file (TOML, or JSON).
    Create {
        #[arg(long)]
        file: PathBuf,
        /// Wait until every VM runs (shows progress).
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show one workspace.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List your workspaces (all of them for admins).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Destroy a workspace.
    Destroy {
        id: String,
        /// Wait until every slot is given back.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Follow a workspace's timeline until it settles.
    Watch { id: String },
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("workspace: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(cli)).unwrap_or_else(|e| {
        eprintln!("workspace: {e:#}");
        1
    });
    std::process::exit(code);
}

fn print_view(v: &WorkspaceView) {
    println!(
        "{}  {}  {}{}",
        v.id,
        v.name,
        v.state,
        v.reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "  {:<34} {:<10} {:<10} {:<10} {:>7} {:<10}",
        "VM", "GROUP", "NODE", "JOB", "MB", "STATE"
    );
    for vm in &v.vms {
        println!(
            "  {:<34} {:<10} {:<10} {:<10} {:>7} {:<10}",
            vm.name,
            vm.group,
            vm.node.as_deref().unwrap_or("-"),
            vm.job_id.as_deref().unwrap_or("-"),
            vm.memory_mb,
            vm.state.as_str()
        );
    }
}

/// Follows the event stream until `done`; a progress bar counts running VMs.
async fn wait(
    client: &Client,
    id: &str,
    timeout: Duration,
    done: impl Fn(&WorkspaceView) -> bool,
) -> anyhow::Result<Option<WorkspaceView>> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let mut after = 0;
    loop {
        let page = client.events(id, after, Duration::from_secs(2)).await?;
        for e in &page.events {
            after = e.seq;
            bar.println(format!(
                "  {} {} {}",
                e.phase.as_str(),
                e.node.as_deref().unwrap_or(""),
                e.detail
            ));
        }
        let v = client.get(id).await?;
        let running = v
            .vms
            .iter()
            .filter(|vm| vm.state == protocol::view::VmState::Running)
            .count();
        bar.set_message(format!(
            "{}: {}/{} VMs running, {:.1} s",
            v.state,
            running,
            v.vms.len(),
            started.elapsed().as_secs_f64()
        ));
        if done(&v) {
            bar.finish_and_clear();
            return Ok(Some(v));
        }
        if started.elapsed() > timeout {
            bar.finish_and_clear();
            return Ok(None);
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let ca = match &cli.ca_file {
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("reading --ca-file {}", p.display()))?)
        }
        None => None,
    };
    let client = Client::with_ca(&cli.url, &cli.token, ca.as_deref())?;
    match cli.cmd {
        Cmd::Create {
            file,
            wait: w,
            timeout,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let v = client.create(&text).await.map_err(explain)?;
            let v = if w {
                match wait(&client, v.id.as_str(), Duration::from_secs(timeout), |v| {
                    v.state == WorkspaceState::Running || v.state.is_terminal()
                })
                .await?
                {
                    Some(v) => v,
                    None => {
                        eprintln!("workspace: {} not running after {timeout} s", v.id);
                        return Ok(4);
                    }
                }
            } else {
                v
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_view(&v);
            }
            Ok(if w && v.state != WorkspaceState::Running {
                3
            } else {
                0
            })
        }
        Cmd::Status { id, json } => {
            let v = client.get(&id).await.map_err(explain)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_view(&v);
            }
            Ok(0)
        }
        Cmd::List { json } => {
            let l = client.list().await.map_err(explain)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                println!(
                    "{:<12} {:<20} {:<11} {:>4} {:<8}",
                    "ID", "NAME", "STATE", "VMS", "OWNER"
                );
                for v in &l.workspaces {
                    println!(
                        "{:<12} {:<20} {:<11} {:>4} {:<8}",
                        v.id,
                        v.name,
                        v.state,
                        v.vms.len(),
                        v.owner
                    );
                }
            }
            Ok(0)
        }
        Cmd::Destroy {
            id,
            wait: w,
            timeout,
            json,
        } => {
            let t = Instant::now();
            let mut v = client.destroy(&id).await.map_err(explain)?;
            if w {
                match wait(&client, &id, Duration::from_secs(timeout), |v| v.settled).await? {
                    Some(done) => v = done,
                    None => {
                        eprintln!("workspace: {id} not settled after {timeout} s");
                        return Ok(4);
                    }
                }
                eprintln!("settled in {}", fmt_ms(t.elapsed().as_secs_f64() * 1000.0));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_view(&v);
            }
            Ok(0)
        }
        Cmd::Watch { id } => {
            let mut after = 0;
            let mut t0 = None;
            loop {
                let page = client
                    .events(&id, after, Duration::from_secs(20))
                    .await
                    .map_err(explain)?;
                for e in &page.events {
                    let base = *t0.get_or_insert(e.ts_ms);
                    println!("{}", format_entry(e, base));
                    after = e.seq;
                }
                if page.settled {
                    println!("settled: {}", page.state);
                    return Ok(0);
                }
            }
        }
    }
}

fn explain(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!(e)
}
