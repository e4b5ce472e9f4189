//! Grid Engine advance reservations: `qrsub -a <start> -d <seconds> -pe
//! <pe> <slots> -N <name> [-q <queue>]` (granted: `Your advance reservation
//! <id> has been granted`), pilot jobs with `qsub -ar <id>`, `qrstat -ar <id>
//! -xml`, `qrdel <id>`. The cell's global config must allow them
//! (`max_advance_reservations` > 0; scripts/sge-up.sh sets 64), and the
//! coordinator's user must be in the `arusers` access list (or a manager,
//! as root is).
//!
//! Grid Engine grants an AR only where no job runs past its start (by the
//! jobs' `h_rt`, which every pilot job has), so a granted AR is a guarantee.
//! It does not say when it could grant one: the earliest start offered is
//! found by probing ([`crate::reserve::earliest_by_probing`]: 1, 2, 4, ...
//! minutes later, then narrowed to 15 s), each probe deleted at once.
//! Commands run with `TZ=UTC`: qrsub and qrstat read and print local times.

use super::{GridEngine, PeSlots, LRM};
use crate::batch_common::Runner;
use crate::reserve::{
    earliest_by_probing, parse_utc_stamp, utc_stamp, Reservation, ReservationRequest, Reservations,
    ReserveError,
};
use crate::{CommandOutput, JobId, LrmError, SlotJob};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

/// `qrsub -a` wants `[[CC]YY]MMDDhhmm[.SS]`.
fn qrsub_time(ms: u64) -> String {
    crate::reserve::touch_stamp(ms)
}

/// The AR id of `Your advance reservation 12 has been granted`.
pub(crate) fn parse_granted(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("Your advance reservation ")?;
        let (id, tail) = rest.split_once(' ')?;
        (tail.starts_with("has been granted") && id.bytes().all(|b| b.is_ascii_digit()))
            .then(|| id.to_string())
    })
}

/// `qrstat -ar <id> -xml`: the AR summary (start, end, granted hosts).
pub(crate) fn parse_qrstat(xml: &str) -> Result<Option<Reservation>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let Some(ar) = doc.descendants().find(|n| n.has_tag_name("ar_summary")) else {
        return Ok(None);
    };
    let text = |tag: &str| {
        ar.children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(str::trim)
    };
    let time = |tag: &str| {
        text(tag)
            .and_then(parse_utc_stamp)
            .ok_or_else(|| format!("no readable <{tag}>"))
    };
    let nodes = ar
        .descendants()
        .filter(|n| n.has_tag_name("granted_slots"))
        .filter_map(|n| n.attribute("queue_instance"))
        .filter_map(|q| q.split_once('@').map(|(_, h)| h.to_string()))
        .collect();
    Ok(Some(Reservation {
        id: text("id").ok_or("no <id>")?.to_string(),
        start_ms: time("start_time")?,
        end_ms: time("end_time")?,
        nodes,
    }))
}

impl GridEngine {
    fn utc_runner(&self) -> Runner {
        let mut r = self.runner.clone();
        r.env.push(("TZ".into(), "UTC".into()));
        r
    }

    /// qrsub, qrstat, qrdel: beside the configured qsub (same directory).
    fn tool(&self, name: &str) -> PathBuf {
        match self.config.qsub.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
            _ => PathBuf::from(name),
        }
    }

    async fn run_ar(&self, tool: &str, args: &[String]) -> Result<CommandOutput, LrmError> {
        self.utc_runner()
            .run(Path::new(&self.tool(tool)), args)
            .await
    }

    async fn qrsub(
        &self,
        name: &str,
        req: &ReservationRequest,
        start_ms: u64,
    ) -> Result<CommandOutput, LrmError> {
        let slots = match self.config.pe_slots {
            PeSlots::Nodes => req.nodes,
            PeSlots::Cores => req.nodes * req.cores_per_node,
        };
        let mut args = vec![
            "-a".to_string(),
            qrsub_time(start_ms.max(protocol::now_ms())),
            "-d".into(),
            req.duration.as_secs().max(60).to_string(),
            "-pe".into(),
            self.config.parallel_environment.clone(),
            slots.to_string(),
            "-N".into(),
            name.into(),
        ];
        if let Some(q) = &self.config.queue {
            args.extend(["-q".to_string(), q.clone()]);
        }
        self.run_ar("qrsub", &args).await
    }
}

#[async_trait]
impl Reservations for GridEngine {
    /// Grid Engine 8.1.9 books a running job until its start + `h_rt` and
    /// grants an AR only where no booking reaches into it; neither can be
    /// changed for a running job (`qalter -l h_rt` is accepted, but qrsub
    /// still counts the old end: seen here). Suspending the leases first and
    /// reserving after would let any queued job take the freed slots, so no
    /// guarantee: such reservations are refused (docs/RESERVATIONS.md).
    fn why_not_over_preemptible(&self) -> String {
        "Grid Engine grants an advance reservation only on slots that no running job's h_rt reaches into, and cannot be told that those jobs will end \
         (qalter -l h_rt does not move a running job's end for qrsub); suspending them first would free the slots for any queued job, which is no guarantee"
            .into()
    }

    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        let out = self.qrsub(&req.name, req, req.start_ms).await?;
        if let Some(id) = parse_granted(&out.stdout).filter(|_| out.success()) {
            tracing::info!(lrm = LRM, reservation = %id, name = %req.name, "advance reservation granted");
            return match self.query(&id).await? {
                Some(r) => Ok(r),
                None => Err(LrmError::UnparsableStatus {
                    command: out.command,
                    reason: format!("advance reservation {id} is not listed after it was granted"),
                    output: out.stdout,
                }
                .into()),
            };
        }
        let said = format!("{} {}", out.stdout.trim(), out.stderr.trim());
        if !said.contains("no suitable queues") {
            // Not a matter of time (ARs disabled, not in arusers, bad PE, ...).
            return Err(LrmError::from(crate::command::CommandError::Failed(out)).into());
        }
        let probe = format!("{}-probe", req.name);
        let earliest = earliest_by_probing(req.start_ms, |t| {
            let probe = probe.clone();
            async move {
                let out = self.qrsub(&probe, req, t).await?;
                match parse_granted(&out.stdout) {
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
                "qrsub for {} node(s) from {}Z: {}",
                req.nodes,
                utc_stamp(req.start_ms),
                said.trim()
            ),
            earliest_ms: earliest,
        })
    }

    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError> {
        let out = self
            .run_ar("qrstat", &["-ar".into(), id.into(), "-xml".into()])
            .await?;
        let said = format!("{}{}", out.stdout, out.stderr);
        if said.contains("do not exist") {
            return Ok(None);
        }
        let out = crate::command::check(out)?;
        parse_qrstat(&out.stdout).map_err(|reason| LrmError::UnparsableStatus {
            command: out.command.clone(),
            reason,
            output: out.stdout.clone(),
        })
    }

    async fn delete(&self, id: &str) -> Result<(), LrmError> {
        let out = self.run_ar("qrdel", &[id.into()]).await?;
        let said = format!("{}{}", out.stdout, out.stderr);
        if out.success() || said.contains("does not exist") {
            return Ok(());
        }
        Err(crate::command::CommandError::Failed(out).into())
    }

    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LrmError::Config {
                lrm: LRM,
                message: format!("advance reservation id {id:?} is not a number"),
            });
        }
        self.submit_with(job, &["-ar".to_string(), id.to_string()])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qrsub_and_qrstat_outputs_of_a_real_cell_are_read() {
        assert_eq!(
            parse_granted("Your advance reservation 12 has been granted\n").as_deref(),
            Some("12")
        );
        assert_eq!(
            parse_granted("advance_reservation: no suitable queues\n"),
            None
        );
        let xml = r#"<?xml version='1.0'?>
<qrstat xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qrstat/qrstat.xsd">
   <ar_summary>
      <id>1</id>
      <name>wsp-try</name>
      <owner>root</owner>
      <state>w</state>
      <start_time>2026-11-29T10:08:43</start_time>
      <end_time>2026-11-29T10:18:43</end_time>
      <duration>00:10:00</duration>
      <granted_slots_list>
         <granted_slots  queue_instance="all.q@localhost" slots="2"/>
      </granted_slots_list>
   </ar_summary>
</qrstat>"#;
        let r = parse_qrstat(xml).unwrap().unwrap();
        assert_eq!(r.id, "1");
        assert_eq!(r.end_ms - r.start_ms, 600_000);
        assert_eq!(r.nodes, vec!["localhost"]);
        assert_eq!(qrsub_time(r.start_ms), "202611291008.43");
    }
}
