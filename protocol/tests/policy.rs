//! Policies against a real OVMF + swtpm event log: a learned policy accepts
//! the boot it was learned from, and each kind of change to the firmware or
//! the ramdisk fails with a reason that names the PCR and the event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use warden_protocol::attest::{codes, Policy, Reason};
use warden_protocol::efi;
use warden_protocol::eventlog::{self, EventLog, HashAlg, TPM_ALG_SHA256};
use warden_protocol::policy::{self, RamdiskReference, DEFAULT_LEARN_PCRS};

const LOG: &[u8] = include_bytes!("data/ovmf-swtpm-6.1.eventlog");

fn fixture() -> EventLog {
    eventlog::parse(LOG).unwrap()
}

fn learned(log: &EventLog) -> Policy {
    let replayed = eventlog::replay(log, HashAlg::Sha256).unwrap();
    let mut p = policy::learn("web-nodes", log, &replayed, &DEFAULT_LEARN_PCRS);
    p.version = 3;
    p
}

fn evaluate(p: &Policy, log: &EventLog) -> Vec<Reason> {
    // Round-trip through bytes so the edited log is a real log.
    let log = eventlog::parse(&eventlog::encode(log)).unwrap();
    let replayed = eventlog::replay(&log, HashAlg::Sha256).unwrap();
    policy::evaluate(p, &log, &replayed)
}

/// Sets an event's data and its SHA-256 digest to the hash of that data
/// (true of EFI variable and tagged events).
fn set_data(log: &mut EventLog, number: usize, data: Vec<u8>) {
    let event = &mut log.events[number];
    let digest = HashAlg::Sha256.digest(&data);
    event.data = data;
    for (alg, d) in &mut event.digests {
        if *alg == TPM_ALG_SHA256 {
            d.clone_from(&digest);
        }
    }
}

fn set_digest(log: &mut EventLog, number: usize, byte: u8) {
    for (alg, d) in &mut log.events[number].digests {
        if *alg == TPM_ALG_SHA256 {
            d[0] ^= byte;
        }
    }
}

fn find(log: &EventLog, pred: impl Fn(&eventlog::Event) -> bool) -> usize {
    log.events.iter().position(pred).expect("event in fixture")
}

fn only(reasons: &[Reason]) -> &Reason {
    assert_eq!(reasons.len(), 1, "{reasons:#?}");
    &reasons[0]
}

#[test]
fn encode_round_trips_the_real_log() {
    let log = fixture();
    let bytes = eventlog::encode(&log);
    assert_eq!(&LOG[..bytes.len()], bytes.as_slice());
    assert!(LOG[bytes.len()..].iter().all(|&b| b == 0));
    assert_eq!(eventlog::parse(&bytes).unwrap(), log);
}

#[test]
fn a_learned_policy_accepts_its_own_boot_and_is_valid() {
    let log = fixture();
    let p = learned(&log);
    policy::validate(&p).unwrap();
    assert!(!p.pcrs.contains_key(&1), "PCR1 is not in a default policy");
    assert_eq!(evaluate(&p, &log), vec![]);
    // Serialised and read back, it still accepts.
    let p: Policy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(evaluate(&p, &log), vec![]);
}

#[test]
fn secure_boot_turned_on_is_named_with_old_and_new_value() {
    let mut log = fixture();
    let p = learned(&log);
    let n = find(&log, |e| {
        e.pcr == 7 && efi::parse_variable_data(&e.data).is_ok_and(|v| v.name == "SecureBoot")
    });
    let var = efi::parse_variable_data(&log.events[n].data).unwrap();
    assert_eq!(var.data, vec![0], "OVMF without Secure Boot");
    let mut data = log.events[n].data.clone();
    *data.last_mut().unwrap() = 1;
    set_data(&mut log, n, data);
    let reasons = evaluate(&p, &log);
    let r = only(&reasons);
    assert_eq!(r.code, codes::POLICY_EVENT);
    assert_eq!(r.pcr, Some(7));
    assert_eq!(r.event.as_ref().unwrap().index, n);
    assert_eq!(
        r.event.as_ref().unwrap().description.as_deref(),
        Some("SecureBoot")
    );
    assert!(
        r.message
            .starts_with("PCR7: SecureBoot changed from 0 to 1"),
        "{}",
        r.message
    );
}

#[test]
fn a_different_firmware_build_names_pcr0_and_the_blob() {
    let mut log = fixture();
    let p = learned(&log);
    let n = find(&log, |e| {
        e.pcr == 0
            && e.event_type
                .to_string()
                .starts_with("EV_EFI_PLATFORM_FIRMWARE_BLOB")
    });
    set_digest(&mut log, n, 0x5a);
    let reasons = evaluate(&p, &log);
    let r = only(&reasons);
    assert_eq!(r.pcr, Some(0));
    assert!(
        r.message.starts_with("PCR0: firmware blob digest"),
        "{}",
        r.message
    );
    assert!(r.message.contains("policy web-nodes v3"), "{}", r.message);
    assert!(r.message.contains(&format!("event #{n}")), "{}", r.message);
    assert_ne!(r.expected, r.got);
}

#[test]
fn a_different_kernel_names_pcr4_boot_application() {
    let mut log = fixture();
    let p = learned(&log);
    let n = find(&log, |e| {
        e.pcr == 4 && e.event_type.to_string() == "EV_EFI_BOOT_SERVICES_APPLICATION"
    });
    set_digest(&mut log, n, 0x01);
    let r = evaluate(&p, &log);
    let r = only(&r);
    assert!(
        r.message.starts_with("PCR4: boot application digest ")
            && r.message.contains("is not in policy web-nodes v3"),
        "{}",
        r.message
    );
}

#[test]
fn a_different_initrd_names_pcr9_linux_initrd() {
    let mut log = fixture();
    let p = learned(&log);
    let n = find(&log, |e| e.pcr == 9 && e.data.ends_with(b"Linux initrd\0"));
    set_digest(&mut log, n, 0x80);
    let r = evaluate(&p, &log);
    let r = only(&r);
    assert_eq!(r.pcr, Some(9));
    assert!(
        r.message.starts_with("PCR9: Linux initrd digest "),
        "{}",
        r.message
    );
}

#[test]
fn an_extra_event_and_a_missing_event_are_named() {
    let log = fixture();
    let p = learned(&log);

    let mut extra = log.clone();
    let sep = find(&extra, |e| e.pcr == 2);
    let mut event = extra.events[sep].clone();
    event.number = extra.events.len();
    extra.events.push(event);
    let r = evaluate(&p, &extra);
    let r = only(&r);
    assert_eq!(r.pcr, Some(2));
    assert!(
        r.message.contains("is not in policy web-nodes v3"),
        "{}",
        r.message
    );

    let mut missing = log.clone();
    let last4 = missing.events.iter().rposition(|e| e.pcr == 4).unwrap();
    missing.events.remove(last4);
    for (i, e) in missing.events.iter_mut().enumerate() {
        e.number = i;
    }
    let r = evaluate(&p, &missing);
    let r = only(&r);
    assert_eq!(r.pcr, Some(4));
    assert!(
        r.message.contains("but the log has no such event"),
        "{}",
        r.message
    );
}

#[test]
fn a_values_rule_names_the_value() {
    let log = fixture();
    let mut p = learned(&log);
    let rule = p.pcrs.get_mut(&8).unwrap();
    assert!(
        rule.events.is_empty(),
        "PCR8 has no events under OVMF + -kernel"
    );
    rule.values = vec!["ab".repeat(32)];
    let r = evaluate(&p, &log);
    let r = only(&r);
    assert_eq!(r.code, codes::POLICY_PCR);
    assert!(
        r.message.starts_with("PCR8: value 0000000000000000…"),
        "{}",
        r.message
    );
}

#[test]
fn missing_pcrs_are_listed() {
    let p = learned(&fixture());
    assert_eq!(policy::missing_pcrs(&p, &[0, 2, 3, 4, 5, 6, 7]), vec![8, 9]);
    assert!(policy::missing_pcrs(&p, &(0..10).collect::<Vec<_>>()).is_empty());
}

#[test]
fn validation_names_the_field_and_refuses_accept_all() {
    let mut p = learned(&fixture());
    p.pcrs.get_mut(&7).unwrap().events[1].digests[0] = "XYZ".into();
    assert_eq!(
        policy::validate(&p).unwrap_err().field,
        "pcrs.7.events.1.digests.0"
    );

    let empty = Policy {
        name: "x".into(),
        ..Policy::default()
    };
    let e = policy::validate(&empty).unwrap_err();
    assert_eq!(e.field, "pcrs");
    assert!(e.message.contains("no accept-all"), "{e}");

    let mut hollow = learned(&fixture());
    let rule = hollow.pcrs.get_mut(&0).unwrap();
    rule.events.clear();
    rule.values.clear();
    assert_eq!(policy::validate(&hollow).unwrap_err().field, "pcrs.0");

    let mut bad_name = learned(&fixture());
    bad_name.name = "a b".into();
    assert_eq!(policy::validate(&bad_name).unwrap_err().field, "name");
}

#[test]
fn require_ramdisk_pins_kernel_and_initrd() {
    let log = fixture();
    let mut p = learned(&log);
    let kernel_now = {
        let n = find(&log, |e| {
            e.event_type.to_string() == "EV_EFI_BOOT_SERVICES_APPLICATION"
        });
        hex::encode(log.events[n].digest(TPM_ALG_SHA256).unwrap())
    };
    let reference = RamdiskReference {
        kernels: vec!["22".repeat(32), kernel_now.clone()],
        initrd: "11".repeat(32),
    };
    let notes = policy::require_ramdisk(&mut p, &reference).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("PCR9: the learned boot loaded initrd"),
        "{notes:?}"
    );
    policy::validate(&p).unwrap();
    // The fixture's own initrd is now refused; its kernel still passes.
    let r = evaluate(&p, &log);
    let r = only(&r);
    assert_eq!(r.pcr, Some(9));
    assert!(
        r.message.starts_with("PCR9: Linux initrd digest"),
        "{}",
        r.message
    );

    let mut no_pcr4 = learned(&log);
    no_pcr4.pcrs.remove(&4);
    assert!(policy::require_ramdisk(&mut no_pcr4, &reference)
        .unwrap_err()
        .starts_with("PCR4"));
}
