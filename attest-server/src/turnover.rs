//! The server's side of one turnover, driven by verdicts: a good boot
//! verdict earns the agent a session (and starts the node's plan); the
//! final (`handoff`-phase) verdict ends the plan, and either outcome gets a
//! signed report. A quarantined node ([`crate::quarantine`]) earns no
//! session, however good its evidence.
//!
//! This module owns the plan's end: it must never mark a plan done without
//! an OK final verdict whose measured log matched the plan, and never sign
//! a report whose step records did not come from that verified log.

use warden_protocol::agentlog::{Expectation, VerifiedLog};
use warden_protocol::attest::{AttestRequest, Phase, Status, Verdict};
use warden_protocol::report::{
    ErasedDisk, HandoffSummary, ImageSummary, Outcome, Report, RestoreSummary, SnapshotSummary,
    StepTiming, VerdictSummary, REPORT_FORMAT,
};

use crate::api::{AppState, Failure};
use crate::auth;
use crate::db::{self, PlanRow, SessionRow};

/// How long an agent session lasts: long enough for a slow wipe of large
/// disks, short enough that a leaked token soon stops working.
pub const SESSION_SECONDS: i64 = 24 * 3600;

/// Called with every stored verdict. A good boot verdict gets a session
/// token (set in `verdict.session`) and starts the node's plan — unless
/// the node is quarantined: then the verdict stays OK but gets a
/// [`crate::quarantine::note`] instead. A verdict that fails on the
/// node's evidence quarantines it ([`crate::quarantine::quarantines`]).
pub async fn on_verdict(
    state: &AppState,
    request: &AttestRequest,
    verdict: &mut Verdict,
    agent_log: Option<&VerifiedLog>,
) -> Result<(), Failure> {
    if verdict.status != Status::Ok {
        // Quarantine first: a failed final attestation both fails the plan
        // and holds the node, and the hold must not depend on the report
        // being signed and stored.
        crate::quarantine::on_failed_verdict(state, verdict).await?;
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
        Phase::Boot => {
            if let Some(q) = crate::quarantine::of(state, &verdict.node_id).await? {
                tracing::warn!(node_id = %verdict.node_id, attestation_id = verdict.attestation_id, since = %q.since, "boot verdict OK but the node is quarantined: no session");
                verdict
                    .notes
                    .push(crate::quarantine::note(&verdict.node_id, &q));
                return Ok(());
            }
            start_session(state, request, verdict).await
        }
        Phase::Handoff => finish_turnover(state, request, verdict, agent_log).await,
    }
}

/// What a final attestation's measured log must show: the node's running
/// plan, for as many disks as its last hello listed — for a restore plan,
/// the restore of the manifest the server recorded for that snapshot.
/// `None` for a boot attestation or a node without a running plan.
pub async fn expectation(
    state: &AppState,
    request: &AttestRequest,
) -> Result<Option<Expectation>, Failure> {
    if request.phase != Phase::Handoff {
        return Ok(None);
    }
    let node = request.node_id.clone();
    let found = state
        .with_db("reading the plan", move |db| {
            let Some(plan) = db.active_plan(&node)? else {
                return Ok(None);
            };
            let disks = db
                .list_nodes()?
                .nodes
                .into_iter()
                .find(|n| n.node_id == node)
                .map(|n| {
                    // Host-mode test nodes erase loop devices only; a real
                    // node never lists one.
                    let loops = n
                        .inventory
                        .disks
                        .iter()
                        .filter(|d| d.transport == "loop")
                        .count();
                    if loops > 0 {
                        loops
                    } else {
                        n.inventory.disks.len()
                    }
                })
                .unwrap_or(1);
            // A restore plan's manifest is the snapshot's, as recorded; a
            // snapshot gone missing leaves from_plan's, which nothing
            // matches (fails closed).
            let manifest = match &plan.plan.request.restore_from {
                Some(lease) => db
                    .snapshots(Some(lease))?
                    .into_iter()
                    .next()
                    .map(|s| s.manifest_sha256),
                None => None,
            };
            Ok(Some((plan, disks, manifest)))
        })
        .await?;
    Ok(found.map(|(plan, disks, manifest)| match manifest {
        Some(m) => Expectation::from_restore_plan(&plan.plan.request, disks, &m),
        None => Expectation::from_plan(&plan.plan.request, disks),
    }))
}

/// The final verdict was OK: the plan is done, and the report is signed
/// from the verified measured log.
async fn finish_turnover(
    state: &AppState,
    request: &AttestRequest,
    verdict: &Verdict,
    agent_log: Option<&VerifiedLog>,
) -> Result<(), Failure> {
    let node = verdict.node_id.clone();
    let Some(row) = state
        .with_db("reading the plan", move |db| db.active_plan(&node))
        .await?
    else {
        return Ok(());
    };
    let Some(log) = agent_log else {
        // verify() checks the log whenever a plan runs; an OK verdict
        // without one cannot end a turnover.
        return fail_plan(
            state,
            &row,
            "final attestation carried no verified measured log",
            Some(verdict.attestation_id),
        )
        .await;
    };
    let mut report = base_report(state, &row).await?;
    report.outcome = Outcome::Ok;
    report.final_verdict = Some(VerdictSummary::from(verdict));
    report.disks = log.disks.iter().map(ErasedDisk::from).collect();
    report.image = log.image.as_ref().map(ImageSummary::from);
    report.restore = log.restore.as_ref().map(RestoreSummary::from);
    report.snapshot = log.snapshot.as_ref().map(SnapshotSummary::from);
    report.handoff = Some(HandoffSummary::from_agent_log(
        row.plan.request.handoff,
        &log.events,
    ));
    report.agent_log = log.events.clone();
    report.pcrs = request.pcrs.values.clone();
    let id = row.id;
    let final_id = verdict.attestation_id;
    let ended = state
        .with_db("ending the plan", move |db| {
            db.finish_plan(id, None, Some(final_id), &db::now_rfc3339())
        })
        .await?;
    if ended {
        store_report(state, &row, report).await?;
        state.metrics.turnover(true);
        tracing::info!(node_id = %row.plan.node_id, lease_id = %row.plan.lease_id, "turnover done; report signed");
    }
    Ok(())
}

/// The parts of a report every outcome has: who, the boot verdict, the
/// steps' times.
async fn base_report(state: &AppState, row: &PlanRow) -> Result<Report, Failure> {
    let (node, plan_id, boot_id) = (row.plan.node_id.clone(), row.id, row.boot_attestation_id);
    let (roles, steps, boot) = state
        .with_db("reading the turnover", move |db| {
            let roles = db.node_roles(&node)?;
            let steps = db.step_results(plan_id)?;
            let boot = match boot_id {
                Some(id) => db
                    .list_attestations(Some(&node), 10_000)?
                    .into_iter()
                    .find(|a| a.verdict.attestation_id == id)
                    .map(|a| a.verdict),
                None => None,
            };
            Ok((roles, steps, boot))
        })
        .await?;
    let now = db::now_rfc3339();
    let boot_verdict = boot
        .as_ref()
        .map(VerdictSummary::from)
        .unwrap_or(VerdictSummary {
            attestation_id: 0,
            status: Status::Failed,
            policy: None,
            time: String::new(),
            reasons: vec!["no boot attestation was recorded for this turnover".into()],
        });
    Ok(Report {
        format: REPORT_FORMAT,
        node_id: row.plan.node_id.clone(),
        lease_id: row.plan.lease_id.clone(),
        lessee: row.plan.lessee.clone(),
        owner: roles.owner,
        outcome: Outcome::Failed,
        failure: None,
        boot_verdict,
        final_verdict: None,
        disks: Vec::new(),
        image: None,
        restore: None,
        snapshot: None,
        handoff: None,
        agent_log: Vec::new(),
        pcrs: Default::default(),
        steps: steps.iter().map(StepTiming::from).collect(),
        started_at: row
            .plan
            .started_at
            .clone()
            .unwrap_or_else(|| row.plan.created_at.clone()),
        finished_at: now.clone(),
        signed_at: now,
    })
}

/// Signs `report` and stores it as the plan's report (the first stands).
async fn store_report(state: &AppState, row: &PlanRow, report: Report) -> Result<(), Failure> {
    let bytes = state.report_key.sign(report).to_file_bytes();
    let (id, node, lease) = (row.id, row.plan.node_id.clone(), row.plan.lease_id.clone());
    state
        .with_db("storing the report", move |db| {
            db.put_report(id, &node, &lease, &bytes, &db::now_rfc3339())
        })
        .await
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
        // Step records the agent posted were never quoted: a failure
        // report names what failed and when, and vouches for nothing else.
        let mut report = base_report(state, row).await?;
        report.failure = Some(failure.to_owned());
        if let Some(id) = final_attestation_id {
            let node = row.plan.node_id.clone();
            report.final_verdict = state
                .with_db("reading the final verdict", move |db| {
                    db.list_attestations(Some(&node), 10)
                })
                .await?
                .into_iter()
                .find(|a| a.verdict.attestation_id == id)
                .map(|a| VerdictSummary::from(&a.verdict));
        }
        store_report(state, row, report).await?;
        state.metrics.turnover(false);
        tracing::warn!(node_id = %row.plan.node_id, lease_id = %row.plan.lease_id, failure, "turnover failed");
    }
    Ok(())
}
