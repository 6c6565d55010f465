//! Serde adapters: `Vec<u8>` as standard base64 text.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serializer};

/// Serialize bytes as base64.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(bytes))
}

/// Deserialize base64 into bytes; the error says it was not base64.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    STANDARD
        .decode(text.as_bytes())
        .map_err(|e| serde::de::Error::custom(format!("not valid base64: {e}")))
}

/// The same, for `Option<Vec<u8>>` (absent or `null` means `None`).
pub mod option {
    use super::*;

    /// Serialize optional bytes as base64 or `null`.
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    /// Deserialize optional base64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            STANDARD
                .decode(t.as_bytes())
                .map_err(|e| serde::de::Error::custom(format!("not valid base64: {e}")))
        })
        .transpose()
    }
}

/// Encode bytes as base64 (for code that builds JSON by hand).
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}
