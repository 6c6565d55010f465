//! Erase every local disk, prove it by reading back, and record it.
//!
//! `plan` picks and walks the methods (`auto`: the drive's own erase from
//! `crate::disk`'s capabilities, then `BLKSECDISCARD` where zeros are
//! guaranteed, then `BLKZEROOUT`, then overwrite), one thread per disk;
//! whether a disk is in use and what it can do come from
//! [`crate::disk::probe_in`] alone;
//! `block`, `overwrite` and `metadata` do the writing through the
//! [`io::BlockIo`] trait (real devices in `io`, fault injectors for tests);
//! `verify` reads back; `progress` reports. The result is a
//! [`warden_protocol::wipe::DiskRecord`] per disk.
//!
//! This module must never report a disk clean that read back anything but
//! what the last method should have left, and must never touch a disk that
//! is mounted or in use (it is refused by name).

mod block;
pub mod hw;
pub mod io;
pub mod metadata;
mod overwrite;
pub mod plan;
pub mod progress;
pub mod verify;

use std::path::PathBuf;

pub use overwrite::{fill_pattern, Content};
pub use plan::{open_target, wipe_disks, wipe_target, wipe_targets, Target};
pub use progress::EventSink;
pub use warden_protocol::wipe::{DiskRecord, Method, Pattern, Status, VerifyMode, WipeReport};

/// How one method failed, before it becomes an [`warden_protocol::wipe::Outcome`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum MethodError {
    /// The device cannot do this; nothing was changed.
    #[error("{0}")]
    Unsupported(String),
    /// The device failed at `offset`.
    #[error("I/O error at byte {offset}: {error}")]
    Io { offset: u64, error: std::io::Error },
    /// The method failed otherwise (e.g. a drive's erase command).
    #[error("{0}")]
    Failed(String),
}

/// What to do to every disk, and how to check it.
#[derive(Clone)]
pub struct WipeOptions {
    pub method: Method,
    /// `Sampled` or `Full` (a metadata wipe always checks its own ranges).
    pub verify: VerifyMode,
    /// Bytes per read/write request (O_DIRECT; a multiple of 4 KiB).
    pub chunk_bytes: usize,
    /// Where `/sys` is (fixtures in tests).
    pub sys_root: PathBuf,
    /// Where `/proc` is (fixtures in tests).
    pub proc_root: PathBuf,
    /// Progress and result events; `None` keeps quiet (tracing still logs).
    pub events: Option<EventSink>,
    /// Threads that check and hash a full read-back, per disk; 0 picks
    /// one per core, at most 4. The digest does not depend on it.
    pub verify_threads: usize,
}

impl std::fmt::Debug for WipeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WipeOptions")
            .field("method", &self.method)
            .field("verify", &self.verify)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("sys_root", &self.sys_root)
            .field("proc_root", &self.proc_root)
            .field("events", &self.events.is_some())
            .field("verify_threads", &self.verify_threads)
            .finish()
    }
}

/// Default sampled verification density.
pub const DEFAULT_BLOCKS_PER_GIB: u32 = 64;
/// Default request size: large enough that O_DIRECT runs at device speed.
pub const DEFAULT_CHUNK: usize = 8 << 20;

impl Default for WipeOptions {
    fn default() -> Self {
        WipeOptions {
            method: Method::Auto,
            verify: VerifyMode::Sampled {
                blocks_per_gib: DEFAULT_BLOCKS_PER_GIB,
            },
            chunk_bytes: DEFAULT_CHUNK,
            sys_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            events: Some(std::sync::Arc::new(crate::console::emit)),
            verify_threads: 0,
        }
    }
}
