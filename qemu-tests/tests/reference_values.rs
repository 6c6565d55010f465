//! QEMU tier: the reference values `warden-mkinitramfs` wrote into
//! `build/ramdisk/reference-values.json` are what a real boot measures.
//!
//! Boots the real ramdisk (OVMF + swtpm, `-kernel/-initrd/-append`) against
//! the real server, takes PCR 4 and PCR 9 from the hello the server stored
//! (`wardenctl nodes --json`), and replays them from the JSON alone plus the
//! fixed framing events: PCR 4 = kernel image, edk2's "Calling EFI
//! Application from Boot Option", separator; PCR 9 = the stub's LoadOptions
//! event, then its initrd event. A wrong digest in the file, or a wrong rule
//! for the command line, changes a PCR and fails the test.
//!
//! It keeps `-kernel` on purpose: its subject is the direct-boot prediction
//! (`kernel.qemu_direct_boot`); the network-boot (UKI) composition meets the
//! same `kernel.authenticode_sha256` and `initrd.event_digest` in every
//! netbooted test's OK verdict (netboot.rs, attest_boot.rs, …), whose policy
//! `wardenctl policy learn --ramdisk` pins to them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use warden_initramfs::reference::{
    cmdline_digest, initrd_digest, ovmf_direct_boot_pcr4, qemu_direct_boot_load_options, stub_pcr9,
    ReferenceValues,
};
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{
    prereq, ramdisk_dir, require_program, target_bin, NodeBuilder, QemuLock, Ramdisk, Server,
};

fn prerequisites() -> Option<(Ramdisk, ReferenceValues)> {
    let found = (|| {
        require_program("qemu-system-x86_64")?;
        require_program("swtpm_setup")?;
        target_bin("warden-attest-server")?;
        target_bin("wardenctl")?;
        let ramdisk = ramdisk_dir()?;
        let path = ramdisk.dir.join(warden_initramfs::REFERENCE_VALUES_NAME);
        let text = std::fs::read(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (run `scripts/build-ramdisk` first)",
                path.display()
            )
        })?;
        let refs: ReferenceValues = serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((ramdisk, refs))
    })();
    prereq("reference_values", found)
}

fn hex32(s: &str) -> [u8; 32] {
    hex::decode(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .try_into()
        .unwrap_or_else(|v: Vec<u8>| panic!("{s}: {} bytes, not 32", v.len()))
}

#[test]
fn booted_pcrs_replay_from_reference_values() {
    let Some((ramdisk, refs)) = prerequisites() else {
        return;
    };
    // The file describes these very files (not a stale build).
    let initrd = std::fs::read(&ramdisk.initrd).unwrap();
    assert_eq!(
        refs.initrd.event_digest,
        hex::encode(initrd_digest(&initrd)),
        "{} is stale: rebuild with scripts/build-ramdisk",
        warden_initramfs::REFERENCE_VALUES_NAME
    );

    let _lock = QemuLock::acquire().unwrap();
    let server = Server::start().unwrap();
    let append = format!(
        "console=ttyS0 warden.server={} warden.ca={} warden.done=poweroff",
        server.guest_url(),
        server.ca_pin()
    );
    let qemu = &refs.kernel.qemu_direct_boot;
    let mut node = NodeBuilder::new("refvals")
        .kernel(&ramdisk.kernel, &ramdisk.initrd, &append)
        .memory_mib(u32::try_from(qemu.memory_mib).unwrap())
        .start()
        .unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut wait = |name: &str| {
        let left = deadline.saturating_duration_since(Instant::now());
        node.wait_for_event(name, left).unwrap()
    };
    let node_id = wait("tpm_ready")["node_id"].as_str().unwrap().to_string();
    wait("hello_ok");

    let nodes = server.nodes_json().unwrap().nodes;
    let stored = nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .unwrap_or_else(|| panic!("node {node_id} not listed: {nodes:#?}"));
    let pcr = |i: u32| {
        stored
            .pcrs
            .get(&i)
            .unwrap_or_else(|| panic!("PCR {i} missing: {stored:#?}"))
            .to_lowercase()
    };
    let (pcr4, pcr9) = (pcr(4), pcr(9));

    // PCR 4: under -kernel, QEMU patches the setup header first, so the
    // measured image is the qemu_direct_boot one, not the file.
    let expected4 = ovmf_direct_boot_pcr4(&hex32(&qemu.authenticode_sha256));
    assert_eq!(
        pcr4,
        hex::encode(expected4),
        "PCR 4 does not replay from kernel.qemu_direct_boot.authenticode_sha256"
    );
    let plain4 = ovmf_direct_boot_pcr4(&hex32(&refs.kernel.authenticode_sha256));
    assert_ne!(pcr4, hex::encode(plain4), "QEMU no longer patches -kernel?");

    // PCR 9: LoadOptions as OVMF built them (append + " initrd=initrd",
    // UTF-16LE, NUL-terminated), then the initrd's bytes.
    let options = qemu_direct_boot_load_options(&append, true);
    let initrd_event = hex32(&refs.initrd.event_digest);
    let expected9 = stub_pcr9(&cmdline_digest(&options), &initrd_event);
    assert_eq!(
        pcr9,
        hex::encode(expected9),
        "PCR 9 does not replay from LoadOptions {options:?} + initrd.event_digest"
    );
    // Without OVMF's suffix the rule would be wrong: the test can tell.
    let no_suffix = stub_pcr9(&cmdline_digest(&append), &initrd_event);
    assert_ne!(pcr9, hex::encode(no_suffix));

    eprintln!(
        "reference_values: PCR 4 {pcr4} and PCR 9 {pcr9} replay from {}",
        warden_initramfs::REFERENCE_VALUES_NAME
    );
    // The PCRs were all this test is about; what the agent does after the
    // hello (enrollment, plans) is other tests' business.
    node.kill();
}
