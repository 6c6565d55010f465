//! Which kernel modules go into the ramdisk, and the reduced index that
//! describes exactly them.
//!
//! Owns the choice (a default list of storage and network drivers, closed
//! over `modules.dep`) and the filtered `modules.dep` / `modules.alias`
//! written under `/lib/modules/KVER` for the agent's coldplug. It reads the
//! host's module index and never loads anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use warden_kmod::{
    name_from_path, normalize_name, resolve_name, AliasIndex, DepIndex, SoftdepIndex,
};

/// Drivers a bare-metal node (or the QEMU node) needs to reach its disks and
/// the network. Their `modules.dep` closure is added automatically; the
/// virtio transport is listed because no device driver depends on it.
pub const DEFAULT_MODULES: &[&str] = &[
    // virtio (the QEMU node)
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    // NVMe, SATA/AHCI, SCSI disks and common server HBAs/RAID controllers
    "nvme",
    "ahci",
    "sd_mod",
    "megaraid_sas",
    "mpt3sas",
    "smartpqi",
    // common server and lab NICs
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "bnxt_en",
    "tg3",
    "mlx5_core",
    "r8169",
    // UEFI variables (BootNext handoff)
    "efivarfs",
];

/// Why the module set could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// An index file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An index file did not parse, or a closure failed.
    #[error("{path}: {source}")]
    Index {
        path: PathBuf,
        source: warden_kmod::KmodError,
    },
    /// A requested module is neither loadable nor built in.
    #[error("module {module} is in neither modules.dep nor modules.builtin of {dir}")]
    Unknown { module: String, dir: PathBuf },
}

/// The modules to ship for one kernel.
#[derive(Clone, Debug)]
pub struct ModuleSet {
    /// Module names in load order (dependencies first).
    pub names: Vec<String>,
    /// `(path relative to /lib/modules/KVER, host file)`, sorted by path.
    pub files: Vec<(String, PathBuf)>,
    /// The reduced `modules.dep`.
    pub dep_text: String,
    /// The reduced `modules.alias`.
    pub alias_text: String,
    /// `modules.softdep` with `pre:` names resolved to shipped modules.
    pub softdep_text: String,
    /// Requested modules that are built into this kernel (nothing to ship).
    pub builtin: Vec<String>,
}

fn read(path: &Path) -> Result<String, ModulesError> {
    std::fs::read_to_string(path).map_err(|source| ModulesError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Closes `wanted` over `modules_dir/modules.dep` and filters the index.
pub fn select<S: AsRef<str>>(modules_dir: &Path, wanted: &[S]) -> Result<ModuleSet, ModulesError> {
    let dep_path = modules_dir.join("modules.dep");
    let alias_path = modules_dir.join("modules.alias");
    let dep = DepIndex::parse(&read(&dep_path)?).map_err(|source| ModulesError::Index {
        path: dep_path.clone(),
        source,
    })?;
    let alias = AliasIndex::parse(&read(&alias_path)?).map_err(|source| ModulesError::Index {
        path: alias_path,
        source,
    })?;
    // modules.builtin is optional: without it every module must be loadable.
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(name_from_path)
        .collect();

    let mut roots = Vec::new();
    let mut skipped = Vec::new();
    for module in wanted {
        let name = normalize_name(module.as_ref());
        if dep.contains(&name) {
            roots.push(name);
        } else if builtin.contains(&name) {
            skipped.push(name);
        } else {
            return Err(ModulesError::Unknown {
                module: name,
                dir: modules_dir.to_path_buf(),
            });
        }
    }
    // Soft `pre:` dependencies ship too (r8169 cannot drive most chips
    // without the realtek PHY driver); they may pull in more, so repeat
    // until the set stops growing. modules.softdep is optional.
    let softdep_path = modules_dir.join("modules.softdep");
    let soft = match std::fs::read_to_string(&softdep_path) {
        Ok(text) => SoftdepIndex::parse(&text).map_err(|source| ModulesError::Index {
            path: softdep_path,
            source,
        })?,
        Err(_) => SoftdepIndex::default(),
    };
    let mut pre: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let names = loop {
        let names = dep.closure(&roots).map_err(|source| ModulesError::Index {
            path: dep_path.clone(),
            source,
        })?;
        let mut grew = false;
        for name in &names {
            for soft_name in soft.pre(name) {
                for module in resolve_name(&dep, &alias, soft_name) {
                    let list = pre.entry(name.clone()).or_default();
                    if !list.contains(&module) {
                        list.push(module.clone());
                    }
                    if !names.contains(&module) && !roots.contains(&module) {
                        roots.push(module);
                        grew = true;
                    }
                }
            }
        }
        if !grew {
            break names;
        }
    };
    // Load order with each module's soft pre-dependencies just before it.
    let mut ordered: Vec<&String> = Vec::new();
    for name in &names {
        ordered.extend(pre.get(name).into_iter().flatten());
        ordered.push(name);
    }
    let names = dep
        .closure(&ordered)
        .map_err(|source| ModulesError::Index {
            path: dep_path.clone(),
            source,
        })?;
    let keep: BTreeSet<String> = names.iter().cloned().collect();
    let small = dep.filter(&keep);
    let mut files: Vec<(String, PathBuf)> = small
        .entries()
        .iter()
        .map(|e| (e.path.clone(), modules_dir.join(&e.path)))
        .collect();
    files.sort();
    Ok(ModuleSet {
        names,
        files,
        dep_text: small.to_text(),
        alias_text: alias.filter(&keep).to_text(),
        softdep_text: SoftdepIndex::from_pre(pre).to_text(),
        builtin: skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = "/lib/modules/6.1.0-56-amd64";

    #[test]
    fn default_set_on_the_real_debian_kernel() {
        let dir = Path::new(REAL);
        if !dir.join("modules.dep").is_file() {
            panic!("{REAL} is missing: run scripts/setup (linux-image-amd64)");
        }
        let set = select(dir, DEFAULT_MODULES).unwrap();
        let pos = |m: &str| {
            set.names
                .iter()
                .position(|n| n == m)
                .unwrap_or_else(|| panic!("{m} not in {:?}", set.names))
        };
        // The chains LAB.md lists, in a loadable order.
        for chain in [
            &["virtio_ring", "virtio", "virtio_pci"][..],
            &["failover", "net_failover", "virtio_net"],
            &["crc64", "crc64_rocksoft", "t10_pi", "nvme_core", "nvme"],
            &["crct10dif_common", "crc_t10dif", "t10_pi"],
            &["scsi_common", "scsi_mod", "libata", "libahci", "ahci"],
            &["scsi_mod", "sd_mod"],
        ] {
            for pair in chain.windows(2) {
                assert!(
                    pos(pair[0]) < pos(pair[1]),
                    "{} before {}",
                    pair[0],
                    pair[1]
                );
            }
        }
        pos("virtio_pci_legacy_dev");
        pos("virtio_pci_modern_dev");
        pos("efivarfs");
        // Soft pre-dependencies ship, and load first.
        assert!(pos("realtek") < pos("r8169"));
        pos("crct10dif_pclmul");
        let soft = SoftdepIndex::parse(&set.softdep_text).unwrap();
        assert_eq!(soft.pre("r8169"), ["realtek"]);
        assert!(soft
            .pre("crc_t10dif")
            .contains(&"crct10dif_pclmul".to_string()));
        assert_eq!(set.files.len(), set.names.len());
        assert!(set.files.iter().all(|(_, host)| host.is_file()));
        // The reduced index is closed: every dependency it names is shipped.
        let small = DepIndex::parse(&set.dep_text).unwrap();
        for entry in small.entries() {
            for d in &entry.deps {
                assert!(
                    small.contains(&name_from_path(d).unwrap()),
                    "{d} not shipped"
                );
            }
        }
        let alias = AliasIndex::parse(&set.alias_text).unwrap();
        assert_eq!(alias.lookup("virtio:d00000002v00001AF4"), ["virtio_blk"]);
        assert!(alias.aliases().iter().all(|a| small.contains(&a.module)));
    }

    #[test]
    fn unknown_module_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), "kernel/a.ko:\n").unwrap();
        std::fs::write(dir.path().join("modules.alias"), "").unwrap();
        std::fs::write(dir.path().join("modules.builtin"), "kernel/b.ko\n").unwrap();
        let set = select(dir.path(), &["a", "b"]).unwrap();
        assert_eq!(set.names, ["a"]);
        assert_eq!(set.builtin, ["b"]);
        let err = select(dir.path(), &["zz-top"]).unwrap_err();
        assert!(err.to_string().contains("zz_top"), "{err}");
    }
}
