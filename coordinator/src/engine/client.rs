//! The client API: create a workspace (size it, store it, submit its pilot
//! jobs), get, list, destroy, and the timeline as a long-poll. Who may see
//! what is decided here ([`Caller`]); what happens next is the rules'.
//!
//! Not here: HTTP and tokens (`crate::api`), the rules themselves (`rules`).

use super::rules::{
    end_slots, fail_on_refused_submit, maybe_settle, must_ws, transition, visible_ws,
};
use super::views::{build_view, is_settled};
use super::{Caller, Engine, EngineError, MAX_WAIT};
use crate::lifecycle::slot::{Job, JobInput};
use crate::lifecycle::{self, Input};
use crate::network::{self, NetError, Pools};
use crate::policy::{Action, Cluster, SlotPlan};
use crate::store::{self, SlotRow, StoreError, VmRow, WorkspaceRow};
use lrm_adapters::{LrmError, SlotJob};
use protocol::auth::SlotKey;
use protocol::spec::WorkspaceSpec;
use protocol::view::{EventsPage, Phase, SlotState, VmState, WorkspaceState, WorkspaceView};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use rusqlite::Connection;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long the coordinator keeps a create's idempotency key: a retry within
/// this gets the workspace the key made (a day: longer than any client
/// retries, short enough that the table stays small).
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 3600 * 1000;

/// An idempotency key is 8 to 128 characters of letters, digits, `-`, `_`,
/// `.` and `:` (a UUID, or any random string the client likes).
fn check_idempotency_key(key: &str) -> Result<(), EngineError> {
    let ok = (8..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::BadRequest(format!(
            "Idempotency-Key {key:?}: must be 8 to 128 letters, digits, '-', '_', '.' or ':'"
        )))
    }
}

/// The spec as a retry must repeat it (SHA-256 of its JSON).
fn spec_fingerprint(spec: &WorkspaceSpec) -> Result<String, EngineError> {
    use sha2::Digest;
    let json = serde_json::to_vec(spec)
        .map_err(|e| EngineError::BadRequest(format!("spec does not encode: {e}")))?;
    Ok(hex::encode(sha2::Sha256::digest(&json)))
}

/// The workspace an earlier create with this key made (keys older than
/// [`IDEMPOTENCY_TTL_MS`] forgotten first), or the refusal when the key came
/// with another spec.
fn earlier_create(
    tx: &Connection,
    user: &str,
    key: &str,
    fingerprint: &str,
    now: u64,
) -> Result<Option<WorkspaceId>, EngineError> {
    store::forget_idempotency_keys(tx, now.saturating_sub(IDEMPOTENCY_TTL_MS))?;
    match store::idempotent_create(tx, user, key)? {
        Some((id, fp)) if fp != fingerprint => Err(EngineError::KeyReused(format!(
            "Idempotency-Key {key:?} was used for another spec (workspace {id}); a new request needs a new key"
        ))),
        Some((id, _)) => Ok(Some(id)),
        None => Ok(None),
    }
}

impl Engine {
    /// Creates a workspace: sizes its slots, stores it, submits its pilot
    /// jobs; answers with its view.
    pub async fn create(
        &self,
        caller: &Caller,
        spec: WorkspaceSpec,
    ) -> Result<WorkspaceView, EngineError> {
        let id = self.create_workspace(caller, spec).await?;
        self.get(caller, &id)
    }

    /// [`Engine::create`] with the client's idempotency key: the first
    /// request with a key creates; a retry with the same key and spec (by the
    /// same user, within [`IDEMPOTENCY_TTL_MS`]) gets the same workspace,
    /// `true` with it, and nothing is created or submitted again. The same
    /// key with another spec is refused.
    pub async fn create_idempotent(
        &self,
        caller: &Caller,
        spec: WorkspaceSpec,
        key: &str,
    ) -> Result<(WorkspaceView, bool), EngineError> {
        check_idempotency_key(key)?;
        let (id, replayed) = self.create_keyed(caller, spec, Some(key)).await?;
        Ok((self.get(caller, &id)?, replayed))
    }

    /// The policy's slots for `spec` on this cluster (at create, and again
    /// for a resume's new slots).
    pub(super) fn slot_plans(&self, spec: &WorkspaceSpec) -> Result<Vec<SlotPlan>, EngineError> {
        let cluster = Cluster {
            capacity: self.capacity,
            min_dom0_mb: self.cfg.pilot.min_dom0_mb,
        };
        Ok(self
            .policy
            .plan_lease(spec, &cluster)?
            .actions
            .into_iter()
            .map(|a| match a {
                Action::Submit(plan) => plan,
            })
            .collect())
    }

    /// [`Engine::create`] without the view: the new workspace's id.
    pub async fn create_workspace(
        &self,
        caller: &Caller,
        spec: WorkspaceSpec,
    ) -> Result<WorkspaceId, EngineError> {
        Ok(self.create_keyed(caller, spec, None).await?.0)
    }

    async fn create_keyed(
        &self,
        caller: &Caller,
        mut spec: WorkspaceSpec,
        key: Option<&str>,
    ) -> Result<(WorkspaceId, bool), EngineError> {
        spec.validate()?;
        self.check_urgency(caller, spec.urgency)?;
        // The spec as the client sent it (a relative start resolves anew on
        // every retry), and a retry answered before anything is reserved.
        let fingerprint = spec_fingerprint(&spec)?;
        if let Some(key) = key {
            let now = self.clock.now_ms();
            let earlier = self.with_store(|s| {
                s.tx(|tx| earlier_create(tx, &caller.user, key, &fingerprint, now))
            })?;
            if let Some(id) = earlier {
                info!(workspace_id = %id, owner = %caller.user, "create retried with its idempotency key: the same workspace");
                return Ok((id, true));
            }
        }
        let plans = self.slot_plans(&spec)?;
        if self.pools.public.is_none() {
            if let Some(g) = spec.groups.iter().find(|g| g.public_ip) {
                return Err(NetError::NoPublicPool {
                    group: g.name.clone(),
                }
                .into());
            }
        }
        let id = WorkspaceId::generate();
        // Guaranteed leases: the batch system's reservation, or refused.
        let held = self.admit(&id, &mut spec, &plans).await?;
        let now = self.clock.now_ms();
        let mut ws = WorkspaceRow {
            id,
            name: spec.name.clone(),
            owner: caller.user.clone(),
            spec: spec.clone(),
            state: WorkspaceState::Pending,
            reason: None,
            created_ms: now,
            updated_ms: now,
            expires_ms: None,
        };
        let mut slots = Vec::new();
        let mut from_pool = false;
        let limits = self.limits_of(&caller.user);
        let asked_vms: u32 = plans.iter().map(|p| p.nodes).sum();
        let asked_mb: u64 = plans
            .iter()
            .map(|p| u64::from(p.nodes) * p.memory_mb_per_node)
            .sum();
        let stored = self.with_store(|s| {
            s.tx(|tx| {
                // Two retries at once: the second finds the first's key here.
                if let Some(key) = key {
                    if let Some(id) = earlier_create(tx, &caller.user, key, &fingerprint, now)? {
                        return Ok(Some(id));
                    }
                }
                // In the transaction that stores it: two requests at once
                // cannot both pass on the same room.
                if limits != crate::limits::Limits::default() {
                    let held = store::usage_of(tx, &caller.user)?;
                    limits.check_new(held, asked_vms, asked_mb, spec.duration.0.as_secs())?;
                }
                if store::get_workspace(tx, &ws.id)?.is_some() {
                    ws.id = unused(WorkspaceId::generate, |id| {
                        Ok(store::get_workspace(tx, id)?.is_some())
                    })?;
                }
                store::insert_workspace(tx, &ws)?;
                if let Some(key) = key {
                    store::insert_idempotency_key(
                        tx,
                        &caller.user,
                        key,
                        &ws.id,
                        &fingerprint,
                        now,
                    )?;
                }
                if let Some(row) = &held {
                    let row = store::ReservationRow {
                        workspace_id: ws.id.clone(),
                        ..row.clone()
                    };
                    store::insert_reservation(tx, &row)?;
                    let nodes = plans.iter().map(|p| p.nodes).sum();
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::ReservationGranted,
                        None,
                        None,
                        None,
                        &super::reserve::granted_detail(&ws, &row, nodes),
                    )?;
                }
                let mut addrs = AddressPlan::new(tx, &self.pools, &spec)?;
                // Idle pool slots first (all the VMs, or none: then the batch system).
                let placed = match &held {
                    None => super::pool::place(
                        tx,
                        &self.cfg.pool,
                        self.capacity
                            .memory_mb_per_node
                            .saturating_sub(self.cfg.pilot.min_dom0_mb),
                        &spec,
                        &plans,
                        self.cfg.pilot.startup_slack_s * 1000,
                        now,
                    )?,
                    Some(_) => None,
                };
                from_pool = placed.is_some();
                for (i, plan) in plans.iter().enumerate() {
                    let targets: Vec<SlotId> = match placed.as_ref().and_then(|p| p.get(i)) {
                        Some(pool_slots) => {
                            let mut ids = Vec::new();
                            for ps in pool_slots {
                                super::pool::adopt(tx, ps, &ws.id, plan, None, now)?;
                                ids.push(ps.slot_id.clone());
                            }
                            ids
                        }
                        None => {
                            let slot = insert_new_slot(tx, &ws.id, plan, now)?;
                            let id = slot.id.clone();
                            slots.push(slot);
                            vec![id; plan.nodes as usize]
                        }
                    };
                    let group = spec.groups.iter().find(|g| g.name == plan.group);
                    for (idx, slot_id) in (0..plan.nodes).zip(targets) {
                        let vm = unused(VmId::generate, |id| Ok(store::get_vm(tx, id)?.is_some()))?;
                        addrs.assign(tx, &ws.id, &vm, group.is_some_and(|g| g.public_ip))?;
                        store::insert_vm(
                            tx,
                            &VmRow {
                                name: VmName::new(slot_id.clone(), vm.clone()).to_string(),
                                id: vm,
                                workspace_id: ws.id.clone(),
                                slot_id,
                                group: plan.group.clone(),
                                idx,
                                node: None,
                                state: VmState::Pending,
                                memory_mb: plan.memory_mb_per_node,
                                cpus: plan.cores_per_node,
                                image: group.map(|g| g.image.clone()).unwrap_or_default(),
                            },
                        )?;
                    }
                }
                store::push_timeline(
                    tx,
                    &ws.id,
                    now,
                    now,
                    Phase::Requested,
                    None,
                    None,
                    None,
                    &format!(
                        "{} VMs in {} slot(s) requested by {}{}",
                        spec.vm_count(),
                        plans.len(),
                        caller.user,
                        source_note(
                            self.cfg.pool.enabled(),
                            from_pool,
                            held.is_some(),
                            spec.urgency
                        )
                    ),
                )?;
                Ok::<_, EngineError>(None)
            })
        });
        let earlier = match stored {
            Ok(earlier) => earlier,
            Err(e) => {
                if let Some(row) = &held {
                    self.drop_unstored(row).await;
                }
                return Err(e);
            }
        };
        if let Some(id) = earlier {
            if let Some(row) = &held {
                self.drop_unstored(row).await;
            }
            info!(workspace_id = %id, owner = %caller.user, "create retried with its idempotency key: the same workspace");
            return Ok((id, true));
        }
        self.metrics.workspaces_created.inc();
        info!(workspace_id = %ws.id, owner = %caller.user, vms = spec.vm_count(), slots = slots.len(), "workspace requested");
        // Not from the pool: an urgent lease may take from best-effort ones.
        if !from_pool && self.place_urgent(&ws.id)? {
            return Ok((ws.id, false)); // on shared nodes: nothing to submit
        }
        for slot in &slots {
            if let Err(source) = self.submit_slot(slot).await {
                warn!(workspace_id = %ws.id, slot_id = %slot.id, error = %source, "pilot job submission failed");
                let reason = format!(
                    "submitting the pilot job for group {:?} failed: {source}",
                    slot.group
                );
                let now = self.clock.now_ms();
                self.with_store(|s| {
                    s.tx(|tx| fail_on_refused_submit(tx, &slot.id, &ws.id, &reason, now))
                })?;
                self.bump();
                self.kick.notify_one();
                return Err(EngineError::Submit {
                    workspace: ws.id.clone(),
                    source,
                });
            }
        }
        self.bump();
        Ok((ws.id, false))
    }

    /// Refuses an urgency above what the caller's `[[users]]` entry allows
    /// (`max_urgency`, 0 unless set; callers without an entry, such as the
    /// simulator's, may ask for 0 only).
    fn check_urgency(&self, caller: &Caller, urgency: u8) -> Result<(), EngineError> {
        if urgency == 0 {
            return Ok(());
        }
        let allowed = self
            .users
            .current()
            .iter()
            .find(|u| u.name == caller.user)
            .map_or(0, |u| u.max_urgency);
        if urgency > allowed {
            warn!(user = %caller.user, urgency, allowed, "urgency refused");
            return Err(EngineError::Forbidden(format!(
                "urgency {urgency} refused: user {:?} may ask for urgency up to {allowed} (max_urgency in the user's [[users]] entry of the coordinator's config; ask its admin)",
                caller.user
            )));
        }
        Ok(())
    }

    /// Writes the slot's key file and job directory, submits the pilot job, records its id.
    pub(super) async fn submit_slot(&self, slot: &SlotRow) -> Result<(), LrmError> {
        use std::os::unix::fs::OpenOptionsExt;
        let key = SlotKey::derive(&self.master, &slot.id).map_err(|e| LrmError::Config {
            lrm: "coordinator",
            message: e.to_string(),
        })?;
        let key_path = self
            .cfg
            .data_dir
            .join("keys")
            .join(format!("{}.key", slot.id));
        let write_key = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)?;
            std::io::Write::write_all(&mut f, format!("{}\n", key.to_hex()).as_bytes())
        };
        write_key().map_err(|source| LrmError::Io {
            path: key_path.clone(),
            source,
        })?;
        let workdir = self.cfg.data_dir.join("jobs").join(slot.id.as_str());
        // A resumed lease needs the time it had left, not its whole
        // duration; in a reservation the pilot starts `lead` before the lease.
        let (lease, held, pool, urgency) = self
            .with_store(|s| {
                let c = s.conn();
                let ws = must_ws(c, &slot.workspace_id)?;
                if super::pool::is_holder(&ws) {
                    // A pool job: the pool's walltime, no lease of its own.
                    let walltime = Duration::from_secs(self.cfg.pool.walltime_s);
                    return Ok((walltime, None, true, 0));
                }
                let left = match ws.state {
                    WorkspaceState::Resuming => store::get_suspension(c, &ws.id)?
                        .map(|k| Duration::from_millis(k.lease_left_ms.max(1000))),
                    _ => None,
                };
                // Room to renew: what `max_duration` asks beyond `duration`.
                let room = ws.spec.walltime().saturating_sub(ws.spec.duration.0);
                Ok((
                    left.unwrap_or(ws.spec.duration.0) + room,
                    store::reservation_of(c, &ws.id)?,
                    false,
                    ws.spec.urgency,
                ))
            })
            .map_err(|e: EngineError| LrmError::Config {
                lrm: "coordinator",
                message: e.to_string(),
            })?;
        // The walltime (`max_duration`) bounds renewals: the lease's own end
        // is the coordinator's timer, the pilot's deadline only a backstop.
        // A pool pilot holds its node for the pool's walltime, and its job
        // asks the batch system for all the memory a binding may take.
        let (pilot_duration, job_memory_mb) = if pool {
            let room = self
                .capacity
                .memory_mb_per_node
                .saturating_sub(self.cfg.pilot.min_dom0_mb);
            (lease, room)
        } else {
            let d = super::reserve::lead(held.as_ref())
                + lease
                + Duration::from_secs(self.cfg.pilot.startup_slack_s);
            (d, slot.memory_mb)
        };
        let job = SlotJob {
            name: format!("{}{}", self.job_prefix(), slot.id),
            nodes: slot.nodes,
            cores_per_node: slot.cores,
            memory_mb_per_node: job_memory_mb,
            walltime: pilot_duration + Duration::from_secs(self.cfg.pilot.walltime_margin_s),
            pilot_argv: self.pilot_argv(slot, &key_path, pilot_duration),
            workdir,
        };
        // Real time spent submitting (a measurement, not a rule: the clock
        // of the rules may be virtual).
        let started = Instant::now();
        let (job_id, queued) = match (&held, self.lrm.reservations()) {
            (Some(r), Some(resv)) => (resv.submit_into(&job, &r.lrm_id).await?, None),
            (Some(r), None) => {
                return Err(LrmError::Config {
                    lrm: "coordinator",
                    message: format!(
                        "workspace {} is held by {} reservation {}, but the {} adapter has no reservations",
                        slot.workspace_id,
                        r.lrm,
                        r.lrm_id,
                        self.lrm.kind()
                    ),
                })
            }
            (None, _) => {
                let (submitted, standing) = self.submit_queued(&job, lease, urgency).await?;
                (submitted.id.clone(), Some((submitted, standing)))
            }
        };
        // What was asked for the job's place in the queue, and a refusal
        // of it (the job waits all the same, only later).
        let mut queue_lines = Vec::new();
        if let Some((submitted, standing)) = &queued {
            if let Some(note) = super::order::asked_note(self.lrm.kind(), submitted, *standing) {
                queue_lines.push(note);
            }
            if let Some(why) = &submitted.refused {
                warn!(slot_id = %slot.id, job_id = %job_id, urgency, error = %why, "the batch system refused the pilot job's priority");
                queue_lines.push(format!(
                    "the {} batch system refused that ({why}): pilot job {job_id} waits in the order it was submitted (urgency.batch_priority = \"{}\")",
                    self.lrm.kind(),
                    self.cfg.urgency.batch_priority.as_str()
                ));
            }
        }
        let took = started.elapsed();
        info!(slot_id = %slot.id, job_id = %job_id, took_ms = took.as_millis() as u64, "pilot job submitted");
        let now = self.clock.now_ms();
        self.with_store(|s| {
            s.tx(|tx| {
                store::advance_job(tx, &slot.id, &JobInput::Submitted(job_id.0.clone()))?;
                let submitted = format!(
                    "{} job {}{} for group {:?}: {} node(s) x {} core(s) x {} MB (submit took {} ms)",
                    self.lrm.kind(),
                    job_id,
                    held.as_ref().map_or(String::new(), |r| format!(" in reservation {}", r.lrm_id)),
                    slot.group,
                    slot.nodes,
                    slot.cores,
                    slot.memory_mb,
                    took.as_millis()
                );
                for line in std::iter::once(&submitted).chain(&queue_lines) {
                    store::push_timeline(
                        tx,
                        &slot.workspace_id,
                        now,
                        now,
                        Phase::SlotSubmitted,
                        Some(&slot.id),
                        None,
                        None,
                        line,
                    )?;
                }
                Ok::<_, EngineError>(())
            })
        })
        .map_err(|e| LrmError::Config { lrm: "coordinator", message: e.to_string() })?;
        Ok(())
    }

    /// The pilot's argv as it goes into the job script (`%n` is expanded by the pilot).
    pub fn pilot_argv(&self, slot: &SlotRow, key_path: &Path, duration: Duration) -> Vec<String> {
        let p = &self.cfg.pilot;
        let mut argv = vec![
            self.pilot_program.display().to_string(),
            "run".into(),
            "--slot".into(),
            slot.id.to_string(),
            "--coordinator".into(),
            self.public_url.clone(),
            "--key-file".into(),
            key_path.display().to_string(),
            "--memory-mb".into(),
            slot.memory_mb.to_string(),
            "--duration-s".into(),
            duration.as_secs().to_string(),
            "--grace-s".into(),
            self.grace.as_secs().max(1).to_string(),
            "--state-dir".into(),
            p.state_dir.clone(),
            "--hypervisor".into(),
            p.hypervisor.to_string(),
            "--coordinator-wait-fraction".into(),
            p.coordinator_wait_fraction.to_string(),
            "--min-dom0-mb".into(),
            p.min_dom0_mb.to_string(),
            "--margin-s".into(),
            p.margin_s.to_string(),
            "--poll-wait-ms".into(),
            p.poll_wait_ms.to_string(),
            // A coordinator restarting while the job starts is waited for as
            // long as the slot's slack for starting up (the pilot's own
            // default, 30 s, is shorter than a restart may take).
            "--startup-budget-s".into(),
            p.startup_slack_s.max(1).to_string(),
        ];
        if p.hypervisor == crate::config::Hypervisor::Sim {
            argv.push("--sim-dir".into());
            argv.push(p.sim_dir.clone());
        }
        if let Some(ca) = &p.ca_file {
            argv.push("--ca-file".into());
            argv.push(ca.clone());
        }
        if let Some(nc) = &p.node_config {
            argv.push("--node-config".into());
            argv.push(nc.clone());
        }
        if slot.workspace_id == super::pool::holder_id() {
            // An idle pool slot: `--memory-mb` is what it holds while idle.
            argv.push("--pool".into());
        }
        argv.extend(p.extra_args.iter().cloned());
        argv
    }

    /// The limits of user `name` as configured now (none for a user the
    /// config does not list: the simulator's and tests' callers).
    pub fn limits_of(&self, name: &str) -> crate::limits::Limits {
        self.users()
            .current()
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.limits())
            .unwrap_or_default()
    }

    pub fn get(&self, caller: &Caller, id: &WorkspaceId) -> Result<WorkspaceView, EngineError> {
        self.with_store(|s| {
            let ws = visible_ws(s.conn(), caller, id)?;
            build_view(s.conn(), ws)
        })
        .map(|v| self.with_queue_reasons(v))
    }

    pub fn list(&self, caller: &Caller) -> Result<Vec<WorkspaceView>, EngineError> {
        self.with_store(|s| {
            store::list_workspaces(s.conn(), caller.owner_filter())?
                .into_iter()
                .map(|w| build_view(s.conn(), w))
                .collect::<Result<Vec<_>, _>>()
        })
        .map(|vs| vs.into_iter().map(|v| self.with_queue_reasons(v)).collect())
    }

    /// Starts the end of a workspace: release every slot. Idempotent.
    pub fn destroy(&self, caller: &Caller, id: &WorkspaceId) -> Result<WorkspaceView, EngineError> {
        let now = self.clock.now_ms();
        let view = self.with_store(|s| {
            s.tx(|tx| {
                let mut ws = visible_ws(tx, caller, id)?;
                if transition(tx, &mut ws, Input::DestroyRequested, None, now)? {
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::DestroyRequested,
                        None,
                        None,
                        None,
                        &format!("by {}", caller.user),
                    )?;
                    end_slots(tx, &ws, now)?;
                    maybe_settle(tx, &mut ws, now)?;
                }
                build_view(tx, ws)
            })
        })?;
        info!(workspace_id = %id, user = %caller.user, "destroy requested");
        self.bump();
        self.kick.notify_one();
        Ok(view)
    }

    /// Timeline entries after `after`, waiting up to `wait` for new ones.
    pub async fn events(
        &self,
        caller: &Caller,
        id: &WorkspaceId,
        after: u64,
        wait: Duration,
    ) -> Result<EventsPage, EngineError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            // Only the state and its slots: not the whole view (every VM and
            // pilot) on each wake-up of a watcher.
            let page = self.with_store(|s| {
                let ws = visible_ws(s.conn(), caller, id)?;
                let events = store::timeline_after(s.conn(), id, after)?;
                let slots = store::slots_of(s.conn(), id)?;
                Ok(EventsPage {
                    events,
                    state: ws.state,
                    settled: is_settled(ws.state, &slots),
                })
            })?;
            if !page.events.is_empty() || page.settled || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    /// Ends every live workspace, as an admin would one by one (used by
    /// `serve --end-leases-on-exit`). Returns the workspaces it ended.
    pub fn end_all(&self) -> Result<Vec<WorkspaceId>, EngineError> {
        let admin = Caller {
            user: "coordinator shutdown".into(),
            admin: true,
        };
        let live: Vec<WorkspaceId> = self.with_store(|s| {
            Ok(store::active_workspaces(s.conn())?
                .into_iter()
                .filter(|w| lifecycle::wants_slots(w.state))
                .map(|w| w.id)
                .collect())
        })?;
        let live: Vec<WorkspaceId> = live
            .into_iter()
            .filter(|id| *id != super::pool::holder_id())
            .collect();
        for id in &live {
            self.destroy(&admin, id)?;
        }
        // The pool gives its slots back too (its tick does, as leases unbind).
        self.close_pool();
        self.kick.notify_one();
        Ok(live)
    }

    /// Workspaces not yet settled (something may still be held somewhere),
    /// the slot pool counting as one while it holds a slot.
    pub fn unsettled(&self) -> Result<usize, EngineError> {
        let holder = super::pool::holder_id();
        let leases = self.with_store(|s| {
            Ok(store::active_workspaces(s.conn())?
                .into_iter()
                .filter(|w| w.id != holder)
                .count())
        })?;
        Ok(leases + usize::from(self.pool_holds_slots()?))
    }
}

/// The lowest free addresses of each pool, taken once per create; all or nothing.
pub(super) struct AddressPlan<'p> {
    pools: &'p Pools,
    free: HashMap<&'static str, std::vec::IntoIter<std::net::Ipv4Addr>>,
}

impl<'p> AddressPlan<'p> {
    fn new(c: &Connection, pools: &'p Pools, spec: &WorkspaceSpec) -> Result<Self, EngineError> {
        let mut free = HashMap::new();
        let public: u32 = spec
            .groups
            .iter()
            .filter(|g| g.public_ip)
            .map(|g| g.count)
            .sum();
        for (name, need) in [("private", spec.vm_count()), ("public", public)] {
            if let (Some(pool), true) = (pools.get(name), need > 0) {
                let used = store::used_ips(c, name)?;
                free.insert(name, pool.allocate(&used, need as usize)?.into_iter());
            }
        }
        Ok(Self { pools, free })
    }

    /// Gives `vm` its NICs: private, then public if asked.
    fn assign(
        &mut self,
        c: &Connection,
        ws: &WorkspaceId,
        vm: &VmId,
        public: bool,
    ) -> Result<(), EngineError> {
        let mut idx = 0;
        for (name, wanted) in [("private", true), ("public", public)] {
            let (Some(pool), true) = (self.pools.get(name), wanted) else {
                continue;
            };
            let Some(ip) = self.free.get_mut(name).and_then(|it| it.next()) else {
                return Err(NetError::Exhausted {
                    pool: name.to_string(),
                    needed: 1,
                    free: 0,
                    range: String::new(),
                }
                .into());
            };
            let nic = protocol::pilot::Nic {
                mac: network::derive_mac(ws, vm, idx),
                ip,
                prefix_len: pool.prefix_len,
                gateway: pool.gateway,
                pool: name.to_string(),
            };
            store::insert_address(c, ws, vm, idx, &nic)?;
            idx += 1;
        }
        Ok(())
    }
}

/// Most draws of an id before giving up (each collides with odds of rows / 2^32).
const ID_DRAWS: u32 = 64;

/// A fresh id no row holds yet. Ids are 32 random bits: a coordinator that
/// has made tens of thousands of workspaces or VMs would otherwise draw one
/// it already holds, and fail that create (the simulator did, at 11,000 VMs).
fn unused<T>(
    mut draw: impl FnMut() -> T,
    taken: impl Fn(&T) -> Result<bool, StoreError>,
) -> Result<T, EngineError> {
    for _ in 0..ID_DRAWS {
        let id = draw();
        if !taken(&id)? {
            return Ok(id);
        }
    }
    Err(StoreError::Corrupt {
        what: "ids",
        detail: format!("{ID_DRAWS} random ids in a row are taken"),
    }
    .into())
}

/// Stores a new, unsubmitted slot of `ws` for `plan` (at create, and for a
/// resume's new slots).
pub(super) fn insert_new_slot(
    c: &Connection,
    ws: &WorkspaceId,
    plan: &SlotPlan,
    now: u64,
) -> Result<SlotRow, EngineError> {
    let slot = SlotRow {
        id: unused(SlotId::generate, |id| Ok(store::get_slot(c, id)?.is_some()))?,
        workspace_id: ws.clone(),
        group: plan.group.clone(),
        nodes: plan.nodes,
        cores: plan.cores_per_node,
        memory_mb: plan.memory_mb_per_node,
        state: SlotState::Submitted,
        job: Job::Unsubmitted,
        created_ms: now,
    };
    store::insert_slot(c, &slot)?;
    Ok(slot)
}

/// What the timeline says of where a new lease's VMs come from, and of
/// its urgency: from idle pool slots, or through the batch system (and why
/// not from the pool).
fn source_note(pool: bool, from_pool: bool, held: bool, urgency: u8) -> String {
    let mut note = pool_note(pool, from_pool, held, urgency);
    if urgency > 0 && !from_pool && !held {
        // engine::urgent says what it took, after this line.
        note.push_str(", unless it can take from best-effort leases (urgency 2 shares a node under CPU caps; urgency 1 and 2 suspend leases when the cluster is full)");
    }
    note
}

/// [`source_note`] of the pool's choice alone.
fn pool_note(pool: bool, from_pool: bool, held: bool, urgency: u8) -> String {
    let urgent = match urgency {
        0 => String::new(),
        u => format!("urgency {u}, "),
    };
    match (pool, from_pool, held) {
        (_, true, _) => format!("; {urgent}from idle pool slots, no batch queue"),
        (true, false, true) => format!("; {urgent}through the batch system's reservation"),
        (true, false, false) => format!(
            "; {urgent}through the batch system: not enough idle pool slots fit it (their number{}, their remaining walltime, their nodes' size)",
            if urgency == 0 { " beyond pool.min_idle_nodes, kept for urgent leases" } else { "" }
        ),
        (false, false, _) if urgency > 0 => format!(
            "; {urgent}through the batch system: this coordinator has no slot pool ([pool] min_idle_nodes = 0)"
        ),
        (false, false, _) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_already_held_is_drawn_again() {
        let held = [WorkspaceId::parse("ws-00000001").expect("id")];
        let mut draws = ["ws-00000001", "ws-00000001", "ws-00000002"].into_iter();
        let id = unused(
            || WorkspaceId::parse(draws.next().expect("a draw")).expect("id"),
            |id| Ok(held.contains(id)),
        )
        .expect("a fresh id");
        assert_eq!(id.as_str(), "ws-00000002");
        let e = unused(WorkspaceId::generate, |_| Ok(true)).expect_err("never free");
        assert!(e.to_string().contains("64 random ids"), "{e}");
    }
}
