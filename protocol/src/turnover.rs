//! The lease turnover over the wire: tokens and roles, the plan an owner
//! asks for, the session the agent gets with a good verdict, and what the
//! agent streams back (progress, console lines, step results).
//!
//! Operator endpoints (bearer token of a role):
//! `POST /v1/tokens`, `PUT /v1/nodes/{id}/owner`,
//! `POST /v1/nodes/{id}/turnover`, `GET /v1/nodes/{id}/plan`,
//! `GET /v1/nodes/{id}/progress`, `GET /v1/nodes/{id}/console`,
//! `GET /v1/nodes/{id}/report`, `GET /v1/snapshots`,
//! `GET /v1/snapshots/{lease}`.
//!
//! Agent endpoints (bearer session token from [`crate::attest::Verdict::session`]):
//! `GET /v1/session/plan`, `POST /v1/session/progress`,
//! `POST /v1/session/console`, `POST /v1/session/steps`.

use serde::{Deserialize, Serialize};

use crate::wipe::Method;

/// Who a bearer token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// The nodes whose `owner` is the token's project: enrollment,
    /// policies, plans, and everything about them except lessees' snapshots.
    Owner,
    /// The nodes currently leased to the token's project: verdicts,
    /// progress, console, reports, and its own snapshots.
    Lessee,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Owner => "owner",
            Role::Lessee => "lessee",
        }
    }
}

/// Body of `POST /v1/tokens` (admin only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub role: Role,
    /// The project the token acts for; required for owner and lessee.
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
}

/// Reply to `POST /v1/tokens`: the secret is shown once, only its hash is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub role: Role,
    pub project: Option<String>,
}

/// Body of `PUT /v1/nodes/{id}/owner` (admin only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRequest {
    pub owner: String,
}

/// How the agent hands the node over at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handoff {
    /// Measure the tenant's kernel, initrd and command line, then kexec.
    #[default]
    Kexec,
    /// Set BootNext to the imaged disk's ESP, then reboot.
    RebootToDisk,
    /// Plain reboot (the BMC's boot order decides).
    Reboot,
    Poweroff,
}

impl Handoff {
    pub fn name(self) -> &'static str {
        match self {
            Handoff::Kexec => "kexec",
            Handoff::RebootToDisk => "reboot-to-disk",
            Handoff::Reboot => "reboot",
            Handoff::Poweroff => "poweroff",
        }
    }
}

/// Body of `POST /v1/nodes/{id}/turnover`: what the node's next boot does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// HTTP(S) URL of the tenant image.
    pub image: String,
    /// `sha256:HEX` or `sha512:HEX` (a bare 64-hex-digit value means sha256).
    pub checksum: String,
    /// `nbd://` or `nbds://` export the outgoing tenant's disk is backed up
    /// to before the wipe; none: no snapshot.
    #[serde(default)]
    pub snapshot_to: Option<String>,
    /// Erase method for every disk.
    #[serde(default = "default_wipe")]
    pub wipe: Method,
    #[serde(default)]
    pub handoff: Handoff,
    /// The incoming lessee (project); none keeps the node's current one.
    #[serde(default)]
    pub lessee: Option<String>,
    /// The disk the image goes to (kernel name, e.g. `nvme0n1`); none: the
    /// first disk of the inventory in name order. The snapshot reads it too.
    #[serde(default)]
    pub target: Option<String>,
    /// How the agent trusts an `https://` image server: `sha256:HEX`, the
    /// SHA-256 of the DER of a CA certificate the server presents in its
    /// chain (what `warden.image_ca` means), or the PEM of one or more CA
    /// certificates, any of which may anchor the server's chain (see
    /// [`crate::image::HttpsTrust::from_plan`]). None: the agent's own
    /// `warden.image_ca`, if its command line has one. Refused with an
    /// `http://` image. Omitted from the JSON when none, so a plan without
    /// it reads as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ca: Option<String>,
    /// PEM of the CA certificate(s) that sign an `nbds://` block store's
    /// certificate: required with `nbds://` (the ramdisk has no system CA
    /// store), refused with `nbd://` or without `snapshot_to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ca: Option<String>,
}

fn default_wipe() -> Method {
    Method::Auto
}

/// Where a plan is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// Waiting for the node's next good verdict.
    Pending,
    /// Handed to an agent session.
    Running,
    /// Final verdict OK and report signed.
    Done,
    /// A step or the final verdict failed; a report says why.
    Failed,
    /// Replaced by a newer plan before it ran.
    Superseded,
}

impl PlanState {
    pub fn name(self) -> &'static str {
        match self {
            PlanState::Pending => "pending",
            PlanState::Running => "running",
            PlanState::Done => "done",
            PlanState::Failed => "failed",
            PlanState::Superseded => "superseded",
        }
    }
}

/// A plan as stored and shown (`GET /v1/nodes/{id}/plan`, and the reply
/// to `POST /v1/nodes/{id}/turnover`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Names this turnover everywhere: records, report, tenant.
    pub lease_id: String,
    pub node_id: String,
    pub state: PlanState,
    pub request: PlanRequest,
    /// The lessee the node is handed to.
    pub lessee: Option<String>,
    /// The lessee the node had when the plan was made (whose data a
    /// snapshot holds).
    pub previous_lessee: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why it failed.
    pub failure: Option<String>,
}

/// Body of `POST /v1/session/progress`: one step's bytes so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressUpdate {
    /// `snapshot`, `wipe`, `image`, `handoff`, …
    pub step: String,
    pub done: u64,
    /// None while unknown.
    #[serde(default)]
    pub total: Option<u64>,
}

/// One step in `GET /v1/nodes/{id}/progress`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    pub step: String,
    /// `running`, `ok` or `failed`.
    pub state: String,
    pub done: u64,
    pub total: Option<u64>,
    /// Bytes per second since the step started (0 until known).
    pub rate: u64,
    /// Seconds left at that rate, when `total` is known.
    pub eta_seconds: Option<u64>,
    pub started_at: String,
    pub updated_at: String,
}

/// Body of `GET /v1/nodes/{id}/progress`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressView {
    pub node_id: String,
    pub lease_id: Option<String>,
    pub plan_state: Option<PlanState>,
    pub steps: Vec<StepProgress>,
}

/// Body of `POST /v1/session/console`: console lines in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleBatch {
    pub lines: Vec<String>,
}

/// One stored console line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLine {
    /// Increasing per server; `?after=seq` pages.
    pub seq: i64,
    pub at: String,
    pub line: String,
}

/// Body of `GET /v1/nodes/{id}/console?after=SEQ`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLog {
    pub node_id: String,
    pub lines: Vec<ConsoleLine>,
}

/// Body of `POST /v1/session/steps`: a step ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepResult {
    /// `snapshot`, `wipe`, `image`, `handoff`.
    pub step: String,
    pub ok: bool,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    /// Bytes the step moved (read, erased or written).
    pub bytes: u64,
    /// The step's record(s) as measured (canonical JSON), for the
    /// operators' view; the report takes records only from the verified
    /// measured log.
    #[serde(default)]
    pub records: Vec<String>,
}

/// Body of `GET /v1/session/plan` when a plan is waiting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPlan {
    pub lease_id: String,
    pub plan: PlanRequest,
    /// The SnapshotRecord (canonical JSON) of a snapshot that already
    /// succeeded for this lease in an earlier boot: the agent must not take
    /// it again (the disk may be half erased since).
    #[serde(default)]
    pub snapshot_done: Option<String>,
}

/// A snapshot the server knows of (`GET /v1/snapshots`,
/// `GET /v1/snapshots/{lease}`): visible only to the lessee whose data it
/// holds (and admins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The turnover that took it.
    pub lease_id: String,
    pub node_id: String,
    /// The lessee whose disk it holds (the outgoing one).
    pub lessee: Option<String>,
    pub uri: String,
    pub manifest_sha256: String,
    pub created_at: String,
    pub record: crate::snapshot::SnapshotRecord,
}

/// Body of `GET /v1/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotEntry>,
}
