//! Enrollment's proof of possession, end to end against a real swtpm: the
//! server's pure-Rust MakeCredential (warden-protocol, no TPM, no libtss2)
//! for the agent's AK under its real EK, answered by the TPM's
//! ActivateCredential through the agent's facade.
//!
//! ECC EKs: the agent's facade creates AKs under the ECC P-256 EK (template
//! L-2), activates the server's credential for it and quotes with them; the
//! P-384 EK (high-range template H-3), which the agent never enrolls with but
//! the server's MakeCredential supports, is driven with tss-esapi directly.
//! `warden.ek=auto` is checked against swtpm with and without EK certificates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use std::str::FromStr;

use swtpm::Swtpm;
use tss_esapi::{
    abstraction::{ak as tss_ak, ek as tss_ek, AsymmetricAlgorithmSelection, DefaultKey},
    constants::SessionType,
    handles::{AuthHandle, KeyHandle, SessionHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm},
        ecc::EccCurve,
        session_handles::{AuthSession, PolicySession},
    },
    structures::{Digest, DigestList, EncryptedSecret, IdObject, SymmetricDefinition},
    traits::Marshall,
    Context, TctiNameConf,
};
use warden_agent::tpm::{AkAlgorithm, EkAlgorithm, EkChoice, EkFacts, Tpm};
use warden_protocol::tpm::{make_credential, parse_tpmt_public, Credential};

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

fn raw_context(swtpm: &Swtpm) -> Context {
    Context::new(TctiNameConf::from_str(&swtpm.tcti()).unwrap()).unwrap()
}

/// TCG EK Credential Profile 2.5, B.6: PolicyA and PolicyC for SHA-384, the
/// branches of the PolicyOR in the high-range (H-x) EK templates' authPolicy.
const POLICY_A_SHA384: &str = "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53";
const POLICY_C_SHA384: &str = "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165";

/// TPM2_ActivateCredential with `ek` as keyHandle, satisfying the EK's policy
/// (PolicySecret(TPM_RH_ENDORSEMENT), then for SHA-384 EKs the PolicyOR of
/// the high-range templates) in a fresh policy session, flushed afterwards.
fn activate(
    context: &mut Context,
    ek: KeyHandle,
    ek_name_alg: HashingAlgorithm,
    ak: KeyHandle,
    credential: &Credential,
) -> tss_esapi::Result<Vec<u8>> {
    let session = context
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            ek_name_alg,
        )?
        .unwrap();
    let policy = PolicySession::try_from(session)?;
    let result = (|| {
        context.execute_with_nullauth_session(|ctx| {
            ctx.policy_secret(
                policy,
                AuthHandle::Endorsement,
                Default::default(),
                Default::default(),
                Default::default(),
                None,
            )
        })?;
        if ek_name_alg == HashingAlgorithm::Sha384 {
            let mut branches = DigestList::new();
            for branch in [POLICY_A_SHA384, POLICY_C_SHA384] {
                branches.add(Digest::try_from(hex::decode(branch).unwrap())?)?;
            }
            context.policy_or(policy, branches)?;
        }
        let id_object = IdObject::try_from(credential.id_object.clone())?;
        let secret = EncryptedSecret::try_from(credential.encrypted_secret.clone())?;
        context
            .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                ctx.activate_credential(ak, ek, id_object, secret)
            })
            .map(|digest| digest.value().to_vec())
    })();
    context
        .flush_context(SessionHandle::from(session).into())
        .unwrap();
    result
}

/// MakeCredential in pure Rust for an AK under the ECC EK of `curve` (TCG
/// default template), activated by the TPM; a credential for another AK's
/// name is refused. Returns the EK's TPMT_PUBLIC.
fn ecc_ek_credential_round_trip(swtpm: &Swtpm, curve: EccCurve) -> Vec<u8> {
    let selection = AsymmetricAlgorithmSelection::Ecc(curve);
    let ek_name_alg = match curve {
        EccCurve::NistP256 => HashingAlgorithm::Sha256,
        _ => HashingAlgorithm::Sha384,
    };
    let mut context = raw_context(swtpm);
    let ek = tss_ek::create_ek_object_2(&mut context, selection, DefaultKey).unwrap();
    let (ek_public, _, _) = context.read_public(ek).unwrap();
    let ek_tpmt = ek_public.marshall().unwrap();

    let created = |context: &mut Context| {
        tss_ak::create_ak_2(
            context,
            ek,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            DefaultKey,
        )
        .unwrap()
    };
    let ak = created(&mut context);
    let other = created(&mut context);
    let ak_tpmt = ak.out_public.marshall().unwrap();
    let other_tpmt = other.out_public.marshall().unwrap();
    let ak_handle = tss_ak::load_ak(&mut context, ek, None, ak.out_private, ak.out_public).unwrap();
    // The server's name of the AK is the TPM's.
    let (_, tpm_name, _) = context.read_public(ak_handle).unwrap();
    let ak_name = parse_tpmt_public(&ak_tpmt).unwrap().name().unwrap();
    assert_eq!(ak_name, tpm_name.value(), "{curve:?}");

    for len in [32u8, 1, 64] {
        let secret: Vec<u8> = (0..len).map(|i| i.wrapping_mul(13) ^ 0xc3).collect();
        let credential = make_credential(&ek_tpmt, &ak_name, &secret).unwrap();
        let recovered = activate(&mut context, ek, ek_name_alg, ak_handle, &credential).unwrap();
        assert_eq!(recovered, secret, "{curve:?}, {len} bytes");
    }

    let other_name = parse_tpmt_public(&other_tpmt).unwrap().name().unwrap();
    let wrong = make_credential(&ek_tpmt, &other_name, &[9u8; 32]).unwrap();
    let err = activate(&mut context, ek, ek_name_alg, ak_handle, &wrong).unwrap_err();
    // TPM_RC_INTEGRITY: the outer HMAC covers the name.
    assert!(err.to_string().contains("integrity"), "{curve:?}: {err}");

    context.flush_context(ak_handle.into()).unwrap();
    context.flush_context(ek.into()).unwrap();
    ek_tpmt
}

#[test]
fn ecc_p256_ek_credential_is_activated_and_bound_to_the_ak_name() {
    use std::collections::BTreeMap;
    use warden_protocol::tpm::quote::{verify_quote, QuoteError};

    let swtpm = Swtpm::start();
    // The agent derives the ECC EK from TCG template L-2 and reports it.
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = tpm
        .create_endorsement_key(EkAlgorithm::EccNistP256)
        .unwrap();
    assert_eq!(
        ek,
        tpm.endorsement_key_for(EkAlgorithm::EccNistP256).unwrap()
    );
    let ek_public = parse_tpmt_public(&ek.tpm_public).unwrap();
    assert_eq!(ek_public.spki_der().unwrap(), ek.public_key_der);
    assert!(ek_public.attributes.restricted() && ek_public.attributes.decrypt());
    let rsa_ek = tpm.endorsement_key().unwrap();

    let pcrs: Vec<u32> = (0..10).collect();
    for algorithm in [
        AkAlgorithm::Rsa2048RsassaSha256,
        AkAlgorithm::EccP256EcdsaSha256,
    ] {
        let ak = tpm
            .create_ak_under(EkAlgorithm::EccNistP256, algorithm)
            .unwrap();
        assert_eq!(ak.ek, EkAlgorithm::EccNistP256);
        assert_eq!(ak.algorithm, algorithm);
        let ak_public = parse_tpmt_public(&ak.tpm_public).unwrap();
        assert_eq!(ak_public.name().unwrap(), ak.name, "{algorithm:?}");
        assert!(ak_public.attributes.restricted() && ak_public.attributes.sign());

        // The server's pure-Rust credential for (ECC EK, AK name) opens.
        for len in [32u8, 1, 64] {
            let secret: Vec<u8> = (0..len).map(|i| i.wrapping_mul(13) ^ 0xc3).collect();
            let credential = make_credential(&ek.tpm_public, &ak.name, &secret).unwrap();
            let recovered = tpm
                .activate_credential(&ak, &credential.id_object, &credential.encrypted_secret)
                .unwrap();
            assert_eq!(recovered, secret, "{algorithm:?}, {len} bytes");
        }
        // Bound to the AK's name: a credential for another AK is refused…
        let other = tpm
            .create_ak_under(EkAlgorithm::EccNistP256, algorithm)
            .unwrap();
        let wrong = make_credential(&ek.tpm_public, &other.name, &[9u8; 32]).unwrap();
        let err = tpm
            .activate_credential(&ak, &wrong.id_object, &wrong.encrypted_secret)
            .unwrap_err();
        assert!(err.to_string().contains("ActivateCredential"), "{err}");
        // …and to the EK: one made for the RSA EK does not open under the ECC one.
        let wrong = make_credential(&rsa_ek.tpm_public, &ak.name, &[9u8; 32]).unwrap();
        let err = tpm
            .activate_credential(&ak, &wrong.id_object, &wrong.encrypted_secret)
            .unwrap_err();
        assert!(err.to_string().contains("ActivateCredential"), "{err}");

        // Quotes with it verify in pure Rust, for this nonce only.
        let nonce = [0x24u8; 32];
        let quote = tpm.quote(&ak, &nonce, &pcrs).unwrap();
        let values: BTreeMap<u32, Vec<u8>> = quote
            .pcr_values
            .iter()
            .map(|(i, v)| (*i, v.to_vec()))
            .collect();
        let verified =
            verify_quote(&ak_public, &quote.attest, &quote.signature, &nonce, &values).unwrap();
        assert_eq!(verified.pcrs, pcrs, "{algorithm:?}");
        let err = verify_quote(
            &ak_public,
            &quote.attest,
            &quote.signature,
            &[0u8; 32],
            &values,
        )
        .unwrap_err();
        assert!(matches!(err, QuoteError::NonceMismatch { .. }), "{err}");

        // The AK remembers its parent: its blob loads under no other EK.
        let misfiled = warden_agent::tpm::AttestationKey {
            ek: EkAlgorithm::Rsa2048,
            ..ak.clone()
        };
        let err = tpm.quote(&misfiled, &nonce, &pcrs).unwrap_err();
        assert!(err.to_string().contains("Load(AK)"), "{err}");
    }
}

/// `warden.ek=auto` on swtpm as swtpm_setup provisions it (RSA-2048 and
/// P-384 EK certificates, no P-256 one): the RSA EK, the same every time.
#[test]
fn auto_picks_the_certified_rsa_ek_and_keeps_picking_it() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(
        tpm.ek_facts().unwrap(),
        EkFacts {
            rsa_certificate: true,
            ecc_certificate: false,
            rsa_supported: true,
        }
    );
    assert_eq!(tpm.select_ek(EkChoice::Auto).unwrap(), EkAlgorithm::Rsa2048);
    drop(tpm);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.select_ek(EkChoice::Auto).unwrap(), EkAlgorithm::Rsa2048);
    // An explicit choice is taken as given.
    assert_eq!(
        tpm.select_ek(EkChoice::Fixed(EkAlgorithm::EccNistP256))
            .unwrap(),
        EkAlgorithm::EccNistP256
    );
}

/// `warden.ek=auto` on a TPM without EK certificates takes RSA-2048; once an
/// ECC P-256 certificate index exists (and no RSA one), the ECC EK.
#[test]
fn auto_picks_the_ecc_ek_when_only_its_certificate_is_present() {
    use tss_esapi::{
        attributes::NvIndexAttributesBuilder,
        handles::NvIndexTpmHandle,
        interface_types::resource_handles::{NvAuth, Provision},
        structures::{MaxNvBuffer, NvPublicBuilder},
    };

    let swtpm = Swtpm::start_with(swtpm::Provision::NoEkCertificate);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.select_ek(EkChoice::Auto).unwrap(), EkAlgorithm::Rsa2048);
    drop(tpm);

    // What a manufacturer that certifies only the ECC EK leaves in NV. (A
    // real one defines the index under platform authority; the agent only
    // asks whether it is defined.)
    let fake_certificate = [0x30u8, 0x03, 0x02, 0x01, 0x2a];
    let mut context = raw_context(&swtpm);
    let index = NvIndexTpmHandle::new(EkAlgorithm::EccNistP256.certificate_nv_index()).unwrap();
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
        .unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(fake_certificate.len())
        .build()
        .unwrap();
    context
        .execute_with_nullauth_session(|ctx| {
            let handle = ctx.nv_define_space(Provision::Owner, None, public)?;
            ctx.nv_write(
                NvAuth::Owner,
                handle,
                MaxNvBuffer::try_from(fake_certificate.to_vec())?,
                0,
            )
        })
        .unwrap();
    drop(context);

    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(
        tpm.ek_facts().unwrap(),
        EkFacts {
            rsa_certificate: false,
            ecc_certificate: true,
            rsa_supported: true,
        }
    );
    let chosen = tpm.select_ek(EkChoice::Auto).unwrap();
    assert_eq!(chosen, EkAlgorithm::EccNistP256);
    let ek = tpm.endorsement_key_for(chosen).unwrap();
    assert_eq!(ek.algorithm, "ecc-nist-p256");
    assert_eq!(ek.certificate_der.as_deref(), Some(&fake_certificate[..]));
    // Deterministic: a second "boot" picks the same EK, so the same node id.
    drop(tpm);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let chosen_again = tpm.select_ek(EkChoice::Auto).unwrap();
    let again = tpm.endorsement_key_for(chosen_again).unwrap();
    assert_eq!(
        warden_protocol::hello::node_id_for_ek(&again.public_key_der),
        warden_protocol::hello::node_id_for_ek(&ek.public_key_der)
    );
}

#[test]
fn ecc_p384_ek_credential_is_activated_by_the_tpm() {
    // TCG template H-3 (P-384, SHA-384, AES-256-CFB): a 48-byte seed and
    // SHA-384 KDFe/KDFa/HMAC.
    let swtpm = Swtpm::start();
    let ek_tpmt = ecc_ek_credential_round_trip(&swtpm, EccCurve::NistP384);
    let ek = parse_tpmt_public(&ek_tpmt).unwrap();
    assert_eq!(ek.name_alg, warden_protocol::tpm::alg::SHA384);
}

/// Writes real swtpm bytes into the fuzz corpora of protocol/fuzz
/// (`attest/`, `signature/`, `public/`). Run by hand, once, see
/// protocol/fuzz/README.md:
/// `WARDEN_FUZZ_SEEDS=$PWD/protocol/fuzz/corpus cargo test -p warden-agent --test tpm_enroll -- --ignored write_fuzz_seeds`
#[test]
#[ignore = "writes fuzz seed files; run by hand with WARDEN_FUZZ_SEEDS=DIR"]
fn write_fuzz_seeds() {
    let dir = std::path::PathBuf::from(
        std::env::var_os("WARDEN_FUZZ_SEEDS").expect("set WARDEN_FUZZ_SEEDS to the corpus dir"),
    );
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let sub = dir.join(target);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(name), bytes).unwrap();
    };
    let tpm2b = |bytes: &[u8]| {
        let mut out = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    };
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    for (name, algorithm) in [
        ("ek-rsa2048", EkAlgorithm::Rsa2048),
        ("ek-ecc-p256", EkAlgorithm::EccNistP256),
    ] {
        let ek = tpm.create_endorsement_key(algorithm).unwrap();
        write("public", &format!("{name}.tpmt"), &ek.tpm_public);
        write("public", &format!("{name}.tpm2b"), &tpm2b(&ek.tpm_public));
    }
    let pcrs: Vec<u32> = (0..10).collect();
    for (name, algorithm) in [
        ("rsa", AkAlgorithm::Rsa2048RsassaSha256),
        ("ecc", AkAlgorithm::EccP256EcdsaSha256),
    ] {
        let ak = tpm.create_ak(algorithm).unwrap();
        write("public", &format!("ak-{name}.tpmt"), &ak.tpm_public);
        write(
            "public",
            &format!("ak-{name}.tpm2b"),
            &tpm2b(&ak.tpm_public),
        );
        let quote = tpm.quote(&ak, &[0x42; 32], &pcrs).unwrap();
        write("attest", &format!("quote-{name}"), &quote.attest);
        write("signature", &format!("quote-{name}"), &quote.signature);
    }
    drop(tpm);
    // The high-range P-384 EK (SHA-384 name, AES-256), from tss-esapi.
    let mut context = raw_context(&swtpm);
    let selection = AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384);
    let ek = tss_ek::create_ek_object_2(&mut context, selection, DefaultKey).unwrap();
    let (public, _, _) = context.read_public(ek).unwrap();
    context.flush_context(ek.into()).unwrap();
    write("public", "ek-ecc-p384.tpmt", &public.marshall().unwrap());
}
