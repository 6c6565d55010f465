//! The agent's measured log: each step's result record (snapshot, one per
//! wiped disk, image) and the handoff targets, extended into
//! [`AGENT_PCR`] and kept, in extend order, as the [`AgentEvent`]s the
//! final (handoff-phase) attestation sends. The server replays them to the
//! quoted PCR with [`warden_protocol::agentlog::check`].
//!
//! Owns the rule "extend first, then log": an event enters the log only
//! after its extend succeeded, so the log never claims a measurement the
//! TPM did not take. It never talks to a TPM itself (extends go through a
//! [`Measurer`]) and never decides what a step's record says.
//!
//! One test hook lives here, on purpose: `warden.test_alter_record=KIND`
//! ([`MeasuredLog::new`] with `Some(kind)`) changes one byte of the first
//! event of that kind *after* it was extended, so the log the server gets
//! no longer matches the PCR and the final verdict must fail. Nothing else
//! ever sets it.

use sha2::{Digest, Sha256};
use warden_protocol::agentlog::{AgentEvent, EventKind, HandoffTargetRecord, AGENT_PCR};
use warden_protocol::image::ImageRecord;
use warden_protocol::snapshot::SnapshotRecord;
use warden_protocol::wipe::DiskRecord;

use crate::handoff::{handoff_events, BootEntry, HandoffEvent};
use crate::tpm::{Tpm, TpmError};

/// Something that can extend a SHA-256 PCR: the TPM, or a recorder.
pub trait Measurer {
    fn extend_sha256(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError>;
}

impl Measurer for Tpm {
    fn extend_sha256(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError> {
        self.extend_pcr_sha256(pcr, digest)
    }
}

/// Why a measurement did not happen; the log is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The extend itself failed.
    #[error("measuring the {kind} event ({description}) into PCR {pcr} failed: {source}")]
    Extend {
        pcr: u32,
        kind: EventKind,
        description: String,
        #[source]
        source: TpmError,
    },
    /// A record for a kind that measures a digest only, or the reverse.
    #[error("a {kind} event {what}")]
    WrongKind { kind: EventKind, what: &'static str },
    /// A record that is not UTF-8 (every record is JSON).
    #[error("the {kind} record ({description}) is not UTF-8 text")]
    NotText {
        kind: EventKind,
        description: String,
    },
}

/// The events extended so far, in order.
#[derive(Clone, Debug, Default)]
pub struct MeasuredLog {
    events: Vec<AgentEvent>,
    /// Test hook: alter the first event of this kind after extending it.
    alter: Option<EventKind>,
    altered: bool,
}

impl MeasuredLog {
    /// An empty log; `alter` is the `warden.test_alter_record` test hook
    /// (`None` in every real turnover).
    pub fn new(alter: Option<EventKind>) -> MeasuredLog {
        if let Some(kind) = alter {
            tracing::warn!(%kind, "TEST HOOK: the measured log will not match PCR 13 (warden.test_alter_record)");
        }
        MeasuredLog {
            events: Vec::new(),
            alter,
            altered: false,
        }
    }

    /// The events, in extend order: what the final attestation sends.
    pub fn events(&self) -> &[AgentEvent] {
        &self.events
    }

    /// Extends [`AGENT_PCR`] with SHA-256 of `record` (the step's
    /// canonical JSON), then logs it. `kind` must carry a record.
    pub fn measure_record(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        kind: EventKind,
        record: Vec<u8>,
        description: impl Into<String>,
    ) -> Result<(), MeasureError> {
        let description = description.into();
        if !kind.carries_record() {
            return Err(MeasureError::WrongKind {
                kind,
                what: "measures a digest, not a record (use measure_digest)",
            });
        }
        let record = String::from_utf8(record).map_err(|_| MeasureError::NotText {
            kind,
            description: description.clone(),
        })?;
        let digest: [u8; 32] = Sha256::digest(record.as_bytes()).into();
        self.extend_and_log(m, kind, digest, Some(record), description)
    }

    /// Extends [`AGENT_PCR`] with `digest` for a kind that measures a
    /// digest only (the kexec handoff's kernel, initrd, command line).
    pub fn measure_digest(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        kind: EventKind,
        digest: [u8; 32],
        description: impl Into<String>,
    ) -> Result<(), MeasureError> {
        if kind.carries_record() {
            return Err(MeasureError::WrongKind {
                kind,
                what: "must carry its record (use measure_record)",
            });
        }
        self.extend_and_log(m, kind, digest, None, description.into())
    }

    /// The snapshot step's record.
    pub fn measure_snapshot(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        record: &SnapshotRecord,
    ) -> Result<(), MeasureError> {
        let description = format!("snapshot {} to {}", record.source, record.uri);
        self.measure_record(m, EventKind::Snapshot, record.canonical_json(), description)
    }

    /// One disk's wipe record.
    pub fn measure_wipe(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        record: &DiskRecord,
    ) -> Result<(), MeasureError> {
        let description = format!("wipe {}", record.disk.path);
        self.measure_record(m, EventKind::Wipe, record.canonical_json(), description)
    }

    /// The image step's record.
    pub fn measure_image(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        record: &ImageRecord,
    ) -> Result<(), MeasureError> {
        let description = format!("image {} to {}", record.url, record.target);
        self.measure_record(m, EventKind::Image, record.canonical_json(), description)
    }

    /// A reboot-to-disk handoff's target.
    pub fn measure_handoff_target(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        record: &HandoffTargetRecord,
    ) -> Result<(), MeasureError> {
        let description = format!(
            "handoff-target partition {} {}",
            record.partition, record.path
        );
        self.measure_record(
            m,
            EventKind::HandoffTarget,
            record.canonical_json(),
            description,
        )
    }

    /// The kexec handoff's three extends for `entry` (kernel, initrd,
    /// command line), before the final quote. The kexec itself must then
    /// not extend them again: pass [`MeasuredLog::premeasured`] to
    /// [`crate::handoff::kexec_handoff`] as its measurer.
    pub fn measure_kexec(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        entry: &BootEntry,
    ) -> Result<(), MeasureError> {
        for event in handoff_events(entry) {
            self.measure_handoff_event(m, &event)?;
        }
        Ok(())
    }

    /// One handoff event as [`crate::handoff::handoff_events`] made it.
    pub fn measure_handoff_event(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        event: &HandoffEvent,
    ) -> Result<(), MeasureError> {
        let e = event.agent_event();
        self.measure_digest(m, e.kind, event.digest, e.description)
    }

    /// A [`Measurer`] for [`crate::handoff::kexec_handoff`] after
    /// [`MeasuredLog::measure_kexec`]: it extends nothing, and accepts
    /// exactly the handoff digests this log already measured, in order —
    /// so PCR 13 after kexec is what the final quote and the report show,
    /// and a kernel other than the measured one is refused.
    pub fn premeasured(&self) -> Premeasured<'_> {
        Premeasured {
            digests: self
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e.kind,
                        EventKind::HandoffKernel
                            | EventKind::HandoffInitrd
                            | EventKind::HandoffCmdline
                    )
                })
                .map(|e| e.digest.as_str())
                .collect(),
            next: 0,
        }
    }

    fn extend_and_log(
        &mut self,
        m: &mut (impl Measurer + ?Sized),
        kind: EventKind,
        digest: [u8; 32],
        record: Option<String>,
        description: String,
    ) -> Result<(), MeasureError> {
        if let Err(source) = m.extend_sha256(AGENT_PCR, &digest) {
            return Err(MeasureError::Extend {
                pcr: AGENT_PCR,
                kind,
                description,
                source,
            });
        }
        let digest = hex::encode(digest);
        tracing::info!(pcr = AGENT_PCR, %kind, %digest, event = %description, "measured");
        let mut event = AgentEvent {
            pcr: AGENT_PCR,
            kind,
            digest,
            record,
            description,
        };
        if self.alter == Some(kind) && !self.altered {
            alter_one_byte(&mut event);
            self.altered = true;
            tracing::warn!(%kind, index = self.events.len(), "TEST HOOK: altered the event after measuring it");
        }
        self.events.push(event);
        Ok(())
    }
}

/// Changes one byte of the event's record: the last digit of its first run
/// of digits, so a JSON number keeps no leading zero, the record still
/// parses, and only the hash check can notice. For kinds without a record,
/// the last hex digit of the digest, which stays well-formed hex and only
/// the replay can notice.
fn alter_one_byte(event: &mut AgentEvent) {
    let (text, at) = match &mut event.record {
        Some(record) => {
            let Some(start) = record.find(|c: char| c.is_ascii_digit()) else {
                record.insert(0, ' ');
                return;
            };
            let run = record[start..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(record.len() - start);
            (record, start + run - 1)
        }
        None if !event.digest.is_empty() => {
            let at = event.digest.len() - 1;
            (&mut event.digest, at)
        }
        None => return,
    };
    let new = if text.as_bytes().get(at) == Some(&b'0') {
        "1"
    } else {
        "0"
    };
    if text.is_char_boundary(at) && text.is_char_boundary(at + 1) {
        text.replace_range(at..at + 1, new);
    }
}

/// See [`MeasuredLog::premeasured`].
#[derive(Debug)]
pub struct Premeasured<'a> {
    digests: Vec<&'a str>,
    next: usize,
}

impl Measurer for Premeasured<'_> {
    fn extend_sha256(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError> {
        let got = hex::encode(digest);
        let want = self.digests.get(self.next).copied();
        if pcr != AGENT_PCR || want != Some(got.as_str()) {
            return Err(TpmError::Command {
                tcti: "(none: already measured)".into(),
                operation: "PCR_Extend(SHA-256)",
                reason: format!(
                    "PCR {pcr} digest {got} is not the handoff digest measured before the final quote ({})",
                    want.unwrap_or("none left")
                ),
            });
        }
        self.next += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_protocol::agentlog::replay;

    /// Records extends instead of making them.
    #[derive(Default)]
    struct Recorder(Vec<(u32, [u8; 32])>);

    impl Measurer for Recorder {
        fn extend_sha256(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError> {
            self.0.push((pcr, *digest));
            Ok(())
        }
    }

    struct Broken;

    impl Measurer for Broken {
        fn extend_sha256(&mut self, _: u32, _: &[u8; 32]) -> Result<(), TpmError> {
            Err(TpmError::Open {
                tcti: "test".into(),
                reason: "gone".into(),
            })
        }
    }

    #[test]
    fn measure_record_extends_then_logs() {
        let mut rec = Recorder::default();
        let mut log = MeasuredLog::new(None);
        log.measure_record(&mut rec, EventKind::Wipe, b"{\"a\":1}".to_vec(), "wipe x")
            .unwrap();
        log.measure_digest(&mut rec, EventKind::HandoffKernel, [3; 32], "k")
            .unwrap();
        let want: [u8; 32] = Sha256::digest(b"{\"a\":1}").into();
        assert_eq!(rec.0, vec![(AGENT_PCR, want), (AGENT_PCR, [3; 32])]);
        let e = &log.events()[0];
        assert_eq!(e.digest, hex::encode(want));
        assert_eq!(e.record.as_deref(), Some("{\"a\":1}"));
        assert_eq!(log.events()[1].record, None);
        // Wrong kinds and failed extends leave the log alone.
        assert!(log
            .measure_record(&mut rec, EventKind::HandoffKernel, Vec::new(), "k")
            .is_err());
        assert!(log
            .measure_digest(&mut rec, EventKind::Image, [0; 32], "i")
            .is_err());
        let err = log
            .measure_record(
                &mut Broken,
                EventKind::Wipe,
                b"{}".to_vec(),
                "wipe /dev/vdb",
            )
            .unwrap_err();
        assert!(err.to_string().contains("wipe /dev/vdb"), "{err}");
        assert!(err.to_string().contains("PCR 13"), "{err}");
        assert_eq!(log.events().len(), 2);
        assert_eq!(rec.0.len(), 2);
    }

    #[test]
    fn the_hook_alters_the_first_event_of_its_kind_after_extending() {
        let mut rec = Recorder::default();
        let mut log = MeasuredLog::new(Some(EventKind::Wipe));
        for r in ["{\"n\":10}", "{\"n\":20}"] {
            log.measure_record(&mut rec, EventKind::Wipe, r.as_bytes().to_vec(), "wipe")
                .unwrap();
        }
        assert_eq!(log.events()[0].record.as_deref(), Some("{\"n\":11}"));
        assert_eq!(log.events()[1].record.as_deref(), Some("{\"n\":20}"));
        // The digests are what was extended; only the record changed.
        let extended: Vec<[u8; 32]> = rec.0.iter().map(|(_, d)| *d).collect();
        assert_eq!(log.events()[0].digest, hex::encode(extended[0]));

        let mut log = MeasuredLog::new(Some(EventKind::HandoffCmdline));
        log.measure_digest(&mut rec, EventKind::HandoffCmdline, [0xab; 32], "c")
            .unwrap();
        assert_ne!(log.events()[0].digest, hex::encode([0xab; 32]));
        assert_eq!(log.events()[0].digest.len(), 64);
    }

    #[test]
    fn premeasured_accepts_only_the_measured_handoff_digests_in_order() {
        let mut rec = Recorder::default();
        let mut log = MeasuredLog::new(None);
        log.measure_record(&mut rec, EventKind::Wipe, b"{}".to_vec(), "w")
            .unwrap();
        for (kind, d) in [
            (EventKind::HandoffKernel, [1; 32]),
            (EventKind::HandoffInitrd, [2; 32]),
            (EventKind::HandoffCmdline, [3; 32]),
        ] {
            log.measure_digest(&mut rec, kind, d, kind.name()).unwrap();
        }
        let mut p = log.premeasured();
        p.extend_sha256(AGENT_PCR, &[1; 32]).unwrap();
        assert!(p.extend_sha256(AGENT_PCR, &[3; 32]).is_err());
        p.extend_sha256(AGENT_PCR, &[2; 32]).unwrap();
        p.extend_sha256(AGENT_PCR, &[3; 32]).unwrap();
        assert!(p.extend_sha256(AGENT_PCR, &[3; 32]).is_err());
        // The recorder saw each extend once: the log replays to its PCR.
        let digests: Vec<[u8; 32]> = rec.0.iter().map(|(_, d)| *d).collect();
        let from_log: Vec<[u8; 32]> = log
            .events()
            .iter()
            .map(|e| hex::decode(&e.digest).unwrap().try_into().unwrap())
            .collect();
        assert_eq!(replay(&digests), replay(&from_log));
    }
}
