//! The newc ("070701") cpio format the kernel unpacks an initramfs from:
//! an in-memory archive that writes itself reproducibly, and a reader.
//!
//! Written by hand (the format is ~60 lines; no crate needed): each entry is
//! a 110-byte ASCII header of 13 eight-digit hex fields, the NUL-terminated
//! name padded to 4 bytes, then the data padded to 4 bytes; a `TRAILER!!!`
//! entry ends the archive. Reproducibility lives here: entries sorted by path,
//! one fixed mtime, uid/gid 0, inode numbers assigned in sorted order, and
//! nlink computed from the tree. This module must never read the host's
//! metadata (owners, times, inode numbers) — only what callers hand it.

use std::collections::BTreeMap;
use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;

/// Why an archive could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Two different entries for one path.
    #[error("{path}: added twice with different contents")]
    Conflict { path: String },
    /// A path that would escape the root or is empty.
    #[error("{path:?}: not a valid path inside the archive")]
    BadPath { path: String },
    /// A file too big for newc's 32-bit size field.
    #[error("{path}: {size} bytes is too big for a newc cpio entry")]
    TooBig { path: String, size: usize },
    /// Malformed archive bytes (reader).
    #[error("cpio entry at offset {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
    /// Writing the archive failed.
    #[error("writing cpio: {0}")]
    Io(#[from] io::Error),
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// A symbolic link and its target.
    Symlink(String),
    /// A character device node.
    CharDev { major: u32, minor: u32 },
}

/// One archive member: its kind and permission bits (no file-type bits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub perm: u32,
}

impl Entry {
    /// The full st_mode: file-type bits and permission bits.
    pub fn mode(&self) -> u32 {
        let kind = match self.kind {
            Kind::File(_) => S_IFREG,
            Kind::Dir => S_IFDIR,
            Kind::Symlink(_) => S_IFLNK,
            Kind::CharDev { .. } => S_IFCHR,
        };
        kind | (self.perm & 0o7777)
    }

    /// The entry's data as stored in the archive (a symlink stores its target).
    pub fn data(&self) -> &[u8] {
        match &self.kind {
            Kind::File(data) => data,
            Kind::Symlink(target) => target.as_bytes(),
            Kind::Dir | Kind::CharDev { .. } => &[],
        }
    }
}

/// An archive being assembled, keyed by path without the leading `/`.
/// Parent directories are created (mode 0755) as entries are added.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a regular file.
    pub fn add_file(&mut self, path: &str, data: Vec<u8>, perm: u32) -> Result<(), CpioError> {
        self.add(
            path,
            Entry {
                kind: Kind::File(data),
                perm,
            },
        )
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.add(
            path,
            Entry {
                kind: Kind::Dir,
                perm,
            },
        )
    }

    /// Adds a symbolic link `path` → `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let kind = Kind::Symlink(target.to_string());
        self.add(path, Entry { kind, perm: 0o777 })
    }

    /// Adds a character device node.
    pub fn add_char_dev(
        &mut self,
        path: &str,
        major: u32,
        minor: u32,
        perm: u32,
    ) -> Result<(), CpioError> {
        let kind = Kind::CharDev { major, minor };
        self.add(path, Entry { kind, perm })
    }

    /// Adds an entry (and any missing parent directories). Adding the same
    /// entry twice is fine; two different ones for one path is an error.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        let path = clean(path)?;
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !self.entries.contains_key(parent) {
                self.add_dir(parent, 0o755)?;
            }
        }
        match self.entries.get(&path) {
            Some(old) if *old == entry => Ok(()),
            // An implicit parent directory may be re-added with another mode.
            Some(old) if old.kind == Kind::Dir && entry.kind == Kind::Dir => {
                self.entries.insert(path, entry);
                Ok(())
            }
            Some(_) => Err(CpioError::Conflict { path }),
            None => {
                self.entries.insert(path, entry);
                Ok(())
            }
        }
    }

    /// Entries in archive order (sorted by path; parents before children,
    /// since a path sorts before every path it prefixes).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// Writes the archive in newc format with every mtime set to `mtime`.
    pub fn write_to<W: Write>(&self, mtime: u32, out: &mut W) -> Result<(), CpioError> {
        // A directory's link count is 2 (itself and `.`) plus one `..` per
        // subdirectory; everything else has one link.
        let mut subdirs: BTreeMap<&str, u32> = BTreeMap::new();
        for (path, entry) in &self.entries {
            if entry.kind == Kind::Dir {
                if let Some((parent, _)) = path.rsplit_once('/') {
                    *subdirs.entry(parent).or_default() += 1;
                }
            }
        }
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let nlink = match entry.kind {
                Kind::Dir => 2 + subdirs.get(path.as_str()).copied().unwrap_or(0),
                _ => 1,
            };
            let (rmajor, rminor) = match entry.kind {
                Kind::CharDev { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let header = Header {
                ino,
                mode: entry.mode(),
                nlink,
                mtime,
                rmajor,
                rminor,
            };
            write_entry(out, path, &header, entry.data())?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            rmajor: 0,
            rminor: 0,
        };
        write_entry(out, TRAILER, &trailer, &[])?;
        Ok(())
    }

    /// The archive as newc bytes.
    pub fn to_bytes(&self, mtime: u32) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        self.write_to(mtime, &mut out)?;
        Ok(out)
    }
}

/// Strips leading `/` and `./`, rejects empty paths and `..`/`.` components.
fn clean(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CpioError::BadPath {
            path: path.to_string(),
        });
    }
    Ok(trimmed.to_string())
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    rmajor: u32,
    rminor: u32,
}

fn pad4(out: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

fn write_entry(out: &mut impl Write, name: &str, h: &Header, data: &[u8]) -> Result<(), CpioError> {
    let too_big = || CpioError::TooBig {
        path: name.to_string(),
        size: data.len(),
    };
    let size = u32::try_from(data.len()).map_err(|_| too_big())?;
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big())?;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    // rdevminor namesize check — uid, gid, dev and check are always 0.
    let fields = [
        h.ino, h.mode, 0, 0, h.nlink, h.mtime, size, 0, 0, h.rmajor, h.rminor, namesize, 0,
    ];
    out.write_all(MAGIC)?;
    for field in fields {
        write!(out, "{field:08X}")?;
    }
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, HEADER_LEN + name.len() + 1)?;
    out.write_all(data)?;
    pad4(out, data.len())?;
    Ok(())
}

/// One entry read back from a newc archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadEntry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

impl ReadEntry {
    /// `ls -l`-style type letter: `-`, `d`, `l`, `c` or `?`.
    pub fn type_char(&self) -> char {
        match self.mode & S_IFMT {
            S_IFREG => '-',
            S_IFDIR => 'd',
            S_IFLNK => 'l',
            S_IFCHR => 'c',
            _ => '?',
        }
    }
}

/// Parses a newc archive up to (not including) its trailer.
pub fn read(bytes: &[u8]) -> Result<Vec<ReadEntry>, CpioError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    loop {
        let bad = |what| CpioError::Malformed { offset: at, what };
        let header = bytes
            .get(at..at + HEADER_LEN)
            .ok_or(bad("truncated header"))?;
        if &header[..6] != MAGIC {
            return Err(bad("bad magic (not newc)"));
        }
        let mut f = [0u32; 13];
        for (i, field) in f.iter_mut().enumerate() {
            let hex = &header[6 + i * 8..14 + i * 8];
            let hex = std::str::from_utf8(hex).map_err(|_| bad("non-ASCII header"))?;
            *field = u32::from_str_radix(hex, 16).map_err(|_| bad("bad hex field"))?;
        }
        let (size, namesize) = (f[6] as usize, f[11] as usize);
        let name_start = at + HEADER_LEN;
        let name = bytes
            .get(name_start..name_start + namesize)
            .ok_or(bad("truncated name"))?;
        let name = name
            .strip_suffix(&[0])
            .ok_or(bad("name not NUL-terminated"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad("name not UTF-8"))?;
        let data_start = (name_start + namesize).next_multiple_of(4);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or(bad("truncated data"))?;
        if name == TRAILER {
            return Ok(out);
        }
        out.push(ReadEntry {
            name,
            ino: f[0],
            mode: f[1],
            uid: f[2],
            gid: f[3],
            nlink: f[4],
            mtime: f[5],
            rdev_major: f[9],
            rdev_minor: f[10],
            data: data.to_vec(),
        });
        at = (data_start + size).next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add_file("/init", b"#!/bin/sh\n".to_vec(), 0o755).unwrap();
        a.add_file("/lib/x86_64-linux-gnu/libc.so.6", vec![7; 5], 0o644)
            .unwrap();
        a.add_symlink("/bin/sh", "busybox").unwrap();
        a.add_char_dev("/dev/console", 5, 1, 0o600).unwrap();
        a.add_char_dev("/dev/null", 1, 3, 0o666).unwrap();
        a
    }

    #[test]
    fn round_trip_sorted_with_parents_inodes_and_links() {
        let bytes = sample().to_bytes(1_700_000_000).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let got = read(&bytes).unwrap();
        let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "dev/null",
                "init",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e.ino as usize, i + 1);
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 1_700_000_000));
        }
        let by = |n: &str| got.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by("init").mode, 0o100_755);
        assert_eq!(by("init").data, b"#!/bin/sh\n");
        assert_eq!(by("bin/sh").mode, 0o120_777);
        assert_eq!(by("bin/sh").data, b"busybox");
        assert_eq!(by("dev/console").mode, 0o020_600);
        assert_eq!(
            (by("dev/console").rdev_major, by("dev/console").rdev_minor),
            (5, 1)
        );
        assert_eq!(
            (by("dev/null").rdev_major, by("dev/null").rdev_minor),
            (1, 3)
        );
        assert_eq!(by("lib").nlink, 3, "lib has one subdirectory");
        assert_eq!(by("lib/x86_64-linux-gnu").nlink, 2);
        assert_eq!(by("lib/x86_64-linux-gnu/libc.so.6").data, vec![7; 5]);
        assert_eq!(by("dev").mode, 0o040_755);
    }

    #[test]
    fn header_layout_is_newc() {
        let mut a = Archive::new();
        a.add_file("a", b"xy".to_vec(), 0o644).unwrap();
        let bytes = a.to_bytes(0).unwrap();
        let expected_header = "070701\
            00000001000081A4000000000000000000000001000000000000000200000000\
            00000000000000000000000000000002\
            00000000";
        assert_eq!(&bytes[..110], expected_header.as_bytes());
        // name "a\0" at 110..112, then data at 112 (already aligned).
        assert_eq!(&bytes[110..116], b"a\0xy\0\0");
        let trailer = &bytes[116..];
        assert!(trailer.starts_with(b"070701"));
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
    }

    #[test]
    fn same_entries_any_order_same_bytes() {
        let mut b = Archive::new();
        b.add_char_dev("dev/null", 1, 3, 0o666).unwrap();
        b.add_char_dev("dev/console", 5, 1, 0o600).unwrap();
        b.add_symlink("bin/sh", "busybox").unwrap();
        b.add_file("lib/x86_64-linux-gnu/libc.so.6", vec![7; 5], 0o644)
            .unwrap();
        b.add_file("init", b"#!/bin/sh\n".to_vec(), 0o755).unwrap();
        assert_eq!(sample().to_bytes(0).unwrap(), b.to_bytes(0).unwrap());
    }

    #[test]
    fn conflicts_and_bad_paths_are_rejected() {
        let mut a = sample();
        a.add_file("init", b"#!/bin/sh\n".to_vec(), 0o755).unwrap();
        assert!(matches!(
            a.add_file("init", b"other".to_vec(), 0o755),
            Err(CpioError::Conflict { .. })
        ));
        assert!(matches!(
            a.add_dir("/", 0o755),
            Err(CpioError::BadPath { .. })
        ));
        assert!(matches!(
            a.add_file("a/../etc/x", vec![], 0o644),
            Err(CpioError::BadPath { .. })
        ));
    }

    #[test]
    fn reader_rejects_garbage() {
        assert!(matches!(read(b"070702"), Err(CpioError::Malformed { .. })));
        let bytes = sample().to_bytes(0).unwrap();
        assert!(matches!(
            read(&bytes[..bytes.len() - 200]),
            Err(CpioError::Malformed { .. })
        ));
    }
}
