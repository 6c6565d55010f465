//! The production-like boot network of LAB.md, in a network namespace the
//! test creates: a bridge with the server's address, a tap for one QEMU
//! node, and dnsmasq answering DHCP (PXE first, then the iPXE user class),
//! TFTP (`ipxe.efi`) and IPv6 router advertisements.
//!
//! It owns the namespace and everything in it: dnsmasq is stopped by PID,
//! and the tap, the bridge and the namespace are deleted on drop, also when
//! the test panicked. It must never touch the host's own interfaces or
//! namespaces other than the one it created (every `ip` call names it), and
//! never stop processes it did not start.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::{run_with_timeout, ChildGuard, POLL};

/// The bridge inside the namespace; the server and dnsmasq listen on it.
pub const BRIDGE: &str = "br0";
/// The tap QEMU attaches to (`-netdev tap,ifname=…`).
pub const TAP: &str = "tap0";
/// The bridge's IPv4 address (a /24): the server's address as nodes see it.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 1);
/// The bridge's IPv6 address, in [`RA_PREFIX`]/64.
pub const HOST_IP6: &str = "fd99::1/64";
/// The prefix dnsmasq advertises (RA only, no DHCPv6) so iPXE configures
/// IPv6 at once instead of waiting ~12 s for it (LAB.md).
pub const RA_PREFIX: &str = "fd99::";
/// Debian's `ipxe.efi` (package `ipxe`): what OVMF's PXE fetches over TFTP.
pub const IPXE_EFI: &str = "/usr/lib/ipxe/ipxe.efi";

/// How long one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long dnsmasq may take to log that it is serving.
const DNSMASQ_START: Duration = Duration::from_secs(30);

/// Makes namespace names unique within this process (the PID makes them
/// unique across processes).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS…`; a failure quotes its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = run_with_timeout("ip", Command::new("ip").args(args), IP_TIMEOUT)
        .with_context(|| format!("`ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace with [`BRIDGE`] (at [`HOST_IP`]/24 and [`HOST_IP6`])
/// and [`TAP`] enslaved to it; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `warden-LABEL-PID-N` with the bridge and the tap. An error
    /// names the step; the first one (`ip netns add`) is what fails where
    /// namespaces are not permitted (not root, no CAP_SYS_ADMIN).
    pub fn create(label: &str) -> Result<NetNs> {
        let name = format!(
            "warden-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])
            .with_context(|| format!("network namespace {name} (needs root)"))?;
        // From here on, Drop removes whatever was made.
        let ns = NetNs { name };
        ns.build()
            .with_context(|| format!("bridge and tap in network namespace {}", ns.name))?;
        Ok(ns)
    }

    fn build(&self) -> Result<()> {
        let n = self.name.as_str();
        let v4 = format!("{HOST_IP}/24");
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        // No STP, no forwarding delay: the tap forwards as soon as QEMU
        // opens it, so the firmware's first DHCPDISCOVER is not lost.
        ip(&[
            "-n",
            n,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", n, "addr", "add", &v4, "dev", BRIDGE])?;
        // `nodad`: usable at once, so dnsmasq can bind and advertise it.
        ip(&["-n", n, "addr", "add", HOST_IP6, "dev", BRIDGE, "nodad"])?;
        ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", n, "link", "set", TAP, "master", BRIDGE])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        ip(&["-n", n, "link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    /// The namespace's name (for `ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace. `ip netns exec`
    /// execs it (no fork), so the spawned PID is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.name, program)
    }
}

/// `ip netns exec NETNS PROGRAM` as a [`Command`] to add arguments to.
pub fn netns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program);
    cmd
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace would take the tap and the bridge with it
        // once no process holds it; deleting them first does not depend on
        // that.
        let n = self.name.as_str();
        let _ = ip(&["-n", n, "link", "del", TAP]);
        let _ = ip(&["-n", n, "link", "del", BRIDGE]);
        if let Err(e) = ip(&["netns", "del", n]) {
            eprintln!("could not remove network namespace {n}: {e:#}");
        }
    }
}

/// dnsmasq inside a [`NetNs`], on [`BRIDGE`]: DHCP with the LAB.md
/// user-class match (a PXE client gets `ipxe.efi` over TFTP, iPXE gets the
/// script URL), TFTP from its own directory holding a copy of
/// [`IPXE_EFI`], and IPv6 RA. No DNS. Logs every DHCP exchange (`--log-dhcp`)
/// to a file.
#[derive(Debug)]
pub struct Dnsmasq {
    // First: stopped before its directory (log, TFTP root) is removed.
    child: ChildGuard,
    dir: TempDir,
}

impl Dnsmasq {
    /// Starts it and waits until it has logged that TFTP is up (the last
    /// thing it logs on start-up). `ipxe_script_url` is the bootfile
    /// handed to clients whose user class is `iPXE`.
    pub fn start_pxe(netns: &NetNs, ipxe_script_url: &str) -> Result<Dnsmasq> {
        crate::require_program("dnsmasq")?;
        if ipxe_script_url.len() > 127 {
            // The BOOTP `file` field holds 128 bytes with its NUL.
            bail!("iPXE script URL {ipxe_script_url} is longer than DHCP's 127-byte bootfile");
        }
        let dir = tempfile::Builder::new()
            .prefix("warden-dnsmasq-")
            .tempdir()
            .context("temp dir for dnsmasq")?;
        let tftp = dir.path().join("tftp");
        std::fs::create_dir(&tftp).with_context(|| format!("create {}", tftp.display()))?;
        // A copy, not the symlink Debian ships (it points into /boot, outside
        // the TFTP root).
        std::fs::copy(IPXE_EFI, tftp.join("ipxe.efi"))
            .with_context(|| format!("copy {IPXE_EFI} (install ipxe: scripts/setup)"))?;
        let log = dir.path().join("dnsmasq.log");
        let stderr_path = dir.path().join("dnsmasq.stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let o = HOST_IP.octets();
        let net = format!("{}.{}.{}", o[0], o[1], o[2]);
        let mut cmd = netns.command("dnsmasq");
        cmd.args(["--no-daemon", "--conf-file=/dev/null", "--port=0"])
            .arg(format!("--interface={BRIDGE}"))
            .arg("--bind-interfaces")
            .arg(format!("--dhcp-range={net}.100,{net}.150,255.255.255.0,1h"))
            .arg("--dhcp-authoritative")
            .arg(format!("--dhcp-range={RA_PREFIX},ra-only"))
            .arg("--enable-ra")
            .arg("--enable-tftp")
            .arg(format!("--tftp-root={}", tftp.display()))
            // LAB.md's recipe: the firmware's PXE client gets ipxe.efi over
            // TFTP; iPXE then says so in its user class and gets the script.
            .arg("--dhcp-userclass=set:ipxe,iPXE")
            .arg("--dhcp-boot=tag:!ipxe,ipxe.efi")
            .arg(format!("--dhcp-boot=tag:ipxe,{ipxe_script_url}"))
            // iPXE's option 175.176 (no-pxedhcp): there is no ProxyDHCP
            // server here, so iPXE need not wait ~8 s for one.
            .arg("--dhcp-option=tag:ipxe,encap:175,176,1b")
            // One node on a network of our own: skip the ~3 s ICMP probe of
            // each address before offering it.
            .arg("--no-ping")
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.path().join("leases").display()
            ))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("dnsmasq.pid").display()
            ))
            .arg(format!("--log-facility={}", log.display()))
            .arg("--log-dhcp")
            // Stay root: the TFTP root and the log live in a 0700 temp dir.
            .arg("--user=root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = ChildGuard::spawn("dnsmasq", &mut cmd)?;
        let deadline = Instant::now() + DNSMASQ_START;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("TFTP root is") {
                return Ok(Dnsmasq { child, dir });
            }
            let why = if let Some(status) = child.try_wait()? {
                format!("exited ({status})")
            } else if Instant::now() >= deadline {
                child.stop();
                format!("did not log `TFTP root is` within {DNSMASQ_START:?}")
            } else {
                std::thread::sleep(POLL);
                continue;
            };
            bail!(
                "dnsmasq in {}: {why}; log:\n{text}\nstderr:\n{}",
                netns.name(),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
    }

    /// dnsmasq's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// dnsmasq's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.log")
    }

    /// Copies the log into `dest` (for a failed test's logs).
    pub fn keep_logs(&self, dest: &Path) {
        for name in ["dnsmasq.log", "dnsmasq.stderr"] {
            let _ = std::fs::copy(self.dir.path().join(name), dest.join(name));
        }
    }

    /// Stops dnsmasq now; drop does the same.
    pub fn stop(&mut self) {
        self.child.stop();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.child.stop();
        if std::thread::panicking() {
            match crate::paths::new_failed_logs_dir("dnsmasq") {
                Ok(dest) => {
                    self.keep_logs(&dest);
                    eprintln!("dnsmasq logs of the failed test kept in {}", dest.display());
                }
                Err(e) => eprintln!("could not keep the dnsmasq logs: {e:#}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_command_execs_the_program_inside() {
        let cmd = netns_command("ns1", "dnsmasq");
        assert_eq!(cmd.get_program(), "ip");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["netns", "exec", "ns1", "dnsmasq"]);
    }
}
