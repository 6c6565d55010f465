//! `wardenctl`: the Warden server's admin CLI.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use warden_attest_server::client::{self, Client, PolicyScope};
use warden_attest_server::watch;
use warden_protocol::attest::{EkRegistration, Policy};
use warden_protocol::policy::RamdiskReference;
use warden_protocol::turnover::{Handoff, PlanRequest, PlanState, Role, TokenRequest};
use warden_protocol::wipe::Method;

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
    /// Operator tokens (admin only).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Plan the node's next turnover: snapshot, wipe, image (or restore a
    /// snapshot), hand off.
    Turnover {
        node: String,
        /// HTTP(S) URL of the tenant image.
        #[arg(
            long,
            value_name = "URL",
            required_unless_present = "restore_from",
            conflicts_with = "restore_from"
        )]
        image: Option<String>,
        /// SHA-256 of the image as served (or use --sha512).
        #[arg(
            long,
            value_name = "HEX",
            required_unless_present_any = ["sha512", "restore_from"],
            conflicts_with = "sha512"
        )]
        sha256: Option<String>,
        #[arg(long, value_name = "HEX")]
        sha512: Option<String>,
        /// Instead of an image: restore the snapshot taken in lease LEASE
        /// (`wardenctl snapshots`) onto the target after the wipe. The
        /// snapshot must hold the incoming lessee's data.
        #[arg(long, value_name = "LEASE", conflicts_with_all = ["sha256", "sha512", "image_ca"])]
        restore_from: Option<String>,
        /// Back the outgoing tenant's disk up to this NBD export first.
        #[arg(long, value_name = "nbd://HOST:PORT/EXPORT")]
        snapshot_to: Option<String>,
        /// Erase method: auto, metadata, zeroout, discard, secdiscard, nvme-format-crypto, …
        #[arg(long, default_value = "auto")]
        wipe: String,
        /// kexec, reboot-to-disk, reboot or poweroff.
        #[arg(long, default_value = "kexec")]
        handoff: String,
        /// The incoming lessee's project (default: the node's current lessee).
        #[arg(long, value_name = "PROJECT")]
        lessee: Option<String>,
        /// The disk to image (kernel name, e.g. nvme0n1; default: the first disk).
        #[arg(long)]
        target: Option<String>,
        /// How the node trusts an https:// image server: sha256:HEX (pin of
        /// a CA certificate the server presents) or a PEM file of CA
        /// certificates. Default: the node's own warden.image_ca.
        #[arg(long, value_name = "FILE_OR_PIN")]
        image_ca: Option<String>,
        /// PEM file of the CA that signs an nbds:// block store's
        /// certificate (required with nbds://).
        #[arg(long, value_name = "FILE")]
        snapshot_ca: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The node's newest turnover plan.
    Plan {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// The snapshots this token may read (a lessee: its own).
    Snapshots {
        #[arg(long)]
        json: bool,
    },
    /// One snapshot with its record (manifest digest, sizes), as JSON.
    Snapshot {
        lease: String,
        /// Accepted for symmetry: always JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Signed handoff reports: fetch one, or check one offline.
    #[command(subcommand)]
    Report(ReportCommand),
    /// Print a binary TCG event log (like tpm2_eventlog) and its replayed PCRs. Needs no server.
    Eventlog {
        /// e.g. /sys/kernel/security/tpm0/binary_bios_measurements
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Live progress of a node's turnover: a bar per step with bytes, rate
    /// and ETA, until the plan is done or failed (exit status 1 if failed).
    Watch {
        node: String,
        /// Draw once and exit.
        #[arg(long)]
        once: bool,
        /// Print the ProgressView JSON (one compact line per change without --once).
        #[arg(long)]
        json: bool,
    },
    /// The node's console log, as its agent printed it.
    Log {
        node: String,
        /// Keep printing new lines as they arrive (until interrupted).
        #[arg(short, long)]
        follow: bool,
        /// Print the ConsoleLog JSON (one compact ConsoleLine per line with --follow).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReportCommand {
    /// Check a report file's signature: with a key file, needs no server.
    Verify {
        /// The report file (as `wardenctl report get` saved it).
        file: PathBuf,
        /// The server's public key: the JSON of GET /v1/keys, or one raw
        /// 32-byte ed25519 key in base64.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Instead of --key: fetch the keys from this server's GET /v1/keys.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// The CA to trust for --server.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Save a node's latest signed report, byte for byte.
    Get {
        node: String,
        /// Write it here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
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
    /// Set the project that owns a node (admin only).
    Owner { node: String, project: String },
    /// End a node's quarantine (admin or the node's owner). It approves
    /// nothing: the node's next boot is attested as usual.
    Release {
        node: String,
        /// Print the QuarantineRelease JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; the secret is printed once.
    Create {
        /// admin, owner or lessee.
        #[arg(long)]
        role: String,
        /// The project it acts for (required for owner and lessee).
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        note: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// List policies (latest version of each).
    List {
        /// Print the PolicyList JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a policy as JSON.
    Show {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        /// Accepted for symmetry: the policy is always printed as JSON.
        #[arg(long)]
        json: bool,
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
    // Verification needs no token: the keys are public, and offline it
    // needs no server at all.
    if let Command::Report(ReportCommand::Verify {
        file,
        key,
        server,
        ca,
    }) = &args.command
    {
        return report_verify(
            &runtime,
            file,
            key.as_deref(),
            server.as_deref().or(args.server.as_deref()),
            ca.as_deref().or(args.ca.as_deref()),
        );
    }
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
        Command::Node(NodeCommand::Owner { node, project }) => {
            runtime.block_on(client.set_owner(&node, &project))?;
            println!("node {node} is owned by {project}");
        }
        Command::Node(NodeCommand::Release { node, json }) => {
            let released = runtime
                .block_on(client.release(&node))
                .with_context(|| format!("releasing node {node} from quarantine"))?;
            if json {
                print_json(&released)?;
            } else {
                print!("{}", client::format_release(&released));
            }
        }
        Command::Token(TokenCommand::Create {
            role,
            project,
            note,
            json,
        }) => {
            let role: Role = serde_json::from_value(serde_json::Value::String(role.clone()))
                .map_err(|_| anyhow::anyhow!("--role {role:?} must be admin, owner or lessee"))?;
            let created = runtime.block_on(client.create_token(&TokenRequest {
                role,
                project,
                note,
            }))?;
            if json {
                print_json(&created)?;
            } else {
                println!("{}", created.token);
                eprintln!(
                    "token for {} {} (shown once; keep it in a file for --token-file)",
                    created.role.name(),
                    created.project.as_deref().unwrap_or("(all projects)")
                );
            }
        }
        Command::Turnover {
            node,
            image,
            sha256,
            sha512,
            restore_from,
            snapshot_to,
            wipe,
            handoff,
            lessee,
            target,
            image_ca,
            snapshot_ca,
            json,
        } => {
            let image_ca = image_ca.as_deref().map(image_ca_arg).transpose()?;
            let snapshot_ca = snapshot_ca.as_deref().map(ca_file).transpose()?;
            let checksum = match (sha256, sha512, &restore_from) {
                (Some(h), _, _) => Some(format!("sha256:{}", h.to_ascii_lowercase())),
                (None, Some(h), _) => Some(format!("sha512:{}", h.to_ascii_lowercase())),
                (None, None, Some(_)) => None,
                (None, None, None) => bail!("give the image's --sha256 or --sha512"),
            };
            let wipe: Method = serde_json::from_value(serde_json::Value::String(wipe.clone()))
                .map_err(|_| anyhow::anyhow!("--wipe {wipe:?} is not a method (auto, metadata, zeroout, discard, secdiscard, nvme-format-crypto, nvme-format-user-data, nvme-sanitize-crypto, nvme-sanitize-block, ata-security-erase, ata-security-erase-enhanced)"))?;
            let handoff: Handoff = serde_json::from_value(serde_json::Value::String(
                handoff.clone(),
            ))
            .map_err(|_| {
                anyhow::anyhow!(
                    "--handoff {handoff:?} must be kexec, reboot-to-disk, reboot or poweroff"
                )
            })?;
            let plan = runtime.block_on(client.turnover(
                &node,
                &PlanRequest {
                    image,
                    checksum,
                    snapshot_to,
                    wipe,
                    handoff,
                    lessee,
                    target,
                    image_ca,
                    snapshot_ca,
                    restore_from,
                },
            ))?;
            if json {
                print_json(&plan)?;
            } else {
                println!(
                    "planned {} for node {node}: it runs at the node's next boot (wardenctl watch {node})",
                    plan.lease_id
                );
            }
        }
        Command::Plan { node, json } => {
            let plan = runtime.block_on(client.plan(&node))?;
            if json {
                print_json(&plan)?;
            } else {
                let writes = match (&plan.request.image, &plan.request.restore_from) {
                    (_, Some(lease)) => format!("restore {lease}"),
                    (Some(image), None) => format!("image {image}"),
                    (None, None) => "image -".to_owned(),
                };
                println!(
                    "{}  {}  {writes}  wipe {}  handoff {}  lessee {}{}",
                    plan.lease_id,
                    plan.state.name(),
                    serde_json::to_string(&plan.request.wipe).unwrap_or_default(),
                    plan.request.handoff.name(),
                    plan.lessee.as_deref().unwrap_or("-"),
                    plan.failure
                        .as_deref()
                        .map(|f| format!("\n  failed: {f}"))
                        .unwrap_or_default()
                );
            }
        }
        Command::Snapshots { json } => {
            let list = runtime.block_on(client.snapshots())?;
            if json {
                print_json(&list)?;
            } else if list.snapshots.is_empty() {
                println!("no snapshots this token may read");
            } else {
                println!("LEASE                   NODE              LESSEE        SIZE        MANIFEST          URI");
                for s in &list.snapshots {
                    println!(
                        "{:<23} {:<17} {:<13} {:<11} {:<17} {}",
                        s.lease_id,
                        s.node_id.get(..16).unwrap_or(&s.node_id),
                        s.lessee.as_deref().unwrap_or("-"),
                        client::human_bytes(s.record.disk_bytes),
                        s.manifest_sha256.get(..16).unwrap_or(&s.manifest_sha256),
                        s.uri
                    );
                }
            }
        }
        Command::Snapshot { lease, json: _ } => {
            let entry = runtime.block_on(client.snapshot(&lease))?;
            print_json(&entry)?;
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
        Command::Watch { node, once, json } => {
            let options = watch::WatchOptions {
                once,
                json,
                redraw: std::io::stdout().is_terminal(),
                width: terminal_width(),
                interval: watch::POLL_INTERVAL,
            };
            let mut out = std::io::stdout().lock();
            let last = runtime.block_on(watch::watch(&client, &node, &options, &mut out))?;
            if last.plan_state == Some(PlanState::Failed) {
                bail!("the turnover of node {node} failed (wardenctl log {node} shows why)");
            }
        }
        Command::Log { node, follow, json } => {
            let options = watch::LogOptions {
                follow,
                json,
                interval: watch::POLL_INTERVAL,
            };
            let mut out = std::io::stdout().lock();
            runtime.block_on(watch::log(&client, &node, &options, &mut out))?;
        }
        Command::Report(ReportCommand::Get { node, output }) => {
            let bytes = runtime.block_on(client.report(&node))?;
            match &output {
                Some(path) => {
                    std::fs::write(path, &bytes)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("saved the report of node {node} to {}", path.display());
                }
                None => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)
                        .and_then(|()| out.flush())
                        .context("writing the report to stdout")?;
                }
            }
        }
        Command::Eventlog { .. } | Command::Report(ReportCommand::Verify { .. }) => {}
    }
    Ok(())
}

/// `wardenctl report verify`: the key from a file or the server's
/// `GET /v1/keys`, then [`warden_protocol::report::verify_with_keys`].
fn report_verify(
    runtime: &tokio::runtime::Runtime,
    file: &std::path::Path,
    key: Option<&std::path::Path>,
    server: Option<&str>,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use warden_protocol::report;
    let keys = match (key, server, ca) {
        (Some(path), _, _) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            report::parse_key_file(&bytes)
                .with_context(|| format!("key file {}", path.display()))?
        }
        (None, Some(server), Some(ca)) => {
            let client = Client::new(server, ca, None)?;
            let list = runtime.block_on(client.keys())?;
            list.keys
                .iter()
                .map(report::PublicKey::to_verifying_key)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{server}/v1/keys"))?
        }
        _ => bail!("say which key to trust: pass --key FILE, or --server URL and --ca FILE"),
    };
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let (r, key_id) = report::verify_with_keys(&bytes, &keys)
        .with_context(|| format!("report {} refused", file.display()))?;
    println!(
        "report verified: node {}, lease {}, outcome {}, key {key_id}",
        r.node_id,
        r.lease_id,
        r.outcome.name()
    );
    if let Some(restore) = &r.restore {
        println!(
            "  restored {} from {} (manifest {}) onto {}",
            client::human_bytes(restore.disk_bytes),
            restore.uri,
            restore.manifest_sha256,
            restore.target
        );
    }
    Ok(())
}

/// `$COLUMNS` when the shell exports it, else 80.
fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c: &usize| c >= 20)
        .unwrap_or(80)
}

fn policy(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    cmd: PolicyCommand,
) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::List { json } => {
            let list = runtime.block_on(client.policies())?;
            if json {
                print_json(&list)?;
            } else {
                for p in list.policies {
                    println!("{} v{}", p.name, p.version);
                }
            }
        }
        PolicyCommand::Show {
            name,
            version,
            json: _,
        } => {
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

/// `--image-ca`: a `sha256:HEX` pin as given, else a PEM file's text.
fn image_ca_arg(value: &str) -> anyhow::Result<String> {
    if value.starts_with("sha256:") {
        warden_protocol::ca::parse_pin(value).map_err(|e| anyhow::anyhow!("--image-ca: {e}"))?;
        return Ok(value.to_owned());
    }
    ca_file(std::path::Path::new(value))
        .context("--image-ca is neither sha256:<64 hex> nor a PEM file")
}

/// A PEM file of CA certificates, read and checked for PEM framing (the
/// server parses the certificates).
fn ca_file(path: &std::path::Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the CA file {}", path.display()))?;
    warden_protocol::ca::pem_certificates(&pem)
        .map_err(|e| anyhow::anyhow!("the CA file {} {e}", path.display()))?;
    Ok(pem)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encoding JSON")?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_file(dir: &std::path::Path) -> (std::path::PathBuf, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        let path = dir.join("ca.pem");
        std::fs::write(&path, &pem).unwrap();
        (path, pem)
    }

    #[test]
    fn turnover_takes_a_pin_or_a_pem_file_for_each_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pem) = pem_file(dir.path());
        let pin = format!("sha256:{}", "ab".repeat(32));
        let args = Args::try_parse_from([
            "wardenctl",
            "turnover",
            "NODE",
            "--image",
            "https://img/x.raw",
            "--sha256",
            &"cd".repeat(32),
            "--image-ca",
            &pin,
            "--snapshot-to",
            "nbds://10.0.2.2:10809/old",
            "--snapshot-ca",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let Command::Turnover {
            image_ca,
            snapshot_ca,
            ..
        } = args.command
        else {
            panic!("not a turnover: {:?}", args.command);
        };
        assert_eq!(image_ca_arg(image_ca.as_deref().unwrap()).unwrap(), pin);
        assert_eq!(ca_file(&snapshot_ca.unwrap()).unwrap(), pem);
        // A file for --image-ca is read as PEM.
        assert_eq!(image_ca_arg(path.to_str().unwrap()).unwrap(), pem);

        let e = image_ca_arg("sha256:abcd").unwrap_err();
        assert!(format!("{e:#}").contains("not a pin"), "{e:#}");
        let missing = dir.path().join("nope.pem");
        let e = image_ca_arg(missing.to_str().unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("nope.pem"), "{e:#}");
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = ca_file(&key).unwrap_err();
        assert!(format!("{e:#}").contains("PRIVATE KEY"), "{e:#}");
    }

    #[test]
    fn turnover_takes_an_image_or_a_snapshot_to_restore() {
        let restore = Args::try_parse_from([
            "wardenctl",
            "turnover",
            "NODE",
            "--restore-from",
            "lease-00aa",
            "--lessee",
            "lab-a",
        ])
        .unwrap();
        let Command::Turnover {
            image,
            sha256,
            restore_from,
            ..
        } = restore.command
        else {
            panic!("not a turnover: {:?}", restore.command);
        };
        assert_eq!((image, sha256), (None, None));
        assert_eq!(restore_from.as_deref(), Some("lease-00aa"));
        let image = ["--image", "http://x/i", "--sha256", "ab"];
        for bad in [
            vec!["wardenctl", "turnover", "NODE"],
            vec!["wardenctl", "turnover", "NODE", "--image", "http://x/i"],
            [
                &["wardenctl", "turnover", "NODE", "--restore-from", "l"][..],
                &image[..],
            ]
            .concat(),
            vec![
                "wardenctl",
                "turnover",
                "NODE",
                "--restore-from",
                "l",
                "--sha256",
                "ab",
            ],
        ] {
            assert!(Args::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
        assert!(Args::try_parse_from(
            [&["wardenctl", "turnover", "NODE"][..], &image[..]].concat()
        )
        .is_ok());
    }
}
