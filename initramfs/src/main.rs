//! `warden-mkinitramfs`: command-line front end of `warden_initramfs`.
//! Parses flags, calls the library, prints what it built; nothing else.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Builds the reproducible Warden ramdisk (initramfs.cpio.zst, vmlinuz,
/// manifest.json, reference-values.json) into --out.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The agent binary, installed as /init.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "build/ramdisk")]
    out: PathBuf,
    /// Kernel version (default: the newest /lib/modules/KVER with /boot/vmlinuz-KVER).
    #[arg(long)]
    kernel_version: Option<String>,
    /// Where kernel module trees live.
    #[arg(long, default_value = "/lib/modules")]
    modules_root: PathBuf,
    /// Where vmlinuz-KVER lives.
    #[arg(long, default_value = "/boot")]
    boot_dir: PathBuf,
    /// Another module to ship (with its dependencies); repeatable.
    #[arg(long = "extra-module")]
    extra_modules: Vec<String>,
    /// mtime of every cpio entry.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    source_date_epoch: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The boot benchmark's anchor: static busybox whose /init powers off at once.
    BusyboxAnchor {
        /// Output file (.cpio.zst).
        #[arg(long)]
        out: PathBuf,
        /// The static busybox binary.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// mtime of every cpio entry.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
        source_date_epoch: u64,
    },
    /// Lists a (zstd-compressed or plain) newc cpio, like `cpio -tv`.
    List {
        /// The archive.
        file: PathBuf,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("warden-mkinitramfs: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::BusyboxAnchor {
            out,
            busybox,
            source_date_epoch,
        }) => {
            let sha = warden_initramfs::busybox_anchor(&busybox, source_date_epoch, &out)
                .with_context(|| format!("building busybox anchor {}", out.display()))?;
            println!("{}  {}", sha, out.display());
            Ok(())
        }
        Some(Command::List { file }) => list(&file),
        None => {
            let Some(agent) = cli.agent else {
                bail!("--agent PATH is required (the binary that becomes /init)");
            };
            let kver = match cli.kernel_version {
                Some(v) => v,
                None => warden_initramfs::newest_kernel(&cli.modules_root, &cli.boot_dir)?,
            };
            let mut cfg = warden_initramfs::Config::new(agent, kver, cli.out);
            cfg.modules_root = cli.modules_root;
            cfg.boot_dir = cli.boot_dir;
            cfg.modules.extend(cli.extra_modules);
            cfg.source_date_epoch = cli.source_date_epoch;
            let manifest = warden_initramfs::build(&cfg)
                .with_context(|| format!("building the ramdisk into {}", cfg.out.display()))?;
            println!(
                "kernel {}: {} files, {} modules",
                manifest.kernel_version,
                manifest.files.len(),
                manifest.modules.len()
            );
            for a in [&manifest.initramfs, &manifest.vmlinuz] {
                println!(
                    "{}  {} ({} bytes)",
                    a.sha256,
                    cfg.out.join(&a.name).display(),
                    a.size
                );
            }
            for name in [
                warden_initramfs::MANIFEST_NAME,
                warden_initramfs::REFERENCE_VALUES_NAME,
            ] {
                println!("{}", cfg.out.join(name).display());
            }
            Ok(())
        }
    }
}

fn list(file: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let raw = if bytes.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        zstd::stream::decode_all(&bytes[..])
            .with_context(|| format!("decompressing {}", file.display()))?
    } else {
        bytes
    };
    for e in warden_initramfs::cpio::read(&raw)? {
        let extra = match e.type_char() {
            'l' => format!(" -> {}", String::from_utf8_lossy(&e.data)),
            'c' => format!(" ({}:{})", e.rdev_major, e.rdev_minor),
            _ => String::new(),
        };
        println!(
            "{}{:04o} {:>10} /{}{}",
            e.type_char(),
            e.mode & 0o7777,
            e.data.len(),
            e.name,
            extra
        );
    }
    Ok(())
}
