//! QEMU tier, issue #7: after an OK verdict the agent streams the tenant
//! test image (`scripts/build-images`: the compressed qcow2) from the host
//! onto the node's NVMe disk, writes the lease record, finds the tenant's
//! BLS entry on the disk's ESP, measures kernel, initrd and command line
//! into PCR 13, and kexecs the tenant. The tenant prints `TENANT-BOOTED`,
//! the lease it read from its disk and its PCRs; the test checks PCR 13
//! against the value it computes from build/images/manifest.json.
//!
//! Both boots network-boot the server's `warden.ipxe` (iPXE → the UKI),
//! the image and handoff arguments on the server's boot command line.
//! Boot 1: no policy → refused, the agent never hands off. Boot 2 (same
//! TPM, same command line, the policy learned from boot 1): the handoff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sha2::{Digest, Sha256};
use warden_qemu_tests::console::events_named;
use warden_qemu_tests::handoff::{
    handoff_boot, handoff_extra_args, netboot_server_with, refused_boot_then_learn, HandoffKind,
    TenantImages,
};
use warden_qemu_tests::QemuLock;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 256 * MIB;
const LEASE: &str = "lease-qemu-7";

fn digest(hex_text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).unwrap();
    out
}

/// PCR 13 after the agent's three extends, from zero.
fn expected_pcr13(manifest: &serde_json::Value) -> String {
    let mut pcr = [0u8; 32];
    for part in ["kernel", "initrd", "options"] {
        let d = digest(manifest[part]["sha256"].as_str().unwrap());
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(d);
        pcr = h.finalize().into();
    }
    hex::encode(pcr)
}

#[test]
fn an_attested_node_kexecs_the_measured_tenant_which_sees_its_lease_and_pcr() {
    let Some(ramdisk) = warden_qemu_tests::qemu_prerequisites("handoff_boot", &[]) else {
        return;
    };
    let Some(images) = warden_qemu_tests::prereq("handoff_boot", TenantImages::find()) else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("warden-handoff-boot-")
        .tempdir()
        .unwrap();
    let manifest = &images.manifest;
    let image_sha256 = &images.image_sha256;
    let disk = dir.path().join("nvme.img");
    warden_qemu_tests::node::create_sparse(&disk, DISK_SIZE).unwrap();
    let port = warden_qemu_tests::http::serve_file(&images.image).unwrap();
    let url = format!("http://10.0.2.2:{port}/tenant-compressed.qcow2");
    let extra = handoff_extra_args(HandoffKind::Kexec, &url, image_sha256, LEASE);
    let (server, boot_url) = netboot_server_with(&extra).unwrap();

    // 1. No policy: refused; no image, no handoff. The policy is learned
    //    from this boot.
    let mut first = refused_boot_then_learn(
        &server,
        &ramdisk,
        "handoff-refused",
        &boot_url,
        &disk,
        "qemu-handoff",
    )
    .unwrap();
    let events = first.events();
    assert_eq!(events_named(&events, "verdict")[0]["status"], "failed");
    assert!(
        events_named(&events, "handoff").is_empty() && !first.console_text().contains("TENANT-"),
        "a refused node handed off: {events:?}"
    );

    // 2. Attest → Image → Ready → Handoff → the tenant.
    let mut run =
        handoff_boot("handoff-kexec", &boot_url, &disk, &first.swtpm_state_dir()).unwrap();
    assert!(run.status.success(), "QEMU exit status {}", run.status);
    let handoff = run.handoff.clone();
    let console = run.node.console_text();
    eprintln!("handoff_boot: {handoff}");

    let events = run.node.events();
    let image = events_named(&events, "image_result");
    assert_eq!(image.len(), 1, "{console}");
    assert_eq!(image[0]["digest"], format!("sha256:{image_sha256}"));
    assert_eq!(handoff["mode"], "kexec");
    assert_eq!(handoff["source"], "esp-bls", "{handoff}");
    assert_eq!(handoff["lease"], LEASE);
    assert_eq!(handoff["pcr"], 13);
    assert_eq!(handoff["kernel_sha256"], manifest["kernel"]["sha256"]);
    assert_eq!(handoff["initrd_sha256"], manifest["initrd"]["sha256"]);
    assert_eq!(handoff["cmdline"], manifest["options"]["string"]);
    let expected = expected_pcr13(manifest);
    assert_eq!(handoff["expected_pcr_from_zero"], expected.as_str());

    // The tenant's own view, from the same console after kexec.
    warden_qemu_tests::turnover::assert_tenant_booted(&console, LEASE);
    let lines: Vec<&str> = console.lines().map(str::trim_end).collect();
    let pcr13 = lines
        .iter()
        .find_map(|l| l.split("TENANT-PCR 13 ").nth(1))
        .unwrap_or_else(|| panic!("no TENANT-PCR 13 line:\n{console}"));
    assert_eq!(
        pcr13.trim(),
        expected,
        "PCR 13 in the tenant is not the agent's measurement of the entry"
    );
    eprintln!(
        "handoff_boot: QEMU start to handoff {:.1} s; handoff to TENANT-BOOTED {:.1} s",
        run.start_to_handoff.as_secs_f64(),
        run.handoff_to_booted.as_secs_f64()
    );
}
