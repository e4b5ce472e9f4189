//! `[reservations] best_effort_order = "largest_first"` (issue 18) end to
//! end on the local batch system: the real coordinator and pilots (sim
//! nodes), specs posted over HTTP. One node; while a lease holds it, a small
//! lease and then a large one queue; when the node frees, the large one
//! runs first, the small one after it.

use wsp_e2e::*;

fn one(name: &str, duration: &str) -> String {
    // Two CPUs: the VM takes the node's both cores, one lease per node.
    format!(
        r#"
name = "{name}"
duration = "{duration}"
[[group]]
name = "worker"
count = 1
memory_mb = 512
cpus = 2
image = "worker.qcow2"
"#
    )
}

fn order(extra: &str) -> (String, String, Cluster) {
    let c = Cluster::start(Options {
        nodes: 1,
        extra: extra.into(),
        ..Options::default()
    });
    let id = |r: Reply| {
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    };
    let first = id(c.create(&one("first", "1h")));
    c.wait_running(&first);
    let small = id(c.create(&one("small", "2m")));
    let large = id(c.create(&one("large", "30m")));
    for w in [&small, &large] {
        assert_eq!(c.get(w)["state"], "pending", "queued behind the first");
    }
    let r = c.destroy_as(TOKEN, &first);
    assert!(r.status < 300, "{}", r.body);
    (small, large, c)
}

#[test]
fn largest_first_runs_the_larger_queued_lease_first_on_the_local_batch_system() {
    let (small, large, c) = order("\n[reservations]\nbest_effort_order = \"largest_first\"\n");
    c.wait_running(&large);
    assert_eq!(c.get(&small)["state"], "pending", "the small one waits");
    let r = c.destroy_as(TOKEN, &large);
    assert!(r.status < 300, "{}", r.body);
    c.wait_running(&small);
}

#[test]
fn by_arrival_the_earlier_small_lease_runs_first() {
    let (small, large, c) = order("");
    c.wait_running(&small);
    assert_eq!(c.get(&large)["state"], "pending", "the large one waits");
}
