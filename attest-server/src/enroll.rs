//! Enrollment: deciding whether to trust an Endorsement Key, checking an
//! Attestation Key, and the MakeCredential / ActivateCredential round that
//! binds the AK to the node.
//!
//! This module owns three rules:
//! - an EK is trusted only if its certificate chains to a CA in the
//!   manufacturer-CA directory ([`ManufacturerCas`]) and certifies exactly
//!   this key, or if an owner registered its hash beforehand (the caller
//!   passes that in);
//! - an AK must be a restricted, signing-only key that never left the TPM
//!   (fixedTPM, fixedParent, sensitiveDataOrigin) of a supported type;
//! - an AK is bound only after the agent returns the secret of a credential
//!   made for that AK's name under that EK (pure Rust, no TPM here), once,
//!   within [`CHALLENGE_TTL`].
//!
//! A CA in the directory is a trust anchor whether it is a root or an
//! intermediate: operators put the manufacturer CAs they accept there
//! (PEM or DER, one certificate per file or a PEM bundle), so the EK
//! certificate must be signed directly by one of them: put the intermediate
//! that issues EK certificates there, not only its root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use warden_protocol::attest::{AkPublic, AK_ECC, AK_RSA};
use warden_protocol::tpm::{self, Public, PublicKey};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long an enrollment challenge may take to be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);

/// Bytes of the credential secret.
const SECRET_LEN: usize = 32;

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("EK not trusted: {0}")]
    EkUntrusted(String),
    #[error("AK refused: {0}")]
    AkRefused(String),
    #[error("enrollment {0} is unknown or expired: enroll again")]
    UnknownChallenge(String),
    #[error("AK not bound to this EK: the ActivateCredential answer for enrollment {0} is wrong (the AK is not in the same TPM as the EK, or the answer was forged)")]
    WrongSecret(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// The manufacturer CAs the server trusts for EK certificates.
#[derive(Debug, Default)]
pub struct ManufacturerCas {
    dir: Option<PathBuf>,
    /// (file, DER) of every CA certificate found.
    certs: Vec<(PathBuf, Vec<u8>)>,
}

impl ManufacturerCas {
    /// No directory: only registered EK hashes are trusted.
    pub fn none() -> ManufacturerCas {
        ManufacturerCas::default()
    }

    /// Loads every certificate in `dir` (`*.pem`, `*.crt`, `*.cer`, `*.der`).
    /// Files that hold no certificate are an error naming the file, so a
    /// typo does not silently shrink the trust set.
    pub fn load(dir: &Path) -> Result<ManufacturerCas, EnrollError> {
        let io = |p: &Path, e: std::io::Error| {
            EnrollError::Internal(format!("manufacturer CA directory {}: {e}", p.display()))
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| ["pem", "crt", "cer", "der"].contains(&e))
            })
            .collect();
        files.sort();
        let mut certs = Vec::new();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
            let ders = if bytes.starts_with(b"-----BEGIN") {
                use rustls_pki_types::pem::PemObject;
                rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
                    .filter_map(Result::ok)
                    .map(|c| c.to_vec())
                    .collect()
            } else {
                vec![bytes]
            };
            let mut found = 0;
            for der in ders {
                if X509Certificate::from_der(&der).is_ok() {
                    certs.push((file.clone(), der));
                    found += 1;
                }
            }
            if found == 0 {
                return Err(EnrollError::Internal(format!(
                    "manufacturer CA file {} holds no X.509 certificate",
                    file.display()
                )));
            }
        }
        Ok(ManufacturerCas {
            dir: Some(dir.to_owned()),
            certs,
        })
    }

    /// How many CA certificates are loaded.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// True when no CA is loaded.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Checks that `cert_der` certifies `ek_spki_der` and chains to a CA in
    /// the directory; returns how, in words ("certificate chains to
    /// manufacturer CA CN=… (file …)").
    pub fn check(&self, cert_der: &[u8], ek_spki_der: &[u8]) -> Result<String, EnrollError> {
        let untrusted = |m: String| EnrollError::EkUntrusted(m);
        let (_, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| untrusted(format!("the EK certificate is not DER X.509: {e}")))?;
        if cert.tbs_certificate.subject_pki.raw != ek_spki_der {
            return Err(untrusted(
                "the EK certificate certifies a different public key than the EK sent".into(),
            ));
        }
        if self.certs.is_empty() {
            return Err(untrusted(format!(
                "the server has no manufacturer CA{} and the EK hash is not registered (wardenctl node add --ek-sha256 …)",
                self.dir
                    .as_ref()
                    .map(|d| format!(" in {}", d.display()))
                    .unwrap_or_default()
            )));
        }
        let issuer = self.certs.iter().find_map(|(file, der)| {
            let (_, ca) = X509Certificate::from_der(der).ok()?;
            (ca.subject() == cert.issuer() && cert.verify_signature(Some(ca.public_key())).is_ok())
                .then_some((file, ca))
        });
        let Some((file, ca)) = issuer else {
            return Err(untrusted(format!(
                "the EK certificate ({}) is issued by {}, which is not a manufacturer CA this server trusts{} (or its signature does not verify)",
                name_or(cert.subject()),
                cert.issuer(),
                self.dir
                    .as_ref()
                    .map(|d| format!(" (directory {})", d.display()))
                    .unwrap_or_default()
            )));
        };
        if !ca.is_ca() {
            return Err(untrusted(format!(
                "{} ({}) signed the EK certificate but is not a CA (basicConstraints)",
                ca.subject(),
                file.display()
            )));
        }
        if !ca.validity().is_valid() {
            return Err(untrusted(format!(
                "manufacturer CA {} ({}) is not valid now (valid {} to {})",
                ca.subject(),
                file.display(),
                ca.validity().not_before,
                ca.validity().not_after
            )));
        }
        Ok(format!(
            "EK certificate chains to manufacturer CA {} ({})",
            ca.subject(),
            file.display()
        ))
    }
}

fn name_or(name: &x509_parser::x509::X509Name<'_>) -> String {
    let s = name.to_string();
    if s.is_empty() {
        "the EK (empty subject)".to_owned()
    } else {
        s
    }
}

/// Checks the AK's type and attributes; returns the parsed key and its
/// TPM name.
pub fn check_ak(ak: &AkPublic) -> Result<(Public, Vec<u8>), EnrollError> {
    let refused = |m: String| EnrollError::AkRefused(m);
    let public = tpm::parse_tpmt_public(&ak.tpm_public)
        .map_err(|e| refused(format!("ak.tpm_public is not a TPMT_PUBLIC: {e}")))?;
    let a = public.attributes;
    let mut missing = Vec::new();
    for (ok, name) in [
        (a.restricted(), "restricted"),
        (a.sign(), "sign"),
        (a.fixed_tpm(), "fixedTPM"),
        (a.fixed_parent(), "fixedParent"),
        (a.sensitive_data_origin(), "sensitiveDataOrigin"),
    ] {
        if !ok {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(refused(format!(
            "the AK lacks the attribute(s) {}: only a restricted signing key generated in the TPM and unable to leave it can sign quotes",
            missing.join(", ")
        )));
    }
    if a.decrypt() {
        return Err(refused(
            "the AK has the decrypt attribute: an AK must be signing-only".into(),
        ));
    }
    let kind_ok = matches!(
        (&public.key, ak.algorithm.as_str()),
        (PublicKey::Rsa { .. }, AK_RSA) | (PublicKey::Ecc { .. }, AK_ECC)
    );
    if !kind_ok {
        return Err(refused(format!(
            "ak.algorithm is {:?} but the key is {}; supported: {AK_RSA}, {AK_ECC}",
            ak.algorithm,
            match public.key {
                PublicKey::Rsa { .. } => "RSA",
                PublicKey::Ecc { .. } => "ECC",
            }
        )));
    }
    let name = public
        .name()
        .map_err(|e| refused(format!("cannot compute the AK's name: {e}")))?;
    Ok((public, name))
}

/// An enrollment waiting for its ActivateCredential answer.
#[derive(Debug, Clone)]
pub struct Pending {
    pub node_id: String,
    pub ak: AkPublic,
    pub ak_name: Vec<u8>,
    pub ek_trust: String,
    secret: Vec<u8>,
    issued: Instant,
}

/// A credential for the agent, and the id that names it.
#[derive(Debug)]
pub struct Challenge {
    pub enrollment_id: String,
    pub credential: tpm::Credential,
}

/// Outstanding enrollments (in memory: a restart means the agent enrolls again).
#[derive(Debug, Default)]
pub struct Enrollments {
    pending: Mutex<HashMap<String, Pending>>,
}

impl Enrollments {
    /// Makes a credential for `ak_name` under the EK `ek_tpm_public` and
    /// remembers what must come back.
    pub fn challenge(
        &self,
        node_id: &str,
        ek_tpm_public: &[u8],
        ak: &AkPublic,
        ak_name: &[u8],
        ek_trust: &str,
    ) -> Result<Challenge, EnrollError> {
        let mut secret = vec![0u8; SECRET_LEN];
        crate::pki::random_bytes(&mut secret)
            .map_err(|_| EnrollError::Internal("no randomness for the credential secret".into()))?;
        let credential = tpm::make_credential(ek_tpm_public, ak_name, &secret).map_err(|e| {
            EnrollError::EkUntrusted(format!("cannot make a credential for this EK: {e}"))
        })?;
        let mut id = [0u8; 16];
        crate::pki::random_bytes(&mut id)
            .map_err(|_| EnrollError::Internal("no randomness for the enrollment id".into()))?;
        let enrollment_id = hex::encode(id);
        let mut pending = self.lock();
        pending.retain(|_, p| p.issued.elapsed() <= CHALLENGE_TTL);
        pending.insert(
            enrollment_id.clone(),
            Pending {
                node_id: node_id.to_owned(),
                ak: ak.clone(),
                ak_name: ak_name.to_vec(),
                ek_trust: ek_trust.to_owned(),
                secret,
                issued: Instant::now(),
            },
        );
        Ok(Challenge {
            enrollment_id,
            credential,
        })
    }

    /// Takes the enrollment `id` (one try) and checks the returned secret.
    pub fn answer(&self, id: &str, secret: &[u8]) -> Result<Pending, EnrollError> {
        let pending = self
            .lock()
            .remove(id)
            .filter(|p| p.issued.elapsed() <= CHALLENGE_TTL)
            .ok_or_else(|| EnrollError::UnknownChallenge(id.to_owned()))?;
        if !crate::api::constant_time_eq(&pending.secret, secret) {
            return Err(EnrollError::WrongSecret(id.to_owned()));
        }
        Ok(pending)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
