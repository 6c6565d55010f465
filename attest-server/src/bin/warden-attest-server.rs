//! `warden-attest-server`: serves the Warden API over HTTPS.
//!
//! Stdout carries exactly the lines scripts wait for (`ca-fingerprint:`,
//! `admin-token-file:`, `listening:`); logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use warden_attest_server::keys;
use warden_attest_server::server::{self, ServerOptions};

/// The Warden attestation server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory for the CA, certificates, admin token and database (created 0700).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Address to listen on, IP:PORT (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Extra DNS name or IP for the server certificate (repeatable).
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    sans: Vec<String>,
    /// Directory of TPM manufacturer CA certificates (PEM/DER) that EK
    /// certificates must chain to. Without it, only EKs registered with
    /// `wardenctl node add --ek-sha256` can enroll.
    #[arg(long, value_name = "DIR")]
    manufacturer_ca_dir: Option<PathBuf>,
    /// Lifetime of an attestation nonce, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    nonce_ttl: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("warden-attest-server: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Every rustls user in the process gets ring (reqwest, axum-server).
    // Err only means a provider was already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let options = ServerOptions {
            data_dir: args.data_dir,
            listen: args.listen,
            extra_sans: args.sans,
            manufacturer_ca_dir: args.manufacturer_ca_dir,
            nonce_ttl: std::time::Duration::from_secs(args.nonce_ttl),
        };
        let prepared = server::prepare(&options)?;
        // The key that signs handoff reports lives with the CA key; tenants
        // fetch its public half from GET /v1/keys.
        let key_file = options.data_dir.join(keys::REPORT_KEY_FILE);
        let report_key = keys::ReportKey::load_or_create(&key_file)?;
        tracing::info!(key_id = %report_key.key_id(), "report signing key loaded");
        let prepared = prepared.with_report_key(report_key);
        println!("ca-fingerprint: {}", prepared.ca_fingerprint);
        println!("admin-token-file: {}", prepared.admin_token_file.display());
        println!("listening: https://{}", prepared.local_addr);
        prepared.serve(shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
