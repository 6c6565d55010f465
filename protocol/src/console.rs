//! The agent's machine-readable console lines: `WARDEN {json}`.
//!
//! Every state change and step result the agent prints on the serial console
//! is also printed as one line `WARDEN ` followed by a single-line JSON
//! object whose `"event"` names what happened. Operators grep for them, the
//! QEMU harness waits for them. The list below is the contract; adding a
//! field is compatible, renaming one is not. `docs/console-events.md`
//! describes each event for people.

use serde::{Deserialize, Serialize};

/// Prefix of every machine-readable console line.
pub const PREFIX: &str = "WARDEN ";

/// A failed module load during coldplug.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleFailure {
    pub module: String,
    pub error: String,
}

/// Everything the agent reports on the console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The agent started. `mode` is `init` (PID 1 on a node) or `host`.
    AgentStart {
        version: String,
        mode: String,
        pid: u32,
    },
    /// The boot's state machine moved: `from` → `to` because of `input`
    /// (`reason` says why a step was skipped or failed, when it was).
    State {
        from: String,
        to: String,
        input: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// One step of the init table finished (`ok` false: it failed, `detail` says why).
    InitStep {
        step: String,
        ok: bool,
        detail: String,
    },
    /// Coldplug finished: every module it loaded, in order, and the failures.
    ModulesLoaded {
        rounds: u32,
        loaded: Vec<String>,
        failed: Vec<ModuleFailure>,
    },
    /// A DHCP lease was bound on `interface`.
    DhcpLease {
        interface: String,
        address: String,
        router: Option<String>,
        server: String,
        lease_seconds: u32,
    },
    /// The TPM answered: EK read, PCR bank read.
    TpmReady {
        tcti: String,
        ek_algorithm: String,
        node_id: String,
        pcr_count: u32,
        ek_certificate: bool,
    },
    /// The firmware event log was read (`bytes` 0 and `detail` set when absent).
    EventLog {
        path: String,
        bytes: u64,
        detail: String,
    },
    /// Disks and NICs found.
    Inventory {
        disks: Vec<String>,
        nics: Vec<String>,
    },
    /// The server accepted `POST /v1/hello`.
    HelloOk {
        server: String,
        node_id: String,
        new_node: bool,
    },
    /// The server bound a fresh AK to this node's EK
    /// (MakeCredential/ActivateCredential round done).
    Enrolled {
        node_id: String,
        /// Hex TPM name of the bound AK.
        ak_name: String,
        /// The AK's algorithm (`warden_protocol::attest::AK_RSA` or `AK_ECC`).
        #[serde(default)]
        ak_algorithm: String,
        /// Why the server trusts the EK, in its words.
        ek_trust: String,
    },
    /// The server's verdict on an attestation.
    Verdict {
        /// `ok` or `failed`.
        status: String,
        attestation_id: i64,
        /// `boot` or `handoff`.
        #[serde(default)]
        phase: String,
        /// The policy applied, when the evidence got that far.
        policy: Option<crate::attest::PolicyRef>,
        /// Why it failed, one sentence each; empty when `ok`.
        reasons: Vec<String>,
        /// The stable codes of `reasons`, in the same order (e.g. `no-policy`).
        #[serde(default)]
        codes: Vec<String>,
    },
    /// A step failed and will be tried again after `delay_ms`.
    Retry {
        step: String,
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    /// A step failed in a way the agent can live with (e.g. no event log on a host).
    Error { step: String, error: String },
    /// The agent finished its work for this boot; `boot_ms` is kernel uptime.
    Ready { boot_ms: u64 },
    /// A fatal error: the agent will now `action` (`halt` or `poweroff`).
    Fatal { error: String, action: String },
    /// An erase is under way on `disk` (at most about once a second per disk).
    WipeProgress {
        disk: String,
        /// The method running, e.g. `zeroout`, `overwrite`, `verify-full`.
        method: String,
        /// 0..=100 of this method's work.
        percent: u32,
        mb_per_s: u64,
        /// Estimated seconds left for this method; `None` before a rate is known.
        eta_s: Option<u64>,
    },
    /// One disk's erase finished: `status` is `clean` or `failed`;
    /// `record_sha256` is the digest of its canonical
    /// [`crate::wipe::DiskRecord`] (what is measured).
    WipeResult {
        disk: String,
        status: String,
        /// The method that decided the outcome (the last one run), if any ran.
        method: Option<String>,
        bytes_written: u64,
        reason: Option<String>,
        record_sha256: String,
    },
    /// The tenant's image was written, checked and made bootable on `target`;
    /// `record_sha256` is the digest of its canonical
    /// [`crate::image::ImageRecord`] (what is measured). A failed write is a
    /// `fatal` line instead (it names URL, offset, expected vs got).
    ImageResult {
        url: String,
        /// The block device written, e.g. `/dev/nvme0n1`.
        target: String,
        bytes_written: u64,
        /// Zero bytes not written because the target read as zero after
        /// this boot's verified wipe.
        zero_bytes_skipped: u64,
        /// The digest of the image as served, `sha256:HEX` / `sha512:HEX`.
        digest: String,
        record_sha256: String,
    },
    /// The agent is about to leave the ramdisk for the tenant: the last line
    /// it prints. For `kexec`, the entry it measured into `pcr` (the
    /// tenant's kernel, initrd and command line, each extended as its
    /// SHA-256, in that order) and the value that PCR then holds if it
    /// started at zero; for `reboot-to-disk`, the `Boot####` set in BootNext.
    Handoff {
        /// `kexec`, `reboot-to-disk`, `reboot` or `poweroff`.
        mode: String,
        /// The disk handed over, e.g. `/dev/nvme0n1`.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        disk: Option<String>,
        /// Where the entry came from: `esp-bls`, `ext4-bls`, `uki`.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        source: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        path: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        kernel_sha256: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        initrd_sha256: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        cmdline: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        cmdline_sha256: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pcr: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        expected_pcr_from_zero: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        boot_next: Option<String>,
        /// The lease id written to the disk's `warden-config` partition.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        lease: Option<String>,
    },
}

impl Event {
    /// The `event` tag of this event, e.g. `dhcp_lease`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::AgentStart { .. } => "agent_start",
            Event::State { .. } => "state",
            Event::InitStep { .. } => "init_step",
            Event::ModulesLoaded { .. } => "modules_loaded",
            Event::DhcpLease { .. } => "dhcp_lease",
            Event::TpmReady { .. } => "tpm_ready",
            Event::EventLog { .. } => "event_log",
            Event::Inventory { .. } => "inventory",
            Event::HelloOk { .. } => "hello_ok",
            Event::Enrolled { .. } => "enrolled",
            Event::Verdict { .. } => "verdict",
            Event::Retry { .. } => "retry",
            Event::Error { .. } => "error",
            Event::Ready { .. } => "ready",
            Event::Fatal { .. } => "fatal",
            Event::WipeProgress { .. } => "wipe_progress",
            Event::WipeResult { .. } => "wipe_result",
            Event::ImageResult { .. } => "image_result",
            Event::Handoff { .. } => "handoff",
        }
    }

    /// The console line for this event, without a trailing newline.
    pub fn to_line(&self) -> String {
        // Serializing a plain enum of strings and numbers cannot fail; fall
        // back to a minimal line rather than lose the event if it ever did.
        match serde_json::to_string(self) {
            Ok(json) => format!("{PREFIX}{json}"),
            Err(e) => format!(
                "{PREFIX}{{\"event\":\"{}\",\"encode_error\":\"{}\"}}",
                self.name(),
                e.to_string().replace('"', "'")
            ),
        }
    }
}

/// Finds a `WARDEN {json}` line anywhere in `line` (the console may prefix
/// kernel timestamps or carriage returns) and returns its JSON object.
/// Unknown events still parse as JSON, so newer agents do not break older tools.
pub fn parse_line(line: &str) -> Option<serde_json::Value> {
    let start = line.find(PREFIX)?;
    let json = line[start + PREFIX.len()..].trim_end_matches(['\r', '\n']);
    // The first JSON value; text after it is ignored: on a serial console
    // a kernel message can land right behind the agent's line.
    let value: serde_json::Value = serde_json::Deserializer::from_str(json)
        .into_iter()
        .next()?
        .ok()?;
    value.get("event")?.as_str()?;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_message_glued_behind_the_line_is_ignored() {
        let line =
            r#"WARDEN {"event":"tpm_ready","pcr_count":24}[    4.350250] ata6: SATA link down"#;
        let v = parse_line(line).unwrap();
        assert_eq!(v["event"], "tpm_ready");
        assert_eq!(v["pcr_count"], 24);
        assert!(parse_line(r#"WARDEN {"event":"tpm_re[ 4.3] ata6"#).is_none());
    }

    #[test]
    fn line_round_trips() {
        let ev = Event::DhcpLease {
            interface: "eth0".into(),
            address: "10.0.2.15/24".into(),
            router: Some("10.0.2.2".into()),
            server: "10.0.2.2".into(),
            lease_seconds: 86400,
        };
        let line = ev.to_line();
        assert!(
            line.starts_with("WARDEN {\"event\":\"dhcp_lease\""),
            "{line}"
        );
        let v = parse_line(&format!("\r[    1.234] {line}\r\n")).unwrap();
        assert_eq!(v["event"], "dhcp_lease");
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev);
        assert_eq!(back.name(), "dhcp_lease");
    }

    #[test]
    fn attestation_events_round_trip() {
        let ev = Event::Verdict {
            status: "failed".into(),
            attestation_id: 4,
            phase: "boot".into(),
            policy: None,
            reasons: vec!["node has no policy".into()],
            codes: vec!["no-policy".into()],
        };
        let v = parse_line(&ev.to_line()).unwrap();
        assert_eq!(v["event"], "verdict");
        assert!(v["policy"].is_null(), "{v}");
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), ev);
        let ev = Event::Enrolled {
            node_id: "ab".repeat(32),
            ak_name: "000b".into(),
            ak_algorithm: "rsa2048-rsassa-sha256".into(),
            ek_trust: "EK certificate issued by swtpm-localca".into(),
        };
        let v = parse_line(&ev.to_line()).unwrap();
        assert_eq!(ev.name(), "enrolled");
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), ev);
    }

    #[test]
    fn image_result_round_trips() {
        let ev = Event::ImageResult {
            url: "http://10.0.2.2:8080/img.raw.zst".into(),
            target: "/dev/nvme0n1".into(),
            bytes_written: 4096,
            zero_bytes_skipped: 8192,
            digest: format!("sha256:{}", "ab".repeat(32)),
            record_sha256: "cd".repeat(32),
        };
        let v = parse_line(&ev.to_line()).unwrap();
        assert_eq!(v["event"], "image_result");
        assert_eq!(v["zero_bytes_skipped"], 8192);
        assert_eq!(ev.name(), "image_result");
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), ev);
    }

    #[test]
    fn ignores_other_lines() {
        assert!(parse_line("WARDEN not json").is_none());
        assert!(parse_line("[ 0.1] Linux version 6.1").is_none());
        assert!(parse_line("WARDEN {\"no_event\":1}").is_none());
    }
}
