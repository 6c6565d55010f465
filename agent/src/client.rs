//! Talks to the Warden attestation server over HTTPS, trusting exactly one CA:
//! the one whose certificate's SHA-256 was pinned on the command line.
//!
//! The server presents `[leaf, CA]`. [`PinnedCaVerifier`] finds the presented
//! certificate that matches the pin and verifies the leaf against it as the
//! only trust anchor (webpki: chain, validity, host name or IP). It must never
//! accept a connection whose chain does not contain the pinned CA, and never
//! fall back to system roots. Errors name the URL and the cause.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use warden_protocol::attest::{
    ActivateRequest, AttestRequest, EnrollChallenge, EnrollRequest, Enrolled, NonceRequest,
    NonceResponse, Verdict,
};
use warden_protocol::hello::{ApiError, HelloRequest, HelloResponse};
use warden_protocol::turnover::{ConsoleBatch, ProgressUpdate, SessionPlan, StepResult};

use crate::config::{CaPin, ServerConfig};

/// Largest reply body we read (a hello reply is a few hundred bytes, a
/// verdict a few KB).
const MAX_REPLY: usize = 1024 * 1024;

/// Installs rustls' ring provider as the process default. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// The server's chain does not contain the pinned CA.
#[derive(Debug, thiserror::Error)]
#[error("server {server} did not present the pinned CA {pin}; it presented: {presented}")]
pub struct PinMismatch {
    pub server: String,
    pub pin: CaPin,
    /// `sha256:a, sha256:b`
    pub presented: String,
}

/// A rustls verifier that trusts only the pinned CA, found among the
/// certificates the server presents.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    server: String,
    pin: CaPin,
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    /// `server` is only used in error messages.
    pub fn new(server: &str, pin: CaPin, provider: Arc<CryptoProvider>) -> PinnedCaVerifier {
        PinnedCaVerifier {
            server: server.to_string(),
            pin,
            provider,
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = std::iter::once(end_entity).chain(intermediates);
        let Some(ca) = presented.clone().find(|c| fingerprint(c) == self.pin.0) else {
            let presented = presented
                .map(|c| format!("sha256:{}", hex::encode(fingerprint(c))))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    server: self.server.clone(),
                    pin: self.pin,
                    presented,
                })),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| {
                    rustls::Error::General(format!("pinned CA of {}: {e}", self.server))
                })?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration that trusts only `server.ca`.
pub fn tls_config(server: &ServerConfig) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCaVerifier::new(&server.url, server.ca, provider.clone());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Why a request to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up HTTPS for {url}: {reason}")]
    Setup { url: String, reason: String },
    #[error("POST {url}: {cause}")]
    Transport { url: String, cause: String },
    #[error("POST {url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("POST {url}: unreadable reply: {reason}")]
    Reply { url: String, reason: String },
}

impl ClientError {
    /// True when trying again cannot help (the server refused the request
    /// itself, not a transient condition).
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Setup { .. } => true,
            ClientError::Status { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            ClientError::Transport { .. } | ClientError::Reply { .. } => false,
        }
    }
}

/// One error's message. rustls shows a custom certificate error with its
/// `Debug` form; dig out our own message (e.g. [`PinMismatch`]) instead.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    // hyper and tokio-rustls wrap the rustls error in one or more io::Errors.
    let mut inner: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = inner
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        inner = next;
    }
    let tls = inner.downcast_ref::<rustls::Error>();
    match tls {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) => {
            format!("TLS certificate rejected: {inner}")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "TLS certificate rejected: the server's certificate was not issued by the pinned CA (UnknownIssuer)".into()
        }
        _ => e.to_string(),
    }
}

/// The error and its sources on one line, skipping repeats (hyper and
/// reqwest wrap the same cause several times).
fn chain(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(err);
    while let Some(e) = cur {
        let s = describe(e);
        // hyper's "client error (Connect)" says less than `kind` below.
        if !s.starts_with("client error (") && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    if parts.is_empty() {
        format!("{kind}: {err}")
    } else {
        format!("{kind}: {}", parts.join(": "))
    }
}

/// An HTTPS client bound to one server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
}

impl Client {
    /// Builds a client that trusts only the pinned CA of `server`.
    pub fn new(server: &ServerConfig) -> Result<Client, ClientError> {
        install_crypto_provider();
        let setup = |reason: String| ClientError::Setup {
            url: server.url.clone(),
            reason,
        };
        let tls = tls_config(server).map_err(|e| setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            // The node talks to the server directly; a proxy variable in a
            // test environment must not reroute loopback traffic.
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("warden-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| setup(e.to_string()))?;
        Ok(Client {
            http,
            server: server.url.clone(),
        })
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// `POST {server}/v1/hello`.
    pub async fn hello(&self, req: &HelloRequest) -> Result<HelloResponse, ClientError> {
        self.post_json(&format!("{}/v1/hello", self.server), req)
            .await
    }

    /// `POST {server}/v1/enroll`: EK and a fresh AK in, a credential out.
    /// A 403 (`ek_untrusted`: the EK certificate does not chain to a trusted
    /// manufacturer CA and the EK is not registered) is permanent; its
    /// [`ClientError::Status`] message is the server's own words.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollChallenge, ClientError> {
        self.post_json(&format!("{}/v1/enroll", self.server), req)
            .await
    }

    /// `POST {server}/v1/enroll/activate`: the secret ActivateCredential
    /// recovered. A 403 (`ak_not_bound`) or 404 (challenge unknown or
    /// expired) is permanent for this challenge.
    pub async fn activate(&self, req: &ActivateRequest) -> Result<Enrolled, ClientError> {
        self.post_json(&format!("{}/v1/enroll/activate", self.server), req)
            .await
    }

    /// `POST {server}/v1/attest/nonce`: a single-use nonce and the PCRs to quote.
    pub async fn nonce(&self, req: &NonceRequest) -> Result<NonceResponse, ClientError> {
        self.post_json(&format!("{}/v1/attest/nonce", self.server), req)
            .await
    }

    /// `POST {server}/v1/attest`: the evidence in, the server's verdict out.
    /// A failed verdict is a successful call (HTTP 200): the caller decides
    /// what a [`warden_protocol::attest::Status::Failed`] means.
    pub async fn attest(&self, req: &AttestRequest) -> Result<Verdict, ClientError> {
        self.post_json(&format!("{}/v1/attest", self.server), req)
            .await
    }

    /// `GET {server}/v1/session/plan`: the plan of this session's turnover,
    /// or `None` when the server has none for this node (204).
    pub async fn session_plan(&self, session: &str) -> Result<Option<SessionPlan>, ClientError> {
        let url = format!("{}/v1/session/plan", self.server);
        let bytes = self
            .call::<()>(reqwest::Method::GET, &url, None, Some(session))
            .await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        decode(&url, &bytes).map(Some)
    }

    /// `POST {server}/v1/session/progress`.
    pub async fn session_progress(
        &self,
        session: &str,
        update: &ProgressUpdate,
    ) -> Result<(), ClientError> {
        let url = format!("{}/v1/session/progress", self.server);
        self.call(reqwest::Method::POST, &url, Some(update), Some(session))
            .await
            .map(drop)
    }

    /// `POST {server}/v1/session/console`.
    pub async fn session_console(
        &self,
        session: &str,
        batch: &ConsoleBatch,
    ) -> Result<(), ClientError> {
        let url = format!("{}/v1/session/console", self.server);
        self.call(reqwest::Method::POST, &url, Some(batch), Some(session))
            .await
            .map(drop)
    }

    /// `POST {server}/v1/session/steps`: a step ended. The next step starts
    /// only after this succeeded, so the server always knows what was done.
    pub async fn session_step(&self, session: &str, step: &StepResult) -> Result<(), ClientError> {
        let url = format!("{}/v1/session/steps", self.server);
        self.call(reqwest::Method::POST, &url, Some(step), Some(session))
            .await
            .map(drop)
    }

    async fn post_json<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let bytes = self
            .call(reqwest::Method::POST, url, Some(body), None)
            .await?;
        decode(url, &bytes)
    }

    /// One request; the reply body when the status is 2xx, else the
    /// server's message as [`ClientError::Status`].
    async fn call<Req: serde::Serialize>(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Req>,
        bearer: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let transport = |e: reqwest::Error| ClientError::Transport {
            url: url.to_string(),
            cause: chain(&e),
        };
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let mut resp = request.send().await.map_err(transport)?;
        let status = resp.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > MAX_REPLY {
                return Err(ClientError::Reply {
                    url: url.to_string(),
                    reason: format!("reply is larger than {MAX_REPLY} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let message = match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(api) => match api.field {
                    Some(field) => format!("{} ({}: {})", api.message, api.error, field),
                    None => format!("{} ({})", api.message, api.error),
                },
                Err(_) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let text: String = text.chars().take(200).collect();
                    if text.trim().is_empty() {
                        status
                            .canonical_reason()
                            .unwrap_or("no message")
                            .to_string()
                    } else {
                        text.trim().to_string()
                    }
                }
            };
            return Err(ClientError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes)
    }
}

fn decode<T: serde::de::DeserializeOwned>(url: &str, bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Reply {
        url: url.to_string(),
        reason: e.to_string(),
    })
}
