//! Warm VMs on the node: clean snapshots of an image, and starts from them.
//!
//! `prepare_warm` boots a template of the image (no NICs, no context: no
//! identity), waits until the guest says it is ready, saves it into the
//! checkpoint store and destroys it. A launch whose `restore` is `warm`
//! starts a new VM from that snapshot: the snapshot verified (manifest
//! digest, every file's SHA-256), restored on a fresh copy of its overlay
//! under the launch's name, then given the launch's NICs and seed; the
//! snapshot itself never changes, so no user's memory or disk reaches the
//! next. When the snapshot cannot be used (corrupt, missing, another
//! shape), the VM is booted from its image instead and `vm_started` says
//! so. Not the store (checkpoint.rs) nor how a driver restores.

use super::suspend::{ck_resume_cause, resume_cause, save_committed};
use super::{destroy_guest, hv_call, End, Pilot};
use crate::checkpoint::{ManifestInfo, WriterInfo};
use crate::state::{PilotState, VmRecord, VmRecordState};
use protocol::pilot::{CheckpointId, EventKind, ResumeFailure, VmLaunch, WarmOutcome};
use protocol::VmName;
use std::time::Duration;
use tokio::time::Instant;

/// How often a booting template is asked whether it is ready.
const READY_POLL: Duration = Duration::from_millis(50);
/// Bound on deleting superseded warm snapshots after a new one.
const PRUNE_TIMEOUT: Duration = Duration::from_secs(60);

impl Pilot {
    /// Why `launch` cannot be a template here, if it cannot.
    fn template_refusal(&self, launch: &VmLaunch) -> Option<String> {
        let tagged = VmName::parse(&launch.name)
            .is_some_and(|n| n.slot == self.cfg.slot && n.vm == launch.vm_id);
        if !tagged {
            return Some(format!(
                "name {:?} is not wsp-{}-{}",
                launch.name, self.cfg.slot, launch.vm_id
            ));
        }
        if !matches!(self.record.state, PilotState::Idle | PilotState::Reserved) {
            return Some(
                format!("slot is {:?}; not preparing snapshots", self.record.state).to_lowercase(),
            );
        }
        if !launch.nics.is_empty() || launch.context.is_some() || launch.hostname.is_some() {
            return Some(
                "a warm template has no identity: no NICs, context or host name (each warm start brings its own)"
                    .into(),
            );
        }
        if launch.restore.is_some() || !launch.on_preempt.is_end() {
            return Some("a warm template is booted from its image and never suspended".into());
        }
        if self.record.vms.iter().any(|v| v.vm_id == launch.vm_id) {
            return Some(format!("VM {} is already on this slot", launch.vm_id));
        }
        let (used, n) = self.memory_in_use();
        let free = self.record.reserved_mb.saturating_sub(used);
        if launch.memory_mb > free {
            return Some(format!(
                "not enough memory: the template needs {} MB; this slot reserved {} MB, {used} MB in use by {n} VM(s), {free} MB free",
                launch.memory_mb, self.record.reserved_mb
            ));
        }
        None
    }

    /// `prepare_warm`: boot, wait until ready, save to `to`, destroy.
    /// Answered by `warm_prepared` or `warm_prepare_failed`; a signal while
    /// the template boots abandons it (and the command loop then handles
    /// the signal).
    pub(super) async fn prepare_warm(
        &mut self,
        launch: VmLaunch,
        to: CheckpointId,
        ready_timeout_s: u64,
        deadline: Instant,
    ) -> Result<(), End> {
        let t0 = Instant::now();
        let fail = |p: &mut Pilot, reason: String| {
            tracing::error!(checkpoint = %to, reason = %reason, "warm snapshot not made");
            p.push(EventKind::WarmPrepareFailed {
                checkpoint: to.clone(),
                reason,
            });
        };
        if let Some(reason) = self.template_refusal(&launch) {
            fail(self, reason);
            return Ok(());
        }
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => {
                fail(self, e.to_string());
                return Ok(());
            }
        };
        let vm_id = launch.vm_id.clone();
        let name = launch.name.clone();
        self.set_vm(VmRecord {
            vm_id: vm_id.clone(),
            name: name.clone(),
            memory_mb: launch.memory_mb,
            state: VmRecordState::Creating,
            nics: Vec::new(),
            checkpoint: Some(to.clone()),
        });
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let bound = deadline.max(t0 + Duration::from_secs(1));
        let outcome = self
            .boot_and_save(&launch, &to, store, ready_timeout_s, bound)
            .await;
        // The template never outlives the command.
        let gone = destroy_guest(
            &self.hv,
            Instant::now() + Duration::from_secs(30),
            "destroying a warm template",
            &name,
        )
        .await;
        match gone {
            Ok(()) => {
                self.record.vms.retain(|v| v.vm_id != vm_id);
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "warm template not destroyed; cleanup will");
                self.set_vm_state(&vm_id, VmRecordState::Destroying);
            }
        }
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        match outcome {
            Ok((committed, boot_ms, save_ms)) => {
                let total_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(checkpoint = %to, bytes = committed.bytes, boot_ms, save_ms, total_ms, "warm snapshot made");
                // Pruned before the answer: a coordinator that hears of
                // this snapshot finds the store as it will stay.
                self.prune_superseded(to.clone(), launch.image.clone(), committed.sha256.clone())
                    .await;
                self.push(EventKind::WarmPrepared {
                    checkpoint: to,
                    sha256: committed.sha256,
                    bytes: committed.bytes,
                    memory_mb: launch.memory_mb,
                    boot_ms,
                    save_ms,
                    total_ms,
                });
                Ok(())
            }
            Err(Interrupted::Failed(reason)) => {
                fail(self, reason);
                Ok(())
            }
            Err(Interrupted::Signal(sig)) => {
                fail(self, format!("{sig} while the template booted: abandoned"));
                Err(End::Preempt(sig))
            }
        }
    }

    /// Once snapshot `to` of `image` is committed and its manifest checks
    /// out, the older snapshots of that image in the store are deleted
    /// (except one a restore reads now), and unfinished ones whose writer
    /// died ([`crate::checkpoint::Store::prune_warm`]). Bounded by
    /// [`PRUNE_TIMEOUT`]; what is left is pruned after the next snapshot.
    async fn prune_superseded(&self, to: CheckpointId, image: String, sha: String) {
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "older warm snapshots not pruned");
                return;
            }
        };
        let id = to.clone();
        let job = tokio::task::spawn_blocking(move || {
            // The new one must be readable before the old ones go.
            drop(store.open_verified(&id, Some(&sha))?);
            store.prune_warm(&id, &image)
        });
        match tokio::time::timeout(PRUNE_TIMEOUT, job).await {
            Ok(Ok(Ok(p))) => {
                for (id, bytes) in &p.deleted {
                    tracing::info!(checkpoint = %id, bytes, superseded_by = %to, "older warm snapshot deleted");
                }
                for (id, bytes) in &p.abandoned {
                    tracing::info!(checkpoint = %id, bytes, "unfinished warm snapshot (its writer is gone) deleted");
                }
                for id in &p.in_use {
                    tracing::info!(checkpoint = %id, superseded_by = %to, "older warm snapshot kept: a restore reads it now; the next snapshot prunes it");
                }
                for (id, e) in &p.failed {
                    tracing::warn!(checkpoint = %id, error = %e, "older warm snapshot not deleted");
                }
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(checkpoint = %to, error = %e, "older warm snapshots not pruned")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "older warm snapshots not pruned"),
            Err(_) => tracing::warn!(
                timeout_s = PRUNE_TIMEOUT.as_secs(),
                "pruning older warm snapshots is taking too long; left to finish in the background"
            ),
        }
    }

    /// The template's life up to its committed snapshot (the caller
    /// destroys it): stage, create, wait for ready, save.
    async fn boot_and_save(
        &mut self,
        launch: &VmLaunch,
        to: &CheckpointId,
        store: crate::checkpoint::Store,
        ready_timeout_s: u64,
        bound: Instant,
    ) -> Result<(crate::checkpoint::Committed, u64, u64), Interrupted> {
        let t0 = Instant::now();
        let (l, staged) = self
            .stage_image(launch, bound, t0)
            .await
            .map_err(|e| Interrupted::Failed(format!("image not staged: {e}")))?;
        let t_boot = Instant::now();
        let tl = l.clone();
        hv_call(&self.hv, bound, "creating a warm template", move |hv| {
            hv.create_template(&tl)
        })
        .await
        .map_err(|e| Interrupted::Failed(format!("template not started: {e}")))?;
        drop(staged);
        self.set_vm_state(&launch.vm_id, VmRecordState::Running);
        if let Err(e) = self.persist() {
            return Err(Interrupted::Failed(e.to_string()));
        }
        let ready_by = Instant::now() + Duration::from_secs(ready_timeout_s.max(1));
        loop {
            let n = launch.name.clone();
            let ready = hv_call(
                &self.hv,
                ready_by.max(Instant::now() + READY_POLL),
                "asking whether the template is ready",
                move |hv| hv.is_ready(&n),
            )
            .await
            .map_err(|e| Interrupted::Failed(format!("template: {e}")))?;
            if ready {
                break;
            }
            if Instant::now() >= ready_by {
                return Err(Interrupted::Failed(format!(
                    "the template was not ready within {ready_timeout_s} s"
                )));
            }
            tokio::select! {
                biased;
                sig = self.signals.recv() => return Err(Interrupted::Signal(sig.unwrap_or("SIGTERM"))),
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }
        let boot_ms = t_boot.elapsed().as_millis() as u64;
        let who = WriterInfo {
            node: self.cfg.node.clone(),
            slot: self.cfg.slot.to_string(),
            pid: std::process::id(),
            started_ms: protocol::now_ms(),
        };
        let info = ManifestInfo {
            warm: true,
            vm_name: launch.name.clone(),
            hypervisor: self.hv_kind(),
            memory_mb: launch.memory_mb,
            cpus: launch.cpus,
            image: launch.image.clone(),
            image_sha256: launch.image_source.as_ref().and_then(|s| s.sha256.clone()),
            node: self.cfg.node.clone(),
            slot: self.cfg.slot.clone(),
            save_ms: 0,
            driver: serde_json::Value::Null,
        };
        let save_by =
            Instant::now() + Duration::from_secs(self.cfg.checkpoints.save_timeout_s.max(1));
        let (n, id) = (launch.name.clone(), to.clone());
        let driver_bound = save_by.into_std();
        let (committed, save_ms) = hv_call(
            &self.hv,
            save_by + Duration::from_secs(2),
            "saving a warm template",
            move |hv| save_committed(hv, &store, &id, who, &n, info, driver_bound),
        )
        .await
        .map_err(|e| Interrupted::Failed(format!("template not saved: {e}")))?;
        Ok((committed, boot_ms, save_ms))
    }

    /// A launch whose `restore` is warm: from the snapshot if it can be
    /// used, else a boot from the image (`vm_started` says which).
    pub(super) async fn warm_start(
        &mut self,
        launch: VmLaunch,
        deadline: Instant,
    ) -> Result<(), End> {
        let t0 = Instant::now();
        let vm_id = launch.vm_id.clone();
        let Some(from) = launch.restore.clone() else {
            return Ok(());
        };
        if let Some(reason) = self.launch_refusal(&launch) {
            tracing::warn!(vm_id = %vm_id, reason = %reason, "VM not started");
            self.push(EventKind::VmFailed { vm_id, reason });
            return Ok(());
        }
        let (used, n) = self.memory_in_use();
        let free = self.record.reserved_mb.saturating_sub(used);
        if launch.memory_mb > free {
            let reason = format!(
                "not enough memory: the VM needs {} MB; this slot reserved {} MB, {used} MB in use by {n} VM(s), {free} MB free",
                launch.memory_mb, self.record.reserved_mb
            );
            self.push(EventKind::VmFailed { vm_id, reason });
            return Ok(());
        }
        let mut cold = launch.clone();
        cold.restore = None;
        let checkpoint = from.checkpoint.clone();
        let fallback = |cause: ResumeFailure, reason: String| {
            tracing::warn!(vm_id = %launch.vm_id, checkpoint = %checkpoint, cause = ?cause, reason = %reason, "warm snapshot not used; booting from the image");
            Some(WarmOutcome::ColdBooted {
                checkpoint: checkpoint.clone(),
                cause,
                reason,
            })
        };
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => {
                let w = fallback(ResumeFailure::NoStore, e.to_string());
                return self.boot_vm(cold, deadline, w).await;
            }
        };
        let (id, sha) = (from.checkpoint.clone(), from.sha256.clone());
        let opened =
            tokio::task::spawn_blocking(move || store.open_verified(&id, Some(&sha))).await;
        let reader = match opened {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let w = fallback(ck_resume_cause(&e), e.to_string());
                return self.boot_vm(cold, deadline, w).await;
            }
            Err(e) => {
                let w = fallback(ResumeFailure::Failed, format!("opening the snapshot: {e}"));
                return self.boot_vm(cold, deadline, w).await;
            }
        };
        if let Some(why) = self.manifest_mismatch(reader.manifest(), &launch) {
            let w = fallback(ResumeFailure::Incompatible, why);
            return self.boot_vm(cold, deadline, w).await;
        }
        self.set_vm(VmRecord {
            vm_id: vm_id.clone(),
            name: launch.name.clone(),
            memory_mb: launch.memory_mb,
            state: VmRecordState::Resuming,
            nics: launch.nics.clone(),
            checkpoint: None,
        });
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let bound = deadline
            .max(t0 + Duration::from_secs(1))
            .min(t0 + Duration::from_secs(self.cfg.checkpoints.restore_timeout_s.max(1)));
        let (l, staged) = match self.stage_image(&launch, bound, t0).await {
            Ok(s) => s,
            Err(e) => {
                // Booting needs the image too.
                self.set_vm_state(&vm_id, VmRecordState::Failed);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                self.push(EventKind::VmFailed {
                    vm_id,
                    reason: format!("image not staged: {e}"),
                });
                return Ok(());
            }
        };
        let bytes = reader.bytes();
        let driver_bound = bound.into_std();
        let r0 = Instant::now();
        let r = hv_call(
            &self.hv,
            bound + Duration::from_secs(2),
            "restoring a warm VM",
            move |hv| hv.restore_warm(&l, &reader, driver_bound),
        )
        .await;
        let restore_ms = r0.elapsed().as_millis() as u64;
        match r {
            Ok(()) => {
                self.set_vm_state(&vm_id, VmRecordState::Running);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                self.launches.insert(vm_id.clone(), launch.clone());
                let create_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(vm_id = %vm_id, name = %launch.name, checkpoint = %from.checkpoint, restore_ms, create_ms, "VM started from its warm snapshot");
                self.push(EventKind::VmStarted {
                    vm_id,
                    name: launch.name,
                    create_ms,
                    stage_ms: staged.as_ref().map(|s| s.took.as_millis() as u64),
                    cache_hit: staged.as_ref().map(|s| s.hit),
                    warm: Some(WarmOutcome::Restored {
                        checkpoint: from.checkpoint,
                        bytes,
                        restore_ms,
                    }),
                });
                Ok(())
            }
            Err(e) => {
                drop(staged);
                // The driver removed what it started; make sure of it.
                let _ = destroy_guest(
                    &self.hv,
                    Instant::now() + Duration::from_secs(30),
                    "destroying a VM that did not restore",
                    &launch.name,
                )
                .await;
                let w = fallback(resume_cause(&e), e.to_string());
                self.boot_vm(cold, deadline, w).await
            }
        }
    }
}

/// Why a template did not become a snapshot.
enum Interrupted {
    Failed(String),
    /// The batch system's warning came while it booted.
    Signal(&'static str),
}
