//! The image step: what a plan asks the agent to write onto a disk, and the
//! record of what the agent did.
//!
//! [`ImageRequest`] is the plan's word (URL, the checksum of the image *as
//! served*, an optional detached ed25519 signature, how to trust an HTTPS
//! server, the target disk); [`ImageRecord`] is the agent's answer, measured
//! and reported like the erase record, so its encoding is part of the
//! contract: field order is declaration order, no maps, no floats, and
//! renaming a field breaks readers. This module performs no I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The digest algorithms a plan may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    /// `sha256` or `sha512`.
    pub fn name(&self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(&self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 32,
            DigestAlgorithm::Sha512 => 64,
        }
    }
}

/// A digest with its algorithm; travels as `sha256:HEX` or `sha512:HEX`
/// (lowercase hex; upper case is accepted on input).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Checksum {
    pub algorithm: DigestAlgorithm,
    pub digest: Vec<u8>,
}

impl Checksum {
    /// The lowercase hex of the digest, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(&self.digest)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex())
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A checksum string that is not `sha256:HEX` or `sha512:HEX`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad checksum {0:?}: expected sha256:<64 hex digits> or sha512:<128 hex digits>")]
pub struct BadChecksum(pub String);

impl FromStr for Checksum {
    type Err = BadChecksum;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadChecksum(s.to_string());
        let (alg, hex_digits) = s.trim().split_once(':').ok_or_else(bad)?;
        let algorithm = match alg.to_ascii_lowercase().as_str() {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(bad()),
        };
        let digest = hex::decode(hex_digits.to_ascii_lowercase()).map_err(|_| bad())?;
        if digest.len() != algorithm.digest_len() {
            return Err(bad());
        }
        Ok(Checksum { algorithm, digest })
    }
}

impl TryFrom<String> for Checksum {
    type Error = BadChecksum;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Checksum> for String {
    fn from(c: Checksum) -> String {
        c.to_string()
    }
}

/// A detached ed25519 signature to check before the image may become bootable.
///
/// The signed message is the lowercase hex text of the served image's digest
/// (the algorithm of [`ImageRequest::checksum`], no prefix, no newline), so
/// an operator signs with standard tools (`docs/image.md`):
/// `printf %s "$(sha256sum img | cut -d' ' -f1)" > img.digest;
/// openssl pkeyutl -sign -inkey key.pem -rawin -in img.digest -out img.sig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureRequest {
    /// The 32-byte ed25519 public key, as 64 hex digits.
    pub public_key: String,
    /// Where the signature lives: 64 raw bytes, or their base64 or hex text.
    pub url: String,
}

/// A bmaptool block map (`.bmap`) for the image: only its mapped ranges are
/// written (the rest is zeros), each range's SHA-256 is checked on the way.
/// The bmap is not covered by the image's checksum, so it has its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmapRequest {
    pub url: String,
    /// The digest of the bmap file as served.
    pub checksum: Checksum,
}

/// How the agent trusts an `https://` image server. `http://` needs none:
/// integrity comes from the checksum, not the transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HttpsTrust {
    /// PEM certificates; any of them may anchor the server's chain.
    CaBundlePem(String),
    /// `sha256:HEX` of the DER of one CA certificate the server presents.
    PinnedCa(String),
}

/// What a plan asks the image step to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    /// `http://`, `https://` or (for tests and local media) `file://`.
    pub url: String,
    /// The digest of the image exactly as served (compressed bytes for a
    /// `.zst`, not the decompressed disk).
    pub checksum: Checksum,
    #[serde(default)]
    pub signature: Option<SignatureRequest>,
    #[serde(default)]
    pub https_trust: Option<HttpsTrust>,
    #[serde(default)]
    pub bmap: Option<BmapRequest>,
    /// The disk (block device or file) to write, e.g. `/dev/nvme0n1`.
    pub target: String,
    /// The target is known to read as zero everywhere (erased and verified,
    /// or zeroed by a method that guarantees zeros): zero runs of the image
    /// are then skipped instead of written.
    #[serde(default)]
    pub target_reads_zero: bool,
    /// Read back what was written (O_DIRECT) and compare its hash.
    #[serde(default)]
    pub verify_after_write: bool,
}

/// What container the served bytes were, detected by magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Gzip,
    Xz,
    Zstd,
}

impl ImageFormat {
    /// `raw`, `gzip`, `xz` or `zstd`.
    pub fn name(&self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Gzip => "gzip",
            ImageFormat::Xz => "xz",
            ImageFormat::Zstd => "zstd",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the decoded bytes are: the disk itself, or a qcow2 image of it
/// (detected by magic bytes, also inside a compressed container).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// `raw` or `qcow2`.
    pub fn name(&self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a signature was required, and so checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureStatus {
    NotRequired,
    /// The ed25519 signature over the digest verified with the plan's key.
    Verified,
}

/// What the image step did, once it succeeded (a failure is an error that
/// names URL, offset and expected vs got; it leaves no bootable header).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub url: String,
    pub target: String,
    pub format: ImageFormat,
    /// The disk's format inside the container.
    #[serde(default)]
    pub disk_format: DiskFormat,
    /// Size of the decoded disk image.
    pub image_bytes: u64,
    /// Bytes received from the server, counting any re-downloaded after a
    /// restart (equals the served size when nothing went wrong).
    pub bytes_served: u64,
    /// Bytes written to the target (including the held-back first MiB).
    pub bytes_written: u64,
    /// Zero bytes of the image not written because the target reads as zero.
    pub zero_bytes_skipped: u64,
    /// With a bmap: the bytes its ranges map (everything else was written
    /// as zeros or skipped).
    #[serde(default)]
    pub bmap_mapped_bytes: Option<u64>,
    /// The digest of the image as served, `sha256:HEX` / `sha512:HEX`;
    /// equal to the request's checksum.
    pub digest: String,
    pub signature: SignatureStatus,
    /// Downloads resumed with an HTTP Range request after a dropped connection.
    pub resumes: u32,
    /// Downloads restarted from byte 0 (the server ignored a Range request).
    pub restarts: u32,
    /// The written image was read back and its hash matched.
    pub verified_after_write: bool,
    /// Writes went through O_DIRECT (false where the target refused it).
    pub direct_io: bool,
    /// Wall time from the first request to the last byte served.
    pub download_ms: u64,
    /// Wall time of the read-back (0 when not asked for).
    pub verify_ms: u64,
    /// Wall time of the whole step.
    pub total_ms: u64,
    /// The CA(s) trusted for an `https://` image: lowercase hex SHA-256 of
    /// each CA certificate's DER (the pin itself for a pinned CA). Empty,
    /// and then absent from the JSON, for `http://` and `file://`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_sha256: Vec<String>,
}

impl ImageRecord {
    /// The exact bytes that are measured and reported (compact JSON, fields
    /// in declaration order).
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serializing plain strings, integers and enums cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_round_trip() {
        let hex64 = "ab".repeat(32);
        let c: Checksum = format!("SHA256:{}", hex64.to_uppercase()).parse().unwrap();
        assert_eq!(c.algorithm, DigestAlgorithm::Sha256);
        assert_eq!(c.to_string(), format!("sha256:{hex64}"));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, format!("\"sha256:{hex64}\""));
        assert_eq!(serde_json::from_str::<Checksum>(&json).unwrap(), c);
        let c512: Checksum = format!("sha512:{}", "01".repeat(64)).parse().unwrap();
        assert_eq!(c512.digest.len(), 64);
    }

    #[test]
    fn checksum_rejects_bad_input() {
        for bad in [
            "",
            "sha256",
            "md5:00",
            "sha256:zz",
            &format!("sha256:{}", "00".repeat(31)),
            &format!("sha512:{}", "00".repeat(32)),
        ] {
            assert!(bad.parse::<Checksum>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn request_from_json() {
        let json = format!(
            r#"{{"url":"https://img/x.raw.zst","checksum":"sha256:{}","target":"/dev/nvme0n1",
               "https_trust":{{"pinned_ca":"sha256:{}"}},"target_reads_zero":true}}"#,
            "00".repeat(32),
            "11".repeat(32)
        );
        let r: ImageRequest = serde_json::from_str(&json).unwrap();
        assert!(r.target_reads_zero);
        assert!(!r.verify_after_write);
        assert!(r.signature.is_none());
        assert!(matches!(r.https_trust, Some(HttpsTrust::PinnedCa(_))));
        assert!(
            serde_json::from_str::<ImageRequest>(r#"{"url":"x","checksum":"sha256:00"}"#).is_err()
        );
    }
}
