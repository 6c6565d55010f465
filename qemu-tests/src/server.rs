//! The real `warden-attest-server` on 127.0.0.1 (or on a bridge inside a
//! network namespace the test created) with a fresh data directory, and the
//! real `wardenctl` pointed at it.
//!
//! It learns the server's CA pin and port only from what the server prints
//! (`ca-fingerprint: sha256:HEX`, `listening: https://127.0.0.1:PORT`); it
//! never computes them itself, so a test checks the server's own word.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use warden_protocol::nodes::NodeList;

use crate::process::{run_with_timeout, ChildGuard, POLL};

/// How long the server may take to print its two start-up lines.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running attestation server.
#[derive(Debug)]
pub struct Server {
    // Declared first: the process stops before its data dir is removed.
    child: ChildGuard,
    dir: TempDir,
    port: u16,
    ca_pin: String,
    admin_token_file: PathBuf,
    /// The manufacturer-CA directory handed to the server, kept alive with it.
    cas: Option<TempDir>,
    /// The plain-HTTP port of `/boot/`, when network boot is on.
    boot_port: Option<u16>,
    /// The extra arguments it was started with ([`Server::start_again`]
    /// repeats them).
    extra: Vec<OsString>,
    /// `None`: on the host's 127.0.0.1. Else the network namespace it runs
    /// in and the address it listens on there
    /// ([`Server::start_netboot_in_netns`]); `wardenctl` runs there too.
    netns: Option<(String, Ipv4Addr)>,
}

impl Server {
    /// Starts `warden-attest-server --data-dir DIR --listen 127.0.0.1:0`.
    pub fn start() -> Result<Server> {
        Self::start_with_args(&[])
    }

    /// Starts a server that trusts swtpm-localca as the TPM manufacturer
    /// (`--manufacturer-ca-dir` with copies of its CA certificates), so the
    /// EKs of the harness's swtpms enroll.
    pub fn start_trusting_swtpm() -> Result<Server> {
        let cas = crate::swtpm::manufacturer_ca_dir()?;
        let mut server =
            Self::start_with_args(&[OsString::from("--manufacturer-ca-dir"), cas.path().into()])?;
        server.cas = Some(cas);
        Ok(server)
    }

    /// [`Server::start_trusting_swtpm`] that also serves network boot
    /// (`/boot/` on a plain-HTTP port, files from the built ramdisk, the API
    /// named `https://10.0.2.2:PORT` on the command line, `?extra=` allowed),
    /// plus `extra` arguments.
    pub fn start_netboot(extra: &[OsString]) -> Result<Server> {
        Self::start_netboot_from(&crate::paths::ramdisk_dir()?.dir, extra)
    }

    /// [`Server::start_netboot`] serving the ramdisk in `boot_dir` (its
    /// `vmlinuz` and `initramfs.cpio.zst`) instead of the build's: a test
    /// that boots a changed ramdisk changes a copy. The server reads the
    /// files when it starts ([`Server::start_again`] reads them afresh).
    pub fn start_netboot_from(boot_dir: &Path, extra: &[OsString]) -> Result<Server> {
        let cas = crate::swtpm::manufacturer_ca_dir()?;
        let mut args = netboot_args_for(boot_dir);
        args.extend([OsString::from("--manufacturer-ca-dir"), cas.path().into()]);
        args.extend(extra.iter().cloned());
        let mut server = Self::start_with_args(&args)?;
        server.cas = Some(cas);
        Ok(server)
    }

    /// The iPXE script URL a QEMU guest on user networking boots
    /// (`script`: `warden.ipxe` or `warden-kernel.ipxe`), with `extra`
    /// kernel arguments appended to the server's command line.
    pub fn guest_boot_url(&self, script: &str, extra: &str) -> Result<String> {
        let port = self
            .boot_port
            .context("this server does not serve /boot/ (start it with Server::start_netboot)")?;
        let mut url = format!("http://10.0.2.2:{port}/boot/{script}");
        if !extra.trim().is_empty() {
            url.push_str("?extra=");
            url.push_str(&extra.trim().replace('%', "%25").replace(' ', "%20"));
        }
        if url.len() > 127 {
            bail!(
                "boot URL {url} is {} bytes; QEMU's DHCP boot-file field holds 127 \
                 (put lasting arguments in the server's --boot-cmdline)",
                url.len()
            );
        }
        Ok(url)
    }

    /// `http://127.0.0.1:PORT/boot/`, as seen from the host (from inside
    /// the namespace, `http://ADDR:PORT/boot/`, for a server started with
    /// [`Server::start_netboot_in_netns`]).
    pub fn boot_url(&self) -> Option<String> {
        let host = self.host();
        self.boot_port.map(|p| format!("http://{host}:{p}/boot/"))
    }

    /// [`Server::start_netboot`] inside network namespace `netns` (e.g. a
    /// [`crate::netns::NetNs`]), run there with `ip netns exec`: the API
    /// and `/boot/` listen on `addr` (in the certificate with `--san`), and
    /// the boot command line names `https://ADDR:PORT`, as a node on that
    /// network reaches it. `wardenctl` and [`Server::url`] then work from
    /// inside the namespace.
    pub fn start_netboot_in_netns(
        netns: &str,
        addr: Ipv4Addr,
        extra: &[OsString],
    ) -> Result<Server> {
        let cas = crate::swtpm::manufacturer_ca_dir()?;
        let ramdisk = crate::paths::ramdisk_dir()?;
        let mut args: Vec<OsString> = vec![
            "--san".into(),
            addr.to_string().into(),
            "--boot-dir".into(),
            ramdisk.dir.into(),
            "--boot-listen".into(),
            format!("{addr}:0").into(),
            "--boot-server-host".into(),
            addr.to_string().into(),
            "--manufacturer-ca-dir".into(),
            cas.path().into(),
        ];
        args.extend(extra.iter().cloned());
        let mut server = Self::spawn_in(Some((netns.to_string(), addr)), &args)?;
        server.cas = Some(cas);
        Ok(server)
    }

    /// Like [`Server::start`], with extra command-line arguments.
    pub fn start_with_args(extra: &[OsString]) -> Result<Server> {
        Self::spawn_in(None, extra)
    }

    /// Starts the server on 127.0.0.1:0, or inside `netns` on its address.
    fn spawn_in(netns: Option<(String, Ipv4Addr)>, extra: &[OsString]) -> Result<Server> {
        let bin = crate::target_bin("warden-attest-server")?;
        let dir = tempfile::Builder::new()
            .prefix("warden-server-")
            .tempdir()
            .context("temp dir for the server")?;
        // Not created here: the server creates its data dir itself (0700).
        let data = dir.path().join("data");
        let stdout_path = dir.path().join("server.stdout");
        let stderr_path = dir.path().join("server.stderr");
        let stdout = std::fs::File::create(&stdout_path)
            .with_context(|| format!("create {}", stdout_path.display()))?;
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let mut cmd = command_in(netns.as_ref(), &bin);
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(format!("{}:0", host_of(netns.as_ref())))
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let mut child = ChildGuard::spawn("warden-attest-server", &mut cmd)?;

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = std::fs::read_to_string(&stdout_path).unwrap_or_default();
            let startup = parse_startup(&out);
            if let (Some(ca_pin), Some(port)) = (startup.ca_pin, startup.port) {
                let admin_token_file = startup
                    .admin_token_file
                    .unwrap_or_else(|| data.join("admin.token"));
                return Ok(Server {
                    child,
                    dir,
                    port,
                    ca_pin,
                    admin_token_file,
                    cas: None,
                    boot_port: startup.boot_port,
                    extra: extra.to_vec(),
                    netns,
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was listening; stdout:\n{out}\nstderr:\n{}",
                    bin.display(),
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                child.stop();
                bail!(
                    "{} printed no `ca-fingerprint:` and `listening:` lines within {:?}; stdout:\n{out}\nstderr:\n{}",
                    bin.display(),
                    START_TIMEOUT,
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The TCP port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:PORT`, as seen from the host (`https://ADDR:PORT`
    /// inside the namespace of [`Server::start_netboot_in_netns`]).
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host(), self.port)
    }

    /// `https://10.0.2.2:PORT`, as seen from a QEMU guest on user networking
    /// (`https://ADDR:PORT` for a server in a namespace: its guests are on
    /// that network).
    pub fn guest_url(&self) -> String {
        match &self.netns {
            Some((_, addr)) => format!("https://{addr}:{}", self.port),
            None => format!("https://10.0.2.2:{}", self.port),
        }
    }

    /// The address it listens on: 127.0.0.1, or its namespace address.
    fn host(&self) -> Ipv4Addr {
        host_of(self.netns.as_ref())
    }

    /// The CA pin the server printed, `sha256:HEX`.
    pub fn ca_pin(&self) -> &str {
        &self.ca_pin
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `DATA/ca.pem`, the server's CA certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    /// The admin bearer token file: what the server printed as
    /// `admin-token-file:`, else `DATA/admin.token`.
    pub fn admin_token_file(&self) -> PathBuf {
        self.admin_token_file.clone()
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Everything the server wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.stderr")).unwrap_or_default()
    }

    /// Runs the real `wardenctl --server URL --ca CA.pem --token-file TOKEN ARGS…`.
    pub fn wardenctl(&self, args: &[&str]) -> Result<Output> {
        let bin = crate::target_bin("wardenctl")?;
        let mut cmd = command_in(self.netns.as_ref(), &bin);
        cmd.arg("--server")
            .arg(self.url())
            .arg("--ca")
            .arg(self.ca_pem())
            .arg("--token-file")
            .arg(self.admin_token_file())
            .args(args);
        run_with_timeout("wardenctl", &mut cmd, Duration::from_secs(60))
    }

    /// Runs the real `wardenctl` with another token (a role's) instead of
    /// the admin token.
    pub fn wardenctl_as(&self, token_file: &Path, args: &[&str]) -> Result<Output> {
        let bin = crate::target_bin("wardenctl")?;
        let mut cmd = command_in(self.netns.as_ref(), &bin);
        cmd.arg("--server")
            .arg(self.url())
            .arg("--ca")
            .arg(self.ca_pem())
            .arg("--token-file")
            .arg(token_file)
            .args(args);
        run_with_timeout("wardenctl", &mut cmd, Duration::from_secs(60))
    }

    /// Runs `wardenctl … ARGS` and returns its stdout; a non-zero exit is an
    /// error carrying both outputs.
    pub fn wardenctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.wardenctl(args)?;
        if !out.status.success() {
            bail!(
                "wardenctl {}: {}\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `wardenctl … nodes --json`, parsed.
    pub fn nodes_json(&self) -> Result<NodeList> {
        let out = self.wardenctl(&["nodes", "--json"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "`wardenctl nodes --json` failed ({}); stdout:\n{stdout}\nstderr:\n{}\nserver stderr (tail):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                crate::process::tail_lines(&self.stderr_text(), 40)
            );
        }
        serde_json::from_str::<NodeList>(&stdout).with_context(|| {
            format!("`wardenctl nodes --json` printed something that is not a NodeList:\n{stdout}")
        })
    }

    /// Stops the server now; drop does the same.
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts the server again — stopping it first if it still runs — with
    /// the same data directory, port and arguments: a server restart, as an
    /// agent in the middle of a turnover sees it. Its earlier output is kept
    /// as `server.N.stdout`/`.stderr` next to the new `server.stdout`. (A
    /// network-boot port is chosen afresh; [`Server::guest_boot_url`] names
    /// the new one.)
    pub fn start_again(&mut self) -> Result<()> {
        self.child.stop();
        let bin = crate::target_bin("warden-attest-server")?;
        let dir = self.dir.path();
        let earlier = (1u32..)
            .find(|n| !dir.join(format!("server.{n}.stdout")).exists())
            .unwrap_or(0);
        for name in ["stdout", "stderr"] {
            let from = dir.join(format!("server.{name}"));
            let to = dir.join(format!("server.{earlier}.{name}"));
            std::fs::rename(&from, &to)
                .with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
        }
        let stdout_path = dir.join("server.stdout");
        let mut cmd = command_in(self.netns.as_ref(), &bin);
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(format!("{}:{}", self.host(), self.port))
            .args(&self.extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::create(&stdout_path)
                    .with_context(|| format!("create {}", stdout_path.display()))?,
            )
            .stderr(
                std::fs::File::create(dir.join("server.stderr")).context("create server.stderr")?,
            );
        self.child = ChildGuard::spawn("warden-attest-server", &mut cmd)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = std::fs::read_to_string(&stdout_path).unwrap_or_default();
            let startup = parse_startup(&out);
            if startup.port == Some(self.port) {
                // The boot line comes before `listening:`, so it is there.
                self.boot_port = startup.boot_port;
                return Ok(());
            }
            let why = if let Some(status) = self.child.try_wait()? {
                format!("exited ({status})")
            } else if Instant::now() >= deadline {
                self.child.stop();
                format!("printed no `listening:` line within {START_TIMEOUT:?}")
            } else {
                std::thread::sleep(POLL);
                continue;
            };
            bail!(
                "{} on {}:{} again: {why}; stdout:\n{out}\nstderr:\n{}",
                bin.display(),
                self.host(),
                self.port,
                self.stderr_text()
            );
        }
    }

    /// Copies the server's stdout/stderr into `dest`.
    pub fn keep_logs(&self, dest: &Path) {
        for name in ["server.stdout", "server.stderr"] {
            let _ = std::fs::copy(self.dir.path().join(name), dest.join(name));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.stop();
        if std::thread::panicking() {
            match crate::paths::new_failed_logs_dir("server") {
                Ok(dest) => {
                    self.keep_logs(&dest);
                    eprintln!("server logs of the failed test kept in {}", dest.display());
                }
                Err(e) => eprintln!("could not keep the server logs: {e:#}"),
            }
        }
    }
}

/// What the server printed on start-up.
#[derive(Debug, Default, PartialEq, Eq)]
struct Startup {
    ca_pin: Option<String>,
    port: Option<u16>,
    admin_token_file: Option<PathBuf>,
    boot_port: Option<u16>,
}

/// `bin`, run inside `netns` (`ip netns exec`, which execs it: the PID is
/// the program's own) when there is one.
fn command_in(netns: Option<&(String, Ipv4Addr)>, bin: &Path) -> Command {
    match netns {
        Some((ns, _)) => crate::netns::netns_command(ns, bin),
        None => Command::new(bin),
    }
}

/// The address a server listens on: its namespace address, else 127.0.0.1.
fn host_of(netns: Option<&(String, Ipv4Addr)>) -> Ipv4Addr {
    netns.map_or(Ipv4Addr::LOCALHOST, |(_, addr)| *addr)
}

/// The server arguments that turn network boot on for QEMU guests.
pub fn netboot_args() -> Result<Vec<OsString>> {
    Ok(netboot_args_for(&crate::paths::ramdisk_dir()?.dir))
}

/// [`netboot_args`] serving the ramdisk in `boot_dir`.
fn netboot_args_for(boot_dir: &Path) -> Vec<OsString> {
    vec![
        "--boot-dir".into(),
        boot_dir.into(),
        "--boot-listen".into(),
        "127.0.0.1:0".into(),
        "--boot-server-host".into(),
        "10.0.2.2".into(),
        "--boot-allow-extra".into(),
    ]
}

/// Finds the CA pin, port and token file in the server's start-up output.
fn parse_startup(out: &str) -> Startup {
    let mut s = Startup::default();
    // Only complete lines: the server may be half-way through writing one.
    let complete = out.rfind('\n').map_or("", |i| &out[..i]);
    for line in complete.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ca-fingerprint:") {
            let rest = rest.trim();
            if let Some(hex) = rest.strip_prefix("sha256:") {
                if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    s.ca_pin = Some(rest.to_string());
                }
            }
        } else if let Some(rest) = line.strip_prefix("listening:") {
            // Any IPv4 host: 127.0.0.1, or a namespace address.
            s.port = rest
                .trim()
                .strip_prefix("https://")
                .and_then(|r| r.rsplit_once(':'))
                .and_then(|(_, p)| p.trim_end_matches('/').parse().ok());
        } else if let Some(rest) = line.strip_prefix("boot:") {
            s.boot_port = rest
                .trim()
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .and_then(|hp| hp.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok());
        } else if let Some(rest) = line.strip_prefix("admin-token-file:") {
            s.admin_token_file = Some(PathBuf::from(rest.trim()));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_lines_parse() {
        let hex = "ab".repeat(32);
        let out = format!(
            "ca-fingerprint: sha256:{hex}\nadmin-token-file: /d/admin.token\nlistening: https://127.0.0.1:43210\n"
        );
        let s = parse_startup(&out);
        assert_eq!(s.ca_pin, Some(format!("sha256:{hex}")));
        assert_eq!(s.port, Some(43210));
        assert_eq!(s.admin_token_file, Some(PathBuf::from("/d/admin.token")));
        // Half-written output is not a start-up yet.
        let half = format!("ca-fingerprint: sha256:{hex}\nlistening: https://127.0.0.1:4");
        assert_eq!(parse_startup(&half).port, None);
        assert_eq!(parse_startup("ca-fingerprint: sha256:abc\n").ca_pin, None);
        // A server in a network namespace prints its address there.
        let ns =
            "boot: http://10.77.9.1:8080/boot/warden.ipxe\nlistening: https://10.77.9.1:8443\n";
        let s = parse_startup(ns);
        assert_eq!((s.port, s.boot_port), (Some(8443), Some(8080)));
    }
}
