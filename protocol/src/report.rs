//! The signed handoff report: what the server vouches for at the end of a
//! turnover, and how anyone holding the server's public key checks it
//! offline.
//!
//! A report file is the canonical compact JSON of a [`SignedReport`]
//! followed by one `\n`. The signature (ed25519) covers the canonical
//! compact JSON of its `report` member: fields in declaration order, maps
//! are `BTreeMap`s (keys in numeric order), no floats, `Option`s always
//! present (as `null`) — except [`Report::restore`], added later and
//! omitted when none so that every earlier report keeps its exact bytes —
//! so encoding a [`Report`] is deterministic.
//! [`verify`] accepts a file only when its bytes are exactly that
//! encoding — a reformatted, re-indented or hand-edited file is refused
//! before its signature is even looked at — so "verified" always means
//! "these are the bytes the server signed".
//!
//! Owns: the report's shape ([`Report`], format [`REPORT_FORMAT`]), the key
//! id rule ([`key_id`]), signing ([`sign`]), strict parsing and
//! verification ([`verify`], [`verify_with_keys`]) and the public key list
//! of `GET /v1/keys` ([`KeyList`]). It performs no I/O and never trusts a
//! field of a report before its signature has been checked.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::agentlog::{AgentEvent, EventKind};
use crate::attest::{PolicyRef, Status as VerdictStatus, Verdict};
use crate::image::{ImageRecord, SignatureStatus};
use crate::snapshot::{RestoreRecord, SnapshotRecord};
use crate::turnover::{Handoff, StepResult};
use crate::wipe::{
    DiskId, DiskRecord, Expected, Method, Status as DiskStatus, VerifyMode, VerifyResult,
};

/// The format version this crate writes and reads.
pub const REPORT_FORMAT: u32 = 1;

/// The only signature algorithm of format 1.
pub const ALGORITHM: &str = "ed25519";

/// How the turnover ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step succeeded and the final verdict was OK.
    Ok,
    /// A step or the final verdict failed; [`Report::failure`] says which and why.
    Failed,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
        }
    }
}

/// The handoff report of one turnover (format [`REPORT_FORMAT`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Always [`REPORT_FORMAT`] for this shape.
    pub format: u32,
    pub node_id: String,
    /// The turnover ([`crate::turnover::Plan::lease_id`]).
    pub lease_id: String,
    /// The project the node was handed to.
    pub lessee: Option<String>,
    /// The project that owns the node.
    pub owner: Option<String>,
    pub outcome: Outcome,
    /// When [`Outcome::Failed`]: which step failed and why.
    pub failure: Option<String>,
    /// The attestation that let the turnover start (firmware and ramdisk).
    pub boot_verdict: VerdictSummary,
    /// The attestation after the steps (with the agent's measured log);
    /// none when the turnover failed before it.
    pub final_verdict: Option<VerdictSummary>,
    /// Every disk the wipe step handled, in the order it handled them.
    pub disks: Vec<ErasedDisk>,
    pub image: Option<ImageSummary>,
    /// A restore plan's restore, in the image's place (a report has an
    /// image or a restore, never both). Omitted when none, unlike the
    /// other options: reports signed before restores existed keep their
    /// exact bytes, and a verifier older than this field refuses a report
    /// with a restore (unknown field) rather than misreading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSummary>,
    pub snapshot: Option<SnapshotSummary>,
    pub handoff: Option<HandoffSummary>,
    /// The agent's measured log as the final verdict replayed it, in extend
    /// order: replaying its digests from zero gives `pcrs[13]`.
    pub agent_log: Vec<AgentEvent>,
    /// The final quote's SHA-256 PCRs: index → lowercase hex.
    pub pcrs: BTreeMap<u32, String>,
    /// The steps in the order they ran.
    pub steps: Vec<StepTiming>,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    pub signed_at: String,
}

/// One verdict, as the report names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictSummary {
    /// The server's audit-log id (`wardenctl attestations`).
    pub attestation_id: i64,
    pub status: VerdictStatus,
    /// The policy applied (name and version), when the evidence got that far.
    pub policy: Option<PolicyRef>,
    /// RFC 3339 UTC.
    pub time: String,
    /// Why it failed (the reasons' sentences); empty when OK.
    pub reasons: Vec<String>,
}

impl From<&Verdict> for VerdictSummary {
    fn from(v: &Verdict) -> Self {
        VerdictSummary {
            attestation_id: v.attestation_id,
            status: v.status,
            policy: v.policy.clone(),
            time: v.time.clone(),
            reasons: v.reasons.iter().map(|r| r.message.clone()).collect(),
        }
    }
}

/// One disk of the wipe step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasedDisk {
    /// Kernel name, `/dev` path, model, serial and size (`disk.path` is the device).
    pub disk: DiskId,
    /// What the plan asked for.
    pub requested: Method,
    /// The method that left the disk in its final state (the last attempt);
    /// none when nothing ran.
    pub method: Option<Method>,
    /// That method's read-back, if it had one.
    pub verification: Option<VerificationSummary>,
    pub status: DiskStatus,
    /// Why it failed; none when clean.
    pub reason: Option<String>,
    /// Bytes written, discarded or zeroed over all attempts.
    pub bytes_written: u64,
    /// SHA-256 of the disk's measured record: equals the digest of the
    /// `wipe` event in [`Report::agent_log`] for this disk.
    pub record_sha256: String,
}

impl From<&DiskRecord> for ErasedDisk {
    fn from(r: &DiskRecord) -> Self {
        let last = r.attempts.last();
        ErasedDisk {
            disk: r.disk.clone(),
            requested: r.requested,
            method: last.map(|a| a.method),
            verification: last
                .and_then(|a| a.verification.as_ref())
                .map(|v| VerificationSummary {
                    mode: v.mode,
                    expected: v.expected.clone(),
                    samples: v.samples,
                    bytes_read: v.bytes_read,
                    digest: v.digest.clone(),
                    result: v.result.clone(),
                }),
            status: r.status,
            reason: r.reason.clone(),
            bytes_written: r.bytes_written,
            record_sha256: r.digest(),
        }
    }
}

/// How the deciding method's result was read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationSummary {
    pub mode: VerifyMode,
    pub expected: Expected,
    pub samples: u64,
    pub bytes_read: u64,
    /// SHA-256 of what was read (see [`crate::wipe::Verification::digest`]).
    pub digest: String,
    pub result: VerifyResult,
}

/// The image step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSummary {
    pub url: String,
    /// `sha256:HEX` (or `sha512:HEX`) of the image as served.
    pub digest: String,
    /// The disk written.
    pub target: String,
    pub image_bytes: u64,
    pub bytes_written: u64,
    pub verified_after_write: bool,
    pub signature: SignatureStatus,
    /// SHA-256 of the measured record (the `image` event's digest).
    pub record_sha256: String,
}

impl From<&ImageRecord> for ImageSummary {
    fn from(r: &ImageRecord) -> Self {
        ImageSummary {
            url: r.url.clone(),
            digest: r.digest.clone(),
            target: r.target.clone(),
            image_bytes: r.image_bytes,
            bytes_written: r.bytes_written,
            verified_after_write: r.verified_after_write,
            signature: r.signature,
            record_sha256: crate::sha256_hex(&r.canonical_json()),
        }
    }
}

/// The snapshot step (the outgoing tenant's backup).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSummary {
    /// The NBD export written.
    pub uri: String,
    /// The disk read.
    pub source: String,
    /// Lowercase hex SHA-256 of the backup's manifest.
    pub manifest_sha256: String,
    pub disk_bytes: u64,
    pub bytes_sent: u64,
    pub incremental: bool,
    /// The export was read back and matched the manifest.
    pub verified: bool,
    /// SHA-256 of the measured record (the `snapshot` event's digest).
    pub record_sha256: String,
}

impl From<&SnapshotRecord> for SnapshotSummary {
    fn from(r: &SnapshotRecord) -> Self {
        SnapshotSummary {
            uri: r.uri.clone(),
            source: r.source.clone(),
            manifest_sha256: r.manifest_sha256.clone(),
            disk_bytes: r.disk_bytes,
            bytes_sent: r.bytes_sent,
            incremental: r.incremental,
            verified: r.verified,
            record_sha256: crate::sha256_hex(&r.canonical_json()),
        }
    }
}

/// The restore step of a restore plan: which backup went onto which disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSummary {
    /// The NBD export read.
    pub uri: String,
    /// The disk written.
    pub target: String,
    /// Lowercase hex SHA-256 of the backup's manifest: every chunk written
    /// was checked against it.
    pub manifest_sha256: String,
    /// The disk the backup was taken from, as its manifest names it.
    pub source_identity: String,
    pub disk_bytes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// SHA-256 of the measured record (the `restore` event's digest).
    pub record_sha256: String,
}

impl From<&RestoreRecord> for RestoreSummary {
    fn from(r: &RestoreRecord) -> Self {
        RestoreSummary {
            uri: r.uri.clone(),
            target: r.target.clone(),
            manifest_sha256: r.manifest_sha256.clone(),
            source_identity: r.source_identity.clone(),
            disk_bytes: r.disk_bytes,
            bytes_read: r.bytes_read,
            bytes_written: r.bytes_written,
            record_sha256: crate::sha256_hex(&r.canonical_json()),
        }
    }
}

/// What the node was handed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffSummary {
    pub mode: Handoff,
    /// Lowercase hex SHA-256 of the kexec'ed kernel, initrd and command line.
    pub kernel_sha256: Option<String>,
    pub initrd_sha256: Option<String>,
    pub cmdline_sha256: Option<String>,
    /// Digest of the firmware boot target record of a reboot-to-disk handoff.
    pub target_sha256: Option<String>,
    /// The handoff events' descriptions, in extend order (for people).
    pub descriptions: Vec<String>,
}

impl HandoffSummary {
    /// The handoff targets as the measured log records them: the digests of
    /// its `handoff-*` events (the last of each kind, should one repeat).
    pub fn from_agent_log(mode: Handoff, log: &[AgentEvent]) -> Self {
        let mut s = HandoffSummary {
            mode,
            kernel_sha256: None,
            initrd_sha256: None,
            cmdline_sha256: None,
            target_sha256: None,
            descriptions: Vec::new(),
        };
        for e in log {
            let slot = match e.kind {
                EventKind::HandoffKernel => &mut s.kernel_sha256,
                EventKind::HandoffInitrd => &mut s.initrd_sha256,
                EventKind::HandoffCmdline => &mut s.cmdline_sha256,
                EventKind::HandoffTarget => &mut s.target_sha256,
                EventKind::Snapshot | EventKind::Wipe | EventKind::Image | EventKind::Restore => {
                    continue
                }
            };
            *slot = Some(e.digest.clone());
            s.descriptions.push(e.description.clone());
        }
        s
    }
}

/// When a step ran and what it moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTiming {
    /// `snapshot`, `wipe`, `image`, `restore`, `handoff`.
    pub step: String,
    pub ok: bool,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    /// Bytes read, erased or written.
    pub bytes: u64,
}

impl From<&StepResult> for StepTiming {
    fn from(r: &StepResult) -> Self {
        StepTiming {
            step: r.step.clone(),
            ok: r.ok,
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
            duration_ms: r.duration_ms,
            bytes: r.bytes,
        }
    }
}

impl Report {
    /// The exact bytes the signature covers: compact JSON, fields in
    /// declaration order.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical(self)
    }
}

/// Who signed, and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// The 64-byte ed25519 signature over [`Report::canonical_bytes`], base64.
    #[serde(with = "crate::b64")]
    pub value: Vec<u8>,
}

/// A report and the server's signature over it: the report file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReport {
    pub report: Report,
    pub signature: Signature,
}

impl SignedReport {
    /// The report file: canonical compact JSON of the envelope and `\n`.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut bytes = canonical(self);
        bytes.push(b'\n');
        bytes
    }

    /// Parses a report file strictly (unknown fields refused) and requires
    /// it to be exactly [`Self::to_file_bytes`] of what it parsed to.
    /// Checks no signature: use [`verify`] before trusting any field.
    pub fn from_file_bytes(file: &[u8]) -> Result<SignedReport, ReportError> {
        let mut de = serde_json::Deserializer::from_slice(file);
        let signed: SignedReport =
            serde_path_to_error::deserialize(&mut de).map_err(|e| ReportError::Parse {
                path: e.path().to_string(),
                reason: e.inner().to_string(),
            })?;
        // Trailing non-whitespace is a parse error; trailing whitespace is
        // caught by the byte comparison below.
        de.end().map_err(|e| ReportError::Parse {
            path: ".".into(),
            reason: e.to_string(),
        })?;
        let canonical = signed.to_file_bytes();
        if canonical != file {
            let offset = canonical
                .iter()
                .zip(file)
                .position(|(a, b)| a != b)
                .unwrap_or(canonical.len().min(file.len()));
            return Err(ReportError::NotCanonical { offset });
        }
        Ok(signed)
    }

    /// Checks the signature with `key` (algorithm, key id, then ed25519
    /// `verify_strict`), and the format version.
    pub fn check(&self, key: &VerifyingKey) -> Result<(), ReportError> {
        let sig = &self.signature;
        if sig.algorithm != ALGORITHM {
            return Err(ReportError::UnsupportedAlgorithm {
                got: sig.algorithm.clone(),
            });
        }
        let expected = key_id(key);
        if sig.key_id != expected {
            return Err(ReportError::WrongKey {
                expected,
                got: sig.key_id.clone(),
            });
        }
        let bytes: [u8; 64] =
            sig.value
                .as_slice()
                .try_into()
                .map_err(|_| ReportError::SignatureLength {
                    len: sig.value.len(),
                })?;
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        key.verify_strict(&self.report.canonical_bytes(), &signature)
            .map_err(|_| ReportError::BadSignature {
                key_id: expected.clone(),
            })?;
        if self.report.format != REPORT_FORMAT {
            return Err(ReportError::UnsupportedFormat {
                got: self.report.format,
            });
        }
        Ok(())
    }
}

/// What is wrong with a report file or a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("not a signed report: at {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("the file is not the bytes the server signed: byte {offset} differs from the report's canonical encoding (a reformatted or edited file is refused; fetch it again with `wardenctl report get`)")]
    NotCanonical { offset: usize },
    #[error("signature algorithm {got:?} is not supported (expected \"ed25519\")")]
    UnsupportedAlgorithm { got: String },
    #[error("the report is signed by key {got}, but the key given is {expected}")]
    WrongKey { expected: String, got: String },
    #[error("the report is signed by key {got}, which is none of the keys given ({known})")]
    UnknownKey { got: String, known: String },
    #[error("the signature is {len} bytes; an ed25519 signature is 64")]
    SignatureLength { len: usize },
    #[error("the signature by key {key_id} does not match the report: the report was changed after it was signed")]
    BadSignature { key_id: String },
    #[error("report format {got} is not supported (this version reads format {REPORT_FORMAT})")]
    UnsupportedFormat { got: u32 },
    #[error("public key: {0}")]
    PublicKey(String),
}

/// The key id: the first 16 hex digits of SHA-256 of the raw 32-byte key.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// Signs `report` with `key`.
pub fn sign(report: Report, key: &SigningKey) -> SignedReport {
    use ed25519_dalek::Signer;
    let signature = key.sign(&report.canonical_bytes());
    SignedReport {
        report,
        signature: Signature {
            algorithm: ALGORITHM.to_owned(),
            key_id: key_id(&key.verifying_key()),
            value: signature.to_bytes().to_vec(),
        },
    }
}

/// Verifies a report file against one public key and returns its report.
pub fn verify(file: &[u8], key: &VerifyingKey) -> Result<Report, ReportError> {
    let signed = SignedReport::from_file_bytes(file)?;
    signed.check(key)?;
    Ok(signed.report)
}

/// Verifies a report file with whichever of `keys` its key id names;
/// returns the report and that key id.
pub fn verify_with_keys(
    file: &[u8],
    keys: &[VerifyingKey],
) -> Result<(Report, String), ReportError> {
    let signed = SignedReport::from_file_bytes(file)?;
    let got = &signed.signature.key_id;
    let Some(key) = keys.iter().find(|k| key_id(k) == *got) else {
        let known: Vec<String> = keys.iter().map(key_id).collect();
        return Err(ReportError::UnknownKey {
            got: got.clone(),
            known: if known.is_empty() {
                "no keys".into()
            } else {
                known.join(", ")
            },
        });
    };
    signed.check(key)?;
    let id = signed.signature.key_id;
    Ok((signed.report, id))
}

/// Body of `GET /v1/keys`: the server's report-signing public keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    pub keys: Vec<PublicKey>,
}

/// One public key of [`KeyList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    pub key_id: String,
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// The raw 32-byte ed25519 public key, base64.
    #[serde(with = "crate::b64")]
    pub public_key: Vec<u8>,
}

impl From<&VerifyingKey> for PublicKey {
    fn from(key: &VerifyingKey) -> Self {
        PublicKey {
            key_id: key_id(key),
            algorithm: ALGORITHM.to_owned(),
            public_key: key.as_bytes().to_vec(),
        }
    }
}

impl PublicKey {
    /// The key, after checking its algorithm, length and that `key_id`
    /// really is this key's id.
    pub fn to_verifying_key(&self) -> Result<VerifyingKey, ReportError> {
        if self.algorithm != ALGORITHM {
            return Err(ReportError::PublicKey(format!(
                "key {}: algorithm {:?} is not supported (expected \"ed25519\")",
                self.key_id, self.algorithm
            )));
        }
        let key = raw_key(&self.public_key)
            .map_err(|e| ReportError::PublicKey(format!("key {}: {e}", self.key_id)))?;
        let id = key_id(&key);
        if id != self.key_id {
            return Err(ReportError::PublicKey(format!(
                "key listed as {} has key id {id}",
                self.key_id
            )));
        }
        Ok(key)
    }
}

/// Reads a key file: either the JSON of `GET /v1/keys` ([`KeyList`]) or one
/// raw 32-byte public key in base64 (surrounding whitespace ignored).
pub fn parse_key_file(bytes: &[u8]) -> Result<Vec<VerifyingKey>, ReportError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ReportError::PublicKey("the key file is not text".into()))?
        .trim();
    if text.starts_with('{') {
        let list: KeyList = serde_json::from_str(text)
            .map_err(|e| ReportError::PublicKey(format!("not the JSON of GET /v1/keys: {e}")))?;
        if list.keys.is_empty() {
            return Err(ReportError::PublicKey("the key list is empty".into()));
        }
        return list.keys.iter().map(PublicKey::to_verifying_key).collect();
    }
    let raw = STANDARD.decode(text).map_err(|e| {
        ReportError::PublicKey(format!(
            "neither the JSON of GET /v1/keys nor a base64 key: {e}"
        ))
    })?;
    Ok(vec![raw_key(&raw).map_err(ReportError::PublicKey)?])
}

fn raw_key(raw: &[u8]) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = raw
        .try_into()
        .map_err(|_| format!("{} bytes; an ed25519 public key is 32", raw.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid ed25519 point".to_owned())
}

fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    // Strings, integers, enums, vectors and u32-keyed maps: serialization
    // cannot fail. Should it ever, the empty encoding never verifies.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentlog::AGENT_PCR;
    use crate::attest::{Phase, Reason};
    use crate::wipe::{Attempt, Outcome as WipeOutcome, Verification};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn disk() -> DiskRecord {
        DiskRecord {
            disk: DiskId {
                name: "vda".into(),
                path: "/dev/vda".into(),
                model: Some("QEMU HARDDISK".into()),
                serial: Some("s1".into()),
                size_bytes: 1 << 30,
            },
            requested: Method::Auto,
            attempts: vec![Attempt {
                method: Method::Zeroout,
                started_at: "2026-01-01T00:00:00Z".into(),
                finished_at: "2026-01-01T00:00:02Z".into(),
                bytes_written: 1 << 30,
                outcome: WipeOutcome::Verified,
                verification: Some(Verification {
                    mode: VerifyMode::Sampled { blocks_per_gib: 64 },
                    expected: Expected::Zeros,
                    samples: 66,
                    bytes_read: 2 << 20,
                    sample_seed: Some("00".repeat(32)),
                    digest: "ab".repeat(32),
                    result: VerifyResult::Pass,
                    digest_chunk_bytes: None,
                }),
            }],
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:02Z".into(),
            bytes_written: 1 << 30,
            status: DiskStatus::Clean,
            reason: None,
        }
    }

    fn report() -> Report {
        let d = disk();
        let log = vec![
            AgentEvent {
                pcr: AGENT_PCR,
                kind: EventKind::Wipe,
                digest: d.digest(),
                record: Some(String::from_utf8(d.canonical_json()).unwrap()),
                description: "wipe /dev/vda".into(),
            },
            AgentEvent {
                pcr: AGENT_PCR,
                kind: EventKind::HandoffKernel,
                digest: "11".repeat(32),
                record: None,
                description: "handoff-kernel /boot/vmlinuz".into(),
            },
        ];
        let verdict = Verdict {
            attestation_id: 7,
            node_id: "n1".into(),
            status: VerdictStatus::Ok,
            phase: Phase::Boot,
            policy: Some(PolicyRef {
                name: "lab".into(),
                version: 3,
            }),
            reasons: vec![],
            time: "2026-01-01T00:00:00Z".into(),
            session: Some("secret".into()),
            notes: Vec::new(),
        };
        let mut final_verdict = verdict.clone();
        final_verdict.attestation_id = 8;
        final_verdict.phase = Phase::Handoff;
        final_verdict.status = VerdictStatus::Failed;
        final_verdict.reasons = vec![Reason::new("x", "PCR13: replay differs")];
        Report {
            format: REPORT_FORMAT,
            node_id: "n1".into(),
            lease_id: "lease-0001".into(),
            lessee: Some("tenant-b".into()),
            owner: None,
            outcome: Outcome::Ok,
            failure: None,
            boot_verdict: VerdictSummary::from(&verdict),
            final_verdict: Some(VerdictSummary::from(&final_verdict)),
            disks: vec![ErasedDisk::from(&d)],
            image: None,
            restore: None,
            snapshot: None,
            handoff: Some(HandoffSummary::from_agent_log(Handoff::Kexec, &log)),
            agent_log: log,
            pcrs: [
                (0u32, "00".repeat(32)),
                (13, "cd".repeat(32)),
                (7, "07".repeat(32)),
            ]
            .into_iter()
            .collect(),
            steps: vec![StepTiming {
                step: "wipe".into(),
                ok: true,
                started_at: "2026-01-01T00:00:00Z".into(),
                finished_at: "2026-01-01T00:00:02Z".into(),
                duration_ms: 2000,
                bytes: 1 << 30,
            }],
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:03Z".into(),
            signed_at: "2026-01-01T00:00:03Z".into(),
        }
    }

    fn file() -> Vec<u8> {
        sign(report(), &key(1)).to_file_bytes()
    }

    /// Replaces the first occurrence of `from` (which must be there) with `to`.
    fn replace_once(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        text.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let f = file();
        assert_eq!(f.last(), Some(&b'\n'));
        let got = verify(&f, &key(1).verifying_key()).unwrap();
        assert_eq!(got, report());
        let (got, id) =
            verify_with_keys(&f, &[key(2).verifying_key(), key(1).verifying_key()]).unwrap();
        assert_eq!(got, report());
        assert_eq!(id, key_id(&key(1).verifying_key()));
        assert_eq!(id.len(), 16);
    }

    #[test]
    fn derived_fields_follow_the_records() {
        let r = report();
        assert_eq!(r.disks[0].record_sha256, r.agent_log[0].digest);
        assert_eq!(r.disks[0].method, Some(Method::Zeroout));
        let h = r.handoff.unwrap();
        assert_eq!(h.kernel_sha256, Some("11".repeat(32)));
        assert_eq!(h.initrd_sha256, None);
        assert_eq!(
            h.descriptions,
            vec!["handoff-kernel /boot/vmlinuz".to_owned()]
        );
        let text = String::from_utf8(file()).unwrap();
        // The session token of a verdict never reaches a report.
        assert!(!text.contains("secret"));
        // PCRs in numeric order, absent options present as null.
        assert!(text.contains(r#""pcrs":{"0":"#), "{text}");
        assert!(text.find(r#""7":"#).unwrap() < text.find(r#""13":"#).unwrap());
        assert!(text.contains(r#""owner":null"#));
    }

    #[test]
    fn one_changed_byte_anywhere_is_refused() {
        let f = file();
        let vk = key(1).verifying_key();
        let digest = "cd".repeat(32);
        let sig_b64 = STANDARD.encode(sign(report(), &key(1)).signature.value);
        let first = if sig_b64.starts_with('B') { 'C' } else { 'B' };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "pcr digest",
                replace_once(&f, &digest, &format!("ce{}", &digest[2..])),
            ),
            ("lease id", replace_once(&f, "lease-0001", "lease-0002")),
            (
                "signature",
                replace_once(&f, &sig_b64, &format!("{first}{}", &sig_b64[1..])),
            ),
            (
                "whitespace",
                replace_once(&f, r#""lease_id":"#, r#""lease_id": "#),
            ),
            ("trailing newline", [f.as_slice(), b"\n"].concat()),
            ("no newline", f[..f.len() - 1].to_vec()),
            (
                "outcome",
                replace_once(&f, r#""outcome":"ok""#, r#""outcome":"failed""#),
            ),
        ];
        for (what, bytes) in cases {
            let err = verify(&bytes, &vk).unwrap_err();
            assert!(
                matches!(
                    err,
                    ReportError::BadSignature { .. } | ReportError::NotCanonical { .. }
                ),
                "{what}: {err}"
            );
        }
        // Every single byte, flipped in its low bit: never accepted. (A
        // smaller report: each flip that still parses costs a signature
        // check, slow in a debug build.)
        let mut small = report();
        small.disks.clear();
        small.agent_log.clear();
        small.handoff = None;
        let f = sign(small, &key(1)).to_file_bytes();
        assert!(verify(&f, &vk).is_ok());
        for i in 0..f.len() {
            let mut bytes = f.clone();
            bytes[i] ^= 1;
            assert!(
                verify(&bytes, &vk).is_err(),
                "byte {i} flipped was accepted"
            );
        }
    }

    #[test]
    fn whitespace_names_the_canonical_form() {
        let f = file();
        let bad = replace_once(&f, r#""lease_id":"#, r#""lease_id": "#);
        let err = verify(&bad, &key(1).verifying_key()).unwrap_err();
        assert!(matches!(err, ReportError::NotCanonical { .. }), "{err}");
        assert!(
            err.to_string().contains("not the bytes the server signed"),
            "{err}"
        );
    }

    #[test]
    fn wrong_key_is_refused_naming_both_ids() {
        let f = file();
        let other = key(2).verifying_key();
        let err = verify(&f, &other).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&key_id(&other)), "{text}");
        assert!(text.contains(&key_id(&key(1).verifying_key())), "{text}");
        assert!(matches!(
            verify_with_keys(&f, &[other]).unwrap_err(),
            ReportError::UnknownKey { .. }
        ));
        // A signature by another key under this key's id.
        let mut forged = sign(report(), &key(2));
        forged.signature.key_id = key_id(&key(1).verifying_key());
        let err = verify(&forged.to_file_bytes(), &key(1).verifying_key()).unwrap_err();
        assert!(matches!(err, ReportError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn reordered_and_unknown_fields_are_refused() {
        let signed = sign(report(), &key(1));
        let vk = key(1).verifying_key();
        // The envelope's members swapped.
        let r = String::from_utf8(canonical(&signed.report)).unwrap();
        let s = String::from_utf8(canonical(&signed.signature)).unwrap();
        let swapped = format!("{{\"signature\":{s},\"report\":{r}}}\n");
        let err = verify(swapped.as_bytes(), &vk).unwrap_err();
        assert_eq!(err, ReportError::NotCanonical { offset: 2 });
        // Two report fields swapped.
        let f = signed.to_file_bytes();
        let swapped = replace_once(
            &f,
            r#""node_id":"n1","lease_id":"lease-0001""#,
            r#""lease_id":"lease-0001","node_id":"n1""#,
        );
        assert!(matches!(
            verify(&swapped, &vk).unwrap_err(),
            ReportError::NotCanonical { .. }
        ));
        // An extra field, named with its path.
        let extra = replace_once(&f, r#""owner":null"#, r#""owner":null,"note":"x""#);
        let err = verify(&extra, &vk).unwrap_err();
        match &err {
            ReportError::Parse { path, reason } => {
                assert_eq!(path, "report.note");
                assert!(reason.contains("note"), "{reason}");
            }
            other => panic!("{other}"),
        }
        // A missing field.
        let missing = replace_once(&f, r#""owner":null,"#, "");
        assert!(verify(&missing, &vk).is_err());
        // A field of the wrong type names its path.
        let wrong = replace_once(&f, r#""duration_ms":2000"#, r#""duration_ms":"2000""#);
        match verify(&wrong, &vk).unwrap_err() {
            ReportError::Parse { path, .. } => assert_eq!(path, "report.steps[0].duration_ms"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_report_without_a_restore_has_no_restore_member_and_one_with_it_verifies() {
        // Earlier reports' bytes: no "restore" key at all.
        let f = file();
        let text = String::from_utf8(f.clone()).unwrap();
        assert!(!text.contains("restore"), "{text}");
        let record = RestoreRecord {
            uri: "nbd://10.0.2.2:10809/".into(),
            target: "/dev/nvme1n1".into(),
            source_identity: "block:/dev/nvme0n1 serial=nvme0".into(),
            disk_bytes: 1 << 27,
            chunk_size: 4 << 20,
            chunks: 32,
            zero_chunks: 20,
            manifest_sha256: "cd".repeat(32),
            bytes_read: 48 << 20,
            bytes_written: 48 << 20,
            bytes_zeroed: 0,
            zero_bytes_skipped: 80 << 20,
            reconnects: 0,
            connections: 1,
            direct_io: true,
            elapsed_ms: 900,
        };
        let mut r = report();
        r.restore = Some(RestoreSummary::from(&record));
        let f = sign(r.clone(), &key(1)).to_file_bytes();
        assert_eq!(verify(&f, &key(1).verifying_key()).unwrap(), r);
        let summary = r.restore.unwrap();
        assert_eq!(
            summary.record_sha256,
            crate::sha256_hex(&record.canonical_json())
        );
        assert_eq!(summary.manifest_sha256, "cd".repeat(32));
        // The restore is signed like everything else.
        let tampered = replace_once(&f, "/dev/nvme1n1", "/dev/nvme2n1");
        assert!(matches!(
            verify(&tampered, &key(1).verifying_key()).unwrap_err(),
            ReportError::BadSignature { .. }
        ));
        // An explicit null is not the canonical form.
        let null = replace_once(
            &file(),
            r#""image":null,"#,
            r#""image":null,"restore":null,"#,
        );
        assert!(matches!(
            verify(&null, &key(1).verifying_key()).unwrap_err(),
            ReportError::NotCanonical { .. }
        ));
    }

    #[test]
    fn other_format_and_algorithm_are_refused() {
        let mut r = report();
        r.format = 2;
        let f = sign(r, &key(1)).to_file_bytes();
        assert_eq!(
            verify(&f, &key(1).verifying_key()).unwrap_err(),
            ReportError::UnsupportedFormat { got: 2 }
        );
        let mut s = sign(report(), &key(1));
        s.signature.algorithm = "rsa".into();
        assert!(matches!(
            verify(&s.to_file_bytes(), &key(1).verifying_key()).unwrap_err(),
            ReportError::UnsupportedAlgorithm { .. }
        ));
    }

    #[test]
    fn key_files_parse_as_key_list_or_raw_base64() {
        let vk = key(1).verifying_key();
        let list = KeyList {
            keys: vec![PublicKey::from(&vk)],
        };
        let json = serde_json::to_vec_pretty(&list).unwrap();
        assert_eq!(parse_key_file(&json).unwrap(), vec![vk]);
        let raw = format!("{}\n", STANDARD.encode(vk.as_bytes()));
        assert_eq!(parse_key_file(raw.as_bytes()).unwrap(), vec![vk]);

        let mut lying = list.clone();
        lying.keys[0].key_id = "0000000000000000".into();
        let err = parse_key_file(&serde_json::to_vec(&lying).unwrap()).unwrap_err();
        assert!(err.to_string().contains("0000000000000000"), "{err}");
        assert!(parse_key_file(STANDARD.encode([1u8; 31]).as_bytes()).is_err());
        assert!(parse_key_file(b"not a key").is_err());
        assert!(parse_key_file(br#"{"keys":[]}"#).is_err());
    }
}
