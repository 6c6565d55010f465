//! QEMU tier, issue #9: the production-like network boot of LAB.md.
//!
//! In a network namespace the test creates (bridge + tap, removed on drop):
//! dnsmasq answers DHCP and TFTP, the real server listens on the bridge
//! address, and one QEMU node (OVMF + swtpm, no iPXE ROM) boots the way a
//! bare-metal node on a site's PXE network would. OVMF's PXE client gets
//! `ipxe.efi` over TFTP; iPXE asks DHCP again, is recognised by its user
//! class and gets the server's `/boot/warden.ipxe`, which chains the UKI.
//! The agent then enrolls with the server and attests; with no policy yet
//! the server refuses, and the test checks that refusal is the server's
//! own record. The dnsmasq log must show both DHCP stages and the TFTP
//! transfer, in that order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use warden_protocol::attest::AttestationList;
use warden_qemu_tests::console::events_named;
use warden_qemu_tests::netns::{self, Dnsmasq, NetNs};
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{prereq, NodeBuilder, QemuLock, Server};

const TEST: &str = "netboot_dnsmasq";

/// The byte offset of the first line of `log` that contains every one of
/// `needles`, after offset `from`.
fn line_with(log: &str, from: usize, needles: &[&str]) -> Option<usize> {
    let mut offset = from;
    for line in log[from..].split_inclusive('\n') {
        if needles.iter().all(|n| line.contains(n)) {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

#[test]
fn a_node_pxe_boots_through_dnsmasq_and_ipxe_and_attests() {
    let Some(_ramdisk) = warden_qemu_tests::qemu_prerequisites(TEST, &["ip", "dnsmasq"]) else {
        return;
    };
    let ipxe = std::path::Path::new(netns::IPXE_EFI);
    let found = if ipxe.is_file() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{} is missing (install ipxe: scripts/setup)",
            ipxe.display()
        ))
    };
    if prereq(TEST, found).is_none() {
        return;
    }
    let _lock = QemuLock::acquire().unwrap();
    // Declared before the server, dnsmasq and the node, so dropped after
    // them (also on a panic): the namespace is only removed once nothing
    // runs in it.
    let Some(ns) = prereq(TEST, NetNs::create("nb")) else {
        return;
    };

    // `console=ttyS0`: without it this boot (OVMF PXE, Debian's ipxe.efi,
    // the UKI) showed nothing on the serial port after the EFI stub, and the
    // harness reads the agent's events there. `warden.on_error`/`done`: the
    // agent powers the node off after its verdict, whatever it is. On
    // the server's command line, not in the URL: dnsmasq names the plain
    // script, as a site's DHCP would.
    let server = Server::start_netboot_in_netns(
        ns.name(),
        netns::HOST_IP,
        &[
            "--boot-cmdline".into(),
            "console=ttyS0 warden.on_error=poweroff warden.done=poweroff".into(),
        ],
    )
    .unwrap();
    let script_url = format!("{}warden.ipxe", server.boot_url().unwrap());
    assert!(
        script_url.starts_with(&format!("http://{}:", netns::HOST_IP)),
        "{script_url}"
    );
    let dnsmasq = Dnsmasq::start_pxe(&ns, &script_url).unwrap();

    let mut node = NodeBuilder::new("netboot-dnsmasq")
        .tap(ns.name(), netns::TAP)
        .start()
        .unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now());
    let enrolled = node.wait_for_event("enrolled", left()).unwrap();
    let verdict = node.wait_for_event("verdict", left()).unwrap();
    let status = node.wait_power_off(left()).unwrap();
    eprintln!(
        "{TEST}: QEMU ran {:.1} s; verdict {verdict}",
        node.started_at().elapsed().as_secs_f64()
    );
    assert!(status.success(), "QEMU exit status {status}");
    let console = node.console_text();
    let events = node.events();

    // The UKI got the server's command line: its URL on the bridge.
    assert!(
        console.contains(&format!("warden.server={}", server.guest_url()))
            && console.contains(&format!("warden.ca={}", server.ca_pin())),
        "the kernel got the server's command line:\n{console}"
    );
    assert!(
        server
            .guest_url()
            .starts_with(&format!("https://{}:", netns::HOST_IP)),
        "{}",
        server.guest_url()
    );
    // The agent's own lease came from dnsmasq on the bridge.
    let leases = events_named(&events, "dhcp_lease");
    assert!(!leases.is_empty(), "no dhcp_lease event:\n{console}");
    assert_eq!(
        leases[0]["server"],
        netns::HOST_IP.to_string(),
        "{}",
        leases[0]
    );

    // Enrollment succeeded, and the verdict is the server's: the node it
    // enrolled has the console's node id and reached it over the bridge,
    // and its audit log holds exactly the attestation the console shows.
    assert_eq!(verdict["status"], "failed", "{verdict}");
    assert_eq!(
        verdict["codes"],
        serde_json::json!(["no-policy"]),
        "{verdict}"
    );
    let nodes = server.nodes_json().unwrap().nodes;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node_id = nodes[0].node_id.clone();
    assert_eq!(enrolled["node_id"], node_id.as_str(), "{enrolled}");
    let subnet = {
        let o = netns::HOST_IP.octets();
        format!("{}.{}.{}.", o[0], o[1], o[2])
    };
    assert!(
        nodes[0].peer_address.starts_with(&subnet),
        "the agent reached the server from the bridge network: {}",
        nodes[0].peer_address
    );
    let log = server
        .wardenctl_ok(&["attestations", &node_id, "--json"])
        .unwrap();
    let log: AttestationList = serde_json::from_str(&log).unwrap();
    assert_eq!(log.attestations.len(), 1, "{log:?}");
    let recorded = &log.attestations[0].verdict;
    assert_eq!(
        serde_json::json!(recorded.attestation_id),
        verdict["attestation_id"],
        "{recorded:?}"
    );
    assert_eq!(recorded.node_id, node_id);
    let recorded_json = serde_json::to_value(recorded).unwrap();
    assert_eq!(recorded_json["status"], "failed", "{recorded_json}");
    assert_eq!(
        recorded_json["reasons"][0]["code"], "no-policy",
        "{recorded_json}"
    );

    // dnsmasq saw both DHCP stages and served ipxe.efi over TFTP, in that
    // order: the firmware's PXE client (vendor class PXEClient, no user
    // class) offered ipxe.efi, the TFTP transfer, then iPXE (user class
    // iPXE, so tag ipxe) offered the script URL. `--log-dhcp` prefixes each
    // exchange's lines with its transaction id.
    let dlog = dnsmasq.log_text();
    let pxe = line_with(&dlog, 0, &["vendor class: PXEClient"])
        .unwrap_or_else(|| panic!("no PXE client DHCP request in the dnsmasq log:\n{dlog}"));
    let pxe_offer = line_with(&dlog, pxe, &["option: 67 bootfile-name  ipxe.efi"])
        .unwrap_or_else(|| panic!("ipxe.efi was not offered to the PXE client:\n{dlog}"));
    let tftp = line_with(
        &dlog,
        pxe_offer,
        &["dnsmasq-tftp", "sent ", "/ipxe.efi to "],
    )
    .unwrap_or_else(|| panic!("no TFTP transfer of ipxe.efi after the PXE offer:\n{dlog}"));
    let ipxe_class = line_with(&dlog, tftp, &["user class: iPXE"])
        .unwrap_or_else(|| panic!("no DHCP request with user class iPXE after TFTP:\n{dlog}"));
    line_with(&dlog, ipxe_class, &["tags: ipxe"])
        .unwrap_or_else(|| panic!("the iPXE request was not tagged ipxe:\n{dlog}"));
    line_with(
        &dlog,
        ipxe_class,
        &[&format!("option: 67 bootfile-name  {script_url}")],
    )
    .unwrap_or_else(|| panic!("iPXE was not offered {script_url}:\n{dlog}"));
    // The PXE stage was the firmware's, not iPXE's: no user class before the
    // TFTP transfer.
    assert!(
        !dlog[..tftp].contains("user class: iPXE"),
        "iPXE asked before ipxe.efi was sent:\n{dlog}"
    );
    drop(dnsmasq);
    drop(server);
    drop(node);
    let name = ns.name().to_string();
    drop(ns);
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&name),
        "network namespace {name} is still there"
    );
}
