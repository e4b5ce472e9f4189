//! End-to-end tests of `workspace-kill-all`: the real binary on a simulated
//! node left as a SIGKILLed pilot leaves it (set up through the pilot library).

use pilot::hypervisor::sim::{Sim, SimNode};
use pilot::hypervisor::{set_dom0_target_and_wait, Hypervisor};
use pilot::node::HypervisorRecord;
use pilot::state::{list_state_files, NodeStateFile, PilotState, VmRecord, VmRecordState};
use protocol::pilot::VmLaunch;
use protocol::{PilotId, SlotId, VmId, VmName};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const KILL_ALL: &str = env!("CARGO_BIN_EXE_workspace-kill-all");

/// A node where a pilot reserved 1024 MB, started two VMs (one recorded in
/// its state file, one not yet) and was SIGKILLed; plus a foreign guest.
struct Leftovers {
    _tmp: tempfile::TempDir,
    sim_dir: PathBuf,
    state_dir: PathBuf,
    slot: SlotId,
}

fn launch(slot: &SlotId, memory_mb: u64) -> VmLaunch {
    let vm_id = VmId::generate();
    VmLaunch {
        name: VmName::new(slot.clone(), vm_id.clone()).to_string(),
        vm_id,
        memory_mb,
        cpus: 1,
        image: "img".into(),
        image_source: None,
        nics: Vec::new(),
        hostname: None,
        context: None,
        on_preempt: Default::default(),
        restore: None,
        urgency: 0,
        cpu: None,
    }
}

fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

impl Leftovers {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let sim_dir = tmp.path().join("sim");
        let state_dir = tmp.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let sim = Sim::init(&sim_dir, &SimNode::new(4096, 2, Some(3840)), false).unwrap();
        sim.add_foreign_domain("alien", 256, 1).unwrap();
        let slot = SlotId::generate();
        set_dom0_target_and_wait(&sim, 2816, Duration::from_secs(1)).unwrap();
        let recorded = launch(&slot, 512);
        let unrecorded = launch(&slot, 256);
        sim.create(&recorded).unwrap();
        sim.create(&unrecorded).unwrap();
        let mut state = NodeStateFile {
            slot_id: slot.clone(),
            pilot_id: PilotId::generate(),
            pid: dead_pid(),
            node: "n1".into(),
            hypervisor: "sim".into(),
            state: PilotState::Reserved,
            original_dom0_mb: 3840,
            taken_mb: 1024,
            target_dom0_mb: 2816,
            reserved_mb: 0,
            workspace_id: None,
            vms: vec![VmRecord {
                vm_id: recorded.vm_id,
                name: recorded.name,
                memory_mb: 512,
                state: VmRecordState::Running,
                nics: Vec::new(),
                checkpoint: None,
            }],
            updated_ms: 0,
        };
        state.write(&state_dir).unwrap();
        Self {
            _tmp: tmp,
            sim_dir,
            state_dir,
            slot,
        }
    }

    fn sim(&self) -> Sim {
        Sim::open(&self.sim_dir).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .sim()
            .domains()
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        n.sort();
        n
    }

    fn dom0(&self) -> (u64, u64) {
        let m = self.sim().dom0_memory().unwrap();
        (m.current_mb, m.target_mb)
    }

    fn kill_all(&self, extra: &[&str]) -> Output {
        let sim_dir = self.sim_dir.display().to_string();
        let mut args = vec!["--sim-dir", &sim_dir, "--hypervisor", "sim"];
        args.extend(extra);
        self.kill_all_bare(&args)
    }

    /// kill-all with only the state dir, the node and `args`.
    fn kill_all_bare(&self, args: &[&str]) -> Output {
        std::process::Command::new(KILL_ALL)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--node", "n1"])
            .args(args)
            .output()
            .unwrap()
    }
}

fn node_json(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("node.json")).unwrap()
}

#[test]
fn leftovers_of_a_killed_pilot_are_destroyed_and_memory_restored_exactly() {
    let l = Leftovers::new();
    let out = l.kill_all(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        l.names(),
        vec!["alien".to_string()],
        "only the foreign guest is left"
    );
    assert_eq!(l.dom0(), (3840, 3840));
    assert!(list_state_files(&l.state_dir).unwrap().is_empty());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("destroy wsp-") && text.contains("restore-memory"),
        "{text}"
    );
}

/// Two slots on one node, the dead one having reserved second: its record
/// says dom0 had 3584 MB before (the other slot held 256 MB then), and the
/// other slot has since given its 256 MB back, so dom0 is 3840 MB less the
/// dead slot's 1024 MB. Restoring to that original would keep 256 MB from
/// dom0; kill-all adds back what the dead slot took instead.
#[test]
fn a_pilot_that_reserved_after_another_slot_gets_back_all_it_took() {
    let l = Leftovers::new();
    let path = list_state_files(&l.state_dir).unwrap().remove(0);
    let mut f = NodeStateFile::read(&path).unwrap();
    f.original_dom0_mb = 3584;
    f.write(&l.state_dir).unwrap();
    assert_eq!(l.dom0(), (2816, 2816));
    let out = l.kill_all(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(l.dom0(), (3840, 3840), "{text}");
}

#[test]
fn foreign_guest_is_destroyed_only_with_all() {
    let l = Leftovers::new();
    assert_eq!(l.kill_all(&[]).status.code(), Some(0));
    assert_eq!(l.names(), vec!["alien".to_string()]);
    let out = l.kill_all(&["--all"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(l.names().is_empty());
    assert_eq!(
        l.dom0(),
        (4096, 4096),
        "with no state file left, dom0 goes back to its maximum"
    );
}

#[test]
fn slot_flag_spares_other_slots_guests() {
    let l = Leftovers::new();
    let other = VmName::new(SlotId::generate(), VmId::generate()).to_string();
    // Another slot's pilot took 64 MB from dom0 for its guest.
    set_dom0_target_and_wait(&l.sim(), 2816 - 64, Duration::from_secs(1)).unwrap();
    l.sim().add_foreign_domain(&other, 64, 1).unwrap();
    let out = l.kill_all(&["--slot", l.slot.as_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut expected = vec!["alien".to_string(), other];
    expected.sort();
    assert_eq!(l.names(), expected);
    assert_eq!(
        l.dom0(),
        (3776, 3776),
        "the slot's 1024 MB are given back, the other slot keeps its 64"
    );
}

#[test]
fn dry_run_changes_nothing() {
    let l = Leftovers::new();
    let before = node_json(&l.sim_dir);
    let files = list_state_files(&l.state_dir).unwrap();
    let out = l.kill_all(&["--dry-run", "--all"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("would destroy alien"), "{text}");
    assert!(text.contains("would restore-memory"), "{text}");
    assert_eq!(node_json(&l.sim_dir), before, "node.json is byte-identical");
    assert_eq!(list_state_files(&l.state_dir).unwrap(), files);
}

#[test]
fn json_report_parses_and_lists_every_action() {
    let l = Leftovers::new();
    let out = l.kill_all(&["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["node"], "n1");
    let actions = report["actions"].as_array().unwrap();
    let count = |a: &str| {
        actions
            .iter()
            .filter(|x| x["action"] == a && x["result"] == "ok")
            .count()
    };
    assert_eq!(count("destroy"), 2);
    assert_eq!(count("restore-memory"), 1);
    assert_eq!(count("remove-state-file"), 1);
}

#[test]
fn clean_node_has_nothing_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let sim_dir = tmp.path().join("sim");
    Sim::init(&sim_dir, &SimNode::new(2048, 1, None), false).unwrap();
    let out = std::process::Command::new(KILL_ALL)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--sim-dir")
        .arg(&sim_dir)
        .args(["--hypervisor", "sim", "--node", "n1", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["actions"].as_array().unwrap().len(), 0);
}

#[test]
fn with_no_record_and_no_flag_kill_all_refuses_to_guess_the_hypervisor() {
    let tmp = tempfile::tempdir().unwrap();
    let sim_dir = tmp.path().join("sim");
    Sim::init(&sim_dir, &SimNode::new(2048, 1, None), false).unwrap();
    let out = std::process::Command::new(KILL_ALL)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--sim-dir")
        .arg(&sim_dir)
        .args(["--node", "n1", "--all"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot tell which hypervisor this node uses")
            && err.contains("pass --hypervisor sim|kvm|xen"),
        "{err}"
    );
}

#[test]
fn the_hypervisor_and_its_files_come_from_the_pilots_record() {
    let l = Leftovers::new();
    HypervisorRecord {
        kind: "sim".into(),
        node_config: None,
        sim_dir: Some(l.sim_dir.clone()),
        updated_ms: 0,
    }
    .write(&l.state_dir)
    .unwrap();
    let out = l.kill_all_bare(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(l.names(), vec!["alien".to_string()]);
    assert_eq!(l.dom0(), (3840, 3840));
    assert!(list_state_files(&l.state_dir).unwrap().is_empty());
    assert!(
        HypervisorRecord::path(&l.state_dir).exists(),
        "the node's record stays"
    );
}

#[test]
fn a_slot_file_says_which_driver_when_no_node_record_does() {
    let l = Leftovers::new();
    let sim_dir = l.sim_dir.display().to_string();
    let out = l.kill_all_bare(&["--sim-dir", &sim_dir]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(l.names(), vec!["alien".to_string()]);
}

#[test]
fn a_flag_contradicting_the_records_is_refused_and_nothing_is_touched() {
    let l = Leftovers::new();
    let before = l.names();
    let out = l.kill_all_bare(&["--hypervisor", "xen"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--hypervisor xen, but") && err.contains("records sim"),
        "{err}"
    );
    assert_eq!(l.names(), before);
    assert_eq!(list_state_files(&l.state_dir).unwrap().len(), 1);

    // Two records that disagree: refused without a flag too.
    HypervisorRecord {
        kind: "kvm".into(),
        node_config: None,
        sim_dir: None,
        updated_ms: 0,
    }
    .write(&l.state_dir)
    .unwrap();
    let out = l.kill_all_bare(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the records disagree"), "{err}");
    assert_eq!(l.names(), before);
}

#[test]
fn unusable_hypervisor_is_a_usage_error() {
    let out = std::process::Command::new(KILL_ALL)
        .args(["--hypervisor", "xen"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // No xenstored on this machine: the xen driver opens, the node does not answer.
    assert!(String::from_utf8_lossy(&out.stderr).contains("node not usable"));
}

#[test]
fn live_pilot_is_sigkilled_before_its_guests_are_destroyed() {
    let l = Leftovers::new();
    // A stand-in whose command line names workspace-pilot, as a stuck pilot's would.
    let fake = l.state_dir.parent().unwrap().join("workspace-pilot");
    std::fs::copy("/bin/sleep", &fake).unwrap();
    let mut stuck = std::process::Command::new(&fake)
        .arg("600")
        .spawn()
        .unwrap();
    let path = list_state_files(&l.state_dir).unwrap().remove(0);
    let mut state = NodeStateFile::read(&path).unwrap();
    state.pid = stuck.id();
    state.write(&l.state_dir).unwrap();

    let out = l.kill_all(&["--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = stuck.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "the pilot was SIGKILLed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["actions"][0]["action"], "kill-pilot");
    assert_eq!(l.names(), vec!["alien".to_string()]);
    assert_eq!(l.dom0(), (3840, 3840));
}
