//! Device capabilities beyond the inventory: whether a discarded block reads
//! back as zeros, write-zeroes and secure-discard support, the firmware
//! erase methods, and whether anything (a mount, a holder, swap, a loop
//! device) is using the disk.
//!
//! Reading only: this module opens device nodes to ask questions (Identify,
//! IDENTIFY DEVICE, READ CAPACITY(16), a BLKSECDISCARD that the kernel
//! rejects before any I/O), and never writes a block. The sysfs and procfs
//! roots are parameters so the in-use logic runs on fixture trees.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use warden_protocol::hello::Disk;

use super::ata::AtaDrive;
use super::hw::{HwCaps, SecureErase};
use super::ioctl::{self, AdminIo, DevIo, Dir, SCSI_CHECK_CONDITION};
use super::nvme::NvmeDrive;

/// What a device can do and whether it is free to erase.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceCaps {
    /// Kernel name, e.g. `nvme0n1`.
    pub name: String,
    /// `/dev/NAME`.
    pub path: String,
    pub transport: String,
    /// `queue/discard_max_bytes` > 0.
    pub discard: bool,
    /// A discarded block is guaranteed to read back as zeros, so a discard
    /// alone counts as zeroing. False when not guaranteed or unknown.
    pub zeroes_after_discard: bool,
    /// Where that answer comes from, for the report (e.g. "NVMe DLFEAT=0x9:
    /// deallocated blocks read zeros").
    pub zeroes_after_discard_basis: String,
    /// `queue/write_zeroes_max_bytes` > 0: BLKZEROOUT is offloaded to the
    /// device (otherwise the kernel writes zero pages itself).
    pub write_zeroes: bool,
    /// BLKSECDISCARD support: `Some` when the kernel answered the probe,
    /// `None` when it could not be asked (old kernel, read-only, not probed).
    pub secure_discard: Option<bool>,
    pub secure_discard_basis: String,
    /// Everything that uses the disk; empty when it is free.
    pub in_use: Vec<InUse>,
    /// Firmware erase methods and why others are unavailable.
    pub hw: HwCaps,
    /// Why the firmware interface could not be probed, if it could not.
    pub hw_error: Option<String>,
}

impl DeviceCaps {
    /// One sentence naming every user of the disk, or None when it is free.
    pub fn in_use_reason(&self) -> Option<String> {
        if self.in_use.is_empty() {
            return None;
        }
        let parts: Vec<String> = self.in_use.iter().map(|u| u.to_string()).collect();
        Some(format!("{} is in use: {}", self.path, parts.join("; ")))
    }
}

/// One user of a disk or of one of its partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InUse {
    /// `device` (the disk or a partition) is mounted.
    Mounted {
        device: String,
        mount_point: String,
        fstype: String,
    },
    /// A stacked device (device-mapper, MD, bcache) holds `device`.
    Holder { device: String, holder: String },
    /// `device` is active swap.
    Swap { device: String, path: String },
    /// A loop device is backed by `device`.
    LoopBacking { device: String, loop_device: String },
    /// The kernel refuses an exclusive open (EBUSY) for a reason none of
    /// the above explains.
    Busy { device: String },
}

impl fmt::Display for InUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InUse::Mounted {
                device,
                mount_point,
                fstype,
            } => write!(f, "{device} is mounted at {mount_point} ({fstype})"),
            InUse::Holder { device, holder } => write!(f, "{device} is held by {holder}"),
            InUse::Swap { device, path } => write!(f, "{device} is active swap ({path})"),
            InUse::LoopBacking {
                device,
                loop_device,
            } => write!(f, "{device} backs loop device {loop_device}"),
            InUse::Busy { device } => {
                write!(f, "{device} cannot be opened exclusively (EBUSY)")
            }
        }
    }
}

/// Capabilities of `dev`, asking the hardware and the kernel (`/proc`).
pub fn probe(sys_root: &Path, dev: &Disk) -> DeviceCaps {
    probe_in(sys_root, Path::new("/proc"), dev, true)
}

/// [`probe`] with the procfs root given. With `open_devices` false nothing
/// but sysfs and procfs files is read (fixture tests): no firmware caps,
/// no secure-discard or exclusive-open probe.
pub fn probe_in(sys_root: &Path, proc_root: &Path, dev: &Disk, open_devices: bool) -> DeviceCaps {
    let mut caps = DeviceCaps {
        name: dev.name.clone(),
        path: dev.path.clone(),
        transport: dev.transport.clone(),
        discard: dev.discard_max_bytes > 0,
        write_zeroes: dev.write_zeroes_max_bytes > 0,
        secure_discard_basis: "not probed".into(),
        ..Default::default()
    };
    caps.in_use = in_use(sys_root, proc_root, dev);

    let mut nvme_dlfeat = None;
    let mut lbprz = None;
    if open_devices {
        match dev.transport.as_str() {
            "nvme" => match DevIo::open(&dev.path)
                .map_err(|e| e.to_string())
                .and_then(|io| NvmeDrive::probe(Box::new(io)).map_err(|e| e.to_string()))
            {
                Ok(d) => {
                    nvme_dlfeat = Some(d.ns.dlfeat);
                    caps.hw = d.caps().clone();
                }
                Err(e) => caps.hw_error = Some(e),
            },
            "ata" | "scsi" => match DevIo::open(&dev.path) {
                Ok(mut io) => {
                    lbprz = read_lbprz(&mut io);
                    match AtaDrive::probe(Box::new(io)) {
                        Ok(d) => caps.hw = d.caps().clone(),
                        Err(e) => caps.hw_error = Some(e.to_string()),
                    }
                }
                Err(e) => caps.hw_error = Some(e.to_string()),
            },
            _ => {}
        }
        let release = ioctl::kernel_release();
        caps.secure_discard = ioctl::probe_secure_discard(&dev.path, &release);
        caps.secure_discard_basis = match caps.secure_discard {
            Some(true) => "BLKSECDISCARD probe (misaligned range): EINVAL, so the kernel supports secure erase here".into(),
            Some(false) => "BLKSECDISCARD probe: EOPNOTSUPP".into(),
            None => format!("unknown: the BLKSECDISCARD probe needs Linux >= 5.19 (running {release}) and a writable device node"),
        };
        if caps.in_use.is_empty() && exclusive_open_busy(&dev.path) {
            caps.in_use.push(InUse::Busy {
                device: dev.name.clone(),
            });
        }
    }
    let (z, basis) = zeroes_after_discard(&dev.transport, caps.discard, nvme_dlfeat, lbprz);
    caps.zeroes_after_discard = z;
    caps.zeroes_after_discard_basis = basis;
    tracing::debug!(
        disk = %dev.name, discard = caps.discard, zeroes_after_discard = z,
        write_zeroes = caps.write_zeroes, secure_discard = ?caps.secure_discard,
        in_use = caps.in_use.len(), methods = ?caps.hw.methods, "disk: capabilities"
    );
    caps
}

/// Decides whether discard may count as zeroing, and says why.
pub fn zeroes_after_discard(
    transport: &str,
    discard: bool,
    nvme_dlfeat: Option<u8>,
    scsi_lbp: Option<(bool, bool)>,
) -> (bool, String) {
    if !discard {
        return (false, "the device does not support discard".into());
    }
    match transport {
        "nvme" => match nvme_dlfeat {
            Some(d) if d & 0x7 == 0x1 => (
                true,
                format!("NVMe DLFEAT={d:#x}: deallocated blocks read zeros"),
            ),
            Some(d) => (
                false,
                format!(
                    "NVMe DLFEAT={d:#x} (bits 2:0 = {:03b}b): zeros after deallocate are not guaranteed",
                    d & 0x7
                ),
            ),
            None => (
                false,
                "not guaranteed: NVMe Identify Namespace was not available".into(),
            ),
        },
        "ata" | "scsi" => match scsi_lbp {
            Some((true, true)) => (true, "READ CAPACITY(16): LBPME=1, LBPRZ=1".into()),
            Some((lbpme, lbprz)) => (
                false,
                format!(
                    "READ CAPACITY(16): LBPME={}, LBPRZ={}: zeros after unmap are not guaranteed",
                    u8::from(lbpme),
                    u8::from(lbprz)
                ),
            ),
            None => (
                false,
                "not guaranteed: READ CAPACITY(16) was not available".into(),
            ),
        },
        other => (
            false,
            format!("not guaranteed: the {other} transport reports no zeros-after-discard guarantee"),
        ),
    }
}

/// READ CAPACITY(16) (SBC-3 §5.16: SERVICE ACTION IN(16) opcode 9Eh,
/// service action 10h, allocation length 32 in bytes 10–13).
pub fn read_capacity16_cdb() -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    c
}

/// LBPME (byte 14 bit 7) and LBPRZ (byte 14 bit 6) of READ CAPACITY(16)
/// parameter data (SBC-3 Table 66).
pub fn parse_read_capacity16(b: &[u8]) -> Option<(bool, bool)> {
    let x = *b.get(14)?;
    Some((x & 0x80 != 0, x & 0x40 != 0))
}

fn read_lbprz(io: &mut dyn AdminIo) -> Option<(bool, bool)> {
    let mut data = [0u8; 32];
    let mut sense = [0u8; 32];
    let sg = io
        .sg_io(
            &read_capacity16_cdb(),
            Dir::FromDevice,
            &mut data,
            &mut sense,
            10_000,
        )
        .ok()?;
    if sg.scsi_status == SCSI_CHECK_CONDITION || sg.host_status != 0 {
        return None;
    }
    parse_read_capacity16(&data)
}

/// Whether an O_EXCL open fails with EBUSY (the kernel's own "claimed"
/// flag: mounted filesystems, dm/md members, another exclusive opener).
fn exclusive_open_busy(path: &str) -> bool {
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// The disk and its partitions: kernel names and `major:minor` numbers.
fn members(sys_root: &Path, name: &str) -> (BTreeSet<String>, BTreeSet<(u64, u64)>) {
    let mut names = BTreeSet::new();
    let mut devs = BTreeSet::new();
    let dir = sys_root.join("block").join(name);
    names.insert(name.to_string());
    if let Some(d) = read_devnum(&dir.join("dev")) {
        devs.insert(d);
    }
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                names.insert(e.file_name().to_string_lossy().into_owned());
                if let Some(d) = read_devnum(&p.join("dev")) {
                    devs.insert(d);
                }
            }
        }
    }
    (names, devs)
}

fn read_devnum(path: &Path) -> Option<(u64, u64)> {
    parse_devnum(fs::read_to_string(path).ok()?.trim())
}

fn parse_devnum(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub dev: (u64, u64),
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo and
/// /proc/swaps fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            if dash < 6 {
                return None;
            }
            Some(MountEntry {
                dev: parse_devnum(fields.get(2)?)?,
                mount_point: unescape(fields.get(4)?),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

/// Everything that uses `dev` or one of its partitions, from sysfs and
/// procfs alone.
pub fn in_use(sys_root: &Path, proc_root: &Path, dev: &Disk) -> Vec<InUse> {
    let (names, devs) = members(sys_root, &dev.name);
    let by_path = |p: &str| -> Option<String> {
        let name = p.strip_prefix("/dev/")?;
        names.contains(name).then(|| name.to_string())
    };
    let mut found = Vec::new();

    // Mounts: by device number (exact for block filesystems), or by source
    // path (filesystems such as btrfs report an anonymous device number).
    let mountinfo = fs::read_to_string(proc_root.join("self/mountinfo")).unwrap_or_default();
    for m in parse_mountinfo(&mountinfo) {
        let device = if devs.contains(&m.dev) {
            names
                .iter()
                .find(|n| {
                    read_devnum(&sysfs_dir(sys_root, &dev.name, n).join("dev")) == Some(m.dev)
                })
                .cloned()
                .or_else(|| by_path(&m.source))
        } else {
            by_path(&m.source)
        };
        if let Some(device) = device {
            found.push(InUse::Mounted {
                device,
                mount_point: m.mount_point,
                fstype: m.fstype,
            });
        }
    }

    // Holders: dm, md, bcache stacked on the disk or a partition.
    for n in &names {
        let holders = sysfs_dir(sys_root, &dev.name, n).join("holders");
        if let Ok(entries) = fs::read_dir(holders) {
            let mut hs: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            hs.sort();
            for holder in hs {
                found.push(InUse::Holder {
                    device: n.clone(),
                    holder,
                });
            }
        }
    }

    // Swap on the disk or a partition.
    let swaps = fs::read_to_string(proc_root.join("swaps")).unwrap_or_default();
    for line in swaps.lines().skip(1) {
        let Some(path) = line.split_whitespace().next().map(unescape) else {
            continue;
        };
        let device = by_path(&path).or_else(|| {
            let md = fs::metadata(&path).ok()?;
            if !md.file_type().is_block_device() {
                return None;
            }
            let rdev = (libc_major(md.rdev()), libc_minor(md.rdev()));
            devs.contains(&rdev).then(|| path.clone())
        });
        if let Some(device) = device {
            found.push(InUse::Swap { device, path });
        }
    }

    // Loop devices whose backing file is the disk or a partition.
    if let Ok(entries) = fs::read_dir(sys_root.join("block")) {
        let mut loops: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("loop") && *n != dev.name)
            .collect();
        loops.sort();
        for l in loops {
            let Ok(backing) =
                fs::read_to_string(sys_root.join("block").join(&l).join("loop/backing_file"))
            else {
                continue;
            };
            let backing = backing.trim().to_string();
            if let Some(device) = by_path(&backing) {
                found.push(InUse::LoopBacking {
                    device,
                    loop_device: l,
                });
            }
        }
    }
    found
}

/// sysfs directory of the disk itself or one of its partitions.
fn sysfs_dir(sys_root: &Path, disk: &str, name: &str) -> std::path::PathBuf {
    let d = sys_root.join("block").join(disk);
    if name == disk {
        d
    } else {
        d.join(name)
    }
}

fn libc_major(rdev: u64) -> u64 {
    nix::sys::stat::major(rdev)
}
fn libc_minor(rdev: u64) -> u64 {
    nix::sys::stat::minor(rdev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    fn disk(name: &str, transport: &str) -> Disk {
        Disk {
            name: name.into(),
            path: format!("/dev/{name}"),
            transport: transport.into(),
            discard_max_bytes: 4096,
            write_zeroes_max_bytes: 0,
            ..Default::default()
        }
    }

    /// sda (8:0) with partitions sda1 (8:1), sda2 (8:2); sdb (8:16) with
    /// sdb1 held by dm-0; loop3 backed by /dev/sdc.
    fn fixture() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        let proc_ = t.path().join("proc");
        write(&sys.join("block/sda/dev"), "8:0\n");
        write(&sys.join("block/sda/sda1/dev"), "8:1\n");
        write(&sys.join("block/sda/sda1/partition"), "1\n");
        write(&sys.join("block/sda/sda2/dev"), "8:2\n");
        write(&sys.join("block/sda/sda2/partition"), "2\n");
        fs::create_dir_all(sys.join("block/sda/holders")).unwrap();
        write(&sys.join("block/sdb/dev"), "8:16\n");
        write(&sys.join("block/sdb/sdb1/dev"), "8:17\n");
        write(&sys.join("block/sdb/sdb1/partition"), "1\n");
        write(&sys.join("block/sdb/sdb1/holders/dm-0"), "");
        write(&sys.join("block/sdc/dev"), "8:32\n");
        write(&sys.join("block/sdd/dev"), "8:48\n");
        write(&sys.join("block/loop3/loop/backing_file"), "/dev/sdc\n");
        write(
            &proc_.join("self/mountinfo"),
            "22 1 0:21 / /proc rw,relatime - proc proc rw\n\
             29 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             30 29 0:45 / /mnt/my\\040data rw - btrfs /dev/sdd rw\n\
             31 1 0:30 / /run rw - tmpfs tmpfs rw\n",
        );
        write(
            &proc_.join("swaps"),
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/sda2                               partition\t1048572\t\t0\t\t-2\n",
        );
        (t, sys, proc_)
    }

    #[test]
    fn mountinfo_parsing() {
        let m = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\nbad line\n",
        );
        assert_eq!(
            m,
            vec![MountEntry {
                dev: (98, 0),
                mount_point: "/mnt2".into(),
                fstype: "ext3".into(),
                source: "/dev/root".into()
            }]
        );
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }

    #[test]
    fn finds_mounts_swap_holders_and_loop_backing() {
        let (_t, sys, proc_) = fixture();
        let sda = in_use(&sys, &proc_, &disk("sda", "ata"));
        assert_eq!(
            sda,
            vec![
                InUse::Mounted {
                    device: "sda1".into(),
                    mount_point: "/".into(),
                    fstype: "ext4".into()
                },
                InUse::Swap {
                    device: "sda2".into(),
                    path: "/dev/sda2".into()
                },
            ]
        );
        let sdb = in_use(&sys, &proc_, &disk("sdb", "ata"));
        assert_eq!(
            sdb,
            vec![InUse::Holder {
                device: "sdb1".into(),
                holder: "dm-0".into()
            }]
        );
        let sdc = in_use(&sys, &proc_, &disk("sdc", "ata"));
        assert_eq!(
            sdc,
            vec![InUse::LoopBacking {
                device: "sdc".into(),
                loop_device: "loop3".into()
            }]
        );
        // btrfs: anonymous device number, matched by source.
        let sdd = in_use(&sys, &proc_, &disk("sdd", "ata"));
        assert_eq!(
            sdd,
            vec![InUse::Mounted {
                device: "sdd".into(),
                mount_point: "/mnt/my data".into(),
                fstype: "btrfs".into()
            }]
        );
        let c = probe_in(&sys, &proc_, &disk("sda", "ata"), false);
        let why = c.in_use_reason().unwrap();
        assert!(
            why.contains("/dev/sda is in use: sda1 is mounted at / (ext4); sda2 is active swap"),
            "{why}"
        );
        let free = probe_in(&sys, &proc_, &disk("sde", "virtio"), false);
        assert!(free.in_use.is_empty() && free.in_use_reason().is_none());
    }

    #[test]
    fn fixture_probe_reads_sysfs_only() {
        let (_t, sys, proc_) = fixture();
        let mut d = disk("sde", "virtio");
        d.write_zeroes_max_bytes = 1 << 20;
        let c = probe_in(&sys, &proc_, &d, false);
        assert!(c.discard && c.write_zeroes);
        assert!(!c.zeroes_after_discard);
        assert!(
            c.zeroes_after_discard_basis.contains("virtio"),
            "{}",
            c.zeroes_after_discard_basis
        );
        assert_eq!(c.secure_discard, None);
        assert_eq!(c.hw, HwCaps::default());
    }

    #[test]
    fn zeroes_after_discard_rules() {
        assert!(zeroes_after_discard("nvme", true, Some(0x09), None).0);
        let (z, why) = zeroes_after_discard("nvme", true, Some(0x02), None);
        assert!(!z && why.contains("010b"), "{why}");
        assert!(!zeroes_after_discard("nvme", true, None, None).0);
        assert!(!zeroes_after_discard("nvme", false, Some(0x01), None).0);
        assert!(zeroes_after_discard("ata", true, None, Some((true, true))).0);
        let (z, why) = zeroes_after_discard("scsi", true, None, Some((true, false)));
        assert!(!z && why.contains("LBPRZ=0"), "{why}");
        assert!(!zeroes_after_discard("scsi", true, None, Some((false, true))).0);
        assert!(!zeroes_after_discard("loop", true, None, None).0);
    }

    #[test]
    fn read_capacity16() {
        assert_eq!(
            read_capacity16_cdb(),
            [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
        let mut b = [0u8; 32];
        b[14] = 0xc0;
        assert_eq!(parse_read_capacity16(&b), Some((true, true)));
        b[14] = 0x80;
        assert_eq!(parse_read_capacity16(&b), Some((true, false)));
        assert_eq!(parse_read_capacity16(&b[..10]), None);
    }

    #[test]
    fn lbprz_through_the_fake() {
        use crate::disk::ioctl::{Recorded, RecordingIo, Reply, SgStatus};
        let mut data = vec![0u8; 32];
        data[14] = 0xc0;
        let mut io = RecordingIo::new(
            "/dev/sda",
            vec![Reply::Sg {
                status: SgStatus::default(),
                data,
                sense: vec![],
            }],
        );
        assert_eq!(read_lbprz(&mut io), Some((true, true)));
        let log = io.log.lock().unwrap();
        match &log[0] {
            Recorded::Sg { cdb, data_len, .. } => {
                assert_eq!(cdb.as_slice(), read_capacity16_cdb().as_slice());
                assert_eq!(*data_len, 32);
            }
            other => panic!("{other:?}"),
        }
    }
}
