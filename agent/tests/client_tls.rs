//! The pinned-CA client against a real TLS server on 127.0.0.1 (tokio-rustls,
//! certificates from rcgen): right pin accepted, wrong pin / wrong CA / wrong
//! host name rejected before any request byte reaches the server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warden_agent::client::{Client, ClientError};
use warden_agent::config::{CaPin, ServerConfig};
use warden_protocol::hello::{EkPublic, HelloRequest, Inventory, PcrBank};

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
) -> (CertificateDer<'static>, KeyPair) {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "warden test server");
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &**issuer).unwrap();
    (cert.der().clone(), key)
}

fn pin_of(cert: &CertificateDer<'_>) -> CaPin {
    CaPin(Sha256::digest(cert.as_ref()).into())
}

struct TestServer {
    url: String,
    requests: Arc<AtomicUsize>,
}

/// A one-route HTTPS server: answers every request with `status` and `body`.
async fn serve(
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
    status: u16,
    body: String,
) -> TestServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            let body = body.clone();
            tokio::spawn(async move {
                // A handshake the client refuses ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let header_end = loop {
                    let n = tls.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
                assert!(head.starts_with("post /v1/hello "), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while buf.len() < header_end + len {
                    let n = tls.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed before the body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let req: HelloRequest = serde_json::from_slice(&buf[header_end..]).unwrap();
                assert_eq!(req.protocol, warden_protocol::PROTOCOL_VERSION);
                counter.fetch_add(1, Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                tls.write_all(resp.as_bytes()).await.unwrap();
                let _ = tls.shutdown().await;
            });
        }
    });
    TestServer { url, requests }
}

fn request() -> HelloRequest {
    HelloRequest {
        protocol: warden_protocol::PROTOCOL_VERSION,
        agent_version: "test".into(),
        uptime_ms: 1,
        ek: EkPublic {
            algorithm: "ecc-nist-p256".into(),
            public_key_der: vec![0x30, 1, 2],
            tpm_public: vec![1],
            certificate_der: None,
        },
        pcrs: PcrBank {
            algorithm: "sha256".into(),
            values: [(0u32, "00".repeat(32))].into_iter().collect(),
        },
        event_log: None,
        inventory: Inventory::default(),
    }
}

const OK_BODY: &str = r#"{"node_id":"abc","new_node":true}"#;

async fn hello(
    url: &str,
    pin: CaPin,
) -> Result<warden_protocol::hello::HelloResponse, ClientError> {
    let client = Client::new(&ServerConfig {
        url: url.to_string(),
        ca: pin,
    })
    .unwrap();
    client.hello(&request()).await
}

#[tokio::test]
async fn right_pin_is_accepted() {
    let ca = ca("warden test CA");
    let (cert, key) = leaf(&ca, &["127.0.0.1", "localhost"]);
    let server = serve(vec![cert, ca.der().clone()], &key, 200, OK_BODY.into()).await;
    let resp = hello(&server.url, pin_of(ca.der())).await.unwrap();
    assert_eq!(resp.node_id, "abc");
    assert!(resp.new_node);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn wrong_pin_is_rejected_and_names_what_was_presented() {
    let ca = ca("warden test CA");
    let (cert, key) = leaf(&ca, &["127.0.0.1"]);
    let presented = [pin_of(&cert), pin_of(ca.der())];
    let server = serve(vec![cert, ca.der().clone()], &key, 200, OK_BODY.into()).await;
    let wrong = CaPin([7u8; 32]);
    let err = hello(&server.url, wrong).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, ClientError::Transport { .. }), "{msg}");
    assert!(
        msg.contains(&format!(
            "server {} did not present the pinned CA {wrong}; it presented: {}, {}",
            server.url, presented[0], presented[1]
        )),
        "{msg}"
    );
    assert!(msg.contains(&format!("{}/v1/hello", server.url)), "{msg}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn pinned_ca_that_did_not_sign_the_leaf_is_rejected() {
    let real = ca("real CA");
    let other = ca("other CA");
    let (cert, key) = leaf(&real, &["127.0.0.1"]);
    // The server presents a CA matching the pin, but the leaf is not its.
    let server = serve(vec![cert, other.der().clone()], &key, 200, OK_BODY.into()).await;
    let err = hello(&server.url, pin_of(other.der())).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(!msg.contains("did not present"), "{msg}");
    assert!(msg.contains("not issued by the pinned CA"), "{msg}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn wrong_host_name_is_rejected() {
    let ca = ca("warden test CA");
    let (cert, key) = leaf(&ca, &["warden.example"]);
    let server = serve(vec![cert, ca.der().clone()], &key, 200, OK_BODY.into()).await;
    let err = hello(&server.url, pin_of(ca.der())).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("not valid for name"), "{msg}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn http_errors_carry_status_and_the_servers_message() {
    let ca = ca("warden test CA");
    let (cert, key) = leaf(&ca, &["127.0.0.1"]);
    let body = r#"{"error":"bad_request","field":"pcrs.values.7","message":"is not a lowercase hex SHA-256 digest"}"#;
    let server = serve(vec![cert, ca.der().clone()], &key, 400, body.into()).await;
    let err = hello(&server.url, pin_of(ca.der())).await.unwrap_err();
    match &err {
        ClientError::Status {
            status,
            message,
            url,
        } => {
            assert_eq!(*status, 400);
            assert!(
                message.contains("is not a lowercase hex SHA-256 digest"),
                "{message}"
            );
            assert!(message.contains("pcrs.values.7"), "{message}");
            assert_eq!(url, &format!("{}/v1/hello", server.url));
        }
        other => panic!("expected a status error, got {other}"),
    }
    assert!(err.is_permanent());
}

#[tokio::test]
async fn server_errors_are_retryable() {
    let ca = ca("warden test CA");
    let (cert, key) = leaf(&ca, &["127.0.0.1"]);
    let server = serve(vec![cert, ca.der().clone()], &key, 503, "busy".into()).await;
    let err = hello(&server.url, pin_of(ca.der())).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status: 503, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("busy"), "{err}");
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn refused_connection_names_the_url() {
    // Bind and drop to find a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let err = hello(&url, CaPin([0u8; 32])).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.starts_with(&format!("POST {url}/v1/hello: cannot connect")),
        "{msg}"
    );
    assert!(!err.is_permanent());
}
