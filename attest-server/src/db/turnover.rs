//! Records of the lease turnover: operator tokens (only their SHA-256),
//! node owners and lessees, policy owners, plans and their states, agent
//! sessions, step results, console lines, signed reports and snapshots.
//!
//! A plan moves pending → running → done | failed, or pending → superseded
//! when a newer plan replaces it; this module makes those moves in one
//! transaction each and never moves a plan backwards. It stores what the
//! API layer decided; it never decides who may see what.

use rusqlite::{params, OptionalExtension, Row};
use warden_protocol::snapshot::SnapshotRecord;
use warden_protocol::turnover::{
    ConsoleLine, Plan, PlanRequest, PlanState, Role, SnapshotEntry, StepResult,
};

use super::{Db, DbError};

/// Console lines kept per node; older ones are dropped as new ones come.
pub const CONSOLE_KEEP: i64 = 20_000;

/// An operator token's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub role: Role,
    pub project: Option<String>,
}

/// Who owns a node and who leases it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRoles {
    pub owner: Option<String>,
    pub lessee: Option<String>,
}

/// A stored plan.
#[derive(Debug, Clone)]
pub struct PlanRow {
    pub id: i64,
    pub plan: Plan,
    pub created_by: String,
    pub boot_attestation_id: Option<i64>,
    pub final_attestation_id: Option<i64>,
}

/// A stored agent session.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub node_id: String,
    pub plan_id: Option<i64>,
    pub attestation_id: i64,
    pub ak_name: String,
    /// Unix seconds.
    pub expires_at: i64,
}

fn role_of(s: &str) -> Option<Role> {
    match s {
        "admin" => Some(Role::Admin),
        "owner" => Some(Role::Owner),
        "lessee" => Some(Role::Lessee),
        _ => None,
    }
}

fn plan_state_of(s: &str) -> PlanState {
    match s {
        "pending" => PlanState::Pending,
        "running" => PlanState::Running,
        "done" => PlanState::Done,
        "superseded" => PlanState::Superseded,
        _ => PlanState::Failed,
    }
}

const PLAN_COLUMNS: &str = "id, lease_id, node_id, state, request_json, lessee, previous_lessee, \
     created_by, created_at, started_at, finished_at, failure, boot_attestation_id, \
     final_attestation_id";

/// A row of [`PLAN_COLUMNS`]; the request JSON is decoded by the caller.
struct RawPlan {
    id: i64,
    lease_id: String,
    node_id: String,
    state: String,
    request_json: String,
    lessee: Option<String>,
    previous_lessee: Option<String>,
    created_by: String,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    failure: Option<String>,
    boot_attestation_id: Option<i64>,
    final_attestation_id: Option<i64>,
}

fn raw_plan(row: &Row<'_>) -> rusqlite::Result<RawPlan> {
    Ok(RawPlan {
        id: row.get(0)?,
        lease_id: row.get(1)?,
        node_id: row.get(2)?,
        state: row.get(3)?,
        request_json: row.get(4)?,
        lessee: row.get(5)?,
        previous_lessee: row.get(6)?,
        created_by: row.get(7)?,
        created_at: row.get(8)?,
        started_at: row.get(9)?,
        finished_at: row.get(10)?,
        failure: row.get(11)?,
        boot_attestation_id: row.get(12)?,
        final_attestation_id: row.get(13)?,
    })
}

impl Db {
    fn corrupt(&self, node_id: &str, what: &'static str, source: serde_json::Error) -> DbError {
        DbError::Corrupt {
            path: self.path.clone(),
            node_id: node_id.to_owned(),
            what,
            source,
        }
    }

    fn plan_row(&self, raw: RawPlan) -> Result<PlanRow, DbError> {
        let request: PlanRequest = serde_json::from_str(&raw.request_json)
            .map_err(|e| self.corrupt(&raw.node_id, "plan request", e))?;
        Ok(PlanRow {
            id: raw.id,
            plan: Plan {
                lease_id: raw.lease_id,
                node_id: raw.node_id,
                state: plan_state_of(&raw.state),
                request,
                lessee: raw.lessee,
                previous_lessee: raw.previous_lessee,
                created_at: raw.created_at,
                started_at: raw.started_at,
                finished_at: raw.finished_at,
                failure: raw.failure,
            },
            created_by: raw.created_by,
            boot_attestation_id: raw.boot_attestation_id,
            final_attestation_id: raw.final_attestation_id,
        })
    }

    /// Stores a new operator token by the SHA-256 of its secret.
    pub fn create_token(
        &mut self,
        token_sha256: &str,
        role: Role,
        project: Option<&str>,
        note: Option<&str>,
        now: &str,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO tokens (token_sha256, role, project, note, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token_sha256, role.name(), project, note, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The grant of the token whose secret hashes to `token_sha256`.
    pub fn token(&self, token_sha256: &str) -> Result<Option<TokenRow>, DbError> {
        let row: Option<(String, Option<String>)> = self
            .conn
            .query_row(
                "SELECT role, project FROM tokens WHERE token_sha256 = ?1",
                params![token_sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(role, project)| {
            Some(TokenRow {
                role: role_of(&role)?,
                project,
            })
        }))
    }

    /// Owner and lessee of a node (both none for a node nobody claimed).
    pub fn node_roles(&self, node_id: &str) -> Result<NodeRoles, DbError> {
        let row = self
            .conn
            .query_row(
                "SELECT owner, lessee FROM node_roles WHERE node_id = ?1",
                params![node_id],
                |r| {
                    Ok(NodeRoles {
                        owner: r.get(0)?,
                        lessee: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.unwrap_or_default())
    }

    /// Sets a node's owner (the node may not have booted yet).
    pub fn set_node_owner(&mut self, node_id: &str, owner: &str, now: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO node_roles (node_id, owner, lessee, updated_at) VALUES (?1, ?2, NULL, ?3)
                 ON CONFLICT(node_id) DO UPDATE SET owner = excluded.owner, updated_at = excluded.updated_at",
                params![node_id, owner, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The owner of a named policy (none: the admins').
    pub fn policy_owner(&self, name: &str) -> Result<Option<String>, DbError> {
        self.conn
            .query_row(
                "SELECT owner FROM policy_owners WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records the owner of a policy name the first time an owner stores it.
    pub fn claim_policy(&mut self, name: &str, owner: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO policy_owners (name, owner) VALUES (?1, ?2)",
                params![name, owner],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Creates a plan for the node's next boot and makes `lessee` (when
    /// given) the node's lessee. A pending plan is superseded; a running one
    /// is not touched and the new plan is refused (`Ok(Err(lease_id))`
    /// names the running one).
    pub fn create_plan(
        &mut self,
        node_id: &str,
        lease_id: &str,
        request: &PlanRequest,
        created_by: &str,
        now: &str,
    ) -> Result<Result<PlanRow, String>, DbError> {
        let request_json = serde_json::to_string(request).map_err(|source| DbError::Encode {
            what: "plan request",
            source,
        })?;
        let (tx, sql) = self.begin_write()?;
        let running: Option<String> = tx
            .query_row(
                "SELECT lease_id FROM plans WHERE node_id = ?1 AND state = 'running'",
                params![node_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(&sql)?;
        if let Some(running) = running {
            return Ok(Err(running));
        }
        tx.execute(
            "UPDATE plans SET state = 'superseded', finished_at = ?2 WHERE node_id = ?1 AND state = 'pending'",
            params![node_id, now],
        )
        .map_err(&sql)?;
        let previous: Option<String> = tx
            .query_row(
                "SELECT lessee FROM node_roles WHERE node_id = ?1",
                params![node_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(&sql)?
            .flatten();
        let lessee = request.lessee.clone().or_else(|| previous.clone());
        tx.execute(
            "INSERT INTO plans (lease_id, node_id, state, request_json, lessee, previous_lessee, created_by, created_at)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7)",
            params![lease_id, node_id, request_json, lessee, previous, created_by, now],
        )
        .map_err(&sql)?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO node_roles (node_id, owner, lessee, updated_at) VALUES (?1, NULL, ?2, ?3)
             ON CONFLICT(node_id) DO UPDATE SET lessee = excluded.lessee, updated_at = excluded.updated_at",
            params![node_id, lessee, now],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        self.plan(id)?
            .map(Ok)
            .ok_or_else(|| self.err(rusqlite::Error::QueryReturnedNoRows))
    }

    /// A plan by its row id.
    pub fn plan(&self, id: i64) -> Result<Option<PlanRow>, DbError> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {PLAN_COLUMNS} FROM plans WHERE id = ?1"),
                params![id],
                raw_plan,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        raw.map(|r| self.plan_row(r)).transpose()
    }

    /// The plan of turnover `lease_id` (lease ids are unique), in any state.
    pub fn plan_by_lease(&self, lease_id: &str) -> Result<Option<PlanRow>, DbError> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {PLAN_COLUMNS} FROM plans WHERE lease_id = ?1"),
                params![lease_id],
                raw_plan,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        raw.map(|r| self.plan_row(r)).transpose()
    }

    /// The node's newest plan in any state.
    pub fn latest_plan(&self, node_id: &str) -> Result<Option<PlanRow>, DbError> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {PLAN_COLUMNS} FROM plans WHERE node_id = ?1 AND state != 'superseded' ORDER BY id DESC LIMIT 1"),
                params![node_id],
                raw_plan,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        raw.map(|r| self.plan_row(r)).transpose()
    }

    /// The node's plan that is pending or running, if any.
    pub fn active_plan(&self, node_id: &str) -> Result<Option<PlanRow>, DbError> {
        Ok(self
            .latest_plan(node_id)?
            .filter(|p| matches!(p.plan.state, PlanState::Pending | PlanState::Running)))
    }

    /// Pending → running at a good boot verdict (a running plan stays
    /// running: the node rebooted mid-turnover and starts over).
    pub fn start_plan(
        &mut self,
        id: i64,
        boot_attestation_id: i64,
        now: &str,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE plans SET state = 'running', started_at = COALESCE(started_at, ?2), boot_attestation_id = ?3
                 WHERE id = ?1 AND state IN ('pending', 'running')",
                params![id, now, boot_attestation_id],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Running → done or failed. Returns false when the plan was not
    /// running (already finished: the first outcome stands).
    pub fn finish_plan(
        &mut self,
        id: i64,
        failure: Option<&str>,
        final_attestation_id: Option<i64>,
        now: &str,
    ) -> Result<bool, DbError> {
        let state = if failure.is_none() { "done" } else { "failed" };
        let n = self
            .conn
            .execute(
                "UPDATE plans SET state = ?2, failure = ?3, final_attestation_id = ?4, finished_at = ?5
                 WHERE id = ?1 AND state = 'running'",
                params![id, state, failure, final_attestation_id, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Stores an agent session by the SHA-256 of its token.
    pub fn create_session(
        &mut self,
        token_sha256: &str,
        session: &SessionRow,
        now: &str,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO sessions (token_sha256, node_id, plan_id, attestation_id, ak_name, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    token_sha256,
                    session.node_id,
                    session.plan_id,
                    session.attestation_id,
                    session.ak_name,
                    now,
                    session.expires_at
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The session whose token hashes to `token_sha256`.
    pub fn session(&self, token_sha256: &str) -> Result<Option<SessionRow>, DbError> {
        self.conn
            .query_row(
                "SELECT node_id, plan_id, attestation_id, ak_name, expires_at FROM sessions WHERE token_sha256 = ?1",
                params![token_sha256],
                |r| {
                    Ok(SessionRow {
                        node_id: r.get(0)?,
                        plan_id: r.get(1)?,
                        attestation_id: r.get(2)?,
                        ak_name: r.get(3)?,
                        expires_at: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Appends a step result to a plan.
    pub fn add_step_result(&mut self, plan_id: i64, step: &StepResult) -> Result<(), DbError> {
        let records_json =
            serde_json::to_string(&step.records).map_err(|source| DbError::Encode {
                what: "step records",
                source,
            })?;
        self.conn
            .execute(
                "INSERT INTO step_results (plan_id, step, ok, error, started_at, finished_at, duration_ms, bytes, records_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    plan_id,
                    step.step,
                    step.ok,
                    step.error,
                    step.started_at,
                    step.finished_at,
                    i64::try_from(step.duration_ms).unwrap_or(i64::MAX),
                    i64::try_from(step.bytes).unwrap_or(i64::MAX),
                    records_json
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// A plan's step results in the order they came.
    pub fn step_results(&self, plan_id: i64) -> Result<Vec<StepResult>, DbError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT step, ok, error, started_at, finished_at, duration_ms, bytes, records_json
                 FROM step_results WHERE plan_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![plan_id], |r| {
                let duration: i64 = r.get(5)?;
                let bytes: i64 = r.get(6)?;
                let records: String = r.get(7)?;
                Ok((
                    StepResult {
                        step: r.get(0)?,
                        ok: r.get(1)?,
                        error: r.get(2)?,
                        started_at: r.get(3)?,
                        finished_at: r.get(4)?,
                        duration_ms: u64::try_from(duration).unwrap_or(0),
                        bytes: u64::try_from(bytes).unwrap_or(0),
                        records: Vec::new(),
                    },
                    records,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut step, records) = row.map_err(|e| self.err(e))?;
            step.records = serde_json::from_str(&records)
                .map_err(|e| self.corrupt(&plan_id.to_string(), "step records", e))?;
            out.push(step);
        }
        Ok(out)
    }

    /// Appends console lines for a node, keeping the newest [`CONSOLE_KEEP`].
    pub fn add_console_lines(
        &mut self,
        node_id: &str,
        lines: &[String],
        now: &str,
    ) -> Result<(), DbError> {
        let (tx, sql) = self.begin_write()?;
        {
            let mut insert = tx
                .prepare("INSERT INTO console_lines (node_id, at, line) VALUES (?1, ?2, ?3)")
                .map_err(&sql)?;
            for line in lines {
                insert.execute(params![node_id, now, line]).map_err(&sql)?;
            }
        }
        let last = tx.last_insert_rowid();
        tx.execute(
            "DELETE FROM console_lines WHERE node_id = ?1 AND seq <= ?2",
            params![node_id, last - CONSOLE_KEEP],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(())
    }

    /// Up to `limit` console lines of a node after `after`, oldest first.
    pub fn console_lines(
        &self,
        node_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ConsoleLine>, DbError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, at, line FROM console_lines WHERE node_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![node_id, after, limit], |r| {
                Ok(ConsoleLine {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    line: r.get(2)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Stores the signed report of a finished plan (the first one stands).
    pub fn put_report(
        &mut self,
        plan_id: i64,
        node_id: &str,
        lease_id: &str,
        body: &[u8],
        now: &str,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO reports (plan_id, node_id, lease_id, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![plan_id, node_id, lease_id, body, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The newest report of a node: (plan id, signed report bytes).
    pub fn latest_report(&self, node_id: &str) -> Result<Option<(i64, Vec<u8>)>, DbError> {
        self.conn
            .query_row(
                "SELECT plan_id, body FROM reports WHERE node_id = ?1 ORDER BY plan_id DESC LIMIT 1",
                params![node_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The newest report of a node for one lessee's lease: (plan id,
    /// signed report bytes). A lessee's report stays theirs after the node
    /// moves on.
    pub fn latest_report_for_lessee(
        &self,
        node_id: &str,
        lessee: &str,
    ) -> Result<Option<(i64, Vec<u8>)>, DbError> {
        self.conn
            .query_row(
                "SELECT r.plan_id, r.body FROM reports r JOIN plans p ON p.id = r.plan_id
                 WHERE r.node_id = ?1 AND p.lessee = ?2 ORDER BY r.plan_id DESC LIMIT 1",
                params![node_id, lessee],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records a finished snapshot, held for `lessee`.
    pub fn put_snapshot(&mut self, entry: &SnapshotEntry) -> Result<(), DbError> {
        let record_json =
            serde_json::to_string(&entry.record).map_err(|source| DbError::Encode {
                what: "snapshot record",
                source,
            })?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO snapshots (lease_id, node_id, lessee, uri, manifest_sha256, record_json, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    entry.lease_id,
                    entry.node_id,
                    entry.lessee,
                    entry.uri,
                    entry.manifest_sha256,
                    record_json,
                    entry.created_at
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Snapshots, newest first: every one, or those of one lease.
    pub fn snapshots(&self, lease_id: Option<&str>) -> Result<Vec<SnapshotEntry>, DbError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT lease_id, node_id, lessee, uri, manifest_sha256, record_json, created_at
                 FROM snapshots WHERE ?1 IS NULL OR lease_id = ?1 ORDER BY created_at DESC, lease_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![lease_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (lease_id, node_id, lessee, uri, manifest_sha256, record, created_at) =
                row.map_err(|e| self.err(e))?;
            let record: SnapshotRecord = serde_json::from_str(&record)
                .map_err(|e| self.corrupt(&node_id, "snapshot record", e))?;
            out.push(SnapshotEntry {
                lease_id,
                node_id,
                lessee,
                uri,
                manifest_sha256,
                created_at,
                record,
            });
        }
        Ok(out)
    }
}
