//! QEMU tier, issue #8: one whole lease turnover, driven by the server.
//!
//! A node whose NVMe disk holds the previous tenant's data boots the
//! ramdisk; after a good verdict it gets its plan over the session, backs
//! the disk up to nbdkit on the host, erases it, writes the tenant image,
//! measures every step's record and the tenant's kernel, initrd and command
//! line into PCR 13, attests once more, and kexecs the tenant. The test
//! checks the snapshot against the old disk, the tenant's console, the
//! signed report (`wardenctl report verify`, and refused after one byte
//! changes), that the tenant's live PCRs equal the report's, who may read
//! what, `/metrics`, and that an altered step record (the agent's test hook)
//! fails the final verdict and leaves a failure report.
//!
//! Boot 1: no policy → refused (the policy is learned from it). Boot 2: the
//! turnover. Boot 3a: `warden.test_alter_record=wipe` on the command line is
//! refused by the policy (PCR 9); boot 3b, under a policy learned for it:
//! the turnover with the altered record, refused at the final verdict.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use warden_qemu_tests::console::events_named;
use warden_qemu_tests::turnover::{
    as_strs, assert_tenant_booted, boot_until_off, enroll_and_learn_policy, image_sha256,
    learn_policy, netboot_server, node, ok_as, prerequisites, previous_tenant_disk, refused_as,
    sha256_prefix, token, Nbdkit,
};
use warden_qemu_tests::{QemuLock, Server};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 256 * MIB;
/// The export holds the disk and, after it, the snapshot's manifest region.
const EXPORT_SIZE: u64 = DISK_SIZE + 16 * MIB;

/// `TENANT-PCR n HEX` lines of the tenant's console.
fn tenant_pcrs(console: &str) -> std::collections::BTreeMap<u32, String> {
    console
        .lines()
        .filter_map(|l| l.split("TENANT-PCR ").nth(1))
        .filter_map(|rest| {
            let mut it = rest.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.to_ascii_lowercase()))
        })
        .collect()
}

fn metrics(server: &Server) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(server.ca_pem())
        .arg(format!("{}/metrics", server.url()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_node_is_snapshotted_erased_imaged_attested_and_handed_over_with_a_signed_report() {
    let Some((ramdisk, images)) = prerequisites("turnover_boot") else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("warden-turnover-boot-")
        .tempdir()
        .unwrap();
    let image = images.join("tenant-compressed.qcow2");
    let image_sha256 = image_sha256(&images, "tenant-compressed.qcow2");
    let disk = dir.path().join("nvme.img");
    let old_disk_sha256 = previous_tenant_disk(&disk, DISK_SIZE);
    let export = dir.path().join("export.img");
    warden_qemu_tests::node::create_sparse(&export, EXPORT_SIZE).unwrap();
    let nbd = Nbdkit::start(&export);
    let port = warden_qemu_tests::http::serve_file(&image).unwrap();
    let url = format!("http://10.0.2.2:{port}/tenant-compressed.qcow2");

    // The node network-boots the server's iPXE script (docs/netboot.md).
    let server = netboot_server();

    // 1. No policy: refused; the disk is not touched.
    let (node_id, first) = enroll_and_learn_policy(&server, &ramdisk, "", &disk, "qemu-turnover");
    assert_eq!(sha256_prefix(&disk, DISK_SIZE), old_disk_sha256);
    let tpm_state = first.swtpm_state_dir();

    // Roles: uni-a owns the node; lab-a leases it now, lab-b is next.
    server
        .wardenctl_ok(&["node", "owner", &node_id, "uni-a"])
        .unwrap();
    let owner = token(&server, dir.path(), "owner", "uni-a");
    let other_owner = token(&server, dir.path(), "owner", "uni-z");
    let lab_a = token(&server, dir.path(), "lessee", "lab-a");
    let lab_b = token(&server, dir.path(), "lessee", "lab-b");
    let nbd_uri = format!("nbd://10.0.2.2:{}/", nbd.port);
    let checksum_arg = image_sha256.clone();
    let plan_args = |lessee: &'static str| {
        vec![
            "turnover".to_string(),
            node_id.clone(),
            "--image".into(),
            url.clone(),
            "--sha256".into(),
            checksum_arg.clone(),
            "--snapshot-to".into(),
            nbd_uri.clone(),
            "--handoff".into(),
            "kexec".into(),
            "--lessee".into(),
            lessee.into(),
            "--json".into(),
        ]
    };
    refused_as(&server, &other_owner, &as_strs(&plan_args("lab-a")));
    refused_as(&server, &lab_a, &as_strs(&plan_args("lab-a")));
    // The node "was" lab-a's: an earlier plan made it so, superseded now.
    ok_as(&server, &owner, &as_strs(&plan_args("lab-a")));
    let plan: serde_json::Value =
        serde_json::from_str(&ok_as(&server, &owner, &as_strs(&plan_args("lab-b")))).unwrap();
    let lease = plan["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(plan["state"], "pending");
    assert_eq!(plan["previous_lessee"], "lab-a");

    // 2. The turnover.
    let mut second = boot_until_off(
        node("turnover", &server, "", &disk)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 2 (turnover)",
    );
    let console = second.console_text();
    assert_tenant_booted(&console, &lease);

    // The snapshot is the old disk, byte for byte.
    assert_eq!(
        sha256_prefix(&export, DISK_SIZE),
        old_disk_sha256,
        "the snapshot on the export is not the previous tenant's disk"
    );

    // The report: fetched by the new lessee, verified offline, refused
    // after one byte changes.
    let report_file = dir.path().join("report.json");
    ok_as(
        &server,
        &lab_b,
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
    let bytes = std::fs::read(&report_file).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let r = &report["report"];
    assert_eq!(r["outcome"], "ok", "{report}");
    assert_eq!(r["lease_id"], lease.as_str());
    assert_eq!(r["lessee"], "lab-b");
    assert_eq!(r["owner"], "uni-a");
    assert_eq!(r["image"]["url"], url.as_str());
    assert_eq!(r["image"]["digest"], format!("sha256:{image_sha256}"));
    assert_eq!(r["snapshot"]["uri"], nbd_uri.as_str());
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{report}");
    assert_eq!(disks[0]["status"], "clean");
    assert_eq!(r["final_verdict"]["status"], "ok");
    let mut tampered = bytes.clone();
    let at = tampered
        .windows(lease.len())
        .position(|w| w == lease.as_bytes())
        .unwrap();
    tampered[at + lease.len() - 1] ^= 1;
    let tampered_file = dir.path().join("report-tampered.json");
    std::fs::write(&tampered_file, &tampered).unwrap();
    let out = server
        .wardenctl(&["report", "verify", tampered_file.to_str().unwrap()])
        .unwrap();
    assert!(!out.status.success(), "a changed report was accepted");

    // The tenant's live PCRs are the report's.
    let live = tenant_pcrs(&console);
    let reported = r["pcrs"].as_object().unwrap();
    assert!(reported.contains_key("13"), "{report}");
    for (index, value) in reported {
        let index: u32 = index.parse().unwrap();
        assert_eq!(
            live.get(&index).map(String::as_str),
            value.as_str(),
            "PCR {index}: the tenant reads {:?}, the report says {value}",
            live.get(&index)
        );
    }

    // Who may read what.
    refused_as(&server, &lab_a, &["report", "get", &node_id]);
    refused_as(&server, &other_owner, &["plan", &node_id]);
    let snapshot = ok_as(&server, &lab_a, &["snapshot", &lease]);
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
    assert_eq!(
        snapshot["manifest_sha256"], r["snapshot"]["manifest_sha256"],
        "{snapshot}"
    );
    refused_as(&server, &lab_b, &["snapshot", &lease]);
    refused_as(&server, &owner, &["snapshot", &lease]);
    let progress = ok_as(&server, &lab_b, &["watch", &node_id, "--once", "--json"]);
    let progress: serde_json::Value = serde_json::from_str(&progress).unwrap();
    assert_eq!(progress["plan_state"], "done", "{progress}");
    let log = ok_as(&server, &owner, &["log", &node_id]);
    assert!(log.contains("snapshot"), "console log: {log}");
    let m = metrics(&server);
    for line in [
        "warden_turnovers_total{outcome=\"done\"} 1",
        "warden_attestations_total{phase=\"handoff\",status=\"ok\"} 1",
        "warden_bytes_total{kind=\"snapshotted\"} 268435456",
        "warden_bytes_total{kind=\"erased\"} 268435456",
    ] {
        assert!(
            m.lines().any(|l| l == line),
            "no {line:?} in /metrics:\n{m}"
        );
    }

    // 3. An altered step record fails the final verdict: no handoff, and
    // the report says why.
    ok_as(
        &server,
        &owner,
        &[
            "turnover",
            &node_id,
            "--image",
            &url,
            "--sha256",
            &image_sha256,
            "--wipe",
            "metadata",
            "--handoff",
            "kexec",
            "--lessee",
            "lab-c",
        ],
    );
    let altered = "warden.test_alter_record=wipe";
    // The hook is on the measured command line (PCR 9): the policy refuses
    // it until one is learned for it — a test hook cannot sneak into a
    // node that attests.
    let mut hooked = boot_until_off(
        node("turnover-hook-refused", &server, altered, &disk)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 3a (hook on the command line, old policy)",
    );
    let events = hooked.events();
    let verdicts = events_named(&events, "verdict");
    assert_eq!(verdicts[0]["status"], "failed", "{verdicts:?}");
    assert!(
        verdicts[0]["reasons"][0].as_str().unwrap().contains("PCR9"),
        "{verdicts:?}"
    );
    // Evidence that fails the node's policy quarantines it: no plan runs
    // until its owner, having looked, releases it.
    let quarantine = |server: &Server| {
        let nodes = server.nodes_json().unwrap();
        nodes.nodes[0].quarantine.clone()
    };
    let q = quarantine(&server).expect("boot 3a quarantined the node");
    assert!(q.reason.contains("PCR9"), "{q:?}");
    let released = ok_as(&server, &owner, &["node", "release", &node_id]);
    assert!(released.contains("released node"), "{released}");
    assert!(quarantine(&server).is_none());
    learn_policy(&server, &ramdisk, &node_id, "qemu-turnover-hook");
    let mut third = boot_until_off(
        node("turnover-altered", &server, altered, &disk)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 3 (altered record)",
    );
    let console = third.console_text();
    assert!(
        !console.contains("TENANT-BOOTED"),
        "a node whose record was altered handed off:\n{console}"
    );
    let events = third.events();
    let verdicts = events_named(&events, "verdict");
    assert_eq!(verdicts.last().unwrap()["status"], "failed", "{verdicts:?}");
    let plan = server.wardenctl_ok(&["plan", &node_id, "--json"]).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["state"], "failed", "{plan}");
    let failure = plan["failure"].as_str().unwrap();
    assert!(failure.contains("final attestation failed"), "{failure}");
    assert!(
        failure.contains("PCR13"),
        "not failed by the altered record: {failure}"
    );
    let report_file = dir.path().join("report-failed.json");
    server
        .wardenctl_ok(&[
            "report",
            "get",
            &node_id,
            "-o",
            report_file.to_str().unwrap(),
        ])
        .unwrap();
    let verified = server
        .wardenctl_ok(&["report", "verify", report_file.to_str().unwrap()])
        .unwrap();
    assert!(verified.contains("outcome failed"), "{verified}");
    let q = quarantine(&server).expect("a failed final attestation quarantines");
    assert!(q.reason.contains("PCR13"), "{q:?}");
}
