//! TPM2_Shutdown: telling the TPM the platform is about to lose power.
//!
//! Without it the next boot is an *unorderly* startup: the TPM then reports
//! `clockInfo.safe = NO` until its clock is next saved to NV, and the server
//! refuses quotes whose clock is not safe. The agent sends it right before
//! it powers off or reboots the node (the kernel also sends it from the TPM
//! driver's shutdown hook; a second Shutdown is harmless). It owns nothing
//! else and must never be called while a quote is still to be taken.

use tss_esapi::constants::StartupType;

use super::{describe, Tpm, TpmError};

impl Tpm {
    /// TPM2_Shutdown(CLEAR): an orderly shutdown. After it the TPM accepts
    /// no further command until it is reset.
    pub fn shutdown_clear(&mut self) -> Result<(), TpmError> {
        self.context
            .shutdown(StartupType::Clear)
            .map_err(|e| self.command_error("Shutdown(CLEAR)", describe(e)))?;
        tracing::debug!(tcti = %self.tcti, "TPM shut down (orderly)");
        Ok(())
    }
}
