//! `GET /v1/nodes`: what the server knows about each node.

use serde::{Deserialize, Serialize};

use crate::hello::Inventory;

/// One node as listed by the server (and printed by `wardenctl nodes --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Hex SHA-256 of the EK public key (DER SPKI).
    pub node_id: String,
    /// `rsa2048` or `ecc-nist-p256`.
    pub ek_algorithm: String,
    /// RFC 3339 UTC.
    pub first_seen: String,
    /// RFC 3339 UTC.
    pub last_seen: String,
    /// How many hellos the server has stored for this node.
    pub hello_count: u64,
    /// Agent version of the last hello.
    pub agent_version: String,
    /// Address the last hello came from.
    pub peer_address: String,
    /// PCR index → hex SHA-256, from the last hello.
    pub pcrs: std::collections::BTreeMap<u32, String>,
    /// Size of the last event log in bytes (0: none).
    pub event_log_bytes: u64,
    /// Inventory from the last hello.
    pub inventory: Inventory,
    /// The project that owns the node.
    #[serde(default)]
    pub owner: Option<String>,
    /// The project the node is leased to.
    #[serde(default)]
    pub lessee: Option<String>,
    /// Set while the node is quarantined: a verdict failed on its evidence
    /// against its policy, and no plan runs on it until an owner or admin
    /// releases it (`POST /v1/nodes/{id}/release`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
}

/// Why and since when a node is quarantined (see `docs/turnover.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// RFC 3339 UTC: when the failing verdict was stored.
    pub since: String,
    /// The audit-log id of the verdict that quarantined the node.
    pub attestation_id: i64,
    /// That verdict's reason messages, joined with `; `.
    pub reason: String,
}

/// Answer to `POST /v1/nodes/{id}/release`: the quarantine that was
/// closed. Releasing approves nothing: the node's next boot is attested as
/// usual.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRelease {
    pub node_id: String,
    /// The quarantine as it was.
    pub released: Quarantine,
    /// RFC 3339 UTC.
    pub released_at: String,
    /// `admin` or `owner:PROJECT`.
    pub released_by: String,
}

/// Body of `GET /v1/nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeSummary>,
}
