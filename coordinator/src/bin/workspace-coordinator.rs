//! `workspace-coordinator`: the head-node server (`serve`), the local demo
//! (`demo`), the trace simulator (`simulate`, `replay`), and a helper to
//! mint client tokens (`token`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use coordinator::config::Config;
use std::path::PathBuf;

const EXIT_CODES: &str = "Exit codes:
  0  success (demo: every node ended with its original memory and no VM)
  1  failure (demo: a step failed or a node was not restored)
  2  bad arguments or configuration";

#[derive(Parser)]
#[command(name = "workspace-coordinator", version, about = "Workspace pilot coordinator: VM leases through the batch system", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the client and pilot HTTP APIs.
    Serve {
        /// Server config (TOML). See docs/coordinator.example.toml.
        #[arg(long)]
        config: PathBuf,
        /// On SIGTERM/SIGINT, end every lease (destroy, release, cancel jobs)
        /// and wait for them to settle before exiting. Default: leave running
        /// leases with their pilots; a restarted coordinator picks them up.
        #[arg(long)]
        end_leases_on_exit: bool,
        /// Longest wait for leases to settle with --end-leases-on-exit, seconds.
        #[arg(long, default_value_t = 120)]
        end_timeout: u64,
    },
    /// Run the local demo: local batch system, simulated nodes, one lease
    /// destroyed and one preempted, with a timeline.
    Demo {
        /// Virtual nodes of the local batch system.
        #[arg(long, default_value_t = 4)]
        nodes: u32,
        /// Hypervisor the pilots drive (`sim` works anywhere).
        #[arg(long, default_value = "sim")]
        hypervisor: String,
        /// Keep the working directory (database, job logs, node states).
        #[arg(long)]
        keep: bool,
        /// Show the coordinator's and pilots' logs (RUST_LOG syntax).
        #[arg(long, default_value = "warn")]
        log: String,
    },
    /// Replay a workload trace (SWF or Haizea) through this coordinator's own
    /// engine and rules in virtual time, with the batch system and nodes
    /// modelled; prints utilization, waits, slowdown and what ended how.
    /// Exit 0: complete run; 1: cut short or failed; 2: bad trace, config or flag.
    Simulate(coordinator::sim::cli::SimulateArgs),
    /// Send a trace's requests to a running coordinator at their (scaled)
    /// times and record when each lease ran: the simulator's check.
    /// Exit 0: every lease settled; 1: not; 2: bad trace, config or flag.
    Replay(coordinator::sim::cli::ReplayArgs),
    /// Print a new random client token and the [[users]] entry that admits it.
    Token {
        /// User name the token belongs to.
        #[arg(long)]
        user: String,
        /// Give the user the admin role (sees every workspace).
        #[arg(long)]
        admin: bool,
    },
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs usually land in files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The async runtime; its threads are named so `top -H` and profiles tell
/// the coordinator's work apart (pilots' threads are `tokio-rt-worker`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wsp-coordinator")
        .build()
        .context("starting the async runtime")
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("workspace-coordinator: {e:#}");
            e.downcast_ref::<coordinator::config::ConfigError>()
                .map_or(1, |_| 2)
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Simulate(args) => Ok(coordinator::sim::cli::simulate(args)),
        Cmd::Replay(args) => Ok(coordinator::sim::cli::replay(args)),
        Cmd::Token { user, admin } => {
            let token = hex::encode(protocol::auth::generate_master_secret());
            println!("token: {token}");
            println!("\n# add to the coordinator's config:\n[[users]]\nname = {user:?}\ntoken_sha256 = \"{}\"\nadmin = {admin}", protocol::auth::token_hash(&token));
            Ok(0)
        }
        Cmd::Serve {
            config,
            end_leases_on_exit,
            end_timeout,
        } => {
            init_logs("info");
            let cfg = Config::load(&config)?;
            if cfg.users.is_empty() {
                anyhow::bail!(coordinator::config::ConfigError::Invalid(
                    "no [[users]] in the config: nobody could use the API (make one with `workspace-coordinator token --user NAME`)".into()
                ));
            }
            let rt = runtime()?;
            rt.block_on(async {
                let running = coordinator::server::start(cfg, None).await?;
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if end_leases_on_exit {
                    let ended = running.engine.end_all()?;
                    tracing::info!(workspaces = ended.len(), "stopping: ending every lease first");
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(end_timeout);
                    loop {
                        let left = running.engine.unsettled()?;
                        if left == 0 {
                            tracing::info!("every lease settled");
                            break;
                        }
                        if std::time::Instant::now() > deadline {
                            tracing::error!(unsettled = left, "leases not settled in time; they are picked up on restart");
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                } else {
                    tracing::info!("stopping: running leases stay with their pilots and are picked up on restart (local batch system: its jobs end with it)");
                }
                running.stop().await;
                Ok::<_, anyhow::Error>(0)
            })
        }
        Cmd::Demo {
            nodes,
            hypervisor,
            keep,
            log,
        } => {
            init_logs(&log);
            let rt = runtime()?;
            let ok = rt.block_on(coordinator::demo::run(coordinator::demo::DemoOptions {
                nodes,
                hypervisor,
                keep,
            }))?;
            Ok(if ok { 0 } else { 1 })
        }
    }
}
