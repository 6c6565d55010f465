//! QEMU tier, issue #7: the reboot-to-disk handoff. The node network-boots
//! the ramdisk (the NIC first in the boot order, as a site's PXE setup has
//! it); a direct `-kernel` boot cannot be used, since OVMF starts the
//! fw_cfg kernel before any `BootNext`.
//!
//! Boot 1: no policy → refused (the policy is learned from it, with the
//! same extra kernel arguments so PCR 9 matches). Boot 2, same TPM: OK
//! verdict, the compressed qcow2 streamed to the NVMe disk, the lease
//! written into `warden-config`, a `Boot####` for the disk's
//! `\EFI\BOOT\BOOTX64.EFI` and `BootNext` written through efivarfs, reboot.
//! The same QEMU process restarts (`allow_reboot`, same vars file and
//! disks), OVMF takes `BootNext` and starts the tenant UKI, which prints
//! `TENANT-BOOTED` and the lease it read from the partition, then powers
//! off. Afterwards the vars file shows the option the agent reported, no
//! `BootNext` left (one-shot), and the NIC still first in `BootOrder`: the
//! next boot after the tenant is the network again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use warden_qemu_tests::console::events_named;
use warden_qemu_tests::handoff::{
    boot_option_text, boot_order, global_var, handoff_boot, handoff_extra_args,
    netboot_server_with, read_ovmf_vars, refused_boot_then_learn, HandoffKind, TenantImages,
};
use warden_qemu_tests::QemuLock;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 256 * MIB;
const LEASE: &str = "lease-qemu-reboot-7";

#[test]
fn an_attested_node_reboots_into_the_tenant_disk_through_boot_next() {
    let Some(ramdisk) = warden_qemu_tests::qemu_prerequisites("handoff_reboot", &[]) else {
        return;
    };
    let Some(images) = warden_qemu_tests::prereq("handoff_reboot", TenantImages::find()) else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("warden-handoff-reboot-")
        .tempdir()
        .unwrap();
    let disk = dir.path().join("nvme.img");
    warden_qemu_tests::node::create_sparse(&disk, DISK_SIZE).unwrap();
    let port = warden_qemu_tests::http::serve_file(&images.image).unwrap();
    let image_url = format!("http://10.0.2.2:{port}/tenant-compressed.qcow2");

    let extra = handoff_extra_args(
        HandoffKind::RebootToDisk,
        &image_url,
        &images.image_sha256,
        LEASE,
    );
    let (server, boot_url) = netboot_server_with(&extra).unwrap();

    // 1. Refused; the policy comes from this boot.
    let refused = refused_boot_then_learn(
        &server,
        &ramdisk,
        "reboot-refused",
        &boot_url,
        &disk,
        "qemu-handoff-reboot",
    )
    .unwrap();

    // 2. Image, lease, Boot#### + BootNext, reboot → OVMF → the tenant UKI.
    let tpm = refused.swtpm_state_dir();
    let mut run = handoff_boot("reboot-to-disk", &boot_url, &disk, &tpm).unwrap();
    assert!(run.status.success(), "QEMU exit status {}", run.status);
    let handoff = run.handoff.clone();
    eprintln!("handoff_reboot: {handoff}");
    eprintln!(
        "handoff_reboot: QEMU start to handoff {:.1} s, handoff to TENANT-BOOTED {:.1} s",
        run.start_to_handoff.as_secs_f64(),
        run.handoff_to_booted.as_secs_f64()
    );
    let console = run.node.console_text();
    let events = run.node.events();

    let verdicts = events_named(&events, "verdict");
    assert_eq!(verdicts.len(), 1, "{console}");
    assert_eq!(verdicts[0]["status"], "ok", "{}", verdicts[0]);
    let image = events_named(&events, "image_result");
    assert_eq!(image.len(), 1, "{console}");
    assert_eq!(
        image[0]["digest"],
        format!("sha256:{}", images.image_sha256)
    );
    assert_eq!(events_named(&events, "agent_start").len(), 1, "{console}");

    assert_eq!(handoff["mode"], "reboot-to-disk", "{handoff}");
    assert_eq!(handoff["path"], "\\EFI\\BOOT\\BOOTX64.EFI", "{handoff}");
    assert_eq!(handoff["lease"], LEASE);
    assert!(
        handoff["disk"].as_str().unwrap().starts_with("/dev/nvme"),
        "{handoff}"
    );
    // The tenant, on the same console after the firmware reboot.
    let lines: Vec<&str> = console.lines().map(str::trim_end).collect();
    let handoff_line = lines
        .iter()
        .position(|l| l.contains("\"event\":\"handoff\""))
        .unwrap();
    let tenant = &lines[handoff_line..];
    assert!(tenant.iter().any(|l| l.ends_with("TENANT-BOOTED")));
    assert!(
        tenant
            .iter()
            .any(|l| l.ends_with(&format!("TENANT-LEASE {LEASE} source=partition"))),
        "the tenant did not read its lease from the disk:\n{console}"
    );
    assert!(
        tenant.iter().any(|l| l.ends_with("TENANT-POWEROFF")),
        "{console}"
    );

    // What the firmware kept: the agent's option, BootNext consumed, the
    // NIC still first.
    let vars = read_ovmf_vars(&run.vars_path()).unwrap();
    let ours: Vec<(u16, String)> = (0..=u16::MAX)
        .filter_map(|n| boot_option_text(&vars, n).map(|(d, p)| (n, d, p)))
        .filter(|(_, d, _)| d == "Warden tenant disk")
        .map(|(n, _, p)| (n, p))
        .collect();
    assert_eq!(ours.len(), 1, "one Warden boot option: {ours:?}");
    let (number, path) = ours[0].clone();
    let boot_next = format!("Boot{number:04X}");
    eprintln!("handoff_reboot: {boot_next}: {path}");
    let esp = &images.manifest["disk"]["partitions"][0];
    assert!(
        path.to_ascii_uppercase()
            .contains(&esp["guid"].as_str().unwrap().to_ascii_uppercase())
            && path.contains("\\EFI\\BOOT\\BOOTX64.EFI"),
        "{boot_next} does not start the ESP's BOOTX64.EFI: {path}"
    );
    assert!(
        console.contains(&format!(
            "BdsDxe: starting {boot_next} \"Warden tenant disk\""
        )),
        "OVMF did not start {boot_next}:\n{console}"
    );
    assert_eq!(
        global_var(&vars, "BootNext"),
        None,
        "BootNext is one-shot: the firmware should have consumed it"
    );
    let order = boot_order(&vars);
    let listed: Vec<String> = order
        .iter()
        .map(|n| {
            let (d, p) = boot_option_text(&vars, *n).unwrap_or_default();
            format!("Boot{n:04X} {d}: {p}")
        })
        .collect();
    eprintln!(
        "handoff_reboot: BootOrder after the tenant:\n  {}",
        listed.join("\n  ")
    );
    let first = order.first().copied().unwrap();
    let (_, first_path) = boot_option_text(&vars, first).unwrap();
    assert!(
        first_path.contains("/MAC("),
        "the NIC is not first in BootOrder any more: {listed:?}"
    );
    assert_ne!(
        first, number,
        "the tenant disk option went first in BootOrder"
    );

    // Last, so a run without it still shows every check above: the event
    // names the option the agent put in BootNext (docs/console-events.md).
    assert_eq!(
        handoff["boot_next"], boot_next,
        "the handoff event does not name the Boot#### the agent set in BootNext: {handoff}"
    );
}
