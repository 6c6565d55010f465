//! The erase record: what a plan asks a disk to be wiped with, and what the
//! agent did and read back, per disk and overall.
//!
//! The per-disk [`DiskRecord`] is measured into a PCR and signed into the
//! tenant's report, so its encoding is part of the contract: field order is
//! declaration order, there are no maps and no floats, and
//! [`DiskRecord::canonical_json`] gives the exact bytes that are measured.
//! Adding a field changes those bytes (and the digest); renaming one breaks
//! readers. This module performs no I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::sha256_hex;

/// What a plan asks for on a disk. Unit variants travel as kebab-case
/// strings (`"nvme-format-crypto"`), overwrite as
/// `{"overwrite":{"passes":3,"pattern":"random"}}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Method {
    /// The strongest method the device supports, falling back on failure.
    Auto,
    NvmeSanitizeCrypto,
    NvmeSanitizeBlock,
    NvmeSanitizeOverwrite,
    NvmeFormatCrypto,
    NvmeFormatUserData,
    AtaSecurityEraseEnhanced,
    AtaSecurityErase,
    /// `BLKSECDISCARD` over the whole device.
    Secdiscard,
    /// `BLKDISCARD`; an erase only where the device guarantees zeros after
    /// discard, otherwise followed by zeroing.
    Discard,
    /// `BLKZEROOUT` (write-zeroes, or the kernel writing zero pages).
    Zeroout,
    /// `passes` full writes; the last pass's content is what verification expects.
    Overwrite {
        passes: u32,
        pattern: Pattern,
    },
    /// The fast path: every partition-table, RAID, LVM and file-system
    /// signature location (both ends), not the data.
    Metadata,
}

/// Content written by an overwrite pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    Zeros,
    /// A ChaCha8 stream from a per-pass seed (recorded, so anyone can
    /// regenerate the expected bytes).
    Random,
}

impl Method {
    /// The hardware methods, strongest first, in the order `auto` prefers them.
    pub const HARDWARE: [Method; 7] = [
        Method::NvmeSanitizeCrypto,
        Method::NvmeSanitizeBlock,
        Method::NvmeSanitizeOverwrite,
        Method::NvmeFormatCrypto,
        Method::NvmeFormatUserData,
        Method::AtaSecurityEraseEnhanced,
        Method::AtaSecurityErase,
    ];

    /// The stable name: `auto`, `nvme-format-crypto`, …, `overwrite`.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::NvmeSanitizeCrypto => "nvme-sanitize-crypto",
            Method::NvmeSanitizeBlock => "nvme-sanitize-block",
            Method::NvmeSanitizeOverwrite => "nvme-sanitize-overwrite",
            Method::NvmeFormatCrypto => "nvme-format-crypto",
            Method::NvmeFormatUserData => "nvme-format-user-data",
            Method::AtaSecurityEraseEnhanced => "ata-security-erase-enhanced",
            Method::AtaSecurityErase => "ata-security-erase",
            Method::Secdiscard => "secdiscard",
            Method::Discard => "discard",
            Method::Zeroout => "zeroout",
            Method::Overwrite { .. } => "overwrite",
            Method::Metadata => "metadata",
        }
    }

    /// True for the methods the drive itself performs.
    pub fn is_hardware(&self) -> bool {
        Self::HARDWARE.contains(self)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Overwrite { passes, pattern } => {
                let p = match pattern {
                    Pattern::Zeros => "zeros",
                    Pattern::Random => "random",
                };
                write!(f, "overwrite:{passes}:{p}")
            }
            other => f.write_str(other.name()),
        }
    }
}

/// A method name that is not one of [`Method`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown wipe method {0:?} (expected auto, secdiscard, discard, zeroout, metadata, overwrite[:PASSES[:zeros|random]] or an nvme-/ata- hardware method)")]
pub struct UnknownMethod(pub String);

impl FromStr for Method {
    type Err = UnknownMethod;

    /// Parses [`Method::name`] or the [`Display`](fmt::Display) form
    /// `overwrite:PASSES:PATTERN` (`overwrite` alone is one pass of zeros).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnknownMethod(s.to_string());
        if let Some(rest) = s.strip_prefix("overwrite") {
            let mut parts = rest.split(':').skip(1);
            let passes = match parts.next() {
                None => 1,
                Some(n) => n.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(bad)?,
            };
            let pattern = match parts.next() {
                None | Some("zeros") => Pattern::Zeros,
                Some("random") => Pattern::Random,
                Some(_) => return Err(bad()),
            };
            if parts.next().is_some() || !(rest.is_empty() || rest.starts_with(':')) {
                return Err(bad());
            }
            return Ok(Method::Overwrite { passes, pattern });
        }
        [
            Method::Auto,
            Method::Secdiscard,
            Method::Discard,
            Method::Zeroout,
            Method::Metadata,
        ]
        .into_iter()
        .chain(Method::HARDWARE)
        .find(|m| m.name() == s)
        .ok_or_else(bad)
    }
}

/// The disk as the record names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskId {
    /// Kernel name, e.g. `nvme0n1`.
    pub name: String,
    /// `/dev/NAME`.
    pub path: String,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub size_bytes: u64,
}

/// How verification read the device back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VerifyMode {
    /// The first and last MiB plus `blocks_per_gib` random aligned blocks per GiB.
    Sampled { blocks_per_gib: u32 },
    /// Every byte.
    Full,
    /// Every range a metadata wipe zeroed (and nothing else: the data stays).
    Metadata,
}

/// What the device was expected to read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Expected {
    Zeros,
    /// The ChaCha8 stream of the last overwrite pass: 32-byte seed (hex),
    /// byte `n` of the device is byte `n` of the stream.
    Pattern {
        seed: String,
    },
}

/// The outcome of a read-back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VerifyResult {
    Pass,
    /// The first unexpected bytes: where, what was read (up to 16 bytes,
    /// hex) and what was expected there.
    Fail {
        offset: u64,
        found: String,
        expected: String,
    },
    /// The read itself failed (`errno` 0 when it was not an OS error).
    Error {
        offset: u64,
        errno: i32,
        error: String,
    },
}

/// One read-back of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    pub mode: VerifyMode,
    pub expected: Expected,
    /// Reads made (a full read counts each chunk).
    pub samples: u64,
    pub bytes_read: u64,
    /// Seed of the random sample offsets (hex), so they can be regenerated;
    /// `None` for full and metadata reads.
    pub sample_seed: Option<String>,
    /// Lowercase hex SHA-256 of what was read. Sampled and metadata reads
    /// (`digest_chunk_bytes` absent): the SHA-256 of every byte read, in
    /// offset order. Full reads (`digest_chunk_bytes` = C): a hash list, so
    /// that several cores can hash at once — the device is cut into chunks
    /// of C bytes from offset 0 (the last one shorter) and the digest is
    /// `SHA-256(SHA-256(chunk 0) || SHA-256(chunk 1) || …)` over the raw
    /// 32-byte chunk digests in offset order. Either way it covers every
    /// byte that was verified.
    pub digest: String,
    pub result: VerifyResult,
    /// The chunk size of a full read's hash list (see `digest`); absent
    /// for sampled and metadata reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_chunk_bytes: Option<u64>,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.result == VerifyResult::Pass
    }
}

/// How one attempted method ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// Ran, and its verification passed.
    Verified,
    /// Ran, and verification read back something unexpected.
    VerifyFailed,
    /// The device cannot do it (`reason` says why); nothing was written.
    Unsupported { reason: String },
    /// An I/O error stopped it at `offset` (bytes into the device).
    IoError {
        offset: u64,
        errno: i32,
        error: String,
    },
    /// Any other failure of the method itself (e.g. a drive's erase command failed).
    Failed { reason: String },
}

/// One method run on a disk, in the order they ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attempt {
    pub method: Method,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    /// Bytes the agent wrote, discarded or zeroed (a drive's own erase counts
    /// its whole capacity).
    pub bytes_written: u64,
    pub outcome: Outcome,
    pub verification: Option<Verification>,
}

/// Final state of a disk, or of the whole wipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Clean,
    Failed,
}

/// Everything done to one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    pub disk: DiskId,
    /// What the plan asked for.
    pub requested: Method,
    /// What ran, in order; the last one decides.
    pub attempts: Vec<Attempt>,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    /// Sum over attempts.
    pub bytes_written: u64,
    /// `Clean` only when the last attempt's verification passed.
    pub status: Status,
    /// Why it failed (or was refused); `None` when clean.
    pub reason: Option<String>,
}

impl DiskRecord {
    /// The exact bytes that are measured and signed: compact JSON, fields in
    /// declaration order (the types hold no maps and no floats, so this is
    /// deterministic).
    pub fn canonical_json(&self) -> Vec<u8> {
        canonical(self)
    }

    /// Lowercase hex SHA-256 of [`Self::canonical_json`].
    pub fn digest(&self) -> String {
        sha256_hex(&self.canonical_json())
    }

    /// The method that left the disk in its final state, if any ran.
    pub fn final_method(&self) -> Option<Method> {
        self.attempts.last().map(|a| a.method)
    }
}

/// Every disk of one wipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WipeReport {
    pub disks: Vec<DiskRecord>,
    /// `Clean` only when every disk is clean (and there was at least one).
    pub status: Status,
}

impl WipeReport {
    /// Builds the report; the status follows from the disks.
    pub fn new(disks: Vec<DiskRecord>) -> Self {
        let clean = !disks.is_empty() && disks.iter().all(|d| d.status == Status::Clean);
        WipeReport {
            disks,
            status: if clean { Status::Clean } else { Status::Failed },
        }
    }

    /// Canonical bytes, as for [`DiskRecord::canonical_json`].
    pub fn canonical_json(&self) -> Vec<u8> {
        canonical(self)
    }
}

fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    // These types are strings, integers, enums and vectors: serialization
    // cannot fail. Should it ever, an empty encoding measures as "nothing
    // known", which no verifier accepts as a clean record.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DiskRecord {
        DiskRecord {
            disk: DiskId {
                name: "vda".into(),
                path: "/dev/vda".into(),
                model: None,
                serial: Some("s1".into()),
                size_bytes: 1 << 30,
            },
            requested: Method::Auto,
            attempts: vec![
                Attempt {
                    method: Method::Discard,
                    started_at: "2026-01-01T00:00:00Z".into(),
                    finished_at: "2026-01-01T00:00:01Z".into(),
                    bytes_written: 1 << 30,
                    outcome: Outcome::VerifyFailed,
                    verification: Some(Verification {
                        mode: VerifyMode::Sampled { blocks_per_gib: 64 },
                        expected: Expected::Zeros,
                        samples: 66,
                        bytes_read: 2 << 20,
                        sample_seed: Some("00".repeat(32)),
                        digest: "ab".repeat(32),
                        result: VerifyResult::Fail {
                            offset: 4096,
                            found: "aa".repeat(16),
                            expected: "00".repeat(16),
                        },
                        digest_chunk_bytes: None,
                    }),
                },
                Attempt {
                    method: Method::Overwrite {
                        passes: 2,
                        pattern: Pattern::Random,
                    },
                    started_at: "2026-01-01T00:00:01Z".into(),
                    finished_at: "2026-01-01T00:00:09Z".into(),
                    bytes_written: 2 << 30,
                    outcome: Outcome::Verified,
                    verification: None,
                },
            ],
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:09Z".into(),
            bytes_written: 3 << 30,
            status: Status::Clean,
            reason: None,
        }
    }

    #[test]
    fn record_round_trips_and_is_canonical() {
        let r = record();
        let bytes = r.canonical_json();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"disk\":{\"name\":\"vda\""), "{text}");
        assert!(text.contains("\"method\":\"discard\""), "{text}");
        assert!(
            text.contains("{\"overwrite\":{\"passes\":2,\"pattern\":\"random\"}}"),
            "{text}"
        );
        assert!(text.contains("\"outcome\":\"verify_failed\""), "{text}");
        assert!(
            text.contains("{\"sampled\":{\"blocks_per_gib\":64}}"),
            "{text}"
        );
        let back: DiskRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.canonical_json(), bytes);
        assert_eq!(back.digest(), sha256_hex(&bytes));
    }

    #[test]
    fn rejects_unknown_fields() {
        let mut v = serde_json::to_value(record()).unwrap();
        v["extra"] = 1.into();
        assert!(serde_json::from_value::<DiskRecord>(v).is_err());
        let m: Result<Method, _> =
            serde_json::from_str("{\"overwrite\":{\"passes\":1,\"pattern\":\"zeros\",\"x\":1}}");
        assert!(m.is_err());
    }

    #[test]
    fn method_names_parse_and_print() {
        for m in Method::HARDWARE {
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
        assert_eq!(
            "overwrite".parse::<Method>().unwrap(),
            Method::Overwrite {
                passes: 1,
                pattern: Pattern::Zeros
            }
        );
        let m: Method = "overwrite:3:random".parse().unwrap();
        assert_eq!(m.to_string(), "overwrite:3:random");
        assert!("overwrite:0".parse::<Method>().is_err());
        assert!("overwritex".parse::<Method>().is_err());
        assert!("shred".parse::<Method>().is_err());
        assert_eq!("auto".parse::<Method>().unwrap(), Method::Auto);
    }

    #[test]
    fn report_status_follows_disks() {
        let mut r = record();
        assert_eq!(WipeReport::new(vec![r.clone()]).status, Status::Clean);
        r.status = Status::Failed;
        assert_eq!(WipeReport::new(vec![record(), r]).status, Status::Failed);
        assert_eq!(WipeReport::new(vec![]).status, Status::Failed);
    }
}
