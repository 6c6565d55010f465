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
///
/// After the wipe the target disk gets either a tenant image (`image` with
/// its `checksum`) or a backup the server recorded (`restore_from`):
/// exactly one of the two, which the server checks when the plan is made
/// ([`PlanRequest::disk_source`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// HTTP(S) URL of the tenant image; none in a restore plan. Omitted
    /// from the JSON when none, so an image plan reads as it always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `sha256:HEX` or `sha512:HEX` (a bare 64-hex-digit value means
    /// sha256) of the image as served; with `image` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
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
    /// Instead of an image: the lease id of a snapshot the server recorded
    /// (`GET /v1/snapshots/{lease}`), restored onto the target after the
    /// wipe. The server resolves its export, manifest digest and CA, so
    /// the agent trusts only a manifest the server recorded; the snapshot
    /// must hold the data of the plan's incoming lessee. Omitted from the
    /// JSON when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
}

fn default_wipe() -> Method {
    Method::Auto
}

/// What a plan writes onto the target disk after the wipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskSource<'a> {
    /// A tenant image and the checksum of its bytes as served.
    Image { url: &'a str, checksum: &'a str },
    /// The backup taken in turnover `lease` (a snapshot's lease id).
    Restore { lease: &'a str },
}

/// A plan that names no disk source, or two; the field to blame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DiskSourceError {
    /// The plan field at fault (`image`, `checksum` or `restore_from`).
    pub field: &'static str,
    pub message: String,
}

impl PlanRequest {
    /// The one thing the plan writes after the wipe: `image` with
    /// `checksum`, or `restore_from` — never both, never neither, and no
    /// image field (`checksum`, `image_ca`) in a restore plan.
    pub fn disk_source(&self) -> Result<DiskSource<'_>, DiskSourceError> {
        let err = |field: &'static str, message: String| Err(DiskSourceError { field, message });
        match (&self.image, &self.checksum, &self.restore_from) {
            (Some(url), Some(checksum), None) => Ok(DiskSource::Image { url, checksum }),
            (Some(_), None, None) => err(
                "checksum",
                "an image plan needs the checksum of the image as served (sha256:HEX or sha512:HEX)".into(),
            ),
            (None, Some(_), None) => err(
                "image",
                "the plan has a checksum but no image URL to check it against".into(),
            ),
            (None, None, None) => err(
                "image",
                "the plan writes nothing after the wipe: give an image (with its checksum) or restore_from (a snapshot's lease id)".into(),
            ),
            (Some(_), _, Some(lease)) => err(
                "restore_from",
                format!("the plan gives both an image and restore_from {lease:?}: the target gets one or the other"),
            ),
            (None, Some(_), Some(lease)) => err(
                "checksum",
                format!("a checksum belongs to an image, but the plan restores snapshot {lease:?}: the manifest the server recorded is what the restore checks"),
            ),
            (None, None, Some(lease)) if self.image_ca.is_some() => err(
                "image_ca",
                format!("image_ca belongs to an https:// image, but the plan restores snapshot {lease:?}"),
            ),
            (None, None, Some(lease)) => Ok(DiskSource::Restore { lease }),
        }
    }
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
    /// `snapshot`, `wipe`, `image`, `restore`, `handoff`.
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
    /// For a plan with `restore_from`: the backup as the server recorded
    /// it. Omitted when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSource>,
}

/// The backup a restore plan writes, resolved by the server from the
/// snapshot it recorded (never from anything the operator typed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSource {
    /// The export the snapshot was written to (`SnapshotRecord.uri`).
    pub uri: String,
    /// Lowercase hex SHA-256 of the manifest the snapshot recorded: the
    /// only manifest the restore accepts.
    pub manifest_sha256: String,
    /// PEM of the CA(s) of an `nbds://` export: the `snapshot_ca` of the
    /// plan that took the snapshot. None for `nbd://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(v: serde_json::Value) -> PlanRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_image_plan_reads_and_writes_as_before() {
        // A plan stored before restore plans existed: same bytes back.
        let stored = r#"{"image":"http://10.0.2.2:8080/t.qcow2","checksum":"sha256:ab","snapshot_to":null,"wipe":"auto","handoff":"kexec","lessee":"lab-b","target":null}"#;
        let p: PlanRequest = serde_json::from_str(stored).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), stored);
        assert_eq!(
            p.disk_source().unwrap(),
            DiskSource::Image {
                url: "http://10.0.2.2:8080/t.qcow2",
                checksum: "sha256:ab"
            }
        );
    }

    #[test]
    fn a_plan_writes_an_image_or_restores_a_snapshot_never_both_nor_neither() {
        let r = plan(serde_json::json!({"restore_from": "lease-0011223344556677"}));
        assert_eq!(
            r.disk_source().unwrap(),
            DiskSource::Restore {
                lease: "lease-0011223344556677"
            }
        );
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            !text.contains("image") && !text.contains("checksum"),
            "{text}"
        );
        assert!(text.contains(r#""restore_from":"lease-0011223344556677""#));
        let field = |v: serde_json::Value| plan(v).disk_source().unwrap_err().field;
        assert_eq!(field(serde_json::json!({})), "image");
        assert_eq!(
            field(serde_json::json!({"image": "http://x/i"})),
            "checksum"
        );
        assert_eq!(field(serde_json::json!({"checksum": "sha256:ab"})), "image");
        assert_eq!(
            field(
                serde_json::json!({"image": "http://x/i", "checksum": "ab", "restore_from": "l"})
            ),
            "restore_from"
        );
        assert_eq!(
            field(serde_json::json!({"image": "http://x/i", "restore_from": "l"})),
            "restore_from"
        );
        assert_eq!(
            field(serde_json::json!({"checksum": "ab", "restore_from": "l"})),
            "checksum"
        );
        assert_eq!(
            field(serde_json::json!({"image_ca": "sha256:ab", "restore_from": "l"})),
            "image_ca"
        );
        let e = plan(
            serde_json::json!({"image": "http://x/i", "checksum": "ab", "restore_from": "lease-9"}),
        )
        .disk_source()
        .unwrap_err();
        assert!(e.message.contains("lease-9"), "{e}");
    }

    #[test]
    fn a_session_plan_carries_the_restore_source_only_when_there_is_one() {
        let without: SessionPlan = serde_json::from_value(serde_json::json!({
            "lease_id": "lease-1",
            "plan": {"image": "http://x/i", "checksum": "ab"},
        }))
        .unwrap();
        assert_eq!(without.restore, None);
        assert!(!serde_json::to_string(&without).unwrap().contains("restore"));
        let with = SessionPlan {
            lease_id: "lease-2".into(),
            plan: plan(serde_json::json!({"restore_from": "lease-1"})),
            snapshot_done: None,
            restore: Some(RestoreSource {
                uri: "nbd://10.0.2.2:10809/".into(),
                manifest_sha256: "cd".repeat(32),
                ca_pem: None,
            }),
        };
        let text = serde_json::to_string(&with).unwrap();
        assert!(!text.contains("ca_pem"), "{text}");
        assert_eq!(serde_json::from_str::<SessionPlan>(&text).unwrap(), with);
    }
}
