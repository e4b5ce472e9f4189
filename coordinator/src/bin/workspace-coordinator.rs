//! `workspace-coordinator`: the head-node server (`serve`), a config check
//! (`check`), the local demo (`demo`), the trace simulator (`simulate`,
//! `replay`), a helper to mint client tokens (`token`), and its own shell
//! completions and man pages.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use coordinator::config::Config;
use std::path::{Path, PathBuf};

const EXIT_CODES: &str = "Exit codes:
  0  success (demo: every node ended with its original memory and no VM)
  1  failure (demo: a step failed or a node was not restored)
  2  bad arguments or configuration (the message names the key)

Signals (serve): SIGTERM/SIGINT stop serving and leave running leases to
their pilots (picked up on restart); SIGHUP re-reads the config's users.";

/// How `serve` writes its log lines (stderr).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald/ELK/Loki pipelines).
    Json,
}

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
        /// Log line format (level filter: RUST_LOG, default info).
        #[arg(long, value_enum, env = "WSP_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
    /// Check a config file as `serve` would, and say what it configures.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the local demo: local batch system, simulated nodes, one lease
    /// destroyed and one preempted, with a timeline.
    Demo {
        /// Virtual nodes of the local batch system.
        #[arg(long, default_value_t = 4)]
        nodes: u32,
        /// Hypervisor the pilots drive (`sim` works anywhere).
        #[arg(long, default_value = "sim")]
        hypervisor: coordinator::config::Hypervisor,
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
    /// Seed 002's experiment (issue 18): its 36 generated traces (and the
    /// shared Haizea traces) under its five configurations, through the
    /// simulator; writes results.md, results.json and utilization.svg.
    Experiment(coordinator::sim::cli::ExperimentArgs),
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
    /// Print a shell completion script for workspace-coordinator.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (workspace-coordinator.1 and one per subcommand).
    Man {
        /// Directory to write them into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn init_logs(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        // Colour codes only on a terminal: logs usually land in files.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Tells systemd (Type=notify) how we are; nothing without NOTIFY_SOCKET.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
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
            eprintln!(
                "workspace-coordinator: {}",
                coordinator::report::one_line(e.as_ref())
            );
            exit_code(&e)
        }
    };
    std::process::exit(code);
}

/// 2 when the config is at fault (as `--help` says), else 1.
fn exit_code(e: &anyhow::Error) -> i32 {
    let config = e.chain().any(|c| {
        c.downcast_ref::<coordinator::config::ConfigError>()
            .is_some()
            || c.downcast_ref::<coordinator::server::ServerError>()
                .is_some_and(|s| s.is_config())
    });
    if config {
        2
    } else {
        1
    }
}

/// Loads and checks the config as `serve` needs it.
fn load_for_serving(path: &Path) -> Result<Config, coordinator::config::ConfigError> {
    let cfg = Config::load(path)?;
    if cfg.users.is_empty() {
        return Err(coordinator::config::ConfigError::Invalid(
            "no [[users]] in the config: nobody could use the API (make one with `workspace-coordinator token --user NAME`)".into(),
        ));
    }
    Ok(cfg)
}

fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    for path in coordinator::manpages::write(Cli::command(), dir).map_err(anyhow::Error::msg)? {
        println!("{}", path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Simulate(args) => Ok(coordinator::sim::cli::simulate(args)),
        Cmd::Experiment(args) => Ok(coordinator::sim::cli::experiment(args)),
        Cmd::Replay(args) => Ok(coordinator::sim::cli::replay(args)),
        Cmd::Token { user, admin } => {
            let token = hex::encode(protocol::auth::generate_master_secret());
            println!("token: {token}");
            println!("\n# add to the coordinator's config:\n[[users]]\nname = {user:?}\ntoken_sha256 = \"{}\"\nadmin = {admin}", protocol::auth::token_hash(&token));
            Ok(0)
        }
        Cmd::Check { config } => {
            let cfg = load_for_serving(&config)?;
            println!(
                "{}: ok (lrm {:?}, hypervisor {}, {} users, listen {})",
                config.display(),
                cfg.lrm,
                cfg.pilot.hypervisor,
                cfg.users.len(),
                cfg.listen
            );
            Ok(0)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "workspace-coordinator",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Cmd::Man { dir } => {
            write_man_pages(&dir)?;
            Ok(0)
        }
        Cmd::Serve {
            config,
            end_leases_on_exit,
            end_timeout,
            log_format,
        } => {
            init_logs("info", log_format);
            let cfg = load_for_serving(&config)?;
            let rt = runtime()?;
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                // Installed before anything can take long, so that no signal
                // meets the default action (SIGHUP would kill us silently).
                let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
                let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
                let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
                let running = coordinator::server::start(cfg, None)
                    .await
                    .context("starting the coordinator")?;
                notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);
                let signal = loop {
                    tokio::select! {
                        _ = int.recv() => break "SIGINT",
                        _ = term.recv() => break "SIGTERM",
                        _ = hup.recv() => {
                            let mut states = vec![sd_notify::NotifyState::Reloading];
                            if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                                states.push(now);
                            }
                            notify(&states);
                            match coordinator::server::reload(&running.engine, &config) {
                                Ok(r) => {
                                    tracing::info!(
                                        config = %config.display(),
                                        users = r.users,
                                        added = ?r.added,
                                        removed = ?r.removed,
                                        "SIGHUP: users reloaded"
                                    );
                                    if !r.needs_restart.is_empty() {
                                        tracing::warn!(changed = ?r.needs_restart, "SIGHUP: these settings changed but take effect only on restart");
                                    }
                                }
                                Err(e) => tracing::error!(
                                    error = %coordinator::report::one_line(&e),
                                    "SIGHUP: config not reloaded; the running one stays"
                                ),
                            }
                            notify(&[sd_notify::NotifyState::Ready]);
                        }
                    }
                };
                notify(&[sd_notify::NotifyState::Stopping]);
                tracing::info!(signal, "stopping");
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
                    running.stop().await;
                } else {
                    tracing::info!("stopping: running leases stay with their pilots and are picked up on restart");
                    running.stop_leaving_leases().await;
                }
                Ok::<_, anyhow::Error>(0)
            })
        }
        Cmd::Demo {
            nodes,
            hypervisor,
            keep,
            log,
        } => {
            init_logs(&log, LogFormat::Text);
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
