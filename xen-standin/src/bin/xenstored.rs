//! `wsp-xenstored-standin`: a xenstored on a unix socket with a simulated
//! dom0 balloon, for tests of the `xen` driver on machines without Xen.
//! Runs until killed. See the crate docs for what it models.

use clap::Parser;
use std::path::PathBuf;
use xen_standin::server::{serve, NodeSpec};

/// Serve the xenstore protocol on a unix socket, with a simulated balloon.
#[derive(Parser)]
#[command(name = "wsp-xenstored-standin", version)]
struct Cli {
    /// Unix socket to listen on (a stale file there is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Physical memory of the node, MB.
    #[arg(long, default_value_t = 4096)]
    total_mb: u64,
    /// dom0's memory at start, MB (default: all).
    #[arg(long)]
    dom0_mb: Option<u64>,
    /// dom0's static max, MB (default: total).
    #[arg(long)]
    max_mb: Option<u64>,
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Time the balloon takes to reach a new target, ms.
    #[arg(long, default_value_t = 0)]
    balloon_delay_ms: u64,
    /// The balloon never shrinks dom0 below this, MB (a stuck balloon).
    #[arg(long)]
    balloon_floor_mb: Option<u64>,
    /// Dump the tree as JSON to this file after every change.
    #[arg(long)]
    state_json: Option<PathBuf>,
}

fn main() {
    let c = Cli::parse();
    let spec = NodeSpec {
        total_mb: c.total_mb,
        dom0_mb: c.dom0_mb.unwrap_or(c.total_mb).min(c.total_mb),
        max_mb: c.max_mb.unwrap_or(c.total_mb),
        cpus: c.cpus,
        balloon_delay_ms: c.balloon_delay_ms,
        balloon_floor_mb: c.balloon_floor_mb,
        state_json: c.state_json,
    };
    if let Err(e) = serve(&c.socket, &spec) {
        eprintln!("wsp-xenstored-standin: {}: {e}", c.socket.display());
        std::process::exit(1);
    }
}
