//! Test support: one real swtpm per test, on its own loopback ports and its
//! own state directory, killed (by PID) when the handle drops. Tests using it
//! can run in parallel.
//!
//! Include it with `#[path = "common/swtpm.rs"] mod swtpm;`. It never touches
//! a TPM other than the one it started, and never fakes one: if swtpm is not
//! installed, it panics with a message saying so (the tier must not pass
//! silently).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the TPM's state is manufactured before swtpm starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provision {
    /// Like a real TPM: SHA-256 bank, RSA-2048 and ECC EKs with certificates
    /// signed by swtpm-localca (EK certs at NV 0x01c00002 and, in swtpm 0.7,
    /// 0x01c00016 for ECC P-384), and a platform certificate.
    EkCertificates,
    /// SHA-256 bank, but no EK and no certificates in NV.
    NoEkCertificate,
    /// Only a SHA-1 PCR bank allocated.
    Sha1BankOnly,
}

/// A running swtpm, listening on `127.0.0.1:port` (TPM commands) and
/// `port + 1` (control channel) — the layout the `swtpm:` TCTI expects.
pub struct Swtpm {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// A swtpm provisioned like a real TPM ([`Provision::EkCertificates`]).
    pub fn start() -> Swtpm {
        Swtpm::start_with(Provision::EkCertificates)
    }

    pub fn start_with(provision: Provision) -> Swtpm {
        let dir = tempfile::tempdir().expect("tempdir for swtpm");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        manufacture(&state, dir.path(), provision);

        // The ports are free when we look but not reserved: another test may
        // take one before swtpm binds it. swtpm then exits, and we try again.
        let mut last_failure = String::new();
        for attempt in 0..8 {
            let port = free_port_pair();
            let log_path = dir.path().join(format!("swtpm-{attempt}.log"));
            let mut child = spawn_swtpm(&state, port, &log_path);
            match wait_ready(&mut child, port) {
                Ok(()) => return Swtpm { child, port, dir },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    last_failure = format!("{why}; swtpm output: {log}");
                }
            }
        }
        panic!("swtpm did not start after 8 attempts: {last_failure}");
    }

    /// The TCTI string for [`warden_agent::tpm::Tpm::open`].
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        // Our own child, by PID; SIGKILL is fine, the state is a tempdir.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "{name} is not installed: this test needs a real swtpm (apt-get install swtpm swtpm-tools)"
    );
}

fn manufacture(state: &Path, scratch: &Path, provision: Provision) {
    let mut command = Command::new(require_tool("swtpm_setup"));
    command.args(["--tpm2", "--tpmstate"]).arg(state);
    match provision {
        Provision::EkCertificates => {
            command.args([
                "--createek",
                "--create-ek-cert",
                "--create-platform-cert",
                "--pcr-banks",
                "sha256",
            ]);
        }
        Provision::NoEkCertificate => {
            command.args(["--pcr-banks", "sha256"]);
        }
        Provision::Sha1BankOnly => {
            command.args(["--pcr-banks", "sha1"]);
        }
    }
    // As root, swtpm_setup reads /etc/swtpm_setup.conf by itself; name it
    // anyway so a non-root run does not go looking in ~/.config.
    if Path::new("/etc/swtpm_setup.conf").exists() {
        command.args(["--config", "/etc/swtpm_setup.conf"]);
    }
    // swtpm_setup writes temporary certificate files under TMPDIR.
    command.env("TMPDIR", scratch);
    let output = command.output().expect("run swtpm_setup");
    assert!(
        output.status.success(),
        "swtpm_setup {:?} failed ({}): {}{}",
        provision,
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn spawn_swtpm(state: &Path, port: u16, log_path: &Path) -> Child {
    let state = state.canonicalize().unwrap();
    let log = File::create(log_path).unwrap();
    Command::new(require_tool("swtpm"))
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn swtpm")
}

/// A port P such that P and P + 1 were both free a moment ago.
fn free_port_pair() -> u16 {
    loop {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return port;
        }
    }
}

/// Waits until swtpm answers CMD_GET_CAPABILITY on its control port and
/// accepts on its TPM port, or exits. The deadline only stops a hung test.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("swtpm exited with {status} (port {port} taken?)"));
        }
        if control_answers(port + 1) && TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "swtpm not answering on ports {port}/{} after 30 s",
                port + 1
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// swtpm control channel: CMD_GET_CAPABILITY (1) → 4-byte result (0 = OK)
/// and a 4-byte capability mask.
fn control_answers(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reply = [0u8; 8];
    stream.write_all(&1u32.to_be_bytes()).is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && reply[..4] == [0, 0, 0, 0]
}
