//! The admin client behind `wardenctl`: an HTTPS client that trusts exactly
//! one CA, the calls it makes, and how their results are printed.
//!
//! This module owns what an operator sees. It must never fall back to the
//! system's trust store or skip certificate checks: the only CA it trusts is
//! the one in the file it is given.

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::StatusCode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use warden_protocol::attest::{
    AttestationList, EkRegistration, Policy, PolicyAssignment, PolicyList, PolicyRef, Verdict,
};
use warden_protocol::hello::ApiError;
use warden_protocol::nodes::NodeList;

use crate::server::ADMIN_TOKEN_FILE;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no admin token: pass --token-file FILE or set WARDEN_TOKEN")]
    NoToken,
    #[error("server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("building the HTTPS client: {0}")]
    Build(#[source] reqwest::Error),
    #[error("{url}: {hint}")]
    Request {
        url: String,
        hint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: the server refused the admin token (401 Unauthorized): {message}")]
    Unauthorized { url: String, message: String },
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
}

/// Reads the admin token: `token_file` if given, else `env_token`
/// (`WARDEN_TOKEN`), else `admin.token` next to the CA file (the layout of
/// the server's data directory, handy when running on the server itself).
pub fn resolve_token(
    token_file: Option<&Path>,
    env_token: Option<&str>,
    ca_file: &Path,
) -> Result<String, ClientError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|source| ClientError::TokenFile {
                path: path.to_owned(),
                source,
            })
    };
    if let Some(path) = token_file {
        return read(path);
    }
    if let Some(token) = env_token.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(token.to_owned());
    }
    let sibling = ca_file.with_file_name(ADMIN_TOKEN_FILE);
    if sibling.exists() {
        return read(&sibling);
    }
    Err(ClientError::NoToken)
}

/// An API client bound to one server and one trusted CA.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client for `server` (e.g. `https://127.0.0.1:8443`) trusting only
    /// the CA certificate(s) in the PEM file `ca_file`.
    pub fn new(server: &str, ca_file: &Path, token: Option<String>) -> Result<Self, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err(ClientError::BadUrl {
                url: server.to_owned(),
                reason: "must start with https://".into(),
            });
        }
        let pem = std::fs::read(ca_file).map_err(|e| ClientError::Ca {
            path: ca_file.to_owned(),
            reason: e.to_string(),
        })?;
        let http = https_client(&pem).map_err(|e| match e {
            ClientError::Ca { reason, .. } => ClientError::Ca {
                path: ca_file.to_owned(),
                reason,
            },
            other => other,
        })?;
        Ok(Client { base, http, token })
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<NodeList, ClientError> {
        self.get_json("/v1/nodes").await
    }

    /// `POST /v1/ek-allowlist`.
    pub async fn register_ek(&self, reg: &EkRegistration) -> Result<(), ClientError> {
        self.send(reqwest::Method::POST, "/v1/ek-allowlist", Some(reg))
            .await
            .map(drop)
    }

    /// `GET /v1/policies`.
    pub async fn policies(&self) -> Result<PolicyList, ClientError> {
        self.get_json("/v1/policies").await
    }

    /// `GET /v1/policies/{name}[?version=]`.
    pub async fn policy(&self, name: &str, version: Option<u32>) -> Result<Policy, ClientError> {
        let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
        self.get_json(&format!("/v1/policies/{}{query}", segment(name)))
            .await
    }

    /// `PUT /v1/policies/{name}`: stores the next version.
    pub async fn put_policy(&self, policy: &Policy) -> Result<PolicyRef, ClientError> {
        let response = self
            .send(
                reqwest::Method::PUT,
                &format!("/v1/policies/{}", segment(&policy.name)),
                Some(policy),
            )
            .await?;
        self.decode(response).await
    }

    /// `PUT /v1/nodes/{id}/policy` or `PUT /v1/groups/{group}/policy`.
    pub async fn assign_policy(
        &self,
        scope: PolicyScope<'_>,
        policy: &str,
    ) -> Result<(), ClientError> {
        let path = match scope {
            PolicyScope::Node(id) => format!("/v1/nodes/{}/policy", segment(id)),
            PolicyScope::Group(g) => format!("/v1/groups/{}/policy", segment(g)),
        };
        let body = PolicyAssignment {
            policy: policy.to_owned(),
        };
        self.send(reqwest::Method::PUT, &path, Some(&body))
            .await
            .map(drop)
    }

    /// `GET /v1/nodes/{id}/policy/learn`: a draft policy from the node's
    /// latest genuine attestation.
    pub async fn learn_policy(
        &self,
        node: &str,
        name: &str,
        pcrs: Option<&str>,
    ) -> Result<Policy, ClientError> {
        let mut path = format!(
            "/v1/nodes/{}/policy/learn?name={}",
            segment(node),
            segment(name)
        );
        if let Some(pcrs) = pcrs {
            path.push_str(&format!("&pcrs={}", segment(pcrs)));
        }
        self.get_json(&path).await
    }

    /// `GET /v1/attestations[?node=]`.
    pub async fn attestations(
        &self,
        node: Option<&str>,
        limit: u32,
    ) -> Result<AttestationList, ClientError> {
        let node = node
            .map(|n| format!("&node={}", segment(n)))
            .unwrap_or_default();
        self.get_json(&format!("/v1/attestations?limit={limit}{node}"))
            .await
    }

    /// `GET /v1/nodes/{id}/verdict`.
    pub async fn verdict(&self, node: &str) -> Result<Verdict, ClientError> {
        self.get_json(&format!("/v1/nodes/{}/verdict", segment(node)))
            .await
    }

    /// `GET /v1/keys`: the server's report-signing public keys (public: no
    /// token needed).
    pub async fn keys(&self) -> Result<warden_protocol::report::KeyList, ClientError> {
        self.get_json("/v1/keys").await
    }

    /// `GET /v1/nodes/{id}/report`: the node's latest signed handoff report,
    /// byte for byte as the server signed it (any re-encoding would break
    /// its verification).
    pub async fn report(&self, node: &str) -> Result<Vec<u8>, ClientError> {
        let response = self
            .send::<()>(
                reqwest::Method::GET,
                &format!("/v1/nodes/{}/report", segment(node)),
                None,
            )
            .await?;
        let url = response.url().to_string();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Request {
                url,
                hint: hint_for(&source),
                source,
            })?;
        Ok(bytes.to_vec())
    }

    /// `GET /v1/nodes/{id}/progress`: the node's turnover, step by step.
    pub async fn progress(
        &self,
        node: &str,
    ) -> Result<warden_protocol::turnover::ProgressView, ClientError> {
        self.get_json(&format!("/v1/nodes/{}/progress", segment(node)))
            .await
    }

    /// `GET /v1/nodes/{id}/console[?after=SEQ]`: console lines after `after`.
    pub async fn console(
        &self,
        node: &str,
        after: Option<i64>,
    ) -> Result<warden_protocol::turnover::ConsoleLog, ClientError> {
        let query = after.map(|a| format!("?after={a}")).unwrap_or_default();
        self.get_json(&format!("/v1/nodes/{}/console{query}", segment(node)))
            .await
    }

    /// `POST /v1/tokens` (admin): a new token for a role and project.
    pub async fn create_token(
        &self,
        request: &warden_protocol::turnover::TokenRequest,
    ) -> Result<warden_protocol::turnover::TokenCreated, ClientError> {
        let response = self
            .send(reqwest::Method::POST, "/v1/tokens", Some(request))
            .await?;
        self.decode(response).await
    }

    /// `PUT /v1/nodes/{id}/owner` (admin).
    pub async fn set_owner(&self, node: &str, owner: &str) -> Result<(), ClientError> {
        let body = warden_protocol::turnover::OwnerRequest {
            owner: owner.to_owned(),
        };
        self.send(
            reqwest::Method::PUT,
            &format!("/v1/nodes/{}/owner", segment(node)),
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// `POST /v1/nodes/{id}/release` (admin or the node's owner): ends the
    /// node's quarantine.
    pub async fn release(
        &self,
        node: &str,
    ) -> Result<warden_protocol::nodes::QuarantineRelease, ClientError> {
        let response = self
            .send::<()>(
                reqwest::Method::POST,
                &format!("/v1/nodes/{}/release", segment(node)),
                None,
            )
            .await?;
        self.decode(response).await
    }

    /// `POST /v1/nodes/{id}/turnover`: the plan for the node's next boot.
    pub async fn turnover(
        &self,
        node: &str,
        request: &warden_protocol::turnover::PlanRequest,
    ) -> Result<warden_protocol::turnover::Plan, ClientError> {
        let response = self
            .send(
                reqwest::Method::POST,
                &format!("/v1/nodes/{}/turnover", segment(node)),
                Some(request),
            )
            .await?;
        self.decode(response).await
    }

    /// `GET /v1/nodes/{id}/plan`: the node's newest plan.
    pub async fn plan(&self, node: &str) -> Result<warden_protocol::turnover::Plan, ClientError> {
        self.get_json(&format!("/v1/nodes/{}/plan", segment(node)))
            .await
    }

    /// `GET /v1/snapshots`: the snapshots this token may read.
    pub async fn snapshots(&self) -> Result<warden_protocol::turnover::SnapshotList, ClientError> {
        self.get_json("/v1/snapshots").await
    }

    /// `GET /v1/snapshots/{lease}`: one snapshot and its record.
    pub async fn snapshot(
        &self,
        lease: &str,
    ) -> Result<warden_protocol::turnover::SnapshotEntry, ClientError> {
        self.get_json(&format!("/v1/snapshots/{}", segment(lease)))
            .await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send::<()>(reqwest::Method::GET, path, None).await?;
        self.decode(response).await
    }

    async fn decode<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, ClientError> {
        let url = response.url().to_string();
        response
            .json::<T>()
            .await
            .map_err(|source| ClientError::Request {
                url,
                hint: hint_for(&source),
                source,
            })
    }

    /// Sends one request; a non-2xx reply becomes an error carrying the
    /// server's message.
    async fn send<B: serde::Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Request {
                url: url.clone(),
                hint: hint_for(&source),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.message)
            .unwrap_or(text);
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized { url, message });
        }
        Err(ClientError::Status {
            url,
            status,
            message,
        })
    }
}

/// Where a policy is assigned.
#[derive(Debug, Clone, Copy)]
pub enum PolicyScope<'a> {
    Node(&'a str),
    Group(&'a str),
}

/// Percent-encodes a URL path segment or query value (ids, names and PCR
/// lists are plain ASCII, but nothing an operator types may break the URL).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A reqwest client whose only trust anchors are the certificates in `ca_pem`.
pub fn https_client(ca_pem: &[u8]) -> Result<reqwest::Client, ClientError> {
    let ca_err = |reason: String| ClientError::Ca {
        path: PathBuf::new(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| ca_err(format!("not a PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ca_err("holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(ClientError::Build)
}

/// A short, actionable reading of a transport error (the full chain is
/// printed after it by the caller).
fn hint_for(err: &reqwest::Error) -> String {
    let tls_hint = |tls: &rustls::Error| match tls {
        rustls::Error::InvalidCertificate(why) => {
            format!("the server's certificate is not trusted by the given CA ({why:?})")
        }
        other => format!("TLS failed: {other}"),
    };
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return tls_hint(tls);
        }
        if let Some(mut io) = cause.downcast_ref::<std::io::Error>() {
            // tokio-rustls wraps the rustls error in an io::Error (and
            // reqwest wraps that in another), whose source() skips the
            // wrapped error: look inside by hand.
            loop {
                let inner = io.get_ref();
                if let Some(tls) = inner.and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    return tls_hint(tls);
                }
                match inner.and_then(|e| e.downcast_ref::<std::io::Error>()) {
                    Some(next) => io = next,
                    None => break,
                }
            }
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return "connection refused (is warden-attest-server running there?)".into()
                }
                std::io::ErrorKind::TimedOut => return "connection timed out".into(),
                _ => {}
            }
        }
        source = cause.source();
    }
    if err.is_timeout() {
        "request timed out".into()
    } else if err.is_connect() {
        "could not connect".into()
    } else if err.is_decode() {
        "the reply is not what this wardenctl expects".into()
    } else {
        "request failed".into()
    }
}

/// `1.5 GiB`, `512 B`: binary units, one decimal.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Precision loss is irrelevant for a human-readable size.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The default `wardenctl nodes` table.
pub fn format_nodes_table(list: &NodeList) -> String {
    let header = [
        "NODE",
        "EK",
        "DISKS",
        "NICS",
        "PCRS",
        "EVENT LOG",
        "LAST SEEN",
        "AGENT",
        "STATE",
    ]
    .map(str::to_owned);
    let mut rows = vec![header.to_vec()];
    for node in &list.nodes {
        let total: u64 = node.inventory.disks.iter().map(|d| d.size_bytes).sum();
        rows.push(vec![
            node.node_id.chars().take(16).collect(),
            node.ek_algorithm.clone(),
            format!("{} ({})", node.inventory.disks.len(), human_bytes(total)),
            node.inventory.nics.len().to_string(),
            node.pcrs.len().to_string(),
            format!("{} B", node.event_log_bytes),
            node.last_seen.clone(),
            node.agent_version.clone(),
            if node.quarantine.is_some() {
                "QUARANTINED".to_owned()
            } else {
                "-".to_owned()
            },
        ]);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    // rows[0] is the header; rows[i + 1] is list.nodes[i].
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        let quarantine = i
            .checked_sub(1)
            .and_then(|n| list.nodes.get(n))
            .and_then(|n| n.quarantine.as_ref());
        if let Some(q) = quarantine {
            out.push_str(&format_quarantine(q));
        }
    }
    if list.nodes.is_empty() {
        out.push_str("(no nodes yet)\n");
    }
    out
}

/// The line under a quarantined node's row in `wardenctl nodes`.
pub fn format_quarantine(q: &warden_protocol::nodes::Quarantine) -> String {
    format!(
        "  QUARANTINED since {} (attestation #{}): {}\n",
        q.since, q.attestation_id, q.reason
    )
}

/// `wardenctl node release NODE`: what was released.
pub fn format_release(r: &warden_protocol::nodes::QuarantineRelease) -> String {
    format!(
        "released node {} from quarantine (since {}, attestation #{}: {})\nreleased by {} at {}; its next boot is attested as usual\n",
        r.node_id,
        r.released.since,
        r.released.attestation_id,
        r.released.reason,
        r.released_by,
        r.released_at
    )
}

/// One line per reason, indented, for the verdict and attestation listings.
fn reason_lines(reasons: &[warden_protocol::attest::Reason]) -> String {
    reasons
        .iter()
        .map(|r| format!("    - {}\n", r.message))
        .collect()
}

fn status_word(status: warden_protocol::attest::Status) -> &'static str {
    match status {
        warden_protocol::attest::Status::Ok => "OK",
        warden_protocol::attest::Status::Failed => "FAILED",
    }
}

fn policy_label(policy: Option<&PolicyRef>) -> String {
    policy.map_or_else(|| "-".to_owned(), |p| format!("{} v{}", p.name, p.version))
}

/// `wardenctl verdict NODE`.
pub fn format_verdict(v: &Verdict) -> String {
    format!(
        "node {}\nverdict {} ({:?} attestation #{} at {}, policy {})\n{}",
        v.node_id,
        status_word(v.status),
        v.phase,
        v.attestation_id,
        v.time,
        policy_label(v.policy.as_ref()),
        reason_lines(&v.reasons)
    )
}

/// `wardenctl attestations`: one line per attestation, reasons below.
pub fn format_attestations(list: &AttestationList) -> String {
    let mut out =
        String::from("ID      TIME                  NODE              PHASE    STATUS  POLICY\n");
    for a in &list.attestations {
        let v = &a.verdict;
        out.push_str(&format!(
            "{:<7} {:<21} {:<17} {:<8} {:<7} {}\n",
            v.attestation_id,
            v.time,
            v.node_id.get(..16).unwrap_or(&v.node_id),
            format!("{:?}", v.phase).to_lowercase(),
            status_word(v.status),
            policy_label(v.policy.as_ref())
        ));
        out.push_str(&reason_lines(&v.reasons));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_protocol::hello::{Disk, Inventory, Nic};
    use warden_protocol::nodes::NodeSummary;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn table_shortens_ids_and_sums_disks() {
        let list = NodeList {
            nodes: vec![NodeSummary {
                node_id: "0123456789abcdef".repeat(4),
                ek_algorithm: "rsa2048".into(),
                first_seen: "2025-01-01T00:00:00Z".into(),
                last_seen: "2025-01-02T00:00:00Z".into(),
                hello_count: 2,
                agent_version: "0.1.0".into(),
                peer_address: "127.0.0.1:1".into(),
                pcrs: (0..24u32).map(|i| (i, "00".repeat(32))).collect(),
                event_log_bytes: 4096,
                inventory: Inventory {
                    disks: vec![
                        Disk {
                            size_bytes: 1 << 30,
                            ..Default::default()
                        },
                        Disk {
                            size_bytes: 1 << 31,
                            ..Default::default()
                        },
                    ],
                    nics: vec![Nic::default()],
                    lease: None,
                },
                owner: None,
                lessee: None,
                quarantine: None,
            }],
        };
        let table = format_nodes_table(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("NODE"));
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cells[0], "0123456789abcdef");
        assert!(lines[1].contains("2 (3.0 GiB)"), "{table}");
        assert!(lines[1].contains("4096 B"), "{table}");
        assert_eq!(cells.last(), Some(&"-"), "{table}");
        assert!(format_nodes_table(&NodeList { nodes: vec![] }).contains("no nodes"));

        // A quarantined node: marker in its row, the reason on the next line.
        let mut quarantined = list.clone();
        quarantined.nodes[0].quarantine = Some(warden_protocol::nodes::Quarantine {
            since: "2026-01-01T00:00:00Z".into(),
            attestation_id: 7,
            reason: "PCR7: SecureBoot changed from 0 to 1".into(),
        });
        quarantined.nodes.push(list.nodes[0].clone());
        let table = format_nodes_table(&quarantined);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].ends_with("QUARANTINED"), "{table}");
        assert_eq!(
            lines[2],
            "  QUARANTINED since 2026-01-01T00:00:00Z (attestation #7): PCR7: SecureBoot changed from 0 to 1"
        );
        assert!(lines[3].ends_with('-'), "{table}");
    }

    #[test]
    fn token_resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        assert!(matches!(
            resolve_token(None, None, &ca),
            Err(ClientError::NoToken)
        ));
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "sibling\n").unwrap();
        assert_eq!(resolve_token(None, None, &ca).unwrap(), "sibling");
        assert_eq!(resolve_token(None, Some("env"), &ca).unwrap(), "env");
        let file = dir.path().join("t");
        std::fs::write(&file, " explicit \n").unwrap();
        assert_eq!(
            resolve_token(Some(&file), Some("env"), &ca).unwrap(),
            "explicit"
        );
    }

    #[test]
    fn refuses_non_https_and_empty_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not pem").unwrap();
        assert!(matches!(
            Client::new("http://x", &ca, None),
            Err(ClientError::BadUrl { .. })
        ));
        let err = Client::new("https://x", &ca, None).unwrap_err();
        assert!(err.to_string().contains(&ca.display().to_string()), "{err}");
    }
}
