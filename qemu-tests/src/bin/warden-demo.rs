//! `warden-demo`: what `scripts/demo` runs. Starts a real Warden server on
//! loopback (trusting swtpm-localca as the TPM manufacturer) and one QEMU
//! node (OVMF firmware, swtpm TPM, a virtio and an NVMe disk) that boots the
//! Warden ramdisk twice:
//! 1. a new node: it enrolls and attests, and the server refuses it because
//!    no policy approves its firmware yet — the node powers off untouched;
//! 2. the owner learns a policy from that attestation, pinned to the
//!    ramdisk's reference values, and assigns it; the same node (same TPM)
//!    boots again and attests OK.
//!
//! It shows the node's console and the server's view. Everything it started
//! is stopped when it ends, also on failure.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{ramdisk_dir, DiskBus, Node, NodeBuilder, QemuLock, Server};

const GIB: u64 = 1 << 30;

fn main() {
    if let Err(e) = run() {
        eprintln!("warden-demo: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let ramdisk = ramdisk_dir()?;
    let _lock = QemuLock::acquire()?;

    println!("== Warden server");
    let server = Server::start_trusting_swtpm().context("starting warden-attest-server")?;
    println!(
        "   listening on {} (the node reaches it as {})",
        server.url(),
        server.guest_url()
    );
    println!("   ca-fingerprint: {}", server.ca_pin());
    println!("   data: {}", server.data_dir().display());
    println!("   trusts EK certificates issued by swtpm-localca (the \"TPM manufacturer\")");

    let cmdline = format!(
        "console=ttyS0 quiet warden.server={} warden.ca={} warden.on_error=poweroff warden.done=poweroff",
        server.guest_url(),
        server.ca_pin()
    );
    println!(
        "\n== Boot 1: a new QEMU node (OVMF + swtpm + virtio-blk 1 GiB + NVMe 2 GiB) boots build/ramdisk"
    );
    println!("   kernel command line: {cmdline}\n");
    let builder = NodeBuilder::new("demo")
        .kernel(&ramdisk.kernel, &ramdisk.initrd, &cmdline)
        .disk(DiskBus::VirtioBlk, GIB)
        .disk(DiskBus::Nvme, 2 * GIB);
    let mut first = builder.clone().start().context("starting the QEMU node")?;
    let events = show_boot(&mut first)?;
    let verdict = find(&events, "verdict").context("boot 1 ended without a verdict")?;
    let node_id = find(&events, "tpm_ready")
        .and_then(|t| t["node_id"].as_str().map(str::to_owned))
        .context("no tpm_ready event")?;
    println!(
        "\n== The server refused boot 1 ({}), and the node powered off without touching a disk:",
        verdict["status"]
    );
    for reason in verdict["reasons"].as_array().into_iter().flatten() {
        println!("   - {}", reason.as_str().unwrap_or_default());
    }
    first
        .wait_exit(Duration::from_secs(60))
        .context("waiting for the node to power off")?;
    first.swtpm().stop();

    let reference = ramdisk.dir.join("reference-values.json");
    println!(
        "\n== The owner approves this firmware: a policy learned from boot 1's attestation,\n   with the ramdisk kernel and initrd pinned to {}",
        reference.display()
    );
    let policy_file = first.dir().join("demo-policy.json");
    wardenctl(
        &server,
        &[
            "policy",
            "learn",
            &node_id,
            "--name",
            "demo-ovmf",
            "--ramdisk",
            path(&reference)?,
            "--out",
            path(&policy_file)?,
        ],
    )?;
    print_policy_summary(&policy_file)?;
    print!(
        "   {}",
        wardenctl(&server, &["policy", "put", path(&policy_file)?])?
    );
    print!(
        "   {}",
        wardenctl(
            &server,
            &["policy", "assign", "demo-ovmf", "--node", &node_id]
        )?
    );

    println!("\n== Boot 2: the same node (same TPM) boots again\n");
    let mut second = builder
        .tpm_state(&first.swtpm_state_dir())
        .start()
        .context("starting the QEMU node again")?;
    let events = show_boot(&mut second)?;
    if find(&events, "ready").is_none() {
        bail!("boot 2 did not become ready");
    }
    println!(
        "\n== Boot 2 attested OK and is ready after {:.1} s. The server's view:\n",
        second.started_at().elapsed().as_secs_f64()
    );
    print!("{}", wardenctl(&server, &["nodes"])?);
    println!();
    print!("{}", wardenctl(&server, &["attestations"])?);
    println!("\n   (wardenctl verdict NODE, attestations --json, policy show demo-ovmf: the same for machines and people.)");

    second
        .wait_exit(Duration::from_secs(60))
        .context("waiting for the node to power off")?;
    println!("\n== The node powered off; server and swtpm stopped. Demo done.");
    Ok(())
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn find<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

fn wardenctl(server: &Server, args: &[&str]) -> Result<String> {
    server.wardenctl_ok(args)
}

/// One line per PCR of the learned policy: how many events it expects.
fn print_policy_summary(file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file)?;
    let policy: Value = serde_json::from_str(&text)?;
    let pcrs = policy["pcrs"].as_object().context("policy without pcrs")?;
    for (pcr, rule) in pcrs {
        let events = rule["events"].as_array().map_or(0, Vec::len);
        let what = if events > 0 {
            let pinned: Vec<&str> = rule["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["description"].as_str())
                .filter(|d| d.contains("reference") || *d == "Linux initrd")
                .collect();
            if pinned.is_empty() {
                format!("{events} event(s)")
            } else {
                format!("{events} event(s), pinned: {}", pinned.join(", "))
            }
        } else {
            "value".to_owned()
        };
        println!("   PCR{pcr:<2} {what}");
    }
    Ok(())
}

/// Echoes the agent's human-readable console lines until the boot reaches
/// `ready` or `fatal`; returns the console events. The WARDEN {json} lines
/// are the same events for machines, so they are left out.
fn show_boot(node: &mut Node) -> Result<Vec<Value>> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut shown = 0usize;
    let mut out = std::io::stdout().lock();
    loop {
        let text = node.console_text();
        let lines: Vec<&str> = text.lines().collect();
        // The last line may still be half-written: show it on the next poll.
        let complete = if text.ends_with('\n') {
            lines.len()
        } else {
            lines.len().saturating_sub(1)
        };
        for line in &lines[shown.min(complete)..complete] {
            let line = strip_escapes(line);
            if !line.contains("WARDEN {") && !line.trim().is_empty() {
                writeln!(out, "   node | {line}")?;
            }
        }
        shown = shown.max(complete);
        out.flush()?;

        let events = node.events();
        if events
            .iter()
            .any(|e| e["event"] == "ready" || e["event"] == "fatal")
        {
            return Ok(events);
        }
        if Instant::now() > deadline {
            bail!(
                "the node neither became ready nor stopped within {BOOT_TIMEOUT:?}; console: {}",
                node.console_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
    use super::strip_escapes;

    #[test]
    fn strips_csi_sequences_and_carriage_returns() {
        assert_eq!(
            strip_escapes("\u{1b}[2J\u{1b}[01;01H\u{1b}[=3h[    2.5] agent starting\r"),
            "[    2.5] agent starting"
        );
        assert_eq!(strip_escapes("plain"), "plain");
    }
}
