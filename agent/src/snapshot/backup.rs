//! The snapshot pipeline: source disk → hashing workers → NBD export, with
//! flush checkpoints to resume from after a lost connection, the commit of
//! the manifest region, and the optional read-back verification.
//!
//! It must never write the export before the size (and, incremental, the
//! previous manifest) checks passed, and never mark the region complete
//! before every chunk and the manifest were flushed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use warden_nbd::{Client, ZeroFlags};
use warden_protocol::snapshot::{
    check_chunk_size, chunk_count, chunk_len, export_bytes_needed, manifest_len, parse_digest,
    region_offset, truncate_utf8, ChunkHash, Manifest, RegionHeader, RegionState, SnapshotRecord,
    SnapshotRequest, HEADER_BYTES, MANIFEST_VERSION, MAX_IDENTITY,
};

use super::local::SourceDisk;
use super::remote::{read_stored, write_header, Remote, ZeroMap};
use super::restore::RemoteCheck;
use super::{
    blake3_of, both_of, ms_since, sha256_of, ulen, with_retries, Abort, PassError, SnapshotError,
    Tuning, ZeroChunks,
};
use crate::image::decode::AlignedBuf;
use crate::zeros::is_zero;

/// What happened to a chunk (the last pass that handled it decides).
const NOT_YET: u8 = 0;
const WRITTEN: u8 = 1;
const ZEROED: u8 = 2;
/// Zero, and the export already reads as zero there.
const SKIPPED_ZERO: u8 = 3;
/// Same content as in the previous manifest.
const UNCHANGED: u8 = 4;

/// Contiguously finished chunks since the pass started, for checkpoints.
struct Done {
    next: u64,
    pending: BTreeSet<u64>,
    last_flush: u64,
}

/// Everything the workers share for the whole step (across passes).
struct Ctx<'a> {
    remote: &'a Remote,
    disk: &'a SourceDisk,
    source: &'a str,
    tuning: &'a Tuning,
    prev: Option<&'a Manifest>,
    zmap: &'a ZeroMap,
    disk_bytes: u64,
    chunk_size: u64,
    n: u64,
    zero: ZeroChunks,
    hashes: Mutex<Vec<Option<ChunkHash>>>,
    actions: Vec<AtomicU8>,
    done: Mutex<Done>,
    /// Chunks below this index are written and flushed: the resume point.
    flushed: AtomicU64,
    bytes_sent: AtomicU64,
    retries: AtomicU32,
    started: Instant,
    /// Time in each stage, summed over its threads: where the time goes,
    /// in the step's summary line (`read_ms=WALL/CPU` …).
    busy: Busy,
}

/// Time spent reading the disk, scanning for zeros, hashing, and sending
/// to the export, summed over threads, in microseconds: wall time, and the
/// CPU time of the threads doing it (their difference is waiting).
#[derive(Default)]
struct Busy {
    read: Stage,
    zero: Stage,
    hash: Stage,
    send: Stage,
}

#[derive(Default)]
struct Stage {
    wall: AtomicU64,
    cpu: AtomicU64,
}

impl Stage {
    /// Runs `f`, adding its wall and CPU time.
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let (t, cpu) = (Instant::now(), thread_cpu_us());
        let v = f();
        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.wall.fetch_add(us, Ordering::Relaxed);
        self.cpu
            .fetch_add(thread_cpu_us().saturating_sub(cpu), Ordering::Relaxed);
        v
    }

    /// `"wall/cpu"` in ms.
    fn ms(&self) -> String {
        format!(
            "{}/{}",
            self.wall.load(Ordering::Relaxed) / 1000,
            self.cpu.load(Ordering::Relaxed) / 1000
        )
    }
}

/// This thread's CPU time in microseconds (0 if the clock is unreadable).
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes one timespec into `ts`, a valid,
    // exclusively borrowed local that outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1000
}

impl Ctx<'_> {
    fn offset(&self, i: u64) -> u64 {
        i * self.chunk_size
    }

    fn len(&self, i: u64) -> u64 {
        chunk_len(self.disk_bytes, self.chunk_size, i)
    }

    fn chunk_err(
        &self,
        op: &'static str,
        i: u64,
        (source, tries): (warden_nbd::Error, u32),
    ) -> PassError {
        if source.is_connection_lost() {
            return PassError::Lost(Box::new(source));
        }
        PassError::Fatal(SnapshotError::Chunk {
            uri: self.remote.name.clone(),
            disk: self.source.to_string(),
            op,
            index: i,
            offset: self.offset(i),
            tries,
            source: Box::new(source),
        })
    }

    fn remote_err(&self, what: &str, (source, _): (warden_nbd::Error, u32)) -> PassError {
        if source.is_connection_lost() {
            return PassError::Lost(Box::new(source));
        }
        PassError::Fatal(SnapshotError::Remote {
            uri: self.remote.name.clone(),
            what: what.to_string(),
            source: Box::new(source),
        })
    }

    fn flush(&self, client: &Client, what: &str) -> Result<(), PassError> {
        with_retries(self.tuning, &self.retries, &|| what.to_string(), || {
            client.flush()
        })
        .map_err(|e| self.remote_err(what, e))
    }
}

/// Backs up `req.source` into the export `req.uri`: a full snapshot, or an
/// incremental one against the manifest `req.previous` names.
pub fn snapshot(req: &SnapshotRequest, tuning: &Tuning) -> Result<SnapshotRecord, SnapshotError> {
    let started = Instant::now();
    check_chunk_size(req.chunk_size).map_err(|e| SnapshotError::Request(e.to_string()))?;
    let previous = req
        .previous
        .as_deref()
        .map(|p| parse_digest("previous", p))
        .transpose()
        .map_err(|e| SnapshotError::Request(e.to_string()))?;
    let disk_err = |op, offset, source| SnapshotError::Disk {
        disk: req.source.clone(),
        op,
        offset,
        source,
    };
    let disk = SourceDisk::open(&req.source).map_err(|e| disk_err("open", 0, e))?;
    let disk_bytes = disk.size();
    if disk_bytes == 0 {
        return Err(SnapshotError::Request(format!("{} is empty", req.source)));
    }
    let identity = truncate_utf8(&disk.identity(), MAX_IDENTITY).to_string();
    let chunk_size = req.chunk_size;
    let n = chunk_count(disk_bytes, chunk_size);
    let needed = export_bytes_needed(
        disk_bytes,
        manifest_len(disk_bytes, chunk_size, identity.len()),
    );
    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    let remote = Remote::new(&req.uri, req.ca_pem.as_deref(), tuning)?;
    let mut client = remote.connect()?;
    let export_bytes = client.size();
    if export_bytes < needed {
        client.close();
        return Err(SnapshotError::ExportTooSmall {
            uri: remote.name.clone(),
            disk: req.source.clone(),
            disk_bytes,
            export_bytes,
            needed,
        });
    }
    if client.info().flags.read_only() {
        client.close();
        return Err(SnapshotError::Export {
            uri: remote.name.clone(),
            reason: "the export is read-only".into(),
        });
    }
    let prev = match &previous {
        Some(want) => {
            let stored = read_stored(&remote, &client, want, true)?;
            let m = stored.manifest;
            let refuse = |reason: String| SnapshotError::NotIncremental {
                uri: remote.name.clone(),
                reason,
            };
            if m.disk_bytes != disk_bytes {
                return Err(refuse(format!(
                    "the previous backup is of a {}-byte disk, {} is {disk_bytes} bytes",
                    m.disk_bytes, req.source
                )));
            }
            if m.chunk_size != chunk_size {
                return Err(refuse(format!(
                    "the previous backup used {}-byte chunks, this request {chunk_size}",
                    m.chunk_size
                )));
            }
            Some(m)
        }
        None => None,
    };
    tracing::info!(
        uri = %remote.name, source = %req.source, disk_bytes, chunk_size, chunks = n,
        incremental = prev.is_some(), connections = client.connections().len(),
        direct_io = disk.direct_io(), "snapshot starting"
    );

    // From here on the export changes: say so first, so that an interrupted
    // snapshot can never be mistaken for a complete backup.
    let retries = AtomicU32::new(0);
    let mark = RegionHeader {
        state: RegionState::InProgress,
        disk_bytes,
        manifest_offset: region_offset(disk_bytes) + HEADER_BYTES,
        manifest_len: 0,
        manifest_sha256: [0; 32],
    };
    let remote_fatal = |what: &str, source| SnapshotError::Remote {
        uri: remote.name.clone(),
        what: what.to_string(),
        source: Box::new(source),
    };
    // A block store that restarts before the first chunk is reconnected to
    // like one that restarts mid-pass (the fault drills cut it here too).
    let mut reconnects = 0u32;
    let zmap = loop {
        let step = with_retries(
            tuning,
            &retries,
            &|| "marking the backup in progress".into(),
            || {
                write_header(&client, &mark)?;
                client.flush()
            },
        )
        .map_err(|(e, _)| ("marking the backup in progress", e))
        .and_then(|()| {
            ZeroMap::query(&client, disk_bytes).map_err(|e| ("BLOCK_STATUS of the export", e))
        });
        match step {
            Ok(zmap) => break zmap,
            Err((what, e)) if e.is_connection_lost() && reconnects < tuning.reconnect_tries => {
                reconnects += 1;
                tracing::warn!(
                    uri = %remote.name, error = %e, reconnects, step = what,
                    "connection lost before the first chunk; reconnecting"
                );
                client.close();
                client = remote.reconnect(&e, export_bytes)?;
            }
            Err((what, e)) => return Err(remote_fatal(what, e)),
        }
    };
    tracing::debug!(uri = %remote.name, zero_bytes = zmap.bytes(), "export ranges known to read as zero");

    let ctx = Ctx {
        remote: &remote,
        disk: &disk,
        source: &req.source,
        tuning,
        prev: prev.as_ref(),
        zmap: &zmap,
        disk_bytes,
        chunk_size,
        n,
        zero: ZeroChunks::new(disk_bytes, chunk_size),
        hashes: Mutex::new(vec![None; ulen(n)]),
        actions: (0..n).map(|_| AtomicU8::new(NOT_YET)).collect(),
        done: Mutex::new(Done {
            next: 0,
            pending: BTreeSet::new(),
            last_flush: 0,
        }),
        flushed: AtomicU64::new(0),
        bytes_sent: AtomicU64::new(0),
        retries,
        started,
        busy: Busy::default(),
    };

    let (manifest, manifest_bytes) = loop {
        let start = ctx.flushed.load(Ordering::Relaxed);
        let attempt = pass(&ctx, &client, start)
            .and_then(|()| commit(&ctx, &client, &identity, created_unix));
        match attempt {
            Ok(done) => break done,
            Err(PassError::Fatal(e)) => {
                client.close();
                return Err(e);
            }
            Err(PassError::Lost(cause)) => {
                reconnects += 1;
                let resume = ctx.flushed.load(Ordering::Relaxed);
                tracing::warn!(
                    uri = %remote.name, error = %cause, reconnects,
                    resume_offset = resume * chunk_size, "connection lost; reconnecting"
                );
                client.close();
                if reconnects > tuning.reconnect_tries {
                    return Err(SnapshotError::Reconnect {
                        uri: remote.name.clone(),
                        cause: cause.to_string(),
                        tries: reconnects - 1,
                        source: None,
                    });
                }
                client = remote.reconnect(&cause, export_bytes)?;
            }
        }
    };
    let digest = hex::encode(Sha256::digest(&manifest_bytes));

    let mut verify_ms = 0;
    if req.verify {
        let t = Instant::now();
        let check = RemoteCheck::new(&remote, tuning, &manifest, &ctx.retries);
        let (c, r) = check.verify(client, export_bytes, &req.source)?;
        client = c;
        reconnects += r;
        verify_ms = ms_since(t);
    }
    let connections = u32::try_from(client.connections().len()).unwrap_or(u32::MAX);
    client.close();

    let mut record = SnapshotRecord {
        uri: req.uri.clone(),
        source: req.source.clone(),
        source_identity: identity,
        disk_bytes,
        chunk_size,
        chunks: n,
        zero_chunks: manifest.zero_chunks(),
        changed_chunks: 0,
        bytes_sent: ctx.bytes_sent.load(Ordering::Relaxed),
        bytes_zeroed: 0,
        zero_bytes_skipped: 0,
        manifest_sha256: digest,
        manifest_bytes: manifest_bytes.len() as u64,
        previous_manifest_sha256: req.previous.as_ref().map(|p| p.to_ascii_lowercase()),
        incremental: prev.is_some(),
        verified: req.verify,
        reconnects,
        retries: ctx.retries.load(Ordering::Relaxed),
        connections,
        direct_io: disk.direct_io(),
        verify_ms,
        elapsed_ms: 0,
        ca_sha256: req.trusted_ca_sha256(),
    };
    for (i, a) in ctx.actions.iter().enumerate() {
        let len = ctx.len(i as u64);
        match a.load(Ordering::Relaxed) {
            WRITTEN => record.changed_chunks += 1,
            ZEROED => {
                record.changed_chunks += 1;
                record.bytes_zeroed += len;
            }
            SKIPPED_ZERO => {
                record.changed_chunks += 1;
                record.zero_bytes_skipped += len;
            }
            _ => {}
        }
    }
    record.elapsed_ms = ms_since(started);
    tracing::info!(
        uri = %record.uri, source = %record.source, manifest = %record.manifest_sha256,
        changed = record.changed_chunks, bytes_sent = record.bytes_sent,
        reconnects, ms = record.elapsed_ms,
        read_ms = %ctx.busy.read.ms(), zero_ms = %ctx.busy.zero.ms(),
        hash_ms = %ctx.busy.hash.ms(), send_ms = %ctx.busy.send.ms(),
        "snapshot complete"
    );
    Ok(record)
}

/// One pass over chunks `start..n`: the reader thread reads into a pool of
/// aligned buffers, the workers hash and send.
fn pass(ctx: &Ctx<'_>, client: &Client, start: u64) -> Result<(), PassError> {
    if let Ok(mut d) = ctx.done.lock() {
        d.next = start;
        d.pending.clear();
        d.last_flush = start;
    }
    let workers = ctx.tuning.workers.max(1);
    let abort = Abort::default();
    let (work_tx, work_rx) = sync_channel::<(u64, AlignedBuf)>(workers);
    let readers = ctx.tuning.readers.max(1);
    let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(workers + 2 * readers);
    for _ in 0..workers + 2 * readers {
        // Cannot fail: the channel has room for every buffer.
        let _ = pool_tx.send(AlignedBuf::zeroed(ulen(ctx.chunk_size)));
    }
    let work_rx = Mutex::new(work_rx);
    let (abort_ref, work_rx_ref) = (&abort, &work_rx);
    let pool_rx = Mutex::new(pool_rx);
    let pool_rx_ref = &pool_rx;
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for r in 0..readers {
            let work_tx = work_tx.clone();
            handles.push(s.spawn(move || {
                reader(
                    ctx,
                    start + r as u64,
                    readers as u64,
                    work_tx,
                    pool_rx_ref,
                    abort_ref,
                )
            }));
        }
        drop(work_tx);
        for _ in 0..workers {
            let pool_tx = pool_tx.clone();
            handles.push(s.spawn(move || worker(ctx, client, work_rx_ref, pool_tx, abort_ref)));
        }
        drop(pool_tx);
        for h in handles {
            if h.join().is_err() {
                abort.fail(PassError::Fatal(SnapshotError::Worker(
                    ctx.remote.name.clone(),
                )));
            }
        }
    });
    abort.take().map_or(Ok(()), Err)
}

/// Reads chunks `first, first + step, …` (one reader's share) into pool
/// buffers and queues them for the workers.
fn reader(
    ctx: &Ctx<'_>,
    first: u64,
    step: u64,
    work_tx: SyncSender<(u64, AlignedBuf)>,
    pool_rx: &Mutex<Receiver<AlignedBuf>>,
    abort: &Abort,
) {
    for i in (first..ctx.n).step_by(usize::try_from(step).unwrap_or(1).max(1)) {
        if abort.stopped() {
            return;
        }
        // Every worker gone (they all stopped): nothing left to do.
        let buf = match pool_rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut buf) = buf else { return };
        buf.set_len(ulen(ctx.len(i)));
        let read = ctx
            .busy
            .read
            .time(|| ctx.disk.read_at(buf.as_mut_slice(), ctx.offset(i)));
        if let Err((at, source)) = read {
            abort.fail(PassError::Fatal(SnapshotError::Disk {
                disk: ctx.source.to_string(),
                op: "read",
                offset: at,
                source,
            }));
            return;
        }
        if work_tx.send((i, buf)).is_err() {
            return;
        }
    }
}

fn worker(
    ctx: &Ctx<'_>,
    client: &Client,
    work_rx: &Mutex<Receiver<(u64, AlignedBuf)>>,
    pool_tx: SyncSender<AlignedBuf>,
    abort: &Abort,
) {
    loop {
        let msg = match work_rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((i, buf)) = msg else { return };
        // After a failure keep draining (so the reader is never stuck on a
        // full queue), but do nothing more.
        if !abort.stopped() {
            if let Err(e) = chunk(ctx, client, i, buf.as_slice()) {
                abort.fail(e);
            }
        }
        let _ = pool_tx.send(buf);
    }
}

/// Hashes chunk `i` and sends it if it must be.
fn chunk(ctx: &Ctx<'_>, client: &Client, i: u64, data: &[u8]) -> Result<(), PassError> {
    let (off, len) = (ctx.offset(i), ctx.len(i));
    let old = ctx.prev.and_then(|p| p.chunks.get(ulen(i)));
    // Scanning for zeros is far cheaper than hashing; a zero chunk's hashes
    // are known in advance.
    let zero = ctx.busy.zero.time(|| is_zero(data));
    let hash = ctx.busy.hash.time(|| match old {
        _ if zero => ctx.zero.get(i),
        // Against a v2 manifest BLAKE3 alone tells whether the chunk
        // changed; an unchanged one keeps its recorded SHA-256 (sound: the
        // same BLAKE3 means the same bytes).
        Some(&ChunkHash {
            sha256,
            blake3: Some(was),
            zero: false,
        }) => {
            let blake3 = blake3_of(data);
            let sha256 = if blake3 == was {
                sha256
            } else {
                sha256_of(data)
            };
            ChunkHash {
                sha256,
                blake3: Some(blake3),
                zero: false,
            }
        }
        // Full, a v1 parent (compared by SHA-256), or a chunk that was zero.
        _ => {
            let (sha256, blake3) = both_of(data);
            ChunkHash {
                sha256,
                blake3: Some(blake3),
                zero: false,
            }
        }
    });
    if let Ok(mut h) = ctx.hashes.lock() {
        if let Some(slot) = h.get_mut(ulen(i)) {
            *slot = Some(hash);
        }
    }
    let changed = match ctx.prev {
        None => true,
        Some(_) => old.is_none_or(|o| !o.same_content(&hash)),
    };
    let action = if !changed {
        UNCHANGED
    } else if zero && ctx.zmap.covers(off, len) {
        SKIPPED_ZERO
    } else if zero && client.info().flags.can_write_zeroes() {
        let what = || format!("WRITE_ZEROES chunk {i} at offset {off}");
        ctx.busy
            .send
            .time(|| {
                with_retries(ctx.tuning, &ctx.retries, &what, || {
                    client.write_zeroes(off, len, ZeroFlags::default())
                })
            })
            .map_err(|e| ctx.chunk_err("zeroing", i, e))?;
        ZEROED
    } else {
        let what = || format!("WRITE chunk {i} at offset {off}");
        ctx.busy
            .send
            .time(|| {
                with_retries(ctx.tuning, &ctx.retries, &what, || {
                    ctx.bytes_sent.fetch_add(len, Ordering::Relaxed);
                    client.write_at(off, data, false)
                })
            })
            .map_err(|e| ctx.chunk_err("writing", i, e))?;
        if zero {
            ZEROED
        } else {
            WRITTEN
        }
    };
    if let Some(a) = ctx.actions.get(ulen(i)) {
        a.store(action, Ordering::Relaxed);
    }
    checkpoint(ctx, client, i)
}

/// Records chunk `i` as answered; every `flush_every` bytes of chunks
/// finished without a gap, FLUSHes and moves the resume point there.
fn checkpoint(ctx: &Ctx<'_>, client: &Client, i: u64) -> Result<(), PassError> {
    let flush_to = {
        let Ok(mut d) = ctx.done.lock() else {
            return Ok(());
        };
        d.pending.insert(i);
        loop {
            let next = d.next;
            if !d.pending.remove(&next) {
                break;
            }
            d.next += 1;
        }
        let due = (d.next - d.last_flush).saturating_mul(ctx.chunk_size) >= ctx.tuning.flush_every;
        if due && d.next < ctx.n {
            d.last_flush = d.next;
            Some(d.next)
        } else {
            None
        }
    };
    if let Some(to) = flush_to {
        // Every chunk below `to` was answered before this FLUSH was sent,
        // so the FLUSH covers it.
        ctx.flush(client, "FLUSH (checkpoint)")?;
        ctx.flushed.fetch_max(to, Ordering::Relaxed);
        let bytes = to * ctx.chunk_size;
        crate::telemetry::progress("snapshot", "sent", bytes, Some(ctx.disk_bytes));
        let secs = ctx.started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            uri = %ctx.remote.name, done_bytes = bytes, total_bytes = ctx.disk_bytes,
            rate_mb_s = format!("{:.0}", bytes as f64 / 1e6 / secs), "snapshot progress"
        );
    }
    Ok(())
}

/// FLUSHes the image, then writes the manifest, FLUSH, the complete
/// header (region and locator), FLUSH: the header is the commit point.
fn commit(
    ctx: &Ctx<'_>,
    client: &Client,
    identity: &str,
    created_unix: u64,
) -> Result<(Manifest, Vec<u8>), PassError> {
    ctx.flush(client, "FLUSH of the image")?;
    ctx.flushed.store(ctx.n, Ordering::Relaxed);
    let chunks: Option<Vec<ChunkHash>> = ctx
        .hashes
        .lock()
        .map_err(|_| SnapshotError::Worker(ctx.remote.name.clone()))?
        .iter()
        .copied()
        .collect();
    let Some(chunks) = chunks else {
        return Err(PassError::Fatal(SnapshotError::Worker(
            ctx.remote.name.clone(),
        )));
    };
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        disk_bytes: ctx.disk_bytes,
        chunk_size: ctx.chunk_size,
        created_unix,
        source_identity: identity.to_string(),
        chunks,
    };
    let bytes = manifest.encode();
    let header = RegionHeader {
        state: RegionState::Complete,
        disk_bytes: ctx.disk_bytes,
        manifest_offset: region_offset(ctx.disk_bytes) + HEADER_BYTES,
        manifest_len: bytes.len() as u64,
        manifest_sha256: Sha256::digest(&bytes).into(),
    };
    let what = "writing the manifest";
    with_retries(ctx.tuning, &ctx.retries, &|| what.into(), || {
        client.write_at(header.manifest_offset, &bytes, false)
    })
    .map_err(|e| ctx.remote_err(what, e))?;
    ctx.flush(client, "FLUSH of the manifest")?;
    let what = "writing the region header and locator";
    with_retries(ctx.tuning, &ctx.retries, &|| what.into(), || {
        write_header(client, &header)
    })
    .map_err(|e| ctx.remote_err(what, e))?;
    ctx.flush(client, "FLUSH of the region header")?;
    Ok((manifest, bytes))
}
