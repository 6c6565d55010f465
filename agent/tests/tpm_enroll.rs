//! Enrollment's proof of possession, end to end against a real swtpm: the
//! server's pure-Rust MakeCredential (warden-protocol, no TPM, no libtss2)
//! for the agent's AK under its real EK, answered by the TPM's
//! ActivateCredential through the agent's facade.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use swtpm::Swtpm;
use warden_agent::tpm::{AkAlgorithm, Tpm};
use warden_protocol::tpm::{make_credential, parse_tpmt_public};

#[test]
fn pure_rust_make_credential_is_activated_by_the_tpm() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key().unwrap();
    // The server ties the TPMT_PUBLIC it will encrypt to to the SPKI the
    // node is identified by.
    let ek_public = parse_tpmt_public(&ek.tpm_public).unwrap();
    assert_eq!(ek_public.spki_der().unwrap(), ek.public_key_der);

    for algorithm in [
        AkAlgorithm::Rsa2048RsassaSha256,
        AkAlgorithm::EccP256EcdsaSha256,
    ] {
        let ak = tpm.create_ak(algorithm).unwrap();
        // The server computes the AK's name itself from its public area.
        let ak_public = parse_tpmt_public(&ak.tpm_public).unwrap();
        assert_eq!(ak_public.name().unwrap(), ak.name, "{algorithm:?}");
        assert!(ak_public.attributes.restricted() && ak_public.attributes.sign());

        let secret: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7) ^ 0x5a).collect();
        let credential = make_credential(&ek.tpm_public, &ak.name, &secret).unwrap();
        let recovered = tpm
            .activate_credential(&ak, &credential.id_object, &credential.encrypted_secret)
            .unwrap();
        assert_eq!(recovered, secret, "{algorithm:?}");
    }
}

#[test]
fn a_credential_for_another_name_is_refused_by_the_tpm() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key().unwrap();
    let ak = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    let other = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    let credential = make_credential(&ek.tpm_public, &other.name, &[1u8; 32]).unwrap();
    let err = tpm
        .activate_credential(&ak, &credential.id_object, &credential.encrypted_secret)
        .unwrap_err();
    assert!(err.to_string().contains("ActivateCredential"), "{err}");
}

#[test]
fn a_real_quote_verifies_in_pure_rust_and_a_stale_nonce_does_not() {
    use std::collections::BTreeMap;
    use warden_protocol::tpm::quote::{verify_quote, QuoteError};

    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let pcrs: Vec<u32> = (0..10).collect();
    for algorithm in [
        AkAlgorithm::Rsa2048RsassaSha256,
        AkAlgorithm::EccP256EcdsaSha256,
    ] {
        let ak = tpm.create_ak(algorithm).unwrap();
        let ak_public = parse_tpmt_public(&ak.tpm_public).unwrap();
        let nonce = [0x42u8; 32];
        let quote = tpm.quote(&ak, &nonce, &pcrs).unwrap();
        let values: BTreeMap<u32, Vec<u8>> = quote
            .pcr_values
            .iter()
            .map(|(i, v)| (*i, v.to_vec()))
            .collect();

        let verified =
            verify_quote(&ak_public, &quote.attest, &quote.signature, &nonce, &values).unwrap();
        assert_eq!(verified.pcrs, pcrs, "{algorithm:?}");

        // A replayed quote (another nonce) and a lie about a PCR are refused.
        let err = verify_quote(
            &ak_public,
            &quote.attest,
            &quote.signature,
            &[0u8; 32],
            &values,
        )
        .unwrap_err();
        assert!(matches!(err, QuoteError::NonceMismatch { .. }), "{err}");
        let mut lie = values.clone();
        lie.insert(7, vec![0xAA; 32]);
        let err =
            verify_quote(&ak_public, &quote.attest, &quote.signature, &nonce, &lie).unwrap_err();
        assert!(matches!(err, QuoteError::PcrDigestMismatch { .. }), "{err}");
    }
}
