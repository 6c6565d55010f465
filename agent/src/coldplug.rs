//! Coldplug: load the kernel modules the node's devices need.
//!
//! Owns the scan of `modalias` files under `/sys/devices`, their resolution
//! through the ramdisk's `modules.alias` and `modules.dep` (via
//! `warden-kmod`), and the `finit_module` calls — one at a time, dependencies
//! first, in rounds until a round loads nothing new. Rounds matter: a driver
//! can create devices that need further drivers (the virtio transport
//! `virtio_pci` is what makes `virtio:d00000002…` appear for `virtio_blk`; an
//! HBA driver makes `scsi:t-0x00` appear for `sd_mod`).
//!
//! It must never abort on a module that fails to load (each failure is
//! recorded with what the errno means and the run goes on), never follow
//! symlinks in sysfs (they loop), and never call the kernel except through
//! [`ModuleLoader`], so the round logic is tested with a recording fake.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use warden_kmod::{resolve_name, AliasIndex, DepIndex, SoftdepIndex};
use warden_protocol::console::ModuleFailure;

/// A safety net: each round must load something for the next one to run, so
/// this is only reached if drivers kept creating devices for new drivers.
const MAX_ROUNDS: u32 = 16;

/// Modules no device announces through a `modalias`, loaded in the first
/// round when the ramdisk ships them: efivarfs is `=m` in Debian's 6.1
/// kernel, and the agent needs it to read and set boot variables.
pub const DEVICELESS_MODULES: &[&str] = &["efivarfs"];

/// What one coldplug run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColdplugReport {
    /// Rounds of scanning `/sys/devices` (the last one found nothing new).
    pub rounds: u32,
    /// Modules loaded, in load order (kernel names, `_` spelling).
    pub loaded: Vec<String>,
    /// Modules that failed to load, and why.
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
/// `finit_module`; tests use a recording fake.
pub trait ModuleLoader {
    /// Loads module `name` from the `.ko` file at `path`.
    fn load(&mut self, name: &str, path: &Path) -> Result<(), LoadError>;
}

/// The real loader: `finit_module(2)` on the opened file, no parameters.
#[derive(Debug, Default)]
pub struct KernelLoader;

impl ModuleLoader for KernelLoader {
    fn load(&mut self, _name: &str, path: &Path) -> Result<(), LoadError> {
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
/// `modules_dir/modules.alias` and `modules.dep`, loads what is missing,
/// and repeats until a round loads nothing new.
pub fn coldplug(sys_devices: &Path, modules_dir: &Path) -> Result<ColdplugReport, std::io::Error> {
    let roots = ColdplugRoots {
        sys_devices: sys_devices.to_path_buf(),
        modules_dir: modules_dir.to_path_buf(),
        sys_module: PathBuf::from("/sys/module"),
        proc_modules: PathBuf::from("/proc/modules"),
    };
    coldplug_with(&roots, &mut KernelLoader)
}

/// [`coldplug`] with explicit roots and loader. Errors only if the index
/// cannot be read or `sys_devices` cannot be listed; module failures are in
/// the report.
pub fn coldplug_with(
    roots: &ColdplugRoots,
    loader: &mut dyn ModuleLoader,
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

    let mut run = Run {
        dep,
        alias,
        soft,
        modules_dir: &roots.modules_dir,
        loader,
        report: ColdplugReport::default(),
        present: HashSet::new(),
        failed: HashSet::new(),
        round: 0,
        progress: false,
    };
    for round in 1..=MAX_ROUNDS {
        run.round = round;
        run.report.rounds = round;
        run.progress = false;
        run.present.extend(already_loaded(roots));
        let modaliases = scan_modaliases(&roots.sys_devices)?;

        // Every module any device asks for, in scan order, each once.
        let mut wanted: Vec<String> = Vec::new();
        if round == 1 {
            wanted.extend(
                DEVICELESS_MODULES
                    .iter()
                    .filter(|m| run.dep.contains(m))
                    .map(|m| m.to_string()),
            );
        }
        for modalias in &modaliases {
            for module in run.alias.lookup(modalias) {
                if !wanted.contains(&module) {
                    wanted.push(module);
                }
            }
        }
        for root in &wanted {
            run.load_tree(root, false, 0);
        }
        if !run.progress {
            break;
        }
    }
    Ok(run.report)
}

/// How deep soft dependencies of soft dependencies are followed: enough for
/// any real chain, and a stop for a cyclic modules.softdep.
const MAX_SOFTDEP_DEPTH: u32 = 4;

/// The state of one coldplug run.
struct Run<'a> {
    dep: DepIndex,
    alias: AliasIndex,
    soft: SoftdepIndex,
    modules_dir: &'a Path,
    loader: &'a mut dyn ModuleLoader,
    report: ColdplugReport,
    /// Modules we know are in the kernel, and modules we gave up on: neither
    /// is tried again in a later round.
    present: HashSet<String>,
    failed: HashSet<String>,
    round: u32,
    /// Whether this round loaded anything.
    progress: bool,
}

impl Run<'_> {
    /// Loads `root` with its dependencies (first) and soft pre-dependencies
    /// (before each module that names them). `optional` failures — soft
    /// dependencies, e.g. a CPU-specific crypto driver that finds no CPU
    /// support — are logged but not reported.
    fn load_tree(&mut self, root: &str, optional: bool, depth: u32) {
        if self.present.contains(root) || self.failed.contains(root) {
            return;
        }
        let order = match self.dep.closure(&[root]) {
            Ok(order) => order,
            Err(e) => return self.fail(root, e.to_string(), optional),
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

    fn load_one(&mut self, name: &str, optional: bool) {
        if self.present.contains(name) || self.failed.contains(name) {
            return;
        }
        // `closure` only returns names the index has.
        let Some(entry) = self.dep.get(name) else {
            return;
        };
        let failed_dep = entry
            .deps
            .iter()
            .filter_map(|d| warden_kmod::name_from_path(d))
            .find(|d| self.failed.contains(d));
        if let Some(d) = failed_dep {
            return self.fail(name, format!("dependency {d} failed to load"), optional);
        }
        let path = self.modules_dir.join(&entry.path);
        match self.loader.load(name, &path) {
            Ok(()) | Err(LoadError::Kernel(Errno::EEXIST)) => {
                tracing::debug!(module = %name, round = self.round, path = %path.display(), "module loaded");
                self.present.insert(name.to_string());
                self.report.loaded.push(name.to_string());
                self.progress = true;
            }
            Err(e) => self.fail(name, e.to_string(), optional),
        }
    }

    fn fail(&mut self, module: &str, error: String, optional: bool) {
        let round = self.round;
        self.failed.insert(module.to_string());
        if optional {
            tracing::info!(module, round, error = %error, "optional soft dependency not loaded");
            return;
        }
        tracing::warn!(module, round, error = %error, "module failed to load");
        self.report.failed.push(ModuleFailure {
            module: module.to_string(),
            error,
        });
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

/// Every non-empty `modalias` under `root`, sorted by path so rounds (and
/// the load order) are the same on every boot of the same machine. Symlinks
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
    use std::collections::HashMap;

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
    /// `modalias` files) and its `/sys/module` entry, or fails on request.
    struct FakeLoader {
        roots: ColdplugRoots,
        creates: HashMap<&'static str, (&'static str, &'static str)>,
        fails: HashMap<&'static str, Errno>,
        calls: Vec<String>,
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
            FakeLoader {
                roots: roots.clone(),
                creates,
                fails: HashMap::new(),
                calls: Vec::new(),
            }
        }
    }

    impl ModuleLoader for FakeLoader {
        fn load(&mut self, name: &str, path: &Path) -> Result<(), LoadError> {
            assert!(
                path.is_file(),
                "loader got a missing file {}",
                path.display()
            );
            self.calls.push(name.to_string());
            if let Some(errno) = self.fails.get(name) {
                return Err(LoadError::Kernel(*errno));
            }
            if let Some((rel, text)) = self.creates.get(name) {
                write(&self.roots.sys_devices.join(rel), text);
            }
            std::fs::create_dir_all(self.roots.sys_module.join(name)).unwrap();
            Ok(())
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
    fn rounds_until_nothing_new_virtio_blk_in_round_two() {
        let fx = fixture("");
        let mut loader = FakeLoader::new(&fx.roots);
        let report = coldplug_with(&fx.roots, &mut loader).unwrap();

        let mut expected: Vec<&str> = VIRTIO_PCI_CHAIN.to_vec();
        expected.extend(NVME_CHAIN);
        expected.push("virtio_blk");
        assert_eq!(report.loaded, expected);
        assert_eq!(loader.calls, expected, "each module loaded exactly once");
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        // Round 1: PCI drivers; round 2: virtio_blk; round 3: nothing new.
        assert_eq!(report.rounds, 3);
    }

    #[test]
    fn already_loaded_modules_are_skipped() {
        let fx = fixture(
            "virtio_ring 45056 2 virtio_blk,virtio_pci, Live 0x0000000000000000\n\
             virtio 20480 2 virtio_blk,virtio_pci, Live 0x0000000000000000\n",
        );
        // A built-in or earlier-loaded module shows up in /sys/module only.
        std::fs::create_dir_all(fx.roots.sys_module.join("crc64")).unwrap();
        let mut loader = FakeLoader::new(&fx.roots);
        let report = coldplug_with(&fx.roots, &mut loader).unwrap();
        for skipped in ["virtio_ring", "virtio", "crc64"] {
            assert!(
                !loader.calls.iter().any(|c| c == skipped),
                "{skipped} was loaded again"
            );
        }
        assert!(report.loaded.contains(&"virtio_blk".to_string()));
        assert!(report.loaded.contains(&"nvme".to_string()));
    }

    #[test]
    fn failures_are_recorded_and_the_run_goes_on() {
        let fx = fixture("");
        let mut loader = FakeLoader::new(&fx.roots);
        loader.fails.insert("nvme_core", Errno::ENOEXEC);
        // EEXIST means someone else loaded it: counts as loaded.
        loader.fails.insert("virtio_pci_modern_dev", Errno::EEXIST);
        let report = coldplug_with(&fx.roots, &mut loader).unwrap();

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
        assert!(
            !loader.calls.iter().any(|c| c == "nvme"),
            "nvme tried despite failed dep"
        );
        assert!(report.loaded.contains(&"virtio_pci_modern_dev".to_string()));
        assert!(report.loaded.contains(&"virtio_blk".to_string()));
        assert_eq!(
            loader.calls.iter().filter(|c| *c == "nvme_core").count(),
            1,
            "a failed module is not retried in later rounds"
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
        let report = coldplug_with(&fx.roots, &mut loader).unwrap();

        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let pos = |m: &str| loader.calls.iter().position(|c| c == m).unwrap();
        assert!(pos("crct10dif_common") < pos("crct10dif_pclmul"));
        assert!(pos("crct10dif_pclmul") < pos("crct10dif_generic"));
        assert!(pos("crct10dif_generic") < pos("crc_t10dif"));
        assert!(report.loaded.contains(&"nvme".to_string()));
        assert!(!report.loaded.contains(&"crct10dif_pclmul".to_string()));
    }

    #[test]
    fn no_devices_one_round_nothing_loaded() {
        let fx = fixture("");
        std::fs::remove_dir_all(&fx.roots.sys_devices).unwrap();
        std::fs::create_dir_all(&fx.roots.sys_devices).unwrap();
        let report = coldplug_with(&fx.roots, &mut FakeLoader::new(&fx.roots)).unwrap();
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
        let err = coldplug_with(&fx.roots, &mut FakeLoader::new(&fx.roots)).unwrap_err();
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
