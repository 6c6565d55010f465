//! Secure Boot for network-booted QEMU nodes: OVMF whose keys (PK, KEK,
//! db) are Debian's snakeoil test key, and a copy of the server's ramdisk
//! UKI signed with that key, as a site signs its boot image with its own.
//!
//! QEMU's iPXE ROM is not signed, so a Secure Boot node cannot run the
//! `warden.ipxe` script; it UEFI-HTTP-boots the signed UKI instead
//! ([`crate::NodeBuilder::uefi_http_boot`], docs/netboot.md). This module
//! only signs what the server serves; it never builds or changes a UKI, and
//! it never writes outside the directory it is given.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::Server;

/// The Secure Boot OVMF build (the file Debian's `OVMF_CODE_4M.snakeoil.fd`
/// links to; named directly so [`crate::NodeBuilder`] turns SMM on).
pub const OVMF_CODE: &str = crate::node::OVMF_CODE_SECBOOT;
/// Variable store with the snakeoil key enrolled as PK, KEK and db.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd";
/// The snakeoil private key (encrypted) and its certificate.
pub const KEY: &str = "/usr/share/ovmf/PkKek-1-snakeoil.key";
pub const CERT: &str = "/usr/share/ovmf/PkKek-1-snakeoil.pem";
/// The passphrase Debian's ovmf package documents for the key.
const PASSPHRASE: &str = "snakeoil";

/// Checks the firmware, key and tools this module uses; the error names
/// what is missing and which package has it.
pub fn prerequisites() -> Result<()> {
    for f in [OVMF_CODE, OVMF_VARS, KEY, CERT] {
        if !Path::new(f).is_file() {
            bail!("{f} is missing (package ovmf)");
        }
    }
    crate::require_program("sbsign").context("package sbsigntool")?;
    crate::require_program("openssl")?;
    crate::require_program("curl")?;
    Ok(())
}

/// Runs `cmd`; a failure or non-zero exit is an error naming `what` with
/// the tool's stderr.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot start"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Downloads `server`'s `warden-ramdisk.efi` from its `/boot/` and signs
/// it with the snakeoil key into `dir/warden-ramdisk.efi`, which it
/// returns. The signature is outside the Authenticode digest, so the
/// firmware measures the signed copy as the served one.
pub fn signed_uki(server: &Server, dir: &Path) -> Result<PathBuf> {
    let boot = server
        .boot_url()
        .context("this server does not serve /boot/ (start it with Server::start_netboot)")?;
    let unsigned = dir.join("warden-ramdisk.unsigned.efi");
    let key = dir.join("snakeoil.key");
    let signed = dir.join("warden-ramdisk.efi");
    let url = format!("{boot}warden-ramdisk.efi");
    run(
        Command::new("curl")
            .args(["-sSf", "-o"])
            .arg(&unsigned)
            .arg(&url),
        &format!("curl {url}"),
    )?;
    // sbsign reads only unencrypted keys.
    run(
        Command::new("openssl")
            .args(["rsa", "-in", KEY, "-passin"])
            .arg(format!("pass:{PASSPHRASE}"))
            .arg("-out")
            .arg(&key),
        &format!("openssl rsa -in {KEY}"),
    )?;
    run(
        Command::new("sbsign")
            .arg("--key")
            .arg(&key)
            .args(["--cert", CERT, "--output"])
            .arg(&signed)
            .arg(&unsigned),
        &format!("sbsign {}", unsigned.display()),
    )?;
    Ok(signed)
}
