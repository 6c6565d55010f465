//! Attestation evidence for tests: puts a captured firmware event log into a
//! fresh swtpm's PCRs, so a host-mode agent quotes exactly what the firmware
//! that wrote the log would have measured.
//!
//! It only ever extends the SHA-256 bank of the TPM it is given (a test's own
//! swtpm). It must never decide what the server should accept: it replays
//! the log as the firmware did, and the server judges.

use warden_agent::tpm::{Tpm, TpmError};
use warden_protocol::eventlog::{self, ParseError, EV_NO_ACTION, TPM_ALG_SHA256};

/// Why a log could not be replayed into a TPM.
#[derive(Debug, thiserror::Error)]
pub enum ReplayIntoTpmError {
    #[error("event log does not parse: {0}")]
    Parse(#[from] ParseError),
    #[error("event {number} (PCR {pcr}, {event_type}) has no 32-byte SHA-256 digest")]
    NoSha256Digest {
        number: usize,
        pcr: u32,
        event_type: String,
    },
    #[error("extending event {number} into PCR {pcr}: {source}")]
    Extend {
        number: usize,
        pcr: u32,
        source: TpmError,
    },
}

/// Extends, in log order, the SHA-256 digest of every event of `log_bytes`
/// that is not `EV_NO_ACTION` into its PCR. On a fresh swtpm (PCRs zero,
/// i.e. a log whose StartupLocality is 0) the SHA-256 bank then holds what
/// the firmware's TPM held. Returns how many events were extended.
pub fn replay_event_log_into_pcrs(
    tpm: &mut Tpm,
    log_bytes: &[u8],
) -> Result<usize, ReplayIntoTpmError> {
    let log = eventlog::parse(log_bytes)?;
    let mut extended = 0;
    for event in &log.events {
        if event.event_type.0 == EV_NO_ACTION {
            continue;
        }
        let digest = event
            .digest(TPM_ALG_SHA256)
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or_else(|| ReplayIntoTpmError::NoSha256Digest {
                number: event.number,
                pcr: event.pcr,
                event_type: event.event_type.to_string(),
            })?;
        tpm.extend_pcr_sha256(event.pcr, &digest)
            .map_err(|source| ReplayIntoTpmError::Extend {
                number: event.number,
                pcr: event.pcr,
                source,
            })?;
        extended += 1;
    }
    Ok(extended)
}

/// The captured OVMF + swtpm event log (QEMU 7.2, OVMF 2022.11, Debian 6.1
/// kernel): `protocol/tests/data/ovmf-swtpm-6.1.eventlog`.
pub fn fixture_event_log() -> std::path::PathBuf {
    crate::workspace_root().join("protocol/tests/data/ovmf-swtpm-6.1.eventlog")
}

/// The SHA-256 PCR values read in the same boot as [`fixture_event_log`]:
/// `protocol/tests/data/ovmf-swtpm-6.1.pcrs.json` (`{"values": {"0": HEX, …}}`).
pub fn fixture_pcrs() -> std::path::PathBuf {
    crate::workspace_root().join("protocol/tests/data/ovmf-swtpm-6.1.pcrs.json")
}
