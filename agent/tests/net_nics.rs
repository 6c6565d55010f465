//! `list_nics` on a fixture `/sys/class/net` tree in a tempdir.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use warden_agent::net::list_nics;
use warden_protocol::hello::Nic;

/// One `/sys/class/net/NAME` directory. `carrier: None` makes `carrier`
/// unreadable, as the kernel does (EINVAL) for a link that is down.
fn iface(
    root: &Path,
    name: &str,
    mac: &str,
    device: Option<Option<&str>>,
    carrier: Option<&str>,
    speed: Option<&str>,
    kind: u32,
) {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("address"), format!("{mac}\n")).unwrap();
    fs::write(dir.join("type"), format!("{kind}\n")).unwrap();
    match carrier {
        Some(c) => fs::write(dir.join("carrier"), format!("{c}\n")).unwrap(),
        // A directory cannot be read as a file: the read fails like EINVAL does.
        None => fs::create_dir(dir.join("carrier")).unwrap(),
    }
    if let Some(s) = speed {
        fs::write(dir.join("speed"), format!("{s}\n")).unwrap();
    }
    if let Some(driver) = device {
        let dev = root.join("../devices").join(name);
        fs::create_dir_all(&dev).unwrap();
        if let Some(driver) = driver {
            let drv = root.join("../bus/pci/drivers").join(driver);
            fs::create_dir_all(&drv).unwrap();
            symlink(&drv, dev.join("driver")).unwrap();
        }
        symlink(&dev, dir.join("device")).unwrap();
    }
}

#[test]
fn lists_physical_nics_and_leaves_out_lo_and_virtual() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("class/net");
    fs::create_dir_all(&root).unwrap();
    iface(&root, "lo", "00:00:00:00:00:00", None, Some("1"), None, 772);
    iface(
        &root,
        "eth0",
        "52:54:00:12:34:56",
        Some(Some("virtio_net")),
        Some("1"),
        Some("1000"),
        1,
    );
    // Down: carrier unreadable, speed -1, no driver bound.
    iface(
        &root,
        "eth1",
        "52:54:00:12:34:57",
        Some(None),
        None,
        Some("-1"),
        1,
    );
    iface(
        &root,
        "veth0",
        "02:00:00:00:00:01",
        None,
        Some("1"),
        Some("10000"),
        1,
    );
    iface(&root, "br0", "02:00:00:00:00:02", None, Some("0"), None, 1);

    let nics = list_nics(&root);
    assert_eq!(
        nics,
        vec![
            Nic {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                driver: Some("virtio_net".into()),
                link: true,
                speed_mbps: Some(1000),
            },
            Nic {
                name: "eth1".into(),
                mac: "52:54:00:12:34:57".into(),
                driver: None,
                link: false,
                speed_mbps: None,
            },
        ]
    );
}

#[test]
fn lists_virtual_nics_when_there_is_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("class/net");
    fs::create_dir_all(&root).unwrap();
    iface(&root, "lo", "00:00:00:00:00:00", None, Some("1"), None, 772);
    iface(
        &root,
        "veth1",
        "02:00:00:00:00:02",
        None,
        Some("0"),
        None,
        1,
    );
    iface(
        &root,
        "veth0",
        "02:00:00:00:00:01",
        None,
        Some("1"),
        Some("10000"),
        1,
    );

    let nics = list_nics(&root);
    let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["veth0", "veth1"]);
    assert_eq!(nics[0].speed_mbps, Some(10000));
    assert!(nics[0].link);
    assert!(!nics[1].link);
    assert_eq!(nics[1].speed_mbps, None);
}

#[test]
fn missing_directory_is_an_empty_list() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(list_nics(&tmp.path().join("nope")).is_empty());
}

#[test]
fn host_sysfs_lists_without_loopback() {
    // The host's real tree: whatever is there, lo must not be, and every MAC
    // must be readable. (Documents that the reader copes with real sysfs.)
    let nics = list_nics(Path::new("/sys/class/net"));
    println!("host NICs: {nics:?}");
    assert!(nics.iter().all(|n| n.name != "lo"));
}
