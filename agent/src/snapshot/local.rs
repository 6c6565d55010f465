//! The local disk a snapshot reads: opened read-only, read with O_DIRECT
//! where the device or file system allows it (aligned pieces direct, an
//! unaligned tail through a buffered descriptor), and its identity for the
//! manifest. It must never open the source for writing.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::image::decode::ALIGN;

/// A source disk opened for reading.
pub(crate) struct SourceDisk {
    path: String,
    direct: File,
    buffered: File,
    direct_io: bool,
    size: u64,
    block_device: bool,
}

impl std::fmt::Debug for SourceDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SourceDisk({}, {} bytes, direct {})",
            self.path, self.size, self.direct_io
        )
    }
}

impl SourceDisk {
    pub(crate) fn open(path: &str) -> io::Result<SourceDisk> {
        let mut buffered = File::open(path)?;
        let (direct, direct_io) = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    disk = path,
                    "O_DIRECT refused; reading through the page cache"
                );
                (buffered.try_clone()?, false)
            }
            Err(e) => return Err(e),
        };
        // Seeking to the end gives the size of a block device and a file alike.
        let size = buffered.seek(SeekFrom::End(0))?;
        let block_device = buffered.metadata()?.file_type().is_block_device();
        Ok(SourceDisk {
            path: path.to_string(),
            direct,
            buffered,
            direct_io,
            size,
            block_device,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Fills `buf` from `offset`: the aligned part through O_DIRECT, the
    /// rest buffered. Returns the offset that failed with the error.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), (u64, io::Error)> {
        let aligned =
            self.direct_io && offset % ALIGN as u64 == 0 && (buf.as_ptr() as usize) % ALIGN == 0;
        let d = if aligned {
            buf.len() / ALIGN * ALIGN
        } else {
            0
        };
        if d > 0 {
            self.direct
                .read_exact_at(&mut buf[..d], offset)
                .map_err(|e| (offset, e))?;
        }
        if d < buf.len() {
            let at = offset + d as u64;
            self.buffered
                .read_exact_at(&mut buf[d..], at)
                .map_err(|e| (at, e))?;
        }
        Ok(())
    }

    /// What was backed up, as the manifest records it: for a block device
    /// its path with the model, serial and WWID sysfs shows (so a restore
    /// can be matched to the machine's disk); for a file, its path.
    pub(crate) fn identity(&self) -> String {
        if !self.block_device {
            return format!("file:{}", self.path);
        }
        let name = std::fs::canonicalize(&self.path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let sys = Path::new("/sys/class/block").join(&name);
        let read = |rel: &str| {
            std::fs::read_to_string(sys.join(rel))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let mut id = format!("block:{}", self.path);
        for (key, paths) in [
            ("model", &["device/model"][..]),
            ("serial", &["serial", "device/serial"][..]),
            ("wwid", &["wwid", "device/wwid"][..]),
        ] {
            if let Some(v) = paths.iter().find_map(|p| read(p)) {
                id.push_str(&format!(" {key}={v}"));
            }
        }
        id
    }
}
