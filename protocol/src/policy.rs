//! Measured-boot policies: checking one, evaluating a replayed event log
//! against it with reasons a person can act on, and learning one from a
//! known-good log.
//!
//! A [`Policy`] holds, per SHA-256 PCR, either accepted final values or the
//! expected events in order (see [`crate::attest::Policy`]). Evaluation
//! walks the node's events for each PCR beside the policy's and reports the
//! first difference with the PCR, the event (index, type, what it is) and
//! expected vs got — "PCR7: SecureBoot changed from 0 to 1", "PCR4: boot
//! application digest 3fa1… is not in policy web-nodes v3".
//!
//! Evaluation trusts that the log already replays to the quoted PCRs (the
//! caller checks that first); it only compares. It performs no I/O and must
//! never panic on any log or policy.

use std::collections::BTreeMap;

use crate::attest::{codes, EventRef, EventRule, PcrRule, Policy, Reason};
use crate::eventlog::{Event, EventLog, EV_NO_ACTION};
use crate::hello::FieldError;
use crate::PCR_COUNT;

/// PCRs a learned policy covers by default: 0–9 without PCR 1, which holds
/// the boot order and, on a network-booted machine, the NIC's MAC.
pub const DEFAULT_LEARN_PCRS: [u32; 9] = [0, 2, 3, 4, 5, 6, 7, 8, 9];

const EV_EVENT_TAG: u32 = 0x6;
const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
const EV_EFI_ACTION: u32 = 0x8000_0007;
const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000A;
const EV_EFI_VARIABLE_BOOT2: u32 = 0x8000_000C;
const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00E0;
const EV_ACTION: u32 = 0x5;
const EV_POST_CODE: u32 = 0x1;
const EV_S_CRTM_VERSION: u32 = 0x8;

/// Longest variable value a learned rule keeps verbatim (for "changed from
/// 0 to 1"); certificate databases (db, KEK) are only kept as digests.
const KEEP_VARIABLE_DATA: usize = 16;

/// Checks a policy's shape; the error names the field, e.g. `pcrs.7.events.2.digests.0`.
pub fn validate(policy: &Policy) -> Result<(), FieldError> {
    let name_ok = !policy.name.is_empty()
        && policy.name.len() <= 64
        && policy
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        return Err(field("name", "must be 1–64 characters of [A-Za-z0-9._-]"));
    }
    if policy.pcrs.is_empty() {
        return Err(field(
            "pcrs",
            "a policy must name at least one PCR (there is no accept-all policy)",
        ));
    }
    for (pcr, rule) in &policy.pcrs {
        let at = format!("pcrs.{pcr}");
        if usize::try_from(*pcr).map_or(true, |p| p >= PCR_COUNT) {
            return Err(field(&at, format!("PCR {pcr} does not exist (0–23)")));
        }
        if rule.values.is_empty() && rule.events.is_empty() {
            return Err(field(
                &at,
                "a PCR rule needs accepted `values` or expected `events`",
            ));
        }
        for (i, v) in rule.values.iter().enumerate() {
            check_digest(&format!("{at}.values.{i}"), v)?;
        }
        for (i, e) in rule.events.iter().enumerate() {
            let at = format!("{at}.events.{i}");
            if e.event_type.is_empty() {
                return Err(field(&format!("{at}.type"), "is empty"));
            }
            if e.digests.is_empty() {
                return Err(field(
                    &format!("{at}.digests"),
                    "an expected event needs at least one accepted digest",
                ));
            }
            for (j, d) in e.digests.iter().enumerate() {
                check_digest(&format!("{at}.digests.{j}"), d)?;
            }
            if let Some(data) = &e.data {
                if hex::decode(data).is_err() {
                    return Err(field(&format!("{at}.data"), "is not hex"));
                }
            }
        }
    }
    Ok(())
}

fn check_digest(at: &str, value: &str) -> Result<(), FieldError> {
    let ok = value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(field(
            at,
            "must be 64 lowercase hex digits (a SHA-256 digest)",
        ))
    }
}

fn field(at: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: at.to_owned(),
        message: message.into(),
    }
}

/// Which of `policy`'s PCRs `quoted` lacks; a verdict must fail on any.
pub fn missing_pcrs(policy: &Policy, quoted: &[u32]) -> Vec<u32> {
    policy
        .pcrs
        .keys()
        .copied()
        .filter(|p| !quoted.contains(p))
        .collect()
}

/// Evaluates `log` (whose SHA-256 replay is `replayed`) against `policy`.
/// Returns one reason per failing PCR; empty means the policy is met.
pub fn evaluate(policy: &Policy, log: &EventLog, replayed: &BTreeMap<u32, Vec<u8>>) -> Vec<Reason> {
    let zeros = vec![0u8; 32];
    let label = format!("policy {} v{}", policy.name, policy.version);
    let mut reasons = Vec::new();
    for (&pcr, rule) in &policy.pcrs {
        let value = hex::encode(replayed.get(&pcr).unwrap_or(&zeros));
        if rule.values.contains(&value) {
            continue;
        }
        if rule.events.is_empty() {
            reasons.push(Reason {
                pcr: Some(pcr),
                expected: Some(rule.values.join(" or ")),
                got: Some(value.clone()),
                ..Reason::new(
                    codes::POLICY_PCR,
                    format!(
                        "PCR{pcr}: value {} is not one of the {} value(s) {label} accepts",
                        short(&value),
                        rule.values.len()
                    ),
                )
            });
            continue;
        }
        let events: Vec<&Event> = pcr_events(log, pcr).collect();
        if let Some(reason) = compare_events(pcr, rule, &events, &label) {
            reasons.push(reason);
        }
    }
    reasons
}

/// The events of `log` that extended `pcr` (the Spec ID event and
/// `EV_NO_ACTION` excluded), in log order.
fn pcr_events(log: &EventLog, pcr: u32) -> impl Iterator<Item = &Event> {
    log.events
        .iter()
        .skip(1)
        .filter(move |e| e.pcr == pcr && e.event_type.0 != EV_NO_ACTION)
}

fn sha256_of(event: &Event) -> String {
    event
        .digest(crate::eventlog::TPM_ALG_SHA256)
        .map(hex::encode)
        .unwrap_or_default()
}

/// The first difference between `events` and `rule.events`, explained.
fn compare_events(pcr: u32, rule: &PcrRule, events: &[&Event], label: &str) -> Option<Reason> {
    for (i, expected) in rule.events.iter().enumerate() {
        let Some(event) = events.get(i) else {
            let after = match i.checked_sub(1).and_then(|j| events.get(j)) {
                Some(prev) => format!("after event #{}", prev.number),
                None => "at all".to_owned(),
            };
            return Some(Reason {
                pcr: Some(pcr),
                expected: Some(rule_label(expected)),
                got: Some("no event".to_owned()),
                ..Reason::new(
                    codes::POLICY_EVENT,
                    format!(
                        "PCR{pcr}: {label} expects {} but the log has no such event {after}",
                        rule_label(expected)
                    ),
                )
            });
        };
        let got_type = event.event_type.to_string();
        let got_digest = sha256_of(event);
        let event_ref = event_ref(event);
        if got_type != expected.event_type {
            return Some(Reason {
                pcr: Some(pcr),
                event: Some(event_ref.clone()),
                expected: Some(rule_label(expected)),
                got: Some(ref_label(&event_ref)),
                ..Reason::new(
                    codes::POLICY_EVENT,
                    format!(
                        "PCR{pcr}: event #{} is {}, {label} expects {} there",
                        event.number,
                        ref_label(&event_ref),
                        rule_label(expected)
                    ),
                )
            });
        }
        if expected.digests.contains(&got_digest) {
            continue;
        }
        let message = digest_message(pcr, event, &event_ref, expected, &got_digest, label);
        return Some(Reason {
            pcr: Some(pcr),
            event: Some(event_ref),
            expected: Some(expected.digests.join(" or ")),
            got: Some(got_digest),
            ..Reason::new(codes::POLICY_EVENT, message)
        });
    }
    let extra = events.get(rule.events.len())?;
    let event_ref = event_ref(extra);
    Some(Reason {
        pcr: Some(pcr),
        event: Some(event_ref.clone()),
        expected: Some("no further event".to_owned()),
        got: Some(format!("{} {}", ref_label(&event_ref), sha256_of(extra))),
        ..Reason::new(
            codes::POLICY_EVENT,
            format!(
                "PCR{pcr}: event #{} {} (digest {}) is not in {label}",
                extra.number,
                ref_label(&event_ref),
                short(&sha256_of(extra))
            ),
        )
    })
}

/// The sentence for an event whose type matches but whose digest does not.
fn digest_message(
    pcr: u32,
    event: &Event,
    event_ref: &EventRef,
    expected: &EventRule,
    got: &str,
    label: &str,
) -> String {
    let t = event.event_type.0;
    if is_variable_event(t) {
        let name = event_ref
            .description
            .clone()
            .unwrap_or_else(|| "an EFI variable".to_owned());
        let was = expected
            .data
            .as_deref()
            .and_then(|d| hex::decode(d).ok())
            .and_then(|d| variable_value(&d));
        let now = variable_value(&event.data);
        if let (Some(was), Some(now)) = (was, now) {
            return format!(
                "PCR{pcr}: {name} changed from {was} to {now} (event #{})",
                event.number
            );
        }
        return format!(
            "PCR{pcr}: EFI variable {name} changed (event #{}, digest {}; {label} expects {})",
            event.number,
            short(got),
            short_list(&expected.digests)
        );
    }
    match t {
        EV_EFI_BOOT_SERVICES_APPLICATION => format!(
            "PCR{pcr}: boot application digest {} is not in {label} (event #{})",
            short(got),
            event.number
        ),
        EV_EVENT_TAG => format!(
            "PCR{pcr}: {} digest {} is not in {label} (event #{})",
            event_ref
                .description
                .as_deref()
                .unwrap_or("tagged event"),
            short(got),
            event.number
        ),
        EV_EFI_PLATFORM_FIRMWARE_BLOB | EV_EFI_PLATFORM_FIRMWARE_BLOB2 => format!(
            "PCR{pcr}: firmware blob digest {} differs from {label}, which expects {} (event #{}: a different firmware build)",
            short(got),
            short_list(&expected.digests),
            event.number
        ),
        _ => format!(
            "PCR{pcr}: event #{} {} digest {} is not in {label} (expected {})",
            event.number,
            ref_label(event_ref),
            short(got),
            short_list(&expected.digests)
        ),
    }
}

fn is_variable_event(t: u32) -> bool {
    matches!(
        t,
        EV_EFI_VARIABLE_DRIVER_CONFIG
            | EV_EFI_VARIABLE_BOOT
            | EV_EFI_VARIABLE_BOOT2
            | EV_EFI_VARIABLE_AUTHORITY
    )
}

/// A short variable value as a person reads it: one byte as a number
/// (SecureBoot, SetupMode), a few bytes as hex; `None` for long ones.
fn variable_value(event_data: &[u8]) -> Option<String> {
    let var = crate::efi::parse_variable_data(event_data).ok()?;
    match var.data.as_slice() {
        [b] => Some(b.to_string()),
        [] => Some("empty".to_owned()),
        d if d.len() <= KEEP_VARIABLE_DATA => Some(hex::encode(d)),
        _ => None,
    }
}

/// What an event is about, for people: the variable's name, the tag's or
/// action's text, the firmware version.
pub fn describe(event: &Event) -> Option<String> {
    let t = event.event_type.0;
    if is_variable_event(t) {
        return crate::efi::parse_variable_data(&event.data)
            .ok()
            .map(|v| v.name);
    }
    match t {
        EV_EVENT_TAG => tag_description(&event.data),
        EV_EFI_ACTION | EV_ACTION | EV_POST_CODE => printable(&event.data),
        EV_S_CRTM_VERSION => utf16(&event.data),
        EV_EFI_BOOT_SERVICES_APPLICATION => Some("boot application".to_owned()),
        EV_EFI_PLATFORM_FIRMWARE_BLOB | EV_EFI_PLATFORM_FIRMWARE_BLOB2 => {
            Some("firmware blob".to_owned())
        }
        _ => None,
    }
}

/// The text of a Linux EFI-stub tagged event: `taggedEventID` u32,
/// `taggedEventDataSize` u32, then NUL-terminated ASCII.
fn tag_description(data: &[u8]) -> Option<String> {
    let size = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    let text = data.get(8..8 + usize::try_from(size).ok()?)?;
    printable(text)
}

fn printable(data: &[u8]) -> Option<String> {
    let text = data.split(|&b| b == 0).next()?;
    if text.is_empty() || !text.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return None;
    }
    String::from_utf8(text.to_vec()).ok()
}

fn utf16(data: &[u8]) -> Option<String> {
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok().filter(|s| !s.is_empty())
}

fn event_ref(event: &Event) -> EventRef {
    EventRef {
        index: event.number,
        event_type: event.event_type.to_string(),
        description: describe(event),
    }
}

fn ref_label(r: &EventRef) -> String {
    match &r.description {
        Some(d) => format!("{} ({d})", r.event_type),
        None => r.event_type.clone(),
    }
}

fn rule_label(r: &EventRule) -> String {
    match &r.description {
        Some(d) => format!("{} ({d})", r.event_type),
        None => r.event_type.clone(),
    }
}

/// The first 16 hex digits and an ellipsis: enough to tell digests apart in a sentence.
fn short(digest: &str) -> String {
    match digest.get(..16) {
        Some(head) if digest.len() > 16 => format!("{head}…"),
        _ => digest.to_owned(),
    }
}

fn short_list(digests: &[String]) -> String {
    digests
        .iter()
        .map(|d| short(d))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Learns a policy from a known-good log: for each of `pcrs`, the exact
/// events it saw, or — for a PCR no event touched — its value.
pub fn learn(
    name: &str,
    log: &EventLog,
    replayed: &BTreeMap<u32, Vec<u8>>,
    pcrs: &[u32],
) -> Policy {
    let zeros = vec![0u8; 32];
    let mut rules = BTreeMap::new();
    for &pcr in pcrs {
        let events: Vec<EventRule> = pcr_events(log, pcr)
            .map(|e| EventRule {
                event_type: e.event_type.to_string(),
                digests: vec![sha256_of(e)],
                description: describe(e),
                data: (is_variable_event(e.event_type.0) && variable_value(&e.data).is_some())
                    .then(|| hex::encode(&e.data)),
            })
            .collect();
        let rule = if events.is_empty() {
            PcrRule {
                values: vec![hex::encode(replayed.get(&pcr).unwrap_or(&zeros))],
                events: Vec::new(),
            }
        } else {
            PcrRule {
                values: Vec::new(),
                events,
            }
        };
        rules.insert(pcr, rule);
    }
    Policy {
        name: name.to_owned(),
        version: 0,
        description: String::new(),
        pcrs: rules,
    }
}

/// The ramdisk digests a policy can require (from `warden-mkinitramfs`'s
/// `reference-values.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamdiskReference {
    /// PE/COFF Authenticode SHA-256 digests of the kernel (PCR 4,
    /// `EV_EFI_BOOT_SERVICES_APPLICATION`), lowercase hex: the file's, and
    /// the image as QEMU's direct kernel boot patches it in memory.
    pub kernels: Vec<String>,
    /// Digest of the "Linux initrd" tagged event (PCR 9), lowercase hex.
    pub initrd: String,
}

/// Makes `policy` require the ramdisk in `reference` instead of whatever
/// kernel and initrd the learned boot happened to load: the last
/// `EV_EFI_BOOT_SERVICES_APPLICATION` of PCR 4 and the "Linux initrd" event
/// of PCR 9 accept exactly the reference digests. Returns notes for the
/// operator (e.g. when the learned boot loaded something else). Fails,
/// naming the PCR, when the policy has no such event to pin.
pub fn require_ramdisk(
    policy: &mut Policy,
    reference: &RamdiskReference,
) -> Result<Vec<String>, String> {
    let mut notes = Vec::new();
    let kernel = policy
        .pcrs
        .get_mut(&4)
        .and_then(|rule| {
            rule.events
                .iter_mut()
                .rev()
                .find(|e| e.event_type == "EV_EFI_BOOT_SERVICES_APPLICATION")
        })
        .ok_or("PCR4 has no EV_EFI_BOOT_SERVICES_APPLICATION event in this policy to pin the ramdisk kernel to")?;
    if reference.kernels.is_empty() {
        return Err("the reference names no kernel digest".to_owned());
    }
    if !kernel.digests.iter().any(|d| reference.kernels.contains(d)) {
        notes.push(format!(
            "PCR4: the learned boot loaded kernel {}, the reference kernel is {}",
            short_list(&kernel.digests),
            short_list(&reference.kernels)
        ));
    }
    kernel.digests.clone_from(&reference.kernels);
    kernel.description = Some("ramdisk kernel (reference-values.json)".to_owned());

    let initrd = policy
        .pcrs
        .get_mut(&9)
        .and_then(|rule| {
            rule.events.iter_mut().find(|e| {
                e.event_type == "EV_EVENT_TAG" && e.description.as_deref() == Some("Linux initrd")
            })
        })
        .ok_or("PCR9 has no \"Linux initrd\" EV_EVENT_TAG event in this policy to pin the ramdisk initrd to")?;
    if !initrd.digests.contains(&reference.initrd) {
        notes.push(format!(
            "PCR9: the learned boot loaded initrd {}, the reference initrd is {}",
            short_list(&initrd.digests),
            short(&reference.initrd)
        ));
    }
    initrd.digests = vec![reference.initrd.clone()];
    // Keep the description "Linux initrd": it is how the event is found.
    Ok(notes)
}
