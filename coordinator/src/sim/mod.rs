//! The simulator: the coordinator's own engine, rules, state tables and
//! policy replaying a workload trace in virtual time
//! (`workspace-coordinator simulate`).
//!
//! Only the clock ([`crate::clock::ManualClock`]), the batch system
//! ([`batch::BatchModel`], behind the same `Lrm` trait as the real
//! adapters) and the pilots and hypervisor (modelled timings and injected
//! failures, speaking through the engine's typed entries) are simulated;
//! the database is SQLite in memory. `run` is the loop, `report` the
//! figures, `trace` the formats read, `config` what can be modelled,
//! `replay` the same requests sent to a real coordinator (the fidelity
//! check). docs/SIMULATION.md says what the model assumes.

pub mod batch;
pub mod cli;
pub mod config;
pub mod experiment;
pub mod replay;
pub mod report;
pub mod run;
pub mod trace;
pub mod urgent;

use crate::clock::ManualClock;
use crate::config::{Config, PilotConfig};
use crate::engine::{Engine, EngineError, Parts};
use config::SimConfig;
use lrm_adapters::Capacity;
use std::sync::Arc;
use std::time::Duration;
use trace::Trace;

/// Why a simulation could not run (as opposed to a run cut short, which
/// still reports, as such).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Trace(#[from] trace::TraceError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("setting up the simulation: {0}")]
    Setup(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Where a trace starts when it does not say (2000-01-01T00:00:00Z).
pub const DEFAULT_START_MS: u64 = 946_684_800_000;

/// One lease request, as both the simulator and `replay` send it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Request {
    /// The trace's job number (injected requests: 0).
    pub id: u64,
    /// Its line in the trace (injected: 0).
    pub line: usize,
    /// From the start of the trace, scaled.
    pub submit_ms: u64,
    pub nodes: u32,
    /// What the job ran for, scaled: how long its VMs are wanted.
    pub run_ms: u64,
    /// The lease's duration: run time with the runtime overhead, in whole
    /// seconds (the spec's unit), at least 1 s.
    pub lease_ms: u64,
    /// The batch system's runtime estimate: the trace's requested time,
    /// scaled, plus the coordinator's margins.
    pub estimate_ms: u64,
    pub memory_mb: u64,
    pub image: String,
    pub injected: bool,
    /// Urgency 0-2 (injected requests may ask for 1 or 2; issue 17).
    pub urgency: u8,
    /// An advance reservation (Haizea's, or a generated one).
    pub reservation: bool,
    /// Its start, from the start of the trace, scaled: the lease is a
    /// reservation at that time (`None`: best effort).
    pub start_ms: Option<u64>,
}

impl Request {
    /// The spec a client would send for this request: one VM per node (of
    /// one vCPU: the model has no CPU, so more would change nothing but
    /// which clusters it fits).
    pub fn spec_toml(&self) -> String {
        format!(
            "name = \"job-{}\"\nduration = {}\nurgency = {}\n[[group]]\nname = \"job\"\ncount = {}\nmemory_mb = {}\ncpus = 1\nimage = \"{}\"\n",
            self.id,
            self.lease_ms / 1000,
            self.urgency,
            self.nodes,
            self.memory_mb,
            self.image
        )
    }
}

/// The cluster a trace is replayed on, and why that size.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClusterSize {
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
    pub from: String,
}

/// The cluster: as configured, else the trace's header, else its largest request.
pub fn cluster_size(trace: &Trace, cfg: &SimConfig) -> ClusterSize {
    let c = &cfg.cluster;
    let (nodes, from) = match (c.nodes, trace.max_procs, trace.max_nodes) {
        (Some(n), _, _) => (n, "configured".to_string()),
        (None, Some(p), _) => (
            (p / c.cores_per_node).max(1),
            format!(
                "the trace's MaxProcs {p} / {} cores per node",
                c.cores_per_node
            ),
        ),
        (None, None, Some(n)) => (n, "the trace's MaxNodes".to_string()),
        (None, None, None) => {
            let most = trace
                .jobs
                .iter()
                .map(|j| j.processors.div_ceil(c.cores_per_node))
                .max()
                .unwrap_or(1);
            (
                most,
                "the trace's largest request (it does not say; set --nodes)".to_string(),
            )
        }
    };
    ClusterSize {
        nodes,
        cores_per_node: c.cores_per_node,
        memory_mb_per_node: c.memory_mb_per_node,
        from,
    }
}

/// The trace's jobs (the first `trace.jobs` of them) and the injected
/// requests, in submit order, scaled by `trace.time_scale`.
pub fn requests(trace: &Trace, cfg: &SimConfig) -> Vec<Request> {
    let scale = cfg.trace.time_scale;
    let ms = |s: f64| (s * 1000.0 / scale).round() as u64;
    let co = &cfg.coordinator;
    let margins = (co.startup_slack_s + co.walltime_margin_s) * 1000;
    let usable = cfg
        .cluster
        .memory_mb_per_node
        .saturating_sub(co.min_dom0_mb)
        .max(protocol::spec::MIN_MEMORY_MB);
    let memory = |own: Option<u64>| {
        cfg.trace
            .vm_memory_mb
            .or(own.filter(|m| *m <= usable && *m >= protocol::spec::MIN_MEMORY_MB))
            .unwrap_or(usable)
    };
    let lease = |run_ms: u64| {
        let with = run_ms as f64 * (1.0 + cfg.policy.runtime_overhead_pct / 100.0);
        ((with / 1000.0).ceil() as u64).max(1) * 1000
    };
    let take = cfg.trace.jobs.unwrap_or(usize::MAX);
    let first_s = trace.jobs.first().map_or(0.0, |j| j.submit_s);
    let mut out: Vec<Request> = trace
        .jobs
        .iter()
        .take(take)
        .map(|j| {
            let run_ms = ms(j.run_s);
            Request {
                id: j.id,
                line: j.line,
                submit_ms: ms(j.submit_s - first_s),
                nodes: j.processors.div_ceil(cfg.cluster.cores_per_node),
                run_ms,
                lease_ms: lease(run_ms),
                estimate_ms: ms(j.requested_s) + margins,
                memory_mb: memory(j.memory_mb),
                image: j.image.clone().unwrap_or_else(|| "trace-image".into()),
                injected: false,
                urgency: 0,
                reservation: j.reservation,
                start_ms: j.start_s.map(|s| ms(s - first_s)),
            }
        })
        .collect();
    for inj in &cfg.inject {
        for k in 0..inj.count {
            let at = inj.at_s + inj.every_s * f64::from(k);
            let run_ms = ms(inj.run_s);
            out.push(Request {
                id: 0,
                line: 0,
                submit_ms: ms(at),
                nodes: inj.nodes,
                run_ms,
                lease_ms: lease(run_ms),
                estimate_ms: lease(run_ms) + margins,
                memory_mb: memory(None),
                image: "injected-image".into(),
                injected: true,
                urgency: inj.urgency,
                reservation: false,
                start_ms: None,
            });
        }
    }
    out.sort_by_key(|r| r.submit_ms);
    out
}

/// Runs `trace` as `cfg` says; `limits` may cut it short (it then says so).
pub fn simulate(
    trace: &Trace,
    cfg: &SimConfig,
    limits: &run::Limits,
    progress: impl FnMut(u64, usize),
) -> Result<report::Report, SimError> {
    cfg.validate()?;
    let size = cluster_size(trace, cfg);
    let requests = requests(trace, cfg);
    // The first request's own date when the trace says when it began.
    let first_ms = trace
        .jobs
        .first()
        .map_or(0, |j| (j.submit_s * 1000.0) as u64);
    let t0 = trace
        .unix_start_s
        .map_or(DEFAULT_START_MS, |s| s * 1000 + first_ms);
    let clock = Arc::new(ManualClock::new(t0));
    let capacity = Capacity {
        nodes: size.nodes,
        cores_per_node: size.cores_per_node,
        memory_mb_per_node: size.memory_mb_per_node,
    };
    let grace = Duration::from_secs_f64(cfg.batch.grace_s);
    let batch = Arc::new(
        batch::BatchModel::new(clock.clone(), cfg.batch.scheduler, capacity, grace)
            .preempt_for_reservations(cfg.batch.preempt_for_reservations),
    );
    // The engine still writes each slot's key file: on tmpfs when there is
    // one (a file on disk cost more than the rest of a lease's work).
    let shm = std::path::Path::new("/dev/shm");
    let mut dir = tempfile::Builder::new();
    dir.prefix("wsp-simulate-");
    let data = if shm.is_dir() {
        dir.tempdir_in(shm)
    } else {
        dir.tempdir()
    }
    .map_err(|e| SimError::Setup(format!("a temporary directory: {e}")))?;
    let co = &cfg.coordinator;
    let engine_cfg = Config {
        data_dir: data.path().join("coordinator"),
        cluster: Some(capacity),
        lrm_poll_s: co.lrm_poll_s,
        pilot_silence_s: co.pilot_silence_s,
        pilot: PilotConfig {
            min_dom0_mb: co.min_dom0_mb,
            coordinator_wait_fraction: co.coordinator_wait_fraction,
            margin_s: co.margin_s,
            startup_slack_s: co.startup_slack_s,
            walltime_margin_s: co.walltime_margin_s,
            grace_s: Some(grace.as_secs().max(1)),
            ..PilotConfig::default()
        },
        reservations: crate::config::ReservationsConfig {
            best_effort_order: if cfg.policy.largest_first {
                crate::config::BestEffortOrder::LargestFirst
            } else {
                crate::config::BestEffortOrder::Arrival
            },
            ..Default::default()
        },
        // The trace's requests come from one caller, who may ask for any
        // urgency (the injected urgent requests, issue 17).
        users: vec![crate::config::User {
            name: "trace".into(),
            token_sha256: "0".repeat(64),
            admin: true,
            max_vms: None,
            max_memory_mb: None,
            max_lease_s: None,
            max_workspaces: None,
            max_urgency: protocol::spec::MAX_URGENCY,
        }],
        pool: cfg.pool.clone(),
        ..Config::default()
    };
    if cfg.pool != crate::config::PoolConfig::default() {
        // The server's own checks of `[pool]` (bounds, share, memory; a
        // `max_nodes` without `min_idle_nodes` is refused, not ignored).
        engine_cfg
            .validate()
            .map_err(|e| config::ConfigError(e.to_string()))?;
    }
    let policy = crate::policy::by_name(&cfg.policy.name)
        .ok_or_else(|| config::ConfigError(format!("unknown policy {:?}", cfg.policy.name)))?;
    let parts = Parts {
        clock: clock.clone(),
        policy,
        in_memory: true,
        ..Parts::default()
    };
    let engine = Engine::with_parts(engine_cfg, batch.clone(), "http://simulated".into(), parts)?;
    let outcome = run::run(cfg, &requests, engine, batch, clock, limits, progress)?;
    let report = report::Report::new(cfg, &size, trace, &requests, outcome, t0)?;
    drop(data);
    Ok(report)
}

#[cfg(test)]
mod tests;
