//! The HTTP API: routes, request checking, authentication, error bodies.
//!
//! This module owns the mapping from HTTP to the records in [`crate::db`]:
//! `POST /v1/hello`, `GET /v1/nodes` (with each node's quarantine),
//! `GET /v1/health`. Every error reply
//! is an [`ApiError`] JSON body naming the field to blame when there is one.
//! It must never store anything from a request that failed any check, and
//! never let an unauthenticated caller read node records.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_path_to_error::Segment;
use warden_protocol::hello::{ApiError, HelloRequest, HelloResponse};
use warden_protocol::nodes::NodeList;

use crate::db::{self, Db, HelloMeta};
use crate::ek;
use crate::enroll::{Enrollments, ManufacturerCas};
use crate::nonces::NonceStore;

/// Lifetime of an attestation nonce unless the server is told otherwise.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(60);

/// Largest request body accepted (a 4 MiB event log is ~5.4 MiB in base64).
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub(crate) db: Arc<Mutex<Db>>,
    pub(crate) admin_token: Arc<str>,
    pub(crate) nonces: Arc<NonceStore>,
    pub(crate) enrollments: Arc<Enrollments>,
    pub(crate) cas: Arc<ManufacturerCas>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) live: Arc<crate::turnover_api::Live>,
    /// Signs handoff reports; its public half is at `GET /v1/keys`.
    pub(crate) report_key: Arc<crate::keys::ReportKey>,
}

// Hand-written so the admin token never ends up in a log line.
impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("admin_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over an open database; `admin_token` guards the node listing.
    pub fn new(db: Db, admin_token: String) -> Self {
        Self::with_attestation(db, admin_token, ManufacturerCas::none(), DEFAULT_NONCE_TTL)
    }

    /// State with the manufacturer CAs EK certificates must chain to and
    /// the lifetime of attestation nonces.
    pub fn with_attestation(
        db: Db,
        admin_token: String,
        cas: ManufacturerCas,
        nonce_ttl: Duration,
    ) -> Self {
        AppState {
            db: Arc::new(Mutex::new(db)),
            admin_token: admin_token.into(),
            nonces: Arc::new(NonceStore::new(nonce_ttl)),
            enrollments: Arc::new(Enrollments::default()),
            cas: Arc::new(cas),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            live: Arc::new(crate::turnover_api::Live::default()),
            report_key: Arc::new(crate::keys::ReportKey::ephemeral()),
        }
    }

    /// Signs reports with `key` (the data directory's) instead of the
    /// fresh in-memory key the constructors make.
    pub fn with_report_key(mut self, key: crate::keys::ReportKey) -> Self {
        self.report_key = Arc::new(key);
        self
    }

    /// The server's Prometheus metrics (served at `GET /metrics`).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Runs `f` on the database in a blocking task; `what` names the work
    /// in the error a client sees.
    pub(crate) async fn with_db<T, F>(&self, what: &'static str, f: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, crate::db::DbError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot have committed half a
            // transaction (SQLite rolls back), so the connection is usable.
            let mut guard = db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .map_err(|e| Failure::internal(format!("{what} failed: {e}")))?
        .map_err(|e| {
            tracing::error!(error = %e, what, "database error");
            Failure::internal(format!("{what} failed; see the server log"))
        })
    }
}

/// The API router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/hello", post(hello))
        .route("/v1/nodes", get(nodes))
        .route("/v1/health", get(health))
        .merge(crate::attest_api::routes())
        .merge(crate::keys::routes())
        .merge(crate::metrics::routes())
        .merge(crate::turnover_api::routes())
        .merge(crate::openapi::routes())
        .merge(crate::quarantine::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// An error reply: status plus [`ApiError`] body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: StatusCode,
    pub body: ApiError,
}

impl Failure {
    pub(crate) fn new(
        status: StatusCode,
        error: &str,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Failure {
            status,
            body: ApiError {
                error: error.to_owned(),
                field,
                message: message.into(),
            },
        }
    }

    pub(crate) fn bad_request(field: Option<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", field, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A hello that passed every check, with the id the server derived.
#[derive(Debug)]
pub struct CheckedHello {
    pub node_id: String,
    pub request: HelloRequest,
}

/// Checks a `POST /v1/hello` body: content type, JSON shape (errors name the
/// JSON path, e.g. `pcrs.values.7`), [`HelloRequest::validate`], and the EK
/// SPKI. Pure: touches neither network nor database.
pub fn check_hello(content_type: Option<&str>, body: &[u8]) -> Result<CheckedHello, Failure> {
    let request: HelloRequest = parse_json(content_type, body)?;
    request
        .validate()
        .map_err(|e| Failure::bad_request(Some(e.field.clone()), e.to_string()))?;
    let node_id = node_id_of(&request.ek)?;
    Ok(CheckedHello { node_id, request })
}

/// The node id of a submitted EK (SHA-256 of its SPKI, after checking the
/// key is what `ek.algorithm` says); a bad key is a 400 naming `ek.public_key_der`.
pub(crate) fn node_id_of(ek: &warden_protocol::hello::EkPublic) -> Result<String, Failure> {
    ek::node_id_from_ek(&ek.algorithm, &ek.public_key_der).map_err(|e| {
        Failure::bad_request(
            Some("ek.public_key_der".into()),
            format!("ek.public_key_der {e}"),
        )
    })
}

/// Parses a JSON request body of type `T`: the content type must be JSON,
/// and a type error names the JSON path (e.g. `pcrs.values.7`).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<T, Failure> {
    let is_json = content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Failure::bad_request(
            None,
            format!(
                "Content-Type must be application/json (got {})",
                content_type.map_or_else(|| "none".to_owned(), |ct| format!("{ct:?}"))
            ),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let request: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(request) => request,
        Err(err) => {
            let field = json_path(err.path());
            let inner = err.inner();
            return Err(if inner.is_syntax() || inner.is_eof() {
                Failure::bad_request(None, format!("request body is not valid JSON: {inner}"))
            } else {
                let message = match &field {
                    Some(field) => format!("{field}: {inner}"),
                    None => inner.to_string(),
                };
                Failure::bad_request(field, message)
            });
        }
    };
    de.end()
        .map_err(|e| Failure::bad_request(None, format!("request body is not valid JSON: {e}")))?;
    Ok(request)
}

/// The request's Content-Type, if it is readable.
pub(crate) fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// `a.b.7.c` in the same dotted form `HelloRequest::validate` uses; `None`
/// for the document root.
pub(crate) fn json_path(path: &serde_path_to_error::Path) -> Option<String> {
    let parts: Vec<String> = path
        .iter()
        .map(|segment| match segment {
            Segment::Seq { index } => index.to_string(),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => "?".to_owned(),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("."))
}

async fn hello(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Json<HelloResponse>, Failure> {
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            None,
            format!(
                "request body is larger than {} MiB",
                BODY_LIMIT / (1024 * 1024)
            ),
        )
    };
    // Refuse an announced oversize body before reading any of it.
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    let headers = request.headers().clone();
    // DefaultBodyLimit (see `router`) still bounds chunked bodies.
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|rejection: BytesRejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                Failure::bad_request(
                    None,
                    format!("could not read the request body: {}", rejection.body_text()),
                )
            }
        })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let checked = check_hello(content_type, &body).inspect_err(|failure| {
        tracing::warn!(%peer, field = failure.body.field.as_deref().unwrap_or("-"), message = %failure.body.message, "refused hello");
    })?;

    let received_at = db::now_rfc3339();
    let peer_address = peer.to_string();
    let db = state.db.clone();
    let CheckedHello { node_id, request } = checked;
    let (node_id, request, new_node) = tokio::task::spawn_blocking(move || {
        let meta = HelloMeta {
            node_id: &node_id,
            received_at: &received_at,
            peer_address: &peer_address,
        };
        let result = match db.lock() {
            Ok(mut db) => db.record_hello(&meta, &request),
            // A panic while holding the lock cannot have committed half a
            // transaction (SQLite rolls back), so the connection is usable.
            Err(poisoned) => poisoned.into_inner().record_hello(&meta, &request),
        };
        result.map(|new_node| (node_id, request, new_node))
    })
    .await
    .map_err(|e| Failure::internal(format!("storing the hello failed: {e}")))?
    .map_err(|e| {
        tracing::error!(error = %e, "storing a hello failed");
        Failure::internal("storing the hello failed; see the server log")
    })?;

    let disk_bytes: u64 = request.inventory.disks.iter().map(|d| d.size_bytes).sum();
    tracing::info!(
        node_id = %node_id,
        %peer,
        new_node,
        agent_version = %request.agent_version,
        ek = %request.ek.algorithm,
        disks = request.inventory.disks.len(),
        disk_bytes,
        nics = request.inventory.nics.len(),
        pcrs = request.pcrs.values.len(),
        event_log_bytes = request.event_log.as_ref().map_or(0, Vec::len),
        "hello"
    );
    Ok(Json(HelloResponse { node_id, new_node }))
}

async fn nodes(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<NodeList>, Failure> {
    let caller = crate::auth::Caller::from_headers(&state, &headers).await?;
    let mut list = state
        .with_db("listing nodes", |db| {
            let mut list = db.list_nodes()?;
            for node in &mut list.nodes {
                let roles = db.node_roles(&node.node_id)?;
                node.owner = roles.owner;
                node.lessee = roles.lessee;
                node.quarantine = db.quarantine_of(&node.node_id)?;
            }
            Ok(list)
        })
        .await?;
    // Owners and lessees see only their nodes.
    list.nodes.retain(|n| {
        let roles = db::NodeRoles {
            owner: n.owner.clone(),
            lessee: n.lessee.clone(),
        };
        caller.may_view(&n.node_id, &roles).is_ok()
    });
    Ok(Json(list))
}

/// Compares without an early exit, so response time does not reveal how
/// many leading characters of a guessed token were right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "not_found", None, "no such endpoint")
}

async fn method_not_allowed() -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        None,
        "this endpoint does not support that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{KeyPair, PublicKeyData};
    use serde_json::{json, Value};

    fn valid_json() -> Value {
        let spki = KeyPair::generate().unwrap().subject_public_key_info();
        json!({
            "protocol": warden_protocol::PROTOCOL_VERSION,
            "agent_version": "0.1.0",
            "uptime_ms": 10,
            "ek": {
                "algorithm": "ecc-nist-p256",
                "public_key_der": b64(&spki),
                "tpm_public": "AAEAAQ==",
            },
            "pcrs": {
                "algorithm": "sha256",
                "values": (0..24).map(|i| (i.to_string(), json!("ab".repeat(32)))).collect::<serde_json::Map<_, _>>(),
            },
            "inventory": { "disks": [{
                "name": "vda", "path": "/dev/vda", "size_bytes": 1u64 << 30,
                "logical_block_size": 512, "physical_block_size": 512,
                "rotational": false, "removable": false, "read_only": false,
                "transport": "virtio", "model": null, "serial": null,
                "discard_granularity": 0, "discard_max_bytes": 0, "write_zeroes_max_bytes": 0
            }], "nics": [] },
        })
    }

    fn b64(bytes: &[u8]) -> String {
        // Round-trip through the protocol's own adapter to stay in its format.
        #[derive(serde::Serialize)]
        struct W(#[serde(with = "warden_protocol::b64")] Vec<u8>);
        serde_json::to_value(W(bytes.to_vec()))
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn check(v: &Value) -> Result<CheckedHello, Failure> {
        check_hello(Some("application/json"), v.to_string().as_bytes())
    }

    #[test]
    fn valid_hello_yields_server_derived_id() {
        let v = valid_json();
        let checked = check(&v).unwrap();
        assert_eq!(
            checked.node_id,
            warden_protocol::hello::node_id_for_ek(&checked.request.ek.public_key_der)
        );
        check_hello(
            Some("Application/JSON; charset=utf-8"),
            v.to_string().as_bytes(),
        )
        .unwrap();
    }

    #[test]
    fn type_error_names_the_json_path() {
        let mut v = valid_json();
        v["pcrs"]["values"]["7"] = json!(7);
        let f = check(&v).unwrap_err();
        assert_eq!(f.status, StatusCode::BAD_REQUEST);
        assert_eq!(f.body.error, "bad_request");
        assert_eq!(f.body.field.as_deref(), Some("pcrs.values.7"));

        let mut v = valid_json();
        v["inventory"]["disks"][0]["size_bytes"] = json!("big");
        let f = check(&v).unwrap_err();
        assert_eq!(
            f.body.field.as_deref(),
            Some("inventory.disks.0.size_bytes")
        );

        let mut v = valid_json();
        v["ek"]["public_key_der"] = json!("!!!");
        let f = check(&v).unwrap_err();
        assert_eq!(f.body.field.as_deref(), Some("ek.public_key_der"));
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let mut v = valid_json();
        v["pcrs"]["values"]["7"] = json!("XYZ");
        assert_eq!(
            check(&v).unwrap_err().body.field.as_deref(),
            Some("pcrs.values.7")
        );

        let mut v = valid_json();
        v["ek"]["algorithm"] = json!("rsa2048");
        let f = check(&v).unwrap_err();
        assert_eq!(f.body.field.as_deref(), Some("ek.public_key_der"));
        assert!(
            f.body.message.contains("not an RSA key"),
            "{}",
            f.body.message
        );
    }

    #[test]
    fn non_json_and_wrong_content_type_are_clear() {
        let f = check_hello(Some("text/plain"), b"{}").unwrap_err();
        assert!(
            f.body.message.contains("Content-Type"),
            "{}",
            f.body.message
        );
        let f = check_hello(None, b"{}").unwrap_err();
        assert!(f.body.message.contains("got none"), "{}", f.body.message);
        let f = check_hello(Some("application/json"), b"hello there").unwrap_err();
        assert_eq!(f.body.field, None);
        assert!(
            f.body.message.contains("not valid JSON"),
            "{}",
            f.body.message
        );
        let body = format!("{} trailing", valid_json());
        let f = check_hello(Some("application/json"), body.as_bytes()).unwrap_err();
        assert!(
            f.body.message.contains("not valid JSON"),
            "{}",
            f.body.message
        );
        let f = check_hello(Some("application/json"), b"{\"protocol\": 1}").unwrap_err();
        assert!(
            f.body.message.contains("missing field"),
            "{}",
            f.body.message
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
