//! QEMU tier, issue #9: nodes network-boot the ramdisk from the server.
//!
//! The server serves `/boot/` (iPXE scripts, kernel, initramfs, a UKI it
//! builds with its URL and CA pin on the command line). A node on QEMU user
//! networking gets the script's URL from DHCP, QEMU's iPXE ROM runs it, and
//! the agent attests. Boot 1 is refused (no policy) and the policy is learned
//! from it, pinned to the ramdisk's reference values; boot 2 attests OK.
//! Boot 3 takes the kernel + initrd script: this iPXE (Debian 12's, 2019)
//! hands the initrd over as a file the kernel does not measure, so PCR 9
//! lacks the initrd and the server refuses — the reason the default script
//! chains the UKI (docs/netboot.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sha2::{Digest, Sha256};
use warden_qemu_tests::console::events_named;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{Node, NodeBuilder, QemuLock, Server};

fn boot_until_off(mut node: Node, label: &str) -> Node {
    let status = node.wait_power_off(BOOT_TIMEOUT).unwrap();
    assert!(status.success(), "{label}: QEMU exit status {status}");
    eprintln!(
        "netboot: {label}: QEMU ran {:.1} s",
        node.started_at().elapsed().as_secs_f64()
    );
    node
}

fn verdict(node: &mut Node) -> serde_json::Value {
    let events = node.events();
    let verdicts = events_named(&events, "verdict");
    assert_eq!(verdicts.len(), 1, "one verdict:\n{}", node.console_text());
    verdicts[0].clone()
}

fn fetch(url: &str) -> Vec<u8> {
    let out = std::process::Command::new("curl")
        .args(["-sSf", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn nodes_boot_the_ramdisk_from_the_servers_ipxe_script_and_attest() {
    let Some(ramdisk) = warden_qemu_tests::qemu_prerequisites("netboot", &["curl"]) else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let server = Server::start_netboot(&[]).unwrap();
    let boot = server.boot_url().unwrap();

    // What /boot/ serves is what the build made, and says so.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fetch(&format!("{boot}manifest.json"))).unwrap();
    for (name, file) in [
        ("vmlinuz", &ramdisk.kernel),
        ("initramfs.cpio.zst", &ramdisk.initrd),
    ] {
        let served = fetch(&format!("{boot}{name}"));
        assert_eq!(served, std::fs::read(file).unwrap(), "{name}");
        assert_eq!(
            manifest["files"][name]["sha256"],
            hex::encode(Sha256::digest(&served)),
            "{manifest}"
        );
    }
    let uki = fetch(&format!("{boot}warden-ramdisk.efi"));
    assert_eq!(
        manifest["files"]["warden-ramdisk.efi"]["sha256"],
        hex::encode(Sha256::digest(&uki))
    );
    let cmdline = manifest["cmdline"].as_str().unwrap();
    assert!(
        cmdline.contains(&format!("warden.server={}", server.guest_url()))
            && cmdline.contains(&format!("warden.ca={}", server.ca_pin())),
        "{cmdline}"
    );
    let script = String::from_utf8(fetch(&format!("{boot}warden.ipxe"))).unwrap();
    assert!(
        script.contains(&format!("chain warden-ramdisk.efi {cmdline}\n")),
        "{script}"
    );

    let extra = "warden.on_error=poweroff warden.done=poweroff";
    let url = server.guest_boot_url("warden.ipxe", extra).unwrap();

    // 1. No policy yet: refused; the policy is learned from this boot.
    let mut first = boot_until_off(
        NodeBuilder::new("netboot-1").netboot(&url).start().unwrap(),
        "boot 1 (no policy)",
    );
    let console = first.console_text();
    assert!(
        console.contains(&format!(
            "Kernel command line: warden-ramdisk.efi {cmdline} {extra}"
        )),
        "the kernel got the script's command line:\n{console}"
    );
    assert_eq!(verdict(&mut first)["status"], "failed");
    let tpm_state = first.swtpm_state_dir();
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();
    let reference = ramdisk.dir.join("reference-values.json");
    let learned = server
        .wardenctl_ok(&[
            "policy",
            "learn",
            &node_id,
            "--name",
            "qemu-netboot",
            "--ramdisk",
            reference.to_str().unwrap(),
            "--store",
        ])
        .unwrap();
    eprintln!("netboot: learned {learned}");
    server
        .wardenctl_ok(&["policy", "assign", "qemu-netboot", "--node", &node_id])
        .unwrap();

    // 2. The same node, network-booted again: OK.
    let mut second = boot_until_off(
        NodeBuilder::new("netboot-2")
            .netboot(&url)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 2 (policy)",
    );
    let v = verdict(&mut second);
    assert_eq!(v["status"], "ok", "{v}");
    let tpm_state = second.swtpm_state_dir();

    // 3. Kernel + initrd through this iPXE: the initrd is not measured.
    let kernel_url = server.guest_boot_url("warden-kernel.ipxe", extra).unwrap();
    let mut third = boot_until_off(
        NodeBuilder::new("netboot-3")
            .netboot(&kernel_url)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "boot 3 (kernel + initrd)",
    );
    let v = verdict(&mut third);
    assert_eq!(v["status"], "failed", "{v}");
    let why = v.to_string();
    assert!(why.contains("PCR9"), "the reason names PCR 9: {why}");
}
