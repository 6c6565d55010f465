//! A QEMU node: q35 under TCG, OVMF firmware with its own variable store,
//! a fresh swtpm, virtio-net on user networking, sparse virtio-blk/NVMe
//! disks, and the serial console captured to a file.
//!
//! A node owns everything it starts and stops it on drop (QEMU first, then
//! swtpm), even when the test panicked; a failed test's console, QEMU and
//! swtpm logs are copied to `target/qemu-tests-logs/`. Nodes never use KVM
//! (guests die under it here; LAB.md) and never get a network other than
//! QEMU's user network (the guest reaches the host's 127.0.0.1 as 10.0.2.2)
//! or a tap inside a network namespace the test created ([`crate::netns`]).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::console::ConsoleWatcher;
use crate::process::ChildGuard;
use crate::swtpm::{Swtpm, SwtpmTransport};

/// OVMF firmware code (read-only, shared by all nodes).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF variable store template (copied per node).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF built with Secure Boot support (SMM).
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
/// Variable store with Microsoft's keys enrolled: Secure Boot on.
pub const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Generous bound for a whole boot to `ready` under TCG + OVMF on 2 busy cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How a disk is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskBus {
    VirtioBlk,
    Nvme,
}

#[derive(Clone, Debug)]
struct DiskSpec {
    bus: DiskBus,
    size_bytes: u64,
    /// `discard=unmap,detect-zeroes=unmap` (QEMU's default is to ignore
    /// discards: the guest's discard "succeeds" and the data stays).
    discard: bool,
    /// An image the caller made (and keeps); `None`: a new sparse file.
    file: Option<PathBuf>,
}

/// Describes a node; [`NodeBuilder::start`] boots it.
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    name: String,
    kernel: Option<(PathBuf, PathBuf, String)>,
    memory_mib: u32,
    smp: u32,
    disks: Vec<DiskSpec>,
    netdev_user_options: String,
    extra_args: Vec<OsString>,
    firmware: (PathBuf, PathBuf),
    tpm_state: Option<PathBuf>,
    netboot: Option<String>,
    /// `(network namespace, tap)`: QEMU runs inside the namespace on the tap.
    tap: Option<(String, String)>,
    /// UEFI HTTP boot (OVMF's own network stack) instead of iPXE.
    http_boot: bool,
    allow_reboot: bool,
}

impl NodeBuilder {
    /// A node named `name` (used in logs), 1 GiB RAM, no disks.
    pub fn new(name: &str) -> NodeBuilder {
        NodeBuilder {
            name: name.to_string(),
            kernel: None,
            memory_mib: 1024,
            smp: 1,
            disks: Vec::new(),
            netdev_user_options: String::new(),
            extra_args: Vec::new(),
            firmware: (PathBuf::from(OVMF_CODE), PathBuf::from(OVMF_VARS)),
            tpm_state: None,
            netboot: None,
            tap: None,
            http_boot: false,
            allow_reboot: false,
        }
    }

    /// Firmware code and the variable-store template copied for this node
    /// (default: plain OVMF). [`OVMF_CODE_SECBOOT`] + [`OVMF_VARS_MS`] boot
    /// with Secure Boot on; the secboot build needs SMM, which this adds.
    pub fn firmware(mut self, code: &Path, vars_template: &Path) -> NodeBuilder {
        self.firmware = (code.to_path_buf(), vars_template.to_path_buf());
        self
    }

    /// Boots with a copy of an earlier node's TPM state (see
    /// [`Node::tpm_state_dir`]): the same TPM — same EK — rebooted.
    pub fn tpm_state(mut self, state_dir: &Path) -> NodeBuilder {
        self.tpm_state = Some(state_dir.to_path_buf());
        self
    }

    /// Direct kernel boot (`-kernel -initrd -append`) through OVMF.
    /// `console=ttyS0` is added to `cmdline` if it is not there, since the
    /// harness reads the serial console.
    pub fn kernel(mut self, kernel: &Path, initrd: &Path, cmdline: &str) -> NodeBuilder {
        let cmdline = if cmdline
            .split_whitespace()
            .any(|a| a.starts_with("console=ttyS0"))
        {
            cmdline.to_string()
        } else {
            format!("console=ttyS0 {cmdline}")
        };
        self.kernel = Some((kernel.to_path_buf(), initrd.to_path_buf(), cmdline));
        self
    }

    /// Network boot: the NIC boots first (`bootindex=1`) with QEMU's iPXE
    /// ROM, and user networking's DHCP names `bootfile_url` (an iPXE script,
    /// e.g. [`crate::Server::guest_boot_url`]).
    pub fn netboot(mut self, bootfile_url: &str) -> NodeBuilder {
        self.netboot = Some(bootfile_url.to_string());
        self
    }

    /// Network boot on a tap instead of user networking: QEMU runs inside
    /// network namespace `netns` (`ip netns exec`) with
    /// `-netdev tap,ifname=IFNAME,script=no,downscript=no`, and the NIC boots
    /// first with no option ROM, so OVMF's own PXE client asks that
    /// network's DHCP server (e.g. [`crate::netns::Dnsmasq`]) what to boot.
    /// [`NodeBuilder::netboot`] and [`NodeBuilder::netdev_user_options`] do
    /// not apply then.
    pub fn tap(mut self, netns: &str, ifname: &str) -> NodeBuilder {
        self.tap = Some((netns.to_string(), ifname.to_string()));
        self
    }

    /// UEFI HTTP boot: OVMF's own HTTP client fetches `efi_url` (a UKI) and
    /// starts it, no iPXE ROM; PXE is switched off in the firmware so it does
    /// not spend a minute on DHCPv6 first (LAB.md). Secure Boot firmware
    /// verifies the image like any other.
    pub fn uefi_http_boot(mut self, efi_url: &str) -> NodeBuilder {
        self.netboot = Some(efi_url.to_string());
        self.http_boot = true;
        self
    }

    /// Lets a guest reboot restart the machine instead of ending QEMU (the
    /// default is `-no-reboot`, so a reboot ends the run).
    pub fn allow_reboot(mut self) -> NodeBuilder {
        self.allow_reboot = true;
        self
    }

    /// Guest RAM in MiB (default 1024).
    pub fn memory_mib(mut self, mib: u32) -> NodeBuilder {
        self.memory_mib = mib;
        self
    }

    /// Virtual CPUs (default 1). Under TCG each vCPU is a host thread
    /// (MTTCG), so more than the host's cores only adds contention.
    pub fn smp(mut self, cpus: u32) -> NodeBuilder {
        self.smp = cpus.max(1);
        self
    }

    /// Adds a disk backed by a sparse file of `size_bytes` in the node's temp dir.
    pub fn disk(self, bus: DiskBus, size_bytes: u64) -> NodeBuilder {
        self.disk_with(bus, size_bytes, true)
    }

    /// [`NodeBuilder::disk`], choosing whether guest discards reach the
    /// file (`discard: false` attaches it without
    /// `discard=unmap,detect-zeroes=unmap`).
    pub fn disk_with(mut self, bus: DiskBus, size_bytes: u64, discard: bool) -> NodeBuilder {
        self.disks.push(DiskSpec {
            bus,
            size_bytes,
            discard,
            file: None,
        });
        self
    }

    /// Attaches an existing raw image (e.g. one filled with data before
    /// boot, or left by an earlier node); the node neither creates nor
    /// removes it, so it can be read after the node is gone.
    pub fn disk_file(mut self, bus: DiskBus, image: &Path, discard: bool) -> NodeBuilder {
        self.disks.push(DiskSpec {
            bus,
            size_bytes: 0,
            discard,
            file: Some(image.to_path_buf()),
        });
        self
    }

    /// Extra options for `-netdev user,id=n0,…` (e.g. `tftp=DIR,bootfile=X`).
    pub fn netdev_user_options(mut self, opts: &str) -> NodeBuilder {
        self.netdev_user_options = opts.to_string();
        self
    }

    /// An extra QEMU argument, appended last.
    pub fn arg(mut self, arg: impl Into<OsString>) -> NodeBuilder {
        self.extra_args.push(arg.into());
        self
    }

    /// Provisions a swtpm, creates the disks, and starts QEMU.
    pub fn start(self) -> Result<Node> {
        crate::require_program(QEMU)?;
        let (code, vars_template) = &self.firmware;
        for f in [code, vars_template] {
            if !f.is_file() {
                bail!("{} is missing (install ovmf: scripts/setup)", f.display());
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("warden-node-{}-", self.name))
            .tempdir()
            .context("temp dir for the node")?;
        let swtpm = match &self.tpm_state {
            Some(state) => Swtpm::start_from_state(SwtpmTransport::Unix, state)?,
            None => Swtpm::start(SwtpmTransport::Unix)?,
        };
        let sock = swtpm
            .socket_path()
            .context("unix swtpm has no socket path")?;

        let vars = dir.path().join("OVMF_VARS.fd");
        std::fs::copy(vars_template, &vars)
            .with_context(|| format!("copy {} to {}", vars_template.display(), vars.display()))?;
        let console = dir.path().join("console.log");
        let qemu_log = dir.path().join("qemu.log");

        let mut cmd = match &self.tap {
            Some((netns, _)) => crate::netns::netns_command(netns, QEMU),
            None => Command::new(QEMU),
        };
        cmd.args(["-name", &format!("warden-{}", self.name)])
            // `+rdrand`: TCG's default qemu64 model has no RDRAND, so the
            // guest kernel's CRNG waits ~1 s for jitter entropy at the first
            // getrandom(); every server this runs on has RDRAND, which
            // Debian's kernel trusts at boot (LAB.md).
            .args(["-accel", "tcg", "-machine"])
            .arg(if code.as_path() == Path::new(OVMF_CODE_SECBOOT) {
                // The secboot build keeps its variables in SMM.
                "q35,smm=on"
            } else {
                "q35"
            })
            .args(["-cpu", "qemu64,+rdrand"])
            .args(if code.as_path() == Path::new(OVMF_CODE_SECBOOT) {
                &["-global", "driver=cfi.pflash01,property=secure,value=on"][..]
            } else {
                &[][..]
            })
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.smp.to_string()])
            .args(["-nographic", "-nodefaults"])
            .args(if self.allow_reboot {
                &[][..]
            } else {
                &["-no-reboot"][..]
            })
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", sock.display()))
            .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
            .args(["-device", "tpm-tis,tpmdev=tpm0"])
            .arg("-netdev")
            .arg(if let Some((_, ifname)) = &self.tap {
                format!("tap,id=n0,ifname={ifname},script=no,downscript=no")
            } else {
                let mut netdev = "user,id=n0".to_string();
                if let Some(url) = &self.netboot {
                    // A comma would end the option; QEMU escapes it as ",,".
                    netdev.push_str(&format!(",bootfile={}", url.replace(',', ",,")));
                }
                if !self.netdev_user_options.is_empty() {
                    netdev.push(',');
                    netdev.push_str(&self.netdev_user_options);
                }
                netdev
            })
            .arg("-device")
            .arg(if self.tap.is_some() || self.http_boot {
                // No iPXE ROM: OVMF's PXE fetches the network's own boot
                // loader (LAB.md), as a bare-metal node's firmware would.
                "virtio-net-pci,netdev=n0,romfile=,bootindex=1"
            } else if self.netboot.is_some() {
                // QEMU's own iPXE ROM runs the script (LAB.md: Debian's
                // ipxe.efi loops on user-net); the NIC boots before disks.
                "virtio-net-pci,netdev=n0,bootindex=1"
            } else {
                "virtio-net-pci,netdev=n0,romfile="
            });
        if self.http_boot {
            for v in ["IPv4PXESupport", "IPv6PXESupport"] {
                cmd.arg("-fw_cfg")
                    .arg(format!("name=opt/org.tianocore/{v},string=no"));
            }
        }

        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let path = match &d.file {
                Some(image) => {
                    if !image.is_file() {
                        bail!("disk image {} is missing", image.display());
                    }
                    image.clone()
                }
                None => {
                    let path = dir.path().join(format!("disk{i}.img"));
                    create_sparse(&path, d.size_bytes)?;
                    path
                }
            };
            cmd.arg("-drive").arg(format!(
                "file={},if=none,id=d{i},format=raw{}",
                path.display(),
                if d.discard {
                    ",discard=unmap,detect-zeroes=unmap"
                } else {
                    ""
                }
            ));
            cmd.arg("-device").arg(match d.bus {
                DiskBus::VirtioBlk => format!("virtio-blk-pci,drive=d{i}"),
                DiskBus::Nvme => format!("nvme,serial=nvme{i},drive=d{i}"),
            });
            disks.push(path);
        }
        if let Some((kernel, initrd, cmdline)) = &self.kernel {
            for f in [kernel, initrd] {
                if !f.is_file() {
                    bail!("{} is missing", f.display());
                }
            }
            cmd.arg("-kernel").arg(kernel);
            cmd.arg("-initrd").arg(initrd);
            cmd.arg("-append").arg(cmdline);
        }
        cmd.arg("-serial")
            .arg(format!("file:{}", console.display()));
        cmd.args(&self.extra_args);

        let log =
            File::create(&qemu_log).with_context(|| format!("create {}", qemu_log.display()))?;
        let log_err = log.try_clone().context("dup qemu.log")?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        std::fs::write(dir.path().join("qemu.cmdline"), format!("{cmd:?}\n"))
            .context("write qemu.cmdline")?;

        let qemu = ChildGuard::spawn(QEMU, &mut cmd)?;
        let started = Instant::now();
        Ok(Node {
            name: self.name,
            qemu,
            swtpm,
            console: ConsoleWatcher::new(&console),
            qemu_log,
            disks,
            started,
            dir,
        })
    }
}

/// Creates a sparse file of `size_bytes` (no blocks allocated).
pub fn create_sparse(path: &Path, size_bytes: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size_bytes)
        .with_context(|| format!("truncate {} to {size_bytes} bytes", path.display()))
}

/// A running (or exited) QEMU node.
#[derive(Debug)]
pub struct Node {
    name: String,
    qemu: ChildGuard,
    swtpm: Swtpm,
    console: ConsoleWatcher,
    qemu_log: PathBuf,
    disks: Vec<PathBuf>,
    started: Instant,
    // Last: removed after QEMU and swtpm are stopped (Drop::drop runs first).
    dir: TempDir,
}

impl Node {
    /// When QEMU was started (for boot-time measurements).
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// QEMU's PID.
    pub fn qemu_pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// The node's swtpm.
    pub fn swtpm(&mut self) -> &mut Swtpm {
        &mut self.swtpm
    }

    /// Waits for QEMU to exit by itself (the guest powered off) within
    /// `timeout`, then stops swtpm so the TPM state is final for a next
    /// boot of the same TPM ([`NodeBuilder::tpm_state`]).
    pub fn wait_power_off(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = self.wait_exit(timeout)?;
        self.swtpm.stop();
        Ok(status)
    }

    /// The node's TPM state directory, for [`NodeBuilder::tpm_state`]
    /// (stop the swtpm first so the state is final).
    pub fn swtpm_state_dir(&self) -> PathBuf {
        self.swtpm.state_dir()
    }

    /// The disk image files, in the order they were added.
    pub fn disk_paths(&self) -> &[PathBuf] {
        &self.disks
    }

    /// The serial console file.
    pub fn console_path(&self) -> &Path {
        self.console.path()
    }

    /// QEMU's own stdout/stderr.
    pub fn qemu_log_path(&self) -> &Path {
        &self.qemu_log
    }

    /// The node's temp dir (disks, console, vars).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits for the agent's console event `name` and returns it. Ends early
    /// with an error (quoting the last console lines and QEMU's log) if QEMU
    /// exits or a `fatal` event appears first.
    pub fn wait_for_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let qemu = &mut self.qemu;
        let qemu_log = &self.qemu_log;
        self.console.wait_for(name, timeout, || {
            Ok(qemu.try_wait()?.map(|status| {
                let log = std::fs::read_to_string(qemu_log).unwrap_or_default();
                format!(
                    "QEMU exited ({status}); qemu.log:\n{}\n",
                    crate::process::tail_lines(&log, 20)
                )
            }))
        })
    }

    /// Waits for a console line ending with `suffix` (e.g. the tenant's
    /// `TENANT-BOOTED`). Ends early with an error if QEMU exits first or
    /// `give_up` (asked with the agent events so far) names a reason.
    pub fn wait_for_line(
        &mut self,
        suffix: &str,
        timeout: Duration,
        give_up: impl FnMut(&[Value]) -> Option<String>,
    ) -> Result<()> {
        let qemu = &mut self.qemu;
        let qemu_log = &self.qemu_log;
        self.console.wait_for_line(
            suffix,
            timeout,
            || {
                Ok(qemu.try_wait()?.map(|status| {
                    let log = std::fs::read_to_string(qemu_log).unwrap_or_default();
                    format!(
                        "QEMU exited ({status}); qemu.log:\n{}\n",
                        crate::process::tail_lines(&log, 20)
                    )
                }))
            },
            give_up,
        )
    }

    /// All events parsed so far (polls the console once more first).
    pub fn events(&mut self) -> Vec<Value> {
        let _ = self.console.poll(false);
        self.console.events().to_vec()
    }

    /// The whole console so far.
    pub fn console_text(&mut self) -> String {
        let _ = self.console.poll(false);
        self.console.text()
    }

    /// Waits for QEMU to exit by itself (e.g. the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = self.qemu.wait_timeout(timeout).map_err(|e| {
            e.context(format!(
                "node {}: last console lines:\n{}",
                self.name,
                self.console.tail()
            ))
        })?;
        let _ = self.console.poll(true);
        Ok(status)
    }

    /// QEMU's exit status if it has ended, without waiting.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        let status = self.qemu.try_wait()?;
        if status.is_some() {
            let _ = self.console.poll(true);
        }
        Ok(status)
    }

    /// Stops QEMU and swtpm now; drop does the same.
    pub fn kill(&mut self) {
        self.qemu.stop();
        self.swtpm.stop();
        let _ = self.console.poll(true);
    }

    /// Copies console, QEMU and swtpm logs to a new directory under
    /// `target/qemu-tests-logs/` and returns it.
    pub fn keep_logs(&self) -> Result<PathBuf> {
        let dest = crate::paths::new_failed_logs_dir(&self.name)?;
        for name in ["console.log", "qemu.log", "qemu.cmdline"] {
            let _ = std::fs::copy(self.dir.path().join(name), dest.join(name));
        }
        self.swtpm.keep_logs(&dest);
        Ok(dest)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            match self.keep_logs() {
                Ok(dest) => eprintln!(
                    "node {}: logs of the failed test kept in {}\n--- last console lines ---\n{}",
                    self.name,
                    dest.display(),
                    self.console.tail()
                ),
                Err(e) => eprintln!("node {}: could not keep logs: {e:#}", self.name),
            }
        }
    }
}
