//! Wire types shared by the Warden agent and the Warden attestation server.
//!
//! This crate owns the shape of everything that crosses a boundary: the JSON
//! bodies of the HTTP API (`hello`, `nodes`) and the `WARDEN {json}` lines the
//! agent prints on the serial console (`console`). It performs no I/O and
//! must never depend on a TPM, a network or a file system, so both sides and
//! the test harness can use it anywhere.
//!
//! Binary fields travel as standard base64 and digests as lowercase hex; the
//! [`b64`] module holds the serde adapters.

pub mod agentlog;
pub mod attest;
pub mod b64;
pub mod ca;
pub mod console;
pub mod efi;
pub mod eventlog;
pub mod hello;
pub mod image;
pub mod nodes;
pub mod policy;
pub mod report;
pub mod snapshot;
pub mod tpm;
pub mod turnover;
pub mod wipe;

/// The version of the wire protocol this crate speaks. The server refuses a
/// `hello` whose `protocol` differs, with a message naming both.
pub const PROTOCOL_VERSION: u32 = 1;

/// Number of PCRs in a PC Client TPM 2.0 bank.
pub const PCR_COUNT: usize = 24;

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
