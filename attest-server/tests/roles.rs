//! The role rules of issue #8 against the real `warden-attest-server`:
//! admin, owner and lessee tokens (made with `POST /v1/tokens`) on every
//! operator endpoint, over HTTPS with the server's own CA.
//!
//! What a request needs that the API cannot make by itself — a stored
//! report, a snapshot, console lines, a plan that is running — is written
//! straight into the server's SQLite file with the crate's own [`Db`]
//! while the server runs (WAL mode: both may open it). Every refusal is
//! checked for its status and for a body that names what is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rcgen::PublicKeyData;
use serde_json::{json, Value};
use warden_attest_server::db::{self, Db};
use warden_protocol::attest::{AttestRequest, Phase, PolicyList, PolicyRef, Verdict};
use warden_protocol::hello::PcrBank;
use warden_protocol::nodes::NodeList;
use warden_protocol::snapshot::SnapshotRecord;
use warden_protocol::turnover::{
    ConsoleLog, Plan, PlanState, ProgressView, SnapshotEntry, SnapshotList, TokenCreated,
};

mod common;

use common::{Reply, Server};

/// What only these tests ask of the shared [`Server`].
impl Server {
    /// A new token of `role` for `project`, made by the admin.
    async fn token(&self, role: &str, project: Option<&str>) -> String {
        let reply = self
            .call(
                "POST",
                "/v1/tokens",
                Some(&self.admin),
                Some(&json!({ "role": role, "project": project, "note": "roles test" })),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let created: TokenCreated = reply.json();
        assert_eq!(created.project.as_deref(), project);
        assert_eq!(created.token.len(), 64);
        created.token
    }

    async fn set_owner(&self, node: &str, owner: &str) {
        let reply = self
            .call(
                "PUT",
                &format!("/v1/nodes/{node}/owner"),
                Some(&self.admin),
                Some(&json!({ "owner": owner })),
            )
            .await;
        assert_eq!(reply.status, 204, "{}", reply.text());
    }

    async fn post_plan(&self, token: &str, node: &str, plan: &Value) -> Reply {
        self.call(
            "POST",
            &format!("/v1/nodes/{node}/turnover"),
            Some(token),
            Some(plan),
        )
        .await
    }

    /// A plan the caller is allowed to make: 200 and the stored plan.
    async fn plan_ok(&self, token: &str, node: &str, plan: &Value) -> Plan {
        let reply = self.post_plan(token, node, plan).await;
        assert_eq!(reply.status, 200, "{}\n{}", reply.text(), self.log());
        reply.json()
    }

    /// Stores an attestation of `node` (failed: it never enrolled), so the
    /// node has a verdict to read.
    async fn attestation(&self, node: &str) -> Verdict {
        let request = AttestRequest {
            protocol: warden_protocol::PROTOCOL_VERSION,
            node_id: node.to_owned(),
            ak_name: format!("000b{}", "cd".repeat(32)),
            nonce: vec![7; 32],
            quote: vec![1; 64],
            signature: vec![2; 64],
            pcrs: pcr_bank(),
            event_log: None,
            phase: Phase::Boot,
            agent_log: Vec::new(),
        };
        let reply = self.post_json("/v1/attest", &request).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }
}

/// A node id: 64 lowercase hex digits (no node need exist for the roles).
fn node(n: u8) -> String {
    warden_protocol::sha256_hex(&[n])
}

fn pcr_bank() -> PcrBank {
    PcrBank {
        algorithm: "sha256".into(),
        values: (0..24u32)
            .map(|i| (i, warden_protocol::sha256_hex(&i.to_le_bytes())))
            .collect(),
    }
}

/// A valid plan body handing the node to `lessee`.
fn plan_body(lessee: Option<&str>) -> Value {
    json!({
        "image": "http://127.0.0.1:8080/tenant.qcow2",
        "checksum": format!("sha256:{}", "ab".repeat(32)),
        "snapshot_to": "nbd://127.0.0.1:10809/old",
        "wipe": "auto",
        "handoff": "kexec",
        "lessee": lessee,
    })
}

fn policy_body(name: &str, digest_seed: u8) -> Value {
    json!({
        "name": name,
        "description": "roles test",
        "pcrs": { "0": { "values": [warden_protocol::sha256_hex(&[digest_seed])] } },
    })
}

fn snapshot_entry(plan: &Plan) -> SnapshotEntry {
    let manifest = warden_protocol::sha256_hex(plan.lease_id.as_bytes());
    SnapshotEntry {
        lease_id: plan.lease_id.clone(),
        node_id: plan.node_id.clone(),
        lessee: plan.previous_lessee.clone(),
        uri: format!("nbd://127.0.0.1:10809/{}", plan.lease_id),
        manifest_sha256: manifest.clone(),
        created_at: db::now_rfc3339(),
        record: SnapshotRecord {
            uri: format!("nbd://127.0.0.1:10809/{}", plan.lease_id),
            source: "/dev/vda".into(),
            source_identity: "virtio vda".into(),
            disk_bytes: 1 << 20,
            chunk_size: 1 << 16,
            chunks: 16,
            zero_chunks: 15,
            changed_chunks: 16,
            bytes_sent: 1 << 16,
            bytes_zeroed: 15 << 16,
            zero_bytes_skipped: 0,
            manifest_sha256: manifest,
            manifest_bytes: 600,
            previous_manifest_sha256: None,
            incremental: false,
            verified: true,
            reconnects: 0,
            retries: 0,
            connections: 1,
            direct_io: false,
            verify_ms: 1,
            elapsed_ms: 2,
            ca_sha256: Vec::new(),
        },
    }
}

/// Finishes a plan in the database and stores a report body for it, as
/// the server does after a final verdict.
fn finish_with_report(db: &mut Db, plan: &Plan) -> Vec<u8> {
    let row = db.latest_plan(&plan.node_id).unwrap().unwrap();
    assert_eq!(row.plan.lease_id, plan.lease_id);
    let now = db::now_rfc3339();
    db.start_plan(row.id, 1, &now).unwrap();
    assert!(db.finish_plan(row.id, None, Some(2), &now).unwrap());
    let body = serde_json::to_vec(&json!({
        "node_id": plan.node_id,
        "lease_id": plan.lease_id,
        "lessee": plan.lessee,
        "outcome": "ok",
    }))
    .unwrap();
    db.put_report(row.id, &plan.node_id, &plan.lease_id, &body, &now)
        .unwrap();
    body
}

/// `GET path` refused as 401 with no token and with a token the server
/// never issued; both bodies say what to send.
async fn assert_needs_a_token(server: &Server, method: &str, path: &str, body: Option<&Value>) {
    let reply = server.call(method, path, None, body).await;
    assert_eq!(
        reply.status,
        401,
        "{method} {path} without a token: {}",
        reply.text()
    );
    let err = reply.error();
    assert_eq!(err.error, "unauthorized", "{method} {path}");
    assert!(
        err.message.contains("Authorization: Bearer"),
        "{method} {path}: {}",
        err.message
    );
    let reply = server
        .call(method, path, Some(&"0f".repeat(32)), body)
        .await;
    assert_eq!(
        reply.status,
        401,
        "{method} {path} with an unknown token: {}",
        reply.text()
    );
    assert!(
        reply.error().message.contains("not known to this server"),
        "{method} {path}: {}",
        reply.text()
    );
}

/// A 403 whose message carries every one of `needles`.
fn assert_forbidden(reply: &Reply, what: &str, needles: &[&str]) {
    assert_eq!(reply.status, 403, "{what}: {}", reply.text());
    let err = reply.error();
    assert_eq!(err.error, "forbidden", "{what}");
    for needle in needles {
        assert!(
            err.message.contains(needle),
            "{what}: {:?} does not name {needle:?}",
            err.message
        );
    }
}

/// A 400 blaming `field`, its message naming it too.
fn assert_bad_field(reply: &Reply, field: &str) {
    assert_eq!(reply.status, 400, "{field}: {}", reply.text());
    let err = reply.error();
    assert_eq!(err.field.as_deref(), Some(field), "{}", reply.text());
    assert!(err.message.contains(field), "{}", err.message);
}

/// Every operator endpoint, as (method, path, body).
fn operator_endpoints(node: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/v1/nodes".into(), None),
        ("GET", format!("/v1/nodes/{node}/verdict"), None),
        ("GET", format!("/v1/nodes/{node}/ak"), None),
        ("GET", format!("/v1/nodes/{node}/plan"), None),
        ("GET", format!("/v1/nodes/{node}/progress"), None),
        ("GET", format!("/v1/nodes/{node}/console"), None),
        ("GET", format!("/v1/nodes/{node}/report"), None),
        ("GET", format!("/v1/nodes/{node}/policy/learn?name=x"), None),
        (
            "PUT",
            format!("/v1/nodes/{node}/policy"),
            Some(json!({ "policy": "p" })),
        ),
        (
            "PUT",
            "/v1/groups/rack1/policy".into(),
            Some(json!({ "policy": "p" })),
        ),
        (
            "PUT",
            format!("/v1/nodes/{node}/owner"),
            Some(json!({ "owner": "uni-a" })),
        ),
        (
            "POST",
            format!("/v1/nodes/{node}/turnover"),
            Some(plan_body(None)),
        ),
        (
            "POST",
            "/v1/tokens".into(),
            Some(json!({ "role": "admin" })),
        ),
        ("GET", "/v1/attestations".into(), None),
        ("GET", format!("/v1/attestations?node={node}"), None),
        (
            "POST",
            "/v1/ek-allowlist".into(),
            Some(json!({ "ek_sha256": node })),
        ),
        ("GET", "/v1/policies".into(), None),
        ("GET", "/v1/policies/p".into(), None),
        ("PUT", "/v1/policies/p".into(), Some(policy_body("p", 1))),
        ("GET", "/v1/snapshots".into(), None),
        ("GET", "/v1/snapshots/lease-0011223344556677".into(), None),
    ]
}

#[tokio::test]
async fn no_token_or_an_unknown_one_is_401_and_operators_are_not_agents() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let n = node(1);
    for (method, path, body) in operator_endpoints(&n) {
        assert_needs_a_token(&server, method, &path, body.as_ref()).await;
    }
    // Nothing was stored by any of them.
    assert_eq!(
        server.db().node_roles(&n).unwrap(),
        db::NodeRoles::default()
    );

    // Agent session endpoints take only a session token from a good
    // verdict: no operator token is one, whatever its role.
    let owner = server.token("owner", Some("uni-a")).await;
    let lessee = server.token("lessee", Some("lab-b")).await;
    let admin2 = server.token("admin", None).await;
    let step = json!({
        "step": "wipe", "ok": true, "started_at": "t", "finished_at": "t",
        "duration_ms": 1, "bytes": 1
    });
    let sessions = [
        ("GET", "/v1/session/plan", None),
        (
            "POST",
            "/v1/session/progress",
            Some(json!({ "step": "wipe", "done": 1 })),
        ),
        (
            "POST",
            "/v1/session/console",
            Some(json!({ "lines": ["x"] })),
        ),
        ("POST", "/v1/session/steps", Some(step)),
    ];
    for (method, path, body) in &sessions {
        let reply = server.call(method, path, None, body.as_ref()).await;
        assert_eq!(reply.status, 401, "{method} {path}: {}", reply.text());
        assert!(reply.error().message.contains("Authorization: Bearer"));
        for token in [server.admin.as_str(), &admin2, &owner, &lessee] {
            let reply = server.call(method, path, Some(token), body.as_ref()).await;
            assert_eq!(reply.status, 401, "{method} {path}: {}", reply.text());
            assert!(
                reply.error().message.contains("no such agent session"),
                "{method} {path}: {}",
                reply.text()
            );
        }
    }
    assert!(server.db().console_lines(&n, 0, 10).unwrap().is_empty());

    // A token created with role admin is an admin.
    let reply = server.get("/v1/attestations", &admin2).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Tokens for owners and lessees need a well-formed project.
    for (body, field) in [
        (json!({ "role": "owner" }), "project"),
        (json!({ "role": "lessee", "project": "a b" }), "project"),
        (json!({ "role": "lessee", "project": "" }), "project"),
        (json!({ "role": "root", "project": "x" }), "role"),
    ] {
        let reply = server
            .call("POST", "/v1/tokens", Some(&server.admin), Some(&body))
            .await;
        assert_bad_field(&reply, field);
    }
}

#[tokio::test]
async fn a_lessee_reads_its_own_node_and_nothing_of_anothers() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let owner = server.token("owner", Some("uni-a")).await;
    let lab_b = server.token("lessee", Some("lab-b")).await;
    let lab_c = server.token("lessee", Some("lab-c")).await;
    let (nb, nc) = (node(0xb), node(0xc));
    server.set_owner(&nb, "uni-a").await;
    server.set_owner(&nc, "uni-a").await;
    let plan_b = server.plan_ok(&owner, &nb, &plan_body(Some("lab-b"))).await;
    let plan_c = server.plan_ok(&owner, &nc, &plan_body(Some("lab-c"))).await;
    assert_eq!(plan_b.lessee.as_deref(), Some("lab-b"));
    assert_eq!(plan_b.previous_lessee, None);
    assert_eq!(plan_b.state, PlanState::Pending);
    let roles = server.db().node_roles(&nb).unwrap();
    assert_eq!(
        (roles.owner.as_deref(), roles.lessee.as_deref()),
        (Some("uni-a"), Some("lab-b"))
    );

    // Each node has a verdict, console lines and a report.
    let verdict_b = server.attestation(&nb).await;
    server.attestation(&nc).await;
    let mut db = server.db();
    let now = db::now_rfc3339();
    db.add_console_lines(&nb, &["warden: b booted".to_owned()], &now)
        .unwrap();
    db.add_console_lines(&nc, &["warden: c booted".to_owned()], &now)
        .unwrap();
    let report_b = finish_with_report(&mut db, &plan_b);
    finish_with_report(&mut db, &plan_c);

    // lab-b reads its own node.
    let reply = server.get(&format!("/v1/nodes/{nb}/verdict"), &lab_b).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json::<Verdict>().attestation_id,
        verdict_b.attestation_id
    );
    let reply = server.get(&format!("/v1/nodes/{nb}/plan"), &lab_b).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let plan: Plan = reply.json();
    assert_eq!(
        (plan.lease_id.as_str(), plan.state),
        (plan_b.lease_id.as_str(), PlanState::Done)
    );
    let reply = server
        .get(&format!("/v1/nodes/{nb}/progress"), &lab_b)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let progress: ProgressView = reply.json();
    assert_eq!(progress.lease_id.as_deref(), Some(plan_b.lease_id.as_str()));
    let reply = server.get(&format!("/v1/nodes/{nb}/console"), &lab_b).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let console: ConsoleLog = reply.json();
    let lines: Vec<&str> = console.lines.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(lines, ["warden: b booted"]);
    let reply = server.get(&format!("/v1/nodes/{nb}/report"), &lab_b).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body, report_b, "the report's exact bytes");
    let reply = server
        .get(&format!("/v1/attestations?node={nb}"), &lab_b)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // ... and nothing of lab-c's, and the refusal names node and caller.
    for what in ["verdict", "plan", "progress", "console", "report"] {
        let reply = server.get(&format!("/v1/nodes/{nc}/{what}"), &lab_b).await;
        assert_forbidden(
            &reply,
            what,
            &[&nc, "lessee lab-b", "neither owned by nor leased to"],
        );
        assert!(!reply.text().contains("lab-c"), "{what}: {}", reply.text());
    }
    let reply = server
        .get(&format!("/v1/attestations?node={nc}"), &lab_b)
        .await;
    assert_forbidden(&reply, "attestations of another node", &[&nc, "lab-b"]);
    // A node that does not exist gets the same answer: no probing.
    let ghost = node(0xee);
    for what in ["verdict", "plan", "progress", "console", "report"] {
        let reply = server
            .get(&format!("/v1/nodes/{ghost}/{what}"), &lab_b)
            .await;
        assert_forbidden(&reply, what, &[&ghost, "lessee lab-b"]);
    }
    // The whole audit log is the admins'.
    let reply = server.get("/v1/attestations", &lab_b).await;
    assert_forbidden(
        &reply,
        "all attestations",
        &["admin token", "lessee of lab-b"],
    );

    // The owner sees both nodes; the admin too.
    for token in [owner.as_str(), server.admin.as_str()] {
        for n in [&nb, &nc] {
            for what in ["verdict", "plan", "progress", "console", "report"] {
                let reply = server.get(&format!("/v1/nodes/{n}/{what}"), token).await;
                assert_eq!(reply.status, 200, "{what}: {}", reply.text());
            }
        }
    }

    // Listing: nodes that said hello (a software P-256 key stands in for
    // the EK) are listed per role.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let spki = rcgen::KeyPair::generate()
            .unwrap()
            .subject_public_key_info();
        ids.push(server.hello(&spki, pcr_bank(), None).await);
    }
    // ids[0]: uni-a's, leased to lab-b; ids[1]: uni-x's, leased to lab-c;
    // ids[2]: nobody's.
    let owner_x = server.token("owner", Some("uni-x")).await;
    server.set_owner(&ids[0], "uni-a").await;
    server.set_owner(&ids[1], "uni-x").await;
    server
        .plan_ok(&owner, &ids[0], &plan_body(Some("lab-b")))
        .await;
    server
        .plan_ok(&owner_x, &ids[1], &plan_body(Some("lab-c")))
        .await;
    let listed = |token: String| {
        let server = &server;
        async move {
            let reply = server.get("/v1/nodes", &token).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            let mut ids: Vec<String> = reply
                .json::<NodeList>()
                .nodes
                .into_iter()
                .map(|n| n.node_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(listed(lab_b.clone()).await, [ids[0].clone()]);
    assert_eq!(listed(lab_c.clone()).await, [ids[1].clone()]);
    assert_eq!(listed(owner.clone()).await, [ids[0].clone()]);
    assert_eq!(listed(owner_x.clone()).await, [ids[1].clone()]);
    assert_eq!(listed(server.admin.clone()).await, sorted(ids.clone()));
    // The listing carries the roles.
    let reply = server.get("/v1/nodes", &lab_b).await;
    let summary = &reply.json::<NodeList>().nodes[0];
    assert_eq!(
        (summary.owner.as_deref(), summary.lessee.as_deref()),
        (Some("uni-a"), Some("lab-b"))
    );
}

#[tokio::test]
async fn a_lessee_cannot_manage_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let owner = server.token("owner", Some("uni-a")).await;
    let lab_b = server.token("lessee", Some("lab-b")).await;
    let n = node(2);
    server.set_owner(&n, "uni-a").await;
    let before = server.plan_ok(&owner, &n, &plan_body(Some("lab-b"))).await;
    let reply = server
        .call(
            "PUT",
            "/v1/policies/base",
            Some(&server.admin),
            Some(&policy_body("base", 1)),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // Not even on the node leased to it.
    let reply = server
        .post_plan(&lab_b, &n, &plan_body(Some("lab-b")))
        .await;
    assert_forbidden(&reply, "plan", &[&n, "not owned by lessee lab-b"]);
    let reply = server
        .call(
            "POST",
            "/v1/tokens",
            Some(&lab_b),
            Some(&json!({ "role": "admin" })),
        )
        .await;
    assert_forbidden(
        &reply,
        "token",
        &["needs an admin token", "lessee of lab-b"],
    );
    let reply = server
        .call(
            "POST",
            "/v1/tokens",
            Some(&lab_b),
            Some(&json!({ "role": "lessee", "project": "lab-b" })),
        )
        .await;
    assert_forbidden(&reply, "own-project token", &["needs an admin token"]);
    let reply = server
        .call(
            "PUT",
            &format!("/v1/nodes/{n}/owner"),
            Some(&lab_b),
            Some(&json!({ "owner": "lab-b" })),
        )
        .await;
    assert_forbidden(&reply, "owner", &["needs an admin token", "lab-b"]);
    let reply = server
        .call(
            "POST",
            "/v1/ek-allowlist",
            Some(&lab_b),
            Some(&json!({ "ek_sha256": node(3) })),
        )
        .await;
    assert_forbidden(&reply, "ek", &["lessee tokens cannot register nodes"]);
    for (method, path, body) in [
        ("GET", "/v1/policies", None),
        ("GET", "/v1/policies/base", None),
        ("PUT", "/v1/policies/base", Some(policy_body("base", 2))),
        ("PUT", "/v1/policies/mine", Some(policy_body("mine", 2))),
    ] {
        let reply = server.call(method, path, Some(&lab_b), body.as_ref()).await;
        assert_forbidden(
            &reply,
            path,
            &["policies are for owners and admins", "lessee"],
        );
    }
    let reply = server
        .call(
            "PUT",
            &format!("/v1/nodes/{n}/policy"),
            Some(&lab_b),
            Some(&json!({ "policy": "base" })),
        )
        .await;
    assert_forbidden(&reply, "node policy", &[&n, "not owned by lessee lab-b"]);
    let reply = server
        .call(
            "PUT",
            "/v1/groups/rack1/policy",
            Some(&lab_b),
            Some(&json!({ "policy": "base" })),
        )
        .await;
    assert_forbidden(&reply, "group policy", &["needs an admin token"]);
    for path in [
        format!("/v1/nodes/{n}/ak"),
        format!("/v1/nodes/{n}/policy/learn?name=x"),
    ] {
        let reply = server.get(&path, &lab_b).await;
        assert_forbidden(&reply, &path, &[&n, "not owned by lessee lab-b"]);
    }

    // Nothing moved.
    let db = server.db();
    let roles = db.node_roles(&n).unwrap();
    assert_eq!(
        (roles.owner.as_deref(), roles.lessee.as_deref()),
        (Some("uni-a"), Some("lab-b"))
    );
    assert_eq!(db.latest_plan(&n).unwrap().unwrap().plan, before);
    assert_eq!(db.node_roles(&node(3)).unwrap(), db::NodeRoles::default());
    assert!(db.ek_registration(&node(3)).unwrap().is_none());
    assert_eq!(db.policy("base", None).unwrap().unwrap().version, 1);
    assert!(db.policy("mine", None).unwrap().is_none());
    assert!(db.node_policy(&n).unwrap().is_none());
    // The admin can do what the lessee could not (the refusals were roles,
    // not broken requests).
    let reply = server
        .call(
            "PUT",
            &format!("/v1/nodes/{n}/policy"),
            Some(&server.admin),
            Some(&json!({ "policy": "base" })),
        )
        .await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert!(db.node_policy(&n).unwrap().is_some());
}

#[tokio::test]
async fn an_owner_manages_its_nodes_only_and_is_no_lessee() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let uni_a = server.token("owner", Some("uni-a")).await;
    let uni_x = server.token("owner", Some("uni-x")).await;
    // An owner token whose project is the name of a lessee.
    let owner_lab_b = server.token("owner", Some("lab-b")).await;
    let lab_b = server.token("lessee", Some("lab-b")).await;
    let (na, nx, unowned) = (node(0xa), node(0x1a), node(0x2a));
    server.set_owner(&na, "uni-a").await;
    server.set_owner(&nx, "uni-x").await;

    // Its own node: yes; another owner's or nobody's: no.
    let plan = server.plan_ok(&uni_a, &na, &plan_body(Some("lab-b"))).await;
    assert_eq!(plan.lessee.as_deref(), Some("lab-b"));
    let reply = server
        .post_plan(&uni_a, &nx, &plan_body(Some("lab-b")))
        .await;
    assert_forbidden(
        &reply,
        "another owner's node",
        &[&nx, "not owned by owner uni-a"],
    );
    let reply = server
        .post_plan(&uni_a, &unowned, &plan_body(Some("lab-b")))
        .await;
    assert_forbidden(
        &reply,
        "nobody's node",
        &[&unowned, "not owned by owner uni-a"],
    );
    assert!(server.db().latest_plan(&nx).unwrap().is_none());
    assert!(server.db().latest_plan(&unowned).unwrap().is_none());
    let reply = server.get(&format!("/v1/nodes/{nx}/plan"), &uni_a).await;
    assert_forbidden(&reply, "another owner's plan", &[&nx, "owner uni-a"]);
    let reply = server.get(&format!("/v1/nodes/{na}/plan"), &uni_a).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json::<Plan>().lease_id, plan.lease_id);
    let reply = server.get(&format!("/v1/nodes/{na}/ak"), &uni_a).await;
    assert_eq!(reply.status, 404, "allowed, and no AK: {}", reply.text());
    let reply = server.get(&format!("/v1/nodes/{nx}/ak"), &uni_a).await;
    assert_forbidden(&reply, "another owner's AK", &[&nx, "owner uni-a"]);

    // Owner "lab-b" is not lessee "lab-b": the node is leased to lab-b,
    // but an owner token sees only nodes its project owns.
    for what in ["verdict", "plan", "progress", "console", "report"] {
        let reply = server
            .get(&format!("/v1/nodes/{na}/{what}"), &owner_lab_b)
            .await;
        assert_forbidden(&reply, what, &[&na, "owner lab-b"]);
    }
    let reply = server.post_plan(&owner_lab_b, &na, &plan_body(None)).await;
    assert_forbidden(
        &reply,
        "owner lab-b plans",
        &[&na, "not owned by owner lab-b"],
    );
    let reply = server.get("/v1/nodes", &owner_lab_b).await;
    assert_eq!(reply.status, 200);
    assert!(reply.json::<NodeList>().nodes.is_empty());
    // The lessee lab-b does see it.
    let reply = server.get(&format!("/v1/nodes/{na}/plan"), &lab_b).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // Owners make no tokens and set no owners.
    let reply = server
        .call(
            "POST",
            "/v1/tokens",
            Some(&uni_a),
            Some(&json!({ "role": "lessee", "project": "lab-z" })),
        )
        .await;
    assert_forbidden(
        &reply,
        "owner token",
        &["needs an admin token", "owner of uni-a"],
    );
    let reply = server
        .call(
            "PUT",
            &format!("/v1/nodes/{nx}/owner"),
            Some(&uni_a),
            Some(&json!({ "owner": "uni-a" })),
        )
        .await;
    assert_forbidden(&reply, "set owner", &["needs an admin token"]);
    assert_eq!(
        server.db().node_roles(&nx).unwrap().owner.as_deref(),
        Some("uni-x")
    );

    // EK registration: an owner claims an unowned node, never another's.
    let fresh = node(0x3a);
    let reply = server
        .call(
            "POST",
            "/v1/ek-allowlist",
            Some(&uni_a),
            Some(&json!({ "ek_sha256": fresh, "note": "rack 4" })),
        )
        .await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert_eq!(
        server.db().node_roles(&fresh).unwrap().owner.as_deref(),
        Some("uni-a")
    );
    server
        .plan_ok(&uni_a, &fresh, &plan_body(Some("lab-b")))
        .await;
    let reply = server
        .call(
            "POST",
            "/v1/ek-allowlist",
            Some(&uni_x),
            Some(&json!({ "ek_sha256": fresh })),
        )
        .await;
    assert_forbidden(
        &reply,
        "another owner's EK",
        &[&fresh, "owned by another project"],
    );
    assert_eq!(
        server.db().node_roles(&fresh).unwrap().owner.as_deref(),
        Some("uni-a")
    );
}

#[tokio::test]
async fn snapshots_are_their_lessees_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let owner = server.token("owner", Some("uni-a")).await;
    let lab_a = server.token("lessee", Some("lab-a")).await;
    let lab_b = server.token("lessee", Some("lab-b")).await;
    let lab_c = server.token("lessee", Some("lab-c")).await;
    // Owner tokens named like the lessees, to be sure roles, not names, decide.
    let owner_lab_a = server.token("owner", Some("lab-a")).await;
    let (n1, n2) = (node(0x51), node(0x52));
    server.set_owner(&n1, "uni-a").await;
    server.set_owner(&n2, "uni-a").await;

    // n1: lab-a → lab-b (the snapshot holds lab-a's disk);
    // n2: lab-c → lab-a (the snapshot holds lab-c's disk).
    server.plan_ok(&owner, &n1, &plan_body(Some("lab-a"))).await;
    server.plan_ok(&owner, &n2, &plan_body(Some("lab-c"))).await;
    let p1 = server.plan_ok(&owner, &n1, &plan_body(Some("lab-b"))).await;
    let p2 = server.plan_ok(&owner, &n2, &plan_body(Some("lab-a"))).await;
    assert_eq!(p1.previous_lessee.as_deref(), Some("lab-a"));
    assert_eq!(p2.previous_lessee.as_deref(), Some("lab-c"));
    let (s1, s2) = (snapshot_entry(&p1), snapshot_entry(&p2));
    let mut db = server.db();
    db.put_snapshot(&s1).unwrap();
    db.put_snapshot(&s2).unwrap();

    let list = |token: String| {
        let server = &server;
        async move {
            let reply = server.get("/v1/snapshots", &token).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            let mut leases: Vec<String> = reply
                .json::<SnapshotList>()
                .snapshots
                .into_iter()
                .map(|s| s.lease_id)
                .collect();
            leases.sort();
            leases
        }
    };
    assert_eq!(list(lab_a.clone()).await, vec![s1.lease_id.clone()]);
    assert_eq!(list(lab_c.clone()).await, vec![s2.lease_id.clone()]);
    // lab-b leases n1 now, but the snapshot on it is lab-a's data.
    assert!(list(lab_b.clone()).await.is_empty());
    assert!(list(owner.clone()).await.is_empty());
    assert!(list(owner_lab_a.clone()).await.is_empty());
    let mut all = vec![s1.lease_id.clone(), s2.lease_id.clone()];
    all.sort();
    assert_eq!(list(server.admin.clone()).await, all);

    // One snapshot: its lessee and the admin read it, with its manifest.
    let path1 = format!("/v1/snapshots/{}", s1.lease_id);
    for token in [&lab_a, &server.admin] {
        let reply = server.get(&path1, token).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json::<SnapshotEntry>(), s1);
    }
    // Another lessee (even the node's current one) may not.
    for (token, who) in [(&lab_b, "lessee lab-b"), (&lab_c, "lessee lab-c")] {
        let reply = server.get(&path1, token).await;
        assert_forbidden(&reply, who, &[&s1.lease_id, "belongs to its lessee", who]);
        assert!(!reply.text().contains(&s1.manifest_sha256));
    }
    // The node's owner may not: the data is the lessee's (issue #8: "an
    // owner cannot read a lessee's snapshot manifest without being that
    // lessee"), nor may an owner token whose project is that lessee's name.
    for (token, who) in [(&owner, "owner uni-a"), (&owner_lab_a, "owner lab-a")] {
        let reply = server.get(&path1, token).await;
        assert_forbidden(&reply, who, &[&s1.lease_id, "belongs to its lessee", who]);
        assert!(!reply.text().contains(&s1.manifest_sha256));
    }
    let path2 = format!("/v1/snapshots/{}", s2.lease_id);
    let reply = server.get(&path2, &lab_c).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = server.get(&path2, &lab_a).await;
    assert_forbidden(&reply, "lab-a on lab-c's", &[&s2.lease_id, "lessee lab-a"]);

    // A lease with no snapshot: 404 for the admin, and for everyone else
    // the same 403 as an existing one (no probing for lease ids).
    let missing = "/v1/snapshots/lease-00000000deadbeef";
    let reply = server.get(missing, &server.admin).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(reply.error().message.contains("lease-00000000deadbeef"));
    for token in [&lab_a, &owner] {
        let reply = server.get(missing, token).await;
        assert_forbidden(
            &reply,
            "missing",
            &["lease-00000000deadbeef", "belongs to its lessee"],
        );
    }
}

#[tokio::test]
async fn policies_belong_to_whoever_stored_them() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let uni_a = server.token("owner", Some("uni-a")).await;
    let uni_x = server.token("owner", Some("uni-x")).await;
    let put = |token: String, name: &'static str, seed: u8| {
        let server = &server;
        async move {
            server
                .call(
                    "PUT",
                    &format!("/v1/policies/{name}"),
                    Some(&token),
                    Some(&policy_body(name, seed)),
                )
                .await
        }
    };
    let admin = server.admin.clone();

    // An owner stores a new name, then new versions of it.
    for (seed, version) in [(1, 1), (2, 2), (3, 3)] {
        let reply = put(uni_a.clone(), "uni-a-fw", seed).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.json::<PolicyRef>(),
            PolicyRef {
                name: "uni-a-fw".into(),
                version
            }
        );
    }
    assert_eq!(
        server.db().policy_owner("uni-a-fw").unwrap().as_deref(),
        Some("uni-a")
    );
    // Another owner may read it (reference values, not secrets) but not
    // store a version of it.
    let reply = server.get("/v1/policies/uni-a-fw", &uni_x).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = put(uni_x.clone(), "uni-a-fw", 9).await;
    assert_forbidden(
        &reply,
        "another owner's policy",
        &["uni-a-fw", "belongs to uni-a"],
    );

    // An admin-created policy is nobody's: owners cannot version it.
    let reply = put(admin.clone(), "shared", 1).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    for token in [&uni_a, &uni_x] {
        let reply = put(token.clone(), "shared", 5).await;
        assert_forbidden(&reply, "admin policy", &["shared", "belongs to the admins"]);
    }
    // The admin may version anyone's.
    let reply = put(admin.clone(), "uni-a-fw", 4).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json::<PolicyRef>().version, 4);

    let db = server.db();
    assert_eq!(db.policy("shared", None).unwrap().unwrap().version, 1);
    let latest = db.policy("uni-a-fw", None).unwrap().unwrap();
    assert_eq!(latest.version, 4);
    assert_eq!(
        latest.pcrs[&0].values,
        [warden_protocol::sha256_hex(&[4])],
        "the refused versions were not stored"
    );
    let reply = server.get("/v1/policies", &uni_x).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut names: Vec<String> = reply
        .json::<PolicyList>()
        .policies
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["shared", "uni-a-fw"]);

    // Assignment: an owner to its own node, never to another's; groups
    // span owners, so only admins assign to them.
    let (na, nx) = (node(0x61), node(0x62));
    server.set_owner(&na, "uni-a").await;
    server.set_owner(&nx, "uni-x").await;
    let assign = |token: String, path: String| {
        let server = &server;
        async move {
            server
                .call(
                    "PUT",
                    &path,
                    Some(&token),
                    Some(&json!({ "policy": "uni-a-fw" })),
                )
                .await
        }
    };
    let reply = assign(uni_a.clone(), format!("/v1/nodes/{na}/policy")).await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    let reply = assign(uni_a.clone(), format!("/v1/nodes/{nx}/policy")).await;
    assert_forbidden(&reply, "another's node", &[&nx, "not owned by owner uni-a"]);
    assert!(db.node_policy(&nx).unwrap().is_none());
    for token in [&uni_a, &uni_x] {
        let reply = assign(token.clone(), "/v1/groups/rack1/policy".into()).await;
        assert_forbidden(&reply, "group", &["needs an admin token", "owner of"]);
    }
    let reply = assign(admin.clone(), "/v1/groups/rack1/policy".into()).await;
    assert_eq!(reply.status, 204, "{}", reply.text());
}

#[tokio::test]
async fn plans_conflict_supersede_and_name_bad_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let owner = server.token("owner", Some("uni-a")).await;
    let n = node(0x71);
    server.set_owner(&n, "uni-a").await;

    // lab-a holds the node; a plan hands it to lab-b.
    let first = server.plan_ok(&owner, &n, &plan_body(Some("lab-a"))).await;
    assert_eq!(first.previous_lessee, None);
    let p1 = server.plan_ok(&owner, &n, &plan_body(Some("lab-b"))).await;
    assert_eq!(
        (p1.lessee.as_deref(), p1.previous_lessee.as_deref()),
        (Some("lab-b"), Some("lab-a"))
    );
    // A plan without a lessee keeps the node's current one.
    let p2 = server.plan_ok(&owner, &n, &plan_body(None)).await;
    assert_eq!(
        (p2.lessee.as_deref(), p2.previous_lessee.as_deref()),
        (Some("lab-b"), Some("lab-b"))
    );
    let mut db = server.db();
    let row2 = db.latest_plan(&n).unwrap().unwrap();
    assert_eq!(row2.plan.lease_id, p2.lease_id);
    assert_eq!(row2.created_by, "owner:uni-a");
    // Each new pending plan superseded the one before.
    for earlier in [&first, &p1] {
        let state: Vec<PlanState> = (1..row2.id)
            .filter_map(|id| db.plan(id).unwrap())
            .filter(|r| r.plan.lease_id == earlier.lease_id)
            .map(|r| r.plan.state)
            .collect();
        assert_eq!(state, [PlanState::Superseded], "{}", earlier.lease_id);
    }
    let reply = server.get(&format!("/v1/nodes/{n}/plan"), &owner).await;
    assert_eq!(reply.json::<Plan>().lease_id, p2.lease_id);

    // Once it runs, a new plan is refused with 409 naming the running
    // lease, and nothing changes.
    db.start_plan(row2.id, 1, &db::now_rfc3339()).unwrap();
    for token in [&owner, &server.admin] {
        let reply = server.post_plan(token, &n, &plan_body(Some("lab-c"))).await;
        assert_eq!(reply.status, 409, "{}", reply.text());
        let err = reply.error();
        assert_eq!(err.error, "conflict");
        assert!(err.message.contains(&p2.lease_id), "{}", err.message);
        assert!(err.message.contains(&n), "{}", err.message);
    }
    let now = db.latest_plan(&n).unwrap().unwrap();
    assert_eq!((now.id, now.plan.state), (row2.id, PlanState::Running));
    assert_eq!(
        db.node_roles(&n).unwrap().lessee.as_deref(),
        Some("lab-b"),
        "a refused plan does not change the lessee"
    );
    // When it ends, the next plan can be made.
    assert!(db
        .finish_plan(row2.id, None, Some(2), &db::now_rfc3339())
        .unwrap());
    let p3 = server.plan_ok(&owner, &n, &plan_body(Some("lab-c"))).await;
    assert_eq!(p3.previous_lessee.as_deref(), Some("lab-b"));
    assert_eq!(
        db.plan(row2.id).unwrap().unwrap().plan.state,
        PlanState::Done
    );

    // Bad input: 400 naming the field, for owner and admin alike, and
    // nothing stored.
    let good = plan_body(Some("lab-d"));
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let cases = [
        (with("image", json!("ftp://127.0.0.1/tenant.img")), "image"),
        (with("image", json!("file:///etc/shadow")), "image"),
        (with("checksum", json!("md5:0123")), "checksum"),
        (
            with("checksum", json!(format!("sha256:{}", "ab".repeat(31)))),
            "checksum",
        ),
        (
            with("checksum", json!(format!("sha256:{}", "zz".repeat(32)))),
            "checksum",
        ),
        (
            with("snapshot_to", json!("http://127.0.0.1/old")),
            "snapshot_to",
        ),
        (with("snapshot_to", json!("/dev/sdb")), "snapshot_to"),
        (with("lessee", json!("lab d")), "lessee"),
        (with("lessee", json!("lab/../d")), "lessee"),
        (with("lessee", json!("")), "lessee"),
        (with("target", json!("../sda")), "target"),
        (with("wipe", json!("shred-it")), "wipe"),
        (with("handoff", json!("explode")), "handoff"),
    ];
    for token in [&owner, &server.admin] {
        for (body, field) in &cases {
            let reply = server.post_plan(token, &n, body).await;
            assert_bad_field(&reply, field);
        }
    }
    let reply = server
        .post_plan(
            &owner,
            &n,
            &json!({ "image": "http://x/y", "checksum": "ab".repeat(32), "extra": 1 }),
        )
        .await;
    assert_bad_field(&reply, "extra");
    let reply = server
        .post_plan(&owner, "NOT-A-NODE", &plan_body(None))
        .await;
    assert_bad_field(&reply, "id");
    let latest = db.latest_plan(&n).unwrap().unwrap();
    assert_eq!(latest.plan.lease_id, p3.lease_id);
    assert_eq!(latest.plan.state, PlanState::Pending);
    assert_eq!(db.node_roles(&n).unwrap().lessee.as_deref(), Some("lab-c"));
    // A bare 64-hex-digit checksum means sha256, and sha512 is taken.
    server
        .plan_ok(&owner, &n, &with("checksum", json!("cd".repeat(32))))
        .await;
    server
        .plan_ok(
            &owner,
            &n,
            &with("checksum", json!(format!("sha512:{}", "ef".repeat(64)))),
        )
        .await;
}

/// A report belongs to the lessee of its lease: once the owner plans the
/// next turnover (to lab-c), lab-c must not read lab-b's report (its lease
/// id, lessee name, snapshot details), and lab-b still reads its own.
/// (Found by this test: the server used to serve the node's newest report to
/// whoever leased the node now.)
#[tokio::test]
async fn a_new_lessee_cannot_read_the_previous_lessees_report() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let owner = server.token("owner", Some("uni-a")).await;
    let lab_b = server.token("lessee", Some("lab-b")).await;
    let lab_c = server.token("lessee", Some("lab-c")).await;
    let n = node(0x81);
    server.set_owner(&n, "uni-a").await;
    let plan_b = server.plan_ok(&owner, &n, &plan_body(Some("lab-b"))).await;
    let report_b = finish_with_report(&mut server.db(), &plan_b);
    let reply = server.get(&format!("/v1/nodes/{n}/report"), &lab_b).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body, report_b);

    // The next turnover is planned: lab-c is the node's lessee from now on.
    server.plan_ok(&owner, &n, &plan_body(Some("lab-c"))).await;
    let reply = server.get(&format!("/v1/nodes/{n}/report"), &lab_c).await;
    assert!(
        reply.status == 403 || reply.status == 404,
        "lab-c got lab-b's report of lease {}: {} {}",
        plan_b.lease_id,
        reply.status,
        reply.text()
    );
    assert!(!reply.text().contains(&plan_b.lease_id), "{}", reply.text());
    let reply = server.get(&format!("/v1/nodes/{n}/report"), &lab_b).await;
    assert_eq!(
        reply.status,
        200,
        "lab-b lost its own report: {}",
        reply.text()
    );
    assert_eq!(reply.body, report_b);
}
