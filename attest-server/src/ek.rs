//! Checking a submitted Endorsement Key and deriving the node id from it.
//!
//! This module owns the rule "the node id is the SHA-256 of a well-formed EK
//! SPKI whose key type matches the claimed algorithm". It parses untrusted
//! bytes with x509-parser only; it must never accept an id supplied by the
//! agent, nor trust `ek.algorithm` without looking at the key itself.

use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Why an EK public key was refused (the message is sent to the agent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EkError(pub String);

/// Parses `spki_der` as a DER `SubjectPublicKeyInfo`, checks that it holds a
/// key of the kind `algorithm` names (`rsa2048`: RSA with a 2048-bit
/// modulus; `ecc-nist-p256`: an uncompressed point on P-256), and returns
/// the node id (`warden_protocol::hello::node_id_for_ek`).
pub fn node_id_from_ek(algorithm: &str, spki_der: &[u8]) -> Result<String, EkError> {
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| EkError(format!("is not a DER SubjectPublicKeyInfo: {e}")))?;
    if !rest.is_empty() {
        return Err(EkError(format!(
            "has {} trailing bytes after the SubjectPublicKeyInfo",
            rest.len()
        )));
    }
    let key_oid = &spki.algorithm.algorithm;
    match algorithm {
        "rsa2048" => {
            if *key_oid != OID_PKCS1_RSAENCRYPTION {
                return Err(EkError(format!(
                    "ek.algorithm is rsa2048 but the key is not an RSA key (algorithm OID {key_oid})"
                )));
            }
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(EkError("holds a malformed RSA public key".into()));
            };
            let bits = bit_length(rsa.modulus);
            if bits != 2048 {
                return Err(EkError(format!(
                    "ek.algorithm is rsa2048 but the RSA modulus has {bits} bits"
                )));
            }
            if rsa.try_exponent().map_or(true, |e| e < 3 || e % 2 == 0) {
                return Err(EkError(
                    "holds an RSA key with an invalid public exponent".into(),
                ));
            }
        }
        "ecc-nist-p256" => {
            if *key_oid != OID_KEY_TYPE_EC_PUBLIC_KEY {
                return Err(EkError(format!(
                    "ek.algorithm is ecc-nist-p256 but the key is not an EC key (algorithm OID {key_oid})"
                )));
            }
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            if curve.as_ref() != Some(&OID_EC_P256) {
                let curve = curve.map_or_else(|| "none".to_owned(), |c| c.to_id_string());
                return Err(EkError(format!(
                    "ek.algorithm is ecc-nist-p256 but the key's curve is {curve} (expected P-256, 1.2.840.10045.3.1.7)"
                )));
            }
            let point = &spki.subject_public_key.data;
            if point.len() != 65 || point.first() != Some(&0x04) {
                return Err(EkError(
                    "holds a P-256 point that is not 65 bytes uncompressed (04 || X || Y)".into(),
                ));
            }
        }
        other => {
            return Err(EkError(format!("unsupported EK algorithm {other:?}")));
        }
    }
    Ok(warden_protocol::hello::node_id_for_ek(spki_der))
}

/// Bit length of a big-endian unsigned integer (DER may add a 0x00 byte).
fn bit_length(be: &[u8]) -> usize {
    let mut bytes = be.iter().skip_while(|b| **b == 0).peekable();
    let Some(first) = bytes.peek().copied() else {
        return 0;
    };
    let len = bytes.count();
    len * 8 - first.leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{KeyPair, PublicKeyData};

    fn p256_spki() -> Vec<u8> {
        KeyPair::generate().unwrap().subject_public_key_info()
    }

    #[test]
    fn accepts_p256_and_derives_sha256_id() {
        let spki = p256_spki();
        let id = node_id_from_ek("ecc-nist-p256", &spki).unwrap();
        assert_eq!(id, warden_protocol::sha256_hex(&spki));
    }

    #[test]
    fn rejects_algorithm_mismatch_and_other_curves() {
        let spki = p256_spki();
        let err = node_id_from_ek("rsa2048", &spki).unwrap_err();
        assert!(err.0.contains("not an RSA key"), "{err}");

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .subject_public_key_info();
        let err = node_id_from_ek("ecc-nist-p256", &p384).unwrap_err();
        assert!(err.0.contains("curve is 1.3.132.0.34"), "{err}");

        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .subject_public_key_info();
        let err = node_id_from_ek("ecc-nist-p256", &ed).unwrap_err();
        assert!(err.0.contains("not an EC key"), "{err}");
    }

    #[test]
    fn rejects_garbage_and_trailing_bytes() {
        assert!(node_id_from_ek("rsa2048", &[0x30, 0x03, 1, 2, 3]).is_err());
        assert!(node_id_from_ek("rsa2048", &[]).is_err());
        let mut spki = p256_spki();
        spki.push(0);
        let err = node_id_from_ek("ecc-nist-p256", &spki).unwrap_err();
        assert!(err.0.contains("trailing"), "{err}");
    }

    #[test]
    fn rsa_modulus_size_is_checked() {
        // A hand-built SPKI: rsaEncryption, NULL params, modulus of `bits`.
        fn rsa_spki(modulus_bytes: usize) -> Vec<u8> {
            fn der(tag: u8, body: &[u8]) -> Vec<u8> {
                let mut out = vec![tag];
                let len = body.len();
                if len < 128 {
                    out.push(u8::try_from(len).unwrap());
                } else if len < 256 {
                    out.extend([0x81, u8::try_from(len).unwrap()]);
                } else {
                    out.push(0x82);
                    out.extend(u16::try_from(len).unwrap().to_be_bytes());
                }
                out.extend_from_slice(body);
                out
            }
            let mut modulus = vec![0x00, 0xc1];
            modulus.resize(modulus_bytes + 1, 0x5a);
            let key = der(0x30, &[der(0x02, &modulus), der(0x02, &[1, 0, 1])].concat());
            let mut bits = vec![0];
            bits.extend(key);
            let alg = der(
                0x30,
                &[
                    der(
                        0x06,
                        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
                    ),
                    vec![0x05, 0x00],
                ]
                .concat(),
            );
            der(0x30, &[alg, der(0x03, &bits)].concat())
        }
        node_id_from_ek("rsa2048", &rsa_spki(256)).unwrap();
        let err = node_id_from_ek("rsa2048", &rsa_spki(128)).unwrap_err();
        assert!(err.0.contains("1024 bits"), "{err}");
        let err = node_id_from_ek("ecc-nist-p256", &rsa_spki(256)).unwrap_err();
        assert!(err.0.contains("not an EC key"), "{err}");
    }

    #[test]
    fn bit_length_ignores_leading_zeros() {
        assert_eq!(bit_length(&[0, 0x80, 0]), 16);
        assert_eq!(bit_length(&[0x01]), 1);
        assert_eq!(bit_length(&[0, 0]), 0);
    }
}
