//! The I/O layer under every block method: a small [`BlockIo`] trait, the
//! real device behind it ([`DeviceIo`]: O_DIRECT reads and writes and the
//! `BLK*` ioctls), and fault-injecting wrappers for tests ([`IgnoreDiscard`],
//! [`FailAt`]).
//!
//! The ioctls live in the private `ioctl` module, one safe function each.
//! This module never decides what to erase; it only moves bytes where it is
//! told, and reports errors with their errno.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Buffers for O_DIRECT are aligned to this (a multiple of every logical
/// block size in use).
pub const ALIGN: usize = 4096;

/// One device, as the wipe methods see it. `Send` so each disk runs on its
/// own thread.
pub trait BlockIo: Send {
    /// Path for messages, e.g. `/dev/nvme0n1`.
    fn path(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Logical block size in bytes.
    fn block_size(&self) -> u32;
    /// Writes at `offset`; like `pwrite`, may write less than `buf`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Reads at `offset`; like `pread`, may read less than `buf`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `BLKDISCARD` of `len` bytes at `offset`.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// `BLKSECDISCARD` of `len` bytes at `offset`.
    fn secure_discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// `BLKZEROOUT` of `len` bytes at `offset`.
    fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Everything written so far is on the medium (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// A second handle on the same device, so a read-back can keep a second
    /// request in flight while this one waits (`dd` keeps one; a device
    /// idles between two requests of one reader). `None` where there is
    /// none: the read-back then reads on one thread.
    fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
        None
    }
}

/// A boxed device is a device, so wrappers (fault injectors) stack on
/// whatever `open_target` returned.
impl BlockIo for Box<dyn BlockIo> {
    fn path(&self) -> &str {
        (**self).path()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn block_size(&self) -> u32 {
        (**self).block_size()
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        (**self).write_at(buf, offset)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn secure_discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        (**self).secure_discard(offset, len)
    }
    fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()> {
        (**self).zeroout(offset, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
    fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
        (**self).try_clone()
    }
}

/// An aligned buffer for O_DIRECT, without `unsafe`: a vector with room to
/// slide the window to the next aligned address.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at an [`ALIGN`]-aligned address.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Writes all of `buf` at `offset`, retrying short writes. On error, returns
/// the offset the failing write started at.
pub fn write_all_at(io: &mut dyn BlockIo, buf: &[u8], offset: u64) -> Result<(), (u64, io::Error)> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        match io.write_at(&buf[done..], at) {
            Ok(0) => {
                return Err((
                    at,
                    io::Error::new(io::ErrorKind::WriteZero, "device accepted no more bytes"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((at, e)),
        }
    }
    Ok(())
}

/// Reads all of `buf` at `offset`, retrying short reads.
pub fn read_exact_at(
    io: &mut dyn BlockIo,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), (u64, io::Error)> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        match io.read_at(&mut buf[done..], at) {
            Ok(0) => {
                return Err((
                    at,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "device ended early"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((at, e)),
        }
    }
    Ok(())
}

/// The kernel's block-device ioctls, each behind a safe function.
pub(crate) mod ioctl {
    use std::io;
    use std::os::fd::RawFd;

    // <linux/fs.h>: _IO(0x12, 119/125/127), _IOR(0x12, 114, size_t), _IO(0x12, 104).
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blksecdiscard, nix::request_code_none!(0x12, 125), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);

    fn errno(e: nix::Error) -> io::Error {
        io::Error::from_raw_os_error(e as i32)
    }

    pub fn discard(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: `fd` is an open block device owned by the caller for the
        // duration of the call; the kernel reads two u64 from `range`, which
        // lives on this stack frame until the ioctl returns.
        unsafe { blkdiscard(fd, &range) }.map(drop).map_err(errno)
    }

    pub fn secure_discard(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: as in `discard`: a valid fd and a two-u64 range that
        // outlives the call.
        unsafe { blksecdiscard(fd, &range) }
            .map(drop)
            .map_err(errno)
    }

    pub fn zeroout(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: as in `discard`: a valid fd and a two-u64 range that
        // outlives the call.
        unsafe { blkzeroout(fd, &range) }.map(drop).map_err(errno)
    }

    pub fn size(fd: RawFd) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the kernel writes one u64 into `size`, a live local.
        unsafe { blkgetsize64(fd, &mut size) }.map_err(errno)?;
        Ok(size)
    }

    pub fn logical_block_size(fd: RawFd) -> io::Result<u32> {
        let mut lbs: libc::c_int = 0;
        // SAFETY: the kernel writes one int into `lbs`, a live local.
        unsafe { blksszget(fd, &mut lbs) }.map_err(errno)?;
        u32::try_from(lbs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// A real device node (or, for benchmarks and unprivileged tests, a regular
/// file standing in for one: discard punches holes, zeroout zeroes ranges).
pub struct DeviceIo {
    file: File,
    path: String,
    size: u64,
    block_size: u32,
    is_block: bool,
}

impl DeviceIo {
    /// Opens `path` for erasing: read-write, O_DIRECT (the page cache must
    /// neither absorb writes nor answer reads), and for block devices
    /// O_EXCL, which the kernel refuses with EBUSY while the device is
    /// mounted or held by md/dm/swap — and which keeps anyone from mounting
    /// it while the erase runs.
    pub fn open(path: &Path) -> io::Result<DeviceIo> {
        let meta = std::fs::metadata(path)?;
        let is_block = meta.file_type().is_block_device();
        let mut flags = libc::O_DIRECT;
        if is_block {
            flags |= libc::O_EXCL;
        }
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(flags) {
            // tmpfs has no O_DIRECT; only a regular file can get here.
            Err(e) if !is_block && e.raw_os_error() == Some(libc::EINVAL) => open(0)?,
            other => other?,
        };
        let (size, block_size) = if is_block {
            let fd = file.as_raw_fd();
            (ioctl::size(fd)?, ioctl::logical_block_size(fd)?)
        } else {
            (meta.len(), 512)
        };
        Ok(DeviceIo {
            file,
            path: path.display().to_string(),
            size,
            block_size,
            is_block,
        })
    }

    fn fallocate(&self, mode: nix::fcntl::FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        nix::fcntl::fallocate(self.file.as_raw_fd(), mode, off, len)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))
    }
}

impl BlockIo for DeviceIo {
    fn path(&self) -> &str {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block {
            ioctl::discard(self.file.as_raw_fd(), offset, len)
        } else {
            use nix::fcntl::FallocateFlags as F;
            self.fallocate(
                F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        }
    }

    fn secure_discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block {
            ioctl::secure_discard(self.file.as_raw_fd(), offset, len)
        } else {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        }
    }

    fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block {
            ioctl::zeroout(self.file.as_raw_fd(), offset, len)
        } else {
            use nix::fcntl::FallocateFlags as F;
            self.fallocate(
                F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A `dup` of the descriptor: same open file (O_DIRECT, and the O_EXCL
    /// claim stays with it), its own position-free `pread`s.
    fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
        let file = self.file.try_clone().ok()?;
        Some(Box::new(DeviceIo {
            file,
            path: self.path.clone(),
            size: self.size,
            block_size: self.block_size,
            is_block: self.is_block,
        }))
    }
}

/// A device that reports discard success and keeps its data — QEMU without
/// `discard=unmap` (LAB.md). Both discards become no-ops.
pub struct IgnoreDiscard<T>(pub T);

impl<T: BlockIo> BlockIo for IgnoreDiscard<T> {
    fn path(&self) -> &str {
        self.0.path()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn secure_discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.0.zeroout(offset, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync()
    }
    fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
        let inner = self.0.try_clone()?;
        Some(Box::new(IgnoreDiscard(inner)))
    }
}

/// A device whose medium fails at byte `fail_at`: writes and zeroouts
/// reaching it do what they can before it and then fail with `errno`
/// (EIO by default), as a dying disk does. Reads are unaffected.
pub struct FailAt<T> {
    pub inner: T,
    pub fail_at: u64,
    pub errno: i32,
}

impl<T> FailAt<T> {
    pub fn eio(inner: T, fail_at: u64) -> Self {
        FailAt {
            inner,
            fail_at,
            errno: libc::EIO,
        }
    }

    fn err(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl<T: BlockIo> BlockIo for FailAt<T> {
    fn path(&self) -> &str {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let end = offset + buf.len() as u64;
        if offset >= self.fail_at {
            return Err(self.err());
        }
        if end > self.fail_at {
            // A short write up to the bad spot; the retry then fails there.
            let n = usize::try_from(self.fail_at - offset).unwrap_or(buf.len());
            return self.inner.write_at(&buf[..n], offset);
        }
        self.inner.write_at(buf, offset)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if offset + len > self.fail_at {
            return Err(self.err());
        }
        self.inner.discard(offset, len)
    }
    fn secure_discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if offset + len > self.fail_at {
            return Err(self.err());
        }
        self.inner.secure_discard(offset, len)
    }
    fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if offset + len > self.fail_at {
            if self.fail_at > offset {
                self.inner.zeroout(offset, self.fail_at - offset)?;
            }
            return Err(self.err());
        }
        self.inner.zeroout(offset, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
    fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
        let inner = self.inner.try_clone()?;
        Some(Box::new(FailAt {
            inner,
            fail_at: self.fail_at,
            errno: self.errno,
        }))
    }
}

/// A device in memory, for unit tests of the methods and the verifier.
#[derive(Clone, Debug)]
pub struct MemIo {
    pub data: Vec<u8>,
}

impl BlockIo for MemIo {
    fn path(&self) -> &str {
        "mem"
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let end = start
            .checked_add(buf.len())
            .filter(|e| *e <= self.data.len());
        let end = end.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        self.data[start..end].copy_from_slice(buf);
        Ok(buf.len())
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let start = start.min(self.data.len());
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zeroout(offset, len)
    }
    fn secure_discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let end = start.checked_add(len).filter(|e| *e <= self.data.len());
        let end = end.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.data[start..end].fill(0);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// A copy: enough for a read-back, which never writes.
    fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
        Some(Box::new(self.clone()))
    }
}
