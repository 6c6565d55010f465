//! Reads the firmware's TCG event log (`binary_bios_measurements`) as bytes.
//!
//! Bounded: a log over [`MAX_EVENT_LOG`] is refused rather than read into the
//! RAM the node runs from. This module never parses the bytes (a later
//! issue does that, from `&[u8]`, in the protocol crate).

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest log we read (the server refuses larger ones too).
pub const MAX_EVENT_LOG: u64 = 4 * 1024 * 1024;

/// Why the log was not read.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("no event log at {path} (no TPM, or securityfs not mounted)")]
    Absent { path: PathBuf },
    #[error("event log {path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read event log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the whole log at `path`. Its size is found by reading, not by
/// `stat`: securityfs reports 0 bytes for it.
pub fn read_event_log(path: &Path) -> Result<Vec<u8>, EventLogError> {
    let io = |source: std::io::Error| EventLogError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EventLogError::Absent {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "over it".
    file.take(MAX_EVENT_LOG + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_EVENT_LOG {
        return Err(EventLogError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_EVENT_LOG,
        });
    }
    bytes.shrink_to_fit();
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_small_log() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert_eq!(read_event_log(&p).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn absent_log_is_its_own_error() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("missing");
        let err = read_event_log(&p).unwrap_err();
        assert!(matches!(err, EventLogError::Absent { .. }));
        assert!(err.to_string().contains(&p.display().to_string()));
    }

    #[test]
    fn refuses_a_log_over_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("big");
        // Sparse: no 4 MiB written to the disk.
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_EVENT_LOG + 1).unwrap();
        let err = read_event_log(&p).unwrap_err();
        assert!(matches!(err, EventLogError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains(&p.display().to_string()));
        f.set_len(MAX_EVENT_LOG).unwrap();
        assert_eq!(read_event_log(&p).unwrap().len() as u64, MAX_EVENT_LOG);
    }
}
