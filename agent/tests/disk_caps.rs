//! Host tier of device capabilities: real loop devices over sparse files
//! (root needed), probed through the same code the node runs — sysfs,
//! /proc/self/mountinfo, /proc/swaps, the BLKSECDISCARD probe ioctl and the
//! exclusive-open check — and the in-use detection against real users of a
//! device: a filesystem mounted from it, swap on it, and a loop device
//! stacked on it. (Device-mapper holders need a kernel with dm, which these
//! hosts lack; the holder logic is covered by the fixture tests in
//! `disk::caps`.)
//!
//! Without root or losetup every test prints SKIPPED on stderr; with
//! `WARDEN_REQUIRE_QEMU=1` it fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use warden_agent::disk::{self, DeviceCaps, DiskOptions, InUse};
use warden_protocol::hello::Disk;

const MIB: u64 = 1 << 20;

fn skip(test: &str, why: &str) {
    if std::env::var("WARDEN_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{test}: cannot run and WARDEN_REQUIRE_QEMU=1: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// A loop device over `backing` (a sparse file we create, or another
/// device), detached by its own name on drop.
struct Loop {
    dev: String,
    _dir: Option<tempfile::TempDir>,
}

impl Loop {
    fn over(backing: &str, dir: Option<tempfile::TempDir>) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show", backing])
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f --show {backing}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _dir: dir,
        })
    }

    fn sparse(size: u64) -> Result<Loop, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("disk.img");
        fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        Loop::over(file.to_str().unwrap(), Some(dir))
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    /// The loop device as the inventory lists it.
    fn disk(&self) -> Disk {
        disk::list_disks(Path::new("/sys"), DiskOptions { include_loop: true })
            .unwrap()
            .into_iter()
            .find(|d| d.name == self.name())
            .unwrap_or_else(|| panic!("{} not in the inventory", self.dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A sparse-file loop device, or None after a loud skip.
fn loop_dev(test: &str, size: u64) -> Option<Loop> {
    if !nix::unistd::Uid::effective().is_root() {
        skip(test, "not root (loop devices need root)");
        return None;
    }
    match Loop::sparse(size) {
        Ok(l) => Some(l),
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn probe(l: &Loop) -> DeviceCaps {
    disk::probe(Path::new("/sys"), &l.disk())
}

#[test]
fn loop_device_capabilities() {
    let Some(l) = loop_dev("loop_device_capabilities", 64 * MIB) else {
        return;
    };
    let d = l.disk();
    assert_eq!(d.transport, "loop");
    let c = disk::probe(Path::new("/sys"), &d);
    eprintln!("{} caps: {c:#?}", l.dev);
    assert_eq!(c.name, l.name());
    assert_eq!(c.discard, d.discard_max_bytes > 0);
    assert_eq!(c.write_zeroes, d.write_zeroes_max_bytes > 0);
    // Loop devices punch holes, but nothing guarantees zeros to us.
    assert!(!c.zeroes_after_discard);
    assert!(
        c.zeroes_after_discard_basis.contains("loop") || !c.discard,
        "{}",
        c.zeroes_after_discard_basis
    );
    // The loop driver has no secure erase; a kernel >= 5.19 says so.
    let release = disk::ioctl::kernel_release();
    if disk::ioctl::kernel_at_least(&release, 5, 19) {
        assert_eq!(c.secure_discard, Some(false), "{}", c.secure_discard_basis);
    } else {
        assert_eq!(c.secure_discard, None);
    }
    assert!(c.in_use.is_empty(), "{:?}", c.in_use);
    assert!(c.in_use_reason().is_none());
    // No firmware erase on a loop device.
    assert!(c.hw.methods.is_empty());
    assert!(c.hw_error.is_none());
    assert!(disk::open_secure_erase(&d).unwrap().is_none());
}

#[test]
fn a_loop_stacked_on_the_device_makes_it_in_use() {
    let test = "a_loop_stacked_on_the_device_makes_it_in_use";
    let Some(lower) = loop_dev(test, 16 * MIB) else {
        return;
    };
    let upper = match Loop::over(&lower.dev, None) {
        Ok(u) => u,
        Err(why) => return skip(test, &why),
    };
    let c = probe(&lower);
    assert_eq!(
        c.in_use,
        vec![InUse::LoopBacking {
            device: lower.name().to_string(),
            loop_device: upper.name().to_string(),
        }]
    );
    let why = c.in_use_reason().unwrap();
    assert!(
        why.contains(&format!("backs loop device {}", upper.name())),
        "{why}"
    );
    // The upper device itself is free.
    assert!(probe(&upper).in_use.is_empty());
    drop(upper);
    // `losetup -d` returns before the kernel has released the backing
    // device (the detach completes when the last opener goes, and a busy
    // machine delays it): wait for the release, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let still = probe(&lower).in_use;
        if still.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in use 30 s after the upper loop was detached: {still:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Unmounts (by path) on drop.
struct Mounted(std::path::PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_mounted_filesystem_makes_the_device_in_use() {
    let test = "a_mounted_filesystem_makes_the_device_in_use";
    if !have("mkfs.ext2") {
        return skip(test, "mkfs.ext2 is not installed");
    }
    let Some(l) = loop_dev(test, 16 * MIB) else {
        return;
    };
    if let Err(why) = run(&["mkfs.ext2", "-q", "-F", &l.dev]) {
        return skip(test, &why);
    }
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = run(&["mount", &l.dev, dir.path().to_str().unwrap()]) {
        return skip(test, &why);
    }
    let guard = Mounted(dir.path().to_path_buf());
    let c = probe(&l);
    assert!(
        c.in_use.contains(&InUse::Mounted {
            device: l.name().to_string(),
            mount_point: dir.path().display().to_string(),
            fstype: "ext2".into(),
        }),
        "{:?}",
        c.in_use
    );
    assert!(c.in_use_reason().unwrap().contains("is mounted at"));
    drop(guard);
    let c = probe(&l);
    assert!(c.in_use.is_empty(), "{:?}", c.in_use);
}

/// Turns swap off (by path) on drop.
struct SwapOn(String);
impl Drop for SwapOn {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).status();
    }
}

#[test]
fn active_swap_makes_the_device_in_use() {
    let test = "active_swap_makes_the_device_in_use";
    if !have("mkswap") || !have("swapon") {
        return skip(test, "mkswap/swapon are not installed");
    }
    let Some(l) = loop_dev(test, 16 * MIB) else {
        return;
    };
    if let Err(why) = run(&["mkswap", &l.dev]) {
        return skip(test, &why);
    }
    // Lowest priority: the host should never prefer this swap.
    if let Err(why) = run(&["swapon", "-p", "0", &l.dev]) {
        return skip(test, &why);
    }
    let guard = SwapOn(l.dev.clone());
    let c = probe(&l);
    assert!(
        c.in_use.contains(&InUse::Swap {
            device: l.name().to_string(),
            path: l.dev.clone(),
        }),
        "{:?}",
        c.in_use
    );
    drop(guard);
    assert!(probe(&l).in_use.is_empty());
}
