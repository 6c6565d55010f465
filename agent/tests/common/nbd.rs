//! NBD servers and sparse files for the agent's snapshot tests
//! (`snapshot_nbd`, `snapshot_manifest`): a server process on a free port
//! of 127.0.0.1 (nbdkit, qemu-nbd) killed on drop, a tool check that skips
//! or — with WARDEN_REQUIRE_TOOLS=1 — fails, fast-retry tuning, and
//! deterministic data.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use warden_agent::snapshot::Tuning;

pub const MIB: u64 = 1 << 20;

pub fn have_tool(tool: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    if !found {
        if std::env::var("WARDEN_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!(
                "{test}: `{tool}` is not installed and WARDEN_REQUIRE_TOOLS=1 (run scripts/setup)"
            );
        }
        eprintln!("SKIPPED {test}: `{tool}` is not installed (run scripts/setup)");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process on 127.0.0.1:`port`, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Starts `program args` (which must listen on `port`) and waits until
    /// the port accepts; `None` if it exited first (port taken).
    pub fn try_start(program: &str, args: &[String], port: u16) -> Option<Server> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Server { child, port });
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not listen on {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn nbdkit_args(port: u16, rest: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(port.to_string());
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    }

    /// nbdkit with `rest` (filters, plugin, parameters) on a free port.
    pub fn nbdkit(rest: &[&str]) -> Server {
        for _ in 0..5 {
            let port = free_port();
            if let Some(s) = Server::try_start("nbdkit", &Server::nbdkit_args(port, rest), port) {
                return s;
            }
        }
        panic!("nbdkit {rest:?} failed to start five times");
    }

    /// nbdkit on a given port (a restart); retried while the port is busy.
    pub fn nbdkit_on(port: u16, rest: &[&str]) -> Server {
        for _ in 0..50 {
            if let Some(s) = Server::try_start("nbdkit", &Server::nbdkit_args(port, rest), port) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("nbdkit could not listen on port {port} again");
    }

    pub fn qemu_nbd(file: &Path) -> Server {
        for _ in 0..5 {
            let port = free_port();
            let args: Vec<String> = [
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-x",
                "backup",
                "-t",
                "-e",
                "8",
                file.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let Some(s) = Server::try_start("qemu-nbd", &args, port) {
                return s;
            }
        }
        panic!("qemu-nbd failed to start five times");
    }

    pub fn uri(&self, scheme: &str, export: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/{export}", self.port)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fast backoff so fault tests take seconds.
pub fn tuning() -> Tuning {
    Tuning {
        flush_every: 4 * MIB,
        retry_backoff: Duration::from_millis(5),
        reconnect_backoff: Duration::from_millis(100),
        reconnect_backoff_max: Duration::from_millis(800),
        timeout: Duration::from_secs(10),
        ..Tuning::default()
    }
}

/// A deterministic, non-repeating pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sparse(path: &Path, len: u64) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
}

/// SHA-256 hex of the first `len` bytes of `path`.
pub fn sha_prefix(path: &Path, len: u64) -> String {
    let mut f = File::open(path).unwrap().take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, len, "{} is shorter than {len}", path.display());
    hex::encode(h.finalize())
}
