//! Orchestration: which methods run on a disk and in what order, the
//! read-back after each, the refusal of disks in use, one thread per disk,
//! and the [`DiskRecord`] that says what happened. What a disk can do and
//! whether it is in use comes from one place, [`crate::disk::probe_in`].
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
use crate::disk::{self, DeviceCaps};

use super::hw::{self, SecureErase};
use super::io::{BlockIo, DeviceIo};
use super::overwrite::{overwrite, Content};
use super::progress::Meter;
use super::{metadata, verify, MethodError, WipeOptions};

/// One disk, opened and ready to erase.
pub struct Target {
    pub disk: Disk,
    pub io: Box<dyn BlockIo>,
    /// What the device can do, as probed when it was opened. Its
    /// `hw.methods` are the hardware methods the plan may try.
    pub caps: DeviceCaps,
    /// The drive's own erase interface: opened (`disk::open_secure_erase`)
    /// on the first hardware method run, or set by a test.
    pub hw: Option<Box<dyn SecureErase>>,
    /// Discarded blocks are guaranteed to read back as zeros, so a discard
    /// counts as an erase (and `auto` tries `secdiscard`). Starts as
    /// `caps.zeroes_after_discard`; a caller that knows a device better may
    /// declare it (the host tests do, for a loop device over a sparse file,
    /// whose discard punches holes). Verification reads back either way.
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

/// Partitions the kernel knows on `name`, as `(start, len)` bytes (sysfs
/// `start` and `size` are in 512-byte sectors).
fn sysfs_partitions(name: &str, sys_root: &Path) -> Vec<(u64, u64)> {
    let Ok(entries) = fs::read_dir(sys_root.join("block").join(name)) else {
        return Vec::new();
    };
    let mut parts: Vec<(u64, u64)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|dir| dir.join("partition").exists())
        .filter_map(|dir| {
            let start: u64 = read_trimmed(&dir.join("start"))?.parse().ok()?;
            let size: u64 = read_trimmed(&dir.join("size"))?.parse().ok()?;
            Some((start * 512, size * 512))
        })
        .collect();
    parts.sort_unstable();
    parts
}

/// Opens `disk` for erasing, or says (naming it) why it must not be.
pub fn open_target(disk: &Disk, opts: &WipeOptions) -> Result<Target, String> {
    let caps = disk::probe_in(&opts.sys_root, &opts.proc_root, disk, true);
    if let Some(why) = caps.in_use_reason() {
        return Err(why);
    }
    if let Some(e) = &caps.hw_error {
        tracing::warn!(disk = %disk.name, error = %e, "wipe: the drive's erase commands could not be probed");
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
    tracing::info!(
        disk = %disk.name,
        zeroes_after_discard = caps.zeroes_after_discard,
        basis = %caps.zeroes_after_discard_basis,
        secure_discard = ?caps.secure_discard,
        hw_methods = ?caps.hw.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "wipe: device capabilities"
    );
    Ok(Target {
        disk: disk.clone(),
        io: Box::new(io),
        zeros_after_discard: caps.zeroes_after_discard,
        caps,
        hw: None,
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
            if t.caps.secure_discard == Some(false) {
                return Err(MethodError::Unsupported(format!(
                    "{}: no secure discard ({})",
                    t.disk.path, t.caps.secure_discard_basis
                )));
            }
            whole_device(t.io.as_mut(), RangeOp::SecureDiscard, &mut meter).map(zeros)
        }
        Method::Discard => {
            let n = whole_device(t.io.as_mut(), RangeOp::Discard, &mut meter)?;
            if t.zeros_after_discard {
                Ok(zeros(n))
            } else {
                Err(MethodError::Failed(format!(
                    "discarded {n} bytes, but {} does not guarantee zeros after discard ({}): not counted as an erase",
                    t.disk.path, t.caps.zeroes_after_discard_basis
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
            let unsupported = |caps: &disk::HwCaps, fallback: &str| {
                let why = caps.why_unavailable(h).unwrap_or(fallback).to_string();
                MethodError::Unsupported(format!("{hwm} on {}: {why}", t.disk.path))
            };
            if t.hw.is_none() {
                if !t.caps.hw.supports(h) {
                    let none = match &t.caps.hw_error {
                        Some(e) => format!("the drive's erase commands could not be probed: {e}"),
                        None if t.caps.hw.methods.is_empty() => {
                            "the device has no hardware erase commands".into()
                        }
                        None => "the drive does not offer it".into(),
                    };
                    return Err(unsupported(&t.caps.hw, &none));
                }
                t.hw = hw::open_secure_erase(&t.disk).map_err(|e| {
                    MethodError::Failed(format!("{hwm}: opening the drive's erase interface: {e}"))
                })?;
            }
            let Some(drive) = t.hw.as_mut() else {
                return Err(MethodError::Unsupported(format!(
                    "{} has no hardware erase commands",
                    t.disk.path
                )));
            };
            if !drive.caps().supports(h) {
                return Err(unsupported(drive.caps(), "the drive does not offer it"));
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

/// Checker threads for a full read-back: `opts.verify_threads`, or when 0
/// [`verify::default_threads`]. Reads stay sequential whatever the number,
/// so rotational disks need no exception.
fn verify_threads(opts: &WipeOptions) -> usize {
    if opts.verify_threads > 0 {
        opts.verify_threads
    } else {
        verify::default_threads()
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
    // A drive interface a test put in place answers for itself; otherwise
    // the probed capabilities do.
    let hw_caps = t.hw.as_ref().map_or(&t.caps.hw, |h| h.caps());
    let hw_methods: Vec<Method> = hw_caps.methods.iter().map(|m| hw::to_method(*m)).collect();
    let verify_threads = verify_threads(opts);
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
                    verify_threads,
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
}
