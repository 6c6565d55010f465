//! Who is calling, and what they may do: operator tokens with a role
//! (admin, owner, lessee) and a project, and agent session tokens.
//!
//! The rules, in one place:
//! - **admin** (the `admin.token` of the data directory, or a token created
//!   with role admin): everything.
//! - **owner** (project P): nodes whose owner is P — their records, their
//!   policies, plans; policies P created; never a lessee's snapshot.
//! - **lessee** (project L): nodes whose current lessee is L — verdicts,
//!   progress, console, reports — and the snapshots taken of L's disks.
//!
//! A secret is compared in constant time (admin) or looked up by its
//! SHA-256 (every other token), so the database never holds one. Session
//! tokens are a separate kind: they are issued only in the reply to a good
//! attestation and act for exactly one node.

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use warden_protocol::turnover::Role;

use crate::api::{constant_time_eq, AppState, Failure};
use crate::db::{NodeRoles, SessionRow};

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The project an owner or lessee acts for (none for admins).
    pub project: Option<String>,
}

/// Lowercase hex SHA-256 of a bearer secret: how tokens are stored.
pub fn token_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh 256-bit secret, URL-safe.
pub fn new_secret() -> Result<String, Failure> {
    let mut bytes = [0u8; 32];
    crate::pki::random_bytes(&mut bytes)
        .map_err(|e| Failure::internal(format!("no randomness for a token: {e:?}")))?;
    Ok(hex::encode(bytes))
}

fn unauthorized(message: &str) -> Failure {
    Failure::new(StatusCode::UNAUTHORIZED, "unauthorized", None, message)
}

/// 403 naming what the caller lacks.
pub fn forbidden(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::FORBIDDEN, "forbidden", None, message)
}

fn bearer(headers: &HeaderMap) -> Result<&str, Failure> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "this endpoint needs Authorization: Bearer <token> (the admin token in the server's data directory, or one from `wardenctl token create`)",
        ));
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("Authorization must be Bearer <token>"))
}

impl Caller {
    /// Authenticates the request's bearer token as an operator.
    pub async fn from_headers(state: &AppState, headers: &HeaderMap) -> Result<Caller, Failure> {
        let secret = bearer(headers)?;
        if constant_time_eq(secret.as_bytes(), state.admin_token.as_bytes()) {
            return Ok(Caller {
                role: Role::Admin,
                project: None,
            });
        }
        let digest = token_digest(secret);
        let row = state
            .with_db("checking the token", move |db| db.token(&digest))
            .await?;
        match row {
            Some(t) => Ok(Caller {
                role: t.role,
                project: t.project,
            }),
            None => Err(unauthorized("the token is not known to this server")),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    fn is(&self, role: Role, project: Option<&str>) -> bool {
        self.role == role && project.is_some() && self.project.as_deref() == project
    }

    /// Admin only.
    pub fn require_admin(&self) -> Result<(), Failure> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(forbidden(format!(
                "this needs an admin token (this one is {} of {})",
                self.role.name(),
                self.project.as_deref().unwrap_or("no project")
            )))
        }
    }

    /// Admin, or the node's owner: enrollment, policies, plans.
    pub fn may_manage(&self, node_id: &str, roles: &NodeRoles) -> Result<(), Failure> {
        if self.is_admin() || self.is(Role::Owner, roles.owner.as_deref()) {
            return Ok(());
        }
        Err(forbidden(format!(
            "node {node_id} is not owned by {} {}",
            self.role.name(),
            self.project.as_deref().unwrap_or("-")
        )))
    }

    /// Admin, the node's owner, or its current lessee: verdicts, progress,
    /// console, reports.
    pub fn may_view(&self, node_id: &str, roles: &NodeRoles) -> Result<(), Failure> {
        if self.is_admin()
            || self.is(Role::Owner, roles.owner.as_deref())
            || self.is(Role::Lessee, roles.lessee.as_deref())
        {
            return Ok(());
        }
        // Same answer whether the node exists or not: a lessee learns
        // nothing about nodes that are not theirs.
        Err(forbidden(format!(
            "node {node_id} is neither owned by nor leased to {} {}",
            self.role.name(),
            self.project.as_deref().unwrap_or("-")
        )))
    }

    /// Admin, or the lessee whose disk a snapshot holds. Owners are not
    /// included: the data is the lessee's.
    pub fn may_read_snapshot(&self, lease_id: &str, lessee: Option<&str>) -> Result<(), Failure> {
        if self.is_admin() || self.is(Role::Lessee, lessee) {
            return Ok(());
        }
        Err(forbidden(format!(
            "the snapshot of lease {lease_id} belongs to its lessee; {} {} may not read it",
            self.role.name(),
            self.project.as_deref().unwrap_or("-")
        )))
    }
}

/// An authenticated agent session.
#[derive(Debug, Clone)]
pub struct Session {
    pub row: SessionRow,
}

impl Session {
    /// Authenticates the request's bearer token as an agent session that
    /// has not expired.
    pub async fn from_headers(state: &AppState, headers: &HeaderMap) -> Result<Session, Failure> {
        let digest = token_digest(bearer(headers)?);
        let row = state
            .with_db("checking the session", move |db| db.session(&digest))
            .await?
            .ok_or_else(|| unauthorized("no such agent session: attest first"))?;
        if row.expires_at < unix_now() {
            return Err(unauthorized(
                "the agent session expired: attest again for a new one",
            ));
        }
        Ok(Session { row })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role, project: Option<&str>) -> Caller {
        Caller {
            role,
            project: project.map(str::to_owned),
        }
    }

    #[test]
    fn rules_follow_the_roles() {
        let roles = NodeRoles {
            owner: Some("uni-a".into()),
            lessee: Some("lab-b".into()),
        };
        assert!(caller(Role::Admin, None).may_manage("n", &roles).is_ok());
        assert!(caller(Role::Owner, Some("uni-a"))
            .may_manage("n", &roles)
            .is_ok());
        assert!(caller(Role::Owner, Some("uni-x"))
            .may_manage("n", &roles)
            .is_err());
        assert!(caller(Role::Lessee, Some("lab-b"))
            .may_manage("n", &roles)
            .is_err());
        assert!(caller(Role::Lessee, Some("lab-b"))
            .may_view("n", &roles)
            .is_ok());
        assert!(caller(Role::Lessee, Some("lab-c"))
            .may_view("n", &roles)
            .is_err());
        // An owner token whose project equals the *lessee* is no lessee.
        assert!(caller(Role::Owner, Some("lab-b"))
            .may_view("n", &roles)
            .is_err());
        // Nobody matches a role nobody holds.
        let empty = NodeRoles::default();
        assert!(caller(Role::Owner, None).may_manage("n", &empty).is_err());
        assert!(caller(Role::Owner, Some("uni-a"))
            .may_read_snapshot("l", Some("lab-b"))
            .is_err());
        assert!(caller(Role::Lessee, Some("lab-b"))
            .may_read_snapshot("l", Some("lab-b"))
            .is_ok());
        assert!(caller(Role::Lessee, Some("lab-c"))
            .may_read_snapshot("l", Some("lab-b"))
            .is_err());
    }

    #[test]
    fn digests_are_hex_sha256() {
        assert_eq!(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = new_secret().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_secret().unwrap());
    }
}
