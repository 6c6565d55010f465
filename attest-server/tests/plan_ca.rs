//! CA trust in turnover plans over the API, in process (plain HTTP on
//! 127.0.0.1): `image_ca` (pin or PEM) and `snapshot_ca` (PEM) are checked
//! when the plan is made — a 400 names the field — stored, and handed to
//! the node's session with the plan; a plan without them reads as before.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use reqwest::StatusCode;
use serde_json::{json, Value};
use warden_attest_server::api::AppState;
use warden_attest_server::auth::token_digest;
use warden_attest_server::db::{Db, SessionRow};

const ADMIN: &str = "admin-secret";
const NODE: &str = "ab00000000000000000000000000000000000000000000000000000000000002";

async fn call(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A real CA certificate, as an operator's file holds it.
fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[test]
fn plan_cas_are_checked_stored_and_reach_the_session() {
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
        let base = format!("http://{addr}");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let path = format!("/v1/nodes/{NODE}/turnover");
        let post = |body: Value| {
            let (http, base, path) = (http.clone(), base.clone(), path.clone());
            async move { call(&http, &base, reqwest::Method::POST, &path, ADMIN, Some(body)).await }
        };

        let ca = ca_pem();
        let pin = format!("sha256:{}", "ab".repeat(32));
        let plan = |extra: Value| {
            let mut p = json!({
                "image": "https://images.lab/tenant.raw.zst",
                "checksum": format!("sha256:{}", "cd".repeat(32)),
                "snapshot_to": "nbds://10.0.2.2:10809/old",
                "snapshot_ca": ca,
            });
            for (k, v) in extra.as_object().unwrap() {
                p[k] = v.clone();
            }
            p
        };

        // Refusals, each naming its field and saying why.
        for (extra, field, says) in [
            (json!({"image_ca": "sha256:12"}), "image_ca", "not a pin"),
            (json!({"image_ca": "ca.pem"}), "image_ca", "not a pin"),
            (
                json!({"image": "http://images.lab/t.raw", "image_ca": pin}),
                "image_ca",
                "plain http://",
            ),
            (
                json!({"image_ca": "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"}),
                "image_ca",
                "EC PRIVATE KEY",
            ),
            (json!({"snapshot_ca": null}), "snapshot_ca", "needs snapshot_ca"),
            (json!({"snapshot_ca": "hello"}), "snapshot_ca", "is not PEM"),
            (
                json!({"snapshot_ca": ca.replace("MII", "MIA")}),
                "snapshot_ca",
                "not an X.509 certificate",
            ),
            (
                json!({"snapshot_to": "nbd://10.0.2.2:10809/old"}),
                "snapshot_ca",
                "plain nbd://",
            ),
            (json!({"snapshot_to": null}), "snapshot_ca", "no snapshot_to"),
        ] {
            let (status, body) = post(plan(extra.clone())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
            assert_eq!(body["field"], field, "{extra}: {body}");
            let message = body["message"].as_str().unwrap();
            assert!(message.contains(says), "{extra}: {message}");
        }

        // A plan without CAs reads as before: no new keys in its JSON.
        let (status, body) = post(json!({
            "image": "http://images.lab/t.raw",
            "checksum": format!("sha256:{}", "cd".repeat(32)),
            "snapshot_to": "nbd://10.0.2.2:10809/old",
        }))
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let request = body["request"].as_object().unwrap();
        assert!(!request.contains_key("image_ca") && !request.contains_key("snapshot_ca"));

        // Pin and PEM both pass; the newest plan is what the session gets.
        let (status, body) = post(plan(json!({"image_ca": pin}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = post(plan(json!({"image_ca": ca}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["request"]["image_ca"], ca.as_str());
        assert_eq!(body["request"]["snapshot_ca"], ca.as_str());
        let (status, shown) = call(
            &http,
            &base,
            reqwest::Method::GET,
            &format!("/v1/nodes/{NODE}/plan"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown["request"], body["request"]);

        // What a good boot verdict does: start the plan, open a session.
        let mut db = Db::open(&db_path).unwrap();
        let plan_id = db.latest_plan(NODE).unwrap().unwrap().id;
        db.start_plan(plan_id, 1, "2026-11-21T10:00:00Z").unwrap();
        db.create_session(
            &token_digest("boot-1"),
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
        let (status, session) = call(
            &http,
            &base,
            reqwest::Method::GET,
            "/v1/session/plan",
            "boot-1",
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{session}");
        let got: warden_protocol::turnover::SessionPlan = serde_json::from_value(session).unwrap();
        assert_eq!(got.plan.image_ca.as_deref(), Some(ca.as_str()));
        assert_eq!(got.plan.snapshot_ca.as_deref(), Some(ca.as_str()));
    });
}
