//! Where the workspace, its built binaries and the built ramdisk live.
//!
//! Only finds things; it never builds them (building is `cargo build
//! --workspace` and `scripts/build-ramdisk`, and the errors say so).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // This crate lives one level below the root; the path is fixed at compile
    // time, which is right for tests and for the bench binary alike.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `ROOT/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// A workspace binary in the debug profile, e.g. `warden-agent`.
pub fn target_bin(name: &str) -> Result<PathBuf> {
    let path = target_dir().join("debug").join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --workspace` first",
            path.display()
        );
    }
    Ok(path)
}

/// The built Warden ramdisk.
#[derive(Clone, Debug)]
pub struct Ramdisk {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Environment variable naming another ramdisk directory than `build/ramdisk`.
pub const RAMDISK_DIR_ENV: &str = "WARDEN_RAMDISK_DIR";

/// `build/ramdisk/` (or `$WARDEN_RAMDISK_DIR`) with `vmlinuz` and
/// `initramfs.cpio.zst`.
pub fn ramdisk_dir() -> Result<Ramdisk> {
    let dir = match std::env::var_os(RAMDISK_DIR_ENV) {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("build").join("ramdisk"),
    };
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.zst");
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            bail!(
                "{} is missing: run `scripts/build-ramdisk` first",
                f.display()
            );
        }
    }
    Ok(Ramdisk {
        dir,
        kernel,
        initrd,
    })
}

/// Directory where logs of failed runs are kept (`target/qemu-tests-logs`).
pub fn failed_logs_dir() -> PathBuf {
    target_dir().join("qemu-tests-logs")
}

/// Creates a fresh directory for the logs of a failed run named `label`,
/// e.g. `target/qemu-tests-logs/boot-1732190000-4242`.
pub fn new_failed_logs_dir(label: &str) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = failed_logs_dir().join(format!("{safe}-{secs}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_holds_the_workspace_manifest() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"), "{}", root.display());
    }

    #[test]
    fn missing_binary_says_how_to_build() {
        let err = target_bin("no-such-warden-binary").unwrap_err().to_string();
        assert!(err.contains("cargo build --workspace"), "{err}");
        assert!(err.contains("no-such-warden-binary"), "{err}");
    }
}
