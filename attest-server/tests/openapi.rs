//! The OpenAPI document against the code and the running server: every
//! `.route(...)` in `attest-server/src` is in `openapi.json`, every
//! documented route the code has is really served (not the router's
//! fallback), `/v1/openapi.json` serves the document, and `/metrics` is
//! Prometheus text that counts a real attestation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use warden_protocol::attest::{AttestRequest, Phase, Status, Verdict};
use warden_protocol::hello::{ApiError, PcrBank};

mod common;

use common::Server;

const DOC: &str = include_str!("../openapi.json");
const METHODS: [&str; 8] = [
    "get", "post", "put", "delete", "patch", "head", "options", "trace",
];

/// `(method, path)`, method lowercase as OpenAPI writes it.
type Route = (String, String);

// ---------------------------------------------------------------------
// The scanner: `.route("PATH", get(h).put(h2))` in Rust source.

/// The source with comments blanked (newlines kept), so a `.route(` in a
/// doc comment is not taken for a route. String literals are kept whole.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = string_end(b, i);
                out.push_str(&src[i..end]);
                i = end;
            }
            // A char literal holding a quote ('"') must not open a string.
            b'\'' if b.get(i + 1) == Some(&b'"') && b.get(i + 2) == Some(&b'\'') => {
                out.push_str("' '");
                i += 3;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = src[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
                out.extend(src[i..end].chars().filter(|&c| c == '\n'));
                i = end;
            }
            _ => {
                let c = src[i..].chars().next().unwrap();
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// Index just past the string literal starting at `start` (a `"`).
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// Every `(method, path)` routed in `src` (comments already stripped).
/// Panics, naming the file, on a route the scanner cannot read, so a new
/// way of writing routes cannot slip past the check unseen.
fn scan_routes(src: &str, file: &str) -> Vec<Route> {
    assert!(
        !src.contains(".nest("),
        "{file}: uses .nest(), which this scanner does not follow; teach tests/openapi.rs or route full paths"
    );
    let b = src.as_bytes();
    let mut routes = Vec::new();
    let mut from = 0;
    while from < b.len() {
        // Skip string literals: a ".route(" inside one is text.
        if b[from] == b'"' {
            from = string_end(b, from);
            continue;
        }
        if !b[from..].starts_with(b".route") {
            from += 1;
            continue;
        }
        let mut i = from + ".route".len();
        from = i;
        // `.route_layer(` and friends are not routes.
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b.get(i) != Some(&b'(') {
            continue;
        }
        i += 1;
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        assert_eq!(
            b[i],
            b'"',
            "{file}: a .route( whose path is not a string literal: {}",
            String::from_utf8_lossy(&b[i..(i + 60).min(b.len())])
        );
        let end = string_end(b, i);
        let path = src[i + 1..end - 1].to_owned();
        i = end;
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        assert_eq!(b[i], b',', "{file}: .route(\"{path}\" has no method router");
        i += 1;
        // The method router: identifiers followed by `(` at depth 0,
        // up to the `)` that closes `.route(`.
        let mut depth = 0usize;
        let mut methods = Vec::new();
        while i < b.len() {
            match b[i] {
                b'"' => {
                    i = string_end(b, i);
                    continue;
                }
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' if depth == 0 => break,
                b')' | b']' | b'}' => depth -= 1,
                c if depth == 0 && (c.is_ascii_alphabetic() || c == b'_') => {
                    let start = i;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                    let ident = &src[start..i];
                    let mut j = i;
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    let method = ident.strip_suffix("_service").unwrap_or(ident);
                    if b.get(j) == Some(&b'(') && METHODS.contains(&method) {
                        methods.push(method.to_owned());
                    }
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        assert!(
            !methods.is_empty(),
            "{file}: .route(\"{path}\", …): no get/post/put/… method router found"
        );
        routes.extend(methods.into_iter().map(|m| (m, path.clone())));
    }
    routes
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every route in `attest-server/src`.
fn routes_in_code() -> BTreeSet<Route> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut routes = BTreeSet::new();
    for file in files {
        // boot.rs routes /boot/ on its own plain-HTTP listener
        // (--boot-listen), not on the API this document describes.
        if file.file_name().is_some_and(|n| n == "boot.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.display().to_string();
        routes.extend(scan_routes(&strip_comments(&text), &name));
    }
    routes
}

/// Every `(method, path)` of the document.
fn routes_in_doc() -> BTreeSet<Route> {
    let doc: serde_json::Value = serde_json::from_str(DOC).unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.as_str()) {
                routes.insert((method.clone(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn scanner_reads_chained_and_multiline_routes() {
    let src = r#"
        // .route("/commented", get(nope))
        /* .route("/block", post(nope)) */
        let s = "a string with .route(\"/in-string\", get(x)) in it";
        Router::new()
            .route("/v1/a", get(a))
            .route(
                "/v1/b/{id}",
                axum::routing::get(b_get)
                    .put(b_put)
                    // a comment inside
                    .delete(b_delete),
            )
            .route("/v1/c", post_service(svc).layer(Layer::new(get_thing())))
            .route_layer(x)
    "#;
    let routes = scan_routes(&strip_comments(src), "sample");
    let got: Vec<(&str, &str)> = routes
        .iter()
        .map(|(m, p)| (m.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("get", "/v1/a"),
            ("get", "/v1/b/{id}"),
            ("put", "/v1/b/{id}"),
            ("delete", "/v1/b/{id}"),
            ("post", "/v1/c"),
        ]
    );
}

#[test]
fn every_route_in_the_code_is_documented() {
    let code = routes_in_code();
    assert!(
        code.contains(&("post".to_owned(), "/v1/attest".to_owned())),
        "the scanner found no /v1/attest: {code:?}"
    );
    let doc = routes_in_doc();
    let missing: Vec<String> = code
        .difference(&doc)
        .map(|(m, p)| format!("{} {p}", m.to_uppercase()))
        .collect();
    assert!(
        missing.is_empty(),
        "routes missing from attest-server/openapi.json:\n  {}",
        missing.join("\n  ")
    );
}

// ---------------------------------------------------------------------
// The live server.

/// What the router's fallbacks answer: an unknown path (404 "no such
/// endpoint", unlike a handler's own 404 that names the record) or a known
/// path with another method (405).
fn is_fallback(status: u16, body: &[u8]) -> bool {
    let Ok(err) = serde_json::from_slice::<ApiError>(body) else {
        return false;
    };
    (status == 404 && err.error == "not_found" && err.message == "no such endpoint")
        || (status == 405 && err.error == "method_not_allowed")
}

/// Sends `method path` with the admin token (and `{}` as a JSON body for
/// methods that take one); path parameters become a 64-hex-digit id.
async fn probe(
    http: &reqwest::Client,
    server: &Server,
    method: &str,
    path: &str,
) -> (u16, Vec<u8>) {
    let mut concrete = String::new();
    for (n, part) in path.split('{').enumerate() {
        if n == 0 {
            concrete.push_str(part);
        } else {
            let (_, rest) = part.split_once('}').unwrap();
            concrete.push_str(&"0".repeat(64));
            concrete.push_str(rest);
        }
    }
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
    let mut request = http
        .request(method.clone(), format!("{}{concrete}", server.url))
        .bearer_auth(&server.admin);
    if [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::PATCH,
    ]
    .contains(&method)
    {
        request = request
            .header("content-type", "application/json")
            .body("{}");
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

/// Checks the Prometheus text format line by line: comments, or
/// `name{labels} value`; returns the samples as (series, value).
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("metrics line without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("metrics line with a bad value: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(labels.ends_with('}'), "labels not closed in {line:?}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (key, value) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in {line:?}"
                );
                assert!(
                    value.len() >= 2 && value.starts_with('"') && value.ends_with('"'),
                    "label value not quoted in {line:?}"
                );
            }
        }
        samples.push((series.to_owned(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

/// An attestation from a node the server has never seen: well-formed, so
/// it is verified, stored and answered with a FAILED verdict.
fn unknown_node_attestation() -> AttestRequest {
    AttestRequest {
        protocol: warden_protocol::PROTOCOL_VERSION,
        node_id: "ab".repeat(32),
        ak_name: format!("000b{}", "cd".repeat(32)),
        nonce: vec![7; 32],
        quote: vec![1; 64],
        signature: vec![2; 64],
        pcrs: PcrBank {
            algorithm: "sha256".into(),
            values: (0..10u32).map(|i| (i, "00".repeat(32))).collect(),
        },
        event_log: None,
        phase: Phase::Boot,
        agent_log: Vec::new(),
    }
}

#[tokio::test]
async fn documented_routes_are_served_and_metrics_count() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let http = server.http.clone();

    // The fallbacks are what we think they are.
    let (status, body) = probe(&http, &server, "get", "/v1/no-such-route").await;
    assert!(
        is_fallback(status, &body),
        "{status} {}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = probe(&http, &server, "delete", "/v1/health").await;
    assert!(
        is_fallback(status, &body),
        "{status} {}",
        String::from_utf8_lossy(&body)
    );

    let code = routes_in_code();
    let doc = routes_in_doc();
    let mut not_routed = Vec::new();
    for (method, path) in &doc {
        let (status, body) = probe(&http, &server, method, path).await;
        let label = format!("{} {path}", method.to_uppercase());
        if code.contains(&(method.clone(), path.clone())) {
            assert!(
                !is_fallback(status, &body),
                "{label} is routed in the code but the server answers with its fallback ({status} {}); log:\n{}",
                String::from_utf8_lossy(&body),
                server.log()
            );
        } else if is_fallback(status, &body) {
            not_routed.push(label);
        } else {
            println!(
                "note: {label} is served ({status}) but tests/openapi.rs found no .route() for it"
            );
        }
    }
    if !not_routed.is_empty() {
        println!(
            "SKIP (documented, not routed yet; not checked): {}",
            not_routed.join(", ")
        );
    }

    // The document is served as is, without a token.
    let served = http
        .get(format!("{}/v1/openapi.json", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert!(served.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(served.text().await.unwrap(), DOC);

    // A real attestation (failing: the node is unknown) is counted.
    let metrics = || async {
        let response = http
            .get(format!("{}/metrics", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text")
                || content_type.starts_with("text/plain"),
            "{content_type}"
        );
        parse_metrics(&response.text().await.unwrap())
    };
    let series = r#"warden_attestations_total{phase="boot",status="failed"}"#;
    let before = sample(&metrics().await, series).unwrap_or(0.0);
    let response = http
        .post(format!("{}/v1/attest", server.url))
        .json(&unknown_node_attestation())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", server.log());
    let verdict: Verdict = response.json().await.unwrap();
    assert_eq!(verdict.status, Status::Failed);
    let after = metrics().await;
    assert_eq!(sample(&after, series), Some(before + 1.0), "{after:?}");
    assert_eq!(
        sample(
            &after,
            r#"warden_attestations_total{phase="boot",status="ok"}"#
        ),
        Some(0.0)
    );
    for series in [
        r#"warden_bytes_total{kind="erased"}"#,
        r#"warden_bytes_total{kind="written"}"#,
        r#"warden_bytes_total{kind="snapshotted"}"#,
        r#"warden_turnovers_total{outcome="done"}"#,
    ] {
        assert!(
            sample(&after, series).is_some(),
            "{series} missing: {after:?}"
        );
    }
}
