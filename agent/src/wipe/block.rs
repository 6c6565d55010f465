//! The kernel's own erase requests over the whole device: `BLKSECDISCARD`,
//! `BLKDISCARD` and `BLKZEROOUT`, issued in chunks so progress can be shown
//! and an error located.
//!
//! These functions only issue the requests; whether the device now reads
//! zeros is for `verify` to find out, never assumed here.

use std::io;

use super::io::BlockIo;
use super::progress::Meter;
use super::MethodError;

/// Chunk of one discard/zeroout request: small enough for a progress line a
/// second on slow devices, large enough that request overhead is nothing.
const CHUNK: u64 = 256 << 20;

/// Errors that mean "this device does not do that" rather than "the device failed".
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeOp {
    Discard,
    SecureDiscard,
    Zeroout,
}

impl RangeOp {
    fn name(self) -> &'static str {
        match self {
            RangeOp::Discard => "BLKDISCARD",
            RangeOp::SecureDiscard => "BLKSECDISCARD",
            RangeOp::Zeroout => "BLKZEROOUT",
        }
    }
}

/// Runs `op` over the whole device, chunk by chunk. Returns the bytes covered.
/// An "unsupported" error on the first chunk means the device cannot do it
/// (nothing changed); any error later is an I/O failure at that chunk.
pub(crate) fn whole_device(
    io: &mut dyn BlockIo,
    op: RangeOp,
    meter: &mut Meter,
) -> Result<u64, MethodError> {
    let size = io.size();
    let mut offset = 0u64;
    while offset < size {
        let len = CHUNK.min(size - offset);
        let r = match op {
            RangeOp::Discard => io.discard(offset, len),
            RangeOp::SecureDiscard => io.secure_discard(offset, len),
            RangeOp::Zeroout => io.zeroout(offset, len),
        };
        if let Err(e) = r {
            if offset == 0 && is_unsupported(&e) {
                return Err(MethodError::Unsupported(format!(
                    "{} on {} is not supported: {e}",
                    op.name(),
                    io.path()
                )));
            }
            return Err(MethodError::Io { offset, error: e });
        }
        offset += len;
        meter.update(offset);
    }
    if op == RangeOp::Zeroout {
        // BLKZEROOUT may fall back to the kernel writing zero pages; make
        // sure they reached the medium before anyone reads back.
        io.sync().map_err(|error| MethodError::Io {
            offset: size,
            error,
        })?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wipe::io::{FailAt, MemIo};

    #[test]
    fn zeroout_clears_and_discard_unsupported_is_reported() {
        let mut m = MemIo {
            data: vec![0xaa; 1 << 20],
        };
        let mut meter = Meter::new(None, "mem", "zeroout", 1 << 20);
        assert_eq!(
            whole_device(&mut m, RangeOp::Zeroout, &mut meter).unwrap(),
            1 << 20
        );
        assert!(m.data.iter().all(|b| *b == 0));
        let err = whole_device(&mut m, RangeOp::SecureDiscard, &mut meter).unwrap_err();
        assert!(matches!(err, MethodError::Unsupported(_)), "{err:?}");
    }

    #[test]
    fn io_error_names_the_chunk() {
        let mut f = FailAt::eio(
            MemIo {
                data: vec![1; 600 << 20],
            },
            300 << 20,
        );
        let mut meter = Meter::new(None, "mem", "zeroout", 600 << 20);
        match whole_device(&mut f, RangeOp::Zeroout, &mut meter).unwrap_err() {
            MethodError::Io { offset, error } => {
                assert_eq!(offset, 256 << 20);
                assert_eq!(error.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("{other:?}"),
        }
    }
}
