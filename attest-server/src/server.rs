//! Starting the server: data directory, PKI, admin token, database, socket.
//!
//! This module owns the layout of the data directory and the order of
//! start-up; [`prepare`] does everything that can fail before the first
//! request (so the binary can print its banner only once the socket is
//! bound) and [`Prepared::serve`] runs the HTTPS listener until shutdown.
//! It must never print: the binary owns stdout, whose lines are a contract.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;

use crate::api::{self, AppState};
use crate::db::{Db, DbError, DB_FILE};
use crate::enroll::ManufacturerCas;
use crate::pki::{self, PkiError};

/// The admin token's file name inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What the operator chose on the command line.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Created (mode 0700) if missing.
    pub data_dir: PathBuf,
    /// `ip:port`; port 0 picks a free port (see [`Prepared::local_addr`]).
    pub listen: SocketAddr,
    /// Extra names or IPs for the server certificate.
    pub extra_sans: Vec<String>,
    /// Directory of manufacturer CA certificates EK certificates must chain
    /// to; `None`: only EKs registered with `wardenctl node add` are trusted.
    pub manufacturer_ca_dir: Option<PathBuf>,
    /// Lifetime of an attestation nonce.
    pub nonce_ttl: Duration,
}

/// What can stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    ManufacturerCas(#[from] crate::enroll::EnrollError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTPS on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A server ready to serve: everything is loaded and the socket is bound.
#[derive(Debug)]
pub struct Prepared {
    /// `sha256:<hex>` of the CA certificate DER.
    pub ca_fingerprint: String,
    /// The bound address (the real port when `listen` had port 0).
    pub local_addr: SocketAddr,
    /// Path of the admin token file.
    pub admin_token_file: PathBuf,
    /// Path of the CA certificate (what `wardenctl --ca` and agents trust).
    pub ca_file: PathBuf,
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AppState,
}

/// Creates or loads everything in the data directory and binds the socket.
pub fn prepare(options: &ServerOptions) -> Result<Prepared, ServerError> {
    let dir = &options.data_dir;
    create_data_dir(dir)?;

    let sans = pki::required_sans(
        Some(options.listen.ip()),
        pki::host_name().as_deref(),
        &options.extra_sans,
    )?;
    let pki = pki::load_or_create(dir, &sans)?;
    if pki.created_ca {
        tracing::info!(dir = %dir.display(), fingerprint = %pki.ca_fingerprint(), "created a new CA");
    }
    let tls = Arc::new(pki.rustls_server_config()?);

    let admin_token_file = dir.join(ADMIN_TOKEN_FILE);
    let admin_token = load_or_create_token(&admin_token_file)?;

    let db = Db::open(&dir.join(DB_FILE))?;
    let cas = match &options.manufacturer_ca_dir {
        Some(ca_dir) => {
            let cas = ManufacturerCas::load(ca_dir)?;
            tracing::info!(dir = %ca_dir.display(), certificates = cas.len(), "loaded manufacturer CAs");
            cas
        }
        None => ManufacturerCas::none(),
    };

    let bind = |source| ServerError::Bind {
        addr: options.listen,
        source,
    };
    let listener = std::net::TcpListener::bind(options.listen).map_err(bind)?;
    // tokio adopts the socket as is; it must already be non-blocking.
    listener.set_nonblocking(true).map_err(bind)?;
    let local_addr = listener.local_addr().map_err(bind)?;

    Ok(Prepared {
        ca_fingerprint: pki.ca_fingerprint(),
        local_addr,
        admin_token_file,
        ca_file: dir.join(pki::CA_CERT_FILE),
        listener,
        tls,
        state: AppState::with_attestation(db, admin_token, cas, options.nonce_ttl),
    })
}

impl Prepared {
    /// Signs handoff reports with `key` (see [`crate::keys`]) instead of
    /// a fresh in-memory key.
    pub fn with_report_key(mut self, key: crate::keys::ReportKey) -> Self {
        self.state = self.state.with_report_key(key);
        self
    }

    /// Serves HTTPS until `shutdown` completes, then drains connections for
    /// up to 5 seconds.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let addr = self.local_addr;
        let serve_err = |source| ServerError::Serve { addr, source };
        let handle = axum_server::Handle::new();
        let on_shutdown = handle.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            on_shutdown.graceful_shutdown(Some(Duration::from_secs(5)));
        });
        let app = api::router(self.state);
        axum_server::from_tcp_rustls(self.listener, RustlsConfig::from_config(self.tls))
            .map_err(serve_err)?
            .handle(handle)
            .serve(app.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .map_err(serve_err)
    }
}

fn create_data_dir(dir: &Path) -> Result<(), ServerError> {
    let io = |source| ServerError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        // Not fatal: the keys themselves are 0600. But say so.
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "data directory is accessible to other users; 0700 is expected");
    }
    Ok(())
}

/// Reads the admin token, or creates one (32 random bytes as hex, mode 0600).
fn load_or_create_token(path: &Path) -> Result<String, ServerError> {
    let token_err = |reason: String| ServerError::Token {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(token_err(
                    "is not a token (expected at least 32 printable characters); delete it to create a new one".into(),
                ));
            }
            Ok(token.to_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            pki::random_bytes(&mut bytes)
                .map_err(|_| token_err("the system random number generator failed".into()))?;
            let token = hex::encode(bytes);
            pki::write_private(path, format!("{token}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "created the admin token");
            Ok(token)
        }
        Err(e) => Err(token_err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let first = load_or_create_token(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create_token(&path).unwrap(), first);

        std::fs::write(&path, "short\n").unwrap();
        assert!(load_or_create_token(&path).is_err());
    }

    #[test]
    fn prepare_creates_the_data_dir_and_binds() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state");
        let options = ServerOptions {
            data_dir: data.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            extra_sans: vec!["warden.test".into()],
            manufacturer_ca_dir: None,
            nonce_ttl: Duration::from_secs(60),
        };
        let prepared = prepare(&options).unwrap();
        assert_ne!(prepared.local_addr.port(), 0);
        assert_eq!(
            std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for file in [
            pki::CA_CERT_FILE,
            pki::CA_KEY_FILE,
            pki::SERVER_CERT_FILE,
            pki::SERVER_KEY_FILE,
            ADMIN_TOKEN_FILE,
            DB_FILE,
        ] {
            assert!(data.join(file).exists(), "{file}");
        }
        let fp = prepared.ca_fingerprint.clone();
        assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
        drop(prepared);
        assert_eq!(prepare(&options).unwrap().ca_fingerprint, fp);
    }
}
