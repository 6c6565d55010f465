//! TPM2_Quote through the facade against a real swtpm. The quote is checked
//! with tss-esapi's own parser and the signature with the TPM's
//! VerifySignature on the AK public loaded with LoadExternal — as a server
//! holding only the AK's TPMT_PUBLIC would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use std::collections::BTreeMap;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use swtpm::Swtpm;
use tss_esapi::{
    handles::PcrHandle,
    interface_types::{
        algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm},
        resource_handles::Hierarchy,
        structure_tags::AttestationType,
    },
    structures::{Attest, AttestInfo, Digest, DigestValues, Public, Signature},
    traits::UnMarshall,
    Context, TctiNameConf,
};
use warden_agent::tpm::{AkAlgorithm, AttestationKey, Quote, Tpm, TpmError, MAX_NONCE_LEN};

const PCRS: [u32; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

fn raw_context(swtpm: &Swtpm) -> Context {
    Context::new(TctiNameConf::from_str(&swtpm.tcti()).unwrap()).unwrap()
}

/// Checks the quote's structure and that its pcrDigest covers `pcr_values`.
fn check_quote(quote: &Quote, ak: &AttestationKey, nonce: &[u8]) {
    let attest = Attest::unmarshall(&quote.attest).unwrap();
    assert_eq!(attest.attestation_type(), AttestationType::Quote);
    assert_eq!(attest.extra_data().value(), nonce);
    let AttestInfo::Quote { info } = attest.attested() else {
        panic!("not a quote: {:?}", attest.attested());
    };
    let selections = info.pcr_selection().get_selections();
    assert_eq!(selections.len(), 1, "{selections:?}");
    assert_eq!(selections[0].hashing_algorithm(), HashingAlgorithm::Sha256);
    let selected: Vec<u32> = selections[0]
        .selected()
        .into_iter()
        .map(|slot| u32::from(slot).trailing_zeros())
        .collect();
    assert_eq!(selected, PCRS.to_vec());

    assert_eq!(
        quote.pcr_values.keys().copied().collect::<Vec<_>>(),
        PCRS.to_vec()
    );
    let mut hasher = Sha256::new();
    for value in quote.pcr_values.values() {
        hasher.update(value);
    }
    assert_eq!(info.pcr_digest().value(), hasher.finalize().as_slice());

    let signature = Signature::unmarshall(&quote.signature).unwrap();
    let wanted = match ak.algorithm {
        AkAlgorithm::Rsa2048RsassaSha256 => SignatureSchemeAlgorithm::RsaSsa,
        AkAlgorithm::EccP256EcdsaSha256 => SignatureSchemeAlgorithm::EcDsa,
    };
    assert_eq!(signature.algorithm(), wanted);
}

/// TPM2_VerifySignature over SHA-256(`attest`) with the AK public loaded
/// public-only. The caller must have dropped its `Tpm` (one connection).
fn verify(swtpm: &Swtpm, ak: &AttestationKey, attest: &[u8], signature: &[u8]) -> bool {
    let mut context = raw_context(swtpm);
    let public = Public::unmarshall(&ak.tpm_public).unwrap();
    let key = context
        .load_external_public(public, Hierarchy::Null)
        .unwrap();
    let digest = Digest::try_from(Sha256::digest(attest).to_vec()).unwrap();
    let signature = Signature::unmarshall(signature).unwrap();
    let verified = context.verify_signature(key, digest, signature).is_ok();
    context.flush_context(key.into()).unwrap();
    verified
}

fn quote_verifies(algorithm: AkAlgorithm) {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(algorithm).unwrap();
    let nonce: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();

    let quote = tpm.quote(&ak, &nonce, &PCRS).unwrap();
    check_quote(&quote, &ak, &nonce);
    // The reported values are the TPM's, not made up.
    let bank = tpm.pcr_bank_sha256().unwrap();
    let expected: BTreeMap<u32, [u8; 32]> = PCRS.iter().map(|i| (*i, bank[i])).collect();
    assert_eq!(quote.pcr_values, expected);

    // Twice in a row on one connection: a leaked handle would exhaust
    // libtpms's 3 object slots (EK + AK per quote) within a few calls.
    let mut second = None;
    for _ in 0..4 {
        second = Some(tpm.quote(&ak, &nonce, &PCRS).unwrap());
    }
    let second = second.unwrap();
    check_quote(&second, &ak, &nonce);
    assert_eq!(second.pcr_values, quote.pcr_values);
    drop(tpm);

    assert!(verify(&swtpm, &ak, &quote.attest, &quote.signature));
    assert!(verify(&swtpm, &ak, &second.attest, &second.signature));
    let mut tampered = quote.attest.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(!verify(&swtpm, &ak, &tampered, &quote.signature));
}

#[test]
fn rsa_ak_quotes_pcrs_0_to_9_with_the_nonce() {
    quote_verifies(AkAlgorithm::Rsa2048RsassaSha256);
}

#[test]
fn ecc_ak_quotes_pcrs_0_to_9_with_the_nonce() {
    quote_verifies(AkAlgorithm::EccP256EcdsaSha256);
}

#[test]
fn quote_follows_an_extended_pcr() {
    let swtpm = Swtpm::start();
    let nonce = [7u8; 32];
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlgorithm::EccP256EcdsaSha256).unwrap();
    let before = tpm.quote(&ak, &nonce, &PCRS).unwrap();
    drop(tpm);

    let mut context = raw_context(&swtpm);
    let mut digests = DigestValues::new();
    digests.set(
        HashingAlgorithm::Sha256,
        Digest::try_from(Sha256::digest(b"warden test event").to_vec()).unwrap(),
    );
    context
        .execute_with_nullauth_session(|ctx| ctx.pcr_extend(PcrHandle::Pcr9, digests))
        .unwrap();
    drop(context);

    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let after = tpm.quote(&ak, &nonce, &PCRS).unwrap();
    drop(tpm);
    check_quote(&after, &ak, &nonce);
    assert_ne!(after.pcr_values[&9], before.pcr_values[&9]);
    for index in 0..9 {
        assert_eq!(after.pcr_values[&index], before.pcr_values[&index]);
    }
    assert!(verify(&swtpm, &ak, &after.attest, &after.signature));
}

#[test]
fn bad_nonce_and_pcrs_are_errors_not_panics() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();

    let error = tpm
        .quote(&ak, &[0u8; MAX_NONCE_LEN + 1], &PCRS)
        .unwrap_err();
    let TpmError::Command { operation, .. } = &error else {
        panic!("expected a Command error, got {error:?}");
    };
    assert_eq!(*operation, "Quote");
    eprintln!("{error}");

    assert!(tpm.quote(&ak, &[1; 32], &[]).is_err());
    let error = tpm.quote(&ak, &[1; 32], &[24]).unwrap_err();
    assert!(error.to_string().contains("PCR 24"), "{error}");

    let mut broken = ak.clone();
    broken.private.truncate(10);
    for _ in 0..4 {
        let error = tpm.quote(&broken, &[1; 32], &PCRS).unwrap_err();
        assert!(error.to_string().contains("Load(AK)"), "{error}");
    }
    // A full 64-byte nonce is fine, and nothing leaked on the error paths.
    let quote = tpm.quote(&ak, &[9; MAX_NONCE_LEN], &PCRS).unwrap();
    check_quote(&quote, &ak, &[9; MAX_NONCE_LEN]);
}
