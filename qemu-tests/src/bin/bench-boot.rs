//! `bench-boot`: boot-to-ready of the Warden ramdisk against an anchor
//! initramfs whose /init powers off at once, on the same kernel, firmware,
//! TPM and devices, in alternating rounds; plus the ramdisk's size.
//!
//! Prints diagnostics on stderr and exactly two `BENCH` lines on stdout.
//! It measures; it never builds (scripts/bench does that first).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{ramdisk_dir, DiskBus, NodeBuilder, QemuLock, Ramdisk, Server};

const GIB: u64 = 1 << 30;
const MIB: f64 = 1024.0 * 1024.0;
/// The anchor: ironic-python-agent's CentOS ramdisk (initramfs), in MiB.
const IPA_RAMDISK_MIB: f64 = 464.0;

struct Args {
    anchor: PathBuf,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut anchor = warden_qemu_tests::workspace_root().join("build/bench/busybox.cpio.zst");
    let mut rounds = 3;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--anchor" => anchor = PathBuf::from(it.next().context("--anchor needs a path")?),
            "--rounds" => {
                rounds = it
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds needs a number")?
            }
            other => {
                bail!("unknown argument {other:?} (usage: bench-boot [--anchor CPIO] [--rounds N])")
            }
        }
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(Args { anchor, rounds })
}

/// The same machine for both contenders: only the initrd and cmdline differ.
fn node(name: &str, r: &Ramdisk, initrd: &std::path::Path, cmdline: &str) -> NodeBuilder {
    NodeBuilder::new(name)
        .kernel(&r.kernel, initrd, cmdline)
        .disk(DiskBus::VirtioBlk, GIB)
        .disk(DiskBus::Nvme, 2 * GIB)
}

/// Seconds from QEMU start to QEMU exit for the anchor.
fn anchor_round(r: &Ramdisk, anchor: &std::path::Path) -> Result<f64> {
    let mut n = node("bench-anchor", r, anchor, "console=ttyS0").start()?;
    let status = n.wait_exit(BOOT_TIMEOUT)?;
    let secs = n.started_at().elapsed().as_secs_f64();
    if !status.success() {
        let dir = n.keep_logs()?;
        bail!(
            "anchor QEMU exited with {status}; logs in {}",
            dir.display()
        );
    }
    Ok(secs)
}

/// Seconds from QEMU start to the agent's `ready` event.
fn warden_round(r: &Ramdisk, server: &Server) -> Result<f64> {
    let cmdline = format!(
        "console=ttyS0 warden.server={} warden.ca={} warden.done=poweroff",
        server.guest_url(),
        server.ca_pin()
    );
    let mut n = node("bench-warden", r, &r.initrd, &cmdline).start()?;
    match n.wait_for_event("ready", BOOT_TIMEOUT) {
        Ok(_) => Ok(n.started_at().elapsed().as_secs_f64()),
        Err(e) => {
            let dir = n.keep_logs()?;
            Err(e.context(format!("warden boot failed; logs in {}", dir.display())))
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let r = ramdisk_dir()?;
    if !args.anchor.is_file() {
        bail!(
            "{} is missing: build it with `warden-mkinitramfs busybox-anchor --out {}`",
            args.anchor.display(),
            args.anchor.display()
        );
    }
    let _lock = QemuLock::acquire()?;
    let server = Server::start()?;
    eprintln!("bench: server {} pin {}", server.url(), server.ca_pin());

    // One untimed anchor boot first, so neither contender pays for a cold
    // page cache (OVMF, kernel, QEMU itself).
    eprintln!("bench: warm-up anchor boot");
    anchor_round(&r, &args.anchor)?;

    let (mut anchor, mut warden) = (Vec::new(), Vec::new());
    for i in 1..=args.rounds {
        let a = anchor_round(&r, &args.anchor)?;
        eprintln!("bench: round {i}: anchor busybox-init {a:.2} s (QEMU start to exit)");
        let w = warden_round(&r, &server)?;
        eprintln!("bench: round {i}: warden {w:.2} s (QEMU start to ready)");
        anchor.push(a);
        warden.push(w);
    }
    let (w, a) = (median(warden), median(anchor));

    let initrd_bytes = std::fs::metadata(&r.initrd)
        .with_context(|| format!("stat {}", r.initrd.display()))?
        .len();
    let kernel_bytes = std::fs::metadata(&r.kernel)
        .with_context(|| format!("stat {}", r.kernel.display()))?
        .len();
    // u64 → f64 is exact below 2^53 bytes.
    #[allow(clippy::cast_precision_loss)]
    let (initrd_mib, kernel_mib) = (initrd_bytes as f64 / MIB, kernel_bytes as f64 / MIB);
    eprintln!(
        "bench: {} is {initrd_mib:.2} MiB; the kernel {} is {kernel_mib:.2} MiB more (not counted: the IPA figure is its initramfs alone)",
        r.initrd.display(),
        r.kernel.display()
    );

    println!(
        "BENCH boot-to-ready: warden {w:.2} s, anchor busybox-init {a:.2} s, ratio {:.2} (goal <= 1.2)",
        w / a
    );
    println!(
        "BENCH ramdisk-size: warden {initrd_mib:.2} MiB, anchor ipa-ramdisk {IPA_RAMDISK_MIB:.0} MiB, ratio {:.3} (goal <= 0.035)",
        initrd_mib / IPA_RAMDISK_MIB
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
