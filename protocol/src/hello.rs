//! `POST /v1/hello`: the first thing a booted agent tells the server.
//!
//! The node is identified by the SHA-256 of its Endorsement Key's public key
//! in DER `SubjectPublicKeyInfo` form ([`node_id_for_ek`]). That form was
//! chosen because an owner can compute it from the EK certificate alone
//! (`openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum`),
//! whatever TPM tooling produced it. The server derives the id itself from
//! the submitted key; it never trusts an id sent by the agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{sha256_hex, PCR_COUNT, PROTOCOL_VERSION};

/// Body of `POST /v1/hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloRequest {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The agent's own version string (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// Seconds since the agent started, when it sent this.
    pub uptime_ms: u64,
    /// The TPM's Endorsement Key.
    pub ek: EkPublic,
    /// The SHA-256 PCR bank, read just before sending.
    pub pcrs: PcrBank,
    /// The firmware's TCG event log (`binary_bios_measurements`), if the node has one.
    #[serde(with = "crate::b64::option", default)]
    pub event_log: Option<Vec<u8>>,
    /// What the node has.
    pub inventory: Inventory,
}

/// An Endorsement Key public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EkPublic {
    /// `rsa2048` or `ecc-nist-p256`.
    pub algorithm: String,
    /// DER `SubjectPublicKeyInfo`; its SHA-256 is the node id.
    #[serde(with = "crate::b64")]
    pub public_key_der: Vec<u8>,
    /// The marshalled `TPMT_PUBLIC` as the TPM returned it (for attestation).
    #[serde(with = "crate::b64")]
    pub tpm_public: Vec<u8>,
    /// The EK certificate from the TPM's NV index, DER, when there is one.
    #[serde(with = "crate::b64::option", default)]
    pub certificate_der: Option<Vec<u8>>,
}

/// One PCR bank: PCR index → lowercase hex digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrBank {
    /// Only `sha256` is accepted today.
    pub algorithm: String,
    /// Index (0..24) → hex digest.
    pub values: BTreeMap<u32, String>,
}

/// What the agent found on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Local block devices the agent would act on.
    pub disks: Vec<Disk>,
    /// Network interfaces (loopback excluded).
    pub nics: Vec<Nic>,
    /// The interface that got the DHCP lease, and its address, if any.
    #[serde(default)]
    pub lease: Option<Lease>,
}

/// A block device, as read from `/sys/block/NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Kernel name, e.g. `vda`, `nvme0n1`.
    pub name: String,
    /// `/dev/NAME`.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    /// `virtio`, `nvme`, `scsi`, `ata`, `loop`, `unknown`.
    pub transport: String,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// `queue/discard_granularity` in bytes (0: no discard).
    pub discard_granularity: u64,
    /// `queue/discard_max_bytes`.
    pub discard_max_bytes: u64,
    /// `queue/write_zeroes_max_bytes` (0: no write-zeroes).
    pub write_zeroes_max_bytes: u64,
}

/// A network interface, as read from `/sys/class/net/NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Kernel driver bound to the device, if any.
    pub driver: Option<String>,
    /// Carrier up.
    pub link: bool,
    /// Link speed in Mbit/s when the driver reports one.
    pub speed_mbps: Option<u32>,
}

/// The DHCP lease the agent holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub interface: String,
    /// `a.b.c.d/prefix`.
    pub address: String,
    pub router: Option<String>,
    pub server: String,
    pub lease_seconds: u32,
}

/// Body of a successful `POST /v1/hello` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResponse {
    /// The node id the server derived (hex SHA-256 of the EK's SPKI DER).
    pub node_id: String,
    /// True when this was the first hello from this node.
    pub new_node: bool,
}

/// Body of every error reply of the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable kind, e.g. `bad_request`.
    pub error: String,
    /// The JSON path of the offending field, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A sentence a person can act on.
    pub message: String,
}

/// A semantic problem in a request: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path, e.g. `pcrs.values.7`.
    pub field: String,
    pub message: String,
}

pub(crate) fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Refuses a request whose `protocol` is not [`PROTOCOL_VERSION`], naming both.
pub(crate) fn check_protocol(protocol: u32) -> Result<(), FieldError> {
    if protocol == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(field_err(
        "protocol",
        format!("agent speaks protocol {protocol}, server speaks {PROTOCOL_VERSION}"),
    ))
}

/// The node id for an EK public key in DER SPKI form.
pub fn node_id_for_ek(public_key_der: &[u8]) -> String {
    sha256_hex(public_key_der)
}

impl EkPublic {
    /// Checks algorithm and sizes; `at` is the JSON path of this value.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        match self.algorithm.as_str() {
            "rsa2048" | "ecc-nist-p256" => {}
            other => {
                return Err(field_err(
                    format!("{at}.algorithm"),
                    format!(
                        "unsupported EK algorithm {other:?} (expected rsa2048 or ecc-nist-p256)"
                    ),
                ))
            }
        }
        // A DER SEQUENCE; the server parses it fully.
        if self.public_key_der.len() < 32
            || self.public_key_der.len() > 2048
            || self.public_key_der.first() != Some(&0x30)
        {
            return Err(field_err(
                format!("{at}.public_key_der"),
                "is not a DER SubjectPublicKeyInfo",
            ));
        }
        if self.tpm_public.is_empty() || self.tpm_public.len() > 4096 {
            return Err(field_err(
                format!("{at}.tpm_public"),
                "must be 1 to 4096 bytes",
            ));
        }
        Ok(())
    }
}

impl PcrBank {
    /// Checks the bank is SHA-256 with valid indices and digests; `at` is
    /// the JSON path of this value.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        if self.algorithm != "sha256" {
            return Err(field_err(
                format!("{at}.algorithm"),
                format!(
                    "unsupported PCR bank {:?} (expected sha256)",
                    self.algorithm
                ),
            ));
        }
        if self.values.is_empty() {
            return Err(field_err(format!("{at}.values"), "no PCR values"));
        }
        for (index, digest) in &self.values {
            let field = format!("{at}.values.{index}");
            if *index as usize >= PCR_COUNT {
                return Err(field_err(
                    field,
                    format!("PCR index {index} is out of range 0..{PCR_COUNT}"),
                ));
            }
            if digest.len() != 64
                || !digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(field_err(
                    field,
                    "is not a lowercase hex SHA-256 digest (64 characters)",
                ));
            }
        }
        Ok(())
    }
}

impl HelloRequest {
    /// Checks what serde cannot: versions, digest shapes, index ranges, sizes.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_protocol(self.protocol)?;
        if self.agent_version.is_empty() || self.agent_version.len() > 64 {
            return Err(field_err("agent_version", "must be 1 to 64 characters"));
        }
        self.ek.validate("ek")?;
        self.pcrs.validate("pcrs")?;
        if let Some(log) = &self.event_log {
            if log.len() > 4 * 1024 * 1024 {
                return Err(field_err("event_log", "is larger than 4 MiB"));
            }
        }
        for (i, disk) in self.inventory.disks.iter().enumerate() {
            if disk.name.is_empty() || disk.name.contains('/') {
                return Err(field_err(
                    format!("inventory.disks.{i}.name"),
                    "must be a kernel device name",
                ));
            }
        }
        for (i, nic) in self.inventory.nics.iter().enumerate() {
            if !is_mac(&nic.mac) {
                return Err(field_err(
                    format!("inventory.nics.{i}.mac"),
                    format!("{:?} is not a MAC address aa:bb:cc:dd:ee:ff", nic.mac),
                ));
            }
        }
        Ok(())
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> HelloRequest {
        HelloRequest {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            uptime_ms: 1234,
            ek: EkPublic {
                algorithm: "rsa2048".into(),
                public_key_der: {
                    let mut v = vec![0x30, 0x82];
                    v.resize(294, 7);
                    v
                },
                tpm_public: vec![0, 1, 0, 11],
                certificate_der: None,
            },
            pcrs: PcrBank {
                algorithm: "sha256".into(),
                values: (0..24u32).map(|i| (i, "00".repeat(32))).collect(),
            },
            event_log: Some(vec![1, 2, 3]),
            inventory: Inventory {
                disks: vec![Disk {
                    name: "vda".into(),
                    path: "/dev/vda".into(),
                    size_bytes: 1 << 30,
                    ..Default::default()
                }],
                nics: vec![Nic {
                    name: "eth0".into(),
                    mac: "52:54:00:12:34:56".into(),
                    ..Default::default()
                }],
                lease: None,
            },
        }
    }

    #[test]
    fn round_trips_through_json() {
        let req = sample();
        let json = serde_json::to_string(&req).unwrap();
        assert!(json.contains("\"event_log\":\"AQID\""), "{json}");
        let back: HelloRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, req);
        back.validate().unwrap();
    }

    #[test]
    fn rejects_bad_pcr_digest_naming_the_pcr() {
        let mut req = sample();
        req.pcrs.values.insert(7, "XYZ".into());
        let err = req.validate().unwrap_err();
        assert_eq!(err.field, "pcrs.values.7");
    }

    #[test]
    fn rejects_out_of_range_pcr() {
        let mut req = sample();
        req.pcrs.values.insert(24, "00".repeat(32));
        assert_eq!(req.validate().unwrap_err().field, "pcrs.values.24");
    }

    #[test]
    fn rejects_wrong_protocol_and_bad_mac() {
        let mut req = sample();
        req.protocol = 99;
        assert_eq!(req.validate().unwrap_err().field, "protocol");
        let mut req = sample();
        req.inventory.nics[0].mac = "52:54:00".into();
        assert_eq!(req.validate().unwrap_err().field, "inventory.nics.0.mac");
    }

    #[test]
    fn rejects_non_base64_binary() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["ek"]["public_key_der"] = "!!!".into();
        let err = serde_json::from_value::<HelloRequest>(v).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }

    #[test]
    fn node_id_is_sha256_of_spki() {
        assert_eq!(
            node_id_for_ek(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
