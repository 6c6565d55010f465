//! Disk inventory and device capabilities: the local block devices the
//! agent would act on, read straight from `/sys/block` (the ramdisk has no
//! `lsblk`), what each can do ([`caps`]), and the firmware erase interface
//! of NVMe and ATA drives ([`hw`], [`nvme`], [`ata`]).
//!
//! The inventory (this file) and [`caps`] never write to a device. Only
//! [`SecureErase::erase`] changes a disk, and only when the wipe module asks
//! for a named method. Every ioctl lives in [`ioctl`]. The sysfs (and procfs)
//! roots are parameters so tests run on fixture trees.

use std::fs;
use std::path::Path;

use warden_protocol::hello::Disk;

pub mod ata;
pub mod caps;
pub mod hw;
pub mod ioctl;
pub mod nvme;

pub use caps::{probe, probe_in, DeviceCaps, InUse};
pub use hw::{open_secure_erase, open_secure_erase_with, HwCaps, HwError, HwMethod, SecureErase};

/// What to include beyond real disks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Include attached `loop*` devices (host tests use them as disks).
    pub include_loop: bool,
}

/// Why the inventory could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("cannot list block devices in {path}: {source}")]
pub struct DiskError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// Devices that are never tenant disks: RAM disks (the ramdisk itself),
/// compressed swap, and (for now) device-mapper and MD arrays, whose members
/// are listed themselves.
fn skipped(name: &str, opts: DiskOptions) -> bool {
    name.starts_with("ram")
        || name.starts_with("zram")
        || name.starts_with("dm-")
        || name.starts_with("md")
        || (name.starts_with("loop") && !opts.include_loop)
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn read_u64(path: &Path) -> u64 {
    read_trimmed(path).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn read_bool(path: &Path) -> bool {
    read_u64(path) != 0
}

/// The transport, from where the device sits in the device tree (the target
/// of the `/sys/block/NAME` link, e.g.
/// `../devices/pci0000:00/0000:00:04.0/virtio1/block/vda`).
fn transport(name: &str, device_path: &str) -> &'static str {
    if name.starts_with("loop") {
        "loop"
    } else if name.starts_with("nvme") || device_path.contains("/nvme/") {
        "nvme"
    } else if device_path.contains("/ata") {
        "ata"
    } else if device_path.contains("/host") && device_path.contains("/target") {
        // SCSI hosts: HBAs, virtio-scsi, USB storage.
        "scsi"
    } else if device_path.contains("/virtio") {
        "virtio"
    } else {
        "unknown"
    }
}

/// Reads one `/sys/block/NAME` directory.
fn read_disk(dir: &Path, name: &str) -> Disk {
    let device_path = fs::read_link(dir)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let q = dir.join("queue");
    let size_sectors = read_u64(&dir.join("size"));
    Disk {
        name: name.to_string(),
        path: format!("/dev/{name}"),
        // `size` is in 512-byte sectors whatever the logical block size.
        size_bytes: size_sectors.saturating_mul(512),
        logical_block_size: u32::try_from(read_u64(&q.join("logical_block_size"))).unwrap_or(0),
        physical_block_size: u32::try_from(read_u64(&q.join("physical_block_size"))).unwrap_or(0),
        rotational: read_bool(&q.join("rotational")),
        removable: read_bool(&dir.join("removable")),
        read_only: read_bool(&dir.join("ro")),
        transport: transport(name, &device_path).to_string(),
        model: read_trimmed(&dir.join("device/model")),
        // virtio-blk has `serial` on the disk; NVMe (and some SCSI) on the device.
        serial: read_trimmed(&dir.join("serial"))
            .or_else(|| read_trimmed(&dir.join("device/serial"))),
        discard_granularity: read_u64(&q.join("discard_granularity")),
        discard_max_bytes: read_u64(&q.join("discard_max_bytes")),
        write_zeroes_max_bytes: read_u64(&q.join("write_zeroes_max_bytes")),
    }
}

/// Lists the disks under `sys_root/block`, sorted by name. Devices with no
/// medium (size 0: empty drives, unattached loops) are left out.
pub fn list_disks(sys_root: &Path, opts: DiskOptions) -> Result<Vec<Disk>, DiskError> {
    let block = sys_root.join("block");
    let entries = fs::read_dir(&block).map_err(|source| DiskError {
        path: block.display().to_string(),
        source,
    })?;
    let mut disks = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if skipped(&name, opts) {
            continue;
        }
        let disk = read_disk(&entry.path(), &name);
        if disk.size_bytes == 0 {
            tracing::debug!(disk = %name, "disk: skipped, no medium (size 0)");
            continue;
        }
        disks.push(disk);
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Creates `sys/devices/<devpath>/block/<name>` with `files` and the
    /// `sys/block/<name>` link to it, as the kernel lays them out.
    fn add(sys: &Path, devpath: &str, name: &str, files: &[(&str, &str)]) {
        let dir = sys.join("devices").join(devpath).join("block").join(name);
        for (file, value) in files {
            let p = dir.join(file);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("{value}\n")).unwrap();
        }
        fs::create_dir_all(sys.join("block")).unwrap();
        symlink(
            format!("../devices/{devpath}/block/{name}"),
            sys.join("block").join(name),
        )
        .unwrap();
    }

    fn fixture() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        add(
            sys,
            "pci0000:00/0000:00:04.0/virtio1",
            "vda",
            &[
                ("size", "4194304"),
                ("ro", "0"),
                ("removable", "0"),
                ("serial", "vd-serial-1"),
                ("queue/logical_block_size", "512"),
                ("queue/physical_block_size", "512"),
                ("queue/rotational", "1"),
                ("queue/discard_granularity", "512"),
                ("queue/discard_max_bytes", "2147483136"),
                ("queue/write_zeroes_max_bytes", "2147483136"),
            ],
        );
        add(
            sys,
            "pci0000:00/0000:00:05.0/nvme/nvme0",
            "nvme0n1",
            &[
                ("size", "2097152"),
                ("device/model", "QEMU NVMe Ctrl                          "),
                ("device/serial", "n1      "),
                ("queue/logical_block_size", "4096"),
                ("queue/physical_block_size", "4096"),
                ("queue/rotational", "0"),
                ("queue/discard_granularity", "4096"),
                ("queue/discard_max_bytes", "0"),
                ("queue/write_zeroes_max_bytes", "0"),
            ],
        );
        add(
            sys,
            "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
            "sda",
            &[
                ("size", "100"),
                ("removable", "1"),
                ("ro", "1"),
                ("device/model", "QEMU HARDDISK"),
            ],
        );
        add(
            sys,
            "pci0000:00/0000:00:06.0/virtio2/host1/target1:0:0/1:0:0:0",
            "sdb",
            &[("size", "8")],
        );
        add(sys, "virtual", "loop0", &[("size", "2048")]);
        add(sys, "virtual", "loop1", &[("size", "0")]);
        add(sys, "virtual", "ram0", &[("size", "8192")]);
        add(sys, "virtual", "zram0", &[("size", "8192")]);
        add(sys, "virtual", "dm-0", &[("size", "8192")]);
        add(sys, "virtual", "md127", &[("size", "8192")]);
        add(sys, "platform/sr", "sr0", &[("size", "0")]);
        t
    }

    #[test]
    fn reads_a_fixture_tree() {
        let t = fixture();
        let disks = list_disks(t.path(), DiskOptions::default()).unwrap();
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["nvme0n1", "sda", "sdb", "vda"]);

        let vda = &disks[3];
        assert_eq!(
            *vda,
            Disk {
                name: "vda".into(),
                path: "/dev/vda".into(),
                size_bytes: 4194304 * 512,
                logical_block_size: 512,
                physical_block_size: 512,
                rotational: true,
                removable: false,
                read_only: false,
                transport: "virtio".into(),
                model: None,
                serial: Some("vd-serial-1".into()),
                discard_granularity: 512,
                discard_max_bytes: 2147483136,
                write_zeroes_max_bytes: 2147483136,
            }
        );
        let nvme = &disks[0];
        assert_eq!(nvme.transport, "nvme");
        assert_eq!(nvme.model.as_deref(), Some("QEMU NVMe Ctrl"));
        assert_eq!(nvme.serial.as_deref(), Some("n1"));
        assert_eq!(nvme.logical_block_size, 4096);
        assert_eq!(nvme.size_bytes, 2097152 * 512);
        assert!(!nvme.rotational);
        let sda = &disks[1];
        assert_eq!(sda.transport, "ata");
        assert!(sda.removable && sda.read_only);
        assert_eq!(sda.discard_granularity, 0);
        assert_eq!(disks[2].transport, "scsi");
    }

    #[test]
    fn loop_devices_only_when_asked() {
        let t = fixture();
        let disks = list_disks(t.path(), DiskOptions { include_loop: true }).unwrap();
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["loop0", "nvme0n1", "sda", "sdb", "vda"]);
        assert_eq!(disks[0].transport, "loop");
    }

    #[test]
    fn missing_sysfs_names_the_path() {
        let t = tempfile::tempdir().unwrap();
        let err = list_disks(t.path(), DiskOptions::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("{}/block", t.path().display())),
            "{err}"
        );
    }

    #[test]
    fn runs_against_the_host_sysfs() {
        let disks = list_disks(Path::new("/sys"), DiskOptions { include_loop: true }).unwrap();
        for d in &disks {
            assert!(d.size_bytes > 0, "{d:?}");
            assert!(!d.name.starts_with("ram"), "{d:?}");
            assert_eq!(d.path, format!("/dev/{}", d.name));
        }
        eprintln!(
            "host disks: {:?}",
            disks
                .iter()
                .map(|d| (&d.name, &d.transport))
                .collect::<Vec<_>>()
        );
    }
}
