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
            format!("NodeCnt={}", req.nodes),
            format!("Users={}", current_user()),
        ];
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
    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        let out = self.try_create(&req.name, req, req.start_ms).await?;
        if out.success() {
            tracing::info!(lrm = LRM, reservation = %req.name, nodes = req.nodes, "reservation created");
            return match self.query(&req.name).await? {
                Some(r) => Ok(r),
                None => Err(LrmError::UnparsableStatus {
                    command: out.command,
                    reason: format!("reservation {} is not listed after its creation", req.name),
                    output: out.stdout,
                }
                .into()),
            };
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
            if self.try_create(&probe, req, t).await?.success() {
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
        Ok(self.show(Some(id)).await?.into_iter().find(|r| r.id == id))
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
}
