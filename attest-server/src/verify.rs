//! Deciding one attestation from its evidence: the whole chain of checks,
//! in order, each failure with its own reason.
//!
//! This module owns the order of the checks and what each failure says:
//! nonce (single use, unexpired, issued to this node) → node and AK
//! enrolled, and the AK named is the one bound → quote (signature, magic
//! and type, nonce, PCR digest, clock `safe`) → resetCount / restartCount
//! never backwards → a policy exists and the quote covers its PCRs → the
//! event log parses and replays to the quoted PCRs → the policy. It is pure
//! (no database, no network) so the benchmark measures exactly what the
//! server runs; the caller stores the outcome and the new clock.

use std::collections::BTreeMap;

use warden_protocol::attest::Policy;
use warden_protocol::attest::{codes, AttestRequest, Reason};
use warden_protocol::eventlog::{self, HashAlg};
use warden_protocol::policy;
use warden_protocol::tpm::quote::{self, ClockInfo, QuoteError};
use warden_protocol::tpm::Public;

use crate::nonces::NonceStore;

/// What the server knows of a node when it attests.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The AK bound at the node's latest enrollment, if any.
    pub ak: Option<BoundAk>,
    /// resetCount / restartCount of the node's latest verified quote.
    pub last_clock: Option<(u32, u32)>,
}

/// An enrolled AK.
#[derive(Debug, Clone)]
pub struct BoundAk {
    pub name: Vec<u8>,
    pub public: Public,
}

/// The result of [`verify`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Empty when the attestation passed.
    pub reasons: Vec<Reason>,
    /// The quote's clock, when the quote verified (the caller stores it).
    pub clock: Option<ClockInfo>,
    /// True when the evidence itself is genuine and consistent (quote
    /// verified, log replays to it), whatever the policy said: such an
    /// attestation may be learned from.
    pub evidence_ok: bool,
}

/// Runs every check on `req`. `node` is `None` for a node the server has
/// never seen; `policy` is the node's policy, if it has one.
pub fn verify(
    req: &AttestRequest,
    nonces: &NonceStore,
    node: Option<&NodeFacts>,
    policy: Option<&Policy>,
) -> Outcome {
    let fail = |reason: Reason| Outcome {
        reasons: vec![reason],
        clock: None,
        evidence_ok: false,
    };
    if let Err(e) = nonces.take(&req.nonce, &req.node_id) {
        return fail(Reason::new(e.code, e.message));
    }
    let Some(node) = node else {
        return fail(Reason::new(
            codes::NODE_UNKNOWN,
            format!(
                "node {} is unknown to this server: it must say hello and enroll first",
                req.node_id
            ),
        ));
    };
    let Some(ak) = &node.ak else {
        return fail(Reason::new(
            codes::NOT_ENROLLED,
            format!(
                "node {} has no enrolled AK: enrollment (MakeCredential/ActivateCredential) must succeed before it can attest",
                req.node_id
            ),
        ));
    };
    let presented = req.ak_name.to_ascii_lowercase();
    if presented != hex::encode(&ak.name) {
        return fail(Reason {
            expected: Some(hex::encode(&ak.name)),
            got: Some(presented.clone()),
            ..Reason::new(
                codes::AK_UNKNOWN,
                format!(
                    "AK {presented} is not the AK enrolled for node {} ({})",
                    req.node_id,
                    hex::encode(&ak.name)
                ),
            )
        });
    }

    let mut quoted = BTreeMap::new();
    for (pcr, value) in &req.pcrs.values {
        quoted.insert(*pcr, hex::decode(value).unwrap_or_default());
    }
    let verified =
        match quote::verify_quote(&ak.public, &req.quote, &req.signature, &req.nonce, &quoted) {
            Ok(v) => v,
            Err(e) => return fail(quote_reason(&e, &req.node_id)),
        };
    let clock = verified.clock_info;
    let with_clock = |reasons: Vec<Reason>, evidence_ok: bool| Outcome {
        reasons,
        clock: Some(clock),
        evidence_ok,
    };
    if let Some((reset, restart)) = node.last_clock {
        if clock.reset_count < reset {
            return Outcome {
                clock: None,
                ..fail(Reason {
                    expected: Some(format!(">= {reset}")),
                    got: Some(clock.reset_count.to_string()),
                    ..Reason::new(
                        codes::RESET_BACKWARDS,
                        format!(
                            "TPM resetCount went backwards: {} after {reset} in this node's previous quote (a replayed quote, or the TPM's state was rolled back)",
                            clock.reset_count
                        ),
                    )
                })
            };
        }
        if clock.reset_count == reset && clock.restart_count < restart {
            return Outcome {
                clock: None,
                ..fail(Reason {
                    expected: Some(format!(">= {restart}")),
                    got: Some(clock.restart_count.to_string()),
                    ..Reason::new(
                        codes::RESTART_BACKWARDS,
                        format!(
                            "TPM restartCount went backwards: {} after {restart} with the same resetCount {reset}",
                            clock.restart_count
                        ),
                    )
                })
            };
        }
    }

    let Some(log_bytes) = &req.event_log else {
        return with_clock(
            vec![Reason::new(
                codes::EVENT_LOG_MISSING,
                "no UEFI event log was sent: the quoted PCRs cannot be explained",
            )],
            false,
        );
    };
    let log = match eventlog::parse(log_bytes) {
        Ok(log) => log,
        Err(e) => {
            return with_clock(
                vec![Reason::new(
                    codes::EVENT_LOG_MALFORMED,
                    format!("the event log does not parse: {e}"),
                )],
                false,
            )
        }
    };
    let replayed = match eventlog::replay(&log, HashAlg::Sha256) {
        Ok(r) => r,
        Err(e) => {
            return with_clock(
                vec![Reason::new(
                    codes::EVENT_LOG_MALFORMED,
                    format!("the event log cannot be replayed in the SHA-256 bank: {e}"),
                )],
                false,
            )
        }
    };
    let mismatches = eventlog::compare(&log, HashAlg::Sha256, &replayed, &quoted, &verified.pcrs);
    if !mismatches.is_empty() {
        let reasons = mismatches
            .iter()
            .map(|m| Reason {
                pcr: Some(m.pcr),
                expected: m.quoted.clone(),
                got: Some(m.replayed.clone()),
                ..Reason::new(
                    codes::LOG_MISMATCH,
                    format!("the event log does not match the quote: {m}"),
                )
            })
            .collect();
        return with_clock(reasons, false);
    }

    let Some(policy) = policy else {
        return with_clock(
            vec![Reason::new(
                codes::NO_POLICY,
                format!(
                    "node {} has no policy (assign one to the node or its group; `wardenctl policy learn` drafts one from this attestation)",
                    req.node_id
                ),
            )],
            true,
        );
    };
    let missing = policy::missing_pcrs(policy, &verified.pcrs);
    if !missing.is_empty() {
        return with_clock(
            vec![Reason {
                expected: Some(format!("{:?}", policy.pcrs.keys().collect::<Vec<_>>())),
                got: Some(format!("{:?}", verified.pcrs)),
                ..Reason::new(
                    codes::PCR_SELECTION,
                    format!(
                        "the quote covers PCRs {:?} but policy {} v{} needs PCR {:?} too",
                        verified.pcrs, policy.name, policy.version, missing
                    ),
                )
            }],
            true,
        );
    }
    with_clock(policy::evaluate(policy, &log, &replayed), true)
}

/// The reason for a quote that failed [`quote::verify_quote`].
fn quote_reason(e: &QuoteError, node_id: &str) -> Reason {
    let code = match e {
        QuoteError::BadSignature { .. }
        | QuoteError::SignatureAlgMismatch { .. }
        | QuoteError::SignatureHashNotSha256 { .. }
        | QuoteError::UnsupportedSignatureAlg { .. }
        | QuoteError::AkNotRestrictedSigning { .. }
        | QuoteError::AkKey(_) => codes::SIGNATURE,
        QuoteError::NonceMismatch { .. } => codes::NONCE_MISMATCH,
        QuoteError::PcrDigestMismatch { .. } | QuoteError::BadPcrValue { .. } => codes::PCR_DIGEST,
        QuoteError::PcrBankCount { .. }
        | QuoteError::PcrBankNotSha256 { .. }
        | QuoteError::PcrsNotQuoted { .. }
        | QuoteError::PcrValuesMissing { .. } => codes::PCR_SELECTION,
        QuoteError::ClockNotSafe { .. } => codes::CLOCK_UNSAFE,
        QuoteError::Truncated { .. }
        | QuoteError::TrailingBytes { .. }
        | QuoteError::NotTpmGenerated { .. }
        | QuoteError::WrongAttestType { .. } => codes::QUOTE_MALFORMED,
    };
    let message = if code == codes::SIGNATURE {
        format!("{e} (node {node_id}'s enrolled AK did not sign this quote)")
    } else {
        e.to_string()
    };
    Reason::new(code, message)
}
