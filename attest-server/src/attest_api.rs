//! The enrollment, attestation and policy endpoints.
//!
//! Agent-facing (no token: the TPM evidence is the credential):
//! `POST /v1/enroll`, `POST /v1/enroll/activate`, `POST /v1/attest/nonce`,
//! `POST /v1/attest`. Admin-facing (Bearer admin token):
//! `GET /v1/nodes/{id}/verdict`, `GET /v1/attestations[?node=&limit=]`,
//! `POST /v1/ek-allowlist`, `GET /v1/policies`,
//! `GET|PUT /v1/policies/{name}[?version=]`, `PUT /v1/nodes/{id}/policy`,
//! `PUT /v1/groups/{group}/policy`, `GET /v1/nodes/{id}/policy/learn`.
//!
//! This module maps HTTP to [`crate::enroll`], [`crate::verify`] and the
//! records in [`crate::db`]. It must never bind an AK without a correct
//! ActivateCredential answer, never answer an attestation without storing
//! it, and never let a failed check turn into an OK verdict: a verdict is
//! OK only when [`crate::verify::verify`] found no reason at all.

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};
use warden_protocol::attest::{
    ActivateRequest, AttestRequest, AttestationList, BoundAkInfo, EkRegistration, EnrollChallenge,
    EnrollRequest, Enrolled, NonceRequest, NonceResponse, Policy, PolicyAssignment, PolicyList,
    PolicyRef, Verdict, DEFAULT_QUOTE_PCRS,
};
use warden_protocol::eventlog::{self, HashAlg};
use warden_protocol::tpm;

use warden_protocol::turnover::Role;

use crate::api::{content_type, node_id_of, parse_json, AppState, Failure};
use crate::auth::{self, Caller};
use crate::db::{self, AttestationRow};
use crate::enroll::{self, EnrollError};
use crate::turnover_api::caller_for_node;
use crate::verify::{self, BoundAk, NodeFacts};

/// The routes of this module, merged into [`crate::api::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/enroll/activate", post(activate))
        .route("/v1/attest/nonce", post(nonce))
        .route("/v1/attest", post(attest))
        .route("/v1/nodes/{id}/verdict", get(verdict))
        .route("/v1/nodes/{id}/ak", get(bound_ak))
        .route("/v1/nodes/{id}/policy", put(assign_node_policy))
        .route("/v1/nodes/{id}/policy/learn", get(learn))
        .route("/v1/groups/{group}/policy", put(assign_group_policy))
        .route("/v1/attestations", get(attestations))
        .route("/v1/ek-allowlist", post(register_ek))
        .route("/v1/policies", get(list_policies))
        .route("/v1/policies/{name}", get(get_policy).put(put_policy))
}

fn forbidden(error: &str, message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::FORBIDDEN, error, None, message)
}

fn not_found(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "not_found", None, message)
}

fn enroll_failure(e: EnrollError) -> Failure {
    let message = e.to_string();
    match e {
        EnrollError::EkUntrusted(_) => forbidden("ek_untrusted", message),
        EnrollError::AkRefused(_) => Failure::bad_request(Some("ak.tpm_public".into()), message),
        EnrollError::UnknownChallenge(_) => not_found(message),
        EnrollError::WrongSecret(_) => forbidden("ak_not_bound", message),
        EnrollError::Internal(_) => Failure::internal(message),
    }
}

async fn enroll(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<EnrollChallenge>, Failure> {
    let request: EnrollRequest = parse_json(content_type(&headers), &body)?;
    request
        .validate()
        .map_err(|e| Failure::bad_request(Some(e.field.clone()), e.to_string()))?;
    let node_id = node_id_of(&request.ek)?;
    // The credential is made for tpm_public; the id comes from
    // public_key_der. They must be the same key, or a node could enroll
    // under another node's id with its own TPM.
    let ek_public = tpm::parse_tpmt_public(&request.ek.tpm_public).map_err(|e| {
        Failure::bad_request(Some("ek.tpm_public".into()), format!("ek.tpm_public: {e}"))
    })?;
    if ek_public.spki_der().ok().as_deref() != Some(request.ek.public_key_der.as_slice()) {
        return Err(Failure::bad_request(
            Some("ek.tpm_public".into()),
            "ek.tpm_public and ek.public_key_der are not the same key",
        ));
    }
    let (_, ak_name) = enroll::check_ak(&request.ak).map_err(enroll_failure)?;

    let registration = {
        let node_id = node_id.clone();
        state
            .with_db("reading the EK allow-list", move |db| {
                db.ek_registration(&node_id)
            })
            .await?
    };
    let trust = match (&registration, &request.ek.certificate_der) {
        (Some(reg), _) => Ok(format!(
            "EK registered by its owner{}",
            reg.group
                .as_ref()
                .map(|g| format!(" (group {g})"))
                .unwrap_or_default()
        )),
        (None, Some(cert)) => state.cas.check(cert, &request.ek.public_key_der),
        (None, None) => Err(EnrollError::EkUntrusted(format!(
            "the TPM has no EK certificate and EK {node_id} is not registered (wardenctl node add --ek-sha256 {node_id})"
        ))),
    };
    let ek_trust = trust.map_err(|e| {
        tracing::warn!(%peer, node_id = %node_id, error = %e, "refused enrollment");
        enroll_failure(e)
    })?;

    let challenge = state
        .enrollments
        .challenge(
            &node_id,
            &request.ek.tpm_public,
            &request.ak,
            &ak_name,
            &ek_trust,
        )
        .map_err(enroll_failure)?;
    {
        let node_id = node_id.clone();
        let ek = request.ek.clone();
        state
            .with_db("recording the node", move |db| {
                db.ensure_node(&node_id, &ek, &db::now_rfc3339())
            })
            .await?;
    }
    tracing::info!(%peer, node_id = %node_id, ak = %request.ak.algorithm, ek_trust = %ek_trust, "enrollment challenge");
    Ok(Json(EnrollChallenge {
        node_id,
        enrollment_id: challenge.enrollment_id,
        id_object: challenge.credential.id_object,
        encrypted_secret: challenge.credential.encrypted_secret,
        expires_in_s: enroll::CHALLENGE_TTL.as_secs(),
        ek_trust,
    }))
}

async fn activate(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Enrolled>, Failure> {
    let request: ActivateRequest = parse_json(content_type(&headers), &body)?;
    let pending = state
        .enrollments
        .answer(&request.enrollment_id, &request.secret)
        .map_err(|e| {
            tracing::warn!(%peer, enrollment = %request.enrollment_id, error = %e, "refused activation");
            enroll_failure(e)
        })?;
    let ak_name = hex::encode(&pending.ak_name);
    {
        let pending = pending.clone();
        let ak_name = ak_name.clone();
        state
            .with_db("binding the AK", move |db| {
                db.bind_ak(
                    &pending.node_id,
                    &pending.ak,
                    &ak_name,
                    &pending.ek_trust,
                    &db::now_rfc3339(),
                )
            })
            .await?;
    }
    tracing::info!(%peer, node_id = %pending.node_id, ak_name = %ak_name, "AK bound");
    Ok(Json(Enrolled {
        node_id: pending.node_id,
        ak_name,
    }))
}

async fn nonce(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<NonceResponse>, Failure> {
    let request: NonceRequest = parse_json(content_type(&headers), &body)?;
    let node_id = request.node_id.clone();
    let policy_pcrs = state
        .with_db("reading the node", move |db| db.node_policy_pcrs(&node_id))
        .await?;
    let Some(policy_pcrs) = policy_pcrs else {
        return Err(not_found(format!(
            "node {} is unknown to this server: it must enroll first",
            request.node_id
        )));
    };
    let mut pcrs: Vec<u32> = DEFAULT_QUOTE_PCRS.to_vec();
    // The agent's measured log lives in PCR 13: a final attestation is
    // replayed against it, and at boot it must still read zero.
    pcrs.push(warden_protocol::agentlog::AGENT_PCR);
    pcrs.extend(policy_pcrs);
    pcrs.sort_unstable();
    pcrs.dedup();
    let nonce = state
        .nonces
        .issue(&request.node_id)
        .map_err(|_| Failure::internal("no randomness for a nonce"))?;
    Ok(Json(NonceResponse {
        nonce,
        expires_in_s: state.nonces.ttl().as_secs(),
        pcrs,
    }))
}

async fn attest(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Verdict>, Failure> {
    let started = Instant::now();
    let request: AttestRequest = parse_json(content_type(&headers), &body)?;
    request
        .validate()
        .map_err(|e| Failure::bad_request(Some(e.field.clone()), e.to_string()))?;
    // A final attestation is held to what the node's running plan asked.
    let expect = crate::turnover::expectation(&state, &request).await?;
    let request = Arc::new(request);
    let req = request.clone();
    let (db, nonces) = (state.db.clone(), state.nonces.clone());
    let peer_address = peer.to_string();
    // Read, verify and record in one blocking task: one hand-off between
    // threads instead of three (on 2 busy cores each hand-off is a wait for
    // a CPU). The database mutex is held for the read and for the write,
    // never while the quote and the logs are checked.
    let queued = Instant::now();
    let (verdict, agent_log, notes, timing) = tokio::task::spawn_blocking(move || {
        let picked_up = queued.elapsed();
        let lock = || db.lock().unwrap_or_else(PoisonError::into_inner);
        let t = Instant::now();
        let known = {
            let db = lock();
            let locked = t.elapsed();
            db.node_attest_state(&req.node_id)
                .map(|known| (known, locked))
                .map_err(|e| db_failure("reading the node", &e))
        };
        let (known, read_wait) = known?;
        let read = t.elapsed();
        let t = Instant::now();
        let facts = known.as_ref().map(|k| NodeFacts {
            ak: k.ak.as_ref().and_then(|(_, public, name)| {
                Some(BoundAk {
                    name: hex::decode(name).ok()?,
                    public: tpm::parse_tpmt_public(public).ok()?,
                })
            }),
            last_clock: k.last_clock,
            last_clock_unsafe: k.last_clock_unsafe,
        });
        let policy = known.and_then(|k| k.policy);
        let outcome = verify::verify(
            &req,
            &nonces,
            facts.as_ref(),
            policy.as_ref(),
            expect.as_ref(),
        );
        let pcrs_json = serde_json::to_string(&req.pcrs.values)
            .map_err(|e| Failure::internal(format!("encoding PCR values: {e}")))?;
        let verified = t.elapsed();
        let t = Instant::now();
        let verdict = {
            let mut db = lock();
            let locked = t.elapsed();
            db.record_attestation(&AttestationRow {
                node_id: &req.node_id,
                received_at: &db::now_rfc3339(),
                peer_address: &peer_address,
                phase: req.phase,
                reasons: &outcome.reasons,
                evidence_ok: outcome.evidence_ok,
                policy: policy.map(|p| PolicyRef {
                    name: p.name,
                    version: p.version,
                }),
                clock: outcome.clock.map(|c| (c.reset_count, c.restart_count)),
                pcrs_json,
                quote: &req.quote,
                signature: &req.signature,
                event_log: req.event_log.as_deref(),
            })
            .map(|v| (v, locked))
            .map_err(|e| db_failure("recording the attestation", &e))
        };
        let (verdict, write_wait) = verdict?;
        let timing = Timing {
            picked_up,
            read_wait,
            read,
            verified,
            write_wait,
            written: t.elapsed(),
        };
        Ok::<_, Failure>((verdict, outcome.agent_log, outcome.notes, timing))
    })
    .await
    .map_err(|e| Failure::internal(format!("verifying the attestation failed: {e}")))??;
    state.metrics().attestation(
        crate::metrics::phase_label(verdict.phase),
        verdict.status == warden_protocol::attest::Status::Ok,
    );
    if verdict.reasons.is_empty() {
        tracing::info!(%peer, node_id = %verdict.node_id, id = verdict.attestation_id, "attestation OK");
    } else {
        let reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.message.as_str()).collect();
        tracing::warn!(%peer, node_id = %verdict.node_id, id = verdict.attestation_id, ?reasons, "attestation FAILED");
    }
    let mut verdict = verdict;
    if !notes.is_empty() {
        tracing::warn!(node_id = %verdict.node_id, id = verdict.attestation_id, ?notes, "attestation accepted with notes");
        verdict.notes.extend(notes.into_iter().map(|n| {
            warden_protocol::attest::Reason::new(warden_protocol::attest::codes::CLOCK_UNSAFE, n)
        }));
    }
    let recorded = started.elapsed();
    crate::turnover::on_verdict(&state, &request, &mut verdict, agent_log.as_ref()).await?;
    // Where the time went, for `scripts/bench load` (RUST_LOG=…attest_api=debug).
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    tracing::debug!(
        id = verdict.attestation_id,
        pickup_us = us(timing.picked_up),
        read_wait_us = us(timing.read_wait),
        read_us = us(timing.read),
        verify_us = us(timing.verified),
        write_wait_us = us(timing.write_wait),
        write_us = us(timing.written),
        recorded_us = us(recorded),
        total_us = us(started.elapsed()),
        "attestation timing"
    );
    Ok(Json(verdict))
}

/// Where one attestation's time went inside its blocking task: the wait to
/// be picked up, for the database mutex (read, write) and the whole of
/// each phase (the read and the write include their wait).
struct Timing {
    picked_up: Duration,
    read_wait: Duration,
    read: Duration,
    verified: Duration,
    write_wait: Duration,
    written: Duration,
}

/// A database error as [`AppState::with_db`] reports it: logged here, a
/// plain 500 for the client.
fn db_failure(what: &'static str, e: &db::DbError) -> Failure {
    tracing::error!(error = %e, what, "database error");
    Failure::internal(format!("{what} failed; see the server log"))
}

async fn verdict(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Verdict>, Failure> {
    caller_for_node(&state, &headers, &id, Caller::may_view).await?;
    let node = id.clone();
    let mut latest = state
        .with_db("reading verdicts", move |db| {
            db.list_attestations(Some(&node), 1)
        })
        .await?;
    match latest.pop() {
        Some(record) => Ok(Json(record.verdict)),
        None => Err(not_found(format!("node {id} has no attestation yet"))),
    }
}

async fn bound_ak(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<BoundAkInfo>, Failure> {
    caller_for_node(&state, &headers, &id, Caller::may_manage).await?;
    let node = id.clone();
    let ak = state
        .with_db("reading the AK", move |db| db.bound_ak(&node))
        .await?;
    ak.map(Json)
        .ok_or_else(|| not_found(format!("node {id} has no enrolled AK")))
}

#[derive(Debug, Deserialize)]
struct AttestationsQuery {
    node: Option<String>,
    limit: Option<u32>,
}

async fn attestations(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<AttestationsQuery>,
) -> Result<Json<AttestationList>, Failure> {
    // Admins see the whole audit log; others one node they may view.
    match &q.node {
        Some(node) => {
            caller_for_node(&state, &headers, node, Caller::may_view).await?;
        }
        None => Caller::from_headers(&state, &headers)
            .await?
            .require_admin()?,
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let attestations = state
        .with_db("listing attestations", move |db| {
            db.list_attestations(q.node.as_deref(), limit)
        })
        .await?;
    Ok(Json(AttestationList { attestations }))
}

async fn register_ek(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let caller = Caller::from_headers(&state, &headers).await?;
    let mut reg: EkRegistration = parse_json(content_type(&headers), &body)?;
    reg.ek_sha256 = reg.ek_sha256.trim().to_ascii_lowercase();
    if reg.ek_sha256.len() != 64 || hex::decode(&reg.ek_sha256).is_err() {
        return Err(Failure::bad_request(
            Some("ek_sha256".into()),
            "ek_sha256 must be the 64-hex-digit SHA-256 of the EK's DER SubjectPublicKeyInfo",
        ));
    }
    // An owner who registers an EK owns that node; one owned by another
    // project stays theirs.
    let owner = match caller.role {
        Role::Admin => None,
        Role::Owner => caller.project.clone(),
        Role::Lessee => {
            return Err(auth::forbidden(
                "lessee tokens cannot register nodes; the node's owner or an admin can",
            ))
        }
    };
    if let Some(owner) = &owner {
        let node = reg.ek_sha256.clone();
        let roles = state
            .with_db("reading the node's roles", move |db| db.node_roles(&node))
            .await?;
        if roles.owner.as_ref().is_some_and(|o| o != owner) {
            return Err(auth::forbidden(format!(
                "node {} is owned by another project",
                reg.ek_sha256
            )));
        }
    }
    state
        .with_db("registering the EK", move |db| {
            let now = db::now_rfc3339();
            db.register_ek(&reg, &now)?;
            if let Some(owner) = owner {
                db.set_node_owner(&reg.ek_sha256, &owner, &now)?;
            }
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_policies(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<PolicyList>, Failure> {
    require_owner_or_admin(&state, &headers).await?;
    let policies = state
        .with_db("listing policies", |db| db.list_policies())
        .await?;
    Ok(Json(PolicyList { policies }))
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<u32>,
}

async fn get_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Json<Policy>, Failure> {
    require_owner_or_admin(&state, &headers).await?;
    let n = name.clone();
    let policy = state
        .with_db("reading the policy", move |db| db.policy(&n, q.version))
        .await?;
    policy.map(Json).ok_or_else(|| {
        not_found(match q.version {
            Some(v) => format!("policy {name} has no version {v}"),
            None => format!("no policy named {name}"),
        })
    })
}

async fn put_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<PolicyRef>, Failure> {
    let caller = require_owner_or_admin(&state, &headers).await?;
    let mut policy: Policy = parse_json(content_type(&headers), &body)?;
    if policy.name.is_empty() {
        policy.name.clone_from(&name);
    }
    if policy.name != name {
        return Err(Failure::bad_request(
            Some("name".into()),
            format!(
                "the body names policy {:?} but the URL {name:?}",
                policy.name
            ),
        ));
    }
    warden_protocol::policy::validate(&policy)
        .map_err(|e| Failure::bad_request(Some(e.field.clone()), e.to_string()))?;
    // A policy name belongs to the owner who first stored it (admins' are
    // nobody's): an owner can never change the policy of another's nodes.
    let owner = caller.project.filter(|_| caller.role == Role::Owner);
    let (n, o) = (name.clone(), owner.clone());
    let (holder, exists) = state
        .with_db("reading the policy", move |db| {
            Ok((db.policy_owner(&n)?, db.policy(&n, None)?.is_some()))
        })
        .await?;
    if let Some(o) = &o {
        if holder.as_ref() != Some(o) && (exists || holder.is_some()) {
            return Err(auth::forbidden(format!(
                "policy {name} belongs to {}; store yours under another name",
                holder.as_deref().unwrap_or("the admins")
            )));
        }
    }
    let version = state
        .with_db("storing the policy", move |db| {
            if let Some(owner) = &owner {
                db.claim_policy(&policy.name, owner)?;
            }
            db.put_policy(&policy, &db::now_rfc3339())
        })
        .await?;
    tracing::info!(policy = %name, version, "stored policy");
    Ok(Json(PolicyRef { name, version }))
}

async fn assign(
    state: AppState,
    headers: &HeaderMap,
    body: &[u8],
    scope: &'static str,
    target: String,
) -> Result<StatusCode, Failure> {
    match scope {
        // Groups span owners: only admins assign to them.
        "group" => Caller::from_headers(&state, headers)
            .await?
            .require_admin()?,
        _ => {
            caller_for_node(&state, headers, &target, Caller::may_manage).await?;
        }
    }
    let a: PolicyAssignment = parse_json(content_type(headers), body)?;
    let name = a.policy.clone();
    let exists = state
        .with_db("reading the policy", move |db| db.policy(&name, None))
        .await?
        .is_some();
    if !exists {
        return Err(Failure::bad_request(
            Some("policy".into()),
            format!(
                "no policy named {} (store it first: wardenctl policy put)",
                a.policy
            ),
        ));
    }
    state
        .with_db("assigning the policy", move |db| {
            db.assign_policy(scope, &target, &a.policy, &db::now_rfc3339())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn assign_node_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    assign(state, &headers, &body, "node", id).await
}

async fn assign_group_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(group): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    assign(state, &headers, &body, "group", group).await
}

#[derive(Debug, Deserialize)]
struct LearnQuery {
    name: String,
    /// Comma-separated PCR indices; default 0,2–9.
    pcrs: Option<String>,
}

async fn learn(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LearnQuery>,
) -> Result<Json<Policy>, Failure> {
    caller_for_node(&state, &headers, &id, Caller::may_manage).await?;
    let pcrs: Vec<u32> = match &q.pcrs {
        None => warden_protocol::policy::DEFAULT_LEARN_PCRS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                Failure::bad_request(
                    Some("pcrs".into()),
                    format!("pcrs {list:?} is not a comma-separated list of PCR indices"),
                )
            })?,
    };
    let node = id.clone();
    let evidence = state
        .with_db("reading attestations", move |db| {
            db.learnable_evidence(&node)
        })
        .await?;
    let Some((attestation_id, log_bytes, _pcrs_json)) = evidence else {
        return Err(not_found(format!(
            "node {id} has no attestation with genuine evidence (verified quote, event log matching it) to learn from"
        )));
    };
    let log = eventlog::parse(&log_bytes).map_err(|e| {
        Failure::internal(format!(
            "stored event log of attestation {attestation_id}: {e}"
        ))
    })?;
    let replayed = eventlog::replay(&log, HashAlg::Sha256).map_err(|e| {
        Failure::internal(format!(
            "stored event log of attestation {attestation_id}: {e}"
        ))
    })?;
    let mut policy = warden_protocol::policy::learn(&q.name, &log, &replayed, &pcrs);
    policy.description = format!("learned from attestation {attestation_id} of node {id}");
    warden_protocol::policy::validate(&policy)
        .map_err(|e| Failure::bad_request(Some(e.field.clone()), e.to_string()))?;
    Ok(Json(policy))
}

/// Owners (any project) and admins: policies are reference values, not
/// secrets, and owners build theirs from the shared ones.
async fn require_owner_or_admin(state: &AppState, headers: &HeaderMap) -> Result<Caller, Failure> {
    let caller = Caller::from_headers(state, headers).await?;
    if caller.role == Role::Lessee {
        return Err(auth::forbidden(
            "policies are for owners and admins; a lessee token cannot read or change them",
        ));
    }
    Ok(caller)
}
