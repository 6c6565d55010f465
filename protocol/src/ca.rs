//! CA certificates as a turnover plan carries them (issues #5 and #6): the
//! plan's `image_ca` (a `sha256:HEX` pin or PEM certificates) and
//! `snapshot_ca` (PEM certificates), read into what the agent's TLS clients
//! take, and the fingerprints the image and snapshot records keep so the
//! report shows which CA was trusted.
//!
//! Owns the text shape only: PEM framing, base64, "looks like DER", and
//! pins. It must never decide that a certificate is valid — X.509 parsing is
//! the server's check at plan time, chain building is the TLS stack's — and
//! performs no I/O.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::image::HttpsTrust;

/// Largest CA text a plan may carry (a bundle of a few certificates).
pub const MAX_CA_PEM: usize = 64 * 1024;
/// Most certificates one CA field may hold.
pub const MAX_CA_CERTS: usize = 16;

const BEGIN: &str = "-----BEGIN ";
const END: &str = "-----END ";
const DASHES: &str = "-----";

/// CA text that is not what the field takes; the message says why, and the
/// caller names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadCa {
    #[error("is not a pin (sha256:<64 hex digits>) or PEM CA certificates")]
    NotPinOrPem,
    #[error("is not PEM: no -----BEGIN CERTIFICATE----- block")]
    NotPem,
    #[error("is {0} bytes; at most {MAX_CA_PEM} are accepted")]
    TooLong(usize),
    #[error("holds more than {MAX_CA_CERTS} certificates")]
    TooMany,
    #[error("holds a {0} block; give only CA certificates")]
    NotACertificate(String),
    #[error("has a {0} block without its END line")]
    Unterminated(String),
    #[error("certificate {0}: the base64 inside the PEM block is not valid")]
    Base64(usize),
    #[error("certificate {0}: not a DER certificate (expected an ASN.1 SEQUENCE)")]
    NotDer(usize),
    #[error("{0:?} is not a pin: expected sha256:<64 hex digits>")]
    BadPin(String),
}

/// The DER of every `CERTIFICATE` block of `pem`, in order. Text outside
/// the blocks (what `openssl x509 -text` prints) is ignored; any other
/// block — above all a private key pasted by mistake — is refused.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, BadCa> {
    if pem.len() > MAX_CA_PEM {
        return Err(BadCa::TooLong(pem.len()));
    }
    let mut certs = Vec::new();
    let mut lines = pem.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix(BEGIN)
            .and_then(|l| l.strip_suffix(DASHES))
        else {
            continue;
        };
        if label != "CERTIFICATE" {
            return Err(BadCa::NotACertificate(label.to_string()));
        }
        if certs.len() == MAX_CA_CERTS {
            return Err(BadCa::TooMany);
        }
        let end = format!("{END}{label}{DASHES}");
        let mut body = String::new();
        let mut closed = false;
        for l in lines.by_ref() {
            if l == end {
                closed = true;
                break;
            }
            body.push_str(l);
        }
        if !closed {
            return Err(BadCa::Unterminated(label.to_string()));
        }
        let n = certs.len() + 1;
        let der = STANDARD
            .decode(body.as_bytes())
            .map_err(|_| BadCa::Base64(n))?;
        // Every X.509 certificate is one SEQUENCE; anything else is a
        // mislabelled block the TLS stack would refuse later, on the node.
        if der.first() != Some(&0x30) || der.len() < 64 {
            return Err(BadCa::NotDer(n));
        }
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(BadCa::NotPem);
    }
    Ok(certs)
}

/// Lowercase hex SHA-256 of the DER of each certificate of `pem` — the
/// fingerprint `openssl x509 -fingerprint -sha256` prints.
pub fn pem_sha256(pem: &str) -> Result<Vec<String>, BadCa> {
    Ok(pem_certificates(pem)?
        .iter()
        .map(|der| crate::sha256_hex(der))
        .collect())
}

/// The lowercase hex of a `sha256:HEX` pin.
pub fn parse_pin(pin: &str) -> Result<String, BadCa> {
    let bad = || BadCa::BadPin(pin.to_string());
    let hex_digits = pin.trim().strip_prefix("sha256:").ok_or_else(bad)?;
    if hex_digits.len() != 64 || !hex_digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(hex_digits.to_ascii_lowercase())
}

impl HttpsTrust {
    /// Reads a plan's `image_ca`: `sha256:HEX` is a pin of a CA certificate
    /// the image server presents (the meaning of `warden.image_ca`);
    /// anything with a `-----BEGIN` line is PEM CA certificates, any of
    /// which may anchor the server's chain.
    pub fn from_plan(value: &str) -> Result<HttpsTrust, BadCa> {
        let v = value.trim();
        if v.starts_with("sha256:") {
            return Ok(HttpsTrust::PinnedCa(format!("sha256:{}", parse_pin(v)?)));
        }
        if v.contains(BEGIN) {
            pem_certificates(value)?;
            return Ok(HttpsTrust::CaBundlePem(value.to_string()));
        }
        Err(BadCa::NotPinOrPem)
    }

    /// The lowercase hex SHA-256 of each CA certificate this trusts (the
    /// pin itself for a pinned CA); empty if the text does not parse, which
    /// a plan checked by [`HttpsTrust::from_plan`] never is.
    pub fn ca_sha256(&self) -> Vec<String> {
        match self {
            HttpsTrust::PinnedCa(pin) => parse_pin(pin).map(|p| vec![p]).unwrap_or_default(),
            HttpsTrust::CaBundlePem(pem) => pem_sha256(pem).unwrap_or_default(),
        }
    }
}

impl crate::image::ImageRequest {
    /// What the image record keeps in `ca_sha256`: the trusted CA(s) when
    /// the URL is `https://` (TLS is used), else nothing.
    pub fn trusted_ca_sha256(&self) -> Vec<String> {
        match &self.https_trust {
            Some(trust) if self.url.starts_with("https://") => trust.ca_sha256(),
            _ => Vec::new(),
        }
    }
}

impl crate::snapshot::SnapshotRequest {
    /// What the snapshot record keeps in `ca_sha256`: the certificates of
    /// `ca_pem` when the URI is `nbds://` (TLS is used), else nothing.
    pub fn trusted_ca_sha256(&self) -> Vec<String> {
        match &self.ca_pem {
            Some(pem) if self.uri.starts_with("nbds://") => pem_sha256(pem).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed PEM frame around DER-looking bytes (a SEQUENCE tag and
    /// filler): the framing is what this module checks.
    fn pem_of(der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let mut s = String::from("subject=CN = test\n-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(chunk).unwrap());
            s.push('\n');
        }
        s.push_str("-----END CERTIFICATE-----\n");
        s
    }

    fn der(seed: u8) -> Vec<u8> {
        let mut d = vec![0x30, 0x82, 0x01, 0x00];
        d.extend_from_slice(&[seed; 256]);
        d
    }

    #[test]
    fn bundles_parse_in_order_and_fingerprint_their_der() {
        let bundle = format!("{}{}", pem_of(&der(1)), pem_of(&der(2)));
        let certs = pem_certificates(&bundle).unwrap();
        assert_eq!(certs, vec![der(1), der(2)]);
        assert_eq!(
            pem_sha256(&bundle).unwrap(),
            vec![crate::sha256_hex(&der(1)), crate::sha256_hex(&der(2))]
        );
        // CRLF line ends, as a file from another system has them.
        let crlf = pem_of(&der(3)).replace('\n', "\r\n");
        assert_eq!(pem_certificates(&crlf).unwrap(), vec![der(3)]);
    }

    #[test]
    fn what_is_not_a_ca_certificate_is_refused_saying_why() {
        assert_eq!(pem_certificates("hello"), Err(BadCa::NotPem));
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            pem_certificates(key),
            Err(BadCa::NotACertificate("PRIVATE KEY".into()))
        );
        let open = "-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert_eq!(
            pem_certificates(open),
            Err(BadCa::Unterminated("CERTIFICATE".into()))
        );
        let junk = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_certificates(junk), Err(BadCa::Base64(1)));
        let not_der = pem_of(&[0x04; 100]);
        assert_eq!(pem_certificates(&not_der), Err(BadCa::NotDer(1)));
        let many: String = (0..=16u8).map(|i| pem_of(&der(i))).collect();
        assert_eq!(MAX_CA_CERTS, 16);
        assert_eq!(pem_certificates(&many), Err(BadCa::TooMany));
        let long = "x".repeat(MAX_CA_PEM + 1);
        assert_eq!(pem_certificates(&long), Err(BadCa::TooLong(MAX_CA_PEM + 1)));
    }

    #[test]
    fn image_ca_is_a_pin_or_pem() {
        let pin = format!("sha256:{}", "AB".repeat(32));
        let trust = HttpsTrust::from_plan(&pin).unwrap();
        assert_eq!(
            trust,
            HttpsTrust::PinnedCa(format!("sha256:{}", "ab".repeat(32)))
        );
        assert_eq!(trust.ca_sha256(), vec!["ab".repeat(32)]);
        let pem = pem_of(&der(7));
        let trust = HttpsTrust::from_plan(&pem).unwrap();
        assert_eq!(trust, HttpsTrust::CaBundlePem(pem.clone()));
        assert_eq!(trust.ca_sha256(), vec![crate::sha256_hex(&der(7))]);
        assert_eq!(
            HttpsTrust::from_plan("sha256:abcd"),
            Err(BadCa::BadPin("sha256:abcd".into()))
        );
        assert_eq!(
            HttpsTrust::from_plan("/etc/ssl/ca.pem"),
            Err(BadCa::NotPinOrPem)
        );
        assert!(HttpsTrust::from_plan("-----BEGIN CERTIFICATE-----\n").is_err());
    }
}
