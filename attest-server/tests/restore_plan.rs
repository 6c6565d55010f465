//! Restore plans on the API, in process (plain HTTP on 127.0.0.1): a plan
//! restores a snapshot the server recorded (`restore_from`, a lease id)
//! instead of writing an image — exactly one of the two; only for the
//! lessee whose data the snapshot holds (tenant A's disk never reaches
//! tenant B); the session plan carries the export, manifest digest and CA
//! the server resolved, never anything the operator typed; and the final
//! attestation is held to a restore of that manifest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use reqwest::StatusCode;
use serde_json::{json, Value};
use warden_attest_server::api::AppState;
use warden_attest_server::auth::token_digest;
use warden_attest_server::db::{Db, SessionRow};
use warden_protocol::attest::{AttestRequest, Phase};
use warden_protocol::hello::PcrBank;

const ADMIN: &str = "admin-secret";
const NODE: &str = "ab00000000000000000000000000000000000000000000000000000000000002";
const EXPORT: &str = "nbds://10.0.2.2:10809/lab-a";

type Api = common::JsonApi;

impl Api {
    /// A plan that must be refused with `status`; returns the error body.
    async fn refused(&self, token: &str, body: Value, status: StatusCode) -> Value {
        let path = format!("/v1/nodes/{NODE}/turnover");
        let (got, value) = self.call("POST", &path, token, Some(body.clone())).await;
        assert_eq!(got, status, "{body} → {value}");
        value
    }
}

/// A real CA certificate, as the block store's operator hands it out.
fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

fn snapshot_record() -> Value {
    json!({
        "uri": EXPORT,
        "source": "/dev/nvme0n1",
        "source_identity": "block:/dev/nvme0n1 serial=nvme0",
        "disk_bytes": 134217728u64,
        "chunk_size": 4194304u64,
        "chunks": 32,
        "zero_chunks": 20,
        "changed_chunks": 32,
        "bytes_sent": 50331648u64,
        "bytes_zeroed": 83886080u64,
        "zero_bytes_skipped": 0,
        "manifest_sha256": "cd".repeat(32),
        "manifest_bytes": 1200,
        "previous_manifest_sha256": null,
        "incremental": false,
        "verified": false,
        "reconnects": 0,
        "retries": 0,
        "connections": 1,
        "direct_io": true,
        "verify_ms": 0,
        "elapsed_ms": 900,
        "ca_sha256": ["ee".repeat(32)]
    })
}

/// What a good boot verdict does to the node's newest plan: starts it and
/// opens session `secret` on it.
fn open_session(db: &mut Db, secret: &str) -> i64 {
    let plan_id = db.latest_plan(NODE).unwrap().unwrap().id;
    db.start_plan(plan_id, 1, "2026-11-21T10:00:00Z").unwrap();
    db.create_session(
        &token_digest(secret),
        &SessionRow {
            node_id: NODE.into(),
            plan_id: Some(plan_id),
            attestation_id: 1,
            ak_name: "000b".into(),
            expires_at: warden_attest_server::auth::unix_now() + 3600,
        },
        "2026-11-21T10:00:00Z",
    )
    .unwrap();
    plan_id
}

fn handoff_request() -> AttestRequest {
    AttestRequest {
        protocol: warden_protocol::PROTOCOL_VERSION,
        node_id: NODE.into(),
        ak_name: "000b".into(),
        nonce: vec![0; 32],
        quote: Vec::new(),
        signature: Vec::new(),
        pcrs: PcrBank {
            algorithm: "sha256".into(),
            values: Default::default(),
        },
        event_log: None,
        phase: Phase::Handoff,
        agent_log: Vec::new(),
    }
}

#[test]
fn a_restore_plan_restores_only_the_incoming_lessees_own_snapshot() {
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
        let addr = common::serve_in_process(state.clone()).await;
        let api = Api::new(addr, ADMIN);
        let mut db = Db::open(&db_path).unwrap();

        // uni-a owns the node; lab-a leased it; turnover 1 hands it to
        // lab-b and backs lab-a's disk up over TLS first.
        api.ok(
            "PUT",
            &format!("/v1/nodes/{NODE}/owner"),
            ADMIN,
            Some(json!({"owner": "uni-a"})),
        )
        .await;
        let owner = api.token("owner", "uni-a").await;
        let other_owner = api.token("owner", "uni-z").await;
        let lab_a = api.token("lessee", "lab-a").await;
        let ca = ca_pem();
        let image = |lessee: &str| {
            json!({
                "image": "http://10.0.2.2:8080/tenant.qcow2",
                "checksum": format!("sha256:{}", "ab".repeat(32)),
                "snapshot_to": EXPORT,
                "snapshot_ca": ca,
                "lessee": lessee,
            })
        };
        let path = format!("/v1/nodes/{NODE}/turnover");
        api.ok("POST", &path, &owner, Some(image("lab-a"))).await;
        let first = api.ok("POST", &path, &owner, Some(image("lab-b"))).await;
        let lease1 = first["lease_id"].as_str().unwrap().to_owned();
        // An image plan's JSON is what it always was.
        assert!(first["request"].get("restore_from").is_none(), "{first}");
        open_session(&mut db, "boot-1");
        let record = serde_json::to_string(&snapshot_record()).unwrap();
        api.ok(
            "POST",
            "/v1/session/steps",
            "boot-1",
            Some(json!({
                "step": "snapshot", "ok": true, "error": null,
                "started_at": "2026-11-21T10:00:00Z", "finished_at": "2026-11-21T10:00:01Z",
                "duration_ms": 1000, "bytes": 134217728u64, "records": [record],
            })),
        )
        .await;
        let plan1 = db.latest_plan(NODE).unwrap().unwrap().id;
        assert!(db
            .finish_plan(plan1, None, Some(2), "2026-11-21T10:05:00Z")
            .unwrap());
        let snapshot = api
            .ok("GET", &format!("/v1/snapshots/{lease1}"), &lab_a, None)
            .await;
        assert_eq!(snapshot["lessee"], "lab-a");

        let restore = |lessee: Option<&str>| {
            let mut p = json!({"restore_from": lease1, "target": "nvme1n1", "wipe": "metadata"});
            if let Some(l) = lessee {
                p["lessee"] = json!(l);
            }
            p
        };

        // Exactly one of image and restore_from; no image field with a restore.
        let both = json!({
            "image": "http://10.0.2.2:8080/tenant.qcow2",
            "checksum": format!("sha256:{}", "ab".repeat(32)),
            "restore_from": lease1, "lessee": "lab-a",
        });
        let e = api.refused(&owner, both, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["field"], "restore_from", "{e}");
        let e = api
            .refused(&owner, json!({"lessee": "lab-a"}), StatusCode::BAD_REQUEST)
            .await;
        assert_eq!(e["field"], "image", "{e}");
        let mut with_checksum = restore(Some("lab-a"));
        with_checksum["checksum"] = json!(format!("sha256:{}", "ab".repeat(32)));
        let e = api
            .refused(&owner, with_checksum, StatusCode::BAD_REQUEST)
            .await;
        assert_eq!(e["field"], "checksum", "{e}");
        let mut with_ca = restore(Some("lab-a"));
        with_ca["image_ca"] = json!(format!("sha256:{}", "ab".repeat(32)));
        let e = api.refused(&owner, with_ca, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["field"], "image_ca", "{e}");
        // Snapshotting over the backup before restoring it.
        let mut over = restore(Some("lab-a"));
        over["snapshot_to"] = json!(EXPORT);
        over["snapshot_ca"] = json!(ca);
        let e = api.refused(&owner, over, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["field"], "snapshot_to", "{e}");

        // A lease with no snapshot: 404 naming it.
        let e = api
            .refused(
                &owner,
                json!({"restore_from": "lease-ffffffffffffffff", "lessee": "lab-a"}),
                StatusCode::NOT_FOUND,
            )
            .await;
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("lease-ffffffffffffffff"),
            "{e}"
        );
        // lab-a's disk for lab-b — named, or as the node's current lessee.
        for plan in [restore(Some("lab-b")), restore(None)] {
            let e = api.refused(&owner, plan, StatusCode::FORBIDDEN).await;
            let message = e["message"].as_str().unwrap();
            assert!(
                message.contains("lab-a") && message.contains("lab-b"),
                "{message}"
            );
        }
        // Only the node's owner (or an admin) plans: not another owner,
        // not even the lessee whose data it is.
        api.refused(&other_owner, restore(Some("lab-a")), StatusCode::FORBIDDEN)
            .await;
        api.refused(&lab_a, restore(Some("lab-a")), StatusCode::FORBIDDEN)
            .await;
        // Nothing refused changed the node's lessee.
        assert_eq!(
            db.node_roles(NODE).unwrap().lessee.as_deref(),
            Some("lab-b")
        );

        // lab-a's own data back to lab-a: stored as asked, no image fields.
        let plan = api
            .ok("POST", &path, &owner, Some(restore(Some("lab-a"))))
            .await;
        assert_eq!(plan["state"], "pending");
        assert_eq!(plan["lessee"], "lab-a");
        assert_eq!(plan["previous_lessee"], "lab-b");
        assert_eq!(plan["request"]["restore_from"], lease1.as_str());
        assert!(plan["request"].get("image").is_none(), "{plan}");
        assert!(plan["request"].get("checksum").is_none(), "{plan}");
        let shown = api
            .ok("GET", &format!("/v1/nodes/{NODE}/plan"), &owner, None)
            .await;
        assert_eq!(shown, plan);

        // The session plan names the backup as the server recorded it:
        // export and manifest of the snapshot, CA of the plan that took it.
        open_session(&mut db, "boot-2");
        let session = api.ok("GET", "/v1/session/plan", "boot-2", None).await;
        assert_eq!(session["lease_id"], plan["lease_id"]);
        assert_eq!(session["plan"]["restore_from"], lease1.as_str());
        assert_eq!(
            session["restore"],
            json!({"uri": EXPORT, "manifest_sha256": "cd".repeat(32), "ca_pem": ca}),
            "{session}"
        );

        // The final attestation must show a restore of that manifest.
        let expect = warden_attest_server::turnover::expectation(&state, &handoff_request())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(expect.restore_manifest(), Some("cd".repeat(32).as_str()));
        assert!(expect.image && !expect.snapshot);
        assert_eq!(expect.min_wipes, 1);
    });
}

#[test]
fn a_snapshot_of_no_recorded_lessee_is_an_admins_to_restore() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("warden.db");
        let state = AppState::new(Db::open(&db_path).unwrap(), ADMIN.into());
        let addr = common::serve_in_process(state).await;
        let api = Api::new(addr, ADMIN);
        let mut db = Db::open(&db_path).unwrap();
        api.ok(
            "PUT",
            &format!("/v1/nodes/{NODE}/owner"),
            ADMIN,
            Some(json!({"owner": "uni-a"})),
        )
        .await;
        let owner = api.token("owner", "uni-a").await;
        // The node had no lessee when its disk was backed up.
        let path = format!("/v1/nodes/{NODE}/turnover");
        let first = api
            .ok(
                "POST",
                &path,
                &owner,
                Some(json!({
                    "image": "http://10.0.2.2:8080/tenant.qcow2",
                    "checksum": "ab".repeat(32),
                    "snapshot_to": "nbd://10.0.2.2:10809/",
                    "lessee": "lab-a",
                })),
            )
            .await;
        assert_eq!(first["previous_lessee"], Value::Null);
        let lease1 = first["lease_id"].as_str().unwrap().to_owned();
        open_session(&mut db, "boot-1");
        let mut record = snapshot_record();
        record["uri"] = json!("nbd://10.0.2.2:10809/");
        record.as_object_mut().unwrap().remove("ca_sha256");
        api.ok(
            "POST",
            "/v1/session/steps",
            "boot-1",
            Some(json!({
                "step": "snapshot", "ok": true, "error": null,
                "started_at": "2026-11-21T10:00:00Z", "finished_at": "2026-11-21T10:00:01Z",
                "duration_ms": 1000, "bytes": 1, "records": [serde_json::to_string(&record).unwrap()],
            })),
        )
        .await;
        let plan1 = db.latest_plan(NODE).unwrap().unwrap().id;
        db.finish_plan(plan1, None, Some(2), "2026-11-21T10:05:00Z")
            .unwrap();
        let restore = json!({"restore_from": lease1, "lessee": "lab-a"});
        let e = api.refused(&owner, restore.clone(), StatusCode::FORBIDDEN).await;
        assert!(
            e["message"].as_str().unwrap().contains("only an admin"),
            "{e}"
        );
        api.ok("POST", &path, ADMIN, Some(restore)).await;
        open_session(&mut db, "boot-2");
        let session = api.ok("GET", "/v1/session/plan", "boot-2", None).await;
        // Plain nbd://: no CA.
        assert_eq!(
            session["restore"],
            json!({"uri": "nbd://10.0.2.2:10809/", "manifest_sha256": "cd".repeat(32)})
        );
    });
}
