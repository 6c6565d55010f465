//! Read-back verification: does the device hold what the last method should
//! have left (zeros, or the last overwrite pass's stream)?
//!
//! `sampled` reads the first and last MiB plus N random 4 KiB-aligned blocks
//! per GiB; `full` reads every byte (a reader thread feeds the checker, so
//! reading and hashing overlap); `metadata` reads exactly the ranges a
//! metadata wipe zeroed. Every byte read goes, in offset order, into a
//! SHA-256 digest that the record carries. The first unexpected bytes are
//! recorded with their offset. This module only reads; it never writes.

use std::io;
use std::sync::mpsc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use warden_protocol::wipe::{Expected, Verification, VerifyMode, VerifyResult};

use super::io::{read_exact_at, AlignedBuf, BlockIo};
use super::overwrite::{fill_pattern, fresh_seed, Content};
use super::progress::Meter;

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
            // An OR over each 4 KiB block vectorizes; only a dirty block is
            // searched byte by byte.
            for (i, block) in found.chunks(4096).enumerate() {
                if block.iter().fold(0u8, |a, b| a | b) != 0 {
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

struct Checker<'a> {
    content: &'a Content,
    hasher: Sha256,
    scratch: Vec<u8>,
    samples: u64,
    bytes: u64,
    failure: Option<VerifyResult>,
}

impl Checker<'_> {
    fn check(&mut self, offset: u64, data: &[u8]) {
        self.hasher.update(data);
        self.samples += 1;
        self.bytes += data.len() as u64;
        if self.failure.is_some() {
            return;
        }
        if self.scratch.len() < data.len() {
            self.scratch.resize(data.len(), 0);
        }
        if let Some(i) = first_mismatch(data, self.content, offset, &mut self.scratch) {
            let at = offset + i as u64;
            let n = (data.len() - i).min(16);
            self.failure = Some(VerifyResult::Fail {
                offset: at,
                found: hex::encode(&data[i..i + n]),
                expected: expected_hex(self.content, at, n),
            });
        }
    }
}

/// Reads back `mode`'s ranges (`regions` for [`VerifyMode::Metadata`]) and
/// compares them with `content`. Errors only when a read fails.
pub fn verify(
    io: &mut dyn BlockIo,
    mode: VerifyMode,
    content: &Content,
    regions: &[(u64, u64)],
    chunk: usize,
    meter: &mut Meter,
) -> Result<Verification, Box<(Verification, ReadFailure)>> {
    let size = io.size();
    let mut sample_seed = None;
    let ranges: Vec<(u64, u64)> = match mode {
        VerifyMode::Full => vec![(0, size)],
        VerifyMode::Sampled { blocks_per_gib } => {
            let seed = fresh_seed();
            sample_seed = Some(hex::encode(seed));
            sample_ranges(size, blocks_per_gib, &seed)
        }
        VerifyMode::Metadata => regions.to_vec(),
    };
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let mut checker = Checker {
        content,
        hasher: Sha256::new(),
        scratch: Vec::new(),
        samples: 0,
        bytes: 0,
        failure: None,
    };
    let outcome = read_ranges(io, &ranges, chunk, &mut checker, meter, total);
    let expected = match content {
        Content::Zeros => Expected::Zeros,
        Content::Stream(seed) => Expected::Pattern {
            seed: hex::encode(seed),
        },
    };
    let mut v = Verification {
        mode,
        expected,
        samples: checker.samples,
        bytes_read: checker.bytes,
        sample_seed,
        digest: hex::encode(checker.hasher.finalize()),
        result: checker.failure.unwrap_or(VerifyResult::Pass),
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
        assert_eq!(v.digest, warden_protocol::sha256_hex(&m.data));
        m.data[5_000_003] = 0;
        let v = verify(
            &mut m,
            VerifyMode::Full,
            &Content::Zeros,
            &[],
            1 << 20,
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
            &mut meter(),
        )
        .unwrap();
        assert!(!v.passed());
    }
}
