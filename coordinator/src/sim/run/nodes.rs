//! The pilots and their nodes, modelled: a pilot comes up with its job's
//! process, reserves, boots the VMs it is told to start, cleans up on
//! release, its deadline or the batch system's signal, and exits; a node
//! may crash under it. Each step is a timed event of the loop and speaks to
//! the engine only as a pilot does, through events and polls.

use super::{secs, Ev, Phase, PilotModel, PoolSlot, Sim, VmModel};
use crate::engine::EngineError;
use crate::sim::batch::Cause;
use protocol::pilot::{
    CommandKind, EventKind, OnPreempt, ReleaseReason, ReservationChange, ReservationCommand,
};
use protocol::{PilotId, SlotId, VmId, WorkspaceId};
use rand::Rng;

impl Sim<'_> {
    /// A pilot process starts on its node and says so.
    pub(super) fn pilot_up(&mut self, job: u64, node: u32) -> Result<(), EngineError> {
        let Some(j) = self.batch.job(job) else {
            return Ok(());
        };
        if j.end_ms.is_some() {
            return Ok(());
        }
        if j.signalled.is_some() {
            // Told to stop before it ran: the process ends at once.
            self.batch.process_ended(job, false);
            return Ok(());
        }
        let Some(slot) = self.slot_of(&j.name) else {
            self.batch.process_ended(job, false);
            return Ok(());
        };
        // A lease's pilot: its lease and the startup slack; any other (a
        // pool slot's, a lease's job the engine submitted on its own): its
        // `--duration-s`.
        let duration_ms = match (j.tag, j.duration_ms) {
            (Some(r), _) => self.requests[r].lease_ms + self.cfg.coordinator.startup_slack_s * 1000,
            (None, Some(d)) => d,
            (None, None) => self.cfg.coordinator.startup_slack_s * 1000,
        };
        let now = self.now();
        let pool = j.pool_memory_mb.map(|mb| PoolSlot {
            reserved_mb: mb,
            bound_to: None,
            idle_since: (!self.pool_closed).then_some(now),
        });
        let p = self.pilots.len();
        let name = format!("node{node}");
        self.pilot_of.insert((slot.clone(), name.clone()), p);
        self.job_pilots.entry(job).or_default().push(p);
        self.pilots.push(PilotModel {
            slot,
            node: name,
            job,
            id: PilotId::generate(),
            seq: 0,
            cursor: 0,
            phase: Phase::Reserving,
            started_ms: self.now(),
            vms: Vec::new(),
            reason: ReleaseReason::Commanded,
            duration_ms,
            pool,
        });
        self.send(
            p,
            EventKind::Started {
                pid: 1,
                hypervisor: "sim".into(),
                job_id: Some(job.to_string()),
            },
        )?;
        self.after(secs(self.cfg.nodes.reserve_s), Ev::Reserved(p));
        Ok(())
    }

    pub(super) fn reserved(&mut self, p: usize) -> Result<(), EngineError> {
        if self.pilots[p].phase != Phase::Reserving {
            return Ok(());
        }
        if self.chance(self.cfg.failures.reserve) {
            self.pilots[p].phase = Phase::Gone;
            let reason = "injected failure: the balloon did not reach its target".into();
            self.send(p, EventKind::ReserveFailed { reason })?;
            self.batch.process_ended(self.pilots[p].job, false);
            return Ok(());
        }
        self.pilots[p].phase = Phase::Holding;
        let job = self.pilots[p].job;
        let request = self.jobs.get(&job).and_then(|j| j.request);
        let pool = self.pilots[p].pool.as_ref().map(|s| s.reserved_mb);
        let mb = pool.unwrap_or_else(|| request.map_or(0, |r| self.requests[r].memory_mb));
        let total = self.cfg.cluster.memory_mb_per_node;
        let deadline = self.deadline_of(p);
        self.send(
            p,
            EventKind::Reserved {
                dom0_before_mb: total,
                dom0_after_mb: total.saturating_sub(mb),
                reserved_mb: mb,
                balloon_ms: secs(self.cfg.nodes.reserve_s),
                cached_images: Vec::new(),
                checkpoints: self.cfg.policy.suspend_resume.then_some(
                    protocol::pilot::CheckpointCapability {
                        save_mb_per_s: self.cfg.nodes.save_mb_per_s,
                        measured: false,
                    },
                ),
                // Only a pool slot's is read by the engine (placement);
                // the others keep today's events.
                deadline_ms: pool.map(|_| deadline),
                idle: pool.is_some(),
                // As the sim hypervisor: shares are recorded.
                cpu_control: Some(protocol::pilot::CpuControl {
                    available: true,
                    mechanism: "sim".into(),
                    reason: None,
                }),
            },
        )?;
        self.at(deadline, Ev::Deadline(p));
        if self.chance(self.cfg.failures.pilot_lost) {
            let life = self.pilots[p].duration_ms.max(1);
            let at = self.rng.gen_range(0..life);
            self.after(at, Ev::Die(p));
        }
        Ok(())
    }

    /// When the pilot gives its slot back on its own: its duration less its margin.
    fn deadline_of(&self, p: usize) -> u64 {
        let margin = self.cfg.coordinator.margin_s * 1000;
        self.pilots[p].started_ms + self.pilots[p].duration_ms.saturating_sub(margin)
    }

    /// A pool slot stops being idle now (bound, cleaning up, gone, or the
    /// pool closed): its idle time is counted.
    pub(super) fn pool_idle_stop(&mut self, p: usize) {
        let now = self.now();
        if let Some(since) = self.pilots[p]
            .pool
            .as_mut()
            .and_then(|s| s.idle_since.take())
        {
            self.pool_idle_ms += now.saturating_sub(since);
        }
    }

    /// A `reservation_refused` of a pool command, with the figures.
    fn refused(&self, p: usize, command: ReservationCommand, reason: String) -> EventKind {
        let slot = self.pilots[p].pool.as_ref();
        EventKind::ReservationRefused {
            command,
            workspace_id: None,
            reason,
            reserved_mb: slot.map_or(0, |s| s.reserved_mb),
            bound_to: slot.and_then(|s| s.bound_to.clone()),
            vms_left: Vec::new(),
        }
    }

    /// `bind` and `unbind`, answered as the sim node answers them: memory
    /// moved at once (the dom0 minimum checked), an unbind's VMs destroyed
    /// (each reported), the batch job left running.
    fn pool_command(
        &mut self,
        p: usize,
        workspace_id: WorkspaceId,
        memory_mb: u64,
        bind: bool,
    ) -> Result<(), EngineError> {
        let command = if bind {
            ReservationCommand::Bind
        } else {
            ReservationCommand::Unbind
        };
        let total = self.cfg.cluster.memory_mb_per_node;
        let min = self.cfg.coordinator.min_dom0_mb;
        let Some(slot) = self.pilots[p].pool.as_ref() else {
            let why = "this pilot is not a pool slot (started without --pool)".to_string();
            return self.send(p, self.refused(p, command, why));
        };
        let held = slot.reserved_mb;
        let bound = slot.bound_to.clone();
        let dom0 = total.saturating_sub(held);
        if total.saturating_sub(memory_mb) < min {
            let why = format!(
                "dom0 has {dom0} MB; taking {} MB more (this slot holds {held} MB, {memory_mb} MB asked) would leave it below the minimum of {min} MB",
                memory_mb.saturating_sub(held)
            );
            return self.send(p, self.refused(p, command, why));
        }
        match (&bound, bind) {
            (Some(b), true) if *b != workspace_id => {
                let why = format!("this slot serves {b}; unbind it first");
                return self.send(p, self.refused(p, command, why));
            }
            (b, false) if b.as_ref() != Some(&workspace_id) => {
                let why = format!("this slot does not serve {workspace_id}");
                return self.send(p, self.refused(p, command, why));
            }
            _ => {}
        }
        let reservation = ReservationChange {
            reserved_mb: memory_mb,
            dom0_before_mb: dom0,
            dom0_after_mb: total.saturating_sub(memory_mb),
            balloon_ms: 0,
            deadline_ms: self.deadline_of(p),
        };
        if bind {
            self.pool_idle_stop(p);
            if let Some(s) = self.pilots[p].pool.as_mut() {
                s.reserved_mb = memory_mb;
                s.bound_to = Some(workspace_id.clone());
            }
            return self.send(
                p,
                EventKind::Bound {
                    workspace_id,
                    reservation,
                },
            );
        }
        let now = self.now();
        let mut destroyed = Vec::new();
        for v in &mut self.pilots[p].vms {
            if v.destroyed || v.saved {
                continue;
            }
            if let Some(up) = v.up_ms.take() {
                self.vm_intervals.push((up, now.max(up)));
            }
            v.destroyed = true;
            destroyed.push(v.id.clone());
        }
        for vm_id in &destroyed {
            let vm_id = vm_id.clone();
            self.send(
                p,
                EventKind::VmDestroyed {
                    vm_id,
                    destroy_ms: 0,
                },
            )?;
        }
        let closed = self.pool_closed;
        if let Some(s) = self.pilots[p].pool.as_mut() {
            s.reserved_mb = memory_mb;
            s.bound_to = None;
            s.idle_since = (!closed).then_some(now);
        }
        // The pool's tick gives it back once idle too long.
        self.after(self.cfg.pool.idle_timeout_s * 1000 + 1, Ev::PoolTick);
        self.send(
            p,
            EventKind::Unbound {
                workspace_id,
                vms_destroyed: destroyed,
                reservation,
            },
        )
    }

    /// Milliseconds before a VM of `image` runs on `node`: its image copied
    /// (unless cached), then its boot.
    pub(super) fn vm_delay(&mut self, node: &str, image: &str) -> u64 {
        let n = &self.cfg.nodes;
        let mut ms = secs(n.boot_s);
        if n.deploy_images {
            let number: u32 = node.trim_start_matches("node").parse().unwrap_or(0);
            let cache = self.caches.entry(number).or_default();
            if let Some(at) = cache.iter().position(|i| i == image) {
                let hit = cache.remove(at);
                cache.extend(hit);
            } else {
                ms += secs(n.image_mb as f64 * 8.0 / n.network_mbps);
                if n.image_cache > 0 {
                    cache.push_back(image.to_string());
                    while cache.len() > n.image_cache as usize {
                        cache.pop_front();
                    }
                }
            }
        }
        ms
    }

    pub(super) fn vm_up(&mut self, p: usize, vm: usize) -> Result<(), EngineError> {
        if !matches!(self.pilots[p].phase, Phase::Holding | Phase::Preempting)
            || self.pilots[p].vms[vm].destroyed
        {
            return Ok(());
        }
        let (id, name) = (
            self.pilots[p].vms[vm].id.clone(),
            self.pilots[p].vms[vm].name.clone(),
        );
        if self.chance(self.cfg.failures.vm_start) {
            let reason = "injected failure: the hypervisor refused the domain".into();
            return self.send(p, EventKind::VmFailed { vm_id: id, reason });
        }
        self.pilots[p].vms[vm].up_ms = Some(self.now());
        if let Some(checkpoint) = self.pilots[p].vms[vm].restore.clone() {
            self.restores += 1;
            let mb = self.pilots[p].vms[vm].memory_mb;
            let ms = self.restore_ms(mb);
            return self.send(
                p,
                EventKind::VmResumed {
                    vm_id: id,
                    name,
                    checkpoint,
                    bytes: mb << 20,
                    restore_ms: ms,
                    total_ms: ms,
                    stage_ms: None,
                },
            );
        }
        self.send(
            p,
            EventKind::VmStarted {
                vm_id: id,
                name,
                create_ms: secs(self.cfg.nodes.boot_s),
                stage_ms: None,
                cache_hit: None,
                warm: None,
            },
        )
    }

    fn save_ms(&self, memory_mb: u64) -> u64 {
        secs(memory_mb as f64 / self.cfg.nodes.save_mb_per_s)
    }

    fn restore_ms(&self, memory_mb: u64) -> u64 {
        secs(memory_mb as f64 / self.cfg.nodes.restore_mb_per_s)
    }

    /// A VM's save is done: it stops running, is gone from the node, and
    /// the pilot says so.
    pub(super) fn saved(
        &mut self,
        p: usize,
        vm: usize,
        commanded: bool,
    ) -> Result<(), EngineError> {
        if matches!(self.pilots[p].phase, Phase::Gone) {
            return Ok(());
        }
        let v = &self.pilots[p].vms[vm];
        let (Some(up), Some(to)) = (v.up_ms, v.suspend_to.clone()) else {
            return Ok(());
        };
        let (id, mb) = (v.id.clone(), v.memory_mb);
        let now = self.now();
        self.vm_intervals.push((up, now.max(up)));
        let job = self.pilots[p].job;
        if let Some(r) = self.jobs.get_mut(&job) {
            r.vm_ms += now.saturating_sub(up);
        }
        let v = &mut self.pilots[p].vms[vm];
        v.up_ms = None;
        v.saved = true;
        self.saves += 1;
        let ms = self.save_ms(mb);
        self.send(
            p,
            EventKind::VmSuspended {
                vm_id: id,
                sha256: format!("{:064x}", to.generation),
                checkpoint: to,
                bytes: mb << 20,
                memory_mb: mb,
                save_ms: ms,
                total_ms: ms,
                trigger: if commanded {
                    protocol::pilot::SuspendTrigger::Commanded
                } else {
                    protocol::pilot::SuspendTrigger::Preempted
                },
            },
        )
    }

    /// The pilot starts cleaning up: VMs destroyed, then memory restored.
    pub(super) fn cleanup(&mut self, p: usize, reason: ReleaseReason) {
        let pilot = &mut self.pilots[p];
        if matches!(pilot.phase, Phase::Cleaning | Phase::Gone) {
            return;
        }
        pilot.phase = Phase::Cleaning;
        pilot.reason = reason;
        self.pool_idle_stop(p);
        let pilot = &self.pilots[p];
        let running = pilot.vms.iter().any(|v| v.up_ms.is_some());
        let destroy = if running {
            secs(self.cfg.nodes.destroy_s)
        } else {
            0
        };
        self.end_vms(p, self.now() + destroy);
        self.after(destroy + secs(self.cfg.nodes.restore_s), Ev::Cleaned(p));
    }

    /// The pilot's VMs stop running at `at`.
    pub(super) fn end_vms(&mut self, p: usize, at: u64) {
        let job = self.pilots[p].job;
        let mut vm_ms = 0;
        for v in &mut self.pilots[p].vms {
            if let Some(up) = v.up_ms.take() {
                let end = at.max(up);
                self.vm_intervals.push((up, end));
                vm_ms += end - up;
            }
        }
        if let Some(r) = self.jobs.get_mut(&job) {
            r.vm_ms += vm_ms;
        }
    }

    pub(super) fn cleaned(&mut self, p: usize) -> Result<(), EngineError> {
        if self.pilots[p].phase != Phase::Cleaning {
            return Ok(());
        }
        self.pilots[p].phase = Phase::Gone;
        let (suspended, destroyed): (Vec<&VmModel>, Vec<&VmModel>) = self.pilots[p]
            .vms
            .iter()
            .filter(|v| !v.destroyed)
            .partition(|v| v.saved);
        let vms_suspended: Vec<VmId> = suspended.iter().map(|v| v.id.clone()).collect();
        let destroyed: Vec<VmId> = destroyed.iter().map(|v| v.id.clone()).collect();
        let reason = self.pilots[p].reason;
        self.send(
            p,
            EventKind::Released {
                reason,
                vms_destroyed: destroyed,
                dom0_restored_mb: self.cfg.cluster.memory_mb_per_node,
                restore_ms: secs(self.cfg.nodes.restore_s),
                clean: true,
                problems: Vec::new(),
                vms_suspended,
            },
        )?;
        let job = self.pilots[p].job;
        self.batch.process_ended(job, false);
        self.job_ended(job);
        Ok(())
    }

    /// The batch system's warning reaches the job's processes; SIGKILL follows after the grace.
    pub(super) fn signal(&mut self, job: u64, cause: Cause) -> Result<(), EngineError> {
        if !self.batch.signal(job, cause) {
            return Ok(());
        }
        let grace = secs(self.cfg.batch.grace_s);
        let wait = (grace as f64 * self.cfg.coordinator.coordinator_wait_fraction) as u64;
        for p in self.job_pilots.get(&job).cloned().unwrap_or_default() {
            match self.pilots[p].phase {
                Phase::Holding => {
                    self.pilots[p].phase = Phase::Preempting;
                    let now = self.now();
                    // As the pilot decides (docs/CHECKPOINTS.md): all the VMs
                    // that asked are saved one after another if the estimate
                    // fits the save budget, else none.
                    let asked: Vec<usize> = (0..self.pilots[p].vms.len())
                        .filter(|&v| {
                            let m = &self.pilots[p].vms[v];
                            m.up_ms.is_some() && m.suspend_to.is_some()
                        })
                        .collect();
                    let mb: u64 = asked.iter().map(|&v| self.pilots[p].vms[v].memory_mb).sum();
                    let estimate = (self.save_ms(mb) as f64 * 1.25) as u64;
                    let budget = ((grace as f64 * 0.85) as u64)
                        .saturating_sub((grace as f64 * 0.15).clamp(300.0, 5000.0) as u64);
                    let (suspending, not_suspending) = if asked.is_empty() {
                        (Vec::new(), None)
                    } else if estimate <= budget {
                        let mut at = 0;
                        for &v in &asked {
                            at += self.save_ms(self.pilots[p].vms[v].memory_mb);
                            self.after(
                                at,
                                Ev::Saved {
                                    pilot: p,
                                    vm: v,
                                    commanded: false,
                                },
                            );
                        }
                        let ids = asked.iter().map(|&v| self.pilots[p].vms[v].id.clone());
                        (ids.collect(), None)
                    } else {
                        let why = format!(
                            "save did not fit the grace: needs ~{:.1} s for {} VM(s) of {mb} MB, {:.1} s left",
                            estimate as f64 / 1000.0,
                            asked.len(),
                            budget as f64 / 1000.0
                        );
                        (Vec::new(), Some(why))
                    };
                    let saving = if suspending.is_empty() { 0 } else { estimate };
                    self.send(
                        p,
                        EventKind::Preempting {
                            signal: "SIGTERM".into(),
                            coordinator_wait_ms: wait,
                            cleanup_deadline_ms: now + grace * 9 / 10,
                            suspending,
                            not_suspending,
                        },
                    )?;
                    self.after(saving + wait, Ev::WaitOver(p));
                }
                Phase::Reserving => self.cleanup(p, ReleaseReason::Preempted),
                _ => {}
            }
        }
        self.after(grace, Ev::Kill(job));
        Ok(())
    }

    /// The grace is over: whatever of the job still runs is killed.
    pub(super) fn kill(&mut self, job: u64) {
        let Some(j) = self.batch.job(job) else { return };
        if j.end_ms.is_some() {
            return;
        }
        for p in self.job_pilots.get(&job).cloned().unwrap_or_default() {
            if self.pilots[p].phase != Phase::Gone {
                self.pool_idle_stop(p);
                self.end_vms(p, self.now());
                self.pilots[p].phase = Phase::Gone;
            }
        }
        self.batch.kill(job);
        self.job_ended(job);
    }

    /// The pilot's node crashes: it says nothing more, its VMs are gone.
    pub(super) fn die(&mut self, p: usize) -> Result<(), EngineError> {
        if matches!(self.pilots[p].phase, Phase::Gone) {
            return Ok(());
        }
        // Its last poll: it was heard from until now (silence counts from here).
        self.flush()?;
        self.deliver(&[p])?;
        self.pool_idle_stop(p);
        self.end_vms(p, self.now());
        self.pilots[p].phase = Phase::Gone;
        self.dead.push_back((self.now(), p));
        let job = self.pilots[p].job;
        self.batch.process_ended(job, true);
        self.job_ended(job);
        Ok(())
    }

    /// Records the job's end once the batch model has ended it.
    pub(super) fn job_ended(&mut self, job: u64) {
        let Some(j) = self.batch.job(job) else { return };
        let (Some(start), Some(end)) = (j.start_ms, j.end_ms) else {
            return;
        };
        if let Some(r) = self.jobs.get_mut(&job) {
            if r.end_ms.is_none() {
                r.end_ms = Some(end);
                self.job_intervals.push((start, end, j.nodes));
            }
        }
    }

    /// The pilots' polls: their new commands, acted on.
    pub(super) fn deliver(&mut self, pilots: &[usize]) -> Result<(), EngineError> {
        let polls: Vec<(SlotId, String, u64)> = pilots
            .iter()
            .map(|p| {
                let pl = &self.pilots[*p];
                (pl.slot.clone(), pl.node.clone(), pl.cursor)
            })
            .collect();
        let answers = self.engine.pilot_commands_of(&polls)?;
        for (&p, commands) in pilots.iter().zip(answers) {
            for c in commands {
                self.pilots[p].cursor = c.id;
                match c.kind {
                    CommandKind::StartVm(launch) => {
                        let node = self.pilots[p].node.clone();
                        let restore = launch.restore.map(|r| r.checkpoint);
                        let delay = match restore {
                            Some(_) => self.restore_ms(launch.memory_mb),
                            None => self.vm_delay(&node, &launch.image),
                        };
                        let vm = self.pilots[p].vms.len();
                        self.pilots[p].vms.push(VmModel {
                            id: launch.vm_id,
                            name: launch.name,
                            up_ms: None,
                            memory_mb: launch.memory_mb,
                            suspend_to: match launch.on_preempt {
                                OnPreempt::Suspend { to } => Some(to),
                                OnPreempt::End => None,
                            },
                            restore,
                            saved: false,
                            destroyed: false,
                        });
                        self.after(delay, Ev::VmUp { pilot: p, vm });
                    }
                    CommandKind::SuspendVm { vm_id, to } => {
                        let found = self.pilots[p]
                            .vms
                            .iter()
                            .position(|v| v.id == vm_id && v.up_ms.is_some());
                        match found {
                            Some(v) if self.pilots[p].phase == Phase::Holding => {
                                self.pilots[p].vms[v].suspend_to = Some(to);
                                let ms = self.save_ms(self.pilots[p].vms[v].memory_mb);
                                self.after(
                                    ms,
                                    Ev::Saved {
                                        pilot: p,
                                        vm: v,
                                        commanded: true,
                                    },
                                );
                            }
                            // Saving it already, on the batch system's warning.
                            Some(_) => {}
                            None => {
                                let reason = format!("{vm_id} does not run on this node");
                                self.send(
                                    p,
                                    EventKind::VmSuspendFailed {
                                        vm_id,
                                        checkpoint: to,
                                        cause: protocol::pilot::SuspendFailure::NoSuchVm,
                                        reason,
                                        vm_running: false,
                                    },
                                )?;
                            }
                        }
                    }
                    CommandKind::DeleteCheckpoint { checkpoint } => {
                        self.send(
                            p,
                            EventKind::CheckpointDeleted {
                                checkpoint,
                                bytes: 0,
                            },
                        )?;
                    }
                    // Urgent leases sharing this node (engine::urgent),
                    // answered as the sim hypervisor does: memory moved at
                    // once, shares recorded.
                    CommandKind::Bind {
                        workspace_id,
                        memory_mb,
                    } => self.pool_command(p, workspace_id, memory_mb, true)?,
                    CommandKind::Unbind {
                        workspace_id,
                        memory_mb,
                    } => self.pool_command(p, workspace_id, memory_mb, false)?,
                    CommandKind::PrepareWarm { to, .. } => {
                        // Not modelled (and refused in the config): said so, nothing kept.
                        let reason = "the simulator does not model warm snapshots".into();
                        let kind = EventKind::WarmPrepareFailed {
                            checkpoint: to,
                            reason,
                        };
                        self.send(p, kind)?;
                    }
                    CommandKind::Reserve { memory_mb } => {
                        let total = self.cfg.cluster.memory_mb_per_node;
                        let dom0 = total.saturating_sub(memory_mb);
                        let kind = if dom0 < self.cfg.coordinator.min_dom0_mb {
                            EventKind::ReservationRefused {
                                command: protocol::pilot::ReservationCommand::Reserve,
                                workspace_id: None,
                                reason: format!(
                                    "dom0 would have {dom0} MB, below the minimum of {} MB",
                                    self.cfg.coordinator.min_dom0_mb
                                ),
                                reserved_mb: 0,
                                bound_to: None,
                                vms_left: Vec::new(),
                            }
                        } else {
                            if let Some(s) = self.pilots[p].pool.as_mut() {
                                s.reserved_mb = memory_mb;
                            }
                            EventKind::ReservationChanged {
                                workspace_id: None,
                                reservation: protocol::pilot::ReservationChange {
                                    reserved_mb: memory_mb,
                                    dom0_before_mb: total,
                                    dom0_after_mb: dom0,
                                    balloon_ms: 0,
                                    deadline_ms: 0,
                                },
                            }
                        };
                        self.send(p, kind)?;
                    }
                    CommandKind::SetCpu { vm_id, cpu } => {
                        let kind = EventKind::VmCpuSet {
                            vm_id,
                            cpu,
                            mechanism: "sim".into(),
                        };
                        self.send(p, kind)?;
                    }
                    CommandKind::DestroyVm { vm_id } => {
                        let now = self.now();
                        let found = self.pilots[p].vms.iter().position(|v| v.id == vm_id);
                        if let Some(v) = found {
                            let vm = &mut self.pilots[p].vms[v];
                            if let Some(up) = vm.up_ms.take() {
                                self.vm_intervals.push((up, now.max(up)));
                            }
                            // Gone from the node: not destroyed again with it.
                            vm.destroyed = true;
                            self.send(
                                p,
                                EventKind::VmDestroyed {
                                    vm_id,
                                    destroy_ms: 0,
                                },
                            )?;
                        }
                    }
                    CommandKind::Release => {
                        let reason = if self.pilots[p].phase == Phase::Preempting {
                            ReleaseReason::Preempted
                        } else {
                            ReleaseReason::Commanded
                        };
                        self.cleanup(p, reason);
                    }
                }
            }
        }
        Ok(())
    }
}
