//! The PBS adapter's openpbs flavour against a real OpenPBS 23.06 (PBS Pro flavour) on this host
//! (scripts/pbs-build.sh openpbs, scripts/pbs-up.sh openpbs); the scenarios are
//! in pbs_real/mod.rs. Skipped only when openpbs is neither built nor has a
//! source tarball; about a minute.

mod pbs_real;

use pbs_real::*;
use wsp_lrm_adapters::pbs::Flavour;

const FLAVOUR: Flavour = Flavour::PbsPro;

macro_rules! scenario {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            let Some(s) = server(FLAVOUR) else { return };
            let _turn = turn().await;
            pbs_real::$name(s).await;
        }
    };
}

scenario!(cancel_sends_sigterm_then_sigkill_after_kill_delay);
scenario!(qdel_leaves_the_pilot_its_cleanup_and_the_job_ends_with_it);
scenario!(two_nodes_get_a_pilot_each_and_qdel_ends_both);
scenario!(batched_status_of_live_finished_and_unknown_ids);
scenario!(walltime_ends_the_job_as_timeout);
scenario!(cancel_is_retried_while_the_server_does_not_answer);
scenario!(grace_is_checked_against_the_queues_kill_delay);
scenario!(a_refused_submit_keeps_the_servers_message);
