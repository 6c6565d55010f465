//! Hands the node to the tenant OS: finds the tenant's boot entry on the
//! disk the image step wrote (`gpt`, `window`, `entry`, `bls`, `uki`), then
//! either measures it into [`HANDOFF_PCR`] and kexecs it (`measure`,
//! `kexec`), or points the firmware at the disk and reboots (`efivars`), or
//! just reboots or powers off for sites that set the boot order through the
//! BMC. docs/handoff.md describes the whole.
//!
//! Everything passes one [`guard`]: no handoff without every plan step
//! succeeded and the last verdict OK, and the [`Cleared`] token it returns is
//! the only way to call [`kexec_handoff`] or [`reboot_handoff`]. This module
//! must never start a kernel it did not measure first, never fall back to
//! another entry when the chosen one is broken, and never write to the
//! tenant's disk but for the lease record (`lease`); its privileged effects (kexec, reboot, EFI variables, TPM
//! extends) sit behind traits with real implementations and test recorders.

pub mod bls;
pub mod efivars;
pub mod entry;
pub mod gpt;
pub mod kexec;
pub mod lease;
pub mod measure;
pub mod uki;
pub mod window;

use std::path::PathBuf;
use std::str::FromStr;

pub use efivars::{ensure_boot_option, load_option, set_boot_next, BootTarget, EfiVars, Efivarfs};
pub use entry::{
    find_boot_entry, read_esp_file, BootEntry, BootEntryError, EntryDigests, EntrySource,
    REMOVABLE_PATH_X64,
};
pub use gpt::{read_gpt, Gpt, GptError, HeaderCopy, Partition};
pub use kexec::{Kexec, LinuxKexec};
pub use measure::{expected_pcr, handoff_events, HandoffEvent, Measurer, Part, HANDOFF_PCR};

use crate::tpm::TpmError;

/// Why a handoff did not happen. The node stays in the ramdisk for every
/// one of them.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff refused: {reason}")]
    Refused { reason: String },
    #[error(transparent)]
    Entry(#[from] BootEntryError),
    #[error("measuring the tenant {part:?} into PCR {pcr} failed: {source}")]
    Measure {
        pcr: u32,
        part: Part,
        #[source]
        source: TpmError,
    },
    #[error("kexec: {step} failed: {reason}")]
    Kexec { step: &'static str, reason: String },
    #[error("EFI variable {path}: {reason}")]
    EfiVar { path: PathBuf, reason: String },
    #[error("every Boot#### number 0000–FFFF is in use; no boot option can be added")]
    NoFreeBootOption,
    #[error("{mode}: {reason}")]
    Power { mode: &'static str, reason: String },
}

/// How one plan step ended, as the guard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutcome {
    pub name: String,
    pub ok: bool,
}

/// What the plan did before the handoff: its steps, and the verdict of the
/// last attestation (`None`: there was none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanOutcome {
    pub steps: Vec<StepOutcome>,
    pub last_verdict_ok: Option<bool>,
}

/// Proof that [`guard`] allowed the handoff; nothing else can make one.
#[derive(Debug)]
pub struct Cleared {
    _private: (),
}

/// Allows the handoff only if every step of the plan succeeded and the last
/// verdict is OK. The refusal names the failed steps or the verdict.
pub fn guard(plan: &PlanOutcome) -> Result<Cleared, HandoffError> {
    let failed: Vec<&str> = plan
        .steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.name.as_str())
        .collect();
    let mut reasons = Vec::new();
    if !failed.is_empty() {
        reasons.push(format!("plan steps failed: {}", failed.join(", ")));
    }
    match plan.last_verdict_ok {
        Some(true) => {}
        Some(false) => reasons.push("the last attestation verdict is not OK".to_owned()),
        None => reasons.push("there is no attestation verdict".to_owned()),
    }
    if reasons.is_empty() {
        Ok(Cleared { _private: () })
    } else {
        let reason = reasons.join("; ");
        tracing::warn!(reason = %reason, "handoff refused");
        Err(HandoffError::Refused { reason })
    }
}

/// The kexec handoff: load → measure → sync → exec. The events are the
/// measured log's record of the three extends (the caller records them
/// before calling this if the log must reach the server). A failed measure
/// unloads the image, so nothing unmeasured stays armed. With the real
/// [`LinuxKexec`] this returns only on failure.
pub fn kexec_handoff(
    cleared: &Cleared,
    entry: &BootEntry,
    measurer: &mut dyn Measurer,
    kexec: &mut dyn Kexec,
) -> Result<Vec<HandoffEvent>, HandoffError> {
    kexec_preload(entry, kexec)?;
    kexec_handoff_preloaded(cleared, entry, measurer, kexec)
}

/// Stages `entry` in the kernel ahead of the handoff, so that the load (the
/// kernel checks the image's signature and hashes every segment: a second
/// in an emulated node) runs while the final attestation does. Loading
/// executes nothing: only [`kexec_handoff_preloaded`], which needs
/// [`Cleared`], starts the image, and a caller whose handoff is refused
/// unloads it ([`Kexec::unload`]).
pub fn kexec_preload(entry: &BootEntry, kexec: &mut dyn Kexec) -> Result<(), HandoffError> {
    kexec.load(&entry.kernel, &entry.initrd, &entry.cmdline)
}

/// [`kexec_handoff`] for an `entry` that [`kexec_preload`] staged already:
/// measure → sync → exec.
pub fn kexec_handoff_preloaded(
    _cleared: &Cleared,
    entry: &BootEntry,
    measurer: &mut dyn Measurer,
    kexec: &mut dyn Kexec,
) -> Result<Vec<HandoffEvent>, HandoffError> {
    let events = handoff_events(entry);
    for event in &events {
        if let Err(source) = measurer.extend_sha256(event.pcr, &event.digest) {
            if let Err(e) = kexec.unload() {
                tracing::error!(error = %e, "could not unload the kexec image after a failed measurement");
            }
            return Err(HandoffError::Measure {
                pcr: event.pcr,
                part: event.part,
                source,
            });
        }
        tracing::info!(pcr = event.pcr, digest = %hex::encode(event.digest), event = %event.description, "handoff measured");
    }
    kexec.sync();
    kexec.exec()?;
    Ok(events)
}

/// How a reboot handoff leaves the ramdisk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootMode {
    /// `BootNext` → the tenant disk's `\EFI\BOOT\BOOTX64.EFI`, then reboot.
    RebootToDisk,
    /// Reboot; the boot order (set through the BMC) decides.
    Reboot,
    /// Power off; someone else powers the node on.
    Poweroff,
}

impl RebootMode {
    pub fn name(self) -> &'static str {
        match self {
            RebootMode::RebootToDisk => "reboot-to-disk",
            RebootMode::Reboot => "reboot",
            RebootMode::Poweroff => "poweroff",
        }
    }
}

impl FromStr for RebootMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reboot-to-disk" => Ok(RebootMode::RebootToDisk),
            "reboot" => Ok(RebootMode::Reboot),
            "poweroff" => Ok(RebootMode::Poweroff),
            other => Err(format!(
                "unknown handoff mode {other:?} (reboot-to-disk, reboot or poweroff)"
            )),
        }
    }
}

/// Rebooting and powering off.
pub trait Power {
    fn sync(&mut self);
    /// Reboots. The real one does not return when it works.
    fn reboot(&mut self) -> Result<(), HandoffError>;
    /// Powers off. The real one does not return when it works.
    fn poweroff(&mut self) -> Result<(), HandoffError>;
}

/// The running Linux kernel's reboot(2).
#[derive(Debug, Default)]
pub struct LinuxPower;

impl Power for LinuxPower {
    fn sync(&mut self) {
        nix::unistd::sync();
    }

    fn reboot(&mut self) -> Result<(), HandoffError> {
        power(nix::sys::reboot::RebootMode::RB_AUTOBOOT, "reboot")
    }

    fn poweroff(&mut self) -> Result<(), HandoffError> {
        power(nix::sys::reboot::RebootMode::RB_POWER_OFF, "poweroff")
    }
}

fn power(how: nix::sys::reboot::RebootMode, mode: &'static str) -> Result<(), HandoffError> {
    let err = match nix::sys::reboot::reboot(how) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    Err(HandoffError::Power {
        mode,
        reason: format!("reboot(2): {err}"),
    })
}

/// The reboot handoff. `RebootToDisk` needs `target` (the tenant ESP's
/// `\EFI\BOOT\BOOTX64.EFI`, see [`BootTarget::on`]): it makes sure a
/// `Boot####` starts it, sets `BootNext` to that option, syncs and reboots.
/// Returns the option number set in `BootNext`, if any (the real [`Power`]
/// returns only on failure).
pub fn reboot_handoff(
    cleared: &Cleared,
    mode: RebootMode,
    target: Option<&BootTarget>,
    vars: &mut dyn EfiVars,
    power: &mut dyn Power,
) -> Result<Option<u16>, HandoffError> {
    let boot_next = prepare_reboot(cleared, mode, target, vars)?;
    leave(cleared, mode, power)?;
    Ok(boot_next)
}

/// The firmware side of a reboot handoff, without leaving: for
/// `RebootToDisk`, makes sure a `Boot####` starts `target` and sets
/// `BootNext` to it, returning the number (so the caller can report it
/// before [`leave`]); the other modes need no variables and return `None`.
pub fn prepare_reboot(
    _cleared: &Cleared,
    mode: RebootMode,
    target: Option<&BootTarget>,
    vars: &mut dyn EfiVars,
) -> Result<Option<u16>, HandoffError> {
    if mode != RebootMode::RebootToDisk {
        return Ok(None);
    }
    let target = target.ok_or_else(|| HandoffError::Refused {
        reason: "reboot-to-disk needs the tenant disk's ESP, and none was given".to_owned(),
    })?;
    let number = ensure_boot_option(vars, target)?;
    set_boot_next(vars, number)?;
    tracing::info!(
        boot_next = format_args!("Boot{number:04X}"),
        "BootNext set to the tenant disk"
    );
    Ok(Some(number))
}

/// Syncs, then reboots (`RebootToDisk`, `Reboot`) or powers off. The real
/// [`Power`] returns only on failure.
pub fn leave(
    _cleared: &Cleared,
    mode: RebootMode,
    power: &mut dyn Power,
) -> Result<(), HandoffError> {
    power.sync();
    tracing::info!(mode = mode.name(), "handing off");
    match mode {
        RebootMode::RebootToDisk | RebootMode::Reboot => power.reboot()?,
        RebootMode::Poweroff => power.poweroff()?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, ok: bool) -> StepOutcome {
        StepOutcome {
            name: name.into(),
            ok,
        }
    }

    #[test]
    fn guard_needs_every_step_and_an_ok_verdict() {
        let good = PlanOutcome {
            steps: vec![step("wipe", true), step("image", true)],
            last_verdict_ok: Some(true),
        };
        assert!(guard(&good).is_ok());
        let failed = PlanOutcome {
            steps: vec![step("wipe", true), step("image", false)],
            last_verdict_ok: Some(true),
        };
        let err = guard(&failed).unwrap_err().to_string();
        assert!(err.contains("image") && !err.contains("wipe"), "{err}");
        let bad_verdict = PlanOutcome {
            last_verdict_ok: Some(false),
            ..good.clone()
        };
        assert!(guard(&bad_verdict)
            .unwrap_err()
            .to_string()
            .contains("verdict"));
        let no_verdict = PlanOutcome {
            last_verdict_ok: None,
            ..good
        };
        assert!(guard(&no_verdict)
            .unwrap_err()
            .to_string()
            .contains("no attestation"));
    }

    #[derive(Default)]
    struct MemVars(std::collections::BTreeMap<String, (u32, Vec<u8>)>);

    impl EfiVars for MemVars {
        fn names(&self) -> Result<Vec<String>, HandoffError> {
            Ok(self.0.keys().cloned().collect())
        }
        fn read(&self, name: &str) -> Result<Option<(u32, Vec<u8>)>, HandoffError> {
            Ok(self.0.get(name).cloned())
        }
        fn write(&mut self, name: &str, attrs: u32, value: &[u8]) -> Result<(), HandoffError> {
            self.0.insert(name.to_owned(), (attrs, value.to_vec()));
            Ok(())
        }
    }

    #[derive(Default)]
    struct Calls(Vec<&'static str>);

    impl Power for Calls {
        fn sync(&mut self) {
            self.0.push("sync");
        }
        fn reboot(&mut self) -> Result<(), HandoffError> {
            self.0.push("reboot");
            Ok(())
        }
        fn poweroff(&mut self) -> Result<(), HandoffError> {
            self.0.push("poweroff");
            Ok(())
        }
    }

    /// The split the workflow uses to report `BootNext` before leaving:
    /// variables first, nothing left until `leave`.
    #[test]
    fn prepare_sets_boot_next_and_leave_reboots() {
        let ok = guard(&PlanOutcome {
            steps: vec![step("image", true)],
            last_verdict_ok: Some(true),
        })
        .unwrap();
        let target = BootTarget {
            partition_number: 1,
            start_lba: 2048,
            size_lba: 122_880,
            partition_guid: warden_protocol::efi::Guid::from_bytes([7; 16]),
            file: REMOVABLE_PATH_X64.to_owned(),
        };
        let mut vars = MemVars::default();
        vars.write(
            "Boot0000",
            7,
            &load_option(
                "PXE",
                &BootTarget {
                    partition_guid: warden_protocol::efi::Guid::from_bytes([1; 16]),
                    ..target.clone()
                },
            ),
        )
        .unwrap();
        let n = prepare_reboot(&ok, RebootMode::RebootToDisk, Some(&target), &mut vars).unwrap();
        assert_eq!(n, Some(1));
        assert_eq!(vars.read("BootNext").unwrap(), Some((7, vec![1, 0])));
        assert!(target.matches(&vars.read("Boot0001").unwrap().unwrap().1));
        assert_eq!(vars.read("BootOrder").unwrap(), None, "BootOrder untouched");
        let mut power = Calls::default();
        leave(&ok, RebootMode::RebootToDisk, &mut power).unwrap();
        assert_eq!(power.0, ["sync", "reboot"]);

        let mut untouched = MemVars::default();
        assert_eq!(
            prepare_reboot(&ok, RebootMode::Poweroff, None, &mut untouched).unwrap(),
            None
        );
        assert!(untouched.0.is_empty());
        assert!(prepare_reboot(&ok, RebootMode::RebootToDisk, None, &mut untouched).is_err());
    }

    #[test]
    fn modes_parse() {
        for m in [
            RebootMode::RebootToDisk,
            RebootMode::Reboot,
            RebootMode::Poweroff,
        ] {
            assert_eq!(m.name().parse::<RebootMode>().unwrap(), m);
        }
        assert!("kexec".parse::<RebootMode>().is_err());
    }
}
