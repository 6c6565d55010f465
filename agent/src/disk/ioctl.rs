//! The one place where the disk module talks to the kernel through ioctls:
//! NVMe admin pass-through (`NVME_IOCTL_ADMIN_CMD`, `NVME_IOCTL_ID`), SCSI
//! generic (`SG_IO`), and the `BLKSECDISCARD` support probe.
//!
//! Everything above this layer goes through the [`AdminIo`] trait, so the
//! command logic (which bytes go to the drive, in which order, and what is
//! done with the answer) is tested with [`RecordingIo`], a fake that records
//! each command and plays back scripted replies. The real implementation,
//! [`DevIo`], stays small: it copies a command into the kernel's structure,
//! issues the ioctl and turns errno into an [`IoError`]. It never decides
//! anything, and it must never be bypassed by other modules.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// An NVMe admin command as `linux/nvme_ioctl.h` `struct nvme_passthru_cmd`
/// carries it, without the data pointer (the caller passes the buffer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeAdminCmd {
    pub opcode: u8,
    pub flags: u8,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    /// 0: the kernel's default admin timeout (60 s).
    pub timeout_ms: u32,
}

impl NvmeAdminCmd {
    /// The 64-byte submission queue entry the controller receives (NVMe Base
    /// Specification 2.0, §3.3.3.1 "Common Command Format", Figure 88), with
    /// the command identifier and the data/metadata pointers zero: the
    /// kernel fills those in. Tests compare commands against the spec with
    /// this, byte for byte.
    pub fn sqe_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode; // CDW0 bits 7:0 OPC
        b[1] = self.flags; // CDW0 bits 15:8 FUSE/PSDT
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes()); // bytes 7:4 NSID
        b[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        // bytes 23:16 MPTR and 39:24 DPTR: set by the kernel.
        for (i, dw) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .iter()
        .enumerate()
        {
            let at = 40 + 4 * i;
            b[at..at + 4].copy_from_slice(&dw.to_le_bytes());
        }
        b
    }
}

/// How an NVMe command completed: the status field (Completion Queue Entry
/// DW3 bits 31:17, as the kernel returns it: SC in bits 7:0, SCT in 10:8,
/// CRD 12:11, M 13, DNR 14) and the command-specific result (DW0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeCompletion {
    pub status: u16,
    pub result: u32,
}

impl NvmeCompletion {
    pub fn ok(&self) -> bool {
        self.status & 0x7ff == 0
    }
    /// Status Code Type and Status Code.
    pub fn sct_sc(&self) -> (u8, u8) {
        (((self.status >> 8) & 0x7) as u8, (self.status & 0xff) as u8)
    }
}

/// Data direction of an SG_IO command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    None,
    /// Data in: device to host.
    FromDevice,
    /// Data out: host to device.
    ToDevice,
}

/// What SG_IO reports besides the data: SCSI status (0 GOOD, 2 CHECK
/// CONDITION), host/driver status and how much sense data was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SgStatus {
    pub scsi_status: u8,
    pub host_status: u16,
    pub driver_status: u16,
    pub sense_len: u8,
    pub resid: i32,
}

/// SCSI status CHECK CONDITION (SAM-5 Table 38).
pub const SCSI_CHECK_CONDITION: u8 = 0x02;

/// An ioctl that the kernel refused: which one, on which device, and errno.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl} on {device}: {source}")]
pub struct IoError {
    pub device: String,
    pub ioctl: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// The device's command pass-through, as the firmware-erase code sees it.
pub trait AdminIo: Send {
    /// The device node this talks to (for error messages).
    fn device(&self) -> &str;
    /// Sends one NVMe admin command; `data` is the transfer buffer (its
    /// direction follows from the opcode: bit 0 host-to-controller, bit 1
    /// controller-to-host).
    fn nvme_admin(
        &mut self,
        cmd: &NvmeAdminCmd,
        data: &mut [u8],
    ) -> Result<NvmeCompletion, IoError>;
    /// The namespace ID of the NVMe namespace block device (`NVME_IOCTL_ID`).
    fn nvme_nsid(&mut self) -> Result<u32, IoError>;
    /// Sends one SCSI command through SG_IO.
    fn sg_io(
        &mut self,
        cdb: &[u8],
        dir: Dir,
        data: &mut [u8],
        sense: &mut [u8],
        timeout_ms: u32,
    ) -> Result<SgStatus, IoError>;
}

/// The kernel's structures and request numbers, declared once.
mod sys {
    /// `struct nvme_passthru_cmd` from `linux/nvme_ioctl.h`.
    #[repr(C)]
    #[derive(Default)]
    pub struct NvmePassthruCmd {
        pub opcode: u8,
        pub flags: u8,
        pub rsvd1: u16,
        pub nsid: u32,
        pub cdw2: u32,
        pub cdw3: u32,
        pub metadata: u64,
        pub addr: u64,
        pub metadata_len: u32,
        pub data_len: u32,
        pub cdw10: u32,
        pub cdw11: u32,
        pub cdw12: u32,
        pub cdw13: u32,
        pub cdw14: u32,
        pub cdw15: u32,
        pub timeout_ms: u32,
        pub result: u32,
    }
    const _: () = assert!(std::mem::size_of::<NvmePassthruCmd>() == 72);

    /// `struct sg_io_hdr` from `scsi/sg.h` (64-bit layout).
    #[repr(C)]
    pub struct SgIoHdr {
        pub interface_id: libc::c_int,
        pub dxfer_direction: libc::c_int,
        pub cmd_len: u8,
        pub mx_sb_len: u8,
        pub iovec_count: u16,
        pub dxfer_len: u32,
        pub dxferp: *mut libc::c_void,
        pub cmdp: *const u8,
        pub sbp: *mut u8,
        pub timeout: u32,
        pub flags: u32,
        pub pack_id: libc::c_int,
        pub usr_ptr: *mut libc::c_void,
        pub status: u8,
        pub masked_status: u8,
        pub msg_status: u8,
        pub sb_len_wr: u8,
        pub host_status: u16,
        pub driver_status: u16,
        pub resid: libc::c_int,
        pub duration: u32,
        pub info: u32,
    }
    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(std::mem::size_of::<SgIoHdr>() == 88);

    pub const SG_DXFER_NONE: libc::c_int = -1;
    pub const SG_DXFER_TO_DEV: libc::c_int = -2;
    pub const SG_DXFER_FROM_DEV: libc::c_int = -3;

    // _IO('N', 0x40)
    nix::ioctl_none!(nvme_ioctl_id, b'N', 0x40);
    // _IOWR('N', 0x41, struct nvme_admin_cmd)
    nix::ioctl_readwrite!(nvme_ioctl_admin_cmd, b'N', 0x41, NvmePassthruCmd);
    // SG_IO is a bare number (0x2285), not an _IOC encoding.
    nix::ioctl_readwrite_bad!(sg_io, 0x2285, SgIoHdr);
    // BLKSECDISCARD = _IO(0x12, 125), takes a u64[2] range.
    nix::ioctl_write_ptr_bad!(blk_secdiscard, 0x127d, [u64; 2]);
}

/// The real pass-through: an open device node.
#[derive(Debug)]
pub struct DevIo {
    file: File,
    device: String,
}

impl DevIo {
    /// Opens `path` read-only: as root (CAP_SYS_ADMIN / CAP_SYS_RAWIO) the
    /// kernel allows admin and SG_IO commands on a read-only descriptor, and
    /// a read-only open never triggers the partition rescan a writer's close
    /// does.
    pub fn open(path: &str) -> Result<DevIo, IoError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| IoError {
                device: path.to_string(),
                ioctl: "open",
                source,
            })?;
        Ok(DevIo {
            file,
            device: path.to_string(),
        })
    }

    fn err(&self, ioctl: &'static str, e: nix::Error) -> IoError {
        IoError {
            device: self.device.clone(),
            ioctl,
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    }
}

impl AdminIo for DevIo {
    fn device(&self) -> &str {
        &self.device
    }

    fn nvme_admin(
        &mut self,
        cmd: &NvmeAdminCmd,
        data: &mut [u8],
    ) -> Result<NvmeCompletion, IoError> {
        let data_len = u32::try_from(data.len()).map_err(|_| IoError {
            device: self.device.clone(),
            ioctl: "NVME_IOCTL_ADMIN_CMD",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut c = sys::NvmePassthruCmd {
            opcode: cmd.opcode,
            flags: cmd.flags,
            nsid: cmd.nsid,
            cdw2: cmd.cdw2,
            cdw3: cmd.cdw3,
            addr: if data.is_empty() {
                0
            } else {
                data.as_mut_ptr() as u64
            },
            data_len,
            cdw10: cmd.cdw10,
            cdw11: cmd.cdw11,
            cdw12: cmd.cdw12,
            cdw13: cmd.cdw13,
            cdw14: cmd.cdw14,
            cdw15: cmd.cdw15,
            timeout_ms: cmd.timeout_ms,
            ..Default::default()
        };
        // SAFETY: `c` is a properly laid out nvme_passthru_cmd (size checked
        // above); `addr`/`data_len` describe `data`, which is exclusively
        // borrowed and outlives the synchronous ioctl; the kernel writes at
        // most `data_len` bytes there and the result into `c`.
        let ret = unsafe { sys::nvme_ioctl_admin_cmd(self.file.as_raw_fd(), &mut c) }
            .map_err(|e| self.err("NVME_IOCTL_ADMIN_CMD", e))?;
        // A positive return is the NVMe status field; the kernel's status
        // word fits 16 bits (it may carry the DNR/More flags above SC/SCT).
        Ok(NvmeCompletion {
            status: u16::try_from(ret).unwrap_or(u16::MAX),
            result: c.result,
        })
    }

    fn nvme_nsid(&mut self) -> Result<u32, IoError> {
        // SAFETY: NVME_IOCTL_ID takes no argument; the fd is open.
        let ret = unsafe { sys::nvme_ioctl_id(self.file.as_raw_fd()) }
            .map_err(|e| self.err("NVME_IOCTL_ID", e))?;
        u32::try_from(ret).map_err(|_| self.err("NVME_IOCTL_ID", nix::Error::EINVAL))
    }

    fn sg_io(
        &mut self,
        cdb: &[u8],
        dir: Dir,
        data: &mut [u8],
        sense: &mut [u8],
        timeout_ms: u32,
    ) -> Result<SgStatus, IoError> {
        let invalid = || IoError {
            device: self.device.clone(),
            ioctl: "SG_IO",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        };
        let cmd_len = u8::try_from(cdb.len()).map_err(|_| invalid())?;
        let mx_sb_len = u8::try_from(sense.len()).unwrap_or(u8::MAX);
        let dxfer_len = u32::try_from(data.len()).map_err(|_| invalid())?;
        let dxfer_direction = match (dir, data.is_empty()) {
            (Dir::None, _) | (_, true) => sys::SG_DXFER_NONE,
            (Dir::FromDevice, false) => sys::SG_DXFER_FROM_DEV,
            (Dir::ToDevice, false) => sys::SG_DXFER_TO_DEV,
        };
        let mut hdr = sys::SgIoHdr {
            interface_id: libc::c_int::from(b'S'),
            dxfer_direction,
            cmd_len,
            mx_sb_len,
            iovec_count: 0,
            dxfer_len,
            dxferp: data.as_mut_ptr().cast(),
            cmdp: cdb.as_ptr(),
            sbp: sense.as_mut_ptr(),
            timeout: timeout_ms,
            flags: 0,
            pack_id: 0,
            usr_ptr: std::ptr::null_mut(),
            status: 0,
            masked_status: 0,
            msg_status: 0,
            sb_len_wr: 0,
            host_status: 0,
            driver_status: 0,
            resid: 0,
            duration: 0,
            info: 0,
        };
        // SAFETY: `hdr` is a properly laid out sg_io_hdr (size checked
        // above); cmdp/cmd_len describe `cdb`, dxferp/dxfer_len `data`,
        // sbp/mx_sb_len `sense`, all borrowed for the whole synchronous
        // ioctl; the kernel reads the CDB and writes at most the given
        // lengths into data and sense.
        unsafe { sys::sg_io(self.file.as_raw_fd(), &mut hdr) }.map_err(|e| self.err("SG_IO", e))?;
        Ok(SgStatus {
            scsi_status: hdr.status,
            host_status: hdr.host_status,
            driver_status: hdr.driver_status,
            sense_len: hdr.sb_len_wr,
            resid: hdr.resid,
        })
    }
}

/// Whether the block device at `path` supports BLKSECDISCARD, asked without
/// erasing anything: since Linux 5.19 the ioctl checks for support
/// (EOPNOTSUPP) before it validates the range, so a deliberately misaligned
/// range (start 1) answers EINVAL exactly when secure erase is supported.
/// Older kernels validate the range first, so there the answer is `None`,
/// as it is for any other outcome. Needs a writable descriptor (the kernel
/// returns EBADF otherwise); opening for write does not modify the device.
pub fn probe_secure_discard(path: &str, kernel_release: &str) -> Option<bool> {
    if !kernel_at_least(kernel_release, 5, 19) {
        return None;
    }
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let range: [u64; 2] = [1, 0];
    // SAFETY: BLKSECDISCARD reads a u64[2] from the pointer, which points at
    // `range` for the duration of the call. The misaligned start makes a
    // supporting kernel reject the range before any I/O is issued.
    let ret = unsafe { sys::blk_secdiscard(file.as_raw_fd(), &range) };
    match ret {
        Err(nix::Error::EINVAL) => Some(true),
        Err(nix::Error::EOPNOTSUPP) => Some(false),
        _ => None,
    }
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a release string like `6.1.0-56-amd64` is at least major.minor.
pub fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// One command seen by [`RecordingIo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Nvme {
        cmd: NvmeAdminCmd,
        /// The buffer as handed to the device (for host-to-device commands).
        data_out: Vec<u8>,
        data_len: usize,
    },
    NvmeId,
    Sg {
        cdb: Vec<u8>,
        dir: Dir,
        /// The buffer as handed to the device (for data-out commands).
        data_out: Vec<u8>,
        data_len: usize,
        timeout_ms: u32,
    },
}

/// A scripted answer for [`RecordingIo`].
#[derive(Clone, Debug)]
pub enum Reply {
    Nvme {
        completion: NvmeCompletion,
        /// Copied into the caller's buffer (device-to-host data).
        data: Vec<u8>,
    },
    NvmeId(u32),
    Sg {
        status: SgStatus,
        data: Vec<u8>,
        sense: Vec<u8>,
    },
    /// The ioctl fails with this errno.
    Errno(i32),
}

/// A fake [`AdminIo`] for tests: records every command (the exact bytes)
/// and answers from a script, in order. A command with no reply left fails
/// with EIO, so a test never hangs on a missing answer.
#[derive(Debug, Default)]
pub struct RecordingIo {
    pub device: String,
    pub replies: VecDeque<Reply>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

impl RecordingIo {
    pub fn new(device: &str, replies: Vec<Reply>) -> RecordingIo {
        RecordingIo {
            device: device.to_string(),
            replies: replies.into(),
            log: Default::default(),
        }
    }

    /// A handle on the log that stays readable after the fake is boxed.
    pub fn log_handle(&self) -> std::sync::Arc<std::sync::Mutex<Vec<Recorded>>> {
        self.log.clone()
    }

    fn record(&self, r: Recorded) {
        if let Ok(mut log) = self.log.lock() {
            log.push(r);
        }
    }

    fn next(&mut self, ioctl: &'static str) -> Result<Reply, IoError> {
        match self.replies.pop_front() {
            Some(Reply::Errno(errno)) => Err(self.errno(ioctl, errno)),
            Some(r) => Ok(r),
            None => Err(self.errno(ioctl, libc::EIO)),
        }
    }

    fn errno(&self, ioctl: &'static str, errno: i32) -> IoError {
        IoError {
            device: self.device.clone(),
            ioctl,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }
}

fn copy_in(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
}

impl AdminIo for RecordingIo {
    fn device(&self) -> &str {
        &self.device
    }

    fn nvme_admin(
        &mut self,
        cmd: &NvmeAdminCmd,
        data: &mut [u8],
    ) -> Result<NvmeCompletion, IoError> {
        // Opcode bit 0: host to controller (NVMe Base 2.0 §3.3.3.1, Figure 89).
        let data_out = if cmd.opcode & 1 == 1 {
            data.to_vec()
        } else {
            Vec::new()
        };
        self.record(Recorded::Nvme {
            cmd: *cmd,
            data_out,
            data_len: data.len(),
        });
        match self.next("NVME_IOCTL_ADMIN_CMD")? {
            Reply::Nvme {
                completion,
                data: reply,
            } => {
                copy_in(data, &reply);
                Ok(completion)
            }
            _ => Err(self.errno("NVME_IOCTL_ADMIN_CMD", libc::EIO)),
        }
    }

    fn nvme_nsid(&mut self) -> Result<u32, IoError> {
        self.record(Recorded::NvmeId);
        match self.next("NVME_IOCTL_ID")? {
            Reply::NvmeId(n) => Ok(n),
            _ => Err(self.errno("NVME_IOCTL_ID", libc::EIO)),
        }
    }

    fn sg_io(
        &mut self,
        cdb: &[u8],
        dir: Dir,
        data: &mut [u8],
        sense: &mut [u8],
        timeout_ms: u32,
    ) -> Result<SgStatus, IoError> {
        self.record(Recorded::Sg {
            cdb: cdb.to_vec(),
            dir,
            data_out: if dir == Dir::ToDevice {
                data.to_vec()
            } else {
                Vec::new()
            },
            data_len: data.len(),
            timeout_ms,
        });
        match self.next("SG_IO")? {
            Reply::Sg {
                status,
                data: reply,
                sense: reply_sense,
            } => {
                if dir == Dir::FromDevice {
                    copy_in(data, &reply);
                }
                copy_in(sense, &reply_sense);
                let mut status = status;
                status.sense_len = u8::try_from(reply_sense.len().min(sense.len())).unwrap_or(0);
                Ok(status)
            }
            _ => Err(self.errno("SG_IO", libc::EIO)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.1.0-56-amd64", 5, 19));
        assert!(kernel_at_least("5.19.0", 5, 19));
        assert!(!kernel_at_least("5.15.0-91-generic", 5, 19));
        assert!(!kernel_at_least("", 5, 19));
    }

    #[test]
    fn sqe_layout() {
        let cmd = NvmeAdminCmd {
            opcode: 0x06,
            nsid: 0x0403_0201,
            cdw10: 0x1122_3344,
            cdw15: 0xaabb_ccdd,
            ..Default::default()
        };
        let b = cmd.sqe_bytes();
        assert_eq!(b[0], 0x06);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(&b[40..44], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[60..64], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert!(b[16..40].iter().all(|&x| x == 0));
    }

    #[test]
    fn fake_without_script_fails_instead_of_hanging() {
        let mut io = RecordingIo::new("/dev/fake", vec![]);
        let err = io.nvme_nsid().unwrap_err();
        assert_eq!(err.errno(), Some(libc::EIO));
        assert!(err.to_string().contains("/dev/fake"), "{err}");
    }
}
