//! `bench-handoff`: time from the agent's `handoff` console event to the
//! tenant's `TENANT-BOOTED` line, for the reboot-to-disk handoff (reboot,
//! OVMF, `BootNext`, the tenant UKI from the disk) against the kexec
//! handoff as anchor, in the same run: the same tenant image
//! (`build/images/tenant-compressed.qcow2`, streamed from 127.0.0.1), the
//! same network-booted node (1 GiB, NVMe disk, swtpm), each path on its own
//! node and server (the handoff key is on the measured command line, so
//! each needs its own learned policy). Both times are taken by the
//! harness's console watcher, so they include the same polling.
//!
//! Goal: recorded, not raced — reboot is expected to take longer than
//! kexec (firmware runs again; on real servers POST adds minutes), so the
//! line states `goal: reboot >= kexec, both recorded` and the ratio.
//!
//! Prints diagnostics on stderr and exactly two `BENCH` lines on stdout.
//! It measures; it never builds (scripts/bench does that first).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use warden_qemu_tests::handoff::{
    handoff_boot, handoff_extra_args, netboot_server_with, refused_boot_then_learn, HandoffKind,
    HandoffRun, TenantImages,
};
use warden_qemu_tests::{ramdisk_dir, QemuLock, Ramdisk};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 256 * MIB;
const LEASE: &str = "lease-bench-handoff";

fn parse_args() -> Result<()> {
    if let Some(a) = std::env::args().nth(1) {
        bail!("unknown argument {a:?} (usage: bench-handoff)");
    }
    Ok(())
}

/// One node, one server: a refused boot to learn the policy, then the
/// handoff boot. Returns the run (QEMU exited).
fn one_path(
    kind: HandoffKind,
    ramdisk: &Ramdisk,
    images: &TenantImages,
    image_url: &str,
) -> Result<HandoffRun> {
    let dir = tempfile::Builder::new()
        .prefix("warden-bench-handoff-")
        .tempdir()
        .context("temp dir")?;
    let disk = dir.path().join("nvme.img");
    warden_qemu_tests::node::create_sparse(&disk, DISK_SIZE)?;
    let extra = handoff_extra_args(kind, image_url, &images.image_sha256, LEASE);
    let (server, boot_url) = netboot_server_with(&extra)?;
    let name = format!("bench-{}", kind.mode());
    let refused = refused_boot_then_learn(
        &server,
        ramdisk,
        &format!("{name}-learn"),
        &boot_url,
        &disk,
        &format!("bench-handoff-{}", kind.mode()),
    )?;
    let mut run = handoff_boot(&name, &boot_url, &disk, &refused.swtpm_state_dir())?;
    let console = run.node.console_text();
    let ok = run.status.success()
        && run.handoff["mode"] == kind.mode()
        && console.lines().any(|l| {
            l.trim_end()
                .ends_with(&format!("TENANT-LEASE {LEASE} source=partition"))
        });
    if !ok {
        let logs = run.node.keep_logs()?;
        bail!(
            "{name}: the tenant did not boot with its lease (QEMU {}); logs in {}",
            run.status,
            logs.display()
        );
    }
    eprintln!(
        "bench-handoff: {}: QEMU start to handoff {:.2} s, handoff to TENANT-BOOTED {:.2} s",
        kind.mode(),
        run.start_to_handoff.as_secs_f64(),
        run.handoff_to_booted.as_secs_f64()
    );
    Ok(run)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() -> Result<()> {
    parse_args()?;
    let ramdisk = ramdisk_dir()?;
    let images = TenantImages::find()?;
    let _lock = QemuLock::acquire()?;
    let port = warden_qemu_tests::http::serve_file(&images.image)?;
    let image_url = format!("http://10.0.2.2:{port}/tenant-compressed.qcow2");

    let kexec = one_path(HandoffKind::Kexec, &ramdisk, &images, &image_url)?;
    let reboot = one_path(HandoffKind::RebootToDisk, &ramdisk, &images, &image_url)?;
    let (k, r) = (
        secs(kexec.handoff_to_booted),
        secs(reboot.handoff_to_booted),
    );
    println!("BENCH handoff-kexec: handoff to TENANT-BOOTED {k:.2} s (QEMU/TCG, OVMF, swtpm)");
    println!(
        "BENCH handoff: warden reboot {r:.2} s, anchor kexec {k:.2} s, ratio {:.2} (goal: reboot >= kexec, both recorded; real servers add minutes of POST to reboot)",
        r / k
    );
    Ok(())
}
