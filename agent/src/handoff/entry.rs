//! Finds the tenant's boot entry on a freshly written disk without mounting
//! anything: the GPT, then the ESP through `fatfs` (Boot Loader Specification
//! type #1 entries first), then ext4 `/boot` partitions through `ext4-view`
//! (a second source of type #1 entries), then unified kernel images on the
//! ESP (`/EFI/Linux/*.efi`, then `\EFI\BOOT\BOOTX64.EFI`), taken apart.
//!
//! It only reads, through [`PartitionWindow`]s that refuse writes. It must
//! never fall back to a different entry when the chosen one is broken: the
//! default entry of the tenant's disk is what the tenant asked for, and if it
//! cannot be read the answer is an error naming the file, not another kernel.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::digest::Sha256;

use super::bls::{self, BlsEntry};
use super::gpt::{self, Gpt, GptError, Partition};
use super::uki;
use super::window::PartitionWindow;

/// The largest kernel, initrd or UKI read into RAM (the agent runs from RAM).
pub const MAX_BOOT_FILE: u64 = 1 << 30;
/// The largest BLS entry file read.
const MAX_ENTRY_FILE: u64 = 64 * 1024;
/// The most entry files looked at in one directory.
const MAX_ENTRIES: usize = 1024;

/// Where a boot entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntrySource {
    /// A type #1 entry in the ESP's `/loader/entries`.
    EspBls,
    /// A type #1 entry on an ext4 partition (XBOOTLDR or Linux filesystem).
    Ext4Bls,
    /// A unified kernel image on the ESP, taken apart.
    Uki,
}

impl EntrySource {
    pub fn name(self) -> &'static str {
        match self {
            EntrySource::EspBls => "esp-bls",
            EntrySource::Ext4Bls => "ext4-bls",
            EntrySource::Uki => "uki",
        }
    }
}

/// What kexec starts: the tenant's kernel, initrd and command line.
#[derive(Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub source: EntrySource,
    /// GPT partition number the entry was found on.
    pub partition: u32,
    /// The entry file (`/loader/entries/x.conf`) or the UKI's path.
    pub path: String,
    /// The entry's title (its id, or the UKI's path, when it has none).
    pub title: String,
    pub kernel: Vec<u8>,
    /// All initrds, concatenated in the entry's order (empty when none).
    pub initrd: Vec<u8>,
    pub cmdline: String,
}

impl std::fmt::Debug for BootEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootEntry")
            .field("source", &self.source)
            .field("partition", &self.partition)
            .field("path", &self.path)
            .field("title", &self.title)
            .field("kernel_bytes", &self.kernel.len())
            .field("initrd_bytes", &self.initrd.len())
            .field("cmdline", &self.cmdline)
            .finish()
    }
}

/// SHA-256 of each part of a [`BootEntry`], as the handoff measures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryDigests {
    pub kernel: [u8; 32],
    pub initrd: [u8; 32],
    /// Of the command line's UTF-8 bytes, without a NUL.
    pub cmdline: [u8; 32],
}

impl BootEntry {
    pub fn digests(&self) -> EntryDigests {
        EntryDigests {
            kernel: Sha256::digest(&self.kernel),
            initrd: Sha256::digest(&self.initrd),
            cmdline: Sha256::digest(self.cmdline.as_bytes()),
        }
    }
}

/// Why no boot entry was found. Every variant names the disk and, where
/// there is one, the partition and path.
#[derive(Debug, thiserror::Error)]
pub enum BootEntryError {
    #[error("cannot open {device}: {source}")]
    Open {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error("{device} has no EFI System Partition and no ext4 partition with boot entries")]
    NoEsp { device: String },
    #[error("{device} partition {partition}: cannot read the {fs} filesystem: {reason}")]
    Filesystem {
        device: String,
        partition: u32,
        fs: &'static str,
        reason: String,
    },
    #[error("{device} partition {partition}: {path}: {reason}")]
    File {
        device: String,
        partition: u32,
        path: String,
        reason: String,
    },
    #[error("{device} partition {partition}: boot entry {entry} names {path}, which cannot be read: {reason}")]
    EntryFile {
        device: String,
        partition: u32,
        entry: String,
        path: String,
        reason: String,
    },
    #[error(
        "{device} partition {partition}: {path} is not a usable unified kernel image: {reason}"
    )]
    Uki {
        device: String,
        partition: u32,
        path: String,
        reason: String,
    },
    #[error("{device} has no boot entry: {looked}")]
    NoEntry { device: String, looked: String },
}

/// Read access to one filesystem, by absolute path, whatever it is.
trait BootFs {
    const KIND: &'static str;
    /// File names in directory `dir` (no `.`/`..`); `Ok(None)` if `dir` is absent.
    fn list(&mut self, dir: &str) -> Result<Option<Vec<String>>, String>;
    /// The file at `path`, at most `limit` bytes; `Ok(None)` if absent.
    fn read(&mut self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, String>;
}

/// The ESP's FAT, read with `fatfs`.
struct Fat {
    fs: fatfs::FileSystem<PartitionWindow<File>>,
}

impl Fat {
    /// FAT paths in BLS entries use `/` (and UEFI paths `\`); `fatfs` wants
    /// `/`-separated components without a leading one.
    fn components(path: &str) -> String {
        path.replace('\\', "/").trim_start_matches('/').to_owned()
    }
}

impl BootFs for Fat {
    const KIND: &'static str = "FAT";

    fn list(&mut self, dir: &str) -> Result<Option<Vec<String>>, String> {
        let root = self.fs.root_dir();
        let rel = Self::components(dir);
        let dir = if rel.is_empty() {
            root
        } else {
            match root.open_dir(&rel) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.to_string()),
            }
        };
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name();
            if entry.is_file() && name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(Some(names))
    }

    fn read(&mut self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, String> {
        let rel = Self::components(path);
        let file = match self.fs.root_dir().open_file(&rel) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        read_limited(file, limit).map(Some)
    }
}

/// An ext4 filesystem, read with `ext4-view`.
struct Ext4 {
    fs: ext4_view::Ext4,
}

impl BootFs for Ext4 {
    const KIND: &'static str = "ext4";

    fn list(&mut self, dir: &str) -> Result<Option<Vec<String>>, String> {
        let entries = match self.fs.read_dir(dir) {
            Ok(r) => r,
            Err(ext4_view::Ext4Error::NotFound) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| e.to_string())?;
            let is_file = entry
                .file_type()
                .map(|t| t.is_regular_file())
                .unwrap_or(false);
            if is_file {
                if let Ok(name) = entry.file_name().as_str() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(Some(names))
    }

    fn read(&mut self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, String> {
        match self.fs.metadata(path) {
            Ok(m) if m.len() > limit => {
                return Err(format!(
                    "{} bytes is more than the {limit} allowed",
                    m.len()
                ))
            }
            Ok(_) => {}
            Err(ext4_view::Ext4Error::NotFound) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        match self.fs.read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(ext4_view::Ext4Error::NotFound) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn read_limited(file: impl Read, limit: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than the {limit} bytes allowed"));
    }
    Ok(bytes)
}

/// Finds the boot entry on `device` (a block device or an image file) whose
/// logical sectors are `sector_size` bytes. See the module doc for the order.
pub fn find_boot_entry(device: &Path, sector_size: u32) -> Result<BootEntry, BootEntryError> {
    let name = device.display().to_string();
    let open = || {
        File::open(device).map_err(|source| BootEntryError::Open {
            device: name.clone(),
            source,
        })
    };
    let mut disk = open()?;
    let table = gpt::read_gpt(&mut disk, &name, sector_size)?;
    find_in_table(&table, open)
}

/// The ESP file at `path` (e.g. `\EFI\BOOT\BOOTX64.EFI`) on `device`, at
/// most `limit` bytes, with the ESP's partition number: what a
/// reboot-to-disk handoff measures before pointing `BootNext` at it.
pub fn read_esp_file(
    device: &Path,
    sector_size: u32,
    path: &str,
    limit: u64,
) -> Result<(u32, Vec<u8>), BootEntryError> {
    let name = device.display().to_string();
    let open = || {
        File::open(device).map_err(|source| BootEntryError::Open {
            device: name.clone(),
            source,
        })
    };
    let table = gpt::read_gpt(&mut open()?, &name, sector_size)?;
    let esp = table.esp().ok_or_else(|| BootEntryError::NoEsp {
        device: name.clone(),
    })?;
    let fs = fatfs::FileSystem::new(
        PartitionWindow::new(open()?, esp.offset, esp.len),
        fatfs::FsOptions::new(),
    )
    .map_err(|e| BootEntryError::Filesystem {
        device: name.clone(),
        partition: esp.number,
        fs: Fat::KIND,
        reason: e.to_string(),
    })?;
    let file_error = |reason: String| BootEntryError::File {
        device: name.clone(),
        partition: esp.number,
        path: path.to_owned(),
        reason,
    };
    let bytes = Fat { fs }
        .read(path, limit)
        .map_err(file_error)?
        .ok_or_else(|| file_error("no such file".into()))?;
    Ok((esp.number, bytes))
}

fn find_in_table(
    table: &Gpt,
    open: impl Fn() -> Result<File, BootEntryError>,
) -> Result<BootEntry, BootEntryError> {
    let device = table.device.clone();
    let window = |p: &Partition| -> Result<PartitionWindow<File>, BootEntryError> {
        Ok(PartitionWindow::new(open()?, p.offset, p.len))
    };
    let mut looked = Vec::new();

    let mut esp_fs = None;
    if let Some(esp) = table.esp() {
        let fs = fatfs::FileSystem::new(window(esp)?, fatfs::FsOptions::new()).map_err(|e| {
            BootEntryError::Filesystem {
                device: device.clone(),
                partition: esp.number,
                fs: Fat::KIND,
                reason: e.to_string(),
            }
        })?;
        let mut fat = Fat { fs };
        if let Some(entry) = bls_entry(&mut fat, &device, esp, "/loader/entries", "", &mut looked)?
        {
            return Ok(entry);
        }
        esp_fs = Some((esp, fat));
    } else {
        looked.push("no EFI System Partition".to_owned());
    }

    for part in table.linux_boot_candidates() {
        let fs = match ext4_view::Ext4::load(Box::new(window(part)?)) {
            Ok(fs) => fs,
            Err(e) => {
                // A Linux partition need not be ext4 (xfs, btrfs, swap…):
                // not ours to read, not an error.
                tracing::debug!(disk = %device, partition = part.number, error = %e, "not an ext4 filesystem; skipped");
                looked.push(format!("partition {} is not ext4", part.number));
                continue;
            }
        };
        let mut ext4 = Ext4 { fs };
        for (dir, prefix) in [("/loader/entries", ""), ("/boot/loader/entries", "/boot")] {
            if let Some(entry) = bls_entry(&mut ext4, &device, part, dir, prefix, &mut looked)? {
                return Ok(BootEntry {
                    source: EntrySource::Ext4Bls,
                    ..entry
                });
            }
        }
    }

    let Some((esp, mut fat)) = esp_fs else {
        return Err(BootEntryError::NoEsp { device });
    };
    if let Some(entry) = uki_entry(&mut fat, &device, esp, &mut looked)? {
        return Ok(entry);
    }
    Err(BootEntryError::NoEntry {
        device,
        looked: looked.join("; "),
    })
}

/// The default type #1 entry in `dir`, read in full. Paths in the entry
/// are tried under `prefix` first (a root filesystem's `/boot`), then as
/// written.
fn bls_entry<F: BootFs>(
    fs: &mut F,
    device: &str,
    part: &Partition,
    dir: &str,
    prefix: &str,
    looked: &mut Vec<String>,
) -> Result<Option<BootEntry>, BootEntryError> {
    let fs_error = |reason: String| BootEntryError::Filesystem {
        device: device.to_owned(),
        partition: part.number,
        fs: F::KIND,
        reason,
    };
    let Some(mut names) = fs.list(dir).map_err(&fs_error)? else {
        looked.push(format!("no {dir} on partition {}", part.number));
        return Ok(None);
    };
    names.retain(|n| {
        n.len() > 5
            && n.get(n.len() - 5..)
                .is_some_and(|ext| ext.eq_ignore_ascii_case(".conf"))
    });
    names.sort();
    names.truncate(MAX_ENTRIES);
    let mut entries: Vec<(String, BlsEntry)> = Vec::new();
    for name in names {
        let path = format!("{dir}/{name}");
        let bytes = fs
            .read(&path, MAX_ENTRY_FILE)
            .map_err(|reason| BootEntryError::File {
                device: device.to_owned(),
                partition: part.number,
                path: path.clone(),
                reason,
            })?
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let id = name.get(..name.len() - 5).unwrap_or(&name);
        let entry = bls::parse_entry(id, &text);
        if let Some(why) = entry.unusable() {
            tracing::info!(disk = device, partition = part.number, entry = %path, why = %why, "boot entry skipped");
            looked.push(format!("{path} skipped: {why}"));
            continue;
        }
        entries.push((path, entry));
    }
    entries.sort_by(|a, b| bls::menu_order(&a.1, &b.1));
    let Some((path, chosen)) = entries.into_iter().next() else {
        looked.push(format!(
            "no usable entry in {dir} on partition {}",
            part.number
        ));
        return Ok(None);
    };
    tracing::info!(disk = device, partition = part.number, entry = %path, "boot entry chosen");

    let mut load = |file: &str| -> Result<Vec<u8>, BootEntryError> {
        let missing = |reason: String| BootEntryError::EntryFile {
            device: device.to_owned(),
            partition: part.number,
            entry: path.clone(),
            path: file.to_owned(),
            reason,
        };
        let file_abs = if file.starts_with('/') {
            file.to_owned()
        } else {
            format!("/{file}")
        };
        if !prefix.is_empty() {
            if let Some(bytes) = fs
                .read(&format!("{prefix}{file_abs}"), MAX_BOOT_FILE)
                .map_err(&missing)?
            {
                return Ok(bytes);
            }
        }
        fs.read(&file_abs, MAX_BOOT_FILE)
            .map_err(&missing)?
            .ok_or_else(|| missing("no such file".to_owned()))
    };
    // unusable() is None, so `linux` is there.
    let kernel_path = chosen.linux.clone().unwrap_or_default();
    let kernel = load(&kernel_path)?;
    if kernel.is_empty() {
        return Err(BootEntryError::EntryFile {
            device: device.to_owned(),
            partition: part.number,
            entry: path,
            path: kernel_path,
            reason: "the kernel is empty".to_owned(),
        });
    }
    let mut initrd = Vec::new();
    for file in &chosen.initrd {
        initrd.extend_from_slice(&load(file)?);
    }
    Ok(Some(BootEntry {
        source: EntrySource::EspBls,
        partition: part.number,
        title: chosen.title.clone().unwrap_or_else(|| chosen.id.clone()),
        cmdline: chosen.cmdline(),
        path,
        kernel,
        initrd,
    }))
}

/// The first UKI on the ESP: `/EFI/Linux/*.efi` (type #2 entries, newest
/// file name first), then the removable-media path `\EFI\BOOT\BOOTX64.EFI`
/// if it is a UKI rather than a boot loader.
fn uki_entry(
    fat: &mut Fat,
    device: &str,
    esp: &Partition,
    looked: &mut Vec<String>,
) -> Result<Option<BootEntry>, BootEntryError> {
    let mut candidates: Vec<String> = fat
        .list("/EFI/Linux")
        .map_err(|reason| BootEntryError::Filesystem {
            device: device.to_owned(),
            partition: esp.number,
            fs: Fat::KIND,
            reason,
        })?
        .unwrap_or_default()
        .into_iter()
        .filter(|n| {
            n.len() > 4
                && n.get(n.len() - 4..)
                    .is_some_and(|e| e.eq_ignore_ascii_case(".efi"))
        })
        .collect();
    candidates.sort_by(|a, b| bls::version_cmp(b, a).then_with(|| b.cmp(a)));
    let mut paths: Vec<String> = candidates
        .into_iter()
        .map(|n| format!("/EFI/Linux/{n}"))
        .collect();
    paths.push(REMOVABLE_PATH_X64.replace('\\', "/"));

    for path in paths {
        let image = match fat.read(&path, MAX_BOOT_FILE) {
            Ok(Some(image)) => image,
            Ok(None) => {
                looked.push(format!("no {path} on partition {}", esp.number));
                continue;
            }
            Err(reason) => {
                return Err(BootEntryError::File {
                    device: device.to_owned(),
                    partition: esp.number,
                    path,
                    reason,
                })
            }
        };
        let sections = match uki::extract(&image) {
            Ok(s) => s,
            Err(reason) if reason.starts_with("no .linux") => {
                // A boot loader at the removable-media path: not a UKI.
                looked.push(format!("{path}: {reason}"));
                continue;
            }
            Err(reason) => {
                return Err(BootEntryError::Uki {
                    device: device.to_owned(),
                    partition: esp.number,
                    path,
                    reason,
                })
            }
        };
        tracing::info!(disk = device, partition = esp.number, uki = %path, "unified kernel image chosen");
        return Ok(Some(BootEntry {
            source: EntrySource::Uki,
            partition: esp.number,
            title: path.clone(),
            kernel: sections.linux.to_vec(),
            initrd: sections.initrd.to_vec(),
            cmdline: sections.cmdline,
            path,
        }));
    }
    Ok(None)
}

/// Where UEFI firmware looks for a boot program on removable media, and
/// where the tenant images keep their UKI.
pub const REMOVABLE_PATH_X64: &str = "\\EFI\\BOOT\\BOOTX64.EFI";
