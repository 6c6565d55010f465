//! `bench-wipe`: the wipe's throughput against `dd` on the same targets in
//! the same run.
//!
//! Two kinds of target, both loop devices with the loop driver's direct I/O
//! (`losetup -f --show --direct-io=on`), so both contenders go through the
//! block layer the agent uses on a node:
//! - **a real disk**: one loop over a fresh file of `--size-mib` MiB in
//!   `build/bench/wipe/` (the workspace's ext4 on the machine's one virtual
//!   disk, `vda`). Every round (order alternating, after one warm-up write)
//!   times the overwrite — `dd if=/dev/zero of=LOOP bs=4M oflag=direct`
//!   against the agent's one-pass zero overwrite (`wipe_targets`, sampled
//!   verification with 0 random blocks per GiB: first/last MiB only) — and
//!   the full verification — `dd if=LOOP of=/dev/null bs=4M iflag=direct`
//!   against `wipe::verify::verify` in full mode (every byte checked, the
//!   digest a hash list of 8 MiB chunks), checked on `--verify-threads`
//!   threads (default: what the agent picks) and on one (`-1thread`).
//! - **two independent disks**: two loops over files of `--ram-mib` MiB in
//!   `/dev/shm` (tmpfs, RAM). Two loops over files on `vda` would share one
//!   medium and measure that disk, not the agent's ability to drive two;
//!   the host kernel has no `brd`/`null_blk`, so RAM-backed loops are the
//!   independent pair this machine has (tmpfs takes O_DIRECT, so the loops
//!   run with direct I/O; stderr says so, or that they fell back to
//!   buffered). A RAM loop is bound by the CPU copying into tmpfs, and
//!   one already takes more than one of this machine's two cores, so the
//!   unlimited pair (`wipe-parallel-ram`, and `dd` likewise:
//!   `wipe-parallel-ram-dd`) measures the cores. The goal's measure
//!   (`wipe-parallel`, goal 1.8x) runs the same pair with each loop's
//!   writes limited to `--disk-mbps` (default 1000) through the kernel's
//!   blkio throttling ([`Throttle`]): two disks, each with a medium of its
//!   own, as on a server. Every round times the agent on one of them and
//!   on both at once, and `dd` likewise (`wipe-parallel-dd`). The
//!   full read-back of a RAM loop (`-ram`) shows the verifier's own
//!   ceiling, with no medium in the way.
//!
//! The files are removed and the loops detached at the end, also on an
//! error (and stale ones of a killed run at the start); `scripts/bench`
//! cleans up after a killed run too.
//! Prints diagnostics on stderr and `BENCH` lines (medians) on stdout.
//! Needs root (losetup). It measures; it never builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use warden_agent::wipe::io::DeviceIo;
use warden_agent::wipe::progress::Meter;
use warden_agent::wipe::{
    open_target, verify, wipe_targets, Content, Method, Pattern, Status, VerifyMode, WipeOptions,
};
use warden_protocol::hello::Disk;

const MIB: u64 = 1 << 20;

struct Args {
    size_mib: u64,
    ram_mib: u64,
    rounds: usize,
    verify_threads: usize,
    /// Write bandwidth of each disk of the `-limited` pair, MB/s.
    disk_mbps: u64,
    /// Only the real disk's full read-back (to profile it, e.g. under
    /// `perf record -g`): no RAM disks, no overwrite timing.
    verify_only: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        size_mib: 2048,
        ram_mib: 2048,
        rounds: 3,
        verify_threads: warden_agent::wipe::verify::default_threads(),
        disk_mbps: 1000,
        verify_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{what} needs a number"))?
                .parse()
                .with_context(|| format!("{what} needs a number"))
        };
        match arg.as_str() {
            "--size-mib" => a.size_mib = num("--size-mib")?,
            "--ram-mib" => a.ram_mib = num("--ram-mib")?,
            "--rounds" => a.rounds = usize::try_from(num("--rounds")?)?,
            "--verify-threads" => a.verify_threads = usize::try_from(num("--verify-threads")?)?,
            "--disk-mbps" => a.disk_mbps = num("--disk-mbps")?,
            "--verify-only" => a.verify_only = true,
            other => {
                bail!("unknown argument {other:?} (usage: bench-wipe [--size-mib N] [--ram-mib N] [--rounds N] [--verify-threads N] [--disk-mbps N] [--verify-only])")
            }
        }
    }
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(a.verify_threads >= 1, "--verify-threads must be at least 1");
    ensure!(a.disk_mbps >= 1, "--disk-mbps must be at least 1");
    for (flag, mib) in [("--size-mib", a.size_mib), ("--ram-mib", a.ram_mib)] {
        ensure!(
            mib >= 64 && mib % 4 == 0,
            "{flag} must be a multiple of 4, at least 64"
        );
    }
    Ok(a)
}

/// A loop device over a file; detached and the file removed on drop.
struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    fn new(file: &Path, size: u64) -> Result<Loop> {
        // A loop left over by a killed run still holds the old file (in
        // /dev/shm: its RAM) after the name is gone: detach it first.
        detach_all(file);
        let _ = std::fs::remove_file(file);
        std::fs::File::create(file)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", file.display()))?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            // The loop driver's direct I/O: writes reach the backing file's
            // disk instead of its page cache, so both contenders are
            // measured against a medium, not memcpy.
            .arg("--direct-io=on")
            .arg(file)
            .output()
            .context("running losetup")?;
        ensure!(
            out.status.success(),
            "losetup -f --show {}: {} (root needed)",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            file: file.to_path_buf(),
        })
    }

    /// Whether the loop driver really runs direct I/O on the backing file
    /// (`losetup` only warns when it cannot).
    fn direct_io(&self) -> bool {
        let name = self.dev.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
            .is_ok_and(|s| s.trim() == "1")
    }

    fn disk(&self) -> Disk {
        let name = self.dev.trim_start_matches("/dev/").to_string();
        let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Disk {
            path: self.dev.clone(),
            name,
            size_bytes: sectors * 512,
            logical_block_size: 512,
            physical_block_size: 512,
            transport: "loop".into(),
            ..Default::default()
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Detaches every loop device over `file` (`losetup -j`).
fn detach_all(file: &Path) {
    let Ok(out) = Command::new("losetup")
        .args(["-n", "-O", "NAME", "-j"])
        .arg(file)
        .output()
    else {
        return;
    };
    for dev in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = Command::new("losetup").args(["-d", dev]).status();
    }
}

/// Bytes the kernel says it can still hand out (`MemAvailable`).
/// The cgroup-v1 `blkio` hierarchy, where the kernel's throttling
/// (`CONFIG_BLK_DEV_THROTTLING`) takes a write-bandwidth limit per device.
const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// This process in a `blkio` cgroup of its own, for the `-limited` pair:
/// each RAM loop gets a write-bandwidth limit, so the pair behaves like two
/// disks that each have their own medium (a RAM loop alone is bound by the
/// CPU copying into tmpfs — one loop already takes more than one of this
/// machine's two cores, so two at once measure the cores, not whether the
/// agent drives both disks at full speed). Threads and `dd` children
/// inherit the cgroup. On drop: limits lifted, the process moved back,
/// the cgroup removed.
struct Throttle {
    dir: PathBuf,
    devs: Vec<String>,
}

impl Throttle {
    fn new() -> Result<Throttle> {
        let root = Path::new(BLKIO);
        ensure!(
            root.join("blkio.throttle.write_bps_device").exists(),
            "no cgroup-v1 blkio throttling at {BLKIO}"
        );
        let dir = root.join("warden-bench-wipe");
        if !dir.exists() {
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving bench-wipe into {}", dir.display()))?;
        Ok(Throttle { dir, devs: vec![] })
    }

    /// `MAJ:MIN` of a block device, from sysfs.
    fn dev_number(dev: &str) -> Result<String> {
        let name = dev.trim_start_matches("/dev/");
        Ok(std::fs::read_to_string(format!("/sys/block/{name}/dev"))
            .with_context(|| format!("reading the device number of {dev}"))?
            .trim()
            .to_string())
    }

    /// Limits writes to `dev` to `bytes_per_sec`.
    fn limit(&mut self, dev: &str, bytes_per_sec: u64) -> Result<()> {
        let num = Self::dev_number(dev)?;
        std::fs::write(
            self.dir.join("blkio.throttle.write_bps_device"),
            format!("{num} {bytes_per_sec}"),
        )
        .with_context(|| format!("limiting writes to {dev} ({num})"))?;
        self.devs.push(num);
        Ok(())
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        for num in &self.devs {
            let _ = std::fs::write(
                self.dir.join("blkio.throttle.write_bps_device"),
                format!("{num} 0"),
            );
        }
        let _ = std::fs::write(
            Path::new(BLKIO).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn mem_available() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")?;
    Ok(kib * 1024)
}

fn dd(args: &[String]) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("dd")
        .args(args)
        .arg("status=none")
        .status()
        .context("running dd")?;
    ensure!(st.success(), "dd {args:?} failed");
    Ok(t.elapsed().as_secs_f64())
}

fn dd_write(dev: &str, size: u64) -> Result<f64> {
    dd(&[
        "if=/dev/zero".into(),
        format!("of={dev}"),
        "bs=4M".into(),
        "oflag=direct".into(),
        format!("count={}", size / (4 * MIB)),
    ])
}

fn dd_read(dev: &str) -> Result<f64> {
    dd(&[
        format!("if={dev}"),
        "of=/dev/null".into(),
        "bs=4M".into(),
        "iflag=direct".into(),
    ])
}

/// Seconds for two `dd` writers, one per device, at once.
fn dd_write_both(a: &str, b: &str, size: u64) -> Result<f64> {
    let t = Instant::now();
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| dd_write(a, size));
        let hb = s.spawn(|| dd_write(b, size));
        (ha.join(), hb.join())
    });
    match (ra, rb) {
        (Ok(Ok(_)), Ok(Ok(_))) => Ok(t.elapsed().as_secs_f64()),
        _ => bail!("parallel dd on {a} and {b} failed"),
    }
}

fn opts() -> WipeOptions {
    WipeOptions {
        method: Method::Overwrite {
            passes: 1,
            pattern: Pattern::Zeros,
        },
        verify: VerifyMode::Sampled { blocks_per_gib: 0 },
        events: None,
        ..Default::default()
    }
}

/// Seconds for the agent's one-pass zero overwrite of all `loops` at once.
fn warden_overwrite(loops: &[&Loop]) -> Result<f64> {
    let o = opts();
    let targets = loops
        .iter()
        .map(|l| open_target(&l.disk(), &o).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    let report = wipe_targets(targets, &o);
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        report.status == Status::Clean,
        "overwrite failed: {report:#?}"
    );
    Ok(secs)
}

fn warden_verify(l: &Loop, threads: usize) -> Result<f64> {
    let mut io = DeviceIo::open(Path::new(&l.dev)).with_context(|| format!("opening {}", l.dev))?;
    let mut meter = Meter::new(None, &l.dev, "verify-full", 0);
    let t = Instant::now();
    let v = verify::verify(
        &mut io,
        VerifyMode::Full,
        &Content::Zeros,
        &[],
        warden_agent::wipe::DEFAULT_CHUNK,
        threads,
        &mut meter,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "read-back of {} failed at byte {}: {}",
            l.dev,
            e.1.offset,
            e.1.error
        )
    })?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        v.passed(),
        "{} did not read back zeros: {:?}",
        l.dev,
        v.result
    );
    Ok(secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// MB/s of `dd`, the agent's read-back and its one-thread read-back of
/// `l`, in an order that alternates with `round`.
fn verify_round(l: &Loop, size: u64, threads: usize, round: usize) -> Result<[f64; 3]> {
    let mb = |secs: f64| size as f64 / 1e6 / secs;
    let mut out = [0.0; 3];
    let order: [usize; 3] = if round % 2 == 1 { [1, 2, 0] } else { [0, 1, 2] };
    for which in order {
        out[which] = mb(match which {
            0 => dd_read(&l.dev)?,
            1 => warden_verify(l, threads)?,
            _ => warden_verify(l, 1)?,
        });
    }
    Ok(out)
}

/// A directory removed on drop, after the loops over files in it (declare
/// it first: locals drop in reverse order, also on an early `?`).
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Pushes `dd`'s and the agent's figure in an order that alternates with
/// `round`.
fn pair(
    round: usize,
    dd: impl FnOnce() -> Result<f64>,
    warden: impl FnOnce() -> Result<f64>,
) -> Result<(f64, f64)> {
    if round % 2 == 1 {
        let w = warden()?;
        Ok((dd()?, w))
    } else {
        let d = dd()?;
        Ok((d, warden()?))
    }
}

/// `--verify-only`: the real disk's full read-back, nothing else.
fn verify_only(args: &Args, dir: &Path) -> Result<()> {
    let size = args.size_mib * MIB;
    let a = Loop::new(&dir.join("a.img"), size)?;
    dd_write(&a.dev, size)?;
    let (mut dr, mut wr, mut w1r) = (vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let [d, w, w1] = verify_round(&a, size, args.verify_threads, round)?;
        eprintln!(
            "bench-wipe: round {}: verify warden {w:.0} (1 thread {w1:.0}) dd {d:.0} MB/s",
            round + 1
        );
        dr.push(d);
        wr.push(w);
        w1r.push(w1);
    }
    let (dr, wr, w1r) = (median(dr), median(wr), median(w1r));
    let t = args.verify_threads;
    println!(
        "BENCH wipe-verify-full: warden {wr:.0} MB/s ({t} threads), anchor dd {dr:.0} MB/s, ratio {:.2} (goal >= 0.9)",
        wr / dr
    );
    println!(
        "BENCH wipe-verify-full-1thread: warden {w1r:.0} MB/s (1 thread), anchor dd {dr:.0} MB/s, ratio {:.2}",
        w1r / dr
    );
    Ok(())
}

/// The RAM pair with each loop's writes limited to `--disk-mbps` (see
/// [`Throttle`]); every round times the agent and `dd` on one disk and on
/// both at once. Returns the medians: warden 1 disk, warden 2 disks, dd 1
/// disk, dd 2 disks (MB/s).
fn limited_pair(args: &Args, r1: &Loop, r2: &Loop) -> Result<[f64; 4]> {
    let size = args.ram_mib * MIB;
    let mut throttle = Throttle::new()?;
    for l in [r1, r2] {
        throttle.limit(&l.dev, args.disk_mbps * 1_000_000)?;
    }
    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    let (mut w1, mut w2, mut d1, mut d2) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let (d, w) = pair(
            round,
            || dd_write(&r1.dev, size),
            || warden_overwrite(&[r1]),
        )?;
        d1.push(mb(size, d));
        w1.push(mb(size, w));
        let (d, w) = pair(
            round,
            || dd_write_both(&r1.dev, &r2.dev, size),
            || warden_overwrite(&[r1, r2]),
        )?;
        d2.push(mb(2 * size, d));
        w2.push(mb(2 * size, w));
        eprintln!(
            "bench-wipe: round {}: pair limited to {} MB/s each: warden 1 disk {:.0} 2 disks {:.0}, dd 1 disk {:.0} 2 disks {:.0} MB/s",
            round + 1,
            args.disk_mbps,
            w1[round],
            w2[round],
            d1[round],
            d2[round]
        );
    }
    Ok([median(w1), median(w2), median(d1), median(d2)])
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let size = args.size_mib * MIB;
    let ram_size = args.ram_mib * MIB;
    let dir = warden_qemu_tests::workspace_root().join("build/bench/wipe");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if args.verify_only {
        return verify_only(&args, &dir);
    }
    // Two RAM disks plus room for everything else on the machine.
    let avail = mem_available()?;
    ensure!(
        2 * ram_size + 1024 * MIB <= avail,
        "two {} MiB RAM disks need {} MiB of RAM; {} MiB are available (set WARDEN_BENCH_WIPE_RAM_MIB lower)",
        args.ram_mib,
        (2 * ram_size + 1024 * MIB) / MIB,
        avail / MIB
    );
    let ram_dir = Path::new("/dev/shm/warden-bench-wipe");
    std::fs::create_dir_all(ram_dir).with_context(|| format!("creating {}", ram_dir.display()))?;
    let _ram_dir = DirGuard(ram_dir.to_path_buf());
    let a = Loop::new(&dir.join("a.img"), size)?;
    let r1 = Loop::new(&ram_dir.join("r1.img"), ram_size)?;
    let r2 = Loop::new(&ram_dir.join("r2.img"), ram_size)?;
    let dio = |l: &Loop| {
        if l.direct_io() {
            "direct I/O"
        } else {
            "BUFFERED (direct I/O refused)"
        }
    };
    eprintln!(
        "bench-wipe: real disk {} ({}) over a {} MiB file in {}; independent pair {} and {} ({}, {}) over {} MiB files in {}; full read-back checked on {} threads",
        a.dev,
        dio(&a),
        args.size_mib,
        dir.display(),
        r1.dev,
        r2.dev,
        dio(&r1),
        dio(&r2),
        args.ram_mib,
        ram_dir.display(),
        args.verify_threads
    );
    // Warm-up: allocates the files' blocks (tmpfs: its pages), so no
    // contender pays for that.
    dd_write(&a.dev, size)?;
    dd_write(&r1.dev, ram_size)?;
    dd_write(&r2.dev, ram_size)?;
    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    let (mut dw, mut ww) = (vec![], vec![]);
    let (mut dr, mut wr, mut w1r) = (vec![], vec![], vec![]);
    let (mut rdw, mut rww, mut rdw2, mut rww2) = (vec![], vec![], vec![], vec![]);
    let (mut mdr, mut mwr, mut mw1r) = (vec![], vec![], vec![]);
    for round in 0..args.rounds {
        // A real disk: overwrite, then full read-back.
        let (d, w) = pair(round, || dd_write(&a.dev, size), || warden_overwrite(&[&a]))?;
        dw.push(mb(size, d));
        ww.push(mb(size, w));
        let [d, w, w1] = verify_round(&a, size, args.verify_threads, round)?;
        dr.push(d);
        wr.push(w);
        w1r.push(w1);
        // Two independent disks: one alone, then both at once.
        let (d, w) = pair(
            round,
            || dd_write(&r1.dev, ram_size),
            || warden_overwrite(&[&r1]),
        )?;
        rdw.push(mb(ram_size, d));
        rww.push(mb(ram_size, w));
        let (d, w) = pair(
            round,
            || dd_write_both(&r1.dev, &r2.dev, ram_size),
            || warden_overwrite(&[&r1, &r2]),
        )?;
        rdw2.push(mb(2 * ram_size, d));
        rww2.push(mb(2 * ram_size, w));
        let [d, w, w1] = verify_round(&r1, ram_size, args.verify_threads, round)?;
        mdr.push(d);
        mwr.push(w);
        mw1r.push(w1);
        eprintln!(
            "bench-wipe: round {}: disk: overwrite warden {:.0} dd {:.0}, verify warden {:.0} (1 thread {:.0}) dd {:.0} MB/s; \
             RAM pair: warden 1 disk {:.0} 2 disks {:.0}, dd 1 disk {:.0} 2 disks {:.0}, verify warden {:.0} (1 thread {:.0}) dd {:.0} MB/s",
            round + 1,
            ww[round],
            dw[round],
            wr[round],
            w1r[round],
            dr[round],
            rww[round],
            rww2[round],
            rdw[round],
            rdw2[round],
            mwr[round],
            mw1r[round],
            mdr[round]
        );
    }
    let (dw, ww) = (median(dw), median(ww));
    let (dr, wr, w1r) = (median(dr), median(wr), median(w1r));
    let (rdw, rww, rdw2, rww2) = (median(rdw), median(rww), median(rdw2), median(rww2));
    let (mdr, mwr, mw1r) = (median(mdr), median(mwr), median(mw1r));
    let t = args.verify_threads;
    println!(
        "BENCH wipe-overwrite: warden {ww:.0} MB/s, anchor dd {dw:.0} MB/s, ratio {:.2} (goal >= 0.95)",
        ww / dw
    );
    println!(
        "BENCH wipe-verify-full: warden {wr:.0} MB/s ({t} threads), anchor dd {dr:.0} MB/s, ratio {:.2} (goal >= 0.9)",
        wr / dr
    );
    println!(
        "BENCH wipe-verify-full-1thread: warden {w1r:.0} MB/s (1 thread), anchor dd {dr:.0} MB/s, ratio {:.2}",
        w1r / dr
    );
    // Two disks with a medium each: the RAM pair, write-limited.
    match limited_pair(&args, &r1, &r2) {
        Ok([lww, lww2, ldw, ldw2]) => {
            let m = args.disk_mbps;
            println!(
                "BENCH wipe-parallel: warden 2 disks {lww2:.0} MB/s, anchor warden 1 disk {lww:.0} MB/s, ratio {:.2} (goal >= 1.8; each disk limited to {m} MB/s of writes)",
                lww2 / lww
            );
            println!(
                "BENCH wipe-parallel-dd: dd 2 disks {ldw2:.0} MB/s, anchor dd 1 disk {ldw:.0} MB/s, ratio {:.2} (each disk limited to {m} MB/s of writes)",
                ldw2 / ldw
            );
        }
        Err(e) => {
            eprintln!("bench-wipe: the write-limited pair could not be set up: {e:#}");
            println!(
                "BENCH wipe-parallel: SKIPPED: the write-limited pair could not be set up: {e:#}"
            );
        }
    }
    println!(
        "BENCH wipe-parallel-ram: warden 2 disks {rww2:.0} MB/s, anchor warden 1 disk {rww:.0} MB/s, ratio {:.2} (unlimited RAM loops: bound by this machine's two cores)",
        rww2 / rww
    );
    println!(
        "BENCH wipe-parallel-ram-dd: dd 2 disks {rdw2:.0} MB/s, anchor dd 1 disk {rdw:.0} MB/s, ratio {:.2} (what two unlimited RAM-backed loops give on this machine)",
        rdw2 / rdw
    );
    println!(
        "BENCH wipe-parallel-vs-dd: warden 2 disks {rww2:.0} MB/s, anchor dd 2 disks {rdw2:.0} MB/s, ratio {:.2} (unlimited RAM loops; goal >= 0.95)",
        rww2 / rdw2
    );
    println!(
        "BENCH wipe-overwrite-ram: warden {rww:.0} MB/s, anchor dd {rdw:.0} MB/s, ratio {:.2} (unlimited RAM loop, informational: the goal is wipe-overwrite's, on the disk)",
        rww / rdw
    );
    println!(
        "BENCH wipe-verify-full-ram: warden {mwr:.0} MB/s ({t} threads), anchor dd {mdr:.0} MB/s, ratio {:.2} (unlimited RAM loop, informational: the verifier's own ceiling; the goal is wipe-verify-full's, on the disk)",
        mwr / mdr
    );
    println!(
        "BENCH wipe-verify-full-ram-1thread: warden {mw1r:.0} MB/s (1 thread), anchor dd {mdr:.0} MB/s, ratio {:.2}",
        mw1r / mdr
    );
    Ok(())
}
