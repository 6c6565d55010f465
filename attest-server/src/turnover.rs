//! The server's side of one turnover, driven by verdicts: a good boot
//! verdict earns the agent a session (and starts the node's plan); the
//! final (`handoff`-phase) verdict ends the plan, and either outcome gets a
//! signed report.
//!
//! This module owns the plan's end: it must never mark a plan done without
//! an OK final verdict whose measured log matched the plan, and never sign
//! a report whose step records did not come from that verified log.

use warden_protocol::attest::{AttestRequest, Phase, Status, Verdict};

use crate::api::{AppState, Failure};
use crate::auth;
use crate::db::{self, PlanRow, SessionRow};

/// How long an agent session lasts: long enough for a slow wipe of large
/// disks, short enough that a leaked token soon stops working.
pub const SESSION_SECONDS: i64 = 24 * 3600;

/// Called with every stored verdict. A good boot verdict gets a session
/// token (set in `verdict.session`) and starts the node's plan.
pub async fn on_verdict(
    state: &AppState,
    request: &AttestRequest,
    verdict: &mut Verdict,
) -> Result<(), Failure> {
    if verdict.status != Status::Ok {
        if verdict.phase == Phase::Handoff {
            let node = verdict.node_id.clone();
            let plan = state
                .with_db("reading the plan", move |db| db.active_plan(&node))
                .await?;
            if let Some(row) = plan {
                let reasons: Vec<&str> =
                    verdict.reasons.iter().map(|r| r.message.as_str()).collect();
                let failure = format!("final attestation failed: {}", reasons.join("; "));
                fail_plan(state, &row, &failure, Some(verdict.attestation_id)).await?;
            }
        }
        return Ok(());
    }
    match verdict.phase {
        Phase::Boot => start_session(state, request, verdict).await,
        Phase::Handoff => Ok(()),
    }
}

async fn start_session(
    state: &AppState,
    request: &AttestRequest,
    verdict: &mut Verdict,
) -> Result<(), Failure> {
    let node = verdict.node_id.clone();
    let plan = state
        .with_db("reading the plan", move |db| db.active_plan(&node))
        .await?;
    let secret = auth::new_secret()?;
    let digest = auth::token_digest(&secret);
    let row = SessionRow {
        node_id: verdict.node_id.clone(),
        plan_id: plan.as_ref().map(|p| p.id),
        attestation_id: verdict.attestation_id,
        ak_name: request.ak_name.clone(),
        expires_at: auth::unix_now().saturating_add(SESSION_SECONDS),
    };
    let attestation_id = verdict.attestation_id;
    let plan_id = plan.as_ref().map(|p| p.id);
    state
        .with_db("starting the session", move |db| {
            let now = db::now_rfc3339();
            db.create_session(&digest, &row, &now)?;
            if let Some(id) = plan_id {
                db.start_plan(id, attestation_id, &now)?;
            }
            Ok(())
        })
        .await?;
    if let Some(p) = &plan {
        tracing::info!(node_id = %verdict.node_id, lease_id = %p.plan.lease_id, "turnover started");
    }
    verdict.session = Some(secret);
    Ok(())
}

/// Ends a running plan as failed, with `failure` as the reason. The first
/// outcome stands: a plan that already ended is left as it is.
pub async fn fail_plan(
    state: &AppState,
    row: &PlanRow,
    failure: &str,
    final_attestation_id: Option<i64>,
) -> Result<(), Failure> {
    let id = row.id;
    let reason = failure.to_owned();
    let ended = state
        .with_db("ending the plan", move |db| {
            db.finish_plan(id, Some(&reason), final_attestation_id, &db::now_rfc3339())
        })
        .await?;
    if ended {
        state.metrics.turnover(false);
        tracing::warn!(node_id = %row.plan.node_id, lease_id = %row.plan.lease_id, failure, "turnover failed");
    }
    Ok(())
}
