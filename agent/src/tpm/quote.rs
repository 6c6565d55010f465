//! TPM2_Quote: the AK signs the SHA-256 bank's PCRs together with the
//! server's nonce, and the agent reports the PCR values the quote covers.
//!
//! It owns [`Quote`] (the wire form: signed bytes, signature, PCR values) and
//! the commands that make one. It must never leave the AK, the EK or a session
//! loaded after a call returns, never extend a PCR, and never return PCR values
//! that do not hash to the quote's pcrDigest.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use tss_esapi::{
    handles::KeyHandle,
    interface_types::{algorithm::HashingAlgorithm, structure_tags::AttestationType},
    structures::{
        AttestInfo, Data, Digest, PcrSelectionListBuilder, PcrSlot, Private, Public,
        SignatureScheme,
    },
    traits::Marshall,
};

use super::ak::then_cleanup;
use super::{describe, AttestationKey, Tpm, TpmError, PCR_COUNT};

/// The largest nonce TPM2_Quote accepts: qualifyingData is a TPM2B_DATA,
/// which holds at most sizeof(TPMT_HA) = 64 bytes.
pub const MAX_NONCE_LEN: usize = 64;

/// A quote of SHA-256 PCRs, as the server verifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Marshalled TPMS_ATTEST (the contents of TPM2B_ATTEST, no size
    /// prefix): exactly the bytes the signature covers. tss-esapi 7.7 parses
    /// the TPM's bytes and does not keep them, so these are re-marshalled —
    /// and [`Tpm::quote`] has the TPM verify the signature over them before
    /// returning, so a re-marshalling difference is an error, never a quote
    /// the server would reject.
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (sigAlg ‖ hashAlg ‖ signature).
    pub signature: Vec<u8>,
    /// The quoted PCRs of the SHA-256 bank, by index. SHA-256 of their
    /// concatenation in index order equals the quote's pcrDigest.
    pub pcr_values: BTreeMap<u32, [u8; 32]>,
}

impl Tpm {
    /// Loads `ak` under its EK ([`AttestationKey::ek`]) and quotes `pcrs` of the SHA-256 bank with
    /// `nonce` as qualifyingData, signing with the AK's own scheme
    /// (RSASSA-SHA256 or ECDSA-SHA256). Then reads those PCRs.
    ///
    /// TPM2_Quote does not return the PCR values, only their digest, so they
    /// are read with PCR_Read afterwards — and something may extend a PCR in
    /// between. The values read are therefore checked against the quote's
    /// pcrDigest; on a mismatch the quote and the read are repeated once, and
    /// a second mismatch is an error (PCRs changing that fast mean the node
    /// is not quiet enough to attest).
    ///
    /// `nonce` must be at most [`MAX_NONCE_LEN`] bytes and `pcrs` non-empty,
    /// each below [`PCR_COUNT`]; duplicates are ignored. Errors name the
    /// failing operation (`Quote`, `Load(AK)`, `PCR_Read(SHA-256)`, …).
    pub fn quote(
        &mut self,
        ak: &AttestationKey,
        nonce: &[u8],
        pcrs: &[u32],
    ) -> Result<Quote, TpmError> {
        const OP: &str = "Quote";
        if nonce.len() > MAX_NONCE_LEN {
            return Err(self.command_error(
                OP,
                format!(
                    "nonce is {} bytes; qualifyingData holds at most {MAX_NONCE_LEN}",
                    nonce.len()
                ),
            ));
        }
        let mut pcrs = pcrs.to_vec();
        pcrs.sort_unstable();
        pcrs.dedup();
        if pcrs.is_empty() {
            return Err(self.command_error(OP, "no PCRs selected".to_owned()));
        }
        if let Some(bad) = pcrs.iter().find(|&&index| index >= PCR_COUNT) {
            return Err(self.command_error(
                OP,
                format!(
                    "PCR {bad} does not exist (a bank has PCRs 0–{})",
                    PCR_COUNT - 1
                ),
            ));
        }
        let nonce =
            Data::try_from(nonce.to_vec()).map_err(|e| self.command_error(OP, describe(e)))?;
        // Fails with words if there is no SHA-256 bank, before the TPM would
        // quote an empty selection.
        self.require_sha256_bank()?;

        let (public, private) = self.ak_blobs(ak)?;

        let ek = self.ek_parent(ak.ek)?;
        let result = self.quote_under(ek.key_handle(), public, private, nonce, &pcrs);
        let released = self.release_ek(ek);
        let quote = then_cleanup(result, released)?;
        tracing::debug!(tcti = %self.tcti, algorithm = ak.algorithm.name(), ek = ak.ek.name(), ?pcrs, "PCRs quoted");
        Ok(quote)
    }

    fn quote_under(
        &mut self,
        ek: KeyHandle,
        public: Public,
        private: Private,
        nonce: Data,
        pcrs: &[u32],
    ) -> Result<Quote, TpmError> {
        let ak = tss_esapi::abstraction::ak::load_ak(&mut self.context, ek, None, private, public)
            .map_err(|e| self.command_error("Load(AK)", describe(e)))?;
        let result = self.quote_loaded(ak, nonce, pcrs);
        let flushed = self
            .context
            .flush_context(ak.into())
            .map_err(|e| self.command_error("FlushContext(AK)", describe(e)));
        then_cleanup(result, flushed)
    }

    /// Quotes and reads the PCRs, at most twice (see [`Tpm::quote`]).
    fn quote_loaded(
        &mut self,
        ak: KeyHandle,
        nonce: Data,
        pcrs: &[u32],
    ) -> Result<Quote, TpmError> {
        const OP: &str = "Quote";
        let slots = pcrs
            .iter()
            .map(|index| PcrSlot::try_from(1u32 << index))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.command_error(OP, describe(e)))?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(|e| self.command_error(OP, describe(e)))?;

        for attempt in 1..=2 {
            let (attest, signature) = self
                .context
                .execute_with_nullauth_session(|ctx| {
                    ctx.quote(ak, nonce.clone(), SignatureScheme::Null, selection.clone())
                })
                .map_err(|e| self.command_error(OP, describe(e)))?;
            if attest.attestation_type() != AttestationType::Quote {
                return Err(self.command_error(
                    OP,
                    format!(
                        "TPM answered with a {:?} attestation",
                        attest.attestation_type()
                    ),
                ));
            }
            let AttestInfo::Quote { info } = attest.attested() else {
                return Err(
                    self.command_error(OP, "TPMS_ATTEST holds no TPMS_QUOTE_INFO".to_owned())
                );
            };
            let pcr_digest = info.pcr_digest().value().to_vec();
            let attest_bytes = attest
                .marshall()
                .map_err(|e| self.command_error("marshal TPMS_ATTEST", describe(e)))?;
            let signature_bytes = signature
                .marshall()
                .map_err(|e| self.command_error("marshal TPMT_SIGNATURE", describe(e)))?;

            // tss-esapi hands us a parsed TPMS_ATTEST; make sure the bytes we
            // re-marshalled are the ones the TPM signed.
            let digest = Digest::try_from(Sha256::digest(&attest_bytes).to_vec())
                .map_err(|e| self.command_error("VerifySignature(quote)", describe(e)))?;
            self.context
                .verify_signature(ak, digest, signature)
                .map_err(|e| {
                    self.command_error(
                        "VerifySignature(quote)",
                        format!(
                            "the re-marshalled TPMS_ATTEST is not what the TPM signed: {}",
                            describe(e)
                        ),
                    )
                })?;

            let bank = self.pcr_bank_sha256()?;
            let pcr_values: BTreeMap<u32, [u8; 32]> = pcrs
                .iter()
                .filter_map(|index| bank.get(index).map(|value| (*index, *value)))
                .collect();
            let mut hasher = Sha256::new();
            for value in pcr_values.values() {
                hasher.update(value);
            }
            if pcr_values.len() == pcrs.len() && hasher.finalize().as_slice() == pcr_digest {
                return Ok(Quote {
                    attest: attest_bytes,
                    signature: signature_bytes,
                    pcr_values,
                });
            }
            tracing::warn!(
                tcti = %self.tcti,
                attempt,
                "PCRs changed between TPM2_Quote and PCR_Read; quoting again"
            );
        }
        Err(self.command_error(
            "PCR_Read(SHA-256)",
            format!(
                "PCRs {pcrs:?} changed between TPM2_Quote and PCR_Read twice in a row; \
                 something keeps extending them"
            ),
        ))
    }
}
