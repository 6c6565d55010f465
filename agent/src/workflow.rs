//! The boot workflow: an explicit state machine from PID 1's first
//! instruction to "ready", each transition logged and each step reported as
//! a console event.
//!
//! ```text
//! Start → Init → Coldplug → Network → Tpm → EventLog → Settle → Inventory → Hello
//!       → Enroll → Attest → [Plan →] [Snapshot →] [Wipe →] [Image | Restore →] Ready
//!       → [FinalAttest →] [Handoff] / Done
//!            Attest ── SessionOpened (OK verdict with a session) ──► Plan
//!            Plan ── Planned (the server's turnover) ──► Snapshot or Wipe
//!            Plan ── NoPlan ──► as Attested (the command line's keys)
//!            Snapshot ── Snapshotted ──► Wipe;  ── SnapshotFailed ──► Failed
//!            Ready ── Finalizing (in a turnover) ──► FinalAttest
//!            FinalAttest ── FinalAttested ──► Handoff;  ── Refused ──► Failed
//!            (any state) ── Fatal ──► Failed
//!            Attest ── Refused (verdict failed) ──► Failed
//!            Attest ── Attested, no wipe asked (warden.wipe=none) ──► Image or Ready
//!            Wipe ── WipeFailed (a disk not clean) ──► Failed
//!            Wipe ── Wiped ──► Image (warden.image set) or Ready
//!            Wipe ── WipedForRestore (a restore plan) ──► Restore
//!            Image ── ImageFailed ──► Failed
//!            Restore ── Restored ──► Ready;  ── RestoreFailed ──► Failed
//!            Hello ── Skipped (no server configured) ──► Ready
//! ```
//!
//! Tpm picks the EK once (`warden.ek`, see [`Tpm::select_ek`]); hello and
//! enroll both send that EK — the node id is the hash of its public key —
//! and the AK is made under it.
//!
//! Enroll creates a fresh Attestation Key under the EK on every boot and
//! binds it with a MakeCredential/ActivateCredential round: between leases
//! the tenant owns the TPM, so nothing persistent in it is trusted (see
//! `docs/attestation.md`). The AK lives only as a blob in this process and
//! is never left loaded in the TPM (the `tpm` facade flushes it after every
//! command); before any future handoff step the agent must make sure no
//! transient AK object remains loaded. Attest asks the server for a nonce,
//! quotes the PCRs the server names, and sends the quote with the event log;
//! a failed verdict stops the boot (`warden.on_error`) before any disk is
//! touched — nothing after Attest runs without an OK verdict.
//!
//! Wipe erases every disk of the inventory (in parallel, through
//! [`crate::wipe::wipe_disks`]) with the method `warden.wipe` names, reads
//! each back (`warden.wipe_verify`), and prints a summary and the record of
//! each disk; one disk that is not clean stops the boot (`warden.on_error`),
//! naming it.
//!
//! A turnover (`docs/turnover.md`): when the boot verdict carries a session,
//! Plan fetches the server's plan, which replaces the command line's interim
//! `warden.wipe`/`warden.image`/`warden.handoff`/`warden.lease` keys (they
//! still drive a boot without a plan, for the lab). Snapshot backs the
//! target disk up first when the plan names an export — never twice in one
//! lease: a snapshot an earlier boot took is measured, not retaken, since
//! the disk may be half erased by now. Each step's records are extended
//! into PCR 13 ([`crate::measured`]) and sent to the server, which must
//! acknowledge them before the next step starts. FinalAttest writes the
//! lease record, measures the handoff target, and quotes again with the
//! measured log; only an OK final verdict reaches Handoff, and nothing
//! extends PCR 13 after that quote. Console lines and progress go to the
//! server in the background ([`crate::telemetry`]).
//!
//! Image writes the tenant's image (`warden.image`, checked against
//! `warden.image_checksum`) onto one disk — `warden.image_target`, or the
//! first disk of the inventory in name order — through
//! [`crate::image::write_image`]. Zero runs are skipped only on a disk this
//! boot's wipe left verified zero; a failed write stops the boot
//! (`warden.on_error`) with the image module's error (URL, offset, expected
//! vs got), the disk left without a bootable header.
//!
//! Restore, in a restore plan (`restore_from`), takes Image's place: the
//! backup the server recorded (export, manifest digest and CA resolved by
//! the server, [`warden_protocol::turnover::RestoreSource`]) is written onto
//! the same target Image would use, every chunk checked against that
//! manifest first ([`crate::snapshot::restore`]); zero chunks are skipped
//! only on a disk this boot's wipe left verified zero. A failed restore
//! clears both GPT copies of the target, so a half-restored disk cannot
//! boot. Wipe, Image and Restore are the only states that write to a disk.
//!
//! [`next`] is the whole transition table, pure and unit-tested; [`Workflow`]
//! does each state's work. This module decides *what* happens; it must never
//! halt or power off the machine itself — [`boot`] (the end of the binary)
//! does that, only in init mode.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use warden_protocol::attest::{
    ActivateRequest, AkPublic, AttestRequest, EnrollRequest, NonceRequest, Phase, Status, Verdict,
    AK_ECC, AK_RSA,
};
use warden_protocol::console::Event;
use warden_protocol::hello::{
    node_id_for_ek, Disk, EkPublic, HelloRequest, Inventory, Lease, PcrBank,
};
use warden_protocol::image::{HttpsTrust, ImageRequest};
use warden_protocol::snapshot::{RestoreRequest, SnapshotRecord, SnapshotRequest};
use warden_protocol::turnover::{
    ConsoleBatch, DiskSource, Handoff, PlanRequest, RestoreSource, StepResult,
};
use warden_protocol::wipe::{DiskRecord, Expected, Status as WipeStatus, WipeReport};
use warden_protocol::PROTOCOL_VERSION;

use crate::client::{Client, ClientError};
use crate::config::{self, Config, HandoffMode, ImageConfig, Mode, PowerAction};
use crate::console::{self, LogHandle};
use crate::disk::{self, DiskOptions};
use crate::measured::{MeasureError, MeasuredLog};
use crate::tpm::{AkAlgorithm, AttestationKey, EkAlgorithm, EndorsementKey, Tpm, TpmError};
use crate::wipe::WipeOptions;
use crate::{coldplug, eventlog, handoff, image, init, net, snapshot, telemetry, wipe};

/// How long PID 1 waits for the TPM device node to appear.
const TPM_WAIT: Duration = Duration::from_secs(10);
/// How long one DHCP attempt waits for an answer.
const DHCP_ATTEMPT: Duration = Duration::from_secs(10);

/// Where the boot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Start,
    /// Mounts and the kernel command line (init mode).
    Init,
    /// Starts loading the kernel modules for the devices present (init
    /// mode), in the background: a slow probe (ahci's link resets take
    /// ~0.4 s) must not hold up DHCP and the TPM, which need none of it.
    Coldplug,
    /// DHCP (once coldplug has brought up a NIC, or finished).
    Network,
    /// EK and PCRs.
    Tpm,
    /// The firmware event log.
    EventLog,
    /// Waits for coldplug to finish, then mounts what needed its modules:
    /// the inventory must see every disk.
    Settle,
    /// Disks and NICs.
    Inventory,
    /// `POST /v1/hello`.
    Hello,
    /// A fresh AK, bound to the EK by the server's credential
    /// (`POST /v1/enroll`, ActivateCredential, `POST /v1/enroll/activate`).
    Enroll,
    /// Nonce, quote, `POST /v1/attest`; the server's verdict decides.
    Attest,
    /// Fetch this node's turnover plan over the session the verdict
    /// earned (`GET /v1/session/plan`); without one, the kernel command
    /// line's interim `warden.wipe`/`warden.image` keys decide.
    Plan,
    /// Back the outgoing tenant's disk up to the plan's NBD export (only in
    /// a turnover whose plan names one).
    Snapshot,
    /// Erase and read back every disk (only after an OK verdict, and only
    /// when a wipe was asked for).
    Wipe,
    /// Write the tenant's image onto one disk (only after an OK verdict and
    /// a clean wipe, if one was asked for; only when an image was asked for).
    Image,
    /// In a restore plan, in Image's place: write the backup the server
    /// recorded onto the target disk (only after a clean wipe).
    Restore,
    /// Report that the boot's work is done.
    Ready,
    /// In a turnover: measure the handoff target, then quote again (phase
    /// `handoff`) with the measured log of every step; only an OK verdict
    /// lets the handoff happen.
    FinalAttest,
    /// Hand the node to the tenant (`warden.handoff`): kexec the imaged
    /// disk's entry after measuring it, or reboot / power off. Passes the
    /// handoff guard first; on success the agent is gone.
    Handoff,
    /// Finished; what happens next is `warden.done`.
    Done,
    /// Gave up; what happens next is `warden.on_error`.
    Failed,
}

/// What happened in a state: the inputs of the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Begun,
    Mounted,
    ColdplugStarted,
    ModulesLoaded,
    Leased,
    TpmOpened,
    EventLogRead,
    /// The state's work was not done, for a reason the agent can live with
    /// (host mode, no event log, no server configured, coldplug failed).
    Skipped(String),
    InventoryTaken,
    HelloAccepted,
    /// The server bound this boot's AK.
    Enrolled,
    /// The verdict was OK; `wipe`: a wipe was asked for, so it comes next;
    /// `image`: an image was asked for (after the wipe, if any).
    Attested {
        wipe: bool,
        image: bool,
    },
    /// The verdict was OK and the server opened a session for this boot.
    SessionOpened,
    /// The server's plan for this node: a turnover, with a snapshot first
    /// when `snapshot`.
    Planned {
        snapshot: bool,
    },
    /// No plan: the kernel command line's keys decide what runs.
    NoPlan {
        wipe: bool,
        image: bool,
    },
    /// The snapshot is on the remote export (or was, from an earlier boot
    /// of this lease), and measured.
    Snapshotted,
    /// The snapshot failed: the reason names the export and the disk.
    SnapshotFailed(String),
    /// Ready, in a turnover: the final attestation comes next.
    Finalizing,
    /// The final verdict was OK.
    FinalAttested,
    /// The verdict was failed: the evidence is not what the policy allows.
    Refused(String),
    /// Every disk was erased and read back clean; `image`: an image was
    /// asked for, so it comes next.
    Wiped {
        image: bool,
    },
    /// Every disk was erased and read back clean, and the plan restores a
    /// backup next.
    WipedForRestore,
    /// A disk is not clean (or none was found): the reason names them.
    WipeFailed(String),
    /// The image was written, its checksum matched, its header is in place.
    Imaged,
    /// The image was not written: the reason names URL, offset, expected vs got.
    ImageFailed(String),
    /// The backup was written, every chunk matching the recorded manifest.
    Restored,
    /// The backup was not restored: the reason names the export, the chunk
    /// or offset and the target; the target's GPT copies are cleared.
    RestoreFailed(String),
    Reported,
    /// Ready was reported and a handoff was asked for.
    HandingOff,
    /// The handoff did not happen: the reason names the guard, the disk or
    /// the entry. The node stays in the ramdisk (then `warden.on_error`).
    HandoffFailed(String),
    /// The boot cannot go on.
    Fatal(String),
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::Begun => "begun",
            Input::Mounted => "mounted",
            Input::ColdplugStarted => "coldplug_started",
            Input::ModulesLoaded => "modules_loaded",
            Input::Leased => "leased",
            Input::TpmOpened => "tpm_opened",
            Input::EventLogRead => "event_log_read",
            Input::Skipped(_) => "skipped",
            Input::InventoryTaken => "inventory_taken",
            Input::HelloAccepted => "hello_accepted",
            Input::Enrolled => "enrolled",
            Input::Attested { .. } => "attested",
            Input::SessionOpened => "session_opened",
            Input::Planned { .. } => "planned",
            Input::NoPlan { .. } => "no_plan",
            Input::Snapshotted => "snapshotted",
            Input::SnapshotFailed(_) => "snapshot_failed",
            Input::Finalizing => "finalizing",
            Input::FinalAttested => "final_attested",
            Input::Refused(_) => "refused",
            Input::Wiped { .. } => "wiped",
            Input::WipedForRestore => "wiped_for_restore",
            Input::WipeFailed(_) => "wipe_failed",
            Input::Imaged => "imaged",
            Input::ImageFailed(_) => "image_failed",
            Input::Restored => "restored",
            Input::RestoreFailed(_) => "restore_failed",
            Input::Reported => "reported",
            Input::HandingOff => "handing_off",
            Input::HandoffFailed(_) => "handoff_failed",
            Input::Fatal(_) => "fatal",
        }
    }
}

/// An input that makes no sense in a state: a bug in the agent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("workflow: input {input} is not valid in state {state:?}")]
pub struct InvalidTransition {
    pub state: State,
    pub input: &'static str,
}

/// The transition table.
pub fn next(state: State, input: &Input) -> Result<State, InvalidTransition> {
    use Input as I;
    use State as S;
    let to = match (state, input) {
        (S::Done | S::Failed, _) => None,
        (_, I::Fatal(_)) => Some(S::Failed),
        (S::Start, I::Begun) => Some(S::Init),
        (S::Init, I::Mounted | I::Skipped(_)) => Some(S::Coldplug),
        (S::Coldplug, I::ColdplugStarted | I::Skipped(_)) => Some(S::Network),
        (S::Network, I::Leased | I::Skipped(_)) => Some(S::Tpm),
        (S::Tpm, I::TpmOpened) => Some(S::EventLog),
        (S::EventLog, I::EventLogRead | I::Skipped(_)) => Some(S::Settle),
        (S::Settle, I::ModulesLoaded | I::Skipped(_)) => Some(S::Inventory),
        (S::Inventory, I::InventoryTaken) => Some(S::Hello),
        (S::Hello, I::HelloAccepted) => Some(S::Enroll),
        // No server configured: nobody to enroll with or attest to.
        (S::Hello, I::Skipped(_)) => Some(S::Ready),
        (S::Enroll, I::Enrolled) => Some(S::Attest),
        (S::Attest, I::Attested { wipe: true, .. }) => Some(S::Wipe),
        (
            S::Attest,
            I::Attested {
                wipe: false,
                image: true,
            },
        ) => Some(S::Image),
        (
            S::Attest,
            I::Attested {
                wipe: false,
                image: false,
            },
        ) => Some(S::Ready),
        (S::Attest, I::Refused(_)) => Some(S::Failed),
        (S::Attest, I::SessionOpened) => Some(S::Plan),
        (S::Plan, I::Planned { snapshot: true }) => Some(S::Snapshot),
        // A plan always wipes (its method defaults to auto).
        (S::Plan, I::Planned { snapshot: false }) | (S::Plan, I::NoPlan { wipe: true, .. }) => {
            Some(S::Wipe)
        }
        (
            S::Plan,
            I::NoPlan {
                wipe: false,
                image: true,
            },
        ) => Some(S::Image),
        (
            S::Plan,
            I::NoPlan {
                wipe: false,
                image: false,
            },
        ) => Some(S::Ready),
        (S::Snapshot, I::Snapshotted) => Some(S::Wipe),
        (S::Snapshot, I::SnapshotFailed(_)) => Some(S::Failed),
        (S::Ready, I::Finalizing) => Some(S::FinalAttest),
        (S::FinalAttest, I::FinalAttested) => Some(S::Handoff),
        (S::FinalAttest, I::Refused(_) | I::HandoffFailed(_)) => Some(S::Failed),
        (S::Wipe, I::Wiped { image: true }) => Some(S::Image),
        (S::Wipe, I::Wiped { image: false }) => Some(S::Ready),
        (S::Wipe, I::WipedForRestore) => Some(S::Restore),
        (S::Wipe, I::WipeFailed(_)) => Some(S::Failed),
        (S::Image, I::Imaged) => Some(S::Ready),
        (S::Image, I::ImageFailed(_)) => Some(S::Failed),
        (S::Restore, I::Restored) => Some(S::Ready),
        (S::Restore, I::RestoreFailed(_)) => Some(S::Failed),
        (S::Ready, I::Reported) => Some(S::Done),
        (S::Ready, I::HandingOff) => Some(S::Handoff),
        (S::Handoff, I::HandoffFailed(_)) => Some(S::Failed),
        _ => None,
    };
    to.ok_or(InvalidTransition {
        state,
        input: input.name(),
    })
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Fatal(String),
}

/// What the TPM told us.
struct TpmFacts {
    /// Which EK this boot enrolls with ([`Tpm::select_ek`]).
    ek_algorithm: EkAlgorithm,
    ek: EndorsementKey,
    pcrs: BTreeMap<u32, [u8; 32]>,
    node_id: String,
}

/// This boot's AK, as the server bound it.
struct Binding {
    ak: AttestationKey,
    /// The node id the server enrolled us under.
    node_id: String,
}

/// One boot: the settings and what the steps found so far.
pub struct Workflow {
    cfg: Config,
    log: Option<LogHandle>,
    started: Instant,
    lease: Option<Lease>,
    tpm: Option<TpmFacts>,
    event_log: Option<Vec<u8>>,
    inventory: Option<Inventory>,
    binding: Option<Binding>,
    /// The inventory's disks, kept for Wipe (the inventory itself goes to
    /// the server with the hello).
    disks: Vec<Disk>,
    /// Names of the disks this boot's wipe left verified zero: the only
    /// disks on which Image may skip zero runs.
    zeroed: BTreeSet<String>,
    /// The disk this boot's image went to: what a handoff starts.
    imaged: Option<Disk>,
    /// Every step this boot ran, and whether it succeeded, and the last
    /// verdict: what the handoff guard checks.
    plan: handoff::PlanOutcome,
    /// The session token of this boot's good verdict, if the server gave one.
    session: Option<String>,
    /// The turnover this boot runs for the server, if it has a plan.
    turnover: Option<Turnover>,
    /// The coldplug run going on in the background, and where it reads.
    coldplug: Option<(
        tokio::task::JoinHandle<Result<coldplug::ColdplugReport, String>>,
        PathBuf,
    )>,
}

impl Workflow {
    /// In init mode `cfg` holds defaults until the Init state reads the
    /// kernel command line; `log` then gets the configured filter.
    pub fn new(cfg: Config, log: Option<LogHandle>) -> Workflow {
        Workflow {
            cfg,
            log,
            started: Instant::now(),
            lease: None,
            tpm: None,
            event_log: None,
            inventory: None,
            binding: None,
            disks: Vec::new(),
            zeroed: BTreeSet::new(),
            imaged: None,
            plan: handoff::PlanOutcome::default(),
            session: None,
            turnover: None,
            coldplug: None,
        }
    }

    /// The settings in force (after Init: the kernel command line's).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Runs the machine to Done or Failed.
    pub async fn run(&mut self) -> Outcome {
        let mut state = State::Start;
        loop {
            let input = match state {
                State::Start => Input::Begun,
                State::Init => self.init(),
                State::Coldplug => self.start_coldplug(),
                State::Network => self.network().await,
                State::Tpm => self.tpm().await,
                State::EventLog => self.read_event_log(),
                State::Settle => self.settle().await,
                State::Inventory => self.take_inventory(),
                State::Hello => self.hello().await,
                State::Enroll => self.enroll().await,
                State::Attest => self.attest().await,
                State::Plan => self.plan_step().await,
                State::Snapshot => self.snapshot().await,
                State::Wipe => self.wipe().await,
                State::Image => self.image().await,
                State::Restore => self.restore().await,
                State::Ready => self.ready(),
                State::FinalAttest => self.final_attest().await,
                State::Handoff => self.handoff().await,
                State::Done => return Outcome::Done,
                State::Failed => {
                    return Outcome::Fatal("workflow failed without a cause".into());
                }
            };
            let to = match next(state, &input) {
                Ok(to) => to,
                Err(e) => return Outcome::Fatal(e.to_string()),
            };
            console::emit(&Event::State {
                from: format!("{state:?}"),
                to: format!("{to:?}"),
                input: input.name().to_string(),
                reason: match &input {
                    Input::Skipped(why)
                    | Input::Fatal(why)
                    | Input::Refused(why)
                    | Input::SnapshotFailed(why)
                    | Input::WipeFailed(why)
                    | Input::ImageFailed(why)
                    | Input::RestoreFailed(why)
                    | Input::HandoffFailed(why) => Some(why.clone()),
                    _ => None,
                },
            });
            // The server ended the plan itself when it refused the final
            // attestation; every other failure it learns from the agent.
            let server_knows = state == State::FinalAttest && matches!(input, Input::Refused(_));
            if let Input::Fatal(error)
            | Input::Refused(error)
            | Input::SnapshotFailed(error)
            | Input::WipeFailed(error)
            | Input::ImageFailed(error)
            | Input::RestoreFailed(error)
            | Input::HandoffFailed(error) = input
            {
                self.turnover_failed(state, &error, server_knows).await;
                return Outcome::Fatal(error);
            }
            state = to;
        }
    }

    fn attempts(&self) -> config::Backoff {
        self.cfg.backoff()
    }

    fn init(&mut self) -> Input {
        if self.cfg.mode == Mode::Host {
            return Input::Skipped("host mode mounts nothing".into());
        }
        let report = init::run_table(&init::table(), &mut init::RealEffects, &mut |ev| {
            console::emit(&ev)
        });
        if let Some((step, error)) = report.failed.first() {
            return Input::Fatal(format!("init: {step} failed: {error}"));
        }
        let cmdline = match std::fs::read_to_string("/proc/cmdline") {
            Ok(s) => s,
            Err(e) => return Input::Fatal(format!("init: cannot read /proc/cmdline: {e}")),
        };
        let cfg = match config::parse_cmdline(&cmdline) {
            Ok(cfg) => cfg,
            Err(e) => return Input::Fatal(format!("kernel command line: {e}")),
        };
        for key in &cfg.unknown_keys {
            tracing::warn!(key = %key, "config: unknown kernel command line key {key} ignored");
        }
        init::set_panic_action(Some(cfg.on_error));
        if let Some(log) = &self.log {
            log.set_filter(&cfg.log);
        }
        tracing::info!(
            server = cfg.server.as_ref().map(|s| s.url.as_str()).unwrap_or("none"),
            tcti = %cfg.tcti,
            ak = cfg.ak.name(),
            ek = cfg.ek.name(),
            wipe = %cfg.wipe.map(|m| m.to_string()).unwrap_or_else(|| "none".into()),
            image = cfg.image.as_ref().map(|i| i.url.as_str()).unwrap_or("none"),
            on_error = cfg.on_error.as_str(),
            done = cfg.done.as_str(),
            "config: from kernel command line"
        );
        self.cfg = cfg;
        Input::Mounted
    }

    fn start_coldplug(&mut self) -> Input {
        if self.cfg.mode == Mode::Host {
            return Input::Skipped("host mode loads no kernel modules".into());
        }
        let release = match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            Ok(s) => s.trim().to_string(),
            Err(e) => {
                let error =
                    format!("cannot read the kernel release from /proc/sys/kernel/osrelease: {e}");
                console::emit(&Event::Error {
                    step: "coldplug".into(),
                    error: error.clone(),
                });
                return Input::Skipped(error);
            }
        };
        let modules = PathBuf::from("/lib/modules").join(&release);
        let dir = modules.clone();
        let task = tokio::task::spawn_blocking(move || {
            coldplug::coldplug(Path::new("/sys/devices"), &dir).map_err(|e| e.to_string())
        });
        self.coldplug = Some((task, modules));
        Input::ColdplugStarted
    }

    /// Returns once a NIC exists or coldplug is over (then DHCP says what
    /// is missing, and retries find NICs whose drivers load later).
    async fn wait_for_a_nic(&self) {
        let Some((task, _)) = &self.coldplug else {
            return;
        };
        let class_net = self.cfg.sys.join("class/net");
        while !task.is_finished() && net::list_nics(&class_net).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn settle(&mut self) -> Input {
        let Some((task, modules)) = self.coldplug.take() else {
            return Input::Skipped("no coldplug run".into());
        };
        let result = task
            .await
            .unwrap_or_else(|e| Err(format!("coldplug task failed: {e}")));
        match result {
            Ok(report) => {
                console::emit(&Event::ModulesLoaded {
                    rounds: report.rounds,
                    loaded: report.loaded,
                    failed: report.failed,
                });
                self.late_mounts()
            }
            Err(e) => {
                let error = format!("coldplug from {}: {e}", modules.display());
                console::emit(&Event::Error {
                    step: "coldplug".into(),
                    error: error.clone(),
                });
                Input::Skipped(error)
            }
        }
    }

    /// Mounts that need the modules coldplug just loaded (efivarfs).
    fn late_mounts(&mut self) -> Input {
        let report = init::run_table(&init::late_table(), &mut init::RealEffects, &mut |ev| {
            console::emit(&ev)
        });
        // Only the reboot handoff needs EFI variables: attesting without
        // them is still worth doing, so this is an error, not a fatal one.
        for (step, error) in &report.failed {
            console::emit(&Event::Error {
                step: step.clone(),
                error: error.clone(),
            });
        }
        Input::ModulesLoaded
    }

    async fn network(&mut self) -> Input {
        if !self.cfg.dhcp {
            return Input::Skipped("host mode without --dhcp-interface".into());
        }
        self.wait_for_a_nic().await;
        let opts = net::DhcpOptions {
            interfaces: self.cfg.dhcp_interfaces.clone(),
            attempt_timeout: DHCP_ATTEMPT,
        };
        let mut backoff = self.attempts();
        loop {
            match net::dhcp_first_lease(&opts).await {
                Ok(lease) => {
                    console::emit(&Event::DhcpLease {
                        interface: lease.interface.clone(),
                        address: lease.address.clone(),
                        router: lease.router.clone(),
                        server: lease.server.clone(),
                        lease_seconds: lease.lease_seconds,
                    });
                    self.lease = Some(lease);
                    return Input::Leased;
                }
                Err(e) => match retry("dhcp", &mut backoff, &e.to_string()).await {
                    Some(fatal) => return Input::Fatal(fatal),
                    None => continue,
                },
            }
        }
    }

    async fn tpm(&mut self) -> Input {
        let tcti = self.cfg.tcti.clone();
        if self.cfg.mode == Mode::Init {
            if let Some(node) = tcti.strip_prefix("device:") {
                if !wait_for_path(Path::new(node), TPM_WAIT).await {
                    return Input::Fatal(format!(
                        "no TPM: {node} did not appear within {}s (is a TPM 2.0 present and enabled in the firmware?)",
                        TPM_WAIT.as_secs()
                    ));
                }
            }
        }
        let t = tcti.clone();
        let choice = self.cfg.ek;
        // tss-esapi calls block: keep them off the runtime's only thread.
        let result = tokio::task::spawn_blocking(move || {
            let mut tpm = Tpm::open(&t).map_err(|e| e.to_string())?;
            let algorithm = tpm.select_ek(choice).map_err(|e| e.to_string())?;
            let ek = tpm
                .endorsement_key_for(algorithm)
                .map_err(|e| e.to_string())?;
            let pcrs = tpm.pcr_bank_sha256().map_err(|e| e.to_string())?;
            Ok::<_, String>((algorithm, ek, pcrs))
        })
        .await
        .unwrap_or_else(|e| Err(format!("TPM task failed: {e}")));
        let (ek_algorithm, ek, pcrs) = match result {
            Ok(v) => v,
            Err(e) => return Input::Fatal(format!("tpm: {e}")),
        };
        let node_id = node_id_for_ek(&ek.public_key_der);
        console::emit(&Event::TpmReady {
            tcti,
            ek_algorithm: ek.algorithm.to_string(),
            node_id: node_id.clone(),
            pcr_count: u32::try_from(pcrs.len()).unwrap_or(u32::MAX),
            ek_certificate: ek.certificate_der.is_some(),
        });
        self.tpm = Some(TpmFacts {
            ek_algorithm,
            ek,
            pcrs,
            node_id,
        });
        Input::TpmOpened
    }

    fn read_event_log(&mut self) -> Input {
        let path = self.cfg.event_log.clone();
        match eventlog::read_event_log(&path) {
            Ok(bytes) => {
                console::emit(&Event::EventLog {
                    path: path.display().to_string(),
                    bytes: bytes.len() as u64,
                    detail: String::new(),
                });
                self.event_log = Some(bytes);
                Input::EventLogRead
            }
            Err(e) => {
                let error = e.to_string();
                console::emit(&Event::Error {
                    step: "event_log".into(),
                    error: error.clone(),
                });
                console::emit(&Event::EventLog {
                    path: path.display().to_string(),
                    bytes: 0,
                    detail: error.clone(),
                });
                Input::Skipped(error)
            }
        }
    }

    fn take_inventory(&mut self) -> Input {
        let opts = DiskOptions {
            include_loop: self.cfg.include_loop,
        };
        let disks = match disk::list_disks(&self.cfg.sys, opts) {
            Ok(d) => d,
            Err(e) => {
                console::emit(&Event::Error {
                    step: "inventory".into(),
                    error: e.to_string(),
                });
                Vec::new()
            }
        };
        let nics = net::list_nics(&self.cfg.sys.join("class/net"));
        console::emit(&Event::Inventory {
            disks: disks.iter().map(|d| d.name.clone()).collect(),
            nics: nics.iter().map(|n| n.name.clone()).collect(),
        });
        for d in &disks {
            tracing::debug!(disk = %d.name, size = d.size_bytes, transport = %d.transport, "inventory: disk");
        }
        self.disks = disks.clone();
        self.inventory = Some(Inventory {
            disks,
            nics,
            lease: self.lease.clone(),
        });
        Input::InventoryTaken
    }

    async fn hello(&mut self) -> Input {
        let Some(server) = self.cfg.server.clone() else {
            let error =
                "no server configured (warden.server / --server); not saying hello".to_string();
            console::emit(&Event::Error {
                step: "hello".into(),
                error: error.clone(),
            });
            return Input::Skipped(error);
        };
        let Some(tpm) = &self.tpm else {
            return Input::Fatal("hello: no TPM facts (workflow bug)".into());
        };
        let client = match Client::new(&server) {
            Ok(c) => c,
            Err(e) => return Input::Fatal(e.to_string()),
        };
        let mut req = HelloRequest {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: 0,
            ek: ek_public(&tpm.ek),
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values: tpm.pcrs.iter().map(|(i, d)| (*i, hex::encode(d))).collect(),
            },
            // Copied: the attestation sends it again (real logs are 5–100 KB).
            event_log: self.event_log.clone(),
            inventory: self.inventory.take().unwrap_or_default(),
        };
        let mut backoff = self.attempts();
        loop {
            req.uptime_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            match client.hello(&req).await {
                Ok(resp) => {
                    if resp.node_id != tpm.node_id {
                        console::emit(&Event::Error {
                            step: "hello".into(),
                            error: format!(
                                "server {} derived node id {} but the agent computed {}",
                                server.url, resp.node_id, tpm.node_id
                            ),
                        });
                    }
                    console::emit(&Event::HelloOk {
                        server: server.url.clone(),
                        node_id: resp.node_id,
                        new_node: resp.new_node,
                    });
                    return Input::HelloAccepted;
                }
                Err(e) if e.is_permanent() => return Input::Fatal(e.to_string()),
                Err(e) => match retry("hello", &mut backoff, &e.to_string()).await {
                    Some(fatal) => return Input::Fatal(fatal),
                    None => continue,
                },
            }
        }
    }

    /// Creates this boot's AK and has the server bind it: enroll (EK + AK
    /// public), ActivateCredential on the challenge, activate. A refusal
    /// (HTTP 4xx, e.g. 403 `ek_untrusted`) is fatal and carries the server's
    /// words; transport failures are retried with a new enrollment round.
    async fn enroll(&mut self) -> Input {
        let Some(server) = self.cfg.server.clone() else {
            return Input::Fatal("enroll: no server configured (workflow bug)".into());
        };
        let Some(tpm) = &self.tpm else {
            return Input::Fatal("enroll: no TPM facts (workflow bug)".into());
        };
        let client = match Client::new(&server) {
            Ok(c) => c,
            Err(e) => return Input::Fatal(format!("enroll: {e}")),
        };
        let algorithm = self.cfg.ak;
        // Under the EK hello named the node by: the server makes its
        // credential for that EK, and the AK must open it.
        let ek_algorithm = tpm.ek_algorithm;
        let ak = match with_tpm(&self.cfg.tcti, move |t| {
            t.create_ak_under(ek_algorithm, algorithm)
        })
        .await
        {
            Ok(ak) => ak,
            Err(e) => return Input::Fatal(format!("enroll: creating the AK: {e}")),
        };
        let req = EnrollRequest {
            protocol: PROTOCOL_VERSION,
            ek: ek_public(&tpm.ek),
            ak: AkPublic {
                algorithm: wire_ak_algorithm(algorithm).to_string(),
                tpm_public: ak.tpm_public.clone(),
            },
        };
        let expected_node = tpm.node_id.clone();
        let mut backoff = self.attempts();
        loop {
            let challenge = match client.enroll(&req).await {
                Ok(c) => c,
                Err(e) => match give_up("enroll", &mut backoff, e).await {
                    Some(fatal) => return Input::Fatal(fatal),
                    None => continue,
                },
            };
            let (key, id_object, secret) = (
                ak.clone(),
                challenge.id_object.clone(),
                challenge.encrypted_secret.clone(),
            );
            let activated = with_tpm(&self.cfg.tcti, move |t| {
                t.activate_credential(&key, &id_object, &secret)
            })
            .await;
            let secret = match activated {
                Ok(secret) => secret,
                Err(e) => {
                    let trust = &challenge.ek_trust;
                    return Input::Fatal(format!(
                        "enroll: the server's credential does not open in this TPM \
                         (EK trust: {trust}): {e}"
                    ));
                }
            };
            let activate = ActivateRequest {
                enrollment_id: challenge.enrollment_id.clone(),
                secret,
            };
            let enrolled = match client.activate(&activate).await {
                Ok(enrolled) => enrolled,
                Err(e) => match give_up("enroll", &mut backoff, e).await {
                    Some(fatal) => return Input::Fatal(fatal),
                    None => continue,
                },
            };
            let own_name = hex::encode(&ak.name);
            if enrolled.ak_name != own_name || enrolled.node_id != expected_node {
                console::emit(&Event::Error {
                    step: "enroll".into(),
                    error: format!(
                        "server {} bound AK {} to node {} but this TPM's AK is {own_name} and its node id {expected_node}",
                        server.url, enrolled.ak_name, enrolled.node_id
                    ),
                });
            }
            console::emit(&Event::Enrolled {
                node_id: enrolled.node_id.clone(),
                ak_name: enrolled.ak_name.clone(),
                ak_algorithm: wire_ak_algorithm(algorithm).to_string(),
                ek_trust: challenge.ek_trust,
            });
            self.binding = Some(Binding {
                ak,
                node_id: enrolled.node_id,
            });
            return Input::Enrolled;
        }
    }

    /// The boot attestation: an OK verdict lets the boot go on, with a
    /// session when the server opened one.
    async fn attest(&mut self) -> Input {
        let verdict = match self.quote_and_attest(Phase::Boot, Vec::new()).await {
            Ok(v) => v,
            Err(fatal) => return Input::Fatal(fatal),
        };
        match verdict.status {
            Status::Ok => match verdict.session {
                Some(token) => {
                    self.session = Some(token);
                    Input::SessionOpened
                }
                None => Input::Attested {
                    wipe: self.cfg.wipe.is_some(),
                    image: self.cfg.image.is_some(),
                },
            },
            Status::Failed => Input::Refused(refusal(&verdict)),
        }
    }

    /// Nonce → quote of the PCRs the server names → `POST /v1/attest`. A
    /// transport failure starts over with a new nonce (each is single-use).
    /// Records the verdict for the handoff guard; `Err` is fatal.
    async fn quote_and_attest(
        &mut self,
        phase: Phase,
        agent_log: Vec<warden_protocol::agentlog::AgentEvent>,
    ) -> Result<Verdict, String> {
        let Some(server) = self.cfg.server.clone() else {
            return Err("attest: no server configured (workflow bug)".into());
        };
        let Some(binding) = &self.binding else {
            return Err("attest: no enrolled AK (workflow bug)".into());
        };
        let client = Client::new(&server).map_err(|e| format!("attest: {e}"))?;
        let mut backoff = self.attempts();
        loop {
            let nonce = match client
                .nonce(&NonceRequest {
                    node_id: binding.node_id.clone(),
                })
                .await
            {
                Ok(n) => n,
                Err(e) => match give_up("attest", &mut backoff, e).await {
                    Some(fatal) => return Err(fatal),
                    None => continue,
                },
            };
            let (key, qualifying, pcrs) = (binding.ak.clone(), nonce.nonce.clone(), nonce.pcrs);
            let quote = with_tpm(&self.cfg.tcti, move |t| t.quote(&key, &qualifying, &pcrs))
                .await
                .map_err(|e| format!("attest: {e}"))?;
            let req = AttestRequest {
                protocol: PROTOCOL_VERSION,
                node_id: binding.node_id.clone(),
                ak_name: hex::encode(&binding.ak.name),
                nonce: nonce.nonce,
                quote: quote.attest,
                signature: quote.signature,
                pcrs: PcrBank {
                    algorithm: "sha256".into(),
                    values: quote
                        .pcr_values
                        .iter()
                        .map(|(i, d)| (*i, hex::encode(d)))
                        .collect(),
                },
                event_log: self.event_log.clone(),
                phase,
                agent_log: agent_log.clone(),
            };
            let verdict = match client.attest(&req).await {
                Ok(v) => v,
                Err(e) => match give_up("attest", &mut backoff, e).await {
                    Some(fatal) => return Err(fatal),
                    None => continue,
                },
            };
            console::emit(&verdict_event(&verdict));
            // E.g. the TPM was not shut down orderly: passed, but worth a look.
            for note in &verdict.notes {
                tracing::warn!("attestation note: {}", note.message);
            }
            self.plan.last_verdict_ok = Some(verdict.status == Status::Ok);
            self.plan.steps.push(handoff::StepOutcome {
                name: match phase {
                    Phase::Boot => "attest".into(),
                    Phase::Handoff => "final-attest".into(),
                },
                ok: verdict.status == Status::Ok,
            });
            return Ok(verdict);
        }
    }

    /// Erases every disk of the inventory with `warden.wipe`'s method, in
    /// parallel (one thread per disk, in the wipe library), reads each back,
    /// and prints per disk its capabilities, a summary and its record.
    /// `wipe_progress`/`wipe_result` events come from the library.
    async fn wipe(&mut self) -> Input {
        let Some(method) = self.cfg.wipe else {
            return Input::Fatal("wipe: no method asked for (workflow bug)".into());
        };
        let (disks, spared) = wipe_candidates(self.cfg.mode, &self.disks);
        if !spared.is_empty() {
            tracing::warn!(
                "wipe: host mode erases loop devices only; leaving {} alone",
                spared.join(" ")
            );
        }
        if disks.is_empty() {
            // Fail safe: a node whose storage driver is missing from the
            // ramdisk also shows no disks, and must not pass as erased.
            return Input::WipeFailed(format!(
                "wipe: no local disk found to erase with {method} (is the storage \
                 controller's driver in the ramdisk?)"
            ));
        }
        let opts = WipeOptions {
            method,
            verify: self.cfg.wipe_verify,
            sys_root: self.cfg.sys.clone(),
            ..WipeOptions::default()
        };
        tracing::info!(
            "wipe: erasing {} disk(s) [{}] with {method}, read-back {}",
            disks.len(),
            disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            console::verify_mode_text(self.cfg.wipe_verify)
        );
        let sys = self.cfg.sys.clone();
        let step_started = (db_now(), Instant::now());
        // Erasing blocks for minutes: the blocking pool, not the runtime's thread.
        let task = tokio::task::spawn_blocking(move || {
            for d in &disks {
                tracing::info!("{}", console::disk_caps_line(&disk::probe(&sys, d)));
            }
            wipe::wipe_disks(&disks, &opts)
        });
        let report = match task.await {
            Ok(report) => report,
            Err(e) => return Input::WipeFailed(format!("wipe: the erase task failed: {e}")),
        };
        for record in &report.disks {
            let line = console::wipe_summary(record);
            if record.status == WipeStatus::Clean {
                tracing::info!("{line}");
            } else {
                tracing::error!("{line}");
            }
            // The whole record, until the server keeps it (issue #8): its
            // SHA-256 is the `wipe_result` event's `record_sha256`.
            tracing::info!(
                "wipe: record of {}: {}",
                record.disk.name,
                String::from_utf8_lossy(&record.canonical_json())
            );
        }
        self.zeroed = report
            .disks
            .iter()
            .filter(|r| reads_zero(r))
            .map(|r| r.disk.name.clone())
            .collect();
        let failure = wipe_failure(&report);
        self.plan.steps.push(handoff::StepOutcome {
            name: "wipe".into(),
            ok: failure.is_none(),
        });
        if failure.is_none() && self.turnover.is_some() {
            let records = report.disks.clone();
            let bytes = records.iter().map(|r| r.bytes_written).sum();
            if let Err(e) = self
                .measure(move |log, tpm| {
                    for r in &records {
                        log.measure_wipe(tpm, r)?;
                    }
                    Ok(())
                })
                .await
            {
                return Input::WipeFailed(e);
            }
            let records = report
                .disks
                .iter()
                .map(|r| String::from_utf8_lossy(&r.canonical_json()).into_owned())
                .collect();
            if let Err(e) = self.step_done("wipe", step_started, bytes, records).await {
                return Input::Fatal(e);
            }
        }
        let restore = self.turnover.as_ref().is_some_and(|t| t.restore.is_some());
        match failure {
            None if restore => Input::WipedForRestore,
            None => Input::Wiped {
                image: self.cfg.image.is_some(),
            },
            Some(why) => Input::WipeFailed(why),
        }
    }

    /// Writes `warden.image` onto the target disk, skipping zero runs only
    /// when this boot's wipe left that disk verified zero, and prints the
    /// `image_result` event, a summary and the record.
    async fn image(&mut self) -> Input {
        let Some(asked) = self.cfg.image.clone() else {
            return Input::Fatal("image: no image asked for (workflow bug)".into());
        };
        let disk = match image_target(self.cfg.mode, &self.disks, asked.target.as_deref()) {
            Ok(d) => d,
            Err(why) => return Input::ImageFailed(format!("image {}: {why}", asked.url)),
        };
        let req = image_request(&asked, &disk, self.zeroed.contains(&disk.name));
        tracing::info!(
            url = %req.url,
            target = %req.target,
            target_reads_zero = req.target_reads_zero,
            "image: writing {} to {} ({}), {}",
            req.url,
            disk.name,
            req.target,
            if req.target_reads_zero {
                "zero runs skipped (wiped and verified zero on this boot)"
            } else {
                "every byte written (not known to read as zero)"
            }
        );
        let step_started = (db_now(), Instant::now());
        // Downloading and writing block for minutes: the blocking pool.
        let task = tokio::task::spawn_blocking(move || {
            image::write_image(&req, &image::Tuning::default())
        });
        let record = match task.await {
            Ok(Ok(record)) => record,
            Ok(Err(e)) => return Input::ImageFailed(e.to_string()),
            Err(e) => {
                return Input::ImageFailed(format!(
                    "image {}: the write task failed: {e}",
                    asked.url
                ))
            }
        };
        let json = record.canonical_json();
        console::emit(&Event::ImageResult {
            url: record.url.clone(),
            target: record.target.clone(),
            bytes_written: record.bytes_written,
            zero_bytes_skipped: record.zero_bytes_skipped,
            digest: record.digest.clone(),
            record_sha256: warden_protocol::sha256_hex(&json),
        });
        tracing::info!("{}", console::image_summary(&record));
        self.plan.steps.push(handoff::StepOutcome {
            name: "image".into(),
            ok: true,
        });
        self.imaged = Some(disk.clone());
        // The whole record (the server keeps it in a turnover): its
        // SHA-256 is the `image_result` event's `record_sha256`.
        tracing::info!(
            "image: record of {}: {}",
            disk.name,
            String::from_utf8_lossy(&json)
        );
        if self.turnover.is_some() {
            let measured = record.clone();
            if let Err(e) = self
                .measure(move |log, tpm| log.measure_image(tpm, &measured))
                .await
            {
                return Input::ImageFailed(e);
            }
            let text = String::from_utf8_lossy(&json).into_owned();
            if let Err(e) = self
                .step_done("image", step_started, record.bytes_written, vec![text])
                .await
            {
                return Input::Fatal(e);
            }
        }
        Input::Imaged
    }

    /// Restores the plan's backup onto the target disk (the disk Image
    /// would write), checking every chunk against the manifest the server
    /// recorded; zero chunks are skipped only on a disk this boot's wipe
    /// left verified zero. On failure both GPT copies of the target are
    /// cleared, so a half-restored disk cannot boot.
    async fn restore(&mut self) -> Input {
        let Some(t) = &self.turnover else {
            return Input::Fatal("restore: no turnover (workflow bug)".into());
        };
        let Some(source) = t.restore.clone() else {
            return Input::Fatal("restore: no backup in the plan (workflow bug)".into());
        };
        let disk = match image_target(self.cfg.mode, &self.disks, t.plan.target.as_deref()) {
            Ok(d) => d,
            Err(why) => return Input::RestoreFailed(format!("restore from {}: {why}", source.uri)),
        };
        let req = match restore_request(&source, &disk.path, self.zeroed.contains(&disk.name)) {
            Ok(r) => r,
            Err(why) => return Input::RestoreFailed(format!("restore from {}: {why}", source.uri)),
        };
        tracing::info!(
            uri = %req.uri,
            target = %req.target,
            manifest = %req.manifest_sha256,
            target_reads_zero = req.target_reads_zero,
            "restore: writing the backup at {} (manifest {}) to {} ({}), {}",
            req.uri,
            req.manifest_sha256,
            disk.name,
            req.target,
            if req.target_reads_zero {
                "zero chunks skipped (wiped and verified zero on this boot)"
            } else {
                "zero chunks written (not known to read as zero)"
            }
        );
        // Say it started, so `wardenctl watch` shows the step at once; the
        // restore reports its progress every 512 MiB of the disk.
        telemetry::progress("restore", "written", 0, None);
        let started = (db_now(), Instant::now());
        let target = req.target.clone();
        // Reading the export and writing the disk block for minutes.
        let task = tokio::task::spawn_blocking(move || {
            snapshot::restore(&req, &snapshot::Tuning::default())
        });
        let failed = match task.await {
            Ok(Ok(record)) => return self.restored(record, disk, started).await,
            Ok(Err(e)) => format!("restore from {} onto {target}: {e}", source.uri),
            Err(e) => format!(
                "restore from {} onto {target}: the restore task failed: {e}",
                source.uri
            ),
        };
        let cleared = tokio::task::spawn_blocking({
            let target = target.clone();
            move || clear_boot_regions(&target)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the clearing task failed: {e}")));
        match cleared {
            Ok(()) => {
                tracing::error!(target = %target, "restore failed; first MiB and GPT copies cleared");
                Input::RestoreFailed(failed)
            }
            Err(e) => Input::RestoreFailed(format!(
                "{failed}; and clearing the GPT copies of {target} failed too: {e}"
            )),
        }
    }

    /// A restore succeeded: measure its record, tell the server, and make
    /// the disk the one a handoff starts.
    async fn restored(
        &mut self,
        record: warden_protocol::snapshot::RestoreRecord,
        disk: Disk,
        started: (String, Instant),
    ) -> Input {
        let json = record.canonical_json();
        let bytes = record.bytes_written.saturating_add(record.bytes_zeroed);
        telemetry::progress(
            "restore",
            "written",
            record.disk_bytes,
            Some(record.disk_bytes),
        );
        tracing::info!(
            uri = %record.uri,
            target = %record.target,
            manifest = %record.manifest_sha256,
            bytes_read = record.bytes_read,
            bytes_written = record.bytes_written,
            zero_bytes_skipped = record.zero_bytes_skipped,
            ms = record.elapsed_ms,
            "restore: done; {} MiB restored onto {} from {} (manifest {}): {} MiB written, {} MiB of zeros skipped",
            record.disk_bytes >> 20,
            record.target,
            record.uri,
            record.manifest_sha256,
            bytes >> 20,
            record.zero_bytes_skipped >> 20
        );
        // The whole record (the server keeps it): its SHA-256 is the
        // `restore` event's digest.
        tracing::info!(
            "restore: record of {}: {}",
            disk.name,
            String::from_utf8_lossy(&json)
        );
        self.plan.steps.push(handoff::StepOutcome {
            name: "restore".into(),
            ok: true,
        });
        self.imaged = Some(disk);
        let description = format!(
            "restore {} to {} (manifest {})",
            record.uri, record.target, record.manifest_sha256
        );
        if let Err(e) = self
            .measure(move |log, tpm| {
                log.measure_record(
                    tpm,
                    warden_protocol::agentlog::EventKind::Restore,
                    json,
                    description,
                )
            })
            .await
        {
            return Input::RestoreFailed(e);
        }
        let text = String::from_utf8_lossy(&record.canonical_json()).into_owned();
        if let Err(e) = self.step_done("restore", started, bytes, vec![text]).await {
            return Input::Fatal(e);
        }
        Input::Restored
    }

    fn ready(&mut self) -> Input {
        console::emit(&Event::Ready {
            boot_ms: kernel_uptime_ms(),
        });
        if self.turnover.is_some() {
            Input::Finalizing
        } else if self.cfg.handoff.is_some() {
            Input::HandingOff
        } else {
            Input::Reported
        }
    }

    /// Hands the node over (`warden.handoff`), through the guard: every
    /// step of this boot succeeded and the last verdict was OK. Writes the
    /// lease record first when one was given. Returns only on failure.
    async fn handoff(&mut self) -> Input {
        let Some(mode) = self.cfg.handoff else {
            return Input::Fatal("handoff: none asked for (workflow bug)".into());
        };
        let cleared = match handoff::guard(&self.plan) {
            Ok(c) => c,
            Err(e) => {
                self.drop_preload().await;
                return Input::HandoffFailed(e.to_string());
            }
        };
        let disk = self.imaged.clone();
        if mode.needs_disk() && disk.is_none() {
            return Input::HandoffFailed(format!(
                "handoff {}: no disk was imaged on this boot",
                mode.name()
            ));
        }
        let device = disk.as_ref().map(|d| PathBuf::from(&d.path));
        let sector = disk.as_ref().map_or(512, |d| d.logical_block_size.max(512));
        let lease_due = if self.turnover.is_some() {
            // Written in FinalAttest, before the final quote.
            None
        } else {
            self.cfg.lease.clone()
        };
        if let (Some(lease), Some(dev)) = (lease_due, device.clone()) {
            if let Err(e) = write_lease_record(dev, sector, lease).await {
                return Input::HandoffFailed(e);
            }
        }
        let disk_text = device.as_ref().map(|d| d.display().to_string());
        if let Some(turnover) = self.turnover.as_mut() {
            if let (HandoffMode::Kexec, Some(entry)) = (mode, turnover.entry.take()) {
                // Measured before the final quote: kexec extends nothing
                // more, and refuses anything but what was measured.
                let log = turnover.measured.clone();
                let preload = turnover.preload.take();
                flush_telemetry(turnover).await;
                let preloaded = match preload {
                    None => false,
                    Some(task) => match task.await {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => return Input::HandoffFailed(e),
                        Err(e) => {
                            return Input::HandoffFailed(format!(
                                "handoff kexec: the load task failed: {e}"
                            ))
                        }
                    },
                };
                let done = tokio::task::spawn_blocking(move || {
                    let (measurer, kexec) = (&mut log.premeasured(), &mut handoff::LinuxKexec);
                    if preloaded {
                        handoff::kexec_handoff_preloaded(&cleared, &entry, measurer, kexec)
                    } else {
                        handoff::kexec_handoff(&cleared, &entry, measurer, kexec)
                    }
                })
                .await;
                return match done {
                    Ok(Ok(_)) => {
                        Input::Fatal("handoff kexec: returned without starting the tenant".into())
                    }
                    Ok(Err(e)) => Input::HandoffFailed(e.to_string()),
                    Err(e) => Input::HandoffFailed(format!("handoff kexec: the task failed: {e}")),
                };
            }
            flush_telemetry(turnover).await;
        }
        match (mode, device) {
            (HandoffMode::Kexec, Some(dev)) => {
                let entry = match boot_entry(dev, sector).await {
                    Ok(e) => e,
                    Err(e) => return Input::HandoffFailed(e),
                };
                console::emit(&kexec_event(&entry, disk_text, self.cfg.lease.clone()));
                let done = with_tpm(&self.cfg.tcti, move |tpm| {
                    Ok(handoff::kexec_handoff(
                        &cleared,
                        &entry,
                        tpm,
                        &mut handoff::LinuxKexec,
                    ))
                })
                .await;
                match done {
                    Ok(Ok(_)) => {
                        Input::Fatal("handoff kexec: returned without starting the tenant".into())
                    }
                    Ok(Err(e)) => Input::HandoffFailed(e.to_string()),
                    Err(e) => Input::HandoffFailed(format!("handoff kexec: the TPM: {e}")),
                }
            }
            (HandoffMode::Reboot(how), dev) => {
                let target = match (how, dev) {
                    (handoff::RebootMode::RebootToDisk, Some(dev)) => {
                        let esp = std::fs::File::open(&dev)
                            .map_err(|e| format!("handoff: cannot open {}: {e}", dev.display()))
                            .and_then(|mut f| {
                                handoff::read_gpt(&mut f, &dev.display().to_string(), sector)
                                    .map_err(|e| format!("handoff: {e}"))
                            })
                            .and_then(|gpt| {
                                gpt.esp().cloned().ok_or_else(|| {
                                    format!(
                                        "handoff: {} has no EFI system partition",
                                        dev.display()
                                    )
                                })
                            });
                        match esp {
                            Ok(p) => Some(handoff::BootTarget::on(&p, handoff::REMOVABLE_PATH_X64)),
                            Err(e) => return Input::HandoffFailed(e),
                        }
                    }
                    _ => None,
                };
                // BootNext first, so the event names the option it set
                // (docs/console-events.md); then the event; then reboot.
                let mut vars = handoff::Efivarfs::new("/sys/firmware/efi/efivars");
                let boot_next =
                    match handoff::prepare_reboot(&cleared, how, target.as_ref(), &mut vars) {
                        Ok(n) => n,
                        Err(e) => return Input::HandoffFailed(e.to_string()),
                    };
                console::emit(&Event::Handoff {
                    mode: mode.name().into(),
                    disk: disk_text,
                    source: None,
                    path: target
                        .as_ref()
                        .map(|_| handoff::REMOVABLE_PATH_X64.to_string()),
                    kernel_sha256: None,
                    initrd_sha256: None,
                    cmdline: None,
                    cmdline_sha256: None,
                    pcr: None,
                    expected_pcr_from_zero: None,
                    boot_next: boot_next.map(|n| format!("Boot{n:04X}")),
                    lease: self.cfg.lease.clone(),
                });
                match handoff::leave(&cleared, how, &mut handoff::LinuxPower) {
                    Ok(()) => Input::Fatal(format!("handoff {}: returned", mode.name())),
                    Err(e) => Input::HandoffFailed(e.to_string()),
                }
            }
            (HandoffMode::Kexec, None) => Input::HandoffFailed("handoff kexec: no disk".into()),
        }
    }

    /// Fetches the plan over this boot's session. With one, the boot runs
    /// the turnover the server asked for (and the console and progress go
    /// to the server); without one, the command line's keys decide.
    async fn plan_step(&mut self) -> Input {
        let (Some(server), Some(token)) = (self.cfg.server.clone(), self.session.clone()) else {
            return Input::Fatal("plan: no session (workflow bug)".into());
        };
        let client = match Client::new(&server) {
            Ok(c) => c,
            Err(e) => return Input::Fatal(format!("plan: {e}")),
        };
        let mut backoff = self.attempts();
        let plan = loop {
            match client.session_plan(&token).await {
                Ok(p) => break p,
                Err(e) => match give_up("plan", &mut backoff, e).await {
                    Some(fatal) => return Input::Fatal(fatal),
                    None => continue,
                },
            }
        };
        let Some(plan) = plan else {
            tracing::info!("plan: the server has no turnover for this node");
            return Input::NoPlan {
                wipe: self.cfg.wipe.is_some(),
                image: self.cfg.image.is_some(),
            };
        };
        // The command line's warden.image_ca (measured with the ramdisk)
        // still trusts an https:// image whose plan names no CA.
        let cmdline_trust = self.cfg.image.as_ref().and_then(|i| i.https_trust.as_ref());
        // Refused here, before any disk is touched, not after the wipe.
        let (image, restore, writes) = match plan_disk_source(&plan, cmdline_trust) {
            Ok(v) => v,
            Err(e) => return Input::Fatal(format!("plan {}: {e}", plan.lease_id)),
        };
        tracing::info!(
            lease = %plan.lease_id,
            "plan: turnover {}: {}wipe {}, {writes}, handoff {}",
            plan.lease_id,
            match (&plan.plan.snapshot_to, &plan.snapshot_done) {
                (Some(_), Some(_)) => "snapshot already taken, ".to_string(),
                (Some(uri), None) => format!("snapshot to {uri}, "),
                (None, _) => String::new(),
            },
            serde_json::to_string(&plan.plan.wipe).unwrap_or_default(),
            plan.plan.handoff.name()
        );
        // The plan replaces whatever the command line asked for.
        self.cfg.wipe = Some(plan.plan.wipe);
        self.cfg.image = image;
        self.cfg.handoff = Some(plan_handoff(plan.plan.handoff));
        self.cfg.lease = Some(plan.lease_id.clone());
        telemetry::enable();
        let forwarder = spawn_forwarder(client.clone(), token.clone());
        let snapshot = plan.plan.snapshot_to.is_some();
        self.turnover = Some(Turnover {
            client,
            token,
            lease_id: plan.lease_id,
            plan: plan.plan,
            snapshot_done: plan.snapshot_done,
            restore,
            measured: MeasuredLog::new(self.cfg.test_alter_record),
            entry: None,
            preload: None,
            forwarder: Some(forwarder),
        });
        Input::Planned { snapshot }
    }

    /// Backs the plan's target disk up to its NBD export, then measures the
    /// record. A snapshot that already succeeded for this lease is not
    /// taken again (the disk may be half erased since): its record is
    /// measured as the lease's backup.
    async fn snapshot(&mut self) -> Input {
        let Some(t) = &self.turnover else {
            return Input::Fatal("snapshot: no turnover (workflow bug)".into());
        };
        let Some(uri) = t.plan.snapshot_to.clone() else {
            return Input::Fatal("snapshot: no export in the plan (workflow bug)".into());
        };
        if let Some(done) = t.snapshot_done.clone() {
            let record: SnapshotRecord = match serde_json::from_str(&done) {
                Ok(r) => r,
                Err(e) => {
                    return Input::SnapshotFailed(format!(
                        "snapshot: the server's record of the earlier snapshot is not a SnapshotRecord: {e}"
                    ))
                }
            };
            tracing::info!(
                uri = %record.uri,
                manifest = %record.manifest_sha256,
                "snapshot: taken earlier in this lease; not repeated"
            );
            let description = format!(
                "snapshot {} to {} (taken earlier in this lease)",
                record.source, record.uri
            );
            return match self
                .measure(move |log, tpm| {
                    log.measure_record(
                        tpm,
                        warden_protocol::agentlog::EventKind::Snapshot,
                        record.canonical_json(),
                        description,
                    )
                })
                .await
            {
                Ok(()) => Input::Snapshotted,
                Err(e) => Input::SnapshotFailed(e),
            };
        }
        let disk = match image_target(self.cfg.mode, &self.disks, t.plan.target.as_deref()) {
            Ok(d) => d,
            Err(why) => return Input::SnapshotFailed(format!("snapshot to {uri}: {why}")),
        };
        let req = match snapshot_request(&t.plan, &uri, &disk.path) {
            Ok(r) => r,
            Err(why) => return Input::SnapshotFailed(format!("snapshot to {uri}: {why}")),
        };
        tracing::info!(uri = %uri, disk = %disk.path, "snapshot: backing {} up to {uri}", disk.path);
        let started = (db_now(), Instant::now());
        let task = tokio::task::spawn_blocking(move || {
            snapshot::snapshot(&req, &snapshot::Tuning::default())
        });
        let record = match task.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Input::SnapshotFailed(e.to_string()),
            Err(e) => {
                return Input::SnapshotFailed(format!("snapshot to {uri}: the task failed: {e}"))
            }
        };
        tracing::info!(
            uri = %record.uri,
            manifest = %record.manifest_sha256,
            bytes_sent = record.bytes_sent,
            "snapshot: done; manifest sha256 {}",
            record.manifest_sha256
        );
        self.plan.steps.push(handoff::StepOutcome {
            name: "snapshot".into(),
            ok: true,
        });
        let measured = record.clone();
        if let Err(e) = self
            .measure(move |log, tpm| log.measure_snapshot(tpm, &measured))
            .await
        {
            return Input::SnapshotFailed(e);
        }
        let text = String::from_utf8_lossy(&record.canonical_json()).into_owned();
        // The server must know the snapshot is good before the wipe starts:
        // after a reboot it is never taken again over a half-erased disk.
        if let Err(e) = self
            .step_done("snapshot", started, record.disk_bytes, vec![text])
            .await
        {
            return Input::Fatal(e);
        }
        Input::Snapshotted
    }

    /// Writes the lease record, measures the handoff target into PCR 13
    /// (the kexec entry's kernel, initrd and command line, or the EFI
    /// binary a reboot-to-disk boots), then attests with the measured log
    /// of every step. Nothing touches the disk or PCR 13 after this quote.
    async fn final_attest(&mut self) -> Input {
        let Some(mode) = self.cfg.handoff else {
            return Input::Fatal("final attest: no handoff in the plan (workflow bug)".into());
        };
        let disk = self.imaged.clone();
        if mode.needs_disk() && disk.is_none() {
            return Input::HandoffFailed(format!(
                "handoff {}: no disk was imaged on this boot",
                mode.name()
            ));
        }
        let device = disk.as_ref().map(|d| PathBuf::from(&d.path));
        let sector = disk.as_ref().map_or(512, |d| d.logical_block_size.max(512));
        if let (Some(lease), Some(dev)) = (self.cfg.lease.clone(), device.clone()) {
            if let Err(e) = write_lease_record(dev, sector, lease).await {
                return Input::HandoffFailed(e);
            }
        }
        let disk_text = device.as_ref().map(|d| d.display().to_string());
        match (mode, device) {
            (HandoffMode::Kexec, Some(dev)) => {
                let entry = match boot_entry(dev, sector).await {
                    Ok(e) => e,
                    Err(e) => return Input::HandoffFailed(e),
                };
                console::emit(&kexec_event(&entry, disk_text, self.cfg.lease.clone()));
                // The image is staged while it is measured and quoted (the
                // load is a second of kernel work in an emulated node).
                // Staging executes nothing; a refused handoff unloads it.
                let staged = entry.clone();
                if let Some(t) = self.turnover.as_mut() {
                    t.preload = Some(tokio::task::spawn_blocking(move || {
                        handoff::kexec_preload(&staged, &mut handoff::LinuxKexec)
                            .map_err(|e| e.to_string())
                    }));
                }
                let measured = entry.clone();
                if let Err(e) = self
                    .measure(move |log, tpm| log.measure_kexec(tpm, &measured))
                    .await
                {
                    self.drop_preload().await;
                    return Input::HandoffFailed(e);
                }
                if let Some(t) = self.turnover.as_mut() {
                    t.entry = Some(entry);
                }
            }
            (HandoffMode::Reboot(handoff::RebootMode::RebootToDisk), Some(dev)) => {
                let read = tokio::task::spawn_blocking(move || {
                    handoff::read_esp_file(&dev, sector, handoff::REMOVABLE_PATH_X64, 256 << 20)
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("the ESP read task failed: {e}")));
                let (partition, bytes) = match read {
                    Ok(r) => r,
                    Err(e) => return Input::HandoffFailed(format!("handoff reboot-to-disk: {e}")),
                };
                let target = warden_protocol::agentlog::HandoffTargetRecord {
                    partition,
                    path: handoff::REMOVABLE_PATH_X64.to_string(),
                    sha256: warden_protocol::sha256_hex(&bytes),
                };
                if let Err(e) = self
                    .measure(move |log, tpm| log.measure_handoff_target(tpm, &target))
                    .await
                {
                    return Input::HandoffFailed(e);
                }
            }
            _ => {}
        }
        let log = match &self.turnover {
            Some(t) => t.measured.events().to_vec(),
            None => return Input::Fatal("final attest: no turnover (workflow bug)".into()),
        };
        match self.quote_and_attest(Phase::Handoff, log).await {
            Ok(v) if v.status == Status::Ok => Input::FinalAttested,
            Ok(v) => {
                self.drop_preload().await;
                Input::Refused(refusal(&v))
            }
            Err(fatal) => {
                self.drop_preload().await;
                Input::Fatal(fatal)
            }
        }
    }

    /// Unloads a kexec image staged for a handoff that will not happen.
    async fn drop_preload(&mut self) {
        let Some(task) = self.turnover.as_mut().and_then(|t| t.preload.take()) else {
            return;
        };
        if let Ok(Ok(())) = task.await {
            let unloaded =
                tokio::task::spawn_blocking(|| handoff::Kexec::unload(&mut handoff::LinuxKexec))
                    .await;
            match unloaded {
                Ok(Ok(())) => tracing::info!("kexec: the staged tenant kernel is unloaded"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "kexec: could not unload the staged tenant kernel")
                }
                Err(e) => tracing::error!(error = %e, "kexec: the unload task failed"),
            }
        }
    }

    /// Runs `f` on this turnover's measured log with an open TPM; the log
    /// changes only if every extend in `f` succeeded.
    async fn measure(
        &mut self,
        f: impl FnOnce(&mut MeasuredLog, &mut Tpm) -> Result<(), MeasureError> + Send + 'static,
    ) -> Result<(), String> {
        let Some(t) = self.turnover.as_mut() else {
            return Err("measure: no turnover (workflow bug)".into());
        };
        let mut log = t.measured.clone();
        let done = with_tpm(&self.cfg.tcti, move |tpm| {
            // A measure error is not a TPM error: carry it out as a value.
            Ok(f(&mut log, tpm).map(|()| log))
        })
        .await?;
        t.measured = done.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Tells the server a step succeeded, with its records, and waits for
    /// the answer (retrying): the next step starts only once it is stored.
    async fn step_done(
        &mut self,
        step: &str,
        started: (String, Instant),
        bytes: u64,
        records: Vec<String>,
    ) -> Result<(), String> {
        let Some(t) = &self.turnover else {
            return Ok(());
        };
        let result = StepResult {
            step: step.to_owned(),
            ok: true,
            error: None,
            started_at: started.0,
            finished_at: db_now(),
            duration_ms: u64::try_from(started.1.elapsed().as_millis()).unwrap_or(u64::MAX),
            bytes,
            records,
        };
        let mut backoff = self.attempts();
        loop {
            match t.client.session_step(&t.token, &result).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if let Some(fatal) = give_up(step, &mut backoff, e).await {
                        return Err(fatal);
                    }
                }
            }
        }
    }

    /// A turnover step failed: tell the server (it ends the plan and signs
    /// a report saying why) and send what the console said. Best effort —
    /// the console keeps the record when the server cannot be reached.
    async fn turnover_failed(&mut self, state: State, error: &str, server_knows: bool) {
        let Some(t) = self.turnover.as_mut() else {
            return;
        };
        if server_knows {
            flush_telemetry(t).await;
            return;
        }
        let step = match state {
            State::Snapshot => "snapshot",
            State::Wipe => "wipe",
            State::Image => "image",
            State::Restore => "restore",
            State::FinalAttest => "final-attest",
            State::Handoff => "handoff",
            _ => "turnover",
        };
        let now = db_now();
        let result = StepResult {
            step: step.to_owned(),
            ok: false,
            error: Some(error.to_owned()),
            started_at: now.clone(),
            finished_at: now,
            duration_ms: 0,
            bytes: 0,
            records: Vec::new(),
        };
        flush_telemetry(t).await;
        if let Err(e) = t.client.session_step(&t.token, &result).await {
            tracing::error!(lease = %t.lease_id, "could not tell the server that {step} failed: {e}");
        }
    }
}

/// Runs `work` on an open TPM on tokio's blocking pool (tss-esapi calls
/// block), opening it afresh through `tcti`: the facade keeps nothing loaded
/// between calls, so neither need we keep the connection.
async fn with_tpm<T: Send + 'static>(
    tcti: &str,
    work: impl FnOnce(&mut Tpm) -> Result<T, TpmError> + Send + 'static,
) -> Result<T, String> {
    let tcti = tcti.to_string();
    tokio::task::spawn_blocking(move || {
        let mut tpm = Tpm::open(&tcti)?;
        work(&mut tpm)
    })
    .await
    .unwrap_or_else(|e| {
        Err(TpmError::Command {
            tcti: String::new(),
            operation: "blocking task",
            reason: e.to_string(),
        })
    })
    .map_err(|e| e.to_string())
}

/// The EK as the wire carries it.
fn ek_public(ek: &EndorsementKey) -> EkPublic {
    EkPublic {
        algorithm: ek.algorithm.to_string(),
        public_key_der: ek.public_key_der.clone(),
        tpm_public: ek.tpm_public.clone(),
        certificate_der: ek.certificate_der.clone(),
    }
}

/// The protocol's name for an AK algorithm ([`AK_RSA`], [`AK_ECC`]).
pub fn wire_ak_algorithm(algorithm: AkAlgorithm) -> &'static str {
    match algorithm {
        AkAlgorithm::Rsa2048RsassaSha256 => AK_RSA,
        AkAlgorithm::EccP256EcdsaSha256 => AK_ECC,
    }
}

/// The `verdict` console event of a server verdict.
pub fn verdict_event(verdict: &Verdict) -> Event {
    Event::Verdict {
        status: match verdict.status {
            Status::Ok => "ok",
            Status::Failed => "failed",
        }
        .into(),
        attestation_id: verdict.attestation_id,
        phase: match verdict.phase {
            Phase::Boot => "boot",
            Phase::Handoff => "handoff",
        }
        .into(),
        policy: verdict.policy.clone(),
        reasons: verdict.reasons.iter().map(|r| r.message.clone()).collect(),
        codes: verdict.reasons.iter().map(|r| r.code.clone()).collect(),
    }
}

/// The fatal error of a failed verdict: its id and every reason.
fn refusal(verdict: &Verdict) -> String {
    let reasons: Vec<&str> = verdict.reasons.iter().map(|r| r.message.as_str()).collect();
    format!(
        "attestation {} FAILED: {}",
        verdict.attestation_id,
        if reasons.is_empty() {
            "the server gave no reason".to_string()
        } else {
            reasons.join("; ")
        }
    )
}

/// The disks Wipe erases: every disk of the inventory on a node; on a host
/// only loop devices (a developer's machine must never lose a real disk to
/// a test run). Returns them and the names of the disks spared.
fn wipe_candidates(mode: Mode, disks: &[Disk]) -> (Vec<Disk>, Vec<String>) {
    match mode {
        Mode::Init => (disks.to_vec(), Vec::new()),
        Mode::Host => {
            let (loops, others): (Vec<Disk>, Vec<Disk>) =
                disks.iter().cloned().partition(|d| d.transport == "loop");
            (loops, others.into_iter().map(|d| d.name).collect())
        }
    }
}

/// Whether a wipe record proves its disk reads as zero everywhere: clean,
/// and the deciding read-back expected zeros (an overwrite with a random
/// last pass is clean but reads as its pattern).
fn reads_zero(record: &DiskRecord) -> bool {
    record.status == WipeStatus::Clean
        && record
            .attempts
            .last()
            .and_then(|a| a.verification.as_ref())
            .is_some_and(|v| v.passed() && v.expected == Expected::Zeros)
}

/// The disk Image writes: the one named (`warden.image_target`), or the
/// first of the inventory in name order. On a host only loop devices, as
/// for Wipe.
fn image_target(mode: Mode, disks: &[Disk], named: Option<&str>) -> Result<Disk, String> {
    let (candidates, spared) = wipe_candidates(mode, disks);
    match named {
        Some(name) => {
            if let Some(d) = candidates.iter().find(|d| d.name == name) {
                return Ok(d.clone());
            }
            if spared.iter().any(|s| s == name) {
                return Err(format!(
                    "target {name} is not a loop device, and host mode writes loop devices only"
                ));
            }
            let mut names: Vec<&str> = candidates.iter().map(|d| d.name.as_str()).collect();
            names.sort_unstable();
            Err(format!(
                "target {name} is not in the inventory (disks: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        }
        None => candidates
            .into_iter()
            .min_by(|a, b| a.name.cmp(&b.name))
            .ok_or_else(|| {
                "no local disk found to write to (is the storage controller's driver in the ramdisk?)"
                    .to_string()
            }),
    }
}

/// The image module's request for `disk`.
fn image_request(asked: &ImageConfig, disk: &Disk, target_reads_zero: bool) -> ImageRequest {
    ImageRequest {
        url: asked.url.clone(),
        checksum: asked.checksum.clone(),
        signature: None,
        https_trust: asked.https_trust.clone(),
        target: disk.path.clone(),
        target_reads_zero,
        verify_after_write: asked.verify_after_write,
        bmap: None,
    }
}

/// Why a wipe failed, naming every disk that is not clean; `None` when the
/// report is clean.
fn wipe_failure(report: &WipeReport) -> Option<String> {
    if report.status == WipeStatus::Clean {
        return None;
    }
    let failed: Vec<String> = report
        .disks
        .iter()
        .filter(|d| d.status != WipeStatus::Clean)
        .map(|d| {
            format!(
                "{}: {}",
                d.disk.name,
                d.reason
                    .as_deref()
                    .unwrap_or("not clean (no reason recorded)")
            )
        })
        .collect();
    if failed.is_empty() {
        return Some("wipe FAILED: no disk was erased".into());
    }
    let names: Vec<&str> = report
        .disks
        .iter()
        .filter(|d| d.status != WipeStatus::Clean)
        .map(|d| d.disk.name.as_str())
        .collect();
    Some(format!(
        "wipe FAILED on {}: {}",
        names.join(", "),
        failed.join("; ")
    ))
}

/// A failed server exchange: a permanent refusal is the fatal error itself
/// (the server's words, verbatim); anything else is retried via [`retry`].
async fn give_up(step: &str, backoff: &mut config::Backoff, error: ClientError) -> Option<String> {
    if error.is_permanent() {
        return Some(format!("{step}: {error}"));
    }
    retry(step, backoff, &error.to_string()).await
}

/// Records a failed attempt: emits `retry` and sleeps, returning `None`; or,
/// at the attempt limit, returns the fatal error.
async fn retry(step: &str, backoff: &mut config::Backoff, error: &str) -> Option<String> {
    let (attempt, delay) = backoff.failed();
    match delay {
        Some(delay) => {
            console::emit(&Event::Retry {
                step: step.to_string(),
                attempt,
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error: error.to_string(),
            });
            tokio::time::sleep(delay).await;
            None
        }
        None => Some(format!(
            "{step}: gave up after {attempt} attempt(s): {error}"
        )),
    }
}

async fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        if !logged {
            tracing::info!(path = %path.display(), "tpm: waiting for {}", path.display());
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kernel uptime in ms from `/proc/uptime` (`"12.34 56.78"`), or the boot
/// clock when `/proc` is not readable.
pub fn kernel_uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| parse_uptime_ms(&s))
        .unwrap_or_else(|| u64::try_from(console::uptime().as_millis()).unwrap_or(u64::MAX))
}

fn parse_uptime_ms(s: &str) -> Option<u64> {
    let first = s.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    // Two decimals in practice; take up to three as milliseconds.
    let mut ms_digits: String = frac.chars().take(3).collect();
    while ms_digits.len() < 3 {
        ms_digits.push('0');
    }
    let ms: u64 = ms_digits.parse().ok()?;
    secs.checked_mul(1000)?.checked_add(ms)
}

/// The agent from start to finish: prints `agent_start`, starts the reaper
/// (init mode), runs the workflow, then does what the settings say. In host
/// mode returns the exit code (0 done, 1 fatal); in init mode never returns.
pub async fn boot(cfg: Config, log: Option<LogHandle>) -> ExitCode {
    let mode = cfg.mode;
    console::emit(&Event::AgentStart {
        version: env!("CARGO_PKG_VERSION").to_string(),
        mode: mode.as_str().to_string(),
        pid: std::process::id(),
    });
    if mode == Mode::Init {
        if let Err(e) = init::spawn_reaper() {
            console::emit(&Event::Error {
                step: "init".into(),
                error: format!("cannot watch SIGCHLD to reap orphans: {e}"),
            });
        }
    }
    let mut wf = Workflow::new(cfg, log);
    let outcome = wf.run().await;
    let cfg = wf.config();
    match (mode, outcome) {
        (Mode::Host, Outcome::Done) => ExitCode::SUCCESS,
        (Mode::Host, Outcome::Fatal(error)) => {
            console::emit(&Event::Fatal {
                error,
                action: "exit".into(),
            });
            ExitCode::FAILURE
        }
        (Mode::Init, Outcome::Fatal(error)) => {
            console::emit(&Event::Fatal {
                error,
                action: cfg.on_error.as_str().into(),
            });
            init::power(cfg.on_error)
        }
        (Mode::Init, Outcome::Done) => match cfg.done {
            PowerAction::Wait => {
                tracing::info!("done: waiting (warden.done=wait); reaping orphans");
                std::future::pending::<()>().await;
                init::power(PowerAction::Wait)
            }
            action => {
                tracing::info!("done: {} (warden.done)", action.as_str());
                init::power(action)
            }
        },
    }
}

/// Writes `lease=<lease>` into the disk's warden-config partition; a disk
/// without one gets an `error` event and no write.
async fn write_lease_record(dev: PathBuf, sector: u32, lease: String) -> Result<(), String> {
    let written = tokio::task::spawn_blocking({
        let (dev, lease) = (dev.clone(), lease.clone());
        move || handoff::lease::write_lease(&dev, sector, &lease)
    })
    .await
    .unwrap_or_else(|e| Err(format!("lease: the write task failed: {e}")))?;
    match written {
        Some(n) => tracing::info!(
            lease,
            disk = %dev.display(),
            partition = n,
            "lease record written to the warden-config partition"
        ),
        None => console::emit(&Event::Error {
            step: "lease".into(),
            error: format!(
                "{} has no warden-config partition: the tenant is not told lease {lease}",
                dev.display()
            ),
        }),
    }
    Ok(())
}

/// The tenant's boot entry on the imaged disk (`docs/handoff.md`).
async fn boot_entry(dev: PathBuf, sector: u32) -> Result<handoff::BootEntry, String> {
    tokio::task::spawn_blocking(move || {
        handoff::find_boot_entry(&dev, sector).map_err(|e| format!("handoff kexec: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("handoff kexec: the boot entry task failed: {e}")))
}

/// The `handoff` event of a kexec: what will start, and the PCR 13 its
/// three extends give from zero.
fn kexec_event(entry: &handoff::BootEntry, disk: Option<String>, lease: Option<String>) -> Event {
    let d = entry.digests();
    Event::Handoff {
        mode: "kexec".into(),
        disk,
        source: Some(entry.source.name().into()),
        path: Some(entry.path.clone()),
        kernel_sha256: Some(hex::encode(d.kernel)),
        initrd_sha256: Some(hex::encode(d.initrd)),
        cmdline: Some(entry.cmdline.clone()),
        cmdline_sha256: Some(hex::encode(d.cmdline)),
        pcr: Some(handoff::HANDOFF_PCR),
        expected_pcr_from_zero: Some(hex::encode(handoff::expected_pcr(&d, [0; 32]))),
        boot_next: None,
        lease,
    }
}

/// A turnover this boot runs for the server.
struct Turnover {
    client: Client,
    token: String,
    lease_id: String,
    plan: PlanRequest,
    /// The record of a snapshot an earlier boot of this lease took.
    snapshot_done: Option<String>,
    /// The backup a restore plan writes instead of an image.
    restore: Option<RestoreSource>,
    measured: MeasuredLog,
    /// The kexec entry measured before the final quote.
    entry: Option<handoff::BootEntry>,
    /// Its load into the kernel, started as soon as it was read.
    preload: Option<tokio::task::JoinHandle<Result<(), String>>>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

/// What the plan writes after the wipe: the image step's settings, or the
/// backup to restore (which the server must have resolved), and a few
/// words for the log. Checked before any disk is touched.
fn plan_disk_source(
    plan: &warden_protocol::turnover::SessionPlan,
    cmdline: Option<&HttpsTrust>,
) -> Result<(Option<ImageConfig>, Option<RestoreSource>, String), String> {
    match plan.plan.disk_source().map_err(|e| e.to_string())? {
        DiskSource::Image { url, .. } => Ok((
            Some(plan_image(&plan.plan, cmdline)?),
            None,
            format!("image {url}"),
        )),
        DiskSource::Restore { lease } => {
            let Some(source) = plan.restore.clone() else {
                return Err(format!(
                    "the plan restores the snapshot of lease {lease}, but the server sent no restore source"
                ));
            };
            // The same checks the restore makes, before the wipe.
            restore_request(&source, "", false)?;
            let writes = format!(
                "restore {lease} from {} (manifest {})",
                source.uri, source.manifest_sha256
            );
            Ok((None, Some(source), writes))
        }
    }
}

/// The restore module's request for `source` onto the disk at `target`:
/// an `nbds://` export is trusted through the snapshot's CA only, and the
/// manifest digest must be a SHA-256.
fn restore_request(
    source: &RestoreSource,
    target: &str,
    target_reads_zero: bool,
) -> Result<RestoreRequest, String> {
    let tls = source.uri.starts_with("nbds://");
    if !tls && !source.uri.starts_with("nbd://") {
        return Err(format!(
            "the backup's export {:?} is not an nbd:// or nbds:// URI",
            source.uri
        ));
    }
    match (&source.ca_pem, tls) {
        (None, true) => {
            return Err(format!(
                "the nbds:// export {} comes without the CA that took the snapshot",
                source.uri
            ))
        }
        (Some(_), false) => {
            return Err(format!(
                "a CA is given for the plain nbd:// export {}",
                source.uri
            ))
        }
        _ => {}
    }
    warden_protocol::snapshot::parse_digest("manifest_sha256", &source.manifest_sha256)
        .map_err(|e| e.to_string())?;
    Ok(RestoreRequest {
        uri: source.uri.clone(),
        ca_pem: source.ca_pem.clone(),
        target: target.to_string(),
        manifest_sha256: source.manifest_sha256.clone(),
        target_reads_zero,
    })
}

/// Zeros the first MiB and the backup GPT of `target` (as a failed image
/// write does), so a half-written disk cannot boot.
fn clear_boot_regions(target: &str) -> Result<(), String> {
    let t = image::target::Target::open(target).map_err(|e| e.to_string())?;
    let zeros = image::decode::AlignedBuf::zeroed(image::target::HEAD_BYTES);
    t.clear_boot_regions(&zeros).map_err(|e| e.to_string())
}

/// The image part of a plan as the image step's settings. An `https://`
/// image is trusted through the plan's `image_ca`, else `cmdline` (the
/// command line's `warden.image_ca`); with neither it is refused here,
/// before any disk is touched, not after the wipe.
fn plan_image(plan: &PlanRequest, cmdline: Option<&HttpsTrust>) -> Result<ImageConfig, String> {
    let (image, checksum) = match plan.disk_source().map_err(|e| e.to_string())? {
        DiskSource::Image { url, checksum } => (url, checksum),
        DiskSource::Restore { lease } => {
            return Err(format!("the plan restores lease {lease}; it has no image"))
        }
    };
    let checksum = if checksum.contains(':') {
        checksum.to_owned()
    } else {
        format!("sha256:{checksum}")
    };
    let url = config::parse_image_url("image", image).map_err(|e| e.to_string())?;
    let https_trust = match (&plan.image_ca, url.starts_with("https://")) {
        (Some(_), false) => {
            return Err(format!(
                "image_ca is given for the plain http:// image {url}"
            ))
        }
        (Some(ca), true) => Some(HttpsTrust::from_plan(ca).map_err(|e| format!("image_ca {e}"))?),
        (None, true) => Some(cmdline.cloned().ok_or_else(|| {
            format!(
                "the https:// image {url} has no CA to trust: the plan has no image_ca and the command line no warden.image_ca"
            )
        })?),
        (None, false) => None,
    };
    Ok(ImageConfig {
        url,
        checksum: config::parse_image_checksum("checksum", &checksum).map_err(|e| e.to_string())?,
        target: plan.target.clone(),
        verify_after_write: false,
        https_trust,
    })
}

/// The snapshot module's request for the plan's export `uri` from the disk
/// at `source`: an `nbds://` export is trusted through the plan's
/// `snapshot_ca` only (the ramdisk has no system CA store).
fn snapshot_request(
    plan: &PlanRequest,
    uri: &str,
    source: &str,
) -> Result<SnapshotRequest, String> {
    let tls = uri.starts_with("nbds://");
    let ca_pem = match (&plan.snapshot_ca, tls) {
        (Some(pem), true) => Some(pem.clone()),
        (None, true) => return Err("an nbds:// export needs the plan's snapshot_ca".into()),
        (Some(_), false) => return Err("snapshot_ca is given for a plain nbd:// export".into()),
        (None, false) => None,
    };
    Ok(SnapshotRequest {
        uri: uri.to_string(),
        ca_pem,
        source: source.to_string(),
        chunk_size: warden_protocol::snapshot::DEFAULT_CHUNK_SIZE,
        previous: None,
        verify: false,
    })
}

fn plan_handoff(h: Handoff) -> HandoffMode {
    match h {
        Handoff::Kexec => HandoffMode::Kexec,
        Handoff::RebootToDisk => HandoffMode::Reboot(handoff::RebootMode::RebootToDisk),
        Handoff::Reboot => HandoffMode::Reboot(handoff::RebootMode::Reboot),
        Handoff::Poweroff => HandoffMode::Reboot(handoff::RebootMode::Poweroff),
    }
}

/// RFC 3339 UTC now, as the server writes times.
fn db_now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Lines per console post (the server takes at most 2,000).
const CONSOLE_CHUNK: usize = 1_000;

/// Sends what [`telemetry`] holds every second until aborted.
fn spawn_forwarder(client: Client, token: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            send_telemetry(&client, &token).await;
        }
    })
}

/// One round of sending; lines that did not get through go back to the
/// buffer. Errors are not logged: each log line would be sent again.
async fn send_telemetry(client: &Client, token: &str) {
    let (lines, updates) = telemetry::drain();
    for update in &updates {
        let _ = client.session_progress(token, update).await;
    }
    let mut chunks = lines.chunks(CONSOLE_CHUNK);
    while let Some(chunk) = chunks.next() {
        let batch = ConsoleBatch {
            lines: chunk.to_vec(),
        };
        if client.session_console(token, &batch).await.is_err() {
            let mut rest = chunk.to_vec();
            rest.extend(chunks.flatten().cloned());
            telemetry::requeue(rest);
            return;
        }
    }
}

/// Stops the forwarder and sends what is left (before the agent goes).
async fn flush_telemetry(t: &mut Turnover) {
    if let Some(f) = t.forwarder.take() {
        f.abort();
    }
    send_telemetry(&t.client, &t.token).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_follows_ready_and_fails_safe() {
        assert_eq!(
            next(State::Ready, &Input::HandingOff).unwrap(),
            State::Handoff
        );
        assert_eq!(next(State::Ready, &Input::Reported).unwrap(), State::Done);
        assert_eq!(
            next(State::Handoff, &Input::HandoffFailed("no entry".into())).unwrap(),
            State::Failed
        );
        // Only Ready leads to a handoff.
        assert!(next(State::Image, &Input::HandingOff).is_err());
        assert!(next(State::Attest, &Input::HandingOff).is_err());
        assert!(next(State::Handoff, &Input::Reported).is_err());
    }

    #[test]
    fn happy_path_visits_every_state_in_order() {
        let inputs = [
            Input::Begun,
            Input::Mounted,
            Input::ColdplugStarted,
            Input::Leased,
            Input::TpmOpened,
            Input::EventLogRead,
            Input::ModulesLoaded,
            Input::InventoryTaken,
            Input::HelloAccepted,
            Input::Enrolled,
            Input::Attested {
                wipe: false,
                image: false,
            },
            Input::Reported,
        ];
        let mut state = State::Start;
        let mut visited = vec![state];
        for input in &inputs {
            state = next(state, input).unwrap();
            visited.push(state);
        }
        assert_eq!(
            visited,
            vec![
                State::Start,
                State::Init,
                State::Coldplug,
                State::Network,
                State::Tpm,
                State::EventLog,
                State::Settle,
                State::Inventory,
                State::Hello,
                State::Enroll,
                State::Attest,
                State::Ready,
                State::Done
            ]
        );
    }

    #[test]
    fn host_mode_skips_what_it_must_not_do() {
        let skip = || Input::Skipped("host".into());
        let mut s = next(State::Start, &Input::Begun).unwrap();
        s = next(s, &skip()).unwrap();
        assert_eq!(s, State::Coldplug);
        s = next(s, &skip()).unwrap();
        s = next(s, &skip()).unwrap();
        assert_eq!(s, State::Tpm);
        // The TPM and the inventory cannot be skipped.
        assert!(next(State::Tpm, &skip()).is_err());
        assert!(next(State::Inventory, &skip()).is_err());
        assert_eq!(next(State::EventLog, &skip()).unwrap(), State::Settle);
        assert_eq!(next(State::Settle, &skip()).unwrap(), State::Inventory);
        // Coldplug's result is only taken in Settle, before the inventory.
        assert!(next(State::Coldplug, &Input::ModulesLoaded).is_err());
        assert_eq!(next(State::Hello, &skip()).unwrap(), State::Ready);
    }

    #[test]
    fn attestation_cannot_be_skipped_and_a_refusal_fails_the_boot() {
        let skip = || Input::Skipped("x".into());
        // Once the server knows the node, there is no way to Ready but an
        // OK verdict.
        assert!(next(State::Enroll, &skip()).is_err());
        assert!(next(State::Attest, &skip()).is_err());
        let ok = Input::Attested {
            wipe: false,
            image: false,
        };
        assert!(next(State::Enroll, &ok).is_err());
        assert!(next(State::Hello, &ok).is_err());
        assert!(next(State::Hello, &Input::Enrolled).is_err());
        assert_eq!(
            next(State::Attest, &Input::Refused("PCR7".into())).unwrap(),
            State::Failed
        );
        assert!(next(State::Enroll, &Input::Refused("x".into())).is_err());
        assert_eq!(next(State::Attest, &ok).unwrap(), State::Ready);
    }

    #[test]
    fn wipe_runs_only_after_an_ok_verdict_and_a_dirty_disk_fails_the_boot() {
        let wipe = Input::Attested {
            wipe: true,
            image: false,
        };
        let wiped = Input::Wiped { image: false };
        assert_eq!(next(State::Attest, &wipe).unwrap(), State::Wipe);
        assert_eq!(next(State::Wipe, &wiped).unwrap(), State::Ready);
        assert_eq!(
            next(State::Wipe, &Input::WipeFailed("vdb".into())).unwrap(),
            State::Failed
        );
        // No way into Wipe but an OK verdict that asks for it: not from a
        // skipped hello (no server, no verdict), not from a refusal.
        for s in [
            State::Hello,
            State::Enroll,
            State::Inventory,
            State::Ready,
            State::Failed,
        ] {
            assert!(next(s, &wipe).is_err(), "{s:?}");
        }
        assert_ne!(
            next(State::Hello, &Input::Skipped("no server".into())).unwrap(),
            State::Wipe
        );
        // And no way out of Wipe to Ready but every disk clean.
        assert!(next(State::Wipe, &Input::Skipped("x".into())).is_err());
        assert!(next(State::Wipe, &Input::Reported).is_err());
        assert!(next(State::Ready, &wiped).is_err());
        assert!(next(State::Attest, &wiped).is_err());

        let inputs = [
            Input::Begun,
            Input::Mounted,
            Input::ColdplugStarted,
            Input::Leased,
            Input::TpmOpened,
            Input::EventLogRead,
            Input::ModulesLoaded,
            Input::InventoryTaken,
            Input::HelloAccepted,
            Input::Enrolled,
            wipe,
            wiped,
            Input::Reported,
        ];
        let mut state = State::Start;
        let mut tail = Vec::new();
        for input in &inputs {
            state = next(state, input).unwrap();
            tail.push(state);
        }
        assert_eq!(
            tail[tail.len() - 4..],
            [State::Attest, State::Wipe, State::Ready, State::Done]
        );
    }

    #[test]
    fn a_session_leads_to_the_plan_and_a_turnover_ends_with_the_final_verdict() {
        assert_eq!(
            next(State::Attest, &Input::SessionOpened).unwrap(),
            State::Plan
        );
        assert_eq!(
            next(State::Plan, &Input::Planned { snapshot: true }).unwrap(),
            State::Snapshot
        );
        assert_eq!(
            next(State::Plan, &Input::Planned { snapshot: false }).unwrap(),
            State::Wipe
        );
        // No plan: the command line's keys, as without a session.
        for (wipe, image, to) in [
            (true, true, State::Wipe),
            (false, true, State::Image),
            (false, false, State::Ready),
        ] {
            assert_eq!(
                next(State::Plan, &Input::NoPlan { wipe, image }).unwrap(),
                to
            );
        }
        assert_eq!(
            next(State::Snapshot, &Input::Snapshotted).unwrap(),
            State::Wipe
        );
        assert_eq!(
            next(State::Snapshot, &Input::SnapshotFailed("nbd".into())).unwrap(),
            State::Failed
        );
        assert_eq!(
            next(State::Ready, &Input::Finalizing).unwrap(),
            State::FinalAttest
        );
        assert_eq!(
            next(State::FinalAttest, &Input::FinalAttested).unwrap(),
            State::Handoff
        );
        for refusal in [
            Input::Refused("PCR13".into()),
            Input::HandoffFailed("no entry".into()),
        ] {
            assert_eq!(next(State::FinalAttest, &refusal).unwrap(), State::Failed);
        }
        // Nothing skips the final verdict, the snapshot or the plan.
        assert!(next(State::Ready, &Input::FinalAttested).is_err());
        assert!(next(State::Attest, &Input::Planned { snapshot: false }).is_err());
        assert!(next(State::Attest, &Input::Snapshotted).is_err());
        assert!(next(State::Plan, &Input::Snapshotted).is_err());
        assert!(next(State::Snapshot, &Input::Wiped { image: true }).is_err());
        assert!(next(State::FinalAttest, &Input::HandingOff).is_err());
    }

    #[test]
    fn image_runs_after_the_wipe_or_the_verdict_and_a_failure_fails_the_boot() {
        let both = Input::Attested {
            wipe: true,
            image: true,
        };
        let image_only = Input::Attested {
            wipe: false,
            image: true,
        };
        assert_eq!(next(State::Attest, &both).unwrap(), State::Wipe);
        assert_eq!(
            next(State::Wipe, &Input::Wiped { image: true }).unwrap(),
            State::Image
        );
        assert_eq!(next(State::Attest, &image_only).unwrap(), State::Image);
        assert_eq!(next(State::Image, &Input::Imaged).unwrap(), State::Ready);
        assert_eq!(
            next(State::Image, &Input::ImageFailed("checksum".into())).unwrap(),
            State::Failed
        );
        // A dirty disk never gets an image; no way into Image but a verdict
        // or a clean wipe, and no way out to Ready but a written image.
        assert_eq!(
            next(State::Wipe, &Input::WipeFailed("vda".into())).unwrap(),
            State::Failed
        );
        for s in [State::Hello, State::Enroll, State::Ready, State::Image] {
            assert!(next(s, &image_only).is_err(), "{s:?}");
            assert!(next(s, &Input::Wiped { image: true }).is_err(), "{s:?}");
        }
        assert!(next(State::Image, &Input::Skipped("x".into())).is_err());
        assert!(next(State::Image, &Input::Reported).is_err());
        assert!(next(State::Wipe, &Input::Imaged).is_err());
        assert!(next(State::Attest, &Input::Imaged).is_err());
    }

    #[test]
    fn the_image_target_is_named_or_the_first_disk_by_name() {
        let disk = |name: &str, transport: &str| Disk {
            name: name.into(),
            path: format!("/dev/{name}"),
            transport: transport.into(),
            size_bytes: 1 << 30,
            ..Disk::default()
        };
        let disks = [
            disk("vda", "virtio"),
            disk("nvme1n1", "nvme"),
            disk("nvme0n1", "nvme"),
            disk("loop7", "loop"),
            disk("loop3", "loop"),
        ];
        let name = |r: Result<Disk, String>| r.unwrap().name;
        assert_eq!(name(image_target(Mode::Init, &disks, None)), "loop3");
        assert_eq!(name(image_target(Mode::Init, &disks[..3], None)), "nvme0n1");
        assert_eq!(name(image_target(Mode::Init, &disks, Some("vda"))), "vda");
        assert_eq!(name(image_target(Mode::Host, &disks, None)), "loop3");
        assert_eq!(
            name(image_target(Mode::Host, &disks, Some("loop7"))),
            "loop7"
        );
        let err = image_target(Mode::Host, &disks, Some("nvme0n1")).unwrap_err();
        assert!(err.contains("loop devices only"), "{err}");
        let err = image_target(Mode::Init, &disks, Some("sdz")).unwrap_err();
        assert_eq!(
            err,
            "target sdz is not in the inventory (disks: loop3, loop7, nvme0n1, nvme1n1, vda)"
        );
        let err = image_target(Mode::Init, &[], None).unwrap_err();
        assert!(err.contains("no local disk"), "{err}");

        let asked = ImageConfig {
            url: "http://10.0.2.2:1/i.raw".into(),
            checksum: format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            target: None,
            verify_after_write: true,
            https_trust: None,
        };
        let req = image_request(&asked, &disks[2], true);
        assert_eq!(req.target, "/dev/nvme0n1");
        assert!(req.target_reads_zero && req.verify_after_write);
        assert_eq!(req.checksum, asked.checksum);
        assert!(req.signature.is_none());
    }

    #[test]
    fn only_a_wipe_verified_as_zeros_lets_the_image_skip_zero_runs() {
        use warden_protocol::wipe::{Attempt, DiskId, Method, Outcome, Verification, VerifyResult};
        let record = |status, expected: Expected, result: VerifyResult| {
            let verification: Verification = serde_json::from_value(serde_json::json!({
                "mode": "full",
                "expected": expected,
                "samples": 1,
                "bytes_read": 1 << 20,
                "digest": "ab".repeat(32),
                "result": result,
            }))
            .unwrap();
            DiskRecord {
                disk: DiskId {
                    name: "vda".into(),
                    path: "/dev/vda".into(),
                    model: None,
                    serial: None,
                    size_bytes: 1 << 20,
                },
                requested: Method::Auto,
                attempts: vec![Attempt {
                    method: Method::Zeroout,
                    started_at: String::new(),
                    finished_at: String::new(),
                    bytes_written: 1 << 20,
                    outcome: Outcome::Verified,
                    verification: Some(verification),
                }],
                started_at: String::new(),
                finished_at: String::new(),
                bytes_written: 1 << 20,
                status,
                reason: None,
            }
        };
        let pass = || VerifyResult::Pass;
        assert!(reads_zero(&record(
            WipeStatus::Clean,
            Expected::Zeros,
            pass()
        )));
        assert!(!reads_zero(&record(
            WipeStatus::Clean,
            Expected::Pattern {
                seed: "00".repeat(32)
            },
            pass()
        )));
        assert!(!reads_zero(&record(
            WipeStatus::Failed,
            Expected::Zeros,
            pass()
        )));
        let failed_read = VerifyResult::Fail {
            offset: 4096,
            found: "ff".into(),
            expected: "00".into(),
        };
        assert!(!reads_zero(&record(
            WipeStatus::Clean,
            Expected::Zeros,
            failed_read
        )));
    }

    #[test]
    fn a_host_wipes_loop_devices_only() {
        let disk = |name: &str, transport: &str| Disk {
            name: name.into(),
            path: format!("/dev/{name}"),
            transport: transport.into(),
            size_bytes: 1 << 30,
            ..Disk::default()
        };
        let disks = [
            disk("loop3", "loop"),
            disk("nvme0n1", "nvme"),
            disk("vda", "virtio"),
        ];
        let (all, spared) = wipe_candidates(Mode::Init, &disks);
        assert_eq!(all.len(), 3);
        assert!(spared.is_empty());
        let (loops, spared) = wipe_candidates(Mode::Host, &disks);
        assert_eq!(
            loops.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["loop3"]
        );
        assert_eq!(spared, ["nvme0n1", "vda"]);
    }

    #[test]
    fn a_wipe_failure_names_every_dirty_disk() {
        use warden_protocol::wipe::{DiskId, DiskRecord, Method};
        let record = |name: &str, status, reason: Option<&str>| DiskRecord {
            disk: DiskId {
                name: name.into(),
                path: format!("/dev/{name}"),
                model: None,
                serial: None,
                size_bytes: 1 << 20,
            },
            requested: Method::Auto,
            attempts: Vec::new(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
            bytes_written: 0,
            status,
            reason: reason.map(str::to_string),
        };
        let clean = WipeReport::new(vec![record("vda", WipeStatus::Clean, None)]);
        assert_eq!(wipe_failure(&clean), None);
        let report = WipeReport::new(vec![
            record("nvme0n1", WipeStatus::Clean, None),
            record(
                "vdb",
                WipeStatus::Failed,
                Some("zeroout on /dev/vdb: I/O error at byte 4096: EIO"),
            ),
            record(
                "vdc",
                WipeStatus::Failed,
                Some("vdc is in use: vdc1 is mounted at /mnt"),
            ),
        ]);
        let why = wipe_failure(&report).unwrap();
        assert_eq!(
            why,
            "wipe FAILED on vdb, vdc: vdb: zeroout on /dev/vdb: I/O error at byte 4096: EIO; \
             vdc: vdc is in use: vdc1 is mounted at /mnt"
        );
        assert!(!why.contains("nvme0n1"), "{why}");
        assert_eq!(
            wipe_failure(&WipeReport::new(Vec::new())).unwrap(),
            "wipe FAILED: no disk was erased"
        );
    }

    #[test]
    fn verdicts_become_events_and_refusals_name_every_reason() {
        use warden_protocol::attest::{codes, PolicyRef, Reason};
        let verdict = Verdict {
            attestation_id: 3,
            node_id: "ab".repeat(32),
            status: Status::Failed,
            phase: Phase::Boot,
            policy: Some(PolicyRef {
                name: "lab".into(),
                version: 1,
            }),
            reasons: vec![
                Reason::new(codes::POLICY_EVENT, "PCR7: SecureBoot changed from 0 to 1"),
                Reason::new(codes::POLICY_PCR, "PCR4: differs"),
            ],
            time: "2026-01-01T00:00:00Z".into(),
            session: None,
            notes: Vec::new(),
        };
        let Event::Verdict {
            status,
            attestation_id,
            phase,
            policy,
            reasons,
            codes: reason_codes,
        } = verdict_event(&verdict)
        else {
            panic!("not a verdict event");
        };
        assert_eq!(status, "failed");
        assert_eq!(attestation_id, 3);
        assert_eq!(phase, "boot");
        assert_eq!(policy.unwrap().name, "lab");
        assert_eq!(reasons[0], "PCR7: SecureBoot changed from 0 to 1");
        assert_eq!(reason_codes, vec!["policy-event", "policy-pcr"]);
        assert_eq!(
            refusal(&verdict),
            "attestation 3 FAILED: PCR7: SecureBoot changed from 0 to 1; PCR4: differs"
        );
        assert_eq!(wire_ak_algorithm(AkAlgorithm::EccP256EcdsaSha256), AK_ECC);
        assert_eq!(wire_ak_algorithm(AkAlgorithm::Rsa2048RsassaSha256), AK_RSA);
    }

    #[test]
    fn fatal_fails_from_any_working_state_and_end_states_are_final() {
        for s in [
            State::Start,
            State::Init,
            State::Coldplug,
            State::Network,
            State::Tpm,
            State::EventLog,
            State::Settle,
            State::Inventory,
            State::Hello,
            State::Enroll,
            State::Attest,
            State::Wipe,
            State::Image,
            State::Ready,
        ] {
            assert_eq!(next(s, &Input::Fatal("x".into())).unwrap(), State::Failed);
        }
        assert!(next(State::Done, &Input::Begun).is_err());
        assert!(next(State::Failed, &Input::Fatal("x".into())).is_err());
        let err = next(State::Network, &Input::Reported).unwrap_err();
        assert_eq!(
            err.to_string(),
            "workflow: input reported is not valid in state Network"
        );
    }

    #[test]
    fn parses_proc_uptime() {
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Some(12_340));
        assert_eq!(parse_uptime_ms("3 1"), Some(3_000));
        assert_eq!(parse_uptime_ms("0.5"), Some(500));
        assert_eq!(parse_uptime_ms(""), None);
        assert!(kernel_uptime_ms() > 0);
    }
    /// A plan as the server sends it (`GET /v1/session/plan`).
    fn session_plan(extra: serde_json::Value) -> PlanRequest {
        let mut plan = serde_json::json!({
            "image": "https://images.lab/tenant.raw.zst",
            "checksum": format!("sha256:{}", "ab".repeat(32)),
        });
        for (k, v) in extra.as_object().unwrap() {
            plan[k] = v.clone();
        }
        let session: warden_protocol::turnover::SessionPlan =
            serde_json::from_value(serde_json::json!({"lease_id": "lease-1", "plan": plan}))
                .unwrap();
        session.plan
    }

    #[test]
    fn the_plans_image_ca_trusts_the_image_server_else_the_command_lines() {
        let pin = format!("sha256:{}", "cd".repeat(32));
        let cmdline = HttpsTrust::PinnedCa(format!("sha256:{}", "ef".repeat(32)));
        let plan = session_plan(serde_json::json!({"image_ca": pin}));
        let image = plan_image(&plan, Some(&cmdline)).unwrap();
        assert_eq!(image.https_trust, Some(HttpsTrust::PinnedCa(pin.clone())));
        // The request the image writer gets, and what its record keeps.
        let disk = Disk {
            name: "vda".into(),
            path: "/dev/vda".into(),
            ..Disk::default()
        };
        let req = image_request(&image, &disk, false);
        assert_eq!(req.https_trust, Some(HttpsTrust::PinnedCa(pin)));
        assert_eq!(req.trusted_ca_sha256(), vec!["cd".repeat(32)]);
        // No image_ca: the command line's pin; neither: refused at plan time.
        let plan = session_plan(serde_json::json!({}));
        assert_eq!(
            plan_image(&plan, Some(&cmdline)).unwrap().https_trust,
            Some(cmdline)
        );
        let err = plan_image(&plan, None).unwrap_err();
        assert!(err.contains("has no CA to trust"), "{err}");
        let plain = session_plan(serde_json::json!({"image": "http://images.lab/t.raw"}));
        assert_eq!(plan_image(&plain, None).unwrap().https_trust, None);
        let plain_with_ca = session_plan(serde_json::json!({
            "image": "http://images.lab/t.raw",
            "image_ca": format!("sha256:{}", "cd".repeat(32)),
        }));
        assert!(plan_image(&plain_with_ca, None).is_err());
        let bad = session_plan(serde_json::json!({"image_ca": "sha256:12"}));
        let err = plan_image(&bad, None).unwrap_err();
        assert!(err.starts_with("image_ca "), "{err}");
    }

    #[test]
    fn a_restore_plan_restores_after_the_wipe_in_the_images_place() {
        // Plan → (snapshot) → wipe → restore → ready → final attest.
        let mut s = next(State::Plan, &Input::Planned { snapshot: true }).unwrap();
        s = next(s, &Input::Snapshotted).unwrap();
        assert_eq!(s, State::Wipe);
        s = next(s, &Input::WipedForRestore).unwrap();
        assert_eq!(s, State::Restore);
        s = next(s, &Input::Restored).unwrap();
        assert_eq!(s, State::Ready);
        assert_eq!(next(s, &Input::Finalizing).unwrap(), State::FinalAttest);
        assert_eq!(
            next(State::Restore, &Input::RestoreFailed("chunk 3".into())).unwrap(),
            State::Failed
        );
        assert_eq!(
            next(State::Restore, &Input::Fatal("x".into())).unwrap(),
            State::Failed
        );
        // Only a clean wipe leads to a restore, and only a restore out of it
        // to Ready: no skipping the wipe, no image on top, no way around.
        for s in [
            State::Attest,
            State::Plan,
            State::Snapshot,
            State::Image,
            State::Ready,
            State::Restore,
        ] {
            assert!(next(s, &Input::WipedForRestore).is_err(), "{s:?}");
        }
        for s in [State::Wipe, State::Image, State::Ready, State::Plan] {
            assert!(next(s, &Input::Restored).is_err(), "{s:?}");
        }
        assert!(next(State::Restore, &Input::Imaged).is_err());
        assert!(next(State::Restore, &Input::Skipped("x".into())).is_err());
        assert!(next(State::Restore, &Input::Reported).is_err());
        assert!(next(State::Restore, &Input::HandingOff).is_err());
        assert!(next(State::Restore, &Input::Wiped { image: true }).is_err());
    }

    fn restore_session(extra: serde_json::Value) -> warden_protocol::turnover::SessionPlan {
        let mut session = serde_json::json!({
            "lease_id": "lease-2",
            "plan": {"restore_from": "lease-1"},
            "restore": {"uri": "nbd://10.0.2.2:10809/", "manifest_sha256": "cd".repeat(32)},
        });
        for (k, v) in extra.as_object().unwrap() {
            session[k] = v.clone();
        }
        serde_json::from_value(session).unwrap()
    }

    #[test]
    fn a_restore_plan_is_checked_before_any_disk_is_touched() {
        let (image, restore, writes) =
            plan_disk_source(&restore_session(serde_json::json!({})), None).unwrap();
        assert_eq!(image, None);
        let source = restore.unwrap();
        assert!(
            writes.contains("restore lease-1 from nbd://10.0.2.2:10809/"),
            "{writes}"
        );
        let req = restore_request(&source, "/dev/nvme1n1", true).unwrap();
        assert_eq!(req.target, "/dev/nvme1n1");
        assert_eq!(req.manifest_sha256, "cd".repeat(32));
        assert!(req.target_reads_zero);
        assert_eq!(req.ca_pem, None);

        // The server must have resolved the backup.
        let err = plan_disk_source(&restore_session(serde_json::json!({"restore": null})), None)
            .unwrap_err();
        assert!(err.contains("sent no restore source"), "{err}");
        // TLS only with the snapshot's CA; a CA only with TLS; a digest.
        for (restore, says) in [
            (
                serde_json::json!({"uri": "nbds://h:1/x", "manifest_sha256": "cd".repeat(32)}),
                "without the CA",
            ),
            (
                serde_json::json!({"uri": "nbd://h:1/x", "manifest_sha256": "cd".repeat(32), "ca_pem": "PEM"}),
                "plain nbd://",
            ),
            (
                serde_json::json!({"uri": "http://h/x", "manifest_sha256": "cd".repeat(32)}),
                "not an nbd://",
            ),
            (
                serde_json::json!({"uri": "nbd://h:1/x", "manifest_sha256": "cd"}),
                "manifest_sha256",
            ),
        ] {
            let err = plan_disk_source(
                &restore_session(serde_json::json!({ "restore": restore })),
                None,
            )
            .unwrap_err();
            assert!(err.contains(says), "{says}: {err}");
        }
        let tls = restore_session(serde_json::json!({"restore": {
            "uri": "nbds://h:1/x", "manifest_sha256": "cd".repeat(32), "ca_pem": "PEM"
        }}));
        let (_, source, _) = plan_disk_source(&tls, None).unwrap();
        assert_eq!(
            restore_request(&source.unwrap(), "/dev/vda", false)
                .unwrap()
                .ca_pem
                .as_deref(),
            Some("PEM")
        );
        // Both or neither: refused by the plan's own rule.
        let both = restore_session(serde_json::json!({"plan": {
            "restore_from": "lease-1", "image": "http://x/i", "checksum": "ab".repeat(32)
        }}));
        let err = plan_disk_source(&both, None).unwrap_err();
        assert!(err.contains("both an image and restore_from"), "{err}");
        // An image plan still gives the image step's settings.
        let image = restore_session(serde_json::json!({"plan": {
            "image": "http://x/i", "checksum": "ab".repeat(32)
        }, "restore": null}));
        let (image, restore, writes) = plan_disk_source(&image, None).unwrap();
        assert_eq!(image.unwrap().url, "http://x/i");
        assert_eq!((restore, writes.as_str()), (None, "image http://x/i"));
    }

    #[test]
    fn a_failed_restore_leaves_no_bootable_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xa5u8; 8 << 20]).unwrap();
        clear_boot_regions(path.to_str().unwrap()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..1 << 20].iter().all(|&b| b == 0), "first MiB");
        assert!(
            bytes[bytes.len() - 33 * 4096..].iter().all(|&b| b == 0),
            "backup GPT"
        );
        assert!(
            bytes[(1 << 20)..(2 << 20)].iter().all(|&b| b == 0xa5),
            "nothing else"
        );
        let err = clear_boot_regions(dir.path().join("none").to_str().unwrap()).unwrap_err();
        assert!(err.contains("none"), "{err}");
    }

    #[test]
    fn the_plans_snapshot_ca_goes_to_an_nbds_export_only() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let plan = session_plan(serde_json::json!({
            "snapshot_to": "nbds://10.0.2.2:10809/old",
            "snapshot_ca": pem,
        }));
        let req = snapshot_request(&plan, "nbds://10.0.2.2:10809/old", "/dev/vda").unwrap();
        assert_eq!(req.ca_pem.as_deref(), Some(pem));
        assert_eq!(req.source, "/dev/vda");
        let err = snapshot_request(&plan, "nbd://10.0.2.2:10809/old", "/dev/vda").unwrap_err();
        assert!(err.contains("plain nbd://"), "{err}");
        let no_ca = session_plan(serde_json::json!({"snapshot_to": "nbds://h:1/x"}));
        let err = snapshot_request(&no_ca, "nbds://h:1/x", "/dev/vda").unwrap_err();
        assert!(err.contains("needs the plan's snapshot_ca"), "{err}");
        let plain = session_plan(serde_json::json!({"snapshot_to": "nbd://h:1/x"}));
        assert_eq!(
            snapshot_request(&plain, "nbd://h:1/x", "/dev/vda")
                .unwrap()
                .ca_pem,
            None
        );
    }

    /// nbdkit serving `file` over TLS only, killed on drop.
    struct TlsNbdkit {
        child: std::process::Child,
        port: u16,
    }

    impl TlsNbdkit {
        fn start(pki: &Path, file: &Path) -> TlsNbdkit {
            for _ in 0..5 {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let mut child = std::process::Command::new("nbdkit")
                    .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
                    .arg(port.to_string())
                    .arg("--tls=require")
                    .arg(format!("--tls-certificates={}", pki.display()))
                    .arg("file")
                    .arg(file)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                // A hang guard, not a timing assertion.
                for _ in 0..1000 {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        return TlsNbdkit { child, port };
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("nbdkit --tls=require did not start");
        }
    }

    impl Drop for TlsNbdkit {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The plan's snapshot_ca reaches the NBD client: the backup to a
    /// TLS-only nbdkit succeeds with the CA that signed its certificate,
    /// its record names that CA, and another CA is refused.
    #[test]
    fn a_plans_snapshot_ca_is_what_the_nbds_client_trusts() {
        let test = "a_plans_snapshot_ca_is_what_the_nbds_client_trusts";
        for tool in ["nbdkit", "certtool"] {
            let found = std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file())
            });
            if !found {
                assert!(
                    std::env::var("WARDEN_REQUIRE_TOOLS").as_deref() != Ok("1"),
                    "{test}: `{tool}` is not installed and WARDEN_REQUIRE_TOOLS=1"
                );
                eprintln!("SKIPPED {test}: `{tool}` is not installed (run scripts/setup)");
                return;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (pki, other) = (dir.path().join("pki"), dir.path().join("other"));
        std::fs::create_dir(&pki).unwrap();
        std::fs::create_dir(&other).unwrap();
        let ca = std::fs::read_to_string(
            warden_nbd::testing::make_test_pki(&pki, "Warden plan test CA").unwrap(),
        )
        .unwrap();
        let wrong = std::fs::read_to_string(
            warden_nbd::testing::make_test_pki(&other, "Some other CA").unwrap(),
        )
        .unwrap();
        let mib = 1u64 << 20;
        let (src, exp) = (dir.path().join("src.img"), dir.path().join("export.img"));
        let disk = 4 * mib;
        {
            let f = std::fs::File::create(&src).unwrap();
            f.set_len(disk).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], mib).unwrap();
        }
        let chunk = warden_protocol::snapshot::DEFAULT_CHUNK_SIZE;
        let need = warden_protocol::snapshot::export_bytes_needed(
            disk,
            warden_protocol::snapshot::manifest_len(disk, chunk, 200),
        );
        std::fs::File::create(&exp).unwrap().set_len(need).unwrap();
        let server = TlsNbdkit::start(&pki, &exp);
        let uri = format!("nbds://127.0.0.1:{}/", server.port);
        let src = src.to_str().unwrap();

        let plan = session_plan(serde_json::json!({"snapshot_to": uri, "snapshot_ca": ca}));
        let req = snapshot_request(&plan, &uri, src).unwrap();
        let record = snapshot::snapshot(&req, &snapshot::Tuning::default()).unwrap();
        let fingerprint = warden_protocol::ca::pem_sha256(&ca).unwrap();
        assert_eq!(record.ca_sha256, fingerprint);
        let json = String::from_utf8(record.canonical_json()).unwrap();
        assert!(json.contains(&fingerprint[0]), "{json}");
        let mut head = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&exp).unwrap(),
            &mut head,
            mib,
        )
        .unwrap();
        assert_eq!(head, [0x5a; 4096]);

        let plan = session_plan(serde_json::json!({"snapshot_to": uri, "snapshot_ca": wrong}));
        let req = snapshot_request(&plan, &uri, src).unwrap();
        let err = snapshot::snapshot(&req, &snapshot::Tuning::default()).unwrap_err();
        assert!(
            matches!(err, snapshot::SnapshotError::Connect { .. }),
            "{err}"
        );
    }
}
