//! Parses the real Debian 12 module index of the ramdisk's kernel
//! (installed by scripts/setup) and resolves QEMU's devices through it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use warden_kmod::{AliasIndex, DepIndex};

const DIR: &str = "/lib/modules/6.1.0-56-amd64";

fn read(name: &str) -> Option<String> {
    let path = Path::new(DIR).join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot read {} ({e}); run scripts/setup",
                path.display()
            );
            None
        }
    }
}

#[test]
fn whole_index_parses_and_resolves_qemu_devices() {
    let (Some(dep), Some(alias)) = (read("modules.dep"), read("modules.alias")) else {
        return;
    };
    let dep = DepIndex::parse(&dep).unwrap();
    let alias = AliasIndex::parse(&alias).unwrap();
    assert!(dep.entries().len() > 3000);

    let nvme = alias.lookup("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02");
    assert!(nvme.contains(&"nvme".to_string()), "{nvme:?}");
    let order = dep.closure(&nvme).unwrap();
    let pos = |m: &str| order.iter().position(|n| n == m).unwrap();
    assert!(pos("crc64") < pos("crc64_rocksoft"));
    assert!(pos("t10_pi") < pos("nvme_core"));
    assert!(pos("nvme_core") < pos("nvme"));

    let vpci = alias.lookup("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00");
    assert_eq!(vpci, ["virtio_pci"]);
    assert_eq!(
        dep.closure(&vpci).unwrap(),
        [
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
            "virtio_pci"
        ]
    );
    assert_eq!(alias.lookup("virtio:d00000001v00001AF4"), ["virtio_net"]);
    assert_eq!(
        dep.closure(&["virtio_net"]).unwrap(),
        [
            "virtio_ring",
            "virtio",
            "failover",
            "net_failover",
            "virtio_net"
        ]
    );
}
