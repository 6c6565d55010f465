//! The agent's measured log: every step result and handoff target the agent
//! extends into [`AGENT_PCR`] during a turnover, in extend order.
//!
//! The agent sends this log with its final (`handoff`-phase) quote; the
//! server replays it to the quoted [`AGENT_PCR`] exactly as it replays the
//! firmware's log to PCRs 0–9, so a step record that was altered, reordered
//! or dropped fails the verdict. The signed report carries the same log, so
//! a tenant can recompute the PCR from inside the tenant OS.
//!
//! This module defines the shape, the replay arithmetic and the check the
//! server runs ([`check`]): each event's own consistency, the order of the
//! steps, the steps the plan asked for ([`Expectation`]), the steps'
//! results, and the replay to the quoted PCR. It does no I/O and never
//! trusts a record's own claims: a digest counts only after
//! [`AgentEvent::record`] hashes to it, and a record is read only after
//! that.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attest::{codes, EventRef, Reason};
use crate::image::{Checksum, ImageRecord};
use crate::snapshot::{RestoreRecord, SnapshotRecord};
use crate::turnover::{DiskSource, Handoff, PlanRequest};
use crate::wipe::{self, DiskRecord};

/// The PCR (SHA-256 bank) the agent extends. Nothing else extends it on a
/// Warden node (`docs/handoff.md` says why 13), so it reads zero when the
/// ramdisk starts and, after kexec, the tenant reads exactly this log.
pub const AGENT_PCR: u32 = 13;

/// What one extend measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A snapshot step's [`crate::snapshot::SnapshotRecord`].
    Snapshot,
    /// One disk's [`crate::wipe::DiskRecord`].
    Wipe,
    /// The image step's [`crate::image::ImageRecord`].
    Image,
    /// A restore plan's [`crate::snapshot::RestoreRecord`], in the image's
    /// place: a log has an image or a restore, never both.
    Restore,
    /// SHA-256 of the tenant kernel the agent will kexec.
    HandoffKernel,
    /// SHA-256 of the tenant initrd.
    HandoffInitrd,
    /// SHA-256 of the tenant command line.
    HandoffCmdline,
    /// The firmware boot target of a reboot handoff (a JSON record naming
    /// the ESP partition, path and SHA-256 of the EFI binary).
    HandoffTarget,
}

impl EventKind {
    /// True for kinds whose digest is the SHA-256 of [`AgentEvent::record`].
    pub fn carries_record(self) -> bool {
        matches!(
            self,
            EventKind::Snapshot
                | EventKind::Wipe
                | EventKind::Image
                | EventKind::Restore
                | EventKind::HandoffTarget
        )
    }

    /// Every kind, in the order a log holds them (an image or a restore).
    /// Kinds travel by [`EventKind::name`], never by position, so this
    /// order is not part of any encoding.
    pub const ALL: [EventKind; 8] = [
        EventKind::Snapshot,
        EventKind::Wipe,
        EventKind::Image,
        EventKind::Restore,
        EventKind::HandoffKernel,
        EventKind::HandoffInitrd,
        EventKind::HandoffCmdline,
        EventKind::HandoffTarget,
    ];

    /// The step an event of this kind belongs to: snapshot (0) → wipe (1)
    /// → image or restore (2) → handoff (3); a log never goes back to an
    /// earlier one.
    fn stage(self) -> u8 {
        match self {
            EventKind::Snapshot => 0,
            EventKind::Wipe => 1,
            EventKind::Image | EventKind::Restore => 2,
            EventKind::HandoffKernel
            | EventKind::HandoffInitrd
            | EventKind::HandoffCmdline
            | EventKind::HandoffTarget => 3,
        }
    }

    /// The wire name (`snapshot`, `wipe`, …, `handoff-target`).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Snapshot => "snapshot",
            EventKind::Wipe => "wipe",
            EventKind::Image => "image",
            EventKind::Restore => "restore",
            EventKind::HandoffKernel => "handoff-kernel",
            EventKind::HandoffInitrd => "handoff-initrd",
            EventKind::HandoffCmdline => "handoff-cmdline",
            EventKind::HandoffTarget => "handoff-target",
        }
    }
}

/// One extend of [`AGENT_PCR`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEvent {
    /// Always [`AGENT_PCR`] today; carried so a log is self-describing.
    pub pcr: u32,
    pub kind: EventKind,
    /// Lowercase hex SHA-256 that was extended.
    pub digest: String,
    /// For kinds that [carry a record](EventKind::carries_record): the exact
    /// bytes measured (compact JSON), so the verifier can hash them itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// For people: e.g. `wipe /dev/nvme0n1` or `handoff-kernel esp-bls
    /// partition 1 /loader/entries/t.conf`. Not measured.
    pub description: String,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`EventKind`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown agent event kind {0:?} (expected snapshot, wipe, image, restore, handoff-kernel, handoff-initrd, handoff-cmdline or handoff-target)")]
pub struct UnknownKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownKind;

    /// Parses [`EventKind::name`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// The record of a [`EventKind::HandoffTarget`] event: the EFI binary a
/// reboot-to-disk handoff points `BootNext` at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffTargetRecord {
    /// GPT partition number (1-based) of the EFI system partition.
    pub partition: u32,
    /// Path of the EFI binary on it, e.g. `\EFI\BOOT\BOOTX64.EFI`.
    pub path: String,
    /// Lowercase hex SHA-256 of the EFI binary's bytes.
    pub sha256: String,
}

impl HandoffTargetRecord {
    /// The exact bytes that are measured (compact JSON, fields in
    /// declaration order).
    pub fn canonical_json(&self) -> Vec<u8> {
        // Plain strings and integers: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Lowercase hex SHA-256 of [`Self::canonical_json`].
    pub fn digest(&self) -> String {
        crate::sha256_hex(&self.canonical_json())
    }
}

/// What the plan asked the agent to do, so what its log must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    /// Exactly one snapshot event when true, none when false.
    pub snapshot: bool,
    /// At least this many wipe events, each for a different disk: the
    /// number of disks the agent reported in its boot inventory. At least
    /// one wipe is required whatever this says (a plan always wipes).
    pub min_wipes: usize,
    /// Exactly one event in the image's stage when true — an image event,
    /// or a restore event when [`Expectation::disk`] is a restore — and
    /// none of the other kind; no image or restore event when false.
    pub image: bool,
    /// What the image's stage must have put on the disk; `None`: any image
    /// (its digest is not checked).
    pub disk: Option<ExpectedDisk>,
    /// The handoff the plan asked for: kexec expects handoff-kernel,
    /// handoff-initrd, handoff-cmdline in that order; reboot-to-disk one
    /// handoff-target; reboot, poweroff and `None` no handoff event.
    pub handoff: Option<Handoff>,
}

/// What an [`Expectation`] requires of the disk the image's stage wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedDisk {
    /// An image whose served bytes have `checksum` (`sha256:HEX`,
    /// `sha512:HEX`, or bare 64 hex digits for SHA-256): the image
    /// record's digest must equal it.
    Image { checksum: String },
    /// A restore of the backup whose manifest has `manifest_sha256`
    /// (lowercase hex; what the server recorded for the snapshot): the
    /// restore record's `manifest_sha256` must equal it. `None` when the
    /// snapshot is not known where the expectation was made
    /// ([`Expectation::from_plan`]): then no restore matches — it fails
    /// closed.
    Restore { manifest_sha256: Option<String> },
}

impl Expectation {
    /// What `plan` asks of a node with `disks` disks in its boot inventory.
    /// A restore plan's manifest digest is not in the plan (the server
    /// resolves it from the snapshot): use [`Expectation::from_restore_plan`];
    /// here a restore plan expects a restore whose manifest nothing can
    /// match, so it fails closed.
    pub fn from_plan(plan: &PlanRequest, disks: usize) -> Expectation {
        let disk = match plan.disk_source() {
            Ok(DiskSource::Image { checksum, .. }) => Some(ExpectedDisk::Image {
                checksum: checksum.to_owned(),
            }),
            Ok(DiskSource::Restore { .. }) => Some(ExpectedDisk::Restore {
                manifest_sha256: None,
            }),
            Err(_) => plan
                .checksum
                .clone()
                .map(|checksum| ExpectedDisk::Image { checksum }),
        };
        Expectation {
            snapshot: plan.snapshot_to.is_some(),
            min_wipes: disks,
            image: true,
            disk,
            handoff: Some(plan.handoff),
        }
    }

    /// What a restore `plan` asks: as [`Expectation::from_plan`], with one
    /// restore event whose record names `manifest_sha256` (the digest the
    /// server recorded for the snapshot) in the image's place.
    pub fn from_restore_plan(
        plan: &PlanRequest,
        disks: usize,
        manifest_sha256: &str,
    ) -> Expectation {
        Expectation {
            disk: Some(ExpectedDisk::Restore {
                manifest_sha256: Some(manifest_sha256.to_owned()),
            }),
            ..Expectation::from_plan(plan, disks)
        }
    }

    /// The manifest digest a restore plan expects, when this is one and
    /// the digest is known.
    pub fn restore_manifest(&self) -> Option<&str> {
        match &self.disk {
            Some(ExpectedDisk::Restore { manifest_sha256 }) => manifest_sha256.as_deref(),
            _ => None,
        }
    }

    /// The kind of the image stage's event: [`EventKind::Restore`] for a
    /// restore plan, else [`EventKind::Image`].
    fn disk_kind(&self) -> EventKind {
        match self.disk {
            Some(ExpectedDisk::Restore { .. }) => EventKind::Restore,
            _ => EventKind::Image,
        }
    }
}

/// The handoff kinds a handoff mode measures, in order.
pub fn handoff_kinds(handoff: Option<Handoff>) -> &'static [EventKind] {
    match handoff {
        Some(Handoff::Kexec) => &[
            EventKind::HandoffKernel,
            EventKind::HandoffInitrd,
            EventKind::HandoffCmdline,
        ],
        Some(Handoff::RebootToDisk) => &[EventKind::HandoffTarget],
        Some(Handoff::Reboot) | Some(Handoff::Poweroff) | None => &[],
    }
}

/// The kexec handoff's three digests (lowercase hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KexecDigests {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

/// A log that passed [`check`] (or [`check_without_plan`]): its typed
/// records, for the report. Everything here was hashed to a digest that
/// replays to the quoted PCR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedLog {
    /// The log as checked.
    pub events: Vec<AgentEvent>,
    /// The quoted (and replayed) [`AGENT_PCR`], lowercase hex.
    pub pcr13: String,
    pub snapshot: Option<SnapshotRecord>,
    /// One per wipe event, in log order.
    pub disks: Vec<DiskRecord>,
    pub image: Option<ImageRecord>,
    /// The restore a restore plan made instead of an image.
    pub restore: Option<RestoreRecord>,
    /// Present when the log holds all three kexec handoff digests.
    pub kexec: Option<KexecDigests>,
    pub handoff_target: Option<HandoffTargetRecord>,
}

/// Most events a log may hold: a few per disk; this bounds the work an
/// untrusted log can cause.
pub const MAX_EVENTS: usize = 4096;

/// Checks `events` against the quoted [`AGENT_PCR`] and what the plan asked
/// for. Each problem is one [`Reason`] (with `pcr: Some(13)` and, where one
/// event is concerned, its index and kind), and every problem is reported,
/// not only the first:
/// - each event: PCR 13, a digest of 64 lowercase hex digits, a record
///   exactly for the kinds that carry one, hashing to the digest and
///   parsing as the kind's record type;
/// - order: snapshot → wipe → image (or restore) → handoff;
/// - the steps the plan asked for, none dropped and none extra;
/// - the results: every wipe record `clean`, each disk wiped once, the
///   image's digest equal to the plan's checksum (a restore's manifest
///   digest equal to the recorded one);
/// - the replay of every digest equals `quoted_pcr13`.
pub fn check(
    events: &[AgentEvent],
    quoted_pcr13: &[u8; 32],
    expect: &Expectation,
) -> Result<VerifiedLog, Vec<Reason>> {
    let mut reasons = Vec::new();
    let Some(read) = read_events(events, &mut reasons) else {
        return Err(reasons);
    };
    check_order(events, &mut reasons);
    check_steps(events, &read, expect, &mut reasons);
    check_results(events, &read, expect, &mut reasons);
    check_replay(events, quoted_pcr13, &mut reasons);
    finish(events, quoted_pcr13, read, reasons)
}

/// [`check`] for an attestation without a plan to hold the log to: every
/// event's own consistency, the order and the replay, but not which steps
/// ran or how they ended.
pub fn check_without_plan(
    events: &[AgentEvent],
    quoted_pcr13: &[u8; 32],
) -> Result<VerifiedLog, Vec<Reason>> {
    let mut reasons = Vec::new();
    let Some(read) = read_events(events, &mut reasons) else {
        return Err(reasons);
    };
    check_order(events, &mut reasons);
    check_replay(events, quoted_pcr13, &mut reasons);
    finish(events, quoted_pcr13, read, reasons)
}

/// A record, typed, with the index of its event.
#[derive(Default)]
struct Read {
    snapshots: Vec<(usize, SnapshotRecord)>,
    disks: Vec<(usize, DiskRecord)>,
    images: Vec<(usize, ImageRecord)>,
    restores: Vec<(usize, RestoreRecord)>,
    targets: Vec<(usize, HandoffTargetRecord)>,
}

fn finish(
    events: &[AgentEvent],
    quoted_pcr13: &[u8; 32],
    read: Read,
    reasons: Vec<Reason>,
) -> Result<VerifiedLog, Vec<Reason>> {
    if !reasons.is_empty() {
        return Err(reasons);
    }
    let digest_of = |kind: EventKind| {
        events
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.digest.clone())
    };
    let kexec = match (
        digest_of(EventKind::HandoffKernel),
        digest_of(EventKind::HandoffInitrd),
        digest_of(EventKind::HandoffCmdline),
    ) {
        (Some(kernel), Some(initrd), Some(cmdline)) => Some(KexecDigests {
            kernel,
            initrd,
            cmdline,
        }),
        _ => None,
    };
    Ok(VerifiedLog {
        events: events.to_vec(),
        pcr13: hex::encode(quoted_pcr13),
        snapshot: read.snapshots.into_iter().next().map(|(_, r)| r),
        disks: read.disks.into_iter().map(|(_, r)| r).collect(),
        image: read.images.into_iter().next().map(|(_, r)| r),
        restore: read.restores.into_iter().next().map(|(_, r)| r),
        kexec,
        handoff_target: read.targets.into_iter().next().map(|(_, r)| r),
    })
}

/// A reason about the agent's log, naming event `index` when given.
fn reason(
    code: &str,
    event: Option<(usize, &AgentEvent)>,
    message: String,
    expected: Option<String>,
    got: Option<String>,
) -> Reason {
    let (prefix, event) = match event {
        Some((index, e)) => (
            format!("PCR13 event {index} ({}, {:?}): ", e.kind, e.description),
            Some(EventRef {
                index,
                event_type: e.kind.name().to_owned(),
                description: Some(e.description.clone()),
            }),
        ),
        None => ("PCR13: ".to_owned(), None),
    };
    Reason {
        code: code.to_owned(),
        pcr: Some(AGENT_PCR),
        event,
        expected,
        got,
        message: format!("{prefix}{message}"),
    }
}

fn is_digest_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    if !is_digest_hex(s) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Per-event checks; the typed records of the events whose record hashes
/// to their digest. `None` when the log is too long to look at.
fn read_events(events: &[AgentEvent], reasons: &mut Vec<Reason>) -> Option<Read> {
    if events.len() > MAX_EVENTS {
        reasons.push(reason(
            codes::AGENT_LOG_MALFORMED,
            None,
            format!(
                "the agent's log has {} events, more than the {MAX_EVENTS} any turnover makes",
                events.len()
            ),
            None,
            None,
        ));
        return None;
    }
    let mut read = Read::default();
    for (i, e) in events.iter().enumerate() {
        let at = Some((i, e));
        if e.pcr != AGENT_PCR {
            reasons.push(reason(
                codes::AGENT_LOG_MALFORMED,
                at,
                format!(
                    "says it extended PCR {}, but the agent measures its steps into PCR {AGENT_PCR} only",
                    e.pcr
                ),
                Some(AGENT_PCR.to_string()),
                Some(e.pcr.to_string()),
            ));
        }
        let digest_ok = is_digest_hex(&e.digest);
        if !digest_ok {
            reasons.push(reason(
                codes::AGENT_LOG_MALFORMED,
                at,
                format!(
                    "the digest {:?} is not 64 lowercase hex digits (a SHA-256)",
                    e.digest
                ),
                None,
                Some(e.digest.clone()),
            ));
        }
        match (e.kind.carries_record(), &e.record) {
            (false, None) => {}
            (false, Some(_)) => reasons.push(reason(
                codes::AGENT_LOG_MALFORMED,
                at,
                format!(
                    "carries a record, but a {} event measures a digest only",
                    e.kind
                ),
                None,
                None,
            )),
            (true, None) => reasons.push(reason(
                codes::AGENT_LOG_MALFORMED,
                at,
                format!(
                    "carries no record, so what its digest measures cannot be checked (a {} event must carry the record it measured)",
                    e.kind
                ),
                None,
                None,
            )),
            (true, Some(record)) => {
                let hashed = crate::sha256_hex(record.as_bytes());
                if digest_ok && hashed != e.digest {
                    reasons.push(reason(
                        codes::AGENT_RECORD_MISMATCH,
                        at,
                        format!(
                            "the record hashes to {hashed} but the digest extended into PCR 13 is {}: the record was changed after it was measured",
                            e.digest
                        ),
                        Some(e.digest.clone()),
                        Some(hashed),
                    ));
                } else if digest_ok {
                    parse_record(i, e, record, &mut read, reasons);
                }
            }
        }
    }
    Some(read)
}

fn parse_record(
    i: usize,
    e: &AgentEvent,
    record: &str,
    read: &mut Read,
    reasons: &mut Vec<Reason>,
) {
    fn parse<T: serde::de::DeserializeOwned>(
        i: usize,
        e: &AgentEvent,
        record: &str,
        what: &str,
        reasons: &mut Vec<Reason>,
    ) -> Option<T> {
        match serde_json::from_str(record) {
            Ok(r) => Some(r),
            Err(err) => {
                reasons.push(reason(
                    codes::AGENT_LOG_MALFORMED,
                    Some((i, e)),
                    format!("the record does not parse as {what}: {err}"),
                    None,
                    None,
                ));
                None
            }
        }
    }
    match e.kind {
        EventKind::Snapshot => {
            if let Some(r) = parse(i, e, record, "a snapshot record", reasons) {
                read.snapshots.push((i, r));
            }
        }
        EventKind::Wipe => {
            if let Some(r) = parse(i, e, record, "a disk's wipe record", reasons) {
                read.disks.push((i, r));
            }
        }
        EventKind::Image => {
            if let Some(r) = parse(i, e, record, "an image record", reasons) {
                read.images.push((i, r));
            }
        }
        EventKind::Restore => {
            if let Some(r) = parse(i, e, record, "a restore record", reasons) {
                read.restores.push((i, r));
            }
        }
        EventKind::HandoffTarget => {
            if let Some(r) = parse(i, e, record, "a handoff target record", reasons) {
                read.targets.push((i, r));
            }
        }
        EventKind::HandoffKernel | EventKind::HandoffInitrd | EventKind::HandoffCmdline => {}
    }
}

/// snapshot → wipe → image (or restore) → handoff, never back.
fn check_order(events: &[AgentEvent], reasons: &mut Vec<Reason>) {
    let mut latest: Option<(usize, &AgentEvent)> = None;
    for (i, e) in events.iter().enumerate() {
        match latest {
            Some((j, prev)) if e.kind.stage() < prev.kind.stage() => {
                reasons.push(reason(
                    codes::AGENT_LOG_ORDER,
                    Some((i, e)),
                    format!(
                        "comes after event {j} ({}), but the agent runs snapshot → wipe → image (or restore) → handoff: the log was reordered",
                        prev.kind
                    ),
                    Some(format!("{} before {}", e.kind, prev.kind)),
                    Some(format!("{} after {}", e.kind, prev.kind)),
                ));
            }
            Some((_, prev)) if e.kind.stage() == prev.kind.stage() => {}
            _ => latest = Some((i, e)),
        }
    }
}

fn kinds_text(kinds: &[EventKind]) -> String {
    if kinds.is_empty() {
        return "none".to_owned();
    }
    kinds
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The steps the plan asked for: none dropped, none extra.
fn check_steps(
    events: &[AgentEvent],
    read: &Read,
    expect: &Expectation,
    reasons: &mut Vec<Reason>,
) {
    let count = |kind: EventKind| events.iter().filter(|e| e.kind == kind).count();
    let disk_kind = expect.disk_kind();
    let other_kind = match disk_kind {
        EventKind::Restore => EventKind::Image,
        _ => EventKind::Restore,
    };
    for (kind, want, step) in [
        (EventKind::Snapshot, expect.snapshot, "a snapshot"),
        (disk_kind, expect.image, "an image"),
        (other_kind, false, ""),
    ] {
        let got = count(kind);
        let wanted = usize::from(want);
        if got == wanted {
            continue;
        }
        let step = if kind == EventKind::Restore {
            "a restore"
        } else {
            step
        };
        let message = if got < wanted {
            format!("the plan asked for {step}, but the agent's log has no {kind} event: the {kind} record is missing (dropped)")
        } else if wanted == 0 {
            format!(
                "the plan asked for no {kind} step, but the agent's log has {got} {kind} event(s)"
            )
        } else {
            format!(
                "the plan asked for one {kind} step, but the agent's log has {got} {kind} events"
            )
        };
        reasons.push(reason(
            codes::AGENT_LOG_STEPS,
            None,
            message,
            Some(format!("{wanted} {kind}")),
            Some(format!("{got} {kind}")),
        ));
    }

    let wipes = count(EventKind::Wipe);
    let need = expect.min_wipes.max(1);
    if wipes < need {
        reasons.push(reason(
            codes::AGENT_LOG_STEPS,
            None,
            format!(
                "the node has {need} disk(s) to wipe but the agent's log has {wipes} wipe event(s): {} disk's wipe record is missing (dropped)",
                need - wipes
            ),
            Some(format!(">= {need} wipe")),
            Some(format!("{wipes} wipe")),
        ));
    }
    for (n, (i, d)) in read.disks.iter().enumerate() {
        if let Some((j, _)) = read.disks[..n]
            .iter()
            .find(|(_, other)| other.disk.path == d.disk.path)
        {
            reasons.push(reason(
                codes::AGENT_LOG_STEPS,
                Some((*i, &events[*i])),
                format!(
                    "records the wipe of {} again (event {j} already did): each disk is wiped once, so another disk's record is missing",
                    d.disk.path
                ),
                None,
                Some(d.disk.path.clone()),
            ));
        }
    }

    let want = handoff_kinds(expect.handoff);
    let got: Vec<EventKind> = events
        .iter()
        .map(|e| e.kind)
        .filter(|k| k.stage() == 3)
        .collect();
    if got != want {
        let mode = expect.handoff.map_or("no", |h| h.name());
        reasons.push(reason(
            codes::AGENT_LOG_STEPS,
            None,
            format!(
                "the plan's {mode} handoff measures {} but the agent's log has {}",
                kinds_text(want),
                kinds_text(&got)
            ),
            Some(kinds_text(want)),
            Some(kinds_text(&got)),
        ));
    }
}

/// `sha256:HEX` / `sha512:HEX`, or bare 64 hex digits meaning SHA-256.
fn parse_checksum(s: &str) -> Option<Checksum> {
    let s = s.trim();
    if s.contains(':') {
        s.parse().ok()
    } else {
        format!("sha256:{s}").parse().ok()
    }
}

/// How the steps ended: every disk clean, the image the plan named.
fn check_results(
    events: &[AgentEvent],
    read: &Read,
    expect: &Expectation,
    reasons: &mut Vec<Reason>,
) {
    for (i, d) in &read.disks {
        if d.status != wipe::Status::Clean {
            reasons.push(reason(
                codes::AGENT_STEP_RESULT,
                Some((*i, &events[*i])),
                format!(
                    "the wipe record of {} says failed ({}): the disk is not proven clean",
                    d.disk.path,
                    d.reason.as_deref().unwrap_or("no reason given")
                ),
                Some("clean".to_owned()),
                Some("failed".to_owned()),
            ));
        }
    }
    let want = match &expect.disk {
        None => return,
        Some(ExpectedDisk::Restore { manifest_sha256 }) => {
            for (i, restore) in &read.restores {
                let message = match manifest_sha256 {
                    Some(want) if restore.manifest_sha256 == *want => continue,
                    Some(want) => format!(
                        "the backup restored from {} onto {} has manifest {}, but the plan restores the snapshot whose manifest is {want:?}",
                        restore.uri, restore.target, restore.manifest_sha256
                    ),
                    None => format!(
                        "the backup restored from {} onto {} has manifest {}, but which snapshot the plan restores is not known here: no restore can be accepted",
                        restore.uri, restore.target, restore.manifest_sha256
                    ),
                };
                reasons.push(reason(
                    codes::AGENT_STEP_RESULT,
                    Some((*i, &events[*i])),
                    message,
                    Some(manifest_sha256.clone().unwrap_or_default()),
                    Some(restore.manifest_sha256.clone()),
                ));
            }
            return;
        }
        Some(ExpectedDisk::Image { checksum }) => checksum,
    };
    for (i, image) in &read.images {
        let at = Some((*i, &events[*i]));
        match (parse_checksum(want), parse_checksum(&image.digest)) {
            (Some(w), Some(g)) if w == g => {}
            (Some(w), _) => reasons.push(reason(
                codes::AGENT_STEP_RESULT,
                at,
                format!(
                    "the image written ({}) has digest {:?}, but the plan asked for {w}",
                    image.url, image.digest
                ),
                Some(w.to_string()),
                Some(image.digest.clone()),
            )),
            (None, _) => reasons.push(reason(
                codes::AGENT_STEP_RESULT,
                at,
                format!(
                    "the plan's checksum {want:?} does not parse, so the image's digest {:?} cannot be checked",
                    image.digest
                ),
                Some(want.clone()),
                Some(image.digest.clone()),
            )),
        }
    }
}

/// The replay of every digest must equal the quoted PCR. Skipped (another
/// reason already says why) when a digest does not parse.
fn check_replay(events: &[AgentEvent], quoted_pcr13: &[u8; 32], reasons: &mut Vec<Reason>) {
    let Some(digests) = events
        .iter()
        .map(|e| parse_digest(&e.digest))
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let replayed = replay(&digests);
    if &replayed != quoted_pcr13 {
        let (got, want) = (hex::encode(replayed), hex::encode(quoted_pcr13));
        reasons.push(reason(
            codes::AGENT_LOG_REPLAY,
            None,
            format!(
                "the agent's log replays to {got} but the quote says {want}: an event was altered, reordered, dropped or added after it was measured ({} events in the log)",
                events.len()
            ),
            Some(want),
            Some(got),
        ));
    }
}

/// `PCR := SHA-256(PCR || digest)` over `digests`, from a PCR of zeros.
pub fn replay<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut pcr = [0u8; 32];
    for d in digests {
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(d);
        pcr = h.finalize().into();
    }
    pcr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_of_nothing_is_zero_and_of_one_is_the_extend() {
        assert_eq!(replay([]), [0u8; 32]);
        let d = [7u8; 32];
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update(d);
        let want: [u8; 32] = h.finalize().into();
        assert_eq!(replay([&d]), want);
        assert_ne!(replay([&d, &d]), want);
    }

    use crate::image::{DiskFormat, ImageFormat, SignatureStatus};
    use crate::wipe::{DiskId, Method};

    const IMAGE_SHA: &str =
        "sha256:abababababababababababababababababababababababababababababababab";

    fn snapshot() -> SnapshotRecord {
        SnapshotRecord {
            uri: "nbd://127.0.0.1:10809/old".into(),
            source: "/dev/vda".into(),
            source_identity: "block:/dev/vda serial=s1".into(),
            disk_bytes: 1 << 30,
            chunk_size: 4 << 20,
            chunks: 256,
            zero_chunks: 200,
            changed_chunks: 256,
            bytes_sent: 56 << 22,
            bytes_zeroed: 200 << 22,
            zero_bytes_skipped: 0,
            manifest_sha256: "cd".repeat(32),
            manifest_bytes: 8500,
            previous_manifest_sha256: None,
            incremental: false,
            verified: true,
            reconnects: 0,
            retries: 0,
            connections: 2,
            direct_io: true,
            verify_ms: 10,
            elapsed_ms: 100,
            ca_sha256: Vec::new(),
        }
    }

    fn disk(name: &str) -> DiskRecord {
        DiskRecord {
            disk: DiskId {
                name: name.into(),
                path: format!("/dev/{name}"),
                model: None,
                serial: Some(format!("serial-{name}")),
                size_bytes: 1 << 30,
            },
            requested: Method::Auto,
            attempts: Vec::new(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
            bytes_written: 1 << 30,
            status: wipe::Status::Clean,
            reason: None,
        }
    }

    fn image() -> ImageRecord {
        ImageRecord {
            url: "http://127.0.0.1:8080/tenant.img.zst".into(),
            target: "/dev/vda".into(),
            format: ImageFormat::Zstd,
            disk_format: DiskFormat::Raw,
            image_bytes: 1 << 30,
            bytes_served: 1 << 20,
            bytes_written: 1 << 30,
            zero_bytes_skipped: 0,
            bmap_mapped_bytes: None,
            digest: IMAGE_SHA.into(),
            signature: SignatureStatus::NotRequired,
            resumes: 0,
            restarts: 0,
            verified_after_write: true,
            direct_io: true,
            download_ms: 5,
            verify_ms: 5,
            total_ms: 20,
            ca_sha256: Vec::new(),
        }
    }

    fn with_record(kind: EventKind, bytes: &[u8], description: &str) -> AgentEvent {
        AgentEvent {
            pcr: AGENT_PCR,
            kind,
            digest: crate::sha256_hex(bytes),
            record: Some(String::from_utf8(bytes.to_vec()).unwrap()),
            description: description.into(),
        }
    }

    fn digest_only(kind: EventKind, measured: &[u8]) -> AgentEvent {
        AgentEvent {
            pcr: AGENT_PCR,
            kind,
            digest: crate::sha256_hex(measured),
            record: None,
            description: format!("{kind} test"),
        }
    }

    /// snapshot, wipe vda, wipe vdb, image, kexec's three.
    fn good_log() -> Vec<AgentEvent> {
        vec![
            with_record(
                EventKind::Snapshot,
                &snapshot().canonical_json(),
                "snapshot /dev/vda",
            ),
            with_record(
                EventKind::Wipe,
                &disk("vda").canonical_json(),
                "wipe /dev/vda",
            ),
            with_record(
                EventKind::Wipe,
                &disk("vdb").canonical_json(),
                "wipe /dev/vdb",
            ),
            with_record(
                EventKind::Image,
                &image().canonical_json(),
                "image /dev/vda",
            ),
            digest_only(EventKind::HandoffKernel, b"kernel"),
            digest_only(EventKind::HandoffInitrd, b"initrd"),
            digest_only(EventKind::HandoffCmdline, b"console=ttyS0"),
        ]
    }

    fn expectation() -> Expectation {
        Expectation {
            snapshot: true,
            min_wipes: 2,
            image: true,
            disk: Some(ExpectedDisk::Image {
                checksum: IMAGE_SHA.into(),
            }),
            handoff: Some(Handoff::Kexec),
        }
    }

    /// What PCR 13 reads after extending `events`' digests in order.
    fn pcr_of(events: &[AgentEvent]) -> [u8; 32] {
        let digests: Vec<[u8; 32]> = events
            .iter()
            .map(|e| parse_digest(&e.digest).unwrap())
            .collect();
        replay(&digests)
    }

    fn codes_of(reasons: &[Reason]) -> Vec<&str> {
        reasons.iter().map(|r| r.code.as_str()).collect()
    }

    #[test]
    fn good_log_passes_and_hands_out_the_records() {
        let log = good_log();
        let v = check(&log, &pcr_of(&log), &expectation()).unwrap();
        assert_eq!(v.snapshot, Some(snapshot()));
        assert_eq!(v.disks, vec![disk("vda"), disk("vdb")]);
        assert_eq!(v.image, Some(image()));
        assert_eq!(v.handoff_target, None);
        let k = v.kexec.unwrap();
        assert_eq!(k.kernel, crate::sha256_hex(b"kernel"));
        assert_eq!(k.cmdline, crate::sha256_hex(b"console=ttyS0"));
        assert_eq!(v.pcr13, hex::encode(pcr_of(&log)));
        assert_eq!(v.events, log);
        // The plan's checksum may be bare hex.
        let bare = Expectation {
            disk: Some(ExpectedDisk::Image {
                checksum: "ab".repeat(32),
            }),
            ..expectation()
        };
        check(&log, &pcr_of(&log), &bare).unwrap();
        // The expectation can come straight from a plan.
        let plan: PlanRequest = serde_json::from_value(serde_json::json!({
            "image": "http://x/i", "checksum": IMAGE_SHA, "snapshot_to": "nbd://h/e"
        }))
        .unwrap();
        assert_eq!(Expectation::from_plan(&plan, 2), expectation());
    }

    #[test]
    fn reboot_to_disk_and_poweroff_logs_pass() {
        let mut log = good_log();
        log.truncate(4);
        let target = HandoffTargetRecord {
            partition: 1,
            path: "\\EFI\\BOOT\\BOOTX64.EFI".into(),
            sha256: "ef".repeat(32),
        };
        let mut reboot = log.clone();
        reboot.push(with_record(
            EventKind::HandoffTarget,
            &target.canonical_json(),
            "handoff-target partition 1",
        ));
        assert_eq!(reboot[4].digest, target.digest());
        let expect = Expectation {
            handoff: Some(Handoff::RebootToDisk),
            ..expectation()
        };
        let v = check(&reboot, &pcr_of(&reboot), &expect).unwrap();
        assert_eq!(v.handoff_target, Some(target));
        assert_eq!(v.kexec, None);
        let expect = Expectation {
            handoff: Some(Handoff::Poweroff),
            ..expectation()
        };
        check(&log, &pcr_of(&log), &expect).unwrap();
        // A kexec plan without its three extends fails.
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
        assert!(
            err[0].message.contains(
                "handoff-kernel, handoff-initrd, handoff-cmdline but the agent's log has none"
            ),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn altered_record_fails_naming_the_event() {
        let mut log = good_log();
        let pcr = pcr_of(&log);
        // The agent extended the true record, then the log was changed.
        let record = log[2].record.take().unwrap();
        log[2].record = Some(record.replacen("1073741824", "1073741825", 1));
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_RECORD_MISMATCH], "{err:?}");
        let r = &err[0];
        assert_eq!(r.pcr, Some(13));
        let ev = r.event.as_ref().unwrap();
        assert_eq!((ev.index, ev.event_type.as_str()), (2, "wipe"));
        assert!(
            r.message
                .starts_with("PCR13 event 2 (wipe, \"wipe /dev/vdb\")"),
            "{}",
            r.message
        );
        // Fixing the digest to match the altered record breaks the replay.
        log[2].digest = crate::sha256_hex(log[2].record.as_ref().unwrap().as_bytes());
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_REPLAY], "{err:?}");
    }

    #[test]
    fn records_swapped_between_two_wipes_fail_both() {
        let mut log = good_log();
        let pcr = pcr_of(&log);
        let a = log[1].record.take();
        log[1].record = log[2].record.take();
        log[2].record = a;
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_RECORD_MISMATCH, codes::AGENT_RECORD_MISMATCH]
        );
        let idx: Vec<usize> = err
            .iter()
            .map(|r| r.event.as_ref().unwrap().index)
            .collect();
        assert_eq!(idx, [1, 2]);
    }

    #[test]
    fn image_before_wipe_is_out_of_order() {
        let mut log = good_log();
        let pcr = pcr_of(&log);
        log.swap(2, 3);
        // As sent after the fact: the order and the replay both fail.
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_ORDER, codes::AGENT_LOG_REPLAY],
            "{err:?}"
        );
        let ev = err[0].event.as_ref().unwrap();
        assert_eq!((ev.index, ev.event_type.as_str()), (3, "wipe"));
        assert!(
            err[0].message.contains("comes after event 2 (image)"),
            "{}",
            err[0].message
        );
        // Even when the agent measured in that order, the order fails.
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_ORDER]);
    }

    #[test]
    fn dropped_wipe_fails() {
        let mut log = good_log();
        let pcr = pcr_of(&log);
        log.remove(2);
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_STEPS, codes::AGENT_LOG_REPLAY]
        );
        assert!(
            err[0]
                .message
                .contains("2 disk(s) to wipe but the agent's log has 1 wipe event(s)"),
            "{}",
            err[0].message
        );
        // Never measured at all: the plan's count still catches it.
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
        // A disk wiped twice does not count as two.
        log.insert(2, log[1].clone());
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
        assert!(
            err[0].message.contains("/dev/vda again"),
            "{}",
            err[0].message
        );
        // At least one wipe, whatever the inventory said.
        let none: Vec<AgentEvent> = good_log()
            .into_iter()
            .filter(|e| e.kind != EventKind::Wipe)
            .collect();
        let expect = Expectation {
            min_wipes: 0,
            ..expectation()
        };
        let err = check(&none, &pcr_of(&none), &expect).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
    }

    #[test]
    fn dropped_image_and_snapshot_fail() {
        let mut log = good_log();
        let pcr = pcr_of(&log);
        log.remove(3);
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_STEPS, codes::AGENT_LOG_REPLAY]
        );
        assert!(
            err[0].message.contains("no image event"),
            "{}",
            err[0].message
        );
        let mut log = good_log();
        log.remove(0);
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
        assert!(
            err[0].message.contains("no snapshot event"),
            "{}",
            err[0].message
        );
        // A snapshot the plan did not ask for is refused too.
        let log = good_log();
        let expect = Expectation {
            snapshot: false,
            ..expectation()
        };
        let err = check(&log, &pcr_of(&log), &expect).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
    }

    #[test]
    fn extra_handoff_event_fails() {
        let mut log = good_log();
        log.push(digest_only(EventKind::HandoffKernel, b"other kernel"));
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);
        assert!(
            err[0]
                .message
                .contains("has handoff-kernel, handoff-initrd, handoff-cmdline, handoff-kernel"),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn wrong_pcr_bad_digest_and_misplaced_records_are_malformed() {
        let mut log = good_log();
        log[4].pcr = 14;
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_MALFORMED]);
        assert!(err[0].message.contains("PCR 14"), "{}", err[0].message);
        assert_eq!(err[0].event.as_ref().unwrap().index, 4);

        let mut log = good_log();
        let pcr = pcr_of(&log);
        log[5].digest = log[5].digest.to_uppercase();
        let err = check(&log, &pcr, &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_MALFORMED],
            "no replay without digests"
        );

        let mut log = good_log();
        log[5].record = Some("{}".into());
        log[1].record = None;
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_MALFORMED, codes::AGENT_LOG_MALFORMED]
        );
        assert!(
            err[0].message.contains("carries no record"),
            "{}",
            err[0].message
        );
        assert!(
            err[1].message.contains("measures a digest only"),
            "{}",
            err[1].message
        );

        // A record that hashes right but is not the kind's type.
        let mut log = good_log();
        log[1] = with_record(EventKind::Wipe, &image().canonical_json(), "wipe /dev/vda");
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err)[0], codes::AGENT_LOG_MALFORMED);
        assert!(
            err[0]
                .message
                .contains("does not parse as a disk's wipe record"),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn replay_mismatch_names_both_values() {
        let log = good_log();
        let quoted = [0x11u8; 32];
        let err = check(&log, &quoted, &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_REPLAY]);
        let want = format!(
            "PCR13: the agent's log replays to {} but the quote says {}",
            hex::encode(pcr_of(&log)),
            "11".repeat(32)
        );
        assert!(err[0].message.starts_with(&want), "{}", err[0].message);
        assert_eq!(err[0].expected.as_deref(), Some("11".repeat(32).as_str()));
    }

    #[test]
    fn failed_wipe_and_wrong_image_fail_the_results() {
        let mut failed = disk("vdb");
        failed.status = wipe::Status::Failed;
        failed.reason = Some("verification read 0xaa at 4096".into());
        let mut log = good_log();
        log[2] = with_record(EventKind::Wipe, &failed.canonical_json(), "wipe /dev/vdb");
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_STEP_RESULT]);
        assert!(
            err[0].message.contains("0xaa at 4096"),
            "{}",
            err[0].message
        );

        let log = good_log();
        let expect = Expectation {
            disk: Some(ExpectedDisk::Image {
                checksum: format!("sha256:{}", "cd".repeat(32)),
            }),
            ..expectation()
        };
        let err = check(&log, &pcr_of(&log), &expect).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_STEP_RESULT]);
        assert_eq!(err[0].event.as_ref().unwrap().index, 3);
    }

    #[test]
    fn without_a_plan_only_consistency_and_replay_count() {
        let mut log = good_log();
        log.remove(3);
        let v = check_without_plan(&log, &pcr_of(&log)).unwrap();
        assert_eq!(v.image, None);
        assert_eq!(v.disks.len(), 2);
        let err = check_without_plan(&log, &[0; 32]).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_REPLAY]);
        assert!(check_without_plan(&[], &[0; 32]).is_ok());
    }

    fn restore() -> RestoreRecord {
        RestoreRecord {
            uri: "nbd://10.0.2.2:10809/".into(),
            target: "/dev/vdb".into(),
            source_identity: "block:/dev/vda serial=s1".into(),
            disk_bytes: 1 << 30,
            chunk_size: 4 << 20,
            chunks: 256,
            zero_chunks: 200,
            manifest_sha256: "cd".repeat(32),
            bytes_read: 56 << 22,
            bytes_written: 56 << 22,
            bytes_zeroed: 0,
            zero_bytes_skipped: 200 << 22,
            reconnects: 0,
            connections: 1,
            direct_io: true,
            elapsed_ms: 50,
        }
    }

    /// The good log with a restore in the image's place.
    fn restore_log() -> Vec<AgentEvent> {
        let mut log = good_log();
        log[3] = with_record(
            EventKind::Restore,
            &restore().canonical_json(),
            "restore nbd://10.0.2.2:10809/ to /dev/vdb",
        );
        log
    }

    fn restore_expectation() -> Expectation {
        let plan: PlanRequest = serde_json::from_value(serde_json::json!({
            "restore_from": "lease-1", "snapshot_to": "nbd://h/e"
        }))
        .unwrap();
        Expectation::from_restore_plan(&plan, 2, &"cd".repeat(32))
    }

    #[test]
    fn a_restore_plan_wants_one_restore_of_the_recorded_manifest_and_no_image() {
        let expect = restore_expectation();
        assert_eq!(expect.restore_manifest(), Some("cd".repeat(32).as_str()));
        assert_eq!(expectation().restore_manifest(), None);
        let log = restore_log();
        let v = check(&log, &pcr_of(&log), &expect).unwrap();
        assert_eq!(v.restore, Some(restore()));
        assert_eq!(v.image, None);

        // An image where the restore should be: missing restore, extra image.
        let log = good_log();
        let err = check(&log, &pcr_of(&log), &expect).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_STEPS, codes::AGENT_LOG_STEPS],
            "{err:?}"
        );
        assert!(
            err[0].message.contains("asked for a restore"),
            "{}",
            err[0].message
        );
        assert!(
            err[1].message.contains("no image step"),
            "{}",
            err[1].message
        );
        // And a restore where an image plan wants its image.
        let log = restore_log();
        let err = check(&log, &pcr_of(&log), &expectation()).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_STEPS, codes::AGENT_LOG_STEPS]
        );
        // Both: the image is one too many.
        let mut both = restore_log();
        both.insert(3, good_log()[3].clone());
        let err = check(&both, &pcr_of(&both), &expect).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_LOG_STEPS]);

        // Another backup than the one the server recorded.
        let other = Expectation::from_restore_plan(
            &serde_json::from_value(serde_json::json!({"restore_from": "lease-1"})).unwrap(),
            2,
            &"ee".repeat(32),
        );
        let log = restore_log();
        let err = check(
            &log,
            &pcr_of(&log),
            &Expectation {
                snapshot: true,
                ..other
            },
        )
        .unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_STEP_RESULT]);
        assert_eq!(err[0].event.as_ref().unwrap().index, 3);
        assert!(
            err[0].message.contains(&"ee".repeat(32)),
            "{}",
            err[0].message
        );

        // from_plan alone cannot know the manifest: it fails closed.
        let plan: PlanRequest = serde_json::from_value(
            serde_json::json!({"restore_from": "lease-1", "snapshot_to": "nbd://h/e"}),
        )
        .unwrap();
        let closed = Expectation::from_plan(&plan, 2);
        assert_eq!(
            closed.disk,
            Some(ExpectedDisk::Restore {
                manifest_sha256: None
            })
        );
        assert_eq!(closed.restore_manifest(), None);
        let err = check(&log, &pcr_of(&log), &closed).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_STEP_RESULT]);
        assert!(
            err[0].message.contains("not known here"),
            "{}",
            err[0].message
        );

        // An altered restore record is caught like any other.
        let mut log = restore_log();
        let pcr = pcr_of(&log);
        log[3].record = Some(
            log[3]
                .record
                .take()
                .unwrap()
                .replace("/dev/vdb", "/dev/vdc"),
        );
        let err = check(&log, &pcr, &expect).unwrap_err();
        assert_eq!(codes_of(&err), [codes::AGENT_RECORD_MISMATCH]);
        // A restore before the wipes is out of order.
        let mut log = restore_log();
        log.swap(1, 3);
        let err = check(&log, &pcr_of(&log), &expect).unwrap_err();
        assert_eq!(
            codes_of(&err),
            [codes::AGENT_LOG_ORDER, codes::AGENT_LOG_ORDER],
            "both wipes come after the restore: {err:?}"
        );
        assert!(
            err[0].message.contains("image (or restore)"),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for k in EventKind::ALL {
            assert_eq!(k.name().parse::<EventKind>().unwrap(), k);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert!("kernel".parse::<EventKind>().is_err());
    }
}
