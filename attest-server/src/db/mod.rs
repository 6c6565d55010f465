//! The server's records in SQLite: schema migrations, nodes, hello history.
//!
//! This module owns `warden.db` and every SQL statement the server runs.
//! Migrations are numbered, forward-only and run in one transaction each;
//! `PRAGMA user_version` is the applied version and `schema_migrations`
//! keeps when each was applied. A migration that has shipped must never be
//! edited — add a new one. This module trusts its callers to have validated
//! what they store; it must never derive identities itself.
//!
//! WAL checkpoints run on a thread of their own ([`Checkpointer`]), never
//! inside a request's commit: the server has one connection behind one
//! mutex, and SQLite's automatic checkpoint (page copies and two fsyncs,
//! 20–110 ms under load) ran in whichever commit crossed 1000 WAL pages —
//! about every 100th attestation — while every other request queued for
//! the mutex. That was the p99 of `scripts/bench load`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use warden_protocol::hello::{HelloRequest, Inventory};
use warden_protocol::nodes::{NodeList, NodeSummary};

mod attest;
mod quarantine;
mod turnover;
pub use attest::{AttestationRow, NodeAttestState};
pub use quarantine::Released;
pub use turnover::{NodeRoles, PlanRow, SessionRow, TokenRow};

/// The file name of the database inside the data directory.
pub const DB_FILE: &str = "warden.db";

/// How often the [`Checkpointer`] moves the WAL into the database file.
/// At 200 attestations/s that is a few hundred pages each time.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL pages after which a commit checkpoints by itself while the
/// [`Checkpointer`] runs: only a safety net if it falls behind (~40 MB).
const AUTOCHECKPOINT_PAGES_WITH_CHECKPOINTER: u32 = 10_000;

/// Prepared statements kept per connection: every statement of the
/// attestation path is prepared once, not parsed per request (parsing was
/// 14% of the server's CPU under load).
const STATEMENT_CACHE: usize = 64;

/// Parsed policies kept (policies are immutable per name and version).
const POLICY_CACHE: usize = 64;

/// One forward-only schema step.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// 1-based; migration N takes the schema from version N-1 to N.
    pub version: u32,
    /// What it does, recorded in `schema_migrations`.
    pub description: &'static str,
    /// SQL run with `execute_batch` inside the migration's transaction.
    pub sql: &'static str,
}

/// Every migration the server knows, in order. Append only.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "nodes and hello history",
        sql: "
        CREATE TABLE nodes (
            node_id            TEXT PRIMARY KEY NOT NULL,
            ek_algorithm       TEXT NOT NULL,
            ek_public_key_der  BLOB NOT NULL,
            ek_tpm_public      BLOB NOT NULL,
            ek_certificate_der BLOB,
            first_seen         TEXT NOT NULL,
            last_seen          TEXT NOT NULL,
            hello_count        INTEGER NOT NULL
        ) STRICT;
        CREATE TABLE hellos (
            id             INTEGER PRIMARY KEY AUTOINCREMENT,
            node_id        TEXT NOT NULL REFERENCES nodes(node_id),
            received_at    TEXT NOT NULL,
            peer_address   TEXT NOT NULL,
            protocol       INTEGER NOT NULL,
            agent_version  TEXT NOT NULL,
            uptime_ms      INTEGER NOT NULL,
            pcr_algorithm  TEXT NOT NULL,
            pcrs_json      TEXT NOT NULL,
            event_log      BLOB,
            inventory_json TEXT NOT NULL
        ) STRICT;
        CREATE INDEX hellos_by_node ON hellos(node_id, id);
    ",
    },
    Migration {
        version: 2,
        description: "enrollment, policies, attestations",
        sql: "
        CREATE TABLE ek_allowlist (
            ek_sha256  TEXT PRIMARY KEY NOT NULL,
            grp        TEXT,
            note       TEXT,
            added_at   TEXT NOT NULL
        ) STRICT;
        CREATE TABLE aks (
            node_id       TEXT PRIMARY KEY NOT NULL REFERENCES nodes(node_id),
            algorithm     TEXT NOT NULL,
            tpm_public    BLOB NOT NULL,
            name          TEXT NOT NULL,
            ek_trust      TEXT NOT NULL,
            bound_at      TEXT NOT NULL,
            enroll_count  INTEGER NOT NULL
        ) STRICT;
        CREATE TABLE node_clock (
            node_id        TEXT PRIMARY KEY NOT NULL REFERENCES nodes(node_id),
            reset_count    INTEGER NOT NULL,
            restart_count  INTEGER NOT NULL,
            updated_at     TEXT NOT NULL
        ) STRICT;
        CREATE TABLE policies (
            name        TEXT NOT NULL,
            version     INTEGER NOT NULL,
            body_json   TEXT NOT NULL,
            created_at  TEXT NOT NULL,
            PRIMARY KEY (name, version)
        ) STRICT;
        CREATE TABLE policy_assignments (
            scope        TEXT NOT NULL CHECK (scope IN ('node', 'group')),
            target       TEXT NOT NULL,
            policy_name  TEXT NOT NULL,
            assigned_at  TEXT NOT NULL,
            PRIMARY KEY (scope, target)
        ) STRICT;
        CREATE TABLE attestations (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            node_id         TEXT NOT NULL,
            received_at     TEXT NOT NULL,
            peer_address    TEXT NOT NULL,
            phase           TEXT NOT NULL,
            status          TEXT NOT NULL,
            evidence_ok     INTEGER NOT NULL,
            policy_name     TEXT,
            policy_version  INTEGER,
            reasons_json    TEXT NOT NULL,
            reset_count     INTEGER,
            restart_count   INTEGER,
            pcrs_json       TEXT NOT NULL,
            quote           BLOB NOT NULL,
            signature       BLOB NOT NULL,
            event_log       BLOB
        ) STRICT;
        CREATE INDEX attestations_by_node ON attestations(node_id, id);
    ",
    },
    Migration {
        version: 3,
        description:
            "roles, turnover plans, agent sessions, step results, console, reports, snapshots",
        sql: "
        CREATE TABLE tokens (
            token_sha256  TEXT PRIMARY KEY NOT NULL,
            role          TEXT NOT NULL CHECK (role IN ('admin', 'owner', 'lessee')),
            project       TEXT,
            note          TEXT,
            created_at    TEXT NOT NULL
        ) STRICT;
        CREATE TABLE node_roles (
            node_id     TEXT PRIMARY KEY NOT NULL,
            owner       TEXT,
            lessee      TEXT,
            updated_at  TEXT NOT NULL
        ) STRICT;
        CREATE TABLE policy_owners (
            name   TEXT PRIMARY KEY NOT NULL,
            owner  TEXT NOT NULL
        ) STRICT;
        CREATE TABLE plans (
            id                    INTEGER PRIMARY KEY AUTOINCREMENT,
            lease_id              TEXT NOT NULL UNIQUE,
            node_id               TEXT NOT NULL,
            state                 TEXT NOT NULL,
            request_json          TEXT NOT NULL,
            lessee                TEXT,
            previous_lessee       TEXT,
            created_by            TEXT NOT NULL,
            created_at            TEXT NOT NULL,
            started_at            TEXT,
            finished_at           TEXT,
            failure               TEXT,
            boot_attestation_id   INTEGER,
            final_attestation_id  INTEGER
        ) STRICT;
        CREATE INDEX plans_by_node ON plans(node_id, id);
        CREATE TABLE sessions (
            token_sha256    TEXT PRIMARY KEY NOT NULL,
            node_id         TEXT NOT NULL,
            plan_id         INTEGER,
            attestation_id  INTEGER NOT NULL,
            ak_name         TEXT NOT NULL,
            created_at      TEXT NOT NULL,
            expires_at      INTEGER NOT NULL
        ) STRICT;
        CREATE TABLE step_results (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            plan_id       INTEGER NOT NULL REFERENCES plans(id),
            step          TEXT NOT NULL,
            ok            INTEGER NOT NULL,
            error         TEXT,
            started_at    TEXT NOT NULL,
            finished_at   TEXT NOT NULL,
            duration_ms   INTEGER NOT NULL,
            bytes         INTEGER NOT NULL,
            records_json  TEXT NOT NULL
        ) STRICT;
        CREATE INDEX step_results_by_plan ON step_results(plan_id, id);
        CREATE TABLE console_lines (
            seq      INTEGER PRIMARY KEY AUTOINCREMENT,
            node_id  TEXT NOT NULL,
            at       TEXT NOT NULL,
            line     TEXT NOT NULL
        ) STRICT;
        CREATE INDEX console_by_node ON console_lines(node_id, seq);
        CREATE TABLE reports (
            plan_id     INTEGER PRIMARY KEY NOT NULL REFERENCES plans(id),
            node_id     TEXT NOT NULL,
            lease_id    TEXT NOT NULL,
            body        BLOB NOT NULL,
            created_at  TEXT NOT NULL
        ) STRICT;
        CREATE TABLE snapshots (
            lease_id         TEXT PRIMARY KEY NOT NULL,
            node_id          TEXT NOT NULL,
            lessee           TEXT,
            uri              TEXT NOT NULL,
            manifest_sha256  TEXT NOT NULL,
            record_json      TEXT NOT NULL,
            created_at       TEXT NOT NULL
        ) STRICT;
    ",
    },
    Migration {
        version: 4,
        description: "quarantine of nodes that fail attestation",
        // Released quarantines stay as history; at most one per node is
        // open (released_at NULL).
        sql: "
        CREATE TABLE quarantines (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            node_id         TEXT NOT NULL,
            since           TEXT NOT NULL,
            attestation_id  INTEGER NOT NULL,
            reason          TEXT NOT NULL,
            released_at     TEXT,
            released_by     TEXT
        ) STRICT;
        CREATE UNIQUE INDEX quarantines_open ON quarantines(node_id) WHERE released_at IS NULL;
    ",
    },
];

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path} has schema version {found}, newer than this server knows ({known}); run a newer warden-attest-server")]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("database {path}: migration {version} ({description}) failed: {source}")]
    Migration {
        path: PathBuf,
        version: u32,
        description: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: stored {what} for node {node_id} is not valid JSON: {source}")]
    Corrupt {
        path: PathBuf,
        node_id: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("database {path}: starting the WAL checkpoint thread: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// An open database. Not `Sync`: share it behind a mutex.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
    /// Parsed policy bodies by (name, version). A stored version never
    /// changes (see [`attest`]), so an entry can never be stale.
    policies: RefCell<HashMap<(String, u32), warden_protocol::attest::Policy>>,
    /// Checkpoints the WAL in the background; `None` when it could not
    /// start (SQLite's automatic checkpoint then stays on).
    _checkpointer: Option<Checkpointer>,
}

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)`
/// every [`CHECKPOINT_EVERY`]. PASSIVE takes no lock a reader or writer
/// waits for. It stops (and is joined) when the [`Db`] is dropped.
#[derive(Debug)]
struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, DbError> {
        let sql = |source| DbError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(&sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(&sql)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let db = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("warden-db-checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    let started = std::time::Instant::now();
                    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    let ms = started.elapsed().as_millis();
                    match result {
                        Ok((wal_pages, copied)) => {
                            failing = false;
                            tracing::debug!(db = %db.display(), wal_pages, copied, ms, "WAL checkpoint");
                        }
                        // Once per failing spell: the automatic checkpoint
                        // (at AUTOCHECKPOINT_PAGES_WITH_CHECKPOINTER) still
                        // bounds the WAL meanwhile.
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(db = %db.display(), error = %e, "WAL checkpoint failed");
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|source| DbError::Thread {
                path: path.to_owned(),
                source,
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's wait at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Everything stored about one hello besides the request itself.
#[derive(Debug, Clone)]
pub struct HelloMeta<'a> {
    /// Derived by the server from the EK SPKI.
    pub node_id: &'a str,
    /// RFC 3339 UTC.
    pub received_at: &'a str,
    /// `ip:port` the request came from.
    pub peer_address: &'a str,
}

impl Db {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date with [`MIGRATIONS`].
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_with(path, MIGRATIONS)
    }

    /// Like [`Db::open`] with an explicit migration list (tests use
    /// prefixes of it to build "old" databases).
    pub fn open_with(path: &Path, migrations: &[Migration]) -> Result<Self, DbError> {
        let sql = |source| DbError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(&sql)?;
        // Several requests may write at once; wait rather than fail with
        // SQLITE_BUSY. WAL lets listings read while a hello is written.
        conn.busy_timeout(Duration::from_secs(5)).map_err(&sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(&sql)?;
        let wal = mode.eq_ignore_ascii_case("wal");
        if !wal {
            tracing::warn!(db = %path.display(), mode, "SQLite refused WAL journal mode");
        }
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(&sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(&sql)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mut db = Db {
            conn,
            path: path.to_owned(),
            policies: RefCell::new(HashMap::new()),
            _checkpointer: None,
        };
        db.migrate(migrations)?;
        if wal {
            match Checkpointer::start(path) {
                Ok(c) => {
                    db.conn
                        .pragma_update(
                            None,
                            "wal_autocheckpoint",
                            AUTOCHECKPOINT_PAGES_WITH_CHECKPOINTER,
                        )
                        .map_err(&sql)?;
                    db._checkpointer = Some(c);
                }
                Err(e) => {
                    tracing::warn!(db = %path.display(), error = %e, "no background WAL checkpoints; commits will checkpoint");
                }
            }
        }
        Ok(db)
    }

    /// The schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32, DbError> {
        self.conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|source| self.err(source))
    }

    /// Starts an IMMEDIATE transaction (it takes the write lock at once, so
    /// a read-then-write inside it cannot be overtaken) and returns it with
    /// the error mapper for statements run in it.
    fn begin_write(
        &mut self,
    ) -> Result<
        (
            rusqlite::Transaction<'_>,
            impl Fn(rusqlite::Error) -> DbError,
        ),
        DbError,
    > {
        let path = self.path.clone();
        let sql = move |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        Ok((tx, sql))
    }

    fn err(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self, migrations: &[Migration]) -> Result<(), DbError> {
        let known = migrations.last().map_or(0, |m| m.version);
        let current = self.schema_version()?;
        if current > known {
            return Err(DbError::TooNew {
                path: self.path.clone(),
                found: current,
                known,
            });
        }
        for migration in migrations.iter().filter(|m| m.version > current) {
            let failed = |source| DbError::Migration {
                path: self.path.clone(),
                version: migration.version,
                description: migration.description,
                source,
            };
            // IMMEDIATE: two servers starting on one directory must not both
            // apply the same step.
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(failed)?;
            let version: u32 = tx
                .query_row("PRAGMA user_version", [], |row| row.get(0))
                .map_err(failed)?;
            if version >= migration.version {
                continue;
            }
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version     INTEGER PRIMARY KEY NOT NULL,
                    description TEXT NOT NULL,
                    applied_at  TEXT NOT NULL
                ) STRICT;",
            )
            .map_err(failed)?;
            tx.execute_batch(migration.sql).map_err(failed)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
                params![migration.version, migration.description, now_rfc3339()],
            )
            .map_err(failed)?;
            // user_version lives in the database header, which is part of
            // the transaction: it moves only if the whole step commits.
            tx.pragma_update(None, "user_version", migration.version)
                .map_err(failed)?;
            tx.commit().map_err(failed)?;
            tracing::info!(db = %self.path.display(), version = migration.version, description = migration.description, "applied schema migration");
        }
        Ok(())
    }

    /// Stores one hello (and creates or updates its node) in one
    /// transaction. Returns true when the node was new.
    pub fn record_hello(
        &mut self,
        meta: &HelloMeta<'_>,
        hello: &HelloRequest,
    ) -> Result<bool, DbError> {
        let pcrs_json =
            serde_json::to_string(&hello.pcrs.values).map_err(|source| DbError::Encode {
                what: "PCR values",
                source,
            })?;
        let inventory_json =
            serde_json::to_string(&hello.inventory).map_err(|source| DbError::Encode {
                what: "inventory",
                source,
            })?;
        let (tx, sql) = self.begin_write()?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM nodes WHERE node_id = ?1",
                [meta.node_id],
                |_| Ok(()),
            )
            .optional()
            .map_err(&sql)?
            .is_some();
        if exists {
            tx.execute(
                "UPDATE nodes SET last_seen = ?2, hello_count = hello_count + 1,
                     ek_tpm_public = ?3, ek_certificate_der = coalesce(?4, ek_certificate_der)
                 WHERE node_id = ?1",
                params![
                    meta.node_id,
                    meta.received_at,
                    hello.ek.tpm_public,
                    hello.ek.certificate_der
                ],
            )
            .map_err(&sql)?;
        } else {
            tx.execute(
                "INSERT INTO nodes (node_id, ek_algorithm, ek_public_key_der, ek_tpm_public,
                     ek_certificate_der, first_seen, last_seen, hello_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1)",
                params![
                    meta.node_id,
                    hello.ek.algorithm,
                    hello.ek.public_key_der,
                    hello.ek.tpm_public,
                    hello.ek.certificate_der,
                    meta.received_at
                ],
            )
            .map_err(&sql)?;
        }
        tx.execute(
            "INSERT INTO hellos (node_id, received_at, peer_address, protocol, agent_version,
                 uptime_ms, pcr_algorithm, pcrs_json, event_log, inventory_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                meta.node_id,
                meta.received_at,
                meta.peer_address,
                hello.protocol,
                hello.agent_version,
                // SQLite integers are i64; an uptime beyond that is nonsense anyway.
                i64::try_from(hello.uptime_ms).unwrap_or(i64::MAX),
                hello.pcrs.algorithm,
                pcrs_json,
                hello.event_log,
                inventory_json
            ],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(!exists)
    }

    /// Every node with its latest hello, ordered by node id.
    pub fn list_nodes(&self) -> Result<NodeList, DbError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT n.node_id, n.ek_algorithm, n.first_seen, n.last_seen, n.hello_count,
                        h.agent_version, h.peer_address, h.pcrs_json,
                        coalesce(length(h.event_log), 0), h.inventory_json
                 FROM nodes n
                 JOIN hellos h ON h.id = (SELECT max(id) FROM hellos WHERE node_id = n.node_id)
                 ORDER BY n.node_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, String>(6)?,
                    row.get::<_, String>(7)?,
                    row.get::<_, i64>(8)?,
                    row.get::<_, String>(9)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut nodes = Vec::new();
        for row in rows {
            let (
                node_id,
                ek_algorithm,
                first_seen,
                last_seen,
                count,
                agent_version,
                peer,
                pcrs,
                log_len,
                inv,
            ) = row.map_err(|e| self.err(e))?;
            let corrupt = |what, source| DbError::Corrupt {
                path: self.path.clone(),
                node_id: node_id.clone(),
                what,
                source,
            };
            let pcrs = serde_json::from_str(&pcrs).map_err(|e| corrupt("PCR values", e))?;
            let inventory: Inventory =
                serde_json::from_str(&inv).map_err(|e| corrupt("inventory", e))?;
            nodes.push(NodeSummary {
                node_id,
                ek_algorithm,
                first_seen,
                last_seen,
                hello_count: u64::try_from(count).unwrap_or(0),
                agent_version,
                peer_address: peer,
                pcrs,
                event_log_bytes: u64::try_from(log_len).unwrap_or(0),
                inventory,
                owner: None,
                lessee: None,
                quarantine: None,
            });
        }
        Ok(NodeList { nodes })
    }

    /// How many hellos are stored (all nodes).
    pub fn hello_count(&self) -> Result<u64, DbError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM hellos", [], |row| row.get(0))
            .map_err(|e| self.err(e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Now, as RFC 3339 UTC with second precision (`2025-01-31T12:00:00Z`).
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_protocol::hello::{Disk, EkPublic, PcrBank};

    fn hello(spki_byte: u8) -> HelloRequest {
        HelloRequest {
            protocol: warden_protocol::PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            uptime_ms: 5,
            ek: EkPublic {
                algorithm: "ecc-nist-p256".into(),
                public_key_der: vec![0x30, spki_byte, 1, 2],
                tpm_public: vec![1, 2, 3],
                certificate_der: None,
            },
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values: (0..24u32)
                    .map(|i| (i, format!("{i:02x}").repeat(32)))
                    .collect(),
            },
            event_log: Some(vec![9; 100]),
            inventory: Inventory {
                disks: vec![Disk {
                    name: "vda".into(),
                    path: "/dev/vda".into(),
                    size_bytes: 1 << 30,
                    ..Default::default()
                }],
                nics: vec![],
                lease: None,
            },
        }
    }

    fn meta<'a>(node_id: &'a str, at: &'a str) -> HelloMeta<'a> {
        HelloMeta {
            node_id,
            received_at: at,
            peer_address: "127.0.0.1:5555",
        }
    }

    const EXTRA: Migration = Migration {
        version: 100,
        description: "test: a later column",
        sql: "ALTER TABLE nodes ADD COLUMN label TEXT;",
    };

    #[test]
    fn fresh_database_is_at_latest_version_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.schema_version().unwrap(),
            MIGRATIONS.last().unwrap().version
        );
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let applied: Vec<u32> = db
            .conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let want: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(applied, want);
        // Reopening applies nothing twice.
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.schema_version().unwrap(),
            MIGRATIONS.last().unwrap().version
        );
    }

    #[test]
    fn old_database_migrates_forward_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let mut db = Db::open_with(&path, &MIGRATIONS[..1]).unwrap();
            assert_eq!(db.schema_version().unwrap(), 1);
            db.record_hello(&meta("aa", "2025-01-01T00:00:00Z"), &hello(1))
                .unwrap();
        }
        let mut all = MIGRATIONS.to_vec();
        all.push(EXTRA);
        let db = Db::open_with(&path, &all).unwrap();
        assert_eq!(db.schema_version().unwrap(), 100);
        let label: Option<String> = db
            .conn
            .query_row("SELECT label FROM nodes WHERE node_id = 'aa'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(label, None);
        assert_eq!(db.list_nodes().unwrap().nodes.len(), 1);
        drop(db);

        // This server (which knows fewer migrations) refuses the newer file.
        let err = Db::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                DbError::TooNew {
                    found: 100,
                    known,
                    ..
                } if known == MIGRATIONS.last().unwrap().version
            ),
            "{err}"
        );
    }

    #[test]
    fn failed_migration_rolls_back_entirely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        Db::open(&path).unwrap();
        let broken = Migration {
            version: 100,
            description: "test: half good, half bad",
            sql: "CREATE TABLE half (x INTEGER); THIS IS NOT SQL;",
        };
        let mut all = MIGRATIONS.to_vec();
        all.push(broken);
        let err = Db::open_with(&path, &all).unwrap_err();
        assert!(
            matches!(err, DbError::Migration { version: 100, .. }),
            "{err}"
        );
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.schema_version().unwrap(),
            MIGRATIONS.last().unwrap().version
        );
        let half: Option<String> = db
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'half'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert_eq!(half, None);
    }

    #[test]
    fn records_hellos_and_lists_latest_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join(DB_FILE)).unwrap();
        assert!(db
            .record_hello(&meta("bb", "2025-01-01T00:00:00Z"), &hello(1))
            .unwrap());
        let mut second = hello(1);
        second.agent_version = "0.2.0".into();
        second.event_log = None;
        assert!(!db
            .record_hello(&meta("bb", "2025-01-02T00:00:00Z"), &second)
            .unwrap());
        assert!(db
            .record_hello(&meta("aa", "2025-01-03T00:00:00Z"), &hello(2))
            .unwrap());

        let list = db.list_nodes().unwrap();
        assert_eq!(list.nodes.len(), 2);
        assert_eq!(db.hello_count().unwrap(), 3);
        let bb = &list.nodes[1];
        assert_eq!(bb.node_id, "bb");
        assert_eq!(bb.hello_count, 2);
        assert_eq!(bb.first_seen, "2025-01-01T00:00:00Z");
        assert_eq!(bb.last_seen, "2025-01-02T00:00:00Z");
        assert_eq!(bb.agent_version, "0.2.0");
        assert_eq!(bb.event_log_bytes, 0);
        assert_eq!(bb.pcrs.len(), 24);
        assert_eq!(bb.inventory.disks[0].size_bytes, 1 << 30);
        assert_eq!(list.nodes[0].event_log_bytes, 100);
    }

    #[test]
    fn the_wal_is_checkpointed_in_the_background_not_by_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let mut db = Db::open(&path).unwrap();
        // Commits no longer checkpoint at SQLite's default 1000 pages.
        let pages: u32 = db
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pages, AUTOCHECKPOINT_PAGES_WITH_CHECKPOINTER);
        for i in 0..200u8 {
            let meta = HelloMeta {
                node_id: &format!("node-{i}"),
                received_at: "2025-01-01T00:00:00Z",
                peer_address: "127.0.0.1:1",
            };
            db.record_hello(&meta, &hello(i)).unwrap();
        }
        // The database file holds every page once the checkpointer ran
        // (until then the new pages are only in the WAL).
        let (count, size): (i64, i64) = db
            .conn
            .query_row(
                "SELECT page_count, page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let len = std::fs::metadata(&path).unwrap().len();
            if len >= u64::try_from(count * size).unwrap() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} is {len} bytes after 30 s, want {} pages of {size}: no background checkpoint",
                path.display(),
                count
            );
            std::thread::sleep(CHECKPOINT_EVERY);
        }
        // Dropping the database stops (and joins) the checkpointer.
        drop(db);
    }

    #[test]
    fn policies_come_from_the_cache_by_version_and_nonce_pcrs_follow_them() {
        use std::collections::BTreeMap;
        use warden_protocol::attest::{PcrRule, Policy};
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join(DB_FILE)).unwrap();
        let policy = |pcrs: &[u32]| Policy {
            name: "p".into(),
            version: 0,
            description: String::new(),
            pcrs: pcrs
                .iter()
                .map(|&i| {
                    let rule = PcrRule {
                        values: vec!["00".repeat(32)],
                        events: Vec::new(),
                    };
                    (i, rule)
                })
                .collect::<BTreeMap<_, _>>(),
        };
        assert_eq!(db.node_policy_pcrs("nobody").unwrap(), None);
        let meta = HelloMeta {
            node_id: "n1",
            received_at: "2025-01-01T00:00:00Z",
            peer_address: "127.0.0.1:1",
        };
        db.record_hello(&meta, &hello(1)).unwrap();
        assert_eq!(db.node_policy_pcrs("n1").unwrap(), Some(vec![]));
        assert_eq!(db.put_policy(&policy(&[0, 7]), "t").unwrap(), 1);
        db.assign_policy("node", "n1", "p", "t").unwrap();
        assert_eq!(db.node_policy_pcrs("n1").unwrap(), Some(vec![0, 7]));
        assert_eq!(db.node_policy("n1").unwrap().unwrap().version, 1);
        // A new version is the one that applies at once; the old one is
        // still readable by its number.
        assert_eq!(db.put_policy(&policy(&[4]), "t").unwrap(), 2);
        assert_eq!(db.node_policy_pcrs("n1").unwrap(), Some(vec![4]));
        assert_eq!(db.policy("p", Some(1)).unwrap().unwrap().pcrs.len(), 2);
        assert_eq!(db.policy("p", Some(3)).unwrap(), None);
        assert_eq!(db.policies.borrow().len(), 2);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_seconds() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
        assert_eq!(now.len(), "2025-01-31T12:00:00Z".len(), "{now}");
        assert_eq!(&now[10..11], "T", "{now}");
    }
}
