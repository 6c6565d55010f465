//! `warden-attest-server`: serves the Warden API over HTTPS.
//!
//! Stdout carries exactly the lines scripts wait for (`ca-fingerprint:`,
//! `admin-token-file:`, `boot:` when network boot is on, and `listening:`
//! last); logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use warden_attest_server::server::{self, ServerOptions};
use warden_attest_server::{boot, keys};

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
    /// Serve network-boot files under /boot/ (iPXE scripts, kernel,
    /// initramfs, a UKI built at start) from this directory, the output of
    /// `scripts/build-ramdisk` (`docs/netboot.md`). Needs --boot-listen.
    #[arg(long, value_name = "DIR", requires = "boot_listen")]
    boot_dir: Option<PathBuf>,
    /// Plain-HTTP address for /boot/ (firmware and iPXE cannot pin our CA;
    /// measured boot proves what was booted).
    #[arg(long, value_name = "ADDR", requires = "boot_dir")]
    boot_listen: Option<SocketAddr>,
    /// Host name or IP under which nodes reach the API; the boot command
    /// line gets `warden.server=https://HOST:PORT` with the bound port.
    /// Default: the --listen IP.
    #[arg(long, value_name = "HOST")]
    boot_server_host: Option<String>,
    /// Kernel arguments added to the boot command line after
    /// `warden.server=… warden.ca=…`.
    #[arg(long, value_name = "ARGS", default_value = "console=ttyS0")]
    boot_cmdline: String,
    /// The systemd EFI stub the UKI is built on.
    #[arg(long, value_name = "FILE", default_value = warden_attest_server::boot::DEFAULT_STUB)]
    boot_efi_stub: PathBuf,
    /// Let `?extra=ARGS` on a script URL add kernel arguments (labs and
    /// tests; the arguments are measured, so policies still decide).
    #[arg(long)]
    boot_allow_extra: bool,
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
        let boot = match (&args.boot_dir, args.boot_listen) {
            (Some(dir), Some(listen)) => {
                let host = match &args.boot_server_host {
                    Some(h) => h.clone(),
                    None => match prepared.local_addr.ip() {
                        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                        ip => ip.to_string(),
                    },
                };
                let files = boot::BootFiles::load(&boot::BootOptions {
                    dir: dir.clone(),
                    listen,
                    server_url: format!("https://{host}:{}", prepared.local_addr.port()),
                    ca_pin: prepared.ca_fingerprint.clone(),
                    cmdline_extra: args.boot_cmdline.clone(),
                    stub: args.boot_efi_stub.clone(),
                    allow_extra: args.boot_allow_extra,
                })?;
                let listener = boot::bind(listen)?;
                let addr = listener.local_addr().context("boot listener address")?;
                tracing::info!(cmdline = files.cmdline(), "network boot files ready");
                Some((listener, addr, std::sync::Arc::new(files)))
            }
            _ => None,
        };
        // `listening:` comes last: scripts take it as "everything is up".
        if let Some((listener, addr, files)) = boot {
            println!("boot: http://{addr}/boot/{}", boot::SCRIPT_FILE);
            tokio::spawn(async move {
                if let Err(e) = boot::serve(listener, files, std::future::pending()).await {
                    tracing::error!(error = %e, "the boot listener stopped");
                }
            });
        }
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
