//! What a site admin and a scientist see of the cluster (issue 19): the
//! batch system's queue reason on a waiting workspace, limits per user,
//! lease renewal, the admin's view (API, `workspace admin nodes`, the status
//! page in headless Chromium), and a lost pilot's node through kill-all.
//! All on the real coordinator, local batch system and simulated nodes.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn spec(name: &str, count: u32, memory_mb: u64, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nduration = \"1h\"\n{extra}\n[[group]]\nname = \"w\"\ncount = {count}\nmemory_mb = {memory_mb}\nimage = \"debian-12\"\n"
    )
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

fn call(
    method: reqwest::Method,
    c: &Cluster,
    token: &str,
    path: &str,
    body: Option<Value>,
) -> Reply {
    let mut req = http()
        .request(method, format!("{}{path}", c.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

fn cluster_view(c: &Cluster) -> Value {
    let r = call(
        reqwest::Method::GET,
        c,
        ADMIN_TOKEN,
        "/api/v1/admin/nodes",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn workspace(c: &Cluster, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("workspace"))
        .args(args)
        .env("WORKSPACE_URL", &c.url)
        .env("WORKSPACE_TOKEN", token)
        .env_remove("WORKSPACE_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", c.root())
        .output()
        .expect("run workspace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rewrites alice's `[[users]]` entry with `keys` and reloads (SIGHUP).
fn set_alice(c: &Cluster, keys: &str) {
    let path = c.root().join("coordinator.toml");
    let cfg = std::fs::read_to_string(&path).expect("config");
    let alice = format!(
        "[[users]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\n",
        protocol::auth::token_hash(TOKEN)
    );
    let start = cfg.find(&alice).expect("alice's entry");
    let end = cfg[start + alice.len()..]
        .find("[[users]]")
        .map_or(cfg.len(), |i| start + alice.len() + i);
    let new = format!("{}{alice}{keys}\n\n{}", &cfg[..start], &cfg[end..]);
    std::fs::write(&path, new).expect("write config");
    let before = c.log().matches("users reloaded").count();
    signal(c.coordinator_pid(), Signal::SIGHUP);
    eventually(Duration::from_secs(10), "users reloaded", || {
        c.log().matches("users reloaded").count() > before
    });
}

#[test]
fn a_waiting_workspace_shows_the_batch_systems_reason_as_squeue_would() {
    // One node: the first lease takes it, the next two wait.
    let c = Cluster::start(Options {
        nodes: 1,
        ..Options::default()
    });
    let whole = |name: &str| spec(name, 1, 512, "").replace("image =", "cpus = 2\nimage =");
    let first = ws_id(&c.create(&whole("first")));
    c.wait_running(&first);
    let second = ws_id(&c.create(&whole("second")));
    let third = ws_id(&c.create(&whole("third")));
    let v2 = c.wait_for(
        &second,
        "given a queue reason",
        Duration::from_secs(10),
        |v| v["reason"].is_string(),
    );
    let job = v2["slots"][0]["job_id"]
        .as_str()
        .expect("a job id")
        .to_string();
    assert_eq!(v2["state"], "pending");
    assert_eq!(
        v2["reason"],
        format!("batch job {job} waits: Resources"),
        "{v2:#}"
    );
    assert_eq!(v2["slots"][0]["queue_reason"], "Resources");
    let v3 = c.wait_for(
        &third,
        "given a queue reason",
        Duration::from_secs(10),
        |v| v["reason"].is_string(),
    );
    assert!(
        v3["reason"].as_str().unwrap().ends_with("waits: Priority"),
        "{v3:#}"
    );
    // The client shows it too, and so does the admin's view.
    let (code, out, _) = workspace(&c, TOKEN, &["status", &second]);
    assert_eq!(code, 0);
    assert!(out.contains("waits: Resources"), "{out}");
    // A wait shows it as progress (plain lines: stderr is not a terminal).
    let file = c.root().join("fourth.toml");
    std::fs::write(&file, whole("fourth")).unwrap();
    let (code, _, err) = workspace(
        &c,
        TOKEN,
        &[
            "create",
            "--file",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "4",
        ],
    );
    assert_eq!(code, 4, "still queued: {err}");
    assert!(err.contains("waits: Priority"), "{err}");
    let view = cluster_view(&c);
    let slot = view["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["workspace_id"] == second.as_str())
        .expect("the waiting slot is listed");
    assert_eq!(slot["queue_reason"], "Resources");
    // Once it runs, the reason goes.
    let r = c.destroy_as(TOKEN, &first);
    assert_eq!(r.status, 200);
    let v2 = c.wait_running(&second);
    assert!(v2["reason"].is_null(), "{v2:#}");
    assert!(v2["slots"][0].get("queue_reason").is_none(), "{v2:#}");
}

#[test]
fn limits_per_user_refuse_with_the_limit_and_its_value_store_nothing_and_reload_on_sighup() {
    let c = Cluster::start(Options::default());
    set_alice(
        &c,
        "max_vms = 3\nmax_memory_mb = 2048\nmax_lease_s = 7200\nmax_workspaces = 2",
    );
    let before = c.db_counts();
    let refused = [
        (spec("big", 4, 256, ""), "max_vms = 3"),
        (spec("fat", 2, 1536, ""), "max_memory_mb = 2048"),
        (
            spec("long", 1, 256, "").replace("\"1h\"", "\"3h\""),
            "max_lease_s = 7200",
        ),
    ];
    for (s, limit) in &refused {
        let r = c.create(s);
        assert_eq!(r.status, 403, "{limit}: {}", r.body);
        let e = r.body["error"].as_str().unwrap_or("");
        assert!(e.contains(limit), "names {limit}: {e}");
    }
    assert_eq!(c.db_counts(), before, "a refused request stores nothing");
    // Within the limits: two workspaces; a third is one too many.
    let a = ws_id(&c.create(&spec("a", 1, 512, "")));
    let b = ws_id(&c.create(&spec("b", 1, 512, "")));
    let r = c.create(&spec("c", 1, 256, ""));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("max_workspaces = 2"),
        "{}",
        r.body
    );
    // bob has no limits.
    assert_eq!(
        c.create_as(OTHER_TOKEN, &spec("bob", 4, 256, "")).status,
        201
    );
    // The CLI says the same, once, with exit 1.
    let file = c.root().join("c.toml");
    std::fs::write(&file, spec("c", 1, 256, "")).unwrap();
    let (code, _, err) = workspace(&c, TOKEN, &["create", "--file", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.matches("max_workspaces = 2").count(), 1, "{err}");
    // A destroyed workspace gives its room back.
    assert_eq!(c.destroy_as(TOKEN, &a).status, 200);
    c.wait_settled(&a);
    assert_eq!(c.create(&spec("c", 1, 256, "")).status, 201);
    // SIGHUP lifts the limits.
    set_alice(&c, "");
    assert_eq!(c.create(&spec("d", 4, 256, "")).status, 201);
    assert_eq!(c.destroy_as(TOKEN, &b).status, 200);
    // A limit of 0 is refused at start, naming the key.
    let cfg = std::fs::read_to_string(c.root().join("coordinator.toml")).unwrap();
    let bad = c.root().join("bad.toml");
    std::fs::write(
        &bad,
        cfg.replace("name = \"alice\"\n", "name = \"alice\"\nmax_vms = 0\n"),
    )
    .unwrap();
    let out = Command::new(bin("workspace-coordinator"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .expect("run coordinator");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_vms") && err.contains("alice"), "{err}");
}

#[test]
fn a_running_lease_is_renewed_within_its_walltime_and_the_owners_limit() {
    let c = Cluster::start(Options::default());
    set_alice(&c, "max_lease_s = 600");
    let s = "name = \"r\"\nduration = 5\nmax_duration = 300\n[[group]]\nname = \"w\"\ncount = 2\nmemory_mb = 256\nimage = \"debian-12\"\n";
    let id = ws_id(&c.create(s));
    let v = c.wait_running(&id);
    let ends = v["expires_ms"].as_u64().expect("expires_ms");
    // By the CLI: 20 s more.
    let (code, out, err) = workspace(&c, TOKEN, &["renew", &id, "--by", "20s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("renewed"), "{out}");
    let v = c.get(&id);
    assert_eq!(v["expires_ms"].as_u64(), Some(ends + 20_000));
    // Past the walltime (max_duration 300 s + the pilots' startup slack):
    // refused with the bound and what would fit.
    let path = format!("/api/v1/workspaces/{id}/renew");
    let r = call(
        reqwest::Method::POST,
        &c,
        TOKEN,
        &path,
        Some(serde_json::json!({"by_s": 3600})),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    let e = r.body["error"].as_str().unwrap();
    assert!(e.contains("walltime") && e.contains("at most"), "{e}");
    // Past alice's max_lease_s (600 s in all) but within the walltime? Not
    // here: the walltime is shorter. Lower it to see the limit named.
    set_alice(&c, "max_lease_s = 60");
    let r = call(
        reqwest::Method::POST,
        &c,
        TOKEN,
        &path,
        Some(serde_json::json!({"by_s": 60})),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("max_lease_s = 60"));
    assert_eq!(
        c.get(&id)["expires_ms"].as_u64(),
        Some(ends + 20_000),
        "unchanged"
    );
    // Another user's lease is not found; a bad body is named.
    let r = call(
        reqwest::Method::POST,
        &c,
        OTHER_TOKEN,
        &path,
        Some(serde_json::json!({"by_s": 5})),
    );
    assert_eq!(r.status, 404);
    let r = call(
        reqwest::Method::POST,
        &c,
        TOKEN,
        &path,
        Some(serde_json::json!({"by": 5})),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"].as_str().unwrap().contains("by_s"),
        "{}",
        r.body
    );
    // The lease really lasts: still running past its first end, then expires
    // at the renewed one.
    let wait_until = |ms: u64| {
        let now = protocol::now_ms();
        if ms > now {
            std::thread::sleep(Duration::from_millis(ms - now));
        }
    };
    wait_until(ends + 2_000);
    assert_eq!(c.get(&id)["state"], "running", "renewed past its first end");
    let v = c.wait_for(&id, "expired", Duration::from_secs(40), |v| {
        v["state"] == "expired"
    });
    let ended = v["updated_ms"].as_u64().unwrap();
    assert!(ended >= ends + 20_000, "ended at the renewed time: {v:#}");
    c.wait_settled(&id);
    let phases: Vec<String> = c
        .timeline(&id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(phases.contains(&"renewed".to_string()), "{phases:?}");
    c.assert_nodes_restored();
    // Both durations were measured, as histograms.
    eventually(Duration::from_secs(5), "teardown observed", || {
        sample(&metrics(&c), "wsp_teardown_seconds_count") == Some(1.0)
    });
    let m = metrics(&c);
    assert_eq!(
        sample(&m, "wsp_request_to_running_seconds_count"),
        Some(1.0),
        "{m}"
    );
    let took = sample(&m, "wsp_teardown_seconds_sum").unwrap();
    assert!(took > 0.0 && took < 30.0, "{m}");
    assert_eq!(
        sample(&m, "wsp_slots{state=\"released\"}"),
        Some(1.0),
        "{m}"
    );
    // A lease that is not running cannot be renewed.
    let r = call(
        reqwest::Method::POST,
        &c,
        TOKEN,
        &path,
        Some(serde_json::json!({"by_s": 5})),
    );
    assert_eq!(r.status, 409, "{}", r.body);
}

/// Issue 19 item 7 end to end: a pilot killed on node1 (its node keeps its
/// VM), the coordinator cancels the job, node2's pilot is ended by that
/// cancel. The scientist sees the VM unknown and that the admins were told;
/// the admin sees the node and the command, runs it, and says so.
#[test]
fn a_lost_pilots_node_is_listed_for_kill_all_and_settled_when_an_admin_cleans_it() {
    let c = Cluster::start(
        Options {
            nodes: 2,
            ..Options::default()
        }
        .with_top("pilot_silence_s = 8\n"),
    );
    let id = ws_id(&c.create(&spec("lost", 2, 512, "")));
    let v = c.wait_running(&id);
    let slot = v["slots"][0]["id"].as_str().unwrap().to_string();
    let pid = c.pilot_pid_on(&slot, "node1");
    signal(pid, Signal::SIGKILL);
    let v = c.wait_for(&id, "failed and settled", Duration::from_secs(40), |v| {
        v["settled"] == true
    });
    let vm_on = |v: &Value, node: &str| {
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|vm| vm["node"] == node)
            .map(|vm| vm["state"].as_str().unwrap_or("").to_string())
            .unwrap()
    };
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(vm_on(&v, "node1"), "unknown", "{v:#}");
    assert_eq!(vm_on(&v, "node2"), "destroyed", "not preempted: {v:#}");
    let said: Vec<String> = c
        .timeline(&id)
        .iter()
        .map(|e| e["detail"].as_str().unwrap_or("").to_string())
        .chain(v["reason"].as_str().map(str::to_string))
        .collect();
    for s in &said {
        assert!(
            !s.contains("run workspace-kill-all"),
            "told to the scientist: {s}"
        );
        assert!(!s.contains("from the batch system"), "{s}");
    }
    assert!(said.iter().any(|s| s.contains("admins")), "{said:?}");
    // The VM is still on node1: kill-all is needed indeed.
    assert_eq!(c.node("node1")["domains"].as_array().unwrap().len(), 1);

    // The scientist may not read the admin's view.
    let r = call(reqwest::Method::GET, &c, TOKEN, "/api/v1/admin/nodes", None);
    assert_eq!(r.status, 403, "{}", r.body);
    let view = cluster_view(&c);
    let todo = view["needs_kill_all"].as_array().unwrap();
    assert_eq!(todo.len(), 1, "{view:#}");
    assert_eq!(todo[0]["node"], "node1");
    assert_eq!(todo[0]["why"], "pilot lost");
    let command = todo[0]["command"].as_str().unwrap().to_string();
    assert!(command.starts_with("workspace-kill-all "), "{command}");
    let (code, out, _) = workspace(&c, ADMIN_TOKEN, &["admin", "nodes"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("needs_kill_all") && out.contains(&command),
        "{out}"
    );
    let m = metrics(&c);
    assert_eq!(
        sample(&m, "wsp_nodes{state=\"needs_kill_all\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "wsp_nodes{state=\"other\"}"), Some(1.0), "{m}");

    // The admin runs exactly that command on node1.
    let mut words = command.split_whitespace().map(|w| w.trim_matches('\''));
    words.next();
    let out = Command::new(bin("workspace-kill-all"))
        .args(words)
        .output()
        .expect("run kill-all");
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(3),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_nodes_restored();
    let (code, out, err) = workspace(&c, ADMIN_TOKEN, &["admin", "cleaned", "node1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(vm_on(&c.get(&id), "node1"), "destroyed");
    let view = cluster_view(&c);
    assert_eq!(
        view["needs_kill_all"].as_array().unwrap().len(),
        0,
        "{view:#}"
    );
    let (code, _, err) = workspace(&c, ADMIN_TOKEN, &["admin", "cleaned", "node1"]);
    assert_eq!(code, 1, "not listed any more: {err}");
}

/// The DOM Chromium renders from `url` once its script has run.
fn rendered_dom(c: &Cluster, url: &str) -> String {
    need_tools(&["chromium"]);
    let profile = c.root().join(format!("chromium-{}", protocol::now_ms()));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=10000",
            "--timeout=20000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run chromium");
    // Bounded: a browser that hangs fails the test, it does not stall it.
    // Its output is read meanwhile, so a full pipe cannot stall it either.
    let pid = out.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(out.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(r) => r.expect("chromium's output"),
        Err(_) => {
            signal(pid, Signal::SIGKILL);
            panic!("chromium did not finish within 90 s");
        }
    };
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first element after `marker` (`<td ...>text</td>`).
fn cell_after(dom: &str, marker: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let rest = &dom[at..];
    let open = rest.find('>')?;
    let close = rest[open..].find('<')?;
    Some(rest[open + 1..open + close].to_string())
}

#[test]
fn the_status_page_shows_in_chromium_what_the_admin_api_says() {
    let c = Cluster::start(Options {
        nodes: 2,
        ..Options::default()
    });
    let running = ws_id(&c.create(&spec("shown", 2, 512, "")));
    c.wait_running(&running);
    let waiting =
        ws_id(&c.create(&spec("queued", 1, 512, "").replace("image =", "cpus = 2\nimage =")));
    c.wait_for(
        &waiting,
        "given a queue reason",
        Duration::from_secs(10),
        |v| v["reason"].is_string(),
    );
    let view = cluster_view(&c);
    let page = http()
        .get(format!("{}/status", c.url))
        .send()
        .expect("GET /status");
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(csp.contains("connect-src 'self'"), "{csp}");

    let dom = rendered_dom(&c, &format!("{}/status#token={ADMIN_TOKEN}", c.url));
    assert!(
        dom.contains("data-generated-ms="),
        "the script rendered: {dom}"
    );
    assert!(!dom.contains(ADMIN_TOKEN), "the token is not in the page");
    let nodes = view["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{view:#}");
    for n in nodes {
        let name = n["name"].as_str().unwrap();
        let row = format!("data-node=\"{name}\"");
        let state = cell_after(&dom[dom.find(&row).expect(&row)..], "data-field=\"state\"");
        assert_eq!(state.as_deref(), n["state"].as_str(), "{name} in {dom}");
        let vms = cell_after(&dom[dom.find(&row).unwrap()..], "data-field=\"vms\"");
        assert_eq!(vms, Some(n["vms"].to_string()), "{name}");
    }
    for s in view["slots"].as_array().unwrap() {
        let row = format!("data-slot=\"{}\"", s["id"].as_str().unwrap());
        let at = dom.find(&row).unwrap_or_else(|| panic!("{row} in {dom}"));
        let state = cell_after(&dom[at..], "data-field=\"state\"");
        assert_eq!(state.as_deref(), s["state"].as_str());
        let reason = cell_after(&dom[at..], "data-field=\"queue_reason\"");
        assert_eq!(
            reason.as_deref().unwrap_or(""),
            s["queue_reason"].as_str().unwrap_or(""),
            "{row}"
        );
    }
    assert!(
        dom.contains(">Resources<"),
        "the queued slot's reason: {dom}"
    );
    let summary = cell_after(&dom, "id=\"summary\"").unwrap_or_default();
    assert!(
        summary.starts_with("local batch system, 2 node(s)") && summary.contains("2 in use"),
        "{summary}"
    );
    // Without a token the page asks for one and shows nothing.
    let dom = rendered_dom(&c, &format!("{}/status", c.url));
    assert!(dom.contains("An admin token is needed"), "{dom}");
    assert!(!dom.contains("data-node="), "{dom}");
    // With a scientist's token it says why.
    let dom = rendered_dom(&c, &format!("{}/status#token={TOKEN}", c.url));
    assert!(dom.contains("is not an admin"), "{dom}");
}
