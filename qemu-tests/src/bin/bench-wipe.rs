//! `bench-wipe`: the wipe's throughput against `dd` on the same targets in
//! the same run.
//!
//! Targets: two loop devices (`losetup -f --show --direct-io=on`) over fresh files of
//! `--size-mib` MiB in `build/bench/wipe/` (on the workspace's disk, not
//! tmpfs), so both contenders go through the same block layer the agent
//! uses on a node. After one warm-up write of each, every round (order
//! alternating) times:
//! - overwrite: `dd if=/dev/zero of=LOOP bs=4M oflag=direct` against the
//!   agent's one-pass zero overwrite of the same device (`wipe_targets`,
//!   sampled verification with 0 random blocks per GiB: first/last MiB only);
//! - two disks at once: the agent on both loops in parallel against the agent
//!   on one;
//! - full verification: `dd if=LOOP of=/dev/null bs=4M iflag=direct`
//!   against `wipe::verify::verify` in full mode (zeros, SHA-256 of every
//!   byte as a hash list of 8 MiB chunks), checked and hashed on
//!   `--verify-threads` threads (default: what the agent picks on this
//!   machine) and, for comparison, on one (`-1thread`);
//! - the same two read-backs against a loop device over a file in
//!   `/dev/shm` (RAM): the device is then no bound, so this shows how fast
//!   the verifier itself is (`-ram`). One RAM target only: two would
//!   measure memory bandwidth, not two disks.
//!
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
    rounds: usize,
    verify_threads: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        size_mib: 2048,
        rounds: 3,
        verify_threads: warden_agent::wipe::verify::default_threads(),
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
            "--rounds" => a.rounds = usize::try_from(num("--rounds")?)?,
            "--verify-threads" => a.verify_threads = usize::try_from(num("--verify-threads")?)?,
            other => {
                bail!("unknown argument {other:?} (usage: bench-wipe [--size-mib N] [--rounds N] [--verify-threads N])")
            }
        }
    }
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(a.verify_threads >= 1, "--verify-threads must be at least 1");
    ensure!(
        a.size_mib >= 64 && a.size_mib % 4 == 0,
        "--size-mib must be a multiple of 4, at least 64"
    );
    Ok(a)
}

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

fn main() -> Result<()> {
    let args = parse_args()?;
    let size = args.size_mib * MIB;
    let dir = warden_qemu_tests::workspace_root().join("build/bench/wipe");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let a = Loop::new(&dir.join("a.img"), size)?;
    let b = Loop::new(&dir.join("b.img"), size)?;
    let ram_dir = Path::new("/dev/shm/warden-bench-wipe");
    std::fs::create_dir_all(ram_dir).with_context(|| format!("creating {}", ram_dir.display()))?;
    let ram = Loop::new(&ram_dir.join("ram.img"), size)?;
    eprintln!(
        "bench-wipe: {} and {} over {} MiB files in {}, {} in {}; full read-back checked on {} threads",
        a.dev,
        b.dev,
        args.size_mib,
        dir.display(),
        ram.dev,
        ram_dir.display(),
        args.verify_threads
    );
    dd_write(&a.dev, size)?;
    dd_write(&b.dev, size)?;
    dd_write(&ram.dev, size)?;
    let mb = |secs: f64, disks: u64| (disks * size) as f64 / 1e6 / secs;
    let (mut dw, mut ww, mut w2, mut d2) = (vec![], vec![], vec![], vec![]);
    let (mut dr, mut wr, mut w1r) = (vec![], vec![], vec![]);
    let (mut mdr, mut mwr, mut mw1r) = (vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let warden_first = round % 2 == 1;
        if warden_first {
            ww.push(mb(warden_overwrite(&[&a])?, 1));
            dw.push(mb(dd_write(&a.dev, size)?, 1));
        } else {
            dw.push(mb(dd_write(&a.dev, size)?, 1));
            ww.push(mb(warden_overwrite(&[&a])?, 1));
        }
        let [d, w, w1] = verify_round(&a, size, args.verify_threads, round)?;
        dr.push(d);
        wr.push(w);
        w1r.push(w1);
        if warden_first {
            w2.push(mb(warden_overwrite(&[&a, &b])?, 2));
            d2.push(mb(dd_write_both(&a.dev, &b.dev, size)?, 2));
        } else {
            d2.push(mb(dd_write_both(&a.dev, &b.dev, size)?, 2));
            w2.push(mb(warden_overwrite(&[&a, &b])?, 2));
        }
        let [d, w, w1] = verify_round(&ram, size, args.verify_threads, round)?;
        mdr.push(d);
        mwr.push(w);
        mw1r.push(w1);
        eprintln!(
            "bench-wipe: round {}: overwrite warden {:.0} dd {:.0} MB/s; 2 disks warden {:.0} dd {:.0} MB/s; \
             verify warden {:.0} (1 thread {:.0}) dd {:.0} MB/s; RAM verify warden {:.0} (1 thread {:.0}) dd {:.0} MB/s",
            round + 1,
            ww[round],
            dw[round],
            w2[round],
            d2[round],
            wr[round],
            w1r[round],
            dr[round],
            mwr[round],
            mw1r[round],
            mdr[round]
        );
    }
    let (dw, ww, w2, d2) = (median(dw), median(ww), median(w2), median(d2));
    let (dr, wr, w1r) = (median(dr), median(wr), median(w1r));
    let (mdr, mwr, mw1r) = (median(mdr), median(mwr), median(mw1r));
    let t = args.verify_threads;
    println!(
        "BENCH wipe-overwrite: warden {ww:.0} MB/s, anchor dd {dw:.0} MB/s, ratio {:.2} (goal >= 0.95)",
        ww / dw
    );
    println!(
        "BENCH wipe-overwrite-2disks: warden {w2:.0} MB/s on 2 disks, anchor warden-1-disk {ww:.0} MB/s, ratio {:.2} (goal >= 1.8)",
        w2 / ww
    );
    println!(
        "BENCH wipe-overwrite-2disks-vs-dd: warden {w2:.0} MB/s on 2 disks, anchor dd-2-parallel {d2:.0} MB/s, ratio {:.2} (goal >= 0.95)",
        w2 / d2
    );
    println!(
        "BENCH wipe-verify-full: warden {wr:.0} MB/s ({t} threads), anchor dd {dr:.0} MB/s, ratio {:.2} (goal >= 0.9)",
        wr / dr
    );
    println!(
        "BENCH wipe-verify-full-1thread: warden {w1r:.0} MB/s (1 thread), anchor dd {dr:.0} MB/s, ratio {:.2}",
        w1r / dr
    );
    println!(
        "BENCH wipe-verify-full-ram: warden {mwr:.0} MB/s ({t} threads), anchor dd {mdr:.0} MB/s, ratio {:.2} (the verifier's own ceiling; goal >= 0.9)",
        mwr / mdr
    );
    println!(
        "BENCH wipe-verify-full-ram-1thread: warden {mw1r:.0} MB/s (1 thread), anchor dd {mdr:.0} MB/s, ratio {:.2}",
        mw1r / mdr
    );
    drop(ram);
    let _ = std::fs::remove_dir(ram_dir);
    Ok(())
}
