//! The firmware-erase interface: what a device's own controller can erase
//! (NVMe Sanitize / Format NVM, ATA SECURITY ERASE UNIT), probed once, and
//! the [`SecureErase`] trait the wipe module drives.
//!
//! This module decides which transport gets which driver; it never issues a
//! command itself (that is `nvme` and `ata`, through `ioctl`), and it never
//! picks a method for a plan (that is `wipe`).

use warden_protocol::hello::Disk;

use super::ioctl::{AdminIo, DevIo, IoError};
use super::{ata, nvme};

/// Erase methods a device's own firmware performs, strongest first in `HwCaps::methods`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HwMethod {
    NvmeSanitizeCrypto,
    NvmeSanitizeBlock,
    NvmeSanitizeOverwrite,
    NvmeFormatCrypto,
    NvmeFormatUserData,
    AtaSecurityEraseEnhanced,
    AtaSecurityErase,
}

impl HwMethod {
    /// Every method, strongest first.
    pub const ALL: [HwMethod; 7] = [
        HwMethod::NvmeSanitizeCrypto,
        HwMethod::NvmeSanitizeBlock,
        HwMethod::NvmeSanitizeOverwrite,
        HwMethod::NvmeFormatCrypto,
        HwMethod::NvmeFormatUserData,
        HwMethod::AtaSecurityEraseEnhanced,
        HwMethod::AtaSecurityErase,
    ];

    /// The stable name used in plans and reports.
    pub fn name(self) -> &'static str {
        match self {
            HwMethod::NvmeSanitizeCrypto => "nvme-sanitize-crypto",
            HwMethod::NvmeSanitizeBlock => "nvme-sanitize-block",
            HwMethod::NvmeSanitizeOverwrite => "nvme-sanitize-overwrite",
            HwMethod::NvmeFormatCrypto => "nvme-format-crypto",
            HwMethod::NvmeFormatUserData => "nvme-format-user-data",
            HwMethod::AtaSecurityEraseEnhanced => "ata-security-erase-enhanced",
            HwMethod::AtaSecurityErase => "ata-security-erase",
        }
    }

    /// The method named `name` (the inverse of [`HwMethod::name`]).
    pub fn from_name(name: &str) -> Option<HwMethod> {
        HwMethod::ALL.into_iter().find(|m| m.name() == name)
    }
}

impl std::fmt::Display for HwMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HwCaps {
    /// Supported methods, strongest first.
    pub methods: Vec<HwMethod>,
    /// Why other methods are unavailable, for the report (e.g.
    /// (NvmeSanitizeCrypto, "SANICAP=0: the controller does not support
    /// Sanitize"), (AtaSecurityErase, "drive is frozen")).
    pub unavailable: Vec<(HwMethod, String)>,
}

impl HwCaps {
    pub fn supports(&self, method: HwMethod) -> bool {
        self.methods.contains(&method)
    }

    /// Why `method` is unavailable, if it is listed as such.
    pub fn why_unavailable(&self, method: HwMethod) -> Option<&str> {
        self.unavailable
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, why)| why.as_str())
    }

    /// Records `method` as supported or, with the reason, unavailable.
    pub(crate) fn set(&mut self, method: HwMethod, supported: Result<(), String>) {
        match supported {
            Ok(()) => self.methods.push(method),
            Err(why) => self.unavailable.push((method, why)),
        }
    }

    /// Keeps `methods` in strength order whatever order they were found in.
    pub(crate) fn sort(&mut self) {
        let rank = |m: &HwMethod| HwMethod::ALL.iter().position(|x| x == m);
        self.methods.sort_by_key(rank);
        self.unavailable.sort_by_key(|(m, _)| rank(m));
    }
}

/// Why a firmware erase (or its probe) failed. Every message names the
/// device and the command.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// The device does not offer `method`.
    #[error("{device}: {method} is not available: {reason}")]
    Unsupported {
        device: String,
        method: HwMethod,
        reason: String,
    },
    /// ATA security is frozen: the firmware (BIOS) sent SECURITY FREEZE LOCK
    /// at boot. Only a power cycle or hot-plug of the drive undoes it.
    #[error("{device}: ATA security is frozen (the firmware froze it at boot; only a power cycle or hot-plug of the drive unfreezes it): refusing {method}")]
    Frozen { device: String, method: HwMethod },
    /// The drive is in a security state where erasing through it is unsafe
    /// or impossible (locked, password already set, attempt count expired).
    #[error("{device}: refusing {method}: {reason}")]
    SecurityState {
        device: String,
        method: HwMethod,
        reason: String,
    },
    /// The controller or bridge in front of the drive does not pass ATA
    /// commands through; detected before any erase command was sent.
    #[error("{device}: ATA commands are not passed through to the drive ({why}); no erase command was sent")]
    NotPassedThrough { device: String, why: String },
    /// The device answered the command with an error status.
    #[error("{device}: {command} failed: {status}")]
    CommandFailed {
        device: String,
        command: &'static str,
        status: String,
    },
    /// The kernel refused the ioctl.
    #[error("{device}: {command}: {source}")]
    Io {
        device: String,
        command: &'static str,
        #[source]
        source: IoError,
    },
    /// Data returned by the device does not make sense.
    #[error("{device}: {command} returned unusable data: {why}")]
    BadData {
        device: String,
        command: &'static str,
        why: String,
    },
    /// An erase failed and the ATA user password it set could not be
    /// removed: the drive is left locked-on-next-power-up with that password.
    #[error("{device}: {failure}; then SECURITY DISABLE PASSWORD failed too ({disable}): the drive keeps the user password \"{password}\" and will be locked after its next power cycle")]
    PasswordLeftSet {
        device: String,
        failure: String,
        disable: String,
        password: &'static str,
    },
    /// A sanitize or format did not finish within the time allowed.
    #[error("{device}: {command} did not complete within {waited_s} s")]
    Timeout {
        device: String,
        command: &'static str,
        waited_s: u64,
    },
}

pub trait SecureErase: Send {
    fn caps(&self) -> &HwCaps;
    /// Runs `method` to completion, calling `progress(fraction 0..=1)` as it polls.
    fn erase(&mut self, method: HwMethod, progress: &mut dyn FnMut(f64)) -> Result<(), HwError>;
}

/// The device's firmware erase interface, probed (Identify / IDENTIFY DEVICE), or None when the transport has none (virtio, loop).
pub fn open_secure_erase(dev: &Disk) -> Result<Option<Box<dyn SecureErase>>, HwError> {
    if transport_kind(&dev.transport).is_none() {
        return Ok(None);
    }
    let io = DevIo::open(&dev.path).map_err(|source| HwError::Io {
        device: dev.path.clone(),
        command: "open",
        source,
    })?;
    open_secure_erase_with(dev, Box::new(io))
}

/// [`open_secure_erase`] over a given pass-through, e.g. a
/// [`RecordingIo`](super::ioctl::RecordingIo) in tests.
pub fn open_secure_erase_with(
    dev: &Disk,
    io: Box<dyn AdminIo>,
) -> Result<Option<Box<dyn SecureErase>>, HwError> {
    match transport_kind(&dev.transport) {
        Some(Kind::Nvme) => Ok(Some(Box::new(nvme::NvmeDrive::probe(io)?))),
        Some(Kind::Ata) => Ok(Some(Box::new(ata::AtaDrive::probe(io)?))),
        None => Ok(None),
    }
}

enum Kind {
    Nvme,
    Ata,
}

/// Which firmware interface a transport may have. SCSI-attached disks are
/// asked too: SATA drives behind SAS HBAs appear as `scsi`, and the ATA
/// probe says (in `unavailable`) when a SCSI device does not pass ATA
/// commands through.
fn transport_kind(transport: &str) -> Option<Kind> {
    match transport {
        "nvme" => Some(Kind::Nvme),
        "ata" | "scsi" => Some(Kind::Ata),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in HwMethod::ALL {
            assert_eq!(HwMethod::from_name(m.name()), Some(m));
        }
        assert_eq!(HwMethod::NvmeFormatCrypto.name(), "nvme-format-crypto");
        assert_eq!(
            HwMethod::AtaSecurityEraseEnhanced.name(),
            "ata-security-erase-enhanced"
        );
    }

    #[test]
    fn caps_sort_by_strength() {
        let mut c = HwCaps::default();
        c.set(HwMethod::NvmeFormatUserData, Ok(()));
        c.set(HwMethod::NvmeFormatCrypto, Ok(()));
        c.set(HwMethod::NvmeSanitizeCrypto, Err("no".into()));
        c.sort();
        assert_eq!(
            c.methods,
            vec![HwMethod::NvmeFormatCrypto, HwMethod::NvmeFormatUserData]
        );
        assert_eq!(c.why_unavailable(HwMethod::NvmeSanitizeCrypto), Some("no"));
    }

    /// What the QEMU tier will see on `-device nvme`: Format NVM per
    /// OACS/FNA, Sanitize listed as unavailable with "SANICAP=0".
    #[test]
    fn qemu_nvme_through_the_public_entry() {
        use crate::disk::ioctl::{NvmeCompletion, RecordingIo, Reply};
        use crate::disk::nvme::testdata::{id_ctrl, id_ns};
        let ok = |data| Reply::Nvme {
            completion: NvmeCompletion::default(),
            data,
        };
        let io = RecordingIo::new(
            "/dev/nvme0n1",
            vec![
                Reply::NvmeId(1),
                ok(id_ctrl(0x000a, 0x00, 0)),
                ok(id_ns(0x20_0000, 0, 0, 0x09)),
            ],
        );
        let d = Disk {
            name: "nvme0n1".into(),
            path: "/dev/nvme0n1".into(),
            transport: "nvme".into(),
            ..Default::default()
        };
        let se = open_secure_erase_with(&d, Box::new(io)).unwrap().unwrap();
        assert_eq!(se.caps().methods, vec![HwMethod::NvmeFormatUserData]);
        for m in [
            HwMethod::NvmeSanitizeCrypto,
            HwMethod::NvmeSanitizeBlock,
            HwMethod::NvmeSanitizeOverwrite,
        ] {
            assert!(se.caps().why_unavailable(m).unwrap().contains("SANICAP=0"));
        }
    }

    #[test]
    fn virtio_and_loop_have_no_firmware_erase() {
        for t in ["virtio", "loop", "unknown"] {
            let d = Disk {
                transport: t.into(),
                path: "/dev/does-not-exist".into(),
                ..Default::default()
            };
            assert!(open_secure_erase(&d).unwrap().is_none(), "{t}");
        }
    }
}
