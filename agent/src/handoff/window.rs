//! A read-only window onto one partition of a disk: offsets are relative to
//! the partition's first byte and stop at its last, so a filesystem reader
//! (`fatfs`, `ext4-view`) sees the partition as a whole device — without
//! anything being mounted.
//!
//! It must never write: `fatfs` requires `Write` of its device, and it gets
//! one that refuses every byte (a reader that tried to write — to update an
//! access time, say — fails instead of touching the tenant's disk).

use std::io::{self, Read, Seek, SeekFrom, Write};

/// `len` bytes of `inner` starting at `start`.
#[derive(Debug)]
pub struct PartitionWindow<R> {
    inner: R,
    start: u64,
    len: u64,
    pos: u64,
}

impl<R: Read + Seek> PartitionWindow<R> {
    pub fn new(inner: R, start: u64, len: u64) -> Self {
        PartitionWindow {
            inner,
            start,
            len,
            pos: 0,
        }
    }
}

impl<R: Read + Seek> Read for PartitionWindow<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let at = self
            .start
            .checked_add(self.pos)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))?;
        self.inner.seek(SeekFrom::Start(at))?;
        let n = self.inner.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for PartitionWindow<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the partition's start",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

impl<R> Write for PartitionWindow<R> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the handoff reads the tenant's partitions and never writes them",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R: Read + Seek> ext4_view::Ext4Read for PartitionWindow<R> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(format!(
                "read of {} bytes at {start_byte} runs past the partition's {} bytes",
                dst.len(),
                self.len
            )
            .into());
        }
        self.pos = start_byte;
        self.read_exact(dst)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_stop_at_the_window() {
        let data: Vec<u8> = (0..=255).collect();
        let mut w = PartitionWindow::new(Cursor::new(data), 16, 8);
        let mut out = Vec::new();
        w.read_to_end(&mut out).unwrap();
        assert_eq!(out, (16..24).collect::<Vec<u8>>());
        assert_eq!(w.seek(SeekFrom::End(-2)).unwrap(), 6);
        let mut two = [0u8; 4];
        assert_eq!(w.read(&mut two).unwrap(), 2);
        assert_eq!(&two[..2], &[22, 23]);
        assert!(w.seek(SeekFrom::Current(-100)).is_err());
        assert!(w.write(&[1]).is_err());
        let mut buf = [0u8; 4];
        assert!(ext4_view::Ext4Read::read(&mut w, 6, &mut buf).is_err());
        ext4_view::Ext4Read::read(&mut w, 4, &mut buf).unwrap();
        assert_eq!(buf, [20, 21, 22, 23]);
    }
}
