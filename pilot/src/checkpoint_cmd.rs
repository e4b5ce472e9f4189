//! `workspace-pilot checkpoint` (part of the binary, not the library): an
//! admin's view of the checkpoint store a node config names.
//!
//! `list` shows every checkpoint (complete with its size, node and digest,
//! or unfinished with its writer); `verify` re-hashes one against its
//! manifest; `delete` removes one. For sites whose coordinator cannot reach
//! a pilot to delete a checkpoint, and for looking before deleting.
//! Exit codes: 0 ok, 1 verification or deletion failed, 2 usage.

use clap::{Args, Subcommand};
use pilot::checkpoint::{ListedState, Store};
use pilot::hypervisor::NodeConfig;
use pilot::node::{expand_node, node_name};
use protocol::pilot::CheckpointId;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// Every checkpoint in the store, complete or unfinished.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// One JSON array on stdout instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every file of a checkpoint against its manifest (exit 1 if any differs).
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// ws-…/vm-…/g<generation>
        id: CheckpointId,
        /// The manifest digest the suspend reported (checked too when given).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Remove a checkpoint (refused while a pilot is writing it).
    Delete {
        #[command(flatten)]
        store: StoreArgs,
        /// ws-…/vm-…/g<generation>
        id: CheckpointId,
    },
}

#[derive(Args)]
pub struct StoreArgs {
    /// Node configuration whose `[checkpoints] dir` is the store (`%n` = node name).
    #[arg(long, conflicts_with = "store")]
    node_config: Option<String>,
    /// The store directory itself.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Node name, for `%n` (default: $WSP_NODE, $SLURMD_NODENAME, hostname).
    #[arg(long)]
    node: Option<String>,
}

fn open(a: &StoreArgs) -> Result<Store, String> {
    if let Some(dir) = &a.store {
        return Store::at(dir).map_err(|e| e.to_string());
    }
    let Some(cfg) = &a.node_config else {
        return Err("give --node-config or --store".into());
    };
    let node = node_name(a.node.as_deref());
    let cfg = NodeConfig::load(&expand_node(cfg, &node)).map_err(|e| e.to_string())?;
    Store::open(&cfg.checkpoints).map_err(|e| e.to_string())
}

/// Runs the subcommand; returns the exit code.
pub fn checkpoint(cmd: CheckpointCmd) -> i32 {
    let usage = |e: String| {
        eprintln!("workspace-pilot checkpoint: {e}");
        pilot::exit::USAGE
    };
    match cmd {
        CheckpointCmd::List { store, json } => {
            let store = match open(&store) {
                Ok(s) => s,
                Err(e) => return usage(e),
            };
            let listed = match store.list() {
                Ok(l) => l,
                Err(e) => return usage(e.to_string()),
            };
            if json {
                let v: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|l| match &l.state {
                        ListedState::Complete {
                            bytes,
                            manifest_sha256,
                            node,
                            created_ms,
                        } => serde_json::json!({
                            "id": l.id.to_string(), "complete": true, "bytes": bytes,
                            "sha256": manifest_sha256, "node": node, "created_ms": created_ms,
                        }),
                        ListedState::Incomplete { writer, writing } => serde_json::json!({
                            "id": l.id.to_string(), "complete": false,
                            "writer": writer, "writing": writing,
                        }),
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_else(|_| "[]".into())
                );
            } else {
                if listed.is_empty() {
                    println!("{}: no checkpoints", store.root().display());
                }
                for l in &listed {
                    match &l.state {
                        ListedState::Complete {
                            bytes,
                            manifest_sha256,
                            node,
                            created_ms,
                        } => println!(
                            "{}  complete  {bytes} bytes  saved on {node} at {}  sha256 {manifest_sha256}",
                            l.id,
                            protocol::time::format_ms(*created_ms)
                        ),
                        ListedState::Incomplete { writer, writing } => println!(
                            "{}  UNFINISHED  {}{}",
                            l.id,
                            writer
                                .as_ref()
                                .map(|w| format!("by {w}"))
                                .unwrap_or_else(|| "writer unknown".into()),
                            if *writing {
                                " (being written)"
                            } else {
                                " (abandoned; never restored)"
                            }
                        ),
                    }
                }
            }
            0
        }
        CheckpointCmd::Verify { store, id, sha256 } => {
            let store = match open(&store) {
                Ok(s) => s,
                Err(e) => return usage(e),
            };
            match store
                .open_verified(&id, sha256.as_deref())
                .and_then(|r| r.verify_all().map(|_| r))
            {
                Ok(r) => {
                    println!(
                        "{id}: ok ({} files, {} bytes, manifest sha256 {})",
                        r.manifest().files.len(),
                        r.bytes(),
                        r.sha256()
                    );
                    0
                }
                Err(e) => {
                    println!("{id}: FAILED: {e}");
                    1
                }
            }
        }
        CheckpointCmd::Delete { store, id } => {
            let store = match open(&store) {
                Ok(s) => s,
                Err(e) => return usage(e),
            };
            match store.delete(&id) {
                Ok(0) => {
                    println!("{id}: not in the store");
                    0
                }
                Ok(bytes) => {
                    println!("{id}: deleted ({bytes} bytes)");
                    0
                }
                Err(e) => {
                    println!("{id}: FAILED: {e}");
                    1
                }
            }
        }
    }
}
