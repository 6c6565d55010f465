//! QEMU tier: network-boots the real Warden ramdisk (build/ramdisk, as the
//! UKI the server's `warden.ipxe` chains) through OVMF and QEMU's iPXE ROM
//! with a swtpm, a virtio-blk and an NVMe disk, against the real server on
//! the host (trusting swtpm-localca as the EK manufacturer), and checks what
//! the agent reports and what the server stored: hello, enrollment of a
//! fresh AK through the kernel's TPM driver, and an attestation with the
//! real OVMF event log that the server refuses only for want of a policy —
//! after which the node powers off (`warden.on_error=poweroff`).
//!
//! One test function (and the QemuLock) keeps QEMU runs from overlapping on
//! this 2-core machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;

use std::time::{Duration, Instant};

use serde_json::Value;
use warden_qemu_tests::handoff::netboot_server_with;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{DiskBus, NodeBuilder, QemuLock, Ramdisk};

const GIB: u64 = 1 << 30;

fn prerequisites() -> Option<Ramdisk> {
    warden_qemu_tests::qemu_prerequisites("boot", &[])
}

/// Module names as the kernel spells them (`-` and `_` are the same).
fn module_name(v: &Value) -> String {
    v.as_str().unwrap_or_default().replace('-', "_")
}

#[test]
fn ramdisk_boots_enrolls_attests_and_server_lists_the_node() {
    let Some(_ramdisk) = prerequisites() else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let (server, url) = netboot_server_with("warden.on_error=poweroff warden.log=debug").unwrap();
    let mut node = NodeBuilder::new("boot")
        .netboot(&url)
        .disk(DiskBus::VirtioBlk, GIB)
        .disk(DiskBus::Nvme, 2 * GIB)
        .start()
        .unwrap();

    // One deadline for the whole boot; events are found in any order.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut wait = |name: &str| {
        let left = deadline.saturating_duration_since(Instant::now());
        node.wait_for_event(name, left).unwrap()
    };

    let modules = wait("modules_loaded");
    let loaded: Vec<String> = modules["loaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(module_name)
        .collect();
    let failed: Vec<String> = modules["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| module_name(&f["module"]))
        .collect();
    for m in ["virtio_blk", "virtio_net", "nvme"] {
        assert!(loaded.iter().any(|l| l == m), "{m} not loaded: {modules}");
        assert!(!failed.iter().any(|f| f == m), "{m} failed: {modules}");
    }

    let lease = wait("dhcp_lease");
    let addr = lease["address"].as_str().unwrap();
    let ip: Ipv4Addr = addr.split('/').next().unwrap().parse().unwrap();
    assert_eq!(ip.octets()[..3], [10, 0, 2], "lease {lease}");

    let tpm = wait("tpm_ready");
    assert_eq!(tpm["pcr_count"], 24, "{tpm}");
    let node_id = tpm["node_id"].as_str().unwrap().to_string();

    let log = wait("event_log");
    assert!(log["bytes"].as_u64().unwrap() > 0, "{log}");

    let inventory = wait("inventory");
    assert_eq!(
        inventory["disks"].as_array().unwrap().len(),
        2,
        "{inventory}"
    );

    let hello = wait("hello_ok");
    assert_eq!(hello["node_id"], node_id.as_str(), "{hello}");
    let enrolled = wait("enrolled");
    assert_eq!(enrolled["node_id"], node_id.as_str(), "{enrolled}");
    // A new node has no policy: the evidence is genuine (signature, nonce,
    // PCR digest, event log replay all pass), the policy check is what fails.
    let verdict = wait("verdict");
    assert_eq!(verdict["status"], "failed", "{verdict}");
    assert_eq!(
        verdict["codes"],
        serde_json::json!(["no-policy"]),
        "{verdict}"
    );
    let fatal = wait("fatal");
    assert_eq!(fatal["action"], "poweroff", "{fatal}");
    // The kernel came over the network: iPXE chained the UKI with the
    // server's URL and CA pin as its command line.
    let console = node.console_text();
    let expected = format!(
        "Kernel command line: warden-ramdisk.efi warden.server={} warden.ca={} ",
        server.guest_url(),
        server.ca_pin()
    );
    assert!(
        console.contains(&expected),
        "{expected:?} not on the console:\n{console}"
    );
    eprintln!(
        "boot: verdict after {:.2} s from QEMU start; ek_certificate {}",
        node.started_at().elapsed().as_secs_f64(),
        tpm["ek_certificate"]
    );

    // Every transition of the state machine is on the console, in order.
    let path: Vec<String> = node
        .events()
        .iter()
        .filter(|e| e["event"] == "state")
        .map(|e| e["to"].as_str().unwrap().to_string())
        .collect();
    let expected = [
        "Init",
        "Coldplug",
        "Network",
        "Tpm",
        "EventLog",
        "Settle",
        "Inventory",
        "Hello",
        "Enroll",
        "Attest",
        "Failed",
    ];
    assert_eq!(
        path.get(..expected.len()),
        Some(&expected.map(String::from)[..]),
        "{path:?}"
    );

    let nodes = server.nodes_json().unwrap().nodes;
    let stored = nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .unwrap_or_else(|| panic!("node {node_id} not listed: {nodes:#?}"));
    assert_eq!(stored.inventory.disks.len(), 2, "{stored:#?}");
    assert_eq!(stored.pcrs.len(), 24, "{stored:#?}");

    // The server kept the genuine evidence: a policy can be learned from it.
    let learned = server
        .wardenctl(&["policy", "learn", &node_id, "--name", "boot"])
        .unwrap();
    assert!(
        learned.status.success(),
        "wardenctl policy learn: {}{}",
        String::from_utf8_lossy(&learned.stdout),
        String::from_utf8_lossy(&learned.stderr)
    );

    // warden.on_error=poweroff: the guest powers off and QEMU exits by itself.
    let status = node.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "QEMU exit status {status}");
}
