#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TPMT_PUBLIC parsing, KDFa and software MakeCredential, checked against a
//! published known-answer vector and against an independent inverse
//! (ActivateCredential written here from the spec with the same primitives).
//! The proof against a real TPM (swtpm ActivateCredential) lives with the
//! agent's tests.

use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey};
use warden_protocol::tpm::{
    alg, curve, kdfa, kdfe, make_credential, make_credential_with_rng, parse_tpm2b_public,
    parse_tpmt_public, CredentialError, HashAlg, PublicKey, TpmParseError,
};

/// PolicySecret(TPM_RH_ENDORSEMENT): the authPolicy of the TCG EK templates.
const EK_POLICY: &str = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";

/// TCG EK Credential Profile template L-1 (RSA 2048, SHA-256, AES-128-CFB),
/// with `modulus` as its unique field.
fn ek_rsa_template(modulus: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&alg::RSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&0x0003_00B2u32.to_be_bytes());
    b.extend_from_slice(&32u16.to_be_bytes());
    b.extend_from_slice(&hex::decode(EK_POLICY).unwrap());
    b.extend_from_slice(&alg::AES.to_be_bytes());
    b.extend_from_slice(&128u16.to_be_bytes());
    b.extend_from_slice(&alg::CFB.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // scheme
    b.extend_from_slice(&2048u16.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // exponent: default
    b.extend_from_slice(&u16::try_from(modulus.len()).unwrap().to_be_bytes());
    b.extend_from_slice(modulus);
    b
}

/// TCG EK template L-2 shape (ECC NIST P-256), with the given point.
fn ek_ecc_template(x: &[u8], y: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&alg::ECC.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&0x0003_00B2u32.to_be_bytes());
    b.extend_from_slice(&32u16.to_be_bytes());
    b.extend_from_slice(&hex::decode(EK_POLICY).unwrap());
    b.extend_from_slice(&alg::AES.to_be_bytes());
    b.extend_from_slice(&128u16.to_be_bytes());
    b.extend_from_slice(&alg::CFB.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // scheme
    b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
    for c in [x, y] {
        b.extend_from_slice(&u16::try_from(c.len()).unwrap().to_be_bytes());
        b.extend_from_slice(c);
    }
    b
}

/// An AK shape: restricted signing ECC P-256 with ECDSA-SHA256, so the
/// scheme-with-hash path is parsed too.
fn ak_ecc_public() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&alg::ECC.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&0x0005_0072u32.to_be_bytes()); // restricted|sign|fixed*|sdo|uwa
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
    b.extend_from_slice(&alg::ECDSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
    for fill in [0x11u8, 0x22] {
        b.extend_from_slice(&32u16.to_be_bytes());
        b.extend_from_slice(&[fill; 32]);
    }
    b
}

/// One generated EK key for all tests: RSA-2048 generation is slow in a debug build.
fn test_key() -> &'static RsaPrivateKey {
    static KEY: std::sync::OnceLock<RsaPrivateKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
}

fn ek_for(key: &RsaPrivateKey) -> Vec<u8> {
    let n = key.n().to_bytes_be();
    assert_eq!(n.len(), 256);
    ek_rsa_template(&n)
}

/// Known answers from the TCG reference implementation's KDF self-test as
/// shipped in libtpms (src/tpm2/KdfTestData.h, c_kdfTestKeyIn /
/// c_kdfTestLabel "KDFSELFTESTLABEL\0" / c_kdfTestContextU / V /
/// c_kdfTestKeyOut for TPM_ALG_SHA256, SHA384 and SHA512, 160 output bits).
#[test]
fn kdfa_matches_reference_self_test_vectors() {
    let key = hex::decode("271fa08bbdc5060ec3dfa928ff9b73123a12da0c").unwrap();
    let u = hex::decode("ce244f395dca7391").unwrap();
    let v = hex::decode("da504031ddf12e83").unwrap();
    for (hash, want) in [
        (HashAlg::Sha256, "bb0259e1c8ba607e6a2cd704b69a902e9ade84c4"),
        (HashAlg::Sha384, "1dce70c9113eb2dba47bd9cfc72bf46f45b09312"),
        (HashAlg::Sha512, "8be2c1b85b78569b9fa759f5857c56d684810fd3"),
    ] {
        // The label with and without its NUL must derive the same key.
        let a = kdfa(hash, &key, b"KDFSELFTESTLABEL", &u, &v, 160).unwrap();
        let b = kdfa(hash, &key, b"KDFSELFTESTLABEL\0", &u, &v, 160).unwrap();
        assert_eq!(hex::encode(&a), want, "{hash:?}");
        assert_eq!(a, b);
    }
    // Longer than one HMAC block: the first block is the prefix of the longer output.
    let long = kdfa(HashAlg::Sha256, &key, b"X", &u, &v, 512).unwrap();
    assert_eq!(long.len(), 64);
    assert!(kdfa(HashAlg::Sha256, &key, b"X", &u, &v, 12).is_err());
    assert!(kdfa(HashAlg::Sha256, &key, b"X", &u, &v, 0).is_err());
}

#[test]
fn parses_tcg_ek_template_l1() {
    let modulus: Vec<u8> = (0..=255u8).collect();
    let bytes = ek_rsa_template(&modulus);
    let p = parse_tpmt_public(&bytes).unwrap();
    assert_eq!(p.object_type, alg::RSA);
    assert_eq!(p.name_alg, alg::SHA256);
    let a = p.attributes;
    assert!(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin());
    assert!(a.admin_with_policy() && a.restricted() && a.decrypt());
    assert!(!a.user_with_auth() && !a.sign() && !a.no_da() && !a.st_clear());
    assert_eq!(hex::encode(&p.auth_policy), EK_POLICY);
    let PublicKey::Rsa { params, modulus: m } = &p.key else {
        panic!("not RSA: {:?}", p.key)
    };
    let sym = params.symmetric.unwrap();
    assert_eq!(
        (sym.algorithm, sym.key_bits, sym.mode),
        (alg::AES, 128, alg::CFB)
    );
    assert_eq!(params.scheme, None);
    assert_eq!(params.key_bits, 2048);
    assert_eq!(params.exponent, 65537);
    assert_eq!(m, &modulus);

    let name = p.name().unwrap();
    assert_eq!(name.len(), 34);
    assert_eq!(&name[..2], &[0x00, 0x0b]);
    assert_eq!(hex::encode(&name[2..]), warden_protocol::sha256_hex(&bytes));
    assert_eq!(p.marshalled(), &bytes[..]);

    // The TPM2B form parses to the same object.
    let mut sized = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    sized.extend_from_slice(&bytes);
    assert_eq!(parse_tpm2b_public(&sized).unwrap(), p);
    assert!(matches!(
        parse_tpm2b_public(&sized[..sized.len() - 1]),
        Err(TpmParseError::SizeMismatch { .. })
    ));
}

#[test]
fn rsa_spki_matches_the_key() {
    use rsa::pkcs8::EncodePublicKey;
    let key = test_key();
    let p = parse_tpmt_public(&ek_for(key)).unwrap();
    let want = key.to_public_key().to_public_key_der().unwrap();
    assert_eq!(p.spki_der().unwrap(), want.as_bytes());
}

#[test]
fn parses_ecc_and_builds_p256_spki() {
    let x = [0xAAu8; 32];
    let y: Vec<u8> = vec![0xBB; 31]; // a short coordinate is left-padded
    let p = parse_tpmt_public(&ek_ecc_template(&x, &y)).unwrap();
    let PublicKey::Ecc { params, .. } = &p.key else {
        panic!("not ECC")
    };
    assert_eq!(params.curve_id, curve::NIST_P256);
    assert_eq!(params.kdf, None);
    let spki = p.spki_der().unwrap();
    assert_eq!(spki.len(), 91);
    assert_eq!(&spki[..2], &[0x30, 0x59]);
    assert_eq!(&spki[27..59], &x);
    assert_eq!(spki[59], 0);
    assert_eq!(&spki[60..], &y[..]);

    let ak = parse_tpmt_public(&ak_ecc_public()).unwrap();
    assert!(ak.attributes.restricted() && ak.attributes.sign() && !ak.attributes.decrypt());
    let PublicKey::Ecc { params, .. } = &ak.key else {
        panic!("not ECC")
    };
    let scheme = params.scheme.unwrap();
    assert_eq!(
        (scheme.scheme, scheme.hash_alg),
        (alg::ECDSA, Some(alg::SHA256))
    );
}

#[test]
fn truncated_and_padded_inputs_are_errors() {
    for bytes in [ek_rsa_template(&[7u8; 256]), ak_ecc_public()] {
        for len in 0..bytes.len() {
            let err = parse_tpmt_public(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, TpmParseError::Truncated { .. }),
                "{len}: {err}"
            );
            // And the TPM2B parser on a consistent-but-short body.
            let mut sized = u16::try_from(len).unwrap().to_be_bytes().to_vec();
            sized.extend_from_slice(&bytes[..len]);
            assert!(parse_tpm2b_public(&sized).is_err());
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(
            parse_tpmt_public(&extra).unwrap_err(),
            TpmParseError::TrailingBytes {
                offset: bytes.len(),
                extra: 1
            }
        );
    }
    // Errors name the field and offset.
    let err = parse_tpmt_public(&ek_rsa_template(&[7u8; 256])[..20]).unwrap_err();
    assert!(err.to_string().contains("authPolicy"), "{err}");
    // Unknown object type and unknown scheme stop the parse.
    let mut keyedhash = ek_rsa_template(&[1u8; 8]);
    keyedhash[..2].copy_from_slice(&alg::KEYEDHASH.to_be_bytes());
    assert!(matches!(
        parse_tpmt_public(&keyedhash),
        Err(TpmParseError::UnsupportedAlgorithm {
            field: "type",
            offset: 0,
            ..
        })
    ));
    assert!(parse_tpm2b_public(&[]).is_err());
    assert!(parse_tpm2b_public(&[0]).is_err());
}

#[test]
fn oaep_identity_label_round_trip() {
    let key = test_key();
    let msg = [0x5Au8; 32];
    let ct = key
        .to_public_key()
        .encrypt(
            &mut OsRng,
            Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            &msg,
        )
        .unwrap();
    assert_eq!(ct.len(), 256);
    let pt = key
        .decrypt(Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"), &ct)
        .unwrap();
    assert_eq!(pt, msg);
    // The label (with its NUL) is bound into the padding.
    assert!(key
        .decrypt(Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY"), &ct)
        .is_err());
}

/// ActivateCredential from Part 1 §24 / Part 3 §12.5, independently of the
/// code under test except for KDFa (checked by its own known answers).
fn activate(key: &RsaPrivateKey, name: &[u8], id_object: &[u8], secret: &[u8]) -> Option<Vec<u8>> {
    let seed = key
        .decrypt(
            Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            secret,
        )
        .ok()?;
    open_id_object(&seed, name, id_object)
}

/// The second half of ActivateCredential, the same for RSA and ECC EKs: check
/// the outer HMAC and decrypt the identity with keys derived from `seed`.
fn open_id_object(seed: &[u8], name: &[u8], id_object: &[u8]) -> Option<Vec<u8>> {
    assert_eq!(seed.len(), 32);
    let hmac_size = usize::from(u16::from_be_bytes([id_object[0], id_object[1]]));
    assert_eq!(hmac_size, 32);
    let (outer_hmac, enc_identity) = id_object[2..].split_at(hmac_size);

    use hmac::Mac;
    let hmac_key = kdfa(HashAlg::Sha256, seed, b"INTEGRITY", &[], &[], 256).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&hmac_key).unwrap();
    mac.update(enc_identity);
    mac.update(name);
    mac.verify_slice(outer_hmac).ok()?;

    let sym_key = kdfa(HashAlg::Sha256, seed, b"STORAGE", name, &[], 128).unwrap();
    let mut plain = enc_identity.to_vec();
    cfb_mode::Decryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
        .unwrap()
        .decrypt(&mut plain);
    let size = usize::from(u16::from_be_bytes([plain[0], plain[1]]));
    assert_eq!(size, plain.len() - 2);
    Some(plain[2..].to_vec())
}

#[test]
fn make_credential_round_trips_through_an_independent_activate() {
    let key = test_key();
    let ek_bytes = ek_for(key);
    let ak_name = parse_tpmt_public(&ak_ecc_public()).unwrap().name().unwrap();
    let secret: Vec<u8> = (100..132u8).collect();

    let cred = make_credential(&ek_bytes, &ak_name, &secret).unwrap();
    // u16 32 ‖ HMAC(32) ‖ encIdentity(2 + 32); OAEP ciphertext = modulus size.
    assert_eq!(cred.id_object.len(), 2 + 32 + 2 + 32);
    assert_eq!(&cred.id_object[..2], &[0, 32]);
    assert_eq!(cred.encrypted_secret.len(), 256);
    assert_eq!(&cred.id_object_tpm2b()[..2], &[0, 68]);
    assert_eq!(&cred.encrypted_secret_tpm2b()[..2], &[1, 0]);

    assert_eq!(
        activate(key, &ak_name, &cred.id_object, &cred.encrypted_secret),
        Some(secret.clone())
    );
    // Bound to the object name: another name fails the integrity check.
    let mut other = ak_name.clone();
    other[5] ^= 1;
    assert_eq!(
        activate(key, &other, &cred.id_object, &cred.encrypted_secret),
        None
    );
    // A tampered blob fails too.
    let mut bad = cred.id_object.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x80;
    assert_eq!(activate(key, &ak_name, &bad, &cred.encrypted_secret), None);
    // Fresh seed each call.
    let again = make_credential(&ek_bytes, &ak_name, &secret).unwrap();
    assert_ne!(again.encrypted_secret, cred.encrypted_secret);
    assert_ne!(again.id_object, cred.id_object);

    // Other lengths, through the rng-taking API.
    let ek = parse_tpmt_public(&ek_bytes).unwrap();
    for len in [0usize, 1, 20, 64] {
        let s = vec![0x42u8; len];
        let c = make_credential_with_rng(&ek, &ak_name, &s, &mut OsRng).unwrap();
        assert_eq!(
            activate(key, &ak_name, &c.id_object, &c.encrypted_secret),
            Some(s)
        );
    }
}

#[test]
fn make_credential_rejects_what_a_tpm_would() {
    let key = test_key();
    let ek_bytes = ek_for(key);
    let name = parse_tpmt_public(&ak_ecc_public()).unwrap().name().unwrap();
    assert!(matches!(
        make_credential(&ek_bytes, &name, &[0u8; 65]),
        Err(CredentialError::CredentialTooLong(65))
    ));
    assert!(matches!(
        make_credential(&ek_ecc_template(&[1; 32], &[2; 32]), &name, &[0u8; 32]),
        Err(CredentialError::BadEccPoint(curve::NIST_P256))
    ));
    let mut brainpool = ek_ecc_template(&[1; 32], &[2; 32]);
    brainpool[50..52].copy_from_slice(&0x0010u16.to_be_bytes());
    assert!(matches!(
        make_credential(&brainpool, &name, &[0u8; 32]),
        Err(CredentialError::UnsupportedCurve(0x0010))
    ));
    assert!(matches!(
        make_credential(&ek_bytes[..100], &name, &[0u8; 32]),
        Err(CredentialError::Parse(_))
    ));
    // A signing key is not a storage key.
    let mut signing = ek_bytes.clone();
    signing[4..8].copy_from_slice(&0x0005_0072u32.to_be_bytes());
    assert!(matches!(
        make_credential(&signing, &name, &[0u8; 32]),
        Err(CredentialError::NotStorageKey(_))
    ));
    assert!(matches!(
        make_credential(&ek_bytes, &[0], &[0u8; 32]),
        Err(CredentialError::BadObjectName(1))
    ));
}

/// The NIST P-256 EK of the ECC tests: a fixed private scalar, so a failure
/// is reproducible.
fn ecc_test_key() -> p256::SecretKey {
    p256::SecretKey::from_slice(&[0x5Au8; 32]).unwrap()
}

/// The ECC half of ActivateCredential (Part 1 §24.4, Annex C.6.1),
/// independently of the code under test: Z = d·Q, then KDFe written out here
/// with SHA-256 directly (one block: the seed is 256 bits).
fn activate_ecc(
    key: &p256::SecretKey,
    ek_x: &[u8],
    name: &[u8],
    id_object: &[u8],
    secret: &[u8],
) -> Option<Vec<u8>> {
    use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
    use sha2::Digest;
    // TPMS_ECC_POINT: u16 |x| ‖ x ‖ u16 |y| ‖ y.
    let x_len = usize::from(u16::from_be_bytes([secret[0], secret[1]]));
    let (qx, rest) = secret[2..].split_at(x_len);
    let y_len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let qy = &rest[2..];
    assert_eq!((x_len, y_len, qy.len()), (32, 32, 32));
    let point = p256::EncodedPoint::from_affine_coordinates(qx.into(), qy.into(), false);
    let q = p256::AffinePoint::from_encoded_point(&point).unwrap();
    let shared = (p256::ProjectivePoint::from(q) * *key.to_nonzero_scalar()).to_affine();
    let z = shared.to_encoded_point(false).x().unwrap().to_vec();
    let seed = sha2::Sha256::new()
        .chain_update(1u32.to_be_bytes())
        .chain_update(&z)
        .chain_update(b"IDENTITY\0")
        .chain_update(qx)
        .chain_update(ek_x)
        .finalize();
    open_id_object(&seed, name, id_object)
}

#[test]
fn ecc_make_credential_round_trips_through_an_independent_activate() {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let key = ecc_test_key();
    let point = key.public_key().to_encoded_point(false);
    let (x, y) = (point.x().unwrap().to_vec(), point.y().unwrap().to_vec());
    let ek_bytes = ek_ecc_template(&x, &y);
    let ak_name = parse_tpmt_public(&ak_ecc_public()).unwrap().name().unwrap();
    let secret: Vec<u8> = (7..39u8).collect();

    let cred = make_credential(&ek_bytes, &ak_name, &secret).unwrap();
    assert_eq!(cred.encrypted_secret.len(), 2 + 32 + 2 + 32);
    assert_eq!(cred.id_object.len(), 2 + 32 + 2 + 32);
    assert_eq!(
        activate_ecc(&key, &x, &ak_name, &cred.id_object, &cred.encrypted_secret),
        Some(secret.clone())
    );
    // Bound to the name, and to the EK: another private key derives another seed.
    let mut other = ak_name.clone();
    other[9] ^= 1;
    assert_eq!(
        activate_ecc(&key, &x, &other, &cred.id_object, &cred.encrypted_secret),
        None
    );
    let stranger = p256::SecretKey::from_slice(&[0x33u8; 32]).unwrap();
    assert_eq!(
        activate_ecc(
            &stranger,
            &x,
            &ak_name,
            &cred.id_object,
            &cred.encrypted_secret
        ),
        None
    );
    // A fresh ephemeral key each call.
    let again = make_credential(&ek_bytes, &ak_name, &secret).unwrap();
    assert_ne!(again.encrypted_secret, cred.encrypted_secret);
}

#[test]
fn kdfe_is_the_concatenation_kdf() {
    use sha2::Digest;
    let (z, u, v) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    let block = |i: u32| {
        sha2::Sha256::new()
            .chain_update(i.to_be_bytes())
            .chain_update(z)
            .chain_update(b"IDENTITY\0")
            .chain_update(u)
            .chain_update(v)
            .finalize()
            .to_vec()
    };
    let one = kdfe(HashAlg::Sha256, &z, b"IDENTITY", &u, &v, 256).unwrap();
    assert_eq!(one, block(1));
    assert_eq!(
        kdfe(HashAlg::Sha256, &z, b"IDENTITY\0", &u, &v, 256).unwrap(),
        one
    );
    let long = kdfe(HashAlg::Sha256, &z, b"IDENTITY", &u, &v, 384).unwrap();
    assert_eq!(long, [block(1), block(2)].concat()[..48]);
    assert!(kdfe(HashAlg::Sha256, &z, b"IDENTITY", &u, &v, 7).is_err());
}
