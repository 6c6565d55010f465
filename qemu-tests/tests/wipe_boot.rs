//! QEMU tier, issue #4: a node erases every local disk after an OK verdict,
//! proves it, and reports it; a node without one never touches a disk.
//!
//! Three disks, each filled on the host with a non-zero pattern and planted
//! signatures (MBR, GPT at both ends, an ext4 superblock) before any boot,
//! and each a different size so a record names its image unambiguously:
//! - an NVMe disk (QEMU emulates Format NVM, not Sanitize: SANICAP=0), which
//!   `auto` must erase with a Format NVM;
//! - a virtio-blk disk with `discard=unmap`;
//! - a virtio-blk disk without it (LAB.md: its discards "succeed" and the
//!   data stays — a discard must never count as its erase).
//!
//! Both boots network-boot the server's `warden.ipxe` (iPXE → the UKI),
//! the wipe arguments on the server's boot command line.
//! Boot 1: a new node, `warden.wipe=auto`, no policy: FAILED verdict, power
//! off — every image still holds its pattern byte for byte. Then the owner
//! learns and assigns a policy; boot 2, same TPM and the same command line
//! (it is measured): OK verdict → Wipe → Ready. The `wipe_result` events and
//! the records on the console say which method erased each disk and that it
//! read back clean; after QEMU is gone the host reads every byte of every
//! image and finds only zeros.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use warden_protocol::wipe::{DiskRecord, Expected, Method, Outcome, Status, VerifyMode};
use warden_qemu_tests::console::events_named;
use warden_qemu_tests::handoff::netboot_server_with;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::turnover::{boot_until_off, learn_policy};
use warden_qemu_tests::{DiskBus, NodeBuilder, QemuLock, Ramdisk};

const MIB: u64 = 1 << 20;
/// Host-side read and write size.
const CHUNK: usize = 1 << 20;
const BLOCK: usize = 4096;

/// One test disk: how it is attached, its image, its size.
struct TestDisk {
    label: &'static str,
    bus: DiskBus,
    discard: bool,
    size: u64,
    image: PathBuf,
}

fn prerequisites() -> Option<Ramdisk> {
    warden_qemu_tests::qemu_prerequisites("wipe_boot", &[])
}

/// The pattern block at byte `offset` of disk `tag`: never zero anywhere,
/// different per block and per disk, so a stale block cannot pass as
/// another one.
fn pattern_block(tag: u8, offset: u64, out: &mut [u8]) {
    out.fill(0xA5 ^ tag);
    out[..8].copy_from_slice(&offset.to_le_bytes());
    out[8] = tag | 0x80;
    // The offset's low bytes may be zero; keep every byte non-zero.
    for b in &mut out[..8] {
        if *b == 0 {
            *b = 0x5A;
        }
    }
}

/// Signatures a wipe must not leave behind, at their real offsets.
fn signatures(size: u64) -> Vec<(u64, &'static [u8])> {
    vec![
        // MBR boot signature, primary GPT header, ext4 superblock magic.
        (510, &[0x55, 0xAA][..]),
        (512, &b"EFI PART"[..]),
        (1024 + 56, &[0x53, 0xEF][..]),
        // Backup GPT header, and an LVM-like label near the end.
        (size - 512, &b"EFI PART"[..]),
        (size - 64 * 1024, &b"LABELONE LVM2 x"[..]),
    ]
}

/// Writes the whole image: pattern blocks, then the signatures over them.
fn fill(disk: &TestDisk, tag: u8) {
    let mut f = File::create(&disk.image).unwrap();
    let mut chunk = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < disk.size {
        for (i, block) in chunk.chunks_mut(BLOCK).enumerate() {
            pattern_block(tag, offset + (i * BLOCK) as u64, block);
        }
        overlay_signatures(&mut chunk, offset, disk.size);
        f.write_all(&chunk).unwrap();
        offset += MIB;
    }
    f.sync_all().unwrap();
}

fn overlay_signatures(chunk: &mut [u8], chunk_offset: u64, size: u64) {
    for (at, sig) in signatures(size) {
        if at >= chunk_offset && at < chunk_offset + chunk.len() as u64 {
            let i = usize::try_from(at - chunk_offset).unwrap();
            chunk[i..i + sig.len()].copy_from_slice(sig);
        }
    }
}

/// Reads the whole image and checks it still holds exactly what [`fill`] wrote.
fn assert_untouched(disk: &TestDisk, tag: u8) {
    let mut f = File::open(&disk.image).unwrap();
    assert_eq!(f.metadata().unwrap().len(), disk.size, "{}", disk.label);
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < disk.size {
        f.read_exact(&mut got).unwrap();
        for (i, block) in want.chunks_mut(BLOCK).enumerate() {
            pattern_block(tag, offset + (i * BLOCK) as u64, block);
        }
        overlay_signatures(&mut want, offset, disk.size);
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{} ({}) changed at byte {} although the node was refused: read {:#04x}, wrote {:#04x}",
                disk.label,
                disk.image.display(),
                offset + i as u64,
                got[i],
                want[i]
            );
        }
        offset += MIB;
    }
}

/// Reads every byte of the image (the first and last MiB and the sampled
/// blocks included) and checks it is zero.
fn assert_all_zero(disk: &TestDisk) {
    let mut f = File::open(&disk.image).unwrap();
    assert_eq!(f.metadata().unwrap().len(), disk.size, "{}", disk.label);
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < disk.size {
        f.read_exact(&mut buf).unwrap();
        if let Some(i) = buf.iter().position(|b| *b != 0) {
            panic!(
                "{} ({}) is not erased: byte {} reads {:#04x} (the node said clean)",
                disk.label,
                disk.image.display(),
                offset + i as u64,
                buf[i]
            );
        }
        offset += MIB;
    }
}

fn node(name: &str, boot_url: &str, disks: &[TestDisk]) -> NodeBuilder {
    let mut b = NodeBuilder::new(name).netboot(boot_url);
    for d in disks {
        b = b.disk_file(d.bus, &d.image, d.discard);
    }
    b
}

/// The records the agent printed (`wipe: record of NAME: {json}`), by name,
/// each checked against its `wipe_result` event's `record_sha256`.
fn records(console: &str, results: &[&Value]) -> Vec<DiskRecord> {
    let mut out = Vec::new();
    for line in console.lines() {
        let Some((_, rest)) = line.split_once("wipe: record of ") else {
            continue;
        };
        let (name, json) = rest.split_once(": ").unwrap();
        let json = json.trim_end();
        let result = results
            .iter()
            .find(|r| r["disk"] == name)
            .unwrap_or_else(|| panic!("a record of {name} but no wipe_result for it"));
        assert_eq!(
            warden_protocol::sha256_hex(json.as_bytes()),
            result["record_sha256"].as_str().unwrap(),
            "the printed record of {name} is not the one the wipe_result event names"
        );
        let record: DiskRecord = serde_json::from_str(json).unwrap();
        assert_eq!(record.disk.name, name);
        out.push(record);
    }
    out
}

/// Seconds between two RFC 3339 UTC times of the same day (for the log only).
fn secs_between(a: &str, b: &str) -> f64 {
    let secs = |t: &str| -> f64 {
        let clock = t.split('T').nth(1).unwrap_or("").trim_end_matches('Z');
        clock
            .split(':')
            .map(|x| x.parse::<f64>().unwrap_or(0.0))
            .fold(0.0, |acc, x| acc * 60.0 + x)
    };
    secs(b) - secs(a)
}

#[test]
fn only_an_attested_node_wipes_and_every_disk_reads_back_zero() {
    let Some(ramdisk) = prerequisites() else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();
    let images = tempfile::Builder::new()
        .prefix("warden-wipe-boot-")
        .tempdir()
        .unwrap();
    let disks = [
        ("nvme", DiskBus::Nvme, true, 256 * MIB),
        ("virtio-discard", DiskBus::VirtioBlk, true, 320 * MIB),
        ("virtio-no-discard", DiskBus::VirtioBlk, false, 384 * MIB),
    ]
    .into_iter()
    .map(|(label, bus, discard, size)| TestDisk {
        label,
        bus,
        discard,
        size,
        image: images.path().join(format!("{label}.img")),
    })
    .collect::<Vec<_>>();
    let filled = Instant::now();
    for (tag, d) in (1u8..).zip(&disks) {
        fill(d, tag);
    }
    eprintln!(
        "wipe_boot: filled {} MiB of images in {:.1} s",
        disks.iter().map(|d| d.size / MIB).sum::<u64>(),
        filled.elapsed().as_secs_f64()
    );

    // One command line for both boots: it is measured (PCR 9), and the
    // policy learned from boot 1 must accept boot 2.
    let (server, boot_url) = netboot_server_with(
        "warden.on_error=poweroff warden.done=poweroff warden.wipe=auto warden.wipe_verify=sampled",
    )
    .unwrap();

    // 1. A new node asks for a wipe but has no policy: refused, and no disk
    //    is touched.
    let mut first = boot_until_off(
        node("wipe-refused", &boot_url, &disks).start().unwrap(),
        "wipe_boot: boot 1 (no policy)",
    );
    let events = first.events();
    let verdict = events_named(&events, "verdict");
    assert_eq!(verdict.len(), 1, "{events:?}");
    assert_eq!(verdict[0]["status"], "failed", "{}", verdict[0]);
    assert_eq!(verdict[0]["codes"], serde_json::json!(["no-policy"]));
    let fatal = events_named(&events, "fatal");
    assert_eq!(fatal.len(), 1, "{events:?}");
    assert_eq!(fatal[0]["action"], "poweroff");
    assert!(
        events_named(&events, "wipe_progress").is_empty()
            && events_named(&events, "wipe_result").is_empty()
            && !events_named(&events, "state")
                .iter()
                .any(|s| s["to"] == "Wipe"),
        "a refused node started a wipe: {events:?}"
    );
    let inventory = events_named(&events, "inventory");
    assert_eq!(
        inventory[0]["disks"].as_array().unwrap().len(),
        disks.len(),
        "every disk is in the inventory: {}",
        inventory[0]
    );
    for (tag, d) in (1u8..).zip(&disks) {
        assert_untouched(d, tag);
    }
    let tpm_state = first.swtpm_state_dir();
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();

    // 2. The owner's policy, learned from boot 1 and pinned to the ramdisk.
    learn_policy(&server, &ramdisk, &node_id, "qemu-wipe");

    // 3. The same node, the same disks: OK verdict → Wipe → Ready.
    let mut second = node("wipe-ok", &boot_url, &disks)
        .tpm_state(&tpm_state)
        .start()
        .unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now());
    let verdict = second.wait_for_event("verdict", left()).unwrap();
    assert_eq!(verdict["status"], "ok", "{verdict}");
    second.wait_for_event("ready", left()).unwrap();
    let second = boot_until_off(second, "wipe_boot: boot 2 (attested, wipe=auto)");
    let mut second = second;
    let events = second.events();
    let console = second.console_text();

    let states: Vec<(String, String, String)> = events_named(&events, "state")
        .iter()
        .map(|s| {
            (
                s["from"].as_str().unwrap().to_owned(),
                s["to"].as_str().unwrap().to_owned(),
                s["input"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The verdict opens a session; with no plan for the node the command
    // line's `warden.wipe` decides.
    let wipe_path = [
        ("Attest", "Plan", "session_opened"),
        ("Plan", "Wipe", "no_plan"),
        ("Wipe", "Ready", "wiped"),
        ("Ready", "Done", "reported"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert!(
        states.ends_with(&wipe_path),
        "boot 2 goes Attest → Plan → Wipe → Ready: {states:?}"
    );

    // What a person at the console reads: capabilities and summaries.
    for line in console
        .lines()
        .filter(|l| l.contains("] wipe: ") && !l.contains("wipe: record of ") && !l.contains('%'))
    {
        eprintln!("wipe_boot: console: {}", line.trim_end());
    }
    let results = events_named(&events, "wipe_result");
    assert_eq!(results.len(), disks.len(), "{results:?}");
    let records = records(&console, &results);
    assert_eq!(
        records.len(),
        disks.len(),
        "one record per disk:\n{console}"
    );
    for record in &records {
        let d = disks
            .iter()
            .find(|d| d.size == record.disk.size_bytes)
            .unwrap_or_else(|| panic!("no test disk of {} bytes", record.disk.size_bytes));
        let result = results
            .iter()
            .find(|r| r["disk"] == record.disk.name.as_str())
            .unwrap();
        let name = &record.disk.name;
        assert_eq!(result["status"], "clean", "{}: {result}", d.label);
        assert_eq!(record.status, Status::Clean, "{}: {record:?}", d.label);
        assert_eq!(record.requested, Method::Auto);
        let last = record.attempts.last().unwrap();
        assert_eq!(
            result["method"].as_str().unwrap(),
            last.method.to_string(),
            "{result}"
        );
        assert_eq!(last.outcome, Outcome::Verified, "{}: {last:?}", d.label);
        let v = last.verification.as_ref().unwrap();
        assert!(v.passed(), "{}: {v:?}", d.label);
        assert_eq!(v.expected, Expected::Zeros, "{}", d.label);
        assert_eq!(
            v.mode,
            VerifyMode::Sampled {
                blocks_per_gib: warden_agent::wipe::DEFAULT_BLOCKS_PER_GIB
            },
            "{}",
            d.label
        );
        // At least the first and last MiB were read back.
        assert!(v.bytes_read >= 2 * MIB, "{}: {v:?}", d.label);
        // No method before the last one counted as an erase.
        for a in &record.attempts[..record.attempts.len() - 1] {
            assert_ne!(a.outcome, Outcome::Verified, "{}: {a:?}", d.label);
        }
        eprintln!(
            "wipe_boot: {} = {name} ({} MiB): {} in {:.2} s, read back {} bytes in {} read(s); attempts: {}",
            d.label,
            d.size / MIB,
            last.method,
            secs_between(&record.started_at, &record.finished_at),
            v.bytes_read,
            v.samples,
            record
                .attempts
                .iter()
                .map(|a| format!("{} {:?}", a.method, a.outcome))
                .collect::<Vec<_>>()
                .join(", ")
        );
        match d.label {
            "nvme" => {
                assert_eq!(record.disk.path, format!("/dev/{name}"));
                assert!(name.starts_with("nvme"), "{name}");
                assert!(
                    matches!(
                        last.method,
                        Method::NvmeFormatUserData | Method::NvmeFormatCrypto
                    ),
                    "auto erases QEMU's NVMe with a Format NVM: {record:?}"
                );
                // Sanitize is not emulated: never run, and where the record
                // lists it, unsupported for SANICAP=0.
                for a in &record.attempts {
                    if a.method.name().starts_with("nvme-sanitize") {
                        match &a.outcome {
                            Outcome::Unsupported { reason } => {
                                assert!(reason.contains("SANICAP=0"), "{reason}")
                            }
                            other => panic!("sanitize ran on QEMU's NVMe: {other:?}"),
                        }
                    }
                }
                // The capabilities line says why sanitize was not chosen.
                let caps = console
                    .lines()
                    .find(|l| l.contains(&format!("wipe: {name} (nvme) firmware erase: ")))
                    .unwrap_or_else(|| panic!("no capabilities line for {name}:\n{console}"));
                for m in [
                    "nvme-sanitize-crypto",
                    "nvme-sanitize-block",
                    "nvme-sanitize-overwrite",
                ] {
                    assert!(
                        caps.contains(&format!("{m} (SANICAP=0")),
                        "{m} unavailable for SANICAP=0: {caps}"
                    );
                }
                assert!(caps.contains(last.method.name()), "{caps}");
            }
            _ => {
                assert!(name.starts_with("vd"), "{name}");
                // No firmware erase and no guarantee that discarded blocks
                // read zeros: auto writes zeros (no discard counts).
                assert_eq!(last.method, Method::Zeroout, "{}: {record:?}", d.label);
                for a in &record.attempts {
                    if matches!(a.method, Method::Discard | Method::Secdiscard) {
                        assert_ne!(a.outcome, Outcome::Verified, "{}: {a:?}", d.label);
                    }
                }
            }
        }
        // The human summary names the disk, the method and the read-back.
        let summary = console
            .lines()
            .find(|l| l.contains(&format!("wipe: {name} CLEAN by {}", last.method)))
            .unwrap_or_else(|| panic!("no summary line for {name}:\n{console}"));
        assert!(summary.contains(": pass"), "{summary}");
    }

    // The host's own reading, QEMU gone: every byte of every image is zero.
    for d in &disks {
        assert_all_zero(d);
    }
    drop(first);
}
