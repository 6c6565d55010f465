//! Deciding one attestation from its evidence: the whole chain of checks,
//! in order, each failure with its own reason.
//!
//! This module owns the order of the checks and what each failure says:
//! nonce (single use, unexpired, issued to this node) → node and AK
//! enrolled, and the AK named is the one bound → quote (signature, magic
//! and type, nonce, PCR digest, clock `safe`) → resetCount / restartCount
//! never backwards → a policy exists and the quote covers its PCRs → the
//! event log parses and replays to the quoted PCRs → the agent's measured
//! log (PCR 13; at the handoff phase, against what the plan asked for) →
//! the policy. It is pure (no database, no network) so the benchmark
//! measures exactly what the server runs; the caller stores the outcome and
//! the new clock.
//!
//! An unsafe clock (`clockInfo.safe = NO`: the TPM lost power without
//! TPM2_Shutdown and has not saved its clock since, so its Clock may repeat
//! values it showed before) is accepted only when a TPM reset explains it:
//! the quote's resetCount is higher than that of the node's last accepted
//! quote, or equal to it when that quote was itself unsafe (the same reset
//! cycle, e.g. the final attestation of the boot after a power cut). The
//! server orders quotes by resetCount/restartCount, never by Clock, and
//! freshness comes from the nonce, so nothing it relies on is lost; the
//! verdict carries a note saying the TPM was not shut down orderly. An
//! unsafe clock without a reset — or from a node the server has no earlier
//! quote of — is still refused (`clock-unsafe`).

use std::collections::BTreeMap;

use warden_protocol::agentlog::{self, Expectation, VerifiedLog, AGENT_PCR};
use warden_protocol::attest::Policy;
use warden_protocol::attest::{codes, AttestRequest, Phase, Reason};
use warden_protocol::eventlog::{self, HashAlg};
use warden_protocol::policy;
use warden_protocol::tpm::quote::{self, ClockInfo, QuoteError, VerifiedQuote};
use warden_protocol::tpm::Public;

use crate::nonces::NonceStore;

/// What the server knows of a node when it attests.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The AK bound at the node's latest enrollment, if any.
    pub ak: Option<BoundAk>,
    /// resetCount / restartCount of the node's latest verified quote.
    pub last_clock: Option<(u32, u32)>,
    /// Whether that quote said `clockInfo.safe = NO` (it was accepted after
    /// a TPM reset): later quotes of the same reset cycle may be unsafe too.
    pub last_clock_unsafe: bool,
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
    /// attestation may be learned from. False when the agent's measured
    /// log failed its check.
    pub evidence_ok: bool,
    /// The agent's measured log, when one was sent, PCR 13 was quoted and
    /// the log passed [`agentlog::check`] (or, without an expectation,
    /// [`agentlog::check_without_plan`]): the typed records for the report.
    pub agent_log: Option<VerifiedLog>,
    /// Warnings that did not fail the attestation (for the verdict), e.g.
    /// that the TPM was not shut down orderly before this quote.
    pub notes: Vec<String>,
}

/// Runs every check on `req`. `node` is `None` for a node the server has
/// never seen; `policy` is the node's policy, if it has one; `expect` is
/// what the node's running plan asked of the agent, for a handoff-phase
/// attestation (then PCR 13 must be quoted and the agent's log must pass
/// [`agentlog::check`]).
pub fn verify(
    req: &AttestRequest,
    nonces: &NonceStore,
    node: Option<&NodeFacts>,
    policy: Option<&Policy>,
    expect: Option<&Expectation>,
) -> Outcome {
    let fail = |reason: Reason| Outcome {
        reasons: vec![reason],
        clock: None,
        evidence_ok: false,
        agent_log: None,
        notes: Vec::new(),
    };
    if let Err(e) = nonces.take(&req.nonce, &req.node_id) {
        return fail(Reason::new(e.code, e.message));
    }
    if req.phase == Phase::Boot && !req.agent_log.is_empty() {
        return fail(Reason {
            pcr: Some(AGENT_PCR),
            got: Some(format!("{} events", req.agent_log.len())),
            ..Reason::new(
                codes::AGENT_LOG_AT_BOOT,
                format!(
                    "a boot-phase attestation carried an agent log of {} events: the agent measures nothing into PCR {AGENT_PCR} before its first verdict",
                    req.agent_log.len()
                ),
            )
        });
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
    let mut notes = Vec::new();
    let verified =
        match quote::verify_quote(&ak.public, &req.quote, &req.signature, &req.nonce, &quoted) {
            Ok(v) => v,
            Err(QuoteError::ClockNotSafe { .. }) => match unsafe_clock(req, node) {
                Ok((v, note)) => {
                    notes.push(note);
                    v
                }
                Err(reason) => return fail(*reason),
            },
            Err(e) => return fail(quote_reason(&e, &req.node_id)),
        };
    let clock = verified.clock_info;
    let with_clock = |reasons: Vec<Reason>, evidence_ok: bool| Outcome {
        reasons,
        clock: Some(clock),
        evidence_ok,
        agent_log: None,
        notes: notes.clone(),
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
    // At the handoff phase, PCR 13 holds the agent's measured log, which
    // the agent-log check below explains; the firmware log explains the
    // rest. Otherwise PCR 13, when quoted, must read as the firmware left it.
    let agent_checked =
        req.phase == Phase::Handoff && (expect.is_some() || !req.agent_log.is_empty());
    let firmware_pcrs: Vec<u32> = verified
        .pcrs
        .iter()
        .copied()
        .filter(|&p| !(agent_checked && p == AGENT_PCR))
        .collect();
    let mismatches = eventlog::compare(&log, HashAlg::Sha256, &replayed, &quoted, &firmware_pcrs);
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

    let (agent_reasons, agent_log) = if agent_checked {
        agent_log_check(req, &quoted, &verified.pcrs, &replayed, expect)
    } else {
        (Vec::new(), None)
    };
    let firmware = firmware_policy(req, policy, &verified.pcrs, &log, &replayed);
    let agent_ok = agent_reasons.is_empty();
    let mut reasons = agent_reasons;
    reasons.extend(firmware.0);
    Outcome {
        reasons,
        clock: Some(clock),
        evidence_ok: firmware.1 && agent_ok,
        agent_log,
        notes,
    }
}

/// A quote whose one fault is `clockInfo.safe = NO`. [`quote::verify_quote`]
/// checks `safe` last, so the signature, nonce, selection and PCR digest
/// all passed (a unit test holds it to that). Accepted, with the note for
/// the verdict, when a TPM reset explains the unsafe clock (module doc);
/// otherwise the `clock-unsafe` reason.
fn unsafe_clock(
    req: &AttestRequest,
    node: &NodeFacts,
) -> Result<(VerifiedQuote, String), Box<Reason>> {
    let attest =
        quote::parse_attest(&req.quote).map_err(|e| Box::new(quote_reason(&e, &req.node_id)))?;
    let clock = attest.clock_info;
    let explained = node.last_clock.is_some_and(|(reset, _)| {
        clock.reset_count > reset || (clock.reset_count == reset && node.last_clock_unsafe)
    });
    if !explained {
        let last = node
            .last_clock
            .map_or("no earlier quote".to_string(), |(reset, _)| {
                format!("resetCount {reset} in its last accepted quote")
            });
        return Err(Box::new(Reason {
            expected: Some("clockInfo.safe 1, or 0 with a higher resetCount".into()),
            got: Some(format!(
                "clockInfo.safe {} with resetCount {}",
                clock.safe, clock.reset_count
            )),
            ..Reason::new(
                codes::CLOCK_UNSAFE,
                format!(
                    "quote clockInfo.safe is {}, not 1, and no TPM reset explains it (resetCount {}; node {} has {last}): the TPM clock may have gone backwards, so the quote cannot be ordered",
                    clock.safe, clock.reset_count, req.node_id
                ),
            )
        }));
    }
    let note = format!(
        "the TPM was not shut down orderly before this boot (clockInfo.safe = NO at resetCount {}): its clock is unsafe until the TPM next saves it; accepted because the TPM was reset since the node's last good quote, and the nonce proves this quote fresh",
        clock.reset_count
    );
    let pcrs = attest
        .quoted
        .pcr_select
        .first()
        .map(|s| s.pcrs())
        .unwrap_or_default();
    Ok((
        VerifiedQuote {
            clock_info: clock,
            firmware_version: attest.firmware_version,
            pcrs,
        },
        note,
    ))
}

/// The agent's measured log at the handoff phase: with an expectation,
/// PCR 13 must be quoted and [`agentlog::check`] must pass; without one, a
/// non-empty log is still checked and replayed when PCR 13 was quoted.
/// The log replays from zero, so the firmware must not have extended PCR 13.
fn agent_log_check(
    req: &AttestRequest,
    quoted: &BTreeMap<u32, Vec<u8>>,
    quoted_pcrs: &[u32],
    firmware_replayed: &BTreeMap<u32, Vec<u8>>,
    expect: Option<&Expectation>,
) -> (Vec<Reason>, Option<VerifiedLog>) {
    if let Some(v) = firmware_replayed
        .get(&AGENT_PCR)
        .filter(|v| v.iter().any(|&b| b != 0))
    {
        return (
            vec![Reason {
                pcr: Some(AGENT_PCR),
                expected: Some(hex::encode([0u8; 32])),
                got: Some(hex::encode(v)),
                ..Reason::new(
                    codes::LOG_MISMATCH,
                    format!(
                        "the firmware's event log extends PCR {AGENT_PCR} (to {}), which Warden reserves for the agent's measured log: the agent's steps cannot be checked on this boot path",
                        hex::encode(v)
                    ),
                )
            }],
            None,
        );
    }
    let pcr13 = quoted_pcrs
        .contains(&AGENT_PCR)
        .then(|| quoted.get(&AGENT_PCR))
        .flatten()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok());
    let Some(pcr13) = pcr13 else {
        if expect.is_none() {
            return (Vec::new(), None);
        }
        return (
            vec![Reason {
                pcr: Some(AGENT_PCR),
                expected: Some(format!("PCR {AGENT_PCR} quoted")),
                got: Some(format!("{quoted_pcrs:?}")),
                ..Reason::new(
                    codes::PCR_SELECTION,
                    format!(
                        "the handoff-phase quote covers PCRs {quoted_pcrs:?} but not PCR {AGENT_PCR}, where the agent measures its steps: the turnover's steps cannot be checked"
                    ),
                )
            }],
            None,
        );
    };
    let checked = match expect {
        Some(expect) => agentlog::check(&req.agent_log, &pcr13, expect),
        None => agentlog::check_without_plan(&req.agent_log, &pcr13),
    };
    match checked {
        Ok(v) => (Vec::new(), Some(v)),
        Err(reasons) => (reasons, None),
    }
}

/// The firmware policy's reasons, and whether the evidence may be learned
/// from.
fn firmware_policy(
    req: &AttestRequest,
    policy: Option<&Policy>,
    quoted_pcrs: &[u32],
    log: &eventlog::EventLog,
    replayed: &BTreeMap<u32, Vec<u8>>,
) -> (Vec<Reason>, bool) {
    let Some(policy) = policy else {
        return (
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
    let missing = policy::missing_pcrs(policy, quoted_pcrs);
    if !missing.is_empty() {
        return (
            vec![Reason {
                expected: Some(format!("{:?}", policy.pcrs.keys().collect::<Vec<_>>())),
                got: Some(format!("{quoted_pcrs:?}")),
                ..Reason::new(
                    codes::PCR_SELECTION,
                    format!(
                        "the quote covers PCRs {:?} but policy {} v{} needs PCR {:?} too",
                        quoted_pcrs, policy.name, policy.version, missing
                    ),
                )
            }],
            true,
        );
    }
    (policy::evaluate(policy, log, replayed), true)
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

#[cfg(test)]
mod tests {
    //! The whole chain on quotes built here from the spec layout and signed
    //! by a software P-256 AK, over the captured OVMF + swtpm event log and
    //! its PCR values, plus PCR 13 as each test needs it.

    use std::time::Duration;

    use p256::ecdsa::signature::Signer;
    use sha2::{Digest, Sha256};
    use warden_protocol::agentlog::{AgentEvent, EventKind};
    use warden_protocol::attest::PcrRule;
    use warden_protocol::hello::PcrBank;
    use warden_protocol::tpm::{alg, curve, parse_tpmt_public};
    use warden_protocol::turnover::Handoff;
    use warden_protocol::wipe::{self, DiskId, DiskRecord, Method};

    use super::*;

    const EVENT_LOG: &[u8] = include_bytes!("../../protocol/tests/data/ovmf-swtpm-6.1.eventlog");
    const PCRS_JSON: &str = include_str!("../../protocol/tests/data/ovmf-swtpm-6.1.pcrs.json");
    const NODE: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn push2b(b: &mut Vec<u8>, data: &[u8]) {
        b.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        b.extend_from_slice(data);
    }

    fn key() -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap()
    }

    /// TPMT_PUBLIC of a restricted P-256 ECDSA-SHA256 signing key.
    fn ak() -> Public {
        let point = key().verifying_key().to_encoded_point(false);
        let mut b = Vec::new();
        b.extend_from_slice(&alg::ECC.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&0x0005_0072u32.to_be_bytes());
        push2b(&mut b, &[]);
        b.extend_from_slice(&alg::NULL.to_be_bytes());
        b.extend_from_slice(&alg::ECDSA.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
        b.extend_from_slice(&alg::NULL.to_be_bytes());
        push2b(&mut b, point.x().unwrap());
        push2b(&mut b, point.y().unwrap());
        parse_tpmt_public(&b).unwrap()
    }

    /// A signed TPMS_ATTEST quoting `values` (SHA-256 bank) over `nonce`,
    /// and its TPMT_SIGNATURE, with resetCount `reset` and
    /// `clockInfo.safe` = `safe`.
    fn quote_at(
        nonce: &[u8],
        values: &BTreeMap<u32, Vec<u8>>,
        reset: u32,
        safe: u8,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut select = vec![0u8; 3];
        let mut concat = Vec::new();
        for (pcr, v) in values {
            select[usize::try_from(pcr / 8).unwrap()] |= 1 << (pcr % 8);
            concat.extend_from_slice(v);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&0xFF54_4347u32.to_be_bytes());
        b.extend_from_slice(&0x8018u16.to_be_bytes());
        push2b(&mut b, &[0x00, 0x0b, 0xaa]);
        push2b(&mut b, nonce);
        b.extend_from_slice(&1000u64.to_be_bytes());
        b.extend_from_slice(&reset.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.push(safe);
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.push(3);
        b.extend_from_slice(&select);
        push2b(&mut b, &Sha256::digest(&concat));
        let sig: p256::ecdsa::Signature = key().sign(&b);
        let (r, s) = sig.split_bytes();
        let mut sb = Vec::new();
        sb.extend_from_slice(&alg::ECDSA.to_be_bytes());
        sb.extend_from_slice(&alg::SHA256.to_be_bytes());
        push2b(&mut sb, &r);
        push2b(&mut sb, &s);
        (b, sb)
    }

    fn fixture_pcrs() -> BTreeMap<u32, String> {
        let v: serde_json::Value = serde_json::from_str(PCRS_JSON).unwrap();
        (0..10)
            .map(|i| (i, v["values"][i.to_string()].as_str().unwrap().to_owned()))
            .collect()
    }

    fn wipe_event(name: &str) -> AgentEvent {
        let record = DiskRecord {
            disk: DiskId {
                name: name.into(),
                path: format!("/dev/{name}"),
                model: None,
                serial: None,
                size_bytes: 1 << 20,
            },
            requested: Method::Zeroout,
            attempts: Vec::new(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
            bytes_written: 1 << 20,
            status: wipe::Status::Clean,
            reason: None,
        };
        AgentEvent {
            pcr: AGENT_PCR,
            kind: EventKind::Wipe,
            digest: record.digest(),
            record: Some(String::from_utf8(record.canonical_json()).unwrap()),
            description: format!("wipe /dev/{name}"),
        }
    }

    fn expectation() -> Expectation {
        Expectation {
            snapshot: false,
            min_wipes: 2,
            image: false,
            disk: None,
            handoff: Some(Handoff::Poweroff),
        }
    }

    /// What PCR 13 reads after the agent measured `log`.
    fn pcr13_of(log: &[AgentEvent]) -> [u8; 32] {
        let digests: Vec<[u8; 32]> = log
            .iter()
            .map(|e| hex::decode(&e.digest).unwrap().try_into().unwrap())
            .collect();
        agentlog::replay(&digests)
    }

    /// Runs [`verify`] on a fresh quote of PCRs 0–9 (the fixture) plus
    /// PCR 13 reading `pcr13` when given.
    fn run(
        phase: Phase,
        pcr13: Option<[u8; 32]>,
        agent_log: Vec<AgentEvent>,
        expect: Option<&Expectation>,
    ) -> Outcome {
        let known = NodeFacts {
            ak: None,
            last_clock: None,
            last_clock_unsafe: false,
        };
        run_clocked(phase, pcr13, agent_log, expect, (1, 1), &known)
    }

    /// A boot-phase quote with resetCount and `safe` from `clock`, of a
    /// node the server knows as `known` (its clock facts; the AK is this
    /// module's).
    fn boot_with_clock(clock: (u32, u8), known: &NodeFacts) -> Outcome {
        run_clocked(Phase::Boot, Some([0; 32]), Vec::new(), None, clock, known)
    }

    fn run_clocked(
        phase: Phase,
        pcr13: Option<[u8; 32]>,
        agent_log: Vec<AgentEvent>,
        expect: Option<&Expectation>,
        clock: (u32, u8),
        known: &NodeFacts,
    ) -> Outcome {
        let mut values = fixture_pcrs();
        if let Some(v) = pcr13 {
            values.insert(AGENT_PCR, hex::encode(v));
        }
        let raw: BTreeMap<u32, Vec<u8>> = values
            .iter()
            .map(|(k, v)| (*k, hex::decode(v).unwrap()))
            .collect();
        let nonce = b"verify.rs unit test nonce 000001".to_vec();
        let nonces = NonceStore::new(Duration::from_secs(60));
        nonces.register(nonce.clone(), NODE);
        let (attest, signature) = quote_at(&nonce, &raw, clock.0, clock.1);
        let ak = ak();
        let name = ak.name().unwrap();
        let req = AttestRequest {
            protocol: warden_protocol::PROTOCOL_VERSION,
            node_id: NODE.into(),
            ak_name: hex::encode(&name),
            nonce,
            quote: attest,
            signature,
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values,
            },
            event_log: Some(EVENT_LOG.to_vec()),
            phase,
            agent_log,
        };
        req.validate().unwrap();
        let facts = NodeFacts {
            ak: Some(BoundAk { name, public: ak }),
            ..known.clone()
        };
        let policy = Policy {
            name: "fw".into(),
            version: 1,
            pcrs: [(
                0,
                PcrRule {
                    values: vec![fixture_pcrs()[&0].clone()],
                    events: Vec::new(),
                },
            )]
            .into_iter()
            .collect(),
            ..Policy::default()
        };
        verify(&req, &nonces, Some(&facts), Some(&policy), expect)
    }

    fn codes_of(o: &Outcome) -> Vec<&str> {
        o.reasons.iter().map(|r| r.code.as_str()).collect()
    }

    #[test]
    fn boot_phase_passes_with_pcr13_zero_and_refuses_an_agent_log() {
        let o = run(Phase::Boot, Some([0; 32]), Vec::new(), None);
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert!(o.evidence_ok);
        assert_eq!(o.agent_log, None);
        let log = vec![wipe_event("vda")];
        let o = run(Phase::Boot, Some(pcr13_of(&log)), log, None);
        assert_eq!(codes_of(&o), [codes::AGENT_LOG_AT_BOOT]);
        assert_eq!(o.reasons[0].pcr, Some(13));
    }

    #[test]
    fn handoff_with_expectation_passes_and_hands_out_the_log() {
        let log = vec![wipe_event("vda"), wipe_event("vdb")];
        let o = run(
            Phase::Handoff,
            Some(pcr13_of(&log)),
            log,
            Some(&expectation()),
        );
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert!(o.evidence_ok);
        let v = o.agent_log.unwrap();
        assert_eq!(v.disks.len(), 2);
        assert_eq!(v.disks[1].disk.path, "/dev/vdb");
    }

    #[test]
    fn handoff_with_expectation_fails_on_an_altered_or_dropped_record() {
        let log = vec![wipe_event("vda"), wipe_event("vdb")];
        let pcr13 = pcr13_of(&log);
        let mut altered = log.clone();
        altered[1].record = altered[1]
            .record
            .as_ref()
            .map(|r| r.replacen("vdb", "vdc", 1));
        let o = run(Phase::Handoff, Some(pcr13), altered, Some(&expectation()));
        assert_eq!(codes_of(&o), [codes::AGENT_RECORD_MISMATCH]);
        assert_eq!(o.reasons[0].event.as_ref().unwrap().index, 1);
        assert!(!o.evidence_ok);
        assert_eq!(o.agent_log, None);

        let o = run(
            Phase::Handoff,
            Some(pcr13),
            log[..1].to_vec(),
            Some(&expectation()),
        );
        assert_eq!(
            codes_of(&o),
            [codes::AGENT_LOG_STEPS, codes::AGENT_LOG_REPLAY],
            "{:?}",
            o.reasons
        );
    }

    #[test]
    fn handoff_with_expectation_needs_pcr13_quoted() {
        let log = vec![wipe_event("vda"), wipe_event("vdb")];
        let o = run(Phase::Handoff, None, log, Some(&expectation()));
        assert_eq!(codes_of(&o), [codes::PCR_SELECTION]);
        assert_eq!(o.reasons[0].pcr, Some(13));
    }

    #[test]
    fn handoff_without_expectation_still_replays_a_log() {
        let log = vec![wipe_event("vda")];
        let o = run(Phase::Handoff, Some([9; 32]), log.clone(), None);
        assert_eq!(codes_of(&o), [codes::AGENT_LOG_REPLAY]);
        assert!(o.reasons[0]
            .message
            .starts_with("PCR13: the agent's log replays to"));
        let o = run(Phase::Handoff, Some(pcr13_of(&log)), log.clone(), None);
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert_eq!(o.agent_log.unwrap().disks.len(), 1);
        // PCR 13 not quoted: nothing to replay against, as before.
        let o = run(Phase::Handoff, None, log, None);
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert_eq!(o.agent_log, None);
        // No log and no plan: PCR 13 must read as the firmware left it.
        let o = run(Phase::Handoff, Some([9; 32]), Vec::new(), None);
        assert_eq!(codes_of(&o), [codes::LOG_MISMATCH]);
    }

    fn clock_facts(last_clock: Option<(u32, u32)>, last_clock_unsafe: bool) -> NodeFacts {
        NodeFacts {
            ak: None,
            last_clock,
            last_clock_unsafe,
        }
    }

    #[test]
    fn an_unsafe_clock_passes_after_a_reset_with_a_note_and_not_without() {
        // Safe: no note, whatever the history.
        let o = boot_with_clock((5, 1), &clock_facts(Some((5, 0)), false));
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert!(o.notes.is_empty(), "{:?}", o.notes);

        // Unsafe after a reset (5 -> 6): accepted, noted, clock kept.
        let o = boot_with_clock((6, 0), &clock_facts(Some((5, 0)), false));
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert_eq!(o.notes.len(), 1, "{:?}", o.notes);
        assert!(
            o.notes[0].contains("not shut down orderly"),
            "{:?}",
            o.notes
        );
        assert!(o.notes[0].contains("resetCount 6"), "{:?}", o.notes);
        assert_eq!(o.clock.map(|c| (c.reset_count, c.safe)), Some((6, 0)));

        // The same reset cycle, still unsafe (the final attestation of
        // that boot): accepted while the last accepted quote was unsafe.
        let o = boot_with_clock((6, 0), &clock_facts(Some((6, 0)), true));
        assert!(o.reasons.is_empty(), "{:?}", o.reasons);
        assert_eq!(o.notes.len(), 1);

        // Unsafe without a reset since a safe quote: refused.
        let o = boot_with_clock((6, 0), &clock_facts(Some((6, 0)), false));
        assert_eq!(codes_of(&o), [codes::CLOCK_UNSAFE]);
        assert!(o.reasons[0].message.contains("no TPM reset explains it"));
        assert!(o.notes.is_empty());
        assert_eq!(o.clock, None, "a refused clock must not be stored");

        // No earlier quote to compare with: refused.
        let o = boot_with_clock((1, 0), &clock_facts(None, false));
        assert_eq!(codes_of(&o), [codes::CLOCK_UNSAFE]);
        assert!(o.reasons[0].message.contains("no earlier quote"));

        // resetCount backwards stays refused, unsafe or not.
        let o = boot_with_clock((4, 0), &clock_facts(Some((5, 0)), true));
        assert_eq!(codes_of(&o), [codes::CLOCK_UNSAFE]);
    }

    #[test]
    fn an_unsafe_clock_never_excuses_a_bad_signature() {
        // The rule leans on verify_quote checking `safe` last: an unsafe
        // quote that fails anything else must fail for that.
        let mut values = fixture_pcrs();
        values.insert(AGENT_PCR, hex::encode([0u8; 32]));
        let raw: BTreeMap<u32, Vec<u8>> = values
            .iter()
            .map(|(k, v)| (*k, hex::decode(v).unwrap()))
            .collect();
        let nonce = b"verify.rs unit test nonce 000002".to_vec();
        let nonces = NonceStore::new(Duration::from_secs(60));
        nonces.register(nonce.clone(), NODE);
        let (mut attest, signature) = quote_at(&nonce, &raw, 9, 0);
        // Changed after signing: the resetCount (offset: magic 4, type 2,
        // signer 2+3, nonce 2+32, clock 8).
        attest[4 + 2 + 5 + 34 + 8 + 3] ^= 1;
        let ak = ak();
        let name = ak.name().unwrap();
        let req = AttestRequest {
            protocol: warden_protocol::PROTOCOL_VERSION,
            node_id: NODE.into(),
            ak_name: hex::encode(&name),
            nonce,
            quote: attest,
            signature,
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values,
            },
            event_log: Some(EVENT_LOG.to_vec()),
            phase: Phase::Boot,
            agent_log: Vec::new(),
        };
        let facts = NodeFacts {
            ak: Some(BoundAk { name, public: ak }),
            last_clock: Some((1, 0)),
            last_clock_unsafe: false,
        };
        let o = verify(&req, &nonces, Some(&facts), None, None);
        assert_eq!(codes_of(&o), [codes::SIGNATURE], "{:?}", o.reasons);
        assert!(o.notes.is_empty());
    }
}
