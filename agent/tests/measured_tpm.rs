//! The measured log against a real swtpm: a turnover's step records and the
//! kexec handoff's three extends go through the agent's `Tpm` into PCR 13,
//! and the server's check (`agentlog::check`) accepts the log against the
//! PCR the TPM reads — and, with the `warden.test_alter_record` hook,
//! refuses it naming the altered event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use swtpm::{Provision, Swtpm};
use warden_agent::handoff::{self, BootEntry, EntrySource, Kexec, PlanOutcome, StepOutcome};
use warden_agent::measured::MeasuredLog;
use warden_agent::tpm::Tpm;
use warden_protocol::agentlog::{self, EventKind, Expectation, ExpectedDisk, AGENT_PCR};
use warden_protocol::attest::codes;
use warden_protocol::image::{DiskFormat, ImageFormat, ImageRecord, SignatureStatus};
use warden_protocol::snapshot::SnapshotRecord;
use warden_protocol::turnover::Handoff;
use warden_protocol::wipe::{self, DiskId, DiskRecord, Method};

const IMAGE_SHA: &str = "sha256:5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn snapshot() -> SnapshotRecord {
    SnapshotRecord {
        uri: "nbd://127.0.0.1:10809/lease-1".into(),
        source: "/dev/vda".into(),
        source_identity: "block:/dev/vda serial=s-vda".into(),
        disk_bytes: 64 << 20,
        chunk_size: 4 << 20,
        chunks: 16,
        zero_chunks: 12,
        changed_chunks: 16,
        bytes_sent: 16 << 20,
        bytes_zeroed: 48 << 20,
        zero_bytes_skipped: 0,
        manifest_sha256: "c3".repeat(32),
        manifest_bytes: 600,
        previous_manifest_sha256: None,
        incremental: false,
        verified: true,
        reconnects: 0,
        retries: 0,
        connections: 1,
        direct_io: true,
        verify_ms: 3,
        elapsed_ms: 40,
        ca_sha256: Vec::new(),
    }
}

fn disk(name: &str) -> DiskRecord {
    DiskRecord {
        disk: DiskId {
            name: name.into(),
            path: format!("/dev/{name}"),
            model: Some("QEMU HARDDISK".into()),
            serial: Some(format!("s-{name}")),
            size_bytes: 64 << 20,
        },
        requested: Method::Auto,
        attempts: Vec::new(),
        started_at: "2026-01-01T00:00:00Z".into(),
        finished_at: "2026-01-01T00:00:02Z".into(),
        bytes_written: 64 << 20,
        status: wipe::Status::Clean,
        reason: None,
    }
}

fn image() -> ImageRecord {
    ImageRecord {
        url: "http://127.0.0.1:8080/tenant.img.zst".into(),
        target: "/dev/vda".into(),
        format: ImageFormat::Zstd,
        disk_format: DiskFormat::Raw,
        image_bytes: 64 << 20,
        bytes_served: 3 << 20,
        bytes_written: 64 << 20,
        zero_bytes_skipped: 0,
        bmap_mapped_bytes: None,
        digest: IMAGE_SHA.into(),
        signature: SignatureStatus::NotRequired,
        resumes: 0,
        restarts: 0,
        verified_after_write: true,
        direct_io: true,
        download_ms: 10,
        verify_ms: 5,
        total_ms: 30,
        ca_sha256: Vec::new(),
    }
}

fn entry() -> BootEntry {
    BootEntry {
        source: EntrySource::EspBls,
        partition: 1,
        path: "/loader/entries/tenant.conf".into(),
        title: "Tenant".into(),
        kernel: b"not really a bzImage".to_vec(),
        initrd: b"not really an initrd".to_vec(),
        cmdline: "console=ttyS0 warden.lease=L-1".into(),
    }
}

fn expectation() -> Expectation {
    Expectation {
        snapshot: true,
        min_wipes: 2,
        image: true,
        disk: Some(ExpectedDisk::Image {
            checksum: IMAGE_SHA.into(),
        }),
        handoff: Some(Handoff::Kexec),
    }
}

/// A turnover's measurements through the real TPM; returns the log and
/// PCR 13 as the TPM reads it afterwards.
fn measure_turnover(tpm: &mut Tpm, alter: Option<EventKind>) -> (MeasuredLog, [u8; 32]) {
    assert_eq!(
        tpm.pcr_bank_sha256().unwrap()[&AGENT_PCR],
        [0; 32],
        "PCR 13 reads zero on a fresh TPM"
    );
    let mut log = MeasuredLog::new(alter);
    log.measure_snapshot(tpm, &snapshot()).unwrap();
    log.measure_wipe(tpm, &disk("vda")).unwrap();
    log.measure_wipe(tpm, &disk("vdb")).unwrap();
    log.measure_image(tpm, &image()).unwrap();
    log.measure_kexec(tpm, &entry()).unwrap();
    let pcr13 = tpm.pcr_bank_sha256().unwrap()[&AGENT_PCR];
    (log, pcr13)
}

/// Kexec that records instead of starting anything.
#[derive(Default)]
struct NoKexec(Vec<String>);

impl Kexec for NoKexec {
    fn load(&mut self, _: &[u8], _: &[u8], cmdline: &str) -> Result<(), handoff::HandoffError> {
        self.0.push(format!("load {cmdline}"));
        Ok(())
    }
    fn unload(&mut self) -> Result<(), handoff::HandoffError> {
        self.0.push("unload".into());
        Ok(())
    }
    fn sync(&mut self) {}
    fn exec(&mut self) -> Result<(), handoff::HandoffError> {
        self.0.push("exec".into());
        Ok(())
    }
}

#[test]
fn a_measured_turnover_passes_the_servers_check_against_the_real_pcr() {
    let swtpm = Swtpm::start_with(Provision::NoEkCertificate);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let (log, pcr13) = measure_turnover(&mut tpm, None);
    let kinds: Vec<EventKind> = log.events().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Snapshot,
            EventKind::Wipe,
            EventKind::Wipe,
            EventKind::Image,
            EventKind::HandoffKernel,
            EventKind::HandoffInitrd,
            EventKind::HandoffCmdline
        ]
    );
    let verified = agentlog::check(log.events(), &pcr13, &expectation()).unwrap();
    assert_eq!(verified.snapshot, Some(snapshot()));
    assert_eq!(verified.disks, vec![disk("vda"), disk("vdb")]);
    assert_eq!(verified.image, Some(image()));
    let d = entry().digests();
    let kexec = verified.kexec.unwrap();
    assert_eq!(kexec.kernel, hex::encode(d.kernel));
    assert_eq!(kexec.cmdline, hex::encode(d.cmdline));
    assert_eq!(verified.pcr13, hex::encode(pcr13));

    // The kexec after the final verdict extends nothing more: PCR 13 stays
    // what the quote and the report show.
    let cleared = handoff::guard(&PlanOutcome {
        steps: vec![StepOutcome {
            name: "image".into(),
            ok: true,
        }],
        last_verdict_ok: Some(true),
    })
    .unwrap();
    let mut kexec = NoKexec::default();
    handoff::kexec_handoff(&cleared, &entry(), &mut log.premeasured(), &mut kexec).unwrap();
    assert_eq!(kexec.0, ["load console=ttyS0 warden.lease=L-1", "exec"]);
    assert_eq!(tpm.pcr_bank_sha256().unwrap()[&AGENT_PCR], pcr13);

    // Another kernel than the measured one is refused, and unloaded.
    let mut other = entry();
    other.kernel.push(0);
    let mut kexec = NoKexec::default();
    let err =
        handoff::kexec_handoff(&cleared, &other, &mut log.premeasured(), &mut kexec).unwrap_err();
    assert!(err.to_string().contains("PCR 13"), "{err}");
    assert_eq!(kexec.0.last().map(String::as_str), Some("unload"));
}

#[test]
fn the_alter_hook_makes_the_check_fail_naming_the_event() {
    let swtpm = Swtpm::start_with(Provision::NoEkCertificate);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let (log, pcr13) = measure_turnover(&mut tpm, Some(EventKind::Wipe));
    let reasons = agentlog::check(log.events(), &pcr13, &expectation()).unwrap_err();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    let r = &reasons[0];
    assert_eq!(r.code, codes::AGENT_RECORD_MISMATCH);
    assert_eq!(r.pcr, Some(13));
    let event = r.event.as_ref().unwrap();
    assert_eq!((event.index, event.event_type.as_str()), (1, "wipe"));
    assert!(
        r.message
            .starts_with("PCR13 event 1 (wipe, \"wipe /dev/vda\")"),
        "{}",
        r.message
    );
    // The altered record still parses: only the hash gives it away.
    let altered: DiskRecord =
        serde_json::from_str(log.events()[1].record.as_ref().unwrap()).unwrap();
    assert_ne!(altered, disk("vda"));
}

#[test]
fn the_alter_hook_on_a_handoff_digest_breaks_the_replay() {
    let swtpm = Swtpm::start_with(Provision::NoEkCertificate);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let (log, pcr13) = measure_turnover(&mut tpm, Some(EventKind::HandoffInitrd));
    let reasons = agentlog::check(log.events(), &pcr13, &expectation()).unwrap_err();
    let codes: Vec<&str> = reasons.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(codes, [codes::AGENT_LOG_REPLAY], "{reasons:?}");
    assert!(
        reasons[0]
            .message
            .contains(&format!("but the quote says {}", hex::encode(pcr13))),
        "{}",
        reasons[0].message
    );
}
