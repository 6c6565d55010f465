//! Coldplug: load the kernel modules the node's devices need.
//!
//! Owns the scan of `modalias` files under `/sys/devices`, their resolution
//! through the ramdisk's `modules.alias` and `modules.dep` (via
//! `warden-kmod`), and the `finit_module` calls. Loads run concurrently, one
//! worker thread per wanted module (its dependencies first), so a driver
//! whose probe sleeps — `ahci` waits out SATA link resets inside
//! `finit_module` — holds up nothing but itself. Each completed load
//! triggers a rescan at once: a driver can create devices that need further
//! drivers (the virtio transport `virtio_pci` is what makes
//! `virtio:d00000002…` appear for `virtio_blk`; an HBA driver makes
//! `scsi:t-0x00` appear for `sd_mod`), and those start loading without
//! waiting for unrelated slow loads.
//!
//! It must never abort on a module that fails to load (each failure is
//! recorded with what the errno means and the run goes on), never load a
//! module twice or before all of its dependencies have loaded, never follow
//! symlinks in sysfs (they loop), and never call the kernel except through
//! [`ModuleLoader`], so the scheduling is tested with a recording fake.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::Scope;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use warden_kmod::{resolve_name, AliasIndex, DepIndex, SoftdepIndex};
use warden_protocol::console::ModuleFailure;

/// A safety net on scans of `/sys/devices`. A scan only follows a load
/// that completed since the previous scan began, and each module loads at
/// most once, so a run needs at most one scan per module in the index plus
/// one; a real boot needs a few dozen.
const MAX_SCANS: u32 = 256;

/// How many wanted modules load at once. Loads mostly wait (on probes, link
/// resets, firmware), so this is about bounding threads, not CPUs.
const MAX_WORKERS: usize = 8;

/// Modules no device announces through a `modalias`, loaded from the first
/// scan when the ramdisk ships them: efivarfs is `=m` in Debian's 6.1
/// kernel, and the agent needs it to read and set boot variables.
pub const DEVICELESS_MODULES: &[&str] = &["efivarfs"];

/// What one coldplug run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColdplugReport {
    /// Scans of `/sys/devices`: the first, then one each time loads have
    /// completed since the previous scan began (loads that complete close
    /// together share a scan); the last one found nothing new. How many
    /// depends on how loads overlap, so it varies from boot to boot.
    pub rounds: u32,
    /// Modules loaded (kernel names, `_` spelling), in the order their loads
    /// completed. Loads run concurrently, so this order may differ between
    /// boots of the same machine; the set does not. A module is always
    /// listed after its dependencies.
    pub loaded: Vec<String>,
    /// Modules that failed to load, and why, in the order they failed.
    pub failed: Vec<ModuleFailure>,
}

/// Why one module did not load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The `.ko` file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// `finit_module` refused it.
    #[error("{}", errno_meaning(*.0))]
    Kernel(Errno),
}

/// Loads one module file into the kernel. The real one calls
/// `finit_module`; tests use a recording fake. Coldplug calls it from
/// several threads at once (hence `Sync` and `&self`), but never for a
/// module before all of that module's dependencies have loaded.
pub trait ModuleLoader: Sync {
    /// Loads module `name` from the `.ko` file at `path`.
    fn load(&self, name: &str, path: &Path) -> Result<(), LoadError>;
}

/// The real loader: `finit_module(2)` on the opened file, no parameters.
/// Concurrent calls are fine: the kernel serializes what must be (symbol
/// resolution, sysfs registration) and lets the drivers' probes overlap.
#[derive(Debug, Default)]
pub struct KernelLoader;

impl ModuleLoader for KernelLoader {
    fn load(&self, _name: &str, path: &Path) -> Result<(), LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        finit_module(&file, c"", ModuleInitFlags::empty()).map_err(LoadError::Kernel)
    }
}

/// What an errno from `finit_module` means, in words an operator can act on.
fn errno_meaning(errno: Errno) -> String {
    let meaning = match errno {
        Errno::ENOEXEC => "invalid module format (built for another kernel?)",
        Errno::ENOENT => "unknown symbol or missing dependency (see dmesg)",
        Errno::EPERM => "not permitted (kernel lockdown, or no CAP_SYS_MODULE)",
        Errno::EKEYREJECTED => "module signature rejected",
        Errno::ENOKEY => "module is unsigned or its signing key is unknown",
        Errno::EBADMSG => "module signature is malformed",
        Errno::ENODEV => "the driver found no device it supports",
        Errno::EINVAL => "invalid module or parameters",
        Errno::EBUSY => "module is busy",
        Errno::ENOMEM => "out of memory",
        other => other.desc(),
    };
    format!("{meaning} ({errno:?})")
}

/// Where coldplug looks; everything is injectable so tests run on a fixture.
#[derive(Clone, Debug)]
pub struct ColdplugRoots {
    /// `/sys/devices`: scanned for `modalias` files.
    pub sys_devices: PathBuf,
    /// `/lib/modules/KVER`: `modules.alias`, `modules.dep` and the `.ko` files.
    pub modules_dir: PathBuf,
    /// `/sys/module`: one directory per loaded (or built-in) module.
    pub sys_module: PathBuf,
    /// `/proc/modules`: one line per loaded module.
    pub proc_modules: PathBuf,
}

/// Scans every `modalias` under `sys_devices`, resolves it through
/// `modules_dir/modules.alias` and `modules.dep`, loads what is missing
/// (concurrently, rescanning after each completed load), and returns once
/// nothing is loading and the last scan found nothing new.
pub fn coldplug(sys_devices: &Path, modules_dir: &Path) -> Result<ColdplugReport, std::io::Error> {
    let roots = ColdplugRoots {
        sys_devices: sys_devices.to_path_buf(),
        modules_dir: modules_dir.to_path_buf(),
        sys_module: PathBuf::from("/sys/module"),
        proc_modules: PathBuf::from("/proc/modules"),
    };
    coldplug_with(&roots, &KernelLoader)
}

/// [`coldplug`] with explicit roots and loader. Errors only if the index
/// cannot be read or `sys_devices` cannot be listed (loads already started
/// are finished first); module failures are in the report.
pub fn coldplug_with(
    roots: &ColdplugRoots,
    loader: &dyn ModuleLoader,
) -> Result<ColdplugReport, io::Error> {
    let dep = read_index(&roots.modules_dir.join("modules.dep"), DepIndex::parse)?;
    let alias = read_index(&roots.modules_dir.join("modules.alias"), AliasIndex::parse)?;

    // Soft pre-dependencies (r8169 → realtek PHY) are optional: the file
    // may be absent and its modules may fail without failing anything.
    let softdep_path = roots.modules_dir.join("modules.softdep");
    let soft = if softdep_path.exists() {
        read_index(&softdep_path, SoftdepIndex::parse)?
    } else {
        SoftdepIndex::default()
    };

    let run = Run {
        dep,
        alias,
        soft,
        modules_dir: &roots.modules_dir,
        loader,
        progress: Mutex::new(Progress::default()),
        changed: Condvar::new(),
    };
    // The scope joins every worker before it returns, also on error.
    let scans = std::thread::scope(|s| run.coordinate(s, roots))?;
    // See `Run::lock` for why a poisoned lock still holds a sound report.
    let progress = run
        .progress
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(ColdplugReport {
        rounds: scans,
        loaded: progress.loaded,
        failed: progress.failed,
    })
}

/// How deep soft dependencies of soft dependencies are followed: enough for
/// any real chain, and a stop for a cyclic modules.softdep.
const MAX_SOFTDEP_DEPTH: u32 = 4;

/// Where one module stands in this run. Modules absent from the map have
/// not been tried (nor found in the kernel) yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModState {
    /// A worker claimed it and is inside [`ModuleLoader::load`].
    Loading,
    /// In the kernel: loaded by us (or `EEXIST`), or found there by a scan.
    Loaded,
    /// Gave up on it; it is not tried again, and its dependents fail.
    Failed,
}

/// What the workers share, behind [`Run::progress`].
#[derive(Debug, Default)]
struct Progress {
    modules: HashMap<String, ModState>,
    /// Completion order.
    loaded: Vec<String>,
    failed: Vec<ModuleFailure>,
    /// Loads completed successfully so far: when it moves, devices may have
    /// appeared, so the coordinator scans again.
    loads: u64,
    /// Worker threads running.
    workers: usize,
    /// The latest scan, for the logs.
    scan: u32,
}

/// The state of one coldplug run, shared by the coordinator (which scans
/// and starts workers) and the workers (which load).
struct Run<'a> {
    dep: DepIndex,
    alias: AliasIndex,
    soft: SoftdepIndex,
    modules_dir: &'a Path,
    loader: &'a dyn ModuleLoader,
    progress: Mutex<Progress>,
    /// Signalled whenever a module settles or a worker exits.
    changed: Condvar,
}

impl<'a> Run<'a> {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // Poison only means a thread panicked while holding the lock. The
        // agent is built with panic = "abort", so on the node this never
        // happens; elsewhere, every critical section is a handful of
        // inserts and pushes that leave `Progress` whole, so carrying on
        // with it is sound and lets the other workers finish.
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'g>(&self, guard: MutexGuard<'g, Progress>) -> MutexGuard<'g, Progress> {
        // Poison: as in `lock`.
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Scans, starts a worker for each newly wanted module, and scans again
    /// after loads complete, until nothing is loading and the last scan
    /// found nothing new. Returns the number of scans.
    fn coordinate<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        roots: &ColdplugRoots,
    ) -> Result<u32, io::Error>
    where
        'a: 's,
    {
        let mut scans: u32 = 0;
        // Every module a scan asked for: each gets one worker, ever.
        let mut queued: HashSet<String> = HashSet::new();
        let mut pending: VecDeque<String> = VecDeque::new();
        let mut scan_due = true;
        let mut loads_at_scan = 0;
        loop {
            if scan_due {
                scan_due = false;
                scans += 1;
                {
                    let mut p = self.lock();
                    // Taken before reading sysfs: a load that completes
                    // while we scan may have added devices behind us, so it
                    // must trigger another scan.
                    loads_at_scan = p.loads;
                    p.scan = scans;
                }
                let present = already_loaded(roots);
                let modaliases = scan_modaliases(&roots.sys_devices)?;
                let mut wanted: Vec<String> = Vec::new();
                if scans == 1 {
                    wanted.extend(
                        DEVICELESS_MODULES
                            .iter()
                            .filter(|m| self.dep.contains(m))
                            .map(|m| m.to_string()),
                    );
                }
                for modalias in &modaliases {
                    for module in self.alias.lookup(modalias) {
                        if !wanted.contains(&module) {
                            wanted.push(module);
                        }
                    }
                }
                let mut p = self.lock();
                // `/sys/module/X` appears while X is still initializing, so
                // a scan must not turn one of our `Loading` into `Loaded`.
                for name in present {
                    p.modules.entry(name).or_insert(ModState::Loaded);
                }
                for module in wanted {
                    if !p.modules.contains_key(&module) && queued.insert(module.clone()) {
                        pending.push_back(module);
                    }
                }
                let new = pending.len();
                drop(p);
                tracing::debug!(
                    scan = scans,
                    modaliases = modaliases.len(),
                    new,
                    "coldplug scan"
                );
            }

            while !pending.is_empty() {
                {
                    let mut p = self.lock();
                    if p.workers >= MAX_WORKERS {
                        break;
                    }
                    p.workers += 1;
                }
                if let Some(root) = pending.pop_front() {
                    self.spawn(s, root);
                }
            }

            let mut p = self.lock();
            loop {
                if p.loads != loads_at_scan {
                    if scans < MAX_SCANS {
                        scan_due = true;
                        break;
                    }
                    if p.workers == 0 && pending.is_empty() {
                        tracing::warn!(
                            scans,
                            "coldplug stopped rescanning; devices that appeared since may lack drivers"
                        );
                    }
                }
                if !pending.is_empty() && p.workers < MAX_WORKERS {
                    break;
                }
                if p.workers == 0 && pending.is_empty() {
                    return Ok(scans);
                }
                p = self.wait(p);
            }
        }
    }

    /// Runs a worker for `root` on its own thread; the caller has counted
    /// it in `workers` already.
    fn spawn<'s>(&'s self, s: &'s Scope<'s, '_>, root: String)
    where
        'a: 's,
    {
        let worker = WorkerSlot { run: self };
        let name = root.clone();
        let spawned = std::thread::Builder::new()
            .name("coldplug".into())
            .spawn_scoped(s, move || {
                let _slot = worker;
                self.load_tree(&name, false, 0);
            });
        if let Err(error) = spawned {
            // The closure, and with it the slot, was dropped: the count is
            // right again. Slower, but the module still loads.
            tracing::warn!(module = %root, error = %error, "cannot start a coldplug thread; loading inline");
            self.load_tree(&root, false, 0);
        }
    }

    /// Loads `root` with its dependencies (first) and soft pre-dependencies
    /// (before each module that names them). `optional` failures — soft
    /// dependencies, e.g. a CPU-specific crypto driver that finds no CPU
    /// support — are logged but not reported.
    fn load_tree(&self, root: &str, optional: bool, depth: u32) {
        if matches!(
            self.lock().modules.get(root),
            Some(ModState::Loaded | ModState::Failed)
        ) {
            return;
        }
        let order = match self.dep.closure(&[root]) {
            Ok(order) => order,
            Err(e) => {
                let mut p = self.lock();
                if p.modules.contains_key(root) {
                    return;
                }
                let scan = p.scan;
                Self::record_failure(&mut p, root, e.to_string(), optional);
                drop(p);
                self.changed.notify_all();
                return log_failure(root, scan, &e.to_string(), optional);
            }
        };
        for name in order {
            if depth < MAX_SOFTDEP_DEPTH {
                let soft: Vec<String> = self
                    .soft
                    .pre(&name)
                    .iter()
                    .flat_map(|s| resolve_name(&self.dep, &self.alias, s))
                    .collect();
                for module in soft {
                    self.load_tree(&module, true, depth + 1);
                }
            }
            self.load_one(&name, optional);
        }
    }

    /// Loads `name` unless it is settled; waits while it, or one of its
    /// dependencies, is being loaded by another worker. A worker holds a
    /// `Loading` claim only across the loader call, never while waiting, so
    /// workers cannot wait on each other in a cycle.
    fn load_one(&self, name: &str, optional: bool) {
        // `closure` only returns names the index has.
        let Some(entry) = self.dep.get(name) else {
            return;
        };
        let deps: Vec<String> = entry
            .deps
            .iter()
            .filter_map(|d| warden_kmod::name_from_path(d))
            .collect();
        let mut p = self.lock();
        let unmet = loop {
            match p.modules.get(name) {
                Some(ModState::Loaded | ModState::Failed) => return,
                Some(ModState::Loading) => {
                    p = self.wait(p);
                    continue;
                }
                None => {}
            }
            if deps
                .iter()
                .any(|d| p.modules.get(d) == Some(&ModState::Loading))
            {
                p = self.wait(p);
                continue;
            }
            break deps
                .iter()
                .find(|d| p.modules.get(*d) != Some(&ModState::Loaded))
                .map(|d| (d, p.modules.get(d).copied()));
        };
        let scan = p.scan;
        if let Some((d, state)) = unmet {
            // Deps precede `name` in the closure order, so each was tried
            // already; "not loaded" would mean an inconsistent index.
            let error = if state == Some(ModState::Failed) {
                format!("dependency {d} failed to load")
            } else {
                format!("dependency {d} was not loaded")
            };
            Self::record_failure(&mut p, name, error.clone(), optional);
            drop(p);
            self.changed.notify_all();
            return log_failure(name, scan, &error, optional);
        }
        p.modules.insert(name.to_string(), ModState::Loading);
        drop(p);

        let path = self.modules_dir.join(&entry.path);
        let result = self.loader.load(name, &path);

        let mut p = self.lock();
        let scan = p.scan;
        let failure = match result {
            Ok(()) | Err(LoadError::Kernel(Errno::EEXIST)) => {
                p.modules.insert(name.to_string(), ModState::Loaded);
                p.loaded.push(name.to_string());
                p.loads += 1;
                None
            }
            Err(e) => {
                let error = e.to_string();
                Self::record_failure(&mut p, name, error.clone(), optional);
                Some(error)
            }
        };
        drop(p);
        self.changed.notify_all();
        match failure {
            None => {
                tracing::debug!(module = %name, scan, path = %path.display(), "module loaded");
            }
            Some(error) => log_failure(name, scan, &error, optional),
        }
    }

    fn record_failure(p: &mut Progress, module: &str, error: String, optional: bool) {
        p.modules.insert(module.to_string(), ModState::Failed);
        if !optional {
            p.failed.push(ModuleFailure {
                module: module.to_string(),
                error,
            });
        }
    }
}

/// Logs a failure outside the lock (the console may be a slow serial port).
fn log_failure(module: &str, scan: u32, error: &str, optional: bool) {
    if optional {
        tracing::info!(module, scan, error, "optional soft dependency not loaded");
    } else {
        tracing::warn!(module, scan, error, "module failed to load");
    }
}

/// One worker's place in [`Progress::workers`], given back on drop — also
/// if the worker panics or its thread never starts — so the coordinator
/// never waits for a worker that is gone.
struct WorkerSlot<'r, 'a> {
    run: &'r Run<'a>,
}

impl Drop for WorkerSlot<'_, '_> {
    fn drop(&mut self) {
        let mut p = self.run.lock();
        p.workers = p.workers.saturating_sub(1);
        drop(p);
        self.run.changed.notify_all();
    }
}

fn read_index<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, warden_kmod::KmodError>,
) -> Result<T, io::Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    parse(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Names of modules already in the kernel: `/proc/modules` (first word of
/// each line) and the directories of `/sys/module` (which also lists
/// built-ins with parameters — no need to load those either). Either may be
/// missing (not mounted yet); that only means less is known.
fn already_loaded(roots: &ColdplugRoots) -> HashSet<String> {
    let mut names = HashSet::new();
    if let Ok(text) = std::fs::read_to_string(&roots.proc_modules) {
        names.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(warden_kmod::normalize_name),
        );
    }
    if let Ok(dir) = std::fs::read_dir(&roots.sys_module) {
        names.extend(
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().map(warden_kmod::normalize_name)),
        );
    }
    names
}

/// Every non-empty `modalias` under `root`, sorted by path so workers start
/// in the same order on every boot of the same machine. Symlinks
/// are never followed; subdirectories that vanish or cannot be read while we
/// walk (devices come and go) are skipped.
fn scan_modaliases(root: &Path) -> Result<Vec<String>, io::Error> {
    let mut found: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    let top = std::fs::read_dir(root)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
    let mut stack = vec![top];
    while let Some(dir) = stack.pop() {
        for entry in dir.flatten() {
            // DirEntry::file_type does not follow symlinks.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if let Ok(sub) = std::fs::read_dir(entry.path()) {
                    stack.push(sub);
                }
            } else if kind.is_file() && entry.file_name() == "modalias" {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    let text = text.trim();
                    if !text.is_empty() {
                        found.insert((entry.path(), text.to_string()));
                    }
                }
            }
        }
    }
    Ok(found.into_iter().map(|(_, m)| m).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    // Real lines from Debian 12's /lib/modules/6.1.0-56-amd64.
    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/crct10dif_common.ko:
kernel/lib/crc64.ko:
kernel/lib/crc-t10dif.ko: kernel/crypto/crct10dif_common.ko
kernel/lib/crc64-rocksoft.ko: kernel/lib/crc64.ko
kernel/block/t10-pi.ko: kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko kernel/crypto/crct10dif_common.ko
kernel/drivers/nvme/host/nvme-core.ko: kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko kernel/crypto/crct10dif_common.ko
kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/lib/crc-t10dif.ko kernel/lib/crc64.ko kernel/crypto/crct10dif_common.ko
kernel/arch/x86/crypto/crct10dif-pclmul.ko: kernel/crypto/crct10dif_common.ko
kernel/crypto/crct10dif_generic.ko: kernel/crypto/crct10dif_common.ko
";
    const ALIAS: &str = "\
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000002v* virtio_blk
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias scsi:t-0x00* sd_mod
alias crct10dif crct10dif_pclmul
alias crct10dif crct10dif_generic
";
    // QEMU's devices: transitional virtio-blk-pci, NVMe, the i440FX host bridge.
    const VIRTIO_BLK_PCI: &str = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";
    const NVME_PCI: &str = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02";
    const HOST_BRIDGE: &str = "pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00";

    struct Fixture {
        _dir: tempfile::TempDir,
        roots: ColdplugRoots,
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn fixture(proc_modules: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let roots = ColdplugRoots {
            sys_devices: dir.path().join("sys/devices"),
            modules_dir: dir.path().join("lib/modules/6.1.0-56-amd64"),
            sys_module: dir.path().join("sys/module"),
            proc_modules: dir.path().join("proc/modules"),
        };
        write(&roots.modules_dir.join("modules.dep"), DEP);
        write(&roots.modules_dir.join("modules.alias"), ALIAS);
        for line in DEP.lines() {
            let (path, _) = line.split_once(':').unwrap();
            write(&roots.modules_dir.join(path), "not really an ELF");
        }
        let pci = roots.sys_devices.join("pci0000:00");
        write(
            &pci.join("0000:00:00.0/modalias"),
            &format!("{HOST_BRIDGE}\n"),
        );
        write(
            &pci.join("0000:00:03.0/modalias"),
            &format!("{VIRTIO_BLK_PCI}\n"),
        );
        write(&pci.join("0000:00:04.0/modalias"), &format!("{NVME_PCI}\n"));
        // sysfs is full of symlinks back up the tree; following one loops.
        std::os::unix::fs::symlink("../..", pci.join("0000:00:03.0/subsystem")).unwrap();
        std::fs::create_dir_all(&roots.sys_module).unwrap();
        write(&roots.proc_modules, proc_modules);
        Fixture { _dir: dir, roots }
    }

    /// Records every load; "creates" the devices a driver would (new
    /// `modalias` files) and its `/sys/module` entry, fails on request, or
    /// blocks until the test releases it. Notes every load that began
    /// before all of the module's dependencies were in (`violations`).
    struct FakeLoader {
        roots: ColdplugRoots,
        dep: DepIndex,
        creates: HashMap<&'static str, (&'static str, &'static str)>,
        fails: HashMap<&'static str, Errno>,
        /// `load` of these waits for a message (or the sender's drop).
        blocks: HashMap<&'static str, Mutex<mpsc::Receiver<()>>>,
        /// Gets each module's name when its load returns.
        done: Option<mpsc::Sender<String>>,
        calls: Mutex<Vec<String>>,
        violations: Mutex<Vec<String>>,
    }

    impl FakeLoader {
        fn new(roots: &ColdplugRoots) -> Self {
            let mut creates = HashMap::new();
            // The virtio transport makes the virtio device appear, as on QEMU.
            creates.insert(
                "virtio_pci",
                (
                    "pci0000:00/0000:00:03.0/virtio0/modalias",
                    "virtio:d00000002v00001AF4\n",
                ),
            );
            let dep = std::fs::read_to_string(roots.modules_dir.join("modules.dep")).unwrap();
            FakeLoader {
                roots: roots.clone(),
                dep: DepIndex::parse(&dep).unwrap(),
                creates,
                fails: HashMap::new(),
                blocks: HashMap::new(),
                done: None,
                calls: Mutex::new(Vec::new()),
                violations: Mutex::new(Vec::new()),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn count(&self, module: &str) -> usize {
            self.calls().iter().filter(|c| *c == module).count()
        }

        fn violations(&self) -> Vec<String> {
            self.violations.lock().unwrap().clone()
        }
    }

    impl ModuleLoader for FakeLoader {
        fn load(&self, name: &str, path: &Path) -> Result<(), LoadError> {
            self.calls.lock().unwrap().push(name.to_string());
            // No panics here: a panicking worker would leave the run hanging
            // on its claim instead of failing the test.
            if !path.is_file() {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("{name}: missing file {}", path.display()));
            }
            // A loaded module has its /sys/module entry (written below once
            // its load returns) or is in the fixture's /proc/modules.
            let present = already_loaded(&self.roots);
            for d in &self.dep.get(name).unwrap().deps {
                let d = warden_kmod::name_from_path(d).unwrap();
                if !present.contains(&d) {
                    self.violations
                        .lock()
                        .unwrap()
                        .push(format!("{name} loaded before its dependency {d}"));
                }
            }
            if let Some(release) = self.blocks.get(name) {
                // Err = the test dropped the sender: go on either way.
                let _ = release.lock().unwrap().recv();
            }
            let result = match self.fails.get(name) {
                Some(errno) => Err(LoadError::Kernel(*errno)),
                None => {
                    if let Some((rel, text)) = self.creates.get(name) {
                        write(&self.roots.sys_devices.join(rel), text);
                    }
                    std::fs::create_dir_all(self.roots.sys_module.join(name)).unwrap();
                    Ok(())
                }
            };
            if let Some(done) = &self.done {
                let _ = done.send(name.to_string());
            }
            result
        }
    }

    /// Two more PCI devices whose drivers share a dependency with each
    /// other and with the nvme chain (`crct10dif_common`).
    fn add_crc_devices(fx: &Fixture) {
        let alias = fx.roots.modules_dir.join("modules.alias");
        let mut text = std::fs::read_to_string(&alias).unwrap();
        text.push_str("alias pci:v0000AAAAd* crct10dif_pclmul\n");
        text.push_str("alias pci:v0000BBBBd* crct10dif_generic\n");
        std::fs::write(&alias, text).unwrap();
        let pci = fx.roots.sys_devices.join("pci0000:00");
        write(
            &pci.join("0000:00:05.0/modalias"),
            "pci:v0000AAAAd00000001\n",
        );
        write(
            &pci.join("0000:00:06.0/modalias"),
            "pci:v0000BBBBd00000001\n",
        );
    }

    /// Waits for `module` on `done`, returning every name seen up to it.
    /// The deadline only turns a hang (a load that never happens) into a
    /// failure; nothing is measured.
    fn wait_for(done: &mpsc::Receiver<String>, module: &str) -> Vec<String> {
        let mut seen = Vec::new();
        while !seen.iter().any(|m| m == module) {
            match done.recv_timeout(Duration::from_secs(120)) {
                Ok(m) => seen.push(m),
                Err(e) => panic!("{module} never loaded ({e}); saw {seen:?}"),
            }
        }
        seen
    }

    fn position(list: &[String], module: &str) -> usize {
        list.iter()
            .position(|m| m == module)
            .unwrap_or_else(|| panic!("{module} missing from {list:?}"))
    }

    fn assert_deps_first(fx: &Fixture, order: &[String]) {
        let dep = DepIndex::parse(
            &std::fs::read_to_string(fx.roots.modules_dir.join("modules.dep")).unwrap(),
        )
        .unwrap();
        for module in order {
            for d in &dep.get(module).unwrap().deps {
                let d = warden_kmod::name_from_path(d).unwrap();
                if let Some(pd) = order.iter().position(|m| *m == d) {
                    assert!(pd < position(order, module), "{module} before {d}");
                }
            }
        }
    }

    const VIRTIO_PCI_CHAIN: [&str; 5] = [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
    ];
    const NVME_CHAIN: [&str; 7] = [
        "crct10dif_common",
        "crc64",
        "crc_t10dif",
        "crc64_rocksoft",
        "t10_pi",
        "nvme_core",
        "nvme",
    ];

    #[test]
    fn rescans_until_nothing_new_virtio_blk_after_virtio_pci() {
        let fx = fixture("");
        let loader = FakeLoader::new(&fx.roots);
        let report = coldplug_with(&fx.roots, &loader).unwrap();

        let mut expected: Vec<&str> = VIRTIO_PCI_CHAIN.to_vec();
        expected.extend(NVME_CHAIN);
        expected.push("virtio_blk");
        let mut loaded = report.loaded.clone();
        loaded.sort();
        expected.sort();
        assert_eq!(loaded, expected);
        let mut calls = loader.calls();
        assert_deps_first(&fx, &calls);
        calls.sort();
        assert_eq!(calls, expected, "each module loaded exactly once");
        assert_eq!(loader.violations(), Vec::<String>::new());
        assert_deps_first(&fx, &report.loaded);
        // Not `report.loaded`: the device appears while virtio_pci's load
        // is still running (as in the kernel), so virtio_blk may finish first.
        let calls = loader.calls();
        assert!(position(&calls, "virtio_pci") < position(&calls, "virtio_blk"));
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        // virtio_blk's device only exists after virtio_pci loaded, so it
        // took a later scan; each scan after the first follows a load.
        assert!(report.rounds >= 2, "{}", report.rounds);
        assert!(report.rounds as usize <= report.loaded.len() + 1);
    }

    #[test]
    fn a_blocked_load_holds_up_nothing_else() {
        let fx = fixture("");
        let (release, blocked) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let mut loader = FakeLoader::new(&fx.roots);
        // nvme stands in for ahci: finit_module returns only when the
        // driver's probes are done.
        loader.blocks.insert("nvme", Mutex::new(blocked));
        loader.done = Some(done_tx);

        let report = std::thread::scope(|s| {
            let run = s.spawn(|| coldplug_with(&fx.roots, &loader));
            // Moved here so a failed assertion drops it, which unblocks nvme
            // and lets the scope end instead of hanging.
            let release = release;
            // Every other module finishes while nvme is stuck — including
            // virtio_blk, whose device only appears once virtio_pci has
            // loaded: the rescan does not wait for unrelated loads.
            let mut seen: Vec<String> = Vec::new();
            let others = VIRTIO_PCI_CHAIN.iter().chain(&NVME_CHAIN[..6]);
            for module in others.chain(&["virtio_blk"]) {
                if !seen.iter().any(|m| m == module) {
                    seen.extend(wait_for(&done, module));
                }
            }
            assert!(!seen.iter().any(|m| m == "nvme"), "{seen:?}");
            release.send(()).unwrap();
            // A second load of the blocked module (a bug) must not hang.
            drop(release);
            run.join().unwrap()
        })
        .unwrap();

        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(report.loaded.len(), 13, "{:?}", report.loaded);
        assert_eq!(loader.violations(), Vec::<String>::new());
    }

    #[test]
    fn a_shared_dependency_loads_once_before_its_dependents() {
        let fx = fixture("");
        add_crc_devices(&fx);
        let (release, blocked) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let mut loader = FakeLoader::new(&fx.roots);
        // Hold the shared dependency so the other workers reach it while it
        // is still loading.
        loader
            .blocks
            .insert("crct10dif_common", Mutex::new(blocked));
        loader.done = Some(done_tx);

        let report = std::thread::scope(|s| {
            let run = s.spawn(|| coldplug_with(&fx.roots, &loader));
            let release = release;
            wait_for(&done, "virtio_pci");
            release.send(()).unwrap();
            // A second load of the blocked module (a bug) must not hang.
            drop(release);
            run.join().unwrap()
        })
        .unwrap();

        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(loader.count("crct10dif_common"), 1, "{:?}", loader.calls());
        for root in ["crct10dif_pclmul", "crct10dif_generic", "nvme"] {
            assert_eq!(loader.count(root), 1, "{root}: {:?}", loader.calls());
            assert!(
                position(&report.loaded, "crct10dif_common") < position(&report.loaded, root),
                "{:?}",
                report.loaded
            );
        }
        assert_eq!(loader.violations(), Vec::<String>::new());
        assert_deps_first(&fx, &report.loaded);
    }

    #[test]
    fn a_failed_shared_dependency_fails_every_dependent() {
        let fx = fixture("");
        add_crc_devices(&fx);
        let mut loader = FakeLoader::new(&fx.roots);
        loader.fails.insert("crct10dif_common", Errno::ENOEXEC);
        let report = coldplug_with(&fx.roots, &loader).unwrap();

        let mut failed: Vec<(String, String)> = report
            .failed
            .iter()
            .map(|f| (f.module.clone(), f.error.clone()))
            .collect();
        failed.sort();
        let because = |d: &str| format!("dependency {d} failed to load");
        let mut expected = vec![
            ("crc_t10dif".to_string(), because("crct10dif_common")),
            (
                "crct10dif_common".to_string(),
                "invalid module format (built for another kernel?) (ENOEXEC)".to_string(),
            ),
            ("crct10dif_generic".to_string(), because("crct10dif_common")),
            ("crct10dif_pclmul".to_string(), because("crct10dif_common")),
            ("nvme".to_string(), because("nvme_core")),
            ("nvme_core".to_string(), because("t10_pi")),
            ("t10_pi".to_string(), because("crc_t10dif")),
        ];
        expected.sort();
        assert_eq!(failed, expected);
        assert_eq!(loader.count("crct10dif_common"), 1, "not retried");
        for dependent in ["crct10dif_pclmul", "crct10dif_generic", "nvme"] {
            assert_eq!(
                loader.count(dependent),
                0,
                "{dependent} tried despite failed dep"
            );
        }
        // The rest of the machine is unaffected.
        assert!(report.loaded.contains(&"virtio_blk".to_string()));
        assert!(report.loaded.contains(&"crc64_rocksoft".to_string()));
    }

    #[test]
    fn already_loaded_modules_are_skipped() {
        let fx = fixture(
            "virtio_ring 45056 2 virtio_blk,virtio_pci, Live 0x0000000000000000\n\
             virtio 20480 2 virtio_blk,virtio_pci, Live 0x0000000000000000\n",
        );
        // A built-in or earlier-loaded module shows up in /sys/module only.
        std::fs::create_dir_all(fx.roots.sys_module.join("crc64")).unwrap();
        let loader = FakeLoader::new(&fx.roots);
        let report = coldplug_with(&fx.roots, &loader).unwrap();
        for skipped in ["virtio_ring", "virtio", "crc64"] {
            assert_eq!(loader.count(skipped), 0, "{skipped} was loaded again");
            assert!(!report.loaded.contains(&skipped.to_string()));
        }
        assert!(report.loaded.contains(&"virtio_blk".to_string()));
        assert!(report.loaded.contains(&"nvme".to_string()));
        assert_eq!(loader.violations(), Vec::<String>::new());
    }

    #[test]
    fn failures_are_recorded_and_the_run_goes_on() {
        let fx = fixture("");
        let mut loader = FakeLoader::new(&fx.roots);
        loader.fails.insert("nvme_core", Errno::ENOEXEC);
        // EEXIST means someone else loaded it: counts as loaded.
        loader.fails.insert("virtio_pci_modern_dev", Errno::EEXIST);
        let report = coldplug_with(&fx.roots, &loader).unwrap();

        // One chain, one worker: this order is fixed.
        assert_eq!(
            report.failed,
            [
                ModuleFailure {
                    module: "nvme_core".into(),
                    error: "invalid module format (built for another kernel?) (ENOEXEC)".into(),
                },
                ModuleFailure {
                    module: "nvme".into(),
                    error: "dependency nvme_core failed to load".into(),
                },
            ]
        );
        assert_eq!(loader.count("nvme"), 0, "nvme tried despite failed dep");
        assert!(report.loaded.contains(&"virtio_pci_modern_dev".to_string()));
        assert!(report.loaded.contains(&"virtio_blk".to_string()));
        assert_eq!(
            loader.count("nvme_core"),
            1,
            "a failed module is not retried after later scans"
        );
    }

    #[test]
    fn soft_pre_dependencies_load_first_and_may_fail_quietly() {
        let fx = fixture("");
        // Real line from modules.softdep; the name is an alias of two modules.
        write(
            &fx.roots.modules_dir.join("modules.softdep"),
            "softdep crc_t10dif pre: crct10dif\n",
        );
        let mut loader = FakeLoader::new(&fx.roots);
        // No PCLMULQDQ on QEMU's default CPU: the driver finds nothing.
        loader.fails.insert("crct10dif_pclmul", Errno::ENODEV);
        let report = coldplug_with(&fx.roots, &loader).unwrap();

        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let calls = loader.calls();
        let pos = |m: &str| position(&calls, m);
        assert!(pos("crct10dif_common") < pos("crct10dif_pclmul"));
        assert!(pos("crct10dif_pclmul") < pos("crct10dif_generic"));
        assert!(pos("crct10dif_generic") < pos("crc_t10dif"));
        assert!(report.loaded.contains(&"nvme".to_string()));
        assert!(!report.loaded.contains(&"crct10dif_pclmul".to_string()));
        assert_eq!(loader.violations(), Vec::<String>::new());
    }

    #[test]
    fn no_devices_one_scan_nothing_loaded() {
        let fx = fixture("");
        std::fs::remove_dir_all(&fx.roots.sys_devices).unwrap();
        std::fs::create_dir_all(&fx.roots.sys_devices).unwrap();
        let report = coldplug_with(&fx.roots, &FakeLoader::new(&fx.roots)).unwrap();
        assert_eq!(
            report,
            ColdplugReport {
                rounds: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn missing_index_is_an_error_naming_the_file() {
        let fx = fixture("");
        std::fs::remove_file(fx.roots.modules_dir.join("modules.alias")).unwrap();
        let loader = FakeLoader::new(&fx.roots);
        let err = coldplug_with(&fx.roots, &loader).unwrap_err();
        assert!(err.to_string().contains("modules.alias"), "{err}");
    }

    #[test]
    fn real_loader_reports_open_failure() {
        let err = KernelLoader
            .load("nope", Path::new("/nonexistent/nope.ko"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nope.ko"), "{err}");
    }
}
