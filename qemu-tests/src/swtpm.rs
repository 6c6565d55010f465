//! A software TPM per test: fresh state with EK certificates signed by
//! swtpm-localca (the "manufacturer" CA a test trusts), served either on a
//! unix control socket for QEMU or on loopback TCP for host-mode agents.
//!
//! It never reuses a TPM state between tests and never listens beyond
//! 127.0.0.1. All paths are absolute (swtpm resolves them after chdir; see
//! LAB.md).

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::process::{run_with_timeout, ChildGuard, POLL};

/// Where swtpm-localca keeps the CA that signs EK certificates
/// (`/etc/swtpm-localca.conf`); a test's server trusts these as the
/// TPM manufacturer.
pub const LOCALCA_DIR: &str = "/var/lib/swtpm-localca";

/// A new directory holding copies of swtpm-localca's CA *certificates*
/// (`issuercert.pem`, which signs EK certificates, and the root): what a
/// test's server is given as `--manufacturer-ca-dir`. Never the localca
/// directory itself, which also holds the CA's private keys. On a machine
/// where swtpm-localca has not issued anything yet, provisions a throwaway
/// TPM first so that the CA exists.
pub fn manufacturer_ca_dir() -> Result<TempDir> {
    let issuer = Path::new(LOCALCA_DIR).join("issuercert.pem");
    if !issuer.is_file() {
        let scratch = tempfile::tempdir().context("temp dir for a throwaway TPM")?;
        Swtpm::provision(scratch.path())?;
    }
    let dir = tempfile::Builder::new()
        .prefix("warden-ek-ca-")
        .tempdir()
        .context("temp dir for the manufacturer CAs")?;
    for name in ["issuercert.pem", "swtpm-localca-rootca-cert.pem"] {
        let from = Path::new(LOCALCA_DIR).join(name);
        std::fs::copy(&from, dir.path().join(name))
            .with_context(|| format!("copy {}", from.display()))?;
    }
    Ok(dir)
}

/// How the TPM is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwtpmTransport {
    /// `--ctrl type=unixio`: for QEMU's `-tpmdev emulator`.
    Unix,
    /// `--server type=tcp` + `--ctrl type=tcp` on 127.0.0.1: for the
    /// `swtpm:` TCTI of a host-mode agent.
    Tcp,
}

/// A running swtpm with its own freshly provisioned state.
#[derive(Debug)]
pub struct Swtpm {
    // Declared before `dir` so the process stops before its state is removed.
    child: ChildGuard,
    dir: TempDir,
    transport: SwtpmTransport,
    port: Option<u16>,
}

impl Swtpm {
    /// Provisions a fresh TPM 2.0 state (RSA + ECC EKs with certificates, a
    /// platform certificate, the SHA-256 PCR bank) into `state_dir`, which
    /// must be absolute and exist.
    pub fn provision(state_dir: &Path) -> Result<()> {
        if !state_dir.is_absolute() {
            bail!("swtpm state dir {} must be absolute", state_dir.display());
        }
        crate::require_program("swtpm_setup")?;
        let out = run_with_timeout(
            "swtpm_setup",
            Command::new("swtpm_setup")
                .args([
                    "--tpm2",
                    "--createek",
                    "--create-ek-cert",
                    "--create-platform-cert",
                    "--pcr-banks",
                    "sha256",
                    // Explicit, so a user's ~/.config/swtpm_setup.conf
                    // cannot change what tests get.
                    "--config",
                    "/etc/swtpm_setup.conf",
                    "--overwrite",
                    "--tpmstate",
                ])
                .arg(state_dir),
            Duration::from_secs(120),
        )?;
        if !out.status.success() {
            bail!(
                "swtpm_setup for {} failed ({}):\n{}{}",
                state_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Provisions a fresh TPM in a new temp dir and starts swtpm on it.
    pub fn start(transport: SwtpmTransport) -> Result<Swtpm> {
        crate::require_program("swtpm")?;
        let dir = tempfile::Builder::new()
            .prefix("warden-swtpm-")
            .tempdir()
            .context("temp dir for swtpm")?;
        let state = dir.path().join("tpm");
        std::fs::create_dir(&state).with_context(|| format!("create {}", state.display()))?;
        Self::provision(&state)?;
        match transport {
            SwtpmTransport::Unix => Self::start_unix(dir),
            SwtpmTransport::Tcp => Self::start_tcp(dir),
        }
    }

    /// Starts swtpm on a copy of an existing state directory (e.g. another
    /// swtpm's [`Swtpm::state_dir`] after it stopped): the same TPM — same
    /// seeds, EK and NV — powered on again, as after a reboot. Copying an
    /// older state rolls the TPM back, which is how tests forge a
    /// resetCount that goes backwards.
    pub fn start_from_state(transport: SwtpmTransport, state: &Path) -> Result<Swtpm> {
        crate::require_program("swtpm")?;
        let dir = tempfile::Builder::new()
            .prefix("warden-swtpm-")
            .tempdir()
            .context("temp dir for swtpm")?;
        let copy = dir.path().join("tpm");
        std::fs::create_dir(&copy).with_context(|| format!("create {}", copy.display()))?;
        for entry in
            std::fs::read_dir(state).with_context(|| format!("read {}", state.display()))?
        {
            let entry = entry?;
            // Sockets and lock files belong to the old process.
            if entry.file_type()?.is_file()
                && !entry.file_name().to_string_lossy().starts_with(".lock")
            {
                std::fs::copy(entry.path(), copy.join(entry.file_name()))
                    .with_context(|| format!("copy {}", entry.path().display()))?;
            }
        }
        match transport {
            SwtpmTransport::Unix => Self::start_unix(dir),
            SwtpmTransport::Tcp => Self::start_tcp(dir),
        }
    }

    fn base_command(dir: &Path) -> Result<Command> {
        let state = dir.join("tpm");
        let log = dir.join("swtpm.log");
        let out = std::fs::File::create(dir.join("swtpm.out"))
            .with_context(|| format!("create {}/swtpm.out", dir.display()))?;
        let err = out.try_clone().context("dup swtpm.out")?;
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--log")
            .arg(format!("file={},level=5", log.display()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        Ok(cmd)
    }

    fn start_unix(dir: TempDir) -> Result<Swtpm> {
        let sock = dir.path().join("tpm").join("sock");
        let mut cmd = Self::base_command(dir.path())?;
        cmd.arg("--ctrl")
            .arg(format!("type=unixio,path={}", sock.display()));
        let mut child = ChildGuard::spawn("swtpm", &mut cmd)?;
        wait_ready(&mut child, dir.path(), || sock.exists())?;
        Ok(Swtpm {
            child,
            dir,
            transport: SwtpmTransport::Unix,
            port: None,
        })
    }

    fn start_tcp(dir: TempDir) -> Result<Swtpm> {
        // Ports are picked by binding :0 and released for swtpm to take; a
        // race with another process is possible, so retry a few times.
        let mut last_err = anyhow!("no attempt made");
        for _ in 0..5 {
            let port = free_port_pair()?;
            let mut cmd = Self::base_command(dir.path())?;
            cmd.arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear");
            let mut child = ChildGuard::spawn("swtpm", &mut cmd)?;
            // Ready when both ports listen, seen in /proc/net/tcp rather than
            // by connecting: swtpm serves one client per port at a time and
            // stops listening while it does, so a probe connection could
            // make the caller's first connection fail.
            match wait_ready(&mut child, dir.path(), || {
                listening_on_loopback(port) && listening_on_loopback(port + 1)
            }) {
                Ok(()) => {
                    return Ok(Swtpm {
                        child,
                        dir,
                        transport: SwtpmTransport::Tcp,
                        port: Some(port),
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// swtpm's own stdout/stderr and log, for error messages.
    pub fn output(&self) -> String {
        output(self.dir.path())
    }

    /// The TPM state directory (absolute).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("tpm")
    }

    /// The unix control socket QEMU connects to (unix transport only).
    pub fn socket_path(&self) -> Option<PathBuf> {
        (self.transport == SwtpmTransport::Unix).then(|| self.state_dir().join("sock"))
    }

    /// The TCP data port (TCP transport only).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The tpm2-tss TCTI string, e.g. `swtpm:host=127.0.0.1,port=P` (TCP only).
    pub fn tcti(&self) -> Option<String> {
        self.port.map(|p| format!("swtpm:host=127.0.0.1,port={p}"))
    }

    /// swtpm's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether swtpm is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops swtpm now (SIGTERM, then SIGKILL); drop does the same.
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Copies swtpm's logs into `dest` (a failed test's log directory).
    pub fn keep_logs(&self, dest: &Path) {
        for name in ["swtpm.out", "swtpm.log"] {
            let _ = std::fs::copy(self.dir.path().join(name), dest.join(name));
        }
    }
}

/// Waits until `ready()` holds, failing early (with swtpm's output) if
/// swtpm exits.
fn wait_ready(child: &mut ChildGuard, dir: &Path, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "swtpm exited ({status}) before it was ready:\n{}",
                output(dir)
            );
        }
        if Instant::now() >= deadline {
            child.stop();
            bail!("swtpm not ready after 30 s:\n{}", output(dir));
        }
        std::thread::sleep(POLL);
    }
}

fn output(dir: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("{}{}", read("swtpm.out"), read("swtpm.log"))
}

/// Whether some socket listens on 127.0.0.1:`port` (`/proc/net/tcp`: local
/// address `0100007F:PORT` in hex, state `0A` = LISTEN).
fn listening_on_loopback(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1);
            let state = f.nth(1);
            local == Some(want.as_str()) && state == Some("0A")
        })
    })
}

/// A port P such that P and P+1 were both free on 127.0.0.1 a moment ago.
fn free_port_pair() -> Result<u16> {
    for _ in 0..50 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
        let p = a.local_addr().context("local_addr")?.port();
        if p < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)).is_ok() {
            return Ok(p);
        }
    }
    bail!("found no two adjacent free ports on 127.0.0.1")
}
