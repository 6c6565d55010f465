//! The turnover endpoints: operator tokens, node owners, plans, live
//! progress, console logs, reports and snapshots — and the agent's session
//! endpoints that feed them.
//!
//! Operators (bearer token, rules in [`crate::auth`]):
//! `POST /v1/tokens`, `PUT /v1/nodes/{id}/owner`,
//! `POST /v1/nodes/{id}/turnover`, `GET /v1/nodes/{id}/plan`,
//! `GET /v1/nodes/{id}/progress`, `GET /v1/nodes/{id}/console[?after=]`,
//! `GET /v1/nodes/{id}/report`, `GET /v1/snapshots`,
//! `GET /v1/snapshots/{lease}`.
//! Agents (bearer session token from a good verdict):
//! `GET /v1/session/plan`, `POST /v1/session/progress`,
//! `POST /v1/session/console`, `POST /v1/session/steps`.
//!
//! This module must never hand a plan to anything but a session earned by
//! a good boot verdict of that very node, never let a role see a node,
//! report or snapshot the rules in [`crate::auth`] do not grant, and never
//! move a finished plan again (the first outcome stands).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use warden_protocol::turnover::{
    ConsoleBatch, ConsoleLog, DiskSource, OwnerRequest, Plan, PlanRequest, PlanState,
    ProgressUpdate, ProgressView, RestoreSource, Role, SessionPlan, SnapshotEntry, SnapshotList,
    StepProgress, StepResult, TokenCreated, TokenRequest,
};

use warden_protocol::ca::pem_certificates;
use warden_protocol::image::HttpsTrust;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::{content_type, parse_json, AppState, Failure};
use crate::auth::{self, Caller, Session};
use crate::db;

/// Lines one console batch may carry, and bytes per line.
const CONSOLE_BATCH_LINES: usize = 2_000;
const CONSOLE_LINE_BYTES: usize = 4_096;

/// The routes of this module, merged into [`crate::api::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", post(create_token))
        .route("/v1/nodes/{id}/owner", put(set_owner))
        .route("/v1/nodes/{id}/turnover", post(create_plan))
        .route("/v1/nodes/{id}/plan", get(get_plan))
        .route("/v1/nodes/{id}/progress", get(get_progress))
        .route("/v1/nodes/{id}/console", get(get_console))
        .route("/v1/nodes/{id}/report", get(get_report))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{lease}", get(get_snapshot))
        .route("/v1/session/plan", get(session_plan))
        .route("/v1/session/progress", post(session_progress))
        .route("/v1/session/console", post(session_console))
        .route("/v1/session/steps", post(session_step))
}

fn not_found(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "not_found", None, message)
}

fn conflict(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::CONFLICT, "conflict", None, message)
}

/// Project names: what a person types, nothing that could confuse a log.
fn check_project(field: &str, value: &str) -> Result<(), Failure> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Failure::bad_request(
            Some(field.into()),
            format!("{field} {value:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        ))
    }
}

/// Checks a plan before it is stored, naming the field at fault: the
/// fields on their own. Whether a restore plan's snapshot exists and may
/// go to the plan's lessee needs the database: [`check_restore`].
pub fn check_plan(plan: &PlanRequest) -> Result<(), Failure> {
    let bad = |field: &str, message: String| Err(Failure::bad_request(Some(field.into()), message));
    let source = plan
        .disk_source()
        .map_err(|e| Failure::bad_request(Some(e.field.into()), e.message))?;
    match source {
        DiskSource::Image { url, checksum } => check_image(url, checksum)?,
        DiskSource::Restore { lease } => {
            let ok = !lease.is_empty()
                && lease.len() <= 64
                && lease
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return bad(
                    "restore_from",
                    format!("restore_from {lease:?} must be a snapshot's lease id, e.g. lease-0123456789abcdef"),
                );
            }
        }
    }
    if let Some(uri) = &plan.snapshot_to {
        if !(uri.starts_with("nbd://") || uri.starts_with("nbds://")) || uri.len() > 1024 {
            return bad(
                "snapshot_to",
                format!("snapshot_to {uri:?} must be an nbd:// or nbds:// URI"),
            );
        }
    }
    check_plan_cas(plan)?;
    if let Some(lessee) = &plan.lessee {
        check_project("lessee", lessee)?;
    }
    if let Some(target) = &plan.target {
        let ok = !target.is_empty()
            && target.len() <= 32
            && target.bytes().all(|b| b.is_ascii_alphanumeric());
        if !ok {
            return bad(
                "target",
                format!("target {target:?} must be a disk's kernel name, e.g. nvme0n1"),
            );
        }
    }
    Ok(())
}

/// An image plan's URL and checksum.
fn check_image(url: &str, checksum: &str) -> Result<(), Failure> {
    let bad = |field: &str, message: String| Err(Failure::bad_request(Some(field.into()), message));
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
        return bad(
            "image",
            format!("image {url:?} must be an http:// or https:// URL"),
        );
    }
    let (alg, hex_digits) = match checksum.split_once(':') {
        Some((alg, hex)) => (alg, hex),
        None => ("sha256", checksum),
    };
    let want = match alg {
        "sha256" => 64,
        "sha512" => 128,
        _ => 0,
    };
    if want == 0 || hex_digits.len() != want || !hex_digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad(
            "checksum",
            format!(
                "checksum {checksum:?} must be sha256:<64 hex digits> or sha512:<128 hex digits>"
            ),
        );
    }
    Ok(())
}

/// A restore plan against the snapshot it names, before it is stored (in
/// the same database transaction as the insert): the snapshot exists (404
/// naming the lease), it holds the data of the plan's incoming lessee —
/// `incoming`, the plan's lessee or else the node's current one — (403
/// naming both projects; a snapshot of no lessee is an admin's to
/// restore), and the plan does not snapshot over it first (400). Tenant
/// A's disk must never reach tenant B.
pub fn check_restore(
    plan: &PlanRequest,
    snapshot: Option<&SnapshotEntry>,
    incoming: Option<&str>,
    caller: &Caller,
) -> Result<(), Failure> {
    let Some(lease) = plan.restore_from.as_deref() else {
        return Ok(());
    };
    let Some(snapshot) = snapshot else {
        return Err(not_found(format!(
            "no snapshot for lease {lease}: restore_from names the lease id of a snapshot the server recorded (wardenctl snapshots)"
        )));
    };
    match (snapshot.lessee.as_deref(), incoming) {
        (None, _) if caller.is_admin() => {}
        (None, _) => {
            return Err(auth::forbidden(format!(
                "the snapshot of lease {lease} holds the disk of no recorded lessee: only an admin may restore it"
            )))
        }
        (Some(owner), Some(to)) if owner == to => {}
        (Some(owner), to) => {
            return Err(auth::forbidden(format!(
                "the snapshot of lease {lease} holds project {owner}'s data; this plan hands the node to {}: a backup is restored only for the lessee whose data it is",
                to.map_or_else(|| "no lessee".to_owned(), |p| format!("project {p}"))
            )))
        }
    }
    if plan.snapshot_to.as_deref() == Some(snapshot.uri.as_str()) {
        return Err(Failure::bad_request(
            Some("snapshot_to".into()),
            format!(
                "snapshot_to {:?} is the export this plan restores from (snapshot of lease {lease}): the snapshot would overwrite the backup before it is restored",
                snapshot.uri
            ),
        ));
    }
    Ok(())
}

/// The plan's CAs: each only where TLS is used (a CA for a plaintext URL
/// is certainly a mistake), each one that parses, and `nbds://` never
/// without one — the ramdisk has no system CA store, and the agent's NBD
/// client trusts only the CA it is given.
fn check_plan_cas(plan: &PlanRequest) -> Result<(), Failure> {
    let bad = |field: &str, message: String| Err(Failure::bad_request(Some(field.into()), message));
    if let Some(ca) = &plan.image_ca {
        let image = plan.image.as_deref().unwrap_or_default();
        if !image.starts_with("https://") {
            return bad(
                "image_ca",
                format!(
                    "image_ca is given for the plain http:// image {image:?}: a CA is only used with https://"
                ),
            );
        }
        match HttpsTrust::from_plan(ca) {
            Ok(HttpsTrust::CaBundlePem(pem)) => check_ca_pem("image_ca", &pem)?,
            Ok(HttpsTrust::PinnedCa(_)) => {}
            Err(e) => return bad("image_ca", format!("image_ca {e}")),
        }
    }
    let nbds = plan
        .snapshot_to
        .as_deref()
        .is_some_and(|uri| uri.starts_with("nbds://"));
    match (&plan.snapshot_ca, &plan.snapshot_to) {
        (Some(_), None) => bad(
            "snapshot_ca",
            "snapshot_ca is given but there is no snapshot_to".into(),
        ),
        (Some(_), Some(uri)) if !nbds => bad(
            "snapshot_ca",
            format!("snapshot_ca is given for the plain nbd:// export {uri:?}: a CA is only used with nbds://"),
        ),
        (Some(pem), Some(_)) => check_ca_pem("snapshot_ca", pem),
        (None, Some(uri)) if nbds => bad(
            "snapshot_ca",
            format!(
                "the nbds:// export {uri:?} needs snapshot_ca, the PEM of the CA that signs its certificate: the agent's ramdisk trusts no other CA"
            ),
        ),
        (None, _) => Ok(()),
    }
}

/// PEM CA certificates, each parsed as X.509 here so a typo is refused
/// now, not on the node after its disks are wiped.
fn check_ca_pem(field: &str, pem: &str) -> Result<(), Failure> {
    let bad = |message: String| Failure::bad_request(Some(field.into()), message);
    let certs = pem_certificates(pem).map_err(|e| bad(format!("{field} {e}")))?;
    for (i, der) in certs.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok(([], _)) => {}
            Ok(_) => {
                return Err(bad(format!(
                    "{field} certificate {}: bytes follow the certificate",
                    i + 1
                )))
            }
            Err(e) => {
                return Err(bad(format!(
                    "{field} certificate {}: not an X.509 certificate: {e}",
                    i + 1
                )))
            }
        }
    }
    Ok(())
}

async fn create_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TokenCreated>, Failure> {
    Caller::from_headers(&state, &headers)
        .await?
        .require_admin()?;
    let req: TokenRequest = parse_json(content_type(&headers), &body)?;
    match (&req.role, &req.project) {
        (Role::Admin, _) => {}
        (_, Some(p)) => check_project("project", p)?,
        (role, None) => {
            return Err(Failure::bad_request(
                Some("project".into()),
                format!("a {} token needs a project", role.name()),
            ))
        }
    }
    let secret = auth::new_secret()?;
    let digest = auth::token_digest(&secret);
    let (role, project, note) = (req.role, req.project.clone(), req.note.clone());
    state
        .with_db("storing the token", move |db| {
            db.create_token(
                &digest,
                role,
                project.as_deref(),
                note.as_deref(),
                &db::now_rfc3339(),
            )
        })
        .await?;
    tracing::info!(
        role = req.role.name(),
        project = req.project.as_deref().unwrap_or("-"),
        "created token"
    );
    Ok(Json(TokenCreated {
        token: secret,
        role: req.role,
        project: req.project,
    }))
}

async fn set_owner(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    Caller::from_headers(&state, &headers)
        .await?
        .require_admin()?;
    check_node_id(&id)?;
    let req: OwnerRequest = parse_json(content_type(&headers), &body)?;
    check_project("owner", &req.owner)?;
    state
        .with_db("setting the owner", move |db| {
            db.set_node_owner(&id, &req.owner, &db::now_rfc3339())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Node ids are the hex SHA-256 of the EK.
fn check_node_id(id: &str) -> Result<(), Failure> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Failure::bad_request(
            Some("id".into()),
            format!("node id {id:?} must be 64 lowercase hex digits (the EK's SHA-256)"),
        ))
    }
}

/// The caller, checked against the node's roles with `rule`.
pub(crate) async fn caller_for_node(
    state: &AppState,
    headers: &HeaderMap,
    node_id: &str,
    rule: fn(&Caller, &str, &db::NodeRoles) -> Result<(), Failure>,
) -> Result<Caller, Failure> {
    let caller = Caller::from_headers(state, headers).await?;
    let node = node_id.to_owned();
    let roles = state
        .with_db("reading the node's roles", move |db| db.node_roles(&node))
        .await?;
    rule(&caller, node_id, &roles)?;
    Ok(caller)
}

/// A fresh lease id: `lease-` and 16 hex digits.
fn new_lease_id() -> Result<String, Failure> {
    let mut bytes = [0u8; 8];
    crate::pki::random_bytes(&mut bytes)
        .map_err(|e| Failure::internal(format!("no randomness for a lease id: {e:?}")))?;
    Ok(format!("lease-{}", hex::encode(bytes)))
}

async fn create_plan(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Plan>, Failure> {
    check_node_id(&id)?;
    let caller = caller_for_node(&state, &headers, &id, Caller::may_manage).await?;
    let request: PlanRequest = parse_json(content_type(&headers), &body)?;
    check_plan(&request)?;
    let lease_id = new_lease_id()?;
    let by = match &caller.project {
        Some(p) => format!("{}:{p}", caller.role.name()),
        None => caller.role.name().to_owned(),
    };
    let node = id.clone();
    // Checked under the same database lock as the insert, so a node
    // quarantined meanwhile cannot slip a plan in, nor a lessee change
    // between the restore check and the insert.
    let created = state
        .with_db("storing the plan", move |db| {
            if let Some(q) = db.quarantine_of(&node)? {
                return Ok(Err(crate::quarantine::plan_refused(&node, &q)));
            }
            if let Some(lease) = &request.restore_from {
                let snapshot = db.snapshots(Some(lease))?.into_iter().next();
                let incoming = match &request.lessee {
                    Some(l) => Some(l.clone()),
                    None => db.node_roles(&node)?.lessee,
                };
                if let Err(refused) =
                    check_restore(&request, snapshot.as_ref(), incoming.as_deref(), &caller)
                {
                    return Ok(Err(refused));
                }
            }
            Ok(Ok(db.create_plan(
                &node,
                &lease_id,
                &request,
                &by,
                &db::now_rfc3339(),
            )?))
        })
        .await??;
    match created {
        Ok(row) => {
            tracing::info!(node_id = %id, lease_id = %row.plan.lease_id, "turnover planned");
            Ok(Json(row.plan))
        }
        Err(running) => Err(conflict(format!(
            "node {id} is in the middle of turnover {running}; a new plan can be made when it ends"
        ))),
    }
}

async fn get_plan(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Plan>, Failure> {
    caller_for_node(&state, &headers, &id, Caller::may_view).await?;
    let node = id.clone();
    state
        .with_db("reading the plan", move |db| db.latest_plan(&node))
        .await?
        .map(|row| Json(row.plan))
        .ok_or_else(|| not_found(format!("node {id} has no turnover plan")))
}

async fn get_progress(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ProgressView>, Failure> {
    caller_for_node(&state, &headers, &id, Caller::may_view).await?;
    let node = id.clone();
    let plan = state
        .with_db("reading the plan", move |db| db.latest_plan(&node))
        .await?;
    let steps = state
        .live
        .steps(&id, plan.as_ref().map(|p| p.plan.lease_id.as_str()));
    Ok(Json(ProgressView {
        node_id: id,
        lease_id: plan.as_ref().map(|p| p.plan.lease_id.clone()),
        plan_state: plan.map(|p| p.plan.state),
        steps,
    }))
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

async fn get_console(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Json<ConsoleLog>, Failure> {
    let caller = caller_for_node(&state, &headers, &id, Caller::may_view).await?;
    let node = id.clone();
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let lessee = (caller.role == Role::Lessee)
        .then(|| caller.project.clone())
        .flatten();
    let lines = state
        .with_db("reading the console", move |db| {
            let mut lines = db.console_lines(&node, q.after.unwrap_or(0), limit)?;
            // A lessee sees the console from its own lease's plan on, not
            // what earlier leases printed.
            if let Some(lessee) = &lessee {
                let since = db
                    .latest_plan(&node)?
                    .filter(|p| p.plan.lessee.as_deref() == Some(lessee.as_str()))
                    .map_or_else(|| "~".to_owned(), |p| p.plan.created_at);
                lines.retain(|l| l.at >= since);
            }
            Ok(lines)
        })
        .await?;
    Ok(Json(ConsoleLog { node_id: id, lines }))
}

async fn get_report(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let caller = Caller::from_headers(&state, &headers).await?;
    let node = id.clone();
    let report = match (caller.role, caller.project.clone()) {
        // A lessee reads the reports of its own leases only — also after
        // the node has moved on to the next lessee, never another's.
        (Role::Lessee, Some(lessee)) => {
            state
                .with_db("reading the report", move |db| {
                    db.latest_report_for_lessee(&node, &lessee)
                })
                .await?
        }
        _ => {
            let roles = state
                .with_db("reading the node's roles", {
                    let node = node.clone();
                    move |db| db.node_roles(&node)
                })
                .await?;
            caller.may_view(&id, &roles)?;
            state
                .with_db("reading the report", move |db| db.latest_report(&node))
                .await?
        }
    };
    if report.is_none() && caller.role == Role::Lessee {
        // Same answer as for a node that is not theirs.
        let roles = state
            .with_db("reading the node's roles", {
                let node = id.clone();
                move |db| db.node_roles(&node)
            })
            .await?;
        caller.may_view(&id, &roles)?;
    }
    let Some((_, body)) = report else {
        return Err(not_found(format!("node {id} has no turnover report yet")));
    };
    // The exact bytes that were signed: any re-encoding would break them.
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn list_snapshots(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SnapshotList>, Failure> {
    let caller = Caller::from_headers(&state, &headers).await?;
    let all = state
        .with_db("listing snapshots", move |db| db.snapshots(None))
        .await?;
    let snapshots = all
        .into_iter()
        .filter(|s| {
            caller
                .may_read_snapshot(&s.lease_id, s.lessee.as_deref())
                .is_ok()
        })
        .collect();
    Ok(Json(SnapshotList { snapshots }))
}

async fn get_snapshot(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(lease): Path<String>,
) -> Result<Json<SnapshotEntry>, Failure> {
    let caller = Caller::from_headers(&state, &headers).await?;
    let l = lease.clone();
    let found = state
        .with_db("reading the snapshot", move |db| db.snapshots(Some(&l)))
        .await?
        .into_iter()
        .next();
    // Refuse before saying whether it exists.
    let lessee = found.as_ref().and_then(|s| s.lessee.clone());
    if found.is_none() && !caller.is_admin() {
        return Err(caller
            .may_read_snapshot(&lease, None)
            .err()
            .unwrap_or_else(|| not_found(format!("no snapshot for lease {lease}"))));
    }
    caller.may_read_snapshot(&lease, lessee.as_deref())?;
    found
        .map(Json)
        .ok_or_else(|| not_found(format!("no snapshot for lease {lease}")))
}

/// The session's plan row, when it has one that is still running.
async fn session_plan_row(
    state: &AppState,
    session: &Session,
) -> Result<Option<db::PlanRow>, Failure> {
    let Some(plan_id) = session.row.plan_id else {
        return Ok(None);
    };
    let row = state
        .with_db("reading the plan", move |db| db.plan(plan_id))
        .await?;
    Ok(row.filter(|r| r.plan.state == PlanState::Running))
}

async fn session_plan(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let session = Session::from_headers(&state, &headers).await?;
    let Some(row) = session_plan_row(&state, &session).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let plan_id = row.id;
    let done = state
        .with_db("reading step results", move |db| db.step_results(plan_id))
        .await?;
    // A snapshot that already succeeded for this lease (the node rebooted
    // later in the turnover) is never taken again: the disk may be half
    // erased by now, and the good copy must stay.
    let snapshot_done = done
        .iter()
        .rev()
        .find(|s| s.step == "snapshot" && s.ok)
        .and_then(|s| s.records.first().cloned());
    let restore = match &row.plan.request.restore_from {
        Some(lease) => Some(restore_source(&state, lease).await?),
        None => None,
    };
    Ok(Json(SessionPlan {
        lease_id: row.plan.lease_id,
        plan: row.plan.request,
        snapshot_done,
        restore,
    })
    .into_response())
}

/// The backup of lease `lease` as the server recorded it: the export and
/// manifest digest of its snapshot, and the CA of the plan that took it.
pub(crate) async fn restore_source(
    state: &AppState,
    lease: &str,
) -> Result<RestoreSource, Failure> {
    let l = lease.to_owned();
    let (snapshot, taken_by) = state
        .with_db("reading the snapshot to restore", move |db| {
            Ok((
                db.snapshots(Some(&l))?.into_iter().next(),
                db.plan_by_lease(&l)?,
            ))
        })
        .await?;
    let Some(snapshot) = snapshot else {
        // Checked when the plan was made; snapshots are never deleted.
        return Err(conflict(format!(
            "the plan restores the snapshot of lease {lease}, which the server no longer has"
        )));
    };
    Ok(RestoreSource {
        uri: snapshot.uri,
        manifest_sha256: snapshot.manifest_sha256,
        ca_pem: taken_by.and_then(|p| p.plan.request.snapshot_ca),
    })
}

async fn session_progress(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let session = Session::from_headers(&state, &headers).await?;
    let update: ProgressUpdate = parse_json(content_type(&headers), &body)?;
    let Some(row) = session_plan_row(&state, &session).await? else {
        return Err(conflict("this session has no running turnover"));
    };
    state
        .live
        .progress(&session.row.node_id, &row.plan.lease_id, &update);
    Ok(StatusCode::NO_CONTENT)
}

async fn session_console(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let session = Session::from_headers(&state, &headers).await?;
    let batch: ConsoleBatch = parse_json(content_type(&headers), &body)?;
    if batch.lines.len() > CONSOLE_BATCH_LINES {
        return Err(Failure::bad_request(
            Some("lines".into()),
            format!(
                "a console batch carries at most {CONSOLE_BATCH_LINES} lines (got {})",
                batch.lines.len()
            ),
        ));
    }
    let lines: Vec<String> = batch
        .lines
        .into_iter()
        .map(|mut l| {
            if l.len() > CONSOLE_LINE_BYTES {
                let mut cut = CONSOLE_LINE_BYTES;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
            }
            l
        })
        .collect();
    let node = session.row.node_id.clone();
    state
        .with_db("storing console lines", move |db| {
            db.add_console_lines(&node, &lines, &db::now_rfc3339())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn session_step(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    let session = Session::from_headers(&state, &headers).await?;
    let step: StepResult = parse_json(content_type(&headers), &body)?;
    let Some(row) = session_plan_row(&state, &session).await? else {
        return Err(conflict("this session has no running turnover"));
    };
    state
        .live
        .finish(&session.row.node_id, &row.plan.lease_id, &step);
    state
        .metrics
        .step(&step.step, step.ok, step.duration_ms, step.bytes);
    let plan_id = row.id;
    let stored = step.clone();
    state
        .with_db("storing the step result", move |db| {
            db.add_step_result(plan_id, &stored)
        })
        .await?;
    if step.step == "snapshot" && step.ok {
        remember_snapshot(&state, &row, &step).await?;
    }
    if !step.ok {
        let failure = format!(
            "{} failed: {}",
            step.step,
            step.error.as_deref().unwrap_or("no reason given")
        );
        crate::turnover::fail_plan(&state, &row, &failure, None).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Files a successful snapshot under the lessee whose disk it holds.
async fn remember_snapshot(
    state: &AppState,
    row: &db::PlanRow,
    step: &StepResult,
) -> Result<(), Failure> {
    let Some(record) = step.records.first() else {
        return Err(Failure::bad_request(
            Some("records".into()),
            "a successful snapshot step must carry its SnapshotRecord",
        ));
    };
    let record: warden_protocol::snapshot::SnapshotRecord =
        serde_json::from_str(record).map_err(|e| {
            Failure::bad_request(
                Some("records.0".into()),
                format!("records.0 is not a SnapshotRecord: {e}"),
            )
        })?;
    let entry = SnapshotEntry {
        lease_id: row.plan.lease_id.clone(),
        node_id: row.plan.node_id.clone(),
        lessee: row.plan.previous_lessee.clone(),
        uri: record.uri.clone(),
        manifest_sha256: record.manifest_sha256.clone(),
        created_at: db::now_rfc3339(),
        record,
    };
    state
        .with_db("storing the snapshot", move |db| db.put_snapshot(&entry))
        .await
}

/// Live step progress, in memory: progress is for watching, the step
/// results in the database are the record.
#[derive(Debug, Default)]
pub struct Live {
    nodes: Mutex<HashMap<String, NodeLive>>,
}

#[derive(Debug)]
struct NodeLive {
    lease_id: String,
    steps: Vec<StepLive>,
}

#[derive(Debug)]
struct StepLive {
    view: StepProgress,
    started: Instant,
}

impl Live {
    fn with_node<T>(&self, node_id: &str, lease_id: &str, f: impl FnOnce(&mut NodeLive) -> T) -> T {
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let node = nodes.entry(node_id.to_owned()).or_insert_with(|| NodeLive {
            lease_id: lease_id.to_owned(),
            steps: Vec::new(),
        });
        if node.lease_id != lease_id {
            node.lease_id = lease_id.to_owned();
            node.steps.clear();
        }
        f(node)
    }

    fn step<'a>(node: &'a mut NodeLive, step: &str) -> &'a mut StepLive {
        if let Some(i) = node.steps.iter().position(|s| s.view.step == step) {
            return &mut node.steps[i];
        }
        let now = db::now_rfc3339();
        node.steps.push(StepLive {
            view: StepProgress {
                step: step.to_owned(),
                state: "running".into(),
                done: 0,
                total: None,
                rate: 0,
                eta_seconds: None,
                started_at: now.clone(),
                updated_at: now,
            },
            started: Instant::now(),
        });
        let last = node.steps.len() - 1;
        &mut node.steps[last]
    }

    /// A progress update from the agent.
    pub fn progress(&self, node_id: &str, lease_id: &str, update: &ProgressUpdate) {
        self.with_node(node_id, lease_id, |node| {
            let s = Self::step(node, &update.step);
            s.view.state = "running".into();
            s.view.done = update.done;
            s.view.total = update.total;
            let ms = u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            // Whole bytes per second: the view carries no floats.
            if let Some(rate) = update.done.saturating_mul(1000).checked_div(ms) {
                s.view.rate = rate;
            }
            s.view.eta_seconds = match (update.total, s.view.rate) {
                (Some(total), rate) if rate > 0 => Some(total.saturating_sub(update.done) / rate),
                _ => None,
            };
            s.view.updated_at = db::now_rfc3339();
        });
    }

    /// A step ended.
    pub fn finish(&self, node_id: &str, lease_id: &str, result: &StepResult) {
        self.with_node(node_id, lease_id, |node| {
            let s = Self::step(node, &result.step);
            s.view.state = if result.ok { "ok" } else { "failed" }.into();
            s.view.done = result.bytes.max(s.view.done);
            if result.ok {
                s.view.total = Some(s.view.done);
            }
            s.view.eta_seconds = None;
            if let Some(rate) = result
                .bytes
                .saturating_mul(1000)
                .checked_div(result.duration_ms)
            {
                s.view.rate = rate;
            }
            s.view.updated_at = db::now_rfc3339();
        });
    }

    /// The steps of `lease_id` on a node (none when the live view is of
    /// another lease or was lost with a server restart).
    pub fn steps(&self, node_id: &str, lease_id: Option<&str>) -> Vec<StepProgress> {
        let nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (nodes.get(node_id), lease_id) {
            (Some(node), Some(lease)) if node.lease_id == lease => {
                node.steps.iter().map(|s| s.view.clone()).collect()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_protocol::turnover::Handoff;
    use warden_protocol::wipe::Method;

    fn plan() -> PlanRequest {
        PlanRequest {
            image: Some("http://10.0.2.2:8080/tenant.qcow2".into()),
            checksum: Some(format!("sha256:{}", "ab".repeat(32))),
            snapshot_to: Some("nbd://10.0.2.2:10809/old".into()),
            wipe: Method::Auto,
            handoff: Handoff::Kexec,
            lessee: Some("lab-b".into()),
            target: Some("nvme0n1".into()),
            image_ca: None,
            snapshot_ca: None,
            restore_from: None,
        }
    }

    /// A real CA certificate, as an operator's `ca.pem` holds it.
    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_goes_only_where_tls_is_used_and_must_parse() {
        let ca = ca_pem();
        let pin = format!("sha256:{}", "ab".repeat(32));
        let tls = || PlanRequest {
            image: Some("https://images.example/tenant.raw.zst".into()),
            snapshot_to: Some("nbds://10.0.2.2:10809/old".into()),
            snapshot_ca: Some(ca.clone()),
            ..plan()
        };
        let failure = |p: PlanRequest| {
            let f = check_plan(&p).unwrap_err();
            (f.body.field.unwrap(), f.body.message)
        };
        assert!(check_plan(&tls()).is_ok());
        for image_ca in [pin.clone(), ca.clone()] {
            assert!(check_plan(&PlanRequest {
                image_ca: Some(image_ca),
                ..tls()
            })
            .is_ok());
        }
        // A CA for plaintext is a mistake, whichever field.
        let (field, msg) = failure(PlanRequest {
            image_ca: Some(pin.clone()),
            ..plan()
        });
        assert_eq!(field, "image_ca");
        assert!(msg.contains("plain http://"), "{msg}");
        let (field, msg) = failure(PlanRequest {
            snapshot_ca: Some(ca.clone()),
            ..plan()
        });
        assert_eq!(field, "snapshot_ca");
        assert!(msg.contains("plain nbd://"), "{msg}");
        let (field, _) = failure(PlanRequest {
            snapshot_to: None,
            ..tls()
        });
        assert_eq!(field, "snapshot_ca");
        // nbds:// without a CA: the agent would have nothing to trust.
        let (field, msg) = failure(PlanRequest {
            snapshot_ca: None,
            ..tls()
        });
        assert_eq!(field, "snapshot_ca");
        assert!(msg.contains("needs snapshot_ca"), "{msg}");
        // Neither a pin nor PEM; a short pin; a key; PEM that is no X.509.
        let bad_pem = ca.replace("MII", "MIA");
        for (image_ca, says) in [
            ("/etc/ssl/ca.pem", "is not a pin"),
            ("sha256:abcd", "is not a pin"),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "PRIVATE KEY",
            ),
            (bad_pem.as_str(), "certificate 1"),
        ] {
            let (field, msg) = failure(PlanRequest {
                image_ca: Some(image_ca.into()),
                ..tls()
            });
            assert_eq!(field, "image_ca");
            assert!(msg.contains(says), "{image_ca:?}: {msg}");
        }
        let (field, msg) = failure(PlanRequest {
            snapshot_ca: Some("not pem".into()),
            ..tls()
        });
        assert_eq!(field, "snapshot_ca");
        assert!(msg.contains("is not PEM"), "{msg}");
    }

    #[test]
    fn plans_are_checked_field_by_field() {
        assert!(check_plan(&plan()).is_ok());
        let field = |p: PlanRequest| check_plan(&p).unwrap_err().body.field.unwrap();
        assert_eq!(
            field(PlanRequest {
                image: Some("ftp://x/y".into()),
                ..plan()
            }),
            "image"
        );
        assert_eq!(
            field(PlanRequest {
                checksum: Some("md5:00".into()),
                ..plan()
            }),
            "checksum"
        );
        assert_eq!(
            field(PlanRequest {
                checksum: Some("sha256:abc".into()),
                ..plan()
            }),
            "checksum"
        );
        assert_eq!(
            field(PlanRequest {
                snapshot_to: Some("http://x".into()),
                ..plan()
            }),
            "snapshot_to"
        );
        assert_eq!(
            field(PlanRequest {
                lessee: Some("a b".into()),
                ..plan()
            }),
            "lessee"
        );
        assert_eq!(
            field(PlanRequest {
                target: Some("../sda".into()),
                ..plan()
            }),
            "target"
        );
        // A bare 64-hex-digit checksum means sha256.
        assert!(check_plan(&PlanRequest {
            checksum: Some("cd".repeat(32)),
            ..plan()
        })
        .is_ok());
    }

    fn restore_plan(lessee: Option<&str>) -> PlanRequest {
        PlanRequest {
            image: None,
            checksum: None,
            snapshot_to: None,
            lessee: lessee.map(str::to_owned),
            restore_from: Some("lease-00aa".into()),
            ..plan()
        }
    }

    fn snapshot_of(lessee: Option<&str>) -> SnapshotEntry {
        SnapshotEntry {
            lease_id: "lease-00aa".into(),
            node_id: "n".into(),
            lessee: lessee.map(str::to_owned),
            uri: "nbd://10.0.2.2:10809/".into(),
            manifest_sha256: "cd".repeat(32),
            created_at: "2026-01-01T00:00:00Z".into(),
            record: serde_json::from_value(serde_json::json!({
                "uri": "nbd://10.0.2.2:10809/", "source": "/dev/nvme0n1",
                "source_identity": "block:/dev/nvme0n1", "disk_bytes": 1024,
                "chunk_size": 65536, "chunks": 1, "zero_chunks": 0, "changed_chunks": 1,
                "bytes_sent": 1024, "bytes_zeroed": 0, "zero_bytes_skipped": 0,
                "manifest_sha256": "cd".repeat(32), "manifest_bytes": 100,
                "previous_manifest_sha256": null, "incremental": false, "verified": false,
                "reconnects": 0, "retries": 0, "connections": 1, "direct_io": true,
                "verify_ms": 0, "elapsed_ms": 1
            }))
            .unwrap(),
        }
    }

    #[test]
    fn a_restore_goes_only_to_the_lessee_whose_data_it_is() {
        let owner = Caller {
            role: Role::Owner,
            project: Some("uni-a".into()),
        };
        let admin = Caller {
            role: Role::Admin,
            project: None,
        };
        let p = restore_plan(Some("lab-a"));
        assert!(check_plan(&p).is_ok());
        let lab_a = snapshot_of(Some("lab-a"));
        assert!(check_restore(&p, Some(&lab_a), Some("lab-a"), &owner).is_ok());
        // Tenant A's disk to tenant B: 403 naming both.
        let f = check_restore(&p, Some(&lab_a), Some("lab-b"), &owner).unwrap_err();
        assert_eq!(f.status, StatusCode::FORBIDDEN);
        assert!(
            f.body.message.contains("lab-a") && f.body.message.contains("lab-b"),
            "{}",
            f.body.message
        );
        let f = check_restore(&p, Some(&lab_a), None, &admin).unwrap_err();
        assert_eq!(f.status, StatusCode::FORBIDDEN, "not even an admin");
        // A snapshot of nobody's: admins only.
        let nobody = snapshot_of(None);
        assert!(check_restore(&p, Some(&nobody), Some("lab-a"), &admin).is_ok());
        let f = check_restore(&p, Some(&nobody), Some("lab-a"), &owner).unwrap_err();
        assert_eq!(f.status, StatusCode::FORBIDDEN);
        // Unknown lease: 404 naming it.
        let f = check_restore(&p, None, Some("lab-a"), &owner).unwrap_err();
        assert_eq!(f.status, StatusCode::NOT_FOUND);
        assert!(f.body.message.contains("lease-00aa"), "{}", f.body.message);
        // Snapshotting over the very backup first.
        let over = PlanRequest {
            snapshot_to: Some("nbd://10.0.2.2:10809/".into()),
            ..restore_plan(Some("lab-a"))
        };
        let f = check_restore(&over, Some(&lab_a), Some("lab-a"), &owner).unwrap_err();
        assert_eq!(f.body.field.as_deref(), Some("snapshot_to"));
        // Field checks: image fields with a restore, a bad lease id.
        let field = |p: PlanRequest| check_plan(&p).unwrap_err().body.field.unwrap();
        assert_eq!(
            field(PlanRequest {
                restore_from: Some("lease-00aa".into()),
                ..plan()
            }),
            "restore_from"
        );
        assert_eq!(
            field(PlanRequest {
                checksum: Some("ab".repeat(32)),
                ..restore_plan(None)
            }),
            "checksum"
        );
        assert_eq!(
            field(PlanRequest {
                restore_from: Some("../x".into()),
                ..restore_plan(None)
            }),
            "restore_from"
        );
        assert_eq!(
            field(PlanRequest {
                restore_from: None,
                ..restore_plan(None)
            }),
            "image"
        );
    }

    #[test]
    fn live_progress_has_rate_eta_and_end_state() {
        let live = Live::default();
        let update = ProgressUpdate {
            step: "image".into(),
            done: 0,
            total: Some(100),
        };
        live.progress("n", "lease-1", &update);
        let steps = live.steps("n", Some("lease-1"));
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].state, "running");
        assert_eq!(steps[0].total, Some(100));
        live.finish(
            "n",
            "lease-1",
            &StepResult {
                step: "image".into(),
                ok: true,
                error: None,
                started_at: "t".into(),
                finished_at: "t".into(),
                duration_ms: 2000,
                bytes: 100,
                records: vec![],
            },
        );
        let steps = live.steps("n", Some("lease-1"));
        assert_eq!(
            (steps[0].state.as_str(), steps[0].done, steps[0].rate),
            ("ok", 100, 50)
        );
        // Another lease's view is not this one's.
        assert!(live.steps("n", Some("lease-2")).is_empty());
    }
}
