//! N-pass overwrite of the whole device with zeros or a ChaCha8 stream:
//! O_DIRECT writes from large aligned buffers, random data generated on a
//! second thread while the previous buffer is being written, `fdatasync` at
//! the end of each pass.
//!
//! Byte `n` of a random pass is byte `n` of the ChaCha8 stream of that
//! pass's seed, so `verify` can regenerate any block ([`fill_pattern`]).
//! This module writes; it never judges whether the write took.

use std::sync::mpsc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use warden_protocol::wipe::Pattern;

use super::io::{write_all_at, AlignedBuf, BlockIo};
use super::progress::Meter;
use super::MethodError;

/// What the device should read back after the last pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Zeros,
    /// The ChaCha8 stream of this seed, from byte 0 of the device.
    Stream([u8; 32]),
}

/// Fills `buf` with the stream of `seed` as it lies at device offset
/// `offset` (a multiple of 4: the stream is seekable by 32-bit words).
pub fn fill_pattern(seed: &[u8; 32], offset: u64, buf: &mut [u8]) {
    let mut rng = ChaCha8Rng::from_seed(*seed);
    rng.set_word_pos(u128::from(offset / 4));
    rng.fill_bytes(buf);
}

/// A fresh seed from the OS (once per pass, not per byte).
pub fn fresh_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    seed
}

/// Writes the device `passes` times; returns bytes written and what the last
/// pass left. `meter` sees the bytes of all passes together.
pub(crate) fn overwrite(
    io: &mut dyn BlockIo,
    passes: u32,
    pattern: Pattern,
    chunk: usize,
    meter: &mut Meter,
) -> Result<(u64, Content), MethodError> {
    let size = io.size();
    let mut written = 0u64;
    let mut content = Content::Zeros;
    for _ in 0..passes.max(1) {
        content = match pattern {
            Pattern::Zeros => {
                zero_pass(io, chunk, written, meter)?;
                Content::Zeros
            }
            Pattern::Random => {
                let seed = fresh_seed();
                random_pass(io, &seed, chunk, written, meter)?;
                Content::Stream(seed)
            }
        };
        io.sync().map_err(|error| MethodError::Io {
            offset: size,
            error,
        })?;
        written += size;
    }
    Ok((written, content))
}

fn chunk_len(size: u64, offset: u64, chunk: usize) -> usize {
    usize::try_from((size - offset).min(chunk as u64)).unwrap_or(chunk)
}

fn zero_pass(
    io: &mut dyn BlockIo,
    chunk: usize,
    base: u64,
    meter: &mut Meter,
) -> Result<(), MethodError> {
    let size = io.size();
    let buf = AlignedBuf::zeroed(chunk);
    let mut offset = 0u64;
    while offset < size {
        let n = chunk_len(size, offset, chunk);
        write_all_at(io, &buf.as_slice()[..n], offset)
            .map_err(|(offset, error)| MethodError::Io { offset, error })?;
        offset += n as u64;
        meter.update(base + offset);
    }
    Ok(())
}

fn random_pass(
    io: &mut dyn BlockIo,
    seed: &[u8; 32],
    chunk: usize,
    base: u64,
    meter: &mut Meter,
) -> Result<(), MethodError> {
    let size = io.size();
    // Three buffers: one being generated, one being written, one spare.
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, usize, AlignedBuf)>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..3 {
        let _ = empty_tx.send(AlignedBuf::zeroed(chunk));
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut rng = ChaCha8Rng::from_seed(*seed);
            let mut offset = 0u64;
            while offset < size {
                // The writer hung up (it failed): stop generating.
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = chunk_len(size, offset, chunk);
                rng.fill_bytes(&mut buf.as_mut_slice()[..n]);
                if full_tx.send((offset, n, buf)).is_err() {
                    return;
                }
                offset += n as u64;
            }
        });
        for (offset, n, buf) in full_rx.iter() {
            write_all_at(io, &buf.as_slice()[..n], offset)
                .map_err(|(offset, error)| MethodError::Io { offset, error })?;
            meter.update(base + offset + n as u64);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wipe::io::{FailAt, MemIo};

    #[test]
    fn random_pass_matches_the_regenerated_stream() {
        let mut m = MemIo {
            data: vec![0; (3 << 20) + 4096],
        };
        let mut meter = Meter::new(None, "mem", "overwrite", 0);
        let (written, content) =
            overwrite(&mut m, 2, Pattern::Random, 1 << 20, &mut meter).unwrap();
        assert_eq!(written, 2 * m.data.len() as u64);
        let Content::Stream(seed) = content else {
            panic!("{content:?}")
        };
        let mut expect = vec![0u8; 8192];
        fill_pattern(&seed, (2 << 20) - 4096, &mut expect);
        assert_eq!(&m.data[(2 << 20) - 4096..(2 << 20) + 4096], &expect[..]);
    }

    #[test]
    fn a_failing_write_reports_the_exact_offset() {
        let mut f = FailAt::eio(
            MemIo {
                data: vec![1; 4 << 20],
            },
            3_000_000 / 512 * 512,
        );
        let mut meter = Meter::new(None, "mem", "overwrite", 0);
        match overwrite(&mut f, 1, Pattern::Random, 1 << 20, &mut meter).unwrap_err() {
            MethodError::Io { offset, error } => {
                assert_eq!(offset, 3_000_000 / 512 * 512);
                assert_eq!(error.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("{other:?}"),
        }
    }
}
