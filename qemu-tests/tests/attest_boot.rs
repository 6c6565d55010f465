//! QEMU tier, issue #3's "must show": one node (one TPM) network-boots the
//! real ramdisk four times from the real server, as a site boots it (QEMU's
//! iPXE ROM runs the server's `warden.ipxe`, which chains the UKI;
//! docs/netboot.md).
//! 1. New node: enrolls, attests, refused only for want of a policy.
//! 2. The owner learns a policy from that attestation, pinned to the
//!    ramdisk's reference values (`reference-values.json` from the build),
//!    and assigns it: the same node reboots and attests OK.
//! 3. The same node with Secure Boot firmware (OVMF secboot, the snakeoil
//!    key enrolled): QEMU's iPXE ROM is unsigned, so it UEFI-HTTP-boots a
//!    signed copy of the server's UKI. FAILED, and the reason names PCR7
//!    and the SecureBoot variable.
//! 4. The same node with a modified ramdisk: the initrd in the server's
//!    boot directory is replaced (as by someone who can write to the boot
//!    server) and the server restarted, so the UKI it builds and serves
//!    holds it. FAILED on PCR9's initrd event.
//!
//! Every refused boot powers off without touching a disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::secureboot;
use warden_qemu_tests::{prereq, DiskBus, Node, NodeBuilder, QemuLock, Ramdisk, Server};

fn prerequisites() -> Option<Ramdisk> {
    let ramdisk = warden_qemu_tests::qemu_prerequisites("attest_boot", &[])?;
    prereq("attest_boot", secureboot::prerequisites())?;
    Some(ramdisk)
}

fn wardenctl(server: &Server, args: &[&str]) -> String {
    server.wardenctl_ok(args).unwrap()
}

/// Boots, waits for the verdict, then for QEMU to power off by itself.
fn boot_to_verdict(mut node: Node) -> (Node, Value) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now());
    node.wait_for_event("enrolled", left()).unwrap();
    let verdict = node.wait_for_event("verdict", left()).unwrap();
    eprintln!(
        "attest_boot: verdict {} after {:.1} s: {}",
        verdict["status"],
        node.started_at().elapsed().as_secs_f64(),
        verdict["reasons"]
    );
    let status = node.wait_power_off(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "QEMU exit status {status}");
    (node, verdict)
}

fn reasons(verdict: &Value) -> String {
    verdict["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes to `out` the ramdisk's initrd with one more (uncompressed) cpio
/// archive appended, as an attacker adding a file would; the kernel
/// unpacks both.
fn write_modified_initrd(ramdisk: &Ramdisk, out: &Path) {
    let mut bytes = std::fs::read(&ramdisk.initrd).unwrap();
    // A newc archive holding one file "/etc/extra" and the trailer.
    let entry = |name: &str, mode: u32, data: &[u8]| {
        let mut e = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .into_bytes();
        e.extend_from_slice(name.as_bytes());
        e.push(0);
        while e.len() % 4 != 0 {
            e.push(0);
        }
        e.extend_from_slice(data);
        while e.len() % 4 != 0 {
            e.push(0);
        }
        e
    };
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    bytes.extend(entry(
        "etc/extra",
        0o100_644,
        b"not in the reference ramdisk\n",
    ));
    bytes.extend(entry("TRAILER!!!", 0, b""));
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn node_attests_ok_then_is_refused_for_secure_boot_and_a_modified_ramdisk() {
    let Some(ramdisk) = prerequisites() else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let work = tempfile::Builder::new()
        .prefix("warden-attest-boot-")
        .tempdir()
        .unwrap();
    // The server serves a copy of the ramdisk, so boot 4 can change it.
    let boot_dir = work.path().join("boot");
    std::fs::create_dir(&boot_dir).unwrap();
    for f in [&ramdisk.kernel, &ramdisk.initrd] {
        std::fs::copy(f, boot_dir.join(f.file_name().unwrap())).unwrap();
    }
    // The same command line every boot, in the UKI and the script: it is
    // measured too (PCR 9).
    let mut server = Server::start_netboot_from(
        &boot_dir,
        &[
            "--boot-cmdline".into(),
            "console=ttyS0 warden.on_error=poweroff warden.done=poweroff".into(),
        ],
    )
    .unwrap();
    let url = server.guest_boot_url("warden.ipxe", "").unwrap();
    let builder = |name: &str, url: &str| {
        NodeBuilder::new(name)
            .netboot(url)
            .disk(DiskBus::VirtioBlk, 1 << 30)
    };

    // 1. A new node: genuine evidence, no policy yet.
    let (first, verdict) = boot_to_verdict(builder("attest-new", &url).start().unwrap());
    assert_eq!(verdict["status"], "failed", "{verdict}");
    assert_eq!(
        verdict["codes"],
        serde_json::json!(["no-policy"]),
        "{verdict}"
    );
    let tpm_state = first.swtpm_state_dir();
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();

    // 2. The owner's policy: learned from that boot, pinned to the build's
    //    reference values for the ramdisk kernel and initrd.
    let reference = ramdisk.dir.join("reference-values.json");
    let policy_file = first.dir().join("policy.json");
    wardenctl(
        &server,
        &[
            "policy",
            "learn",
            &node_id,
            "--name",
            "qemu-ovmf",
            "--ramdisk",
            reference.to_str().unwrap(),
            "--out",
            policy_file.to_str().unwrap(),
        ],
    );
    let policy: Value =
        serde_json::from_str(&std::fs::read_to_string(&policy_file).unwrap()).unwrap();
    assert!(
        policy["pcrs"].get("1").is_none(),
        "no PCR1 by default: {policy}"
    );
    wardenctl(&server, &["policy", "put", policy_file.to_str().unwrap()]);
    wardenctl(
        &server,
        &["policy", "assign", "qemu-ovmf", "--node", &node_id],
    );

    let (second, verdict) = boot_to_verdict(
        builder("attest-ok", &url)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
    );
    assert_eq!(verdict["status"], "ok", "{verdict}\n{}", reasons(&verdict));
    assert_eq!(verdict["policy"]["name"], "qemu-ovmf", "{verdict}");
    let mut second = second;
    second
        .wait_for_event("ready", Duration::from_secs(5))
        .unwrap();
    let tpm_state = second.swtpm_state_dir();
    let verdict_cli = wardenctl(&server, &["verdict", &node_id]);
    assert!(verdict_cli.contains("verdict OK"), "{verdict_cli}");

    // 3. Secure Boot turned on (another firmware build, keys enrolled): it
    //    boots only a signed image, so the UKI the server serves, signed.
    let signed = secureboot::signed_uki(&server, work.path()).unwrap();
    let uki_port = warden_qemu_tests::http::serve_file(&signed).unwrap();
    let (third, verdict) = boot_to_verdict(
        NodeBuilder::new("attest-secboot")
            .firmware(
                Path::new(secureboot::OVMF_CODE),
                Path::new(secureboot::OVMF_VARS),
            )
            .uefi_http_boot(&format!("http://10.0.2.2:{uki_port}/warden-ramdisk.efi"))
            .disk(DiskBus::VirtioBlk, 1 << 30)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
    );
    let why = reasons(&verdict);
    assert_eq!(verdict["status"], "failed", "{verdict}");
    assert!(
        why.contains("PCR7: SecureBoot changed from 0 to 1"),
        "the reason names PCR7 and the variable:\n{why}"
    );
    let tpm_state = third.swtpm_state_dir();

    // 4. A modified ramdisk on the original firmware: the server, restarted,
    //    builds its UKI from the changed boot directory.
    write_modified_initrd(
        &ramdisk,
        &boot_dir.join(ramdisk.initrd.file_name().unwrap()),
    );
    server.start_again().unwrap();
    let url = server.guest_boot_url("warden.ipxe", "").unwrap();
    let (_fourth, verdict) = boot_to_verdict(
        builder("attest-modified", &url)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
    );
    let why = reasons(&verdict);
    assert_eq!(verdict["status"], "failed", "{verdict}");
    assert!(
        why.contains("PCR9: Linux initrd digest"),
        "the reason names PCR9 and the initrd event:\n{why}"
    );

    // The audit log has all four, newest first.
    let log = wardenctl(&server, &["attestations", &node_id, "--json"]);
    let log: Value = serde_json::from_str(&log).unwrap();
    let statuses: Vec<&str> = log["attestations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["verdict"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["failed", "failed", "ok", "failed"], "{log}");
}
