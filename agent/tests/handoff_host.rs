//! Host tier of the handoff: real GPT disk images built the way the tenant
//! images are (sgdisk, mkfs.vfat --offset, mtools, mkfs.ext4, objcopy with
//! systemd's EFI stub — no loop mounts), read back through
//! `warden_agent::handoff`; the `EFI_LOAD_OPTION` bytes checked byte for
//! byte; the efivarfs writer against a directory; the kexec order and the
//! measurement with a recorder and with a real swtpm.
//!
//! Tools missing: each test prints SKIPPED and returns, unless
//! WARDEN_REQUIRE_TOOLS=1, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use warden_agent::handoff::{
    self, efivars, expected_pcr, find_boot_entry, gpt, guard, kexec_handoff, load_option, read_gpt,
    reboot_handoff, BootEntryError, BootTarget, EfiVars, Efivarfs, EntrySource, HandoffError,
    HeaderCopy, Kexec, Measurer, PlanOutcome, Power, RebootMode, StepOutcome, HANDOFF_PCR,
};
use warden_agent::tpm::{Tpm, TpmError};
use warden_protocol::efi::{device_path_to_text, parse_load_option, Guid};

const MIB: u64 = 1 << 20;
const ESP_OFFSET: u64 = MIB;
const ESP_SIZE: u64 = 32 * MIB;
const LINUX_SIZE: u64 = 30 * MIB;
const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

// ---------------------------------------------------------------- helpers

/// Whether every tool is on PATH; if not, SKIPPED (or a failure when
/// WARDEN_REQUIRE_TOOLS=1).
fn have_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: SKIPPED: missing {} (scripts/setup installs gdisk dosfstools mtools binutils systemd-boot-efi)",
        missing.join(", ")
    );
    if std::env::var("WARDEN_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{msg} — and WARDEN_REQUIRE_TOOLS=1");
    }
    eprintln!("{msg}");
    false
}

fn run(cmd: &mut Command) {
    let out = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// A GPT image: ESP (FAT, partition 1, 32 MiB at 1 MiB unless said
/// otherwise) and, if `linux` is given, a 30 MiB second partition of that
/// sgdisk type code right after it.
struct Disk {
    dir: tempfile::TempDir,
    img: PathBuf,
    linux_offset: u64,
}

impl Disk {
    fn new(esp: bool, linux: Option<&str>) -> Disk {
        Disk::with_mkfs_args(esp, linux, &[], ESP_SIZE)
    }

    /// `mkfs_args` go to mkfs.vfat (e.g. `-F 32`).
    fn with_mkfs_args(esp: bool, linux: Option<&str>, mkfs_args: &[&str], esp_size: u64) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let linux_offset = ESP_OFFSET + esp_size;
        File::create(&img)
            .unwrap()
            .set_len(linux_offset + LINUX_SIZE + MIB)
            .unwrap();
        let lba = |bytes: u64| bytes / 512;
        let mut sg = Command::new("sgdisk");
        if esp {
            sg.args([
                "-n",
                &format!("1:{}:{}", lba(ESP_OFFSET), lba(linux_offset) - 1),
                "-t",
                "1:ef00",
                "-c",
                "1:EFI system",
            ]);
        }
        if let Some(code) = linux {
            sg.args([
                "-n",
                &format!(
                    "2:{}:{}",
                    lba(linux_offset),
                    lba(linux_offset + LINUX_SIZE) - 1
                ),
                "-t",
                &format!("2:{code}"),
                "-c",
                "2:tenant-boot",
            ]);
        }
        run(sg.arg(&img));
        if esp {
            run(Command::new("mkfs.vfat")
                .args(["-n", "ESP", "--offset", "2048"])
                .args(mkfs_args)
                .arg(&img)
                .arg((esp_size / 1024).to_string()));
        }
        Disk {
            dir,
            img,
            linux_offset,
        }
    }

    fn esp_target(&self) -> String {
        format!("{}@@{ESP_OFFSET}", self.img.display())
    }

    fn mkdir(&self, dirs: &[&str]) {
        let mut cmd = Command::new("mmd");
        cmd.arg("-i").arg(self.esp_target());
        for d in dirs {
            cmd.arg(format!("::{d}"));
        }
        run(&mut cmd);
    }

    /// Copies `bytes` to `path` on the ESP.
    fn put(&self, path: &str, bytes: &[u8]) {
        let src = self.dir.path().join("put.tmp");
        std::fs::write(&src, bytes).unwrap();
        run(Command::new("mcopy")
            .args(["-o", "-i"])
            .arg(self.esp_target())
            .arg(&src)
            .arg(format!("::{path}")));
    }

    /// Makes partition 2 an ext4 filesystem holding `files` (path, bytes).
    fn ext4(&self, files: &[(&str, &[u8])]) {
        let root = self.dir.path().join("ext4root");
        for (path, bytes) in files {
            let p = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        let part = self.dir.path().join("ext4.img");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&part)
            .arg(format!("{}k", LINUX_SIZE / 1024)));
        let bytes = std::fs::read(&part).unwrap();
        let disk = OpenOptions::new().write(true).open(&self.img).unwrap();
        disk.write_all_at(&bytes, self.linux_offset).unwrap();
    }
}

const TOOLS: &[&str] = &["sgdisk", "mkfs.vfat", "mmd", "mcopy"];

// ---------------------------------------------------------------- discovery

#[test]
fn bls_entry_on_the_esp_is_read_exactly() {
    if !have_tools("bls_entry_on_the_esp_is_read_exactly", TOOLS) {
        return;
    }
    let disk = Disk::new(true, None);
    let kernel = random(1, 300_001);
    let initrd_a = random(2, 100_000);
    let initrd_b = random(3, 4_097);
    disk.mkdir(&["/loader", "/loader/entries", "/tenant"]);
    disk.put("/tenant/vmlinuz", &kernel);
    disk.put("/tenant/initrd-a.img", &initrd_a);
    disk.put("/tenant/initrd-b.img", &initrd_b);
    disk.put(
        "/loader/entries/tenant.conf",
        b"# the tenant\ntitle Tenant OS\nversion 1\nlinux /tenant/vmlinuz\n\
          initrd /tenant/initrd-a.img\ninitrd /tenant/initrd-b.img\n\
          options console=ttyS0 quiet\noptions warden.lease=L-42\n",
    );

    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert_eq!(entry.source, EntrySource::EspBls);
    assert_eq!(entry.partition, 1);
    assert_eq!(entry.title, "Tenant OS");
    assert_eq!(entry.path, "/loader/entries/tenant.conf");
    assert!(entry.kernel == kernel, "kernel bytes differ");
    assert!(
        entry.initrd == [initrd_a, initrd_b].concat(),
        "initrds not concatenated in order"
    );
    assert_eq!(entry.cmdline, "console=ttyS0 quiet warden.lease=L-42");
    let d = entry.digests();
    assert_eq!(d.kernel, <[u8; 32]>::from(Sha256::digest(&kernel)));
    assert_eq!(
        d.cmdline,
        <[u8; 32]>::from(Sha256::digest(b"console=ttyS0 quiet warden.lease=L-42"))
    );

    // The table itself, as sgdisk wrote it.
    let table = read_gpt(&mut File::open(&disk.img).unwrap(), "disk.img", 512).unwrap();
    let esp = table.esp().unwrap();
    assert_eq!((esp.first_lba, esp.last_lba), (2048, 67583));
    assert_eq!((esp.offset, esp.len), (ESP_OFFSET, ESP_SIZE));
    assert_eq!(esp.name, "EFI system");
}

#[test]
fn a_fat32_esp_reads_the_same() {
    if !have_tools("a_fat32_esp_reads_the_same", TOOLS) {
        return;
    }
    // Real ESPs are usually FAT32: 64 MiB of one-sector clusters is enough
    // clusters for FAT32.
    let disk = Disk::with_mkfs_args(true, None, &["-F", "32", "-s", "1"], 64 * MIB);
    let kernel = random(5, 123_457);
    disk.mkdir(&["/loader", "/loader/entries"]);
    disk.put("/vmlinuz", &kernel);
    disk.put(
        "/loader/entries/t.conf",
        b"title T\nlinux /vmlinuz\noptions x=1\n",
    );
    let before = std::fs::read(&disk.img).unwrap();
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert!(entry.kernel == kernel);
    assert_eq!(entry.cmdline, "x=1");
    // Reading never writes: not even the FAT's dirty flag or FSInfo.
    assert!(
        std::fs::read(&disk.img).unwrap() == before,
        "the disk changed"
    );
}

#[test]
fn several_bls_entries_choose_the_same_one_every_time() {
    if !have_tools("several_bls_entries_choose_the_same_one_every_time", TOOLS) {
        return;
    }
    let disk = Disk::new(true, None);
    disk.mkdir(&["/loader", "/loader/entries"]);
    // Without sort-key: newest file name first (6.1.10 > 6.1.9).
    for (i, version) in ["6.1.9", "6.1.10", "6.1.2"].iter().enumerate() {
        disk.put(&format!("/k-{version}"), &random(10 + i as u64, 1000));
        disk.put(
            &format!("/loader/entries/linux-{version}.conf"),
            format!("title Linux {version}\nlinux /k-{version}\noptions v={version}\n").as_bytes(),
        );
    }
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert_eq!(entry.path, "/loader/entries/linux-6.1.10.conf");
    assert_eq!(entry.cmdline, "v=6.1.10");
    assert!(entry.kernel == random(11, 1000));

    // Entries with a sort-key come before all of those; among equal keys,
    // the highest version wins.
    disk.put("/ka", &random(20, 500));
    disk.put("/kb", &random(21, 500));
    disk.put(
        "/loader/entries/zz-a.conf",
        b"title A\nsort-key tenant\nversion 2.0\nlinux /ka\n",
    );
    disk.put(
        "/loader/entries/zz-b.conf",
        b"title B\nsort-key tenant\nversion 10.0\nlinux /kb\n",
    );
    // An EFI-program entry is not kexec-able and is passed over.
    disk.put(
        "/loader/entries/aaa-efi.conf",
        b"title Shell\nsort-key aaa\nefi /shell.efi\n",
    );
    for _ in 0..3 {
        let entry = find_boot_entry(&disk.img, 512).unwrap();
        assert_eq!(entry.title, "B");
        assert!(entry.kernel == random(21, 500));
    }
}

/// `objcopy` a UKI from systemd's stub, as LAB.md does.
fn build_uki(dir: &Path, linux: &[u8], initrd: &[u8], cmdline: &[u8]) -> Vec<u8> {
    let files = [("linux", linux), ("initrd", initrd), ("cmdline", cmdline)];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(dir.join("osrel"), b"ID=tenant\n").unwrap();
    let out = dir.join("uki.efi");
    run(Command::new("objcopy").current_dir(dir).args([
        "--add-section",
        ".osrel=osrel",
        "--change-section-vma",
        ".osrel=0x20000",
        "--add-section",
        ".cmdline=cmdline",
        "--change-section-vma",
        ".cmdline=0x30000",
        "--add-section",
        ".linux=linux",
        "--change-section-vma",
        ".linux=0x2000000",
        "--add-section",
        ".initrd=initrd",
        "--change-section-vma",
        ".initrd=0x3000000",
        STUB,
        "uki.efi",
    ]));
    std::fs::read(out).unwrap()
}

#[test]
fn uki_sections_are_extracted_exactly() {
    let mut tools = TOOLS.to_vec();
    tools.push("objcopy");
    if !have_tools("uki_sections_are_extracted_exactly", &tools) {
        return;
    }
    if !Path::new(STUB).exists() {
        let msg = format!(
            "uki_sections_are_extracted_exactly: SKIPPED: no {STUB} (package systemd-boot-efi)"
        );
        if std::env::var("WARDEN_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("{msg}");
        return;
    }
    let disk = Disk::new(true, None);
    // Odd sizes: the raw data is padded to the file alignment, VirtualSize is not.
    let linux = random(30, 777_777);
    let initrd = random(31, 12_345);
    let uki = build_uki(
        disk.dir.path(),
        &linux,
        &initrd,
        b"console=ttyS0 warden.lease=L-7 \n\0\0",
    );

    // The pure extractor first.
    let sections = handoff::uki::extract(&uki).unwrap();
    assert!(sections.linux == linux.as_slice());
    assert!(sections.initrd == initrd.as_slice());
    assert_eq!(sections.cmdline, "console=ttyS0 warden.lease=L-7");

    // Then on the disk: no BLS entries, the UKI at the removable-media path.
    disk.mkdir(&["/EFI", "/EFI/BOOT"]);
    disk.put("/EFI/BOOT/BOOTX64.EFI", &uki);
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert_eq!(entry.source, EntrySource::Uki);
    assert_eq!(entry.path, "/EFI/BOOT/BOOTX64.EFI");
    assert!(entry.kernel == linux);
    assert!(entry.initrd == initrd);
    assert_eq!(entry.cmdline, "console=ttyS0 warden.lease=L-7");

    // A type #2 entry in /EFI/Linux comes before the removable-media path.
    let other = random(32, 4096);
    let uki2 = build_uki(disk.dir.path(), &other, b"", b"root=LABEL=x");
    disk.mkdir(&["/EFI/Linux"]);
    disk.put("/EFI/Linux/tenant-2.efi", &uki2);
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert_eq!(entry.path, "/EFI/Linux/tenant-2.efi");
    assert!(entry.kernel == other);
    assert!(entry.initrd.is_empty());
    assert_eq!(entry.cmdline, "root=LABEL=x");

    // A boot loader (a PE without .linux) at the removable path is not a UKI.
    let disk = Disk::new(true, None);
    disk.mkdir(&["/EFI", "/EFI/BOOT"]);
    disk.put("/EFI/BOOT/BOOTX64.EFI", &std::fs::read(STUB).unwrap());
    let err = find_boot_entry(&disk.img, 512).unwrap_err();
    assert!(matches!(err, BootEntryError::NoEntry { .. }), "{err}");
    assert!(err.to_string().contains("no .linux section"), "{err}");
}

#[test]
fn ext4_entries_are_found_when_the_esp_has_none() {
    let mut tools = TOOLS.to_vec();
    tools.push("mkfs.ext4");
    if !have_tools("ext4_entries_are_found_when_the_esp_has_none", &tools) {
        return;
    }
    // A root filesystem holding /boot (Linux filesystem type): paths in the
    // entry are relative to /boot.
    let disk = Disk::new(true, Some("8300"));
    let kernel = random(40, 65_537);
    let initrd = random(41, 3_000);
    disk.ext4(&[
        (
            "/boot/loader/entries/tenant.conf",
            b"title Tenant on ext4\nlinux /vmlinuz-6.1\ninitrd /initrd.img-6.1\noptions root=/dev/sda2\n",
        ),
        ("/boot/vmlinuz-6.1", &kernel),
        ("/boot/initrd.img-6.1", &initrd),
    ]);
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert_eq!(entry.source, EntrySource::Ext4Bls);
    assert_eq!(entry.partition, 2);
    assert_eq!(entry.path, "/boot/loader/entries/tenant.conf");
    assert!(entry.kernel == kernel);
    assert!(entry.initrd == initrd);
    assert_eq!(entry.cmdline, "root=/dev/sda2");

    // An XBOOTLDR partition: entries at its root, paths from its root.
    let disk = Disk::new(true, Some("ea00"));
    disk.ext4(&[
        ("/loader/entries/x.conf", b"title X\nlinux /vmlinuz\n"),
        ("/vmlinuz", &kernel),
    ]);
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert_eq!(entry.source, EntrySource::Ext4Bls);
    assert_eq!(entry.title, "X");
    assert!(entry.kernel == kernel);
    assert!(entry.initrd.is_empty());
    assert_eq!(entry.cmdline, "");
}

// ---------------------------------------------------------------- broken disks

#[test]
fn a_disk_without_gpt_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("blank.img");
    File::create(&img).unwrap().set_len(8 * MIB).unwrap();
    let err = find_boot_entry(&img, 512).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, BootEntryError::Gpt(gpt::GptError::NoGpt { .. })),
        "{text}"
    );
    assert!(
        text.contains("blank.img") && text.contains("no usable GPT"),
        "{text}"
    );
    let err = find_boot_entry(&dir.path().join("absent.img"), 512).unwrap_err();
    assert!(err.to_string().contains("absent.img"), "{err}");
}

#[test]
fn a_corrupt_primary_header_is_read_from_the_backup() {
    if !have_tools("a_corrupt_primary_header_is_read_from_the_backup", TOOLS) {
        return;
    }
    let disk = Disk::new(true, None);
    disk.mkdir(&["/loader", "/loader/entries"]);
    disk.put("/k", &random(50, 2000));
    disk.put("/loader/entries/t.conf", b"linux /k\noptions a=b\n");
    // Flip a byte of the disk GUID inside the primary header (LBA 1).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk.img)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 512 + 60).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], 512 + 60).unwrap();

    let table = read_gpt(&mut File::open(&disk.img).unwrap(), "disk.img", 512).unwrap();
    assert_eq!(table.header, HeaderCopy::Backup);
    assert!(table.primary_problem.as_deref().unwrap().contains("CRC32"));
    let entry = find_boot_entry(&disk.img, 512).unwrap();
    assert!(entry.kernel == random(50, 2000));
    assert_eq!(entry.cmdline, "a=b");
}

#[test]
fn a_disk_without_esp_is_a_clear_error() {
    if !have_tools("a_disk_without_esp_is_a_clear_error", TOOLS) {
        return;
    }
    // A Linux partition that holds no filesystem at all.
    let disk = Disk::new(false, Some("8300"));
    let err = find_boot_entry(&disk.img, 512).unwrap_err();
    assert!(matches!(err, BootEntryError::NoEsp { .. }), "{err}");
    assert!(err.to_string().contains("no EFI System Partition"), "{err}");
    assert!(err.to_string().contains("disk.img"), "{err}");
}

#[test]
fn an_entry_naming_a_missing_kernel_is_an_error_naming_the_path() {
    if !have_tools(
        "an_entry_naming_a_missing_kernel_is_an_error_naming_the_path",
        TOOLS,
    ) {
        return;
    }
    let disk = Disk::new(true, None);
    disk.mkdir(&["/loader", "/loader/entries"]);
    // The default entry is broken; a lower one is fine — and is NOT used.
    disk.put("/k-old", &random(60, 100));
    disk.put("/loader/entries/a-old.conf", b"sort-key z\nlinux /k-old\n");
    disk.put(
        "/loader/entries/b-new.conf",
        b"sort-key a\nlinux /vmlinuz-missing\n",
    );
    let err = find_boot_entry(&disk.img, 512).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BootEntryError::EntryFile { .. }), "{text}");
    assert!(text.contains("/vmlinuz-missing"), "{text}");
    assert!(text.contains("/loader/entries/b-new.conf"), "{text}");
    assert!(text.contains("partition 1"), "{text}");

    // A missing initrd, likewise.
    disk.put(
        "/loader/entries/b-new.conf",
        b"sort-key a\nlinux /k-old\ninitrd /initrd-missing\n",
    );
    let text = find_boot_entry(&disk.img, 512).unwrap_err().to_string();
    assert!(text.contains("/initrd-missing"), "{text}");

    // An ESP with nothing bootable: every place looked is named.
    let disk = Disk::new(true, None);
    let text = find_boot_entry(&disk.img, 512).unwrap_err().to_string();
    assert!(text.contains("no /loader/entries"), "{text}");
    assert!(text.contains("BOOTX64.EFI"), "{text}");
}

// ---------------------------------------------------------------- EFI boot option

fn target() -> BootTarget {
    BootTarget {
        partition_number: 1,
        start_lba: 2048,
        size_lba: 65536,
        partition_guid: Guid {
            data1: 0x0011_2233,
            data2: 0x4455,
            data3: 0x6677,
            data4: [0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
        },
        file: "\\EFI\\BOOT\\BOOTX64.EFI".to_owned(),
    }
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain([0])
        .flat_map(|u| u.to_le_bytes())
        .collect()
}

#[test]
fn load_option_bytes_are_exact() {
    let t = target();
    let mut expected: Vec<u8> = Vec::new();
    // Attributes: LOAD_OPTION_ACTIVE.
    expected.extend([0x01, 0x00, 0x00, 0x00]);
    // FilePathListLength: HD 42 + File (4 + (21 chars + NUL) × 2 = 48) + End 4 = 94.
    expected.extend([94, 0x00]);
    expected.extend(utf16z("Warden tenant disk"));
    // HD(1, GPT, guid, 0x800, 0x10000).
    expected.extend([0x04, 0x01, 42, 0x00]);
    expected.extend([1, 0, 0, 0]);
    expected.extend([0x00, 0x08, 0, 0, 0, 0, 0, 0]);
    expected.extend([0x00, 0x00, 0x01, 0, 0, 0, 0, 0]);
    expected.extend([
        0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ]);
    expected.extend([0x02, 0x02]);
    // File(\EFI\BOOT\BOOTX64.EFI).
    expected.extend([0x04, 0x04, 48, 0x00]);
    expected.extend(utf16z("\\EFI\\BOOT\\BOOTX64.EFI"));
    // End of entire device path.
    expected.extend([0x7f, 0xff, 0x04, 0x00]);

    let bytes = load_option("Warden tenant disk", &t);
    assert_eq!(bytes, expected);

    // And the protocol crate's decoder reads it back as firmware would print it.
    let option = parse_load_option(&bytes).unwrap();
    assert!(option.is_active());
    assert_eq!(option.description, "Warden tenant disk");
    assert!(option.optional_data.is_empty());
    assert_eq!(
        device_path_to_text(&option.file_path_list).unwrap(),
        "HD(1,GPT,00112233-4455-6677-8899-aabbccddeeff,0x800,0x10000)/\\EFI\\BOOT\\BOOTX64.EFI"
    );
    assert!(t.matches(&bytes));
    let mut other = t.clone();
    other.partition_guid.data1 ^= 1;
    assert!(!other.matches(&bytes));
    let mut inactive = bytes.clone();
    inactive[0] = 0;
    assert!(!t.matches(&inactive));
}

#[test]
fn boot_target_comes_from_the_real_esp() {
    if !have_tools("boot_target_comes_from_the_real_esp", TOOLS) {
        return;
    }
    let disk = Disk::new(true, None);
    let table = read_gpt(&mut File::open(&disk.img).unwrap(), "disk.img", 512).unwrap();
    let esp = table.esp().unwrap();
    let t = BootTarget::on(esp, handoff::REMOVABLE_PATH_X64);
    assert_eq!(
        (t.partition_number, t.start_lba, t.size_lba),
        (1, 2048, 65536)
    );
    // sgdisk prints the unique GUID the way Guid displays it.
    let out = Command::new("sgdisk")
        .args(["-i", "1"])
        .arg(&disk.img)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(info.contains(&t.partition_guid.to_string()), "{info}");
}

/// efivarfs file content: attributes u32 LE, then the value.
fn var_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-8be4df61-93ca-11d2-aa0d-00e098032b8c"))
}

#[test]
fn efivarfs_writer_adds_one_option_and_boot_next() {
    let dir = tempfile::tempdir().unwrap();
    // The firmware's own options: a PXE entry and one for another disk.
    let mut other_disk = target();
    other_disk.partition_guid.data1 = 0xdead_beef;
    std::fs::write(
        var_file(dir.path(), "Boot0000"),
        [&[7u8, 0, 0, 0][..], b"pxe"].concat(),
    )
    .unwrap();
    std::fs::write(
        var_file(dir.path(), "Boot0001"),
        [&[7u8, 0, 0, 0][..], &load_option("other", &other_disk)].concat(),
    )
    .unwrap();
    std::fs::write(
        var_file(dir.path(), "BootOrder"),
        [7u8, 0, 0, 0, 0, 0, 1, 0],
    )
    .unwrap();
    std::fs::write(var_file(dir.path(), "BootNext"), [7u8, 0, 0, 0, 9, 9]).unwrap();

    let mut vars = Efivarfs::new(dir.path());
    let t = target();
    let n = efivars::ensure_boot_option(&mut vars, &t).unwrap();
    assert_eq!(n, 2);
    let written = std::fs::read(var_file(dir.path(), "Boot0002")).unwrap();
    assert_eq!(written[..4], [0x07, 0, 0, 0]);
    assert_eq!(written[4..], load_option("Warden tenant disk", &t)[..]);
    efivars::set_boot_next(&mut vars, n).unwrap();
    assert_eq!(
        std::fs::read(var_file(dir.path(), "BootNext")).unwrap(),
        [0x07, 0, 0, 0, 0x02, 0x00]
    );
    // BootOrder untouched.
    assert_eq!(
        std::fs::read(var_file(dir.path(), "BootOrder")).unwrap(),
        [7u8, 0, 0, 0, 0, 0, 1, 0]
    );
    // Again: the option is found, nothing new is written.
    assert_eq!(efivars::ensure_boot_option(&mut vars, &t).unwrap(), 2);
    assert!(!var_file(dir.path(), "Boot0003").exists());
    assert_eq!(vars.read("Boot0002").unwrap().unwrap().0, 7);
}

#[derive(Default)]
struct RecordingPower(Vec<&'static str>);

impl Power for RecordingPower {
    fn sync(&mut self) {
        self.0.push("sync");
    }
    fn reboot(&mut self) -> Result<(), HandoffError> {
        self.0.push("reboot");
        Ok(())
    }
    fn poweroff(&mut self) -> Result<(), HandoffError> {
        self.0.push("poweroff");
        Ok(())
    }
}

fn cleared() -> handoff::Cleared {
    guard(&PlanOutcome {
        steps: vec![StepOutcome {
            name: "image".into(),
            ok: true,
        }],
        last_verdict_ok: Some(true),
    })
    .unwrap()
}

#[test]
fn reboot_modes_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = Efivarfs::new(dir.path());
    let ok = cleared();

    let mut power = RecordingPower::default();
    let n = reboot_handoff(
        &ok,
        RebootMode::RebootToDisk,
        Some(&target()),
        &mut vars,
        &mut power,
    )
    .unwrap();
    assert_eq!(n, Some(0));
    assert_eq!(power.0, ["sync", "reboot"]);
    assert_eq!(
        std::fs::read(var_file(dir.path(), "BootNext")).unwrap(),
        [7, 0, 0, 0, 0, 0]
    );

    let empty = tempfile::tempdir().unwrap();
    let mut vars = Efivarfs::new(empty.path());
    let mut power = RecordingPower::default();
    assert_eq!(
        reboot_handoff(&ok, RebootMode::Reboot, None, &mut vars, &mut power).unwrap(),
        None
    );
    assert_eq!(power.0, ["sync", "reboot"]);
    let mut power = RecordingPower::default();
    reboot_handoff(&ok, RebootMode::Poweroff, None, &mut vars, &mut power).unwrap();
    assert_eq!(power.0, ["sync", "poweroff"]);
    assert_eq!(
        std::fs::read_dir(empty.path()).unwrap().count(),
        0,
        "plain modes write no variable"
    );

    // reboot-to-disk without a target does nothing at all.
    let mut power = RecordingPower::default();
    assert!(reboot_handoff(&ok, RebootMode::RebootToDisk, None, &mut vars, &mut power).is_err());
    assert!(power.0.is_empty());
}

// ---------------------------------------------------------------- kexec + measurement

#[derive(Default)]
struct Recorder {
    log: Vec<String>,
    extends: Vec<(u32, [u8; 32])>,
    fail_measure: bool,
}

struct RecMeasurer<'a>(&'a std::cell::RefCell<Recorder>);
struct RecKexec<'a>(&'a std::cell::RefCell<Recorder>);

impl Measurer for RecMeasurer<'_> {
    fn extend_sha256(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), TpmError> {
        let mut r = self.0.borrow_mut();
        r.log.push(format!("measure {pcr}"));
        if r.fail_measure {
            return Err(TpmError::Command {
                tcti: "recorder".into(),
                operation: "PCR_Extend(SHA-256)",
                reason: "injected".into(),
            });
        }
        r.extends.push((pcr, *digest));
        Ok(())
    }
}

impl Kexec for RecKexec<'_> {
    fn load(&mut self, kernel: &[u8], initrd: &[u8], cmdline: &str) -> Result<(), HandoffError> {
        self.0
            .borrow_mut()
            .log
            .push(format!("load {} {} {cmdline}", kernel.len(), initrd.len()));
        Ok(())
    }
    fn unload(&mut self) -> Result<(), HandoffError> {
        self.0.borrow_mut().log.push("unload".into());
        Ok(())
    }
    fn sync(&mut self) {
        self.0.borrow_mut().log.push("sync".into());
    }
    fn exec(&mut self) -> Result<(), HandoffError> {
        self.0.borrow_mut().log.push("exec".into());
        Ok(())
    }
}

/// What the recorder sees for [`sample_entry`]'s handoff: one load, the
/// three extends, sync, exec.
const LOADED_MEASURED_STARTED: [&str; 6] = [
    "load 5000 3000 console=ttyS0 warden.lease=L-1",
    "measure 13",
    "measure 13",
    "measure 13",
    "sync",
    "exec",
];

fn sample_entry() -> handoff::BootEntry {
    handoff::BootEntry {
        source: EntrySource::EspBls,
        partition: 1,
        path: "/loader/entries/t.conf".into(),
        title: "T".into(),
        kernel: random(70, 5000),
        initrd: random(71, 3000),
        cmdline: "console=ttyS0 warden.lease=L-1".into(),
    }
}

#[test]
fn kexec_loads_then_measures_then_execs() {
    let rec = std::cell::RefCell::new(Recorder::default());
    let entry = sample_entry();
    let events = kexec_handoff(
        &cleared(),
        &entry,
        &mut RecMeasurer(&rec),
        &mut RecKexec(&rec),
    )
    .unwrap();
    let r = rec.borrow();
    assert_eq!(r.log, LOADED_MEASURED_STARTED);
    let d = entry.digests();
    assert_eq!(
        r.extends,
        [
            (HANDOFF_PCR, d.kernel),
            (HANDOFF_PCR, d.initrd),
            (HANDOFF_PCR, d.cmdline)
        ]
    );
    assert_eq!(d.kernel, <[u8; 32]>::from(Sha256::digest(&entry.kernel)));
    assert_eq!(
        d.cmdline,
        <[u8; 32]>::from(Sha256::digest(entry.cmdline.as_bytes()))
    );
    // The recorded extends fold to expected_pcr.
    let folded = r.extends.iter().fold([0u8; 32], |pcr, (_, d)| {
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(d);
        h.finalize().into()
    });
    assert_eq!(folded, expected_pcr(&d, [0; 32]));
    assert_eq!(events.len(), 3);
    assert!(events[0]
        .description
        .starts_with("warden-handoff-kernel esp-bls partition 1"));
}

#[test]
fn a_failed_measurement_unloads_and_never_execs() {
    let rec = std::cell::RefCell::new(Recorder {
        fail_measure: true,
        ..Recorder::default()
    });
    let err = kexec_handoff(
        &cleared(),
        &sample_entry(),
        &mut RecMeasurer(&rec),
        &mut RecKexec(&rec),
    )
    .unwrap_err();
    assert!(err.to_string().contains("PCR 13"), "{err}");
    let log = &rec.borrow().log;
    assert_eq!(log[1..], ["measure 13", "unload"]);
    assert!(!log.iter().any(|l| l == "exec"));
}

#[test]
fn a_preloaded_image_is_measured_and_started_without_a_second_load() {
    let rec = std::cell::RefCell::new(Recorder::default());
    let entry = sample_entry();
    handoff::kexec_preload(&entry, &mut RecKexec(&rec)).unwrap();
    assert_eq!(
        rec.borrow().log,
        ["load 5000 3000 console=ttyS0 warden.lease=L-1"],
        "staging only loads: nothing is measured or started"
    );
    let events = handoff::kexec_handoff_preloaded(
        &cleared(),
        &entry,
        &mut RecMeasurer(&rec),
        &mut RecKexec(&rec),
    )
    .unwrap();
    assert_eq!(rec.borrow().log, LOADED_MEASURED_STARTED);
    assert_eq!(events.len(), 3);
    // A failed measurement unloads the staged image too.
    let rec = std::cell::RefCell::new(Recorder {
        fail_measure: true,
        ..Recorder::default()
    });
    handoff::kexec_preload(&entry, &mut RecKexec(&rec)).unwrap();
    handoff::kexec_handoff_preloaded(
        &cleared(),
        &entry,
        &mut RecMeasurer(&rec),
        &mut RecKexec(&rec),
    )
    .unwrap_err();
    assert_eq!(rec.borrow().log[1..], ["measure 13", "unload"]);
}

#[test]
fn the_guard_refuses_failed_plans() {
    let err = guard(&PlanOutcome {
        steps: vec![
            StepOutcome {
                name: "wipe".into(),
                ok: false,
            },
            StepOutcome {
                name: "image".into(),
                ok: true,
            },
        ],
        last_verdict_ok: Some(true),
    })
    .unwrap_err();
    assert!(err.to_string().contains("wipe"), "{err}");
    assert!(guard(&PlanOutcome {
        steps: vec![],
        last_verdict_ok: Some(false)
    })
    .is_err());
}

#[test]
fn real_tpm_handoff_pcr_equals_expected_pcr() {
    let swtpm = swtpm::Swtpm::start_with(swtpm::Provision::NoEkCertificate);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let before = tpm.pcr_bank_sha256().unwrap();
    let entry = sample_entry();
    let rec = std::cell::RefCell::new(Recorder::default());
    kexec_handoff(&cleared(), &entry, &mut tpm, &mut RecKexec(&rec)).unwrap();
    let after = tpm.pcr_bank_sha256().unwrap();
    assert_eq!(
        after[&HANDOFF_PCR],
        expected_pcr(&entry.digests(), before[&HANDOFF_PCR])
    );
    assert_eq!(
        before[&HANDOFF_PCR], [0; 32],
        "nothing else extends PCR 13 here"
    );
    for (pcr, value) in &before {
        if *pcr != HANDOFF_PCR {
            assert_eq!(after[pcr], *value, "PCR {pcr} changed");
        }
    }
}

#[test]
fn the_lease_record_lands_in_the_warden_config_partition_only() {
    if !have_tools("lease", TOOLS) {
        return;
    }
    let disk = Disk::new(true, Some("8300"));
    // Without a warden-config partition nothing is written.
    let before = std::fs::read(&disk.img).unwrap();
    assert_eq!(
        handoff::lease::write_lease(&disk.img, 512, "L1").unwrap(),
        None
    );
    assert!(std::fs::read(&disk.img).unwrap() == before);

    run(Command::new("sgdisk")
        .args(["-c", "2:warden-config"])
        .arg(&disk.img));
    let before = std::fs::read(&disk.img).unwrap();
    assert_eq!(
        handoff::lease::write_lease(&disk.img, 512, "lease-7:a.b").unwrap(),
        Some(2)
    );
    let after = std::fs::read(&disk.img).unwrap();
    let at = usize::try_from(disk.linux_offset).unwrap();
    let rec = handoff::lease::RECORD_BYTES;
    assert_eq!(&after[at..at + 18], b"lease=lease-7:a.b\n");
    assert!(after[at + 18..at + rec].iter().all(|&b| b == 0));
    // Every other byte is as it was.
    assert!(after[..at] == before[..at] && after[at + rec..] == before[at + rec..]);
}
