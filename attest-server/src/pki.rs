//! The server's own PKI: a private CA and the TLS server certificate it signs.
//!
//! This module owns `ca.pem`, `ca.key`, `server.pem` and `server.key` in the
//! data directory and the rustls `ServerConfig` built from them. Agents pin
//! the CA by the SHA-256 of its DER, so this module must never replace an
//! existing CA: if `ca.pem` is there but unusable it fails and says so. The
//! server certificate, by contrast, is cheap and is reissued from the same CA
//! whenever a required name is missing from it or it is about to expire.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// File names inside the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (PKCS#8 PEM, mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The TLS server certificate (PEM).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The TLS server certificate's private key (PKCS#8 PEM, mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// Names every server certificate carries: loopback in both families,
/// `localhost`, and 10.0.2.2 — the address under which a QEMU user-net
/// guest reaches the host.
pub const DEFAULT_SANS: &[&str] = &["127.0.0.1", "10.0.2.2", "localhost", "::1"];

const CA_VALIDITY_DAYS: i64 = 3650;
const SERVER_VALIDITY_DAYS: i64 = 397;
/// Reissue the server certificate when it has less than this left.
const SERVER_RENEW_DAYS: i64 = 30;

/// What can go wrong while loading or creating the PKI files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} exists but {missing} does not; refusing to create a new CA (agents pin the old one) — restore {missing} or move {path} away")]
    OrphanCa { path: PathBuf, missing: PathBuf },
    #[error("{0:?} is neither an IP address nor a valid DNS name")]
    BadName(String),
    #[error("generating {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The loaded PKI: everything the TLS listener and the startup banner need.
#[derive(Debug)]
pub struct Pki {
    /// DER of the CA certificate (its SHA-256 is what agents pin).
    pub ca_der: CertificateDer<'static>,
    /// DER of the server certificate.
    pub server_der: CertificateDer<'static>,
    server_key_pkcs8: Vec<u8>,
    /// True when this call created a new CA.
    pub created_ca: bool,
    /// True when this call issued a new server certificate.
    pub issued_server_cert: bool,
}

impl Pki {
    /// `sha256:<64 lowercase hex>` of the CA certificate's DER.
    pub fn ca_fingerprint(&self) -> String {
        format!("sha256:{}", warden_protocol::sha256_hex(&self.ca_der))
    }

    /// A rustls server configuration presenting `[server cert, CA cert]`:
    /// the agent looks for its pinned CA in the presented chain.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = vec![self.server_der.clone(), self.ca_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_pkcs8.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(config)
    }
}

/// The SANs a server certificate must carry: the defaults, the host name,
/// the listen IP when it is a specific address, and `extra`. Names are
/// normalized (IPs canonical, DNS names lowercase) and deduplicated.
pub fn required_sans(
    listen_ip: Option<IpAddr>,
    host_name: Option<&str>,
    extra: &[String],
) -> Result<BTreeSet<String>, PkiError> {
    let mut names = BTreeSet::new();
    for name in DEFAULT_SANS {
        names.insert(normalize_name(name)?);
    }
    if let Some(ip) = listen_ip.filter(|ip| !ip.is_unspecified()) {
        names.insert(ip.to_string());
    }
    // A host name that is not a valid DNS name (rare, but possible) is left
    // out rather than refusing to start: the operator can still pass --san.
    if let Some(Ok(host)) = host_name.map(normalize_name) {
        names.insert(host);
    }
    for name in extra {
        names.insert(normalize_name(name)?);
    }
    Ok(names)
}

/// This machine's host name, if the kernel reports one.
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && name != "(none)").then(|| name.to_owned())
}

fn normalize_name(name: &str) -> Result<String, PkiError> {
    let name = name.trim();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let lower = name.to_ascii_lowercase();
    let valid = !lower.is_empty()
        && lower.len() <= 253
        && lower.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(lower)
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

/// Loads the PKI from `dir`, creating the CA on first start and (re)issuing
/// the server certificate when it lacks one of `sans`, was not signed by this
/// CA, or expires within 30 days.
pub fn load_or_create(dir: &Path, sans: &BTreeSet<String>) -> Result<Pki, PkiError> {
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let (ca_pem, ca_key_pem, created_ca) = match (ca_cert_path.exists(), ca_key_path.exists()) {
        (true, true) => (read(&ca_cert_path)?, read(&ca_key_path)?, false),
        (true, false) => {
            return Err(PkiError::OrphanCa {
                path: ca_cert_path,
                missing: ca_key_path,
            })
        }
        // A key without its certificate is useless to anyone: start over.
        (false, _) => {
            let (cert_pem, key_pem) = generate_ca()?;
            // Key first: a crash in between leaves a key without a cert,
            // which the next start simply replaces.
            write_private(&ca_key_path, key_pem.as_bytes())?;
            write_public(&ca_cert_path, cert_pem.as_bytes())?;
            (cert_pem, key_pem, true)
        }
    };
    let ca_der = pem_to_der(&ca_cert_path, &ca_pem)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
        path: ca_key_path.clone(),
        reason: format!("not a usable private key: {e}"),
    })?;
    check_ca(&ca_cert_path, &ca_der, &ca_key)?;

    let server_cert_path = dir.join(SERVER_CERT_FILE);
    let server_key_path = dir.join(SERVER_KEY_FILE);
    let existing = if server_cert_path.exists() && server_key_path.exists() {
        let pem = read(&server_cert_path)?;
        let der = pem_to_der(&server_cert_path, &pem)?;
        let key_pem = read(&server_key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
            path: server_key_path.clone(),
            reason: format!("not a usable private key: {e}"),
        })?;
        Some((der, key))
    } else {
        None
    };

    let mut issued_server_cert = false;
    let (server_der, server_key) = match existing {
        Some((der, key)) => match server_cert_status(&server_cert_path, &der, &ca_der, sans)? {
            ServerCertStatus::Good => (der, key),
            ServerCertStatus::Reissue { keep_names, why } => {
                tracing::info!(cert = %server_cert_path.display(), why, "reissuing the server certificate");
                let all: BTreeSet<String> = sans.union(&keep_names).cloned().collect();
                issued_server_cert = true;
                issue_and_store(&ca_pem, ca_key, &all, &server_cert_path, &server_key_path)?
            }
        },
        None => {
            issued_server_cert = true;
            issue_and_store(&ca_pem, ca_key, sans, &server_cert_path, &server_key_path)?
        }
    };

    Ok(Pki {
        ca_der,
        server_der,
        server_key_pkcs8: server_key.serialize_der(),
        created_ca,
        issued_server_cert,
    })
}

fn generate_ca() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "the CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Warden");
    dn.push(DnType::CommonName, "Warden attestation server CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "the CA certificate",
            source,
        })?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn issue_and_store(
    ca_pem: &str,
    ca_key: KeyPair,
    sans: &BTreeSet<String>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(CertificateDer<'static>, KeyPair), PkiError> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(|source| PkiError::Generate {
        what: "an issuer from ca.pem",
        source,
    })?;
    // A fresh key with every issue: the serial and key never repeat.
    let key = KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "the server key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Warden");
    dn.push(DnType::CommonName, "warden-attest-server");
    params.distinguished_name = dn;
    params.subject_alt_names = sans
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| PkiError::BadName(name.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(SERVER_VALIDITY_DAYS);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate {
            what: "the server certificate",
            source,
        })?;
    write_private(key_path, key.serialize_pem().as_bytes())?;
    write_public(cert_path, cert.pem().as_bytes())?;
    Ok((cert.der().clone(), key))
}

enum ServerCertStatus {
    Good,
    Reissue {
        keep_names: BTreeSet<String>,
        why: String,
    },
}

fn server_cert_status(
    path: &Path,
    der: &[u8],
    ca_der: &[u8],
    sans: &BTreeSet<String>,
) -> Result<ServerCertStatus, PkiError> {
    let invalid = |reason: String| PkiError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    let (_, ca) = X509Certificate::from_der(ca_der)
        .map_err(|e| invalid(format!("CA is not an X.509 certificate: {e}")))?;
    let names = cert_sans(&cert);
    if cert.issuer().as_raw() != ca.subject().as_raw()
        || cert.verify_signature(Some(ca.public_key())).is_err()
    {
        return Ok(ServerCertStatus::Reissue {
            keep_names: names,
            why: "not signed by the current CA".into(),
        });
    }
    let renew_at = OffsetDateTime::now_utc() + Duration::days(SERVER_RENEW_DAYS);
    if cert.validity().not_after.to_datetime() < renew_at {
        return Ok(ServerCertStatus::Reissue {
            keep_names: names,
            why: "expires within 30 days".into(),
        });
    }
    let missing: Vec<&String> = sans.difference(&names).collect();
    if !missing.is_empty() {
        let why = format!("missing names {missing:?}");
        return Ok(ServerCertStatus::Reissue {
            keep_names: names,
            why,
        });
    }
    Ok(ServerCertStatus::Good)
}

/// The subject alternative names of `cert`, normalized like [`required_sans`].
pub fn cert_sans(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    names.insert(dns.to_ascii_lowercase());
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// Refuses a `ca.pem` that is not a CA or does not belong to `ca.key`:
/// signing server certificates with a mismatched pair would produce a chain
/// no agent can verify.
fn check_ca(path: &Path, ca_der: &[u8], ca_key: &KeyPair) -> Result<(), PkiError> {
    let invalid = |reason: String| PkiError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let (_, ca) = X509Certificate::from_der(ca_der)
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    if !ca.is_ca() {
        return Err(invalid(
            "is not a CA certificate (basicConstraints CA:false)".into(),
        ));
    }
    if ca.public_key().raw != ca_key.subject_public_key_info().as_slice() {
        return Err(invalid(format!(
            "does not match the private key in {CA_KEY_FILE}"
        )));
    }
    Ok(())
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes).map_err(|_| PkiError::Random)?;
    // Positive and non-zero as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Fills `buf` from the system CSPRNG (through ring's provider).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
}

fn pem_to_der(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Invalid {
        path: path.to_owned(),
        reason: format!("no PEM certificate: {e}"),
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` with mode 0600, through a temporary file and a
/// rename so a crash never leaves a truncated key behind.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, bytes, 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A stale temporary file from a crash may have other permissions.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sans(extra: &[&str]) -> BTreeSet<String> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        required_sans(
            Some("127.0.0.1".parse().unwrap()),
            Some("Node-Host"),
            &extra,
        )
        .unwrap()
    }

    fn verify_chain(pki: &Pki, name: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                &pki.server_der,
                std::slice::from_ref(&pki.ca_der),
                &server_name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn creates_ca_and_server_cert_with_sans_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let pki = load_or_create(dir.path(), &sans(&["attest.example", "192.0.2.7"])).unwrap();
        assert!(pki.created_ca && pki.issued_server_cert);

        let (_, cert) = X509Certificate::from_der(&pki.server_der).unwrap();
        let names = cert_sans(&cert);
        for want in [
            "127.0.0.1",
            "10.0.2.2",
            "localhost",
            "::1",
            "node-host",
            "attest.example",
            "192.0.2.7",
        ] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
        let (_, ca) = X509Certificate::from_der(&pki.ca_der).unwrap();
        assert!(ca.is_ca());
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign());

        for (file, mode) in [(CA_KEY_FILE, 0o600), (SERVER_KEY_FILE, 0o600)] {
            let meta = std::fs::metadata(dir.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }

        for name in [
            "127.0.0.1",
            "10.0.2.2",
            "localhost",
            "::1",
            "attest.example",
        ] {
            verify_chain(&pki, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify_chain(&pki, "other.example").is_err());
        pki.rustls_server_config().unwrap();
    }

    #[test]
    fn reuses_ca_and_reissues_only_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), &sans(&[])).unwrap();

        let again = load_or_create(dir.path(), &sans(&[])).unwrap();
        assert!(!again.created_ca && !again.issued_server_cert);
        assert_eq!(again.ca_fingerprint(), first.ca_fingerprint());
        assert_eq!(again.server_der, first.server_der);

        let more = load_or_create(dir.path(), &sans(&["extra.example"])).unwrap();
        assert!(!more.created_ca && more.issued_server_cert);
        assert_eq!(more.ca_fingerprint(), first.ca_fingerprint());
        verify_chain(&more, "extra.example").unwrap();

        // Dropping --san later keeps the name: the cert is a superset.
        let fewer = load_or_create(dir.path(), &sans(&[])).unwrap();
        assert!(!fewer.issued_server_cert);
        verify_chain(&fewer, "extra.example").unwrap();
    }

    #[test]
    fn refuses_ca_without_key_and_mismatched_key() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), &sans(&[])).unwrap();
        let key = std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap();

        // Another key: ca.pem no longer matches.
        std::fs::copy(
            dir.path().join(SERVER_KEY_FILE),
            dir.path().join(CA_KEY_FILE),
        )
        .unwrap();
        let err = load_or_create(dir.path(), &sans(&[])).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = load_or_create(dir.path(), &sans(&[])).unwrap_err();
        assert!(matches!(err, PkiError::OrphanCa { .. }), "{err}");

        std::fs::write(dir.path().join(CA_KEY_FILE), key).unwrap();
        load_or_create(dir.path(), &sans(&[])).unwrap();
    }

    #[test]
    fn rejects_bad_names() {
        assert!(required_sans(None, None, &["bad name".into()]).is_err());
        assert!(required_sans(None, None, &["-x.example".into()]).is_err());
        let names =
            required_sans(Some("0.0.0.0".parse().unwrap()), None, &["::0:1".into()]).unwrap();
        assert!(!names.contains("0.0.0.0"));
        assert!(names.contains("::1"));
    }
}
