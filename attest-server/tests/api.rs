//! End to end: the real `warden-attest-server` and `wardenctl` binaries on
//! 127.0.0.1 with a temporary data directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use warden_attest_server::client::https_client;
use warden_protocol::hello::{
    ApiError, Disk, EkPublic, HelloRequest, HelloResponse, Inventory, Nic, PcrBank,
};
use warden_protocol::nodes::NodeList;

const SERVER: &str = env!("CARGO_BIN_EXE_warden-attest-server");
const WARDENCTL: &str = env!("CARGO_BIN_EXE_wardenctl");

/// A running server process; killed on drop.
struct Server {
    child: Child,
    fingerprint: String,
    url: String,
    token_file: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(data_dir: &Path, log: &Path, extra: &[&str]) -> Server {
        let log_file = std::fs::File::create(log).unwrap();
        let mut child = Command::new(SERVER)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut fingerprint, mut url, mut token_file) = (None, None, None);
        while url.is_none() {
            // A hang guard, not a timing assertion: start-up takes well under a second.
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|e| {
                    panic!(
                        "server printed no listening line ({e}); log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    )
                });
            if let Some(v) = line.strip_prefix("ca-fingerprint: ") {
                fingerprint = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("admin-token-file: ") {
                token_file = Some(PathBuf::from(v));
            } else if let Some(v) = line.strip_prefix("listening: ") {
                url = Some(v.to_owned());
            }
        }
        Server {
            child,
            fingerprint: fingerprint.expect("ca-fingerprint line before listening"),
            url: url.unwrap(),
            token_file: token_file.expect("admin-token-file line before listening"),
            log: log.to_owned(),
        }
    }

    /// SIGTERM and wait: the server must shut down cleanly.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(
            exit.success(),
            "server exited with {exit} after SIGTERM; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pcrs() -> PcrBank {
    PcrBank {
        algorithm: "sha256".into(),
        values: (0..24u32)
            .map(|i| (i, warden_protocol::sha256_hex(&i.to_le_bytes())))
            .collect(),
    }
}

fn hello(algorithm: &str, spki: Vec<u8>) -> HelloRequest {
    HelloRequest {
        protocol: warden_protocol::PROTOCOL_VERSION,
        agent_version: "0.1.0-test".into(),
        uptime_ms: 1500,
        ek: EkPublic {
            algorithm: algorithm.into(),
            public_key_der: spki,
            tpm_public: vec![0, 0x23, 0, 0x0b],
            certificate_der: None,
        },
        pcrs: pcrs(),
        event_log: Some(vec![0xee; 5000]),
        inventory: Inventory {
            disks: vec![
                Disk {
                    name: "vda".into(),
                    path: "/dev/vda".into(),
                    size_bytes: 8 << 30,
                    logical_block_size: 512,
                    physical_block_size: 512,
                    transport: "virtio".into(),
                    ..Default::default()
                },
                Disk {
                    name: "nvme0n1".into(),
                    path: "/dev/nvme0n1".into(),
                    size_bytes: 4 << 30,
                    logical_block_size: 4096,
                    physical_block_size: 4096,
                    transport: "nvme".into(),
                    serial: Some("n1".into()),
                    ..Default::default()
                },
            ],
            nics: vec![Nic {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                driver: Some("virtio_net".into()),
                link: true,
                speed_mbps: None,
            }],
            lease: None,
        },
    }
}

/// An RSA-2048 SPKI made by openssl, or None (and a loud note) without it.
fn openssl_rsa_spki(dir: &Path) -> Option<Vec<u8>> {
    let key = dir.join("rsa.pem");
    let spki = dir.join("rsa.der");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&spki)
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: the RSA-2048 EK case needs `openssl` on PATH");
        return None;
    }
    Some(std::fs::read(spki).unwrap())
}

async fn post_hello(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    content_type: &str,
) -> (u16, Vec<u8>) {
    let resp = http
        .post(format!("{url}/v1/hello"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

async fn list(http: &reqwest::Client, url: &str, token: &str) -> NodeList {
    let resp = http
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

fn wardenctl(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(WARDENCTL);
    cmd.args(args)
        .env_remove("WARDEN_TOKEN")
        .env_remove("WARDEN_SERVER")
        .env_remove("WARDEN_CA");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A TLS connection to the server naming it 10.0.2.2 — how a QEMU guest
/// names the host, so the certificate must carry it.
async fn tls_connect(
    url: &str,
    ca_der: &CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = url.strip_prefix("https://").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("10.0.2.2").unwrap(), tcp)
        .await
        .unwrap()
}

/// Announces a body over the limit without sending it: the server must
/// answer 413 from Content-Length alone. (Streaming 9 MiB instead makes the
/// client see a broken pipe when the server stops reading, before the reply.)
async fn oversized_hello(url: &str, ca_der: &CertificateDer<'static>) -> (u16, ApiError) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(url, ca_der).await;
    let head = format!(
        "POST /v1/hello HTTP/1.1\r\nHost: 10.0.2.2\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        9 << 20
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the headers and the whole (small) body are in.
    loop {
        // A hang guard, not a timing assertion.
        let n = tokio::time::timeout(Duration::from_secs(120), tls.read(&mut buf))
            .await
            .expect("no reply to an oversized hello")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a full reply: {}",
            String::from_utf8_lossy(&reply)
        );
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if reply.len() >= end + 4 + len {
                let status = text[9..12].parse().unwrap();
                let body: ApiError =
                    serde_json::from_slice(&reply[end + 4..end + 4 + len]).unwrap();
                return (status, body);
            }
        }
    }
}

#[tokio::test]
async fn hello_list_wardenctl_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &tmp.path().join("server1.log"), &[]);

    // Banner: the fingerprint is the SHA-256 of ca.pem's DER.
    let ca_file = data.join("ca.pem");
    let ca_der = CertificateDer::from_pem_file(&ca_file).unwrap();
    assert_eq!(
        server.fingerprint,
        format!("sha256:{}", warden_protocol::sha256_hex(&ca_der))
    );
    assert_eq!(server.token_file, data.join("admin.token"));
    let token = std::fs::read_to_string(&server.token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );

    // The chain is [server, CA], so an agent pinning the CA finds it.
    let tls = tls_connect(&server.url, &ca_der).await;
    let chain = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    drop(tls);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca_der);

    let http = https_client(&std::fs::read(&ca_file).unwrap()).unwrap();
    let url = server.url.clone();

    let health: serde_json::Value = http
        .get(format!("{url}/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, serde_json::json!({"status": "ok"}));

    // A valid hello from a P-256 EK.
    let p256 = rcgen::KeyPair::generate()
        .unwrap()
        .subject_public_key_info();
    let good = hello("ecc-nist-p256", p256.clone());
    let (status, body) = post_hello(
        &http,
        &url,
        serde_json::to_vec(&good).unwrap(),
        "application/json",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reply: HelloResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply.node_id, warden_protocol::hello::node_id_for_ek(&p256));
    assert!(reply.new_node);
    let p256_id = reply.node_id;

    // Malformed: a number where a digest belongs. 400 names the field.
    let mut bad = serde_json::to_value(&good).unwrap();
    bad["pcrs"]["values"]["7"] = serde_json::json!(7);
    let (status, body) = post_hello(
        &http,
        &url,
        bad.to_string().into_bytes(),
        "application/json",
    )
    .await;
    assert_eq!(status, 400);
    let err: ApiError = serde_json::from_slice(&body).unwrap();
    assert_eq!(err.error, "bad_request");
    assert_eq!(err.field.as_deref(), Some("pcrs.values.7"));

    // Semantically bad: a digest that is not hex.
    let mut bad = good.clone();
    bad.pcrs.values.insert(3, "nothex".into());
    let (status, body) = post_hello(
        &http,
        &url,
        serde_json::to_vec(&bad).unwrap(),
        "application/json",
    )
    .await;
    assert_eq!(status, 400);
    let err: ApiError = serde_json::from_slice(&body).unwrap();
    assert_eq!(err.field.as_deref(), Some("pcrs.values.3"));

    // Wrong algorithm: a P-256 key claimed as RSA, from a new key so that a
    // wrongly stored row would show up as a second node.
    let other = rcgen::KeyPair::generate()
        .unwrap()
        .subject_public_key_info();
    let wrong = hello("rsa2048", other);
    let (status, body) = post_hello(
        &http,
        &url,
        serde_json::to_vec(&wrong).unwrap(),
        "application/json",
    )
    .await;
    assert_eq!(status, 400);
    let err: ApiError = serde_json::from_slice(&body).unwrap();
    assert_eq!(err.field.as_deref(), Some("ek.public_key_der"));
    assert!(err.message.contains("not an RSA key"), "{}", err.message);

    // Not JSON, wrong content type, too large.
    let (status, body) = post_hello(&http, &url, b"hello?".to_vec(), "application/json").await;
    assert_eq!(status, 400);
    assert!(serde_json::from_slice::<ApiError>(&body)
        .unwrap()
        .message
        .contains("not valid JSON"));
    let (status, body) = post_hello(
        &http,
        &url,
        serde_json::to_vec(&good).unwrap(),
        "text/plain",
    )
    .await;
    assert_eq!(status, 400);
    assert!(serde_json::from_slice::<ApiError>(&body)
        .unwrap()
        .message
        .contains("Content-Type"));
    let (status, err) = oversized_hello(&url, &ca_der).await;
    assert_eq!(status, 413);
    assert_eq!(err.error, "payload_too_large");

    // Nothing of the refused hellos was stored.
    let nodes = list(&http, &url, &token).await;
    assert_eq!(nodes.nodes.len(), 1);
    assert_eq!(nodes.nodes[0].hello_count, 1);

    // An RSA-2048 EK, when openssl can make one.
    let rsa_id = match openssl_rsa_spki(tmp.path()) {
        Some(spki) => {
            let (status, body) = post_hello(
                &http,
                &url,
                serde_json::to_vec(&hello("rsa2048", spki.clone())).unwrap(),
                "application/json",
            )
            .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let reply: HelloResponse = serde_json::from_slice(&body).unwrap();
            assert_eq!(reply.node_id, warden_protocol::sha256_hex(&spki));
            Some(reply.node_id)
        }
        None => None,
    };
    let expected_nodes = 1 + usize::from(rsa_id.is_some());

    // Listing needs the token.
    let resp = http.get(format!("{url}/v1/nodes")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.json::<ApiError>().await.unwrap().error, "unauthorized");
    let resp = http
        .get(format!("{url}/v1/nodes"))
        .bearer_auth("0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // wardenctl nodes --json, token found next to ca.pem.
    let ca = ca_file.to_str().unwrap();
    let out = wardenctl(&["--server", &url, "--ca", ca, "nodes", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: NodeList = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.nodes.len(), expected_nodes);
    let node = listed.nodes.iter().find(|n| n.node_id == p256_id).unwrap();
    assert_eq!(node.ek_algorithm, "ecc-nist-p256");
    assert_eq!(node.pcrs, good.pcrs.values);
    assert_eq!(node.pcrs.len(), 24);
    assert_eq!(node.inventory.disks, good.inventory.disks);
    assert_eq!(node.inventory.nics, good.inventory.nics);
    assert_eq!(node.event_log_bytes, 5000);
    assert_eq!(node.agent_version, "0.1.0-test");
    assert!(
        node.peer_address.starts_with("127.0.0.1:"),
        "{}",
        node.peer_address
    );
    if let Some(rsa_id) = &rsa_id {
        let rsa = listed.nodes.iter().find(|n| &n.node_id == rsa_id).unwrap();
        assert_eq!(rsa.ek_algorithm, "rsa2048");
    }

    // The table, with the token from WARDEN_TOKEN and a CA copy elsewhere
    // (no sibling admin.token to fall back on).
    let elsewhere = tmp.path().join("client");
    std::fs::create_dir(&elsewhere).unwrap();
    let ca_copy = elsewhere.join("ca.pem");
    std::fs::copy(&ca_file, &ca_copy).unwrap();
    let ca_copy = ca_copy.to_str().unwrap();
    let out = wardenctl(
        &["--server", &url, "--ca", ca_copy, "nodes"],
        &[("WARDEN_TOKEN", &token)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table.contains(&p256_id[..16]) && !table.contains(&p256_id),
        "{table}"
    );
    assert!(table.contains("2 (12.0 GiB)"), "{table}");

    // Wrong token: non-zero exit, the message says 401 and names the URL.
    let out = wardenctl(
        &["--server", &url, "--ca", ca_copy, "nodes"],
        &[("WARDEN_TOKEN", "nope")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401") && stderr.contains(&url), "{stderr}");

    // A CA that did not sign the server: refused, and said so.
    let stranger = elsewhere.join("stranger.pem");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&stranger, params.self_signed(&key).unwrap().pem()).unwrap();
    let out = wardenctl(
        &[
            "--server",
            &url,
            "--ca",
            stranger.to_str().unwrap(),
            "nodes",
        ],
        &[("WARDEN_TOKEN", &token)],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not trusted"), "{stderr}");

    server.stop();

    // Nothing listens now: wardenctl says connection refused.
    let out = wardenctl(&["--server", &url, "--ca", ca, "nodes"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connection refused"), "{stderr}");

    // Restart on the same directory with an extra name: same CA, same nodes,
    // and the reissued certificate carries the new name.
    let server = Server::start(
        &data,
        &tmp.path().join("server2.log"),
        &["--san", "warden.test"],
    );
    let first_fingerprint = format!("sha256:{}", warden_protocol::sha256_hex(&ca_der));
    assert_eq!(server.fingerprint, first_fingerprint);
    let url = server.url.clone();
    let nodes = list(&http, &url, &token).await;
    assert_eq!(nodes.nodes.len(), expected_nodes);

    let (status, body) = post_hello(
        &http,
        &url,
        serde_json::to_vec(&good).unwrap(),
        "application/json",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reply: HelloResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply.node_id, p256_id);
    assert!(!reply.new_node);
    let nodes = list(&http, &url, &token).await;
    let node = nodes.nodes.iter().find(|n| n.node_id == p256_id).unwrap();
    assert_eq!(node.hello_count, 2);

    let server_pem = std::fs::read_to_string(data.join("server.pem")).unwrap();
    let server_der = CertificateDer::from_pem_slice(server_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&server_der).unwrap();
    let sans = warden_attest_server::pki::cert_sans(&cert);
    assert!(
        sans.contains("warden.test") && sans.contains("10.0.2.2"),
        "{sans:?}"
    );
    server.stop();
}
