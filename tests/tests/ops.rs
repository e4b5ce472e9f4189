//! What a site admin operates: stopping and restarting the coordinator
//! (SIGTERM leaves leases to their pilots), reloading users (SIGHUP), a bad
//! config refused at start with exit 2, `/healthz`, `/metrics`, failed logins
//! in the log.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

fn metrics(c: &Cluster) -> String {
    http()
        .get(format!("{}/metrics", c.url))
        .send()
        .and_then(|r| r.text())
        .expect("GET /metrics")
}

/// The value of the sample line starting with `series ` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn healthz(url: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{url}/healthz"))
        .send()
        .expect("GET /healthz");
    let status = r.status().as_u16();
    (status, r.json().expect("healthz answers JSON"))
}

/// Polls `f` until it is true, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn workspace_gauges_go_back_to_zero_and_requests_and_batch_calls_are_measured() {
    let c = Cluster::start(Options::default());
    let id = ws_id(&c.create(ENSEMBLE));
    c.wait_running(&id);
    let m = metrics(&c);
    assert_eq!(
        sample(&m, "wsp_workspaces{state=\"running\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    c.wait_settled(&id);
    let m = metrics(&c);
    assert_eq!(
        sample(&m, "wsp_workspaces{state=\"running\"}"),
        Some(0.0),
        "the running gauge must go back to 0 once nothing runs:\n{m}"
    );
    assert_eq!(
        sample(&m, "wsp_workspaces{state=\"destroyed\"}"),
        Some(1.0),
        "{m}"
    );
    // HTTP requests by declared route (not by id) and status.
    let gets = sample(
        &m,
        "wsp_http_requests_total{method=\"GET\",route=\"/api/v1/workspaces/{id}\",status=\"200\"}",
    );
    assert!(gets.is_some_and(|n| n >= 2.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "wsp_http_requests_total{method=\"POST\",route=\"/api/v1/workspaces\",status=\"201\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // Batch-system calls as histograms in seconds.
    let submits = sample(
        &m,
        "wsp_lrm_call_duration_seconds_count{lrm=\"local\",call=\"submit\",outcome=\"ok\"}",
    );
    assert_eq!(submits, Some(2.0), "one submit per slot (2 groups):\n{m}");
    assert!(
        m.contains("wsp_lrm_call_duration_seconds_bucket{"),
        "histogram buckets:\n{m}"
    );
    assert!(m.contains("wsp_build_info{version=\""), "{m}");
}

#[test]
fn sigterm_leaves_running_leases_to_their_pilots_and_the_next_coordinator_adopts_them() {
    let mut c = Cluster::start(Options::default());
    let id = ws_id(&c.create(ENSEMBLE));
    c.wait_running(&id);
    let pilots = c.pilot_pids(None);
    assert_eq!(pilots.len(), 4, "one pilot per node");

    let code = c.terminate_coordinator(Duration::from_secs(20));
    assert_eq!(code, Some(0), "coordinator log:\n{}", c.log());
    assert!(
        c.log().contains("running leases stay with their pilots"),
        "the log says what happened to the leases:\n{}",
        c.log()
    );
    // Down for a while: the pilots and their VMs go on.
    std::thread::sleep(Duration::from_secs(3));
    for pid in &pilots {
        assert!(alive(*pid), "pilot {pid} ended with the coordinator");
    }
    for n in &c.nodes {
        let node = c.node(n);
        assert_eq!(
            node["domains"].as_array().map(|d| d.len()),
            Some(1),
            "{n}: the VM is still there: {node:#}"
        );
    }

    c.restart_coordinator();
    // Longer than the local batch system's poll and the pilots' long-poll:
    // a lease whose pilots had died would have failed by now.
    std::thread::sleep(Duration::from_secs(5));
    let v = c.get(&id);
    assert_eq!(v["state"], "running", "{v:#}\n{}", c.log());
    assert!(
        c.log().contains("running job adopted"),
        "the restarted coordinator adopted the jobs:\n{}",
        c.log()
    );

    // The lease still ends cleanly: pilots release, memory comes back.
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    let restored = c
        .timeline(&id)
        .iter()
        .filter(|e| e["phase"] == "memory_restored")
        .count();
    assert_eq!(restored, 4, "every pilot reported its memory restored");
    c.assert_nodes_restored();
}

#[test]
fn sighup_reloads_users_and_a_bad_config_changes_nothing() {
    let c = Cluster::start(Options::default());
    let pid = c.coordinator_pid();
    let cfg_path = c.root().join("coordinator.toml");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let carol = "e2e-carol-token";
    assert_eq!(c.list_as(carol).status, 401);

    // Add carol, remove bob.
    let bob_entry = format!(
        "[[users]]\nname = \"bob\"\ntoken_sha256 = \"{}\"\n",
        protocol::auth::token_hash(OTHER_TOKEN)
    );
    assert!(original.contains(&bob_entry));
    let carol_entry = format!(
        "[[users]]\nname = \"carol\"\ntoken_sha256 = \"{}\"\n",
        protocol::auth::token_hash(carol)
    );
    let updated = original.replace(&bob_entry, &carol_entry);
    std::fs::write(&cfg_path, &updated).unwrap();
    signal(pid, Signal::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "carol admitted after SIGHUP",
        || c.list_as(carol).status == 200,
    );
    assert_eq!(c.list_as(OTHER_TOKEN).status, 401, "bob was removed");
    assert_eq!(c.list_as(TOKEN).status, 200, "alice stays");
    assert!(alive(pid), "SIGHUP must not end the coordinator");
    assert!(c.log().contains("users reloaded"), "{}", c.log());

    // A config that does not validate: logged, nothing changes.
    std::fs::write(&cfg_path, updated.replace("tick_ms = 50", "tick_ms = 0")).unwrap();
    signal(pid, Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the refusal is logged", || {
        c.log().contains("config not reloaded")
    });
    assert!(c.log().contains("tick_ms"), "{}", c.log());
    assert!(alive(pid));
    assert_eq!(c.list_as(carol).status, 200, "the running users stay");

    // A change that needs a restart is named, the users still reload.
    std::fs::write(
        &cfg_path,
        original.replace("lrm_poll_s = 0.5", "lrm_poll_s = 0.75"),
    )
    .unwrap();
    signal(pid, Signal::SIGHUP);
    eventually(Duration::from_secs(10), "bob back after SIGHUP", || {
        c.list_as(OTHER_TOKEN).status == 200
    });
    eventually(Duration::from_secs(10), "restart needed is logged", || {
        c.log().contains("take effect only on restart") && c.log().contains("lrm_poll_s")
    });
}

/// `workspace-coordinator <args>`: exit code and stderr.
fn coordinator(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("workspace-coordinator"))
        .args(args)
        .output()
        .expect("run workspace-coordinator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_config_that_would_fail_every_lease_stops_serve_with_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let user = |name: &str, token: &str| {
        format!(
            "[[users]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n",
            protocol::auth::token_hash(token)
        )
    };
    let base = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}/data\"\n",
        dir.path().display()
    );
    let alice = user("alice", "a");
    for (name, toml, key) in [
        (
            "hypervisor",
            format!("{base}[pilot]\nhypervisor = \"kvmm\"\n{alice}"),
            "kvmm",
        ),
        (
            "public_url",
            format!("public_url = \"not a url\"\n{base}{alice}"),
            "public_url",
        ),
        ("tick", format!("tick_ms = 0\n{base}{alice}"), "tick_ms"),
        (
            "memory",
            format!("{base}[pilot]\nmin_dom0_mb = 4096\n{alice}"),
            "local.memory_mb_per_node",
        ),
        (
            "users",
            format!("{base}{alice}{}", user("alice", "b")),
            "users[1].name",
        ),
        ("no-users", base.clone(), "[[users]]"),
    ] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, &toml).unwrap();
        let (code, err) = coordinator(&["serve", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(key), "{name}: the message names {key}: {err}");
        if name != "hypervisor" {
            // (A TOML error shows the line with a caret under the value.)
            assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        }
        let (code, err) = coordinator(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "check {name}: {err}");
        assert!(
            !dir.path().join("data/coordinator.db").exists(),
            "{name}: nothing was started"
        );
    }
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("{base}{alice}")).unwrap();
    let (code, err) = coordinator(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    // Not a config problem: the address is taken. Exit 1, the cause once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        format!(
            "listen = \"{}\"\ndata_dir = \"{}/busy\"\n{alice}",
            taken.local_addr().unwrap(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, err) = coordinator(&["serve", "--config", busy.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.matches("in use").count(),
        1,
        "the cause is printed once: {err}"
    );
}

#[test]
fn healthz_checks_the_database_and_the_batch_system_and_says_which_failed() {
    let c = Cluster::start(Options::default());
    let (status, body) = healthz(&c.url);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["database"], "ok");
    assert_eq!(body["batch_system"], "ok");

    // A batch system whose qstat fails until a flag file exists.
    let fake = tempfile::tempdir().unwrap();
    let flag = fake.path().join("server-up");
    let qstat = fake.path().join("qstat");
    std::fs::write(
        &qstat,
        format!(
            "#!/bin/sh\n[ -e {} ] && exit 0\necho 'qstat: cannot connect to server head (errno=111) Connection refused' >&2\nexit 1\n",
            flag.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qstat, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let t = Cluster::start(Options {
        lrm: Some(OtherLrm {
            toml: format!(
                "lrm = \"torque\"\n[cluster]\nnodes = 1\ncores_per_node = 2\nmemory_mb_per_node = 4096\n[torque]\nqstat = \"{}\"\nkill_delay_s = 4\n",
                qstat.display()
            ),
            nodes: vec!["n1".into()],
        }),
        ..Options::default()
    });
    let (status, body) = healthz(&t.url);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "failing");
    assert_eq!(body["database"], "ok");
    let why = body["batch_system"].as_str().unwrap();
    assert!(why.contains("cannot connect to server"), "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("batch system (torque)"),
        "{body}"
    );
    std::fs::write(&flag, "").unwrap();
    eventually(
        Duration::from_secs(10),
        "healthy once qstat answers",
        || healthz(&t.url).0 == 200,
    );
}

#[test]
fn failed_logins_are_logged_with_the_peer_and_counted_never_with_the_token() {
    let c = Cluster::start(Options::default());
    let wrong = "not-a-real-token-5e1f";
    assert_eq!(c.list_as(wrong).status, 401);
    eventually(Duration::from_secs(5), "failed login logged", || {
        c.log().contains("failed login")
    });
    let log = c.log();
    let line = log
        .lines()
        .find(|l| l.contains("failed login"))
        .expect("a failed login line");
    assert!(line.contains("unknown token"), "{line}");
    assert!(line.contains("127.0.0.1"), "the peer is named: {line}");
    assert!(line.contains("/api/v1/workspaces"), "the route: {line}");
    assert!(!log.contains(wrong), "the token never reaches the log");
    assert_eq!(sample(&metrics(&c), "wsp_failed_logins_total"), Some(1.0));
}

#[test]
fn serve_can_log_json_lines() {
    let c = Cluster::start(Options {
        serve_args: vec!["--log-format".into(), "json".into()],
        ..Options::default()
    });
    let _ = c.list_as("wrong-token");
    eventually(Duration::from_secs(5), "failed login logged", || {
        c.log().contains("failed login")
    });
    for line in c.log().lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn serve_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[pilot]\nprogram = \"{}\"\nstate_dir = \"{root}/nodes/%n/state\"\nsim_dir = \"{root}/nodes/%n/sim\"\n[[users]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\n",
            data.display(),
            bin("workspace-pilot").display(),
            protocol::auth::token_hash(TOKEN),
            root = dir.path().display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("workspace-coordinator"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = recv();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // Ready means listening.
    let url = std::fs::read_to_string(data.join("coordinator.url")).unwrap();
    assert_eq!(healthz(url.trim()).0, 200);

    signal(child.id() as i32, Signal::SIGHUP);
    let reloading = recv();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd 253+ needs the reload's time: {reloading}"
    );
    assert!(recv().lines().any(|l| l == "READY=1"));

    signal(child.id() as i32, Signal::SIGTERM);
    assert!(recv().lines().any(|l| l == "STOPPING=1"));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Runs a system tool, failing loudly if it is not there.
fn system_tool(program: &str, args: &[&str], env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{program} (systemd's tools) must be installed: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_systemd_unit_tmpfiles_and_sysusers_files_are_valid() {
    let packaging = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let dir = tempfile::tempdir().unwrap();
    // The unit, pointed at the binaries built here, its man pages on MANPATH
    // (Documentation= is checked too).
    let unit = std::fs::read_to_string(packaging.join("systemd/workspace-coordinator.service"))
        .unwrap()
        .replace(
            "/usr/bin/workspace-coordinator",
            bin("workspace-coordinator").to_str().unwrap(),
        );
    let unit_path = dir.path().join("workspace-coordinator.service");
    std::fs::write(&unit_path, unit).unwrap();
    let man = dir.path().join("man");
    let out = Command::new(bin("workspace-coordinator"))
        .args(["man", "--dir"])
        .arg(man.join("man1"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, said) = system_tool(
        "systemd-analyze",
        &["verify", unit_path.to_str().unwrap()],
        &[("MANPATH", &man)],
    );
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    let sysusers = packaging.join("sysusers.d/workspace-pilot.conf");
    let (ok, said) = system_tool(
        "systemd-sysusers",
        &["--dry-run", sysusers.to_str().unwrap()],
        &[],
    );
    assert!(
        ok && !said.contains("Failed") && said.contains("workspace"),
        "{said}"
    );

    // tmpfiles: applied under a scratch root (owned by root here, as the
    // users need not exist on a test machine).
    let tmpfiles = std::fs::read_to_string(packaging.join("tmpfiles.d/workspace-pilot.conf"))
        .unwrap()
        .replace("workspace wsp-pilot", "root      root     ");
    let conf = dir.path().join("workspace-pilot.conf");
    std::fs::write(&conf, tmpfiles).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("run")).unwrap();
    let (ok, said) = system_tool(
        "systemd-tmpfiles",
        &[
            "--create",
            &format!("--root={}", root.display()),
            conf.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "systemd-tmpfiles: {said}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("run/workspace-pilot"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
}
