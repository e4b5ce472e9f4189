//! What pilots left unfinished in the checkpoint store, for kill-all.
//!
//! A pilot killed mid-save leaves a checkpoint directory without a manifest,
//! which is never restored (see `pilot::checkpoint`) but takes space. kill-all
//! removes those its state files name (VMs recorded `suspending`) and any
//! other unfinished one whose writer was this node and is gone. Complete
//! checkpoints are the coordinator's (a suspended lease resumes from them):
//! they are kept and listed, and removed only with `--purge-checkpoints`.

use crate::{Cli, Report};
use pilot::checkpoint::{CheckpointsConfig, ListedState, Store};
use pilot::state::{NodeStateFile, VmRecordState};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Cleans the store for the handled slots; returns false if anything failed.
pub fn clean(
    cli: &Cli,
    cfg: &CheckpointsConfig,
    node: &str,
    handled: &[(PathBuf, NodeStateFile)],
    r: &mut Report,
) -> bool {
    if cfg.dir.is_none() {
        return true;
    }
    let store = match Store::open(cfg) {
        Ok(s) => s,
        Err(e) => {
            return r.record(
                "open-checkpoint-store",
                cfg.dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                Some(Err(e.to_string())),
            )
        }
    };
    let listed = match store.list() {
        Ok(l) => l,
        Err(e) => {
            return r.record(
                "list-checkpoints",
                store.root().display().to_string(),
                Some(Err(e.to_string())),
            )
        }
    };
    // Checkpoints the handled slots' VMs were saved to (or being saved to).
    let named: BTreeSet<String> = handled
        .iter()
        .flat_map(|(_, f)| f.vms.iter())
        .filter(|v| {
            matches!(
                v.state,
                VmRecordState::Suspending | VmRecordState::Suspended
            )
        })
        .filter_map(|v| v.checkpoint.as_ref().map(|c| c.to_string()))
        .collect();
    let mut ok = true;
    for l in listed {
        let id = l.id.to_string();
        match &l.state {
            ListedState::Incomplete { writer, writing } => {
                let ours = named.contains(&id)
                    || writer.as_ref().is_some_and(|w| {
                        w.node == node && cli.slot.as_ref().is_none_or(|s| s.as_str() == w.slot)
                    });
                if !ours {
                    continue;
                }
                let by = writer
                    .as_ref()
                    .map(|w| format!(" (unfinished, by {w})"))
                    .unwrap_or_else(|| " (unfinished)".into());
                let target = format!("{id}{by}");
                if *writing {
                    ok &= r.record(
                        "remove-checkpoint",
                        target,
                        Some(Err("its writer still holds it".into())),
                    );
                    continue;
                }
                let outcome = (!cli.dry_run)
                    .then(|| store.delete(&l.id).map(|_| ()).map_err(|e| e.to_string()));
                ok &= r.record("remove-checkpoint", target, outcome);
            }
            ListedState::Complete { bytes, node: n, .. } => {
                let mine = named.contains(&id);
                if !mine {
                    continue;
                }
                if cli.purge_checkpoints {
                    let outcome = (!cli.dry_run)
                        .then(|| store.delete(&l.id).map(|_| ()).map_err(|e| e.to_string()));
                    ok &= r.record(
                        "remove-checkpoint",
                        format!("{id} (complete, {bytes} bytes)"),
                        outcome,
                    );
                } else {
                    r.record(
                        "keep-checkpoint",
                        format!(
                            "{id} (complete, {bytes} bytes, saved on {n}; --purge-checkpoints removes it)"
                        ),
                        Some(Ok(())),
                    );
                }
            }
        }
    }
    ok
}
