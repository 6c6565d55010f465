//! QEMU tier, issue #7: after an OK verdict the agent streams the tenant
//! test image (`scripts/build-images`: the compressed qcow2) from the host
//! onto the node's NVMe disk, writes the lease record, finds the tenant's
//! BLS entry on the disk's ESP, measures kernel, initrd and command line
//! into PCR 13, and kexecs the tenant. The tenant prints `TENANT-BOOTED`,
//! the lease it read from its disk and its PCRs; the test checks PCR 13
//! against the value it computes from build/images/manifest.json.
//!
//! Boot 1: no policy → refused, the agent never hands off. Boot 2 (same
//! TPM, same command line, the policy learned from boot 1): the handoff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use sha2::{Digest, Sha256};
use warden_qemu_tests::console::events_named;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{DiskBus, Node, NodeBuilder, QemuLock, Ramdisk, Server};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 256 * MIB;
const LEASE: &str = "lease-qemu-7";

fn prerequisites() -> Option<(Ramdisk, PathBuf)> {
    let ramdisk = warden_qemu_tests::qemu_prerequisites("handoff_boot", &[])?;
    let images = warden_qemu_tests::workspace_root().join("build/images");
    let found = if images.join("manifest.json").is_file()
        && images.join("tenant-compressed.qcow2").is_file()
    {
        Ok(images)
    } else {
        Err(anyhow::anyhow!(
            "{} has no tenant images (run scripts/build-images)",
            images.display()
        ))
    };
    warden_qemu_tests::prereq("handoff_boot", found).map(|i| (ramdisk, i))
}

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

fn boot_until_off(mut node: Node, label: &str) -> Node {
    let status = node.wait_power_off(BOOT_TIMEOUT).unwrap();
    assert!(status.success(), "{label}: QEMU exit status {status}");
    eprintln!(
        "handoff_boot: {label}: QEMU ran {:.1} s",
        node.started_at().elapsed().as_secs_f64()
    );
    node
}

fn node(name: &str, ramdisk: &Ramdisk, cmdline: &str, disk: &std::path::Path) -> NodeBuilder {
    NodeBuilder::new(name)
        .kernel(&ramdisk.kernel, &ramdisk.initrd, cmdline)
        .disk_file(DiskBus::Nvme, disk, true)
}

#[test]
fn an_attested_node_kexecs_the_measured_tenant_which_sees_its_lease_and_pcr() {
    let Some((ramdisk, images)) = prerequisites() else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("warden-handoff-boot-")
        .tempdir()
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join("manifest.json")).unwrap()).unwrap();
    let image = images.join("tenant-compressed.qcow2");
    let image_sha256 = manifest["files"]["tenant-compressed.qcow2"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let disk = dir.path().join("nvme.img");
    warden_qemu_tests::node::create_sparse(&disk, DISK_SIZE).unwrap();
    let port = warden_qemu_tests::http::serve_file(&image).unwrap();
    let url = format!("http://10.0.2.2:{port}/tenant-compressed.qcow2");

    let server = Server::start_trusting_swtpm().unwrap();
    let cmdline = format!(
        "console=ttyS0 warden.server={} warden.ca={} warden.on_error=poweroff \
         warden.done=poweroff warden.image={url} warden.image_checksum=sha256:{image_sha256} \
         warden.handoff=kexec warden.lease={LEASE}",
        server.guest_url(),
        server.ca_pin()
    );

    // 1. No policy: refused; no image, no handoff.
    let mut first = boot_until_off(
        node("handoff-refused", &ramdisk, &cmdline, &disk)
            .start()
            .unwrap(),
        "boot 1 (no policy)",
    );
    let events = first.events();
    assert_eq!(events_named(&events, "verdict")[0]["status"], "failed");
    assert!(
        events_named(&events, "handoff").is_empty() && !first.console_text().contains("TENANT-"),
        "a refused node handed off: {events:?}"
    );
    let tpm_state = first.swtpm_state_dir();
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();
    let reference = ramdisk.dir.join("reference-values.json");
    server
        .wardenctl_ok(&[
            "policy",
            "learn",
            &node_id,
            "--name",
            "qemu-handoff",
            "--ramdisk",
            reference.to_str().unwrap(),
            "--store",
        ])
        .unwrap();
    server
        .wardenctl_ok(&["policy", "assign", "qemu-handoff", "--node", &node_id])
        .unwrap();

    // 2. Attest → Image → Ready → Handoff → the tenant.
    let started = Instant::now();
    let mut second = node("handoff-kexec", &ramdisk, &cmdline, &disk)
        .tpm_state(&tpm_state)
        .start()
        .unwrap();
    let handoff = second.wait_for_event("handoff", BOOT_TIMEOUT).unwrap();
    let handoff_at = Instant::now();
    let mut second = boot_until_off(second, "boot 2 (image + kexec)");
    let console = second.console_text();
    let booted_at = Instant::now();
    eprintln!("handoff_boot: {handoff}");

    let events = second.events();
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
    let expected = expected_pcr13(&manifest);
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
        "handoff_boot: agent start to handoff {:.1} s; handoff to tenant powered off {:.1} s",
        (handoff_at - started).as_secs_f64(),
        (booted_at - handoff_at).as_secs_f64()
    );
}
