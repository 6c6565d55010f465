//! `GET /v1/openapi.json`: the hand-written OpenAPI 3.1 document of the
//! server's API (`attest-server/openapi.json`, compiled in).
//!
//! This module owns serving that document. It must never build the
//! document from the router at run time (the document is the reviewed
//! contract; `tests/openapi.rs` checks the two agree) and never require a
//! token: describing the API reveals no record.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::AppState;

/// The document, byte for byte as reviewed.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// The route of this module, merged into [`crate::api::router`].
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/openapi.json", get(serve_openapi))
}

async fn serve_openapi() -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_JSON,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_is_openapi_3_1_with_resolvable_schema_refs() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        // Every $ref names a schema that exists, and every security
        // requirement a scheme that exists.
        let text = OPENAPI_JSON;
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        let paths = doc["paths"].as_object().unwrap();
        assert!(!paths.is_empty());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path} has no summary"
                );
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path} has no responses"
                );
                let security = op["security"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path} does not say its security"));
                for requirement in security {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert!(schemes.contains_key(scheme), "{method} {path}: {scheme}");
                    }
                }
                // Path parameters are declared.
                for param in path.split('{').skip(1) {
                    let name = param.split('}').next().unwrap();
                    let declared = op["parameters"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| p["name"] == name && p["in"] == "path")
                    });
                    assert!(declared, "{method} {path}: parameter {name} not declared");
                }
            }
        }
    }

    #[test]
    fn security_matches_who_calls() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let security = |path: &str, method: &str| -> Vec<String> {
            doc["paths"][path][method]["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} missing"))
                .iter()
                .flat_map(|r| r.as_object().unwrap().keys().cloned())
                .collect()
        };
        for (path, method) in [
            ("/v1/hello", "post"),
            ("/v1/enroll", "post"),
            ("/v1/enroll/activate", "post"),
            ("/v1/attest/nonce", "post"),
            ("/v1/attest", "post"),
            ("/v1/health", "get"),
            ("/v1/keys", "get"),
            ("/v1/openapi.json", "get"),
            ("/metrics", "get"),
        ] {
            assert!(security(path, method).is_empty(), "{method} {path}");
        }
        let paths = doc["paths"].as_object().unwrap();
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                let s = security(path, method);
                if path.starts_with("/v1/session/") {
                    assert_eq!(s, ["sessionToken"], "{method} {path}");
                } else if path.starts_with("/v1/nodes")
                    || path.starts_with("/v1/policies")
                    || path.starts_with("/v1/groups")
                    || path.starts_with("/v1/snapshots")
                    || path == "/v1/attestations"
                    || path == "/v1/tokens"
                    || path == "/v1/ek-allowlist"
                {
                    assert_eq!(s, ["operatorToken"], "{method} {path}");
                }
            }
        }
    }
}
