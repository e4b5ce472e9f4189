//! The coordinator with a real OpenPBS 23.06 (`lrm = "pbspro"`) on this
//! host (scripts/pbs-up.sh openpbs): the coordinator runs as the service user
//! that owns the pilot jobs, pilots start through pbsdsh on the execution
//! hosts pbsn1 and pbsn2 (each a mom in a network namespace of its own).
//! Scenarios in tests/src/pbs.rs. Skipped only when openpbs is neither built
//! nor has a source tarball; fails when it is built and does not come up.

use std::sync::Mutex;
use wsp_e2e::pbs::{self, pbs_server};

/// One server and its two execution hosts: the tests take turns.
static TURN: Mutex<()> = Mutex::new(());

macro_rules! scenario {
    ($name:ident) => {
        #[test]
        fn $name() {
            let Some(s) = pbs_server("openpbs") else {
                return;
            };
            let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
            pbs::$name(s);
        }
    };
}

scenario!(lease_runs_on_the_node_and_destroy_leaves_nothing);
scenario!(qdel_is_handled_as_preemption_within_kill_delay);
scenario!(lease_end_releases_the_node_and_ends_the_job);
scenario!(coordinator_refuses_a_grace_longer_than_kill_delay);
scenario!(two_node_lease_runs_a_pilot_on_each_host_and_destroy_leaves_nothing);
scenario!(qdel_of_a_two_node_lease_preempts_it_and_restores_both_hosts);
