//! A read-only window onto one partition of a disk: offsets are relative to
//! the partition's first byte and stop at its last, so a filesystem reader
//! (`fatfs`, `ext4-view`) sees the partition as a whole device — without
//! anything being mounted.
//!
//! It must never write: `fatfs` requires `Write` of its device, and it gets
//! one that refuses every byte (a reader that tried to write — to update an
//! access time, say — fails instead of touching the tenant's disk).
//!
//! Reads go through a small cache of 64 KiB blocks. `fatfs` reads a file
//! one cluster at a time and looks the next cluster up in the FAT between
//! two reads: on an ESP with 512-byte clusters a tenant kernel of 8 MiB is
//! some 16,000 data reads and as many FAT reads, each a seek and a read
//! system call. With the cache both the FAT's sectors and the file's data
//! come from a few large reads. (`fscommon::BufStream` buffers only one
//! position, which the FAT lookups between clusters would keep discarding.)

use std::io::{self, Read, Seek, SeekFrom, Write};

/// Bytes per cached block (aligned in the inner reader).
const BLOCK: usize = 64 * 1024;
/// Blocks the cache holds: enough for the FAT, a directory and the file
/// being read to stay cached together.
const SLOTS: usize = 4;

/// One cached block: the inner reader's bytes from `at`, a multiple of
/// [`BLOCK`] (shorter than a block only at the inner reader's end).
#[derive(Debug, Default)]
struct Slot {
    at: u64,
    data: Vec<u8>,
    /// When the slot was last used (a counter): the oldest is refilled.
    used: u64,
}

/// `len` bytes of `inner` starting at `start`.
#[derive(Debug)]
pub struct PartitionWindow<R> {
    inner: R,
    start: u64,
    len: u64,
    pos: u64,
    cache: [Slot; SLOTS],
    clock: u64,
}

impl<R: Read + Seek> PartitionWindow<R> {
    pub fn new(inner: R, start: u64, len: u64) -> Self {
        PartitionWindow {
            inner,
            start,
            len,
            pos: 0,
            cache: Default::default(),
            clock: 0,
        }
    }

    /// The cached block holding the inner reader's byte `at`, read in if
    /// it is not cached.
    fn block(&mut self, at: u64) -> io::Result<&Slot> {
        let block_at = at - at % BLOCK as u64;
        self.clock += 1;
        let clock = self.clock;
        let hit = self
            .cache
            .iter()
            .position(|s| s.at == block_at && !s.data.is_empty());
        let i = match hit {
            Some(i) => i,
            None => {
                let i = (0..SLOTS).min_by_key(|&i| self.cache[i].used).unwrap_or(0);
                // Taken out while it is filled: a failed read leaves the
                // slot empty, never holding stale bytes under a new offset.
                let mut data = std::mem::take(&mut self.cache[i].data);
                data.clear();
                data.resize(BLOCK, 0);
                self.inner.seek(SeekFrom::Start(block_at))?;
                let mut got = 0;
                while got < BLOCK {
                    match self.inner.read(&mut data[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                data.truncate(got);
                self.cache[i] = Slot {
                    at: block_at,
                    data,
                    used: clock,
                };
                i
            }
        };
        let slot = &mut self.cache[i];
        slot.used = clock;
        Ok(slot)
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
        let slot = self.block(at)?;
        // The block holds `at` unless the inner reader ended before it
        // (a device shorter than its partition table says): then nothing.
        let from = usize::try_from(at - slot.at).unwrap_or(usize::MAX);
        let Some(rest) = slot.data.get(from..) else {
            return Ok(0);
        };
        let n = rest.len().min(want);
        buf[..n].copy_from_slice(&rest[..n]);
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

    /// Counts the inner reader's reads; fails the next `fail` of them.
    struct Counting {
        inner: Cursor<Vec<u8>>,
        reads: usize,
        fail: usize,
    }

    impl Counting {
        fn new(data: Vec<u8>) -> Counting {
            Counting {
                inner: Cursor::new(data),
                reads: 0,
                fail: 0,
            }
        }
    }

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if self.fail > 0 {
                self.fail -= 1;
                return Err(io::Error::other("medium error"));
            }
            self.inner.read(buf)
        }
    }

    impl Seek for Counting {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    /// Small reads that alternate between two places (a FAT lookup, then a
    /// cluster) come from the cache: the same bytes, and few inner reads.
    #[test]
    fn small_reads_alternating_between_two_places_come_from_the_cache() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let (start, len) = (1000usize, 500_000usize);
        let mut w = PartitionWindow::new(Counting::new(data.clone()), start as u64, len as u64);
        let mut got = Vec::new();
        let mut sector = [0u8; 512];
        let mut fat = [0u8; 4];
        for n in 0..700usize {
            w.seek(SeekFrom::Start(4 * n as u64)).unwrap();
            w.read_exact(&mut fat).unwrap();
            assert_eq!(fat[..], data[start + 4 * n..][..4]);
            w.seek(SeekFrom::Start(100_000 + 512 * n as u64)).unwrap();
            w.read_exact(&mut sector).unwrap();
            got.extend_from_slice(&sector);
        }
        let at = start + 100_000;
        assert_eq!(got, data[at..at + 700 * 512]);
        // 358,400 bytes of data span 7 blocks (64 KiB each), the FAT reads
        // 1: one inner read per block; without the cache it was 1,400.
        assert!(w.inner.reads <= 8, "{} inner reads", w.inner.reads);
        // The window still ends where the partition does.
        w.seek(SeekFrom::End(-3)).unwrap();
        let mut rest = Vec::new();
        w.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, data[start + len - 3..start + len]);
    }

    /// Reading six blocks in turn through four slots evicts the oldest;
    /// every byte read back is still the device's.
    #[test]
    fn blocks_beyond_the_cache_are_evicted_and_read_again() {
        let data: Vec<u8> = (0..6 * BLOCK)
            .map(|i| u8::try_from(i * 7 % 253).unwrap())
            .collect();
        let mut w = PartitionWindow::new(Counting::new(data.clone()), 0, data.len() as u64);
        let mut b = [0u8; 100];
        for round in 0..2 {
            for block in 0..6 {
                let at = block * BLOCK + 1000 * round;
                w.seek(SeekFrom::Start(at as u64)).unwrap();
                w.read_exact(&mut b).unwrap();
                assert_eq!(b[..], data[at..at + 100], "block {block}, round {round}");
            }
        }
        // Six blocks through four slots, in a cycle: every read misses.
        assert_eq!(w.inner.reads, 12);
        // The last four stay: reading them again costs nothing.
        for block in 2..6 {
            w.seek(SeekFrom::Start((block * BLOCK) as u64)).unwrap();
            w.read_exact(&mut b).unwrap();
        }
        assert_eq!(w.inner.reads, 12);
    }

    /// A failed read caches nothing: the same read again goes to the
    /// device and returns its bytes.
    #[test]
    fn a_failed_read_is_retried_not_cached() {
        let data: Vec<u8> = (0..BLOCK).map(|i| u8::try_from(i % 249).unwrap()).collect();
        let mut inner = Counting::new(data.clone());
        inner.fail = 1;
        let mut w = PartitionWindow::new(inner, 0, data.len() as u64);
        let mut b = [0u8; 16];
        assert!(w.read(&mut b).is_err());
        w.seek(SeekFrom::Start(0)).unwrap();
        w.read_exact(&mut b).unwrap();
        assert_eq!(b[..], data[..16]);
    }

    /// A device shorter than the window (its partition table promised
    /// more): reads past its end return nothing, never panic.
    #[test]
    fn a_device_shorter_than_the_window_reads_as_ended() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut w = PartitionWindow::new(Counting::new(data), 10, 10_000);
        let mut out = Vec::new();
        w.read_to_end(&mut out).unwrap();
        assert_eq!(out, (10..100).collect::<Vec<u8>>());
        w.seek(SeekFrom::Start(5000)).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(w.read(&mut b).unwrap(), 0);
    }
}
