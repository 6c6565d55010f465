//! Backs up a node's local disks to remote block storage over NBD — full
//! and incremental — and restores them (issue #6; docs/snapshot.md).
//!
//! One export holds one restorable backup: the disk image from offset 0,
//! then a manifest region (header + manifest v2: per-chunk SHA-256 and
//! BLAKE3, zero chunks marked) at the next MiB, and a copy of the header
//! (the locator) in the export's last 4 KiB; the layout and encodings are
//! `warden_protocol::snapshot`.
//!
//! Hashing: SHA-256 stays in the manifest (the standard digest of every
//! chunk), but the hot paths compare BLAKE3, which is collision resistant
//! too and several times faster per core (SIMD, dispatched at run time), so
//! hashing keeps up with the disk and the network on few cores. Zero chunks
//! are recognised by a vectorised scan ([`crate::zeros::is_zero`]) and get precomputed
//! hashes.
//!
//! - [`snapshot`]: reader threads (O_DIRECT) feed hashing workers through
//!   a bounded queue; each worker hashes its chunk (full: SHA-256 and BLAKE3
//!   in one pass; incremental against a v2 manifest: BLAKE3, and SHA-256
//!   only if the chunk changed — an unchanged chunk keeps its recorded
//!   SHA-256; against a v1 manifest: both, compared by SHA-256) and sends it
//!   — WRITE, WRITE_ZEROES, or nothing where the export already reads as
//!   zero or (incremental) the chunk is unchanged.
//!   Several workers keep several requests in flight over one or more NBD
//!   connections. Every `flush_every` bytes of contiguously finished chunks
//!   the export is FLUSHed and that point remembered: a lost connection
//!   reconnects (bounded, with backoff) and resumes from there.
//! - [`restore`]: the manifest the request names (by digest) is read back
//!   from the export; zero chunks the export reports as holes are zeroed
//!   first, in runs (no data writes in flight to wait for); the other chunks
//!   are read and checked against the manifest (BLAKE3; SHA-256 for a v1
//!   manifest) before they are written to the target.
//!
//! It owns the pipelines and the fault handling. It must never write the
//! export before the size check passed, mark a backup complete before the
//! image and the manifest are flushed, write a chunk to a restore target
//! that did not match the manifest, or retry without bound.
//!
//! Blocking: from async code call these inside `spawn_blocking`.

mod backup;
mod local;
mod remote;
mod restore;

use std::time::Duration;

pub use backup::snapshot;
pub use restore::restore;

/// Knobs that are the agent's business, not the plan's.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Hashing/sending (or reading/checking) workers: also the number of
    /// chunk requests in flight.
    pub workers: usize,
    /// Snapshot: threads reading the source, each its own share of the
    /// chunks (two keep a disk busier than one read at a time).
    pub readers: usize,
    /// NBD connections asked for (used only if the server offers multi-conn).
    pub connections: usize,
    /// FLUSH (and remember the resume point) every this many bytes.
    pub flush_every: u64,
    /// Retries of a request the server answered with an error.
    pub write_retries: u32,
    /// First delay before such a retry (doubled each time).
    pub retry_backoff: Duration,
    /// Reconnection attempts after a lost connection, and lost connections
    /// tolerated in one step.
    pub reconnect_tries: u32,
    /// First delay before reconnecting (doubled, up to the maximum).
    pub reconnect_backoff: Duration,
    pub reconnect_backoff_max: Duration,
    /// NBD connect/reply timeout.
    pub timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            workers: 4,
            readers: 2,
            connections: 4,
            flush_every: 64 << 20,
            write_retries: 5,
            retry_backoff: Duration::from_millis(100),
            reconnect_tries: 10,
            reconnect_backoff: Duration::from_millis(200),
            reconnect_backoff_max: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Why a snapshot or restore failed. Every message names the export's URI
/// and, where one is involved, the disk, chunk index and offset.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The request itself is unusable (chunk size, digest, CA bundle).
    #[error("snapshot request: {0}")]
    Request(String),
    /// Reading the source disk failed.
    #[error("{disk}: {op} at offset {offset}: {source}")]
    Disk {
        disk: String,
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// Writing or syncing the restore target failed.
    #[error(transparent)]
    Target(#[from] crate::image::target::TargetError),
    /// Connecting (URI, TCP, handshake, TLS) failed.
    #[error("{uri}: {source}")]
    Connect {
        uri: String,
        #[source]
        source: Box<warden_nbd::Error>,
    },
    /// The export cannot hold the backup; checked before anything is written.
    #[error("{uri}: the export is {export_bytes} bytes; backing up {disk} ({disk_bytes} bytes) needs at least {needed} bytes (the disk, then its manifest region); nothing was written")]
    ExportTooSmall {
        uri: String,
        disk: String,
        disk_bytes: u64,
        export_bytes: u64,
        needed: u64,
    },
    /// The export is unusable otherwise (read-only, changed size).
    #[error("{uri}: {reason}")]
    Export { uri: String, reason: String },
    /// An incremental snapshot is impossible against what the export holds.
    #[error("{uri}: {reason}; take a full snapshot (no `previous`)")]
    NotIncremental { uri: String, reason: String },
    /// The backup's manifest is missing, unfinished, not the one asked
    /// for, or malformed.
    #[error("{uri}: manifest: {reason}")]
    Manifest { uri: String, reason: String },
    /// A chunk request failed for good (server errors after the retries, or
    /// a request the server cannot take).
    #[error("{uri}: {op} chunk {index} at offset {offset} of {disk} failed after {tries} tries: {source}")]
    Chunk {
        uri: String,
        disk: String,
        op: &'static str,
        index: u64,
        offset: u64,
        tries: u32,
        #[source]
        source: Box<warden_nbd::Error>,
    },
    /// Another request to the export (manifest region, flush) failed.
    #[error("{uri}: {what}: {source}")]
    Remote {
        uri: String,
        what: String,
        #[source]
        source: Box<warden_nbd::Error>,
    },
    /// The connection was lost and could not be re-established.
    #[error("{uri}: connection lost ({cause}); gave up after {tries} reconnect attempts{}", source.as_ref().map(|e| format!("; last: {e}")).unwrap_or_default())]
    Reconnect {
        uri: String,
        cause: String,
        tries: u32,
        #[source]
        source: Option<Box<warden_nbd::Error>>,
    },
    /// A chunk's bytes do not hash to what the manifest says. `expected`
    /// and `got` are SHA-256s; `checked` says which hash found the
    /// difference (BLAKE3 for a v2 manifest, with its values).
    #[error("{uri}: chunk {index} at offset {offset} ({len} bytes) does not match the manifest: expected sha256 {expected}, got {got}{checked}")]
    Mismatch {
        uri: String,
        index: u64,
        offset: u64,
        len: u64,
        expected: String,
        got: String,
        checked: String,
    },
    /// The restore target is smaller than the backup; nothing was written.
    #[error("{target} is {target_bytes} bytes, the backup in {uri} is {disk_bytes} bytes; nothing was written")]
    TargetTooSmall {
        uri: String,
        target: String,
        target_bytes: u64,
        disk_bytes: u64,
    },
    /// A worker thread died (a bug); the step failed rather than guess.
    #[error("{0}: a worker thread panicked")]
    Worker(String),
}

/// How one pass over the chunks ended badly: a lost connection is worth a
/// reconnect and a resume, anything else fails the step.
#[derive(Debug)]
enum PassError {
    Lost(Box<warden_nbd::Error>),
    Fatal(SnapshotError),
}

impl From<SnapshotError> for PassError {
    fn from(e: SnapshotError) -> PassError {
        PassError::Fatal(e)
    }
}

/// The first error of a pass, and the flag that tells everyone to stop.
#[derive(Default)]
struct Abort {
    stop: std::sync::atomic::AtomicBool,
    first: std::sync::Mutex<Option<PassError>>,
}

impl Abort {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn fail(&self, e: PassError) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock() {
            // A lost connection seen after a fatal error must not turn the
            // fatal error into a resume; the reverse upgrade is right.
            match (&*first, &e) {
                (None, _) | (Some(PassError::Lost(_)), PassError::Fatal(_)) => *first = Some(e),
                _ => {}
            }
        }
    }

    fn take(&self) -> Option<PassError> {
        self.first.lock().ok().and_then(|mut f| f.take())
    }
}

/// SHA-256 of `data`.
fn sha256_of(data: &[u8]) -> [u8; 32] {
    crate::digest::Sha256::digest(data)
}

/// BLAKE3 of `data` (one thread; the pipelines spread chunks over cores).
fn blake3_of(data: &[u8]) -> [u8; 32] {
    blake3::hash(data).into()
}

/// SHA-256 and BLAKE3 of `data` in one pass: slices small enough to stay in
/// the cache between the two hashers, so the chunk is read from memory once.
fn both_of(data: &[u8]) -> ([u8; 32], [u8; 32]) {
    let mut sha = crate::digest::Sha256::new();
    let mut b3 = blake3::Hasher::new();
    for piece in data.chunks(64 * 1024) {
        sha.update(piece);
        b3.update(piece);
    }
    (sha.finalize(), b3.finalize().into())
}

/// The manifest entries of a zero chunk: full-size, and the (possibly
/// shorter) last chunk. Computed once per step.
struct ZeroChunks {
    full: warden_protocol::snapshot::ChunkHash,
    last: warden_protocol::snapshot::ChunkHash,
    n: u64,
}

impl ZeroChunks {
    fn new(disk_bytes: u64, chunk_size: u64) -> ZeroChunks {
        use warden_protocol::snapshot::{
            chunk_count, chunk_len, zero_blake3, zero_hash, ChunkHash,
        };
        let n = chunk_count(disk_bytes, chunk_size);
        let entry = |len| ChunkHash {
            sha256: zero_hash(len),
            blake3: Some(zero_blake3(len)),
            zero: true,
        };
        ZeroChunks {
            full: entry(chunk_size),
            last: entry(chunk_len(disk_bytes, chunk_size, n.saturating_sub(1))),
            n,
        }
    }

    /// The entry of chunk `i` when it is all zeros.
    fn get(&self, i: u64) -> warden_protocol::snapshot::ChunkHash {
        if i + 1 == self.n {
            self.last
        } else {
            self.full
        }
    }
}

/// Milliseconds since `t`, saturating.
fn ms_since(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A u64 length as a buffer length (chunk sizes are at most 64 MiB).
fn ulen(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// Runs `f`, retrying what the server answered with an error up to
/// `tuning.write_retries` times (with backoff). A lost connection, or a
/// request the client refused to send, returns at once. `Err` carries the
/// last error and the number of tries.
fn with_retries<T>(
    tuning: &Tuning,
    retries: &std::sync::atomic::AtomicU32,
    what: &dyn Fn() -> String,
    mut f: impl FnMut() -> Result<T, warden_nbd::Error>,
) -> Result<T, (warden_nbd::Error, u32)> {
    let mut tries = 0u32;
    loop {
        tries += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.errno().is_some() && tries <= tuning.write_retries => {
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(request = %what(), error = %e, tries, "NBD server error; retrying");
                remote::retry_delay(tuning, tries);
            }
            Err(e) => return Err((e, tries)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_of_matches_the_separate_hashes() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
            .collect();
        let (sha, b3) = both_of(&data);
        assert_eq!(sha, sha256_of(&data));
        assert_eq!(b3, blake3_of(&data));
        let z = ZeroChunks::new(3 * 65536 + 512, 65536);
        assert_eq!(z.get(0).sha256, sha256_of(&[0u8; 65536]));
        assert_eq!(z.get(3).blake3, Some(blake3_of(&[0u8; 512])));
        assert!(z.get(3).zero);
    }
}
