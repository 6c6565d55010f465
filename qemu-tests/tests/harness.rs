//! Checks of the harness itself, with no Warden binaries and no Warden
//! ramdisk: swtpm life cycle, console waiting, sparse disks, and one QEMU
//! boot of a hand-made busybox initramfs through OVMF + swtpm. That boot
//! keeps `-kernel`: it checks the node plumbing with no Warden server to
//! network-boot from (netboot.rs checks `NodeBuilder::netboot`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;
use warden_qemu_tests::node::{create_sparse, BOOT_TIMEOUT};
use warden_qemu_tests::{
    prereq, require_program, ConsoleWatcher, DiskBus, NodeBuilder, QemuLock, Swtpm, SwtpmTransport,
};

fn process_gone(pid: u32) -> bool {
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), None) == Err(nix::errno::Errno::ESRCH)
}

#[test]
fn swtpm_unix_provisions_starts_and_stops() {
    let Some(_) = prereq("swtpm_unix", require_program("swtpm_setup")) else {
        return;
    };
    let tpm = Swtpm::start(SwtpmTransport::Unix).unwrap();
    let state = tpm.state_dir();
    assert!(state.is_absolute());
    // swtpm_setup wrote a permanent state with the EKs and their certificates.
    let permall = std::fs::metadata(state.join("tpm2-00.permall")).unwrap();
    assert!(
        permall.len() > 1000,
        "tpm2-00.permall is {} bytes",
        permall.len()
    );
    let sock = tpm.socket_path().unwrap();
    assert!(sock.exists(), "{}", sock.display());
    assert_eq!(tpm.tcti(), None);
    let pid = tpm.pid();
    assert!(!process_gone(pid));
    drop(tpm);
    assert!(process_gone(pid), "swtpm {pid} still running after drop");
    assert!(!state.exists(), "state dir {} not removed", state.display());
}

#[test]
fn swtpm_tcp_serves_on_loopback_and_stops() {
    let Some(_) = prereq("swtpm_tcp", require_program("swtpm_setup")) else {
        return;
    };
    let mut tpm = Swtpm::start(SwtpmTransport::Tcp).unwrap();
    let port = tpm.port().unwrap();
    assert_eq!(
        tpm.tcti().unwrap(),
        format!("swtpm:host=127.0.0.1,port={port}")
    );
    TcpStream::connect(("127.0.0.1", port)).unwrap();
    TcpStream::connect(("127.0.0.1", port + 1)).unwrap();
    assert!(tpm.is_running(), "{}", tpm.output());
    let pid = tpm.pid();
    drop(tpm);
    assert!(process_gone(pid), "swtpm {pid} still running after drop");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn console_wait_sees_appended_events_and_stops_on_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let writer_path = path.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(&writer_path).unwrap();
        for line in [
            "[    0.000000] Linux version 6.1.0\r\n",
            "WARDEN {\"event\":\"agent_start\",\"version\":\"0.1.0\",\"mode\":\"init\",\"pid\":1}\r\n",
            "[    1.2] random kernel noise\r\n",
            "WARDEN {\"event\":\"ready\",\"boot_ms\":1234}\r\n",
        ] {
            std::thread::sleep(Duration::from_millis(100));
            f.write_all(line.as_bytes()).unwrap();
            f.flush().unwrap();
        }
    });
    let mut w = ConsoleWatcher::new(&path);
    let ready = w
        .wait_for("ready", Duration::from_secs(30), || Ok(None))
        .unwrap();
    writer.join().unwrap();
    assert_eq!(ready["boot_ms"], 1234);
    let names: Vec<_> = w
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["agent_start", "ready"]);

    // A fatal event ends the wait at once, with the console tail in the error.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"WARDEN {\"event\":\"fatal\",\"error\":\"no TPM\",\"action\":\"halt\"}\r\n")
        .unwrap();
    let err = w
        .wait_for("hello_ok", Duration::from_secs(30), || Ok(None))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("fatal event while waiting for `hello_ok`"),
        "{msg}"
    );
    assert!(msg.contains("no TPM"), "{msg}");
    assert!(msg.contains("random kernel noise"), "{msg}");

    // The writer going away ends the wait too.
    let mut other = ConsoleWatcher::new(&dir.path().join("other.log"));
    let err = other
        .wait_for("never", Duration::from_secs(30), || {
            Ok(Some("QEMU exited (exit status: 0)".to_string()))
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("QEMU exited"), "{err:#}");

    // And a timeout says which event and file.
    let mut quiet = ConsoleWatcher::new(&dir.path().join("nothing.log"));
    let err = quiet
        .wait_for("ready", Duration::from_millis(200), || Ok(None))
        .unwrap_err();
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
}

#[test]
fn sparse_disks_take_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    create_sparse(&path, 2 << 30).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} blocks allocated",
        meta.blocks()
    );
}

/// A kernel to boot the self-test with: the built ramdisk's, else the host's
/// Debian kernel package.
fn any_kernel() -> anyhow::Result<PathBuf> {
    if let Ok(r) = warden_qemu_tests::ramdisk_dir() {
        return Ok(r.kernel);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow::anyhow!("no kernel in build/ramdisk or /boot (install linux-image-amd64)")
    })
}

/// Boots a busybox initramfs whose /init prints `WARDEN` lines about the
/// TPM and firmware event log it sees, then powers off: proves the node
/// plumbing (OVMF, swtpm, console capture, exit detection) without Warden.
#[test]
fn qemu_node_boots_busybox_through_ovmf_with_tpm() {
    let test = "qemu_node_self_test";
    let Some(kernel) = prereq(test, any_kernel()) else {
        return;
    };
    let Some(_) = prereq(test, require_program("qemu-system-x86_64")) else {
        return;
    };
    let Some(_) = prereq(test, require_program("busybox")) else {
        return;
    };
    let _lock = QemuLock::acquire().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("selftest.cpio");
    warden_qemu_tests::cpio::busybox_initramfs(
        &initrd,
        r#"B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t securityfs securityfs /sys/kernel/security
log=/sys/kernel/security/tpm0/binary_bios_measurements
bytes=$($B cat $log 2>/dev/null | $B wc -c)
tpm=false; [ -e /sys/class/tpm/tpm0 ] && tpm=true
echo "WARDEN {\"event\":\"selftest\",\"tpm\":$tpm,\"event_log_bytes\":$bytes}"
echo "WARDEN {\"event\":\"ready\",\"boot_ms\":0}"
$B poweroff -f"#,
    )
    .unwrap();

    let mut node = NodeBuilder::new("selftest")
        .kernel(&kernel, &initrd, "quiet panic=-1")
        .memory_mib(512)
        .disk(DiskBus::VirtioBlk, 1 << 30)
        .disk(DiskBus::Nvme, 2 << 30)
        .start()
        .unwrap();
    let st = node.wait_for_event("selftest", BOOT_TIMEOUT).unwrap();
    assert_eq!(st["tpm"], true, "{st}");
    assert!(st["event_log_bytes"].as_u64().unwrap() > 0, "{st}");
    node.wait_for_event("ready", Duration::from_secs(30))
        .unwrap();
    let status = node.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "QEMU exit status {status}");
    assert!(node.console_text().contains("reboot: Power down"));
    assert_eq!(node.disk_paths().len(), 2);
    let pid = node.qemu_pid();
    drop(node);
    assert!(process_gone(pid));
}
