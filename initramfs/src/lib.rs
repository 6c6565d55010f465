//! `warden-mkinitramfs`: builds the Warden ramdisk — a zstd-compressed newc
//! cpio whose `/init` is the agent — plus its kernel, a manifest of every
//! byte in it, and the reference values (TPM event digests) of kernel and
//! initrd ([`reference`]).
//!
//! Owns what goes into the ramdisk (the agent, its shared libraries and the
//! dlopen'ed TCTI plugins, the kernel modules with a reduced index, two
//! device nodes, the mount points) and reproducibility: the same inputs give
//! byte-identical outputs, so the server can know the ramdisk's measurement
//! in advance. It must never put anything else in (no shell, no busybox), and
//! never let host metadata (owners, times, inode numbers, directory order)
//! reach the output.

pub mod cpio;
pub mod elf;
pub mod modules;
pub mod reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cpio::{Archive, Kind};

/// The expected "LOADED_IMAGE::LoadOptions" digest of a command line (PCR 9).
pub use crate::reference::cmdline_digest;

/// Libraries the agent `dlopen`s: tctildr picks its TCTI at run time, so no
/// ELF header names them (LAB.md).
pub const DLOPEN_LIBS: &[&str] = &["libtss2-tcti-device.so.0", "libtss2-tcti-swtpm.so.0"];

/// zstd level: 19 is the highest non-"ultra" level; it keeps the window at
/// 8 MiB, which the kernel's decompressor handles in any RAM size we boot.
pub const ZSTD_LEVEL: i32 = 19;

/// File names inside the output directory.
pub const INITRAMFS_NAME: &str = "initramfs.cpio.zst";
pub const VMLINUZ_NAME: &str = "vmlinuz";
pub const MANIFEST_NAME: &str = "manifest.json";
pub const REFERENCE_VALUES_NAME: &str = "reference-values.json";

/// Why a build failed. Each message names the file that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    #[error(transparent)]
    Modules(#[from] modules::ModulesError),
    #[error(transparent)]
    Cpio(#[from] cpio::CpioError),
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error("no kernel version under {modules_root} has a {boot_dir}/vmlinuz-VERSION")]
    NoKernel {
        modules_root: PathBuf,
        boot_dir: PathBuf,
    },
    #[error("SOURCE_DATE_EPOCH {0} does not fit the 32-bit cpio mtime")]
    Epoch(u64),
    #[error("compressing with zstd: {0}")]
    Compress(std::io::Error),
}

/// Everything a ramdisk build reads. All host paths are explicit so tests
/// build from fixtures.
#[derive(Clone, Debug)]
pub struct Config {
    /// The agent binary; becomes `/init`.
    pub agent: PathBuf,
    /// Kernel version, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// Usually `/lib/modules`.
    pub modules_root: PathBuf,
    /// Usually `/boot` (holds `vmlinuz-KVER`).
    pub boot_dir: PathBuf,
    /// Where the loader looks for libraries, in order.
    pub lib_dirs: Vec<PathBuf>,
    /// Sonames to ship although no ELF header names them.
    pub dlopen: Vec<String>,
    /// Modules to ship (their dependencies are added).
    pub modules: Vec<String>,
    /// `SOURCE_DATE_EPOCH`: the mtime of every entry.
    pub source_date_epoch: u64,
    /// Output directory.
    pub out: PathBuf,
}

impl Config {
    /// The defaults for this host: Debian's library dirs, the TCTI plugins,
    /// the default module list, `/lib/modules` and `/boot`.
    pub fn new(agent: PathBuf, kernel_version: String, out: PathBuf) -> Self {
        Config {
            agent,
            kernel_version,
            modules_root: PathBuf::from("/lib/modules"),
            boot_dir: PathBuf::from("/boot"),
            lib_dirs: elf::DEFAULT_LIB_DIRS.iter().map(PathBuf::from).collect(),
            dlopen: DLOPEN_LIBS.iter().map(|s| s.to_string()).collect(),
            modules: modules::DEFAULT_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            source_date_epoch: 0,
            out,
        }
    }
}

/// The newest kernel version that has both `modules_root/KVER/modules.dep`
/// and `boot_dir/vmlinuz-KVER` (compared as version numbers, not strings).
pub fn newest_kernel(modules_root: &Path, boot_dir: &Path) -> Result<String, BuildError> {
    let dir = std::fs::read_dir(modules_root).map_err(|source| BuildError::Read {
        path: modules_root.to_path_buf(),
        source,
    })?;
    let mut best: Option<(Vec<u64>, String)> = None;
    for entry in dir.flatten() {
        let Some(kver) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !entry.path().join("modules.dep").is_file()
            || !boot_dir.join(format!("vmlinuz-{kver}")).is_file()
        {
            continue;
        }
        let key = version_key(&kver);
        if best.as_ref().is_none_or(|(k, v)| (&key, &kver) > (k, v)) {
            best = Some((key, kver));
        }
    }
    best.map(|(_, v)| v).ok_or_else(|| BuildError::NoKernel {
        modules_root: modules_root.to_path_buf(),
        boot_dir: boot_dir.to_path_buf(),
    })
}

/// `6.1.0-56-amd64` → `[6, 1, 0, 56]`: every run of digits, so `6.10` > `6.9`.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// One entry of the manifest: a member of the cpio.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Absolute path inside the ramdisk.
    pub path: String,
    /// `file`, `dir`, `symlink` or `chardev`.
    pub kind: &'static str,
    /// Permission bits, octal (`0755`).
    pub mode: String,
    /// Bytes of data (a symlink's target length).
    pub size: u64,
    /// SHA-256 of the data, hex.
    pub sha256: String,
    /// The host file it was copied from, or `generated`.
    pub origin: String,
    /// Symlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device number `major:minor` of a device node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
}

/// Size and digest of an output file.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Artifact {
    /// File name inside the output directory.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json`: what was built, from what, and its digests.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Manifest {
    pub kernel_version: String,
    pub source_date_epoch: u64,
    pub initramfs: Artifact,
    pub vmlinuz: Artifact,
    /// Modules in the order coldplug would load them if all were needed.
    pub modules: Vec<String>,
    pub files: Vec<ManifestEntry>,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn read(path: &Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, data: &[u8]) -> Result<(), BuildError> {
    std::fs::write(path, data).map_err(|source| BuildError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Pretty JSON plus a newline: struct fields serialize in declaration
/// order, so the bytes depend only on the values (reproducible).
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BuildError> {
    let mut json = serde_json::to_vec_pretty(value).map_err(|e| BuildError::Write {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    json.push(b'\n');
    write(path, &json)
}

/// An archive plus where each member came from.
#[derive(Default)]
struct Tree {
    archive: Archive,
    origins: BTreeMap<String, String>,
}

impl Tree {
    fn copy(&mut self, dest: &str, source: &Path, perm: u32) -> Result<(), BuildError> {
        self.archive.add_file(dest, read(source)?, perm)?;
        self.origins.insert(
            dest.trim_start_matches('/').to_string(),
            source.display().to_string(),
        );
        Ok(())
    }

    /// Device nodes the kernel and the agent need before devtmpfs is
    /// mounted: the kernel opens /dev/console for init's stdio.
    fn base(&mut self) -> Result<(), BuildError> {
        self.archive.add_char_dev("dev/console", 5, 1, 0o600)?;
        self.archive.add_char_dev("dev/null", 1, 3, 0o666)?;
        // Mount points, and /etc for what the agent writes (resolv.conf).
        for dir in ["etc", "proc", "sys", "run"] {
            self.archive.add_dir(dir, 0o755)?;
        }
        self.archive.add_dir("tmp", 0o1777)?;
        Ok(())
    }

    fn manifest_entries(&self) -> Vec<ManifestEntry> {
        self.archive
            .entries()
            .map(|(path, entry)| {
                let (kind, target, rdev) = match &entry.kind {
                    Kind::File(_) => ("file", None, None),
                    Kind::Dir => ("dir", None, None),
                    Kind::Symlink(t) => ("symlink", Some(t.clone()), None),
                    Kind::CharDev { major, minor } => {
                        ("chardev", None, Some(format!("{major}:{minor}")))
                    }
                };
                let data = entry.data();
                ManifestEntry {
                    path: format!("/{path}"),
                    kind,
                    mode: format!("{:04o}", entry.perm),
                    size: data.len() as u64,
                    sha256: sha256_hex(data),
                    origin: self
                        .origins
                        .get(path)
                        .cloned()
                        .unwrap_or_else(|| "generated".to_string()),
                    target,
                    rdev,
                }
            })
            .collect()
    }

    /// The compressed archive (newc, then zstd on one thread — multithreaded
    /// zstd output depends on the thread count).
    fn compress(&self, epoch: u64) -> Result<Vec<u8>, BuildError> {
        let mtime = u32::try_from(epoch).map_err(|_| BuildError::Epoch(epoch))?;
        let raw = self.archive.to_bytes(mtime)?;
        zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(BuildError::Compress)
    }
}

/// Builds `initramfs.cpio.zst`, `vmlinuz`, `manifest.json` and
/// `reference-values.json` into `cfg.out`.
pub fn build(cfg: &Config) -> Result<Manifest, BuildError> {
    let mut tree = Tree::default();
    tree.base()?;
    tree.copy("init", &cfg.agent, 0o755)?;

    let dlopen: Vec<&str> = cfg.dlopen.iter().map(String::as_str).collect();
    let libs = elf::resolve_closure(std::slice::from_ref(&cfg.agent), &dlopen, &cfg.lib_dirs)?;
    // One host file reached under two names (the loader is both PT_INTERP
    // /lib64/ld-linux-x86-64.so.2 and libc's DT_NEEDED in the library dir)
    // is shipped once; the other names become symlinks, as on Debian.
    let mut placed: BTreeMap<&Path, &str> = BTreeMap::new();
    for lib in &libs {
        if let Some(first) = placed.get(lib.source.as_path()) {
            tree.archive.add_symlink(&lib.dest, first)?;
            continue;
        }
        placed.insert(&lib.source, &lib.dest);
        // The loader is also a program (it can be run directly); libraries
        // only need to be readable.
        let perm = if lib.dest.contains("/ld-linux") {
            0o755
        } else {
            0o644
        };
        tree.copy(&lib.dest, &lib.source, perm)?;
    }

    let kver = &cfg.kernel_version;
    let modules_dir = cfg.modules_root.join(kver);
    let set = modules::select(&modules_dir, &cfg.modules)?;
    let dest_dir = format!("lib/modules/{kver}");
    for (rel, host) in &set.files {
        tree.copy(&format!("{dest_dir}/{rel}"), host, 0o644)?;
    }
    tree.archive.add_file(
        &format!("{dest_dir}/modules.dep"),
        set.dep_text.into_bytes(),
        0o644,
    )?;
    tree.archive.add_file(
        &format!("{dest_dir}/modules.alias"),
        set.alias_text.into_bytes(),
        0o644,
    )?;

    tree.archive.add_file(
        &format!("{dest_dir}/modules.softdep"),
        set.softdep_text.into_bytes(),
        0o644,
    )?;

    let initramfs = tree.compress(cfg.source_date_epoch)?;
    let vmlinuz_src = cfg.boot_dir.join(format!("vmlinuz-{kver}"));
    let vmlinuz = read(&vmlinuz_src)?;
    // Before anything is written: a kernel the firmware cannot measure as a
    // PE image has no reference value, and such a ramdisk cannot attest.
    let reference =
        reference::ReferenceValues::compute(VMLINUZ_NAME, &vmlinuz, INITRAMFS_NAME, &initramfs)?;

    std::fs::create_dir_all(&cfg.out).map_err(|source| BuildError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    write(&cfg.out.join(INITRAMFS_NAME), &initramfs)?;
    write(&cfg.out.join(VMLINUZ_NAME), &vmlinuz)?;

    let manifest = Manifest {
        kernel_version: kver.clone(),
        source_date_epoch: cfg.source_date_epoch,
        initramfs: Artifact {
            name: INITRAMFS_NAME.to_string(),
            size: initramfs.len() as u64,
            sha256: sha256_hex(&initramfs),
        },
        vmlinuz: Artifact {
            name: VMLINUZ_NAME.to_string(),
            size: vmlinuz.len() as u64,
            sha256: sha256_hex(&vmlinuz),
        },
        modules: set.names,
        files: tree.manifest_entries(),
    };
    write_json(&cfg.out.join(MANIFEST_NAME), &manifest)?;
    write_json(&cfg.out.join(REFERENCE_VALUES_NAME), &reference)?;
    Ok(manifest)
}

/// Builds the boot benchmark's anchor: a cpio with a static busybox whose
/// `/init` powers the machine off at once, written to `out`. Returns the
/// compressed bytes' SHA-256.
pub fn busybox_anchor(
    busybox: &Path,
    source_date_epoch: u64,
    out: &Path,
) -> Result<String, BuildError> {
    let mut tree = Tree::default();
    tree.base()?;
    tree.copy("bin/busybox", busybox, 0o755)?;
    tree.archive.add_symlink("bin/sh", "busybox")?;
    // -f: no init to ask, call reboot(2) directly so QEMU exits.
    let script = "#!/bin/sh\nexec /bin/busybox poweroff -f\n";
    tree.archive
        .add_file("init", script.as_bytes().to_vec(), 0o755)?;
    let bytes = tree.compress(source_date_epoch)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| BuildError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write(out, &bytes)?;
    Ok(sha256_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order_is_numeric() {
        assert!(version_key("6.10.0-1-amd64") > version_key("6.9.12-1-amd64"));
        assert!(version_key("6.1.0-56-amd64") > version_key("6.1.0-9-amd64"));
    }

    #[test]
    fn newest_kernel_needs_modules_and_vmlinuz() {
        let dir = tempfile::tempdir().unwrap();
        let (mods, boot) = (dir.path().join("modules"), dir.path().join("boot"));
        for v in ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"] {
            std::fs::create_dir_all(mods.join(v)).unwrap();
            std::fs::write(mods.join(v).join("modules.dep"), "").unwrap();
        }
        std::fs::create_dir_all(&boot).unwrap();
        // 6.12 has modules but no kernel image: not a candidate.
        for v in ["6.1.0-9-amd64", "6.1.0-56-amd64"] {
            std::fs::write(boot.join(format!("vmlinuz-{v}")), "").unwrap();
        }
        assert_eq!(newest_kernel(&mods, &boot).unwrap(), "6.1.0-56-amd64");
        assert!(newest_kernel(&mods, &dir.path().join("nope")).is_err());
    }
}
