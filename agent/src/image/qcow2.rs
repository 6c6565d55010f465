//! A qcow2 reader for a stream: the image's bytes arrive once, front to
//! back (as served, hashed by the source stage), and the guest disk leaves
//! in increasing offset order, as the writer wants it.
//!
//! Written by hand: imago and qemu's own block layer read qcow2 by random
//! access, which over HTTP means either the whole image in RAM or a second
//! download to check the checksum of the image as served.
//!
//! How: the header names the L1 table; the L1 table names the L2 tables;
//! the L2 tables name each guest cluster's host bytes (plain or
//! compressed). Each of these becomes a *want* keyed by its host offset, and
//! is read when the stream reaches it. Bytes the stream passes before their
//! meaning is known are spooled in memory; clusters that arrive ahead of the
//! guest order wait in memory too. Both count against one bound
//! ([`Qcow2Stream::new`]'s `limit`); past it the image is refused with the
//! offsets that broke it. `qemu-img convert` writes metadata before the data
//! it maps and data in guest order, so its images stream with nothing
//! waiting. Compressed clusters are decompressed exactly up to their end
//! (deflate or zstd), so a neighbour packed into the same sector is not
//! swallowed.
//!
//! Refused, each with a sentence that says so: encryption, backing files,
//! external data files, extended L2 entries (subclusters), the corrupt bit
//! and unknown incompatible features. Internal snapshots are ignored: only
//! the active disk is written.
//!
//! This module must never trust a table: every offset and size is checked
//! before it is used, and memory never grows past the bound.

// Every u64 → usize cast here is of a value already bounded to memory
// sizes: cluster-sized quantities (≤ 2 MiB, parse_header), L1/L2 indexes
// (< l1_size, a u32), offsets inside one spooled segment or one fetch
// (fetch's length is checked with to_usize first), inflater counts within
// one buffer. The agent runs on 64-bit machines only.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::io::{self, Read};

/// The first four bytes of every qcow2 image.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// qemu refuses L1 tables larger than this; so do we.
const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// Refcount tables larger than this are not read (their blocks are then
/// merely spooled while metadata is incomplete).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
/// How much the stream buffer reads from the source at once.
const READ_CHUNK: usize = 256 * 1024;

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {msg}"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn to_usize(x: u64, what: &str) -> io::Result<usize> {
    usize::try_from(x).map_err(|_| bad(format!("{what} {x} does not fit in memory")))
}

/// How compressed clusters are compressed (header field `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

/// The header fields this reader needs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub compression: Compression,
    /// Bytes of the header proper (72 for version 2).
    pub header_length: u32,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }

    /// L1 entries the virtual size needs.
    fn l1_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_span())
    }
}

/// Bytes of header [`parse_header`] wants at least (version 3's fixed part).
pub const HEADER_MIN: usize = 104;

/// Parses and checks a qcow2 header from the image's first bytes (at least
/// 72 for version 2, [`HEADER_MIN`] for version 3, plus the compression-type
/// byte when the header says it is longer).
pub fn parse_header(b: &[u8]) -> io::Result<Header> {
    if b.len() < 72 || &b[..4] != MAGIC {
        return Err(bad("not a qcow2 header (magic QFI\\xfb missing)".into()));
    }
    let version = be32(b, 4);
    if version != 2 && version != 3 {
        return Err(bad(format!("version {version} is not supported (2 or 3)")));
    }
    let backing_offset = be64(b, 8);
    if backing_offset != 0 {
        return Err(bad(
            "the image has a backing file; flatten it first (qemu-img convert -O qcow2)".into(),
        ));
    }
    let cluster_bits = be32(b, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("cluster_bits {cluster_bits} outside 9..=21")));
    }
    let size = be64(b, 24);
    let crypt = be32(b, 32);
    if crypt != 0 {
        return Err(bad(format!(
            "the image is encrypted (crypt_method {crypt}); Warden writes plain images only"
        )));
    }
    let l1_size = be32(b, 36);
    let l1_offset = be64(b, 40);
    let refcount_table_offset = be64(b, 48);
    let refcount_table_clusters = be32(b, 56);
    let mut header_length = 72;
    let mut compression = Compression::Deflate;
    if version == 3 {
        if b.len() < HEADER_MIN {
            return Err(bad(format!(
                "version 3 header truncated: {} of {HEADER_MIN} bytes",
                b.len()
            )));
        }
        let incompatible = be64(b, 72);
        header_length = be32(b, 100);
        if header_length < 104 {
            return Err(bad(format!("header_length {header_length} < 104")));
        }
        let known = 0b1_1111u64;
        if incompatible & !known != 0 {
            return Err(bad(format!(
                "unknown incompatible features {:#x}",
                incompatible & !known
            )));
        }
        if incompatible & 0b10 != 0 {
            return Err(bad("the image is marked corrupt".into()));
        }
        if incompatible & 0b100 != 0 {
            return Err(bad(
                "the image keeps its data in an external data file; not supported".into(),
            ));
        }
        if incompatible & 0b1_0000 != 0 {
            return Err(bad(
                "the image uses extended L2 entries (subclusters); convert it without \
                 extended_l2"
                    .into(),
            ));
        }
        if incompatible & 0b1000 != 0 {
            if header_length < 105 || b.len() < 105 {
                return Err(bad(
                    "compression-type feature set but the header has no compression_type byte"
                        .into(),
                ));
            }
            compression = match b[104] {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                t => return Err(bad(format!("unknown compression_type {t}"))),
            };
        }
    }
    let h = Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        compression,
        header_length,
    };
    if u64::from(header_length) > h.cluster_size() {
        return Err(bad(format!(
            "header_length {header_length} exceeds the cluster size {}",
            h.cluster_size()
        )));
    }
    if size > 1 << 56 {
        return Err(bad(format!("virtual size {size} is implausibly large")));
    }
    if u64::from(l1_size) < h.l1_needed() {
        return Err(bad(format!(
            "L1 table of {l1_size} entries cannot map {size} bytes (needs {})",
            h.l1_needed()
        )));
    }
    if u64::from(l1_size) * 8 > MAX_L1_BYTES {
        return Err(bad(format!("L1 table of {l1_size} entries is too large")));
    }
    if h.l1_needed() > 0 && (l1_offset == 0 || l1_offset % h.cluster_size() != 0) {
        return Err(bad(format!(
            "L1 table offset {l1_offset:#x} is not cluster aligned"
        )));
    }
    Ok(h)
}

/// Where a compressed cluster's bytes are: `(host offset, maximum length)`.
fn compressed_extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// What a run of guest bytes is, as far as the stream has told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Reads as zero (unallocated, no backing file; or the zero flag) for
    /// this many bytes.
    Zero(u64),
    Host {
        offset: u64,
        compressed: bool,
    },
    NeedL1,
    NeedL2(usize),
}

#[derive(Debug)]
enum Want {
    L1,
    L2(usize),
    RefcountTable,
    Data {
        guests: Vec<u64>,
        compressed: bool,
        max_len: u64,
    },
}

/// The source with a read-ahead buffer, so a compressed cluster can take
/// exactly the bytes its decompressor used and leave the rest.
struct Ahead<R> {
    r: R,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    /// Host offset of `buf[lo]`.
    pos: u64,
    eof: bool,
}

impl<R: Read> Ahead<R> {
    /// Makes sure some bytes are buffered; false at the end of the stream.
    fn fill(&mut self) -> io::Result<bool> {
        if self.lo < self.hi {
            return Ok(true);
        }
        if self.eof {
            return Ok(false);
        }
        self.lo = 0;
        self.hi = 0;
        loop {
            match self.r.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.hi = n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.lo..self.hi]
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.hi - self.lo);
        self.lo += n;
        self.pos += n as u64;
    }

    /// Fills `out` completely; false if the stream ended first (`out` is
    /// then partly filled).
    fn read_full(&mut self, out: &mut [u8]) -> io::Result<bool> {
        let mut at = 0;
        while at < out.len() {
            if !self.fill()? {
                return Ok(false);
            }
            let n = self.avail().len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&self.avail()[..n]);
            self.consume(n);
            at += n;
        }
        Ok(true)
    }
}

/// A guest cluster that arrived before the cursor got to it. Compressed
/// clusters wait compressed: qemu-img packs them into shared host clusters
/// far ahead of the plain ones, and 64 KiB of them can cover hundreds of
/// guest clusters.
#[derive(Debug)]
enum Held {
    Plain(Vec<u8>),
    Compressed { host: u64, raw: Vec<u8> },
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Plain(v) | Held::Compressed { raw: v, .. } => v.len(),
        }
    }
}

/// One step of the guest disk, in increasing offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `out[..n]` holds the next `n` guest bytes.
    Data(usize),
    /// The next `n` guest bytes read as zero.
    Zeros(u64),
    /// The whole virtual disk has been produced.
    End,
}

/// The streaming reader. See the module doc.
pub struct Qcow2Stream<R> {
    src: Ahead<R>,
    h: Header,
    l1: Option<Vec<u64>>,
    l2: BTreeMap<usize, Vec<u64>>,
    /// L2 tables named by L1 and not yet read.
    l2_missing: usize,
    wants: BTreeMap<u64, Want>,
    /// Host ranges known to be irrelevant (refcount blocks, the header cluster).
    skip: BTreeMap<u64, u64>,
    /// Passed bytes whose meaning was not known yet: start → bytes.
    spool: BTreeMap<u64, Vec<u8>>,
    /// Decoded guest clusters that arrived ahead of `cursor`.
    ready: BTreeMap<u64, Held>,
    held: usize,
    limit: usize,
    cursor: u64,
    deflate: flate2::Decompress,
}

impl<R: Read> std::fmt::Debug for Qcow2Stream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Qcow2Stream(host {}, guest {} of {}, held {})",
            self.src.pos, self.cursor, self.h.size, self.held
        )
    }
}

impl<R: Read> Qcow2Stream<R> {
    /// Reads the header from `src` (positioned at the image's byte 0) and
    /// sets up the reader. `limit` bounds the bytes held while waiting
    /// (spool, early clusters, L2 tables).
    pub fn new(src: R, limit: usize) -> io::Result<Qcow2Stream<R>> {
        let mut src = Ahead {
            r: src,
            buf: vec![0u8; READ_CHUNK],
            lo: 0,
            hi: 0,
            pos: 0,
            eof: false,
        };
        let mut head = vec![0u8; HEADER_MIN];
        if !src.read_full(&mut head)? {
            // A version 2 header is shorter; parse_header says what is missing.
            head.truncate(to_usize(src.pos, "header length")?);
        }
        if head.len() == HEADER_MIN && be32(&head, 4) == 3 {
            // Version 3 says how long its header is (at most a cluster,
            // which parse_header checks; 2 MiB is the largest cluster).
            let len = (be32(&head, 100) as usize).min(2 << 20);
            if len > HEADER_MIN {
                let mut rest = vec![0u8; len - HEADER_MIN];
                if !src.read_full(&mut rest)? {
                    return Err(bad("the stream ended inside the header".into()));
                }
                head.extend_from_slice(&rest);
            }
        }
        let h = parse_header(&head)?;
        let mut s = Qcow2Stream {
            src,
            h,
            l1: None,
            l2: BTreeMap::new(),
            l2_missing: 0,
            wants: BTreeMap::new(),
            skip: BTreeMap::new(),
            spool: BTreeMap::new(),
            ready: BTreeMap::new(),
            held: 0,
            limit,
            cursor: 0,
            deflate: flate2::Decompress::new(false),
        };
        let cluster = s.h.cluster_size();
        // The rest of the header cluster holds extensions and the backing
        // file name, never data.
        s.skip.insert(s.src.pos, cluster);
        if s.h.l1_needed() > 0 {
            s.want(s.h.l1_offset, Want::L1)?;
            // The rest of the L1 table's clusters: unused entries and padding.
            let l1_end = (u64::from(s.h.l1_size) * 8).div_ceil(cluster) * cluster;
            s.skip.insert(s.h.l1_offset, s.h.l1_offset + l1_end);
        } else {
            s.l1 = Some(Vec::new());
        }
        let rt_bytes = u64::from(s.h.refcount_table_clusters) * cluster;
        if s.h.refcount_table_offset != 0
            && s.h.refcount_table_offset % cluster == 0
            && rt_bytes <= MAX_REFCOUNT_TABLE_BYTES
            && s.h.refcount_table_offset != s.h.l1_offset
        {
            s.want(s.h.refcount_table_offset, Want::RefcountTable)?;
        }
        Ok(s)
    }

    pub fn header(&self) -> &Header {
        &self.h
    }

    /// Bytes of the image read from the stream so far.
    pub fn host_offset(&self) -> u64 {
        self.src.pos
    }

    fn want(&mut self, at: u64, w: Want) -> io::Result<()> {
        if let Some(old) = self.wants.get_mut(&at) {
            // Two guest clusters sharing one host cluster is legal (refcount
            // > 1); anything else sharing a host offset is not.
            return match (old, w) {
                (
                    Want::Data {
                        guests, compressed, ..
                    },
                    Want::Data {
                        guests: more,
                        compressed: c2,
                        ..
                    },
                ) if *compressed == c2 => {
                    guests.extend(more);
                    Ok(())
                }
                (old, w) => Err(bad(format!(
                    "host offset {at:#x} is claimed twice ({old:?} and {w:?})"
                ))),
            };
        }
        self.wants.insert(at, w);
        Ok(())
    }

    fn hold(&mut self, n: usize) -> io::Result<()> {
        self.held += n;
        if self.held > self.limit {
            return Err(bad(format!(
                "the image's layout needs more than {} MiB held in memory at host offset {:#x} \
                 (guest offset {:#x} still waits): its tables or clusters are far out of order; \
                 rewrite it with `qemu-img convert -O qcow2`",
                self.limit >> 20,
                self.src.pos,
                self.cursor
            )));
        }
        Ok(())
    }

    fn release(&mut self, n: usize) {
        self.held = self.held.saturating_sub(n);
    }

    fn metadata_complete(&self) -> bool {
        self.l1.is_some() && self.l2_missing == 0
    }

    /// What the guest bytes at the cursor are, as far as known.
    fn slot(&self) -> Slot {
        let Some(l1) = &self.l1 else {
            return Slot::NeedL1;
        };
        let span = self.h.l2_span();
        let cluster = self.h.cluster_size();
        let left = self.h.size - self.cursor;
        // The cursor is below the size, so the index is below l1_needed.
        let idx = (self.cursor / span) as usize;
        let span_end = (idx as u64 + 1) * span;
        if l1.get(idx).copied().unwrap_or(0) == 0 {
            return Slot::Zero((span_end - self.cursor).min(left));
        }
        let Some(table) = self.l2.get(&idx) else {
            return Slot::NeedL2(idx);
        };
        let first = ((self.cursor % span) / cluster) as usize;
        let is_zero =
            |e: u64| e & L2_COMPRESSED == 0 && (e & L2_ZERO != 0 || e & L2_OFFSET_MASK == 0);
        let e = table.get(first).copied().unwrap_or(0);
        if is_zero(e) {
            let run = table[first..].iter().take_while(|&&e| is_zero(e)).count() as u64;
            return Slot::Zero((run * cluster).min(left));
        }
        if e & L2_COMPRESSED != 0 {
            let (offset, _) = compressed_extent(e, self.h.cluster_bits);
            Slot::Host {
                offset,
                compressed: true,
            }
        } else {
            Slot::Host {
                offset: e & L2_OFFSET_MASK,
                compressed: false,
            }
        }
    }

    /// Moves the cursor on by `n` bytes, dropping L2 tables it has left.
    fn advance(&mut self, n: u64) {
        self.cursor += n;
        let span = self.h.l2_span();
        let done = (self.cursor / span) as usize;
        while let Some((&idx, _)) = self.l2.first_key_value() {
            if idx >= done {
                break;
            }
            self.l2.remove(&idx);
        }
    }

    /// Guest bytes of the cluster at the cursor (the last may be short).
    fn cluster_len_at_cursor(&self) -> usize {
        (self.h.cluster_size().min(self.h.size - self.cursor)) as usize
    }

    /// Produces the next piece of the guest disk. `out` must hold at least
    /// one cluster ([`Header::cluster_size`]).
    pub fn next_step(&mut self, out: &mut [u8]) -> io::Result<Step> {
        let cluster = self.h.cluster_size() as usize;
        if out.len() < cluster {
            return Err(bad(format!(
                "output buffer of {} bytes is smaller than a cluster ({cluster})",
                out.len()
            )));
        }
        loop {
            if self.cursor >= self.h.size {
                return Ok(Step::End);
            }
            if let Some(held) = self.ready.remove(&self.cursor) {
                let n = self.cluster_len_at_cursor();
                self.release(held.len());
                match held {
                    Held::Plain(data) => out[..n].copy_from_slice(&data[..n]),
                    Held::Compressed { host, raw } => {
                        self.decompress_slice(&raw, host, &mut out[..cluster])?
                    }
                }
                self.advance(n as u64);
                return Ok(Step::Data(n));
            }
            match self.slot() {
                Slot::Zero(n) => {
                    self.advance(n);
                    return Ok(Step::Zeros(n));
                }
                Slot::Host { offset, compressed } if offset == self.src.pos => {
                    // In order: straight from the stream into `out`.
                    let guest = self.cursor;
                    let others = self.take_want_for(offset, guest)?;
                    let n = self.cluster_len_at_cursor();
                    if compressed {
                        self.decompress_stream(offset, guest, &mut out[..cluster], None)?;
                    } else if !self.src.read_full(&mut out[..cluster])? {
                        return Err(self.ended(format!(
                            "inside the cluster of guest offset {guest:#x} (host offset {offset:#x})"
                        )));
                    }
                    for g in others {
                        self.hold(cluster)?;
                        self.ready.insert(g, Held::Plain(out[..cluster].to_vec()));
                    }
                    self.advance(n as u64);
                    return Ok(Step::Data(n));
                }
                Slot::Host { .. } | Slot::NeedL1 | Slot::NeedL2(_) => self.pump()?,
            }
        }
    }

    /// Removes `guest` from the want at host `offset`; returns the other
    /// guest clusters sharing it (they get a copy).
    fn take_want_for(&mut self, offset: u64, guest: u64) -> io::Result<Vec<u64>> {
        match self.wants.remove(&offset) {
            Some(Want::Data { guests, .. }) => Ok(guests.into_iter().filter(|&g| g != guest).collect()),
            Some(other) => Err(bad(format!(
                "host offset {offset:#x} holds both {other:?} and the data of guest offset {guest:#x}"
            ))),
            None => Err(bad(format!(
                "internal: no want at host offset {offset:#x} for guest offset {guest:#x}"
            ))),
        }
    }

    fn ended(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "qcow2: the stream ended at host offset {:#x} {what}",
                self.src.pos
            ),
        )
    }

    /// Reads one thing from the stream: the want that starts here (or has
    /// been passed), else the bytes up to the next want (spooled while they
    /// might still matter, dropped otherwise).
    fn pump(&mut self) -> io::Result<()> {
        let pos = self.src.pos;
        if let Some((&at, _)) = self.wants.first_key_value() {
            if at <= pos {
                return self.take(at);
            }
        }
        if !self.src.fill()? {
            let what = match self.slot() {
                Slot::NeedL1 => {
                    format!("before the L1 table (host offset {:#x})", self.h.l1_offset)
                }
                Slot::NeedL2(i) => format!(
                    "before the L2 table for guest offset {:#x}",
                    i as u64 * self.h.l2_span()
                ),
                Slot::Host { offset, .. } => format!(
                    "before the data of guest offset {:#x} (host offset {offset:#x})",
                    self.cursor
                ),
                Slot::Zero(_) => "early".into(),
            };
            return Err(self.ended(what));
        }
        let next = self.wants.first_key_value().map_or(u64::MAX, |(&a, _)| a);
        let mut n = self.src.avail().len() as u64;
        n = n.min(next - pos);
        let keep = !self.metadata_complete() && !self.skipped(pos);
        // Stop at the edges of skipped ranges, so each chunk is all one kind.
        if let Some((_, &e)) = self.skip.range(..=pos).next_back() {
            if pos < e {
                n = n.min(e - pos);
            }
        }
        if let Some((&s, _)) = self.skip.range(pos + 1..).next() {
            n = n.min(s - pos);
        }
        let n = to_usize(n, "chunk")?;
        if keep {
            let bytes = self.src.avail()[..n].to_vec();
            self.hold(n)?;
            self.spool.insert(pos, bytes);
        }
        self.src.consume(n);
        Ok(())
    }

    fn skipped(&self, pos: u64) -> bool {
        self.skip
            .range(..=pos)
            .next_back()
            .is_some_and(|(_, &e)| pos < e)
    }

    /// The bytes `[at, at + len)`: what the stream passed comes from the
    /// spool, the rest from the stream. `short_ok` accepts an end of stream
    /// inside the range (a compressed cluster's range may reach past EOF).
    fn fetch(&mut self, at: u64, len: u64, short_ok: bool) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(to_usize(len, "table")?);
        let end = at + len;
        let mut cur = at;
        while cur < end && cur < self.src.pos {
            let Some((&s, seg)) = self.spool.range(..=cur).next_back() else {
                return Err(self.passed(at));
            };
            let seg_end = s + seg.len() as u64;
            if cur >= seg_end {
                return Err(self.passed(at));
            }
            let from = (cur - s) as usize;
            let to = (end.min(seg_end) - s) as usize;
            out.extend_from_slice(&seg[from..to]);
            cur = s + to as u64;
        }
        if cur < end {
            let mut rest = vec![0u8; (end - cur) as usize];
            let full = self.src.read_full(&mut rest)?;
            if !full {
                let got = (self.src.pos - cur) as usize;
                if !short_ok {
                    return Err(self.ended(format!("inside host range {at:#x}+{len:#x}")));
                }
                rest.truncate(got);
            }
            out.extend_from_slice(&rest);
        }
        Ok(out)
    }

    fn passed(&self, at: u64) -> io::Error {
        bad(format!(
            "host offset {at:#x} was needed after the stream had passed it (now at {:#x}) \
             without keeping it: the image's tables come after the data they map; \
             rewrite it with `qemu-img convert -O qcow2`",
            self.src.pos
        ))
    }

    /// Reads and uses the want at host offset `at`.
    fn take(&mut self, at: u64) -> io::Result<()> {
        let Some(w) = self.wants.remove(&at) else {
            return Ok(());
        };
        let cluster = self.h.cluster_size();
        match w {
            Want::L1 => {
                let n = self.h.l1_needed();
                let raw = self.fetch(at, n * 8, false)?;
                let mut l1 = Vec::with_capacity(raw.len() / 8);
                for (i, c) in raw.chunks_exact(8).enumerate() {
                    let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    let off = e & L1_OFFSET_MASK;
                    if off % cluster != 0 {
                        return Err(bad(format!(
                            "L1 entry {i} points at {off:#x}, not cluster aligned"
                        )));
                    }
                    if off != 0 {
                        self.want(off, Want::L2(i))?;
                        self.l2_missing += 1;
                    }
                    l1.push(off);
                }
                self.l1 = Some(l1);
            }
            Want::L2(idx) => {
                let raw = self.fetch(at, cluster, false)?;
                let span = self.h.l2_span();
                let mut table = Vec::with_capacity(raw.len() / 8);
                for (j, c) in raw.chunks_exact(8).enumerate() {
                    let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    let guest = idx as u64 * span + j as u64 * cluster;
                    if guest >= self.h.size {
                        table.push(0);
                        continue;
                    }
                    table.push(e);
                    if guest < self.cursor {
                        continue;
                    }
                    if e & L2_COMPRESSED != 0 {
                        let (off, max_len) = compressed_extent(e, self.h.cluster_bits);
                        if off == 0 {
                            return Err(bad(format!(
                                "compressed cluster for guest offset {guest:#x} at host offset 0"
                            )));
                        }
                        self.want(
                            off,
                            Want::Data {
                                guests: vec![guest],
                                compressed: true,
                                max_len,
                            },
                        )?;
                    } else if e & L2_ZERO == 0 && e & L2_OFFSET_MASK != 0 {
                        let off = e & L2_OFFSET_MASK;
                        if off % cluster != 0 {
                            return Err(bad(format!(
                                "L2 entry for guest offset {guest:#x} points at {off:#x}, not \
                                 cluster aligned"
                            )));
                        }
                        self.want(
                            off,
                            Want::Data {
                                guests: vec![guest],
                                compressed: false,
                                max_len: cluster,
                            },
                        )?;
                    }
                }
                // L2 tables are the map itself, not waiting data: qemu-img's
                // layout needs two at once (the cursor's and the next).
                // More than that means tables far ahead of their data.
                if (self.l2.len() as u64).saturating_sub(2) * cluster > self.limit as u64 {
                    return Err(bad(format!(
                        "{} L2 tables ahead of guest offset {:#x} exceed the {} MiB bound; \
                         rewrite the image with `qemu-img convert -O qcow2`",
                        self.l2.len() + 1,
                        self.cursor,
                        self.limit >> 20
                    )));
                }
                self.l2.insert(idx, table);
                self.l2_missing = self.l2_missing.saturating_sub(1);
            }
            Want::RefcountTable => {
                let len = u64::from(self.h.refcount_table_clusters) * cluster;
                let raw = self.fetch(at, len, false)?;
                for c in raw.chunks_exact(8) {
                    let off = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        & L1_OFFSET_MASK;
                    if off != 0 && off % cluster == 0 && !self.wants.contains_key(&off) {
                        self.skip.insert(off, off + cluster);
                    }
                }
            }
            Want::Data {
                guests,
                compressed,
                max_len,
            } => {
                // Out of order: keep it until the cursor gets there.
                let held = if compressed && at >= self.src.pos {
                    // Inflate once to find exactly where it ends (and to
                    // fail here if it is corrupt); keep the compressed bytes.
                    let mut scratch = vec![0u8; cluster as usize];
                    let mut raw = Vec::new();
                    let first = guests.first().copied().unwrap_or(0);
                    self.decompress_stream(at, first, &mut scratch, Some(&mut raw))?;
                    Held::Compressed { host: at, raw }
                } else {
                    let raw = self.fetch(at, max_len, compressed)?;
                    if compressed {
                        Held::Compressed { host: at, raw }
                    } else {
                        Held::Plain(raw)
                    }
                };
                // Usually one guest; a shared host cluster gets a copy each.
                let cursor = self.cursor;
                for g in guests.into_iter().filter(|&g| g >= cursor) {
                    let item = match &held {
                        Held::Plain(v) => Held::Plain(v.clone()),
                        Held::Compressed { host, raw } => Held::Compressed {
                            host: *host,
                            raw: raw.clone(),
                        },
                    };
                    self.hold(item.len())?;
                    self.ready.insert(g, item);
                }
            }
        }
        self.trim_spool();
        Ok(())
    }

    /// Drops spooled bytes nothing can want any more.
    fn trim_spool(&mut self) {
        if !self.metadata_complete() {
            return;
        }
        let keep_from = self.wants.first_key_value().map_or(u64::MAX, |(&a, _)| a);
        while let Some((&s, seg)) = self.spool.first_key_value() {
            if s + seg.len() as u64 > keep_from {
                break;
            }
            let n = seg.len();
            self.spool.remove(&s);
            self.release(n);
        }
    }

    /// Decompresses the cluster starting at the stream's position into
    /// `out`, consuming exactly the compressed bytes.
    /// `keep` collects the compressed bytes consumed.
    fn decompress_stream(
        &mut self,
        at: u64,
        guest: u64,
        out: &mut [u8],
        mut keep: Option<&mut Vec<u8>>,
    ) -> io::Result<()> {
        let what = |e: String| {
            bad(format!(
                "compressed cluster of guest offset {guest:#x} at host offset {at:#x}: {e}"
            ))
        };
        match self.h.compression {
            Compression::Deflate => {
                self.deflate.reset(false);
                let mut produced = 0usize;
                // Run to the stream's end marker even once the cluster is
                // full: only then does the inflater give back the bytes it
                // read ahead, and the next cluster may start right there.
                loop {
                    if !self.src.fill()? {
                        if produced == out.len() {
                            return Ok(());
                        }
                        return Err(what(format!(
                            "stream ended after {produced} bytes decompressed"
                        )));
                    }
                    let before_in = self.deflate.total_in();
                    let before_out = self.deflate.total_out();
                    let status = self
                        .deflate
                        .decompress(
                            self.src.avail(),
                            &mut out[produced..],
                            flate2::FlushDecompress::None,
                        )
                        .map_err(|e| what(e.to_string()))?;
                    let used = (self.deflate.total_in() - before_in) as usize;
                    produced += (self.deflate.total_out() - before_out) as usize;
                    if let Some(k) = keep.as_deref_mut() {
                        k.extend_from_slice(&self.src.avail()[..used]);
                    }
                    self.src.consume(used);
                    if status == flate2::Status::StreamEnd && produced < out.len() {
                        return Err(what(format!(
                            "deflate stream ended after {produced} of {} bytes",
                            out.len()
                        )));
                    }
                    if status == flate2::Status::StreamEnd {
                        return Ok(());
                    }
                    if used == 0 {
                        return Err(what(if produced == out.len() {
                            "deflate data longer than a cluster".into()
                        } else {
                            "deflate made no progress".into()
                        }));
                    }
                }
            }
            Compression::Zstd => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut dec = zstd::stream::raw::Decoder::new().map_err(|e| what(e.to_string()))?;
                let mut produced = 0usize;
                loop {
                    if !self.src.fill()? {
                        return Err(what(format!(
                            "stream ended after {produced} bytes decompressed"
                        )));
                    }
                    let mut input = InBuffer::around(self.src.avail());
                    let mut output = OutBuffer::around(&mut out[produced..]);
                    let hint = dec
                        .run(&mut input, &mut output)
                        .map_err(|e| what(e.to_string()))?;
                    let used = input.pos();
                    produced += output.pos();
                    if let Some(k) = keep.as_deref_mut() {
                        k.extend_from_slice(&self.src.avail()[..used]);
                    }
                    self.src.consume(used);
                    if hint == 0 {
                        if produced != out.len() {
                            return Err(what(format!(
                                "zstd frame ended after {produced} of {} bytes",
                                out.len()
                            )));
                        }
                        return Ok(());
                    }
                    if produced == out.len() && used == 0 {
                        return Err(what("zstd frame longer than a cluster".into()));
                    }
                }
            }
        }
    }

    /// Decompresses a cluster from bytes already in memory.
    fn decompress_slice(&mut self, raw: &[u8], at: u64, out: &mut [u8]) -> io::Result<()> {
        let what = |e: String| bad(format!("compressed cluster at host offset {at:#x}: {e}"));
        match self.h.compression {
            Compression::Deflate => {
                self.deflate.reset(false);
                self.deflate
                    .decompress(raw, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| what(e.to_string()))?;
                if self.deflate.total_out() != out.len() as u64 {
                    return Err(what(format!(
                        "decompressed to {} of {} bytes",
                        self.deflate.total_out(),
                        out.len()
                    )));
                }
                Ok(())
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(raw)
                    .map_err(|e| what(e.to_string()))?
                    .single_frame();
                d.read_exact(out).map_err(|e| what(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run_all(bytes: Vec<u8>, limit: usize) -> io::Result<Vec<u8>> {
        let mut s = Qcow2Stream::new(io::Cursor::new(bytes), limit)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 2 * 1024 * 1024];
        loop {
            match s.next_step(&mut buf)? {
                Step::Data(n) => out.extend_from_slice(&buf[..n]),
                Step::Zeros(n) => out.resize(out.len() + n as usize, 0),
                Step::End => return Ok(out),
            }
        }
    }

    fn qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok()
    }

    fn disk(size: usize) -> Vec<u8> {
        let mut d = vec![0u8; size];
        let mut x = 0x1234_5678u32;
        for (i, chunk) in d.chunks_mut(64 * 1024).enumerate() {
            match i % 5 {
                0 | 3 => {
                    for b in chunk.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        *b = x as u8;
                    }
                }
                1 => chunk.fill(0x5a), // compresses well
                _ => {}                // zeros
            }
        }
        let n = d.len();
        d[n - 1] = 1;
        d
    }

    fn convert(raw: &[u8], args: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("d.raw");
        let dst = dir.path().join("d.qcow2");
        std::fs::write(&src, raw).unwrap();
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .args(args)
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(&dst).unwrap()
    }

    #[test]
    fn qemu_img_images_stream_with_little_or_nothing_held() {
        if !qemu_img() {
            assert!(
                std::env::var_os("WARDEN_REQUIRE_TOOLS").is_none(),
                "qemu-img missing"
            );
            eprintln!("SKIPPED: qemu-img not installed");
            return;
        }
        let raw = disk(3 * 1024 * 1024 + 4096 * 3);
        // Plain conversions keep data in guest order: a bound of zero, so
        // any waiting at all fails the test. Compressing conversions pack
        // compressed clusters into shared host clusters ahead of the plain
        // ones, and -W writes out of order: they hold a little (compressed
        // clusters wait compressed).
        let none = 0;
        let few = 16 * 64 * 1024;
        for (args, limit) in [
            (vec![], none),
            (vec!["-o", "cluster_size=4096"], none),
            (vec!["-o", "cluster_size=2M"], none),
            (vec!["-c", "-m", "1"], few),
            (vec!["-c"], few),
            (vec!["-c", "-o", "compression_type=zstd"], few),
            (vec!["-c", "-o", "cluster_size=512,compat=0.10"], few),
            (vec!["-W"], few),
        ] {
            let q = convert(&raw, &args);
            let got = run_all(q, limit).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(got == raw, "{args:?}: decoded image differs");
        }
    }

    #[test]
    fn truncated_and_garbled_images_fail_clearly() {
        if !qemu_img() {
            assert!(std::env::var_os("WARDEN_REQUIRE_TOOLS").is_none());
            eprintln!("SKIPPED: qemu-img not installed");
            return;
        }
        let raw = disk(1024 * 1024);
        let q = convert(&raw, &["-c"]);
        let e = run_all(q[..q.len() / 2].to_vec(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("stream ended"), "{e}");
        let mut g = q.clone();
        let h = parse_header(&g).unwrap();
        // Point L1 entry 0 somewhere unaligned.
        let l1 = h.l1_offset as usize;
        g[l1..l1 + 8].copy_from_slice(&0x1234u64.to_be_bytes());
        let e = run_all(g, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not cluster aligned"), "{e}");
        let mut b = q.clone();
        b[8..16].copy_from_slice(&4096u64.to_be_bytes());
        let e = run_all(b, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("backing file"), "{e}");
    }

    /// Builds a qcow2 by hand whose data clusters come in reverse guest
    /// order and whose L2 table comes after them.
    fn reversed(clusters: &[Vec<u8>], cluster_bits: u32) -> Vec<u8> {
        let cs = 1usize << cluster_bits;
        let n = clusters.len();
        // Layout: header | L1 | data (reversed) | L2.
        let l1_off = cs;
        let data_off = 2 * cs;
        let l2_off = data_off + n * cs;
        let mut img = vec![0u8; l2_off + cs];
        img[..4].copy_from_slice(MAGIC);
        img[4..8].copy_from_slice(&2u32.to_be_bytes());
        img[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        img[24..32].copy_from_slice(&((n * cs) as u64).to_be_bytes());
        img[36..40].copy_from_slice(&1u32.to_be_bytes());
        img[40..48].copy_from_slice(&(l1_off as u64).to_be_bytes());
        img[l1_off..l1_off + 8].copy_from_slice(&(l2_off as u64).to_be_bytes());
        for (i, c) in clusters.iter().enumerate() {
            let host = data_off + (n - 1 - i) * cs;
            img[host..host + cs].copy_from_slice(c);
            let e = if c.iter().all(|&b| b == 0) {
                0
            } else {
                host as u64
            };
            img[l2_off + 8 * i..l2_off + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
        }
        img
    }

    #[test]
    fn out_of_order_layouts_within_the_bound() {
        let cs = 4096;
        let clusters: Vec<Vec<u8>> = (0..8u8)
            .map(|i| if i == 3 { vec![0; cs] } else { vec![i + 1; cs] })
            .collect();
        let img = reversed(&clusters, 12);
        let want: Vec<u8> = clusters.concat();
        assert!(run_all(img.clone(), 64 * cs).unwrap() == want);
        let e = run_all(img, 2 * cs).unwrap_err();
        assert!(e.to_string().contains("held in memory"), "{e}");
    }

    #[test]
    fn header_checks() {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        assert!(parse_header(&h).is_ok());
        let mut enc = h.clone();
        enc[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(parse_header(&enc)
            .unwrap_err()
            .to_string()
            .contains("encrypted"));
        let mut sub = h.clone();
        sub[72..80].copy_from_slice(&0x10u64.to_be_bytes());
        assert!(parse_header(&sub)
            .unwrap_err()
            .to_string()
            .contains("subclusters"));
        let mut small_l1 = h.clone();
        small_l1[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_header(&small_l1)
            .unwrap_err()
            .to_string()
            .contains("L1 table"));
        assert!(parse_header(b"QFI").is_err());
    }

    #[test]
    fn compressed_descriptor() {
        // cluster_bits 16: x = 54; offset 0x1234, 2 extra sectors.
        let e = (2u64 << 54) | 0x1234;
        assert_eq!(compressed_extent(e, 16), (0x1234, 3 * 512 - 0x34));
    }
}
