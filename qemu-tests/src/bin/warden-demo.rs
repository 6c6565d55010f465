//! `warden-demo`: what `scripts/demo` runs — one whole lease turnover on
//! loopback, with real parts only:
//!
//! - the Warden server (SQLite data dir; trusts swtpm-localca as the TPM
//!   manufacturer) serving network boot under `/boot/`;
//! - an HTTP image store with the tenant image, an NBD block store (nbdkit);
//! - a QEMU node (OVMF, swtpm) whose NVMe disk holds the previous tenant's
//!   data. It network-boots (iPXE → the server's script → the ramdisk UKI):
//!   1. as a new node: enrolled, refused (no policy yet); the owner approves
//!      its firmware with a policy learned from that boot;
//!   2. with a turnover plan from the owner: attest → snapshot → wipe →
//!      image → final attest → kexec into the tenant OS, which prints
//!      `TENANT-BOOTED`; the lessee fetches the signed report and verifies
//!      it (`report verified`), and a table sums the steps up;
//!   3. the same machine after someone turned Secure Boot on (Secure Boot
//!      firmware with enrolled keys booting a signed copy of the ramdisk UKI
//!      over UEFI HTTP boot): refused and quarantined, with the reason.
//!
//! Everything it started (server, stores, QEMU, swtpm, temp dirs) is stopped
//! and removed when it ends — on success, on failure and on Ctrl-C.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::turnover::{previous_tenant_disk, sha256_prefix, token, Nbdkit};
use warden_qemu_tests::{interrupt, secureboot};
use warden_qemu_tests::{ramdisk_dir, DiskBus, Node, NodeBuilder, QemuLock, Server};

const MIB: u64 = 1 << 20;
/// The previous tenant's disk.
const DISK_SIZE: u64 = 256 * MIB;
/// The snapshot export holds the disk and, after it, its manifest.
const EXPORT_SIZE: u64 = DISK_SIZE + 16 * MIB;

fn main() {
    if let Err(e) = interrupt::watch() {
        eprintln!("warden-demo: cannot watch Ctrl-C ({e}); it would leave files behind");
    }
    match run() {
        Ok(()) => {}
        Err(_) if interrupt::interrupted() => {
            eprintln!("\nwarden-demo: interrupted; everything it started is stopped and removed");
            std::process::exit(130);
        }
        Err(e) => {
            eprintln!("warden-demo: {e:#}");
            std::process::exit(1);
        }
    }
}

/// One timed step of the turnover, for the summary table.
struct Row {
    step: String,
    seconds: f64,
    bytes: Option<u64>,
}

fn run() -> Result<()> {
    let ramdisk = ramdisk_dir()?;
    let images = warden_qemu_tests::workspace_root().join("build/images");
    let image = images.join("tenant-compressed.qcow2");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(images.join("manifest.json"))
            .context("build/images/manifest.json (run scripts/build-images)")?,
    )?;
    let image_sha256 = manifest["files"]["tenant-compressed.qcow2"]["sha256"]
        .as_str()
        .context("manifest.json names no sha256 for tenant-compressed.qcow2")?
        .to_owned();
    let _lock = QemuLock::acquire()?;
    let work = tempfile::Builder::new().prefix("warden-demo-").tempdir()?;

    heading("Setting up: server, image store, block store, the previous tenant's disk");
    let server = Server::start_netboot(&[]).context("starting warden-attest-server")?;
    let boot_url = server.boot_url().context("the server serves no /boot/")?;
    println!(
        "   server     {} (nodes reach it as {}), SQLite in {}",
        server.url(),
        server.guest_url(),
        server.data_dir().display()
    );
    println!("   netboot    {boot_url}warden.ipxe → warden-ramdisk.efi (plain HTTP; measured boot proves what ran)");
    let image_port = warden_qemu_tests::http::serve_file(&image)?;
    let image_url = format!("http://10.0.2.2:{image_port}/tenant-compressed.qcow2");
    println!(
        "   images     http://127.0.0.1:{image_port}/tenant-compressed.qcow2 (sha256 {})",
        short(&image_sha256)
    );
    let export = work.path().join("snapshot-export.img");
    warden_qemu_tests::node::create_sparse(&export, EXPORT_SIZE)?;
    let nbd = Nbdkit::start(&export);
    println!(
        "   blocks     nbd://127.0.0.1:{}/ (nbdkit, file plugin)",
        nbd.port
    );
    let disk = work.path().join("nvme.img");
    let old_disk = previous_tenant_disk(&disk, DISK_SIZE);
    println!(
        "   node disk  {} MiB NVMe holding tenant lab-a's data (sha256 {})",
        DISK_SIZE / MIB,
        short(&old_disk)
    );

    let extra = "warden.on_error=poweroff warden.done=poweroff";
    let netboot = server.guest_boot_url("warden.ipxe", extra)?;
    let builder = NodeBuilder::new("demo")
        .netboot(&netboot)
        .disk_file(DiskBus::Nvme, &disk, true);

    heading("1. A new node network-boots Warden and is refused: no policy approves it yet");
    let mut first = builder.clone().start().context("starting the QEMU node")?;
    let events = follow(
        &mut first,
        &|e| is_event(e, "fatal") || is_event(e, "verdict"),
        None,
    )?;
    wait_off(&mut first)?;
    let verdict = find(&events, "verdict").context("boot 1 ended without a verdict")?;
    let node_id = find(&events, "tpm_ready")
        .and_then(|t| t["node_id"].as_str().map(str::to_owned))
        .context("no tpm_ready event")?;
    println!(
        "   verdict: {} — {}",
        verdict["status"],
        reasons(verdict).join("; ")
    );
    let reference = ramdisk.dir.join("reference-values.json");
    server.wardenctl_ok(&[
        "policy",
        "learn",
        &node_id,
        "--name",
        "demo-ovmf",
        "--ramdisk",
        path(&reference)?,
        "--store",
    ])?;
    server.wardenctl_ok(&["policy", "assign", "demo-ovmf", "--node", &node_id])?;
    server.wardenctl_ok(&["node", "owner", &node_id, "uni-a"])?;
    println!("   the owner (uni-a) approves this firmware: policy demo-ovmf learned from boot 1,");
    println!(
        "   ramdisk kernel and initrd pinned to {}",
        reference.display()
    );

    heading("2. The owner asks for a turnover: lab-a's lease ends, lab-b's begins");
    let owner = token(&server, work.path(), "owner", "uni-a");
    let lessee = token(&server, work.path(), "lessee", "lab-b");
    let nbd_uri = format!("nbd://10.0.2.2:{}/", nbd.port);
    let plan_args = [
        "turnover",
        &node_id,
        "--image",
        &image_url,
        "--sha256",
        &image_sha256,
        "--snapshot-to",
        &nbd_uri,
        "--handoff",
        "kexec",
        "--lessee",
        "lab-b",
    ];
    println!("   $ wardenctl turnover {}… --image {image_url} --snapshot-to {nbd_uri} --handoff kexec --lessee lab-b", short(&node_id));
    print_indented(&wardenctl_as(&server, &owner, &plan_args)?);

    println!("\n   The node network-boots again and runs the plan:");
    let started = Instant::now();
    let mut second = builder
        .clone()
        .tpm_state(&first.swtpm_state_dir())
        .start()
        .context("starting the QEMU node again")?;
    let mut marks = Marks::default();
    let events = follow(&mut second, &|_| false, Some(&mut marks))?;
    wait_off(&mut second)?;
    let console = second.console_text();
    let Some(booted) = console.lines().find(|l| l.starts_with("TENANT-BOOTED")) else {
        bail!(
            "the tenant OS did not boot; console: {}",
            second.console_path().display()
        );
    };
    if find(&events, "fatal").is_some() {
        bail!(
            "the agent failed; console: {}",
            second.console_path().display()
        );
    }
    println!("\n   tenant console: {booted}");
    if let Some(lease) = console.lines().find(|l| l.starts_with("TENANT-LEASE")) {
        println!("   tenant console: {lease}");
    }

    heading("3. lab-b checks the signed report");
    let report = work.path().join("report.json");
    let keys = work.path().join("keys.json");
    wardenctl_as(
        &server,
        &lessee,
        &["report", "get", &node_id, "--output", path(&report)?],
    )?;
    let fetched = Command::new("curl")
        .args(["-sSf", "--cacert"])
        .arg(server.ca_pem())
        .arg(format!("{}/v1/keys", server.url()))
        .output()?;
    if !fetched.status.success() {
        bail!("GET /v1/keys: {}", String::from_utf8_lossy(&fetched.stderr));
    }
    std::fs::write(&keys, &fetched.stdout)?;
    let verified = wardenctl_as(
        &server,
        &lessee,
        &["report", "verify", path(&report)?, "--key", path(&keys)?],
    )?;
    print_indented(&verified);
    if !verified.contains("report verified") {
        bail!("the report did not verify: {verified}");
    }
    let doc: Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let body = if doc["report"].is_object() {
        &doc["report"]
    } else {
        &doc
    };
    let snapshot_ok = sha256_prefix(&export, DISK_SIZE) == old_disk;
    println!(
        "   outcome {}, final verdict {}, snapshot on the block store {} lab-a's old disk",
        body["outcome"],
        body["final_verdict"]["status"],
        if snapshot_ok {
            "equals"
        } else {
            "DIFFERS FROM"
        }
    );
    if !snapshot_ok {
        bail!("the snapshot does not equal the old disk");
    }
    summary(body, &marks, started.elapsed());

    heading("4. The same machine, after someone turned Secure Boot on in its firmware");
    let signed = secureboot::signed_uki(&server, work.path())?;
    let uki_port = warden_qemu_tests::http::serve_file(&signed)?;
    println!("   Secure Boot firmware with enrolled keys; it accepts only signed images, so it");
    println!(
        "   UEFI-HTTP-boots a signed copy of the ramdisk UKI from http://127.0.0.1:{uki_port}/"
    );
    let mut third = NodeBuilder::new("demo-secureboot")
        .firmware(
            Path::new(secureboot::OVMF_CODE),
            Path::new(secureboot::OVMF_VARS),
        )
        .uefi_http_boot(&format!("http://10.0.2.2:{uki_port}/warden-ramdisk.efi"))
        .disk_file(DiskBus::Nvme, &disk, true)
        .tpm_state(&second.swtpm_state_dir())
        .start()
        .context("starting the Secure Boot node")?;
    let events = follow(
        &mut third,
        &|e| is_event(e, "fatal") || is_event(e, "verdict"),
        None,
    )?;
    third.kill();
    let verdict =
        find(&events, "verdict").context("the Secure Boot boot ended without a verdict")?;
    println!(
        "   verdict: {} (the node stays in the ramdisk; nothing is erased or handed out)",
        verdict["status"]
    );
    let why = reasons(verdict);
    if let Some(pcr7) = why.iter().find(|r| r.starts_with("PCR7")) {
        println!("   reason: {pcr7}; all differences the server found:");
    }
    for r in &why {
        println!("   - {r}");
    }
    if verdict["status"] != "failed" {
        bail!("the Secure Boot node was not refused");
    }
    let nodes = server.wardenctl_ok(&["nodes"])?;
    print_indented(&nodes);
    let refused = wardenctl_refused(&server, &owner, &plan_args)?;
    println!("   a new plan for it is refused: {}", refused.trim());

    heading("Done: server, stores, QEMU and swtpm stopped; temp files removed");
    Ok(())
}

/// When the demo saw each phase of boot 2 (for the table).
#[derive(Default)]
struct Marks {
    verdict: Option<Instant>,
    final_attest: Option<Instant>,
    handoff: Option<Instant>,
    tenant: Option<Instant>,
    started: Option<Instant>,
}

fn is_event(e: &Value, name: &str) -> bool {
    e["event"] == name
}

fn find<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

fn reasons(verdict: &Value) -> Vec<String> {
    verdict["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| match r {
            Value::String(s) => s.clone(),
            other => other["message"]
                .as_str()
                .map_or_else(|| other.to_string(), str::to_owned),
        })
        .collect()
}

fn heading(text: &str) {
    println!("\n== {text}");
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}

fn wardenctl_as(server: &Server, token: &Path, args: &[&str]) -> Result<String> {
    let out = server.wardenctl_as(token, args)?;
    if !out.status.success() {
        bail!(
            "wardenctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wardenctl_refused(server: &Server, token: &Path, args: &[&str]) -> Result<String> {
    let out = server.wardenctl_as(token, args)?;
    if out.status.success() {
        bail!(
            "wardenctl {} was accepted for a refused node",
            args.join(" ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Powers off or is killed: waits for QEMU to end, checking for Ctrl-C.
fn wait_off(node: &mut Node) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        interrupt::check()?;
        if node.exited()?.is_some() {
            node.swtpm().stop();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the node did not power off; console: {}",
                node.console_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Shows the node's console as it comes — the agent's own lines, the
/// network boot and the tenant's — until `stop` matches an event or QEMU
/// ends; returns the console's events. The `WARDEN {json}` lines are the
/// same story for machines and the kernel's messages are noise here.
fn follow(
    node: &mut Node,
    stop: &dyn Fn(&Value) -> bool,
    mut marks: Option<&mut Marks>,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + BOOT_TIMEOUT * 2;
    let mut shown = 0usize;
    let mut out = std::io::stdout().lock();
    if let Some(m) = marks.as_deref_mut() {
        m.started = Some(Instant::now());
    }
    loop {
        interrupt::check()?;
        let ended = node.exited()?.is_some();
        let text = node.console_text();
        let lines: Vec<&str> = text.lines().collect();
        let complete = if text.ends_with('\n') || ended {
            lines.len()
        } else {
            lines.len().saturating_sub(1)
        };
        for line in &lines[shown.min(complete)..complete] {
            let line = strip_escapes(line);
            if let Some(m) = marks.as_deref_mut() {
                if line.starts_with("TENANT-BOOTED") {
                    m.tenant.get_or_insert_with(Instant::now);
                }
            }
            if worth_showing(&line) {
                writeln!(out, "   node | {line}")?;
            }
        }
        shown = shown.max(complete);
        out.flush()?;
        let events = node.events();
        if let Some(m) = marks.as_deref_mut() {
            if find(&events, "verdict").is_some() {
                m.verdict.get_or_insert_with(Instant::now);
            }
            let reached = |to: &str| {
                events
                    .iter()
                    .any(|e| e["event"] == "state" && e["to"] == to)
            };
            if reached("FinalAttest") {
                m.final_attest.get_or_insert_with(Instant::now);
            }
            if reached("Handoff") {
                m.handoff.get_or_insert_with(Instant::now);
            }
        }
        if ended || events.iter().any(stop) {
            return Ok(events);
        }
        if Instant::now() > deadline {
            bail!(
                "the node did not finish within {:?}; console: {}",
                BOOT_TIMEOUT * 2,
                node.console_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's lines (`[   12.345] …`, three decimals), the tenant's, and
/// the boot loader's downloads; not the kernel's (`[    1.234567]`).
fn worth_showing(line: &str) -> bool {
    if line.starts_with("TENANT-") {
        return !line.starts_with("TENANT-PCR");
    }
    if line.contains("http://") && line.ends_with("ok") {
        return true;
    }
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let stamp = rest.split(']').next().unwrap_or_default().trim();
    let agent = stamp
        .split_once('.')
        .is_some_and(|(_, frac)| frac.len() == 3);
    // Detail a person watching does not need: it is all in the records.
    const DETAIL: &[&str] = &[
        "WARDEN {",
        "] init: ",
        "optional soft dependency",
        "] DHCP: trying",
        "] coldplug: ",
        "] nvme: identified",
        "record of",
        "device capabilities",
        "] config: ",
        "] eventlog: ",
    ];
    agent && !DETAIL.iter().any(|d| line.contains(d))
}

/// The table: step, time, bytes, rate. Boot and the two attestations are
/// what the demo saw on the console; snapshot, wipe and image come from the
/// signed report; handoff is from the agent's Handoff state to the
/// tenant's first line.
fn summary(report: &Value, marks: &Marks, total: Duration) {
    let mut rows = Vec::new();
    let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) if b >= a => Some((b - a).as_secs_f64()),
        _ => None,
    };
    if let Some(s) = secs(marks.started, marks.verdict) {
        rows.push(Row {
            step: "network boot + attest".into(),
            seconds: s,
            bytes: None,
        });
    }
    for step in report["steps"].as_array().into_iter().flatten() {
        rows.push(Row {
            step: step["step"].as_str().unwrap_or("?").to_owned(),
            seconds: step["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            bytes: step["bytes"].as_u64(),
        });
    }
    if let Some(s) = secs(marks.final_attest, marks.handoff) {
        rows.push(Row {
            step: "final attest".into(),
            seconds: s,
            bytes: None,
        });
    }
    if let Some(s) = secs(marks.handoff, marks.tenant) {
        rows.push(Row {
            step: "kexec → TENANT-BOOTED".into(),
            seconds: s,
            bytes: None,
        });
    }
    println!(
        "\n   {:<38} {:>9} {:>12} {:>12}",
        "step", "time", "bytes", "rate"
    );
    for r in &rows {
        let (bytes, rate) = match r.bytes {
            Some(b) if b > 0 => (
                format!("{:.1} MiB", b as f64 / MIB as f64),
                if r.seconds > 0.0 {
                    format!("{:.1} MiB/s", b as f64 / MIB as f64 / r.seconds)
                } else {
                    "-".into()
                },
            ),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "   {:<38} {:>8.1}s {:>12} {:>12}",
            r.step, r.seconds, bytes, rate
        );
    }
    println!(
        "   {:<38} {:>8.1}s",
        "whole turnover (power-on to tenant off)",
        total.as_secs_f64()
    );
}

/// The console line without terminal control sequences (OVMF clears the
/// screen with `ESC [ 2 J` and friends) and carriage returns.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters… final byte in @..~
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{strip_escapes, worth_showing};

    #[test]
    fn strips_csi_sequences_and_carriage_returns() {
        assert_eq!(
            strip_escapes("\u{1b}[2J\u{1b}[01;01H\u{1b}[=3h[    2.5] agent starting\r"),
            "[    2.5] agent starting"
        );
        assert_eq!(strip_escapes("plain"), "plain");
    }

    #[test]
    fn shows_the_agent_and_tenant_not_the_kernel() {
        assert!(worth_showing(
            "[    5.872] workflow: Attest -> Plan (session_opened)"
        ));
        assert!(!worth_showing(
            "[    2.452] config: from kernel command line"
        ));
        assert!(!worth_showing("[    2.616] init: mount /proc ok"));
        assert!(!worth_showing(
            "[    1.579028] ima: Can not allocate sha384"
        ));
        assert!(worth_showing("TENANT-BOOTED"));
        assert!(!worth_showing("TENANT-PCR 4 abc"));
        assert!(worth_showing("http://10.0.2.2:1/boot/warden.ipxe... ok"));
        assert!(!worth_showing("WARDEN {\"event\":\"x\"}"));
    }
}
