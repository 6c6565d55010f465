#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! Manifest versions against a real NBD server (nbdkit `file` on
//! 127.0.0.1, sparse files): a v2 backup records the true SHA-256 and
//! BLAKE3 of every chunk (also the chunks an incremental kept from its
//! parent); a v1 backup (written here byte for byte as older agents did)
//! still restores, is checked by SHA-256, and parents an incremental; a
//! corrupted chunk is refused on the BLAKE3 path.
//!
//! Without nbdkit a test prints SKIPPED; with WARDEN_REQUIRE_TOOLS=1 it
//! fails instead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use warden_agent::snapshot::{restore, snapshot, SnapshotError};
use warden_protocol::snapshot::{
    chunk_count, export_bytes_needed, manifest_len, region_offset, ChunkHash, Manifest,
    RegionHeader, RegionState, RestoreRequest, SnapshotRequest, HEADER_BYTES, HEADER_LEN,
    MANIFEST_V1, MANIFEST_VERSION,
};

#[path = "common/nbd.rs"]
mod nbd;
use nbd::{have_tool, pattern, sha_prefix, sparse, tuning, Server, MIB};

const CHUNK: u64 = MIB;

/// Writes pattern bytes (seeded by `seed + i`) into chunks `data` of `path`.
fn fill(path: &Path, disk: u64, data: &[u64], seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for &i in data {
        let n = CHUNK.min(disk - i * CHUNK);
        f.write_all_at(&pattern(n as usize, seed + i), i * CHUNK)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn read_range(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

/// The complete backup an export file holds: its header (from the locator)
/// and its decoded manifest.
fn stored_manifest(export: &Path) -> (RegionHeader, Manifest) {
    let size = std::fs::metadata(export).unwrap().len();
    let header =
        RegionHeader::decode(&read_range(export, size - HEADER_BYTES, HEADER_BYTES)).unwrap();
    assert_eq!(header.state, RegionState::Complete);
    let bytes = read_range(export, header.manifest_offset, header.manifest_len);
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&bytes)),
        header.manifest_sha256
    );
    (header, Manifest::decode(&bytes).unwrap())
}

/// Every chunk entry carries the true hashes of the disk's bytes.
fn assert_true_hashes(m: &Manifest, disk_file: &Path) {
    for (i, c) in m.chunks.iter().enumerate() {
        let i = i as u64;
        let data = read_range(disk_file, i * CHUNK, CHUNK.min(m.disk_bytes - i * CHUNK));
        assert_eq!(c.zero, data.iter().all(|&b| b == 0), "chunk {i} zero flag");
        assert_eq!(
            c.sha256,
            <[u8; 32]>::from(Sha256::digest(&data)),
            "chunk {i} SHA-256"
        );
        assert_eq!(
            c.blake3,
            Some(*blake3::hash(&data).as_bytes()),
            "chunk {i} BLAKE3"
        );
    }
}

fn snap_req(uri: &str, source: &Path, previous: Option<&str>) -> SnapshotRequest {
    SnapshotRequest {
        uri: uri.to_string(),
        ca_pem: None,
        source: source.to_str().unwrap().to_string(),
        chunk_size: CHUNK,
        previous: previous.map(str::to_string),
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

/// Writes a v1 backup of `src` into `export`, byte for byte what an agent
/// before manifest v2 wrote: the image, the v1 manifest, both headers.
/// Returns the manifest digest.
fn write_v1_backup(src: &Path, disk: u64, export: &Path) -> String {
    let image = read_range(src, 0, disk);
    let chunks = image
        .chunks(CHUNK as usize)
        .map(|c| ChunkHash {
            sha256: Sha256::digest(c).into(),
            blake3: None,
            zero: c.iter().all(|&b| b == 0),
        })
        .collect::<Vec<_>>();
    assert_eq!(chunks.len() as u64, chunk_count(disk, CHUNK));
    let m = Manifest {
        version: MANIFEST_V1,
        disk_bytes: disk,
        chunk_size: CHUNK,
        created_unix: 1_700_000_000,
        source_identity: format!("file:{}", src.display()),
        chunks,
    };
    let bytes = m.encode();
    assert_eq!(&bytes[8..12], &1u32.to_be_bytes());
    let header = RegionHeader {
        state: RegionState::Complete,
        disk_bytes: disk,
        manifest_offset: region_offset(disk) + HEADER_BYTES,
        manifest_len: bytes.len() as u64,
        manifest_sha256: Sha256::digest(&bytes).into(),
    };
    let f = OpenOptions::new().write(true).open(export).unwrap();
    let size = f.metadata().unwrap().len();
    f.write_all_at(&image, 0).unwrap();
    f.write_all_at(&header.encode(), region_offset(disk))
        .unwrap();
    f.write_all_at(&bytes, header.manifest_offset).unwrap();
    f.write_all_at(&header.encode(), size - HEADER_LEN as u64)
        .unwrap();
    f.sync_all().unwrap();
    m.digest()
}

#[test]
fn v2_backups_record_true_hashes_also_for_chunks_an_incremental_kept() {
    let test = "v2_backups_record_true_hashes_also_for_chunks_an_incremental_kept";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp, tgt) = (
        dir.path().join("src.img"),
        dir.path().join("export.img"),
        dir.path().join("target.img"),
    );
    // 20 chunks and a short last one.
    let disk = 20 * CHUNK + 12288;
    sparse(&src, disk);
    fill(&src, disk, &[0, 1, 5, 6, 7, 13, 20], 1);
    sparse(
        &exp,
        export_bytes_needed(disk, manifest_len(disk, CHUNK, 200)),
    );
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");

    let full = snapshot(&snap_req(&uri, &src, None), &tuning()).unwrap();
    let (_, m) = stored_manifest(&exp);
    assert_eq!(m.version, MANIFEST_VERSION);
    assert_eq!(m.digest(), full.manifest_sha256);
    assert_true_hashes(&m, &src);

    // Change a data chunk, turn a zero chunk into data and a data chunk
    // into zeros; the other chunks keep their recorded SHA-256.
    fill(&src, disk, &[5, 9], 100);
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; CHUNK as usize], 13 * CHUNK)
        .unwrap();
    f.sync_all().unwrap();
    let inc = snapshot(
        &snap_req(&uri, &src, Some(&full.manifest_sha256)),
        &tuning(),
    )
    .unwrap();
    assert_eq!(inc.changed_chunks, 3, "{inc:?}");
    assert_eq!(inc.bytes_sent, 2 * CHUNK);
    let (_, m2) = stored_manifest(&exp);
    assert_eq!(m2.version, MANIFEST_VERSION);
    assert_eq!(m2.digest(), inc.manifest_sha256);
    assert_true_hashes(&m2, &src);

    sparse(&tgt, disk);
    let rec = restore(&restore_req(&uri, &tgt, &inc.manifest_sha256), &tuning()).unwrap();
    assert_eq!(rec.bytes_written, 6 * CHUNK + 12288);
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
}

#[test]
fn a_v1_backup_restores_by_sha256_and_parents_an_incremental() {
    let test = "a_v1_backup_restores_by_sha256_and_parents_an_incremental";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp, tgt) = (
        dir.path().join("src.img"),
        dir.path().join("export.img"),
        dir.path().join("target.img"),
    );
    let disk = 12 * CHUNK;
    sparse(&src, disk);
    fill(&src, disk, &[0, 2, 3, 8, 11], 7);
    sparse(
        &exp,
        export_bytes_needed(disk, manifest_len(disk, CHUNK, 200)),
    );
    let v1 = write_v1_backup(&src, disk, &exp);
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");

    sparse(&tgt, disk);
    let rec = restore(&restore_req(&uri, &tgt, &v1), &tuning()).unwrap();
    assert_eq!(rec.manifest_sha256, v1);
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));

    // A corrupted chunk of a v1 backup is caught by SHA-256 and never written.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&exp)
        .unwrap();
    let mut saved = [0u8; 4];
    f.read_exact_at(&mut saved, 3 * CHUNK + 77).unwrap();
    f.write_all_at(b"oops", 3 * CHUNK + 77).unwrap();
    f.sync_all().unwrap();
    sparse(&tgt, disk);
    let e = restore(&restore_req(&uri, &tgt, &v1), &tuning()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, SnapshotError::Mismatch { index: 3, .. }), "{e}");
    assert!(
        text.contains("expected sha256") && !text.contains("BLAKE3"),
        "{text}"
    );
    assert!(read_range(&tgt, 3 * CHUNK, CHUNK).iter().all(|&b| b == 0));
    f.write_all_at(&saved, 3 * CHUNK + 77).unwrap();
    f.sync_all().unwrap();

    // An incremental against the v1 manifest compares by SHA-256: only the
    // two changed chunks are sent, and the new manifest is v2.
    fill(&src, disk, &[2, 5], 500);
    let inc = snapshot(&snap_req(&uri, &src, Some(&v1)), &tuning()).unwrap();
    assert!(inc.incremental);
    assert_eq!(inc.previous_manifest_sha256.as_deref(), Some(v1.as_str()));
    assert_eq!(inc.changed_chunks, 2, "{inc:?}");
    assert_eq!(inc.bytes_sent, 2 * CHUNK);
    let (_, m) = stored_manifest(&exp);
    assert_eq!(m.version, MANIFEST_VERSION);
    assert_true_hashes(&m, &src);

    sparse(&tgt, disk);
    restore(&restore_req(&uri, &tgt, &inc.manifest_sha256), &tuning()).unwrap();
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
}

#[test]
fn a_corrupted_chunk_is_refused_by_the_blake3_check() {
    let test = "a_corrupted_chunk_is_refused_by_the_blake3_check";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp, tgt) = (
        dir.path().join("src.img"),
        dir.path().join("export.img"),
        dir.path().join("target.img"),
    );
    let disk = 8 * CHUNK;
    sparse(&src, disk);
    fill(&src, disk, &[1, 4, 6], 3);
    sparse(
        &exp,
        export_bytes_needed(disk, manifest_len(disk, CHUNK, 200)),
    );
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");
    let full = snapshot(&snap_req(&uri, &src, None), &tuning()).unwrap();

    let f = OpenOptions::new().write(true).open(&exp).unwrap();
    f.write_all_at(b"\xff", 4 * CHUNK + CHUNK - 1).unwrap();
    f.sync_all().unwrap();
    sparse(&tgt, disk);
    let e = restore(&restore_req(&uri, &tgt, &full.manifest_sha256), &tuning()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, SnapshotError::Mismatch { index: 4, .. }), "{e}");
    let (_, m) = stored_manifest(&exp);
    let want_b3 = hex::encode(m.chunks[4].blake3.unwrap());
    let bad = read_range(&exp, 4 * CHUNK, CHUNK);
    let got_sha = hex::encode(Sha256::digest(&bad));
    assert!(
        text.contains("checked by BLAKE3")
            && text.contains(&want_b3)
            && text.contains(&got_sha)
            && text.contains(&hex::encode(m.chunks[4].sha256)),
        "{text}"
    );
    // The bad chunk never reached the target.
    assert!(read_range(&tgt, 4 * CHUNK, CHUNK).iter().all(|&b| b == 0));
}

#[test]
fn a_restore_writes_the_first_mib_last_so_a_failed_one_cannot_boot() {
    let test = "a_restore_writes_the_first_mib_last_so_a_failed_one_cannot_boot";
    if !have_tool("nbdkit", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, exp, tgt) = (
        dir.path().join("src.img"),
        dir.path().join("export.img"),
        dir.path().join("target.img"),
    );
    let disk = 8 * CHUNK;
    sparse(&src, disk);
    // Chunk 0 is the first MiB (where a partition table lives); the last
    // chunk is empty, as a disk's end without a backup GPT.
    fill(&src, disk, &[0, 2, 6], 11);
    sparse(
        &exp,
        export_bytes_needed(disk, manifest_len(disk, CHUNK, 200)),
    );
    let server = Server::nbdkit(&["file", exp.to_str().unwrap()]);
    let uri = server.uri("nbd", "");
    let full = snapshot(&snap_req(&uri, &src, None), &tuning()).unwrap();

    // The target holds someone's old disk: non-zero at both ends.
    let old = pattern(disk as usize, 99);
    std::fs::write(&tgt, &old).unwrap();
    // A chunk after the first is corrupted on the export: the restore fails.
    let f = OpenOptions::new().write(true).open(&exp).unwrap();
    let good = read_range(&exp, 6 * CHUNK, 1);
    f.write_all_at(&[good[0] ^ 0xff], 6 * CHUNK).unwrap();
    f.sync_all().unwrap();
    let e = restore(&restore_req(&uri, &tgt, &full.manifest_sha256), &tuning()).unwrap_err();
    assert!(matches!(e, SnapshotError::Mismatch { index: 6, .. }), "{e}");
    // Chunk 0 was checked, but the first MiB stays zero, and the old
    // disk's end (its backup GPT) is gone too: nothing there can boot.
    assert!(
        read_range(&tgt, 0, MIB).iter().all(|&b| b == 0),
        "the first MiB was written before the restore succeeded"
    );
    assert!(read_range(&tgt, disk - 16 * 1024, 16 * 1024)
        .iter()
        .all(|&b| b == 0));

    // Repaired, the same restore completes and the first MiB is the backup's.
    f.write_all_at(&good, 6 * CHUNK).unwrap();
    f.sync_all().unwrap();
    restore(&restore_req(&uri, &tgt, &full.manifest_sha256), &tuning()).unwrap();
    assert_eq!(sha_prefix(&tgt, disk), sha_prefix(&src, disk));
    assert_eq!(read_range(&tgt, 0, MIB), read_range(&src, 0, MIB));
}
