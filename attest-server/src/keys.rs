//! The server's report-signing key and `GET /v1/keys`, where anyone can
//! fetch its public half.
//!
//! Owns: the key file (`report-signing.key` in the data directory: the raw
//! 32-byte ed25519 seed, mode 0600), generating a key, signing a
//! [`Report`], and the public key list. It must never log, print or serve
//! the private half, and never load a key file other users could read.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use warden_protocol::report::{
    self, KeyList, PublicKey, Report, SignedReport, SigningKey, VerifyingKey,
};

use crate::api::AppState;

/// The key file's name inside the data directory.
pub const REPORT_KEY_FILE: &str = "report-signing.key";

/// What can go wrong with the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("report signing key {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("report signing key {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("report signing key: the system random number generator failed")]
    Random,
}

/// The ed25519 key the server signs handoff reports with.
#[derive(Clone)]
pub struct ReportKey {
    signing: SigningKey,
    key_id: String,
}

// Hand-written so the private key never ends up in a log line.
impl std::fmt::Debug for ReportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ReportKey {
    /// A key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let key_id = report::key_id(&signing.verifying_key());
        ReportKey { signing, key_id }
    }

    /// A fresh key from the system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        crate::pki::random_bytes(&mut seed).map_err(|_| KeyError::Random)?;
        Ok(Self::from_seed(&seed))
    }

    /// A fresh key for a state built without one (tests, embedded use).
    /// Without a working system random number generator the server can
    /// issue neither nonces nor keys, so this stops the process rather than
    /// sign with a guessable key.
    pub fn ephemeral() -> Self {
        match Self::generate() {
            Ok(key) => key,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a report signing key; stopping");
                std::process::abort()
            }
        }
    }

    /// Loads the key at `path`, or creates it (mode 0600) if there is none.
    /// Refuses a file that is not exactly 32 bytes or that group or others
    /// may read or write.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| KeyError::Invalid {
            path: path.to_owned(),
            reason,
        };
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(invalid(format!(
                        "mode {mode:o} lets other users read it; it must be 0600 (chmod 600, or delete it to make a new key)"
                    )));
                }
                let bytes = std::fs::read(path).map_err(io)?;
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    invalid(format!(
                        "{} bytes; a key file holds exactly 32 (the raw ed25519 seed)",
                        bytes.len()
                    ))
                })?;
                Ok(Self::from_seed(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                crate::pki::write_private(path, key.signing.as_bytes())
                    .map_err(|e| invalid(format!("cannot write a new key: {e}")))?;
                tracing::info!(path = %path.display(), key_id = %key.key_id, "created the report signing key");
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// First 16 hex digits of SHA-256 of the public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Signs `report`; the file to hand out is
    /// [`SignedReport::to_file_bytes`] of the result.
    pub fn sign(&self, report: Report) -> SignedReport {
        report::sign(report, &self.signing)
    }

    /// What `GET /v1/keys` serves.
    pub fn key_list(&self) -> KeyList {
        KeyList {
            keys: vec![PublicKey::from(&self.verifying_key())],
        }
    }
}

/// `GET /v1/keys`: public, no authentication (a tenant needs it to check a
/// report).
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/keys", get(keys))
}

async fn keys(State(state): State<AppState>) -> Json<KeyList> {
    Json(state.report_key.key_list())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_0600_and_reloaded_as_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPORT_KEY_FILE);
        let first = ReportKey::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let again = ReportKey::load_or_create(&path).unwrap();
        assert_eq!(again.key_id(), first.key_id());
        assert_eq!(again.verifying_key(), first.verifying_key());
        assert_eq!(first.key_id().len(), 16);
        assert!(!format!("{first:?}").contains(&hex::encode(first.signing.as_bytes())));
    }

    #[test]
    fn refuses_a_readable_or_wrong_sized_file_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPORT_KEY_FILE);
        ReportKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ReportKey::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("644"), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [7u8; 31]).unwrap();
        let err = ReportKey::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("31 bytes"), "{err}");
    }

    #[test]
    fn generated_keys_differ_and_sign_verifiably() {
        let a = ReportKey::generate().unwrap();
        let b = ReportKey::generate().unwrap();
        assert_ne!(a.key_id(), b.key_id());
        let list = a.key_list();
        assert_eq!(list.keys.len(), 1);
        assert_eq!(list.keys[0].key_id, a.key_id());
        assert_eq!(list.keys[0].to_verifying_key().unwrap(), a.verifying_key());
    }
}
