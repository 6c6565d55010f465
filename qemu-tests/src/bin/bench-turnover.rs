//! `bench-turnover`: one whole lease turnover of a netbooted QEMU node with
//! a 4 GiB NVMe disk, timed part by part, against the goal of issue #9:
//! total ≤ 1.25 × (boot + wipe + image).
//!
//! The run, with real parts only (as `warden-demo`): the Warden server with
//! network boot, an HTTP image store, nbdkit (file plugin) as the block
//! store, and a QEMU node (OVMF, swtpm, iPXE → the ramdisk UKI) whose NVMe
//! disk holds the previous tenant's data.
//!
//! - The previous tenant's disk: `--disk-mib` (default 4096) MiB, a sparse
//!   file with `--old-data-mib` (default 256) MiB of random data (ChaCha8,
//!   fixed seed) in 4 MiB chunks spread evenly over the disk, fresh for
//!   every round.
//! - The tenant image: `build/images/tenant.raw` (the bootable 64 MiB GPT
//!   disk: ESP with the kernel, initrd and BLS entry) grown to the disk's
//!   size (backup GPT moved to the end) with a third partition,
//!   `tenant-data`, of `--image-data-mib` (default 1024) MiB of random
//!   data, compressed with `zstd -3`. Generated once into
//!   `build/bench/turnover/` and reused while its inputs stay the same (its
//!   `.meta` holds the served and the raw SHA-256).
//! - Untimed set-up: a first boot enrolls the node, is refused (no policy)
//!   and a policy is learned from it, as the owner would.
//! - Each round: a fresh previous-tenant disk and a fresh sparse export,
//!   then `wardenctl turnover --snapshot-to nbd://… --wipe auto --image …
//!   --handoff kexec`, and the node boots again with the same TPM.
//!
//! Every part is timed on the host's clock from the moment the bench first
//! sees a console line (polled every 25 ms): boot (QEMU start → boot
//! verdict), attest (Hello state → boot verdict: hello, enroll, quote,
//! verdict), snapshot / wipe / image (entry of the state → entry of the
//! next state: the step, its measurement and its report to the server),
//! final attest (FinalAttest → Handoff state), handoff (Handoff state →
//! the tenant's `TENANT-BOOTED`), total (QEMU start → `TENANT-BOOTED`).
//! The signed report's `steps` (the agent's own `duration_ms`) are printed
//! next to the console figures as a cross-check.
//!
//! The network (`--net`): `user` (default) is QEMU's user networking, the
//! servers on loopback as 10.0.2.2 and iPXE fetching the boot script from
//! the server; `bridge` is the production-like path of the dnsmasq netboot
//! test — a network namespace the bench creates (and removes) with a bridge
//! and a tap, the Warden server, nbdkit and the image server listening on
//! the bridge, dnsmasq answering PXE and the iPXE user class, and QEMU on
//! the tap (virtio-net with the tap's offloads), so the node's network is
//! not slirp's.
//!
//! Each round also checks what it timed: the report verifies and says
//! `ok`, and the snapshot on the export equals the old disk (SHA-256).
//! Prints diagnostics on stderr and `BENCH` lines (medians over rounds) on
//! stdout. It measures; it never builds (scripts/bench does that).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};
use warden_protocol::snapshot::{
    export_bytes_needed, manifest_len, DEFAULT_CHUNK_SIZE, MAX_IDENTITY,
};
use warden_qemu_tests::interrupt;
use warden_qemu_tests::netns::{self, Dnsmasq, NetNs};
use warden_qemu_tests::node::{create_sparse, BOOT_TIMEOUT};
use warden_qemu_tests::turnover::{token, Nbdkit};
use warden_qemu_tests::{ramdisk_dir, DiskBus, Node, NodeBuilder, QemuLock, Server};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const CHUNK_LEN: usize = 4 << 20;
const SECTOR: u64 = 512;
/// "WARDEN", issue 9; the image and the old disk use different streams.
const SEED_IMAGE: u64 = 0x5741_5244_454e_0009;
const SEED_OLD_DISK: u64 = 0x5741_5244_454e_0109;
/// Bumped whenever the image recipe changes, so a cached image is rebuilt.
const RECIPE: u64 = 1;
/// The data partition's GUID, fixed like the others in the tenant image
/// (docs/tenant-images.md), so the image is the same bytes every time.
const DATA_PART_GUID: &str = "57415244-454e-4000-8000-000000000103";
/// The kernel arguments of every boot: end QEMU when the agent gives up or
/// finishes, so a failed run ends instead of waiting for the timeout.
const EXTRA_CMDLINE: &str = "warden.on_error=poweroff warden.done=poweroff";
/// How often the console is read for new lines (the timing resolution).
const POLL: Duration = Duration::from_millis(25);

struct Args {
    rounds: usize,
    disk_mib: u64,
    old_data_mib: u64,
    image_data_mib: u64,
    /// The node's vCPUs (`-smp`), the same for every boot of the run.
    smp: u32,
    timeout: Duration,
    /// `--net bridge`: the namespace's bridge and a tap; else user net.
    bridge: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        rounds: 1,
        disk_mib: 4096,
        old_data_mib: 256,
        image_data_mib: 1024,
        smp: 1,
        timeout: Duration::from_secs(3600),
        bridge: false,
    };
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{what} needs a number"))?
                .parse()
                .with_context(|| format!("{what} needs a number"))
        };
        match arg.as_str() {
            "--rounds" => a.rounds = usize::try_from(num("--rounds")?)?,
            "--disk-mib" => a.disk_mib = num("--disk-mib")?,
            "--old-data-mib" => a.old_data_mib = num("--old-data-mib")?,
            "--image-data-mib" => a.image_data_mib = num("--image-data-mib")?,
            "--smp" => a.smp = u32::try_from(num("--smp")?)?,
            "--timeout-min" => a.timeout = Duration::from_secs(60 * num("--timeout-min")?),
            "--net" => {
                a.bridge = match it.next().as_deref() {
                    Some("user") => false,
                    Some("bridge") => true,
                    other => bail!("--net needs user or bridge, not {other:?}"),
                }
            }
            other => bail!(
                "unknown argument {other:?} (usage: bench-turnover [--rounds N] [--disk-mib N] \
                 [--old-data-mib N] [--image-data-mib N] [--smp N] [--timeout-min N] \
                 [--net user|bridge])"
            ),
        }
    }
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(a.smp >= 1, "--smp must be at least 1");
    ensure!(
        a.disk_mib >= 256 && a.disk_mib % 4 == 0,
        "--disk-mib must be a multiple of 4, at least 256"
    );
    ensure!(
        a.old_data_mib % 4 == 0 && a.old_data_mib >= 4 && a.old_data_mib <= a.disk_mib,
        "--old-data-mib must be a multiple of 4 between 4 and --disk-mib"
    );
    // The tenant's 64 MiB GPT disk comes first, and the backup GPT needs
    // the last MiB.
    ensure!(
        a.image_data_mib >= 4 && a.image_data_mib % 4 == 0 && a.image_data_mib + 65 <= a.disk_mib,
        "--image-data-mib must be a multiple of 4, at least 4 and at most --disk-mib - 65"
    );
    Ok(a)
}

// ------------------------------------------------------------------ data

/// SHA-256 (hex) of the first `len` bytes of `path` (all of it: `u64::MAX`).
fn sha256_file(path: &Path, len: u64) -> Result<String> {
    let mut f = File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_LEN];
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

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The generated tenant image as served.
struct Image {
    zst: PathBuf,
    sha256: String,
    zst_bytes: u64,
    data_bytes: u64,
}

/// Builds (or reuses) the tenant image of `disk_bytes` with `data_mib` MiB
/// of random data in its third partition; see the module doc.
fn tenant_image(dir: &Path, disk_bytes: u64, data_mib: u64) -> Result<Image> {
    let images = warden_qemu_tests::workspace_root().join("build/images");
    let base = images.join("tenant.raw");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(images.join("manifest.json"))
            .context("build/images/manifest.json (run scripts/build-images)")?,
    )
    .context("parsing build/images/manifest.json")?;
    let base_sha = manifest["files"]["tenant.raw"]["sha256"]
        .as_str()
        .context("build/images/manifest.json names no sha256 for tenant.raw")?
        .to_owned();
    let data_bytes = data_mib * MIB;
    let stem = format!("tenant-{}m-data{data_mib}m", disk_bytes / MIB);
    let zst = dir.join(format!("{stem}.raw.zst"));
    let meta = dir.join(format!("{stem}.meta"));
    if let Ok(text) = std::fs::read_to_string(&meta) {
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", meta.display()))?;
        let zst_bytes = std::fs::metadata(&zst).map(|m| m.len()).unwrap_or(0);
        if v["recipe"] == RECIPE
            && v["base_sha256"] == base_sha.as_str()
            && v["zst_bytes"] == zst_bytes
        {
            if let Some(sha) = v["zst_sha256"].as_str() {
                eprintln!(
                    "bench: reusing {} ({zst_bytes} bytes, sha256 {sha})",
                    zst.display()
                );
                return Ok(Image {
                    zst,
                    sha256: sha.to_owned(),
                    zst_bytes,
                    data_bytes,
                });
            }
        }
    }
    let _ = std::fs::remove_file(&meta);
    eprintln!(
        "bench: generating {} ({} MiB disk, {data_mib} MiB random data)",
        zst.display(),
        disk_bytes / MIB
    );
    let raw = dir.join(format!("{stem}.raw"));
    let _ = std::fs::remove_file(&raw);
    create_sparse(&raw, disk_bytes)?;
    let base_bytes = std::fs::read(&base).with_context(|| format!("reading {}", base.display()))?;
    let out = OpenOptions::new()
        .write(true)
        .open(&raw)
        .with_context(|| format!("opening {}", raw.display()))?;
    out.write_all_at(&base_bytes, 0)
        .with_context(|| format!("writing {}", raw.display()))?;
    drop(out);
    let raw_str = raw
        .to_str()
        .with_context(|| format!("{} is not UTF-8", raw.display()))?;
    // The tenant disk's backup GPT sits at its 64 MiB end: move it to the
    // new end, then add the data partition right after the old disk.
    run(Command::new("sgdisk").args(["-e", raw_str]), "sgdisk -e")?;
    let base_len = u64::try_from(base_bytes.len())?;
    let first = base_len / SECTOR;
    let last = first + data_bytes / SECTOR - 1;
    run(
        Command::new("sgdisk")
            .arg(format!("--new=3:{first}:{last}"))
            .arg("--typecode=3:8300")
            .arg(format!("--partition-guid=3:{DATA_PART_GUID}"))
            .arg("--change-name=3:tenant-data")
            .arg(raw_str),
        "sgdisk --new=3",
    )?;
    let out = OpenOptions::new()
        .write(true)
        .open(&raw)
        .with_context(|| format!("opening {}", raw.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_IMAGE);
    let mut buf = vec![0u8; CHUNK_LEN];
    for i in 0..data_bytes / CHUNK {
        rng.fill_bytes(&mut buf);
        out.write_all_at(&buf, base_len + i * CHUNK)
            .with_context(|| format!("writing {}", raw.display()))?;
    }
    out.sync_all()?;
    drop(out);
    let raw_sha = sha256_file(&raw, u64::MAX)?;
    run(
        Command::new("zstd")
            .args(["-3", "-T0", "-q", "-f", raw_str, "-o"])
            .arg(&zst),
        "zstd -3",
    )?;
    let _ = std::fs::remove_file(&raw);
    let zst_sha = sha256_file(&zst, u64::MAX)?;
    let zst_bytes = std::fs::metadata(&zst)?.len();
    let meta_json = serde_json::json!({
        "recipe": RECIPE,
        "base_sha256": base_sha,
        "disk_bytes": disk_bytes,
        "data_bytes": data_bytes,
        "raw_sha256": raw_sha,
        "zst_sha256": zst_sha,
        "zst_bytes": zst_bytes,
    });
    std::fs::write(&meta, meta_json.to_string())
        .with_context(|| format!("writing {}", meta.display()))?;
    eprintln!(
        "bench: {} is {zst_bytes} bytes, sha256 {zst_sha} (raw {raw_sha})",
        zst.display()
    );
    Ok(Image {
        zst,
        sha256: zst_sha,
        zst_bytes,
        data_bytes,
    })
}

/// The previous tenant's disk: a sparse file of `disk_bytes` with
/// `data_mib` MiB of random 4 MiB chunks spread evenly. Returns its SHA-256.
fn previous_tenant_disk(path: &Path, disk_bytes: u64, data_mib: u64) -> Result<String> {
    let _ = std::fs::remove_file(path);
    create_sparse(path, disk_bytes)?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let chunks = data_mib * MIB / CHUNK;
    let stride = disk_bytes / chunks / CHUNK * CHUNK;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_OLD_DISK);
    let mut buf = vec![0u8; CHUNK_LEN];
    for i in 0..chunks {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, i * stride)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all()?;
    sha256_file(path, disk_bytes)
}

// --------------------------------------------------------------- console

/// Every agent event with the host time the bench first saw it, and when
/// the tenant's `TENANT-BOOTED` line appeared.
#[derive(Default)]
struct Timeline {
    events: Vec<(Value, Instant)>,
    tenant: Option<Instant>,
}

impl Timeline {
    /// When the state machine entered `to`.
    fn state(&self, to: &str) -> Option<Instant> {
        self.events
            .iter()
            .find(|(e, _)| e["event"] == "state" && e["to"] == to)
            .map(|(_, t)| *t)
    }

    /// The verdict of `phase` (`boot` or `handoff`) and when it came.
    fn verdict(&self, phase: &str) -> Option<(&Value, Instant)> {
        self.events
            .iter()
            .find(|(e, _)| e["event"] == "verdict" && e["phase"] == phase)
            .map(|(e, t)| (e, *t))
    }

    fn find(&self, name: &str) -> Option<&Value> {
        self.events
            .iter()
            .find(|(e, _)| e["event"] == name)
            .map(|(e, _)| e)
    }
}

/// Keeps the node's logs and returns an error that names them.
fn failed(node: &Node, why: String) -> anyhow::Error {
    match node.keep_logs() {
        Ok(dir) => anyhow::anyhow!("{why}; console and logs kept in {}", dir.display()),
        Err(e) => anyhow::anyhow!("{why}; could not keep the logs: {e:#}"),
    }
}

/// Reads the console every [`POLL`] until the tenant says `TENANT-BOOTED`
/// (or `until_verdict`: until the boot verdict), timestamping each event as
/// it appears. Fails on a `fatal` event, on QEMU exiting first, or after
/// `timeout`.
fn follow(node: &mut Node, timeout: Duration, until_verdict: bool) -> Result<Timeline> {
    let deadline = Instant::now() + timeout;
    let mut tl = Timeline::default();
    loop {
        interrupt::check()?;
        let ended = node.exited()?.is_some();
        let events = node.events();
        let now = Instant::now();
        for e in events.iter().skip(tl.events.len()) {
            if let Some(s) = describe(e) {
                eprintln!(
                    "bench:   {:>8.2} s  {s}",
                    now.duration_since(node.started_at()).as_secs_f64()
                );
            }
            tl.events.push((e.clone(), now));
        }
        // The enrollment boot's verdict is a refusal, and the agent then
        // gives up (a `fatal` line): that is the expected end there.
        if until_verdict && tl.verdict("boot").is_some() {
            return Ok(tl);
        }
        if let Some(f) = tl.find("fatal") {
            let why = format!("the agent failed: {f}");
            return Err(failed(node, why));
        }
        if tl.state("Handoff").is_some()
            && node
                .console_text()
                .lines()
                .any(|l| l.contains("TENANT-BOOTED"))
        {
            tl.tenant = Some(now);
            eprintln!(
                "bench:   {:>8.2} s  TENANT-BOOTED",
                now.duration_since(node.started_at()).as_secs_f64()
            );
            return Ok(tl);
        }
        if ended {
            return Err(failed(node, "QEMU exited before the run ended".into()));
        }
        if Instant::now() > deadline {
            return Err(failed(
                node,
                format!("the run did not end within {timeout:?}"),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// A short line for the progress log: state changes and results.
fn describe(e: &Value) -> Option<String> {
    match e["event"].as_str()? {
        "state" => Some(format!(
            "{} → {}",
            e["from"].as_str().unwrap_or("?"),
            e["to"].as_str().unwrap_or("?")
        )),
        "verdict" => Some(format!("verdict {} ({})", e["status"], e["phase"])),
        "wipe_result" => Some(format!(
            "wipe {} by {} ({} bytes written)",
            e["status"], e["method"], e["bytes_written"]
        )),
        "image_result" => Some(format!(
            "image: {} bytes written, {} zero bytes skipped",
            e["bytes_written"], e["zero_bytes_skipped"]
        )),
        _ => None,
    }
}

// ----------------------------------------------------------------- rounds

/// One round's figures, in seconds.
#[derive(Clone, Debug, Default)]
struct Parts {
    boot: f64,
    attest: f64,
    snapshot: f64,
    wipe: f64,
    image: f64,
    final_attest: f64,
    handoff: f64,
    total: f64,
    /// The signed report's steps: name, the agent's duration (s), bytes.
    steps: Vec<(String, f64, u64)>,
}

impl Parts {
    fn report_step(&self, name: &str) -> Option<(f64, u64)> {
        self.steps
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, s, b)| (*s, *b))
    }
}

fn between(a: Option<Instant>, b: Option<Instant>, what: &str) -> Result<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b >= a => Ok((b - a).as_secs_f64()),
        _ => bail!("the console does not show {what}"),
    }
}

fn parts(tl: &Timeline, started: Instant) -> Result<Parts> {
    let verdict = tl.verdict("boot").map(|(_, t)| t);
    Ok(Parts {
        boot: between(Some(started), verdict, "the boot verdict")?,
        attest: between(tl.state("Hello"), verdict, "Hello → verdict")?,
        snapshot: between(tl.state("Snapshot"), tl.state("Wipe"), "Snapshot → Wipe")?,
        wipe: between(tl.state("Wipe"), tl.state("Image"), "Wipe → Image")?,
        image: between(tl.state("Image"), tl.state("Ready"), "Image → Ready")?,
        final_attest: between(
            tl.state("FinalAttest"),
            tl.state("Handoff"),
            "FinalAttest → Handoff",
        )?,
        handoff: between(tl.state("Handoff"), tl.tenant, "Handoff → TENANT-BOOTED")?,
        total: between(Some(started), tl.tenant, "TENANT-BOOTED")?,
        steps: Vec::new(),
    })
}

fn wardenctl_as(server: &Server, token: &Path, args: &[&str]) -> Result<String> {
    let out = server.wardenctl_as(token, args)?;
    ensure!(
        out.status.success(),
        "wardenctl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// How the node reaches the servers and boots.
enum Net {
    /// User networking: iPXE fetches this boot script URL; the servers are
    /// 10.0.2.2.
    User { netboot: String },
    /// The bridge of this namespace: QEMU on its tap, dnsmasq's PXE.
    Bridge { netns: String },
}

impl Net {
    /// A node on this network.
    fn node(&self, name: &str) -> NodeBuilder {
        match self {
            Net::User { netboot } => NodeBuilder::new(name).netboot(netboot),
            Net::Bridge { netns } => NodeBuilder::new(name).tap(netns, netns::TAP),
        }
    }

    /// The servers' address as the node sees it.
    fn host(&self) -> String {
        match self {
            Net::User { .. } => "10.0.2.2".into(),
            Net::Bridge { .. } => netns::HOST_IP.to_string(),
        }
    }

    /// nbdkit serving `file` where the node reaches it.
    fn nbdkit(&self, file: &Path) -> Nbdkit {
        match self {
            Net::User { .. } => Nbdkit::start(file),
            Net::Bridge { netns } => Nbdkit::start_in_netns(file, netns, netns::HOST_IP),
        }
    }
}

/// What stays the same across rounds.
struct Setup<'a> {
    server: &'a Server,
    work: &'a Path,
    net: &'a Net,
    node_id: String,
    owner: PathBuf,
    lessee: PathBuf,
    image_url: String,
    image: &'a Image,
    disk_bytes: u64,
    old_data_mib: u64,
    smp: u32,
    timeout: Duration,
}

/// One turnover: fresh disk and export, a plan, the boot, the report and
/// the checks. Returns the figures and the powered-off node (whose TPM the
/// next round boots with).
fn round(s: &Setup, i: usize, tpm: &Path) -> Result<(Parts, Node)> {
    let disk = s.work.join("nvme.img");
    let old_sha = previous_tenant_disk(&disk, s.disk_bytes, s.old_data_mib)?;
    let export = s.work.join("snapshot-export.img");
    let _ = std::fs::remove_file(&export);
    let export_size = export_bytes_needed(
        s.disk_bytes,
        manifest_len(s.disk_bytes, DEFAULT_CHUNK_SIZE, MAX_IDENTITY),
    ) + MIB;
    create_sparse(&export, export_size)?;
    let nbd = s.net.nbdkit(&export);
    let nbd_uri = format!("nbd://{}:{}/", s.net.host(), nbd.port);
    let plan = wardenctl_as(
        s.server,
        &s.owner,
        &[
            "turnover",
            &s.node_id,
            "--image",
            &s.image_url,
            "--sha256",
            &s.image.sha256,
            "--snapshot-to",
            &nbd_uri,
            "--wipe",
            "auto",
            "--handoff",
            "kexec",
            "--lessee",
            "lab-b",
        ],
    )?;
    eprintln!("bench: round {i}: plan: {}", plan.trim());

    let mut node = s
        .net
        .node("bench-turnover")
        .smp(s.smp)
        .disk_file(DiskBus::Nvme, &disk, true)
        .tpm_state(tpm)
        .start()
        .context("starting the QEMU node")?;
    let tl = follow(&mut node, s.timeout, false)?;
    let mut p = parts(&tl, node.started_at()).map_err(|e| failed(&node, format!("{e:#}")))?;
    node.wait_power_off(Duration::from_secs(120))
        .map_err(|e| failed(&node, format!("the tenant did not power off: {e:#}")))?;
    if let Some((v, _)) = tl.verdict("handoff") {
        ensure!(v["status"] == "ok", "final verdict: {v}");
    }

    // The signed report: the lessee's copy, checked with the server's key.
    let report = s.work.join("report.json");
    wardenctl_as(
        s.server,
        &s.lessee,
        &["report", "get", &s.node_id, "--output", path_str(&report)?],
    )?;
    let verified = wardenctl_as(
        s.server,
        &s.lessee,
        &["report", "verify", path_str(&report)?],
    )?;
    ensure!(
        verified.contains("report verified"),
        "the report did not verify: {verified}"
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let body = &doc["report"];
    ensure!(
        body["outcome"] == "ok",
        "report outcome: {}",
        body["outcome"]
    );
    for step in body["steps"].as_array().into_iter().flatten() {
        // u64 ms → f64 s: exact far beyond any turnover's length.
        #[allow(clippy::cast_precision_loss)]
        let secs = step["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
        p.steps.push((
            step["step"].as_str().unwrap_or("?").to_owned(),
            secs,
            step["bytes"].as_u64().unwrap_or(0),
        ));
    }
    eprintln!("bench: round {i}: {}", verified.trim());
    eprintln!(
        "bench: round {i}: report image {} bytes written; snapshot {} bytes sent of {}",
        body["image"]["bytes_written"],
        body["snapshot"]["bytes_sent"],
        body["snapshot"]["disk_bytes"]
    );
    // The agent's own view of the snapshot (guest clock): its progress
    // about every 512 MiB and its summary, to see where the time goes.
    let mut next_mib = 512;
    for line in node.console_text().lines() {
        let done = line
            .contains("snapshot progress")
            .then(|| line.split("done_bytes=").nth(1))
            .flatten()
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        let show = match done {
            Some(bytes) if bytes / MIB >= next_mib => {
                next_mib = (bytes / MIB / 512 + 1) * 512;
                true
            }
            _ => line.contains("snapshot complete"),
        };
        if show {
            eprintln!("bench: round {i}: console: {}", line.trim());
        }
    }

    // For looking into where the time goes: the whole console, kept.
    if let Some(dest) = std::env::var_os("WARDEN_BENCH_TURNOVER_CONSOLE") {
        let dest = PathBuf::from(dest).with_extension(format!("round{i}.log"));
        match std::fs::write(&dest, node.console_text()) {
            Ok(()) => eprintln!("bench: round {i}: console kept in {}", dest.display()),
            Err(e) => eprintln!(
                "bench: round {i}: could not keep the console in {}: {e}",
                dest.display()
            ),
        }
    }

    // What was timed must have happened: the export holds the old disk.
    drop(nbd);
    let snap_sha = sha256_file(&export, s.disk_bytes)?;
    ensure!(
        snap_sha == old_sha,
        "the snapshot on the export (sha256 {snap_sha}) differs from the old disk ({old_sha})"
    );
    eprintln!("bench: round {i}: the export equals the old disk (sha256 {old_sha})");
    let _ = std::fs::remove_file(&export);
    Ok((p, node))
}

/// Bytes as MiB, for display (exact below 2^53 bytes).
#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn check_tools() -> Result<()> {
    for tool in [
        "qemu-system-x86_64",
        "swtpm_setup",
        "nbdkit",
        "sgdisk",
        "zstd",
    ] {
        warden_qemu_tests::require_program(tool)?;
    }
    warden_qemu_tests::target_bin("warden-attest-server")?;
    warden_qemu_tests::target_bin("wardenctl")?;
    ramdisk_dir()?;
    Ok(())
}

fn main() {
    if let Err(e) = interrupt::watch() {
        eprintln!("bench-turnover: cannot watch Ctrl-C ({e}); it would leave files behind");
    }
    if let Err(e) = bench() {
        eprintln!("bench-turnover: {e:#}");
        std::process::exit(if interrupt::interrupted() { 130 } else { 1 });
    }
}

fn bench() -> Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    check_tools()?;
    let disk_bytes = args.disk_mib * MIB;
    let dir = warden_qemu_tests::workspace_root().join("build/bench/turnover");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = tenant_image(&dir, disk_bytes, args.image_data_mib)?;
    // Per-run files (the node's disk, the export) next to the image, on the
    // workspace's disk rather than a tmpfs; removed when the bench ends.
    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&dir)
        .context("temp dir in build/bench/turnover")?;

    eprintln!("bench: waiting for the QEMU lock");
    let _lock = QemuLock::acquire()?;
    // Declared before the server, dnsmasq and the nodes, so dropped after
    // them: the namespace goes once nothing runs in it.
    let ns = if args.bridge {
        Some(NetNs::create("bench").context("creating the bench's network namespace")?)
    } else {
        None
    };
    let server = match &ns {
        Some(ns) => Server::start_netboot_in_netns(
            ns.name(),
            netns::HOST_IP,
            &[
                // The PXE path's UKI shows nothing on the serial port
                // without console=ttyS0 (netboot_dnsmasq.rs).
                "--boot-cmdline".into(),
                format!("console=ttyS0 {EXTRA_CMDLINE}").into(),
            ],
        ),
        None => Server::start_netboot(&[]),
    }
    .context("starting warden-attest-server")?;
    let (net, image_port, _dnsmasq) = match &ns {
        Some(ns) => {
            let script = format!(
                "{}warden.ipxe",
                server.boot_url().context("the server has no boot URL")?
            );
            let dnsmasq = Dnsmasq::start_pxe(ns, &script)?;
            let port = warden_qemu_tests::http::serve_file_in_netns(
                &image.zst,
                ns.name(),
                netns::HOST_IP,
            )?;
            let net = Net::Bridge {
                netns: ns.name().to_owned(),
            };
            (net, port, Some(dnsmasq))
        }
        None => {
            let netboot = server.guest_boot_url("warden.ipxe", EXTRA_CMDLINE)?;
            let port = warden_qemu_tests::http::serve_file(&image.zst)?;
            (Net::User { netboot }, port, None)
        }
    };
    let image_url = format!("http://{}:{image_port}/tenant.raw.zst", net.host());
    eprintln!(
        "bench: server {}, image {image_url} ({} bytes, {} MiB of random data), {} MiB NVMe disk with {} MiB of the old tenant's data",
        server.url(),
        image.zst_bytes,
        image.data_bytes / MIB,
        args.disk_mib,
        args.old_data_mib
    );

    // Untimed: the node enrolls and is refused; the owner approves its
    // firmware with a policy learned from that boot.
    let enroll_disk = work.path().join("enroll.img");
    create_sparse(&enroll_disk, disk_bytes)?;
    let mut first = net
        .node("bench-turnover-enroll")
        .smp(args.smp)
        .disk_file(DiskBus::Nvme, &enroll_disk, true)
        .start()
        .context("starting the QEMU node")?;
    let tl = follow(&mut first, BOOT_TIMEOUT * 2, true)?;
    first
        .wait_power_off(BOOT_TIMEOUT)
        .map_err(|e| failed(&first, format!("the refused node did not power off: {e:#}")))?;
    let _ = std::fs::remove_file(&enroll_disk);
    let node_id = tl
        .find("tpm_ready")
        .and_then(|t| t["node_id"].as_str())
        .context("boot 1 printed no tpm_ready event")?
        .to_owned();
    let reference = ramdisk_dir()?.dir.join("reference-values.json");
    server.wardenctl_ok(&[
        "policy",
        "learn",
        &node_id,
        "--name",
        "bench-ovmf",
        "--ramdisk",
        path_str(&reference)?,
        "--store",
    ])?;
    server.wardenctl_ok(&["policy", "assign", "bench-ovmf", "--node", &node_id])?;
    server.wardenctl_ok(&["node", "owner", &node_id, "uni-a"])?;
    let setup = Setup {
        server: &server,
        work: work.path(),
        net: &net,
        owner: token(&server, work.path(), "owner", "uni-a"),
        lessee: token(&server, work.path(), "lessee", "lab-b"),
        node_id,
        image_url,
        image: &image,
        disk_bytes,
        old_data_mib: args.old_data_mib,
        smp: args.smp,
        timeout: args.timeout,
    };

    let mut prev = first;
    let mut rounds = Vec::new();
    for i in 1..=args.rounds {
        let (p, node) = round(&setup, i, &prev.swtpm_state_dir())?;
        eprintln!(
            "bench: round {i}: boot {:.2} s (attest {:.2} s), snapshot {:.2} s, wipe {:.2} s, image {:.2} s, final attest {:.2} s, handoff {:.2} s, total {:.2} s",
            p.boot, p.attest, p.snapshot, p.wipe, p.image, p.final_attest, p.handoff, p.total
        );
        for (name, secs, bytes) in &p.steps {
            eprintln!("bench: round {i}: report step {name}: {secs:.2} s, {bytes} bytes");
        }
        rounds.push(p);
        prev = node;
    }
    drop(prev);
    print_bench(&rounds, args.smp, args.bridge);
    Ok(())
}

/// The `BENCH` lines: medians over the rounds.
fn print_bench(rounds: &[Parts], smp: u32, bridge: bool) {
    let med = |f: fn(&Parts) -> f64| median(rounds.iter().map(f).collect());
    let step_med = |name: &str| -> Option<(f64, u64)> {
        let v: Vec<(f64, u64)> = rounds.iter().filter_map(|p| p.report_step(name)).collect();
        let bytes = v.first().map(|(_, b)| *b)?;
        Some((median(v.into_iter().map(|(s, _)| s).collect()), bytes))
    };
    let total = med(|p| p.total);
    let snapshot = med(|p| p.snapshot);
    let anchor = med(|p| p.boot + p.wipe + p.image);
    let without = med(|p| p.total - p.snapshot);
    let n = rounds.len();
    let from_report = |name: &str| match step_med(name) {
        Some((s, b)) => format!("; the agent's report: {s:.2} s, {:.1} MiB", mib(b)),
        None => String::new(),
    };
    let lines: [(&str, f64, String); 7] = [
        (
            "boot",
            med(|p| p.boot),
            "QEMU start → boot verdict: firmware, iPXE, ramdisk, hello, enroll, attest".into(),
        ),
        (
            "attest",
            med(|p| p.attest),
            "Hello → boot verdict, inside boot".into(),
        ),
        (
            "snapshot",
            snapshot,
            format!("Snapshot → Wipe state{}", from_report("snapshot")),
        ),
        (
            "wipe",
            med(|p| p.wipe),
            format!("Wipe → Image state{}", from_report("wipe")),
        ),
        (
            "image",
            med(|p| p.image),
            format!("Image → Ready state{}", from_report("image")),
        ),
        (
            "final-attest",
            med(|p| p.final_attest),
            "FinalAttest → Handoff state".into(),
        ),
        (
            "handoff",
            med(|p| p.handoff),
            "Handoff state → TENANT-BOOTED: kexec".into(),
        ),
    ];
    for (name, secs, what) in lines {
        println!(
            "BENCH turnover-{name}: warden {secs:.2} s ({what}), anchor total {total:.2} s, ratio {:.2} (share of the total; no goal)",
            secs / total
        );
    }
    let mut rounds_note = if n == 1 {
        "1 round".to_owned()
    } else {
        format!("medians of {n} rounds")
    };
    // Every part, the anchor's included, ran on this many vCPUs.
    if smp > 1 {
        rounds_note.push_str(&format!(", {smp} vCPUs"));
    }
    if bridge {
        rounds_note.push_str(", bridge network");
    }
    println!(
        "BENCH turnover: warden total {total:.2} s (QEMU start → TENANT-BOOTED, snapshot included; {rounds_note}), anchor boot+wipe+image {anchor:.2} s, ratio {:.2} (goal <= 1.25)",
        total / anchor
    );
    println!(
        "BENCH turnover-without-snapshot: warden total-minus-snapshot {without:.2} s, anchor boot+wipe+image {anchor:.2} s, ratio {:.2} (goal <= 1.25)",
        without / anchor
    );
}

#[cfg(test)]
mod tests {
    use super::{median, parse_args};

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn args_default_to_one_round_on_4_gib() {
        let a = parse_args(std::iter::empty()).unwrap();
        assert_eq!((a.rounds, a.disk_mib, a.image_data_mib), (1, 4096, 1024));
        assert!(
            parse_args(["--image-data-mib".to_owned(), "4096".to_owned()].into_iter()).is_err()
        );
        assert!(parse_args(["--rounds".to_owned(), "0".to_owned()].into_iter()).is_err());
        assert!(!a.bridge);
        let net = |v: &str| parse_args(["--net".to_owned(), v.to_owned()].into_iter());
        assert!(net("bridge").unwrap().bridge);
        assert!(!net("user").unwrap().bridge);
        assert!(net("tap").is_err());
    }
}
