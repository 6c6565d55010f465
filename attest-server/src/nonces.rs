//! Single-use attestation nonces with a short lifetime.
//!
//! This module owns the rule "a nonce is good for one attestation, by the
//! node it was issued to, within its TTL". Nonces live in memory only: a
//! restarted server has forgotten them and the agent simply asks again, and
//! nothing an attacker recorded before the restart can be replayed after it
//! (the new server never issued it). A used or expired nonce is remembered
//! for a while longer so that a replay is reported as a replay, not as an
//! unknown nonce.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use warden_protocol::attest::codes;

/// Bytes of entropy per nonce (the quote's qualifyingData holds up to 64).
pub const NONCE_LEN: usize = 32;

/// How long a used or expired nonce is still recognised, as a multiple of the TTL.
const REMEMBER_FACTOR: u32 = 20;

/// Most outstanding nonces kept: bounds memory under a flood of requests
/// (each entry is ~100 bytes); the oldest are dropped first.
const MAX_ENTRIES: usize = 200_000;

#[derive(Debug)]
struct Entry {
    node_id: String,
    issued: Instant,
    used: bool,
}

/// Why a nonce was refused: a [`codes`] value and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NonceError {
    pub code: &'static str,
    pub message: String,
}

/// The issued nonces.
#[derive(Debug)]
pub struct NonceStore {
    ttl: Duration,
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
}

impl NonceStore {
    /// A store whose nonces live `ttl`.
    pub fn new(ttl: Duration) -> NonceStore {
        NonceStore {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The lifetime of a nonce.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a fresh nonce for `node_id`.
    pub fn issue(&self, node_id: &str) -> Result<Vec<u8>, rustls::crypto::GetRandomFailed> {
        let mut nonce = vec![0u8; NONCE_LEN];
        crate::pki::random_bytes(&mut nonce)?;
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            let horizon = self.ttl * REMEMBER_FACTOR;
            entries.retain(|_, e| now.duration_since(e.issued) < horizon);
            if entries.len() >= MAX_ENTRIES {
                // Still full of live nonces: drop the oldest half.
                let mut ages: Vec<Instant> = entries.values().map(|e| e.issued).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                entries.retain(|_, e| e.issued > cut);
            }
        }
        entries.insert(
            nonce.clone(),
            Entry {
                node_id: node_id.to_owned(),
                issued: now,
                used: false,
            },
        );
        Ok(nonce)
    }

    /// Records a caller-chosen nonce as issued to `node_id` now. Not reachable
    /// over the API: for the verification benchmark, which must check
    /// pre-made quotes the same way the server checks fresh ones.
    pub fn register(&self, nonce: Vec<u8>, node_id: &str) {
        self.lock().insert(
            nonce,
            Entry {
                node_id: node_id.to_owned(),
                issued: Instant::now(),
                used: false,
            },
        );
    }

    /// Consumes `nonce` for `node_id`: Ok once, within the TTL, for the node
    /// it was issued to; every later call fails with `nonce-replayed`.
    pub fn take(&self, nonce: &[u8], node_id: &str) -> Result<(), NonceError> {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(nonce) else {
            return Err(NonceError {
                code: codes::NONCE_UNKNOWN,
                message: format!(
                    "nonce {} was not issued by this server (or was issued before it restarted): ask for a new one",
                    hex::encode(nonce)
                ),
            });
        };
        if entry.node_id != node_id {
            return Err(NonceError {
                code: codes::NONCE_OTHER_NODE,
                message: format!(
                    "nonce {} was issued to node {}, not to node {node_id}: evidence presented for another node",
                    hex::encode(nonce),
                    entry.node_id
                ),
            });
        }
        if entry.used {
            return Err(NonceError {
                code: codes::NONCE_REPLAYED,
                message: format!(
                    "nonce {} was already used: a replayed attestation",
                    hex::encode(nonce)
                ),
            });
        }
        entry.used = true;
        let age = entry.issued.elapsed();
        if age > self.ttl {
            return Err(NonceError {
                code: codes::NONCE_EXPIRED,
                message: format!(
                    "nonce {} expired: used {:.1} s after it was issued, its lifetime is {} s",
                    hex::encode(nonce),
                    age.as_secs_f64(),
                    self.ttl.as_secs()
                ),
            });
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Entry>> {
        // A panic while holding the lock leaves the map consistent (every
        // update is a single insert or field write).
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_good_once_for_its_node() {
        let store = NonceStore::new(Duration::from_secs(60));
        let n = store.issue("a").unwrap();
        assert_eq!(n.len(), NONCE_LEN);
        assert_eq!(
            store.take(&n, "b").unwrap_err().code,
            codes::NONCE_OTHER_NODE
        );
        store.take(&n, "a").unwrap();
        assert_eq!(store.take(&n, "a").unwrap_err().code, codes::NONCE_REPLAYED);
        assert_eq!(
            store.take(b"never issued", "a").unwrap_err().code,
            codes::NONCE_UNKNOWN
        );
        assert_ne!(store.issue("a").unwrap(), n);
    }

    #[test]
    fn an_expired_nonce_is_refused_as_expired() {
        let store = NonceStore::new(Duration::ZERO);
        let n = store.issue("a").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let err = store.take(&n, "a").unwrap_err();
        assert_eq!(err.code, codes::NONCE_EXPIRED, "{err}");
        assert!(err.message.contains("lifetime is 0 s"), "{err}");
    }
}
