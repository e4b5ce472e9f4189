//! The `workspace` client as a user runs it: create --wait, status, list, destroy --wait.

use serde_json::Value;
use std::process::Command;
use wsp_e2e::*;

fn workspace(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("workspace"))
        .args(args)
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", TOKEN)
        .output()
        .expect("run workspace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn client_cli_creates_waits_lists_and_destroys_with_json_output() {
    let c = Cluster::start(Options::default());
    let spec = c.root().join("cluster.toml");
    std::fs::write(&spec, ENSEMBLE).unwrap();
    let (code, out, err) = workspace(
        &c,
        &[
            "create",
            "--file",
            spec.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("create --json prints the view");
    assert_eq!(v["state"], "running");
    let id = v["id"].as_str().unwrap().to_string();

    let (code, out, _) = workspace(&c, &["status", &id, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    for vm in v["vms"].as_array().unwrap() {
        for field in ["name", "group", "node", "slot_id", "job_id", "state"] {
            assert!(!vm[field].is_null(), "status --json lacks {field}: {vm}");
        }
    }
    let (code, out, _) = workspace(&c, &["list", "--json"]);
    assert_eq!(code, 0);
    let l: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["workspaces"].as_array().unwrap().len(), 1);
    let (code, out, _) = workspace(&c, &["status", &id]);
    assert_eq!(code, 0);
    assert!(
        out.contains("running") && out.contains("worker"),
        "human table: {out}"
    );

    let (code, out, err) = workspace(&c, &["destroy", &id, "--wait", "--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["settled"], true);
    assert_eq!(v["state"], "destroyed");
    c.assert_nodes_restored();

    // A refused request: one clear line on stderr, exit 1.
    let (code, _, err) = workspace(&c, &["status", "ws-00000000"]);
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("ws-00000000"), "{err}");
    let bad = c.root().join("bad.toml");
    std::fs::write(&bad, ENSEMBLE.replace("memory_mb = 1024", "memory_mb = 1")).unwrap();
    let (code, _, err) = workspace(&c, &["create", "--file", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("group[0].memory_mb"), "{err}");
}
