//! The event-log parser and replay against a REAL log: the crypto-agile log
//! and the SHA-256 PCRs read in one QEMU q35 + OVMF 2022.11 + swtpm boot of
//! the Debian 6.1 kernel (`-kernel`/`-initrd`); see tests/data/.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use warden_protocol::eventlog::{
    compare, parse, replay, HashAlg, Problem, EV_NO_ACTION, TPM_ALG_SHA256,
};

const LOG: &[u8] = include_bytes!("data/ovmf-swtpm-6.1.eventlog");
const PCRS_JSON: &str = include_str!("data/ovmf-swtpm-6.1.pcrs.json");

fn quoted() -> BTreeMap<u32, Vec<u8>> {
    let json: serde_json::Value = serde_json::from_str(PCRS_JSON).unwrap();
    assert_eq!(json["algorithm"], "sha256");
    json["values"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.parse::<u32>().unwrap(),
                hex::decode(v.as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn real_log_parses_with_the_expected_events() {
    let log = parse(LOG).unwrap();
    assert_eq!(log.spec.algorithms, vec![(TPM_ALG_SHA256, 32)]);
    assert_eq!(
        (log.spec.spec_version_major, log.spec.spec_version_minor),
        (2, 0)
    );
    assert_eq!(log.spec.uintn_size, 2, "64-bit firmware");

    // Every event in order, as (PCR, type). This is what OVMF 2022.11 plus
    // the 6.1 EFI stub measure on a -kernel/-initrd boot: no Secure Boot
    // certificates beyond the variables themselves (PCR 7), the kernel
    // image as a boot-services application (PCR 4), its command line and
    // initrd as EV_EVENT_TAGs (PCR 9, by the stub), the ExitBootServices
    // actions (PCR 5).
    let seen: Vec<(u32, String)> = log
        .events
        .iter()
        .map(|e| (e.pcr, e.event_type.to_string()))
        .collect();
    let want: Vec<(u32, &str)> = vec![
        (0, "EV_NO_ACTION"), // the Spec ID event
        (0, "EV_S_CRTM_VERSION"),
        (0, "EV_EFI_PLATFORM_FIRMWARE_BLOB"),
        (0, "EV_EFI_PLATFORM_FIRMWARE_BLOB"),
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG"), // SecureBoot
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG"), // PK
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG"), // KEK
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG"), // db
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG"), // dbx
        (7, "EV_SEPARATOR"),
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION"),
        (1, "EV_EFI_VARIABLE_BOOT"), // BootOrder
        (1, "EV_EFI_VARIABLE_BOOT"), // Boot0008
        (4, "EV_EFI_ACTION"),
        (0, "EV_SEPARATOR"),
        (1, "EV_SEPARATOR"),
        (2, "EV_SEPARATOR"),
        (3, "EV_SEPARATOR"),
        (4, "EV_SEPARATOR"),
        (5, "EV_SEPARATOR"),
        (6, "EV_SEPARATOR"),
        (9, "EV_EVENT_TAG"), // LOADED_IMAGE::LoadOptions
        (9, "EV_EVENT_TAG"), // Linux initrd
        (5, "EV_EFI_ACTION"),
        (5, "EV_EFI_ACTION"),
    ];
    let want: Vec<(u32, String)> = want.into_iter().map(|(p, t)| (p, t.into())).collect();
    assert_eq!(seen, want);
    for (i, e) in log.events.iter().enumerate() {
        assert_eq!(e.number, i);
    }
    // Every event after the Spec ID event carries exactly the one bank.
    for e in &log.events[1..] {
        assert_eq!(e.digests.len(), 1, "event {}", e.number);
        assert_eq!(e.digest(TPM_ALG_SHA256).map(<[u8]>::len), Some(32));
    }
    assert_eq!(
        log.events[13].data,
        b"Calling EFI Application from Boot Option"
    );
}

#[test]
fn real_log_has_no_startup_locality_and_no_platform_config_flags() {
    // The brief expected both; this real log has neither. OVMF starts the
    // TPM from locality 0 and logs no StartupLocality event (PCR 0 starts at
    // zeros — the replay test below proves it, since it matches the quote),
    // and OVMF 2022.11 on this boot logs no EV_PLATFORM_CONFIG_FLAGS (LAB.md's
    // "up to 4" is an upper bound for edk2, not what OVMF does here).
    let log = parse(LOG).unwrap();
    assert!(log.events.iter().all(|e| e.startup_locality().is_none()));
    let no_action: Vec<usize> = log
        .events
        .iter()
        .filter(|e| e.event_type.0 == EV_NO_ACTION)
        .map(|e| e.number)
        .collect();
    assert_eq!(no_action, vec![0], "only the Spec ID event is EV_NO_ACTION");
    assert_eq!(
        log.events
            .iter()
            .filter(|e| e.event_type.name() == Some("EV_PLATFORM_CONFIG_FLAGS"))
            .count(),
        0
    );
}

#[test]
fn replay_matches_the_quoted_pcrs_0_to_9() {
    let log = parse(LOG).unwrap();
    let replayed = replay(&log, HashAlg::Sha256).unwrap();
    // PCR 8 is never extended before ExitBootServices here (no GRUB), so it
    // is absent from the replay and must compare as zeros.
    assert_eq!(
        replayed.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5, 6, 7, 9]
    );
    let quoted = quoted();
    for pcr in 0..=9u32 {
        let want = replayed.get(&pcr).cloned().unwrap_or_else(|| vec![0; 32]);
        assert_eq!(
            hex::encode(&want),
            hex::encode(&quoted[&pcr]),
            "PCR {pcr} replay differs from the quote"
        );
    }
    let pcrs: Vec<u32> = (0..=9).collect();
    let mismatches = compare(&log, HashAlg::Sha256, &replayed, &quoted, &pcrs);
    assert!(mismatches.is_empty(), "{mismatches:?}");

    // PCR 10 is IMA's, extended by the running kernel; the firmware log
    // cannot account for it, and compare() says so.
    let m = compare(&log, HashAlg::Sha256, &replayed, &quoted, &[10]);
    assert_eq!(m.len(), 1);
    assert!(m[0].events.is_empty());
    assert_eq!(m[0].replayed, "0".repeat(64));
}

#[test]
fn compare_names_a_tampered_pcr_and_its_events() {
    let log = parse(LOG).unwrap();
    let replayed = replay(&log, HashAlg::Sha256).unwrap();
    let mut quoted = quoted();
    let evil = vec![0x12u8; 32];
    quoted.insert(4, evil.clone());
    let pcrs: Vec<u32> = (0..=9).collect();
    let m = compare(&log, HashAlg::Sha256, &replayed, &quoted, &pcrs);
    assert_eq!(m.len(), 1, "{m:?}");
    let m = &m[0];
    assert_eq!(m.pcr, 4);
    assert_eq!(m.replayed, hex::encode(&replayed[&4]));
    assert_eq!(m.quoted.as_deref(), Some(hex::encode(&evil).as_str()));
    let numbers: Vec<usize> = m.events.iter().map(|e| e.number).collect();
    assert_eq!(numbers, vec![10, 13, 18]);
    let text = m.to_string();
    let kernel = hex::encode(log.events[10].digest(TPM_ALG_SHA256).unwrap());
    assert!(
        text.starts_with(&format!(
            "PCR 4: the event log replays to sha256 {}, the TPM quoted {}; events extending PCR 4: #10 EV_EFI_BOOT_SERVICES_APPLICATION sha256 {kernel}, #13 EV_EFI_ACTION sha256 ",
            m.replayed,
            hex::encode(&evil)
        )),
        "{text}"
    );
    assert!(text.contains(", #18 EV_SEPARATOR sha256 "), "{text}");

    // A quote that lacks a PCR is a mismatch too.
    quoted.remove(&7);
    let m = compare(&log, HashAlg::Sha256, &replayed, &quoted, &[7]);
    assert_eq!(m.len(), 1);
    assert!(m[0]
        .to_string()
        .contains("the TPM quote does not include it"));
}

#[test]
fn every_truncation_is_ok_only_at_an_event_boundary_and_never_panics() {
    let full = parse(LOG).unwrap();
    // Event boundaries: where each event after the first starts, and the end.
    let mut ends: Vec<usize> = full.events[1..].iter().map(|e| e.offset).collect();
    ends.push(LOG.len());
    for cut in 0..=LOG.len() {
        match parse(&LOG[..cut]) {
            Ok(log) => {
                let n = ends
                    .iter()
                    .position(|&e| e == cut)
                    .unwrap_or_else(|| panic!("cut at {cut} parsed but is no event boundary"));
                assert_eq!(log.events, full.events[..=n], "cut at {cut}");
            }
            Err(e) => {
                assert!(!ends.contains(&cut), "cut at boundary {cut} failed: {e}");
                // The error names the event the cut fell into.
                let ev = &full.events[e.event];
                assert_eq!(e.offset, ev.offset, "cut at {cut}: {e}");
                assert!(cut >= ev.offset, "cut at {cut}: {e}");
            }
        }
    }
}

#[test]
fn a_corrupt_size_field_names_that_event() {
    let full = parse(LOG).unwrap();
    for ev in &full.events {
        // eventSize follows the digests: 20-byte SHA-1 layout for event 0,
        // count + (alg, digest)… for the others.
        let size_at = if ev.number == 0 {
            4 + 4 + 20
        } else {
            ev.offset + 12 + ev.digests.iter().map(|(_, d)| 2 + d.len()).sum::<usize>()
        };
        let mut bad = LOG.to_vec();
        assert_eq!(
            u32::from_le_bytes(bad[size_at..size_at + 4].try_into().unwrap()) as usize,
            ev.data.len()
        );
        bad[size_at + 3] ^= 0xFF; // the size's high byte
        let err = parse(&bad).unwrap_err();
        assert_eq!((err.event, err.offset), (ev.number, ev.offset), "{err}");
        let left = LOG.len() - size_at - 4;
        assert_eq!(
            err.problem,
            Problem::EventTooLarge {
                size: u32::try_from(ev.data.len()).unwrap() ^ 0xFF00_0000,
                left
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "event {} at offset {:#x}: event size {} exceeds the {left} bytes left",
                ev.number,
                ev.offset,
                u32::try_from(ev.data.len()).unwrap() ^ 0xFF00_0000
            )
        );
    }
}

#[test]
fn firmware_table_padding_after_the_real_log_is_ignored() {
    let mut padded = LOG.to_vec();
    padded.extend(std::iter::repeat_n(0u8, 64 * 1024 - LOG.len()));
    assert_eq!(parse(&padded).unwrap(), parse(LOG).unwrap());
}
