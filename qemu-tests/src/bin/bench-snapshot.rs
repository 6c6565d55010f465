//! `bench-snapshot`: the agent's NBD snapshot, incremental snapshot and
//! restore against `qemu-img convert` and `dd` on the same disk, the same
//! kind of server and the same targets, in the same run (issue #6).
//!
//! The disk: `--size-mib` MiB (default 4096) in 4 MiB chunks, half of them
//! (chosen by ChaCha8 with a fixed seed) random data, the rest zeros; a
//! sparse file in `build/bench/snapshot/` behind a loop device
//! (`losetup --direct-io=on`). The server: nbdkit's `file` plugin on
//! 127.0.0.1 over a fresh sparse file for every run (large enough for the
//! disk and the agent's manifest region). Before every contender the
//! disk's page cache is dropped (`dd iflag=nocache count=0`: fadvise
//! DONTNEED of that device only), so nobody reads from memory.
//!
//! Each round, order alternating, times:
//! - full: the agent's `snapshot` (`Tuning::default()`) against
//!   `qemu-img convert -n -t none -O raw DISK nbd://127.0.0.1:PORT/`;
//! - incremental: after changing 1% of the chunks, the agent's incremental
//!   snapshot into the export of its own full snapshot, against just
//!   reading the disk (`dd if=DISK of=/dev/null bs=4M iflag=direct`); and
//!   the bytes it sent against the bytes changed;
//! - restore: the agent's `restore` onto a loop device over a fresh sparse
//!   file against `qemu-img convert -n -t none -O raw nbd://… TARGET` onto
//!   another such device.
//!
//! In round 1 the export and the restored target are read back and
//! compared with the disk by SHA-256. Prints diagnostics on stderr and
//! `BENCH` lines (medians) on stdout. Needs root (losetup). It measures;
//! it never builds.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use warden_agent::snapshot::{restore, snapshot, Tuning};
use warden_protocol::snapshot::{
    export_bytes_needed, manifest_len, RestoreRequest, SnapshotRequest, MAX_IDENTITY,
};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const CHUNK_LEN: usize = 4 << 20;
const SEED: u64 = 0x5741_5244_454e_0006; // "WARDEN", issue 6

struct Args {
    size_mib: u64,
    rounds: usize,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        size_mib: 4096,
        rounds: 3,
    };
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{what} needs a number"))?
                .parse()
                .with_context(|| format!("{what} needs a number"))
        };
        match arg.as_str() {
            "--size-mib" => a.size_mib = num("--size-mib")?,
            "--rounds" => a.rounds = usize::try_from(num("--rounds")?)?,
            other => {
                bail!("unknown argument {other:?} (usage: bench-snapshot [--size-mib N] [--rounds N])")
            }
        }
    }
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        a.size_mib >= 64 && a.size_mib % 4 == 0,
        "--size-mib must be a multiple of 4, at least 64"
    );
    Ok(a)
}

// ---------------------------------------------------------------- disks

/// A loop device over a file; detached on drop (the file is kept or
/// removed as `remove` says).
struct Loop {
    dev: String,
    file: PathBuf,
    remove: bool,
}

impl Loop {
    fn new(file: &Path, remove: bool) -> Result<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .context("running losetup")?;
        ensure!(
            out.status.success(),
            "losetup -f --show --direct-io=on {}: {} (root needed)",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            file: file.to_path_buf(),
            remove,
        })
    }

    /// A loop device over a new sparse file of `size` bytes.
    fn fresh(file: &Path, size: u64) -> Result<Loop> {
        sparse(file, size)?;
        Loop::new(file, true)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        if self.remove {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

fn sparse(file: &Path, size: u64) -> Result<()> {
    let _ = std::fs::remove_file(file);
    File::create(file)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", file.display()))
}

/// Writes the disk: half the chunks random. Returns the data chunks.
fn generate(file: &Path, size: u64, rng: &mut ChaCha8Rng) -> Result<Vec<u64>> {
    sparse(file, size)?;
    let f = OpenOptions::new().write(true).open(file)?;
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut data = Vec::new();
    for i in 0..size / CHUNK {
        if rng.next_u64() % 2 == 0 {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, i * CHUNK)
                .with_context(|| format!("writing {}", file.display()))?;
            data.push(i);
        }
    }
    f.sync_all()?;
    Ok(data)
}

/// Rewrites `count` random chunks (data or zero) with new random data;
/// returns the bytes changed.
fn change(dev: &str, size: u64, count: u64, rng: &mut ChaCha8Rng) -> Result<u64> {
    let f = OpenOptions::new().write(true).open(dev)?;
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count {
        picked.insert(rng.next_u64() % (size / CHUNK));
    }
    for &i in &picked {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, i * CHUNK)
            .with_context(|| format!("writing {dev}"))?;
    }
    f.sync_all()?;
    Ok(count * CHUNK)
}

/// Drops `path`'s pages from the page cache (fadvise DONTNEED via dd).
fn drop_cache(path: &str) -> Result<()> {
    shell(&format!("dd if={path} iflag=nocache count=0 status=none")).map(drop)
}

/// SHA-256 hex of the first `len` bytes of `path`.
fn sha_prefix(path: &str, len: u64) -> Result<String> {
    let mut f = File::open(path)
        .with_context(|| format!("opening {path}"))?
        .take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

// ---------------------------------------------------------------- server

/// nbdkit's file plugin over `file` on a free port; killed on drop.
struct Nbdkit {
    child: Child,
    port: u16,
}

impl Nbdkit {
    fn start(file: &Path) -> Result<Nbdkit> {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut child = Command::new("nbdkit")
                .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .arg("file")
                .arg(file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("running nbdkit (apt-get install nbdkit)")?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Nbdkit { child, port });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("nbdkit did not listen on {port} within 20 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("nbdkit failed to start five times")
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- contenders

fn shell(script: &str) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .status()
        .context("running bash")?;
    ensure!(st.success(), "`{script}` failed");
    Ok(t.elapsed().as_secs_f64())
}

struct Bench {
    dir: PathBuf,
    export_size: u64,
    disk: Loop,
}

impl Bench {
    /// A fresh export file and its server.
    fn export(&self, name: &str) -> Result<(PathBuf, Nbdkit)> {
        let file = self.dir.join(name);
        sparse(&file, self.export_size)?;
        let server = Nbdkit::start(&file)?;
        Ok((file, server))
    }

    fn warden_full(&self, uri: &str) -> Result<(f64, String)> {
        drop_cache(&self.disk.dev)?;
        let req = SnapshotRequest {
            uri: uri.to_string(),
            ca_pem: None,
            source: self.disk.dev.clone(),
            chunk_size: CHUNK,
            previous: None,
            verify: false,
        };
        let t = Instant::now();
        let rec = snapshot(&req, &tuning()).context("warden full snapshot")?;
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "bench-snapshot: warden full {secs:.2} s: {} chunks, {} zero, sent {} bytes, skipped {} zero bytes, {} connections, direct_io {}",
            rec.chunks, rec.zero_chunks, rec.bytes_sent, rec.zero_bytes_skipped, rec.connections, rec.direct_io
        );
        Ok((secs, rec.manifest_sha256))
    }

    fn anchor_full(&self, uri: &str) -> Result<f64> {
        drop_cache(&self.disk.dev)?;
        shell(&format!(
            "qemu-img convert -n -t none -f raw -O raw {} {uri}",
            self.disk.dev
        ))
    }
}

/// `Tuning::default()`, with overrides for experiments:
/// WARDEN_BENCH_SNAPSHOT_{WORKERS,READERS,CONNECTIONS,FLUSH_MIB}.
fn tuning() -> Tuning {
    let env = |k: &str| {
        std::env::var(format!("WARDEN_BENCH_SNAPSHOT_{k}"))
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
    };
    let d = Tuning::default();
    let us = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Tuning {
        workers: env("WORKERS").map_or(d.workers, us),
        readers: env("READERS").map_or(d.readers, us),
        connections: env("CONNECTIONS").map_or(d.connections, us),
        flush_every: env("FLUSH_MIB").map_or(d.flush_every, |m| m * MIB),
        ..d
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn check_tools() -> Result<()> {
    for (tool, pkg) in [
        ("nbdkit", "nbdkit"),
        ("qemu-img", "qemu-utils"),
        ("dd", "coreutils"),
        ("losetup", "mount"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ensure!(
            found,
            "{tool} not found: apt-get install {pkg} (scripts/setup)"
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    check_tools()?;
    let size = args.size_mib * MIB;
    let dir = warden_qemu_tests::workspace_root().join("build/bench/snapshot");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let t = Instant::now();
    let disk_file = dir.join("disk.img");
    let data = generate(&disk_file, size, &mut rng)?;
    let disk = Loop::new(&disk_file, true)?;
    let export_size = export_bytes_needed(size, manifest_len(size, CHUNK, MAX_IDENTITY)) + MIB;
    eprintln!(
        "bench-snapshot: disk {} ({} MiB, {} of {} chunks random) on {} in {:.1} s; exports {} bytes",
        disk_file.display(),
        size / MIB,
        data.len(),
        size / CHUNK,
        disk.dev,
        t.elapsed().as_secs_f64(),
        export_size
    );
    eprintln!("bench-snapshot: {:?}", tuning());
    let b = Bench {
        dir: dir.clone(),
        export_size,
        disk,
    };

    // Warm-up: one run of each full contender.
    {
        let (_f, s) = b.export("warm.img")?;
        b.anchor_full(&s.uri())?;
    }
    {
        let (_f, s) = b.export("warm.img")?;
        b.warden_full(&s.uri())?;
    }

    let (mut w_full, mut a_full, mut w_inc, mut a_dd, mut w_rest, mut a_rest) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut sent, mut changed) = (0u64, 0u64);
    let changes = (size / CHUNK / 100).max(1);
    for round in 0..args.rounds {
        // Full: the agent's export is kept for the incremental and restore.
        let (wfile, wserver) = b.export("export-warden.img")?;
        let mut order = [0, 1];
        if round % 2 == 1 {
            order.reverse();
        }
        let mut digest = String::new();
        for which in order {
            if which == 0 {
                let (secs, d) = b.warden_full(&wserver.uri())?;
                w_full.push(secs);
                digest = d;
            } else {
                let (afile, aserver) = b.export("export-anchor.img")?;
                a_full.push(b.anchor_full(&aserver.uri())?);
                drop(aserver);
                let _ = std::fs::remove_file(afile);
            }
        }
        if round == 0 {
            let (want, got) = (
                sha_prefix(&b.disk.dev, size)?,
                sha_prefix(wfile.to_str().unwrap_or_default(), size)?,
            );
            ensure!(
                want == got,
                "the export after warden's full snapshot differs from the disk"
            );
            eprintln!("bench-snapshot: export read back: matches the disk");
        }

        // Incremental after changing 1% of the chunks.
        let bytes = change(&b.disk.dev, size, changes, &mut rng)?;
        let mut inc = |_: ()| -> Result<()> {
            drop_cache(&b.disk.dev)?;
            let req = SnapshotRequest {
                uri: wserver.uri(),
                ca_pem: None,
                source: b.disk.dev.clone(),
                chunk_size: CHUNK,
                previous: Some(digest.clone()),
                verify: false,
            };
            let t = Instant::now();
            let rec = snapshot(&req, &tuning()).context("warden incremental")?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "bench-snapshot: warden incremental {secs:.2} s: {} changed chunks, sent {} bytes (+{} zeroed) for {bytes} bytes changed",
                rec.changed_chunks, rec.bytes_sent, rec.bytes_zeroed
            );
            w_inc.push(secs);
            sent += rec.bytes_sent + rec.bytes_zeroed;
            changed += bytes;
            digest = rec.manifest_sha256;
            Ok(())
        };
        let dd = || -> Result<f64> {
            drop_cache(&b.disk.dev)?;
            shell(&format!(
                "dd if={} of=/dev/null bs=4M iflag=direct status=none",
                b.disk.dev
            ))
        };
        if round % 2 == 0 {
            inc(())?;
            a_dd.push(dd()?);
        } else {
            a_dd.push(dd()?);
            inc(())?;
        }

        // Restore from the agent's export (it now holds the incremental).
        for which in order {
            let tfile = dir.join(format!("target-{which}.img"));
            let target = Loop::fresh(&tfile, export_size)?;
            if which == 0 {
                let req = RestoreRequest {
                    uri: wserver.uri(),
                    ca_pem: None,
                    target: target.dev.clone(),
                    manifest_sha256: digest.clone(),
                    target_reads_zero: false,
                };
                let t = Instant::now();
                let rec = restore(&req, &tuning()).context("warden restore")?;
                let secs = t.elapsed().as_secs_f64();
                eprintln!(
                    "bench-snapshot: warden restore {secs:.2} s: read {}, wrote {}, zeroed {}, direct_io {}",
                    rec.bytes_read, rec.bytes_written, rec.bytes_zeroed, rec.direct_io
                );
                w_rest.push(secs);
                if round == 0 {
                    let (want, got) = (
                        sha_prefix(&b.disk.dev, size)?,
                        sha_prefix(&target.dev, size)?,
                    );
                    ensure!(want == got, "the restored target differs from the disk");
                    eprintln!("bench-snapshot: restored target read back: matches the disk");
                }
            } else {
                a_rest.push(shell(&format!(
                    "qemu-img convert -n -t none -f raw -O raw {} {}",
                    wserver.uri(),
                    target.dev
                ))?);
            }
        }
        drop(wserver);
        let _ = std::fs::remove_file(wfile);
        let last = |v: &Vec<f64>| v.last().copied().unwrap_or(0.0);
        eprintln!(
            "bench-snapshot: round {}: full warden {:.2} s / qemu-img {:.2} s; incremental warden {:.2} s / dd {:.2} s; restore warden {:.2} s / qemu-img {:.2} s",
            round + 1,
            last(&w_full),
            last(&a_full),
            last(&w_inc),
            last(&a_dd),
            last(&w_rest),
            last(&a_rest)
        );
    }
    let (w_full, a_full, w_inc, a_dd, w_rest, a_rest) = (
        median(w_full),
        median(a_full),
        median(w_inc),
        median(a_dd),
        median(w_rest),
        median(a_rest),
    );
    println!(
        "BENCH snapshot-full: warden {w_full:.2} s (with manifest), anchor qemu-img-convert-to-nbd {a_full:.2} s, ratio {:.2} (goal <= 0.8)",
        w_full / a_full
    );
    println!(
        "BENCH snapshot-incremental: warden {w_inc:.2} s (1% of chunks changed), anchor dd-read-direct {a_dd:.2} s, ratio {:.2} (goal <= 1.2)",
        w_inc / a_dd
    );
    let (sent_mb, changed_mb) = (sent as f64 / 1e6, changed as f64 / 1e6);
    println!(
        "BENCH snapshot-incremental-bytes: warden {sent_mb:.1} MB sent, anchor changed {changed_mb:.1} MB, ratio {:.2} (goal <= 1.1)",
        sent_mb / changed_mb
    );
    println!(
        "BENCH snapshot-restore: warden {w_rest:.2} s, anchor qemu-img-convert-from-nbd {a_rest:.2} s, ratio {:.2} (goal <= 0.8)",
        w_rest / a_rest
    );
    Ok(())
}
