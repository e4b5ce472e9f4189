//! `scripts/install-deps.sh --check`, the verification the package step ends
//! with: every command of pilot/src/tools.txt (but xen's) is on this
//! machine, and a missing one is named with its package. Verify only:
//! nothing is installed here (scripts/test.sh runs the install first).

use std::process::Output;
use wsp_e2e::repo;

fn check(table: Option<&std::path::Path>) -> Output {
    let mut cmd = std::process::Command::new(repo().join("scripts/install-deps.sh"));
    cmd.arg("--check");
    if let Some(t) = table {
        cmd.env("WSP_TOOLS_TABLE", t);
    }
    cmd.output().expect("run scripts/install-deps.sh --check")
}

#[test]
fn every_command_the_tests_and_the_kvm_driver_run_is_installed() {
    let out = check(None);
    assert!(
        out.status.success(),
        "run scripts/install-deps.sh (as root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "quiet");
}

#[test]
fn a_missing_command_is_named_with_its_package_and_xen_tools_are_not_required() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("tools.txt");
    std::fs::write(
        &table,
        "# command package needed-by\n\
         qemu-img qemu-utils kvm\n\
         wsp-no-such-tool wsp-no-such-package tests\n\
         wsp-no-such-daemon wsp-no-such-lrm slurm\n\
         wsp-no-such-xl xen-utils-4.17 xen\n",
    )
    .unwrap();
    let out = check(Some(&table));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("wsp-no-such-tool not found: install wsp-no-such-package")
            && err.contains("wsp-no-such-daemon not found: install wsp-no-such-lrm"),
        "{err}"
    );
    assert!(!err.contains("qemu-img"), "qemu-img is here: {err}");
    assert!(
        !err.contains("no-such-xl"),
        "xen tools are not required: {err}"
    );
}

#[test]
fn the_script_reads_the_same_table_as_the_pilot() {
    let script = std::fs::read_to_string(repo().join("scripts/install-deps.sh")).unwrap();
    assert!(script.contains("pilot/src/tools.txt"));
    // Every line the script verifies has the columns the pilot reads.
    let kvm: Vec<_> = pilot::tools::table()
        .filter(|t| t.needed_by == "kvm")
        .map(|t| t.command)
        .collect();
    for c in [
        "qemu-system-x86_64",
        "qemu-img",
        "dnsmasq",
        "nft",
        "mkfs.vfat",
        "mcopy",
        "ip",
        "zstd",
    ] {
        assert!(kvm.contains(&c), "{c} is not in tools.txt as needed by kvm");
    }
    let lrm: Vec<_> = pilot::tools::table()
        .filter(|t| t.needed_by == "slurm" || t.needed_by == "gridengine")
        .map(|t| t.command)
        .collect();
    for c in [
        "sbatch",
        "slurmctld",
        "slurmd",
        "munged",
        "qconf",
        "qsub",
        "sge_qmaster",
        "sge_execd",
    ] {
        assert!(lrm.contains(&c), "{c} is not in tools.txt");
    }
}
