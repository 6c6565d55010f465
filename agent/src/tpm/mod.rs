//! The one facade over tss-esapi 7.7: every TPM command the agent sends goes
//! through [`Tpm`]. The TPM is named by a TCTI string, so the same code runs
//! on `device:/dev/tpmrm0` on a node and on `swtpm:host=127.0.0.1,port=P` in
//! tests. Callers see plain bytes, `[u8; 32]`, DER and [`TpmError`] — never a
//! tss-esapi type — so a move to tss-esapi 8 touches only this module.
//!
//! It must never panic (the agent is PID 1), never leave a transient object
//! loaded after a call returns (a real TPM has room for about three), and
//! never write to the TPM's NV or hierarchies: it reads PCRs, derives the
//! EK, which is deterministic from the endorsement seed, and creates and
//! activates an AK under it (`ak.rs`), which lives only as a blob the caller
//! keeps, and quotes PCRs with that AK (`quote.rs`).
//!
//! Two EKs are supported, RSA-2048 (TCG template L-1) and ECC P-256 (L-2).
//! [`Tpm::select_ek`] turns `warden.ek=auto|rsa|ecc` into one of them; the
//! `auto` rule ([`EkFacts::choose`]) is: RSA-2048 if the TPM has an RSA EK
//! certificate (NV 0x01c00002) or no ECC P-256 certificate (NV 0x01c0000a);
//! ECC P-256 when only the ECC certificate is present, or when the TPM does
//! not support RSA-2048. It reads only what the manufacturer fixed, so the
//! same TPM gives the same EK — and the same node id — on every boot.

mod ak;
mod ek;
mod error;
mod pcr;
mod power;
mod quote;

use std::collections::BTreeMap;
use std::str::FromStr;

use tss_esapi::{
    abstraction::{ek as tss_ek, DefaultKey},
    constants::CapabilityType,
    handles::{PersistentTpmHandle, TpmHandle},
    interface_types::{algorithm::HashingAlgorithm, resource_handles::Hierarchy},
    structures::{CapabilityData, PcrSelectionListBuilder, PcrSlot, Public, PublicParameters},
    traits::Marshall,
    Context, TctiNameConf,
};

pub use ak::{AkAlgorithm, AttestationKey};
pub use ek::{EkAlgorithm, EkChoice, EkFacts, EndorsementKey};
pub use error::TpmError;
pub use quote::{Quote, MAX_NONCE_LEN};

use error::{describe, is_tpm_answer};

/// PCRs in a bank of a PC Client TPM (PC Client Platform TPM Profile).
pub const PCR_COUNT: u32 = 24;

/// An open TPM. `Send`, so the workflow can move it into `spawn_blocking`;
/// every method takes `&mut self` because ESAPI contexts are not reentrant.
pub struct Tpm {
    context: Context,
    tcti: String,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("tcti", &self.tcti)
            .finish_non_exhaustive()
    }
}

// The workflow runs TPM work on tokio's blocking pool; fail the build, not the
// node, if a tss-esapi upgrade makes the context `!Send`.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Tpm>();
};

impl Tpm {
    /// Opens the TPM through a TCTI string, e.g. `device:/dev/tpmrm0` or
    /// `swtpm:host=127.0.0.1,port=2321`. Sends no command: the TCTI connects
    /// (or opens the device) here, so an unreachable TPM fails here.
    pub fn open(tcti: &str) -> Result<Tpm, TpmError> {
        let open_error = |reason: String| TpmError::Open {
            tcti: tcti.to_owned(),
            reason,
        };
        let conf = TctiNameConf::from_str(tcti).map_err(|e| {
            open_error(format!(
                "not a TCTI string of the form device:PATH, swtpm:host=H,port=P or mssim:… ({})",
                describe(e)
            ))
        })?;
        let context = Context::new(conf).map_err(|e| open_error(describe(e)))?;
        tracing::debug!(tcti, "TPM opened");
        Ok(Tpm {
            context,
            tcti: tcti.to_owned(),
        })
    }

    /// The TCTI string this TPM was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Reads all 24 PCRs of the SHA-256 bank. TPM2_PCR_Read returns at most 8
    /// digests per call, so this loops until every PCR has been read.
    pub fn pcr_bank_sha256(&mut self) -> Result<BTreeMap<u32, [u8; 32]>, TpmError> {
        const OP: &str = "PCR_Read(SHA-256)";
        self.require_sha256_bank()?;

        let mut wanted = (0..PCR_COUNT)
            .map(|index| PcrSlot::try_from(1u32 << index))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.command_error(OP, describe(e)))?;
        let mut values = BTreeMap::new();
        while !wanted.is_empty() {
            let selection = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &wanted)
                .build()
                .map_err(|e| self.command_error(OP, describe(e)))?;
            let (_, read, digests) = self
                .context
                .pcr_read(selection)
                .map_err(|e| self.command_error(OP, describe(e)))?;

            // Digests come in selection order: bank by bank, ascending PCR index.
            let mut indices: Vec<u32> = read
                .get_selections()
                .iter()
                .filter(|selection| selection.hashing_algorithm() == HashingAlgorithm::Sha256)
                .flat_map(|selection| selection.selected())
                .map(pcr_index)
                .collect();
            indices.sort_unstable();
            if indices.len() != digests.len() {
                return Err(self.command_error(
                    OP,
                    format!(
                        "TPM selected {} PCRs but returned {} digests",
                        indices.len(),
                        digests.len()
                    ),
                ));
            }
            for (index, digest) in indices.into_iter().zip(digests.value()) {
                let value = <[u8; 32]>::try_from(digest.value()).map_err(|_| {
                    self.command_error(
                        OP,
                        format!(
                            "PCR {index} digest is {} bytes, not 32",
                            digest.value().len()
                        ),
                    )
                })?;
                values.insert(index, value);
            }

            let before = wanted.len();
            wanted.retain(|slot| !values.contains_key(&pcr_index(*slot)));
            // A TPM that answers without the PCRs we asked for would loop us
            // forever (tss-esapi's own `pcr::read_all` would).
            if wanted.len() == before {
                return Err(self.command_error(
                    OP,
                    format!(
                        "TPM returned none of the requested PCRs {:?}",
                        wanted
                            .iter()
                            .map(|slot| pcr_index(*slot))
                            .collect::<Vec<_>>()
                    ),
                ));
            }
        }
        Ok(values)
    }

    /// Checks with TPM2_GetCapability(PCRS) that a SHA-256 bank covering PCRs
    /// 0–23 is allocated. Without it PCR_Read answers with an empty selection,
    /// which says nothing to a person; this says what is missing.
    fn require_sha256_bank(&mut self) -> Result<(), TpmError> {
        let (data, _) = self
            .context
            .get_capability(CapabilityType::AssignedPcr, 0, 1)
            .map_err(|e| self.command_error("GetCapability(PCRS)", describe(e)))?;
        let CapabilityData::AssignedPcr(banks) = data else {
            return Err(self.command_error(
                "GetCapability(PCRS)",
                "TPM answered with a different capability".to_owned(),
            ));
        };
        let allocated: Vec<String> = banks
            .get_selections()
            .iter()
            .filter(|bank| !bank.is_empty())
            .map(|bank| format!("{:?}", bank.hashing_algorithm()).to_lowercase())
            .collect();
        let sha256: Vec<u32> = banks
            .get_selections()
            .iter()
            .filter(|bank| bank.hashing_algorithm() == HashingAlgorithm::Sha256)
            .flat_map(|bank| bank.selected())
            .map(pcr_index)
            .collect();
        let missing: Vec<u32> = (0..PCR_COUNT).filter(|i| !sha256.contains(i)).collect();
        if sha256.is_empty() {
            return Err(TpmError::NoSha256Bank {
                tcti: self.tcti.clone(),
                reason: format!(
                    "no SHA-256 bank is allocated (allocated banks: {}); allocate one in the \
                     firmware's TPM settings (or with tpm2_pcrallocate) and reboot",
                    if allocated.is_empty() {
                        "none".to_owned()
                    } else {
                        allocated.join(", ")
                    }
                ),
            });
        }
        if !missing.is_empty() {
            return Err(TpmError::NoSha256Bank {
                tcti: self.tcti.clone(),
                reason: format!("the SHA-256 bank lacks PCRs {missing:?}"),
            });
        }
        Ok(())
    }

    /// The RSA-2048 EK from the TCG default template, and its certificate.
    /// RSA first because the RSA EK certificate (NV 0x01c00002) is the one
    /// nearly every TPM is provisioned with.
    pub fn endorsement_key(&mut self) -> Result<EndorsementKey, TpmError> {
        self.endorsement_key_for(EkAlgorithm::Rsa2048)
    }

    /// Creates the EK for `algorithm` from its TCG default template
    /// (TPM2_CreatePrimary in the endorsement hierarchy — the same key every
    /// time, derived from the endorsement seed), flushes it, and reads its
    /// certificate from NV if the index is defined (absent → `None`).
    pub fn endorsement_key_for(
        &mut self,
        algorithm: EkAlgorithm,
    ) -> Result<EndorsementKey, TpmError> {
        const OP: &str = "CreatePrimary(EK)";
        let template =
            tss_ek::create_ek_public_from_default_template_2(algorithm.selection(), DefaultKey)
                .map_err(|e| self.command_error(OP, describe(e)))?;
        let public = match self.persistent_ek(algorithm, &template) {
            Some(public) => public,
            None => self.create_ek(template)?,
        };
        self.describe_ek(algorithm, public)
    }

    /// The EK to enroll with: `choice` itself when it names one, else the
    /// `auto` rule ([`EkFacts::choose`]) applied to what this TPM reports
    /// ([`Tpm::ek_facts`]). Logs the choice and the reason for it.
    pub fn select_ek(&mut self, choice: EkChoice) -> Result<EkAlgorithm, TpmError> {
        let (algorithm, reason) = match choice {
            EkChoice::Fixed(algorithm) => (algorithm, "asked for by warden.ek"),
            EkChoice::Auto => self.ek_facts()?.choose(),
        };
        tracing::info!(
            tcti = %self.tcti,
            ek = algorithm.name(),
            choice = choice.name(),
            reason,
            "tpm: enrolling with the {} EK: {reason}",
            algorithm.name()
        );
        Ok(algorithm)
    }

    /// What the `auto` EK rule looks at: which EK certificate indices are
    /// defined, and whether TPM2_TestParms accepts the RSA-2048 EK
    /// template's parameters. Sends only read-only commands.
    pub fn ek_facts(&mut self) -> Result<EkFacts, TpmError> {
        let rsa_certificate = self.nv_index_defined(EkAlgorithm::Rsa2048.certificate_nv_index())?;
        let ecc_certificate =
            self.nv_index_defined(EkAlgorithm::EccNistP256.certificate_nv_index())?;
        let rsa_supported = self.supports_ek(EkAlgorithm::Rsa2048)?;
        let facts = EkFacts {
            rsa_certificate,
            ecc_certificate,
            rsa_supported,
        };
        tracing::debug!(tcti = %self.tcti, ?facts, "EK facts");
        Ok(facts)
    }

    /// TPM2_TestParms with the parameters of `algorithm`'s EK template: `Ok(false)`
    /// when the TPM refuses them, an error only when the TPM could not be asked.
    fn supports_ek(&mut self, algorithm: EkAlgorithm) -> Result<bool, TpmError> {
        const OP: &str = "TestParms(EK template)";
        let template =
            tss_ek::create_ek_public_from_default_template_2(algorithm.selection(), DefaultKey)
                .map_err(|e| self.command_error(OP, describe(e)))?;
        let parameters = match template {
            Public::Rsa { parameters, .. } => PublicParameters::Rsa(parameters),
            Public::Ecc { parameters, .. } => PublicParameters::Ecc(parameters),
            _ => {
                return Err(self.command_error(OP, "EK template is neither RSA nor ECC".to_owned()))
            }
        };
        match self.context.test_parms(parameters) {
            Ok(()) => Ok(true),
            Err(e) if is_tpm_answer(&e) => {
                tracing::debug!(tcti = %self.tcti, ek = algorithm.name(), reason = %describe(e), "TPM does not support this EK template");
                Ok(false)
            }
            Err(e) => Err(self.command_error(OP, describe(e))),
        }
    }

    /// Like [`Tpm::endorsement_key_for`], but always derives the EK with
    /// TPM2_CreatePrimary, ignoring any persisted copy.
    pub fn create_endorsement_key(
        &mut self,
        algorithm: EkAlgorithm,
    ) -> Result<EndorsementKey, TpmError> {
        let template =
            tss_ek::create_ek_public_from_default_template_2(algorithm.selection(), DefaultKey)
                .map_err(|e| self.command_error("CreatePrimary(EK)", describe(e)))?;
        let public = self.create_ek(template)?;
        self.describe_ek(algorithm, public)
    }

    /// The wire form of an EK public area, with its certificate.
    fn describe_ek(
        &mut self,
        algorithm: EkAlgorithm,
        public: Public,
    ) -> Result<EndorsementKey, TpmError> {
        let tpm_public = public
            .marshall()
            .map_err(|e| self.command_error("marshal EK TPMT_PUBLIC", describe(e)))?;
        let public_key_der = ek::subject_public_key_info_der(&public)
            .map_err(|reason| self.command_error("encode EK public key", reason))?;
        let certificate_der = self.ek_certificate(algorithm)?;
        tracing::debug!(
            tcti = %self.tcti,
            algorithm = algorithm.name(),
            certificate = certificate_der.is_some(),
            "EK read"
        );
        Ok(EndorsementKey {
            algorithm: algorithm.name(),
            public_key_der,
            tpm_public,
            certificate_der,
        })
    }

    /// TPM2_CreatePrimary of the EK template, flushed at once.
    fn create_ek(&mut self, template: Public) -> Result<Public, TpmError> {
        const OP: &str = "CreatePrimary(EK)";
        let created = self
            .context
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(|e| self.command_error(OP, describe(e)))?;
        // Flush before anything else can fail, so no error path leaks the object.
        self.context
            .flush_context(created.key_handle.into())
            .map_err(|e| self.command_error("FlushContext(EK)", describe(e)))?;
        tracing::debug!(tcti = %self.tcti, "EK created from the default template");
        Ok(created.out_public)
    }

    /// The EK at its persistent handle (TCG provisioning guidance: RSA
    /// 0x81010001), when one is there *and* provably is the EK: its public
    /// area matches the default template (all but `unique`), and its
    /// qualified name shows the endorsement hierarchy as its parent. Anyone
    /// with owner authorization could persist a look-alike key there; such a
    /// key fails the second check and we fall back to CreatePrimary. Reading
    /// it saves an RSA key derivation: ~0.35 s of every boot on swtpm.
    fn persistent_ek(&mut self, algorithm: EkAlgorithm, template: &Public) -> Option<Public> {
        let handle = algorithm.persistent_handle();
        let (data, _) = self
            .context
            .get_capability(CapabilityType::Handles, handle, 1)
            .ok()?;
        let defined = match data {
            CapabilityData::Handles(handles) => handles
                .into_inner()
                .into_iter()
                .any(|h| u32::from(h) == handle),
            _ => false,
        };
        if !defined {
            return None;
        }
        let tpm_handle = TpmHandle::Persistent(PersistentTpmHandle::new(handle).ok()?);
        let mut object = self.context.tr_from_tpm_public(tpm_handle).ok()?;
        let read = self.context.read_public(object.into());
        // Release ESYS's record of the handle; the key itself stays persisted.
        let _ = self.context.tr_close(&mut object);
        let (public, name, qualified_name) = read.ok()?;
        let handle_hex = format_args!("{handle:#010x}");
        if !ek::same_template(&public, template) {
            tracing::warn!(tcti = %self.tcti, handle = %handle_hex, "persistent key is not of the EK template; creating the EK instead");
            return None;
        }
        if !ek::is_endorsement_primary(name.value(), qualified_name.value()) {
            tracing::warn!(tcti = %self.tcti, handle = %handle_hex, "persistent key is not a primary of the endorsement hierarchy; creating the EK instead");
            return None;
        }
        tracing::debug!(tcti = %self.tcti, handle = %handle_hex, "EK read from its persistent handle");
        Some(public)
    }

    /// Reads the EK certificate NV index, if it is defined.
    fn ek_certificate(&mut self, algorithm: EkAlgorithm) -> Result<Option<Vec<u8>>, TpmError> {
        const OP: &str = "NV_Read(EK certificate)";
        let index = algorithm.certificate_nv_index();
        // Ask first: a missing index is normal (many TPMs have no ECC EK
        // certificate), and telling it apart from a failed read by response
        // code would be guesswork.
        if !self.nv_index_defined(index)? {
            tracing::debug!(tcti = %self.tcti, nv_index = format_args!("{index:#010x}"), "no EK certificate");
            return Ok(None);
        }
        let certificate = tss_ek::retrieve_ek_pubcert(&mut self.context, algorithm.selection())
            .map_err(|e| {
                self.command_error(OP, format!("NV index {index:#010x}: {}", describe(e)))
            })?;
        Ok(Some(ek::trim_der_padding(certificate)))
    }

    /// Whether NV index `index` is defined (TPM2_GetCapability(HANDLES)).
    fn nv_index_defined(&mut self, index: u32) -> Result<bool, TpmError> {
        let (data, _) = self
            .context
            .get_capability(CapabilityType::Handles, index, 1)
            .map_err(|e| self.command_error("GetCapability(HANDLES)", describe(e)))?;
        Ok(match data {
            CapabilityData::Handles(handles) => handles
                .into_inner()
                .into_iter()
                .any(|handle| u32::from(handle) == index),
            _ => false,
        })
    }

    fn command_error(&self, operation: &'static str, reason: String) -> TpmError {
        TpmError::Command {
            tcti: self.tcti.clone(),
            operation,
            reason,
        }
    }
}

/// PCR index of a tss-esapi slot (which is a bit mask, `1 << index`).
fn pcr_index(slot: PcrSlot) -> u32 {
    u32::from(slot).trailing_zeros()
}
