//! Host tier of the wipe: real loop devices over sparse files (root
//! needed), filled with data and real-looking signatures, erased by every
//! block method, read back by both verification modes, and checked
//! independently (plain reads, `wipefs`, `blkid`). Faults — a device that
//! ignores discard, one that fails mid-way with EIO — are injected in the
//! I/O layer (no device-mapper on these machines).
//!
//! Without root or loop devices every test says SKIPPED on stderr; with
//! `WARDEN_REQUIRE_QEMU=1` it fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Byte patterns and offsets on a 64-bit host: truncation is the point.
#![allow(clippy::cast_possible_truncation)]

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use warden_agent::wipe::io::{FailAt, IgnoreDiscard};
use warden_agent::wipe::{
    fill_pattern, open_target, wipe_disks, wipe_targets, EventSink, Method, Pattern, Status,
    VerifyMode, WipeOptions,
};
use warden_protocol::console::Event;
use warden_protocol::hello::Disk;
use warden_protocol::wipe::{Expected, Outcome, VerifyResult};

const MIB: u64 = 1 << 20;

/// A loop device over a sparse file, detached (by its own name) on drop.
struct Loop {
    dev: String,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(size: u64, partscan: bool) -> Option<Loop> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        fs::File::create(&file).unwrap().set_len(size).unwrap();
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if partscan {
            cmd.arg("-P");
        }
        let out = cmd.arg(&file).output().ok()?;
        if !out.status.success() {
            eprintln!("losetup: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Loop { dev, _dir: dir })
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    fn disk(&self) -> Disk {
        let q = PathBuf::from("/sys/block").join(self.name()).join("queue");
        let read = |f: &str| -> u64 {
            fs::read_to_string(q.join(f))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let sectors: u64 = fs::read_to_string(format!("/sys/block/{}/size", self.name()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Disk {
            name: self.name().to_string(),
            path: self.dev.clone(),
            size_bytes: sectors * 512,
            logical_block_size: 512,
            physical_block_size: 512,
            transport: "loop".into(),
            serial: Some(format!("test-{}", self.name())),
            discard_granularity: read("discard_granularity"),
            discard_max_bytes: read("discard_max_bytes"),
            write_zeroes_max_bytes: read("write_zeroes_max_bytes"),
            ..Default::default()
        }
    }

    /// Fills the device with a non-zero, position-dependent pattern.
    fn fill(&self) {
        let mut f = fs::OpenOptions::new().write(true).open(&self.dev).unwrap();
        let size = self.disk().size_bytes;
        let mut buf = vec![0u8; MIB as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = 0xa5 ^ (i as u8);
        }
        for _ in 0..size / MIB {
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }

    fn read_all(&self) -> Vec<u8> {
        let mut v = Vec::new();
        fs::File::open(&self.dev)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A loop device, or `None` after saying loudly why the test is skipped
/// (and failing when the tier is required).
fn loop_dev(size: u64, partscan: bool) -> Option<Loop> {
    let why = if !nix::unistd::Uid::effective().is_root() {
        Some("not root".to_string())
    } else {
        match Loop::new(size, partscan) {
            Some(l) => return Some(l),
            None => Some("losetup -f --show failed (no loop devices?)".to_string()),
        }
    };
    let why = why.unwrap_or_default();
    if std::env::var("WARDEN_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("wipe_loop: cannot run: {why}");
    }
    eprintln!("SKIPPED wipe_loop: {why}");
    None
}

fn collector() -> (EventSink, Arc<Mutex<Vec<Event>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        Arc::new(move |e: &Event| s.lock().unwrap().push(e.clone())),
        seen,
    )
}

fn opts(method: Method, verify: VerifyMode) -> (WipeOptions, Arc<Mutex<Vec<Event>>>) {
    let (sink, seen) = collector();
    (
        WipeOptions {
            method,
            verify,
            chunk_bytes: 4 << 20,
            events: Some(sink),
            ..Default::default()
        },
        seen,
    )
}

const SAMPLED: VerifyMode = VerifyMode::Sampled {
    blocks_per_gib: 256,
};

#[test]
fn every_block_method_erases_and_both_verifications_pass() {
    let cases = [
        Method::Zeroout,
        Method::Discard,
        Method::Secdiscard,
        Method::Auto,
        Method::Overwrite {
            passes: 1,
            pattern: Pattern::Zeros,
        },
        Method::Overwrite {
            passes: 2,
            pattern: Pattern::Random,
        },
    ];
    for method in cases {
        for verify in [SAMPLED, VerifyMode::Full] {
            let Some(l) = loop_dev(48 * MIB, false) else {
                return;
            };
            l.fill();
            let (o, seen) = opts(method, verify);
            let report = wipe_disks(&[l.disk()], &o);
            let r = &report.disks[0];
            assert_eq!(report.status, Status::Clean, "{method} {verify:?}: {r:#?}");
            let last = r.attempts.last().unwrap();
            let v = last.verification.as_ref().unwrap();
            assert_eq!(v.mode, verify);
            assert_eq!(v.result, VerifyResult::Pass);
            match verify {
                VerifyMode::Full => assert_eq!(v.bytes_read, 48 * MIB),
                _ => assert!(v.bytes_read >= 2 * MIB && v.bytes_read < 48 * MIB, "{v:?}"),
            }
            // Independently of the verifier: read the whole device back.
            let data = l.read_all();
            match &v.expected {
                Expected::Zeros => assert!(data.iter().all(|b| *b == 0), "{method}: not zero"),
                Expected::Pattern { seed } => {
                    let seed: [u8; 32] = hex::decode(seed).unwrap().try_into().unwrap();
                    let mut expect = vec![0u8; data.len()];
                    fill_pattern(&seed, 0, &mut expect);
                    assert!(data == expect, "{method}: not the last pass's stream");
                }
            }
            // The digest covers every byte read: recomputed from the device.
            if verify == VerifyMode::Full {
                assert_eq!(v.digest, full_digest(&data, v), "{method}");
            }
            // A loop device does not guarantee zeros after discard (the
            // probe says so), so a discard is followed by zeroing.
            if method == Method::Discard {
                assert!(
                    matches!(&r.attempts[0].outcome, Outcome::Failed { reason } if reason.contains("does not guarantee zeros after discard")),
                    "{r:#?}"
                );
                assert_eq!(last.method, Method::Zeroout, "{r:#?}");
            }
            // Loop devices have no secure discard: recorded, then the fallback ran.
            if method == Method::Secdiscard {
                assert!(
                    matches!(r.attempts[0].outcome, Outcome::Unsupported { .. }),
                    "{r:#?}"
                );
                assert_eq!(last.method, Method::Zeroout);
            }
            // Auto on a loop device: no hardware method, and secure discard
            // (guaranteed zeros) is refused by loop, so zeroout decides.
            if method == Method::Auto {
                assert_eq!(last.method, Method::Zeroout, "{r:#?}");
            }
            let seen = seen.lock().unwrap();
            assert!(
                seen.iter().any(|e| matches!(e, Event::WipeResult { status, disk, .. } if status == "clean" && disk == l.name())),
                "{seen:?}"
            );
            // The record is what gets measured: canonical and stable.
            assert_eq!(r.canonical_json(), serde_json::to_vec(r).unwrap());
        }
    }
}

#[test]
fn a_device_that_ignores_discard_is_caught_and_the_fallback_runs() {
    let Some(l) = loop_dev(32 * MIB, false) else {
        return;
    };
    l.fill();
    for verify in [SAMPLED, VerifyMode::Full] {
        let (o, _) = opts(Method::Discard, verify);
        let mut t = open_target(&l.disk(), &o).unwrap();
        assert!(
            !t.zeros_after_discard && !t.caps.zeroes_after_discard,
            "loop promises no zeros after discard: {}",
            t.caps.zeroes_after_discard_basis
        );
        // Declared for the test: this loop's discard punches holes in a
        // sparse file, which read back as zeros — unless it is ignored.
        t.zeros_after_discard = true;
        t.io = Box::new(IgnoreDiscard(t.io));
        let report = wipe_targets(vec![t], &o);
        let r = &report.disks[0];
        assert_eq!(r.status, Status::Clean, "{r:#?}");
        assert_eq!(r.attempts.len(), 2, "{r:#?}");
        assert_eq!(r.attempts[0].method, Method::Discard);
        assert_eq!(r.attempts[0].outcome, Outcome::VerifyFailed);
        match &r.attempts[0].verification.as_ref().unwrap().result {
            VerifyResult::Fail { offset, found, .. } => {
                assert_eq!(*offset, 0);
                assert_eq!(&found[..4], "a5a4", "the old data, as found: {found}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.attempts[1].method, Method::Zeroout);
        assert_eq!(r.attempts[1].outcome, Outcome::Verified);
        assert!(l.read_all().iter().all(|b| *b == 0));
        l.fill();
    }
}

/// The digest a full verification records, recomputed from `data`: SHA-256
/// over the SHA-256s of its `digest_chunk_bytes` chunks.
fn full_digest(data: &[u8], v: &warden_protocol::wipe::Verification) -> String {
    use sha2::{Digest, Sha256};
    let chunk = v
        .digest_chunk_bytes
        .expect("a full read records its chunk size");
    let mut outer = Sha256::new();
    for c in data.chunks(usize::try_from(chunk).unwrap()) {
        outer.update(Sha256::digest(c));
    }
    hex::encode(outer.finalize())
}

#[test]
fn discard_counts_only_where_zeros_are_guaranteed() {
    let Some(l) = loop_dev(32 * MIB, false) else {
        return;
    };
    // Without the guarantee (what the probe says of a loop device): the
    // discard runs, is not counted, and zeroing follows and is verified.
    l.fill();
    let (o, _) = opts(Method::Discard, VerifyMode::Full);
    let t = open_target(&l.disk(), &o).unwrap();
    assert!(!t.zeros_after_discard);
    assert!(
        t.caps.zeroes_after_discard_basis.contains("loop"),
        "{}",
        t.caps.zeroes_after_discard_basis
    );
    let report = wipe_targets(vec![t], &o);
    let r = &report.disks[0];
    assert_eq!(r.status, Status::Clean, "{r:#?}");
    assert_eq!(r.attempts.len(), 2, "{r:#?}");
    assert_eq!(r.attempts[0].method, Method::Discard);
    assert!(r.attempts[0].verification.is_none(), "{r:#?}");
    match &r.attempts[0].outcome {
        Outcome::Failed { reason } => assert!(
            reason.contains(&l.dev) && reason.contains("does not guarantee zeros after discard"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.attempts[1].method, Method::Zeroout);
    assert_eq!(r.attempts[1].outcome, Outcome::Verified);
    assert!(l.read_all().iter().all(|b| *b == 0));

    // With the guarantee declared: the discard alone erases, and the full
    // read-back proves it.
    l.fill();
    let mut t = open_target(&l.disk(), &o).unwrap();
    t.zeros_after_discard = true;
    let report = wipe_targets(vec![t], &o);
    let r = &report.disks[0];
    assert_eq!(r.status, Status::Clean, "{r:#?}");
    assert_eq!(r.attempts.len(), 1, "{r:#?}");
    assert_eq!(r.attempts[0].method, Method::Discard);
    assert_eq!(r.attempts[0].outcome, Outcome::Verified);
    assert_eq!(r.bytes_written, 32 * MIB);
    assert!(l.read_all().iter().all(|b| *b == 0));
}

#[test]
fn a_disk_failing_mid_way_fails_alone_with_offset_and_errno() {
    let Some(bad) = loop_dev(32 * MIB, false) else {
        return;
    };
    let Some(good) = loop_dev(32 * MIB, false) else {
        return;
    };
    bad.fill();
    good.fill();
    let fault = 20 * MIB + 3 * 512;
    let (o, _) = opts(
        Method::Overwrite {
            passes: 1,
            pattern: Pattern::Random,
        },
        VerifyMode::Full,
    );
    let mut t_bad = open_target(&bad.disk(), &o).unwrap();
    t_bad.io = Box::new(FailAt::eio(t_bad.io, fault));
    let t_good = open_target(&good.disk(), &o).unwrap();
    let report = wipe_targets(vec![t_bad, t_good], &o);
    assert_eq!(report.status, Status::Failed);
    let r = &report.disks[0];
    assert_eq!(r.status, Status::Failed, "{r:#?}");
    assert_eq!(r.attempts.len(), 1, "an I/O error stops the disk: {r:#?}");
    match &r.attempts[0].outcome {
        Outcome::IoError { offset, errno, .. } => {
            assert_eq!(*offset, fault);
            assert_eq!(*errno, libc::EIO);
        }
        other => panic!("{other:?}"),
    }
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.contains(&bad.dev) && reason.contains(&fault.to_string()),
        "{reason}"
    );
    assert_eq!(
        report.disks[1].status,
        Status::Clean,
        "{:#?}",
        report.disks[1]
    );
}

/// CRC-32 (IEEE), as GPT uses it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid protective MBR + GPT (primary and backup) with two partitions:
/// 1 MiB..17 MiB and 17 MiB..(end - 1 MiB), 512-byte sectors.
fn write_gpt(dev: &str, size: u64) -> [(u64, u64); 2] {
    let sectors = size / 512;
    let parts = [(2048u64, 34815u64), (34816u64, sectors - 2049)];
    let mut entries = vec![0u8; 128 * 128];
    for (i, (first, last)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        // Linux filesystem data type GUID, a unique GUID.
        e[0..16].copy_from_slice(&[
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ]);
        e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
    }
    let header = |current: u64, backup: u64, entries_lba: u64| {
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
        h[56..72].copy_from_slice(&[0x42; 16]);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
        let c = crc32(&h[..92]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        h
    };
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0xee;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&u32::try_from(sectors - 1).unwrap().to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut f = fs::OpenOptions::new().write(true).open(dev).unwrap();
    let mut put = |at: u64, b: &[u8]| {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(b).unwrap();
    };
    put(0, &mbr);
    put(512, &header(1, sectors - 1, 2));
    put(1024, &entries);
    put((sectors - 33) * 512, &entries);
    put((sectors - 1) * 512, &header(sectors - 1, 1, sectors - 33));
    f.sync_all().unwrap();
    parts.map(|(s, l)| (s * 512, (l - s + 1) * 512))
}

/// An ext2/3/4 superblock (magic 0xEF53) at 1 KiB into `at`.
fn write_ext_magic(dev: &str, at: u64) {
    let mut sb = vec![0u8; 1024];
    sb[0..4].copy_from_slice(&1024u32.to_le_bytes()); // inodes
    sb[4..8].copy_from_slice(&4096u32.to_le_bytes()); // blocks
    sb[24..28].copy_from_slice(&2u32.to_le_bytes()); // log block size: 4 KiB
    sb[32..36].copy_from_slice(&32768u32.to_le_bytes()); // blocks per group
    sb[40..44].copy_from_slice(&1024u32.to_le_bytes()); // inodes per group
    sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
    sb[0x4c..0x50].copy_from_slice(&1u32.to_le_bytes()); // rev level (dynamic)
    sb[0x58..0x5a].copy_from_slice(&256u16.to_le_bytes()); // inode size
    let mut f = fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(at + 1024)).unwrap();
    f.write_all(&sb).unwrap();
    f.sync_all().unwrap();
}

/// An MD 1.2 superblock (4 KiB into `at`) with a valid checksum.
fn write_md12(dev: &str, at: u64, len: u64) {
    let mut sb = vec![0u8; 256];
    sb[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
    sb[4..8].copy_from_slice(&1u32.to_le_bytes()); // major version
    sb[16..32].copy_from_slice(&[0x5e; 16]); // set uuid
    sb[32..38].copy_from_slice(b"old:md");
    sb[72..76].copy_from_slice(&1u32.to_le_bytes()); // level 1
    sb[92..96].copy_from_slice(&2u32.to_le_bytes()); // raid disks
    sb[128..136].copy_from_slice(&2048u64.to_le_bytes()); // data offset
    sb[136..144].copy_from_slice(&(len / 512 - 2048).to_le_bytes()); // data size
    sb[144..152].copy_from_slice(&8u64.to_le_bytes()); // super offset (sectors)
    sb[168..184].copy_from_slice(&[0x77; 16]); // device uuid
    let mut sum: u64 = sb
        .chunks(4)
        .map(|w| u64::from(u32::from_le_bytes(w.try_into().unwrap())))
        .sum();
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sb[216..220].copy_from_slice(&(sum as u32).to_le_bytes());
    let mut f = fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(at + 4096)).unwrap();
    f.write_all(&sb).unwrap();
    f.sync_all().unwrap();
}

/// What `wipefs --no-act` finds on `dev` (empty: nothing).
fn wipefs(dev: &str) -> String {
    let out = Command::new("wipefs")
        .args(["--no-act", dev])
        .output()
        .expect("wipefs (util-linux) is installed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What `blkid -p` finds at `offset` of `dev`.
fn blkid_at(dev: &str, offset: u64) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-O", &offset.to_string(), dev])
        .output()
        .expect("blkid (util-linux) is installed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn metadata_wipe_removes_every_signature_and_keeps_the_data() {
    let size = 96 * MIB;
    let Some(l) = loop_dev(size, false) else {
        return;
    };
    l.fill();
    let parts = write_gpt(&l.dev, size);
    write_ext_magic(&l.dev, parts[0].0);
    write_md12(&l.dev, parts[1].0, parts[1].1);
    let before = wipefs(&l.dev);
    assert!(
        before.contains("gpt") && before.contains("PMBR"),
        "wipefs sees the GPT: {before}"
    );
    let p1 = blkid_at(&l.dev, parts[0].0);
    assert!(
        p1.contains("TYPE=\"ext"),
        "blkid sees the ext superblock: {p1}"
    );
    let p2 = blkid_at(&l.dev, parts[1].0);
    assert!(
        p2.contains("linux_raid_member"),
        "blkid sees the MD 1.2 superblock: {p2}"
    );

    let (o, _) = opts(Method::Metadata, SAMPLED);
    let report = wipe_disks(&[l.disk()], &o);
    let r = &report.disks[0];
    assert_eq!(r.status, Status::Clean, "{r:#?}");
    let v = r.attempts[0].verification.as_ref().unwrap();
    assert_eq!(v.mode, VerifyMode::Metadata);
    assert_eq!(v.bytes_read, r.bytes_written);

    assert_eq!(wipefs(&l.dev), "", "wipefs finds nothing on the disk");
    for (start, _) in parts {
        assert_eq!(
            blkid_at(&l.dev, start),
            "",
            "blkid finds nothing at {start}"
        );
    }
    // Exactly the planned ranges are zero; every other byte still holds the
    // old data: metadata is the fast path, not an erase.
    let ranges = warden_agent::wipe::metadata::plan(size, &parts, 4096);
    assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), r.bytes_written);
    let data = l.read_all();
    let mut next = 0usize;
    for (start, len) in &ranges {
        let (s, e) = (*start as usize, (*start + *len) as usize);
        assert!(
            data[next..s]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == 0xa5 ^ ((next + i) as u8)),
            "data before {s}"
        );
        assert!(data[s..e].iter().all(|b| *b == 0), "range {s}..{e} zeroed");
        next = e;
    }
    assert!(data[next..]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == 0xa5 ^ ((next + i) as u8)));
    // Both ends of the disk and of each partition (MD 0.90/1.0 live at the end).
    let covered = |o: u64| ranges.iter().any(|(s, l)| *s <= o && o < s + l);
    for o in [
        0,
        size - 1,
        parts[0].0,
        parts[1].0 + parts[1].1 - 1,
        parts[0].0 + parts[0].1 - 1,
    ] {
        assert!(covered(o), "{o} zeroed");
    }
}

#[test]
fn a_mounted_disk_is_refused_by_name_and_others_still_erased() {
    let Some(busy) = loop_dev(64 * MIB, false) else {
        return;
    };
    let Some(free) = loop_dev(32 * MIB, false) else {
        return;
    };
    free.fill();
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", &busy.dev])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4 {}", busy.dev);
    let mnt = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .arg(&busy.dev)
        .arg(mnt.path())
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mount {}", busy.dev);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());

    let (o, seen) = opts(Method::Zeroout, SAMPLED);
    let report = wipe_disks(&[busy.disk(), free.disk()], &o);
    assert_eq!(report.status, Status::Failed);
    let r = &report.disks[0];
    assert_eq!(r.status, Status::Failed);
    assert!(r.attempts.is_empty(), "nothing was run on it: {r:#?}");
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.contains(&format!("{} is in use", busy.name())) && reason.contains("mounted at"),
        "{reason}"
    );
    assert_eq!(report.disks[1].status, Status::Clean);
    // The file system on the refused disk is intact.
    assert!(wipefs(&busy.dev).contains("ext4"));
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(
        |e| matches!(e, Event::WipeResult { status, reason: Some(_), .. } if status == "failed")
    ));
}
