//! Every real adapter's job script, compared byte for byte with
//! tests/fixtures/golden/<lrm>-<case>.sh. After an intended change:
//! `WSP_UPDATE_GOLDEN=1 cargo test -p wsp-lrm-adapters --test render_golden`.

use std::path::Path;
use std::time::Duration;
use wsp_lrm_adapters::gridengine::{GridEngine, GridEngineConfig};
use wsp_lrm_adapters::pbs::{Flavour, Pbs, PbsConfig};
use wsp_lrm_adapters::slurm::{Slurm, SlurmConfig};
use wsp_lrm_adapters::{Lrm, SlotJob};

fn job() -> SlotJob {
    SlotJob {
        name: "wsp-sl-0123abcd".into(),
        nodes: 2,
        cores_per_node: 4,
        memory_mb_per_node: 2048,
        walltime: Duration::from_secs(2 * 3600 + 5 * 60 + 30),
        pilot_argv: vec![
            "/opt/wsp/bin/wsp-pilot".into(),
            "--coordinator=https://head01:7443".into(),
            "--node=%n".into(),
            "--key-file=/var/lib/wsp/slots/sl-0123abcd/key".into(),
            "--label=it's a test".into(),
        ],
        workdir: "/var/lib/wsp/slots/sl-0123abcd".into(),
    }
}

fn check(name: &str, lrm: &dyn Lrm) {
    let got = lrm.render_script(&job());
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(format!("{name}.sh"));
    if std::env::var_os("WSP_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        got,
        want,
        "{name}: rendered script differs from {}",
        path.display()
    );
    // Every script is valid sh.
    let st = std::process::Command::new("/bin/sh")
        .arg("-n")
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "{} does not parse", path.display());
}

#[test]
fn slurm_scripts_match_golden_files() {
    check(
        "slurm-default",
        &Slurm::new(SlurmConfig::default()).unwrap(),
    );
    let site = SlurmConfig {
        partition: Some("vms".into()),
        account: Some("proj42".into()),
        qos: Some("long".into()),
        extra_directives: vec!["--constraint=vmx".into(), "--exclusive".into()],
        srun_args: vec!["--mpi=none".into()],
        warn_before_walltime_s: Some(120),
        ..SlurmConfig::default()
    };
    check("slurm-site", &Slurm::new(site).unwrap());
}

#[test]
fn torque_scripts_match_golden_files() {
    check(
        "torque-default",
        &Pbs::new(Flavour::Torque, PbsConfig::default()).unwrap(),
    );
    let site = PbsConfig {
        queue: Some("vms".into()),
        account: Some("proj42".into()),
        extra_directives: vec!["-l feature=vmx".into()],
        pbsdsh: Some("/opt/torque/bin/pbsdsh".into()),
        ..PbsConfig::default()
    };
    check("torque-site", &Pbs::new(Flavour::Torque, site).unwrap());
}

#[test]
fn pbspro_scripts_match_golden_files() {
    check(
        "pbspro-default",
        &Pbs::new(Flavour::PbsPro, PbsConfig::default()).unwrap(),
    );
    let site = PbsConfig {
        queue: Some("vms".into()),
        account: Some("proj42".into()),
        place: Some("scatter:excl".into()),
        extra_directives: vec!["-l select=host=cn001".into()],
        ..PbsConfig::default()
    };
    check("pbspro-site", &Pbs::new(Flavour::PbsPro, site).unwrap());
}

#[test]
fn gridengine_scripts_match_golden_files() {
    check(
        "gridengine-default",
        &GridEngine::new(GridEngineConfig::default()).unwrap(),
    );
    let site = GridEngineConfig {
        queue: Some("vms.q".into()),
        project: Some("proj42".into()),
        parallel_environment: "wsp-pe".into(),
        extra_directives: vec!["-l vmx=true".into()],
        ..GridEngineConfig::default()
    };
    check("gridengine-site", &GridEngine::new(site).unwrap());
}
