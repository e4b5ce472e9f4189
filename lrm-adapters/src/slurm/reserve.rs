//! Slurm advance reservations: `scontrol create reservation
//! ReservationName=<name> StartTime=<UTC> Duration=<min> NodeCnt=<n>
//! Users=<coordinator's user> [PartitionName=<partition>]`, pilot jobs
//! submitted with `sbatch --reservation=<name>`, `scontrol show reservation`
//! and `scontrol delete reservation`. Creating a reservation needs Slurm
//! operator rights (root and SlurmUser have them; a site may grant them with
//! `sacctmgr modify user <u> set adminlevel=operator`).
//!
//! Slurm grants a reservation only on nodes no running job holds past its
//! start (job end = start + time limit), so a granted reservation is a
//! guarantee. When Slurm says no, the earliest start offered is found by
//! asking again at the candidate times Slurm itself would free nodes (the
//! running jobs' and other reservations' end times, and a minute after
//! each), at most [`PROBES`] times, deleting each probe at once.
//!
//! Over suspendable best-effort jobs ([`ReservationRequest::preemptible`]:
//! the coordinator will end them before the start): Slurm is asked for the
//! nodes by name with `Flags=IGNORE_JOBS`, which Slurm grants over running
//! jobs, so the adapter itself picks nodes that no *other* job holds past the
//! start and no other reservation holds then (free nodes first, then the
//! preemptible jobs' nodes). Once those jobs end, only the reservation's own
//! jobs start on its nodes.
//!
//! Every command runs with `TZ=UTC`: scontrol reads and prints times in its
//! own time zone.

use super::{Slurm, LRM};
use crate::batch_common::Runner;
use crate::reserve::{
    parse_utc_stamp, utc_stamp, Reservation, ReservationRequest, Reservations, ReserveError,
};
use crate::{CommandOutput, JobId, LrmError, SlotJob};
use async_trait::async_trait;
use std::path::Path;

/// How many candidate starts are tried for an earliest-start offer.
pub const PROBES: usize = 12;

fn minutes_up(d: std::time::Duration) -> u64 {
    d.as_secs().div_ceil(60).max(1)
}

/// The user the coordinator runs as (the reservation's `Users=`).
fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::geteuid().to_string(), |u| u.name)
}

/// `scontrol show reservation --oneliner` lines as key=value maps.
pub(crate) fn parse_reservations(stdout: &str) -> Vec<Reservation> {
    stdout
        .lines()
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            };
            let nodes = field("Nodes").unwrap_or("");
            Some(Reservation {
                id: field("ReservationName")?.to_string(),
                start_ms: parse_utc_stamp(field("StartTime")?)?,
                end_ms: parse_utc_stamp(field("EndTime")?)?,
                nodes: if nodes.is_empty() || nodes == "(null)" {
                    Vec::new()
                } else {
                    vec![nodes.to_string()]
                },
            })
        })
        .collect()
}

/// `squeue -h -t R,CG,S -o %e` lines: end times of jobs that hold nodes.
fn parse_ends(stdout: &str) -> Vec<u64> {
    stdout.lines().filter_map(parse_utc_stamp).collect()
}

/// A job that holds nodes (`squeue -h -t R,CG,S -o %i|%e|%N`): its id, its
/// end (`None`: no time limit) and its nodes as a Slurm hostlist.
#[derive(Debug, PartialEq, Eq)]
struct Holder {
    job: String,
    end_ms: Option<u64>,
    nodes: String,
}

fn parse_holders(stdout: &str) -> Vec<Holder> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (job, end, nodes) = (f.next()?, f.next()?, f.next()?);
            (!job.is_empty()).then(|| Holder {
                job: job.to_string(),
                end_ms: parse_utc_stamp(end),
                nodes: nodes.to_string(),
            })
        })
        .collect()
}

/// A node as `scontrol show nodes --oneliner` lists it.
#[derive(Debug, PartialEq, Eq)]
struct NodeInfo {
    name: String,
    usable: bool,
    cpus: u32,
    memory_mb: u64,
    partitions: Vec<String>,
}

fn parse_nodes(stdout: &str) -> Vec<NodeInfo> {
    stdout
        .lines()
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            };
            let state = field("State").unwrap_or("UNKNOWN");
            Some(NodeInfo {
                name: field("NodeName")?.to_string(),
                usable: ![
                    "DOWN",
                    "DRAIN",
                    "FAIL",
                    "NOT_RESPONDING",
                    "POWER",
                    "UNKNOWN",
                ]
                .iter()
                .any(|bad| state.contains(bad)),
                cpus: field("CPUTot").and_then(|v| v.parse().ok()).unwrap_or(0),
                memory_mb: field("RealMemory")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                partitions: field("Partitions")
                    .unwrap_or("")
                    .split(',')
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Which `want` nodes a reservation over `preemptible` jobs may name: usable
/// nodes big enough, in the partition, that no other job holds past
/// `start_ms` (a job without a time limit holds for ever) and that `taken`
/// (other reservations then) does not hold. Free nodes first, so as few
/// leases as possible are suspended. `Err` says why there are too few.
fn pick_nodes(
    nodes: &[NodeInfo],
    holders: &[(Holder, Vec<String>)],
    taken: &[String],
    req: &ReservationRequest,
    partition: Option<&str>,
) -> Result<Vec<String>, String> {
    let preemptible: Vec<&str> = req.preemptible.iter().map(|j| j.0.as_str()).collect();
    let mut free = Vec::new();
    let mut theirs = Vec::new();
    for n in nodes {
        let fits = n.usable
            && n.cpus >= req.cores_per_node
            && n.memory_mb >= req.memory_mb_per_node
            && partition.is_none_or(|p| n.partitions.iter().any(|q| q == p))
            && !taken.contains(&n.name);
        if !fits {
            continue;
        }
        let on: Vec<&Holder> = holders
            .iter()
            .filter(|(_, names)| names.contains(&n.name))
            .map(|(h, _)| h)
            .collect();
        let blocked = on.iter().any(|h| {
            !preemptible.contains(&h.job.as_str()) && h.end_ms.is_none_or(|e| e > req.start_ms)
        });
        if blocked {
            continue;
        }
        if on.iter().any(|h| preemptible.contains(&h.job.as_str())) {
            theirs.push(n.name.clone());
        } else {
            free.push(n.name.clone());
        }
    }
    let usable = free.len() + theirs.len();
    if usable < req.nodes as usize {
        return Err(format!(
            "only {usable} node(s) are free or held by suspendable best-effort jobs at the start ({} free, {} theirs); other jobs or reservations hold the rest",
            free.len(),
            theirs.len()
        ));
    }
    free.extend(theirs);
    free.truncate(req.nodes as usize);
    Ok(free)
}

impl Slurm {
    fn utc_runner(&self) -> Runner {
        let mut r = self.runner.clone();
        r.env.push(("TZ".into(), "UTC".into()));
        r
    }

    async fn scontrol(&self, args: &[String]) -> Result<CommandOutput, LrmError> {
        self.utc_runner()
            .run(Path::new(&self.config.scontrol), args)
            .await
    }

    async fn try_create(
        &self,
        name: &str,
        req: &ReservationRequest,
        start_ms: u64,
        over_jobs: Option<&[String]>,
    ) -> Result<CommandOutput, LrmError> {
        let now = protocol::now_ms();
        let start = if start_ms <= now + 1000 {
            "now".to_string()
        } else {
            utc_stamp(start_ms)
        };
        let mut args: Vec<String> = vec![
            "create".into(),
            "reservation".into(),
            format!("ReservationName={name}"),
            format!("StartTime={start}"),
            format!("Duration={}", minutes_up(req.duration)),
            format!("Users={}", current_user()),
        ];
        match over_jobs {
            Some(nodes) => {
                args.push(format!("Nodes={}", nodes.join(",")));
                args.push("Flags=IGNORE_JOBS".into());
            }
            None => args.push(format!("NodeCnt={}", req.nodes)),
        }
        if let Some(p) = &self.config.partition {
            args.push(format!("PartitionName={p}"));
        }
        self.scontrol(&args).await
    }

    async fn show(&self, name: Option<&str>) -> Result<Vec<Reservation>, LrmError> {
        let mut args = vec!["show".to_string(), "reservation".to_string()];
        args.extend(name.map(str::to_string));
        args.push("--oneliner".into());
        let out = self.scontrol(&args).await?;
        if !out.success() {
            let text = format!("{}{}", out.stdout, out.stderr);
            if text.contains("not found") || text.contains("No reservations") {
                return Ok(Vec::new());
            }
            return Err(crate::command::CommandError::Failed(out).into());
        }
        Ok(parse_reservations(&out.stdout))
    }

    /// `scontrol show hostnames <list>`: a Slurm hostlist (`n[1-3],m1`) as names.
    async fn hostnames(&self, list: &str) -> Result<Vec<String>, LrmError> {
        if list.is_empty() || list == "(null)" {
            return Ok(Vec::new());
        }
        let out = self
            .scontrol(&["show".into(), "hostnames".into(), list.into()])
            .await?;
        let out = crate::command::check(out)?;
        Ok(out.stdout.split_whitespace().map(str::to_string).collect())
    }

    /// The nodes a reservation over `req.preemptible` may name, or why not.
    async fn nodes_over_jobs(&self, req: &ReservationRequest) -> Result<Vec<String>, ReserveError> {
        let args: Vec<String> = ["show", "nodes", "--oneliner"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let nodes = parse_nodes(
            &crate::command::check(self.scontrol(&args).await?)
                .map_err(LrmError::from)?
                .stdout,
        );
        let args: Vec<String> = ["-h", "-t", "R,CG,S", "-o", "%i|%e|%N"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let out = self
            .utc_runner()
            .run(Path::new(&self.config.squeue), &args)
            .await?;
        let mut holders = Vec::new();
        for h in parse_holders(&crate::command::check(out).map_err(LrmError::from)?.stdout) {
            let names = self.hostnames(&h.nodes).await?;
            holders.push((h, names));
        }
        let end = req.start_ms + req.duration.as_millis() as u64;
        let mut taken = Vec::new();
        for r in self.show(None).await? {
            if r.start_ms < end && r.end_ms > req.start_ms {
                for list in &r.nodes {
                    taken.extend(self.hostnames(list).await?);
                }
            }
        }
        pick_nodes(
            &nodes,
            &holders,
            &taken,
            req,
            self.config.partition.as_deref(),
        )
        .map_err(|reason| ReserveError::Unavailable {
            reason: format!(
                "scontrol create reservation for {} node(s) from {}Z over suspendable jobs: {reason}",
                req.nodes,
                utc_stamp(req.start_ms)
            ),
            earliest_ms: None,
        })
    }

    /// `scontrol create reservation ... Nodes=<picked> Flags=IGNORE_JOBS`.
    async fn create_over_jobs(
        &self,
        req: &ReservationRequest,
    ) -> Result<Reservation, ReserveError> {
        let nodes = self.nodes_over_jobs(req).await?;
        let out = self
            .try_create(&req.name, req, req.start_ms, Some(&nodes))
            .await?;
        if !out.success() {
            return Err(ReserveError::Unavailable {
                reason: format!(
                    "{}: {}",
                    out.command,
                    format!("{}{}", out.stderr, out.stdout).trim()
                ),
                earliest_ms: None,
            });
        }
        tracing::info!(lrm = LRM, reservation = %req.name, nodes = ?nodes, over = ?req.preemptible, "reservation created over suspendable jobs");
        self.listed(req, out).await
    }

    /// The reservation just created, as Slurm lists it (node names expanded).
    async fn listed(
        &self,
        req: &ReservationRequest,
        out: CommandOutput,
    ) -> Result<Reservation, ReserveError> {
        match self.query(&req.name).await? {
            Some(r) => Ok(r),
            None => Err(LrmError::UnparsableStatus {
                command: out.command,
                reason: format!("reservation {} is not listed after its creation", req.name),
                output: out.stdout,
            }
            .into()),
        }
    }

    /// Candidate starts after `after`: when jobs and reservations free nodes.
    async fn candidates(&self, after: u64) -> Result<Vec<u64>, LrmError> {
        let args: Vec<String> = ["-h", "-t", "R,CG,S", "-o", "%e"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let out = self
            .utc_runner()
            .run(Path::new(&self.config.squeue), &args)
            .await?;
        let out = crate::command::check(out)?;
        let mut ends = parse_ends(&out.stdout);
        ends.extend(self.show(None).await?.iter().map(|r| r.end_ms));
        let mut c: Vec<u64> = ends
            .into_iter()
            .flat_map(|e| [e + 1000, e + 61_000])
            .filter(|&t| t > after)
            .collect();
        c.sort_unstable();
        c.dedup();
        c.truncate(PROBES);
        Ok(c)
    }
}

#[async_trait]
impl Reservations for Slurm {
    fn grants_over_preemptible(&self) -> bool {
        true
    }

    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        if !req.preemptible.is_empty() {
            return self.create_over_jobs(req).await;
        }
        let out = self.try_create(&req.name, req, req.start_ms, None).await?;
        if out.success() {
            tracing::info!(lrm = LRM, reservation = %req.name, nodes = req.nodes, "reservation created");
            return self.listed(req, out).await;
        }
        let refusal = out
            .stderr
            .lines()
            .chain(out.stdout.lines())
            .find(|l| l.starts_with("Error creating the reservation"))
            .map(|l| {
                l.trim_start_matches("Error creating the reservation: ")
                    .trim()
            })
            .unwrap_or(out.stderr.trim())
            .to_string();
        if !refusal.contains("busy") && !refusal.contains("not available") {
            // Not a matter of time (bad partition, no operator rights, ...).
            return Err(LrmError::from(crate::command::CommandError::Failed(out)).into());
        }
        let probe = format!("{}-probe", req.name);
        let mut earliest = None;
        for t in self.candidates(req.start_ms).await? {
            if self.try_create(&probe, req, t, None).await?.success() {
                self.delete(&probe).await?;
                earliest = Some(t);
                break;
            }
        }
        Err(ReserveError::Unavailable {
            reason: format!(
                "scontrol create reservation for {} node(s) from {}Z: {refusal}",
                req.nodes,
                utc_stamp(req.start_ms)
            ),
            earliest_ms: earliest,
        })
    }

    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError> {
        let Some(mut r) = self.show(Some(id)).await?.into_iter().find(|r| r.id == id) else {
            return Ok(None);
        };
        let mut names = Vec::new();
        for list in &r.nodes {
            names.extend(self.hostnames(list).await?);
        }
        r.nodes = names;
        Ok(Some(r))
    }

    async fn delete(&self, id: &str) -> Result<(), LrmError> {
        let out = self
            .scontrol(&["delete".into(), "reservation".into(), id.into()])
            .await?;
        if out.success() || out.stderr.contains("invalid") || out.stderr.contains("not found") {
            return Ok(());
        }
        Err(crate::command::CommandError::Failed(out).into())
    }

    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError> {
        crate::batch_common::check_directive_word(LRM, "reservation", id)?;
        self.submit_with(job, &[format!("--reservation={id}")])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_show_reservation_oneliners_are_read() {
        let out = "ReservationName=wsp-try StartTime=2026-11-29T10:03:01 EndTime=2026-11-29T10:08:01 Duration=00:05:00 Nodes=n[1-2] NodeCnt=2 CoreCnt=4 Features=(null) PartitionName=debug Flags= TRES=cpu=4 Users=root Groups=(null) Accounts=(null) Licenses=(null) State=INACTIVE BurstBuffer=(null) Watts=n/a MaxStartDelay=(null)\n";
        let r = parse_reservations(out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, "wsp-try");
        assert_eq!(r[0].end_ms - r[0].start_ms, 300_000);
        assert_eq!(utc_stamp(r[0].start_ms), "2026-11-29T10:03:01");
        assert_eq!(r[0].nodes, vec!["n[1-2]"]);
        assert!(parse_reservations("No reservations in the system\n").is_empty());
        assert_eq!(
            parse_ends("2026-11-29T10:03:01\nN/A\n"),
            vec![parse_utc_stamp("2026-11-29T10:03:01").unwrap()]
        );
    }

    /// Recorded from Slurm 22.05 here (`scontrol show nodes --oneliner`,
    /// n3 made up from n2 as a drained node).
    const NODES: &str = "NodeName=n1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=7.94 AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=localhost Port=17001 Version=22.05.8 OS=Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1000 AllocMem=0 FreeMem=7552 Sockets=2 Boards=1 State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  BootTime=2026-11-29T05:16:07 SlurmdStartTime=2026-11-29T12:46:27 LastBusyTime=2026-11-29T12:46:54 CfgTRES=cpu=2,mem=1000M,billing=2 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
NodeName=n2 Arch=x86_64 CoresPerSocket=1  CPUAlloc=2 CPUEfctv=2 CPUTot=2 CPULoad=7.94 AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=localhost Port=17002 Version=22.05.8 OS=Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1000 AllocMem=0 FreeMem=7552 Sockets=2 Boards=1 State=ALLOCATED ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  BootTime=2026-11-29T05:16:08 SlurmdStartTime=2026-11-29T12:46:28 LastBusyTime=2026-11-29T12:46:54 CfgTRES=cpu=2,mem=1000M,billing=2 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
NodeName=n3 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=7.94 AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=localhost Port=17003 Version=22.05.8 OS=Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1000 AllocMem=0 FreeMem=7552 Sockets=2 Boards=1 State=IDLE+DRAIN ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  BootTime=2026-11-29T05:16:08 SlurmdStartTime=2026-11-29T12:46:28 LastBusyTime=2026-11-29T12:46:54 CfgTRES=cpu=2,mem=1000M,billing=2 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
";

    fn req(nodes: u32, preemptible: &[&str]) -> ReservationRequest {
        ReservationRequest {
            name: "wsp-ws-1".into(),
            start_ms: parse_utc_stamp("2026-11-29T12:40:00").unwrap(),
            duration: std::time::Duration::from_secs(600),
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 512,
            preemptible: preemptible.iter().map(|j| JobId(j.to_string())).collect(),
        }
    }

    #[test]
    fn nodes_over_suspendable_jobs_are_picked_free_first_and_never_over_other_jobs() {
        let nodes = parse_nodes(NODES);
        assert_eq!(nodes.len(), 3);
        assert!(nodes[0].usable && nodes[1].usable && !nodes[2].usable);
        assert_eq!((nodes[0].cpus, nodes[0].memory_mb), (2, 1000));
        assert_eq!(nodes[0].partitions, vec!["debug"]);
        // squeue -h -t R,CG,S -o '%i|%e|%N', recorded.
        let holders = parse_holders("209|2026-11-29T12:41:20|n2\n");
        assert_eq!(holders[0].job, "209");
        let holders: Vec<(Holder, Vec<String>)> = holders
            .into_iter()
            .map(|h| (h, vec!["n2".into()]))
            .collect();
        // Job 209 is the best-effort lease's: n1 (free) first, then n2.
        assert_eq!(
            pick_nodes(&nodes, &holders, &[], &req(1, &["209"]), None),
            Ok(vec!["n1".to_string()])
        );
        assert_eq!(
            pick_nodes(&nodes, &holders, &[], &req(2, &["209"]), Some("debug")),
            Ok(vec!["n1".to_string(), "n2".to_string()])
        );
        // Someone else's job on n2 past the start: never granted over it.
        let e = pick_nodes(&nodes, &holders, &[], &req(2, &["77"]), None).unwrap_err();
        assert!(e.starts_with("only 1 node(s)"), "{e}");
        // Another reservation holds n1 then; a drained n3 does not count.
        assert!(pick_nodes(&nodes, &holders, &["n1".into()], &req(2, &["209"]), None).is_err());
        // A job that ends before the start does not hold the node.
        let early = parse_holders("300|2026-11-29T12:39:00|n2\n");
        let early: Vec<(Holder, Vec<String>)> =
            early.into_iter().map(|h| (h, vec!["n2".into()])).collect();
        assert_eq!(
            pick_nodes(&nodes, &early, &[], &req(2, &["209"]), None),
            Ok(vec!["n1".to_string(), "n2".to_string()])
        );
        // Too big, or another partition: nothing.
        let mut big = req(1, &["209"]);
        big.memory_mb_per_node = 2000;
        assert!(pick_nodes(&nodes, &holders, &[], &big, None).is_err());
        assert!(pick_nodes(&nodes, &holders, &[], &req(1, &["209"]), Some("gpu")).is_err());
    }
}
