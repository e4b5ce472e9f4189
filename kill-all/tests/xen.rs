//! `workspace-kill-all --hypervisor xen` against the xenstored stand-in and
//! the fake `xl` on PATH: the real binary and its real xen code path, on a
//! node left as a SIGKILLed pilot leaves it.

#[path = "../../xen-standin/src/harness.rs"]
mod harness;

use harness::Standin;
use pilot::state::{list_state_files, NodeStateFile, PilotState, VmRecord, VmRecordState};
use protocol::{PilotId, SlotId, VmId, VmName};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

const KILL_ALL: &str = env!("CARGO_BIN_EXE_workspace-kill-all");

/// dom0 had 3840 of 4096 MB; a pilot of `slot` took 1024 MB, started
/// `n` guests of 96 MB (the first recorded in its state file) and died.
/// A foreign guest `alien` and another slot's guest run beside them.
struct Leftovers {
    _tmp: tempfile::TempDir,
    node: Standin,
    node_config: PathBuf,
    state_dir: PathBuf,
    slot: SlotId,
    other: String,
}

fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

impl Leftovers {
    fn new(n: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let node = Standin::start(&tmp.path().join("node"), &["--dom0-mb", "3840"]);
        let node_config = node.write_node_config("");
        let state_dir = tmp.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        node.add_guest("alien", 128);
        node.xl_ok(&["mem-set", "0", "2816m"]);
        let slot = SlotId::generate();
        let other = VmName::new(SlotId::generate(), VmId::generate()).to_string();
        node.add_guest(&other, 64);
        let mut vms = Vec::new();
        for _ in 0..n {
            let vm_id = VmId::generate();
            let name = VmName::new(slot.clone(), vm_id.clone()).to_string();
            node.add_guest(&name, 96);
            vms.push(VmRecord {
                vm_id,
                name,
                memory_mb: 96,
                state: VmRecordState::Running,
                nics: Vec::new(),
                checkpoint: None,
            });
        }
        vms.truncate(1);
        NodeStateFile {
            slot_id: slot.clone(),
            pilot_id: PilotId::generate(),
            pid: dead_pid(),
            node: "n1".into(),
            hypervisor: "xen".into(),
            state: PilotState::Reserved,
            original_dom0_mb: 3840,
            taken_mb: 1024,
            target_dom0_mb: 2816,
            reserved_mb: 0,
            workspace_id: None,
            vms,
            updated_ms: 0,
        }
        .write(&state_dir)
        .unwrap();
        Self {
            _tmp: tmp,
            node,
            node_config,
            state_dir,
            slot,
            other,
        }
    }

    fn kill_all(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        std::process::Command::new(KILL_ALL)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--node-config")
            .arg(&self.node_config)
            .args(["--hypervisor", "xen", "--node", "n1"])
            .args(extra)
            .env_remove("XENSTORED_PATH")
            .env("PATH", self.node.path_env())
            .env("WSP_FAKE_XL_LOG", &self.node.xl_log)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn xen_leftovers_are_destroyed_in_parallel_and_dom0_gets_its_original_memory() {
    let l = Leftovers::new(8);
    let t0 = Instant::now();
    let out = l.kill_all(&[], &[("WSP_FAKE_XL_DESTROY_MS", "300")]);
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Eight destroys of 300 ms each, one after another, would take 2.4 s.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(l.node.guests(), vec!["alien".to_string()]);
    assert_eq!(l.node.dom0(), (3840, 3840));
    assert!(list_state_files(&l.state_dir).unwrap().is_empty());
    let destroys = l
        .node
        .xl_calls()
        .iter()
        .filter(|c| c.starts_with("destroy "))
        .count();
    assert_eq!(destroys, 9, "8 of the slot and the other slot's guest");
}

#[test]
fn xen_slot_flag_spares_other_slots_and_foreign_guests() {
    let l = Leftovers::new(2);
    let out = l.kill_all(&["--slot", l.slot.as_str()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut expected = vec!["alien".to_string(), l.other.clone()];
    expected.sort();
    assert_eq!(l.node.guests(), expected);
    assert_eq!(l.node.dom0(), (3840, 3840), "the slot's 1024 MB are back");
}

#[test]
fn xen_all_flag_destroys_every_guest_but_dom0() {
    let l = Leftovers::new(1);
    let out = l.kill_all(&["--all"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(l.node.guests().is_empty());
    assert_eq!(l.node.dom0(), (3840, 3840));
}

#[test]
fn xen_dry_run_changes_nothing_and_json_lists_the_plan() {
    let l = Leftovers::new(2);
    let before = (l.node.guests(), l.node.dom0());
    let out = l.kill_all(&["--dry-run", "--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    let actions = v["actions"].as_array().unwrap();
    assert_eq!(
        actions.iter().filter(|a| a["action"] == "destroy").count(),
        3
    );
    assert!(actions.iter().all(|a| a["result"] == "planned"));
    assert!(actions
        .iter()
        .any(|a| a["action"] == "restore-memory" && a["target"] == "dom0 2816 MB -> 3840 MB"));
    assert_eq!((l.node.guests(), l.node.dom0()), before);
    assert!(!l
        .node
        .xl_calls()
        .iter()
        .any(|c| c.starts_with("destroy") || c.starts_with("mem-set 0 3840")));
    assert_eq!(list_state_files(&l.state_dir).unwrap().len(), 1);
}

#[test]
fn xen_stuck_balloon_makes_kill_all_exit_1_with_the_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let l = Leftovers::new(1);
    // A second node whose balloon cannot grow back: guests took the memory.
    let node = Standin::start(&tmp.path().join("full"), &["--dom0-mb", "2048"]);
    node.add_guest("hog", 2048);
    node.xl_ok(&["mem-set", "0", "1024m"]);
    node.add_guest("hog2", 1024);
    let cfg = node.write_node_config("");
    let out = std::process::Command::new(KILL_ALL)
        .arg("--state-dir")
        .arg(&l.state_dir)
        .arg("--node-config")
        .arg(&cfg)
        .args([
            "--hypervisor",
            "xen",
            "--node",
            "n1",
            "--slot",
            l.slot.as_str(),
        ])
        .args(["--balloon-timeout-ms", "300"])
        .env_remove("XENSTORED_PATH")
        .env("PATH", node.path_env())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("did not reach"), "{}", text(&out));
}
