//! PBS Pro (OpenPBS) advance reservations: `pbs_rsub -I -<block> -R
//! <start> -D <seconds> -l select=N:ncpus=C:mem=Mmb -l place=scatter:excl -N
//! <name>`, pilot jobs submitted into the reservation's queue (`qsub -q
//! R123`), `pbs_rstat -f <id>`, `pbs_rdel <id>`. Any PBS user may make
//! reservations unless the server's `resv_enable` is false; the jobs in one
//! must be its owner's (the coordinator's user, who submits them).
//!
//! `pbs_rsub` only asks: the scheduler confirms or denies the reservation a
//! moment later. `-I -<block>` makes pbs_rsub wait for that answer (at most
//! `block` seconds, below the command timeout) and prints `R123.server
//! CONFIRMED` or `DENIED`; with a negative block time the server deletes a
//! reservation still unconfirmed then, so a wait that runs out leaves
//! nothing behind (and the adapter deletes it too, to be sure). A denied
//! reservation is gone at once.
//!
//! PBS confirms a reservation only on resources that no running job's
//! walltime and no other reservation reaches into, so a confirmed one is a
//! guarantee; `place=scatter:excl` makes it hold whole hosts, one chunk
//! each, as a lease's pilots need. PBS does not say when it could confirm
//! one: the earliest start offered is found by probing
//! ([`crate::reserve::earliest_by_probing`]), each probe deleted at once.
//!
//! Commands run with `TZ=UTC`: pbs_rsub reads and pbs_rstat prints local
//! times (`-R` as `[[CC]YY]MMDDhhmm[.SS]`, `reserve_start` as `ctime()`).

use super::{Flavour, Pbs};
use crate::batch_common::Runner;
use crate::reserve::{
    earliest_by_probing, parse_ctime, touch_stamp, utc_stamp, Reservation, ReservationRequest,
    Reservations, ReserveError,
};
use crate::{command, CommandOutput, JobId, LrmError, SlotJob};
use async_trait::async_trait;
use std::path::PathBuf;

/// What `pbs_rsub -I` answered: the reservation's id and state.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub id: String,
    pub state: String,
}

/// The last `R<n>.<server> <STATE>` line of pbs_rsub's output.
pub(crate) fn parse_rsub(stdout: &str) -> Option<Answer> {
    stdout.lines().rev().find_map(|l| {
        let mut w = l.split_whitespace();
        let (id, state) = (w.next()?, w.next()?);
        let seq = id.strip_prefix('R')?.split('.').next()?;
        (!seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) && w.next().is_none()).then(
            || Answer {
                id: id.to_string(),
                state: state.to_string(),
            },
        )
    })
}

/// `pbs_rstat -f`: `Resv ID: R1.server` then `key = value` lines (not
/// indented, unlike qstat's) -> (id, attributes).
fn rstat_records(stdout: &str) -> Vec<(String, std::collections::HashMap<String, String>)> {
    let mut recs: Vec<(String, std::collections::HashMap<String, String>)> = Vec::new();
    for line in stdout.lines() {
        if let Some(id) = line.trim().strip_prefix("Resv ID:") {
            recs.push((id.trim().to_string(), Default::default()));
        } else if let (Some((_, attrs)), Some((k, v))) =
            (recs.last_mut(), line.trim().split_once(" = "))
        {
            attrs.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    recs
}

/// `pbs_rstat -f` records as reservations: start, end, the hosts of
/// `resv_nodes` (`(pbsn1:ncpus=1)+(pbsn2:ncpus=1)`).
pub(crate) fn parse_rstat(stdout: &str) -> Result<Vec<Reservation>, String> {
    rstat_records(stdout)
        .into_iter()
        .map(|(id, attrs)| {
            let time = |k: &str| {
                attrs
                    .get(k)
                    .and_then(|v| parse_ctime(v))
                    .ok_or_else(|| format!("reservation {id}: no readable {k}"))
            };
            let nodes = attrs
                .get("resv_nodes")
                .map_or("", String::as_str)
                .split('+')
                .filter_map(|chunk| {
                    let host = chunk.trim().trim_start_matches('(').split(':').next()?;
                    (!host.is_empty()).then(|| host.to_string())
                })
                .collect();
            Ok(Reservation {
                start_ms: time("reserve_start")?,
                end_ms: time("reserve_end")?,
                id,
                nodes,
            })
        })
        .collect()
}

/// `R123.server` -> the reservation's queue, `R123`.
fn queue_of(id: &str) -> Option<&str> {
    let q = id.split('.').next()?;
    let digits = q.strip_prefix('R')?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(q)
}

impl Pbs {
    fn utc_runner(&self) -> Runner {
        let mut r = self.runner.clone();
        r.env.push(("TZ".into(), "UTC".into()));
        r
    }

    /// pbs_rsub, pbs_rstat, pbs_rdel: beside the configured qsub.
    fn tool(&self, name: &str) -> PathBuf {
        match self.qsub.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
            _ => PathBuf::from(name),
        }
    }

    async fn run_resv(&self, tool: &str, args: &[String]) -> Result<CommandOutput, LrmError> {
        self.utc_runner().run(&self.tool(tool), args).await
    }

    /// How long pbs_rsub waits for the scheduler: below the command timeout.
    fn block_s(&self) -> u64 {
        self.runner.timeout.as_secs().saturating_sub(5).clamp(2, 60)
    }

    /// `pbs_rsub -I -<block> ...`: the answer, with anything but a
    /// confirmation deleted. `Ok(Some)` confirmed, `Ok(None)` denied.
    async fn rsub(
        &self,
        name: &str,
        req: &ReservationRequest,
        start_ms: u64,
    ) -> Result<Option<String>, LrmError> {
        // PBS refuses a start in the past; an immediate lease starts in 5 s.
        let start = start_ms.max(protocol::now_ms() + 5000);
        let args = vec![
            "-I".to_string(),
            format!("-{}", self.block_s()),
            "-R".into(),
            touch_stamp(start),
            "-D".into(),
            req.duration.as_secs().max(60).to_string(),
            "-l".into(),
            format!(
                "select={}:ncpus={}:mem={}mb",
                req.nodes,
                req.cores_per_node.max(1),
                req.memory_mb_per_node.max(1)
            ),
            "-l".into(),
            "place=scatter:excl".into(),
            "-N".into(),
            name.into(),
        ];
        let out = self.run_resv("pbs_rsub", &args).await?;
        let answer = parse_rsub(&out.stdout).filter(|_| out.success());
        match answer {
            Some(a) if a.state == "CONFIRMED" => Ok(Some(a.id)),
            Some(a) if a.state == "DENIED" => Ok(None),
            Some(a) => {
                // Not answered within the block time: never leave it behind.
                self.delete(&a.id).await?;
                Err(LrmError::UnparsableStatus {
                    command: out.command,
                    reason: format!(
                        "reservation {} is {} after {} s: the scheduler neither confirmed nor denied it (is it running?); deleted",
                        a.id,
                        a.state,
                        self.block_s()
                    ),
                    output: out.stdout,
                })
            }
            None => Err(command::CommandError::Failed(out).into()),
        }
    }

    async fn rstat(&self, id: &str) -> Result<Option<Reservation>, LrmError> {
        let out = self
            .run_resv("pbs_rstat", &["-f".into(), id.into()])
            .await?;
        let said = format!("{}{}", out.stdout, out.stderr);
        if said.contains("Unknown Reservation Id") {
            return Ok(None);
        }
        let out = command::check(out)?;
        let all = parse_rstat(&out.stdout).map_err(|reason| LrmError::UnparsableStatus {
            command: out.command.clone(),
            reason,
            output: out.stdout.clone(),
        })?;
        Ok(all.into_iter().find(|r| r.id == id))
    }
}

#[async_trait]
impl Reservations for Pbs {
    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        if self.flavour != Flavour::PbsPro {
            return Err(LrmError::Config {
                lrm: self.flavour.name(),
                message: "reservations are made through PBS Pro's pbs_rsub only".into(),
            }
            .into());
        }
        if let Some(id) = self.rsub(&req.name, req, req.start_ms).await? {
            tracing::info!(lrm = self.flavour.name(), reservation = %id, name = %req.name, "advance reservation confirmed");
            return match self.rstat(&id).await? {
                Some(r) => Ok(r),
                None => Err(LrmError::UnparsableStatus {
                    command: format!("pbs_rstat -f {id}"),
                    reason: format!("reservation {id} is not listed after it was confirmed"),
                    output: String::new(),
                }
                .into()),
            };
        }
        let probe = format!("{}-probe", req.name);
        let earliest = earliest_by_probing(req.start_ms, |t| {
            let probe = probe.clone();
            async move {
                match self.rsub(&probe, req, t).await? {
                    Some(id) => {
                        self.delete(&id).await?;
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
        })
        .await?;
        Err(ReserveError::Unavailable {
            reason: format!(
                "pbs_rsub for {} node(s) from {}Z: DENIED by the scheduler (the hosts are busy then: running jobs' walltime or another reservation)",
                req.nodes,
                utc_stamp(req.start_ms)
            ),
            earliest_ms: earliest,
        })
    }

    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError> {
        self.rstat(id).await
    }

    async fn delete(&self, id: &str) -> Result<(), LrmError> {
        let out = self.run_resv("pbs_rdel", &[id.into()]).await?;
        let said = format!("{}{}", out.stdout, out.stderr);
        if out.success() || said.contains("Unknown Reservation Id") {
            return Ok(());
        }
        Err(command::CommandError::Failed(out).into())
    }

    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError> {
        let Some(queue) = queue_of(id) else {
            return Err(LrmError::Config {
                lrm: self.flavour.name(),
                message: format!("reservation id {id:?} is not like R123.server"),
            });
        };
        self.submit_with(job, &["-q".to_string(), queue.to_string()])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reserve::parse_utc_stamp;

    /// Recorded from OpenPBS 23.06 here (tests/fixtures/README.md).
    const RSTAT: &str = include_str!("../../tests/fixtures/pbspro/pbs_rstat-f.txt");
    const RSUB: &str = include_str!("../../tests/fixtures/pbspro/pbs_rsub-I.txt");

    #[test]
    fn pbs_rsub_and_pbs_rstat_outputs_of_a_real_server_are_read() {
        let answers: Vec<Answer> = RSUB.lines().filter_map(parse_rsub).collect();
        assert_eq!(
            answers[0],
            Answer {
                id: "R216.pbshost".into(),
                state: "CONFIRMED".into()
            }
        );
        assert_eq!(answers[1].state, "DENIED");
        assert_eq!(answers[2].state, "UNCONFIRMED");
        assert_eq!(parse_rsub("pbs_rsub: Bad time specification(s)\n"), None);
        let r = parse_rstat(RSTAT).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, "R216.pbshost");
        assert_eq!(Some(r[0].start_ms), parse_utc_stamp("2026-11-29T13:03:39"));
        assert_eq!(r[0].end_ms - r[0].start_ms, 300_000);
        assert_eq!(r[0].nodes, vec!["pbsn1", "pbsn2"]);
        assert!(parse_rstat("Resv ID: R1.s\nreserve_start = never\n").is_err());
        assert_eq!(queue_of("R216.pbshost"), Some("R216"));
        assert_eq!(queue_of("R216"), Some("R216"));
        assert_eq!(queue_of("216.pbshost"), None);
        assert_eq!(queue_of("R.x"), None);
    }

    #[test]
    fn only_pbs_pro_makes_reservations() {
        use crate::pbs::PbsConfig;
        use crate::Lrm;
        let pro = Pbs::new(Flavour::PbsPro, PbsConfig::default()).unwrap();
        assert!(pro.reservations().is_some());
        let torque = Pbs::new(Flavour::Torque, PbsConfig::default()).unwrap();
        assert!(torque.reservations().is_none());
    }
}
