//! Restore (export → local disk) and the snapshot's read-back verification:
//! both read chunks from the export — holes known through BLOCK_STATUS are
//! not read — and check each against the manifest. It must never write a
//! chunk to the target before its hash matched, nor write anything before
//! the manifest (named by digest) and the target's size were checked.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use sha2::{Digest, Sha256};
use warden_nbd::Client;
use warden_protocol::snapshot::{
    chunk_len, parse_digest, zero_hash, Manifest, RestoreRecord, RestoreRequest,
};

use super::remote::{read_stored, Remote, ZeroMap};
use super::{ms_since, ulen, with_retries, Abort, PassError, SnapshotError, Tuning};
use crate::image::decode::AlignedBuf;
use crate::image::target::Target;

/// Runs `f` for every chunk `0..n` not yet `done`, on `workers` threads,
/// each with its own buffer of `cap` bytes; marks each chunk done when `f`
/// succeeded. Stops at the first error.
pub(super) fn run_chunks(
    n: u64,
    workers: usize,
    done: &[AtomicBool],
    cap: usize,
    f: &(dyn Fn(u64, &mut AlignedBuf) -> Result<(), PassError> + Sync),
) -> Result<(), PassError> {
    let next = AtomicU64::new(0);
    let abort = Abort::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut buf = AlignedBuf::zeroed(cap);
                    while !abort.stopped() {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(flag) = done.get(ulen(i)).filter(|_| i < n) else {
                            return;
                        };
                        if flag.load(Ordering::Relaxed) {
                            continue;
                        }
                        match f(i, &mut buf) {
                            Ok(()) => flag.store(true, Ordering::Relaxed),
                            Err(e) => {
                                abort.fail(e);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            if h.join().is_err() {
                abort.fail(PassError::Fatal(SnapshotError::Worker("restore".into())));
            }
        }
    });
    abort.take().map_or(Ok(()), Err)
}

/// What [`RemoteCheck::fetch`] found.
pub(super) enum Got {
    /// The export reads as zero there (not read); the manifest agrees.
    Zero,
    /// Read into the buffer and matched; `zero`: it is all zeros.
    Read { zero: bool },
}

/// Reads chunks of the export and checks them against a manifest.
pub(super) struct RemoteCheck<'a> {
    pub remote: &'a Remote,
    pub tuning: &'a Tuning,
    pub manifest: &'a Manifest,
    pub retries: &'a AtomicU32,
}

impl RemoteCheck<'_> {
    fn zero_hashes(&self) -> ([u8; 32], [u8; 32]) {
        let m = self.manifest;
        let n = m.chunks.len() as u64;
        (
            zero_hash(m.chunk_size),
            zero_hash(chunk_len(m.disk_bytes, m.chunk_size, n.saturating_sub(1))),
        )
    }

    /// Chunk `i`: known zero on the export, or read into `buf`; either way
    /// checked against the manifest.
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        client: &Client,
        zmap: &ZeroMap,
        (zero_full, zero_last): &([u8; 32], [u8; 32]),
        disk: &str,
        i: u64,
        buf: &mut AlignedBuf,
        zeros: &[u8],
    ) -> Result<Got, PassError> {
        let m = self.manifest;
        let n = m.chunks.len() as u64;
        let (off, len) = (i * m.chunk_size, chunk_len(m.disk_bytes, m.chunk_size, i));
        let zh = if i + 1 == n { zero_last } else { zero_full };
        let Some(expected) = m.chunks.get(ulen(i)) else {
            return Err(PassError::Fatal(SnapshotError::Worker(
                self.remote.name.clone(),
            )));
        };
        let mismatch = |got: &[u8]| {
            PassError::Fatal(SnapshotError::Mismatch {
                uri: self.remote.name.clone(),
                index: i,
                offset: off,
                len,
                expected: hex::encode(expected.sha256),
                got: hex::encode(got),
            })
        };
        if zmap.covers(off, len) {
            if &expected.sha256 != zh {
                return Err(mismatch(zh));
            }
            return Ok(Got::Zero);
        }
        buf.set_len(ulen(len));
        let what = || format!("READ chunk {i} at offset {off}");
        with_retries(self.tuning, self.retries, &what, || {
            client.read_at(off, buf.as_mut_slice())
        })
        .map_err(|(source, tries)| {
            if source.is_connection_lost() {
                PassError::Lost(Box::new(source))
            } else {
                PassError::Fatal(SnapshotError::Chunk {
                    uri: self.remote.name.clone(),
                    disk: disk.to_string(),
                    op: "reading",
                    index: i,
                    offset: off,
                    tries,
                    source: Box::new(source),
                })
            }
        })?;
        let data = buf.as_slice();
        let zero = data == &zeros[..data.len()];
        let got: [u8; 32] = if zero {
            *zh
        } else {
            Sha256::digest(data).into()
        };
        if got != expected.sha256 {
            return Err(mismatch(&got));
        }
        Ok(Got::Read { zero })
    }

    /// Reads the whole image back and checks it; returns the client (a new
    /// one after a reconnect) and the number of reconnects.
    pub(super) fn verify(
        &self,
        mut client: Client,
        export_bytes: u64,
        disk: &str,
    ) -> Result<(Client, u32), SnapshotError> {
        let m = self.manifest;
        let n = m.chunks.len() as u64;
        let zh = self.zero_hashes();
        let zeros = vec![0u8; ulen(m.chunk_size)];
        let done: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let mut reconnects = 0u32;
        loop {
            let zmap = ZeroMap::query(&client, m.disk_bytes);
            let result = match zmap {
                Ok(zmap) => run_chunks(
                    n,
                    self.tuning.workers,
                    &done,
                    ulen(m.chunk_size),
                    &|i, buf| {
                        self.fetch(&client, &zmap, &zh, disk, i, buf, &zeros)
                            .map(drop)
                    },
                ),
                Err(e) if e.is_connection_lost() => Err(PassError::Lost(Box::new(e))),
                Err(source) => Err(PassError::Fatal(SnapshotError::Remote {
                    uri: self.remote.name.clone(),
                    what: "BLOCK_STATUS for the read-back".into(),
                    source: Box::new(source),
                })),
            };
            match result {
                Ok(()) => return Ok((client, reconnects)),
                Err(PassError::Fatal(e)) => {
                    client.close();
                    return Err(e);
                }
                Err(PassError::Lost(cause)) => {
                    reconnects += 1;
                    client.close();
                    if reconnects > self.tuning.reconnect_tries {
                        return Err(SnapshotError::Reconnect {
                            uri: self.remote.name.clone(),
                            cause: cause.to_string(),
                            tries: reconnects - 1,
                            source: None,
                        });
                    }
                    client = self.remote.reconnect(&cause, export_bytes)?;
                }
            }
        }
    }
}

/// Restores the backup whose manifest digest is `req.manifest_sha256`
/// from `req.uri` onto `req.target`.
pub fn restore(req: &RestoreRequest, tuning: &Tuning) -> Result<RestoreRecord, SnapshotError> {
    let started = Instant::now();
    let want = parse_digest("manifest_sha256", &req.manifest_sha256)
        .map_err(|e| SnapshotError::Request(e.to_string()))?;
    let remote = Remote::new(&req.uri, req.ca_pem.as_deref(), tuning)?;
    let mut client = remote.connect()?;
    let export_bytes = client.size();
    let stored = match read_stored(&remote, &client, &want, false) {
        Ok(s) => s,
        Err(e) => {
            client.close();
            return Err(e);
        }
    };
    let m = &stored.manifest;
    let target = Target::open(&req.target)?;
    if target.size() < m.disk_bytes {
        client.close();
        return Err(SnapshotError::TargetTooSmall {
            uri: remote.name.clone(),
            target: req.target.clone(),
            target_bytes: target.size(),
            disk_bytes: m.disk_bytes,
        });
    }
    let n = m.chunks.len() as u64;
    tracing::info!(
        uri = %remote.name, target = %req.target, disk_bytes = m.disk_bytes,
        chunks = n, manifest = %stored.digest, source = %m.source_identity,
        "restore starting"
    );
    let retries = AtomicU32::new(0);
    let check = RemoteCheck {
        remote: &remote,
        tuning,
        manifest: m,
        retries: &retries,
    };
    let zh = check.zero_hashes();
    let cap = ulen(m.chunk_size);
    let zeros = AlignedBuf::zeroed(cap);
    let (read, written, zeroed, skipped) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let done: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let mut reconnects = 0u32;
    loop {
        let result = match ZeroMap::query(&client, m.disk_bytes) {
            Ok(zmap) => run_chunks(n, tuning.workers, &done, cap, &|i, buf| {
                let (off, len) = (i * m.chunk_size, chunk_len(m.disk_bytes, m.chunk_size, i));
                let got =
                    check.fetch(&client, &zmap, &zh, &req.target, i, buf, zeros.as_slice())?;
                if let Got::Read { .. } = got {
                    read.fetch_add(len, Ordering::Relaxed);
                }
                match got {
                    Got::Read { zero: false } => {
                        target
                            .write_at(buf.as_slice(), off)
                            .map_err(SnapshotError::from)?;
                        written.fetch_add(len, Ordering::Relaxed);
                    }
                    Got::Zero | Got::Read { zero: true } if req.target_reads_zero => {
                        skipped.fetch_add(len, Ordering::Relaxed);
                    }
                    Got::Zero | Got::Read { zero: true } => {
                        target
                            .write_zeros(&zeros, off, len)
                            .map_err(SnapshotError::from)?;
                        zeroed.fetch_add(len, Ordering::Relaxed);
                    }
                }
                Ok(())
            }),
            Err(e) if e.is_connection_lost() => Err(PassError::Lost(Box::new(e))),
            Err(source) => Err(PassError::Fatal(SnapshotError::Remote {
                uri: remote.name.clone(),
                what: "BLOCK_STATUS of the export".into(),
                source: Box::new(source),
            })),
        };
        match result {
            Ok(()) => break,
            Err(PassError::Fatal(e)) => {
                client.close();
                return Err(e);
            }
            Err(PassError::Lost(cause)) => {
                reconnects += 1;
                client.close();
                if reconnects > tuning.reconnect_tries {
                    return Err(SnapshotError::Reconnect {
                        uri: remote.name.clone(),
                        cause: cause.to_string(),
                        tries: reconnects - 1,
                        source: None,
                    });
                }
                tracing::warn!(uri = %remote.name, error = %cause, reconnects, "connection lost; reconnecting");
                client = remote.reconnect(&cause, export_bytes)?;
            }
        }
    }
    let connections = u32::try_from(client.connections().len()).unwrap_or(u32::MAX);
    client.close();
    target.sync()?;
    let record = RestoreRecord {
        uri: req.uri.clone(),
        target: req.target.clone(),
        source_identity: m.source_identity.clone(),
        disk_bytes: m.disk_bytes,
        chunk_size: m.chunk_size,
        chunks: n,
        zero_chunks: m.zero_chunks(),
        manifest_sha256: stored.digest.clone(),
        bytes_read: read.load(Ordering::Relaxed),
        bytes_written: written.load(Ordering::Relaxed),
        bytes_zeroed: zeroed.load(Ordering::Relaxed),
        zero_bytes_skipped: skipped.load(Ordering::Relaxed),
        reconnects,
        connections,
        direct_io: target.direct_io(),
        elapsed_ms: ms_since(started),
    };
    tracing::info!(
        uri = %record.uri, target = %record.target, bytes_read = record.bytes_read,
        bytes_written = record.bytes_written, ms = record.elapsed_ms, "restore complete"
    );
    Ok(record)
}
