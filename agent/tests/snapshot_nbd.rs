#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! Snapshot and restore against real NBD servers on 127.0.0.1: nbdkit
//! (`file` over sparse files, `memory`, the `delay` and `error` filters,
//! `--tls=require`) and qemu-nbd. Sources and targets are sparse files (and
//! loop devices where losetup works). Everything is compared by SHA-256 of
//! the bytes, read back from the servers' backing files.
//!
//! Without nbdkit/qemu-nbd a test prints SKIPPED; with
//! WARDEN_REQUIRE_TOOLS=1 it fails instead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use warden_agent::snapshot::{restore, snapshot, SnapshotError, Tuning};
use warden_protocol::snapshot::{
    export_bytes_needed, manifest_len, region_offset, RestoreRequest, SnapshotRecord,
    SnapshotRequest,
};

#[path = "common/nbd.rs"]
mod nbd;
use nbd::{have_tool, pattern, sha_prefix, sparse, tuning, Server, MIB};

const CHUNK: u64 = MIB;

/// A sparse source of `len` bytes whose chunks `data` hold pattern bytes
/// (the rest zeros). Returns the count of data bytes.
fn make_source(path: &Path, len: u64, data: &[u64]) -> u64 {
    sparse(path, len);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut bytes = 0;
    for &i in data {
        let off = i * CHUNK;
        let n = CHUNK.min(len - off);
        f.write_all_at(&pattern(n as usize, i + 1), off).unwrap();
        bytes += n;
    }
    f.sync_all().unwrap();
    bytes
}

/// An export file big enough for a backup of `disk` bytes (plus `slack`).
fn export_file(path: &Path, disk: u64, slack: u64) {
    let need = export_bytes_needed(disk, manifest_len(disk, CHUNK, 200));
    sparse(path, need + slack);
}

fn req(uri: &str, source: &Path) -> SnapshotRequest {
    SnapshotRequest {
        uri: uri.to_string(),
        ca_pem: None,
        source: source.to_str().unwrap().to_string(),
        chunk_size: CHUNK,
        previous: None,
        verify: false,
    }
}

fn restore_req(uri: &str, target: &Path, digest: &str) -> RestoreRequest {
    RestoreRequest {
        uri: uri.to_string(),
        ca_pem: None,
        target: target.to_str().unwrap().to_string(),
        manifest_sha256: digest.to_string(),
        target_reads_zero: false,
    }
}

fn show(r: &SnapshotRecord) {
    eprintln!("{}", String::from_utf8_lossy(&r.canonical_json()));
}

#[test]
fn full_incremental_and_restore_round_trips_nbdkit_file() {
    let test = "full_incremental_and_restore_round_trips_nbdkit_file";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
    // Not a multiple of the chunk size: the last chunk is short (and data).
    let disk = 40 * MIB + 8192;
    let data_chunks = [0, 1, 5, 6, 7, 20, 33, 40];
    let data_bytes = make_source(&src, disk, &data_chunks);
    export_file(&exp, disk, 3 * MIB);
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");

    let full = snapshot(&req(&uri, &src), &tuning()).unwrap();
    show(&full);
    assert!(!full.incremental);
    assert_eq!(full.disk_bytes, disk);
    assert_eq!(full.chunks, 41);
    assert_eq!(full.zero_chunks, 41 - data_chunks.len() as u64);
    // A fresh sparse export reads as zero: zero chunks are not sent at all.
    assert_eq!(full.bytes_sent, data_bytes);
    assert_eq!(full.zero_bytes_skipped, disk - data_bytes);
    assert_eq!(full.source_identity, format!("file:{}", src.display()));
    assert_eq!(sha_prefix(&exp, disk), sha_prefix(&src, disk));

    // Change three chunks: one data chunk rewritten, one zero chunk gets
    // data, one data chunk becomes zeros.
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&pattern(4096, 99), 5 * CHUNK + 12_288)
        .unwrap();
    f.write_all_at(&pattern(CHUNK as usize, 77), 10 * CHUNK)
        .unwrap();
    f.write_all_at(&vec![0u8; CHUNK as usize], 20 * CHUNK)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut inc_req = req(&uri, &src);
    inc_req.previous = Some(full.manifest_sha256.clone());
    inc_req.verify = true;
    let inc = snapshot(&inc_req, &tuning()).unwrap();
    show(&inc);
    assert!(inc.incremental && inc.verified);
    assert_eq!(inc.changed_chunks, 3);
    assert_eq!(
        inc.bytes_sent,
        2 * CHUNK,
        "only the two changed data chunks"
    );
    assert_eq!(inc.bytes_zeroed, CHUNK, "the chunk that became zeros");
    assert_ne!(inc.manifest_sha256, full.manifest_sha256);
    assert_eq!(
        inc.previous_manifest_sha256.as_deref(),
        Some(full.manifest_sha256.as_str())
    );
    assert_eq!(sha_prefix(&exp, disk), sha_prefix(&src, disk));

    // The old manifest is gone: an incremental against it is refused, and
    // so is a restore naming it.
    let mut stale = req(&uri, &src);
    stale.previous = Some(full.manifest_sha256.clone());
    let e = snapshot(&stale, &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::NotIncremental { .. }), "{e}");
    assert!(e.to_string().contains("take a full snapshot"), "{e}");
    let tgt = dir.path().join("target.img");
    sparse(&tgt, disk + MIB);
    let e = restore(&restore_req(&uri, &tgt, &full.manifest_sha256), &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::Manifest { .. }), "{e}");
    assert!(e.to_string().contains("the request names"), "{e}");
    assert!(
        std::fs::read(&tgt).unwrap().iter().all(|&b| b == 0),
        "a refused restore wrote to the target"
    );

    // Restore onto a fresh target (larger than the disk), writing zeros,
    // and onto one that reads as zero, skipping them.
    for reads_zero in [false, true] {
        sparse(&tgt, disk + MIB);
        let mut r = restore_req(&uri, &tgt, &inc.manifest_sha256);
        r.target_reads_zero = reads_zero;
        let rec = restore(&r, &tuning()).unwrap();
        eprintln!("{}", String::from_utf8_lossy(&rec.canonical_json()));
        assert_eq!(rec.disk_bytes, disk);
        assert_eq!(
            rec.bytes_written,
            data_bytes + CHUNK - CHUNK,
            "data chunks: 8 - 1 (zeroed) + 1 (new)"
        );
        assert_eq!(rec.bytes_read, rec.bytes_written, "holes are not read");
        if reads_zero {
            assert_eq!(rec.bytes_zeroed, 0);
        } else {
            assert_eq!(rec.bytes_zeroed, disk - rec.bytes_written);
        }
        assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
    }

    // A malformed digest and a target too small are refused up front.
    let e = restore(&restore_req(&uri, &tgt, "abc"), &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::Request(_)), "{e}");
    let small = dir.path().join("small.img");
    sparse(&small, disk - 4096);
    let e = restore(&restore_req(&uri, &small, &inc.manifest_sha256), &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::TargetTooSmall { .. }), "{e}");
    assert!(std::fs::read(&small).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn corrupted_chunk_on_the_export_fails_the_restore_naming_it() {
    let test = "corrupted_chunk_on_the_export_fails_the_restore_naming_it";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
    let disk = 16 * MIB;
    make_source(&src, disk, &[0, 3, 9]);
    export_file(&exp, disk, 0);
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");
    let full = snapshot(&req(&uri, &src), &tuning()).unwrap();
    // Garbage into a data chunk, then into a zero chunk of the backing file.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&exp)
        .unwrap();
    let mut saved = [0u8; 7];
    f.read_exact_at(&mut saved, 9 * CHUNK + 100).unwrap();
    f.write_all_at(b"garbage", 9 * CHUNK + 100).unwrap();
    f.sync_all().unwrap();
    let tgt = dir.path().join("target.img");
    sparse(&tgt, disk);
    let e = restore(&restore_req(&uri, &tgt, &full.manifest_sha256), &tuning()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, SnapshotError::Mismatch { index: 9, .. }), "{e}");
    assert!(
        text.contains("chunk 9 at offset 9437184") && text.contains("expected sha256"),
        "{text}"
    );
    // The bad chunk never reached the target.
    let mut back = vec![0u8; CHUNK as usize];
    File::open(&tgt)
        .unwrap()
        .read_exact_at(&mut back, 9 * CHUNK)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0));

    f.write_all_at(&saved, 9 * CHUNK + 100).unwrap();
    f.write_all_at(b"x", 12 * CHUNK + 5).unwrap();
    f.sync_all().unwrap();
    let e = restore(&restore_req(&uri, &tgt, &full.manifest_sha256), &tuning()).unwrap_err();
    assert!(
        matches!(e, SnapshotError::Mismatch { index: 12, .. }),
        "{e}"
    );
    // Verify after a snapshot reads back and catches nothing when clean.
    f.write_all_at(b"\0", 12 * CHUNK + 5).unwrap();
    let mut v = req(&uri, &src);
    v.verify = true;
    assert!(snapshot(&v, &tuning()).unwrap().verified);
}

#[test]
fn export_too_small_is_refused_before_anything_is_written() {
    let test = "export_too_small_is_refused_before_anything_is_written";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
    let disk = 8 * MIB;
    make_source(&src, disk, &[0, 1, 2, 3, 4, 5, 6, 7]);
    // Room for the disk, not for its manifest region.
    sparse(&exp, region_offset(disk) + MIB - 4096);
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let e = snapshot(&req(&server.uri("nbd", ""), &src), &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::ExportTooSmall { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!("the export is {} bytes", 9 * MIB - 4096))
            && text.contains(&format!("needs at least {}", 9 * MIB))
            && text.contains("nothing was written"),
        "{text}"
    );
    assert!(std::fs::read(&exp).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn server_restart_mid_snapshot_resumes() {
    let test = "server_restart_mid_snapshot_resumes";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
    let disk = 48 * MIB;
    let all: Vec<u64> = (0..48).collect();
    make_source(&src, disk, &all);
    export_file(&exp, disk, 0);
    let file = exp.to_str().unwrap().to_string();
    // Slow writes so the kill lands in the middle.
    let slow = Server::nbdkit(&["--filter=delay", "file", &file, "delay-write=100ms"]);
    let port = slow.port;
    let uri = slow.uri("nbd", "");
    // The snapshot runs on its own thread; this thread kills and restarts
    // the server (nbdkit's --exit-with-parent follows the thread that
    // started it, so the restart must come from a thread that lives on).
    let (src2, uri2) = (src.clone(), uri.clone());
    let job = std::thread::spawn(move || snapshot(&req(&uri2, &src2), &tuning()));
    std::thread::sleep(Duration::from_millis(600));
    slow.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _restarted = Server::nbdkit_on(port, &["file", &file]);
    let rec = job.join().unwrap().unwrap();
    show(&rec);
    assert!(rec.reconnects >= 1, "the server restart was not noticed");
    assert!(
        rec.bytes_sent >= disk,
        "everything after the last flush is re-sent"
    );
    assert_eq!(rec.changed_chunks, 48);
    assert_eq!(sha_prefix(&exp, disk), sha_prefix(&src, disk));
    let tgt = dir.path().join("target.img");
    sparse(&tgt, disk);
    restore(&restore_req(&uri, &tgt, &rec.manifest_sha256), &tuning()).unwrap();
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
}

#[test]
fn server_errors_are_retried_then_fail_naming_the_offset() {
    let test = "server_errors_are_retried_then_fail_naming_the_offset";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
    let disk = 16 * MIB;
    // Every chunk holds data: with ~20 WRITEs at a 40% error rate, a run
    // without a single failed write (which would test nothing) has odds of
    // 0.6^20 ≈ 4e-5, and a write failing all 17 tries 20 × 0.4^17 ≈ 3e-6.
    let all: Vec<u64> = (0..disk / CHUNK).collect();
    make_source(&src, disk, &all);
    export_file(&exp, disk, 0);
    let file = exp.to_str().unwrap();

    // Transient: 40% of writes fail; retries carry the snapshot through.
    {
        let server = Server::nbdkit(&[
            "--filter=error",
            "file",
            file,
            "error-pwrite=EIO",
            "error-pwrite-rate=40%",
        ]);
        let t = Tuning {
            write_retries: 16,
            ..tuning()
        };
        let rec = snapshot(&req(&server.uri("nbd", ""), &src), &t).unwrap();
        show(&rec);
        assert!(rec.retries >= 1);
        assert_eq!(sha_prefix(&exp, disk), sha_prefix(&src, disk));
    }

    // Persistent: every WRITE_ZEROES fails. The export holds old data, so
    // zero chunks must be zeroed: bounded retries, then an error naming
    // the chunk, its offset and the server's errno.
    make_source(&src, disk, &[0, 1, 2, 3]);
    let f = OpenOptions::new().write(true).open(&exp).unwrap();
    f.write_all_at(&vec![0xffu8; disk as usize], 0).unwrap();
    f.sync_all().unwrap();
    let server = Server::nbdkit(&[
        "--filter=error",
        "file",
        file,
        "error-zero=EIO",
        "error-zero-rate=100%",
    ]);
    let t = Tuning {
        write_retries: 3,
        workers: 1,
        ..tuning()
    };
    let e = snapshot(&req(&server.uri("nbd", ""), &src), &t).unwrap_err();
    let text = e.to_string();
    // Two readers take alternate chunks, so which zero chunk fails first
    // depends on scheduling: any one of them, named with its own offset.
    let SnapshotError::Chunk {
        index,
        offset,
        tries: 4,
        ..
    } = e
    else {
        panic!("not a chunk error after 4 tries: {text}");
    };
    assert_eq!(offset, index * CHUNK, "{text}");
    let src_bytes = std::fs::read(&src).unwrap();
    let at = usize::try_from(offset).unwrap();
    let end = (at + usize::try_from(CHUNK).unwrap()).min(src_bytes.len());
    assert!(
        src_bytes[at..end].iter().all(|&b| b == 0),
        "chunk {index} is not a zero chunk of the source: {text}"
    );
    assert!(
        text.contains(&format!("chunk {index} at offset {offset}")) && text.contains("EIO"),
        "{text}"
    );

    // Every WRITE fails: the first write (marking the region in progress)
    // fails after the retries, naming the offset.
    drop(server);
    let server = Server::nbdkit(&[
        "--filter=error",
        "file",
        file,
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
    ]);
    let e = snapshot(&req(&server.uri("nbd", ""), &src), &t).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&format!("offset {}", region_offset(disk))) && text.contains("ENOSPC"),
        "{text}"
    );
}

#[test]
fn qemu_nbd_and_nbdkit_memory_round_trips() {
    let test = "qemu_nbd_and_nbdkit_memory_round_trips";
    if !have_tool("qemu-nbd", test) || !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let disk = 24 * MIB;
    make_source(&src, disk, &[0, 2, 3, 11, 23]);
    let tgt = dir.path().join("target.img");

    let exp = dir.path().join("export.img");
    export_file(&exp, disk, 0);
    let q = Server::qemu_nbd(&exp);
    let uri = q.uri("nbd", "backup");
    let mut r = req(&uri, &src);
    r.verify = true;
    let rec = snapshot(&r, &tuning()).unwrap();
    show(&rec);
    assert_eq!(sha_prefix(&exp, disk), sha_prefix(&src, disk));
    sparse(&tgt, disk);
    restore(&restore_req(&uri, &tgt, &rec.manifest_sha256), &tuning()).unwrap();
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));

    let mem = Server::nbdkit(&["memory", "size=32M"]);
    let uri = mem.uri("nbd", "");
    let rec = snapshot(&req(&uri, &src), &tuning()).unwrap();
    sparse(&tgt, disk);
    let back = restore(&restore_req(&uri, &tgt, &rec.manifest_sha256), &tuning()).unwrap();
    assert_eq!(back.manifest_sha256, rec.manifest_sha256);
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
}

#[test]
fn tls_snapshot_and_restore_with_a_test_ca() {
    let test = "tls_snapshot_and_restore_with_a_test_ca";
    if !have_tool("nbdkit", test) || !have_tool("certtool", test) {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let ca = std::fs::read_to_string(
        warden_nbd::testing::make_test_pki(pki.path(), "Warden snapshot test CA").unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
    let disk = 12 * MIB;
    make_source(&src, disk, &[1, 4, 11]);
    export_file(&exp, disk, 0);
    let server = Server::nbdkit(&[
        "--tls=require",
        &format!("--tls-certificates={}", pki.path().display()),
        "file",
        exp.to_str().unwrap(),
    ]);
    let uri = server.uri("nbds", "");
    let mut r = req(&uri, &src);
    r.ca_pem = Some(ca.clone());
    r.verify = true;
    let rec = snapshot(&r, &tuning()).unwrap();
    assert_eq!(sha_prefix(&exp, disk), sha_prefix(&src, disk));
    let tgt = dir.path().join("target.img");
    sparse(&tgt, disk);
    let mut rr = restore_req(&uri, &tgt, &rec.manifest_sha256);
    rr.ca_pem = Some(ca);
    restore(&rr, &tuning()).unwrap();
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));

    // nbds:// without a CA, and nbd:// to the TLS-only server: refused.
    let e = snapshot(&req(&uri, &src), &tuning()).unwrap_err();
    assert!(e.to_string().contains("needs a CA bundle"), "{e}");
    let e = snapshot(&req(&server.uri("nbd", ""), &src), &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::Connect { .. }), "{e}");
}

/// A loop device over a sparse file, detached on drop.
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(Loop(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn loop_device_snapshot_and_restore() {
    let test = "loop_device_snapshot_and_restore";
    if !have_tool("nbdkit", test) || !have_tool("losetup", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp, tgt) = (
        dir.path().join("src.img"),
        dir.path().join("export.img"),
        dir.path().join("tgt.img"),
    );
    let disk = 20 * MIB;
    make_source(&src, disk, &[0, 7, 8, 19]);
    sparse(&tgt, disk);
    let (Some(src_dev), Some(tgt_dev)) = (Loop::new(&src), Loop::new(&tgt)) else {
        if std::env::var("WARDEN_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: losetup failed (root and /dev/loop-control needed)");
        }
        eprintln!("SKIPPED {test}: losetup failed (root needed)");
        return;
    };
    export_file(&exp, disk, 0);
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");
    let rec = snapshot(&req(&uri, Path::new(&src_dev.0)), &tuning()).unwrap();
    show(&rec);
    assert!(rec.direct_io);
    assert!(
        rec.source_identity
            .starts_with(&format!("block:{}", src_dev.0)),
        "{}",
        rec.source_identity
    );
    restore(
        &restore_req(&uri, Path::new(&tgt_dev.0), &rec.manifest_sha256),
        &tuning(),
    )
    .unwrap();
    drop(tgt_dev);
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
}
