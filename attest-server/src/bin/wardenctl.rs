//! `wardenctl`: the Warden server's admin CLI.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use warden_attest_server::client::{self, Client, PolicyScope};
use warden_protocol::attest::{EkRegistration, Policy};
use warden_protocol::policy::RamdiskReference;

/// Administer a Warden attestation server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "WARDEN_SERVER", value_name = "URL")]
    server: Option<String>,
    /// PEM file of the CA to trust (the server's DIR/ca.pem); nothing else is trusted.
    #[arg(long, env = "WARDEN_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
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
    /// Manage nodes before they boot.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Measured-boot policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The audit log of attestations, newest first.
    Attestations {
        /// Only this node.
        node: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// The latest verdict of a node (what a lease controller asks).
    Verdict {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a binary TCG event log (like tpm2_eventlog) and its replayed PCRs. Needs no server.
    Eventlog {
        /// e.g. /sys/kernel/security/tpm0/binary_bios_measurements
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Trust a node's EK before it boots (for TPMs without a manufacturer-CA EK certificate).
    Add {
        /// SHA-256 of the EK's DER SubjectPublicKeyInfo (= the node id).
        #[arg(long, value_name = "HEX")]
        ek_sha256: String,
        /// Node group (policies can be assigned to a group).
        #[arg(long)]
        group: Option<String>,
        /// Free text: asset tag, rack position.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// List policies (latest version of each).
    List,
    /// Print a policy as JSON.
    Show {
        name: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Store a policy from a JSON file as the next version of its name.
    Put {
        file: PathBuf,
        /// Name to store it under (default: the file's "name").
        #[arg(long)]
        name: Option<String>,
    },
    /// Draft a policy from a node's latest genuine attestation, for review.
    Learn {
        node: String,
        /// Name of the policy.
        #[arg(long)]
        name: String,
        /// PCRs to cover, comma-separated (default 0,2-9: PCR1 holds the boot order and NIC MAC).
        #[arg(long)]
        pcrs: Option<String>,
        /// Require the ramdisk kernel and initrd of this reference-values.json
        /// (written by warden-mkinitramfs) instead of the ones the node booted.
        #[arg(long, value_name = "FILE")]
        ramdisk: Option<PathBuf>,
        /// Write the draft here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Also store it as the next version (after printing it).
        #[arg(long)]
        store: bool,
    },
    /// Make a node or a group use a policy (its latest version at each attestation).
    Assign {
        name: String,
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        node: Option<String>,
        #[arg(long)]
        group: Option<String>,
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
    if let Command::Eventlog { file, json } = &args.command {
        return eventlog(file, *json);
    }
    // Err only means a provider was already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let (Some(server), Some(ca)) = (&args.server, &args.ca) else {
        bail!("this command talks to the server: pass --server URL and --ca FILE (or set WARDEN_SERVER and WARDEN_CA)");
    };
    let env_token = std::env::var("WARDEN_TOKEN").ok();
    let token = client::resolve_token(args.token_file.as_deref(), env_token.as_deref(), ca)?;
    let client = Client::new(server, ca, Some(token))?;
    match args.command {
        Command::Nodes { json } => {
            let list = runtime.block_on(client.nodes())?;
            if json {
                print_json(&list)?;
            } else {
                print!("{}", client::format_nodes_table(&list));
            }
        }
        Command::Node(NodeCommand::Add {
            ek_sha256,
            group,
            note,
        }) => {
            runtime.block_on(client.register_ek(&EkRegistration {
                ek_sha256: ek_sha256.clone(),
                group,
                note,
            }))?;
            println!("registered EK {ek_sha256}: the node may enroll");
        }
        Command::Policy(cmd) => policy(&runtime, &client, cmd)?,
        Command::Attestations { node, limit, json } => {
            let list = runtime.block_on(client.attestations(node.as_deref(), limit))?;
            if json {
                print_json(&list)?;
            } else {
                print!("{}", client::format_attestations(&list));
            }
        }
        Command::Verdict { node, json } => {
            let verdict = runtime.block_on(client.verdict(&node))?;
            if json {
                print_json(&verdict)?;
            } else {
                print!("{}", client::format_verdict(&verdict));
            }
        }
        Command::Eventlog { .. } => {}
    }
    Ok(())
}

fn policy(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    cmd: PolicyCommand,
) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::List => {
            let list = runtime.block_on(client.policies())?;
            for p in list.policies {
                println!("{} v{}", p.name, p.version);
            }
        }
        PolicyCommand::Show { name, version } => {
            print_json(&runtime.block_on(client.policy(&name, version))?)?;
        }
        PolicyCommand::Put { file, name } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut policy: Policy = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a policy", file.display()))?;
            if let Some(name) = name {
                policy.name = name;
            }
            let stored = runtime.block_on(client.put_policy(&policy))?;
            println!("stored policy {} v{}", stored.name, stored.version);
        }
        PolicyCommand::Learn {
            node,
            name,
            pcrs,
            ramdisk,
            out,
            store,
        } => {
            let mut policy =
                runtime.block_on(client.learn_policy(&node, &name, pcrs.as_deref()))?;
            if let Some(file) = ramdisk {
                let reference = read_reference_values(&file)?;
                let notes = warden_protocol::policy::require_ramdisk(&mut policy, &reference)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                for note in notes {
                    eprintln!("note: {note}");
                }
            }
            let text = serde_json::to_string_pretty(&policy).context("encoding the policy")?;
            match &out {
                Some(path) => std::fs::write(path, format!("{text}\n"))
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
            if store {
                let stored = runtime.block_on(client.put_policy(&policy))?;
                eprintln!("stored policy {} v{}", stored.name, stored.version);
            }
        }
        PolicyCommand::Assign { name, node, group } => {
            let scope = match (&node, &group) {
                (Some(n), _) => PolicyScope::Node(n),
                (None, Some(g)) => PolicyScope::Group(g),
                (None, None) => bail!("pass --node ID or --group NAME"),
            };
            runtime.block_on(client.assign_policy(scope, &name))?;
            match scope {
                PolicyScope::Node(n) => println!("node {n} now uses policy {name}"),
                PolicyScope::Group(g) => println!("group {g} now uses policy {name}"),
            }
        }
    }
    Ok(())
}

/// The kernel and initrd digests of a `reference-values.json`.
fn read_reference_values(file: &std::path::Path) -> anyhow::Result<RamdiskReference> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let get = |path: &[&str]| -> anyhow::Result<String> {
        let mut cur = &v;
        for key in path {
            cur = cur
                .get(key)
                .with_context(|| format!("{}: no field {}", file.display(), path.join(".")))?;
        }
        let s = cur
            .as_str()
            .with_context(|| format!("{}: {} is not a string", file.display(), path.join(".")))?;
        if s.len() != 64 || hex::decode(s).is_err() {
            bail!(
                "{}: {} is not a SHA-256 hex digest",
                file.display(),
                path.join(".")
            );
        }
        Ok(s.to_owned())
    };
    // The kernel as a file (UEFI/iPXE boot) and as QEMU's direct kernel
    // boot patches it in memory: either is this ramdisk's kernel.
    let mut kernels = vec![get(&["kernel", "authenticode_sha256"])?];
    if v.pointer("/kernel/qemu_direct_boot").is_some() {
        kernels.push(get(&["kernel", "qemu_direct_boot", "authenticode_sha256"])?);
    }
    Ok(RamdiskReference {
        kernels,
        initrd: get(&["initrd", "event_digest"])?,
    })
}

fn eventlog(file: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    if json {
        let value = warden_attest_server::eventlog_text::render_json(&bytes)
            .with_context(|| format!("event log {}", file.display()))?;
        print_json(&value)?;
    } else {
        let text = warden_attest_server::eventlog_text::render_text(&bytes)
            .with_context(|| format!("event log {}", file.display()))?;
        print!("{text}");
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encoding JSON")?
    );
    Ok(())
}
