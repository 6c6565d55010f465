//! Builds small ramdisks from a fixture (a real dynamically linked binary as
//! the agent, a fake module tree, a minimal PE image as the kernel) and
//! checks contents, reference values and byte-for-byte reproducibility.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use warden_initramfs::reference::ReferenceValues;
use warden_initramfs::{build, busybox_anchor, cpio, Config};

const KVER: &str = "6.1.0-56-amd64";
// Real lines from Debian 12's modules.dep / modules.alias.
const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko:
";
const ALIAS: &str = "\
alias virtio:d00000002v* virtio_blk
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
";

/// A minimal PE32+ EFI application with a Linux setup header (`HdrS`,
/// protocol 2.15, like an x86-64 EFI-stub bzImage): headers (0x400 bytes,
/// no certificate table) and one 0x200-byte section. Built by hand so the expected
/// Authenticode digest can be spelled out independently of the library.
fn minimal_pe() -> Vec<u8> {
    let mut pe = vec![0u8; 0x600];
    let put16 =
        |pe: &mut Vec<u8>, at: usize, v: u16| pe[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |pe: &mut Vec<u8>, at: usize, v: u32| pe[at..at + 4].copy_from_slice(&v.to_le_bytes());
    pe[0..2].copy_from_slice(b"MZ");
    put32(&mut pe, 0x3c, 0x40); // e_lfanew
    pe[0x40..0x44].copy_from_slice(b"PE\0\0");
    let coff = 0x44;
    put16(&mut pe, coff, 0x8664); // x86-64
    put16(&mut pe, coff + 2, 1); // one section
    put16(&mut pe, coff + 16, 240); // PE32+ optional header with 16 directories
    put16(&mut pe, coff + 18, 0x0022); // executable, large-address aware
    let opt = coff + 20;
    put16(&mut pe, opt, 0x20b); // PE32+
    put32(&mut pe, opt + 16, 0x1000); // entry point
    put32(&mut pe, opt + 32, 0x1000); // section alignment
    put32(&mut pe, opt + 36, 0x200); // file alignment
    put32(&mut pe, opt + 56, 0x2000); // size of image
    put32(&mut pe, opt + 60, 0x400); // size of headers
    put32(&mut pe, opt + 64, 0x1234_5678); // checksum: not hashed
    put16(&mut pe, opt + 68, 10); // EFI application
    put32(&mut pe, opt + 108, 16); // number of data directories
    let sec = opt + 240;
    pe[sec..sec + 5].copy_from_slice(b".text");
    put32(&mut pe, sec + 8, 0x10); // virtual size
    put32(&mut pe, sec + 12, 0x1000); // virtual address
    put32(&mut pe, sec + 16, 0x200); // size of raw data
    put32(&mut pe, sec + 20, 0x400); // pointer to raw data
    pe[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut pe, 0x206, 0x020f); // boot protocol
    put32(&mut pe, 0x22c, 0x7fff_ffff); // initrd_addr_max
    pe[0x400..0x410].copy_from_slice(b"fake kernel code");
    pe
}

/// Authenticode SHA-256 of [`minimal_pe`], by the spec's recipe: all bytes
/// except the checksum (4) and the certificate-table directory entry (8).
fn minimal_pe_authenticode(pe: &[u8]) -> String {
    let opt = 0x44 + 20;
    let (checksum, cert_dir) = (opt + 64, opt + 112 + 4 * 8);
    let mut h = Sha256::new();
    h.update(&pe[..checksum]);
    h.update(&pe[checksum + 4..cert_dir]);
    h.update(&pe[cert_dir + 8..]);
    hex::encode(h.finalize())
}

struct Fixture {
    dir: tempfile::TempDir,
    agent: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mods = dir.path().join("modules").join(KVER);
    for line in DEP.lines() {
        let (rel, _) = line.split_once(':').unwrap();
        std::fs::create_dir_all(mods.join(rel).parent().unwrap()).unwrap();
        std::fs::write(mods.join(rel), format!("fake module {rel}")).unwrap();
    }
    std::fs::write(mods.join("modules.dep"), DEP).unwrap();
    std::fs::write(mods.join("modules.alias"), ALIAS).unwrap();
    std::fs::create_dir_all(dir.path().join("boot")).unwrap();
    std::fs::write(
        dir.path().join(format!("boot/vmlinuz-{KVER}")),
        minimal_pe(),
    )
    .unwrap();
    // Any dynamically linked program stands in for the agent.
    let agent = PathBuf::from("/usr/bin/true");
    assert!(agent.is_file(), "/usr/bin/true missing");
    Fixture { dir, agent }
}

fn config(fx: &Fixture, out: &Path) -> Config {
    let mut cfg = Config::new(fx.agent.clone(), KVER.into(), out.to_path_buf());
    cfg.modules_root = fx.dir.path().join("modules");
    cfg.boot_dir = fx.dir.path().join("boot");
    cfg.modules = vec!["virtio_blk".into()];
    cfg.dlopen = vec!["libtss2-tcti-device.so.0".into()];
    cfg.source_date_epoch = 1_700_000_000;
    cfg
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn two_builds_are_byte_identical() {
    let fx = fixture();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ma = build(&config(&fx, a.path())).unwrap();
    let mb = build(&config(&fx, b.path())).unwrap();
    assert_eq!(ma, mb);
    for name in [
        "initramfs.cpio.zst",
        "vmlinuz",
        "manifest.json",
        "reference-values.json",
    ] {
        assert_eq!(
            read(a.path().join(name)),
            read(b.path().join(name)),
            "{name} differs"
        );
    }
    // A different epoch is a different ramdisk: the mtime really is ours.
    let c = tempfile::tempdir().unwrap();
    let mut cfg = config(&fx, c.path());
    cfg.source_date_epoch = 0;
    build(&cfg).unwrap();
    assert_ne!(
        read(a.path().join("initramfs.cpio.zst")),
        read(c.path().join("initramfs.cpio.zst"))
    );
}

#[test]
fn contents_and_manifest_match() {
    let fx = fixture();
    let out = tempfile::tempdir().unwrap();
    let manifest = build(&config(&fx, out.path())).unwrap();
    let zst = read(out.path().join("initramfs.cpio.zst"));
    let raw = zstd::stream::decode_all(&zst[..]).unwrap();
    let entries = cpio::read(&raw).unwrap();
    let get = |p: &str| {
        entries
            .iter()
            .find(|e| e.name == p)
            .unwrap_or_else(|| panic!("{p} not in the cpio"))
    };

    let init = get("init");
    assert_eq!(init.mode, 0o100_755);
    assert_eq!(init.data, read(fx.agent.clone()));
    // The loader is shipped once, in the library dir, and PT_INTERP's path
    // links to it (as on Debian).
    let interp = get("lib64/ld-linux-x86-64.so.2");
    assert_eq!(interp.mode, 0o120_777);
    assert_eq!(interp.data, b"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
    assert_eq!(
        get("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").mode,
        0o100_755
    );
    let libc = get("lib/x86_64-linux-gnu/libc.so.6");
    assert_eq!(
        libc.data,
        read(std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap())
    );
    get("lib/x86_64-linux-gnu/libtss2-tcti-device.so.0");
    get("lib/x86_64-linux-gnu/libtss2-mu.so.0");
    let console = get("dev/console");
    assert_eq!(
        (console.mode, console.rdev_major, console.rdev_minor),
        (0o020_600, 5, 1)
    );
    let null = get("dev/null");
    assert_eq!((null.rdev_major, null.rdev_minor), (1, 3));
    for d in ["etc", "proc", "sys", "run", "tmp"] {
        assert_eq!(get(d).mode & 0o170_000, 0o040_000, "{d} is a directory");
    }

    let mods = format!("lib/modules/{KVER}");
    for m in ["virtio.ko", "virtio_ring.ko"] {
        get(&format!("{mods}/kernel/drivers/virtio/{m}"));
    }
    get(&format!("{mods}/kernel/drivers/block/virtio_blk.ko"));
    assert!(
        !entries.iter().any(|e| e.name.contains("e1000e")),
        "unrequested module shipped"
    );
    let dep = String::from_utf8(get(&format!("{mods}/modules.dep")).data.clone()).unwrap();
    assert_eq!(dep.lines().count(), 3);
    let alias = String::from_utf8(get(&format!("{mods}/modules.alias")).data.clone()).unwrap();
    assert_eq!(alias, "alias virtio:d00000002v* virtio_blk\n");
    assert_eq!(manifest.modules, ["virtio_ring", "virtio", "virtio_blk"]);
    // No softdeps in the fixture: an empty (but present) modules.softdep.
    assert!(get(&format!("{mods}/modules.softdep")).data.is_empty());

    // Sorted, sequential inodes, fixed mtime, root-owned.
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            (e.ino as usize, e.mtime, e.uid, e.gid),
            (i + 1, 1_700_000_000, 0, 0)
        );
    }

    // The manifest lists exactly the cpio, with matching digests.
    assert_eq!(manifest.files.len(), entries.len());
    for (m, e) in manifest.files.iter().zip(&entries) {
        assert_eq!(m.path, format!("/{}", e.name));
        assert_eq!(m.size, e.data.len() as u64);
        assert_eq!(
            m.sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&e.data))
        );
    }
    let init_m = manifest.files.iter().find(|f| f.path == "/init").unwrap();
    assert_eq!(init_m.origin, "/usr/bin/true");
    let dep_m = manifest
        .files
        .iter()
        .find(|f| f.path.ends_with("modules.dep"))
        .unwrap();
    assert_eq!(dep_m.origin, "generated");
    assert_eq!(
        manifest.initramfs.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&zst))
    );
    assert_eq!(
        manifest.vmlinuz.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(minimal_pe()))
    );
    let json: serde_json::Value =
        serde_json::from_slice(&read(out.path().join("manifest.json"))).unwrap();
    assert_eq!(json["kernel_version"], KVER);
    assert_eq!(json["initramfs"]["sha256"], manifest.initramfs.sha256);
}

#[test]
fn reference_values_describe_what_was_built() {
    let fx = fixture();
    let out = tempfile::tempdir().unwrap();
    let manifest = build(&config(&fx, out.path())).unwrap();
    let text = read(out.path().join("reference-values.json"));
    let refs: ReferenceValues = serde_json::from_slice(&text).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(json["format"], "warden-reference-values/1");
    assert_eq!(json["kernel"]["file"], "vmlinuz");
    assert_eq!(json["kernel"]["pcr"], 4);
    assert_eq!(
        json["kernel"]["event_type"],
        "EV_EFI_BOOT_SERVICES_APPLICATION"
    );
    assert_eq!(json["initrd"]["pcr"], 9);
    assert_eq!(json["initrd"]["tag"], "Linux initrd");
    assert_eq!(json["cmdline_rule"]["tag"], "LOADED_IMAGE::LoadOptions");
    assert_eq!(refs.kernel.sha256, manifest.vmlinuz.sha256);
    assert_eq!(
        refs.kernel.authenticode_sha256,
        minimal_pe_authenticode(&minimal_pe())
    );
    // The stub hashes the initrd's bytes: the file we wrote.
    let zst = read(out.path().join("initramfs.cpio.zst"));
    assert_eq!(refs.initrd.event_digest, hex::encode(Sha256::digest(&zst)));
    assert_eq!(refs.initrd.sha256, manifest.initramfs.sha256);
    // QEMU -kernel patches the setup header: another digest, for 1 GiB.
    let qemu = &refs.kernel.qemu_direct_boot;
    assert_eq!((qemu.machine.as_str(), qemu.memory_mib), ("q35", 1024));
    assert_ne!(qemu.authenticode_sha256, refs.kernel.authenticode_sha256);
    let patched = warden_initramfs::reference::qemu_direct_boot_image(
        "vmlinuz",
        &minimal_pe(),
        zst.len() as u64,
        1024,
    )
    .unwrap();
    assert_eq!(qemu.authenticode_sha256, minimal_pe_authenticode(&patched));
}

#[test]
fn a_kernel_that_is_not_pe_fails_the_build() {
    let fx = fixture();
    std::fs::write(
        fx.dir.path().join(format!("boot/vmlinuz-{KVER}")),
        "fake kernel",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = build(&config(&fx, out.path())).unwrap_err();
    assert!(err.to_string().contains("vmlinuz"), "{err}");
    assert!(!out.path().join("reference-values.json").exists());
}

#[test]
fn busybox_anchor_is_reproducible_and_powers_off() {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox missing: run scripts/setup (busybox-static)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a/anchor.cpio.zst"),
        dir.path().join("b.cpio.zst"),
    );
    let sha_a = busybox_anchor(busybox, 0, &a).unwrap();
    let sha_b = busybox_anchor(busybox, 0, &b).unwrap();
    assert_eq!(sha_a, sha_b);
    assert_eq!(read(a.clone()), read(b));
    let raw = zstd::stream::decode_all(&read(a)[..]).unwrap();
    let entries = cpio::read(&raw).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    for want in ["bin/busybox", "bin/sh", "dev/console", "dev/null", "init"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let init = entries.iter().find(|e| e.name == "init").unwrap();
    assert!(init.data.starts_with(b"#!/bin/sh\n"));
    assert!(String::from_utf8_lossy(&init.data).contains("/bin/busybox poweroff -f"));
    let sh = entries.iter().find(|e| e.name == "bin/sh").unwrap();
    assert_eq!((sh.mode, sh.data.as_slice()), (0o120_777, &b"busybox"[..]));
}
