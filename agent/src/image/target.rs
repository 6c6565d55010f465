//! The target disk (block device or file) as the image writer sees it.
//!
//! Owns positional writes and reads with O_DIRECT where the target allows it
//! (aligned pieces go direct, an unaligned tail through a second, buffered
//! descriptor), flushing, the fail-safe clearing of both GPT copies, and
//! `BLKRRPART`. The only `unsafe` of the image module (one ioctl) lives here.
//! It must never decide *what* to write: that is the writer's job.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use super::decode::{clamp, AlignedBuf, ALIGN};

/// The region held back until the image verified: the protective MBR, the
/// primary GPT and the boot loader's first stage all live in it.
pub const HEAD: u64 = HEAD_BYTES as u64;
/// [`HEAD`] as a buffer length.
pub const HEAD_BYTES: usize = 1024 * 1024;

/// The backup GPT (header + 128 entries) is the last 33 sectors; clear that
/// many 4 KiB sectors so 4Kn disks are covered as well.
const GPT_BACKUP: u64 = 33 * 4096;

/// An I/O error with the operation and place that failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {target} at offset {offset}: {source}")]
pub struct TargetError {
    pub op: &'static str,
    pub target: String,
    pub offset: u64,
    #[source]
    pub source: io::Error,
}

mod ioctl {
    nix::ioctl_none!(blkrrpart, 0x12, 95);
}

/// An open target.
pub struct Target {
    path: String,
    direct: File,
    buffered: File,
    direct_io: bool,
    size: u64,
    /// A block device: zero runs go through BLKZEROOUT (the device's own
    /// write-zeroes where it has one, else the kernel writes zero pages)
    /// until the device refuses it once.
    zeroout: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Target({}, {} bytes, direct {})",
            self.path, self.size, self.direct_io
        )
    }
}

impl Target {
    /// Opens `path` for reading and writing; O_DIRECT when the file system
    /// or device accepts it.
    pub fn open(path: &str) -> Result<Target, TargetError> {
        let err = |op, source| TargetError {
            op,
            target: path.to_string(),
            offset: 0,
            source,
        };
        let mut buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err("open", e))?;
        let (direct, direct_io) = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    target = path,
                    "O_DIRECT refused; writing through the page cache"
                );
                (buffered.try_clone().map_err(|e| err("open", e))?, false)
            }
            Err(e) => return Err(err("open O_DIRECT", e)),
        };
        // Seeking to the end gives the size of a block device and a file alike.
        let size = buffered
            .seek(SeekFrom::End(0))
            .map_err(|e| err("size of", e))?;
        let is_block = {
            use std::os::unix::fs::FileTypeExt;
            buffered
                .metadata()
                .is_ok_and(|m| m.file_type().is_block_device())
        };
        Ok(Target {
            path: path.to_string(),
            direct,
            buffered,
            direct_io,
            size,
            zeroout: std::sync::atomic::AtomicBool::new(is_block),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    fn err(&self, op: &'static str, offset: u64, source: io::Error) -> TargetError {
        TargetError {
            op,
            target: self.path.clone(),
            offset,
            source,
        }
    }

    /// How many leading bytes of `buf` at `offset` can go through O_DIRECT.
    fn direct_part(&self, buf: &[u8], offset: u64) -> usize {
        let aligned =
            self.direct_io && offset % ALIGN as u64 == 0 && (buf.as_ptr() as usize) % ALIGN == 0;
        if aligned {
            buf.len() / ALIGN * ALIGN
        } else {
            0
        }
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        let d = self.direct_part(buf, offset);
        if d > 0 {
            self.direct
                .write_all_at(&buf[..d], offset)
                .map_err(|e| self.err("write", offset, e))?;
        }
        if d < buf.len() {
            let at = offset + d as u64;
            self.buffered
                .write_all_at(&buf[d..], at)
                .map_err(|e| self.err("write", at, e))?;
        }
        Ok(())
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError> {
        let d = self.direct_part(buf, offset);
        if d > 0 {
            self.direct
                .read_exact_at(&mut buf[..d], offset)
                .map_err(|e| self.err("read", offset, e))?;
        }
        if d < buf.len() {
            let at = offset + d as u64;
            self.buffered
                .read_exact_at(&mut buf[d..], at)
                .map_err(|e| self.err("read", at, e))?;
        }
        Ok(())
    }

    /// Writes zeros over `offset..offset + len` from `zeros` (an all-zero buffer).
    pub fn write_zeros(
        &self,
        zeros: &AlignedBuf,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        let mut at = offset;
        let end = offset + len;
        let aligned_end = end / ALIGN as u64 * ALIGN as u64;
        if at % ALIGN as u64 == 0
            && aligned_end > at
            && self.zeroout.load(std::sync::atomic::Ordering::Relaxed)
        {
            match crate::wipe::io::ioctl::zeroout(self.buffered.as_raw_fd(), at, aligned_end - at) {
                Ok(()) => at = aligned_end,
                Err(e) => {
                    tracing::info!(target = self.path, error = %e, "BLKZEROOUT refused; writing zeros instead");
                    self.zeroout
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        while at < end {
            let n = clamp(end - at, zeros.len());
            self.write_at(&zeros.as_slice()[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), TargetError> {
        self.buffered
            .sync_data()
            .map_err(|e| self.err("fdatasync", 0, e))?;
        if self.direct_io {
            self.direct
                .sync_data()
                .map_err(|e| self.err("fdatasync", 0, e))?;
        }
        Ok(())
    }

    /// Zeros the held-back head (so a half-written disk cannot boot) and
    /// the backup GPT, then flushes. Used before writing and on failure.
    pub fn clear_boot_regions(&self, zeros: &AlignedBuf) -> Result<(), TargetError> {
        let head = HEAD.min(self.size);
        self.write_zeros(zeros, 0, head)?;
        let tail = GPT_BACKUP.min(self.size);
        self.write_zeros(zeros, self.size - tail, tail)?;
        self.sync()
    }

    /// Asks the kernel to re-read the partition table. A target that has
    /// none to re-read (a file, a loop device without partition scanning)
    /// is fine; any other refusal (e.g. EBUSY: a partition is mounted) is
    /// reported.
    pub fn reread_partitions(&self) -> Result<(), TargetError> {
        // SAFETY: BLKRRPART takes no argument and only reads the descriptor,
        // which `self.buffered` keeps open for the duration of the call.
        match unsafe { ioctl::blkrrpart(self.buffered.as_raw_fd()) } {
            Ok(_) => Ok(()),
            Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL) => Ok(()),
            Err(e) => Err(self.err("BLKRRPART", 0, io::Error::from(e))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_tail_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let f = File::create(&p).unwrap();
        f.set_len(4 * 1024 * 1024).unwrap();
        let t = Target::open(p.to_str().unwrap()).unwrap();
        assert_eq!(t.size(), 4 * 1024 * 1024);
        let mut b = AlignedBuf::zeroed(10_000);
        b.as_mut_slice().fill(0xaa);
        t.write_at(b.as_slice(), 8192).unwrap();
        t.write_at(&[1, 2, 3], 3).unwrap();
        let mut back = vec![0u8; 10_000];
        t.read_at(&mut back, 8192).unwrap();
        assert!(back.iter().all(|&x| x == 0xaa));
        t.write_at(b.as_slice(), t.size() - 10_000).unwrap();
        t.reread_partitions().unwrap();
        let zeros = AlignedBuf::zeroed(HEAD as usize);
        t.clear_boot_regions(&zeros).unwrap();
        let all = std::fs::read(&p).unwrap();
        assert!(all[..HEAD as usize].iter().all(|&x| x == 0));
        assert!(all[all.len() - GPT_BACKUP as usize..]
            .iter()
            .all(|&x| x == 0));
    }
}
