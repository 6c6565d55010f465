//! The TPM facade against a real swtpm, one per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use std::net::{Ipv4Addr, TcpListener};
use std::str::FromStr;

use swtpm::{Provision, Swtpm};
use warden_agent::tpm::{EkAlgorithm, Tpm, TpmError, PCR_COUNT};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[test]
fn reads_all_24_sha256_pcrs() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let pcrs = tpm.pcr_bank_sha256().unwrap();

    assert_eq!(
        pcrs.keys().copied().collect::<Vec<_>>(),
        (0..PCR_COUNT).collect::<Vec<_>>()
    );
    // Nothing has been measured into a fresh swtpm: PCR 0 is its reset value.
    assert_eq!(pcrs[&0], [0u8; 32]);
    // Every PCR holds one of the two reset values (PC Client: 17–22 reset to
    // all ones, the rest to zero) — proof the digests landed on the right
    // indices rather than being shifted or mixed up.
    for (index, value) in &pcrs {
        let expected = if (17..=22).contains(index) {
            [0xffu8; 32]
        } else {
            [0u8; 32]
        };
        assert_eq!(value, &expected, "PCR {index}");
    }
    // Reading twice is stable.
    assert_eq!(tpm.pcr_bank_sha256().unwrap(), pcrs);
}

#[test]
fn rsa_ek_is_deterministic_and_well_formed() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let first = tpm.endorsement_key().unwrap();
    let second = tpm.endorsement_key().unwrap();
    assert_eq!(first, second, "the EK is derived from the endorsement seed");
    // A fresh connection derives the same key too.
    drop(tpm);
    let third = Tpm::open(&swtpm.tcti()).unwrap().endorsement_key().unwrap();
    assert_eq!(first, third);

    assert_eq!(first.algorithm, "rsa2048");
    let (rest, spki) = SubjectPublicKeyInfo::from_der(&first.public_key_der).unwrap();
    assert!(rest.is_empty(), "trailing bytes after the SPKI");
    let PublicKey::RSA(rsa) = spki.parsed().unwrap() else {
        panic!("EK SPKI is not RSA: {:?}", spki.algorithm);
    };
    let modulus = strip_leading_zeros(rsa.modulus);
    assert_eq!(modulus.len(), 256, "RSA-2048 modulus");
    assert_eq!(rsa.try_exponent().unwrap(), 65537);

    // TPMT_PUBLIC: type TPM_ALG_RSA (0x0001), nameAlg SHA-256 (0x000b), and it
    // ends with the TPM2B_PUBLIC_KEY_RSA holding the same modulus.
    assert_eq!(&first.tpm_public[..4], &[0x00, 0x01, 0x00, 0x0b]);
    let mut tail = 256u16.to_be_bytes().to_vec();
    tail.extend_from_slice(modulus);
    assert!(
        first.tpm_public.ends_with(&tail),
        "TPMT_PUBLIC does not end with the modulus"
    );
}

#[test]
fn ek_certificate_holds_our_spki() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key().unwrap();
    let der = ek
        .certificate_der
        .expect("swtpm_setup --create-ek-cert wrote NV 0x01c00002");
    let (rest, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(rest.is_empty(), "trailing bytes after the EK certificate");
    // Byte-for-byte: proves our SPKI encoding matches what a CA signs.
    assert_eq!(cert.public_key().raw, &ek.public_key_der[..]);
}

#[test]
fn missing_ek_certificate_is_none() {
    let swtpm = Swtpm::start_with(Provision::NoEkCertificate);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm.endorsement_key().unwrap();
    assert_eq!(ek.certificate_der, None);
    assert!(!ek.public_key_der.is_empty());
}

#[test]
fn ecc_p256_ek_is_deterministic_and_well_formed() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let first = tpm.endorsement_key_for(EkAlgorithm::EccNistP256).unwrap();
    let second = tpm.endorsement_key_for(EkAlgorithm::EccNistP256).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.algorithm, "ecc-nist-p256");

    let (rest, spki) = SubjectPublicKeyInfo::from_der(&first.public_key_der).unwrap();
    assert!(rest.is_empty());
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve.to_id_string(), "1.2.840.10045.3.1.7", "secp256r1");
    let PublicKey::EC(point) = spki.parsed().unwrap() else {
        panic!("EK SPKI is not EC");
    };
    assert_eq!(point.data().len(), 65);
    assert_eq!(point.data()[0], 0x04, "uncompressed point");
    // TPMT_PUBLIC: type TPM_ALG_ECC (0x0023), nameAlg SHA-256.
    assert_eq!(&first.tpm_public[..4], &[0x00, 0x23, 0x00, 0x0b]);

    // swtpm 0.7 certifies a P-384 ECC EK, not P-256; if a newer one certifies
    // P-256, the certificate must hold our key.
    if let Some(der) = &first.certificate_der {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        assert_eq!(cert.public_key().raw, &first.public_key_der[..]);
    } else {
        eprintln!("note: this swtpm has no ECC P-256 EK certificate (NV 0x01c0000a)");
    }
}

#[test]
fn tpm_without_sha256_bank_says_so() {
    let swtpm = Swtpm::start_with(Provision::Sha1BankOnly);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let error = tpm.pcr_bank_sha256().unwrap_err();
    let TpmError::NoSha256Bank { tcti, .. } = &error else {
        panic!("expected NoSha256Bank, got {error:?}");
    };
    assert_eq!(tcti, &swtpm.tcti());
    let text = error.to_string();
    assert!(text.contains("SHA-256") && text.contains("sha1"), "{text}");
    eprintln!("{text}");
}

#[test]
fn ek_leaves_no_transient_object_loaded() {
    // swtpm (libtpms) holds at most 3 loaded objects; without the flush the
    // fourth CreatePrimary would fail with TPM_RC_OBJECT_MEMORY.
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    for _ in 0..5 {
        tpm.endorsement_key().unwrap();
    }
}

#[test]
fn nothing_listening_is_an_open_error_naming_the_tcti() {
    // Bind and release: nothing listens on the port (or the next) afterwards.
    let port = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let error = Tpm::open(&tcti).unwrap_err();
    let TpmError::Open {
        tcti: named,
        reason,
    } = &error
    else {
        panic!("expected Open, got {error:?}");
    };
    assert_eq!(named, &tcti);
    assert!(!reason.is_empty());
    assert!(error.to_string().contains(&tcti), "{error}");
    eprintln!("{error}");
}

#[test]
fn unparsable_tcti_is_an_open_error() {
    let error = Tpm::open("carrier-pigeon:coop=3").unwrap_err();
    assert!(
        matches!(&error, TpmError::Open { tcti, .. } if tcti == "carrier-pigeon:coop=3"),
        "{error:?}"
    );
}

#[test]
fn works_from_tokio_spawn_blocking() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (ek, pcrs) = runtime
        .block_on(async move {
            tokio::task::spawn_blocking(move || {
                let mut tpm = Tpm::open(&tcti)?;
                let ek = tpm.endorsement_key()?;
                let pcrs = tpm.pcr_bank_sha256()?;
                Ok::<_, TpmError>((ek, pcrs))
            })
            .await
        })
        .unwrap()
        .unwrap();
    assert!(ek.certificate_der.is_some());
    assert_eq!(pcrs.len(), 24);
}

#[test]
fn persisted_ek_is_used_and_equals_the_derived_one() {
    // swtpm_setup --createek persists the RSA EK at 0x81010001.
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let persisted = tpm.endorsement_key().unwrap();
    let derived = tpm.create_endorsement_key(EkAlgorithm::Rsa2048).unwrap();
    assert_eq!(persisted, derived);
}

#[test]
fn a_look_alike_key_at_the_ek_handle_is_not_taken_for_the_ek() {
    use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
    use tss_esapi::abstraction::{ek::create_ek_public_from_default_template_2, DefaultKey};
    use tss_esapi::handles::{PersistentTpmHandle, TpmHandle};
    use tss_esapi::interface_types::{
        dynamic_handles::Persistent, key_bits::RsaKeyBits, resource_handles::Hierarchy,
        resource_handles::Provision as ProvisionHierarchy,
    };

    // A TPM with no persisted EK; plant, as an attacker with owner auth
    // could, a key of the EK template but in the *owner* hierarchy.
    let swtpm = Swtpm::start_with(Provision::NoEkCertificate);
    let genuine = {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        tpm.create_endorsement_key(EkAlgorithm::Rsa2048).unwrap()
    };
    {
        let tcti = tss_esapi::TctiNameConf::from_str(&swtpm.tcti()).unwrap();
        let mut ctx = tss_esapi::Context::new(tcti).unwrap();
        let template = create_ek_public_from_default_template_2(
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            DefaultKey,
        )
        .unwrap();
        let fake = ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .unwrap();
        let handle = PersistentTpmHandle::new(0x8101_0001).unwrap();
        ctx.execute_with_nullauth_session(|c| {
            c.evict_control(
                ProvisionHierarchy::Owner,
                fake.key_handle.into(),
                Persistent::Persistent(handle),
            )
        })
        .unwrap();
        ctx.flush_context(fake.key_handle.into()).unwrap();
        // The planted key really is there.
        let object = ctx
            .tr_from_tpm_public(TpmHandle::Persistent(handle))
            .unwrap();
        let (planted, _, _) = ctx.read_public(object.into()).unwrap();
        assert_ne!(
            tss_esapi::traits::Marshall::marshall(&planted).unwrap(),
            genuine.tpm_public
        );
    }
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.endorsement_key().unwrap(), genuine);
}
