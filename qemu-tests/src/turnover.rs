//! Shared parts of the lease-turnover QEMU tests (`turnover_boot.rs`,
//! `fault_drills.rs`): nbdkit as the remote block store (with filters, and
//! restartable on the same port), the previous tenant's disk, wardenctl
//! under a role's token, and waits on the console that match an event's
//! fields rather than only its name.
//!
//! These are test helpers: a failure here is the calling test's failure, so
//! they panic with the whole story instead of returning errors. They never
//! decide a result for the parts under test and never sleep in place of an
//! event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::console::events_named;
use crate::node::BOOT_TIMEOUT;
use crate::{DiskBus, Node, NodeBuilder, Ramdisk, Server};

/// What the turnover tests need beyond the QEMU tier: nbdkit, curl and the
/// tenant images of `scripts/build-images`. Returns the ramdisk and
/// `build/images`, or `None` after [`crate::skip_or_fail`] said what is missing.
pub fn prerequisites(test: &str) -> Option<(Ramdisk, PathBuf)> {
    let ramdisk = crate::qemu_prerequisites(test, &["nbdkit", "curl"])?;
    let images = crate::workspace_root().join("build/images");
    let found = if images.join("manifest.json").is_file()
        && images.join("tenant-compressed.qcow2").is_file()
    {
        Ok(images)
    } else {
        Err(anyhow::anyhow!(
            "{} has no tenant images (run scripts/build-images)",
            images.display()
        ))
    };
    crate::prereq(test, found).map(|i| (ramdisk, i))
}

/// The SHA-256 (hex) `build/images/manifest.json` promises for `file`.
pub fn image_sha256(images: &Path, file: &str) -> String {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(images.join("manifest.json")).unwrap()).unwrap();
    manifest["files"][file]["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest.json has no sha256 for {file}"))
        .to_owned()
}

/// The port of an nbdkit inside a network namespace of its own: nothing
/// else listens there, so the port is fixed (NBD's registered 10809).
pub const NBD_PORT: u16 = 10809;

/// nbdkit's `file` plugin serving one file on 127.0.0.1 (the guest reaches
/// it as 10.0.2.2), optionally through filters; it can be killed and
/// started again on the same port, as a block store that restarts.
pub struct Nbdkit {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    args: Vec<OsString>,
}

impl Nbdkit {
    /// Serves `file` as is.
    pub fn start(file: &Path) -> Nbdkit {
        Self::start_with(file, &[], &[])
    }

    /// Serves `file` through `filters` (e.g. `"log"`, `"delay"`), with
    /// `params` after the plugin's (e.g. `"logfile=/x"`, `"delay-write=50ms"`).
    pub fn start_with(file: &Path, filters: &[&str], params: &[&str]) -> Nbdkit {
        let mut args: Vec<OsString> = filters
            .iter()
            .map(|f| OsString::from(format!("--filter={f}")))
            .collect();
        args.push("file".into());
        args.push(file.into());
        args.extend(params.iter().map(OsString::from));
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = Self::spawn(port, &args) {
                return Nbdkit { child, port, args };
            }
        }
        panic!("nbdkit did not start");
    }

    /// Starts nbdkit on `port`; `None` if it exited or never listened.
    fn spawn(port: u16, args: &[OsString]) -> Option<Child> {
        let mut child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(child);
            }
            std::thread::sleep(crate::process::POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Serves `file` as is on `addr`:[`NBD_PORT`] inside network namespace
    /// `netns` (nbdkit runs there, `ip netns exec`). Ready once nbdkit has
    /// written its PID file, which it does after it started listening.
    pub fn start_in_netns(file: &Path, netns: &str, addr: std::net::Ipv4Addr) -> Nbdkit {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("nbdkit.pid");
        let args: Vec<OsString> = vec!["file".into(), file.into()];
        let mut child = crate::netns::netns_command(netns, "nbdkit")
            .args(["-f", "--exit-with-parent", "-i", &addr.to_string(), "-p"])
            .arg(NBD_PORT.to_string())
            .arg("-P")
            .arg(&pidfile)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nbdkit in {netns} exited at start ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "nbdkit in {netns} did not start in 20 s"
            );
            std::thread::sleep(crate::process::POLL);
        }
        Nbdkit {
            child,
            port: NBD_PORT,
            args,
        }
    }

    /// Kills nbdkit (SIGKILL: its clients see the connection drop without
    /// a word) and starts it again on the same port with the same file.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        for _ in 0..50 {
            if let Some(child) = Self::spawn(self.port, &self.args) {
                self.child = child;
                return;
            }
        }
        panic!("nbdkit did not start again on port {}", self.port);
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The previous tenant's disk, `size` bytes: data at the start, in the
/// middle and at the end, holes elsewhere. Returns the SHA-256 of the disk.
pub fn previous_tenant_disk(path: &Path, size: u64) -> String {
    crate::node::create_sparse(path, size).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    const BLOCK: u64 = 4 << 20;
    let mut block = Vec::new();
    let mut seed = Sha256::digest(b"previous tenant").to_vec();
    while block.len() < (4 << 20) {
        seed = Sha256::digest(&seed).to_vec();
        block.extend_from_slice(&seed);
    }
    for offset in [0, size / 2 - size / 2 % BLOCK, size - BLOCK] {
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    sha256_prefix(path, size)
}

/// SHA-256 (hex) of the first `len` bytes of `path`.
pub fn sha256_prefix(path: &Path, len: u64) -> String {
    let mut f = std::fs::File::open(path).unwrap().take(len);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// A server for the turnover tests: it trusts swtpm-localca and serves
/// network boot, and every node it boots powers off when the agent is done
/// or fails (on the measured command line, so in every learned policy).
pub fn netboot_server() -> Server {
    Server::start_netboot(&[
        "--boot-cmdline".into(),
        "console=ttyS0 warden.on_error=poweroff warden.done=poweroff".into(),
    ])
    .unwrap()
}

/// The node of a turnover test: network-boots the server's script (with
/// `extra` kernel arguments, e.g. a test hook), an NVMe disk from `disk`.
pub fn node(name: &str, server: &Server, extra: &str, disk: &Path) -> NodeBuilder {
    NodeBuilder::new(name)
        .netboot(&server.guest_boot_url("warden.ipxe", extra).unwrap())
        .disk_file(DiskBus::Nvme, disk, true)
}

/// Waits for `node` to power off by itself (successfully), printing how
/// long QEMU ran under `label`.
pub fn boot_until_off(mut node: Node, label: &str) -> Node {
    let status = node.wait_power_off(BOOT_TIMEOUT).unwrap();
    assert!(status.success(), "{label}: QEMU exit status {status}");
    eprintln!(
        "{label}: QEMU ran {:.1} s",
        node.started_at().elapsed().as_secs_f64()
    );
    node
}

/// A token for `role` of `project`, saved in `dir`; returns its file.
pub fn token(server: &Server, dir: &Path, role: &str, project: &str) -> PathBuf {
    let secret = server
        .wardenctl_ok(&["token", "create", "--role", role, "--project", project])
        .unwrap();
    let file = dir.join(format!("{role}-{project}.token"));
    std::fs::write(&file, secret.trim()).unwrap();
    file
}

/// `&[String]` as `Vec<&str>`, for wardenctl arguments.
pub fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `wardenctl ARGS` with `token`; must succeed; returns stdout.
pub fn ok_as(server: &Server, token: &Path, args: &[&str]) -> String {
    let out = server.wardenctl_as(token, args).unwrap();
    assert!(
        out.status.success(),
        "wardenctl {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wardenctl ARGS` with `token`; must be refused; returns stderr.
pub fn refused_as(server: &Server, token: &Path, args: &[&str]) -> String {
    let out = server.wardenctl_as(token, args).unwrap();
    assert!(
        !out.status.success(),
        "wardenctl {} should have been refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Boot 1 of a turnover test: a node with no policy is refused, and the
/// disk is left alone; then a policy is learned from that attestation
/// (with the ramdisk's reference values) and assigned as policy `name`.
/// Returns the node id and the powered-off node, whose TPM
/// ([`Node::swtpm_state_dir`]) the next boots reuse.
pub fn enroll_and_learn_policy(
    server: &Server,
    ramdisk: &Ramdisk,
    extra: &str,
    disk: &Path,
    name: &str,
) -> (String, Node) {
    let mut first = boot_until_off(
        node(&format!("{name}-refused"), server, extra, disk)
            .start()
            .unwrap(),
        &format!("{name}: boot 1 (no policy)"),
    );
    assert_eq!(
        events_named(&first.events(), "verdict")[0]["status"],
        "failed"
    );
    let node_id = server.nodes_json().unwrap().nodes[0].node_id.clone();
    learn_policy(server, ramdisk, &node_id, name);
    (node_id, first)
}

/// Learns policy `name` from `node_id`'s latest attestation and the
/// ramdisk's reference values, stores it and assigns it to the node.
pub fn learn_policy(server: &Server, ramdisk: &Ramdisk, node_id: &str, name: &str) {
    let reference = ramdisk.dir.join("reference-values.json");
    server
        .wardenctl_ok(&[
            "policy",
            "learn",
            node_id,
            "--name",
            name,
            "--ramdisk",
            reference.to_str().unwrap(),
            "--store",
        ])
        .unwrap();
    server
        .wardenctl_ok(&["policy", "assign", name, "--node", node_id])
        .unwrap();
}

/// Polls `node`'s console until an event named `name` for which `pred`
/// holds appears, and returns it. Fails (quoting the console) when QEMU
/// exits first, a `fatal` event appears, or `timeout` passes.
pub fn wait_for_event_where(
    node: &mut Node,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let exited = node.wait_exit(Duration::ZERO).is_ok();
        let events = node.events();
        if let Some(e) = events_named(&events, name).into_iter().find(|e| pred(e)) {
            return e.clone();
        }
        let why = if let Some(f) = events_named(&events, "fatal").first() {
            format!("fatal event while waiting for a `{name}` event: {f}")
        } else if exited {
            format!("QEMU exited before the `{name}` event awaited")
        } else if Instant::now() >= deadline {
            format!("no matching `{name}` event within {timeout:?}")
        } else {
            std::thread::sleep(crate::process::POLL);
            continue;
        };
        panic!(
            "{why}\n--- last console lines ---\n{}",
            crate::process::tail_lines(&node.console_text(), 40)
        );
    }
}

/// Polls `node`'s console until it holds a line containing `needle` (e.g.
/// the agent's human-readable `image progress` lines, which have no event).
pub fn wait_for_console_line(node: &mut Node, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let exited = node.wait_exit(Duration::ZERO).is_ok();
        let text = node.console_text();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        if exited || Instant::now() >= deadline {
            panic!(
                "no console line with {needle:?} ({}):\n{}",
                if exited { "QEMU exited" } else { "timed out" },
                crate::process::tail_lines(&text, 40)
            );
        }
        std::thread::sleep(crate::process::POLL);
    }
}

/// A `state` event's predicate: the machine moved to `to`.
pub fn state_to(to: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["to"] == to
}

/// The tenant booted with `lease` (the tenant image prints these lines).
pub fn assert_tenant_booted(console: &str, lease: &str) {
    let lines: Vec<&str> = console.lines().map(str::trim_end).collect();
    assert!(
        lines.iter().any(|l| l.ends_with("TENANT-BOOTED")),
        "the tenant did not boot:\n{console}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(&format!("TENANT-LEASE {lease} source=partition"))),
        "the tenant did not get lease {lease}:\n{console}"
    );
}
