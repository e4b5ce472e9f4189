//! The `workspace` client as a user runs it: create --wait, status, list,
//! destroy --wait, watch, ssh; its errors, tables, settings and generated docs.

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

/// `workspace` with only the given environment (no WORKSPACE_* from the
/// test's own, and a config directory of its own).
fn workspace_env(c: &Cluster, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin("workspace"));
    cmd.args(args)
        .env_remove("WORKSPACE_URL")
        .env_remove("WORKSPACE_TOKEN")
        .env_remove("WORKSPACE_CA_FILE")
        .env_remove("WORKSPACE_CONFIG")
        .env("XDG_CONFIG_HOME", c.root().join("xdg"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run workspace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

fn no_debug_text(s: &str) {
    for bad in [
        "Some(",
        "None",
        "panicked",
        "builder error",
        "error sending request",
    ] {
        assert!(!s.contains(bad), "{bad:?} in: {s}");
    }
}

#[test]
fn create_prints_the_id_first_and_a_wait_that_ends_early_says_how_to_give_it_up() {
    let c = Cluster::start(Options::default());
    // The first lease holds every node: the next one stays queued.
    let first = ws_id(&c.create(ENSEMBLE));
    c.wait_running(&first);
    let spec = c.root().join("cluster.toml");
    std::fs::write(&spec, ENSEMBLE).unwrap();
    let file = spec.to_str().unwrap();

    let (code, out, err) = workspace(&c, &["create", "--file", file, "--wait", "--timeout", "2"]);
    assert_eq!(code, 4, "{out}\n{err}");
    let first_line = out.lines().next().unwrap_or_default();
    assert!(first_line.starts_with("created ws-"), "id first: {out}");
    let id = first_line.split_whitespace().nth(1).unwrap().to_string();
    assert!(
        err.contains(&format!("{id} is still queued in the batch system")),
        "{err}"
    );
    assert!(err.contains(&format!("workspace destroy {id}")), "{err}");
    // Not a terminal: progress as plain lines (timeline, state).
    assert!(err.contains("slot_submitted"), "timeline lines: {err}");
    assert!(
        err.contains("pending: 0/4 VMs running"),
        "state line: {err}"
    );
    no_debug_text(&err);

    // --json: JSON on stdout, whatever happens.
    let (code, out, err) = workspace(
        &c,
        &[
            "create",
            "--file",
            file,
            "--wait",
            "--timeout",
            "1",
            "--json",
        ],
    );
    assert_eq!(code, 4, "{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON even on timeout");
    assert_eq!(v["state"], "pending");

    // -q: the id alone, for scripts.
    let (code, out, _) = workspace(&c, &["create", "-q", "--file", file]);
    assert_eq!(code, 0);
    assert!(
        out.trim().starts_with("ws-") && out.trim().lines().count() == 1,
        "{out}"
    );

    // Ctrl-C while waiting: the id was printed, the workspace goes on.
    let child = Command::new(bin("workspace"))
        .args(["create", "--file", file, "--wait"])
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    signal(child.id() as i32, nix::sys::signal::Signal::SIGINT);
    let output = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(130), "{out}\n{err}");
    assert!(out.starts_with("created ws-"), "{out}");
    assert!(
        err.contains("stopped waiting") && err.contains("workspace destroy"),
        "{err}"
    );

    // Every one of them is there to destroy.
    let (_, out, _) = workspace(&c, &["list", "--json"]);
    let l: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<String> = l["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 5, "{out}");
    for id in &ids {
        assert_eq!(c.destroy_as(TOKEN, id).status, 200);
    }
    for id in &ids {
        c.wait_settled(id);
    }
    c.assert_nodes_restored();
}

#[test]
fn errors_are_said_once_with_what_to_do() {
    let c = Cluster::start(Options::default());
    // Nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = workspace_env(
        &c,
        &[("WORKSPACE_URL", &url), ("WORKSPACE_TOKEN", TOKEN)],
        &["list"],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "an error line and a hint: {err}");
    assert!(
        lines[0].starts_with(&format!("workspace: cannot reach the coordinator at {url}")),
        "{err}"
    );
    assert_eq!(
        err.to_lowercase().matches("connection refused").count(),
        1,
        "{err}"
    );
    assert!(
        lines[1].starts_with("hint: ") && lines[1].contains("WORKSPACE_URL"),
        "{err}"
    );
    no_debug_text(&err);

    let (code, _, err) = workspace_env(
        &c,
        &[("WORKSPACE_URL", "not-a-url"), ("WORKSPACE_TOKEN", TOKEN)],
        &["list"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"not-a-url\" is not usable"), "{err}");
    no_debug_text(&err);

    let (code, _, err) = workspace_env(&c, &[("WORKSPACE_URL", &c.url)], &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no token") && err.contains("WORKSPACE_TOKEN"),
        "{err}"
    );

    let (code, _, err) = workspace_env(
        &c,
        &[("WORKSPACE_URL", &c.url), ("WORKSPACE_TOKEN", "wrong")],
        &["list"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("401") && err.contains("hint: check your token"),
        "{err}"
    );

    // An id that is not one never becomes a path.
    for bad in ["../../etc/passwd", "ws-1a2b3c4d/../../x", "%2e%2e"] {
        let (code, _, err) = workspace(&c, &["status", bad]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("invalid workspace id"), "{bad}: {err}");
    }
    assert!(
        !c.log().contains("etc/passwd"),
        "the coordinator never saw the bad id"
    );
    let metrics = reqwest::blocking::get(format!("{}/metrics", c.url))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        !metrics.contains("route=\"/api/v1/workspaces/{id}\"")
            && !metrics.contains("route=\"unmatched\""),
        "no request went out for a bad id:\n{metrics}"
    );
}

#[test]
fn tables_are_aligned_show_how_to_reach_the_vms_and_survive_a_closed_pipe() {
    let c = Cluster::start(Options {
        extra: "[network.private]\ncidr = \"10.99.0.0/24\"\ngateway = \"10.99.0.1\"\n[network.public]\ncidr = \"192.0.2.0/28\"\ngateway = \"192.0.2.1\"\n".into(),
        ..Options::default()
    });
    let spec = ENSEMBLE.replace("cpus = 2\n", "cpus = 2\npublic_ip = true\n");
    let id = ws_id(&c.create(&spec));
    let v = c.wait_running(&id);

    let (code, out, err) = workspace(&c, &["status", &id]);
    assert_eq!(code, 0, "{err}");
    for vm in v["vms"].as_array().unwrap() {
        let host = vm["hostname"].as_str().unwrap();
        let line = out
            .lines()
            .find(|l| l.starts_with(host))
            .unwrap_or_else(|| panic!("a row for {host}: {out}"));
        for nic in vm["nics"].as_array().unwrap() {
            assert!(line.contains(nic["ip"].as_str().unwrap()), "{line}");
        }
    }
    assert!(
        out.contains("(public)") && out.contains("(private)"),
        "{out}"
    );
    assert!(out.contains("lease ends in"), "{out}");

    // A second workspace (queued): two rows, columns aligned.
    let other = ws_id(&c.create(ENSEMBLE));
    let (code, out, _) = workspace(&c, &["list"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for col in ["NAME", "STATE", "VMS", "OWNER", "ADDRESSES"] {
        let at = lines[0].find(col).unwrap();
        for l in &lines[1..] {
            assert!(
                l.len() > at && l.as_bytes()[at - 1] == b' ' && l.as_bytes()[at] != b' ',
                "column {col} at {at} in:\n{out}"
            );
        }
    }
    assert!(
        out.contains("head-0 192.0.2.") || out.contains("head-0 10.99.0."),
        "{out}"
    );

    // The reader goes away first (`workspace list | head -1`): no panic.
    let mut child = Command::new(bin("workspace"))
        .args(["list"])
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");

    // ssh: the exact command, the public address first.
    let head = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["group"] == "head")
        .unwrap();
    let public = head["nics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["pool"] == "public")
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, err) = workspace(&c, &["ssh", &id, "head-0", "-l", "debian", "--print"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("ssh -l debian {public}"));
    // Run: exec's the ssh on PATH (a stand-in that prints its arguments).
    let bin_dir = c.root().join("fake-bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let fake = bin_dir.join("ssh");
    std::fs::write(&fake, "#!/bin/sh\necho \"fake ssh $*\"\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, out, err) = workspace_env(
        &c,
        &[
            ("WORKSPACE_URL", &c.url),
            ("WORKSPACE_TOKEN", TOKEN),
            ("PATH", bin_dir.to_str().unwrap()),
        ],
        &["ssh", &id, "worker-1", "--", "-o", "BatchMode=yes"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("fake ssh -o BatchMode=yes 10.99.0."),
        "{out}"
    );
    // No ssh at all: the command is printed, exit 1.
    let empty = c.root().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out, err) = workspace_env(
        &c,
        &[
            ("WORKSPACE_URL", &c.url),
            ("WORKSPACE_TOKEN", TOKEN),
            ("PATH", empty.to_str().unwrap()),
        ],
        &["ssh", &id, "head-0"],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(out.trim(), format!("ssh {public}"));
    assert!(err.contains("ssh is not installed"), "{err}");
    let (code, _, err) = workspace(&c, &["ssh", &id, "nope-7"]);
    assert_eq!(code, 2);
    assert!(err.contains("head-0") && err.contains("worker-0"), "{err}");

    for w in [&id, &other] {
        assert_eq!(c.destroy_as(TOKEN, w).status, 200);
    }
    c.wait_settled(&id);
    c.wait_settled(&other);
}

#[test]
fn settings_come_from_a_config_file_and_global_flags_go_anywhere() {
    let c = Cluster::start(Options::default());
    let xdg = c.root().join("xdg/workspace");
    std::fs::create_dir_all(&xdg).unwrap();
    let cfg = xdg.join("config.toml");
    std::fs::write(&cfg, format!("url = \"{}\"\ntoken = \"{TOKEN}\"\n", c.url)).unwrap();
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, out, err) = workspace_env(&c, &[], &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    serde_json::from_str::<Value>(&out).unwrap();
    // The environment wins over the file, a flag over both, flags after the subcommand.
    let (code, _, err) = workspace_env(&c, &[("WORKSPACE_TOKEN", "wrong")], &["list"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = workspace_env(
        &c,
        &[("WORKSPACE_TOKEN", "wrong")],
        &["list", "--token", TOKEN, "--json"],
    );
    assert_eq!(code, 0, "{err}");
    // A token readable by others is pointed out.
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (_, _, err) = workspace_env(&c, &[], &["list"]);
    assert!(err.contains("chmod 600"), "{err}");
    // A typo in the file is named.
    std::fs::write(&cfg, "ulr = \"http://x\"\n").unwrap();
    let (code, _, err) = workspace_env(&c, &[], &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ulr") && err.contains("config.toml"), "{err}");
    // --config names another file; a missing one is an error.
    let (code, _, err) = workspace_env(&c, &[], &["list", "--config", "/nonexistent/w.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/w.toml"), "{err}");
}

#[test]
fn destroy_wait_shows_only_what_is_new_and_watch_prints_in_time_order() {
    let c = Cluster::start(Options::default());
    let id = ws_id(&c.create(ENSEMBLE));
    c.wait_running(&id);
    let (code, out, err) = workspace(&c, &["destroy", &id, "--wait"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("destroy_requested"), "{err}");
    assert!(err.contains("memory_restored"), "{err}");
    for old in [
        "requested",
        "slot_submitted",
        "memory_reserved",
        "vm_started",
    ] {
        assert!(
            !err.contains(&format!(" {old} ")),
            "destroy --wait replays the creation ({old}): {err}"
        );
    }
    assert!(out.contains("destroyed"), "{out}");

    let (code, out, _) = workspace(&c, &["watch", &id, "--json"]);
    assert_eq!(code, 0);
    let ts: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["ts_ms"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(ts.len() > 10, "{out}");
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "in time order: {ts:?}");
    let (code, out, _) = workspace(&c, &["watch", &id]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .next()
            .unwrap()
            .trim_start()
            .starts_with("+0 ms"),
        "{out}"
    );
    assert!(!out.contains(".00 ms"), "no false precision: {out}");
    assert!(out.trim_end().ends_with("settled: destroyed"), "{out}");
}

#[test]
fn completions_and_man_pages_are_generated_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    for (bin_name, page) in [
        ("workspace", "workspace-create.1"),
        ("workspace-coordinator", "workspace-coordinator-serve.1"),
    ] {
        let out = Command::new(bin(bin_name))
            .args(["completions", "bash"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains(&format!("complete -F _{}", bin_name.replace('-', "__")))
                || script.contains("complete "),
            "{script}"
        );
        let out = Command::new(bin(bin_name))
            .args(["man", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
    }
}

#[test]
fn the_node_binaries_write_their_man_pages_too() {
    let dir = tempfile::tempdir().unwrap();
    for (args, page, says) in [
        (
            &["man", "--dir"][..],
            "workspace-pilot-run.1",
            "--duration-s",
        ),
        (&["--man"][..], "workspace-kill-all.1", "--state-dir"),
    ] {
        let name = if page.starts_with("workspace-pilot") {
            "workspace-pilot"
        } else {
            "workspace-kill-all"
        };
        let out = Command::new(bin(name))
            .args(args)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(
            text.contains(".TH") && text.contains(&says.replace('-', "\\-")),
            "{page}: {text}"
        );
    }
}
