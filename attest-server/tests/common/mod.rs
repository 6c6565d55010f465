//! What the server's integration tests share: starting the real
//! `warden-attest-server` binary on a free loopback port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const SERVER: &str = env!("CARGO_BIN_EXE_warden-attest-server");

/// Starts the server on `data_dir` (stderr to `log`) and waits for its
/// `listening: URL` line; returns the process and the URL.
pub fn spawn_server(data_dir: &Path, log: &Path) -> (Child, String) {
    let mut child = Command::new(SERVER)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let url = loop {
        // A hang guard, not a timing assertion: start-up takes well under a second.
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!(
                    "server printed no listening line ({e}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        if let Some(url) = line.strip_prefix("listening: ") {
            break url.to_owned();
        }
    };
    (child, url)
}
