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
        .with_writer(std::io::stderr)
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
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", event.to_line());
    let _ = out.flush();
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
