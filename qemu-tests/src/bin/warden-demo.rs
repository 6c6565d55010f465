//! `warden-demo`: what `scripts/demo` runs. Starts a real Warden server on
//! loopback and one QEMU node (OVMF firmware, swtpm TPM, a virtio and an
//! NVMe disk) that boots the Warden ramdisk; shows the node's console as it
//! boots and reports, then the server's view through `wardenctl nodes`.
//! Everything it started is stopped when it ends, also on failure.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warden_qemu_tests::node::BOOT_TIMEOUT;
use warden_qemu_tests::{ramdisk_dir, DiskBus, NodeBuilder, QemuLock, Server};

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
    let server = Server::start().context("starting warden-attest-server")?;
    println!(
        "   listening on {} (the node reaches it as {})",
        server.url(),
        server.guest_url()
    );
    println!("   ca-fingerprint: {}", server.ca_pin());
    println!("   data: {}", server.data_dir().display());

    let cmdline = format!(
        "console=ttyS0 quiet warden.server={} warden.ca={} warden.done=poweroff",
        server.guest_url(),
        server.ca_pin()
    );
    println!(
        "\n== QEMU node: OVMF + swtpm + virtio-blk (1 GiB) + NVMe (2 GiB), booting build/ramdisk"
    );
    println!("   kernel command line: {cmdline}\n");
    let mut node = NodeBuilder::new("demo")
        .kernel(&ramdisk.kernel, &ramdisk.initrd, &cmdline)
        .disk(DiskBus::VirtioBlk, GIB)
        .disk(DiskBus::Nvme, 2 * GIB)
        .start()
        .context("starting the QEMU node")?;

    // Echo the agent's human-readable lines as they appear; the WARDEN
    // {json} lines are the same events for machines, so they are left out.
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
        if let Some(fatal) = events.iter().find(|e| e["event"] == "fatal") {
            bail!("the node reported a fatal error: {}", fatal["error"]);
        }
        if events.iter().any(|e| e["event"] == "ready") {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the node did not become ready within {BOOT_TIMEOUT:?}; console: {}",
                node.console_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(out);

    println!(
        "\n== The node is ready after {:.1} s. The server's view (wardenctl nodes):\n",
        node.started_at().elapsed().as_secs_f64()
    );
    let output = server.wardenctl(&["nodes"])?;
    if !output.status.success() {
        bail!(
            "wardenctl nodes failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&output.stdout));
    println!("\n   (`wardenctl ... nodes --json` prints the same as JSON, with PCR values and inventory.)");

    node.wait_exit(Duration::from_secs(60))
        .context("waiting for the node to power off")?;
    println!("\n== The node powered off; server and swtpm stopped. Demo done.");
    Ok(())
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
