//! Quarantine records: which nodes failed attestation on their evidence and
//! may not start a plan until someone releases them.
//!
//! This module owns the `quarantines` table (migration 4). It must never
//! decide whether a verdict quarantines a node (that is
//! [`crate::quarantine`]'s rule) and never release a quarantine on its own:
//! only [`Db::release_quarantine`], called for an authorised operator,
//! closes one.

use rusqlite::{params, OptionalExtension};
use warden_protocol::nodes::Quarantine;

use super::{Db, DbError};

/// A quarantine an operator closed, for the reply to the release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub quarantine: Quarantine,
    /// RFC 3339 UTC.
    pub released_at: String,
    /// Who released it (`admin` or `owner:PROJECT`).
    pub released_by: String,
}

impl Db {
    /// Quarantines `node_id` unless it already is. The first failing
    /// verdict stands: a node that keeps failing stays quarantined since
    /// the first one, which is what a person must look at. Returns true
    /// when the node was not quarantined before.
    pub fn quarantine_node(
        &mut self,
        node_id: &str,
        quarantine: &Quarantine,
    ) -> Result<bool, DbError> {
        let (tx, sql) = self.begin_write()?;
        let open = tx
            .query_row(
                "SELECT 1 FROM quarantines WHERE node_id = ?1 AND released_at IS NULL",
                [node_id],
                |_| Ok(()),
            )
            .optional()
            .map_err(&sql)?
            .is_some();
        if !open {
            tx.execute(
                "INSERT INTO quarantines (node_id, since, attestation_id, reason)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    node_id,
                    quarantine.since,
                    quarantine.attestation_id,
                    quarantine.reason
                ],
            )
            .map_err(&sql)?;
        }
        tx.commit().map_err(&sql)?;
        Ok(!open)
    }

    /// The node's open quarantine, if it has one.
    pub fn quarantine_of(&self, node_id: &str) -> Result<Option<Quarantine>, DbError> {
        self.conn
            .query_row(
                "SELECT since, attestation_id, reason FROM quarantines
                 WHERE node_id = ?1 AND released_at IS NULL",
                [node_id],
                |r| {
                    Ok(Quarantine {
                        since: r.get(0)?,
                        attestation_id: r.get(1)?,
                        reason: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Closes the node's open quarantine; `None` when it had none.
    pub fn release_quarantine(
        &mut self,
        node_id: &str,
        by: &str,
        now: &str,
    ) -> Result<Option<Released>, DbError> {
        let (tx, sql) = self.begin_write()?;
        let open = tx
            .query_row(
                "SELECT id, since, attestation_id, reason FROM quarantines
                 WHERE node_id = ?1 AND released_at IS NULL",
                [node_id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        Quarantine {
                            since: r.get(1)?,
                            attestation_id: r.get(2)?,
                            reason: r.get(3)?,
                        },
                    ))
                },
            )
            .optional()
            .map_err(&sql)?;
        let Some((id, quarantine)) = open else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE quarantines SET released_at = ?2, released_by = ?3 WHERE id = ?1",
            params![id, now, by],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(Some(Released {
            quarantine,
            released_at: now.to_owned(),
            released_by: by.to_owned(),
        }))
    }

    /// How many nodes are quarantined now (for the metrics gauge).
    pub fn quarantined_count(&self) -> Result<u64, DbError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM quarantines WHERE released_at IS NULL",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DB_FILE;

    fn q(id: i64, reason: &str) -> Quarantine {
        Quarantine {
            since: format!("2026-01-0{id}T00:00:00Z"),
            attestation_id: id,
            reason: reason.into(),
        }
    }

    #[test]
    fn first_failure_stands_until_released_then_a_new_one_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(db.quarantine_of("aa").unwrap(), None);
        assert_eq!(db.quarantined_count().unwrap(), 0);

        assert!(db.quarantine_node("aa", &q(1, "PCR7 changed")).unwrap());
        assert!(!db.quarantine_node("aa", &q(2, "PCR0 changed")).unwrap());
        assert_eq!(db.quarantine_of("aa").unwrap(), Some(q(1, "PCR7 changed")));
        assert_eq!(db.quarantine_of("bb").unwrap(), None);
        assert!(db.quarantine_node("bb", &q(3, "log mismatch")).unwrap());
        assert_eq!(db.quarantined_count().unwrap(), 2);

        let released = db
            .release_quarantine("aa", "owner:uni-a", "2026-01-05T00:00:00Z")
            .unwrap()
            .unwrap();
        assert_eq!(released.quarantine, q(1, "PCR7 changed"));
        assert_eq!(released.released_by, "owner:uni-a");
        assert_eq!(db.quarantine_of("aa").unwrap(), None);
        assert_eq!(db.quarantined_count().unwrap(), 1);
        // Nothing left to release.
        assert_eq!(
            db.release_quarantine("aa", "admin", "2026-01-06T00:00:00Z")
                .unwrap(),
            None
        );

        // A later failure quarantines the node afresh; history is kept.
        assert!(db.quarantine_node("aa", &q(4, "PCR4 changed")).unwrap());
        assert_eq!(db.quarantine_of("aa").unwrap(), Some(q(4, "PCR4 changed")));
        let rows: i64 = db
            .conn
            .query_row(
                "SELECT count(*) FROM quarantines WHERE node_id = 'aa'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 2);
    }

    #[test]
    fn the_schema_allows_one_open_quarantine_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join(DB_FILE)).unwrap();
        let insert = "INSERT INTO quarantines (node_id, since, attestation_id, reason)
                      VALUES ('aa', 'now', 1, 'r')";
        db.conn.execute(insert, []).unwrap();
        assert!(db.conn.execute(insert, []).is_err());
    }
}
