//! A node missing a program the kvm driver runs: `workspace-pilot check`
//! and the VM start path each name the program and its package. The real
//! binary runs with a PATH that lacks the program (nothing is uninstalled);
//! no QEMU is started, so these need neither the system lock nor root.

use protocol::pilot::{CommandKind, EventKind, VmLaunch};
use protocol::{VmId, VmName};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

mod common;

const PILOT: &str = env!("CARGO_BIN_EXE_workspace-pilot");

/// A temp dir with a node config (`[kvm]` accounting-only, run dir inside)
/// and `bin/`, a PATH directory holding only the programs given.
struct Node {
    tmp: tempfile::TempDir,
}

impl Node {
    fn new(kvm_extra: &str, programs: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("wsp-tools-")
            .tempdir()
            .unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for p in programs {
            let real = pilot::tools::find(p)
                .unwrap_or_else(|m| panic!("this test needs {p} on the machine: {m}"));
            std::os::unix::fs::symlink(real, bin.join(p)).unwrap();
        }
        std::fs::write(
            tmp.path().join("node.toml"),
            format!(
                "[kvm]\nrun_dir = \"{}/%n/kvm\"\nhugepages = false\n{kvm_extra}\n",
                tmp.path().display()
            ),
        )
        .unwrap();
        Node { tmp }
    }

    fn path(&self) -> PathBuf {
        self.tmp.path().join("bin")
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("node.toml")
    }

    fn check(&self, path: Option<&Path>) -> Output {
        let mut cmd = std::process::Command::new(PILOT);
        cmd.args([
            "check",
            "--hypervisor",
            "kvm",
            "--node",
            "n1",
            "--node-config",
        ])
        .arg(self.config());
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        cmd.output().unwrap()
    }
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name)))
        .unwrap_or_else(|| panic!("no {name:?} check in:\n{out}"))
}

#[test]
fn check_names_each_missing_kvm_tool_with_its_package() {
    let n = Node::new("", &["qemu-system-x86_64"]);
    let out = n.check(Some(&n.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        line(&text, "qemu-system-x86_64").starts_with("ok "),
        "{text}"
    );
    assert_eq!(
        line(&text, "qemu-img"),
        "FAIL  qemu-img (overlays of disk images): qemu-img not found: install qemu-utils",
    );
    assert!(
        line(&text, "mcopy").ends_with("mcopy not found: install mtools"),
        "{text}"
    );
    assert!(text.ends_with("node is NOT fit\n"), "{text}");

    // The same node with the machine's PATH (scripts/install-deps.sh put
    // every tool there): the tools pass.
    let out = n.check(None);
    let text = String::from_utf8_lossy(&out.stdout);
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.vfat",
        "mcopy",
        "zstd",
    ] {
        assert!(line(&text, tool).starts_with("ok "), "{text}");
    }
}

#[test]
fn check_says_whether_hardware_kvm_really_works_and_what_that_means_for_fitness() {
    let (claims, why) = pilot::hypervisor::kvm::host_claims_kvm();
    let auto = Node::new("", &[]);
    let out = auto.check(None);
    let text = String::from_utf8_lossy(&out.stdout);
    let hw = line(&text, "hardware KVM");
    if claims {
        // Without [kvm] kernel there is no canary boot to confirm it.
        assert!(
            hw.starts_with("warn  hardware KVM: claimed, not confirmed"),
            "{text}"
        );
        return;
    }
    // Here (kvm_pvm, or no KVM at all): auto runs VMs under TCG, fit with a warning.
    assert!(hw.starts_with("warn "), "{text}");
    assert!(hw.contains(&why) && hw.contains("TCG"), "{text}");
    assert!(
        text.contains("accelerator = \"tcg\""),
        "the fix says how to accept TCG: {text}"
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.ends_with("node is fit, with 1 warning\n"), "{text}");

    // A node that requires KVM is not fit.
    let required = Node::new("accelerator = \"kvm\"", &[]);
    let out = required.check(None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        line(&text, "hardware KVM").starts_with("FAIL  hardware KVM: [kvm] accelerator = \"kvm\""),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(1), "{text}");

    // A node that accepts TCG is fit without a warning about it.
    let tcg = Node::new("accelerator = \"tcg\"", &[]);
    let out = tcg.check(None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        line(&text, "hardware KVM").starts_with("ok    hardware KVM: not used"),
        "{text}"
    );
    assert!(!text.contains("\nwarn "), "{text}");
}

#[test]
fn check_needs_the_hypervisor_named() {
    let out = std::process::Command::new(PILOT)
        .args(["check", "--node", "n1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hypervisor"));
}

/// Runs a kvm pilot with `path` as its PATH, asks it to start a VM from a
/// disk image, and returns the VM's failure reason.
async fn vm_start_failure(n: &Node, path: &Path) -> String {
    let key_file = n.tmp.path().join("slot.key");
    let (coord, url) = common::Coord::start(&key_file).await;
    let mut child = tokio::process::Command::new(PILOT)
        .args(["run", "--slot", coord.slot.as_str(), "--coordinator", &url])
        .arg("--key-file")
        .arg(&key_file)
        .args(["--memory-mb", "256", "--duration-s", "60", "--grace-s", "3"])
        .arg("--state-dir")
        .arg(n.tmp.path().join("state"))
        .args(["--node", "n1", "--hypervisor", "kvm", "--node-config"])
        .arg(n.config())
        .args(["--margin-s", "1", "--poll-wait-ms", "500"])
        .env("PATH", path)
        .stdin(Stdio::null())
        .stderr(if std::env::var_os("WSP_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    coord.wait_for("reserved", Duration::from_secs(10)).await;
    let disk = n.tmp.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let vm_id = VmId::generate();
    let vm = VmLaunch::basic(
        vm_id.clone(),
        VmName::new(coord.slot.clone(), vm_id).to_string(),
        64,
        1,
        disk.display().to_string(),
    );
    coord.command(CommandKind::StartVm(vm));
    let failed = coord.wait_for("vm_failed", Duration::from_secs(10)).await;
    coord.command(CommandKind::Release);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the pilot exits after release")
        .unwrap();
    assert_eq!(status.code(), Some(0), "released cleanly");
    match failed.kind {
        EventKind::VmFailed { reason, .. } => reason,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_start_names_the_missing_tool_and_its_package() {
    let n = Node::new("accelerator = \"tcg\"", &["qemu-system-x86_64"]);
    let reason = vm_start_failure(&n, &n.path()).await;
    assert!(
        reason.contains("qemu-img not found: install qemu-utils"),
        "{reason}"
    );
    assert!(
        !n.tmp.path().join("n1/kvm").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".vm.json")),
        "nothing of the VM is left in the run dir"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_start_on_a_node_requiring_kvm_without_it_says_so() {
    let (claims, _) = pilot::hypervisor::kvm::host_claims_kvm();
    if claims {
        return; // This host has KVM: nothing to refuse.
    }
    let n = Node::new("accelerator = \"kvm\"", &["qemu-system-x86_64", "qemu-img"]);
    let reason = vm_start_failure(&n, &n.path()).await;
    assert!(
        reason.contains("accelerator = \"kvm\" but this host has no usable KVM"),
        "{reason}"
    );
}
