//! The Endorsement Key's identity: which TCG default template, where its
//! certificate lives in NV, and how its TPM public area becomes a DER
//! SubjectPublicKeyInfo the server can compare with the certificate.
//!
//! Pure conversions only; the TPM commands stay in `tpm/mod.rs`.

use tss_esapi::{
    abstraction::AsymmetricAlgorithmSelection,
    interface_types::{ecc::EccCurve, key_bits::RsaKeyBits},
    structures::Public,
    traits::Marshall,
};

/// Which TCG default EK template to use (TCG EK Credential Profile 2.0,
/// B.3.3 "Template L-1" for RSA 2048, B.3.4 "Template L-2" for ECC P-256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EkAlgorithm {
    /// RSA 2048 — what nearly every TPM ships a certificate for.
    Rsa2048,
    /// ECC NIST P-256.
    EccNistP256,
}

impl EkAlgorithm {
    /// The name used on the wire and in [`EndorsementKey::algorithm`].
    pub const fn name(self) -> &'static str {
        match self {
            EkAlgorithm::Rsa2048 => "rsa2048",
            EkAlgorithm::EccNistP256 => "ecc-nist-p256",
        }
    }

    /// NV index of the manufacturer's EK certificate for this template (TCG
    /// EK Credential Profile 2.0, 2.2.1.4 "Low Range").
    pub const fn certificate_nv_index(self) -> u32 {
        match self {
            EkAlgorithm::Rsa2048 => 0x01c0_0002,
            EkAlgorithm::EccNistP256 => 0x01c0_000a,
        }
    }

    /// Persistent handle where provisioning stores this EK (TCG TPM v2.0
    /// Provisioning Guidance, 7.8: RSA 2048 at 0x81010001, ECC P-256 at 0x81010002).
    pub const fn persistent_handle(self) -> u32 {
        match self {
            EkAlgorithm::Rsa2048 => 0x8101_0001,
            EkAlgorithm::EccNistP256 => 0x8101_0002,
        }
    }

    pub(super) fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlgorithm::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkAlgorithm::EccNistP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        }
    }
}

/// Which EK the agent enrolls with (`warden.ek=auto|rsa|ecc`). The node id is
/// the SHA-256 of the chosen EK's SubjectPublicKeyInfo, so the choice must
/// come out the same on every boot of the same TPM: `Auto` depends only on
/// what the TPM implements and which EK certificate indices are defined —
/// never on timing, on which key happens to be persisted, or on anything the
/// agent itself writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum EkChoice {
    /// [`EkFacts::choose`]: RSA-2048 unless the TPM is provisioned (or only
    /// able) for ECC P-256.
    #[default]
    Auto,
    /// Always this EK.
    Fixed(EkAlgorithm),
}

impl EkChoice {
    /// `auto`, `rsa` or `ecc`, as on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            EkChoice::Auto => "auto",
            EkChoice::Fixed(EkAlgorithm::Rsa2048) => "rsa",
            EkChoice::Fixed(EkAlgorithm::EccNistP256) => "ecc",
        }
    }
}

/// What `warden.ek=auto` looks at: all of it is fixed for a given TPM by its
/// manufacturer (the certificate indices are written at provisioning time,
/// the algorithms by the TPM's firmware).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EkFacts {
    /// NV index 0x01c00002 (RSA-2048 EK certificate) is defined.
    pub rsa_certificate: bool,
    /// NV index 0x01c0000a (ECC P-256 EK certificate) is defined.
    pub ecc_certificate: bool,
    /// TPM2_TestParms accepts the RSA-2048 EK template's parameters.
    pub rsa_supported: bool,
}

impl EkFacts {
    /// The `auto` rule, and why: RSA-2048 if its certificate is there, or if
    /// no ECC P-256 certificate is (the EK nearly every TPM is provisioned
    /// and every verifier is tested with); ECC P-256 when only the ECC
    /// certificate is present, or when the TPM cannot make RSA-2048 keys.
    pub fn choose(self) -> (EkAlgorithm, &'static str) {
        if self.rsa_certificate {
            (
                EkAlgorithm::Rsa2048,
                "the TPM has an RSA-2048 EK certificate",
            )
        } else if self.ecc_certificate {
            (
                EkAlgorithm::EccNistP256,
                "the TPM has an ECC P-256 EK certificate and no RSA-2048 one",
            )
        } else if self.rsa_supported {
            (
                EkAlgorithm::Rsa2048,
                "the TPM has no EK certificate in NV; RSA-2048 is the default",
            )
        } else {
            (
                EkAlgorithm::EccNistP256,
                "the TPM does not support RSA-2048 keys",
            )
        }
    }
}

/// The Endorsement Key's public parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndorsementKey {
    /// `rsa2048` or `ecc-nist-p256` ([`EkAlgorithm::name`]).
    pub algorithm: &'static str,
    /// DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    /// Marshalled TPMT_PUBLIC, exactly as the TPM returned it (the server
    /// computes the EK's name from it for MakeCredential).
    pub tpm_public: Vec<u8>,
    /// DER certificate from the EK certificate NV index, if the index is defined.
    pub certificate_der: Option<Vec<u8>>,
}

/// Whether `key` was made from `template`: everything but `unique` equal.
pub(super) fn same_template(key: &Public, template: &Public) -> bool {
    match (key, template) {
        (
            Public::Rsa {
                object_attributes: a,
                name_hashing_algorithm: n,
                auth_policy: p,
                parameters: q,
                ..
            },
            Public::Rsa {
                object_attributes: ta,
                name_hashing_algorithm: tn,
                auth_policy: tp,
                parameters: tq,
                ..
            },
        ) => a == ta && n == tn && p == tp && q == tq,
        (
            Public::Ecc {
                object_attributes: a,
                name_hashing_algorithm: n,
                auth_policy: p,
                parameters: q,
                ..
            },
            Public::Ecc {
                object_attributes: ta,
                name_hashing_algorithm: tn,
                auth_policy: tp,
                parameters: tq,
                ..
            },
        ) => a == ta && n == tn && p == tp && q == tq,
        _ => false,
    }
}

/// TPM_RH_ENDORSEMENT: the qualified name of the endorsement hierarchy.
const TPM_RH_ENDORSEMENT: u32 = 0x4000_000B;
/// TPM_ALG_SHA256, the name algorithm of every default EK template.
const TPM_ALG_SHA256: [u8; 2] = [0x00, 0x0B];

/// Whether an object with this TPM `name` (nameAlg ‖ digest) and
/// `qualified_name` is a primary key of the endorsement hierarchy: TPM 2.0
/// Part 1, "Qualified Name": QN = H(QN(parent) ‖ Name), and a hierarchy's
/// QN is its handle.
pub(super) fn is_endorsement_primary(name: &[u8], qualified_name: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    if name.get(..2) != Some(&TPM_ALG_SHA256[..]) {
        return false;
    }
    let mut h = Sha256::new();
    h.update(TPM_RH_ENDORSEMENT.to_be_bytes());
    h.update(name);
    let mut expected = TPM_ALG_SHA256.to_vec();
    expected.extend_from_slice(&h.finalize());
    qualified_name == expected.as_slice()
}

/// DER-encodes the SubjectPublicKeyInfo of an RSA or ECC public area, with
/// the same code the server uses on the bytes the agent sends
/// (`warden_protocol::tpm::Public::spki_der`: RSA exponent 0 means 65537,
/// EC points uncompressed with fixed-width coordinates), so agent and server
/// can never disagree on a node's id.
pub(super) fn subject_public_key_info_der(public: &Public) -> Result<Vec<u8>, String> {
    let tpmt = public
        .marshall()
        .map_err(|e| format!("cannot marshal the TPM public area: {e}"))?;
    let parsed = warden_protocol::tpm::parse_tpmt_public(&tpmt)
        .map_err(|e| format!("cannot parse the TPM public area: {e}"))?;
    parsed
        .spki_der()
        .map_err(|e| format!("cannot encode the SubjectPublicKeyInfo: {e}"))
}

/// Cuts an EK certificate read from NV to the length its outer DER SEQUENCE
/// declares. Some TPMs zero-pad the NV index past the certificate; a strict
/// X.509 parser rejects the trailing bytes. Anything that does not start like
/// a DER SEQUENCE is returned unchanged, for the verifier to reject.
pub(super) fn trim_der_padding(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(total) = der_sequence_len(&bytes) {
        if total < bytes.len() {
            bytes.truncate(total);
        }
    }
    bytes
}

/// Header plus content length of a DER SEQUENCE at the start of `bytes`.
fn der_sequence_len(bytes: &[u8]) -> Option<usize> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 {
        return None;
    }
    let length = rest
        .get(..count)?
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    length.checked_add(2 + count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tss_esapi::abstraction::{ek::create_ek_public_from_default_template_2, DefaultKey};
    use tss_esapi::structures::{EccParameter, EccPoint, PublicKeyRsa};
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    use x509_parser::x509::SubjectPublicKeyInfo as ParsedSpki;

    fn template(algorithm: EkAlgorithm) -> Public {
        create_ek_public_from_default_template_2(algorithm.selection(), DefaultKey).unwrap()
    }

    #[test]
    fn endorsement_primary_is_recognised_by_its_qualified_name() {
        use sha2::{Digest, Sha256};
        let mut name = TPM_ALG_SHA256.to_vec();
        name.extend_from_slice(&[7u8; 32]);
        let qn = |hierarchy: u32| {
            let mut q = TPM_ALG_SHA256.to_vec();
            q.extend_from_slice(
                &Sha256::new()
                    .chain_update(hierarchy.to_be_bytes())
                    .chain_update(&name)
                    .finalize(),
            );
            q
        };
        assert!(is_endorsement_primary(&name, &qn(0x4000_000B)));
        // TPM_RH_OWNER: a look-alike key in the storage hierarchy.
        assert!(!is_endorsement_primary(&name, &qn(0x4000_0001)));
        // A SHA-1 name is no default EK's.
        let mut sha1_name = vec![0x00, 0x04];
        sha1_name.extend_from_slice(&[7u8; 20]);
        assert!(!is_endorsement_primary(&sha1_name, &qn(0x4000_000B)));
    }

    #[test]
    fn auto_prefers_rsa_unless_only_ecc_is_certified_or_possible() {
        let facts = |rsa_certificate, ecc_certificate, rsa_supported| EkFacts {
            rsa_certificate,
            ecc_certificate,
            rsa_supported,
        };
        let rsa = EkAlgorithm::Rsa2048;
        let ecc = EkAlgorithm::EccNistP256;
        // (RSA cert, ECC cert, RSA supported) → EK
        for (rsa_cert, ecc_cert, rsa_ok, expected) in [
            (true, true, true, rsa),
            (true, false, true, rsa),
            (false, false, true, rsa),
            (false, true, true, ecc),
            (false, true, false, ecc),
            (false, false, false, ecc),
            // An RSA certificate on a TPM that claims no RSA: the certificate
            // wins, and CreatePrimary will say what is wrong.
            (true, true, false, rsa),
        ] {
            let (chosen, why) = facts(rsa_cert, ecc_cert, rsa_ok).choose();
            assert_eq!(chosen, expected, "{rsa_cert} {ecc_cert} {rsa_ok}: {why}");
            assert!(!why.is_empty());
        }
        assert_eq!(EkChoice::default(), EkChoice::Auto);
        assert_eq!(EkChoice::Fixed(ecc).name(), "ecc");
        assert_eq!(EkChoice::Fixed(rsa).name(), "rsa");
    }

    #[test]
    fn template_match_ignores_unique_only() {
        let rsa = template(EkAlgorithm::Rsa2048);
        let ecc = template(EkAlgorithm::EccNistP256);
        assert!(same_template(&rsa, &rsa));
        assert!(!same_template(&rsa, &ecc));
    }

    #[test]
    fn rsa_spki_carries_modulus_and_default_exponent() {
        let Public::Rsa {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            ..
        } = template(EkAlgorithm::Rsa2048)
        else {
            panic!("RSA template is not RSA");
        };
        let mut modulus = vec![0xc5u8; 256];
        modulus[255] = 0x01;
        let public = Public::Rsa {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique: PublicKeyRsa::try_from(modulus.clone()).unwrap(),
        };
        let der = subject_public_key_info_der(&public).unwrap();
        let (rest, spki) = ParsedSpki::from_der(&der).unwrap();
        assert!(rest.is_empty());
        let PublicKey::RSA(rsa) = spki.parsed().unwrap() else {
            panic!("not RSA");
        };
        assert_eq!(
            rsa.modulus.strip_prefix(&[0]).unwrap_or(rsa.modulus),
            &modulus[..]
        );
        assert_eq!(rsa.try_exponent().unwrap(), 65537);
    }

    #[test]
    fn ecc_spki_pads_short_coordinates() {
        let Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            ..
        } = template(EkAlgorithm::EccNistP256)
        else {
            panic!("ECC template is not ECC");
        };
        let x = vec![0x11u8; 31];
        let y = vec![0x22u8; 32];
        let public = Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique: EccPoint::new(
                EccParameter::try_from(x.clone()).unwrap(),
                EccParameter::try_from(y.clone()).unwrap(),
            ),
        };
        let der = subject_public_key_info_der(&public).unwrap();
        let (_, spki) = ParsedSpki::from_der(&der).unwrap();
        assert_eq!(
            spki.algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap()
                .to_id_string(),
            "1.2.840.10045.3.1.7"
        );
        let point = spki.subject_public_key.data.to_vec();
        let mut expected = vec![0x04, 0x00];
        expected.extend_from_slice(&x);
        expected.extend_from_slice(&y);
        assert_eq!(point, expected);
    }

    #[test]
    fn trims_zero_padding_after_certificate() {
        let mut cert = vec![0x30, 0x82, 0x01, 0x00];
        cert.extend(std::iter::repeat_n(0xab, 0x100));
        let mut padded = cert.clone();
        padded.extend([0u8; 37]);
        assert_eq!(trim_der_padding(padded), cert);
        assert_eq!(trim_der_padding(cert.clone()), cert);
    }

    #[test]
    fn leaves_non_der_and_truncated_input_alone() {
        assert_eq!(trim_der_padding(vec![0xff, 0x00]), vec![0xff, 0x00]);
        assert_eq!(trim_der_padding(vec![]), Vec::<u8>::new());
        // Declares 0x100 bytes but holds 2: not ours to fix.
        assert_eq!(
            trim_der_padding(vec![0x30, 0x82, 0x01, 0x00, 1, 2]),
            vec![0x30, 0x82, 0x01, 0x00, 1, 2]
        );
        assert_eq!(trim_der_padding(vec![0x30, 0x80]), vec![0x30, 0x80]);
    }
}
