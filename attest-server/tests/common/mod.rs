//! What the server's integration tests share: starting the real
//! `warden-attest-server` binary on a free loopback port, and a [`Server`]
//! handle that talks to it over HTTPS as its admin. Helpers that only one
//! test file needs stay in that file (as `impl Server` blocks of its own).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use warden_attest_server::client::https_client;
use warden_attest_server::db::Db;
use warden_protocol::hello::{ApiError, Disk, EkPublic, HelloRequest, Inventory, PcrBank};

pub const SERVER: &str = env!("CARGO_BIN_EXE_warden-attest-server");

/// Starts the server on `data_dir` (stderr to `log`) and waits for its
/// `listening: URL` line; returns the process and the URL.
pub fn spawn_server(data_dir: &Path, log: &Path) -> (Child, String) {
    let mut child = Command::new(SERVER)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
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
    let url = loop {
        // A hang guard, not a timing assertion: start-up takes well under a second.
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!(
                    "server printed no listening line ({e}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        if let Some(url) = line.strip_prefix("listening: ") {
            break url.to_owned();
        }
    };
    (child, url)
}

/// A running server process (data in `DIR/data`, stderr in
/// `DIR/server.log`) with its admin token and an HTTPS client that trusts
/// its CA; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    pub data: PathBuf,
    log: PathBuf,
    pub admin: String,
    pub http: reqwest::Client,
}

/// One HTTP answer.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: not the expected JSON: {}", self.text()))
    }

    pub fn error(&self) -> ApiError {
        self.json()
    }
}

impl Server {
    /// Starts the server on `dir` and waits for its banner.
    pub fn start(dir: &Path) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let data = dir.join("data");
        let log = dir.join("server.log");
        let (child, url) = spawn_server(&data, &log);
        let admin = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let http = https_client(&std::fs::read(data.join("ca.pem")).unwrap()).unwrap();
        Server {
            child,
            url,
            data,
            log,
            admin,
            http,
        }
    }

    /// What the server has logged so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CA certificate the server made (and its HTTPS client trusts).
    pub fn ca(&self) -> PathBuf {
        self.data.join("ca.pem")
    }

    /// A second connection to the server's database.
    pub fn db(&self) -> Db {
        Db::open(&self.data.join("warden.db")).unwrap()
    }

    /// `method path` with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        Reply {
            status,
            body: response.bytes().await.unwrap().to_vec(),
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call("GET", path, Some(token), None).await
    }

    /// `POST path` of `body` as JSON with no token, as a node sends.
    pub async fn post_json<T: serde::Serialize>(&self, path: &str, body: &T) -> Reply {
        self.call(
            "POST",
            path,
            None,
            Some(&serde_json::to_value(body).unwrap()),
        )
        .await
    }

    /// A software node says hello: its EK the P-256 key `spki`, its one
    /// disk 1 GiB of virtio. Must answer 200; returns the node's id.
    pub async fn hello(&self, spki: &[u8], pcrs: PcrBank, event_log: Option<Vec<u8>>) -> String {
        let hello = HelloRequest {
            protocol: warden_protocol::PROTOCOL_VERSION,
            agent_version: "0.1.0-test".into(),
            uptime_ms: 1,
            ek: EkPublic {
                algorithm: "ecc-nist-p256".into(),
                public_key_der: spki.to_vec(),
                tpm_public: vec![0, 0x23, 0, 0x0b],
                certificate_der: None,
            },
            pcrs,
            event_log,
            inventory: Inventory {
                disks: vec![Disk {
                    name: "vda".into(),
                    path: "/dev/vda".into(),
                    size_bytes: 1 << 30,
                    logical_block_size: 512,
                    physical_block_size: 512,
                    transport: "virtio".into(),
                    ..Default::default()
                }],
                nics: vec![],
                lease: None,
            },
        };
        let reply = self.post_json("/v1/hello", &hello).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        warden_protocol::hello::node_id_for_ek(spki)
    }

    /// A call that must answer 200 or 204.
    pub async fn ok(&self, method: &str, path: &str, token: &str, body: Option<&Value>) -> Reply {
        let reply = self.call(method, path, Some(token), body).await;
        assert!(
            reply.status == 200 || reply.status == 204,
            "{method} {path}: {} {}\n{}",
            reply.status,
            reply.text(),
            self.log()
        );
        reply
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves the API router in this process, plain HTTP on 127.0.0.1, for
/// tests that set up the server's state directly; returns its address.
pub async fn serve_in_process(state: warden_attest_server::api::AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            warden_attest_server::api::router(state)
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// A bearer-token JSON client for a server started with
/// [`serve_in_process`]: every call gives the status and the body as JSON
/// (`Null` when the body is not JSON).
pub struct JsonApi {
    base: String,
    http: reqwest::Client,
    admin: String,
}

impl JsonApi {
    /// Talks plain HTTP to `addr`; `admin` is the token [`JsonApi::token`]
    /// creates tokens with.
    pub fn new(addr: std::net::SocketAddr, admin: &str) -> JsonApi {
        JsonApi {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            admin: admin.to_owned(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (reqwest::StatusCode, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// [`JsonApi::call`] that must succeed; returns the body.
    pub async fn ok(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, token, body).await;
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value
    }

    /// A new token of `role` for `project`, made by the admin.
    pub async fn token(&self, role: &str, project: &str) -> String {
        let body = serde_json::json!({"role": role, "project": project});
        let admin = self.admin.clone();
        let v = self.ok("POST", "/v1/tokens", &admin, Some(body)).await;
        v["token"].as_str().unwrap().to_owned()
    }
}
