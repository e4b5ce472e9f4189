//! What a simulation models, as one TOML file (`simulate --config`): the
//! cluster, the batch system, the nodes (pilot and hypervisor timings),
//! failures to inject, the coordinator's own settings, the policy and its
//! options, and requests to inject on top of the trace. Every key has a
//! default; unknown keys are refused, so a typo is an error.
//!
//! Options for the policies to come (suspend/resume, reservations, a warm
//! pool) belong in [`PolicyOptions`] and [`Injection`]; until the engine
//! has them, asking for them is refused by [`SimConfig::validate`], never
//! silently ignored.

use super::batch::Scheduler;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub cluster: ClusterModel,
    pub batch: BatchModelConfig,
    pub nodes: NodeModel,
    pub failures: Failures,
    pub coordinator: CoordinatorModel,
    pub policy: PolicyOptions,
    pub trace: TraceOptions,
    /// Requests added to the trace's (issue 17: urgent requests).
    pub inject: Vec<Injection>,
    /// The coordinator's `[pool]` (issue 17, docs/POOL.md), the same keys:
    /// pool slots go through the batch model as pilot jobs, the simulated
    /// pilots answer `bind`, `unbind` and `reserve`. `warm_images` is
    /// refused: warm snapshots are not modelled.
    pub pool: crate::config::PoolConfig,
}

/// The machines: N identical nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterModel {
    /// Nodes; default: the trace's `MaxNodes` (or `MaxProcs` / cores per
    /// node), else the largest request in the trace.
    pub nodes: Option<u32>,
    /// Processors per node: a job of P processors asks ceil(P / this) nodes.
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
}

impl Default for ClusterModel {
    fn default() -> Self {
        Self {
            nodes: None,
            cores_per_node: 1,
            memory_mb_per_node: 4096,
        }
    }
}

/// The batch system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchModelConfig {
    pub scheduler: Scheduler,
    /// From a job's start to its processes running on every node.
    pub start_latency_s: f64,
    /// Between the warning signal and SIGKILL.
    pub grace_s: f64,
    /// Haizea's way with reservations (seed 002's suspend configurations):
    /// jobs outside a reservation may run on its nodes until it begins,
    /// and are preempted (warning signal) a grace before it does; with
    /// `policy.suspend_resume` their leases are suspended and resumed
    /// later. Off: its nodes are fenced, as the local batch system and
    /// Slurm do, and only the leases running when it was granted are
    /// suspended for it (the engine's own rule).
    pub preempt_for_reservations: bool,
}

impl Default for BatchModelConfig {
    fn default() -> Self {
        Self {
            scheduler: Scheduler::Easy,
            start_latency_s: 1.0,
            grace_s: 30.0,
            preempt_for_reservations: false,
        }
    }
}

/// The pilots and the hypervisor on each node (defaults: the published
/// evaluation's Xen figures, balloon 743.6 ms and restore 1317.2 ms).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeModel {
    /// A pilot's start to its memory reserved.
    pub reserve_s: f64,
    /// A VM's boot, once its image is on the node.
    pub boot_s: f64,
    /// Destroying a node's VMs.
    pub destroy_s: f64,
    /// Giving the memory back to dom0.
    pub restore_s: f64,
    /// Copy each VM's image to its node before it boots.
    pub deploy_images: bool,
    pub image_mb: u64,
    pub network_mbps: f64,
    /// Images a node keeps between leases (0: none); a cached image is not copied.
    pub image_cache: u32,
    /// Guest memory saved per second to the checkpoint store (suspend).
    pub save_mb_per_s: f64,
    /// Guest memory restored per second from the store (resume).
    pub restore_mb_per_s: f64,
}

impl Default for NodeModel {
    fn default() -> Self {
        Self {
            reserve_s: 0.7436,
            boot_s: 0.0,
            destroy_s: 0.5,
            restore_s: 1.3172,
            deploy_images: false,
            image_mb: 600,
            network_mbps: 100.0,
            image_cache: 0,
            // The kvm figures measured here end to end (BENCHMARKS.md), rounded.
            save_mb_per_s: 200.0,
            restore_mb_per_s: 300.0,
        }
    }
}

/// Failures to inject, as probabilities (0 to 1), drawn from one seeded generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Failures {
    pub seed: u64,
    /// A pilot's reservation fails (per pilot).
    pub reserve: f64,
    /// A VM fails to start (per VM).
    pub vm_start: f64,
    /// A pilot dies silently while its lease runs (per pilot; the node crashed).
    pub pilot_lost: f64,
    /// The batch system preempts a running job (per job, at a time drawn
    /// within its estimate).
    pub preempt: f64,
}

impl Default for Failures {
    fn default() -> Self {
        Self {
            seed: 1,
            reserve: 0.0,
            vm_start: 0.0,
            pilot_lost: 0.0,
            preempt: 0.0,
        }
    }
}

/// The coordinator's own settings that shape a lease (the server's keys of
/// the same names; defaults as the server's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorModel {
    pub lrm_poll_s: f64,
    pub pilot_silence_s: u64,
    pub startup_slack_s: u64,
    pub walltime_margin_s: u64,
    /// The pilot's own deadline comes this long before its slot ends.
    pub margin_s: u64,
    pub coordinator_wait_fraction: f64,
    pub min_dom0_mb: u64,
}

impl Default for CoordinatorModel {
    fn default() -> Self {
        let c = crate::config::Config::default();
        Self {
            lrm_poll_s: c.lrm_poll_s,
            pilot_silence_s: c.pilot_silence_s,
            startup_slack_s: c.pilot.startup_slack_s,
            walltime_margin_s: c.pilot.walltime_margin_s,
            margin_s: c.pilot.margin_s,
            coordinator_wait_fraction: c.pilot.coordinator_wait_fraction,
            min_dom0_mb: c.pilot.min_dom0_mb,
        }
    }
}

/// The policy and its options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyOptions {
    /// `exact-fit` (today's only policy).
    pub name: String,
    /// VMs run this much slower than the job did natively: a lease lasts
    /// its run time times (1 + this / 100).
    pub runtime_overhead_pct: f64,
    /// Nodes have a checkpoint store: a preempted lease whose save fits the
    /// grace is suspended whole and resumed in new slots (issue 16).
    pub suspend_resume: bool,
    /// Ours (issue 18): a suspended lease's new pilot job goes to the head
    /// of the batch queue (it is the oldest work), where the batch system
    /// lets the coordinator set a job's priority (Slurm: as an operator).
    pub resume_first: bool,
    /// Ours (issue 18): the engine's `[reservations] best_effort_order =
    /// "largest_first"`: best-effort pilot jobs queue by node-time, the
    /// largest first (the batch model orders its queue as the local batch
    /// system does).
    pub largest_first: bool,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            name: "exact-fit".into(),
            runtime_overhead_pct: 0.0,
            suspend_resume: false,
            resume_first: false,
            largest_first: false,
        }
    }
}

/// How trace jobs become lease requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceOptions {
    /// Memory per VM; default: a whole node less dom0's minimum (a trace's
    /// own figure, Haizea's, wins when it fits).
    pub vm_memory_mb: Option<u64>,
    /// Divide every time of the trace by this (2: twice as fast).
    pub time_scale: f64,
    /// Replay only the first N jobs.
    pub jobs: Option<usize>,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            vm_memory_mb: None,
            time_scale: 1.0,
            jobs: None,
        }
    }
}

/// Requests injected on top of the trace: `count` requests, the first at
/// `at_s` (seconds from the trace's start), then every `every_s`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    pub at_s: f64,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub every_s: f64,
    pub nodes: u32,
    pub run_s: f64,
    /// Urgency 0-2 (issue 17): 1 may suspend best-effort leases, 2 may
    /// also share their nodes under CPU caps (`engine::urgent`).
    #[serde(default)]
    pub urgency: u8,
}

fn one() -> u32 {
    1
}

/// A finite number above 0.
fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// A finite number of at least 0.
fn at_least_0(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// A model that cannot be run as asked.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("simulation config: {0}")]
pub struct ConfigError(pub String);

impl SimConfig {
    /// Reads a config file (TOML).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: SimConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses what cannot be simulated, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.cluster.cores_per_node == 0 {
            return bad("cluster.cores_per_node must be at least 1".into());
        }
        if self.cluster.nodes == Some(0) {
            return bad("cluster.nodes must be at least 1".into());
        }
        for (v, k) in [
            (self.batch.start_latency_s, "batch.start_latency_s"),
            (self.batch.grace_s, "batch.grace_s"),
            (self.nodes.reserve_s, "nodes.reserve_s"),
            (self.nodes.boot_s, "nodes.boot_s"),
            (self.nodes.destroy_s, "nodes.destroy_s"),
            (self.nodes.restore_s, "nodes.restore_s"),
            (
                self.policy.runtime_overhead_pct,
                "policy.runtime_overhead_pct",
            ),
        ] {
            if !at_least_0(v) {
                return bad(format!("{k} = {v}: must be a number of at least 0"));
            }
        }
        if self.nodes.deploy_images && !positive(self.nodes.network_mbps) {
            return bad("nodes.network_mbps must be positive to deploy images".into());
        }
        for (v, k) in [
            (self.failures.reserve, "failures.reserve"),
            (self.failures.vm_start, "failures.vm_start"),
            (self.failures.pilot_lost, "failures.pilot_lost"),
            (self.failures.preempt, "failures.preempt"),
            (
                self.coordinator.coordinator_wait_fraction,
                "coordinator.coordinator_wait_fraction",
            ),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{k} = {v}: must be between 0 and 1"));
            }
        }
        if !positive(self.coordinator.lrm_poll_s) {
            return bad("coordinator.lrm_poll_s must be positive".into());
        }
        if !positive(self.trace.time_scale) {
            return bad("trace.time_scale must be a positive number".into());
        }
        if crate::policy::by_name(&self.policy.name).is_none() {
            return bad(format!(
                "policy.name = {:?}: the policies are \"exact-fit\"",
                self.policy.name
            ));
        }
        if self.policy.suspend_resume
            && !(positive(self.nodes.save_mb_per_s) && positive(self.nodes.restore_mb_per_s))
        {
            return bad(
                "nodes.save_mb_per_s and nodes.restore_mb_per_s must be positive with policy.suspend_resume"
                    .into(),
            );
        }
        if self.policy.resume_first && !self.policy.suspend_resume {
            return bad("policy.resume_first needs policy.suspend_resume".into());
        }
        if self.batch.preempt_for_reservations && !self.policy.suspend_resume {
            return bad(
                "batch.preempt_for_reservations needs policy.suspend_resume (nothing could be suspended)"
                    .into(),
            );
        }
        if !self.pool.warm_images.is_empty() {
            return bad(
                "pool.warm_images: the simulator does not model warm snapshots (its pilots refuse prepare_warm); leave it out"
                    .into(),
            );
        }
        for (i, inj) in self.inject.iter().enumerate() {
            if inj.urgency > protocol::spec::MAX_URGENCY {
                return bad(format!(
                    "inject[{i}].urgency = {}: must be 0, 1 or 2",
                    inj.urgency
                ));
            }
            if inj.nodes == 0
                || !at_least_0(inj.run_s)
                || !at_least_0(inj.at_s)
                || !at_least_0(inj.every_s)
            {
                return bad(format!(
                    "inject[{i}]: nodes must be at least 1 and times at least 0"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_is_the_defaults_and_a_typo_is_an_error() {
        assert_eq!(
            SimConfig::parse("").expect("defaults"),
            SimConfig::default()
        );
        let e = SimConfig::parse("[nodes]\nboot = 3\n").expect_err("typo");
        assert!(e.to_string().contains("unknown field `boot`"), "{e}");
    }

    #[test]
    fn what_the_engine_cannot_do_yet_is_refused_not_ignored() {
        SimConfig::parse("[policy]\nsuspend_resume = true\n").expect("16 is in");
        for (text, key) in [
            ("[policy]\nresume_first = true\n", "policy.resume_first"),
            (
                "[batch]\npreempt_for_reservations = true\n",
                "batch.preempt_for_reservations",
            ),
        ] {
            let e = SimConfig::parse(text).expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = SimConfig::parse("[policy]\nsuspend_resume = true\n[nodes]\nsave_mb_per_s = 0\n")
            .expect_err("no rate");
        assert!(e.to_string().contains("nodes.save_mb_per_s"), "{e}");
        let e = SimConfig::parse("[[inject]]\nat_s = 1\nnodes = 1\nrun_s = 5\nurgency = 3\n")
            .expect_err("0-2");
        assert!(e.to_string().contains("inject[0].urgency = 3"), "{e}");
        let e = SimConfig::parse("[failures]\nreserve = 2\n").expect_err("probability");
        assert!(e.to_string().contains("failures.reserve"), "{e}");
        let ok = SimConfig::parse(
            "[batch]\nscheduler = \"fifo\"\n[[inject]]\nat_s = 60\ncount = 3\nevery_s = 600\nnodes = 2\nrun_s = 30\n",
        )
        .expect("valid");
        assert_eq!(ok.batch.scheduler, Scheduler::Fifo);
        assert_eq!(ok.inject[0].count, 3);
    }
}
