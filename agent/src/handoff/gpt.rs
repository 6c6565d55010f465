//! Reads a GUID Partition Table from a disk (or an image file): the
//! protective MBR, the primary header at LBA 1 and its entry array, each
//! checked by its CRC32, and — when the primary copy is damaged — the backup
//! header at the disk's last LBA.
//!
//! It owns parsing only. It must never write to the disk, never trust a
//! length it read without bounding it (the disk is the previous step's
//! output, not ours to trust), and never panic on what it finds.

use std::io::{Read, Seek, SeekFrom};

use warden_protocol::efi::Guid;

/// EFI System Partition.
pub const ESP_TYPE: Guid = Guid {
    data1: 0xC12A_7328,
    data2: 0xF81F,
    data3: 0x11D2,
    data4: [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
};

/// Linux filesystem data (an ext4 `/boot`, or a root filesystem holding `/boot`).
pub const LINUX_FS_TYPE: Guid = Guid {
    data1: 0x0FC6_3DAF,
    data2: 0x8483,
    data3: 0x4772,
    data4: [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
};

/// Extended Boot Loader Partition (Boot Loader Specification's `$BOOT`).
pub const XBOOTLDR_TYPE: Guid = Guid {
    data1: 0xBC13_C2FF,
    data2: 0x59E6,
    data3: 0x4262,
    data4: [0xA3, 0x52, 0xB2, 0x75, 0xFD, 0x6F, 0x71, 0x72],
};

/// Name of the small partition the lease configuration lives on.
pub const WARDEN_CONFIG_NAME: &str = "warden-config";

/// The largest entry array we read. The UEFI minimum is 16 KiB (128 × 128);
/// anything near this bound is damage, not a partition table.
const MAX_ENTRY_ARRAY: u64 = 1 << 20;
/// Size of the header fields UEFI 2.x defines.
const HEADER_MIN: usize = 92;
const SIGNATURE: &[u8; 8] = b"EFI PART";

/// Why a GPT could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("cannot read {what} of {device}: {source}")]
    Io {
        device: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: logical sector size {sector_size} is not supported (512 or 4096)")]
    SectorSize { device: String, sector_size: u32 },
    #[error("{device} has no usable GPT: {reason}")]
    NoGpt { device: String, reason: String },
}

/// Which copy of the table the partitions came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderCopy {
    /// The primary header at LBA 1.
    Primary,
    /// The backup header at the last LBA (the primary was damaged).
    Backup,
}

/// One used entry of the partition array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based index in the entry array (what `/dev/sdaN` and the UEFI HD
    /// device path call the partition number).
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    /// `PartitionName`, UTF-16LE up to its first NUL.
    pub name: String,
    /// Byte offset of the partition on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Partition {
    /// Number of logical blocks (what the UEFI HD device path calls `PartitionSize`).
    pub fn size_lba(&self) -> u64 {
        self.last_lba
            .saturating_sub(self.first_lba)
            .saturating_add(1)
    }
}

/// A partition table as read from `device`.
#[derive(Clone, Debug)]
pub struct Gpt {
    /// What the disk was called when it was read (for messages).
    pub device: String,
    pub sector_size: u32,
    pub disk_guid: Guid,
    /// Which header the partitions come from.
    pub header: HeaderCopy,
    /// Why the primary copy was not used, when the backup was.
    pub primary_problem: Option<String>,
    /// Used entries, in entry-array order.
    pub partitions: Vec<Partition>,
}

impl Gpt {
    /// The first EFI System Partition.
    pub fn esp(&self) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.type_guid == ESP_TYPE)
    }

    /// Partitions whose GPT name is `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Partition> + 'a {
        self.partitions.iter().filter(move |p| p.name == name)
    }

    /// Partitions that may hold Boot Loader Specification entries on ext4:
    /// XBOOTLDR partitions first (that is what they are for), then Linux
    /// filesystem partitions, each group in table order.
    pub fn linux_boot_candidates(&self) -> Vec<&Partition> {
        let xbootldr = self
            .partitions
            .iter()
            .filter(|p| p.type_guid == XBOOTLDR_TYPE);
        let linux = self
            .partitions
            .iter()
            .filter(|p| p.type_guid == LINUX_FS_TYPE);
        xbootldr.chain(linux).collect()
    }
}

/// The header fields we use.
struct Header {
    my_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// Reads the GPT of `disk` (a block device or an image file, positioned
/// anywhere), whose logical sectors are `sector_size` bytes. `device` names
/// it in errors.
pub fn read_gpt<R: Read + Seek>(
    disk: &mut R,
    device: &str,
    sector_size: u32,
) -> Result<Gpt, GptError> {
    if sector_size != 512 && sector_size != 4096 {
        return Err(GptError::SectorSize {
            device: device.to_owned(),
            sector_size,
        });
    }
    let ss = u64::from(sector_size);
    let io = |what: String| {
        let device = device.to_owned();
        move |source| GptError::Io {
            device,
            what,
            source,
        }
    };
    let no_gpt = |reason: String| GptError::NoGpt {
        device: device.to_owned(),
        reason,
    };
    let disk_len = disk
        .seek(SeekFrom::End(0))
        .map_err(io("its size".to_owned()))?;
    let sectors = disk_len / ss;
    if sectors < 3 {
        return Err(no_gpt(format!(
            "{disk_len} bytes is too small for a GPT with {sector_size}-byte sectors"
        )));
    }

    let mbr = read_at(disk, 0, 512).map_err(io("the protective MBR (LBA 0)".to_owned()))?;
    check_protective_mbr(&mbr).map_err(no_gpt)?;

    let primary = read_copy(disk, device, 1, sectors, ss);
    let (header, partitions, copy, primary_problem) = match primary {
        Ok((h, p)) => (h, p, HeaderCopy::Primary, None),
        Err(CopyError::Io(e)) => return Err(e),
        Err(CopyError::Invalid(primary_reason)) => {
            let last = sectors - 1;
            match read_copy(disk, device, last, sectors, ss) {
                Ok((h, p)) => {
                    tracing::warn!(
                        disk = device,
                        problem = %primary_reason,
                        "primary GPT header is damaged; using the backup at the last LBA"
                    );
                    (h, p, HeaderCopy::Backup, Some(primary_reason))
                }
                Err(CopyError::Io(e)) => return Err(e),
                Err(CopyError::Invalid(backup_reason)) => {
                    return Err(no_gpt(format!(
                        "primary header (LBA 1): {primary_reason}; backup header (LBA {last}): {backup_reason}"
                    )))
                }
            }
        }
    };
    tracing::debug!(
        disk = device,
        copy = ?copy,
        partitions = partitions.len(),
        first_usable = header.first_usable,
        last_usable = header.last_usable,
        "GPT read"
    );
    Ok(Gpt {
        device: device.to_owned(),
        sector_size,
        disk_guid: header.disk_guid,
        header: copy,
        primary_problem,
        partitions,
    })
}

enum CopyError {
    Io(GptError),
    Invalid(String),
}

/// Reads and checks the header at `lba` and its entry array.
fn read_copy<R: Read + Seek>(
    disk: &mut R,
    device: &str,
    lba: u64,
    sectors: u64,
    ss: u64,
) -> Result<(Header, Vec<Partition>), CopyError> {
    let io = |what: String| {
        move |source| {
            CopyError::Io(GptError::Io {
                device: device.to_owned(),
                what,
                source,
            })
        }
    };
    let sector = read_at(disk, lba * ss, ss).map_err(io(format!("the GPT header at LBA {lba}")))?;
    let header = parse_header(&sector, lba, sectors).map_err(CopyError::Invalid)?;
    let array_len = u64::from(header.entry_count) * u64::from(header.entry_size);
    let array = read_at(disk, header.entries_lba * ss, array_len).map_err(io(format!(
        "the GPT entry array at LBA {}",
        header.entries_lba
    )))?;
    let crc = crc32fast::hash(&array);
    if crc != header.entries_crc {
        return Err(CopyError::Invalid(format!(
            "entry array CRC32 is {crc:#010x}, the header says {:#010x}",
            header.entries_crc
        )));
    }
    let partitions = parse_entries(&array, &header, ss).map_err(CopyError::Invalid)?;
    Ok((header, partitions))
}

fn check_protective_mbr(mbr: &[u8]) -> Result<(), String> {
    if mbr.get(510..512) != Some(&[0x55, 0xAA][..]) {
        return Err("LBA 0 has no MBR boot signature (0x55AA)".to_owned());
    }
    let protective = (0..4).any(|i| mbr.get(446 + 16 * i + 4) == Some(&0xEE));
    if !protective {
        return Err("the MBR in LBA 0 has no protective (0xEE) partition".to_owned());
    }
    Ok(())
}

fn parse_header(sector: &[u8], lba: u64, sectors: u64) -> Result<Header, String> {
    if sector.get(0..8) != Some(&SIGNATURE[..]) {
        return Err("no \"EFI PART\" signature".to_owned());
    }
    let size = le_u32(sector, 12) as usize;
    if size < HEADER_MIN || size > sector.len() {
        return Err(format!(
            "header size {size} is outside {HEADER_MIN}..={}",
            sector.len()
        ));
    }
    let stored_crc = le_u32(sector, 16);
    let mut copy = sector[..size].to_vec();
    copy[16..20].fill(0);
    let crc = crc32fast::hash(&copy);
    if crc != stored_crc {
        return Err(format!(
            "header CRC32 is {crc:#010x}, the header says {stored_crc:#010x}"
        ));
    }
    let header = Header {
        my_lba: le_u64(sector, 24),
        first_usable: le_u64(sector, 40),
        last_usable: le_u64(sector, 48),
        disk_guid: guid_at(sector, 56),
        entries_lba: le_u64(sector, 72),
        entry_count: le_u32(sector, 80),
        entry_size: le_u32(sector, 84),
        entries_crc: le_u32(sector, 88),
    };
    if header.my_lba != lba {
        return Err(format!(
            "MyLBA is {}, but the header was read from LBA {lba}",
            header.my_lba
        ));
    }
    if header.entry_size < 128 || header.entry_size % 8 != 0 {
        return Err(format!(
            "SizeOfPartitionEntry {} is not a multiple of 8 of at least 128",
            header.entry_size
        ));
    }
    let array_len = u64::from(header.entry_count) * u64::from(header.entry_size);
    if array_len > MAX_ENTRY_ARRAY {
        return Err(format!(
            "entry array of {} × {} bytes is larger than {MAX_ENTRY_ARRAY} bytes",
            header.entry_count, header.entry_size
        ));
    }
    let array_sectors = array_len.div_ceil(sector.len() as u64);
    if header.entries_lba < 2
        || header
            .entries_lba
            .checked_add(array_sectors)
            .is_none_or(|end| end > sectors)
    {
        return Err(format!(
            "entry array at LBA {} ({array_sectors} sectors) is not inside the disk's {sectors} sectors",
            header.entries_lba
        ));
    }
    if header.first_usable > header.last_usable || header.last_usable >= sectors {
        return Err(format!(
            "usable LBAs {}..={} are not inside the disk's {sectors} sectors",
            header.first_usable, header.last_usable
        ));
    }
    Ok(header)
}

fn parse_entries(array: &[u8], header: &Header, ss: u64) -> Result<Vec<Partition>, String> {
    let mut partitions = Vec::new();
    for (index, entry) in array.chunks_exact(header.entry_size as usize).enumerate() {
        let type_guid = guid_at(entry, 0);
        if type_guid.to_bytes() == [0; 16] {
            continue;
        }
        let number = u32::try_from(index + 1).map_err(|_| "too many entries".to_owned())?;
        let first_lba = le_u64(entry, 32);
        let last_lba = le_u64(entry, 40);
        if first_lba > last_lba || first_lba < header.first_usable || last_lba > header.last_usable
        {
            return Err(format!(
                "partition {number} spans LBAs {first_lba}..={last_lba}, outside the usable {}..={}",
                header.first_usable, header.last_usable
            ));
        }
        let name = warden_protocol::efi::utf16_lossy(&entry[56..128]);
        // Both bounded by last_usable < sectors, so these cannot overflow
        // for any disk whose byte size fits in a u64.
        let offset = first_lba * ss;
        let len = (last_lba - first_lba + 1) * ss;
        partitions.push(Partition {
            number,
            type_guid,
            unique_guid: guid_at(entry, 16),
            first_lba,
            last_lba,
            attributes: le_u64(entry, 48),
            name,
            offset,
            len,
        });
    }
    Ok(partitions)
}

fn read_at<R: Read + Seek>(disk: &mut R, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    disk.seek(SeekFrom::Start(offset))?;
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("length overflows usize"))?;
    let mut buf = vec![0u8; len];
    disk.read_exact(&mut buf)?;
    Ok(buf)
}

// The callers index within buffers whose length they checked (a sector of
// at least 512 bytes, an entry of at least 128): these never see a short
// slice, and answer 0 rather than panic if they ever did.
fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let bytes: [u8; 16] = b
        .get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; 16]);
    Guid::from_bytes(bytes)
}

/// Builds GPT disk images in memory, for tests here and in the handoff
/// module: protective MBR, primary and backup headers, 128 entries of 128
/// bytes.
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod build {
    use super::*;

    pub struct Spec {
        pub type_guid: Guid,
        pub unique_guid: Guid,
        pub first_lba: u64,
        pub last_lba: u64,
        pub name: &'static str,
    }

    pub fn image(ss: u64, sectors: u64, parts: &[Spec]) -> Vec<u8> {
        let mut img = vec![0u8; (ss * sectors) as usize];
        img[446 + 4] = 0xEE;
        img[510] = 0x55;
        img[511] = 0xAA;
        let mut array = vec![0u8; 128 * 128];
        for (i, p) in parts.iter().enumerate() {
            let e = &mut array[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&p.type_guid.to_bytes());
            e[16..32].copy_from_slice(&p.unique_guid.to_bytes());
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            for (j, u) in p.name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let array_sectors = (array.len() as u64).div_ceil(ss);
        let last = sectors - 1;
        let first_usable = 2 + array_sectors;
        let last_usable = last - 1 - array_sectors;
        let crc = crc32fast::hash(&array);
        for (my, alt, entries) in [(1, last, 2), (last, 1, last - array_sectors)] {
            let mut h = [0u8; 92];
            h[0..8].copy_from_slice(SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&first_usable.to_le_bytes());
            h[48..56].copy_from_slice(&last_usable.to_le_bytes());
            h[56..72].fill(0x42);
            h[72..80].copy_from_slice(&entries.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc.to_le_bytes());
            let hcrc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&hcrc.to_le_bytes());
            let at = (my * ss) as usize;
            img[at..at + 92].copy_from_slice(&h);
            let at = (entries * ss) as usize;
            img[at..at + array.len()].copy_from_slice(&array);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::build::{image, Spec};
    use super::*;
    use std::io::Cursor;

    fn guid(n: u8) -> Guid {
        Guid::from_bytes([n; 16])
    }

    fn specs(ss: u64) -> Vec<Spec> {
        // 1 MiB and 2 MiB in, whatever the sector size.
        let mib = (1 << 20) / ss;
        vec![
            Spec {
                type_guid: ESP_TYPE,
                unique_guid: guid(1),
                first_lba: mib,
                last_lba: 2 * mib - 1,
                name: "EFI system",
            },
            Spec {
                type_guid: XBOOTLDR_TYPE,
                unique_guid: guid(2),
                first_lba: 2 * mib,
                last_lba: 3 * mib - 1,
                name: WARDEN_CONFIG_NAME,
            },
        ]
    }

    #[test]
    fn reads_both_sector_sizes() {
        for ss in [512u64, 4096] {
            let img = image(ss, (4 << 20) / ss, &specs(ss));
            let gpt = read_gpt(&mut Cursor::new(img), "mem", u32::try_from(ss).unwrap()).unwrap();
            assert_eq!(gpt.header, HeaderCopy::Primary);
            assert_eq!(gpt.partitions.len(), 2);
            let esp = gpt.esp().unwrap();
            assert_eq!(esp.number, 1);
            assert_eq!(esp.offset, 1 << 20);
            assert_eq!(esp.len, 1 << 20);
            assert_eq!(esp.name, "EFI system");
            assert_eq!(esp.unique_guid, guid(1));
            assert_eq!(gpt.named(WARDEN_CONFIG_NAME).count(), 1);
            assert_eq!(gpt.linux_boot_candidates()[0].number, 2);
        }
    }

    #[test]
    fn wrong_sector_size_finds_no_header() {
        let img = image(4096, 1024, &specs(4096));
        let err = read_gpt(&mut Cursor::new(img), "mem", 512).unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
    }

    #[test]
    fn damaged_primary_falls_back_to_backup() {
        let mut img = image(512, 8192, &specs(512));
        img[512 + 60] ^= 0xff; // inside the primary header: its CRC fails
        let gpt = read_gpt(&mut Cursor::new(img), "mem", 512).unwrap();
        assert_eq!(gpt.header, HeaderCopy::Backup);
        assert!(gpt.primary_problem.unwrap().contains("CRC32"));
        assert_eq!(gpt.partitions.len(), 2);
    }

    #[test]
    fn damaged_entry_array_falls_back_to_backup() {
        let mut img = image(512, 8192, &specs(512));
        img[2 * 512 + 60] ^= 0xff; // inside the primary entry array
        let gpt = read_gpt(&mut Cursor::new(img), "mem", 512).unwrap();
        assert_eq!(gpt.header, HeaderCopy::Backup);
        assert!(gpt.primary_problem.unwrap().contains("entry array"));
    }

    #[test]
    fn both_copies_damaged_is_no_gpt_naming_both() {
        let mut img = image(512, 8192, &specs(512));
        img[512 + 60] ^= 0xff;
        img[8191 * 512 + 60] ^= 0xff;
        let err = read_gpt(&mut Cursor::new(img), "disk.img", 512).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("disk.img") && text.contains("primary") && text.contains("backup"));
    }

    #[test]
    fn no_protective_mbr_is_refused() {
        let mut img = image(512, 8192, &specs(512));
        img[446 + 4] = 0x83;
        let err = read_gpt(&mut Cursor::new(img), "mem", 512).unwrap_err();
        assert!(err.to_string().contains("0xEE"), "{err}");
        let err = read_gpt(&mut Cursor::new(vec![0u8; 1 << 20]), "zeros", 512).unwrap_err();
        assert!(err.to_string().contains("0x55AA"), "{err}");
    }

    #[test]
    fn huge_entry_count_is_bounded() {
        let mut img = image(512, 8192, &specs(512));
        let h = &mut img[512..512 + 92];
        h[80..84].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
        h[16..20].fill(0);
        let crc = crc32fast::hash(h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        // The backup is intact, so the table is still read.
        let gpt = read_gpt(&mut Cursor::new(img), "mem", 512).unwrap();
        assert_eq!(gpt.header, HeaderCopy::Backup);
        assert!(gpt.primary_problem.unwrap().contains("larger than"));
    }
}
