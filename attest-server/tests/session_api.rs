//! The agent's side of a turnover on the API, in process (plain HTTP on
//! 127.0.0.1; TLS is covered by the other tiers): a session bound to a
//! running plan gets the plan, streams progress and console lines, reports
//! steps; a good snapshot is filed under the previous lessee and never
//! handed out to be taken again (a node that reboots mid-turnover gets its
//! record instead); a failed step ends the plan with a signed failure
//! report; sessions expire and die with their plan.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use reqwest::StatusCode;
use serde_json::{json, Value};
use warden_attest_server::api::AppState;
use warden_attest_server::auth::token_digest;
use warden_attest_server::db::{Db, SessionRow};

const ADMIN: &str = "admin-secret";
const NODE: &str = "ab00000000000000000000000000000000000000000000000000000000000001";

type Api = common::JsonApi;

fn snapshot_record() -> Value {
    json!({
        "uri": "nbd://10.0.2.2:10809/",
        "source": "/dev/nvme0n1",
        "source_identity": "nvme0n1 QEMU NVMe Ctrl serial n1",
        "disk_bytes": 268435456u64,
        "chunk_size": 4194304u64,
        "chunks": 64,
        "zero_chunks": 61,
        "changed_chunks": 64,
        "bytes_sent": 12582912u64,
        "bytes_zeroed": 255852544u64,
        "zero_bytes_skipped": 0,
        "manifest_sha256": "cd".repeat(32),
        "manifest_bytes": 2200,
        "previous_manifest_sha256": null,
        "incremental": false,
        "verified": false,
        "reconnects": 0,
        "retries": 0,
        "connections": 1,
        "direct_io": true,
        "verify_ms": 0,
        "elapsed_ms": 900
    })
}

fn step(name: &str, ok: bool, error: Option<&str>, records: Vec<String>) -> Value {
    json!({
        "step": name,
        "ok": ok,
        "error": error,
        "started_at": "2026-11-21T10:00:00Z",
        "finished_at": "2026-11-21T10:00:01Z",
        "duration_ms": 1000,
        "bytes": 268435456u64,
        "records": records,
    })
}

fn unix_now() -> i64 {
    warden_attest_server::auth::unix_now()
}

#[test]
fn a_session_runs_its_plan_keeps_a_good_snapshot_and_a_failed_step_ends_it() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("warden.db");
        let state = AppState::new(Db::open(&db_path).unwrap(), ADMIN.into());
        let addr = common::serve_in_process(state).await;
        let api = Api::new(addr, ADMIN);

        // uni-a owns the node; lab-a leased it; the plan hands it to lab-b.
        api.ok(
            "PUT",
            &format!("/v1/nodes/{NODE}/owner"),
            ADMIN,
            Some(json!({"owner": "uni-a"})),
        )
        .await;
        let owner = api.token("owner", "uni-a").await;
        let lab_a = api.token("lessee", "lab-a").await;
        let lab_b = api.token("lessee", "lab-b").await;
        let plan = |lessee: &str| {
            json!({
                "image": "http://10.0.2.2:8080/tenant.qcow2",
                "checksum": format!("sha256:{}", "ab".repeat(32)),
                "snapshot_to": "nbd://10.0.2.2:10809/",
                "lessee": lessee,
            })
        };
        let path = format!("/v1/nodes/{NODE}/turnover");
        api.ok("POST", &path, &owner, Some(plan("lab-a"))).await;
        let planned = api.ok("POST", &path, &owner, Some(plan("lab-b"))).await;
        assert_eq!(planned["previous_lessee"], "lab-a");
        let lease = planned["lease_id"].as_str().unwrap().to_owned();

        // What a good boot verdict does: start the plan, open a session.
        let db = Db::open(&db_path).unwrap();
        let plan_id = db.latest_plan(NODE).unwrap().unwrap().id;
        let session = |db: &mut Db, secret: &str, expires_at: i64| {
            db.start_plan(plan_id, 1, "2026-11-21T10:00:00Z").unwrap();
            db.create_session(
                &token_digest(secret),
                &SessionRow {
                    node_id: NODE.into(),
                    plan_id: Some(plan_id),
                    attestation_id: 1,
                    ak_name: "000b".into(),
                    expires_at,
                },
                "2026-11-21T10:00:00Z",
            )
            .unwrap();
        };
        let mut db = db;
        session(&mut db, "boot-1", unix_now() + 3600);

        // Operator tokens are not sessions, and the reverse.
        let (status, _) = api.call("GET", "/v1/session/plan", &owner, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = api.call("GET", "/v1/nodes", "boot-1", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let got = api.ok("GET", "/v1/session/plan", "boot-1", None).await;
        assert_eq!(got["lease_id"], lease.as_str());
        assert_eq!(got["snapshot_done"], Value::Null);

        // Progress and console reach the operators.
        let (status, _) = api
            .call(
                "POST",
                "/v1/session/progress",
                "boot-1",
                Some(json!({"step": "snapshot", "done": 25, "total": 100})),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let progress = api
            .ok("GET", &format!("/v1/nodes/{NODE}/progress"), &lab_b, None)
            .await;
        assert_eq!(progress["plan_state"], "running");
        assert_eq!(progress["steps"][0]["step"], "snapshot");
        assert_eq!(progress["steps"][0]["done"], 25);
        assert_eq!(progress["steps"][0]["total"], 100);
        let (status, _) = api
            .call(
                "POST",
                "/v1/session/console",
                "boot-1",
                Some(json!({"lines": ["snapshot: backing up", "WARDEN {}"]})),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let console = api
            .ok("GET", &format!("/v1/nodes/{NODE}/console"), &owner, None)
            .await;
        let lines: Vec<&str> = console["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["line"].as_str().unwrap())
            .collect();
        assert_eq!(lines, ["snapshot: backing up", "WARDEN {}"]);
        let after = console["lines"][0]["seq"].as_i64().unwrap();
        let rest = api
            .ok(
                "GET",
                &format!("/v1/nodes/{NODE}/console?after={after}"),
                &owner,
                None,
            )
            .await;
        assert_eq!(rest["lines"].as_array().unwrap().len(), 1);

        // A good snapshot: filed under lab-a, the lessee whose disk it is.
        let record = serde_json::to_string(&snapshot_record()).unwrap();
        let (status, body) = api
            .call(
                "POST",
                "/v1/session/steps",
                "boot-1",
                Some(step("snapshot", true, None, vec![record.clone()])),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let mine = api.ok("GET", "/v1/snapshots", &lab_a, None).await;
        assert_eq!(mine["snapshots"].as_array().unwrap().len(), 1);
        assert_eq!(mine["snapshots"][0]["lease_id"], lease.as_str());
        let theirs = api.ok("GET", "/v1/snapshots", &lab_b, None).await;
        assert!(theirs["snapshots"].as_array().unwrap().is_empty());

        // The node reboots mid-turnover: the new session's plan says the
        // snapshot is done, with its record — it must not be taken again.
        session(&mut db, "boot-2", unix_now() + 3600);
        let again = api.ok("GET", "/v1/session/plan", "boot-2", None).await;
        assert_eq!(again["lease_id"], lease.as_str());
        assert_eq!(again["snapshot_done"], record.as_str());

        // A failed step ends the plan; the failure report is signed.
        let (status, _) = api
            .call(
                "POST",
                "/v1/session/steps",
                "boot-2",
                Some(step(
                    "wipe",
                    false,
                    Some("nvme0n1 read back non-zero data at offset 4096"),
                    vec![],
                )),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let ended = api
            .ok("GET", &format!("/v1/nodes/{NODE}/plan"), &owner, None)
            .await;
        assert_eq!(ended["state"], "failed");
        let failure = ended["failure"].as_str().unwrap();
        assert!(
            failure.contains("wipe failed: nvme0n1 read back non-zero"),
            "{failure}"
        );
        let report = api
            .ok("GET", &format!("/v1/nodes/{NODE}/report"), &lab_b, None)
            .await;
        assert_eq!(report["report"]["outcome"], "failed");
        assert_eq!(report["report"]["failure"], failure);
        assert!(report["report"]["disks"].as_array().unwrap().is_empty());
        let (status, _) = api
            .call("GET", &format!("/v1/nodes/{NODE}/report"), &lab_a, None)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // The session has no turnover any more; an expired one is refused.
        let (status, _) = api
            .call(
                "POST",
                "/v1/session/steps",
                "boot-2",
                Some(step("image", true, None, vec![])),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, _) = api.call("GET", "/v1/session/plan", "boot-2", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        session(&mut db, "stale", unix_now() - 1);
        let (status, body) = api.call("GET", "/v1/session/plan", "stale", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("expired"),
            "{body}"
        );
    });
}
