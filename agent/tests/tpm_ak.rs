//! The Attestation Key and ActivateCredential against a real swtpm. The
//! credential is made by the same TPM (TPM2_MakeCredential needs only the
//! EK's public area, loaded with LoadExternal — as the server would hold it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use swtpm::Swtpm;
use tss_esapi::{
    interface_types::resource_handles::Hierarchy,
    structures::{Digest, Name, Public},
    traits::UnMarshall,
    Context, TctiNameConf,
};
use warden_agent::tpm::{AkAlgorithm, AttestationKey, Tpm, TpmError};

// TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3).
const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const USER_WITH_AUTH: u32 = 1 << 6;
const NO_DA: u32 = 1 << 10;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;

fn check_ak(ak: &AttestationKey, algorithm: AkAlgorithm, tpm_alg: u16) {
    assert_eq!(ak.algorithm, algorithm);
    // TPMT_PUBLIC: type, nameAlg SHA-256, objectAttributes.
    assert_eq!(&ak.tpm_public[..2], &tpm_alg.to_be_bytes());
    assert_eq!(&ak.tpm_public[2..4], &[0x00, 0x0b]);
    let attributes = u32::from_be_bytes(ak.tpm_public[4..8].try_into().unwrap());
    let wanted = FIXED_TPM
        | FIXED_PARENT
        | SENSITIVE_DATA_ORIGIN
        | USER_WITH_AUTH
        | NO_DA
        | RESTRICTED
        | SIGN;
    assert_eq!(attributes & wanted, wanted, "attributes {attributes:#010x}");
    assert_eq!(attributes & DECRYPT, 0, "an AK must not decrypt");

    assert_eq!(ak.name.len(), 34);
    assert_eq!(&ak.name[..2], &[0x00, 0x0b]);
    assert_eq!(&ak.name[2..], Sha256::digest(&ak.tpm_public).as_slice());

    // TPM2B_PRIVATE: the size prefix covers the rest.
    let size = usize::from(u16::from_be_bytes([ak.private[0], ak.private[1]]));
    assert_eq!(size + 2, ak.private.len());
    assert!(size > 0);
}

/// Opens a raw ESAPI context: the test's stand-in for the server (swtpm
/// serves one connection at a time, so the caller drops its `Tpm` first).
/// Anything tss-esapi tracks is flushed when the context drops.
fn raw_context(swtpm: &Swtpm) -> Context {
    Context::new(TctiNameConf::from_str(&swtpm.tcti()).unwrap()).unwrap()
}

/// TPM2_MakeCredential with the EK's public area loaded as a public-only
/// object. Returns the TPM2B contents, without size prefixes.
fn make_credential(
    swtpm: &Swtpm,
    ek_public: &[u8],
    name: &[u8],
    secret: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let mut context = raw_context(swtpm);
    let public = Public::unmarshall(ek_public).unwrap();
    let ek = context
        .load_external_public(public, Hierarchy::Null)
        .unwrap();
    let made = context.make_credential(
        ek,
        Digest::try_from(secret.to_vec()).unwrap(),
        Name::try_from(name.to_vec()).unwrap(),
    );
    context.flush_context(ek.into()).unwrap();
    let (id_object, encrypted_secret) = made.unwrap();
    (
        id_object.value().to_vec(),
        encrypted_secret.value().to_vec(),
    )
}

#[test]
fn rsa_ak_is_a_restricted_signing_key_named_by_its_public_area() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    check_ak(&ak, AkAlgorithm::Rsa2048RsassaSha256, 0x0001);
    // Each AK is fresh key material.
    let other = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    assert_ne!(ak.name, other.name);
    // Leak check. tss-esapi flushes what it tracks when a context drops, so
    // a leak shows only within one connection: libtpms has 3 object and 3
    // session slots, and each create_ak holds the EK and the AK at once, so
    // a leaked object or session per call fails by the fourth call.
    for _ in 0..4 {
        tpm.create_ak(AkAlgorithm::EccP256EcdsaSha256).unwrap();
    }
}

#[test]
fn ecc_p256_ak_is_a_restricted_signing_key_named_by_its_public_area() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlgorithm::EccP256EcdsaSha256).unwrap();
    check_ak(&ak, AkAlgorithm::EccP256EcdsaSha256, 0x0023);
}

#[test]
fn activate_credential_recovers_the_secret_made_for_the_ak_name() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key().unwrap();
    let rsa = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    let ecc = tpm.create_ak(AkAlgorithm::EccP256EcdsaSha256).unwrap();
    drop(tpm);

    let secret: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    for ak in [&rsa, &ecc] {
        let (id_object, encrypted_secret) =
            make_credential(&swtpm, &ek.tpm_public, &ak.name, &secret);
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        // Repeatedly on one connection: a leaked AK, EK or policy session
        // would exhaust libtpms' three object or three session slots by the
        // fourth round.
        for _ in 0..4 {
            let recovered = tpm
                .activate_credential(ak, &id_object, &encrypted_secret)
                .unwrap();
            assert_eq!(recovered, secret);
        }
    }
}

#[test]
fn a_credential_for_another_name_is_refused_and_nothing_leaks() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key().unwrap();
    let ak = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    let other = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();
    drop(tpm);

    let secret = [0x42u8; 32];
    let (wrong_id, wrong_secret) = make_credential(&swtpm, &ek.tpm_public, &other.name, &secret);
    let (id_object, encrypted_secret) = make_credential(&swtpm, &ek.tpm_public, &ak.name, &secret);
    // One connection throughout: tss-esapi's drop would hide a leak.
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    for _ in 0..4 {
        let error = tpm
            .activate_credential(&ak, &wrong_id, &wrong_secret)
            .unwrap_err();
        let TpmError::Command { operation, .. } = &error else {
            panic!("expected a Command error, got {error:?}");
        };
        assert_eq!(*operation, "ActivateCredential");
        assert!(error.to_string().contains("ActivateCredential"), "{error}");
        eprintln!("{error}");
    }
    // The error path flushed everything: the right credential still works.
    assert_eq!(
        tpm.activate_credential(&ak, &id_object, &encrypted_secret)
            .unwrap(),
        secret
    );
}

#[test]
fn garbage_credential_and_private_blob_are_errors_not_panics() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.create_ak(AkAlgorithm::Rsa2048RsassaSha256).unwrap();

    let error = tpm
        .activate_credential(&ak, &[1, 2, 3], &[4, 5, 6])
        .unwrap_err();
    assert!(matches!(error, TpmError::Command { .. }), "{error:?}");
    eprintln!("{error}");

    let mut broken = ak.clone();
    broken.private.truncate(10);
    for _ in 0..4 {
        tpm.activate_credential(&ak, &[1, 2, 3], &[4, 5, 6])
            .unwrap_err();
    }
    tpm.create_ak(AkAlgorithm::EccP256EcdsaSha256).unwrap();
    let error = tpm
        .activate_credential(&broken, &[0; 10], &[0; 10])
        .unwrap_err();
    assert!(error.to_string().contains("Load(AK)"), "{error}");
}
