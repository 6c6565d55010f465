//! `bench-image`: the agent's image write against shell pipelines on the
//! same image, the same HTTP server and the same target, in the same run.
//!
//! The image: `--size-mib` MiB (default 4096) with `--zero-pct` % zeros
//! (default 60), generated deterministically (ChaCha8, fixed seed): runs of
//! random bytes of 4 KiB–8 MiB alternating with zero runs whose length is
//! drawn so zeros make the asked share on average; compressed with the
//! `zstd` CLI (`-3 -T0`) into `build/bench/image/` and reused while its
//! parameters stay the same. Served by a small HTTP/1.1 server thread in this
//! process on 127.0.0.1 (GET, `Range: bytes=N-`, the body sent with
//! `std::io::copy`, i.e. sendfile; `warden_qemu_tests::http`) — one server
//! for warden and the anchors.
//!
//! The target: a loop device (`losetup --direct-io=on`) over a file of the
//! image's size in `build/bench/image/`, zeroed with `blkdiscard -z` (punches
//! the backing file's blocks) before every run. Each round, order
//! alternating, times:
//! - `curl -s URL | zstd -d | dd of=LOOP bs=4M oflag=direct` against the
//!   agent writing everything (`target_reads_zero=false`);
//! - the same pipeline with `iflag=fullblock conv=sparse` against the agent
//!   skipping zero runs (`target_reads_zero=true`);
//! - `dd if=/dev/zero of=LOOP bs=4M oflag=direct` of the whole target, the
//!   medium's write rate, against the agent's rate of non-zero bytes.
//!
//! The agent runs in a child process (this binary re-executed with
//! `--child`) so its peak RSS (VmHWM) is its own: `write_image` exactly as the
//! agent calls it, with `Tuning::default()`. The child samples its threads'
//! CPU time and run-queue wait (`/proc/self/task/*/schedstat`) to show
//! which pipeline stage is busy and whether the machine's other load held it
//! back. In round 1 the target is read back after each agent run and its
//! SHA-256 compared with the raw image's.
//!
//! Prints diagnostics on stderr and `BENCH` lines (medians) on stdout.
//! Needs root (losetup). It measures; it never builds.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use warden_agent::image::{write_image, Tuning};
use warden_protocol::image::{ImageRecord, ImageRequest};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Generation and hashing buffer.
const BUF: usize = 4 << 20;
/// Longest random run, in 4 KiB blocks (8 MiB).
const MAX_DATA_BLOCKS: u64 = 2048;
/// Bumped whenever the generator changes, so a cached image is not reused.
const GENERATOR_VERSION: u32 = 1;
const SEED: u64 = 0x5741_5244_454e_0005; // "WARDEN", issue 5

struct Args {
    size_mib: u64,
    zero_pct: u64,
    rounds: usize,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        size_mib: 4096,
        zero_pct: 60,
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
            "--zero-pct" => a.zero_pct = num("--zero-pct")?,
            "--rounds" => a.rounds = usize::try_from(num("--rounds")?)?,
            other => bail!(
                "unknown argument {other:?} (usage: bench-image [--size-mib N] [--zero-pct P] [--rounds N])"
            ),
        }
    }
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(a.zero_pct < 100, "--zero-pct must be below 100");
    ensure!(a.size_mib >= 16, "--size-mib must be at least 16");
    Ok(a)
}

// ---------------------------------------------------------------- the image

/// The generated image and what the benchmark needs to know about it.
struct Image {
    zst: PathBuf,
    zst_bytes: u64,
    /// `sha256:HEX` of the compressed file, as served.
    checksum: String,
    /// SHA-256 hex of the decompressed image.
    raw_sha256: String,
    raw_bytes: u64,
    nonzero_bytes: u64,
}

/// Writes `len` random (or zero) bytes to `out` and `hash`.
fn emit(
    out: &mut impl Write,
    hash: &mut Sha256,
    rng: &mut ChaCha8Rng,
    buf: &mut [u8],
    len: u64,
    random: bool,
) -> Result<()> {
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if random {
            rng.fill_bytes(&mut buf[..n]);
        } else {
            buf[..n].fill(0);
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).context("writing to zstd")?;
        left -= n as u64;
    }
    Ok(())
}

/// Writes the raw image to `out`; returns (SHA-256 hex, non-zero bytes).
fn generate(size: u64, zero_pct: u64, out: &mut impl Write) -> Result<(String, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let max_zero_blocks = (MAX_DATA_BLOCKS * zero_pct / (100 - zero_pct)).max(1);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let (mut at, mut nonzero) = (0u64, 0u64);
    while at < size {
        let data = ((rng.next_u64() % MAX_DATA_BLOCKS + 1) * BLOCK).min(size - at);
        let zero = if zero_pct > 0 {
            (rng.next_u64() % max_zero_blocks + 1) * BLOCK
        } else {
            0
        };
        emit(out, &mut hash, &mut rng, &mut buf, data, true)?;
        at += data;
        nonzero += data;
        let zero = zero.min(size - at);
        emit(out, &mut hash, &mut rng, &mut buf, zero, false)?;
        at += zero;
    }
    Ok((hex::encode(hash.finalize()), nonzero))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The image of these parameters, generated and compressed unless a
/// complete one (its `.meta` written last) is already there.
fn image(dir: &Path, size: u64, zero_pct: u64) -> Result<Image> {
    let stem = format!("image-{}m-z{zero_pct}-g{GENERATOR_VERSION}", size / MIB);
    let zst = dir.join(format!("{stem}.raw.zst"));
    let meta = dir.join(format!("{stem}.meta"));
    if let Ok(text) = std::fs::read_to_string(&meta) {
        let v: serde_json::Value = serde_json::from_str(&text).context("parsing image meta")?;
        let zst_bytes = std::fs::metadata(&zst).map(|m| m.len()).unwrap_or(0);
        if zst_bytes > 0 && v["zst_bytes"].as_u64() == Some(zst_bytes) {
            eprintln!("bench-image: reusing {}", zst.display());
            // Read it once: warm the page cache for every contender alike,
            // and check that the cached file is still what it was.
            let sum = sha256_file(&zst)?;
            ensure!(
                v["checksum"].as_str() == Some(format!("sha256:{sum}").as_str()),
                "{} changed since it was generated; delete it",
                zst.display()
            );
            return Ok(Image {
                zst,
                zst_bytes,
                checksum: format!("sha256:{sum}"),
                raw_sha256: v["raw_sha256"].as_str().unwrap_or_default().to_string(),
                raw_bytes: size,
                nonzero_bytes: v["nonzero_bytes"].as_u64().unwrap_or(0),
            });
        }
    }
    let _ = std::fs::remove_file(&meta);
    let tmp = dir.join(format!("{stem}.raw.zst.tmp"));
    eprintln!(
        "bench-image: generating {} MiB with {zero_pct}% zeros into {} (zstd -3 -T0)",
        size / MIB,
        zst.display()
    );
    let t = Instant::now();
    let mut child = Command::new("zstd")
        .args(["-3", "-T0", "-q", "-f", "-", "-o"])
        .arg(&tmp)
        .stdin(Stdio::piped())
        .spawn()
        .context("running zstd (apt-get install zstd)")?;
    let mut stdin = child.stdin.take().context("zstd stdin")?;
    let generated = generate(size, zero_pct, &mut stdin);
    drop(stdin);
    let st = child.wait().context("waiting for zstd")?;
    let (raw_sha256, nonzero_bytes) = generated?;
    ensure!(st.success(), "zstd -3 -T0 -o {} failed", tmp.display());
    std::fs::rename(&tmp, &zst).with_context(|| format!("renaming {}", tmp.display()))?;
    let sum = sha256_file(&zst)?;
    let zst_bytes = std::fs::metadata(&zst)?.len();
    let meta_json = serde_json::json!({
        "size": size, "zero_pct": zero_pct, "seed": SEED, "generator": GENERATOR_VERSION,
        "checksum": format!("sha256:{sum}"), "raw_sha256": raw_sha256,
        "nonzero_bytes": nonzero_bytes, "zst_bytes": zst_bytes,
    });
    std::fs::write(&meta, meta_json.to_string())
        .with_context(|| format!("writing {}", meta.display()))?;
    eprintln!(
        "bench-image: generated in {:.1} s: {zst_bytes} bytes compressed",
        t.elapsed().as_secs_f64()
    );
    Ok(Image {
        zst,
        zst_bytes,
        checksum: format!("sha256:{sum}"),
        raw_sha256,
        raw_bytes: size,
        nonzero_bytes,
    })
}

// ---------------------------------------------------------------- the server

/// Serves `file` on 127.0.0.1 for the life of the process; returns its URL.
fn start_server(file: &Path) -> Result<String> {
    let port = warden_qemu_tests::http::serve_file(file)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(format!("http://127.0.0.1:{port}/{name}"))
}

// ---------------------------------------------------------------- the target

/// A loop device over a file; detached and the file removed on drop.
struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    fn new(file: &Path, size: u64) -> Result<Loop> {
        let _ = std::fs::remove_file(file);
        std::fs::File::create(file)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", file.display()))?;
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
        })
    }

    /// Zeroes the whole device (BLKZEROOUT; on a loop device the backing
    /// file's blocks are punched out), so it reads as zero.
    fn zero(&self) -> Result<()> {
        let st = Command::new("blkdiscard")
            .args(["-z", &self.dev])
            .status()
            .context("running blkdiscard")?;
        ensure!(st.success(), "blkdiscard -z {} failed", self.dev);
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// SHA-256 hex of the first `len` bytes of `dev`, read with `dd iflag=direct`.
fn device_sha256(dev: &str, len: u64) -> Result<String> {
    let mut child = Command::new("dd")
        .args([
            &format!("if={dev}"),
            "bs=4M",
            "iflag=direct,count_bytes",
            &format!("count={len}"),
            "status=none",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("running dd")?;
    let mut out = child.stdout.take().context("dd stdout")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    ensure!(child.wait()?.success(), "reading back {dev} failed");
    Ok(hex::encode(h.finalize()))
}

// ---------------------------------------------------------------- contenders

/// Seconds for a `bash -o pipefail -c SCRIPT`.
fn shell(script: &str) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .status()
        .context("running bash")?;
    ensure!(st.success(), "`{script}` failed");
    Ok(t.elapsed().as_secs_f64())
}

fn anchor_dd(url: &str, dev: &str) -> Result<f64> {
    shell(&format!(
        "curl -s {url} | zstd -d | dd of={dev} bs=4M oflag=direct status=none"
    ))
}

fn anchor_sparse(url: &str, dev: &str) -> Result<f64> {
    shell(&format!(
        "curl -s {url} | zstd -d | dd of={dev} bs=4M iflag=fullblock oflag=direct conv=sparse status=none"
    ))
}

fn anchor_dd_zero(dev: &str, size: u64) -> Result<f64> {
    shell(&format!(
        "dd if=/dev/zero of={dev} bs=4M oflag=direct count={} status=none",
        size / (4 * MIB)
    ))
}

/// The image as qcow2 (`qemu-img convert -O qcow2`, no compression: what a
/// cloud image store serves), made once from the raw.zst and kept.
struct Qcow2Image {
    path: PathBuf,
    bytes: u64,
    checksum: String,
}

fn qcow2_image(img: &Image) -> Result<Qcow2Image> {
    let path = img.zst.with_extension("").with_extension("qcow2");
    let meta = path.with_extension("qcow2.meta");
    let source = img.checksum.clone();
    if let Ok(text) = std::fs::read_to_string(&meta) {
        let v: serde_json::Value = serde_json::from_str(&text).context("parsing qcow2 meta")?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if v["from"].as_str() == Some(source.as_str()) && v["bytes"].as_u64() == Some(bytes) {
            let sum = sha256_file(&path)?;
            ensure!(
                v["checksum"].as_str() == Some(format!("sha256:{sum}").as_str()),
                "{} changed since it was made; delete it",
                path.display()
            );
            return Ok(Qcow2Image {
                path,
                bytes,
                checksum: format!("sha256:{sum}"),
            });
        }
    }
    let _ = std::fs::remove_file(&meta);
    let raw = img.zst.with_extension("tmp-raw");
    eprintln!(
        "bench-image: making {} (zstd -d --sparse, qemu-img convert -O qcow2)",
        path.display()
    );
    shell(&format!(
        "zstd -d -q -f --sparse {} -o {} && qemu-img convert -f raw -O qcow2 {} {}.tmp && mv {}.tmp {} && rm -f {}",
        img.zst.display(),
        raw.display(),
        raw.display(),
        path.display(),
        path.display(),
        path.display(),
        raw.display()
    ))?;
    let sum = sha256_file(&path)?;
    let bytes = std::fs::metadata(&path)?.len();
    std::fs::write(
        &meta,
        serde_json::json!({"from": source, "bytes": bytes, "checksum": format!("sha256:{sum}")})
            .to_string(),
    )?;
    Ok(Qcow2Image {
        path,
        bytes,
        checksum: format!("sha256:{sum}"),
    })
}

/// ironic-python-agent's path for qcow2: download to a file, then convert
/// onto the disk (`qemu-img convert -t directsync -W -O raw`), then delete.
fn anchor_ipa(url: &str, dev: &str, dir: &Path) -> Result<f64> {
    let dl = dir.join("ipa-download.qcow2");
    let t = shell(&format!(
        "curl -s -o {dl} {url} && qemu-img convert -t directsync -W -O raw {dl} {dev}",
        dl = dl.display()
    ));
    let _ = std::fs::remove_file(&dl);
    t
}

/// One agent run, in a child process.
struct WardenRun {
    secs: f64,
    record: ImageRecord,
    vmhwm_kib: u64,
    /// (stage, CPU seconds, seconds waiting for a CPU, seconds alive) per
    /// pipeline thread.
    threads: Vec<(String, f64, f64, f64)>,
}

fn warden(url: &str, checksum: &str, dev: &str, reads_zero: bool) -> Result<WardenRun> {
    let exe = std::env::current_exe().context("locating bench-image")?;
    let t = Instant::now();
    let out = Command::new(exe)
        .args(["--child", url, checksum, dev, &reads_zero.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running bench-image --child")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "the agent's image write failed (above)"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing the child's report")?;
    let record: ImageRecord =
        serde_json::from_value(v["record"].clone()).context("parsing the image record")?;
    let threads = v["threads"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t[0].as_str().unwrap_or("?").to_string(),
                        t[1].as_f64().unwrap_or(0.0),
                        t[2].as_f64().unwrap_or(0.0),
                        t[3].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(WardenRun {
        secs,
        record,
        vmhwm_kib: v["vmhwm_kib"].as_u64().unwrap_or(0),
        threads,
    })
}

// ---------------------------------------------------------------- the child

/// (nanoseconds on a CPU, nanoseconds runnable but waiting for one) of
/// each thread of this process, by tid (`/proc/self/task/*/schedstat`).
fn thread_cpu() -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        let mut f = text.split_whitespace().map(|n| n.parse::<u64>().ok());
        if let (Some(Some(cpu)), Some(Some(wait))) = (f.next(), f.next()) {
            out.insert(tid, (cpu, wait));
        }
    }
    out
}

/// The name of this process's thread `tid` (`/proc/self/task/TID/comm`).
fn comm(tid: u64) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

fn vmhwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `--child URL CHECKSUM TARGET READS_ZERO`: `write_image` as the agent
/// calls it; prints the record, the peak RSS and per-thread CPU as JSON.
fn child(mut it: impl Iterator<Item = String>) -> Result<()> {
    let mut next = |what: &str| it.next().with_context(|| format!("--child needs {what}"));
    let req = ImageRequest {
        url: next("URL")?,
        checksum: next("CHECKSUM")?.parse()?,
        signature: None,
        https_trust: None,
        target: next("TARGET")?,
        target_reads_zero: next("READS_ZERO")? == "true",
        verify_after_write: false,
        bmap: None,
    };
    // Sample the threads' CPU time while they live: the pipeline's threads
    // are gone (and their counters with them) once write_image returns.
    let known = thread_cpu();
    let stop = Arc::new(AtomicBool::new(false));
    type Seen = BTreeMap<u64, ((u64, u64), Instant, Instant, String)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sampler = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let me = nix::unistd::gettid().as_raw() as u64;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if let Ok(mut seen) = seen.lock() {
                    for (tid, ns) in thread_cpu() {
                        if tid == me || known.contains_key(&tid) {
                            continue;
                        }
                        let e = seen.entry(tid).or_insert((ns, now, now, String::new()));
                        e.0 = ns;
                        e.2 = now;
                        // Read again each time: a new thread shows its
                        // creator's name until it has set its own.
                        let name = comm(tid);
                        if !name.is_empty() {
                            e.3 = name;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let result = write_image(&req, &Tuning::default());
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let record = result.map_err(anyhow::Error::new)?;
    // The pipeline names its threads (`image-download`, `image-hash`,
    // `image-decode`, `image-write`); one without a name of its own (a
    // runtime helper) keeps the process's and is shown by its tid.
    let own = comm(u64::from(std::process::id()));
    let threads: Vec<serde_json::Value> = seen
        .lock()
        .map(|s| {
            s.iter()
                .map(|(tid, ((cpu, wait), first, last, name))| {
                    let name = match name.strip_prefix("image-") {
                        Some(stage) => stage.to_string(),
                        None if *name == own => format!("thread-{tid}"),
                        None => name.clone(),
                    };
                    serde_json::json!([
                        name,
                        *cpu as f64 / 1e9,
                        *wait as f64 / 1e9,
                        (*last - *first).as_secs_f64()
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    let report = serde_json::json!({
        "record": record,
        "vmhwm_kib": vmhwm_kib(),
        "threads": threads,
    });
    println!("{report}");
    Ok(())
}

// ---------------------------------------------------------------- main

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn check_tools() -> Result<()> {
    for (tool, pkg) in [
        ("curl", "curl"),
        ("zstd", "zstd"),
        ("dd", "coreutils"),
        ("losetup", "mount"),
        ("blkdiscard", "util-linux"),
        ("qemu-img", "qemu-utils"),
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

fn stages(run: &WardenRun) -> String {
    run.threads
        .iter()
        .map(|(n, cpu, wait, alive)| {
            format!("{n} {cpu:.2} s on CPU + {wait:.2} s waiting for one, of {alive:.2} s")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> Result<()> {
    let mut it = std::env::args().skip(1).peekable();
    if it.peek().map(String::as_str) == Some("--child") {
        it.next();
        return child(it);
    }
    let args = parse_args(it)?;
    check_tools()?;
    let size = args.size_mib * MIB;
    let dir = warden_qemu_tests::workspace_root().join("build/bench/image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let img = image(&dir, size, args.zero_pct)?;
    let url = start_server(&img.zst)?;
    let target = Loop::new(&dir.join("target.img"), size)?;
    let dev = target.dev.as_str();
    eprintln!(
        "bench-image: {} ({} bytes, {:.1}% of the {} MiB image non-zero, {}) served at {url}; target {dev} (loop, direct I/O) over {}",
        img.zst.display(),
        img.zst_bytes,
        img.nonzero_bytes as f64 * 100.0 / img.raw_bytes as f64,
        size / MIB,
        img.checksum,
        target.file.display()
    );
    // Warm-up: the medium once, the server and the pipeline once.
    target.zero()?;
    anchor_dd_zero(dev, size)?;
    target.zero()?;
    anchor_dd(&url, dev)?;

    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    let (mut a_dd, mut w_full, mut a_sparse, mut w_sparse, mut a_zero) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut peak_kib = 0u64;
    let mut rss = vec![];
    for round in 0..args.rounds {
        let mut order = [0, 1, 2, 3, 4];
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            target.zero()?;
            match which {
                0 => a_dd.push(anchor_dd(&url, dev)?),
                2 => a_sparse.push(anchor_sparse(&url, dev)?),
                4 => a_zero.push(anchor_dd_zero(dev, size)?),
                _ => {
                    let reads_zero = which == 3;
                    let run = warden(&url, &img.checksum, dev, reads_zero)?;
                    let r = &run.record;
                    eprintln!(
                        "bench-image: round {} warden target_reads_zero={reads_zero}: {:.2} s (record: total {} ms, download {} ms, written {}, skipped {}, direct_io {}), VmHWM {} KiB; threads: {}",
                        round + 1,
                        run.secs,
                        r.total_ms,
                        r.download_ms,
                        r.bytes_written,
                        r.zero_bytes_skipped,
                        r.direct_io,
                        run.vmhwm_kib,
                        stages(&run)
                    );
                    ensure!(
                        r.image_bytes == size,
                        "the agent decoded {} bytes, the image has {size}",
                        r.image_bytes
                    );
                    if round == 0 {
                        let got = device_sha256(dev, size)?;
                        ensure!(
                            got == img.raw_sha256,
                            "{dev} after the agent's write (target_reads_zero={reads_zero}) reads sha256:{got}, the image is sha256:{}",
                            img.raw_sha256
                        );
                        eprintln!("bench-image: read back {dev}: matches the raw image");
                    }
                    peak_kib = peak_kib.max(run.vmhwm_kib);
                    rss.push(run.vmhwm_kib as f64);
                    if reads_zero {
                        w_sparse.push(run.secs);
                    } else {
                        w_full.push(run.secs);
                    }
                }
            }
        }
        let last = |v: &Vec<f64>| v.last().copied().unwrap_or(0.0);
        eprintln!(
            "bench-image: round {}: curl|zstd|dd {:.2} s, warden {:.2} s; dd conv=sparse {:.2} s, warden skipping zeros {:.2} s; dd zeros {:.0} MB/s",
            round + 1,
            last(&a_dd),
            last(&w_full),
            last(&a_sparse),
            last(&w_sparse),
            mb(size, last(&a_zero))
        );
    }
    let (a_dd, w_full, a_sparse, w_sparse, a_zero) = (
        median(a_dd),
        median(w_full),
        median(a_sparse),
        median(w_sparse),
        median(a_zero),
    );
    println!(
        "BENCH image-zst: warden {w_full:.2} s, anchor curl|zstd|dd {a_dd:.2} s, ratio {:.2} (goal <= 0.7)",
        w_full / a_dd
    );
    println!(
        "BENCH image-zst-reads-zero: warden {w_sparse:.2} s (target_reads_zero=true), anchor curl|zstd|dd {a_dd:.2} s, ratio {:.2} (goal <= 0.7)",
        w_sparse / a_dd
    );
    println!(
        "BENCH image-zst-vs-sparse-dd: warden {w_sparse:.2} s, anchor curl|zstd|dd-conv=sparse {a_sparse:.2} s, ratio {:.2} (goal <= 1.0)",
        w_sparse / a_sparse
    );
    let (w_rate, d_rate) = (mb(img.nonzero_bytes, w_sparse), mb(size, a_zero));
    println!(
        "BENCH image-nonzero-rate: warden {w_rate:.0} MB/s, anchor dd-zero {d_rate:.0} MB/s, ratio {:.2} (goal >= 0.9)",
        w_rate / d_rate
    );
    let peak_mib = peak_kib as f64 / 1024.0;
    println!(
        "BENCH image-peak-rss: warden {peak_mib:.1} MiB, anchor (goal) 64 MiB, ratio {:.2} (goal <= 1.0)",
        peak_mib / 64.0
    );
    eprintln!(
        "bench-image: peak RSS is the highest VmHWM of {} agent runs (median {:.1} MiB)",
        rss.len(),
        median(rss) / 1024.0
    );

    // qcow2: the agent streams it; IPA downloads it, then converts it.
    let q = qcow2_image(&img)?;
    let qurl = start_server(&q.path)?;
    eprintln!(
        "bench-image: {} ({} bytes, {}) served at {qurl}",
        q.path.display(),
        q.bytes,
        q.checksum
    );
    let (mut a_ipa, mut w_q, mut w_q_zeros) = (vec![], vec![], vec![]);
    for round in 0..args.rounds {
        target.zero()?;
        a_ipa.push(anchor_ipa(&qurl, dev, &dir)?);
        for reads_zero in [true, false] {
            target.zero()?;
            let run = warden(&qurl, &q.checksum, dev, reads_zero)?;
            let r = &run.record;
            ensure!(
                r.image_bytes == size,
                "the agent decoded {} bytes of qcow2, the image has {size}",
                r.image_bytes
            );
            if round == 0 {
                let got = device_sha256(dev, size)?;
                ensure!(
                    got == img.raw_sha256,
                    "{dev} after the agent's qcow2 write reads sha256:{got}, the image is sha256:{}",
                    img.raw_sha256
                );
                eprintln!("bench-image: read back {dev} after qcow2: matches the raw image");
            }
            peak_kib = peak_kib.max(run.vmhwm_kib);
            eprintln!(
                "bench-image: round {} qcow2 target_reads_zero={reads_zero}: warden {:.2} s, VmHWM {} KiB; threads: {}",
                round + 1,
                run.secs,
                run.vmhwm_kib,
                stages(&run)
            );
            if reads_zero {
                w_q.push(run.secs);
            } else {
                w_q_zeros.push(run.secs);
            }
        }
        eprintln!(
            "bench-image: round {}: IPA download+convert {:.2} s",
            round + 1,
            a_ipa.last().copied().unwrap_or(0.0)
        );
    }
    let (a_ipa, w_q, w_q_zeros) = (median(a_ipa), median(w_q), median(w_q_zeros));
    println!(
        "BENCH image-qcow2: warden {w_q:.2} s (target_reads_zero=true, as after a verified wipe), anchor curl-to-file+qemu-img-convert-directsync-W {a_ipa:.2} s, ratio {:.2} (goal <= 0.6)",
        w_q / a_ipa
    );
    println!(
        "BENCH image-qcow2-writes-zeros: warden {w_q_zeros:.2} s (target_reads_zero=false), anchor curl-to-file+qemu-img-convert-directsync-W {a_ipa:.2} s, ratio {:.2} (goal <= 0.6)",
        w_q_zeros / a_ipa
    );
    println!(
        "BENCH image-peak-rss-with-qcow2: warden {:.1} MiB, anchor (goal) 64 MiB, ratio {:.2} (goal <= 1.0)",
        peak_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0 / 64.0
    );
    Ok(())
}
