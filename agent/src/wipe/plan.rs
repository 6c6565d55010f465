//! Orchestration: which methods run on a disk and in what order, the
//! read-back after each, the refusal of disks in use, one thread per disk,
//! and the [`DiskRecord`] that says what happened.
//!
//! The rule it must never break: a disk is `clean` only when the last
//! method's verification passed. An unsupported method or a failed
//! verification moves on to the next method of the chain; an I/O error
//! stops that disk (the other disks go on) and the whole wipe fails.

use std::fs;
use std::path::Path;

use warden_protocol::console::Event;
use warden_protocol::hello::Disk;
use warden_protocol::wipe::{
    Attempt, DiskId, DiskRecord, Method, Outcome, Pattern, Status, Verification, VerifyMode,
    VerifyResult, WipeReport,
};

use super::block::{whole_device, RangeOp};
use super::hw::{self, SecureErase};
use super::io::{BlockIo, DeviceIo};
use super::overwrite::{overwrite, Content};
use super::progress::Meter;
use super::{metadata, verify, MethodError, WipeOptions};

/// One disk, opened and ready to erase.
pub struct Target {
    pub disk: Disk,
    pub io: Box<dyn BlockIo>,
    /// The drive's own erase, when it has one.
    pub hw: Option<Box<dyn SecureErase>>,
    /// The device guarantees that discarded blocks read back as zeros.
    pub zeros_after_discard: bool,
    /// Partitions the kernel knows: `(start, len)` in bytes.
    pub partitions: Vec<(u64, u64)>,
}

fn now() -> String {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::now_utc();
    let t = t.replace_millisecond(t.millisecond()).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn disk_id(d: &Disk) -> DiskId {
    DiskId {
        name: d.name.clone(),
        path: d.path.clone(),
        model: d.model.clone(),
        serial: d.serial.clone(),
        size_bytes: d.size_bytes,
    }
}

/// The methods to try, in order, for `requested`.
///
/// `auto`: the drive's methods (strongest first), `secdiscard` where zeros
/// are guaranteed after discard, `zeroout`, one pass of zeros. A named
/// method is tried first and followed by the entries of that list that come
/// after it. Overwrite and metadata have no fallback.
pub fn chain(requested: Method, hw_methods: &[Method], zeros_after_discard: bool) -> Vec<Method> {
    let mut auto: Vec<Method> = hw_methods.to_vec();
    if zeros_after_discard {
        auto.push(Method::Secdiscard);
    }
    auto.push(Method::Zeroout);
    auto.push(Method::Overwrite {
        passes: 1,
        pattern: Pattern::Zeros,
    });
    // Strength order of every method, to place a named one in the list.
    let rank = |m: &Method| -> usize {
        match m {
            Method::Secdiscard => 7,
            Method::Discard => 8,
            Method::Zeroout => 9,
            Method::Overwrite { .. } => 10,
            Method::Auto | Method::Metadata => 11,
            hwm => Method::HARDWARE.iter().position(|x| x == hwm).unwrap_or(0),
        }
    };
    match requested {
        Method::Auto => auto,
        Method::Metadata | Method::Overwrite { .. } => vec![requested],
        m => std::iter::once(m)
            .chain(auto.into_iter().filter(|x| *x != m && rank(x) > rank(&m)))
            .collect(),
    }
}

fn read_trimmed(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The disk and its partitions as `(name, "major:minor", sysfs dir)`.
fn devices(name: &str, sys_root: &Path) -> Vec<(String, String, std::path::PathBuf)> {
    let dir = sys_root.join("block").join(name);
    let mut out = vec![(
        name.to_string(),
        read_trimmed(&dir.join("dev")).unwrap_or_default(),
        dir.clone(),
    )];
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.path().join("partition").exists() {
                let n = e.file_name().to_string_lossy().into_owned();
                out.push((
                    n,
                    read_trimmed(&e.path().join("dev")).unwrap_or_default(),
                    e.path(),
                ));
            }
        }
    }
    out
}

/// Partitions the kernel knows on `name`, as `(start, len)` bytes.
fn sysfs_partitions(name: &str, sys_root: &Path) -> Vec<(u64, u64)> {
    devices(name, sys_root)
        .into_iter()
        .skip(1)
        .filter_map(|(_, _, dir)| {
            let start: u64 = read_trimmed(&dir.join("start"))?.parse().ok()?;
            let size: u64 = read_trimmed(&dir.join("size"))?.parse().ok()?;
            Some((start * 512, size * 512))
        })
        .collect()
}

/// Why disk `name` must not be erased, if it is in use: a partition or the
/// disk mounted (`/proc/self/mountinfo`, by device number or source), used
/// as swap, or held by another block device (md, dm, bcache: sysfs
/// `holders`). Opening with O_EXCL catches what this misses.
pub fn in_use(name: &str, sys_root: &Path, proc_root: &Path) -> Option<String> {
    let devs = devices(name, sys_root);
    for (n, _, dir) in &devs {
        if let Ok(holders) = fs::read_dir(dir.join("holders")) {
            let held: Vec<String> = holders
                .flatten()
                .map(|h| h.file_name().to_string_lossy().into_owned())
                .collect();
            if !held.is_empty() {
                return Some(format!(
                    "{name} is in use: {n} is held by {}",
                    held.join(", ")
                ));
            }
        }
    }
    if let Ok(mi) = fs::read_to_string(proc_root.join("self/mountinfo")) {
        for line in mi.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let (Some(devno), Some(mountpoint)) = (f.get(2), f.get(4)) else {
                continue;
            };
            let source = line
                .split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').nth(1))
                .unwrap_or("");
            for (n, dev, _) in &devs {
                if (!dev.is_empty() && dev == devno) || source == format!("/dev/{n}") {
                    return Some(format!("{name} is in use: {n} is mounted at {mountpoint}"));
                }
            }
        }
    }
    if let Ok(swaps) = fs::read_to_string(proc_root.join("swaps")) {
        for line in swaps.lines().skip(1) {
            let path = line.split_whitespace().next().unwrap_or("");
            if let Some((n, _, _)) = devs.iter().find(|(n, _, _)| path == format!("/dev/{n}")) {
                return Some(format!("{name} is in use: {n} is active swap"));
            }
        }
    }
    None
}

/// Whether discarded blocks of `disk` read back as zeros. Only loop devices
/// are known to (they punch holes in the backing file); drives need their
/// capability bits (NVMe DLFEAT, ATA RZAT), which `crate::disk` owns.
fn zeros_after_discard(disk: &Disk) -> bool {
    disk.transport == "loop" && disk.discard_max_bytes > 0
}

/// Opens `disk` for erasing, or says (naming it) why it must not be.
pub fn open_target(disk: &Disk, opts: &WipeOptions) -> Result<Target, String> {
    if let Some(why) = in_use(&disk.name, &opts.sys_root, &opts.proc_root) {
        return Err(why);
    }
    if disk.read_only {
        return Err(format!("{} is read-only", disk.name));
    }
    let io = DeviceIo::open(Path::new(&disk.path)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            format!(
                "{} is in use: the kernel refused exclusive access to {} (EBUSY)",
                disk.name, disk.path
            )
        } else {
            format!("cannot open {} for erasing: {e}", disk.path)
        }
    })?;
    let hw = match hw::open_secure_erase(disk) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(disk = %disk.name, error = %e, "wipe: no hardware erase");
            None
        }
    };
    Ok(Target {
        disk: disk.clone(),
        io: Box::new(io),
        hw,
        zeros_after_discard: zeros_after_discard(disk),
        partitions: sysfs_partitions(&disk.name, &opts.sys_root),
    })
}

/// A record for a disk that was refused before anything was done.
pub fn refused_record(disk: &Disk, requested: Method, reason: String) -> DiskRecord {
    let t = now();
    DiskRecord {
        disk: disk_id(disk),
        requested,
        attempts: Vec::new(),
        started_at: t.clone(),
        finished_at: t,
        bytes_written: 0,
        status: Status::Failed,
        reason: Some(reason),
    }
}

/// What a method left behind, for verification.
struct Ran {
    bytes: u64,
    content: Content,
    /// Ranges a metadata wipe zeroed (verification reads exactly those).
    regions: Option<Vec<(u64, u64)>>,
}

fn run_method(t: &mut Target, m: Method, opts: &WipeOptions) -> Result<Ran, MethodError> {
    let size = t.io.size();
    let mut meter = Meter::new(opts.events.clone(), &t.disk.name, m.name(), size);
    let zeros = |bytes| Ran {
        bytes,
        content: Content::Zeros,
        regions: None,
    };
    match m {
        Method::Auto => Err(MethodError::Failed("auto is not a method to run".into())),
        Method::Secdiscard => {
            whole_device(t.io.as_mut(), RangeOp::SecureDiscard, &mut meter).map(zeros)
        }
        Method::Discard => {
            let n = whole_device(t.io.as_mut(), RangeOp::Discard, &mut meter)?;
            if t.zeros_after_discard {
                Ok(zeros(n))
            } else {
                Err(MethodError::Failed(format!(
                    "discarded {n} bytes, but {} does not guarantee zeros after discard: not counted as an erase",
                    t.disk.path
                )))
            }
        }
        Method::Zeroout => whole_device(t.io.as_mut(), RangeOp::Zeroout, &mut meter).map(zeros),
        Method::Overwrite { passes, pattern } => {
            meter = Meter::new(
                opts.events.clone(),
                &t.disk.name,
                m.name(),
                size * u64::from(passes.max(1)),
            );
            let (bytes, content) =
                overwrite(t.io.as_mut(), passes, pattern, opts.chunk_bytes, &mut meter)?;
            Ok(Ran {
                bytes,
                content,
                regions: None,
            })
        }
        Method::Metadata => {
            meter = Meter::new(opts.events.clone(), &t.disk.name, m.name(), 0);
            let (bytes, regions) =
                metadata::wipe(t.io.as_mut(), &t.partitions, opts.chunk_bytes, &mut meter)?;
            Ok(Ran {
                bytes,
                content: Content::Zeros,
                regions: Some(regions),
            })
        }
        hwm => {
            let Some(h) = hw::from_method(hwm) else {
                return Err(MethodError::Unsupported(format!(
                    "{hwm} is not a hardware method"
                )));
            };
            let Some(drive) = t.hw.as_mut() else {
                return Err(MethodError::Unsupported(format!(
                    "{} has no hardware erase commands",
                    t.disk.path
                )));
            };
            if !drive.caps().methods.contains(&h) {
                let why = drive
                    .caps()
                    .unavailable
                    .iter()
                    .find(|(x, _)| *x == h)
                    .map(|(_, why)| why.clone())
                    .unwrap_or_else(|| "the drive does not offer it".into());
                return Err(MethodError::Unsupported(format!(
                    "{hwm} on {}: {why}",
                    t.disk.path
                )));
            }
            drive
                .erase(h, &mut |f| meter.update_fraction(f))
                .map_err(|e| {
                    MethodError::Failed(format!("{hwm} on {} failed: {e}", t.disk.path))
                })?;
            Ok(zeros(size))
        }
    }
}

fn verify_mode_name(mode: VerifyMode) -> &'static str {
    match mode {
        VerifyMode::Full => "verify-full",
        VerifyMode::Sampled { .. } => "verify-sampled",
        VerifyMode::Metadata => "verify-metadata",
    }
}

fn describe(v: &Verification) -> String {
    match &v.result {
        VerifyResult::Pass => "verification passed".into(),
        VerifyResult::Fail {
            offset,
            found,
            expected,
        } => format!("read back {found} at byte {offset}, expected {expected}"),
        VerifyResult::Error { offset, error, .. } => {
            format!("read failed at byte {offset}: {error}")
        }
    }
}

/// Erases one disk: the chain of methods, each verified, until one passes.
pub fn wipe_target(mut t: Target, opts: &WipeOptions) -> DiskRecord {
    let started_at = now();
    let hw_methods: Vec<Method> =
        t.hw.as_ref()
            .map(|h| h.caps().methods.iter().map(|m| hw::to_method(*m)).collect())
            .unwrap_or_default();
    let methods = chain(opts.method, &hw_methods, t.zeros_after_discard);
    let name = t.disk.name.clone();
    tracing::info!(disk = %name, requested = %opts.method, chain = ?methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(), "wipe: starting");
    let mut attempts = Vec::new();
    let mut status = Status::Failed;
    let mut reason = None;
    for m in methods {
        let a_start = now();
        tracing::info!(disk = %name, method = %m, "wipe: method starting");
        let ran = run_method(&mut t, m, opts);
        let mut attempt = Attempt {
            method: m,
            started_at: a_start,
            finished_at: String::new(),
            bytes_written: 0,
            outcome: Outcome::Verified,
            verification: None,
        };
        let mut stop = false;
        match ran {
            Err(MethodError::Unsupported(why)) => {
                tracing::info!(disk = %name, method = %m, reason = %why, "wipe: method unsupported");
                attempt.outcome = Outcome::Unsupported { reason: why };
            }
            Err(MethodError::Failed(why)) => {
                tracing::warn!(disk = %name, method = %m, reason = %why, "wipe: method failed");
                attempt.outcome = Outcome::Failed { reason: why };
            }
            Err(MethodError::Io { offset, error }) => {
                let errno = error.raw_os_error().unwrap_or(0);
                tracing::error!(disk = %name, method = %m, offset, errno, error = %error, "wipe: I/O error, stopping this disk");
                reason = Some(format!(
                    "{m} on {}: I/O error at byte {offset}: {error}",
                    t.disk.path
                ));
                attempt.outcome = Outcome::IoError {
                    offset,
                    errno,
                    error: error.to_string(),
                };
                stop = true;
            }
            Ok(ran) => {
                attempt.bytes_written = ran.bytes;
                let mode = if ran.regions.is_some() {
                    VerifyMode::Metadata
                } else {
                    opts.verify
                };
                let regions = ran.regions.unwrap_or_default();
                let total = match mode {
                    VerifyMode::Full => t.io.size(),
                    VerifyMode::Metadata => regions.iter().map(|r| r.1).sum(),
                    VerifyMode::Sampled { .. } => 0,
                };
                let mut meter =
                    Meter::new(opts.events.clone(), &name, verify_mode_name(mode), total);
                match verify::verify(
                    t.io.as_mut(),
                    mode,
                    &ran.content,
                    &regions,
                    opts.chunk_bytes,
                    &mut meter,
                ) {
                    Ok(v) if v.passed() => {
                        tracing::info!(disk = %name, method = %m, samples = v.samples, bytes_read = v.bytes_read, digest = %v.digest, "wipe: verified");
                        status = Status::Clean;
                        reason = None;
                        attempt.verification = Some(v);
                        stop = true;
                    }
                    Ok(v) => {
                        let why = describe(&v);
                        tracing::warn!(disk = %name, method = %m, finding = %why, "wipe: verification FAILED, trying the next method");
                        reason = Some(format!("{m}: {why}"));
                        attempt.outcome = Outcome::VerifyFailed;
                        attempt.verification = Some(v);
                    }
                    Err(failed) => {
                        let (v, f) = *failed;
                        let errno = f.error.raw_os_error().unwrap_or(0);
                        tracing::error!(disk = %name, offset = f.offset, errno, error = %f.error, "wipe: read-back failed, stopping this disk");
                        reason = Some(format!(
                            "{m} on {}: read-back I/O error at byte {}: {}",
                            t.disk.path, f.offset, f.error
                        ));
                        attempt.outcome = Outcome::IoError {
                            offset: f.offset,
                            errno,
                            error: f.error.to_string(),
                        };
                        attempt.verification = Some(v);
                        stop = true;
                    }
                }
            }
        }
        attempt.finished_at = now();
        attempts.push(attempt);
        if stop {
            break;
        }
    }
    if status == Status::Failed && reason.is_none() {
        let tried: Vec<String> = attempts
            .iter()
            .map(|a| match &a.outcome {
                Outcome::Unsupported { reason } | Outcome::Failed { reason } => reason.clone(),
                other => format!("{}: {other:?}", a.method),
            })
            .collect();
        reason = Some(format!(
            "no method erased {}: {}",
            t.disk.path,
            tried.join("; ")
        ));
    } else if status == Status::Failed {
        if let Some(r) = reason.take() {
            reason = Some(match attempts.last().map(|a| &a.outcome) {
                Some(Outcome::IoError { .. }) => r,
                _ => format!("no method left that verifies on {}; last: {r}", t.disk.path),
            });
        }
    }
    let record = DiskRecord {
        disk: disk_id(&t.disk),
        requested: opts.method,
        bytes_written: attempts.iter().map(|a| a.bytes_written).sum(),
        attempts,
        started_at,
        finished_at: now(),
        status,
        reason,
    };
    report_result(&record, opts);
    record
}

fn report_result(r: &DiskRecord, opts: &WipeOptions) {
    let status = match r.status {
        Status::Clean => "clean",
        Status::Failed => "failed",
    };
    let ev = Event::WipeResult {
        disk: r.disk.name.clone(),
        status: status.into(),
        method: r.final_method().map(|m| m.to_string()),
        bytes_written: r.bytes_written,
        reason: r.reason.clone(),
        record_sha256: r.digest(),
    };
    match &opts.events {
        Some(sink) => sink(&ev),
        None => tracing::info!(disk = %r.disk.name, status, reason = ?r.reason, "wipe: done"),
    }
}

/// Erases every target in parallel, one thread each; records in input order.
pub fn wipe_targets(targets: Vec<Target>, opts: &WipeOptions) -> WipeReport {
    let records = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .into_iter()
            .map(|t| {
                let disk = t.disk.clone();
                (disk, s.spawn(move || wipe_target(t, opts)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(disk, h)| {
                h.join().unwrap_or_else(|_| {
                    refused_record(
                        &disk,
                        opts.method,
                        format!("the wipe of {} crashed", disk.name),
                    )
                })
            })
            .collect::<Vec<_>>()
    });
    WipeReport::new(records)
}

/// Opens and erases every disk; a disk in use or that cannot be opened is
/// refused by name (and fails the wipe) while the others are erased.
pub fn wipe_disks(disks: &[Disk], opts: &WipeOptions) -> WipeReport {
    let mut slots: Vec<Option<DiskRecord>> = Vec::with_capacity(disks.len());
    let mut targets = Vec::new();
    let mut positions = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        match open_target(d, opts) {
            Ok(t) => {
                targets.push(t);
                positions.push(i);
                slots.push(None);
            }
            Err(why) => {
                tracing::error!(disk = %d.name, reason = %why, "wipe: refused");
                let r = refused_record(d, opts.method, why);
                report_result(&r, opts);
                slots.push(Some(r));
            }
        }
    }
    let report = wipe_targets(targets, opts);
    for (i, r) in positions.into_iter().zip(report.disks) {
        slots[i] = Some(r);
    }
    WipeReport::new(slots.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_hardware_then_secdiscard_then_zeroout_then_overwrite() {
        let z = Method::Overwrite {
            passes: 1,
            pattern: Pattern::Zeros,
        };
        assert_eq!(
            chain(Method::Auto, &[Method::NvmeFormatCrypto], true),
            vec![
                Method::NvmeFormatCrypto,
                Method::Secdiscard,
                Method::Zeroout,
                z
            ]
        );
        assert_eq!(chain(Method::Auto, &[], false), vec![Method::Zeroout, z]);
        assert_eq!(
            chain(Method::Discard, &[], true),
            vec![Method::Discard, Method::Zeroout, z]
        );
        assert_eq!(
            chain(
                Method::NvmeSanitizeCrypto,
                &[Method::NvmeFormatUserData],
                false
            ),
            vec![
                Method::NvmeSanitizeCrypto,
                Method::NvmeFormatUserData,
                Method::Zeroout,
                z
            ]
        );
        assert_eq!(chain(Method::Metadata, &[], true), vec![Method::Metadata]);
    }

    #[test]
    fn in_use_reads_mountinfo_swaps_and_holders() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys");
        let proc_ = t.path().join("proc");
        let d = sys.join("block/sdb");
        fs::create_dir_all(d.join("sdb1/holders")).unwrap();
        fs::create_dir_all(d.join("holders")).unwrap();
        fs::write(d.join("dev"), "8:16\n").unwrap();
        fs::write(d.join("sdb1/dev"), "8:17\n").unwrap();
        fs::write(d.join("sdb1/partition"), "1\n").unwrap();
        fs::create_dir_all(proc_.join("self")).unwrap();
        fs::write(proc_.join("swaps"), "Filename Type Size Used Priority\n").unwrap();
        fs::write(
            proc_.join("self/mountinfo"),
            "22 1 0:21 / / rw - rootfs rootfs rw\n",
        )
        .unwrap();
        assert_eq!(in_use("sdb", &sys, &proc_), None);
        fs::write(
            proc_.join("self/mountinfo"),
            "22 1 0:21 / / rw - rootfs rootfs rw\n40 22 8:17 / /mnt/old rw,relatime shared:1 - ext4 /dev/sdb1 rw\n",
        )
        .unwrap();
        assert_eq!(
            in_use("sdb", &sys, &proc_).unwrap(),
            "sdb is in use: sdb1 is mounted at /mnt/old"
        );
        fs::write(proc_.join("self/mountinfo"), "").unwrap();
        fs::write(
            proc_.join("swaps"),
            "Filename Type Size Used Priority\n/dev/sdb1 partition 1 0 -2\n",
        )
        .unwrap();
        assert_eq!(
            in_use("sdb", &sys, &proc_).unwrap(),
            "sdb is in use: sdb1 is active swap"
        );
        fs::write(proc_.join("swaps"), "").unwrap();
        fs::create_dir_all(d.join("holders/md0")).unwrap();
        assert_eq!(
            in_use("sdb", &sys, &proc_).unwrap(),
            "sdb is in use: sdb is held by md0"
        );
    }
}
