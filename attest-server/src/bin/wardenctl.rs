//! `wardenctl`: the Warden server's admin CLI.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use warden_attest_server::client::{self, Client};

/// Administer a Warden attestation server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "WARDEN_SERVER", value_name = "URL")]
    server: String,
    /// PEM file of the CA to trust (the server's DIR/ca.pem); nothing else is trusted.
    #[arg(long, env = "WARDEN_CA", value_name = "FILE")]
    ca: PathBuf,
    /// File holding the admin token. Default: $WARDEN_TOKEN, else admin.token next to --ca.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the nodes the server has heard from.
    Nodes {
        /// Print the NodeList JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wardenctl: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Err only means a provider was already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let env_token = std::env::var("WARDEN_TOKEN").ok();
    let token = client::resolve_token(args.token_file.as_deref(), env_token.as_deref(), &args.ca)?;
    let client = Client::new(&args.server, &args.ca, Some(token))?;
    match args.command {
        Command::Nodes { json } => {
            let list = runtime.block_on(client.nodes())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).context("encoding the node list")?
                );
            } else {
                print!("{}", client::format_nodes_table(&list));
            }
        }
    }
    Ok(())
}
