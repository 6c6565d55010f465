//! Backups of a node's disks to remote block storage over NBD (issue #6):
//! the snapshot and restore requests and records, the backup's manifest and
//! its compact binary encoding, and where the manifest lives on the export.
//!
//! Layout of one export (one export = one restorable backup; the image and
//! the manifest that describes it travel together):
//!
//! ```text
//! 0 .. D                    the disk image, byte for byte (D = disk_bytes)
//! R = align_up(D, 1 MiB)    region header (4 KiB, state + manifest digest)
//! R + 4 KiB                 the encoded manifest (M bytes)
//! S - 4 KiB .. S            locator: a copy of the region header (S = export size)
//! ```
//!
//! The export must hold at least [`export_bytes_needed`]`(D, M)` =
//! `R + align_up(8 KiB + M, 1 MiB)` bytes. The locator lets a restore, which
//! knows only the export and the manifest digest, find the region.
//!
//! Manifest versions: v1 records per chunk a SHA-256; v2 (what this crate
//! writes) records per chunk a SHA-256 *and* a BLAKE3. SHA-256 stays the
//! published, standard digest of every chunk; BLAKE3 — also collision
//! resistant, and several times faster per core — is what the agent compares
//! to detect changed chunks and checks restored chunks against. The manifest
//! itself is bound by its SHA-256 digest, which the server records. v1
//! manifests still decode, restore (SHA-256 checks) and serve as the parent
//! of an incremental snapshot (SHA-256 comparison).
//!
//! Owns: the wire shape of these types and the pure encode/decode of the
//! manifest and the region header, which validate every field and name what
//! is wrong. Must never do I/O (the agent does it in `agent/src/snapshot`).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One MiB: the alignment of the manifest region and of its length.
pub const MIB: u64 = 1 << 20;
/// Size of the region header and of the locator.
pub const HEADER_BYTES: u64 = 4096;
/// [`HEADER_BYTES`] as a buffer length.
pub const HEADER_LEN: usize = 4096;
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 * MIB;
/// Smallest chunk size accepted (and the alignment every chunk size keeps).
pub const MIN_CHUNK_SIZE: u64 = 64 * 1024;
/// Largest chunk size accepted: bounds the memory one chunk takes.
pub const MAX_CHUNK_SIZE: u64 = 64 * MIB;
/// Longest source identity kept in a manifest.
pub const MAX_IDENTITY: usize = 4096;

/// Magic of an encoded manifest.
pub const MANIFEST_MAGIC: &[u8; 8] = b"WDNMANIF";
/// Magic of the region header and of the locator.
pub const HEADER_MAGIC: &[u8; 8] = b"WDNSNAPH";
/// The manifest encoding this crate writes (it reads this and [`MANIFEST_V1`]).
pub const MANIFEST_VERSION: u32 = 2;
/// The first manifest encoding (SHA-256 per chunk only): still read.
pub const MANIFEST_V1: u32 = 1;
/// The region header layout this crate writes and reads.
pub const HEADER_VERSION: u32 = 1;

/// Fixed part of an encoded manifest, before the identity.
const MANIFEST_FIXED: usize = 52;
/// Bytes per chunk in an encoded v2 manifest: flag + SHA-256 + BLAKE3.
pub const CHUNK_ENTRY_BYTES: usize = 65;
/// Bytes per chunk in an encoded v1 manifest: flag + SHA-256.
pub const CHUNK_ENTRY_BYTES_V1: usize = 33;

/// Bytes per chunk entry of manifest `version` (`None`: not a version we read).
fn entry_bytes(version: u32) -> Option<usize> {
    match version {
        MANIFEST_V1 => Some(CHUNK_ENTRY_BYTES_V1),
        MANIFEST_VERSION => Some(CHUNK_ENTRY_BYTES),
        _ => None,
    }
}

fn default_chunk_size() -> u64 {
    DEFAULT_CHUNK_SIZE
}

/// Back up a local disk into an NBD export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// `nbd://host:port/export` or `nbds://…` (TLS, then `ca_pem` is required).
    pub uri: String,
    /// PEM of the CA(s) that sign the NBD server's certificate.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The local disk (block device or file).
    pub source: String,
    /// Chunk size in bytes (a multiple of 64 KiB, 64 KiB–64 MiB).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
    /// Incremental: lowercase hex SHA-256 of the manifest of the previous
    /// snapshot into this export. The manifest found on the export must
    /// have exactly this digest, else the snapshot is refused.
    #[serde(default)]
    pub previous: Option<String>,
    /// Read the export back afterwards and check it against the manifest.
    #[serde(default)]
    pub verify: bool,
}

/// What a snapshot did, once it succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub uri: String,
    pub source: String,
    /// The source's identity as the manifest records it.
    pub source_identity: String,
    pub disk_bytes: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    /// Chunks that are all zeros.
    pub zero_chunks: u64,
    /// Chunks sent (written or zeroed on the export): every chunk that had
    /// to be, for a full snapshot; those whose hash changed, for an
    /// incremental one. Chunks re-sent after a reconnect count once.
    pub changed_chunks: u64,
    /// Payload bytes sent with WRITE, counting any re-sent after a reconnect.
    pub bytes_sent: u64,
    /// Bytes zeroed with WRITE_ZEROES (no payload).
    pub bytes_zeroed: u64,
    /// Zero bytes not sent at all because the export already read as zero.
    pub zero_bytes_skipped: u64,
    /// Lowercase hex SHA-256 of the encoded manifest ([`Manifest::digest`]).
    pub manifest_sha256: String,
    /// Size of the encoded manifest.
    pub manifest_bytes: u64,
    /// The previous manifest's digest, for an incremental snapshot.
    pub previous_manifest_sha256: Option<String>,
    pub incremental: bool,
    /// The export was read back and matched the manifest.
    pub verified: bool,
    /// Reconnections to the server after a lost connection.
    pub reconnects: u32,
    /// Requests retried after a server error.
    pub retries: u32,
    /// NBD connections used.
    pub connections: u32,
    /// Reads of the source went through O_DIRECT.
    pub direct_io: bool,
    /// Wall time of the read-back (0 when not asked for).
    pub verify_ms: u64,
    /// Wall time of the whole step.
    pub elapsed_ms: u64,
    /// The CA(s) trusted for an `nbds://` export: lowercase hex SHA-256 of
    /// each certificate's DER in `ca_pem`. Empty, and then absent from the
    /// JSON, for `nbd://`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_sha256: Vec<String>,
}

impl SnapshotRecord {
    /// The exact bytes that are measured and reported (compact JSON, fields
    /// in declaration order).
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serializing plain strings, integers and options cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Restore a backup from an NBD export onto a local disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// `nbd://…` or `nbds://…`.
    pub uri: String,
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The local disk to write (at least the backup's size).
    pub target: String,
    /// Lowercase hex SHA-256 of the manifest the server recorded for this
    /// backup: the restore trusts only that manifest.
    pub manifest_sha256: String,
    /// The target already reads as zero (e.g. after a verified wipe):
    /// zero chunks are not written.
    #[serde(default)]
    pub target_reads_zero: bool,
}

/// What a restore did, once it succeeded (every chunk written was checked
/// against the manifest first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRecord {
    pub uri: String,
    pub target: String,
    pub source_identity: String,
    pub disk_bytes: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub manifest_sha256: String,
    /// Bytes read from the export (holes are not read).
    pub bytes_read: u64,
    /// Data bytes written to the target.
    pub bytes_written: u64,
    /// Zero bytes written to the target.
    pub bytes_zeroed: u64,
    /// Zero bytes neither read nor written (hole on the export and a
    /// target that reads as zero).
    pub zero_bytes_skipped: u64,
    pub reconnects: u32,
    pub connections: u32,
    /// Writes to the target went through O_DIRECT.
    pub direct_io: bool,
    pub elapsed_ms: u64,
}

impl RestoreRecord {
    /// The exact bytes that are measured and reported.
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One chunk of the disk as the manifest records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHash {
    /// SHA-256 of the chunk's bytes (for a zero chunk: of that many zeros).
    pub sha256: [u8; 32],
    /// BLAKE3 of the chunk's bytes (for a zero chunk: of that many zeros);
    /// `None` in a v1 manifest, always `Some` in a v2 one.
    pub blake3: Option<[u8; 32]>,
    /// The chunk is all zeros.
    pub zero: bool,
}

impl ChunkHash {
    /// Whether `new` (hashed now, with both digests) describes the same
    /// bytes as `self` (from a previous manifest): compared by BLAKE3 where
    /// `self` has one, else by SHA-256; the zero flag must agree too.
    pub fn same_content(&self, new: &ChunkHash) -> bool {
        self.zero == new.zero
            && match (self.blake3, new.blake3) {
                (Some(a), Some(b)) => a == b,
                _ => self.sha256 == new.sha256,
            }
    }
}

/// The description of one backup: enough to check every byte of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub disk_bytes: u64,
    pub chunk_size: u64,
    /// When the snapshot was taken (seconds since the Unix epoch).
    pub created_unix: u64,
    /// What was backed up: `block:/dev/… model=… serial=…` or `file:/path`.
    pub source_identity: String,
    pub chunks: Vec<ChunkHash>,
}

/// What is wrong with an encoded manifest, a region header or a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FormatError {
    /// `manifest`, `region header`, `chunk size`, …
    pub what: &'static str,
    pub reason: String,
}

fn bad(what: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError {
        what,
        reason: reason.into(),
    }
}

/// `x` rounded up to a multiple of `align` (a power of two), saturating.
pub fn align_up(x: u64, align: u64) -> u64 {
    x.saturating_add(align - 1) & !(align - 1)
}

/// Number of chunks of a disk.
pub fn chunk_count(disk_bytes: u64, chunk_size: u64) -> u64 {
    disk_bytes.div_ceil(chunk_size.max(1))
}

/// Length of chunk `index` (the last one may be short).
pub fn chunk_len(disk_bytes: u64, chunk_size: u64, index: u64) -> u64 {
    let start = index.saturating_mul(chunk_size);
    disk_bytes.saturating_sub(start).min(chunk_size)
}

/// Checks a chunk size: a multiple of [`MIN_CHUNK_SIZE`], at most [`MAX_CHUNK_SIZE`].
pub fn check_chunk_size(chunk_size: u64) -> Result<(), FormatError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) || chunk_size % MIN_CHUNK_SIZE != 0
    {
        return Err(bad(
            "chunk size",
            format!(
                "{chunk_size} bytes; it must be a multiple of {MIN_CHUNK_SIZE} between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
            ),
        ));
    }
    Ok(())
}

/// Offset of the manifest region of a disk of `disk_bytes`.
pub fn region_offset(disk_bytes: u64) -> u64 {
    align_up(disk_bytes, MIB)
}

/// Length of the encoded (v2) manifest of such a disk (known before any
/// hashing, so an export too small is refused before anything is written).
pub fn manifest_len(disk_bytes: u64, chunk_size: u64, identity_len: usize) -> u64 {
    (MANIFEST_FIXED + identity_len.min(MAX_IDENTITY)) as u64
        + chunk_count(disk_bytes, chunk_size).saturating_mul(CHUNK_ENTRY_BYTES as u64)
}

/// Smallest export that holds a disk of `disk_bytes` and a manifest of
/// `manifest_len` bytes: the disk, the region (header + manifest) and the
/// locator, with the region starting and ending on a MiB boundary.
pub fn export_bytes_needed(disk_bytes: u64, manifest_len: u64) -> u64 {
    region_offset(disk_bytes)
        .saturating_add(align_up(manifest_len.saturating_add(2 * HEADER_BYTES), MIB))
}

/// SHA-256 of `len` zero bytes.
pub fn zero_hash(len: u64) -> [u8; 32] {
    static BLOCK: [u8; 64 * 1024] = [0u8; 64 * 1024];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(BLOCK.len(), |l| l.min(BLOCK.len()));
        h.update(&BLOCK[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// BLAKE3 of `len` zero bytes.
pub fn zero_blake3(len: u64) -> [u8; 32] {
    static BLOCK: [u8; 64 * 1024] = [0u8; 64 * 1024];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(BLOCK.len(), |l| l.min(BLOCK.len()));
        h.update(&BLOCK[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Bounds-checked big-endian reader over untrusted bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(bad(
                self.what,
                format!(
                    "truncated: {field} needs {n} bytes at offset {}, only {} in total",
                    self.at,
                    self.buf.len()
                ),
            ));
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self, field: &str) -> Result<u32, FormatError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4, field)?);
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self, field: &str) -> Result<u64, FormatError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, field)?);
        Ok(u64::from_be_bytes(b))
    }

    fn hash(&mut self, field: &str) -> Result<[u8; 32], FormatError> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.take(32, field)?);
        Ok(b)
    }
}

impl Manifest {
    /// The compact binary encoding:
    /// `"WDNMANIF"`, version u32, reserved u32 (0), disk_bytes u64,
    /// chunk_size u64, created_unix u64, chunk count u64, identity length
    /// u32 and the identity (UTF-8), then per chunk one flag byte (0 data,
    /// 1 zero), its 32-byte SHA-256 and — version 2 — its 32-byte BLAKE3.
    /// Integers are big-endian. `version` decides the layout; a v2 chunk
    /// without a BLAKE3 (a caller's bug) is written with zeros there, which
    /// no chunk hashes to, so it can only fail checks, never pass them.
    pub fn encode(&self) -> Vec<u8> {
        let identity = truncate_utf8(&self.source_identity, MAX_IDENTITY);
        let v2 = self.version != MANIFEST_V1;
        let entry = if v2 {
            CHUNK_ENTRY_BYTES
        } else {
            CHUNK_ENTRY_BYTES_V1
        };
        let mut out =
            Vec::with_capacity(MANIFEST_FIXED + identity.len() + self.chunks.len() * entry);
        out.extend_from_slice(MANIFEST_MAGIC);
        put_u32(&mut out, self.version);
        put_u32(&mut out, 0);
        put_u64(&mut out, self.disk_bytes);
        put_u64(&mut out, self.chunk_size);
        put_u64(&mut out, self.created_unix);
        put_u64(&mut out, self.chunks.len() as u64);
        // At most MAX_IDENTITY bytes (truncated above).
        put_u32(&mut out, u32::try_from(identity.len()).unwrap_or(0));
        out.extend_from_slice(identity.as_bytes());
        for c in &self.chunks {
            out.push(u8::from(c.zero));
            out.extend_from_slice(&c.sha256);
            if v2 {
                out.extend_from_slice(&c.blake3.unwrap_or_default());
            }
        }
        out
    }

    /// Parses and validates an encoded manifest (v1 or v2): magic, version,
    /// chunk size, chunk count against the disk size, identity, every flag
    /// byte, zero chunks carrying the hashes of zeros, and no trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, FormatError> {
        const W: &str = "manifest";
        let mut c = Cursor {
            buf: bytes,
            at: 0,
            what: W,
        };
        if c.take(8, "magic")? != MANIFEST_MAGIC {
            return Err(bad(W, "bad magic (not a Warden manifest)"));
        }
        let version = c.u32("version")?;
        let Some(entry) = entry_bytes(version) else {
            return Err(bad(
                W,
                format!(
                    "version {version}, this agent reads versions {MANIFEST_V1} and {MANIFEST_VERSION}"
                ),
            ));
        };
        let reserved = c.u32("reserved")?;
        if reserved != 0 {
            return Err(bad(W, format!("reserved field is {reserved:#x}, not 0")));
        }
        let disk_bytes = c.u64("disk size")?;
        let chunk_size = c.u64("chunk size")?;
        check_chunk_size(chunk_size).map_err(|e| bad(W, e.to_string()))?;
        let created_unix = c.u64("creation time")?;
        let count = c.u64("chunk count")?;
        let expected = chunk_count(disk_bytes, chunk_size);
        if count != expected {
            return Err(bad(
                W,
                format!("{count} chunks, but a {disk_bytes}-byte disk in {chunk_size}-byte chunks has {expected}"),
            ));
        }
        let id_len = c.u32("identity length")? as usize;
        if id_len > MAX_IDENTITY {
            return Err(bad(
                W,
                format!("identity of {id_len} bytes, at most {MAX_IDENTITY}"),
            ));
        }
        let source_identity = std::str::from_utf8(c.take(id_len, "identity")?)
            .map_err(|e| bad(W, format!("identity is not UTF-8: {e}")))?
            .to_string();
        let rest = bytes.len() - c.at;
        let want = u64::try_from(rest).unwrap_or(u64::MAX);
        if count.checked_mul(entry as u64) != Some(want) {
            return Err(bad(
                W,
                format!(
                    "{rest} bytes of chunk entries, {count} chunks need {}",
                    count.saturating_mul(entry as u64)
                ),
            ));
        }
        let full_zero = zero_hash(chunk_size);
        let last_len = chunk_len(disk_bytes, chunk_size, count.saturating_sub(1));
        let last_zero = if last_len == chunk_size {
            full_zero
        } else {
            zero_hash(last_len)
        };
        let v2 = version != MANIFEST_V1;
        let (full_zero_b3, last_zero_b3) = if v2 {
            (zero_blake3(chunk_size), zero_blake3(last_len))
        } else {
            ([0; 32], [0; 32])
        };
        let mut chunks = Vec::with_capacity(rest / entry);
        for i in 0..count {
            let flag = c.take(1, "chunk flag")?[0];
            let sha256 = c.hash("chunk hash")?;
            let blake3 = if v2 {
                Some(c.hash("chunk BLAKE3")?)
            } else {
                None
            };
            let zero = match flag {
                0 => false,
                1 => true,
                other => {
                    return Err(bad(
                        W,
                        format!("chunk {i}: flag byte {other:#x} (0 data, 1 zero)"),
                    ))
                }
            };
            let zh = if i + 1 == count {
                &last_zero
            } else {
                &full_zero
            };
            if zero && &sha256 != zh {
                return Err(bad(
                    W,
                    format!("chunk {i} is marked zero but its hash is not the hash of zeros"),
                ));
            }
            let zb = if i + 1 == count {
                &last_zero_b3
            } else {
                &full_zero_b3
            };
            if zero && blake3.is_some_and(|b| &b != zb) {
                return Err(bad(
                    W,
                    format!("chunk {i} is marked zero but its BLAKE3 is not the BLAKE3 of zeros"),
                ));
            }
            chunks.push(ChunkHash {
                sha256,
                blake3,
                zero,
            });
        }
        Ok(Manifest {
            version,
            disk_bytes,
            chunk_size,
            created_unix,
            source_identity,
            chunks,
        })
    }

    /// Lowercase hex SHA-256 of [`Manifest::encode`]: what records carry.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.encode()))
    }

    /// Number of zero chunks.
    pub fn zero_chunks(&self) -> u64 {
        self.chunks.iter().filter(|c| c.zero).count() as u64
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether the backup the header describes is whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionState {
    /// The image and the manifest were written and flushed.
    Complete,
    /// A snapshot started writing and has not finished: the image may be
    /// half old, half new. Restores and incremental snapshots refuse it.
    InProgress,
}

/// The region header (also written as the locator at the export's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHeader {
    pub state: RegionState,
    pub disk_bytes: u64,
    /// Offset of the encoded manifest in the export.
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_sha256: [u8; 32],
}

impl RegionHeader {
    /// 4096 bytes: `"WDNSNAPH"`, version u32, state u32 (1 complete,
    /// 2 in progress), disk_bytes u64, manifest offset u64, manifest length
    /// u64, manifest SHA-256, then the SHA-256 of the 72 bytes before it;
    /// the rest zeros.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(HEADER_MAGIC);
        put_u32(&mut out, HEADER_VERSION);
        put_u32(
            &mut out,
            match self.state {
                RegionState::Complete => 1,
                RegionState::InProgress => 2,
            },
        );
        put_u64(&mut out, self.disk_bytes);
        put_u64(&mut out, self.manifest_offset);
        put_u64(&mut out, self.manifest_len);
        out.extend_from_slice(&self.manifest_sha256);
        let check = Sha256::digest(&out);
        out.extend_from_slice(&check);
        out.resize(HEADER_LEN, 0);
        out
    }

    /// Parses a header block; `None`-like errors name what is wrong (an
    /// export that never held a backup has no magic).
    pub fn decode(bytes: &[u8]) -> Result<RegionHeader, FormatError> {
        const W: &str = "region header";
        let mut c = Cursor {
            buf: bytes,
            at: 0,
            what: W,
        };
        if c.take(8, "magic")? != HEADER_MAGIC {
            return Err(bad(W, "no Warden backup header (bad magic)"));
        }
        let version = c.u32("version")?;
        if version != HEADER_VERSION {
            return Err(bad(
                W,
                format!("version {version}, this agent reads version {HEADER_VERSION}"),
            ));
        }
        let state = match c.u32("state")? {
            1 => RegionState::Complete,
            2 => RegionState::InProgress,
            other => return Err(bad(W, format!("unknown state {other}"))),
        };
        let disk_bytes = c.u64("disk size")?;
        let manifest_offset = c.u64("manifest offset")?;
        let manifest_len = c.u64("manifest length")?;
        let manifest_sha256 = c.hash("manifest digest")?;
        let body = c.at;
        let check = c.hash("header checksum")?;
        if Sha256::digest(&bytes[..body]).as_slice() != check {
            return Err(bad(W, "header checksum does not match (corrupted)"));
        }
        if manifest_offset != region_offset(disk_bytes) + HEADER_BYTES {
            return Err(bad(
                W,
                format!(
                    "manifest offset {manifest_offset} is not {} for a {disk_bytes}-byte disk",
                    region_offset(disk_bytes) + HEADER_BYTES
                ),
            ));
        }
        Ok(RegionHeader {
            state,
            disk_bytes,
            manifest_offset,
            manifest_len,
            manifest_sha256,
        })
    }
}

/// A lowercase hex SHA-256 as requests carry it.
pub fn parse_digest(what: &'static str, s: &str) -> Result<[u8; 32], FormatError> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return Err(bad(
            what,
            format!("{s:?} is not a hex SHA-256 (64 hex digits)"),
        ));
    }
    hex::decode_to_slice(s.to_ascii_lowercase(), &mut out)
        .map_err(|e| bad(what, format!("{s:?} is not a hex SHA-256: {e}")))?;
    Ok(out)
}

impl fmt::Display for RegionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionState::Complete => "complete",
            RegionState::InProgress => "in progress",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(disk_bytes: u64, chunk_size: u64) -> Manifest {
        sample_v(MANIFEST_VERSION, disk_bytes, chunk_size)
    }

    fn sample_v(version: u32, disk_bytes: u64, chunk_size: u64) -> Manifest {
        let n = chunk_count(disk_bytes, chunk_size);
        let v2 = version == MANIFEST_VERSION;
        let chunks = (0..n)
            .map(|i| {
                if i % 3 == 1 {
                    let len = chunk_len(disk_bytes, chunk_size, i);
                    ChunkHash {
                        sha256: zero_hash(len),
                        blake3: v2.then(|| zero_blake3(len)),
                        zero: true,
                    }
                } else {
                    ChunkHash {
                        sha256: Sha256::digest(i.to_be_bytes()).into(),
                        blake3: v2.then(|| blake3::hash(&i.to_be_bytes()).into()),
                        zero: false,
                    }
                }
            })
            .collect();
        Manifest {
            version,
            disk_bytes,
            chunk_size,
            created_unix: 1_700_000_000,
            source_identity: "file:/tmp/disk.img".into(),
            chunks,
        }
    }

    #[test]
    fn manifest_round_trip_and_length() {
        let m = sample(10 * MIB + 4096, MIB);
        let bytes = m.encode();
        assert_eq!(
            bytes.len() as u64,
            manifest_len(m.disk_bytes, m.chunk_size, m.source_identity.len())
        );
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.digest(), crate::sha256_hex(&bytes));
        assert_eq!(m.zero_chunks(), 4);
        assert_eq!(&bytes[8..12], &2u32.to_be_bytes());
    }

    #[test]
    fn v1_manifest_still_decodes() {
        let m = sample_v(MANIFEST_V1, 10 * MIB + 4096, MIB);
        let bytes = m.encode();
        assert_eq!(&bytes[8..12], &1u32.to_be_bytes());
        assert_eq!(
            bytes.len(),
            52 + m.source_identity.len() + m.chunks.len() * CHUNK_ENTRY_BYTES_V1
        );
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert!(back.chunks.iter().all(|c| c.blake3.is_none()));
        // A v1 entry is not a v2 entry: relabelled as v2, the length is wrong.
        let mut relabelled = bytes.clone();
        relabelled[11] = 2;
        assert!(Manifest::decode(&relabelled)
            .unwrap_err()
            .to_string()
            .contains("chunk entries"));
    }

    #[test]
    fn v2_zero_chunk_needs_the_blake3_of_zeros() {
        let m = sample(4 * MIB, MIB);
        let mut b = m.encode();
        // Chunk 1 is a zero chunk: its BLAKE3 starts after flag + SHA-256.
        let at = 52 + m.source_identity.len() + CHUNK_ENTRY_BYTES + 1 + 32;
        b[at] ^= 1;
        assert!(Manifest::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("BLAKE3 of zeros"));
    }

    #[test]
    fn same_content_compares_blake3_else_sha256() {
        let v2 = sample(4 * MIB, MIB);
        let v1 = sample_v(MANIFEST_V1, 4 * MIB, MIB);
        for (a, b) in v1.chunks.iter().zip(&v2.chunks) {
            // v1 parent: by SHA-256 (and the zero flag).
            assert!(a.same_content(b));
            assert!(b.same_content(b));
        }
        let (old, mut new) = (v2.chunks[0], v2.chunks[0]);
        new.blake3 = Some([9; 32]);
        assert!(!old.same_content(&new));
        let mut flipped = v1.chunks[0];
        flipped.zero = !flipped.zero;
        assert!(!v1.chunks[0].same_content(&flipped));
        let mut other = v2.chunks[2];
        other.sha256 = [1; 32];
        assert!(!v1.chunks[2].same_content(&other));
        assert_eq!(
            zero_blake3(3 * 65536 + 5),
            *blake3::hash(&vec![0u8; 3 * 65536 + 5]).as_bytes()
        );
    }

    #[test]
    fn manifest_decode_names_what_is_wrong() {
        let m = sample(4 * MIB, MIB);
        let good = m.encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 1].to_vec(), "chunk entries"),
            ([good.clone(), vec![0]].concat(), "chunk entries"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "bad magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[11] = 9;
                    b
                },
                "version 9",
            ),
            (
                {
                    let mut b = good.clone();
                    b[31] = 1;
                    b
                },
                "chunk size",
            ),
            (
                {
                    let mut b = good.clone();
                    b[47] = 7;
                    b
                },
                "7 chunks",
            ),
            (
                {
                    let mut b = good.clone();
                    b[52 + 18] = 5;
                    b
                },
                "flag byte 0x5",
            ),
            (
                {
                    let mut b = good.clone();
                    b[52 + 18] = 1;
                    b
                },
                "marked zero",
            ),
            (good[..20].to_vec(), "truncated"),
        ];
        for (bytes, want) in cases {
            let e = Manifest::decode(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let h = RegionHeader {
            state: RegionState::Complete,
            disk_bytes: 5 * MIB + 512,
            manifest_offset: 6 * MIB + HEADER_BYTES,
            manifest_len: 1234,
            manifest_sha256: [7; 32],
        };
        let b = h.encode();
        assert_eq!(b.len() as u64, HEADER_BYTES);
        assert_eq!(RegionHeader::decode(&b).unwrap(), h);
        let mut c = b.clone();
        c[20] ^= 1;
        assert!(RegionHeader::decode(&c)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        assert!(RegionHeader::decode(&[0u8; 4096])
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }

    #[test]
    fn layout_arithmetic() {
        assert_eq!(region_offset(0), 0);
        assert_eq!(region_offset(1), MIB);
        assert_eq!(region_offset(MIB), MIB);
        let m = manifest_len(64 * MIB, 4 * MIB, 18);
        assert_eq!(m, 52 + 18 + 16 * 65);
        assert_eq!(export_bytes_needed(64 * MIB, m), 65 * MIB);
        assert_eq!(export_bytes_needed(64 * MIB + 1, MIB), 65 * MIB + 2 * MIB);
        assert_eq!(chunk_len(10, 4, 2), 2);
        assert_eq!(chunk_count(10, 4), 3);
        assert!(check_chunk_size(4 * MIB).is_ok());
        assert!(check_chunk_size(4096).is_err());
        assert!(check_chunk_size(MIB + 4096).is_err());
    }

    #[test]
    fn request_defaults_and_records() {
        let r: SnapshotRequest =
            serde_json::from_str(r#"{"uri":"nbd://h/e","source":"/dev/sda"}"#).unwrap();
        assert_eq!(r.chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(r.previous.is_none() && !r.verify);
        assert!(parse_digest("previous", &"ab".repeat(32)).is_ok());
        assert!(parse_digest("previous", "abc").is_err());
        assert_eq!(truncate_utf8("héllo", 2), "h");
    }
}
