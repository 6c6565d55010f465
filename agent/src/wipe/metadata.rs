//! The fast path: zero every place a partition table, RAID member, LVM
//! label or file system announces itself, so nothing of the previous
//! tenant's layout is found again — without touching the data in between.
//!
//! Locations (device of `size` bytes; every partition gets the same
//! treatment at its own start and end):
//! - the first and last [`END_BYTES`]: MBR and GPT primary header +
//!   entries (LBA 0–33, or 0–5 with 4 KiB sectors), GPT backup entries and
//!   header (last 33 LBAs), MD superblocks 1.1 (at 0) and 1.2 (at 4 KiB),
//!   0.90 (last 64 KiB-aligned 64 KiB) and 1.0 (8 KiB from the end), the
//!   LVM2 label (one of the first 4 sectors), ext* (1 KiB), xfs (0), btrfs
//!   primary (64 KiB), swap (last bytes of the first page, up to 64 KiB
//!   pages), vfat boot sector and its backup (sector 6), ZFS labels L0/L1
//!   (first 512 KiB) and L2/L3 (last 512 KiB of the 256 KiB-aligned size);
//! - btrfs superblock mirrors at 64 MiB and 256 GiB;
//! - ext2/3/4 backup superblocks of the sparse_super layout (groups 1 and
//!   powers of 3, 5, 7) for 1 KiB blocks (8 MiB groups) and 4 KiB blocks
//!   (128 MiB groups).
//!
//! Partitions come from the kernel's view (sysfs) and from the MBR/GPT read
//! off the device itself (bounded parsing: the bytes are the old tenant's).
//! XFS secondary superblocks (one per allocation group, AG size unknown
//! without trusting the old superblock) are not hunted down.

use super::io::{read_exact_at, write_all_at, AlignedBuf, BlockIo};
use super::progress::Meter;
use super::MethodError;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Zeroed at each end of the device and of each partition.
pub const END_BYTES: u64 = 4 * MIB;
/// Zeroed at each extra superblock location.
const SPOT: u64 = 64 * KIB;

/// ext* groups holding backup superblocks (sparse_super), up to `max`.
fn sparse_groups(max: u64) -> Vec<u64> {
    let mut g = vec![1];
    for base in [3u64, 5, 7] {
        let mut p = base;
        while p <= max {
            g.push(p);
            p = match p.checked_mul(base) {
                Some(n) => n,
                None => break,
            };
        }
    }
    g.sort_unstable();
    g
}

/// Every range to zero for a region (the whole device, or a partition) at
/// `start` of `len` bytes, in device offsets.
fn spots(start: u64, len: u64) -> Vec<(u64, u64)> {
    let mut r = vec![
        (start, END_BYTES.min(len)),
        (start + len.saturating_sub(END_BYTES), END_BYTES.min(len)),
    ];
    for btrfs in [64 * MIB, 256 << 30] {
        if btrfs + SPOT <= len {
            r.push((start + btrfs, SPOT));
        }
    }
    for group_bytes in [8 * MIB, 128 * MIB] {
        for g in sparse_groups(len / group_bytes) {
            let at = g * group_bytes;
            if at + SPOT <= len {
                r.push((start + at, SPOT));
            }
        }
    }
    r
}

/// Merges, aligns (to `align`, clamped to `size`) and sorts ranges.
fn normalize(mut ranges: Vec<(u64, u64)>, size: u64, align: u64) -> Vec<(u64, u64)> {
    let mut aligned: Vec<(u64, u64)> = ranges
        .drain(..)
        .filter(|r| r.1 > 0 && r.0 < size)
        .map(|(o, l)| {
            let s = o / align * align;
            let e = (o + l).div_ceil(align).saturating_mul(align).min(size);
            (s, e)
        })
        .collect();
    aligned.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in aligned {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(|a| u64::from(u32::from_le_bytes(a)))
        .unwrap_or(0)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Partitions `(start, len)` in bytes named by an MBR and/or a GPT in the
/// first bytes of a device (`head`), for both 512 and 4096-byte sectors.
/// Anything out of bounds is ignored; at most 128 GPT entries are read.
pub fn partitions_in(head: &[u8], size: u64) -> Vec<(u64, u64)> {
    let mut parts = Vec::new();
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xaa {
        for i in 0..4 {
            let e = 446 + i * 16;
            let (lba, n) = (le32(head, e + 8), le32(head, e + 12));
            if n > 0 && head[e + 4] != 0xee {
                parts.push((lba * 512, n * 512));
            }
        }
    }
    for sector in [512u64, 4096] {
        let h = usize::try_from(sector).unwrap_or(512);
        if head.get(h..h + 8) != Some(b"EFI PART") {
            continue;
        }
        let entries_lba = le64(head, h + 72);
        let count = le32(head, h + 80).min(128);
        let entry_size = le32(head, h + 84);
        if !(128..=4096).contains(&entry_size) {
            continue;
        }
        for i in 0..count {
            let Some(at) = entries_lba
                .checked_mul(sector)
                .and_then(|o| o.checked_add(i * entry_size))
                .and_then(|o| usize::try_from(o).ok())
            else {
                break;
            };
            let (first, last) = (le64(head, at + 32), le64(head, at + 40));
            if first == 0 || last < first {
                continue;
            }
            parts.push((
                first.saturating_mul(sector),
                (last - first + 1).saturating_mul(sector),
            ));
        }
    }
    parts.retain(|(s, l)| *l > 0 && s.checked_add(*l).is_some_and(|e| e <= size));
    parts
}

/// The ranges a metadata wipe of a `size`-byte device with `partitions`
/// zeroes, merged and aligned to `align` bytes.
pub fn plan(size: u64, partitions: &[(u64, u64)], align: u64) -> Vec<(u64, u64)> {
    let mut r = spots(0, size);
    for &(s, l) in partitions {
        r.extend(spots(s, l));
    }
    normalize(r, size, align.max(512))
}

/// Reads the partition tables, zeroes every signature location (of the
/// device and of `known_partitions` plus those found on it), syncs, and
/// returns the ranges zeroed.
pub(crate) fn wipe(
    io: &mut dyn BlockIo,
    known_partitions: &[(u64, u64)],
    chunk: usize,
    meter: &mut Meter,
) -> Result<(u64, Vec<(u64, u64)>), MethodError> {
    let size = io.size();
    let mut head = AlignedBuf::zeroed(usize::try_from(END_BYTES.min(size)).unwrap_or(0));
    read_exact_at(io, head.as_mut_slice(), 0)
        .map_err(|(offset, error)| MethodError::Io { offset, error })?;
    let mut parts = known_partitions.to_vec();
    parts.extend(partitions_in(head.as_slice(), size));
    let ranges = plan(size, &parts, 4096.max(u64::from(io.block_size())));
    let zeros = AlignedBuf::zeroed(chunk);
    let mut done = 0u64;
    for &(start, len) in &ranges {
        let mut off = start;
        while off < start + len {
            let n = usize::try_from((start + len - off).min(chunk as u64)).unwrap_or(chunk);
            write_all_at(io, &zeros.as_slice()[..n], off)
                .map_err(|(offset, error)| MethodError::Io { offset, error })?;
            off += n as u64;
            done += n as u64;
            meter.update(done);
        }
    }
    io.sync().map_err(|error| MethodError::Io {
        offset: size,
        error,
    })?;
    Ok((done, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn covers_both_ends_and_known_superblock_spots() {
        let size = 300 * GIB;
        let r = plan(size, &[], 4096);
        let covered = |o: u64, l: u64| r.iter().any(|(s, n)| *s <= o && o + l <= s + n);
        assert!(covered(0, 4 * MIB));
        assert!(covered(size - 4 * MIB, 4 * MIB));
        assert!(covered(64 * MIB + 0x40, 8), "btrfs mirror 1");
        assert!(covered(256 * GIB + 0x40, 8), "btrfs mirror 2");
        assert!(covered(128 * MIB + 1024, 1024), "ext4 group 1 backup");
        assert!(covered(27 * 128 * MIB + 1024, 1024), "ext4 group 27 backup");
        let md090 = (size & !(64 * KIB - 1)) - 64 * KIB;
        assert!(covered(md090, 4096));
        for w in r.windows(2) {
            assert!(w[0].0 + w[0].1 < w[1].0, "merged and sorted: {w:?}");
        }
    }

    #[test]
    fn reads_mbr_and_gpt_partitions_and_ignores_garbage() {
        let mut head = vec![0u8; 64 * 1024];
        head[510] = 0x55;
        head[511] = 0xaa;
        // MBR entry 0: protective (ignored); entry 1: LBA 2048, 4096 sectors.
        head[446 + 4] = 0xee;
        head[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        head[446 + 12..446 + 16].copy_from_slice(&100u32.to_le_bytes());
        head[462 + 4] = 0x83;
        head[462 + 8..462 + 12].copy_from_slice(&2048u32.to_le_bytes());
        head[462 + 12..462 + 16].copy_from_slice(&4096u32.to_le_bytes());
        // GPT at LBA 1 with entries at LBA 2: one partition 40 MiB at 100 MiB.
        head[512..520].copy_from_slice(b"EFI PART");
        head[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        head[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        head[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 1024;
        head[e + 32..e + 40].copy_from_slice(&(100 * 2048u64).to_le_bytes());
        head[e + 40..e + 48].copy_from_slice(&(140 * 2048u64 - 1).to_le_bytes());
        // A second entry pointing past the end of the device: ignored.
        head[e + 128 + 32..e + 128 + 40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        head[e + 128 + 40..e + 128 + 48].copy_from_slice(&(1u64 << 41).to_le_bytes());
        let p = partitions_in(&head, GIB);
        assert_eq!(p, vec![(MIB, 2 * MIB), (100 * MIB, 40 * MIB)]);
        assert!(partitions_in(&[0xff; 700], GIB).is_empty());
    }
}
