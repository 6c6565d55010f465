//! Builds small ramdisks from a fixture (a real dynamically linked binary as
//! the agent, a fake module tree and kernel) and checks contents and
//! byte-for-byte reproducibility.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

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
        "fake kernel",
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
    for name in ["initramfs.cpio.zst", "vmlinuz", "manifest.json"] {
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
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"fake kernel"))
    );
    let json: serde_json::Value =
        serde_json::from_slice(&read(out.path().join("manifest.json"))).unwrap();
    assert_eq!(json["kernel_version"], KVER);
    assert_eq!(json["initramfs"]["sha256"], manifest.initramfs.sha256);
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
