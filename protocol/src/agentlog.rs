//! The agent's measured log: every step result and handoff target the agent
//! extends into [`AGENT_PCR`] during a turnover, in extend order.
//!
//! The agent sends this log with its final (`handoff`-phase) quote; the
//! server replays it to the quoted [`AGENT_PCR`] exactly as it replays the
//! firmware's log to PCRs 0–9, so a step record that was altered, reordered
//! or dropped fails the verdict. The signed report carries the same log, so
//! a tenant can recompute the PCR from inside the tenant OS.
//!
//! This module defines the shape and the replay arithmetic only; it does no
//! I/O and never trusts a record's own claims: a digest counts only after
//! [`AgentEvent::record`] hashes to it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
            EventKind::Snapshot | EventKind::Wipe | EventKind::Image | EventKind::HandoffTarget
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Snapshot => "snapshot",
            EventKind::Wipe => "wipe",
            EventKind::Image => "image",
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
}
