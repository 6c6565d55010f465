//! The Attestation Key: a restricted signing key created under an EK — the
//! RSA-2048 one (TCG template L-1) or the ECC P-256 one (template L-2) — and
//! TPM2_ActivateCredential, which proves to the server that the AK lives in
//! the same TPM as the EK it saw certified.
//!
//! Both EK templates carry the same authPolicy, PolicySecret(TPM_RH_ENDORSEMENT)
//! with SHA-256 (TCG EK Credential Profile, policy A), so creating, loading
//! and activating work the same under either; an [`AttestationKey`] remembers
//! which EK it was made under ([`AttestationKey::ek`]) and every later use
//! loads it under that same EK — its private blob opens under no other.
//!
//! It owns the AK's wire form ([`AttestationKey`]) and the TPM commands that
//! make, load and activate it. It must never leave a transient object or
//! session loaded after a call returns, never persist the AK (the agent
//! keeps the TPM2B_PRIVATE blob in memory for one boot), and never hand a
//! tss-esapi type to a caller.
//!
//! The agent creates a new AK on every boot and has the server bind it with a
//! fresh MakeCredential/ActivateCredential round: the tenant owns the TPM
//! between leases, so nothing persistent in it — nor an AK blob from an
//! earlier boot — is trusted (`docs/attestation.md`). Before a handoff the
//! agent must make sure no transient AK object is left loaded.

use sha2::{Digest as _, Sha256};
use tss_esapi::{
    abstraction::{
        ak as tss_ak, ek as tss_ek, AsymmetricAlgorithmSelection, DefaultKey, KeyCustomization,
    },
    attributes::ObjectAttributesBuilder,
    constants::SessionType,
    handles::{AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        resource_handles::Hierarchy,
        session_handles::{AuthSession, PolicySession},
    },
    structures::{EncryptedSecret, IdObject, Private, Public, SymmetricDefinition},
    traits::{Marshall, UnMarshall},
};

use super::{describe, EkAlgorithm, Tpm, TpmError};

/// Which AK to create. Both use SHA-256 as name and signing hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AkAlgorithm {
    /// RSA 2048 with RSASSA-PKCS1-v1_5 over SHA-256.
    Rsa2048RsassaSha256,
    /// ECC NIST P-256 with ECDSA over SHA-256.
    EccP256EcdsaSha256,
}

impl AkAlgorithm {
    /// A stable name for logs and the wire.
    pub const fn name(self) -> &'static str {
        match self {
            AkAlgorithm::Rsa2048RsassaSha256 => "rsa2048-rsassa-sha256",
            AkAlgorithm::EccP256EcdsaSha256 => "ecc-nist-p256-ecdsa-sha256",
        }
    }

    fn key(self) -> AsymmetricAlgorithmSelection {
        match self {
            AkAlgorithm::Rsa2048RsassaSha256 => {
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048)
            }
            AkAlgorithm::EccP256EcdsaSha256 => {
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256)
            }
        }
    }

    fn scheme(self) -> SignatureSchemeAlgorithm {
        match self {
            AkAlgorithm::Rsa2048RsassaSha256 => SignatureSchemeAlgorithm::RsaSsa,
            AkAlgorithm::EccP256EcdsaSha256 => SignatureSchemeAlgorithm::EcDsa,
        }
    }
}

/// An AK created under one of the TPM's EKs. Holds no TPM handle: every use
/// loads it afresh, under [`AttestationKey::ek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationKey {
    pub algorithm: AkAlgorithm,
    /// The EK it is the child of: the one the server must make its
    /// credential for, and the parent [`Tpm::activate_credential`] and
    /// [`Tpm::quote`] load it under.
    pub ek: EkAlgorithm,
    /// Marshalled TPMT_PUBLIC, exactly as TPM2_Create returned it.
    pub tpm_public: Vec<u8>,
    /// TPM name: nameAlg (0x000B, SHA-256) ‖ SHA-256(`tpm_public`), 34
    /// bytes, as TPM2_ReadPublic reports it. MakeCredential binds to this.
    pub name: Vec<u8>,
    /// Marshalled TPM2B_PRIVATE (u16 big-endian size ‖ blob), sealed to the
    /// EK: it loads only under the same TPM's EK. Kept for this boot only —
    /// Warden enrolls a new AK on every boot (see the module docs).
    pub private: Vec<u8>,
}

/// TPM_ALG_SHA256.
const TPM_ALG_SHA256: [u8; 2] = [0x00, 0x0B];

/// Adds noDA: the AK has an empty auth value, so failed authorisations
/// against it prove nothing and must not feed the dictionary-attack lockout.
struct NoDa;

impl KeyCustomization for NoDa {
    fn attributes(&self, builder: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        builder.with_no_da(true)
    }
}

/// The EK as a parent: derived (transient, must be flushed) or the provably
/// genuine persisted one (only ESYS's record of it must be closed).
pub(super) enum EkParent {
    Transient(KeyHandle),
    Persistent(ObjectHandle),
}

impl EkParent {
    pub(super) fn key_handle(&self) -> KeyHandle {
        match self {
            EkParent::Transient(handle) => *handle,
            EkParent::Persistent(handle) => KeyHandle::from(*handle),
        }
    }
}

/// Keeps the first error; a cleanup failure after an error is only logged,
/// a cleanup failure after success is the result.
pub(super) fn then_cleanup<T>(
    result: Result<T, TpmError>,
    cleanup: Result<(), TpmError>,
) -> Result<T, TpmError> {
    match (result, cleanup) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(error)) => Err(error),
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(cleanup)) => {
            tracing::warn!(error = %cleanup, "TPM cleanup after a failed command also failed");
            Err(error)
        }
    }
}

fn to_tpm2b(contents: &[u8]) -> Option<Vec<u8>> {
    let size = u16::try_from(contents.len()).ok()?;
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(contents);
    Some(out)
}

pub(super) fn from_tpm2b(bytes: &[u8]) -> Option<&[u8]> {
    let (size, contents) = bytes.split_first_chunk::<2>()?;
    (usize::from(u16::from_be_bytes(*size)) == contents.len()).then_some(contents)
}

/// nameAlg ‖ SHA-256(TPMT_PUBLIC) for a SHA-256-named object.
fn sha256_name(tpm_public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_vec();
    name.extend_from_slice(&Sha256::digest(tpm_public));
    name
}

impl Tpm {
    /// The AK's public area and private blob, decoded for TPM2_Load.
    pub(super) fn ak_blobs(&self, ak: &AttestationKey) -> Result<(Public, Private), TpmError> {
        let public = Public::unmarshall(&ak.tpm_public).map_err(|e| {
            self.command_error("Load(AK)", format!("AK TPMT_PUBLIC: {}", describe(e)))
        })?;
        let private = from_tpm2b(&ak.private)
            .ok_or_else(|| {
                self.command_error(
                    "Load(AK)",
                    "AK private blob is not a TPM2B (u16 size ‖ contents)".to_owned(),
                )
            })
            .and_then(|contents| {
                Private::try_from(contents).map_err(|e| self.command_error("Load(AK)", describe(e)))
            })?;
        Ok((public, private))
    }

    /// Creates an AK under the RSA-2048 EK: `create_ak_under(EkAlgorithm::Rsa2048, algorithm)`.
    pub fn create_ak(&mut self, algorithm: AkAlgorithm) -> Result<AttestationKey, TpmError> {
        self.create_ak_under(EkAlgorithm::Rsa2048, algorithm)
    }

    /// Creates an AK under the EK of template `ek`: TPM2_Create of a
    /// restricted signing key (fixedTPM, fixedParent, sensitiveDataOrigin,
    /// userWithAuth, noDA, empty auth), authorised by
    /// PolicySecret(TPM_RH_ENDORSEMENT) as the EK's policy demands. The AK is
    /// then loaded once to read its name from the TPM, which must equal
    /// 0x000B ‖ SHA-256(TPMT_PUBLIC) — the name the server will compute.
    /// Nothing stays loaded afterwards.
    pub fn create_ak_under(
        &mut self,
        ek: EkAlgorithm,
        algorithm: AkAlgorithm,
    ) -> Result<AttestationKey, TpmError> {
        let parent = self.ek_parent(ek)?;
        let result = self.create_ak_with_parent(parent.key_handle(), ek, algorithm);
        let released = self.release_ek(parent);
        let ak = then_cleanup(result, released)?;
        tracing::debug!(
            tcti = %self.tcti,
            algorithm = algorithm.name(),
            ek = ek.name(),
            name = %hex::encode(&ak.name),
            "AK created"
        );
        Ok(ak)
    }

    /// TPM2_ActivateCredential: loads `ak` under its EK ([`AttestationKey::ek`])
    /// and recovers the secret the server sealed with MakeCredential to
    /// (EK public, AK name).
    /// The AK is the activateHandle (empty-password session), the EK the
    /// keyHandle (PolicySecret(TPM_RH_ENDORSEMENT) session).
    ///
    /// `id_object` and `encrypted_secret` are the *contents* of the
    /// TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET, without their u16 size
    /// prefix. A credential made for another name or another EK fails with
    /// [`TpmError::Command`] (operation `ActivateCredential`, typically
    /// TPM_RC_INTEGRITY).
    pub fn activate_credential(
        &mut self,
        ak: &AttestationKey,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        const OP: &str = "ActivateCredential";
        let id_object = IdObject::try_from(id_object.to_vec()).map_err(|e| {
            self.command_error(
                OP,
                format!("credential blob (TPM2B_ID_OBJECT): {}", describe(e)),
            )
        })?;
        let encrypted_secret =
            EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(|e| {
                self.command_error(
                    OP,
                    format!("encrypted secret (TPM2B_ENCRYPTED_SECRET): {}", describe(e)),
                )
            })?;
        let (public, private) = self.ak_blobs(ak)?;

        let ek = self.ek_parent(ak.ek)?;
        let result = self.activate_under(
            ek.key_handle(),
            public,
            private,
            id_object,
            encrypted_secret,
        );
        let released = self.release_ek(ek);
        let secret = then_cleanup(result, released)?;
        tracing::debug!(tcti = %self.tcti, algorithm = ak.algorithm.name(), ek = ak.ek.name(), "credential activated");
        Ok(secret)
    }

    fn create_ak_with_parent(
        &mut self,
        parent: KeyHandle,
        ek: EkAlgorithm,
        algorithm: AkAlgorithm,
    ) -> Result<AttestationKey, TpmError> {
        let created = tss_ak::create_ak_2(
            &mut self.context,
            parent,
            HashingAlgorithm::Sha256,
            algorithm.key(),
            algorithm.scheme(),
            None,
            NoDa,
        )
        .map_err(|e| self.command_error("Create(AK)", describe(e)))?;
        let tpm_public = created
            .out_public
            .marshall()
            .map_err(|e| self.command_error("marshal AK TPMT_PUBLIC", describe(e)))?;
        let private = to_tpm2b(created.out_private.value()).ok_or_else(|| {
            self.command_error(
                "Create(AK)",
                "AK private blob exceeds 65535 bytes".to_owned(),
            )
        })?;

        let handle = tss_ak::load_ak(
            &mut self.context,
            parent,
            None,
            created.out_private,
            created.out_public,
        )
        .map_err(|e| self.command_error("Load(AK)", describe(e)))?;
        let read = self
            .context
            .read_public(handle)
            .map_err(|e| self.command_error("ReadPublic(AK)", describe(e)));
        let flushed = self
            .context
            .flush_context(handle.into())
            .map_err(|e| self.command_error("FlushContext(AK)", describe(e)));
        let (_, name, _) = then_cleanup(read, flushed)?;

        let name = name.value().to_vec();
        if name != sha256_name(&tpm_public) {
            return Err(self.command_error(
                "ReadPublic(AK)",
                format!(
                    "TPM reports AK name {} but its TPMT_PUBLIC hashes to {}",
                    hex::encode(&name),
                    hex::encode(sha256_name(&tpm_public))
                ),
            ));
        }
        Ok(AttestationKey {
            algorithm,
            ek,
            tpm_public,
            name,
            private,
        })
    }

    fn activate_under(
        &mut self,
        ek: KeyHandle,
        public: Public,
        private: Private,
        id_object: IdObject,
        encrypted_secret: EncryptedSecret,
    ) -> Result<Vec<u8>, TpmError> {
        let ak = tss_ak::load_ak(&mut self.context, ek, None, private, public)
            .map_err(|e| self.command_error("Load(AK)", describe(e)))?;
        let result = self.activate_loaded(ak, ek, id_object, encrypted_secret);
        let flushed = self
            .context
            .flush_context(ak.into())
            .map_err(|e| self.command_error("FlushContext(AK)", describe(e)));
        then_cleanup(result, flushed)
    }

    fn activate_loaded(
        &mut self,
        ak: KeyHandle,
        ek: KeyHandle,
        id_object: IdObject,
        encrypted_secret: EncryptedSecret,
    ) -> Result<Vec<u8>, TpmError> {
        let session = self
            .context
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| self.command_error("StartAuthSession(policy)", describe(e)))?
            .ok_or_else(|| {
                self.command_error(
                    "StartAuthSession(policy)",
                    "TPM returned no session".to_owned(),
                )
            })?;
        let result = self.activate_in_session(ak, ek, session, id_object, encrypted_secret);
        let flushed = self
            .context
            .flush_context(SessionHandle::from(session).into())
            .map_err(|e| self.command_error("FlushContext(policy session)", describe(e)));
        then_cleanup(result, flushed)
    }

    fn activate_in_session(
        &mut self,
        ak: KeyHandle,
        ek: KeyHandle,
        session: AuthSession,
        id_object: IdObject,
        encrypted_secret: EncryptedSecret,
    ) -> Result<Vec<u8>, TpmError> {
        const POLICY_OP: &str = "PolicySecret(TPM_RH_ENDORSEMENT)";
        let policy = PolicySession::try_from(session)
            .map_err(|e| self.command_error(POLICY_OP, describe(e)))?;
        // The EK's default policy (TCG EK Credential Profile, policy A for
        // SHA-256): PolicySecret with the endorsement hierarchy's (empty) auth.
        self.context
            .execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(|e| self.command_error(POLICY_OP, describe(e)))?;
        let secret = self
            .context
            .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                ctx.activate_credential(ak, ek, id_object, encrypted_secret)
            })
            .map_err(|e| self.command_error("ActivateCredential", describe(e)))?;
        Ok(secret.value().to_vec())
    }

    /// The EK of template `algorithm` as a parent handle: the persisted one
    /// when it provably is the EK (see `persistent_ek`), else derived with
    /// CreatePrimary. Release it with [`Tpm::release_ek`] on every path.
    pub(super) fn ek_parent(&mut self, algorithm: EkAlgorithm) -> Result<EkParent, TpmError> {
        const OP: &str = "CreatePrimary(EK)";
        let template =
            tss_ek::create_ek_public_from_default_template_2(algorithm.selection(), DefaultKey)
                .map_err(|e| self.command_error(OP, describe(e)))?;
        if self.persistent_ek(algorithm, &template).is_some() {
            let persisted =
                PersistentTpmHandle::new(algorithm.persistent_handle()).and_then(|handle| {
                    self.context
                        .tr_from_tpm_public(TpmHandle::Persistent(handle))
                });
            if let Ok(handle) = persisted {
                return Ok(EkParent::Persistent(handle));
            }
        }
        let created = self
            .context
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(|e| self.command_error(OP, describe(e)))?;
        Ok(EkParent::Transient(created.key_handle))
    }

    pub(super) fn release_ek(&mut self, ek: EkParent) -> Result<(), TpmError> {
        match ek {
            EkParent::Transient(handle) => self
                .context
                .flush_context(handle.into())
                .map_err(|e| self.command_error("FlushContext(EK)", describe(e))),
            EkParent::Persistent(mut handle) => self
                .context
                .tr_close(&mut handle)
                .map_err(|e| self.command_error("close EK handle", describe(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm2b_round_trips_and_rejects_bad_sizes() {
        let blob = to_tpm2b(&[1, 2, 3]).unwrap();
        assert_eq!(blob, vec![0, 3, 1, 2, 3]);
        assert_eq!(from_tpm2b(&blob), Some(&[1u8, 2, 3][..]));
        assert_eq!(from_tpm2b(&[0, 4, 1, 2, 3]), None);
        assert_eq!(from_tpm2b(&[0]), None);
        assert_eq!(from_tpm2b(&[0, 0]), Some(&[][..]));
    }
}
