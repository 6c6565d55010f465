//! Enrollment and attestation: the bodies of `POST /v1/enroll`,
//! `POST /v1/enroll/activate`, `POST /v1/attest/nonce`, `POST /v1/attest`
//! and the verdict the server answers with (also `GET /v1/nodes/{id}/verdict`).
//!
//! The flow, once per boot of the ramdisk:
//! 1. `enroll`: the agent sends its EK and a fresh AK; the server checks the
//!    EK is trusted and the AK is a restricted signing key, and answers with
//!    a credential only the TPM holding both keys can open (MakeCredential).
//! 2. `enroll/activate`: the agent answers with the secret ActivateCredential
//!    recovered; only then is the AK bound to the node.
//! 3. `attest/nonce`: a single-use nonce with a short lifetime, and the PCRs
//!    the node's policy needs quoted.
//! 4. `attest`: quote, signature, PCR values and event log; the answer is a
//!    [`Verdict`].
//!
//! The AK is created anew on every boot and bound by a fresh
//! MakeCredential/ActivateCredential round (see `docs/attestation.md`):
//! between leases the tenant owns the TPM, so nothing persistent in it is
//! trusted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hello::{check_protocol, field_err, EkPublic, FieldError, PcrBank};

/// The AK algorithms Warden accepts, as they appear on the wire.
pub const AK_RSA: &str = "rsa2048-rsassa-sha256";
/// ECC NIST P-256 with ECDSA-SHA256.
pub const AK_ECC: &str = "ecc-nist-p256-ecdsa-sha256";

/// PCRs quoted when the node's policy does not ask for others.
pub const DEFAULT_QUOTE_PCRS: [u32; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

/// Body of `POST /v1/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The TPM's Endorsement Key (with its certificate when the TPM has one).
    pub ek: EkPublic,
    /// The new Attestation Key.
    pub ak: AkPublic,
}

/// An Attestation Key's public part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AkPublic {
    /// [`AK_RSA`] or [`AK_ECC`].
    pub algorithm: String,
    /// The marshalled `TPMT_PUBLIC`.
    #[serde(with = "crate::b64")]
    pub tpm_public: Vec<u8>,
}

/// Answer to `POST /v1/enroll`: a credential for the agent's TPM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollChallenge {
    /// The node id the server derived from the EK.
    pub node_id: String,
    /// Names this enrollment in the activation that answers it.
    pub enrollment_id: String,
    /// `TPM2B_ID_OBJECT.credential` (without the size prefix).
    #[serde(with = "crate::b64")]
    pub id_object: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET.secret` (without the size prefix).
    #[serde(with = "crate::b64")]
    pub encrypted_secret: Vec<u8>,
    /// Seconds the challenge stays valid.
    pub expires_in_s: u64,
    /// Why the server trusts this EK, in words (shown on the console).
    pub ek_trust: String,
}

/// Body of `POST /v1/enroll/activate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    /// From the [`EnrollChallenge`].
    pub enrollment_id: String,
    /// What `TPM2_ActivateCredential` returned.
    #[serde(with = "crate::b64")]
    pub secret: Vec<u8>,
}

/// Answer to `POST /v1/enroll/activate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    /// The node the AK is now bound to.
    pub node_id: String,
    /// Hex TPM name of the bound AK.
    pub ak_name: String,
}

/// Body of `POST /v1/attest/nonce`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceRequest {
    /// The node asking.
    pub node_id: String,
}

/// Answer to `POST /v1/attest/nonce`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceResponse {
    /// The nonce to put in the quote's `qualifyingData`.
    #[serde(with = "crate::b64")]
    pub nonce: Vec<u8>,
    /// Seconds the nonce stays valid; it is good for one attestation.
    pub expires_in_s: u64,
    /// The SHA-256 PCRs to quote.
    pub pcrs: Vec<u32>,
}

/// When in the turnover an attestation is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Right after the ramdisk booted, before any disk is touched.
    #[default]
    Boot,
    /// After the steps, just before handing the node to the tenant.
    Handoff,
}

/// Body of `POST /v1/attest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The node attesting.
    pub node_id: String,
    /// Hex TPM name of the AK that signed the quote.
    pub ak_name: String,
    /// The nonce from [`NonceResponse`].
    #[serde(with = "crate::b64")]
    pub nonce: Vec<u8>,
    /// The marshalled `TPMS_ATTEST` the TPM signed.
    #[serde(with = "crate::b64")]
    pub quote: Vec<u8>,
    /// The marshalled `TPMT_SIGNATURE`.
    #[serde(with = "crate::b64")]
    pub signature: Vec<u8>,
    /// The quoted PCRs' values.
    pub pcrs: PcrBank,
    /// The firmware's TCG event log.
    #[serde(with = "crate::b64::option", default)]
    pub event_log: Option<Vec<u8>>,
    /// Boot or handoff.
    #[serde(default)]
    pub phase: Phase,
    /// The agent's measured log ([`crate::agentlog`]), replayed to the
    /// quoted [`crate::agentlog::AGENT_PCR`]; empty at boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_log: Vec<crate::agentlog::AgentEvent>,
}

/// The outcome of an attestation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Evidence is genuine and matches the policy.
    Ok,
    /// Evidence is missing, forged, stale, or does not match the policy.
    Failed,
}

/// A policy, by name and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRef {
    pub name: String,
    pub version: u32,
}

/// The server's decision on one attestation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// The audit-log id of this attestation.
    pub attestation_id: i64,
    pub node_id: String,
    pub status: Status,
    pub phase: Phase,
    /// The policy applied, when the evidence got that far.
    pub policy: Option<PolicyRef>,
    /// Why it failed; empty when [`Status::Ok`].
    pub reasons: Vec<Reason>,
    /// RFC 3339 UTC.
    pub time: String,
    /// Only in the reply to the `POST /v1/attest` that earned it, and only
    /// when OK: the bearer token of the agent's session (plan, progress,
    /// console, step results). It is bound to this node, its AK and this
    /// attestation's nonce, and never stored or listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Notes on a verdict that is OK, shaped like reasons: e.g. that the
    /// TPM was not shut down orderly before this boot (an unsafe clock the
    /// server accepted after a TPM reset, code `clock-unsafe`), or that the
    /// node is quarantined. Only in the reply to `POST /v1/attest`, never
    /// stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Reason>,
}

/// One reason a verdict failed: what, where, expected and got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// Stable machine-readable kind (see [`codes`]).
    pub code: String,
    /// The PCR concerned, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr: Option<u32>,
    /// The event concerned, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub got: Option<String>,
    /// The sentence for a person, e.g. "PCR7: SecureBoot changed from 0 to 1".
    pub message: String,
}

impl Reason {
    /// A reason with only a code and a message.
    pub fn new(code: &str, message: impl Into<String>) -> Reason {
        Reason {
            code: code.to_owned(),
            pcr: None,
            event: None,
            expected: None,
            got: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An event of the log, as a reason names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRef {
    /// Position in the log (0 = the Spec ID event).
    pub index: usize,
    /// e.g. `EV_EFI_VARIABLE_DRIVER_CONFIG`.
    pub event_type: String,
    /// What the event is about, e.g. `SecureBoot`, `Linux initrd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The stable codes of [`Reason::code`].
pub mod codes {
    pub const NODE_UNKNOWN: &str = "node-unknown";
    pub const NOT_ENROLLED: &str = "ak-not-enrolled";
    pub const AK_UNKNOWN: &str = "ak-unknown";
    pub const NONCE_UNKNOWN: &str = "nonce-unknown";
    pub const NONCE_REPLAYED: &str = "nonce-replayed";
    pub const NONCE_EXPIRED: &str = "nonce-expired";
    pub const NONCE_OTHER_NODE: &str = "nonce-other-node";
    pub const QUOTE_MALFORMED: &str = "quote-malformed";
    pub const SIGNATURE: &str = "signature-invalid";
    pub const NONCE_MISMATCH: &str = "quote-nonce-mismatch";
    pub const PCR_DIGEST: &str = "pcr-digest-mismatch";
    pub const PCR_SELECTION: &str = "pcr-selection";
    pub const CLOCK_UNSAFE: &str = "clock-unsafe";
    pub const RESET_BACKWARDS: &str = "reset-count-backwards";
    pub const RESTART_BACKWARDS: &str = "restart-count-backwards";
    pub const EVENT_LOG_MISSING: &str = "event-log-missing";
    pub const EVENT_LOG_MALFORMED: &str = "event-log-malformed";
    pub const LOG_MISMATCH: &str = "event-log-mismatch";
    pub const NO_POLICY: &str = "no-policy";
    pub const POLICY_PCR: &str = "policy-pcr";
    pub const POLICY_EVENT: &str = "policy-event";
    /// An agent-log event is malformed (wrong PCR, digest shape, missing
    /// or unparseable record), or the log is too long.
    pub const AGENT_LOG_MALFORMED: &str = "agent-log-malformed";
    /// An agent-log record does not hash to the digest its event extended.
    pub const AGENT_RECORD_MISMATCH: &str = "agent-record-mismatch";
    /// Agent-log events out of step order (snapshot → wipe → image → handoff).
    pub const AGENT_LOG_ORDER: &str = "agent-log-order";
    /// The agent's log lacks a step the plan asked for, or has one it did not.
    pub const AGENT_LOG_STEPS: &str = "agent-log-steps";
    /// A step's record says it did not do what the plan asked (a disk not
    /// clean, another image).
    pub const AGENT_STEP_RESULT: &str = "agent-step-result";
    /// The agent's log does not replay to the quoted PCR 13.
    pub const AGENT_LOG_REPLAY: &str = "agent-log-replay";
    /// A boot-phase attestation carried an agent log (nothing is measured
    /// before the first verdict).
    pub const AGENT_LOG_AT_BOOT: &str = "agent-log-at-boot";
    /// A note, not a failure: an OK boot verdict of a quarantined node,
    /// which gets no session (and so no plan) until an owner or admin
    /// releases it.
    pub const QUARANTINED: &str = "quarantined";
}

/// Body of `PUT /v1/policies/{name}`: a new version of a policy.
///
/// A PCR passes when its replayed value is one of `values`, or when its
/// events (`EV_NO_ACTION` excluded) match `events` one for one: same type,
/// and a digest among the listed ones. A policy must name at least one PCR
/// and each PCR rule must say something: there is no accept-all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// Set by the server when stored; ignored on upload.
    #[serde(default)]
    pub version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// SHA-256 PCR index → rule.
    pub pcrs: BTreeMap<u32, PcrRule>,
}

/// What one PCR must look like.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrRule {
    /// Accepted final values (hex).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// The expected events, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRule>,
}

/// One expected event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRule {
    /// Event type name, e.g. `EV_EFI_BOOT_SERVICES_APPLICATION`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Accepted SHA-256 digests (hex); one of them must match.
    pub digests: Vec<String>,
    /// What this event is, for people (e.g. `SecureBoot`, `ramdisk kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The event data of the reference (hex), kept for EFI variables so a
    /// failure can say "changed from 0 to 1".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// `GET /v1/policies`: name → latest version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyList {
    pub policies: Vec<PolicyRef>,
}

/// `PUT /v1/nodes/{id}/policy` / `PUT /v1/groups/{group}/policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyAssignment {
    /// The policy's name; its latest version applies at each attestation.
    pub policy: String,
}

/// `POST /v1/ek-allowlist`: an owner registers an EK before the node boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EkRegistration {
    /// Hex SHA-256 of the EK's DER SubjectPublicKeyInfo (= the node id).
    pub ek_sha256: String,
    /// Node group whose policy applies, if any.
    #[serde(default)]
    pub group: Option<String>,
    /// Free text (asset tag, rack position).
    #[serde(default)]
    pub note: Option<String>,
}

/// One row of `GET /v1/attestations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationRecord {
    pub verdict: Verdict,
    /// TPM resetCount / restartCount from the quote, when it parsed.
    pub reset_count: Option<u32>,
    pub restart_count: Option<u32>,
}

/// `GET /v1/attestations[?node=ID]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationList {
    pub attestations: Vec<AttestationRecord>,
}

/// Largest event log accepted (real ones are 5–100 KB).
pub const MAX_EVENT_LOG: usize = 4 * 1024 * 1024;

fn is_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl EnrollRequest {
    /// Checks what serde cannot: version, algorithms, sizes.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_protocol(self.protocol)?;
        self.ek.validate("ek")?;
        if ![AK_RSA, AK_ECC].contains(&self.ak.algorithm.as_str()) {
            return Err(field_err(
                "ak.algorithm",
                format!(
                    "unsupported AK algorithm {:?} (expected {AK_RSA} or {AK_ECC})",
                    self.ak.algorithm
                ),
            ));
        }
        if self.ak.tpm_public.is_empty() || self.ak.tpm_public.len() > 4096 {
            return Err(field_err("ak.tpm_public", "must be 1 to 4096 bytes"));
        }
        Ok(())
    }
}

impl AttestRequest {
    /// Checks what serde cannot: version, id and digest shapes, sizes.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_protocol(self.protocol)?;
        if self.node_id.len() != 64 || !is_hex(&self.node_id) {
            return Err(field_err("node_id", "must be 64 lowercase hex digits"));
        }
        if self.ak_name.is_empty() || self.ak_name.len() > 132 || !is_hex(&self.ak_name) {
            return Err(field_err("ak_name", "must be a lowercase hex TPM name"));
        }
        if self.nonce.is_empty() || self.nonce.len() > 64 {
            return Err(field_err("nonce", "must be 1 to 64 bytes"));
        }
        if self.quote.is_empty() || self.quote.len() > 4096 {
            return Err(field_err("quote", "must be 1 to 4096 bytes"));
        }
        if self.signature.is_empty() || self.signature.len() > 4096 {
            return Err(field_err("signature", "must be 1 to 4096 bytes"));
        }
        self.pcrs.validate("pcrs")?;
        if self
            .event_log
            .as_ref()
            .is_some_and(|l| l.len() > MAX_EVENT_LOG)
        {
            return Err(field_err("event_log", "is larger than 4 MiB"));
        }
        Ok(())
    }
}

/// `GET /v1/nodes/{id}/ak`: the AK bound at the node's latest enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundAkInfo {
    pub node_id: String,
    /// [`AK_RSA`] or [`AK_ECC`].
    pub algorithm: String,
    /// Hex TPM name.
    pub name: String,
    /// Why the EK was trusted when the AK was bound.
    pub ek_trust: String,
    /// RFC 3339 UTC.
    pub bound_at: String,
    /// Enrollments of this node so far (one per boot).
    pub enroll_count: u64,
}
