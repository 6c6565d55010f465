//! The Endorsement Key's identity: which TCG default template, where its
//! certificate lives in NV, and how its TPM public area becomes a DER
//! SubjectPublicKeyInfo the server can compare with the certificate.
//!
//! Pure conversions only; the TPM commands stay in `tpm/mod.rs`.

use picky_asn1_x509::SubjectPublicKeyInfo;
use tss_esapi::{
    abstraction::AsymmetricAlgorithmSelection,
    interface_types::{ecc::EccCurve, key_bits::RsaKeyBits},
    structures::{EccParameter, EccPoint, Public},
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

    pub(super) fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlgorithm::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkAlgorithm::EccNistP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
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

/// DER-encodes the SubjectPublicKeyInfo of an RSA or ECC public area.
///
/// tss-esapi 7.7 does the mapping (`TryFrom<Public> for
/// picky_asn1_x509::SubjectPublicKeyInfo`: RSA exponent 0 means 65537, EC
/// points uncompressed) and picky-asn1-der the encoding. We only left-pad EC
/// coordinates to the curve size first: a TPM2B_ECC_PARAMETER may come without
/// leading zero bytes, and SEC1 points have fixed-width coordinates.
pub(super) fn subject_public_key_info_der(public: &Public) -> Result<Vec<u8>, String> {
    let public = match public {
        Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique,
        } => Public::Ecc {
            object_attributes: *object_attributes,
            name_hashing_algorithm: *name_hashing_algorithm,
            auth_policy: auth_policy.clone(),
            parameters: *parameters,
            unique: pad_ecc_point(unique, parameters.ecc_curve())?,
        },
        other => other.clone(),
    };
    let spki = SubjectPublicKeyInfo::try_from(public)
        .map_err(|e| format!("cannot map the TPM public area to a SubjectPublicKeyInfo: {e}"))?;
    picky_asn1_der::to_vec(&spki)
        .map_err(|e| format!("cannot DER-encode the SubjectPublicKeyInfo: {e}"))
}

fn pad_ecc_point(point: &EccPoint, curve: EccCurve) -> Result<EccPoint, String> {
    let width = match curve {
        EccCurve::NistP256 => 32,
        EccCurve::NistP384 => 48,
        EccCurve::NistP521 => 66,
        _ => return Ok(point.clone()),
    };
    let pad = |coordinate: &EccParameter| -> Result<EccParameter, String> {
        let bytes = coordinate.value();
        if bytes.len() > width {
            return Err(format!(
                "EC coordinate is {} bytes, longer than the {width} of curve {curve:?}",
                bytes.len()
            ));
        }
        let mut padded = vec![0u8; width - bytes.len()];
        padded.extend_from_slice(bytes);
        EccParameter::try_from(padded).map_err(|e| format!("EC coordinate: {e}"))
    };
    Ok(EccPoint::new(pad(point.x())?, pad(point.y())?))
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
    use tss_esapi::structures::PublicKeyRsa;
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    use x509_parser::x509::SubjectPublicKeyInfo as ParsedSpki;

    fn template(algorithm: EkAlgorithm) -> Public {
        create_ek_public_from_default_template_2(algorithm.selection(), DefaultKey).unwrap()
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
