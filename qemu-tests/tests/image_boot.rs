//! QEMU tier, issue #5: after an OK verdict and a verified wipe, the agent
//! streams the tenant's image from the host's HTTP server onto the node's
//! NVMe disk; a node without an OK verdict never touches it.
//!
//! The image: 64 MiB of raw disk (a protective MBR and GPT headers planted
//! at both ends, random and zero regions from a fixed ChaCha8 seed),
//! compressed with the `zstd` CLI and served by [`warden_qemu_tests::http`]
//! on 127.0.0.1 (the guest's 10.0.2.2). The disk: a 256 MiB NVMe image
//! filled on the host with a non-zero pattern.
//!
//! Both boots network-boot the server's `warden.ipxe` (iPXE → the UKI),
//! the wipe and image arguments on the server's boot command line.
//! Boot 1: a new node, no policy → FAILED verdict, power off, and the disk
//! file hashes as before. The owner learns and assigns a policy; boot 2 with
//! the same TPM and the same command line (it is measured into PCR 9):
//! OK verdict → Wipe → Image → Ready. The `image_result` event says zero
//! runs were skipped (the disk was just wiped and verified zero); after QEMU
//! is gone the host finds the image's SHA-256 over the first 64 MiB of the
//! disk file and zeros after it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use warden_protocol::image::{ImageFormat, ImageRecord};
use warden_qemu_tests::console::events_named;
use warden_qemu_tests::handoff::netboot_server_with;
use warden_qemu_tests::turnover::{boot_until_off, learn_policy};
use warden_qemu_tests::{DiskBus, NodeBuilder, QemuLock, Ramdisk};

const MIB: u64 = 1 << 20;
/// Host-side read and write size (one MiB).
const CHUNK: usize = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
const DISK_SIZE: u64 = 256 * MIB;

fn prerequisites() -> Option<Ramdisk> {
    warden_qemu_tests::qemu_prerequisites("image_boot", &["zstd"])
}

/// Writes the raw image: per MiB, two random then two zero (the first and
/// last MiB random but for the GPT structures), and returns its SHA-256.
fn write_raw_image(path: &Path) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut f = File::create(path).unwrap();
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; CHUNK];
    let chunks = IMAGE_SIZE / MIB;
    for i in 0..chunks {
        let random = i % 4 < 2 || i == chunks - 1;
        if random {
            rng.fill_bytes(&mut chunk);
            // A little zero run inside the random data: short holes are
            // written, not skipped, and must still land as zeros.
            chunk[300_000..300_000 + 1000].fill(0);
        } else {
            chunk.fill(0);
        }
        if i == 0 {
            // Protective MBR (one 0xEE partition), primary GPT header.
            chunk[446..512].fill(0);
            chunk[446 + 4] = 0xEE;
            chunk[510] = 0x55;
            chunk[511] = 0xAA;
            chunk[512..520].copy_from_slice(b"EFI PART");
        }
        if i == chunks - 1 {
            // Backup GPT header in the image's last sector.
            let at = chunk.len() - 512;
            chunk[at..at + 8].copy_from_slice(b"EFI PART");
        }
        hash.update(&chunk);
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    hex::encode(hash.finalize())
}

fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    hex::encode(hash.finalize())
}

/// Fills the disk with a pattern that is non-zero everywhere and differs per
/// 4 KiB block (so a stale block cannot pass for another).
fn fill_disk(path: &Path) {
    let mut f = File::create(path).unwrap();
    let mut chunk = vec![0u8; CHUNK];
    for m in 0..DISK_SIZE / MIB {
        for (i, block) in chunk.chunks_mut(4096).enumerate() {
            let n = m * 256 + i as u64;
            block.fill(0xA5);
            block[..8].copy_from_slice(&(n | 1 << 63).to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// After boot 2: the first `IMAGE_SIZE` bytes of the disk hash as the raw
/// image, and every byte after them is zero (the wipe, not skipped writes).
fn assert_disk_holds_image(disk: &Path, raw_sha256: &str) {
    let mut f = File::open(disk).unwrap();
    assert_eq!(f.metadata().unwrap().len(), DISK_SIZE);
    let mut buf = vec![0u8; CHUNK];
    let mut hash = Sha256::new();
    for _ in 0..IMAGE_SIZE / MIB {
        f.read_exact(&mut buf).unwrap();
        hash.update(&buf);
    }
    assert_eq!(
        hex::encode(hash.finalize()),
        raw_sha256,
        "the first {IMAGE_SIZE} bytes of {} are not the image",
        disk.display()
    );
    let mut offset = IMAGE_SIZE;
    while offset < DISK_SIZE {
        f.read_exact(&mut buf).unwrap();
        if let Some(i) = buf.iter().position(|b| *b != 0) {
            panic!(
                "{} byte {} after the image reads {:#04x}, not zero",
                disk.display(),
                offset + i as u64,
                buf[i]
            );
        }
        offset += MIB;
    }
}

fn node(name: &str, boot_url: &str, disk: &Path) -> NodeBuilder {
    NodeBuilder::new(name)
        .netboot(boot_url)
        .disk_file(DiskBus::Nvme, disk, true)
}

#[test]
fn an_attested_node_wipes_then_writes_the_image_and_the_host_reads_it_back() {
    let Some(ramdisk) = prerequisites() else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("warden-image-boot-")
        .tempdir()
        .unwrap();
    let raw = dir.path().join("img.raw");
    let zst = dir.path().join("img.raw.zst");
    let disk = dir.path().join("nvme.img");
    let raw_sha256 = write_raw_image(&raw);
    let status = Command::new("zstd")
        .args(["-q", "-3", "-T0", "-f"])
        .arg(&raw)
        .arg("-o")
        .arg(&zst)
        .status()
        .unwrap();
    assert!(status.success(), "zstd: {status}");
    let zst_sha256 = sha256_file(&zst);
    eprintln!(
        "image_boot: image {IMAGE_SIZE} bytes (sha256:{raw_sha256}), served as {} bytes of zstd (sha256:{zst_sha256})",
        std::fs::metadata(&zst).unwrap().len()
    );
    fill_disk(&disk);
    let disk_before = sha256_file(&disk);
    let port = warden_qemu_tests::http::serve_file(&zst).unwrap();
    let url = format!("http://10.0.2.2:{port}/img.raw.zst");

    // One command line for both boots: it is measured (PCR 9), and the
    // policy learned from boot 1 must accept boot 2.
    let (server, boot_url) = netboot_server_with(&format!(
        "warden.on_error=poweroff warden.done=poweroff warden.wipe=auto warden.image={url} \
         warden.image_checksum=sha256:{zst_sha256}"
    ))
    .unwrap();

    // 1. No policy: refused, and the disk is not touched.
    let mut first = boot_until_off(
        node("image-refused", &boot_url, &disk).start().unwrap(),
        "image_boot: boot 1 (no policy)",
    );
    let events = first.events();
    let verdict = events_named(&events, "verdict");
    assert_eq!(verdict.len(), 1, "{events:?}");
    assert_eq!(verdict[0]["status"], "failed", "{}", verdict[0]);
    assert_eq!(events_named(&events, "fatal").len(), 1, "{events:?}");
    assert!(
        events_named(&events, "image_result").is_empty()
            && events_named(&events, "wipe_result").is_empty()
            && !events_named(&events, "state")
                .iter()
                .any(|s| s["to"] == "Image" || s["to"] == "Wipe"),
        "a refused node wiped or wrote an image: {events:?}"
    );
    assert_eq!(
        sha256_file(&disk),
        disk_before,
        "the disk changed although the node was refused"
    );
    let tpm_state = first.swtpm_state_dir();
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();

    // 2. The owner's policy, learned from boot 1 and pinned to the ramdisk.
    learn_policy(&server, &ramdisk, &node_id, "qemu-image");

    // 3. Same node, same command line: OK verdict → Wipe → Image → Ready.
    let mut second = boot_until_off(
        node("image-ok", &boot_url, &disk)
            .tpm_state(&tpm_state)
            .start()
            .unwrap(),
        "image_boot: boot 2 (attested, wipe + image)",
    );
    let events = second.events();
    let console = second.console_text();
    let states: Vec<(String, String)> = events_named(&events, "state")
        .iter()
        .map(|s| {
            (
                s["from"].as_str().unwrap().to_owned(),
                s["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The verdict opens a session; the server has no plan for the node, so
    // the command line's keys decide.
    let path = [
        ("Attest", "Plan"),
        ("Plan", "Wipe"),
        ("Wipe", "Image"),
        ("Image", "Ready"),
        ("Ready", "Done"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert!(
        states.ends_with(&path),
        "boot 2 goes Attest → Plan → Wipe → Image → Ready: {states:?}\n{console}"
    );
    let wiped = events_named(&events, "wipe_result");
    assert_eq!(wiped.len(), 1, "{wiped:?}");
    assert_eq!(wiped[0]["status"], "clean", "{}", wiped[0]);

    let results = events_named(&events, "image_result");
    assert_eq!(results.len(), 1, "{events:?}");
    let result = results[0];
    eprintln!("image_boot: {result}");
    let name = wiped[0]["disk"].as_str().unwrap();
    assert_eq!(result["url"], url.as_str());
    assert_eq!(result["target"], format!("/dev/{name}"));
    assert_eq!(result["digest"], format!("sha256:{zst_sha256}"));
    let written = result["bytes_written"].as_u64().unwrap();
    let skipped = result["zero_bytes_skipped"].as_u64().unwrap();
    assert!(skipped > 0, "a just-wiped disk skips zero runs: {result}");
    assert!(written < IMAGE_SIZE, "{result}");

    // The record on the console is the one the event names.
    let line = console
        .lines()
        .find_map(|l| l.split_once(&format!("image: record of {name}: ")))
        .map(|(_, json)| json.trim_end().to_owned())
        .unwrap_or_else(|| panic!("no image record on the console:\n{console}"));
    assert_eq!(
        warden_protocol::sha256_hex(line.as_bytes()),
        result["record_sha256"].as_str().unwrap()
    );
    let record: ImageRecord = serde_json::from_str(&line).unwrap();
    assert_eq!(record.format, ImageFormat::Zstd);
    assert_eq!(record.image_bytes, IMAGE_SIZE);
    assert_eq!(record.bytes_written, written);
    assert_eq!(record.zero_bytes_skipped, skipped);
    assert_eq!(written + skipped, IMAGE_SIZE, "{record:?}");
    let summary = console
        .lines()
        .find(|l| l.contains(&format!("image: /dev/{name} WRITTEN from {url}")))
        .unwrap_or_else(|| panic!("no image summary line:\n{console}"));
    eprintln!("image_boot: console: {}", summary.trim_end());

    // The host's own reading, QEMU gone.
    assert_disk_holds_image(&disk, &raw_sha256);
    drop(first);
}
