//! Recovery of state the previous coordinator process left in SQLite, through
//! the real engine (batch system faked in memory).

use async_trait::async_trait;
use coordinator::config::{Config, User};
use coordinator::engine::{Caller, Engine};
use lrm_adapters::{Capacity, JobId, JobStatus, Lrm, LrmError, SlotJob, Warning};
use protocol::auth::token_hash;
use protocol::spec::WorkspaceSpec;
use protocol::view::WorkspaceState;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A batch system whose submit never answers (the coordinator dies in it).
struct HangingLrm;

#[async_trait]
impl Lrm for HangingLrm {
    fn kind(&self) -> &'static str {
        "hanging"
    }
    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: Duration::from_secs(5),
        }
    }
    fn capacity(&self) -> Option<Capacity> {
        Some(Capacity {
            nodes: 4,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        })
    }
    fn render_script(&self, _job: &SlotJob) -> String {
        String::new()
    }
    async fn submit(&self, _job: &SlotJob) -> Result<JobId, LrmError> {
        std::future::pending().await
    }
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        Ok(ids
            .iter()
            .map(|i| (i.clone(), JobStatus::NotFound))
            .collect())
    }
    async fn cancel(&self, _id: &JobId) -> Result<(), LrmError> {
        Ok(())
    }
}

const SPEC: &str = r#"name = "r"
duration = "1h"
[[group]]
name = "w"
count = 2
memory_mb = 512
cpus = 1
image = "x"
"#;

#[tokio::test]
async fn workspace_whose_submit_the_coordinator_died_in_fails_and_settles_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().join("data"),
        users: vec![User {
            name: "alice".into(),
            token_sha256: token_hash("t"),
            admin: false,
            max_urgency: 0,
        }],
        ..Config::default()
    };
    let caller = Caller {
        user: "alice".into(),
        admin: false,
    };
    let first = Engine::new(
        cfg.clone(),
        Arc::new(HangingLrm),
        "http://127.0.0.1:1".into(),
    )
    .unwrap();
    let creating = {
        let (first, caller) = (first.clone(), caller.clone());
        tokio::spawn(async move {
            first
                .create(&caller, WorkspaceSpec::parse(SPEC).unwrap())
                .await
        })
    };
    // The workspace is stored before its job is submitted; then the process dies.
    let id = loop {
        if let Some(ws) = first.list(&caller).unwrap().into_iter().next() {
            break ws.id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    creating.abort();
    let _ = creating.await;
    drop(first);

    let second = Engine::new(cfg, Arc::new(HangingLrm), "http://127.0.0.1:1".into()).unwrap();
    let v = second.get(&caller, &id).unwrap();
    assert_eq!(v.state, WorkspaceState::Failed, "{v:?}");
    assert!(
        v.reason
            .as_deref()
            .unwrap_or_default()
            .contains("submitting"),
        "{v:?}"
    );
    assert!(v.settled, "nothing was submitted, nothing is left: {v:?}");
}
