//! Quarantine (issue #9's refused node) against the real
//! `warden-attest-server` and `wardenctl`, over HTTPS with the server's CA.
//!
//! The node is a software one: its EK is a fresh P-256 key (said hello
//! with), its AK a software P-256 key bound straight into the server's
//! SQLite file (as `tests/roles.rs` writes what the API cannot make; the
//! TPM side of enrollment is covered by the swtpm and QEMU tiers). Every
//! attestation is real from there on: a nonce from `POST /v1/attest/nonce`,
//! a TPMS_ATTEST quote of the captured OVMF + swtpm event log's PCRs signed
//! by the AK, `POST /v1/attest`, and the server's own verify → record →
//! turnover path. "Firmware changed" is that log with its SecureBoot
//! variable flipped from 0 to 1 and the PCRs replayed from it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::{Command, Output};

use p256::ecdsa::signature::Signer;
use rcgen::PublicKeyData;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use warden_attest_server::db;
use warden_protocol::attest::{
    codes, AkPublic, AttestRequest, NonceResponse, Phase, Policy, Status, Verdict, AK_ECC,
};
use warden_protocol::eventlog::{self, HashAlg};
use warden_protocol::hello::{ApiError, PcrBank};
use warden_protocol::nodes::{NodeList, QuarantineRelease};
use warden_protocol::tpm::{alg, curve, parse_tpmt_public};
use warden_protocol::turnover::{Plan, PlanState};

mod common;

use common::Server;

const WARDENCTL: &str = env!("CARGO_BIN_EXE_wardenctl");
const EVENT_LOG: &[u8] = include_bytes!("../../protocol/tests/data/ovmf-swtpm-6.1.eventlog");

/// What only these tests ask of the shared [`Server`].
impl Server {
    async fn token(&self, role: &str, project: &str) -> String {
        let body = json!({ "role": role, "project": project });
        let reply = self
            .ok("POST", "/v1/tokens", &self.admin, Some(&body))
            .await;
        reply.json::<Value>()["token"].as_str().unwrap().to_owned()
    }

    async fn node_listing(&self, token: &str) -> NodeList {
        self.ok("GET", "/v1/nodes", token, None).await.json()
    }

    /// `wardenctl ARGS` against this server with `token`.
    fn wardenctl(&self, token: &str, args: &[&str]) -> Output {
        let out = Command::new(WARDENCTL)
            .args(["--server", &self.url, "--ca"])
            .arg(self.ca())
            .args(args)
            .env("WARDEN_TOKEN", token)
            .env_remove("WARDEN_SERVER")
            .env_remove("WARDEN_CA")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wardenctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn push2b(b: &mut Vec<u8>, data: &[u8]) {
    b.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
}

/// The node's software AK.
fn ak_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[0x5a; 32]).unwrap()
}

/// TPMT_PUBLIC of a restricted P-256 ECDSA-SHA256 signing key.
fn ak_public() -> Vec<u8> {
    let point = ak_key().verifying_key().to_encoded_point(false);
    let mut b = Vec::new();
    b.extend_from_slice(&alg::ECC.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&0x0005_0072u32.to_be_bytes());
    push2b(&mut b, &[]);
    b.extend_from_slice(&alg::NULL.to_be_bytes());
    b.extend_from_slice(&alg::ECDSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes());
    push2b(&mut b, point.x().unwrap());
    push2b(&mut b, point.y().unwrap());
    b
}

/// The AK's TPM name, hex.
fn ak_name() -> String {
    hex::encode(parse_tpmt_public(&ak_public()).unwrap().name().unwrap())
}

/// `node`'s attestation request in `phase`: the PCRs `nonce` asks for,
/// replayed from `log`, quoted by the AK (TPM clock `reset`).
fn quoted_request(
    node: &str,
    nonce: NonceResponse,
    log: &[u8],
    reset: u32,
    phase: Phase,
) -> AttestRequest {
    let replayed = eventlog::replay(&eventlog::parse(log).unwrap(), HashAlg::Sha256).unwrap();
    let values: BTreeMap<u32, Vec<u8>> = nonce
        .pcrs
        .iter()
        .map(|p| (*p, replayed.get(p).cloned().unwrap_or_else(|| vec![0; 32])))
        .collect();
    let (attest, signature) = quote(&nonce.nonce, &values, reset);
    AttestRequest {
        protocol: warden_protocol::PROTOCOL_VERSION,
        node_id: node.to_owned(),
        ak_name: ak_name(),
        nonce: nonce.nonce,
        quote: attest,
        signature,
        pcrs: PcrBank {
            algorithm: "sha256".into(),
            values: values.iter().map(|(k, v)| (*k, hex::encode(v))).collect(),
        },
        event_log: Some(log.to_vec()),
        phase,
        agent_log: Vec::new(),
    }
}

/// A TPMS_ATTEST quote of `values` over `nonce` (TPM clock `reset`
/// counts up per boot), and its TPMT_SIGNATURE by the AK.
fn quote(nonce: &[u8], values: &BTreeMap<u32, Vec<u8>>, reset: u32) -> (Vec<u8>, Vec<u8>) {
    let mut select = vec![0u8; 3];
    let mut concat = Vec::new();
    for (pcr, v) in values {
        select[usize::try_from(pcr / 8).unwrap()] |= 1 << (pcr % 8);
        concat.extend_from_slice(v);
    }
    let mut b = Vec::new();
    b.extend_from_slice(&0xFF54_4347u32.to_be_bytes());
    b.extend_from_slice(&0x8018u16.to_be_bytes());
    push2b(&mut b, &[0x00, 0x0b, 0xaa]);
    push2b(&mut b, nonce);
    b.extend_from_slice(&1000u64.to_be_bytes());
    b.extend_from_slice(&reset.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.push(1);
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.push(3);
    b.extend_from_slice(&select);
    push2b(&mut b, &Sha256::digest(&concat));
    let sig: p256::ecdsa::Signature = ak_key().sign(&b);
    let (r, s) = sig.split_bytes();
    let mut sb = Vec::new();
    sb.extend_from_slice(&alg::ECDSA.to_be_bytes());
    sb.extend_from_slice(&alg::SHA256.to_be_bytes());
    push2b(&mut sb, &r);
    push2b(&mut sb, &s);
    (b, sb)
}

/// The fixture log with its SecureBoot variable flipped from 0 to 1 (the
/// firmware "changed"), its SHA-256 digest recomputed.
fn secure_boot_on_log() -> Vec<u8> {
    let mut log = eventlog::parse(EVENT_LOG).unwrap();
    let name: Vec<u8> = "SecureBoot"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let event = log
        .events
        .iter_mut()
        .find(|e| {
            e.event_type.name() == Some("EV_EFI_VARIABLE_DRIVER_CONFIG")
                && e.data.windows(name.len()).any(|w| w == name.as_slice())
        })
        .expect("the fixture measures SecureBoot");
    let last = event.data.last_mut().unwrap();
    assert_eq!(*last, 0, "the fixture boots with Secure Boot off");
    *last = 1;
    let digest = HashAlg::Sha256.digest(&event.data);
    for (alg_id, d) in &mut event.digests {
        if *alg_id == HashAlg::Sha256.alg_id() {
            *d = digest.clone();
        }
    }
    eventlog::encode(&log)
}

/// The node as the test drives it.
struct Node {
    id: String,
    boots: u32,
}

impl Node {
    /// Says hello with a fresh EK and binds the software AK in the database.
    async fn new(server: &Server) -> Node {
        let replayed =
            eventlog::replay(&eventlog::parse(EVENT_LOG).unwrap(), HashAlg::Sha256).unwrap();
        let spki = rcgen::KeyPair::generate()
            .unwrap()
            .subject_public_key_info();
        let pcrs = PcrBank {
            algorithm: "sha256".into(),
            values: (0..24u32)
                .map(|p| {
                    let v = replayed.get(&p).cloned().unwrap_or_else(|| vec![0; 32]);
                    (p, hex::encode(v))
                })
                .collect(),
        };
        let id = server.hello(&spki, pcrs, Some(EVENT_LOG.to_vec())).await;
        server
            .db()
            .bind_ak(
                &id,
                &AkPublic {
                    algorithm: AK_ECC.into(),
                    tpm_public: ak_public(),
                },
                &ak_name(),
                "test: a software AK bound in the database",
                &db::now_rfc3339(),
            )
            .unwrap();
        Node { id, boots: 0 }
    }

    /// One real attestation of a boot whose firmware wrote `log`.
    async fn attest(&mut self, server: &Server, log: &[u8], phase: Phase) -> Verdict {
        self.boots += 1;
        let reply = server
            .post_json("/v1/attest/nonce", &json!({ "node_id": self.id }))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let request = quoted_request(&self.id, reply.json(), log, self.boots, phase);
        let reply = server.post_json("/v1/attest", &request).await;
        assert_eq!(reply.status, 200, "{}\n{}", reply.text(), server.log());
        reply.json()
    }
}

fn codes_of(v: &Verdict) -> Vec<&str> {
    v.reasons.iter().map(|r| r.code.as_str()).collect()
}

fn plan_body() -> Value {
    json!({
        "image": "http://127.0.0.1:8080/tenant.raw",
        "checksum": format!("sha256:{}", "ab".repeat(32)),
        "wipe": "auto",
        "handoff": "poweroff",
        "lessee": "lab-b",
    })
}

#[tokio::test]
async fn a_node_whose_firmware_changed_is_quarantined_until_its_owner_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.admin.clone();
    let mut node = Node::new(&server).await;
    let id = node.id.clone();
    server
        .ok(
            "PUT",
            &format!("/v1/nodes/{id}/owner"),
            &admin,
            Some(&json!({ "owner": "uni-a" })),
        )
        .await;
    let owner = server.token("owner", "uni-a").await;
    let other_owner = server.token("owner", "uni-x").await;
    let lessee = server.token("lessee", "lab-b").await;

    // Onboarding: no policy yet. Refused, but not quarantined.
    let v = node.attest(&server, EVENT_LOG, Phase::Boot).await;
    assert_eq!(v.status, Status::Failed);
    assert_eq!(codes_of(&v), [codes::NO_POLICY]);
    let listed = server.node_listing(&admin).await;
    assert_eq!(listed.nodes.len(), 1);
    assert_eq!(listed.nodes[0].quarantine, None);

    // The owner learns the policy from that (genuine) evidence and assigns it.
    let mut policy: Policy = server
        .ok(
            "GET",
            &format!("/v1/nodes/{id}/policy/learn?name=fw-a"),
            &owner,
            None,
        )
        .await
        .json();
    policy.name = "fw-a".into();
    server
        .ok(
            "PUT",
            "/v1/policies/fw-a",
            &owner,
            Some(&serde_json::to_value(&policy).unwrap()),
        )
        .await;
    server
        .ok(
            "PUT",
            &format!("/v1/nodes/{id}/policy"),
            &owner,
            Some(&json!({ "policy": "fw-a" })),
        )
        .await;
    let v = node.attest(&server, EVENT_LOG, Phase::Boot).await;
    assert_eq!(v.status, Status::Ok, "{:?}", v.reasons);
    assert!(v.session.is_some() && v.reasons.is_empty());

    // A forged quote for the node (anyone can POST one) fails, but on
    // nothing only the node's TPM could show: no quarantine.
    let mut forged = node_request_with_bad_signature(&server, &id).await;
    forged.ak_name = ak_name();
    let reply = server.post_json("/v1/attest", &forged).await;
    let v: Verdict = reply.json();
    assert_eq!(v.status, Status::Failed);
    assert_eq!(codes_of(&v), [codes::SIGNATURE]);
    assert_eq!(server.node_listing(&admin).await.nodes[0].quarantine, None);

    // Secure Boot toggled: refused and quarantined, with the reason.
    let changed = secure_boot_on_log();
    let v = node.attest(&server, &changed, Phase::Boot).await;
    assert_eq!(v.status, Status::Failed);
    assert!(
        codes_of(&v).contains(&codes::POLICY_EVENT),
        "{:?}",
        v.reasons
    );
    assert!(v.session.is_none());
    let failed_id = v.attestation_id;
    let listed = server.node_listing(&owner).await;
    let q = listed.nodes[0].quarantine.clone().expect("quarantined");
    assert_eq!(q.attestation_id, failed_id);
    assert_eq!(q.since, v.time);
    assert!(q.reason.contains("SecureBoot"), "{}", q.reason);

    // wardenctl nodes: the marker and the reason; --json carries the field.
    let out = server.wardenctl(&owner, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("wardenctl nodes:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with("STATE"), "{text}");
    assert!(lines[1].ends_with("QUARANTINED"), "{text}");
    assert_eq!(
        lines[2],
        format!(
            "  QUARANTINED since {} (attestation #{failed_id}): {}",
            q.since, q.reason
        )
    );
    let out = server.wardenctl(&owner, &["nodes", "--json"]);
    let json_list: NodeList = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json_list.nodes[0].quarantine.as_ref(), Some(&q));

    // No plan while quarantined: 409 naming the reason and the way out.
    let reply = server
        .call(
            "POST",
            &format!("/v1/nodes/{id}/turnover"),
            Some(&owner),
            Some(&plan_body()),
        )
        .await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    let err: ApiError = reply.json();
    assert_eq!(err.error, "quarantined");
    for want in ["SecureBoot", "wardenctl node release", &id] {
        assert!(err.message.contains(want), "{want}: {}", err.message);
    }

    // Good evidence again: the verdict is OK, but no session, and it says why.
    let v = node.attest(&server, EVENT_LOG, Phase::Boot).await;
    assert_eq!(v.status, Status::Ok);
    assert!(v.session.is_none(), "a quarantined node got a session");
    assert!(v.reasons.is_empty(), "{:?}", v.reasons);
    assert_eq!(v.notes.len(), 1, "{:?}", v.notes);
    assert_eq!(v.notes[0].code, codes::QUARANTINED);
    for want in ["quarantined since", "SecureBoot", "wardenctl node release"] {
        let message = &v.notes[0].message;
        assert!(message.contains(want), "{want}: {message}");
    }
    // Still quarantined since the first failure.
    let listed = server.node_listing(&admin).await;
    assert_eq!(listed.nodes[0].quarantine.as_ref(), Some(&q));
    let metrics = server.call("GET", "/metrics", None, None).await.text();
    assert!(
        metrics.lines().any(|l| l == "warden_quarantined_nodes 1"),
        "{metrics}"
    );

    // Release: not by a lessee, not by another owner.
    for (who, token) in [("lessee", &lessee), ("other owner", &other_owner)] {
        let reply = server
            .call(
                "POST",
                &format!("/v1/nodes/{id}/release"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(reply.status, 403, "{who}: {}", reply.text());
        let err: ApiError = reply.json();
        assert!(err.message.contains(&id), "{who}: {}", err.message);
    }
    assert!(server.node_listing(&admin).await.nodes[0]
        .quarantine
        .is_some());
    // The owner releases it with wardenctl.
    let out = server.wardenctl(&owner, &["node", "release", &id]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("wardenctl node release:\n{text}");
    assert!(
        text.starts_with(&format!(
            "released node {id} from quarantine (since {}, attestation #{failed_id}: ",
            q.since
        )),
        "{text}"
    );
    assert!(text.contains("released by owner:uni-a at "), "{text}");
    assert_eq!(server.node_listing(&admin).await.nodes[0].quarantine, None);
    let reply = server
        .call(
            "POST",
            &format!("/v1/nodes/{id}/release"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert_eq!(reply.json::<ApiError>().error, "not_quarantined");

    // Released: a plan can be made, and the next good boot starts it.
    let plan: Plan = server
        .ok(
            "POST",
            &format!("/v1/nodes/{id}/turnover"),
            &owner,
            Some(&plan_body()),
        )
        .await
        .json();
    let v = node.attest(&server, EVENT_LOG, Phase::Boot).await;
    assert_eq!(v.status, Status::Ok);
    assert!(
        v.session.is_some() && v.reasons.is_empty(),
        "{:?}",
        v.reasons
    );
    let running: Plan = server
        .ok("GET", &format!("/v1/nodes/{id}/plan"), &owner, None)
        .await
        .json();
    assert_eq!(running.lease_id, plan.lease_id);
    assert_eq!(running.state, PlanState::Running);

    // A final attestation with the changed firmware fails the plan and
    // quarantines the node again.
    let v = node.attest(&server, &changed, Phase::Handoff).await;
    assert_eq!(v.status, Status::Failed);
    assert!(
        codes_of(&v).contains(&codes::POLICY_EVENT),
        "{:?}",
        v.reasons
    );
    let ended: Plan = server
        .ok("GET", &format!("/v1/nodes/{id}/plan"), &owner, None)
        .await
        .json();
    assert_eq!(ended.state, PlanState::Failed);
    let q2 = server.node_listing(&admin).await.nodes[0]
        .quarantine
        .clone()
        .expect("quarantined again");
    assert_eq!(q2.attestation_id, v.attestation_id);

    // An admin may release too; the JSON reply names what was released.
    let released: QuarantineRelease = server
        .ok("POST", &format!("/v1/nodes/{id}/release"), &admin, None)
        .await
        .json();
    assert_eq!(released.node_id, id);
    assert_eq!(released.released, q2);
    assert_eq!(released.released_by, "admin");
}

/// An attestation request for `node` with a fresh nonce and a signature
/// that does not verify.
async fn node_request_with_bad_signature(server: &Server, node: &str) -> AttestRequest {
    let reply = server
        .post_json("/v1/attest/nonce", &json!({ "node_id": node }))
        .await;
    let mut request = quoted_request(node, reply.json(), EVENT_LOG, 1000, Phase::Boot);
    let last = request.signature.len() - 1;
    request.signature[last] ^= 0xff;
    request.ak_name = String::new();
    request
}
