//! TPM2_PCR_Extend of the SHA-256 bank: how the agent measures its own steps
//! (and how tests replay a captured firmware event log into a fresh swtpm).
//!
//! It owns nothing but the one command. It must never extend any bank but
//! SHA-256 (the only one Warden attests), never extend a PCR the firmware
//! owns on a node (the caller chooses the index; this module only checks it
//! exists), and never reset a PCR.

use tss_esapi::{
    handles::PcrHandle,
    interface_types::algorithm::HashingAlgorithm,
    structures::{Digest, DigestValues},
};

use super::{describe, Tpm, TpmError, PCR_COUNT};

/// ESYS's PCR handles by index. tss-esapi 7.7 offers no `TryFrom<u32>`.
const PCR_HANDLES: [PcrHandle; PCR_COUNT as usize] = [
    PcrHandle::Pcr0,
    PcrHandle::Pcr1,
    PcrHandle::Pcr2,
    PcrHandle::Pcr3,
    PcrHandle::Pcr4,
    PcrHandle::Pcr5,
    PcrHandle::Pcr6,
    PcrHandle::Pcr7,
    PcrHandle::Pcr8,
    PcrHandle::Pcr9,
    PcrHandle::Pcr10,
    PcrHandle::Pcr11,
    PcrHandle::Pcr12,
    PcrHandle::Pcr13,
    PcrHandle::Pcr14,
    PcrHandle::Pcr15,
    PcrHandle::Pcr16,
    PcrHandle::Pcr17,
    PcrHandle::Pcr18,
    PcrHandle::Pcr19,
    PcrHandle::Pcr20,
    PcrHandle::Pcr21,
    PcrHandle::Pcr22,
    PcrHandle::Pcr23,
];

impl Tpm {
    /// TPM2_PCR_Extend of `pcr` in the SHA-256 bank only:
    /// PCR ← SHA-256(PCR ‖ `digest`). Other banks are left alone, so on a TPM
    /// with several banks they no longer agree — which is fine for Warden,
    /// which attests SHA-256 only. Uses the PCR's empty auth value, as every
    /// PC Client PCR has. Errors name `PCR_Extend(SHA-256)` and the PCR.
    pub fn extend_pcr_sha256(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError> {
        const OP: &str = "PCR_Extend(SHA-256)";
        let handle = usize::try_from(pcr)
            .ok()
            .and_then(|index| PCR_HANDLES.get(index))
            .copied()
            .ok_or_else(|| {
                self.command_error(
                    OP,
                    format!(
                        "PCR {pcr} does not exist (a bank has PCRs 0–{})",
                        PCR_COUNT - 1
                    ),
                )
            })?;
        let mut digests = DigestValues::new();
        digests.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec())
                .map_err(|e| self.command_error(OP, format!("PCR {pcr}: {}", describe(e))))?,
        );
        self.context
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, digests))
            .map_err(|e| self.command_error(OP, format!("PCR {pcr}: {}", describe(e))))?;
        tracing::debug!(tcti = %self.tcti, pcr, digest = %hex::encode(digest), "PCR extended");
        Ok(())
    }
}
