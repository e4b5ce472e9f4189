//! Guaranteed leases on a real OpenPBS 23.06 (scripts/pbs-up.sh openpbs;
//! run under the system lock): `pbs_rsub -I` as the coordinator's user
//! (the service user that owns the pilot jobs), pilot jobs with `qsub -q
//! R<n>` on the execution hosts pbsn1 and pbsn2. Skipped only when openpbs
//! is neither built nor has a source tarball, like tests/tests/openpbs.rs.
//!
//! Tolerance: the VMs run no earlier than the staging lead (10 s) before
//! the start and no later than 5 s after it.

use std::sync::Mutex;
use std::time::Duration;
use wsp_e2e::pbs::{pbs_server, PbsServer, TWO};
use wsp_e2e::*;

/// One server and its two execution hosts: the tests take turns.
static TURN: Mutex<()> = Mutex::new(());

const LEAD_S: i64 = 10;

fn cluster(s: &PbsServer) -> Cluster {
    s.cluster_with(&format!(
        "\n[reservations]\nlead_s = {LEAD_S}\nhorizon_s = 86400\n"
    ))
}

/// TWO (two VMs, a pilot on each host) with `extra` lines and a duration.
fn two(extra: &str, duration: &str) -> String {
    format!(
        "{extra}\n{}",
        TWO.replace("duration = \"1h\"", &format!("duration = \"{duration}\""))
    )
}

/// The server's reservations of ours (`pbs_rstat -f`): `name id state` lines.
fn reservations(s: &PbsServer) -> Vec<String> {
    let out = s.admin("pbs_rstat", &["-f"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    let (mut id, mut name) = (String::new(), String::new());
    for line in text.lines().map(str::trim) {
        if let Some(i) = line.strip_prefix("Resv ID:") {
            id = i.trim().to_string();
        } else if let Some(n) = line.strip_prefix("Reserve_Name = ") {
            name = n.to_string();
        } else if let Some(st) = line.strip_prefix("reserve_state = ") {
            if name.starts_with("wsp-") {
                found.push(format!("{name} {id} {st}"));
            }
        }
    }
    found
}

/// Waits (30 s at most) until the server has none of ours: a reservation
/// that has begun is RESV_BEING_DELETED for a moment after pbs_rdel.
fn wait_no_reservations(s: &PbsServer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = reservations(s);
        if left.is_empty() {
            return;
        }
        assert!(
            left.iter().all(|r| r.ends_with("RESV_BEING_DELETED"))
                && std::time::Instant::now() < deadline,
            "reservations left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn offered_start(error: &str) -> String {
    let (_, rest) = error
        .split_once("(start = \"")
        .unwrap_or_else(|| panic!("no offered start in {error:?}"));
    rest.split('"').next().unwrap().to_string()
}

fn released(c: &Cluster, id: &str) {
    c.wait_for(id, "released", Duration::from_secs(30), |v| {
        v["reservation"]
            .as_str()
            .is_some_and(|r| r.ends_with("(released)"))
    });
}

#[test]
fn openpbs_reservation_runs_its_vms_at_its_start_and_is_deleted_after() {
    let Some(s) = pbs_server("openpbs") else {
        return;
    };
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    // A job of an earlier test may still be exiting: its walltime holds the hosts.
    s.wait_idle();
    let c = cluster(s);
    let r = c.create(&two("start = \"+25s\"", "1h"));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let start = r.body["start_ms"].as_u64().unwrap();
    let held = reservations(s);
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].ends_with("RESV_CONFIRMED"), "{held:?}");
    let resv_id = held[0].split_whitespace().nth(1).unwrap().to_string();
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    assert!(
        protocol::now_ms() < start + 5000,
        "running {} ms after its start",
        protocol::now_ms().saturating_sub(start)
    );
    for vm in v["vms"].as_array().unwrap() {
        let off = vm["start_offset_ms"].as_i64().expect("offset");
        assert!((-LEAD_S * 1000..=5000).contains(&off), "{off} ms: {v:#}");
    }
    // The pilot job runs in the reservation's queue (R<n>).
    let job = v["slots"][0]["job_id"].as_str().unwrap().to_string();
    let out = s.admin("qstat", &["-f", &job]);
    let text = String::from_utf8_lossy(&out.stdout);
    let queue = resv_id.split('.').next().unwrap();
    assert!(
        text.contains(&format!("queue = {queue}")),
        "the pilot job runs in {queue}: {text}"
    );
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_settled(&id);
    released(&c, &id);
    wait_no_reservations(s);
    c.assert_nodes_restored();
}

#[test]
fn openpbs_refuses_with_the_earliest_start_and_a_reservation_cancelled_before_its_start_is_deleted()
{
    let Some(s) = pbs_server("openpbs") else {
        return;
    };
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    // A job of an earlier test may still be exiting: its walltime holds the hosts.
    s.wait_idle();
    let c = cluster(s);
    // A best-effort lease holds both hosts for its walltime.
    let busy = c.create(&two("", "2m"));
    assert_eq!(busy.status, 201, "{}", busy.body);
    let busy_id = busy.body["id"].as_str().unwrap().to_string();
    c.wait_for(&busy_id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    let r = c.create(&two("start = \"+30s\"", "10m"));
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("reservation refused: pbspro: pbs_rsub for 2 node(s)")
            && error.contains("DENIED"),
        "{error}"
    );
    let imm = c.create(&two("kind = \"immediate\"", "10m"));
    assert_eq!(imm.status, 409, "{}", imm.body);
    assert_eq!(
        reservations(s),
        Vec::<String>::new(),
        "no probe left behind"
    );
    // The offered start is granted when asked for, then cancelled before it.
    let offered = offered_start(error);
    let r = c.create(&two(&format!("start = \"{offered}\""), "10m"));
    assert_eq!(r.status, 201, "offered {offered}: {}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(reservations(s).len(), 1);
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    released(&c, &id);
    assert_eq!(
        reservations(s),
        Vec::<String>::new(),
        "deleted with pbs_rdel"
    );
    assert_eq!(c.destroy_as(TOKEN, &busy_id).status, 200);
    c.wait_settled(&busy_id);
    s.wait_idle();
}
