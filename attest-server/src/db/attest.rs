//! Records of enrollment and attestation: the EK allow-list, bound AKs,
//! each node's last TPM clock, policies and their assignment, and the
//! audit log of every attestation with its verdict.
//!
//! Policies are versioned and never edited: storing a policy under an
//! existing name adds the next version, and an assignment always means the
//! latest version of the named policy.

use rusqlite::{params, OptionalExtension};
use warden_protocol::attest::{
    AkPublic, AttestationRecord, BoundAkInfo, EkRegistration, Phase, Policy, PolicyRef, Reason,
    Status, Verdict,
};
use warden_protocol::hello::EkPublic;

use super::{Db, DbError};

/// What an attestation needs from the database about its node.
#[derive(Debug, Clone)]
pub struct NodeAttestState {
    /// (algorithm, TPMT_PUBLIC, hex name) of the bound AK.
    pub ak: Option<(String, Vec<u8>, String)>,
    /// resetCount / restartCount of the latest verified quote.
    pub last_clock: Option<(u32, u32)>,
    /// Whether the latest stored quote at that clock said
    /// `clockInfo.safe = NO` (read back from its bytes).
    pub last_clock_unsafe: bool,
    /// The node's policy (latest version), if one is assigned to the node
    /// or to its group.
    pub policy: Option<Policy>,
}

/// One attestation to store.
#[derive(Debug, Clone)]
pub struct AttestationRow<'a> {
    pub node_id: &'a str,
    pub received_at: &'a str,
    pub peer_address: &'a str,
    pub phase: Phase,
    pub reasons: &'a [Reason],
    pub evidence_ok: bool,
    pub policy: Option<PolicyRef>,
    /// resetCount / restartCount of a verified quote.
    pub clock: Option<(u32, u32)>,
    pub pcrs_json: String,
    pub quote: &'a [u8],
    pub signature: &'a [u8],
    pub event_log: Option<&'a [u8]>,
}

fn phase_str(p: Phase) -> &'static str {
    match p {
        Phase::Boot => "boot",
        Phase::Handoff => "handoff",
    }
}

fn status_str(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "failed"
    }
}

impl Db {
    /// Creates the node row from an EK if the node never said hello.
    pub fn ensure_node(&mut self, node_id: &str, ek: &EkPublic, now: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO nodes (node_id, ek_algorithm, ek_public_key_der, ek_tpm_public,
                     ek_certificate_der, first_seen, last_seen, hello_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 0)
                 ON CONFLICT(node_id) DO UPDATE SET last_seen = ?6",
                params![
                    node_id,
                    ek.algorithm,
                    ek.public_key_der,
                    ek.tpm_public,
                    ek.certificate_der,
                    now
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Registers an EK hash (owner pre-enrollment). Re-registering updates
    /// group and note.
    pub fn register_ek(&mut self, reg: &EkRegistration, now: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO ek_allowlist (ek_sha256, grp, note, added_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(ek_sha256) DO UPDATE SET grp = ?2, note = ?3",
                params![reg.ek_sha256, reg.group, reg.note, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The registration of `ek_sha256`, if the owner made one.
    pub fn ek_registration(&self, ek_sha256: &str) -> Result<Option<EkRegistration>, DbError> {
        self.conn
            .query_row(
                "SELECT grp, note FROM ek_allowlist WHERE ek_sha256 = ?1",
                [ek_sha256],
                |r| {
                    Ok(EkRegistration {
                        ek_sha256: ek_sha256.to_owned(),
                        group: r.get(0)?,
                        note: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Binds `ak` to the node, replacing the AK of its previous boot.
    pub fn bind_ak(
        &mut self,
        node_id: &str,
        ak: &AkPublic,
        ak_name_hex: &str,
        ek_trust: &str,
        now: &str,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO aks (node_id, algorithm, tpm_public, name, ek_trust, bound_at, enroll_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)
                 ON CONFLICT(node_id) DO UPDATE SET algorithm = ?2, tpm_public = ?3, name = ?4,
                     ek_trust = ?5, bound_at = ?6, enroll_count = enroll_count + 1",
                params![node_id, ak.algorithm, ak.tpm_public, ak_name_hex, ek_trust, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The AK bound to `node_id`, if any.
    pub fn bound_ak(&self, node_id: &str) -> Result<Option<BoundAkInfo>, DbError> {
        self.conn
            .query_row(
                "SELECT algorithm, name, ek_trust, bound_at, enroll_count FROM aks WHERE node_id = ?1",
                [node_id],
                |r| {
                    Ok(BoundAkInfo {
                        node_id: node_id.to_owned(),
                        algorithm: r.get(0)?,
                        name: r.get(1)?,
                        ek_trust: r.get(2)?,
                        bound_at: r.get(3)?,
                        enroll_count: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Everything [`crate::verify::verify`] needs about `node_id`; `None`
    /// when the node is unknown. Prepared statements and the parsed-policy
    /// cache keep this (run for every attestation, under the database
    /// mutex) to microseconds.
    pub fn node_attest_state(&self, node_id: &str) -> Result<Option<NodeAttestState>, DbError> {
        // The node, its AK and its clock in one row (AK and clock may be missing).
        type Row = (
            Option<String>,
            Option<Vec<u8>>,
            Option<String>,
            Option<u32>,
            Option<u32>,
        );
        let row: Option<Row> = self
            .conn
            .prepare_cached(
                "SELECT a.algorithm, a.tpm_public, a.name, c.reset_count, c.restart_count
                 FROM nodes n
                 LEFT JOIN aks a ON a.node_id = n.node_id
                 LEFT JOIN node_clock c ON c.node_id = n.node_id
                 WHERE n.node_id = ?1",
            )
            .and_then(|mut st| {
                st.query_row([node_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()
            })
            .map_err(|e| self.err(e))?;
        let Some((algorithm, tpm_public, name, reset, restart)) = row else {
            return Ok(None);
        };
        let ak = match (algorithm, tpm_public, name) {
            (Some(algorithm), Some(tpm_public), Some(name)) => Some((algorithm, tpm_public, name)),
            _ => None,
        };
        let last_clock = reset.zip(restart);
        // Within one reset cycle a TPM's clock only turns safe, never back:
        // the newest quote at the stored clock says where the cycle is.
        let last_quote: Option<Vec<u8>> = match last_clock {
            Some((reset, restart)) => self
                .conn
                .prepare_cached(
                    "SELECT quote FROM attestations WHERE node_id = ?1 AND reset_count = ?2
                     AND restart_count = ?3 ORDER BY id DESC LIMIT 1",
                )
                .and_then(|mut st| {
                    st.query_row(params![node_id, reset, restart], |r| r.get(0))
                        .optional()
                })
                .map_err(|e| self.err(e))?,
            None => None,
        };
        let last_clock_unsafe = last_quote
            .and_then(|q| warden_protocol::tpm::quote::parse_attest(&q).ok())
            .is_some_and(|a| a.clock_info.safe == 0);
        let policy = self.node_policy(node_id)?;
        Ok(Some(NodeAttestState {
            ak,
            last_clock,
            last_clock_unsafe,
            policy,
        }))
    }

    /// For a nonce: `None` when `node_id` is unknown, else the PCRs its
    /// policy covers (none without a policy). Lighter than
    /// [`Db::node_attest_state`]: no AK, clock or last quote.
    pub fn node_policy_pcrs(&self, node_id: &str) -> Result<Option<Vec<u32>>, DbError> {
        let known = self
            .conn
            .prepare_cached("SELECT 1 FROM nodes WHERE node_id = ?1")
            .and_then(|mut st| st.query_row([node_id], |_| Ok(())).optional())
            .map_err(|e| self.err(e))?
            .is_some();
        if !known {
            return Ok(None);
        }
        Ok(Some(
            self.node_policy(node_id)?
                .map(|p| p.pcrs.keys().copied().collect())
                .unwrap_or_default(),
        ))
    }

    /// The policy that applies to `node_id`: its own assignment, else its
    /// group's (from the EK registration); latest version.
    pub fn node_policy(&self, node_id: &str) -> Result<Option<Policy>, DbError> {
        let name: Option<String> = self
            .conn
            .prepare_cached(
                "SELECT policy_name FROM policy_assignments WHERE scope = 'node' AND target = ?1
                 UNION ALL
                 SELECT a.policy_name FROM policy_assignments a
                   JOIN ek_allowlist e ON a.scope = 'group' AND a.target = e.grp
                   WHERE e.ek_sha256 = ?1
                 LIMIT 1",
            )
            .and_then(|mut st| st.query_row([node_id], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        match name {
            Some(name) => self.policy(&name, None),
            None => Ok(None),
        }
    }

    /// Stores `policy` as the next version of its name; returns the version.
    pub fn put_policy(&mut self, policy: &Policy, now: &str) -> Result<u32, DbError> {
        let (tx, sql) = self.begin_write()?;
        let latest: Option<u32> = tx
            .query_row(
                "SELECT max(version) FROM policies WHERE name = ?1",
                [&policy.name],
                |r| r.get(0),
            )
            .map_err(&sql)?;
        let version = latest.unwrap_or(0) + 1;
        let mut stored = policy.clone();
        stored.version = version;
        let body = serde_json::to_string(&stored).map_err(|source| DbError::Encode {
            what: "policy",
            source,
        })?;
        tx.execute(
            "INSERT INTO policies (name, version, body_json, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![policy.name, version, body, now],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(version)
    }

    /// A policy by name: `version`, or the latest. The body is parsed once
    /// per (name, version): a stored version is never edited.
    pub fn policy(&self, name: &str, version: Option<u32>) -> Result<Option<Policy>, DbError> {
        let found: Option<u32> = self
            .conn
            .prepare_cached(
                "SELECT version FROM policies WHERE name = ?1 AND (?2 IS NULL OR version = ?2)
                 ORDER BY version DESC LIMIT 1",
            )
            .and_then(|mut st| {
                st.query_row(params![name, version], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        let Some(version) = found else {
            return Ok(None);
        };
        let key = (name.to_owned(), version);
        if let Some(policy) = self.policies.borrow().get(&key) {
            return Ok(Some(policy.clone()));
        }
        let body: String = self
            .conn
            .prepare_cached("SELECT body_json FROM policies WHERE name = ?1 AND version = ?2")
            .and_then(|mut st| st.query_row(params![name, version], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        let policy: Policy = serde_json::from_str(&body).map_err(|source| DbError::Corrupt {
            path: self.path.clone(),
            node_id: format!("(policy {name})"),
            what: "policy",
            source,
        })?;
        let mut cache = self.policies.borrow_mut();
        if cache.len() >= super::POLICY_CACHE {
            cache.clear();
        }
        cache.insert(key, policy.clone());
        Ok(Some(policy))
    }

    /// Every policy name with its latest version.
    pub fn list_policies(&self) -> Result<Vec<PolicyRef>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, max(version) FROM policies GROUP BY name ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PolicyRef {
                    name: r.get(0)?,
                    version: r.get(1)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Assigns the policy `name` to a node or a group (`scope`).
    pub fn assign_policy(
        &mut self,
        scope: &str,
        target: &str,
        name: &str,
        now: &str,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO policy_assignments (scope, target, policy_name, assigned_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(scope, target) DO UPDATE SET policy_name = ?3, assigned_at = ?4",
                params![scope, target, name, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Stores one attestation and, for a verified quote, the node's new
    /// clock — in one transaction that re-checks the clock did not go
    /// backwards meanwhile (two attestations of one node racing). Returns
    /// the verdict as stored.
    pub fn record_attestation(&mut self, row: &AttestationRow<'_>) -> Result<Verdict, DbError> {
        let mut reasons = row.reasons.to_vec();
        let (tx, sql) = self.begin_write()?;
        if let Some((reset, restart)) = row.clock {
            let last: Option<(u32, u32)> = tx
                .prepare_cached(
                    "SELECT reset_count, restart_count FROM node_clock WHERE node_id = ?1",
                )
                .and_then(|mut st| {
                    st.query_row([row.node_id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(&sql)?;
            if last.is_some_and(|last| (reset, restart) < last) {
                reasons.push(Reason::new(
                    warden_protocol::attest::codes::RESET_BACKWARDS,
                    format!(
                        "TPM resetCount/restartCount {reset}/{restart} is older than this node's latest stored quote: a concurrent or replayed attestation"
                    ),
                ));
            } else {
                tx.prepare_cached(
                    "INSERT INTO node_clock (node_id, reset_count, restart_count, updated_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(node_id) DO UPDATE SET reset_count = ?2, restart_count = ?3, updated_at = ?4",
                )
                .and_then(|mut st| st.execute(params![row.node_id, reset, restart, row.received_at]))
                .map_err(&sql)?;
            }
        }
        let ok = reasons.is_empty();
        let reasons_json = serde_json::to_string(&reasons).map_err(|source| DbError::Encode {
            what: "reasons",
            source,
        })?;
        tx.prepare_cached(
            "INSERT INTO attestations (node_id, received_at, peer_address, phase, status,
                 evidence_ok, policy_name, policy_version, reasons_json, reset_count,
                 restart_count, pcrs_json, quote, signature, event_log)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .and_then(|mut st| {
            st.execute(params![
                row.node_id,
                row.received_at,
                row.peer_address,
                phase_str(row.phase),
                status_str(ok),
                row.evidence_ok,
                row.policy.as_ref().map(|p| &p.name),
                row.policy.as_ref().map(|p| p.version),
                reasons_json,
                row.clock.map(|c| c.0),
                row.clock.map(|c| c.1),
                row.pcrs_json,
                row.quote,
                row.signature,
                row.event_log
            ])
        })
        .map_err(&sql)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(&sql)?;
        Ok(Verdict {
            attestation_id: id,
            node_id: row.node_id.to_owned(),
            status: if ok { Status::Ok } else { Status::Failed },
            phase: row.phase,
            policy: row.policy.clone(),
            reasons,
            time: row.received_at.to_owned(),
            session: None,
            notes: Vec::new(),
        })
    }

    /// The audit log, newest first: all nodes or one, at most `limit` rows.
    pub fn list_attestations(
        &self,
        node_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AttestationRecord>, DbError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, node_id, received_at, phase, status, policy_name, policy_version,
                        reasons_json, reset_count, restart_count
                 FROM attestations WHERE (?1 IS NULL OR node_id = ?1)
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![node_id, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<u32>>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, Option<u32>>(8)?,
                    r.get::<_, Option<u32>>(9)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, node, time, phase, status, pname, pversion, reasons, reset, restart) =
                row.map_err(|e| self.err(e))?;
            let reasons: Vec<Reason> =
                serde_json::from_str(&reasons).map_err(|source| DbError::Corrupt {
                    path: self.path.clone(),
                    node_id: node.clone(),
                    what: "attestation reasons",
                    source,
                })?;
            out.push(AttestationRecord {
                verdict: Verdict {
                    attestation_id: id,
                    node_id: node,
                    status: if status == "ok" {
                        Status::Ok
                    } else {
                        Status::Failed
                    },
                    phase: if phase == "handoff" {
                        Phase::Handoff
                    } else {
                        Phase::Boot
                    },
                    policy: pname
                        .zip(pversion)
                        .map(|(name, version)| PolicyRef { name, version }),
                    reasons,
                    time,
                    session: None,
                    notes: Vec::new(),
                },
                reset_count: reset,
                restart_count: restart,
            });
        }
        Ok(out)
    }

    /// The event log and quoted PCRs (JSON) of the node's latest attestation
    /// whose evidence was genuine, to learn a policy from.
    pub fn learnable_evidence(
        &self,
        node_id: &str,
    ) -> Result<Option<(i64, Vec<u8>, String)>, DbError> {
        self.conn
            .query_row(
                "SELECT id, event_log, pcrs_json FROM attestations
                 WHERE node_id = ?1 AND evidence_ok = 1 AND event_log IS NOT NULL
                 ORDER BY id DESC LIMIT 1",
                [node_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}
