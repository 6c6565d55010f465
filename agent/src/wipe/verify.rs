//! Read-back verification: does the device hold what the last method should
//! have left (zeros, or the last overwrite pass's stream)?
//!
//! `sampled` reads the first and last MiB plus N random 4 KiB-aligned blocks
//! per GiB; `metadata` reads exactly the ranges a metadata wipe zeroed; both
//! go through one reader thread feeding the checker, and every byte read
//! goes, in offset order, into one SHA-256. `full` reads every byte front to
//! back on [`READERS`] reader threads (chunks claimed in order: a
//! sequential stream with a second request in flight) while several
//! checker threads compare and hash whole chunks, so SHA-256 (~1.7 GB/s a
//! core with SHA-NI) is spread over the cores, and a chunk of zeros found
//! zero takes the precomputed digest of that many zeros instead; the
//! digest is a hash list over the chunks (see [`Verification::digest`]),
//! the same whatever the number of threads. The first unexpected bytes are
//! recorded with their offset. This module only reads; it never writes.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use crate::digest::Sha256;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use warden_protocol::wipe::{Expected, Verification, VerifyMode, VerifyResult};

use super::io::{read_exact_at, AlignedBuf, BlockIo};
use super::overwrite::{fill_pattern, fresh_seed, Content};
use super::progress::Meter;
use crate::zeros::is_zero;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Size of one random sample.
pub const SAMPLE: u64 = 4096;

/// Why verification could not finish (as opposed to finding bad data).
#[derive(Debug)]
pub struct ReadFailure {
    pub offset: u64,
    pub error: io::Error,
}

/// The ranges a sampled read covers, sorted: first and last MiB and
/// `per_gib` random aligned blocks per GiB (rounded up), from `seed`.
pub fn sample_ranges(size: u64, per_gib: u32, seed: &[u8; 32]) -> Vec<(u64, u64)> {
    let mut ranges = vec![(0, MIB.min(size))];
    if size > MIB {
        let start = size.saturating_sub(MIB).max(MIB.min(size)) / SAMPLE * SAMPLE;
        ranges.push((start, size - start));
    }
    let blocks = size / SAMPLE;
    if blocks > 0 {
        let count = (u128::from(size) * u128::from(per_gib)).div_ceil(u128::from(GIB));
        let mut rng = ChaCha8Rng::from_seed(*seed);
        for _ in 0..count {
            let b = rng.next_u64() % blocks;
            ranges.push((b * SAMPLE, SAMPLE));
        }
    }
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    ranges
}

/// Index of the first byte of `found` that differs from the expected
/// content at device `offset` (`scratch` has room for the expected bytes).
fn first_mismatch(
    found: &[u8],
    content: &Content,
    offset: u64,
    scratch: &mut [u8],
) -> Option<usize> {
    match content {
        Content::Zeros => {
            // Word-wise over each 4 KiB block; only a dirty block is
            // searched byte by byte.
            for (i, block) in found.chunks(4096).enumerate() {
                if !is_zero(block) {
                    let j = block.iter().position(|b| *b != 0).unwrap_or(0);
                    return Some(i * 4096 + j);
                }
            }
            None
        }
        Content::Stream(seed) => {
            let expect = &mut scratch[..found.len()];
            fill_pattern(seed, offset, expect);
            found.iter().zip(expect.iter()).position(|(a, b)| a != b)
        }
    }
}

fn expected_hex(content: &Content, offset: u64, n: usize) -> String {
    match content {
        Content::Zeros => "00".repeat(n),
        Content::Stream(seed) => {
            let mut buf = vec![0u8; n];
            // The stream is seekable by 4-byte words; start at the word and skip.
            let word = offset / 4 * 4;
            let mut wide = vec![0u8; n + 4];
            fill_pattern(seed, word, &mut wide);
            let skip = usize::try_from(offset - word).unwrap_or(0);
            buf.copy_from_slice(&wide[skip..skip + n]);
            hex::encode(buf)
        }
    }
}

/// The first unexpected bytes of `data` (read at device `offset`), if any.
fn find_failure(
    content: &Content,
    offset: u64,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> Option<VerifyResult> {
    if scratch.len() < data.len() {
        scratch.resize(data.len(), 0);
    }
    let i = first_mismatch(data, content, offset, scratch)?;
    let at = offset + i as u64;
    let n = (data.len() - i).min(16);
    Some(VerifyResult::Fail {
        offset: at,
        found: hex::encode(&data[i..i + n]),
        expected: expected_hex(content, at, n),
    })
}

/// Sampled and metadata reads: one SHA-256 over every byte, in order.
struct Checker<'a> {
    content: &'a Content,
    hasher: Sha256,
    scratch: Vec<u8>,
    samples: u64,
    bytes: u64,
    failure: Option<VerifyResult>,
}

impl<'a> Checker<'a> {
    fn new(content: &'a Content) -> Self {
        Checker {
            content,
            hasher: Sha256::new(),
            scratch: Vec::new(),
            samples: 0,
            bytes: 0,
            failure: None,
        }
    }

    fn check(&mut self, offset: u64, data: &[u8]) {
        self.hasher.update(data);
        self.samples += 1;
        self.bytes += data.len() as u64;
        if self.failure.is_none() {
            self.failure = find_failure(self.content, offset, data, &mut self.scratch);
        }
    }
}

/// Threads that check and hash a full read-back when nothing says
/// otherwise: one per core, at most 4.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

/// Reads back `mode`'s ranges (`regions` for [`VerifyMode::Metadata`]) and
/// compares them with `content`. A full read is checked and hashed by
/// `threads` threads, `chunk` bytes at a time (which also fixes its
/// digest, see [`Verification::digest`]). Errors only when a read fails.
pub fn verify(
    io: &mut dyn BlockIo,
    mode: VerifyMode,
    content: &Content,
    regions: &[(u64, u64)],
    chunk: usize,
    threads: usize,
    meter: &mut Meter,
) -> Result<Verification, Box<(Verification, ReadFailure)>> {
    let size = io.size();
    let expected = match content {
        Content::Zeros => Expected::Zeros,
        Content::Stream(seed) => Expected::Pattern {
            seed: hex::encode(seed),
        },
    };
    let mut v = Verification {
        mode,
        expected,
        samples: 0,
        bytes_read: 0,
        sample_seed: None,
        digest: String::new(),
        result: VerifyResult::Pass,
        digest_chunk_bytes: None,
    };
    let outcome = if mode == VerifyMode::Full {
        let full = check_full(io, content, chunk, threads.max(1), meter);
        v.samples = full.samples;
        v.bytes_read = full.bytes;
        v.digest = hex::encode(full.digest);
        v.digest_chunk_bytes = Some(chunk as u64);
        if let Some(f) = full.failure {
            v.result = f;
        }
        full.outcome
    } else {
        let ranges = match mode {
            VerifyMode::Sampled { blocks_per_gib } => {
                let seed = fresh_seed();
                v.sample_seed = Some(hex::encode(seed));
                sample_ranges(size, blocks_per_gib, &seed)
            }
            _ => regions.to_vec(),
        };
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let mut checker = Checker::new(content);
        let outcome = read_ranges(io, &ranges, chunk, &mut checker, meter, total);
        v.samples = checker.samples;
        v.bytes_read = checker.bytes;
        v.digest = hex::encode(checker.hasher.finalize());
        if let Some(f) = checker.failure {
            v.result = f;
        }
        outcome
    };
    match outcome {
        Ok(()) => Ok(v),
        Err(f) => {
            v.result = VerifyResult::Error {
                offset: f.offset,
                errno: f.error.raw_os_error().unwrap_or(0),
                error: f.error.to_string(),
            };
            Err(Box::new((v, f)))
        }
    }
}

/// Reader threads of a full read-back when the device gives a second
/// handle ([`BlockIo::try_clone`]): two requests in flight, claimed in
/// offset order, so the device still sees one front-to-back stream (reads
/// at N places at once defeated the host's read-ahead) and never waits for
/// the next request while the previous one is being handed on.
pub const READERS: usize = 2;

/// What a full read-back found.
struct Full {
    /// SHA-256 over the chunks' SHA-256s, in order.
    digest: [u8; 32],
    samples: u64,
    bytes: u64,
    /// The failure at the lowest offset.
    failure: Option<VerifyResult>,
    outcome: Result<(), ReadFailure>,
}

/// A chunk read, on its way to a checker.
struct Job {
    index: u64,
    offset: u64,
    len: usize,
    buf: AlignedBuf,
}

/// A chunk checked, on its way back.
struct Checked {
    index: u64,
    len: usize,
    digest: [u8; 32],
    failure: Option<VerifyResult>,
    buf: AlignedBuf,
}

/// What the reader threads of one full read-back share.
struct Chunks {
    size: u64,
    chunk: usize,
    count: u64,
    /// The next chunk to claim: readers take chunks strictly in order.
    next: AtomicU64,
    /// A reader failed: the others claim nothing more.
    stop: AtomicBool,
    empty: Mutex<mpsc::Receiver<AlignedBuf>>,
}

impl Chunks {
    /// Claims and reads chunks until none is left, a read fails or the
    /// checkers hung up.
    fn read(&self, io: &mut dyn BlockIo, jobs: &mpsc::SyncSender<Job>) -> Result<(), ReadFailure> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // The buffer before the claim: a claimed chunk is read at once,
            // so the two requests in flight are always neighbours.
            let buf = match self.empty.lock() {
                Ok(rx) => rx.recv(),
                Err(poisoned) => poisoned.into_inner().recv(),
            };
            let Ok(mut buf) = buf else {
                return Ok(());
            };
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.count {
                return Ok(());
            }
            let offset = index * self.chunk as u64;
            let len =
                usize::try_from((self.size - offset).min(self.chunk as u64)).unwrap_or(self.chunk);
            if let Err((offset, error)) = read_exact_at(io, &mut buf.as_mut_slice()[..len], offset)
            {
                self.stop.store(true, Ordering::Relaxed);
                return Err(ReadFailure { offset, error });
            }
            let job = Job {
                index,
                offset,
                len,
                buf,
            };
            if jobs.send(job).is_err() {
                return Ok(());
            }
        }
    }
}

/// SHA-256 of `len` zero bytes.
fn zeros_digest(len: usize) -> [u8; 32] {
    let block = vec![0u8; (64 << 10).min(len)];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        h.update(&block[..n]);
        left -= n;
    }
    h.finalize()
}

/// Checks one chunk read at `offset`: its SHA-256 and its first unexpected
/// bytes. A chunk that must be and is all zeros has the digest of that
/// many zeros, computed once per length (`zeros`) instead of per chunk:
/// the same bytes, the same digest, and hashing every byte
/// (~1.7 GB/s a core) was what held a full read-back below the device.
fn check_chunk(
    content: &Content,
    zeros: &[(usize, [u8; 32])],
    offset: u64,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> ([u8; 32], Option<VerifyResult>) {
    if *content == Content::Zeros && is_zero(data) {
        let known = zeros.iter().find(|(len, _)| *len == data.len());
        let digest = known.map_or_else(|| zeros_digest(data.len()), |(_, d)| *d);
        return (digest, None);
    }
    (
        Sha256::digest(data),
        find_failure(content, offset, data, scratch),
    )
}

/// Full read-back: [`READERS`] reader threads claim `chunk`-byte chunks
/// front to back (sequential, as `dd`, so the device's own read-ahead
/// works, with a second request in flight), `threads` checker threads
/// each take the next chunk read, compare it and hash it on their own,
/// and this thread takes the results in offset order: the chunk digests
/// into the outer SHA-256, the first failure, the bytes and the progress.
/// A chunk whose read failed ends the read-back there; chunks after it
/// that another reader already read are not counted.
fn check_full(
    io: &mut dyn BlockIo,
    content: &Content,
    chunk: usize,
    threads: usize,
    meter: &mut Meter,
) -> Full {
    let size = io.size();
    let extra: Vec<Box<dyn BlockIo>> = (1..READERS).filter_map(|_| io.try_clone()).collect();
    let pool = threads + extra.len() + 3;
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(pool);
    let (done_tx, done_rx) = mpsc::channel::<Checked>();
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..pool {
        let _ = empty_tx.send(AlignedBuf::zeroed(chunk));
    }
    let chunks = Chunks {
        size,
        chunk,
        count: size.div_ceil(chunk as u64),
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        empty: Mutex::new(empty_rx),
    };
    let zeros: Vec<(usize, [u8; 32])> = match content {
        Content::Zeros => {
            let tail = usize::try_from(size % chunk as u64).unwrap_or(0);
            std::iter::once(chunk)
                .chain((tail > 0).then_some(tail))
                .filter(|len| *len as u64 <= size)
                .map(|len| (len, zeros_digest(len)))
                .collect()
        }
        Content::Stream(_) => Vec::new(),
    };
    let job_rx = Mutex::new(job_rx);
    let mut full = Full {
        digest: [0; 32],
        samples: 0,
        bytes: 0,
        failure: None,
        outcome: Ok(()),
    };
    let mut outer = Sha256::new();
    full.outcome = std::thread::scope(|s| {
        let chunks = &chunks;
        let mut readers = Vec::with_capacity(1 + extra.len());
        let jobs = job_tx.clone();
        readers.push(s.spawn(move || chunks.read(io, &jobs)));
        for mut other in extra {
            let jobs = job_tx.clone();
            readers.push(s.spawn(move || chunks.read(other.as_mut(), &jobs)));
        }
        // Only the readers hold the job channel: when they end, so do the
        // checkers.
        drop(job_tx);
        for _ in 0..threads {
            let (job_rx, done_tx, zeros) = (&job_rx, done_tx.clone(), &zeros);
            s.spawn(move || {
                let mut scratch = Vec::new();
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    let Ok(job) = job else {
                        return;
                    };
                    let data = &job.buf.as_slice()[..job.len];
                    let (digest, failure) =
                        check_chunk(content, zeros, job.offset, data, &mut scratch);
                    let checked = Checked {
                        index: job.index,
                        len: job.len,
                        digest,
                        failure,
                        buf: job.buf,
                    };
                    if done_tx.send(checked).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        // Chunks arrive in any order and are taken in offset order (at
        // most `pool` wait here, without their buffers), so the first
        // failure taken is the lowest and a gap left by a failed read
        // stops the count there.
        let mut waiting = BTreeMap::new();
        let mut next = 0u64;
        for c in done_rx.iter() {
            let _ = empty_tx.send(c.buf);
            waiting.insert(c.index, (c.len, c.digest, c.failure));
            while let Some((len, digest, failure)) = waiting.remove(&next) {
                outer.update(&digest);
                full.samples += 1;
                full.bytes += len as u64;
                if full.failure.is_none() {
                    full.failure = failure;
                }
                next += 1;
            }
            meter.update(full.bytes.min(size));
        }
        let mut outcome: Result<(), ReadFailure> = Ok(());
        for r in readers {
            let r = r.join().unwrap_or_else(|_| {
                Err(ReadFailure {
                    offset: full.bytes,
                    error: io::Error::other("verification reader thread panicked"),
                })
            });
            // Of two failed reads, the lower one is where the read-back ended.
            if let Err(f) = r {
                match &outcome {
                    Err(g) if g.offset <= f.offset => {}
                    _ => outcome = Err(f),
                }
            }
        }
        outcome
    });
    full.digest = outer.finalize();
    full
}

/// Reads every range in order, `chunk` bytes at a time, on a reader thread
/// that hands full buffers to the checker on this one.
fn read_ranges(
    io: &mut dyn BlockIo,
    ranges: &[(u64, u64)],
    chunk: usize,
    checker: &mut Checker<'_>,
    meter: &mut Meter,
    total: u64,
) -> Result<(), ReadFailure> {
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, usize, AlignedBuf)>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..3 {
        let _ = empty_tx.send(AlignedBuf::zeroed(chunk));
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<(), ReadFailure> {
            for &(start, len) in ranges {
                let mut offset = start;
                while offset < start + len {
                    let Ok(mut buf) = empty_rx.recv() else {
                        return Ok(());
                    };
                    let n =
                        usize::try_from((start + len - offset).min(chunk as u64)).unwrap_or(chunk);
                    read_exact_at(io, &mut buf.as_mut_slice()[..n], offset)
                        .map_err(|(offset, error)| ReadFailure { offset, error })?;
                    if full_tx.send((offset, n, buf)).is_err() {
                        return Ok(());
                    }
                    offset += n as u64;
                }
            }
            Ok(())
        });
        let mut done = 0u64;
        for (offset, n, buf) in full_rx.iter() {
            checker.check(offset, &buf.as_slice()[..n]);
            done += n as u64;
            meter.update(done.min(total));
            let _ = empty_tx.send(buf);
        }
        match reader.join() {
            Ok(r) => r,
            Err(_) => Err(ReadFailure {
                offset: 0,
                error: io::Error::other("verification reader thread panicked"),
            }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wipe::io::MemIo;

    fn meter() -> Meter {
        Meter::new(None, "mem", "verify", 0)
    }

    #[test]
    fn sampled_ranges_cover_both_ends_and_scale_with_size() {
        let seed = [7u8; 32];
        let r = sample_ranges(3 * GIB, 64, &seed);
        assert_eq!(r.len(), 2 + 192);
        assert_eq!(r[0], (0, MIB));
        assert!(r.contains(&(3 * GIB - MIB, MIB)));
        assert!(r.iter().all(|(o, l)| o % SAMPLE == 0 && o + l <= 3 * GIB));
        assert_eq!(
            r,
            sample_ranges(3 * GIB, 64, &seed),
            "same seed, same samples"
        );
        let small = sample_ranges(64 * 1024, 64, &seed);
        assert!(small.iter().all(|(o, l)| o + l <= 64 * 1024));
    }

    #[test]
    fn finds_the_first_nonzero_byte_and_digests_what_was_read() {
        let mut m = MemIo {
            data: vec![0; 8 << 20],
        };
        m.data[5_000_003] = 0x5a;
        let v = verify(
            &mut m,
            VerifyMode::Full,
            &Content::Zeros,
            &[],
            1 << 20,
            1,
            &mut meter(),
        )
        .unwrap();
        assert_eq!(
            v.result,
            VerifyResult::Fail {
                offset: 5_000_003,
                found: format!("5a{}", "00".repeat(15)),
                expected: "00".repeat(16),
            }
        );
        assert_eq!(v.bytes_read, 8 << 20);
        assert_eq!(v.samples, 8);
        assert_eq!(v.digest, hash_list(&m.data, 1 << 20));
        assert_eq!(v.digest_chunk_bytes, Some(1 << 20));
        m.data[5_000_003] = 0;
        let v = verify(
            &mut m,
            VerifyMode::Full,
            &Content::Zeros,
            &[],
            1 << 20,
            1,
            &mut meter(),
        )
        .unwrap();
        assert!(v.passed());
    }

    #[test]
    fn checks_a_regenerated_stream() {
        let seed = [3u8; 32];
        let mut m = MemIo {
            data: vec![0; 4 << 20],
        };
        fill_pattern(&seed, 0, &mut m.data);
        let content = Content::Stream(seed);
        let v = verify(
            &mut m,
            VerifyMode::Sampled {
                blocks_per_gib: 512,
            },
            &content,
            &[],
            1 << 20,
            1,
            &mut meter(),
        )
        .unwrap();
        assert!(v.passed(), "{v:?}");
        m.data[(4 << 20) - 10] ^= 1;
        let v = verify(
            &mut m,
            VerifyMode::Full,
            &content,
            &[],
            1 << 20,
            1,
            &mut meter(),
        )
        .unwrap();
        match v.result {
            VerifyResult::Fail { offset, .. } => assert_eq!(offset, (4 << 20) - 10),
            other => panic!("{other:?}"),
        }
        // Zeros are not what a random pass leaves.
        let v = verify(
            &mut m,
            VerifyMode::Full,
            &Content::Zeros,
            &[],
            1 << 20,
            1,
            &mut meter(),
        )
        .unwrap();
        assert!(!v.passed());
    }

    /// The digest of a full read, recomputed: SHA-256 over the SHA-256s of
    /// `chunk`-byte pieces.
    fn hash_list(data: &[u8], chunk: usize) -> String {
        let mut outer = Vec::new();
        for c in data.chunks(chunk) {
            outer.extend(hex::decode(warden_protocol::sha256_hex(c)).unwrap());
        }
        warden_protocol::sha256_hex(&outer)
    }

    #[test]
    fn a_full_read_on_many_threads_finds_the_first_byte_and_its_digest_does_not_depend_on_them() {
        // Not a whole number of chunks: the last one is shorter.
        let mut m = MemIo {
            data: vec![0; (8 << 20) + 4096],
        };
        m.data[7_000_000] = 0x01;
        m.data[5_000_003] = 0x5a;
        let want = hash_list(&m.data, 1 << 20);
        for threads in [1, 2, 3, 16] {
            let v = verify(
                &mut m,
                VerifyMode::Full,
                &Content::Zeros,
                &[],
                1 << 20,
                threads,
                &mut meter(),
            )
            .unwrap();
            match &v.result {
                VerifyResult::Fail { offset, .. } => assert_eq!(*offset, 5_000_003, "{threads}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(v.bytes_read, m.size());
            assert_eq!(v.samples, 9);
            assert_eq!(v.digest, want, "{threads} threads");
        }
        // A read error stops the read and names its offset.
        let mut f = FailRead {
            inner: MemIo {
                data: vec![0; 8 << 20],
            },
            at: 6 << 20,
        };
        let (v, e) = *verify(
            &mut f,
            VerifyMode::Full,
            &Content::Zeros,
            &[],
            1 << 20,
            4,
            &mut meter(),
        )
        .unwrap_err();
        assert_eq!(e.offset, 6 << 20);
        assert_eq!(e.error.raw_os_error(), Some(libc::EIO));
        assert!(matches!(v.result, VerifyResult::Error { offset, .. } if offset == 6 << 20));
        assert_eq!(v.bytes_read, 6 << 20);
    }

    /// Reads fail with EIO from byte `at` on.
    #[derive(Clone)]
    struct FailRead {
        inner: MemIo,
        at: u64,
    }

    impl BlockIo for FailRead {
        fn path(&self) -> &str {
            "mem"
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
            self.inner.write_at(buf, offset)
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            if offset + buf.len() as u64 > self.at {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.read_at(buf, offset)
        }
        fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn secure_discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.secure_discard(offset, len)
        }
        fn zeroout(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.zeroout(offset, len)
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        // A second reader, so the failure is met with two reads in flight.
        fn try_clone(&self) -> Option<Box<dyn BlockIo>> {
            Some(Box::new(self.clone()))
        }
    }

    #[test]
    fn a_zero_chunk_has_the_digest_of_its_bytes() {
        for len in [1, 4096, 65536, 65537, 1 << 20] {
            let data = vec![0u8; len];
            let want: [u8; 32] = Sha256::digest(&data);
            assert_eq!(zeros_digest(len), want, "{len}");
            let known = [(len, want)];
            for zeros in [&known[..], &[]] {
                let (d, failure) = check_chunk(&Content::Zeros, zeros, 0, &data, &mut Vec::new());
                assert_eq!(d, want, "{len}");
                assert_eq!(failure, None);
            }
        }
    }

    #[test]
    fn two_readers_stop_the_count_at_the_first_failed_read() {
        // The read fails in the middle of a chunk: what was read of the
        // chunks before it counts, nothing after it, whichever reader got
        // further.
        for threads in [1, 3] {
            let mut f = FailRead {
                inner: MemIo {
                    data: vec![0; 16 << 20],
                },
                at: (9 << 20) + 4096,
            };
            let (v, e) = *verify(
                &mut f,
                VerifyMode::Full,
                &Content::Zeros,
                &[],
                1 << 20,
                threads,
                &mut meter(),
            )
            .unwrap_err();
            assert_eq!(e.offset, 9 << 20, "{threads}");
            assert_eq!(v.bytes_read, 9 << 20, "{threads}");
            assert_eq!(v.samples, 9, "{threads}");
        }
    }
}
