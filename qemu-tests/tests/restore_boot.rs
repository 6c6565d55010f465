//! QEMU tier, issue #6: a backup restored on a node by a plan.
//!
//! A node with two NVMe disks: A holds the old tenant's bootable disk (the
//! tenant image, data of its own past the image, and its lease record), B
//! is blank. Turnover 1 (to lab-b) backs A up to nbdkit on the host
//! (10.0.2.2), wipes both disks, images A and powers off; the snapshot is
//! filed under lab-a, the lessee whose disk it was. Turnover 2 hands the
//! node back to lab-a with `restore_from` = turnover 1's lease and target
//! B: wipe, restore (every chunk checked against the manifest the server
//! recorded), final attestation, kexec — and the tenant boots from the
//! restored disk. The host checks that B is A as it was, byte for byte,
//! but for the one write a handoff makes (the new lease record), and that
//! the signed report of lease 2 verifies and names the restore. A restore
//! of lab-a's snapshot for lab-b is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use warden_qemu_tests::turnover::{
    as_strs, assert_tenant_booted, boot_until_off, image_sha256, learn_policy, netboot_server,
    node, ok_as, prerequisites, refused_as, sha256_prefix, token, Nbdkit,
};
use warden_qemu_tests::{DiskBus, NodeBuilder, QemuLock, Server};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 128 * MIB;
/// The export holds the disk and, after it, the snapshot's manifest region.
const EXPORT_SIZE: u64 = DISK_SIZE + 16 * MIB;
/// Where the old tenant kept data of its own, past the image's partitions.
const OWN_DATA_AT: u64 = 96 * MIB;

/// The node: network boot, disk A then disk B (kernel names are checked
/// against the serials the inventory reports, not assumed).
fn two_disk_node(name: &str, server: &Server, a: &Path, b: &Path) -> NodeBuilder {
    node(name, server, "", a).disk_file(DiskBus::Nvme, b, true)
}

/// Byte offset of the tenant image's `warden-config` partition (where the
/// agent writes the lease record), from `build/images/manifest.json`.
fn warden_config_offset(images: &Path) -> u64 {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join("manifest.json")).unwrap()).unwrap();
    let disk = &manifest["disk"];
    let sector = disk["sector_size"].as_u64().unwrap();
    let part = disk["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "warden-config")
        .expect("the tenant image has a warden-config partition");
    part["first_lba"].as_u64().unwrap() * sector
}

/// The lease record as the agent writes it (`handoff::lease::record`).
fn lease_record(lease: &str) -> Vec<u8> {
    let mut out = format!("lease={lease}\n").into_bytes();
    out.resize(4096, 0);
    out
}

/// The old tenant's disk: the tenant image, 4 MiB of its own data at
/// [`OWN_DATA_AT`], and the lease record of its own lease. Returns its
/// SHA-256.
fn old_tenant_disk(path: &Path, images: &Path, config_at: u64) -> String {
    warden_qemu_tests::node::create_sparse(path, DISK_SIZE).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut image = std::fs::File::open(images.join("tenant.raw")).unwrap();
    std::io::copy(&mut image, &mut f).unwrap();
    let mut block = Vec::new();
    let mut seed = Sha256::digest(b"old tenant's own data").to_vec();
    while block.len() < (4 << 20) {
        seed = Sha256::digest(&seed).to_vec();
        block.extend_from_slice(&seed);
    }
    f.seek(SeekFrom::Start(OWN_DATA_AT)).unwrap();
    f.write_all(&block).unwrap();
    f.seek(SeekFrom::Start(config_at)).unwrap();
    f.write_all(&lease_record("lease-of-the-old-tenant"))
        .unwrap();
    f.sync_all().unwrap();
    sha256_prefix(path, DISK_SIZE)
}

/// The kernel name the node's last inventory gave the disk with `serial`.
fn disk_name(server: &Server, serial: &str) -> String {
    let nodes = server.nodes_json().unwrap();
    let disks = &nodes.nodes[0].inventory.disks;
    disks
        .iter()
        .find(|d| d.serial.as_deref() == Some(serial))
        .unwrap_or_else(|| panic!("no disk with serial {serial} in the inventory: {disks:?}"))
        .name
        .clone()
}

#[test]
fn a_snapshot_is_restored_onto_a_second_disk_and_the_tenant_boots_from_it() {
    let Some((ramdisk, images)) = prerequisites("restore_boot") else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("warden-restore-boot-")
        .tempdir()
        .unwrap();
    let config_at = warden_config_offset(&images);
    let disk_a = dir.path().join("nvme-a.img");
    let disk_b = dir.path().join("nvme-b.img");
    let old_a = old_tenant_disk(&disk_a, &images, config_at);
    warden_qemu_tests::node::create_sparse(&disk_b, DISK_SIZE).unwrap();
    let export = dir.path().join("export.img");
    warden_qemu_tests::node::create_sparse(&export, EXPORT_SIZE).unwrap();
    let nbd = Nbdkit::start(&export);
    let nbd_uri = format!("nbd://10.0.2.2:{}/", nbd.port);
    let image = images.join("tenant-compressed.qcow2");
    let image_sha256 = image_sha256(&images, "tenant-compressed.qcow2");
    let port = warden_qemu_tests::http::serve_file(&image).unwrap();
    let url = format!("http://10.0.2.2:{port}/tenant-compressed.qcow2");
    let server = netboot_server();

    // Boot 1: no policy → refused, nothing touched; the policy is learned
    // from it (with both disks attached, as in every later boot).
    let mut first = boot_until_off(
        two_disk_node("restore-refused", &server, &disk_a, &disk_b)
            .start()
            .unwrap(),
        "boot 1 (no policy)",
    );
    assert_eq!(
        warden_qemu_tests::console::events_named(&first.events(), "verdict")[0]["status"],
        "failed"
    );
    assert_eq!(sha256_prefix(&disk_a, DISK_SIZE), old_a);
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();
    learn_policy(&server, &ramdisk, &node_id, "qemu-restore");
    let tpm_state = first.swtpm_state_dir();
    // QEMU's NVMe serials are nvme{index}: A is nvme0, B nvme1.
    let (name_a, name_b) = (disk_name(&server, "nvme0"), disk_name(&server, "nvme1"));
    eprintln!("disk A is {name_a}, disk B is {name_b}");

    // Roles: uni-a owns the node; lab-a leases it; turnover 1 is lab-b's.
    server
        .wardenctl_ok(&["node", "owner", &node_id, "uni-a"])
        .unwrap();
    let owner = token(&server, dir.path(), "owner", "uni-a");
    let lab_a = token(&server, dir.path(), "lessee", "lab-a");
    let lab_b = token(&server, dir.path(), "lessee", "lab-b");
    let image_plan = |lessee: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "turnover",
            &node_id,
            "--image",
            &url,
            "--sha256",
            &image_sha256,
            "--lessee",
            lessee,
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // The node "was" lab-a's: an earlier plan made it so, superseded now.
    ok_as(&server, &owner, &as_strs(&image_plan("lab-a", &[])));
    let plan1: serde_json::Value = serde_json::from_str(&ok_as(
        &server,
        &owner,
        &as_strs(&image_plan(
            "lab-b",
            &[
                "--snapshot-to",
                &nbd_uri,
                "--target",
                &name_a,
                "--handoff",
                "poweroff",
            ],
        )),
    ))
    .unwrap();
    let lease1 = plan1["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(plan1["previous_lessee"], "lab-a");

    // Boot 2: turnover 1 — snapshot A, wipe both, image A, power off.
    boot_until_off(
        two_disk_node("restore-turnover-1", &server, &disk_a, &disk_b)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 2 (turnover 1: snapshot, wipe, image)",
    );
    let plan: serde_json::Value =
        serde_json::from_str(&server.wardenctl_ok(&["plan", &node_id, "--json"]).unwrap()).unwrap();
    assert_eq!(plan["state"], "done", "{plan}");
    assert_eq!(
        sha256_prefix(&export, DISK_SIZE),
        old_a,
        "the snapshot on the export is not the old tenant's disk"
    );
    assert_ne!(sha256_prefix(&disk_a, DISK_SIZE), old_a, "A was not imaged");
    let snapshot: serde_json::Value =
        serde_json::from_str(&ok_as(&server, &lab_a, &["snapshot", &lease1])).unwrap();
    assert_eq!(snapshot["lessee"], "lab-a");
    let manifest = snapshot["manifest_sha256"].as_str().unwrap().to_owned();

    // lab-a's disk is never restored for lab-b.
    let restore_plan = |lessee: &str| -> Vec<String> {
        [
            "turnover",
            &node_id,
            "--restore-from",
            &lease1,
            "--lessee",
            lessee,
            "--target",
            &name_b,
            "--handoff",
            "kexec",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let refused = refused_as(&server, &owner, &as_strs(&restore_plan("lab-b")));
    assert!(
        refused.contains("lab-a") && refused.contains("lab-b"),
        "{refused}"
    );
    let plan2: serde_json::Value =
        serde_json::from_str(&ok_as(&server, &owner, &as_strs(&restore_plan("lab-a")))).unwrap();
    let lease2 = plan2["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(plan2["request"]["restore_from"], lease1.as_str());

    // Boot 3: turnover 2 — wipe both, restore onto B, kexec from B.
    let mut third = boot_until_off(
        two_disk_node("restore-turnover-2", &server, &disk_a, &disk_b)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 3 (turnover 2: wipe, restore, kexec)",
    );
    let console = third.console_text();
    assert_tenant_booted(&console, &lease2);
    let done = console
        .lines()
        .find(|l| l.contains("restore: done;"))
        .unwrap_or_else(|| panic!("no restore in the agent's console:\n{console}"));
    eprintln!("{done}");

    // B is A as it was, but for the lease record the handoff wrote.
    let mut b = std::fs::read(&disk_b).unwrap();
    b.truncate(usize::try_from(DISK_SIZE).unwrap());
    let at = usize::try_from(config_at).unwrap();
    assert_eq!(
        b[at..at + 4096],
        lease_record(&lease2)[..],
        "B's warden-config partition does not hold lease 2's record"
    );
    b[at..at + 4096].copy_from_slice(&lease_record("lease-of-the-old-tenant"));
    assert_eq!(
        hex::encode(Sha256::digest(&b)),
        old_a,
        "the restored disk B is not the old tenant's disk A"
    );

    // The signed report of lease 2 verifies and names the restore.
    let report_file = dir.path().join("report.json");
    ok_as(
        &server,
        &lab_a,
        &[
            "report",
            "get",
            &node_id,
            "-o",
            report_file.to_str().unwrap(),
        ],
    );
    let verified = server
        .wardenctl_ok(&["report", "verify", report_file.to_str().unwrap()])
        .unwrap();
    assert!(verified.contains("report verified"), "{verified}");
    assert!(
        verified.contains(&format!("manifest {manifest}")),
        "{verified}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    let r = &report["report"];
    assert_eq!(r["outcome"], "ok", "{report}");
    assert_eq!(r["lease_id"], lease2.as_str());
    assert_eq!(r["lessee"], "lab-a");
    assert_eq!(r["image"], serde_json::Value::Null);
    assert_eq!(r["snapshot"], serde_json::Value::Null);
    let restore = &r["restore"];
    assert_eq!(restore["uri"], nbd_uri.as_str(), "{report}");
    assert_eq!(restore["manifest_sha256"], manifest.as_str());
    assert_eq!(restore["target"], format!("/dev/{name_b}"));
    assert_eq!(restore["disk_bytes"], DISK_SIZE);
    let event = r["agent_log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "restore")
        .unwrap_or_else(|| panic!("no restore event in the agent log: {report}"));
    assert_eq!(event["digest"], restore["record_sha256"]);
    assert_eq!(r["disks"].as_array().unwrap().len(), 2, "{report}");
    // Lab-b, the lessee before, reads its own lease's report, never lab-a's.
    let theirs: serde_json::Value =
        serde_json::from_str(&ok_as(&server, &lab_b, &["report", "get", &node_id])).unwrap();
    assert_eq!(theirs["report"]["lease_id"], lease1.as_str());
}
