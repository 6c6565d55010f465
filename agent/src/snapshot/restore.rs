//! Restore (export → local disk) and the snapshot's read-back verification:
//! both read chunks from the export — holes known through BLOCK_STATUS are
//! not read — and check each against the manifest. It must never write a
//! chunk to the target before its hash matched, nor write anything before
//! the manifest (named by digest) and the target's size were checked.
//!
//! A restore holds the target's first MiB back, as the image writer does:
//! both GPT copies are cleared before anything is written, the first MiB of
//! the backup is kept in memory once checked, and it is written only after
//! every other chunk matched and was synced — so an interrupted restore
//! leaves a disk without a partition table, never a half-restored one that
//! firmware could boot.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use warden_nbd::Client;
use warden_protocol::snapshot::{chunk_len, parse_digest, Manifest, RestoreRecord, RestoreRequest};

use super::remote::{read_stored, Remote, ZeroMap};
use super::{
    blake3_of, ms_since, sha256_of, ulen, with_retries, Abort, PassError, SnapshotError, Tuning,
    ZeroChunks,
};
use crate::image::decode::AlignedBuf;
use crate::image::target::{Target, HEAD};
use crate::zeros::is_zero;

/// Bytes of the disk between two progress reports of a restore.
const REPORT_EVERY: u64 = 512 << 20;

/// A restore's progress: bytes of the disk done — written, zeroed or
/// skipped — reported to the console and to the server each time the count
/// passes a multiple of `every`. Chunks finish out of order on several
/// workers; the count is of bytes, so it only grows (also across
/// reconnects), and a report that lost the race to a later mark is
/// dropped, so the figures reported only grow too.
struct Progress<'a> {
    uri: &'a str,
    total: u64,
    every: u64,
    done: AtomicU64,
    /// The highest mark (`done / every`) reported so far.
    reported: AtomicU64,
    started: Instant,
}

impl Progress<'_> {
    fn new(uri: &str, total: u64, every: u64) -> Progress<'_> {
        Progress {
            uri,
            total,
            every: every.max(1),
            done: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// `len` more bytes are done; returns the count reported, if this
    /// passed a mark.
    fn add(&self, len: u64) -> Option<u64> {
        let before = self.done.fetch_add(len, Ordering::Relaxed);
        let after = before.saturating_add(len);
        let mark = after / self.every;
        if mark == before / self.every || self.reported.fetch_max(mark, Ordering::Relaxed) >= mark {
            return None;
        }
        crate::telemetry::progress("restore", "written", after, Some(self.total));
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            uri = %self.uri, done_bytes = after, total_bytes = self.total,
            rate_mb_s = format!("{:.0}", after as f64 / 1e6 / secs), "restore progress"
        );
        Some(after)
    }
}

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

/// Reads chunks of the export and checks them against a manifest: by
/// BLAKE3 for a v2 manifest, by SHA-256 for a v1 one.
pub(super) struct RemoteCheck<'a> {
    pub remote: &'a Remote,
    pub tuning: &'a Tuning,
    pub manifest: &'a Manifest,
    pub retries: &'a AtomicU32,
    pub zero: ZeroChunks,
}

impl<'a> RemoteCheck<'a> {
    pub(super) fn new(
        remote: &'a Remote,
        tuning: &'a Tuning,
        manifest: &'a Manifest,
        retries: &'a AtomicU32,
    ) -> RemoteCheck<'a> {
        RemoteCheck {
            remote,
            tuning,
            manifest,
            retries,
            zero: ZeroChunks::new(manifest.disk_bytes, manifest.chunk_size),
        }
    }

    /// Offset and length of chunk `i`.
    fn span(&self, i: u64) -> (u64, u64) {
        let m = self.manifest;
        (i * m.chunk_size, chunk_len(m.disk_bytes, m.chunk_size, i))
    }

    /// Checks chunk `i` — `data`, or all zeros when `None` — against the
    /// manifest. Only a failure computes more than the one hash it needs
    /// (to name both SHA-256s in the error).
    fn check(&self, i: u64, data: Option<&[u8]>) -> Result<(), PassError> {
        let Some(expected) = self.manifest.chunks.get(ulen(i)) else {
            return Err(PassError::Fatal(SnapshotError::Worker(
                self.remote.name.clone(),
            )));
        };
        let z = self.zero.get(i);
        let (ok, got_b3) = match (data, expected.blake3) {
            (None, b3) => (
                expected.sha256 == z.sha256 && b3.is_none_or(|b| Some(b) == z.blake3),
                z.blake3,
            ),
            (Some(d), Some(b3)) => {
                let got = blake3_of(d);
                (got == b3, Some(got))
            }
            (Some(d), None) => (sha256_of(d) == expected.sha256, None),
        };
        if ok {
            return Ok(());
        }
        let got_sha = data.map_or(z.sha256, sha256_of);
        let checked = match (expected.blake3, got_b3) {
            (Some(want), Some(got)) => format!(
                " (checked by BLAKE3: expected {}, got {})",
                hex::encode(want),
                hex::encode(got)
            ),
            _ => String::new(),
        };
        let (offset, len) = self.span(i);
        Err(PassError::Fatal(SnapshotError::Mismatch {
            uri: self.remote.name.clone(),
            index: i,
            offset,
            len,
            expected: hex::encode(expected.sha256),
            got: hex::encode(got_sha),
            checked,
        }))
    }

    /// Chunk `i`: known zero on the export, or read into `buf`; either way
    /// checked against the manifest.
    fn fetch(
        &self,
        client: &Client,
        zmap: &ZeroMap,
        disk: &str,
        i: u64,
        buf: &mut AlignedBuf,
    ) -> Result<Got, PassError> {
        let (off, len) = self.span(i);
        if zmap.covers(off, len) {
            self.check(i, None)?;
            return Ok(Got::Zero);
        }
        let what = || format!("READ chunk {i} at offset {off}");
        with_retries(self.tuning, self.retries, &what, || {
            // Received straight into the aligned buffer the target is
            // written from: no copy.
            buf.fill_with(ulen(len), |mem, start, n| {
                client.read_into(off, mem, start, n)
            })
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
        let zero = is_zero(data);
        self.check(i, if zero { None } else { Some(data) })?;
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
                    &|i, buf| self.fetch(&client, &zmap, disk, i, buf).map(drop),
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

/// The chunks the manifest says are zero and the export reports as holes
/// (BLOCK_STATUS): checked against the manifest, then zeroed on the target
/// in runs of adjacent chunks — or skipped where the target reads as zero —
/// and marked done. This runs before any data is written: on a loop device
/// or a file, zeroing a range waits for every direct write in flight, so
/// interleaved with the data it would stall the pipeline once per chunk.
/// Returns the bytes zeroed and skipped.
fn zero_holes(
    check: &RemoteCheck<'_>,
    zmap: &ZeroMap,
    done: &[AtomicBool],
    target: &Target,
    zeros: &AlignedBuf,
    target_reads_zero: bool,
) -> Result<(u64, u64), PassError> {
    let (mut zeroed, mut skipped) = (0u64, 0u64);
    let mut run: Option<(u64, u64)> = None;
    let mut flush = |run: &mut Option<(u64, u64)>| -> Result<(), PassError> {
        let Some((first, end)) = run.take() else {
            return Ok(());
        };
        let off = check.span(first).0;
        let len = (first..end).map(|i| check.span(i).1).sum::<u64>();
        if target_reads_zero {
            skipped += len;
        } else {
            target
                .write_zeros(zeros, off, len)
                .map_err(SnapshotError::from)?;
            zeroed += len;
        }
        for flag in done.iter().take(ulen(end)).skip(ulen(first)) {
            flag.store(true, Ordering::Relaxed);
        }
        Ok(())
    };
    for (i, entry) in check.manifest.chunks.iter().enumerate() {
        let i = i as u64;
        let (off, len) = check.span(i);
        let hole = entry.zero
            && !done.get(ulen(i)).is_some_and(|d| d.load(Ordering::Relaxed))
            && zmap.covers(off, len);
        if !hole {
            flush(&mut run)?;
            continue;
        }
        check.check(i, None)?;
        run = match run {
            Some((first, end)) if end == i => Some((first, i + 1)),
            other => {
                let mut other = other;
                flush(&mut other)?;
                Some((i, i + 1))
            }
        };
    }
    flush(&mut run)?;
    Ok((zeroed, skipped))
}

/// Writes a checked data chunk at `off`: the part inside the first
/// `head_len` bytes goes into `head` (written last, by [`restore`]), the
/// rest to the target.
fn write_holding_head(
    target: &Target,
    head: &Mutex<AlignedBuf>,
    head_len: u64,
    buf: &AlignedBuf,
    off: u64,
    len: u64,
) -> Result<(), PassError> {
    let data = buf.as_slice();
    let in_head = head_len.saturating_sub(off).min(len);
    if in_head > 0 {
        let mut head = head
            .lock()
            .map_err(|_| PassError::Fatal(SnapshotError::Worker("restore (first MiB)".into())))?;
        let (at, n) = (ulen(off), ulen(in_head));
        match (head.as_mut_slice().get_mut(at..at + n), data.get(..n)) {
            (Some(dst), Some(src)) => dst.copy_from_slice(src),
            _ => {
                return Err(PassError::Fatal(SnapshotError::Worker(
                    "restore (first MiB out of range)".into(),
                )))
            }
        }
    }
    if in_head < len {
        let rest = data.get(ulen(in_head)..).unwrap_or_default();
        target
            .write_at(rest, off + in_head)
            .map_err(SnapshotError::from)?;
    }
    Ok(())
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
    let check = RemoteCheck::new(&remote, tuning, m, &retries);
    let cap = ulen(m.chunk_size);
    let zeros = AlignedBuf::zeroed(cap);
    let (read, written, zeroed, skipped) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let done: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let progress = Progress::new(&remote.name, m.disk_bytes, REPORT_EVERY);
    // Both GPT copies go first; the checked first MiB waits in `head`.
    let head_len = HEAD.min(m.disk_bytes);
    let head = Mutex::new(AlignedBuf::zeroed(ulen(head_len)));
    if let Err(e) = target.clear_boot_regions(&zeros) {
        client.close();
        return Err(e.into());
    }
    let mut reconnects = 0u32;
    loop {
        let result = match ZeroMap::query(&client, m.disk_bytes) {
            Ok(zmap) => zero_holes(&check, &zmap, &done, &target, &zeros, req.target_reads_zero)
                .map(|(z, s)| {
                    zeroed.fetch_add(z, Ordering::Relaxed);
                    skipped.fetch_add(s, Ordering::Relaxed);
                    progress.add(z + s);
                })
                .and_then(|()| {
                    run_chunks(n, tuning.workers, &done, cap, &|i, buf| {
                        let (off, len) = check.span(i);
                        let got = check.fetch(&client, &zmap, &req.target, i, buf)?;
                        if let Got::Read { .. } = got {
                            read.fetch_add(len, Ordering::Relaxed);
                        }
                        match got {
                            Got::Read { zero: false } => {
                                write_holding_head(&target, &head, head_len, buf, off, len)?;
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
                        progress.add(len);
                        Ok(())
                    })
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
    // Everything else is on the disk; only now the partition table.
    target.sync()?;
    match head.lock() {
        Ok(head) => target.write_at(head.as_slice(), 0)?,
        Err(_) => return Err(SnapshotError::Worker("restore (first MiB)".into())),
    }
    target.sync()?;
    // As after an image: the kernel must see the restored partitions.
    target.reread_partitions()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One report each time the bytes done pass a multiple of `every`,
    /// whatever the sizes of the pieces that pass it.
    #[test]
    fn progress_is_reported_at_each_mark_passed() {
        let p = Progress::new("nbd://test/", 100, 30);
        let got: Vec<Option<u64>> = [10, 10, 15, 40, 5, 20].iter().map(|&n| p.add(n)).collect();
        assert_eq!(got, [None, None, Some(35), Some(75), None, Some(100)]);
    }
}
