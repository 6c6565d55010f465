//! PID 1 duties: the init table (mounts, u-root style), the console file
//! descriptors, reaping orphans, the panic hook, and halting the machine.
//!
//! Privileged effects go through [`Effects`] (a real implementation and a
//! recording fake) so the table logic is tested on any host without root.
//! Nothing here may run in host mode except the table tests with the fake:
//! host mode never mounts, halts, powers off or reboots. [`power`] never
//! returns — PID 1 returning panics the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::mount::MsFlags;
use warden_protocol::console::Event;

use crate::config::PowerAction;
use crate::console;

/// A mount, as the table describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
    /// `Some(path)`: an optional mount, done only when `path` exists; when it
    /// does not, the step reports ok with a detail saying it was skipped.
    pub optional: Option<&'static str>,
}

/// One self-describing step of the init table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create a directory (and its parents).
    Dir { path: &'static str, mode: u32 },
    /// Mount a file system (its target directory is created first).
    Mount(MountSpec),
    /// Make sure fds 0, 1 and 2 are open, on `path` if they are not (a
    /// ramdisk without `/dev/console` leaves PID 1 with no fds at all).
    Console { path: &'static str },
}

impl Step {
    /// The name printed in the `init_step` event, e.g. `mount /proc`.
    pub fn name(&self) -> String {
        match self {
            Step::Dir { path, .. } => format!("dir {path}"),
            Step::Mount(m) => format!("mount {}", m.target),
            Step::Console { path } => format!("console {path}"),
        }
    }
}

const NODEV_NOSUID_NOEXEC: MsFlags = MsFlags::MS_NODEV
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NOEXEC);

const fn mount(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
) -> Step {
    Step::Mount(MountSpec {
        source,
        target,
        fstype,
        flags,
        data,
        optional: None,
    })
}

/// The ramdisk's init table, in order.
pub fn table() -> Vec<Step> {
    vec![
        mount("proc", "/proc", "proc", NODEV_NOSUID_NOEXEC, None),
        mount("sysfs", "/sys", "sysfs", NODEV_NOSUID_NOEXEC, None),
        mount(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        Step::Console {
            path: "/dev/console",
        },
        mount(
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            Some("mode=0755"),
        ),
        mount(
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            Some("mode=1777"),
        ),
        mount(
            "securityfs",
            "/sys/kernel/security",
            "securityfs",
            NODEV_NOSUID_NOEXEC,
            None,
        ),
    ]
}

/// Mounts that need kernel modules, run after coldplug: efivarfs is a
/// module in Debian's 6.1 kernel (`CONFIG_EFIVAR_FS=m`), so mounting it in
/// the early table fails with ENODEV.
pub fn late_table() -> Vec<Step> {
    vec![Step::Mount(MountSpec {
        source: "efivarfs",
        target: "/sys/firmware/efi/efivars",
        fstype: "efivarfs",
        flags: NODEV_NOSUID_NOEXEC,
        data: None,
        optional: Some("/sys/firmware/efi"),
    })]
}

/// The privileged effects the table needs.
pub trait Effects {
    fn exists(&self, path: &Path) -> bool;
    fn mkdir_all(&mut self, path: &Path, mode: u32) -> io::Result<()>;
    fn mount(&mut self, spec: &MountSpec) -> io::Result<()>;
    /// Returns how many of fds 0..=2 had to be (re)opened.
    fn ensure_console(&mut self, path: &Path) -> io::Result<u32>;
}

/// The real thing: `mkdir`, `mount(2)`, `dup2(2)`.
#[derive(Debug, Default)]
pub struct RealEffects;

impl Effects for RealEffects {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn mkdir_all(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }

    fn mount(&mut self, spec: &MountSpec) -> io::Result<()> {
        nix::mount::mount(
            Some(spec.source),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        )
        .map_err(io::Error::from)
    }

    fn ensure_console(&mut self, path: &Path) -> io::Result<u32> {
        use std::os::fd::AsRawFd;
        let missing: Vec<i32> = (0..=2)
            .filter(|fd| nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD).is_err())
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let console = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)?;
        for fd in &missing {
            // dup2 onto a closed low fd; the File's own fd is closed when it drops.
            nix::unistd::dup2(console.as_raw_fd(), *fd).map_err(io::Error::from)?;
        }
        Ok(u32::try_from(missing.len()).unwrap_or(3))
    }
}

/// A fake that records what would have been done; `existing` paths exist,
/// `failures` make a mount of that target fail with that errno.
#[derive(Debug, Default)]
pub struct RecordingEffects {
    pub existing: BTreeSet<PathBuf>,
    pub failures: BTreeMap<String, i32>,
    pub calls: Vec<String>,
}

impl Effects for RecordingEffects {
    fn exists(&self, path: &Path) -> bool {
        self.existing.contains(path)
    }

    fn mkdir_all(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        self.calls
            .push(format!("mkdir {} {mode:o}", path.display()));
        self.existing.insert(path.to_path_buf());
        Ok(())
    }

    fn mount(&mut self, spec: &MountSpec) -> io::Result<()> {
        self.calls.push(format!(
            "mount {} {} {} {:?}",
            spec.fstype,
            spec.target,
            spec.flags.bits(),
            spec.data
        ));
        match self.failures.get(spec.target) {
            Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
            None => Ok(()),
        }
    }

    fn ensure_console(&mut self, path: &Path) -> io::Result<u32> {
        self.calls.push(format!("console {}", path.display()));
        Ok(0)
    }
}

/// What a run of the table left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableReport {
    /// `(step, error)` of each required step that failed.
    pub failed: Vec<(String, String)>,
}

fn run_step(step: &Step, fx: &mut dyn Effects) -> Result<String, String> {
    match step {
        Step::Dir { path, mode } => fx
            .mkdir_all(Path::new(path), *mode)
            .map(|()| String::new())
            .map_err(|e| e.to_string()),
        Step::Mount(m) => {
            if let Some(cond) = m.optional {
                if !fx.exists(Path::new(cond)) {
                    return Ok(format!("skipped: {cond} does not exist"));
                }
            }
            fx.mkdir_all(Path::new(m.target), 0o755)
                .map_err(|e| format!("cannot create {}: {e}", m.target))?;
            match fx.mount(m) {
                Ok(()) => Ok(format!("{} on {}", m.fstype, m.target)),
                // EBUSY: the kernel (or a previous init) already mounted it.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    Ok(format!("{} already mounted on {}", m.fstype, m.target))
                }
                Err(e) => Err(format!(
                    "mount -t {} {} {}: {e}",
                    m.fstype, m.source, m.target
                )),
            }
        }
        Step::Console { path } => match fx.ensure_console(Path::new(path)) {
            Ok(0) => Ok(String::new()),
            Ok(n) => Ok(format!("reopened {n} of fds 0-2 on {path}")),
            Err(e) => Err(format!("cannot open {path}: {e}")),
        },
    }
}

/// Runs every step, reporting each through `report` as an `init_step` event.
/// Failures do not stop the table (later steps may still work and the
/// console should show all of them); they are returned for the caller to judge.
pub fn run_table(
    steps: &[Step],
    fx: &mut dyn Effects,
    report: &mut dyn FnMut(Event),
) -> TableReport {
    let mut out = TableReport::default();
    for step in steps {
        let name = step.name();
        match run_step(step, fx) {
            Ok(detail) => report(Event::InitStep {
                step: name,
                ok: true,
                detail,
            }),
            Err(error) => {
                report(Event::InitStep {
                    step: name.clone(),
                    ok: false,
                    detail: error.clone(),
                });
                out.failed.push((name, error));
            }
        }
    }
    out
}

/// Reaps every exited child without blocking; returns how many.
pub fn reap_zombies() -> u32 {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut n = 0u32;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return n,
            Ok(status) => {
                n = n.saturating_add(1);
                tracing::debug!(?status, "init: reaped child");
            }
        }
    }
}

/// As PID 1, every orphan in the system becomes our child: reap them on
/// SIGCHLD so zombies do not pile up. Must run inside the tokio runtime.
///
/// Note: this takes the exit status of *every* child, including ones other
/// modules spawn; they must not rely on `wait`ing for their own children.
pub fn spawn_reaper() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        reap_zombies();
        while sigchld.recv().await.is_some() {
            reap_zombies();
        }
    });
    Ok(())
}

/// The action the panic hook takes (a [`PowerAction`] as u8; 0: host mode, just abort).
static PANIC_ACTION: AtomicU8 = AtomicU8::new(0);

fn action_code(a: PowerAction) -> u8 {
    match a {
        PowerAction::Wait => 1,
        PowerAction::Halt => 2,
        PowerAction::Poweroff => 3,
    }
}

/// Tells the panic hook what to do with the machine (init mode only).
pub fn set_panic_action(action: Option<PowerAction>) {
    PANIC_ACTION.store(action.map_or(0, action_code), Ordering::SeqCst);
}

/// Installs a hook that prints a `fatal` event for any panic. In init mode
/// (see [`set_panic_action`]) it then halts or powers off instead of letting
/// PID 1 abort into a kernel panic; in host mode the default hook runs and
/// the process aborts (release) or unwinds (debug) as usual.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let action = match PANIC_ACTION.load(Ordering::SeqCst) {
            2 | 1 => Some(PowerAction::Halt),
            3 => Some(PowerAction::Poweroff),
            _ => None,
        };
        let error = format!("panic: {info}").replace('\n', " ");
        console::print_line(&Event::Fatal {
            error: error.clone(),
            action: action.map_or("exit", PowerAction::as_str).to_string(),
        });
        match action {
            Some(a) => {
                eprintln!("FATAL: {error}");
                power(a)
            }
            None => default(info),
        }
    }));
}

/// Syncs, then halts or powers the machine off. If the kernel refuses, sleeps
/// forever: PID 1 must never return. `Wait` just sleeps (no reaping — use it
/// only where the runtime is gone).
pub fn power(action: PowerAction) -> ! {
    use nix::sys::reboot::{reboot, RebootMode};
    nix::unistd::sync();
    let mode = match action {
        PowerAction::Halt => Some(RebootMode::RB_HALT_SYSTEM),
        PowerAction::Poweroff => Some(RebootMode::RB_POWER_OFF),
        PowerAction::Wait => None,
    };
    if let Some(mode) = mode {
        // reboot() only returns on failure.
        let Err(e) = reboot(mode);
        eprintln!("init: reboot({mode:?}) failed: {e}; sleeping forever");
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both tables in boot order (coldplug runs between them).
    fn all() -> Vec<Step> {
        let mut steps = table();
        steps.extend(late_table());
        steps
    }

    fn run(fx: &mut RecordingEffects) -> (Vec<Event>, TableReport) {
        let mut events = Vec::new();
        let report = run_table(&all(), fx, &mut |e| events.push(e));
        (events, report)
    }

    #[test]
    fn mounts_everything_in_order_and_skips_efivarfs_without_efi() {
        let mut fx = RecordingEffects::default();
        let (events, report) = run(&mut fx);
        assert!(report.failed.is_empty());
        let mounts: Vec<&str> = fx
            .calls
            .iter()
            .filter(|c| c.starts_with("mount "))
            .map(|c| c.split(' ').nth(2).unwrap())
            .collect();
        assert_eq!(
            mounts,
            vec![
                "/proc",
                "/sys",
                "/dev",
                "/run",
                "/tmp",
                "/sys/kernel/security"
            ]
        );
        assert_eq!(events.len(), all().len());
        match events.last().unwrap() {
            Event::InitStep { step, ok, detail } => {
                assert_eq!(step, "mount /sys/firmware/efi/efivars");
                assert!(ok);
                assert!(detail.contains("skipped"), "{detail}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // The console is made sure of right after /dev exists.
        let dev = fx
            .calls
            .iter()
            .position(|c| c.contains("devtmpfs /dev"))
            .unwrap();
        let console = fx
            .calls
            .iter()
            .position(|c| c.starts_with("console"))
            .unwrap();
        assert!(console > dev);
    }

    #[test]
    fn mounts_efivarfs_on_efi_machines() {
        let mut fx = RecordingEffects::default();
        fx.existing.insert(PathBuf::from("/sys/firmware/efi"));
        let (_, report) = run(&mut fx);
        assert!(report.failed.is_empty());
        assert!(fx
            .calls
            .iter()
            .any(|c| c.starts_with("mount efivarfs /sys/firmware/efi/efivars")));
    }

    #[test]
    fn failures_are_reported_and_do_not_stop_the_table() {
        let mut fx = RecordingEffects::default();
        fx.failures
            .insert("/sys/kernel/security".into(), libc::ENODEV);
        fx.failures.insert("/dev".into(), libc::EBUSY);
        let (events, report) = run(&mut fx);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, "mount /sys/kernel/security");
        assert!(
            report.failed[0].1.contains("securityfs"),
            "{:?}",
            report.failed
        );
        let dev = events
            .iter()
            .find(|e| matches!(e, Event::InitStep { step, .. } if step == "mount /dev"))
            .unwrap();
        assert!(
            matches!(dev, Event::InitStep { ok: true, detail, .. } if detail.contains("already mounted"))
        );
        assert_eq!(events.len(), all().len());
    }

    #[test]
    fn real_effects_create_dirs_without_root_effects() {
        let dir = tempfile::tempdir().unwrap();
        let mut fx = RealEffects;
        let p = dir.path().join("a/b");
        fx.mkdir_all(&p, 0o755).unwrap();
        assert!(fx.exists(&p));
        // Our own test process has its fds; nothing to reopen.
        assert_eq!(fx.ensure_console(Path::new("/nonexistent")).unwrap(), 0);
    }
}
