//! The handoff measurement: what the agent extends into [`HANDOFF_PCR`]
//! before it starts the tenant's kernel, as events a log can carry and as a
//! pure function ([`expected_pcr`]) that tests, the server and the tenant
//! use to predict the PCR.
//!
//! It never talks to a TPM itself: extends go through a [`Measurer`] (the
//! agent's [`crate::tpm::Tpm`], or a recorder in tests). Its events join
//! the agent's measured log ([`crate::measured`]) as
//! [`AgentEvent`]s ([`HandoffEvent::agent_event`]), so the handoff's three
//! extends are part of the same log the server replays.

use sha2::{Digest, Sha256};
use warden_protocol::agentlog::{AgentEvent, EventKind, AGENT_PCR};

use super::entry::{BootEntry, EntryDigests};
pub use crate::measured::Measurer;

/// The PCR the handoff extends (SHA-256 bank). Nothing else extends it on a
/// Warden node: not the firmware (0–7), the boot loaders (8, 9, 14), IMA
/// (10), or systemd's userspace (11, 15); only systemd-stub, for
/// sysext/confext images the Warden ramdisk does not carry, and never on the
/// kexec path. So it reads zero when the handoff starts, and after kexec the
/// tenant reads exactly the three extends below. docs/handoff.md says why.
/// The same PCR as the rest of the agent's measured log.
pub const HANDOFF_PCR: u32 = AGENT_PCR;

/// Which part of the boot entry an event measures, in measurement order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Kernel,
    Initrd,
    Cmdline,
}

impl Part {
    /// The event's tag: its description starts with it.
    pub fn tag(self) -> &'static str {
        match self {
            Part::Kernel => "warden-handoff-kernel",
            Part::Initrd => "warden-handoff-initrd",
            Part::Cmdline => "warden-handoff-cmdline",
        }
    }

    /// The measured log's kind for this part.
    pub fn kind(self) -> EventKind {
        match self {
            Part::Kernel => EventKind::HandoffKernel,
            Part::Initrd => EventKind::HandoffInitrd,
            Part::Cmdline => EventKind::HandoffCmdline,
        }
    }
}

/// One extend of the handoff, as the agent's measured log records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HandoffEvent {
    pub pcr: u32,
    pub part: Part,
    /// The SHA-256 extended: the digest of the part's bytes.
    #[serde(with = "hex_digest")]
    pub digest: [u8; 32],
    /// `"<tag> <source> <partition> <path>"`, e.g.
    /// `warden-handoff-kernel esp-bls partition 1 /loader/entries/t.conf`;
    /// for the command line, the command line itself follows after ": ".
    pub description: String,
}

impl HandoffEvent {
    /// This extend as the agent's measured log carries it (a digest, no
    /// record).
    pub fn agent_event(&self) -> AgentEvent {
        AgentEvent {
            pcr: self.pcr,
            kind: self.part.kind(),
            digest: hex::encode(self.digest),
            record: None,
            description: self.description.clone(),
        }
    }
}

mod hex_digest {
    pub fn serialize<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }
}

/// The three events for `entry`, in the order they are extended:
/// kernel, initrd (the concatenation the kernel gets; SHA-256 of nothing
/// when there is none), command line (its UTF-8 bytes, no NUL).
pub fn handoff_events(entry: &BootEntry) -> Vec<HandoffEvent> {
    let d = entry.digests();
    let origin = format!(
        "{} partition {} {}",
        entry.source.name(),
        entry.partition,
        entry.path
    );
    [
        (Part::Kernel, d.kernel, origin.clone()),
        (Part::Initrd, d.initrd, origin.clone()),
        (
            Part::Cmdline,
            d.cmdline,
            format!("{origin}: {}", entry.cmdline),
        ),
    ]
    .into_iter()
    .map(|(part, digest, what)| HandoffEvent {
        pcr: HANDOFF_PCR,
        part,
        digest,
        description: format!("{} {what}", part.tag()),
    })
    .collect()
}

/// The value of [`HANDOFF_PCR`] after the handoff's three extends, starting
/// from `initial` (all zeros on a node where nothing else extended it; the
/// server uses the value its last quote showed).
pub fn expected_pcr(digests: &EntryDigests, initial: [u8; 32]) -> [u8; 32] {
    [digests.kernel, digests.initrd, digests.cmdline]
        .iter()
        .fold(initial, extend)
}

/// PCR ← SHA-256(PCR ‖ digest), what TPM2_PCR_Extend does in one bank.
pub fn extend(pcr: [u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::entry::EntrySource;

    #[test]
    fn expected_pcr_is_three_extends_in_order() {
        let entry = BootEntry {
            source: EntrySource::Uki,
            partition: 1,
            path: "/EFI/BOOT/BOOTX64.EFI".into(),
            title: "t".into(),
            kernel: b"kernel".to_vec(),
            initrd: Vec::new(),
            cmdline: "console=ttyS0".into(),
        };
        let events = handoff_events(&entry);
        assert_eq!(events.len(), 3);
        assert!(events[2].description.ends_with(": console=ttyS0"));
        assert_eq!(
            events[1].digest,
            <[u8; 32]>::from(Sha256::digest(b"")),
            "no initrd measures the empty string"
        );
        let mut pcr = [0u8; 32];
        for e in &events {
            pcr = extend(pcr, &e.digest);
        }
        assert_eq!(pcr, expected_pcr(&entry.digests(), [0; 32]));
        assert_ne!(pcr, expected_pcr(&entry.digests(), [1; 32]));
        // As the measured log carries them, they replay to the same PCR.
        let logged: Vec<AgentEvent> = events.iter().map(HandoffEvent::agent_event).collect();
        let kinds: Vec<EventKind> = logged.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            warden_protocol::agentlog::handoff_kinds(Some(
                warden_protocol::turnover::Handoff::Kexec
            ))
        );
        assert!(logged[2].description.ends_with(": console=ttyS0"));
        let digests: Vec<[u8; 32]> = logged
            .iter()
            .map(|e| hex::decode(&e.digest).unwrap().try_into().unwrap())
            .collect();
        assert_eq!(warden_protocol::agentlog::replay(&digests), pcr);
    }
}
