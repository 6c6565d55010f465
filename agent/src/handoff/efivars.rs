//! The reboot handoff's UEFI side: the `EFI_LOAD_OPTION` bytes of a
//! `Boot####` that starts `\EFI\BOOT\BOOTX64.EFI` from the tenant disk's ESP,
//! finding one the firmware already has, and writing variables through
//! efivarfs (behind [`EfiVars`], so tests point it at a directory).
//!
//! The `unsafe` of this module is the FS_IOC_GETFLAGS/SETFLAGS pair that
//! clears efivarfs's immutable attribute. It must never delete a variable,
//! never touch `BootOrder` (the site's boot order stays the site's: a
//! one-shot `BootNext` is all the handoff needs), and never write a
//! variable outside the EFI global-variable namespace.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use warden_protocol::efi::{parse_device_path, parse_load_option, Guid, EFI_GLOBAL_VARIABLE};

use super::gpt::Partition;
use super::HandoffError;

/// `LOAD_OPTION_ACTIVE`.
pub const LOAD_OPTION_ACTIVE: u32 = 0x0000_0001;
/// `EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS`.
pub const VAR_NV_BS_RT: u32 = 0x0000_0007;
/// The description the handoff gives its `Boot####`.
pub const DESCRIPTION: &str = "Warden tenant disk";

const MEDIA: u8 = 4;
const MEDIA_HARD_DRIVE: u8 = 1;
const MEDIA_FILE_PATH: u8 = 4;
const END: u8 = 0x7f;
const END_ENTIRE: u8 = 0xff;
/// HD node: `MBRType` 2 = GPT, `SignatureType` 2 = GUID.
const MBR_TYPE_GPT: u8 = 2;
const SIGNATURE_TYPE_GUID: u8 = 2;

/// What a `Boot####` must point at: a file on one GPT partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootTarget {
    pub partition_number: u32,
    pub start_lba: u64,
    pub size_lba: u64,
    pub partition_guid: Guid,
    /// A UEFI path, `\`-separated, e.g. `\EFI\BOOT\BOOTX64.EFI`.
    pub file: String,
}

impl BootTarget {
    /// `file` on the GPT partition `esp`.
    pub fn on(esp: &Partition, file: &str) -> BootTarget {
        BootTarget {
            partition_number: esp.number,
            start_lba: esp.first_lba,
            size_lba: esp.size_lba(),
            partition_guid: esp.unique_guid,
            file: file.to_owned(),
        }
    }

    /// The device path: HD(partition, GPT, GUID, start, size) /
    /// File(path) / End. A short-form path (no PCI prefix): firmware
    /// expands it by matching the partition GUID on every disk, so it
    /// survives the disk moving to another port.
    pub fn device_path(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Hard drive media device path: 4 + 38 bytes.
        out.extend_from_slice(&[MEDIA, MEDIA_HARD_DRIVE]);
        out.extend_from_slice(&42u16.to_le_bytes());
        out.extend_from_slice(&self.partition_number.to_le_bytes());
        out.extend_from_slice(&self.start_lba.to_le_bytes());
        out.extend_from_slice(&self.size_lba.to_le_bytes());
        out.extend_from_slice(&self.partition_guid.to_bytes());
        out.extend_from_slice(&[MBR_TYPE_GPT, SIGNATURE_TYPE_GUID]);
        // File path media device path: UTF-16LE with its NUL.
        let path = utf16_nul(&self.file);
        let len = 4 + path.len();
        out.extend_from_slice(&[MEDIA, MEDIA_FILE_PATH]);
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(&path);
        out.extend_from_slice(&[END, END_ENTIRE, 4, 0]);
        out
    }

    /// Whether the load option `data` starts this target: an active option
    /// whose device path has an HD node with this partition GUID and a
    /// file node with this path (case-insensitive, as FAT is), whatever
    /// other nodes precede them.
    pub fn matches(&self, data: &[u8]) -> bool {
        let Ok(option) = parse_load_option(data) else {
            return false;
        };
        if !option.is_active() {
            return false;
        }
        let Ok(nodes) = parse_device_path(&option.file_path_list) else {
            return false;
        };
        let guid = self.partition_guid.to_bytes();
        let on_partition = nodes.iter().any(|n| {
            n.node_type == MEDIA
                && n.sub_type == MEDIA_HARD_DRIVE
                && n.data.get(20..36) == Some(&guid[..])
        });
        let file = nodes
            .iter()
            .filter(|n| n.node_type == MEDIA && n.sub_type == MEDIA_FILE_PATH)
            .map(|n| warden_protocol::efi::utf16_lossy(&n.data))
            .collect::<String>();
        on_partition && file.eq_ignore_ascii_case(&self.file)
    }
}

/// The `EFI_LOAD_OPTION` value of a `Boot####` variable: attributes,
/// FilePathListLength, the UTF-16 description with its NUL, the device
/// path; no optional data.
pub fn load_option(description: &str, target: &BootTarget) -> Vec<u8> {
    let path = target.device_path();
    let mut out = Vec::new();
    out.extend_from_slice(&LOAD_OPTION_ACTIVE.to_le_bytes());
    out.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(&utf16_nul(description));
    out.extend_from_slice(&path);
    out
}

fn utf16_nul(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// UEFI global variables, by name (`Boot0003`, `BootNext`).
pub trait EfiVars {
    /// Names of the `EFI_GLOBAL_VARIABLE` variables that exist.
    fn names(&self) -> Result<Vec<String>, HandoffError>;
    /// A variable's attributes and value; `Ok(None)` if it does not exist.
    fn read(&self, name: &str) -> Result<Option<(u32, Vec<u8>)>, HandoffError>;
    /// Creates or replaces a variable.
    fn write(&mut self, name: &str, attributes: u32, value: &[u8]) -> Result<(), HandoffError>;
}

/// efivarfs, mounted at `root` (`/sys/firmware/efi/efivars` on a node; a
/// plain directory in tests).
#[derive(Debug)]
pub struct Efivarfs {
    root: PathBuf,
}

/// efivarfs's `statfs` magic.
const EFIVARFS_MAGIC: u64 = 0xde5e_81e4;
/// `FS_IMMUTABLE_FL` from linux/fs.h.
const FS_IMMUTABLE_FL: libc::c_int = 0x0000_0010;

impl Efivarfs {
    pub fn new(root: impl Into<PathBuf>) -> Efivarfs {
        Efivarfs { root: root.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}-{EFI_GLOBAL_VARIABLE}"))
    }

    fn is_efivarfs(&self) -> bool {
        nix::sys::statfs::statfs(&self.root)
            .map(|s| s.filesystem_type().0 as u64 == EFIVARFS_MAGIC)
            .unwrap_or(false)
    }
}

fn var_error(path: &Path, reason: impl std::fmt::Display) -> HandoffError {
    HandoffError::EfiVar {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl EfiVars for Efivarfs {
    fn names(&self) -> Result<Vec<String>, HandoffError> {
        let suffix = format!("-{EFI_GLOBAL_VARIABLE}");
        let dir = std::fs::read_dir(&self.root).map_err(|e| var_error(&self.root, e))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| var_error(&self.root, e))?;
            if let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(&suffix))
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> Result<Option<(u32, Vec<u8>)>, HandoffError> {
        let path = self.path(name);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(var_error(&path, e)),
        };
        let mut bytes = Vec::new();
        // Load options are small; 64 KiB is far beyond any real one.
        (&mut file)
            .take(64 * 1024)
            .read_to_end(&mut bytes)
            .map_err(|e| var_error(&path, e))?;
        if bytes.len() < 4 {
            return Err(var_error(&path, "shorter than its 4-byte attribute prefix"));
        }
        let (attrs, value) = bytes.split_at(4);
        let attrs = u32::from_le_bytes([attrs[0], attrs[1], attrs[2], attrs[3]]);
        Ok(Some((attrs, value.to_vec())))
    }

    fn write(&mut self, name: &str, attributes: u32, value: &[u8]) -> Result<(), HandoffError> {
        let path = self.path(name);
        let efivarfs = self.is_efivarfs();
        if path.exists() {
            clear_immutable(&path)?;
        }
        // efivarfs replaces the whole variable with each write(2) and takes
        // no truncation; a plain directory (tests) needs O_TRUNC to mean the same.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(!efivarfs)
            .open(&path)
            .map_err(|e| var_error(&path, e))?;
        let mut buf = Vec::with_capacity(4 + value.len());
        buf.extend_from_slice(&attributes.to_le_bytes());
        buf.extend_from_slice(value);
        // One write(2): efivarfs takes attributes and value in one call.
        let n = file.write(&buf).map_err(|e| var_error(&path, e))?;
        if n != buf.len() {
            return Err(var_error(
                &path,
                format!("short write: {n} of {} bytes", buf.len()),
            ));
        }
        tracing::info!(variable = name, path = %path.display(), bytes = value.len(), "EFI variable written");
        Ok(())
    }
}

/// Clears `FS_IMMUTABLE_FL`, which efivarfs sets on variables it was not
/// told are safe to change. A filesystem without inode flags (a test's
/// directory on some filesystems) has nothing to clear.
fn clear_immutable(path: &Path) -> Result<(), HandoffError> {
    let file = File::open(path).map_err(|e| var_error(path, e))?;
    let fd = file.as_raw_fd();
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel's flags word,
    // despite the `long` in the ioctl's encoding) to `flags`, which lives
    // for the call; `fd` is open until `file` drops after this function.
    let rc = unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc != 0 {
        let errno = nix::errno::Errno::last();
        if matches!(
            errno,
            nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL
        ) {
            return Ok(());
        }
        return Err(var_error(path, format!("FS_IOC_GETFLAGS: {errno}")));
    }
    if flags & FS_IMMUTABLE_FL == 0 {
        return Ok(());
    }
    flags &= !FS_IMMUTABLE_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one int from `flags`, alive for the
    // call; `fd` is open as above.
    let rc = unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) };
    if rc != 0 {
        return Err(var_error(
            path,
            format!(
                "FS_IOC_SETFLAGS (clearing immutable): {}",
                nix::errno::Errno::last()
            ),
        ));
    }
    tracing::debug!(path = %path.display(), "immutable attribute cleared");
    Ok(())
}

/// Makes sure a `Boot####` starts `target`: an existing active one that
/// does is reused, else one is written at the lowest free number. Returns
/// the number.
pub fn ensure_boot_option(
    vars: &mut dyn EfiVars,
    target: &BootTarget,
) -> Result<u16, HandoffError> {
    let names = vars.names()?;
    let mut used = Vec::new();
    for name in &names {
        let Some(number) = boot_number(name) else {
            continue;
        };
        used.push(number);
        if let Some((_, value)) = vars.read(name)? {
            if target.matches(&value) {
                tracing::info!(option = %name, "firmware already has a boot option for the tenant disk");
                return Ok(number);
            }
        }
    }
    let free = (0..=u16::MAX)
        .find(|n| !used.contains(n))
        .ok_or(HandoffError::NoFreeBootOption)?;
    let name = format!("Boot{free:04X}");
    vars.write(&name, VAR_NV_BS_RT, &load_option(DESCRIPTION, target))?;
    tracing::info!(option = %name, file = %target.file, partition = target.partition_number, "boot option written for the tenant disk");
    Ok(free)
}

/// Sets `BootNext` to `number` (a one-shot: the next boot only).
pub fn set_boot_next(vars: &mut dyn EfiVars, number: u16) -> Result<(), HandoffError> {
    vars.write("BootNext", VAR_NV_BS_RT, &number.to_le_bytes())
}

/// `Boot0003` → 3; `BootNext`, `BootOrder`, `Boot00a1` (lowercase) → None.
fn boot_number(name: &str) -> Option<u16> {
    let hex = name.strip_prefix("Boot")?;
    if hex.len() != 4
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u16::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_numbers() {
        assert_eq!(boot_number("Boot0003"), Some(3));
        assert_eq!(boot_number("Boot00A1"), Some(0xa1));
        assert_eq!(boot_number("BootNext"), None);
        assert_eq!(boot_number("BootOrder"), None);
        assert_eq!(boot_number("Boot00a1"), None);
    }
}
