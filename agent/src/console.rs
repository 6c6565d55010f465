//! The serial console: short human lines (`tracing`, on stderr) and the
//! machine-readable `WARDEN {json}` lines (on stdout) that operators grep and
//! the QEMU harness waits for.
//!
//! As PID 1 both streams are `/dev/console`. This module must never block the
//! agent on a dead console (write errors are ignored: there is nobody else to
//! tell) and never print colors to something that is not a terminal.

use std::fmt;
use std::io::{IsTerminal, Write};

use tracing::{Event as TracingEvent, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter};
use warden_protocol::console::Event;
use warden_protocol::image::ImageRecord;
use warden_protocol::wipe::{DiskRecord, Outcome, Status, Verification, VerifyMode, VerifyResult};

use crate::disk::DeviceCaps;

/// Seconds since boot (`CLOCK_BOOTTIME`), as the kernel prints them, so our
/// lines sort with the kernel's on the console. Needs no `/proc`.
pub fn uptime() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call,
    // and CLOCK_BOOTTIME is a clock every Linux since 2.6.39 knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// `[  1.234] ` + `WARN `/`ERROR ` for non-info levels + message and fields.
struct LineFormat;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &TracingEvent<'_>,
    ) -> fmt::Result {
        let t = uptime();
        write!(writer, "[{:>5}.{:03}] ", t.as_secs(), t.subsec_millis())?;
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "ERROR ")?,
            Level::WARN => write!(writer, "WARN ")?,
            Level::DEBUG => write!(writer, "debug ")?,
            Level::TRACE => write!(writer, "trace ")?,
            Level::INFO => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// stderr, with a copy of each line for the server while a turnover runs
/// ([`crate::telemetry`]). The fmt layer writes each event in one call.
struct TeeStderr;

impl Write for TeeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::telemetry::line(&String::from_utf8_lossy(buf));
        std::io::stderr().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        crate::telemetry::line(&String::from_utf8_lossy(buf));
        std::io::stderr().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Changes the log filter after start-up (PID 1 learns `warden.log` only
/// once `/proc` is mounted).
pub struct LogHandle(reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl LogHandle {
    /// Applies a new filter; a bad one was already refused by config parsing.
    pub fn set_filter(&self, filter: &str) {
        match EnvFilter::try_new(filter) {
            Ok(f) => {
                if let Err(e) = self.0.reload(f) {
                    tracing::warn!("console: cannot change log filter to {filter:?}: {e}");
                }
            }
            Err(e) => tracing::warn!("console: bad log filter {filter:?}: {e}"),
        }
    }
}

/// Installs the console subscriber on stderr with `filter`. Safe to call
/// once; a second call leaves the first subscriber in place.
pub fn init(filter: &str) -> LogHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(|| TeeStderr)
        // As PID 1, stderr is the serial console: a terminal, but one that
        // BMC logs and the QEMU harness capture to files, where escape
        // codes are noise. Colours only for a person on a host terminal.
        .with_ansi(std::process::id() != 1 && std::io::stderr().is_terminal())
        .event_format(LineFormat);
    // try_init: tests may install their own subscriber first.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    LogHandle(handle)
}

/// Prints `event` as one `WARDEN {json}` line on stdout (flushed) and its
/// human summary through `tracing` at info.
pub fn emit(event: &Event) {
    match event {
        // No extra fields: the WARDEN line right after carries them all.
        Event::Fatal { .. } => tracing::error!("{}", human(event)),
        Event::Error { .. } => tracing::warn!("{}", human(event)),
        // A failed verdict: one line per reason, in the server's words, so a
        // person at the console reads what to fix without decoding JSON.
        Event::Verdict {
            status, reasons, ..
        } if status != "ok" => {
            tracing::error!("{}", human(event));
            for reason in reasons {
                tracing::error!("attestation FAILED: {reason}");
            }
        }
        _ => tracing::info!("{}", human(event)),
    }
    print_line(event);
}

/// Only the `WARDEN` line, for the panic hook (which must not re-enter tracing).
pub fn print_line(event: &Event) {
    // One write(2) for the whole line, newline included: a stdout line
    // writer would send the text and the newline separately, and a kernel
    // message printed on the console between the two glues itself onto the
    // JSON line.
    let mut line = event.to_line();
    crate::telemetry::line(&line);
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.flush();
    // With its buffer empty, the line writer hands a buffer that ends in a
    // newline to write(2) as it is.
    let _ = out.write_all(line.as_bytes());
}

/// A short line a person reads on the console, e.g.
/// `dhcp: eth0 leased 10.0.2.15/24 from 10.0.2.2`.
pub fn human(event: &Event) -> String {
    match event {
        Event::AgentStart { version, mode, pid } => {
            format!("warden-agent {version} starting ({mode} mode, pid {pid})")
        }
        Event::State {
            from,
            to,
            input,
            reason,
        } => match reason {
            Some(why) => format!("workflow: {from} -> {to} ({input}: {why})"),
            None => format!("workflow: {from} -> {to} ({input})"),
        },
        Event::InitStep { step, ok, detail } => match (ok, detail.is_empty()) {
            (true, true) => format!("init: {step} ok"),
            (true, false) => format!("init: {step} ok ({detail})"),
            (false, _) => format!("init: {step} FAILED: {detail}"),
        },
        Event::ModulesLoaded {
            rounds,
            loaded,
            failed,
        } => {
            let mut s = format!(
                "coldplug: {} module(s) loaded in {rounds} scan(s)",
                loaded.len()
            );
            if !loaded.is_empty() {
                s.push_str(&format!(": {}", loaded.join(" ")));
            }
            for f in failed {
                s.push_str(&format!("; {} failed: {}", f.module, f.error));
            }
            s
        }
        Event::DhcpLease {
            interface,
            address,
            router,
            server,
            lease_seconds,
        } => {
            let mut s = format!("dhcp: {interface} leased {address} from {server}");
            if let Some(r) = router {
                s.push_str(&format!(", router {r}"));
            }
            s.push_str(&format!(", {lease_seconds}s"));
            s
        }
        Event::TpmReady {
            tcti,
            ek_algorithm,
            node_id,
            pcr_count,
            ek_certificate,
        } => format!(
            "tpm: {tcti} ready, EK {ek_algorithm}{}, {pcr_count} PCRs, node {node_id}",
            if *ek_certificate {
                " with certificate"
            } else {
                " (no certificate)"
            }
        ),
        Event::EventLog {
            path,
            bytes,
            detail,
        } => {
            if detail.is_empty() {
                format!("eventlog: {bytes} bytes from {path}")
            } else {
                format!("eventlog: none at {path}: {detail}")
            }
        }
        Event::Inventory { disks, nics } => format!(
            "inventory: disks [{}], nics [{}]",
            disks.join(" "),
            nics.join(" ")
        ),
        Event::HelloOk {
            server,
            node_id,
            new_node,
        } => format!(
            "hello: {server} accepted node {node_id}{}",
            if *new_node { " (new node)" } else { "" }
        ),
        Event::Enrolled {
            node_id,
            ak_name,
            ak_algorithm,
            ek_trust,
        } => format!("enroll: AK {ak_algorithm} {ak_name} bound to node {node_id} ({ek_trust})"),
        Event::Verdict {
            status,
            attestation_id,
            phase,
            policy,
            reasons,
            ..
        } => {
            let policy = policy
                .as_ref()
                .map(|p| format!("policy {} v{}", p.name, p.version))
                .unwrap_or_else(|| "no policy".into());
            if status == "ok" {
                format!("attestation OK ({phase}, {policy}, attestation {attestation_id})")
            } else {
                format!(
                    "attestation FAILED ({phase}, {policy}, attestation {attestation_id}): {} reason(s)",
                    reasons.len()
                )
            }
        }
        Event::Retry {
            step,
            attempt,
            delay_ms,
            error,
        } => format!(
            "{step}: attempt {attempt} failed, retrying in {:.1}s: {error}",
            *delay_ms as f64 / 1000.0
        ),
        Event::Error { step, error } => format!("{step}: {error}"),
        Event::Ready { boot_ms } => format!(
            "ready: boot work done {:.3}s after kernel start",
            *boot_ms as f64 / 1000.0
        ),
        Event::Fatal { error, action } => format!("FATAL: {error} (will {action})"),
        Event::WipeProgress {
            disk,
            method,
            percent,
            mb_per_s,
            eta_s,
        } => match eta_s {
            Some(eta) => {
                format!("wipe: {disk} {method} {percent}% at {mb_per_s} MB/s, {eta}s left")
            }
            None => format!("wipe: {disk} {method} {percent}%"),
        },
        Event::WipeResult {
            disk,
            status,
            method,
            bytes_written,
            reason,
            ..
        } => {
            let method = method.as_deref().unwrap_or("nothing run");
            match reason {
                Some(why) => {
                    format!("wipe: {disk} {status} ({method}, {bytes_written} bytes): {why}")
                }
                None => format!("wipe: {disk} {status} ({method}, {bytes_written} bytes)"),
            }
        }
        Event::ImageResult {
            url,
            target,
            bytes_written,
            zero_bytes_skipped,
            digest,
            ..
        } => format!(
            "image: {url} written to {target} ({bytes_written} bytes written, \
             {zero_bytes_skipped} zero bytes skipped), {digest} matched"
        ),
        Event::Handoff {
            mode,
            disk,
            source,
            path,
            pcr,
            boot_next,
            ..
        } => {
            let mut text = format!("handoff: {mode}");
            if let Some(d) = disk {
                text.push_str(&format!(" {d}"));
            }
            if let (Some(s), Some(p)) = (source, path) {
                text.push_str(&format!(", {s} entry {p}"));
            }
            if let Some(pcr) = pcr {
                text.push_str(&format!(", measured into PCR {pcr}"));
            }
            if let Some(b) = boot_next {
                text.push_str(&format!(", BootNext {b}"));
            }
            text
        }
    }
}

/// A read-back mode in words: `sampled (64 blocks/GiB)`, `full`, `metadata`.
pub fn verify_mode_text(mode: VerifyMode) -> String {
    match mode {
        VerifyMode::Sampled { blocks_per_gib } => format!("sampled ({blocks_per_gib} blocks/GiB)"),
        VerifyMode::Full => "full".into(),
        VerifyMode::Metadata => "metadata".into(),
    }
}

fn verification_text(v: &Verification) -> String {
    let how = format!(
        "{} read-back of {} bytes in {} read(s)",
        verify_mode_text(v.mode),
        v.bytes_read,
        v.samples
    );
    match &v.result {
        VerifyResult::Pass => format!("{how}: pass"),
        VerifyResult::Fail {
            offset,
            found,
            expected,
        } => format!("{how}: FAIL at byte {offset} (read {found}, expected {expected})"),
        VerifyResult::Error { offset, error, .. } => {
            format!("{how}: read ERROR at byte {offset}: {error}")
        }
    }
}

/// What a disk can do, before it is erased, e.g. `wipe: nvme0n1 (nvme)
/// firmware erase: nvme-format-user-data; unavailable: nvme-sanitize-crypto
/// (SANICAP=0: …); discard reads zeros: no (…); write-zeroes: yes`.
pub fn disk_caps_line(caps: &DeviceCaps) -> String {
    let methods: Vec<&str> = caps.hw.methods.iter().map(|m| m.name()).collect();
    let mut s = format!("wipe: {} ({}) firmware erase: ", caps.name, caps.transport);
    s.push_str(&match (&caps.hw_error, methods.is_empty()) {
        (Some(e), _) => format!("not probed ({e})"),
        (None, true) => "none".into(),
        (None, false) => methods.join(", "),
    });
    if !caps.hw.unavailable.is_empty() {
        let why: Vec<String> = caps
            .hw
            .unavailable
            .iter()
            .map(|(m, why)| format!("{m} ({why})"))
            .collect();
        s.push_str(&format!("; unavailable: {}", why.join(", ")));
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    s.push_str(&format!(
        "; discard reads zeros: {}",
        yes_no(caps.zeroes_after_discard)
    ));
    if !caps.zeroes_after_discard_basis.is_empty() {
        s.push_str(&format!(" ({})", caps.zeroes_after_discard_basis));
    }
    s.push_str(&format!("; write-zeroes: {}", yes_no(caps.write_zeroes)));
    if let Some(why) = caps.in_use_reason() {
        s.push_str(&format!("; IN USE: {why}"));
    }
    s
}

/// One disk's wipe in a line: status, the method that decided, its
/// read-back, what was tried before it, and why it failed, e.g.
/// `wipe: vdc CLEAN by zeroout (268435456 bytes), sampled (64 blocks/GiB)
/// read-back of 3145728 bytes in 18 read(s): pass`.
pub fn wipe_summary(r: &DiskRecord) -> String {
    let status = match r.status {
        Status::Clean => "CLEAN",
        Status::Failed => "FAILED",
    };
    let mut s = format!("wipe: {} {status}", r.disk.name);
    match r.attempts.last() {
        Some(last) => {
            s.push_str(&format!(
                " by {} ({} bytes)",
                last.method, last.bytes_written
            ));
            match &last.verification {
                Some(v) => s.push_str(&format!(", {}", verification_text(v))),
                None => s.push_str(", not read back"),
            }
        }
        None => s.push_str(", nothing run"),
    }
    let before = r.attempts.len().saturating_sub(1);
    if before > 0 {
        let tried: Vec<String> = r.attempts[..before]
            .iter()
            .map(|a| {
                let how = match &a.outcome {
                    Outcome::Verified => "verified".to_string(),
                    Outcome::VerifyFailed => match &a.verification {
                        Some(v) => format!("read-back failed: {}", verification_text(v)),
                        None => "read-back failed".into(),
                    },
                    Outcome::Unsupported { reason } => format!("unsupported: {reason}"),
                    Outcome::IoError { offset, error, .. } => {
                        format!("I/O error at byte {offset}: {error}")
                    }
                    Outcome::Failed { reason } => format!("failed: {reason}"),
                };
                format!("{} ({how})", a.method)
            })
            .collect();
        s.push_str(&format!("; before it: {}", tried.join(", ")));
    }
    if let Some(why) = &r.reason {
        s.push_str(&format!(": {why}"));
    }
    s
}

/// The image step in a line, e.g. `image: /dev/nvme0n1 WRITTEN from
/// http://10.0.2.2:8080/img.raw.zst (zstd, 67108864 bytes: 31457280 written,
/// 35651584 zeros skipped; 33554432 bytes served, 0 resume(s), 0 restart(s))
/// sha256:… matched, not read back, 1234 ms`.
pub fn image_summary(r: &ImageRecord) -> String {
    format!(
        "image: {} WRITTEN from {} ({}, {} bytes: {} written, {} zeros skipped; \
         {} bytes served, {} resume(s), {} restart(s)) {} matched, {}, {} ms",
        r.target,
        r.url,
        r.format,
        r.image_bytes,
        r.bytes_written,
        r.zero_bytes_skipped,
        r.bytes_served,
        r.resumes,
        r.restarts,
        r.digest,
        if r.verified_after_write {
            "read back and matched"
        } else {
            "not read back"
        },
        r.total_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_lines_say_where_what_and_how_much() {
        let record = ImageRecord {
            url: "http://10.0.2.2:8080/img.raw.zst".into(),
            target: "/dev/nvme0n1".into(),
            format: warden_protocol::image::ImageFormat::Zstd,
            disk_format: warden_protocol::image::DiskFormat::Raw,
            bmap_mapped_bytes: None,
            image_bytes: 64 << 20,
            bytes_served: 33 << 20,
            bytes_written: 30 << 20,
            zero_bytes_skipped: 34 << 20,
            digest: format!("sha256:{}", "ab".repeat(32)),
            signature: warden_protocol::image::SignatureStatus::NotRequired,
            resumes: 1,
            restarts: 0,
            verified_after_write: false,
            direct_io: true,
            download_ms: 900,
            verify_ms: 0,
            total_ms: 1000,
            ca_sha256: Vec::new(),
        };
        assert_eq!(
            image_summary(&record),
            format!(
                "image: /dev/nvme0n1 WRITTEN from http://10.0.2.2:8080/img.raw.zst (zstd, \
                 67108864 bytes: 31457280 written, 35651584 zeros skipped; 34603008 bytes \
                 served, 1 resume(s), 0 restart(s)) sha256:{} matched, not read back, 1000 ms",
                "ab".repeat(32)
            )
        );
        let ev = Event::ImageResult {
            url: record.url.clone(),
            target: record.target.clone(),
            bytes_written: 10,
            zero_bytes_skipped: 20,
            digest: "sha256:00".into(),
            record_sha256: "ff".into(),
        };
        assert_eq!(
            human(&ev),
            "image: http://10.0.2.2:8080/img.raw.zst written to /dev/nvme0n1 \
             (10 bytes written, 20 zero bytes skipped), sha256:00 matched"
        );
    }

    #[test]
    fn wipe_lines_say_what_ran_what_was_read_back_and_why() {
        use warden_protocol::wipe::{Attempt, DiskId, Method};
        // From JSON, as a reader of the record would build it (optional
        // fields left out).
        let v = |result: VerifyResult| -> Verification {
            serde_json::from_value(serde_json::json!({
                "mode": {"sampled": {"blocks_per_gib": 64}},
                "expected": "zeros",
                "samples": 18,
                "bytes_read": 3 << 20,
                "sample_seed": "00".repeat(32),
                "digest": "ab".repeat(32),
                "result": result,
            }))
            .unwrap()
        };
        let attempt = |method, outcome, verification| Attempt {
            method,
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
            bytes_written: 1 << 28,
            outcome,
            verification,
        };
        let mut r = DiskRecord {
            disk: DiskId {
                name: "vdc".into(),
                path: "/dev/vdc".into(),
                model: None,
                serial: None,
                size_bytes: 1 << 28,
            },
            requested: Method::Discard,
            attempts: vec![
                attempt(
                    Method::Discard,
                    Outcome::VerifyFailed,
                    Some(v(VerifyResult::Fail {
                        offset: 4096,
                        found: "aa".repeat(16),
                        expected: "00".repeat(16),
                    })),
                ),
                attempt(
                    Method::Zeroout,
                    Outcome::Verified,
                    Some(v(VerifyResult::Pass)),
                ),
            ],
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:02Z".into(),
            bytes_written: 1 << 29,
            status: Status::Clean,
            reason: None,
        };
        assert_eq!(
            wipe_summary(&r),
            format!(
                "wipe: vdc CLEAN by zeroout (268435456 bytes), sampled (64 blocks/GiB) read-back \
                 of 3145728 bytes in 18 read(s): pass; before it: discard (read-back failed: \
                 sampled (64 blocks/GiB) read-back of 3145728 bytes in 18 read(s): FAIL at byte \
                 4096 (read {}, expected {}))",
                "aa".repeat(16),
                "00".repeat(16)
            )
        );
        r.attempts.clear();
        r.status = Status::Failed;
        r.reason = Some("vdc is in use: vdc1 is mounted at /mnt".into());
        assert_eq!(
            wipe_summary(&r),
            "wipe: vdc FAILED, nothing run: vdc is in use: vdc1 is mounted at /mnt"
        );

        let mut caps = DeviceCaps {
            name: "nvme0n1".into(),
            path: "/dev/nvme0n1".into(),
            transport: "nvme".into(),
            write_zeroes: true,
            ..DeviceCaps::default()
        };
        caps.hw.methods = vec![crate::disk::HwMethod::NvmeFormatUserData];
        caps.hw.unavailable = vec![(
            crate::disk::HwMethod::NvmeSanitizeCrypto,
            "SANICAP=0: the controller does not support Sanitize".into(),
        )];
        assert_eq!(
            disk_caps_line(&caps),
            "wipe: nvme0n1 (nvme) firmware erase: nvme-format-user-data; unavailable: \
             nvme-sanitize-crypto (SANICAP=0: the controller does not support Sanitize); \
             discard reads zeros: no; write-zeroes: yes"
        );
    }

    #[test]
    fn human_lines_are_short_and_name_things() {
        let ev = Event::DhcpLease {
            interface: "eth0".into(),
            address: "10.0.2.15/24".into(),
            router: None,
            server: "10.0.2.2".into(),
            lease_seconds: 86400,
        };
        assert_eq!(
            human(&ev),
            "dhcp: eth0 leased 10.0.2.15/24 from 10.0.2.2, 86400s"
        );
        let ev = Event::Retry {
            step: "hello".into(),
            attempt: 2,
            delay_ms: 1500,
            error: "connection refused".into(),
        };
        assert_eq!(
            human(&ev),
            "hello: attempt 2 failed, retrying in 1.5s: connection refused"
        );
        let ev = Event::InitStep {
            step: "mount efivarfs".into(),
            ok: true,
            detail: "skipped: no /sys/firmware/efi".into(),
        };
        assert!(human(&ev).contains("skipped"));
    }

    #[test]
    fn verdict_lines_name_the_policy_and_count_reasons() {
        let failed = Event::Verdict {
            status: "failed".into(),
            attestation_id: 7,
            phase: "boot".into(),
            policy: None,
            reasons: vec!["node has no policy".into()],
            codes: vec!["no-policy".into()],
        };
        assert_eq!(
            human(&failed),
            "attestation FAILED (boot, no policy, attestation 7): 1 reason(s)"
        );
        let ok = Event::Verdict {
            status: "ok".into(),
            attestation_id: 8,
            phase: "boot".into(),
            policy: Some(warden_protocol::attest::PolicyRef {
                name: "lab".into(),
                version: 2,
            }),
            reasons: vec![],
            codes: vec![],
        };
        assert_eq!(
            human(&ok),
            "attestation OK (boot, policy lab v2, attestation 8)"
        );
    }

    #[test]
    fn uptime_moves_forward() {
        let a = uptime();
        let b = uptime();
        assert!(b >= a);
        assert!(a > std::time::Duration::ZERO);
    }
}
