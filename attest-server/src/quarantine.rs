//! Quarantine: a node whose genuine evidence no longer matches what its
//! owner approved is held until an owner or admin releases it.
//!
//! This module owns the rule that quarantines a node (which verdicts do,
//! [`quarantines`]), what a quarantined node's OK boot verdict says, and
//! `POST /v1/nodes/{id}/release`. It must never quarantine on a verdict
//! anyone could provoke without the node's TPM (unknown node, bad nonce,
//! forged or unsigned quote — `POST /v1/attest` needs no token), never on
//! a node with no policy (onboarding), and never approve anything on
//! release: the next boot is attested as usual.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use warden_protocol::attest::{codes, Reason, Status, Verdict};
use warden_protocol::nodes::{Quarantine, QuarantineRelease};

use crate::api::{AppState, Failure};
use crate::auth::Caller;
use crate::turnover_api::caller_for_node;

/// Reason codes that quarantine a node with a policy. Each is raised only
/// after the quote verified against the node's bound AK and a fresh nonce,
/// so only the node's own TPM can provoke it: its firmware, boot chain,
/// event log or the agent's measured steps do not match what was approved.
pub const QUARANTINE_CODES: &[&str] = &[
    codes::POLICY_PCR,
    codes::POLICY_EVENT,
    codes::LOG_MISMATCH,
    codes::EVENT_LOG_MISSING,
    codes::EVENT_LOG_MALFORMED,
    codes::AGENT_LOG_MALFORMED,
    codes::AGENT_RECORD_MISMATCH,
    codes::AGENT_LOG_ORDER,
    codes::AGENT_LOG_STEPS,
    codes::AGENT_STEP_RESULT,
    codes::AGENT_LOG_REPLAY,
];

/// The quarantine `verdict` puts its node in, if it does: a failed verdict
/// (boot or handoff phase) of a node with a policy, with at least one
/// reason in [`QUARANTINE_CODES`].
pub fn quarantines(verdict: &Verdict) -> Option<Quarantine> {
    if verdict.status != Status::Failed || verdict.policy.is_none() {
        return None;
    }
    if !verdict
        .reasons
        .iter()
        .any(|r| QUARANTINE_CODES.contains(&r.code.as_str()))
    {
        return None;
    }
    let reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.message.as_str()).collect();
    Some(Quarantine {
        since: verdict.time.clone(),
        attestation_id: verdict.attestation_id,
        reason: reasons.join("; "),
    })
}

/// Quarantines the verdict's node when [`quarantines`] says so.
pub async fn on_failed_verdict(state: &AppState, verdict: &Verdict) -> Result<(), Failure> {
    let Some(quarantine) = quarantines(verdict) else {
        return Ok(());
    };
    let node = verdict.node_id.clone();
    let q = quarantine.clone();
    let new = state
        .with_db("quarantining the node", move |db| {
            db.quarantine_node(&node, &q)
        })
        .await?;
    if new {
        tracing::warn!(
            node_id = %verdict.node_id,
            attestation_id = verdict.attestation_id,
            reason = %quarantine.reason,
            "node quarantined"
        );
    }
    Ok(())
}

/// The node's open quarantine, if any.
pub async fn of(state: &AppState, node_id: &str) -> Result<Option<Quarantine>, Failure> {
    let node = node_id.to_owned();
    state
        .with_db("reading the quarantine", move |db| db.quarantine_of(&node))
        .await
}

/// The note (in [`Verdict::notes`], code [`codes::QUARANTINED`]) an OK
/// boot verdict of a quarantined node carries instead of a session. Not a
/// reason: the evidence is good.
pub fn note(node_id: &str, q: &Quarantine) -> Reason {
    Reason::new(
        codes::QUARANTINED,
        format!(
            "node {node_id} is quarantined since {} (attestation {}: {}): this boot's evidence is good, but no session or plan is given until it is released with `wardenctl node release {node_id}`",
            q.since, q.attestation_id, q.reason
        ),
    )
}

/// The 409 a plan for a quarantined node gets.
pub fn plan_refused(node_id: &str, q: &Quarantine) -> Failure {
    Failure::new(
        StatusCode::CONFLICT,
        "quarantined",
        None,
        format!(
            "node {node_id} is quarantined since {} (attestation {}: {}); find out why, then release it with `wardenctl node release {node_id}` (POST /v1/nodes/{node_id}/release) before planning a turnover",
            q.since, q.attestation_id, q.reason
        ),
    )
}

/// The routes of this module, merged into [`crate::api::router`].
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/nodes/{id}/release", post(release))
}

async fn release(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<QuarantineRelease>, Failure> {
    let caller = caller_for_node(&state, &headers, &id, Caller::may_manage).await?;
    let by = match &caller.project {
        Some(p) => format!("{}:{p}", caller.role.name()),
        None => caller.role.name().to_owned(),
    };
    let node = id.clone();
    let released = state
        .with_db("releasing the quarantine", move |db| {
            db.release_quarantine(&node, &by, &crate::db::now_rfc3339())
        })
        .await?;
    let Some(r) = released else {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "not_quarantined",
            None,
            format!("node {id} is not quarantined: there is nothing to release"),
        ));
    };
    tracing::info!(
        node_id = %id,
        released_by = %r.released_by,
        attestation_id = r.quarantine.attestation_id,
        "quarantine released"
    );
    Ok(Json(QuarantineRelease {
        node_id: id,
        released: r.quarantine,
        released_at: r.released_at,
        released_by: r.released_by,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_protocol::attest::{Phase, PolicyRef};

    fn verdict(status: Status, policy: bool, codes: &[&str]) -> Verdict {
        Verdict {
            attestation_id: 7,
            node_id: "n".into(),
            status,
            phase: Phase::Boot,
            policy: policy.then(|| PolicyRef {
                name: "fw".into(),
                version: 2,
            }),
            reasons: codes
                .iter()
                .map(|c| Reason::new(c, format!("{c} happened")))
                .collect(),
            time: "2026-01-01T00:00:00Z".into(),
            session: None,
            notes: Vec::new(),
        }
    }

    #[test]
    fn only_evidence_failures_of_a_node_with_a_policy_quarantine() {
        let q = quarantines(&verdict(
            Status::Failed,
            true,
            &[codes::POLICY_EVENT, codes::POLICY_PCR],
        ))
        .unwrap();
        assert_eq!(q.attestation_id, 7);
        assert_eq!(q.since, "2026-01-01T00:00:00Z");
        assert_eq!(q.reason, "policy-event happened; policy-pcr happened");
        assert!(quarantines(&verdict(Status::Failed, true, &[codes::AGENT_LOG_STEPS])).is_some());
        // Onboarding: no policy yet.
        assert!(quarantines(&verdict(Status::Failed, false, &[codes::NO_POLICY])).is_none());
        assert!(quarantines(&verdict(Status::Failed, false, &[codes::POLICY_PCR])).is_none());
        // Anyone can send these without the node's TPM.
        for code in [
            codes::NONCE_REPLAYED,
            codes::NONCE_UNKNOWN,
            codes::SIGNATURE,
            codes::NODE_UNKNOWN,
            codes::AK_UNKNOWN,
            codes::AGENT_LOG_AT_BOOT,
            codes::PCR_SELECTION,
        ] {
            assert!(
                quarantines(&verdict(Status::Failed, true, &[code])).is_none(),
                "{code}"
            );
        }
        assert!(quarantines(&verdict(Status::Ok, true, &[])).is_none());
    }

    #[test]
    fn note_and_refusal_name_the_reason_and_the_way_out() {
        let q = Quarantine {
            since: "2026-01-01T00:00:00Z".into(),
            attestation_id: 7,
            reason: "PCR7: SecureBoot changed from 0 to 1".into(),
        };
        let note = note("n1", &q);
        assert_eq!(note.code, codes::QUARANTINED);
        for want in [
            "2026-01-01T00:00:00Z",
            "SecureBoot",
            "wardenctl node release n1",
        ] {
            assert!(note.message.contains(want), "{}", note.message);
        }
        let refusal = plan_refused("n1", &q);
        assert_eq!(refusal.status, StatusCode::CONFLICT);
        assert_eq!(refusal.body.error, "quarantined");
        for want in ["SecureBoot", "wardenctl node release n1", "attestation 7"] {
            assert!(
                refusal.body.message.contains(want),
                "{}",
                refusal.body.message
            );
        }
    }
}
