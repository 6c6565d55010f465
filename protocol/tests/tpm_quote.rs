#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TPM2 quote verification against quotes built here from the spec layout
//! (TPM 2.0 Part 2 TPMS_ATTEST / TPMT_SIGNATURE) and signed with software keys
//! standing in for the AK. The end-to-end proof against swtpm's TPM2_Quote is
//! done where the agent's quote and this verifier meet.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use p256::ecdsa::signature::Signer;
use rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, RsaPrivateKey};
use sha2::{Digest, Sha256};
use warden_protocol::tpm::{
    alg, curve, parse_attest, parse_signature, parse_tpmt_public, verify_quote, PcrSelection,
    Public, QuoteError, Signature,
};

/// restricted | sign | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth
const AK_ATTRS: u32 = 0x0005_0072;
/// The same without `restricted`.
const UNRESTRICTED_ATTRS: u32 = 0x0004_0072;

/// One 2048-bit key for every RSA test: generation is slow in debug builds.
fn rsa_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
}

fn push2b(b: &mut Vec<u8>, data: &[u8]) {
    b.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
}

/// TPMT_PUBLIC of an RSA-2048 RSASSA-SHA256 signing key.
fn rsa_ak_public(attrs: u32) -> Public {
    let mut b = Vec::new();
    b.extend_from_slice(&alg::RSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&attrs.to_be_bytes());
    push2b(&mut b, &[]); // authPolicy
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
    b.extend_from_slice(&alg::RSASSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&2048u16.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // exponent: default 65537
    push2b(&mut b, &rsa_key().n().to_bytes_be());
    parse_tpmt_public(&b).unwrap()
}

/// TPMT_PUBLIC of an ECC P-256 ECDSA-SHA256 signing key.
fn ecc_ak_public(key: &p256::ecdsa::SigningKey, attrs: u32) -> Public {
    let point = key.verifying_key().to_encoded_point(false);
    let mut b = Vec::new();
    b.extend_from_slice(&alg::ECC.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&attrs.to_be_bytes());
    push2b(&mut b, &[]);
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
    b.extend_from_slice(&alg::ECDSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
    b.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
    push2b(&mut b, point.x().unwrap());
    push2b(&mut b, point.y().unwrap());
    parse_tpmt_public(&b).unwrap()
}

/// The fields of a TPMS_ATTEST, to marshal by hand.
#[derive(Clone)]
struct AttestSpec {
    magic: u32,
    attest_type: u16,
    signer: Vec<u8>,
    nonce: Vec<u8>,
    clock: u64,
    reset_count: u32,
    restart_count: u32,
    safe: u8,
    firmware: u64,
    selections: Vec<(u16, Vec<u8>)>,
    digest: Vec<u8>,
}

impl AttestSpec {
    /// A quote of `pcrs` (SHA-256 bank) with the digest of `values`.
    fn quote(nonce: &[u8], values: &BTreeMap<u32, Vec<u8>>) -> Self {
        let mut concat = Vec::new();
        for v in values.values() {
            concat.extend_from_slice(v);
        }
        Self {
            magic: 0xFF54_4347,
            attest_type: 0x8018,
            signer: vec![0x00, 0x0b, 0xaa, 0xbb],
            nonce: nonce.to_vec(),
            clock: 123_456,
            reset_count: 3,
            restart_count: 1,
            safe: 1,
            firmware: 0x2023_0101_0000_0001,
            selections: vec![(alg::SHA256, bitmap(values.keys().copied()))],
            digest: Sha256::digest(&concat).to_vec(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.magic.to_be_bytes());
        b.extend_from_slice(&self.attest_type.to_be_bytes());
        push2b(&mut b, &self.signer);
        push2b(&mut b, &self.nonce);
        b.extend_from_slice(&self.clock.to_be_bytes());
        b.extend_from_slice(&self.reset_count.to_be_bytes());
        b.extend_from_slice(&self.restart_count.to_be_bytes());
        b.push(self.safe);
        b.extend_from_slice(&self.firmware.to_be_bytes());
        b.extend_from_slice(&u32::try_from(self.selections.len()).unwrap().to_be_bytes());
        for (hash, select) in &self.selections {
            b.extend_from_slice(&hash.to_be_bytes());
            b.push(u8::try_from(select.len()).unwrap());
            b.extend_from_slice(select);
        }
        push2b(&mut b, &self.digest);
        b
    }
}

/// A 3-byte pcrSelect with bit i of byte j set for PCR 8j+i.
fn bitmap(pcrs: impl Iterator<Item = u32>) -> Vec<u8> {
    let mut select = vec![0u8; 3];
    for p in pcrs {
        select[usize::try_from(p / 8).unwrap()] |= 1 << (p % 8);
    }
    select
}

fn pcr_values() -> BTreeMap<u32, Vec<u8>> {
    [0u32, 1, 7, 14]
        .into_iter()
        .map(|i| (i, Sha256::digest(format!("pcr {i}")).to_vec()))
        .collect()
}

fn rsa_sign_with(hash_label: u16, message: &[u8]) -> Vec<u8> {
    let sig = rsa_key()
        .sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))
        .unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&alg::RSASSA.to_be_bytes());
    b.extend_from_slice(&hash_label.to_be_bytes());
    push2b(&mut b, &sig);
    b
}

fn rsa_sign(message: &[u8]) -> Vec<u8> {
    rsa_sign_with(alg::SHA256, message)
}

/// TPMT_SIGNATURE for ECDSA with leading zero bytes of r and s dropped, as
/// a TPM may.
fn ecdsa_sign(key: &p256::ecdsa::SigningKey, message: &[u8]) -> (Vec<u8>, usize) {
    let sig: p256::ecdsa::Signature = key.sign(message);
    let (r, s) = sig.split_bytes();
    let strip = |v: &[u8]| -> Vec<u8> { v.iter().copied().skip_while(|&x| x == 0).collect() };
    let (r, s) = (strip(&r), strip(&s));
    let shortest = r.len().min(s.len());
    let mut b = Vec::new();
    b.extend_from_slice(&alg::ECDSA.to_be_bytes());
    b.extend_from_slice(&alg::SHA256.to_be_bytes());
    push2b(&mut b, &r);
    push2b(&mut b, &s);
    (b, shortest)
}

const NONCE: &[u8] = b"server nonce 0123456789abcdef!!!";

#[test]
fn rsa_quote_verifies() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();
    let sig = rsa_sign(&attest);
    let v = verify_quote(&ak, &attest, &sig, NONCE, &values).unwrap();
    assert_eq!(v.pcrs, vec![0, 1, 7, 14]);
    assert_eq!(v.clock_info.reset_count, 3);
    assert_eq!(v.clock_info.restart_count, 1);
    assert_eq!(v.clock_info.clock, 123_456);
    assert_eq!(v.firmware_version, 0x2023_0101_0000_0001);

    let parsed = parse_attest(&attest).unwrap();
    assert_eq!(parsed.extra_data, NONCE);
    assert_eq!(parsed.qualified_signer, vec![0x00, 0x0b, 0xaa, 0xbb]);
    assert_eq!(parsed.quoted.pcr_select.len(), 1);
    assert!(
        matches!(parse_signature(&sig).unwrap(), Signature::Rsassa { hash, .. } if hash == alg::SHA256)
    );
}

#[test]
fn ecdsa_quote_verifies_including_short_r_or_s() {
    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    let ak = ecc_ak_public(&key, AK_ATTRS);
    let values = pcr_values();
    // Vary the nonce until a signature has r or s shorter than 32 bytes
    // (about 1 in 128 signatures), so the left-padding path is exercised.
    let mut saw_short = false;
    for i in 0u32..4096 {
        let nonce = format!("nonce {i}");
        let attest = AttestSpec::quote(nonce.as_bytes(), &values).bytes();
        let (sig, shortest) = ecdsa_sign(&key, &attest);
        if i > 0 && shortest == 32 {
            continue;
        }
        let v = verify_quote(&ak, &attest, &sig, nonce.as_bytes(), &values).unwrap();
        assert_eq!(v.pcrs, vec![0, 1, 7, 14]);
        if shortest < 32 {
            saw_short = true;
            break;
        }
    }
    assert!(saw_short, "no short ECDSA r/s in 4096 signatures");
}

#[test]
fn wrong_nonce_is_rejected() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(b"old nonce", &values).bytes();
    let sig = rsa_sign(&attest);
    let err = verify_quote(&ak, &attest, &sig, NONCE, &values).unwrap_err();
    assert!(matches!(err, QuoteError::NonceMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&hex::encode(b"old nonce")),
        "{err}"
    );
}

#[test]
fn tampered_attest_byte_breaks_the_signature() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let mut attest = AttestSpec::quote(NONCE, &values).bytes();
    let sig = rsa_sign(&attest);
    let last = attest.len() - 1;
    attest[last] ^= 1; // inside pcrDigest
    let err = verify_quote(&ak, &attest, &sig, NONCE, &values).unwrap_err();
    assert!(matches!(err, QuoteError::BadSignature { .. }), "{err}");

    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    let ak = ecc_ak_public(&key, AK_ATTRS);
    let mut attest = AttestSpec::quote(NONCE, &values).bytes();
    let (sig, _) = ecdsa_sign(&key, &attest);
    attest[10] ^= 0x80;
    let err = verify_quote(&ak, &attest, &sig, NONCE, &values).unwrap_err();
    assert!(matches!(err, QuoteError::BadSignature { .. }), "{err}");
}

#[test]
fn tampered_pcr_value_is_a_digest_mismatch_naming_bank_and_pcrs() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();
    let sig = rsa_sign(&attest);
    let mut changed = values.clone();
    changed.get_mut(&7).unwrap()[0] ^= 1;
    let err = verify_quote(&ak, &attest, &sig, NONCE, &changed).unwrap_err();
    assert!(matches!(err, QuoteError::PcrDigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("sha256") && msg.contains("[0, 1, 7, 14]"),
        "{msg}"
    );
}

#[test]
fn pcr_set_mismatches_name_the_pcrs() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();
    let sig = rsa_sign(&attest);

    // A value the quote does not cover.
    let mut extra = values.clone();
    extra.insert(10, vec![0; 32]);
    let err = verify_quote(&ak, &attest, &sig, NONCE, &extra).unwrap_err();
    assert_eq!(err, QuoteError::PcrsNotQuoted { pcrs: vec![10] });
    assert!(err.to_string().contains("[10]"), "{err}");

    // A quoted PCR with no value.
    let mut fewer = values.clone();
    fewer.remove(&7);
    let err = verify_quote(&ak, &attest, &sig, NONCE, &fewer).unwrap_err();
    assert_eq!(err, QuoteError::PcrValuesMissing { pcrs: vec![7] });
    assert!(err.to_string().contains("[7]"), "{err}");

    // A value of the wrong length.
    let mut short = values.clone();
    short.insert(1, vec![0; 20]);
    let err = verify_quote(&ak, &attest, &sig, NONCE, &short).unwrap_err();
    assert_eq!(err, QuoteError::BadPcrValue { pcr: 1, len: 20 });
}

#[test]
fn bank_must_be_exactly_one_sha256() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let mut spec = AttestSpec::quote(NONCE, &values);
    spec.selections[0].0 = alg::SHA1;
    let attest = spec.bytes();
    let err = verify_quote(&ak, &attest, &rsa_sign(&attest), NONCE, &values).unwrap_err();
    assert_eq!(err, QuoteError::PcrBankNotSha256 { hash: alg::SHA1 });

    let mut spec = AttestSpec::quote(NONCE, &values);
    spec.selections.push((alg::SHA384, vec![1, 0, 0]));
    let attest = spec.bytes();
    let err = verify_quote(&ak, &attest, &rsa_sign(&attest), NONCE, &values).unwrap_err();
    assert_eq!(err, QuoteError::PcrBankCount { count: 2 });
}

#[test]
fn wrong_magic_and_type_are_rejected_even_when_signed() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let mut spec = AttestSpec::quote(NONCE, &values);
    spec.magic = 0xFF54_4348;
    let attest = spec.bytes();
    let err = verify_quote(&ak, &attest, &rsa_sign(&attest), NONCE, &values).unwrap_err();
    assert_eq!(err, QuoteError::NotTpmGenerated { magic: 0xFF54_4348 });
    assert!(err.to_string().contains("not TPM-generated"), "{err}");

    let mut spec = AttestSpec::quote(NONCE, &values);
    spec.attest_type = 0x8017; // TPM_ST_ATTEST_CERTIFY
    let attest = spec.bytes();
    let err = verify_quote(&ak, &attest, &rsa_sign(&attest), NONCE, &values).unwrap_err();
    assert_eq!(err, QuoteError::WrongAttestType { found: 0x8017 });
    assert!(err.to_string().contains("0x8017"), "{err}");
}

#[test]
fn non_restricted_ak_is_rejected_first() {
    let ak = rsa_ak_public(UNRESTRICTED_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();
    let err = verify_quote(&ak, &attest, &rsa_sign(&attest), NONCE, &values).unwrap_err();
    assert!(
        matches!(
            err,
            QuoteError::AkNotRestrictedSigning {
                restricted: false,
                sign: true,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unsafe_clock_is_rejected() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let mut spec = AttestSpec::quote(NONCE, &values);
    spec.safe = 0;
    let attest = spec.bytes();
    let err = verify_quote(&ak, &attest, &rsa_sign(&attest), NONCE, &values).unwrap_err();
    assert_eq!(err, QuoteError::ClockNotSafe { safe: 0 });
}

#[test]
fn signature_scheme_problems_have_their_own_errors() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();

    let sig = rsa_sign_with(alg::SHA384, &attest);
    let err = verify_quote(&ak, &attest, &sig, NONCE, &values).unwrap_err();
    assert_eq!(
        err,
        QuoteError::SignatureHashNotSha256 { hash: alg::SHA384 }
    );

    let mut pss = rsa_sign(&attest);
    pss[..2].copy_from_slice(&alg::RSAPSS.to_be_bytes());
    let err = verify_quote(&ak, &attest, &pss, NONCE, &values).unwrap_err();
    assert_eq!(
        err,
        QuoteError::UnsupportedSignatureAlg { alg: alg::RSAPSS }
    );
    assert!(err.to_string().contains("0x0016"), "{err}");

    // An ECDSA signature offered for an RSA AK.
    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    let (ecdsa, _) = ecdsa_sign(&key, &attest);
    let err = verify_quote(&ak, &attest, &ecdsa, NONCE, &values).unwrap_err();
    assert!(
        matches!(err, QuoteError::SignatureAlgMismatch { .. }),
        "{err}"
    );

    // The right scheme from another key.
    let other = ecc_ak_public(&p256::ecdsa::SigningKey::random(&mut OsRng), AK_ATTRS);
    let err = verify_quote(&other, &attest, &ecdsa, NONCE, &values).unwrap_err();
    assert!(matches!(err, QuoteError::BadSignature { .. }), "{err}");
}

#[test]
fn every_truncation_and_trailing_byte_is_an_error() {
    let ak = rsa_ak_public(AK_ATTRS);
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();
    let sig = rsa_sign(&attest);
    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    let (ecdsa, _) = ecdsa_sign(&key, &attest);

    for n in 0..attest.len() {
        let err = parse_attest(&attest[..n]).unwrap_err();
        assert!(
            matches!(err, QuoteError::Truncated { .. }),
            "len {n}: {err}"
        );
        // Signed as truncated, so the parse (not the signature) must catch it.
        let cut = &attest[..n];
        assert!(verify_quote(&ak, cut, &rsa_sign(cut), NONCE, &values).is_err());
    }
    for sig_bytes in [&sig, &ecdsa] {
        for n in 0..sig_bytes.len() {
            let err = parse_signature(&sig_bytes[..n]).unwrap_err();
            assert!(
                matches!(err, QuoteError::Truncated { .. }),
                "len {n}: {err}"
            );
            assert!(verify_quote(&ak, &attest, &sig_bytes[..n], NONCE, &values).is_err());
        }
    }

    let mut long = attest.clone();
    long.push(0);
    let err = parse_attest(&long).unwrap_err();
    assert!(
        matches!(err, QuoteError::TrailingBytes { extra: 1, .. }),
        "{err}"
    );
    let mut long = sig.clone();
    long.push(0);
    let err = parse_signature(&long).unwrap_err();
    assert!(
        matches!(err, QuoteError::TrailingBytes { extra: 1, .. }),
        "{err}"
    );

    // A huge declared selection count must fail cleanly, not allocate.
    let mut spec = AttestSpec::quote(NONCE, &values);
    spec.selections.clear();
    let mut b = spec.bytes();
    let count_at = b.len() - 4 - 2 - spec.digest.len();
    b[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(parse_attest(&b).is_err());
}

#[test]
fn truncation_errors_name_field_and_offset() {
    let values = pcr_values();
    let attest = AttestSpec::quote(NONCE, &values).bytes();
    let msg = parse_attest(&attest[..5]).unwrap_err().to_string();
    assert!(
        msg.contains("TPMS_ATTEST") && msg.contains("type") && msg.contains("offset 4"),
        "{msg}"
    );
}

#[test]
fn pcr_selection_bit_order() {
    let sel = PcrSelection {
        hash: alg::SHA256,
        select: vec![0b1000_0011, 0, 0b0100_0000],
    };
    assert_eq!(sel.pcrs(), vec![0, 1, 7, 22]);
}
