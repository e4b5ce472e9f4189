//! HTTPS: the coordinator serves TLS from a configured certificate; pilots
//! and the `workspace` client verify it against the site's CA file, and a
//! client without the CA is refused.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use wsp_e2e::*;

/// A CA and a server certificate for 127.0.0.1 signed by it; returns the CA's PEM path.
fn make_pki(dir: &Path) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca = dir.join("ca.pem");
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    )
}

#[test]
fn coordinator_serves_https_and_pilots_and_clients_verify_it_with_the_site_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path());
    let c = Cluster::start(Options {
        extra: format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n"),
        pilot_extra: format!("ca_file = \"{ca}\"\n"),
        ..Options::default()
    });
    assert!(c.url.starts_with("https://"), "{}", c.url);
    let spec = c.root().join("spec.toml");
    std::fs::write(&spec, ENSEMBLE).unwrap();
    let workspace = |args: &[&str], ca_file: Option<&str>| {
        let mut cmd = Command::new(bin("workspace"));
        cmd.args(args)
            .env("WORKSPACE_URL", &c.url)
            .env("WORKSPACE_TOKEN", TOKEN);
        if let Some(ca) = ca_file {
            cmd.env("WORKSPACE_CA_FILE", ca);
        }
        let out = cmd.output().expect("run workspace");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Without the CA: refused by certificate verification, nothing created.
    let (code, _, err) = workspace(&["list"], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot reach the coordinator") && err.contains("certificate"),
        "{err}"
    );
    assert!(
        err.contains("hint:") && err.contains("WORKSPACE_CA_FILE"),
        "{err}"
    );
    // With it: the whole lease over TLS, pilots included.
    let (code, out, err) = workspace(
        &[
            "create",
            "--file",
            spec.to_str().unwrap(),
            "--wait",
            "--json",
        ],
        Some(&ca),
    );
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", c.log());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "running");
    let id = v["id"].as_str().unwrap();
    let (code, out, err) = workspace(&["destroy", id, "--wait", "--json"], Some(&ca));
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "destroyed");
    c.assert_nodes_restored();
}
