//! The real `warden-attest-server` on 127.0.0.1 with a fresh data directory,
//! and the real `wardenctl` pointed at it.
//!
//! It learns the server's CA pin and port only from what the server prints
//! (`ca-fingerprint: sha256:HEX`, `listening: https://127.0.0.1:PORT`); it
//! never computes them itself, so a test checks the server's own word.

use std::ffi::OsString;
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

    /// Like [`Server::start`], with extra command-line arguments.
    pub fn start_with_args(extra: &[OsString]) -> Result<Server> {
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
        let mut cmd = Command::new(&bin);
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg("127.0.0.1:0")
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

    /// `https://127.0.0.1:PORT`, as seen from the host.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `https://10.0.2.2:PORT`, as seen from a QEMU guest on user networking.
    pub fn guest_url(&self) -> String {
        format!("https://10.0.2.2:{}", self.port)
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
        let mut cmd = Command::new(&bin);
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
        let mut cmd = Command::new(&bin);
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
            s.port = rest
                .trim()
                .strip_prefix("https://127.0.0.1:")
                .and_then(|p| p.trim_end_matches('/').parse().ok());
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
    }
}
