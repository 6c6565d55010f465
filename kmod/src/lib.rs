//! Kernel module index: `modules.dep` and `modules.alias` parsing, module
//! name normalization, modalias glob matching and dependency closure.
//!
//! Shared by the agent (coldplug on the node) and `warden-mkinitramfs` (which
//! ships a reduced index for exactly the modules it packs). Everything here is
//! pure: parsers take `&str`, nothing reads files, loads modules or touches
//! `/sys`. It must never grow I/O — the callers own that.
//!
//! Names: the kernel spells module names with `_` (`/proc/modules`,
//! `/sys/module`), while file names often use `-` (`nvme-core.ko`). Every
//! name this crate hands out is normalized to the `_` spelling.

pub mod glob;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

pub use glob::fnmatch;

/// Why an index could not be parsed or a closure could not be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KmodError {
    /// A `modules.dep` line without the `path:` separator.
    #[error("modules.dep line {line}: no ':' after the module path: {text:?}")]
    BadDepLine { line: usize, text: String },
    /// A `modules.alias` line that is not `alias PATTERN MODULE`.
    #[error("modules.alias line {line}: expected 'alias PATTERN MODULE': {text:?}")]
    BadAliasLine { line: usize, text: String },
    /// A `modules.softdep` line without a module name.
    #[error("modules.softdep line {line}: no module name: {text:?}")]
    BadSoftdepLine { line: usize, text: String },
    /// A module (or a dependency of one) that `modules.dep` does not list.
    #[error("module {module} is not in modules.dep")]
    UnknownModule { module: String },
    /// `modules.dep` says a module depends, eventually, on itself.
    #[error("dependency cycle through module {module}")]
    DependencyCycle { module: String },
}

/// Normalizes a module name to the kernel's spelling: `-` becomes `_`.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The normalized module name of a module path such as
/// `kernel/drivers/nvme/host/nvme-core.ko` (→ `nvme_core`); `.ko.xz`,
/// `.ko.zst` and `.ko.gz` work too. `None` if the file is not a `.ko*`.
pub fn name_from_path(path: &str) -> Option<String> {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))?;
    if stem.is_empty() {
        return None;
    }
    Some(normalize_name(stem))
}

/// One line of `modules.dep`: a module's path (relative to
/// `/lib/modules/KVER`) and the paths of everything it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepEntry {
    /// Normalized module name.
    pub name: String,
    /// Path as written in `modules.dep`.
    pub path: String,
    /// Dependency paths as written (depmod lists the full transitive set).
    pub deps: Vec<String>,
}

/// A parsed `modules.dep`, in file order, indexed by normalized name.
#[derive(Clone, Debug, Default)]
pub struct DepIndex {
    entries: Vec<DepEntry>,
    by_name: HashMap<String, usize>,
}

impl DepIndex {
    /// Parses `modules.dep` text. Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, KmodError> {
        let mut index = DepIndex::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || KmodError::BadDepLine {
                line: i + 1,
                text: raw.to_string(),
            };
            let (path, deps) = line.split_once(':').ok_or_else(bad)?;
            let path = path.trim();
            let name = name_from_path(path).ok_or_else(bad)?;
            let deps = deps.split_whitespace().map(str::to_string).collect();
            index.push(DepEntry {
                name,
                path: path.to_string(),
                deps,
            });
        }
        Ok(index)
    }

    fn push(&mut self, entry: DepEntry) {
        // depmod never repeats a module; if a hand-edited file does, the
        // first line wins, as it does for modprobe.
        if !self.by_name.contains_key(&entry.name) {
            self.by_name.insert(entry.name.clone(), self.entries.len());
            self.entries.push(entry);
        }
    }

    /// All entries, in file order.
    pub fn entries(&self) -> &[DepEntry] {
        &self.entries
    }

    /// The entry of a module, by any spelling of its name.
    pub fn get(&self, name: &str) -> Option<&DepEntry> {
        self.by_name
            .get(&normalize_name(name))
            .and_then(|&i| self.entries.get(i))
    }

    /// Whether the index lists this module.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The modules to load for `roots`, dependencies first, each once
    /// (normalized names). Roots keep their relative order where the
    /// dependencies allow it.
    pub fn closure<S: AsRef<str>>(&self, roots: &[S]) -> Result<Vec<String>, KmodError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for root in roots {
            self.visit(
                &normalize_name(root.as_ref()),
                &mut order,
                &mut done,
                &mut visiting,
            )?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        order: &mut Vec<String>,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
    ) -> Result<(), KmodError> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(KmodError::DependencyCycle {
                module: name.to_string(),
            });
        }
        let entry = self.get(name).ok_or_else(|| KmodError::UnknownModule {
            module: name.to_string(),
        })?;
        // depmod writes the transitive set with the most basic modules last
        // (modprobe loads the list back to front); visiting it reversed keeps
        // that order while the recursion makes it right for any file.
        for dep in entry.deps.iter().rev() {
            let dep_name = name_from_path(dep).ok_or_else(|| KmodError::UnknownModule {
                module: dep.clone(),
            })?;
            self.visit(&dep_name, order, done, visiting)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }

    /// The index restricted to `keep` (normalized names), in file order.
    /// Dependencies are not added: pass a closed set (see [`Self::closure`]).
    pub fn filter(&self, keep: &BTreeSet<String>) -> DepIndex {
        let mut out = DepIndex::default();
        for entry in &self.entries {
            if keep.contains(&entry.name) {
                out.push(entry.clone());
            }
        }
        out
    }

    /// `modules.dep` text for this index (`path: dep dep`, one per line).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for entry in &self.entries {
            out.push_str(&entry.path);
            out.push(':');
            for dep in &entry.deps {
                out.push(' ');
                out.push_str(dep);
            }
            out.push('\n');
        }
        out
    }
}

/// One `alias PATTERN MODULE` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    /// fnmatch-style pattern, e.g. `pci:v00001AF4d*sv*sd*bc*sc*i*`.
    pub pattern: String,
    /// Normalized module name.
    pub module: String,
}

/// A parsed `modules.alias`, in file order.
#[derive(Clone, Debug, Default)]
pub struct AliasIndex {
    aliases: Vec<Alias>,
}

impl AliasIndex {
    /// Parses `modules.alias` text. Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, KmodError> {
        let mut aliases = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("alias"), Some(pattern), Some(module), None) => aliases.push(Alias {
                    pattern: pattern.to_string(),
                    module: normalize_name(module),
                }),
                _ => {
                    return Err(KmodError::BadAliasLine {
                        line: i + 1,
                        text: raw.to_string(),
                    })
                }
            }
        }
        Ok(AliasIndex { aliases })
    }

    /// All aliases, in file order.
    pub fn aliases(&self) -> &[Alias] {
        &self.aliases
    }

    /// Every module whose alias pattern matches `modalias`, each once, in
    /// file order (a device may match several drivers; all are loaded, as
    /// udev does).
    pub fn lookup(&self, modalias: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for alias in &self.aliases {
            if fnmatch(&alias.pattern, modalias) && !out.contains(&alias.module) {
                out.push(alias.module.clone());
            }
        }
        out
    }

    /// The index restricted to aliases of modules in `keep`, in file order.
    pub fn filter(&self, keep: &BTreeSet<String>) -> AliasIndex {
        AliasIndex {
            aliases: self
                .aliases
                .iter()
                .filter(|a| keep.contains(&a.module))
                .cloned()
                .collect(),
        }
    }

    /// `modules.alias` text for this index.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for alias in &self.aliases {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "alias {} {}", alias.pattern, alias.module);
        }
        out
    }
}

/// `modules.softdep`: modules to load before (`pre:`) a module although it
/// does not link against them (e.g. `r8169` needs the `realtek` PHY driver,
/// `crc_t10dif` wants an accelerated `crct10dif`). Only `pre:` is kept; a
/// name may be a module or an alias.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoftdepIndex {
    pre: BTreeMap<String, Vec<String>>,
}

impl SoftdepIndex {
    /// Parses `modules.softdep` text (`softdep MOD pre: A B post: C`).
    /// Lines that are not `softdep` lines (comments, blank) are skipped.
    pub fn parse(text: &str) -> Result<Self, KmodError> {
        let mut index = SoftdepIndex::default();
        for (i, raw) in text.lines().enumerate() {
            let mut words = raw.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let module = words.next().ok_or_else(|| KmodError::BadSoftdepLine {
                line: i + 1,
                text: raw.to_string(),
            })?;
            let mut in_pre = false;
            for word in words {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    name if in_pre => index
                        .pre
                        .entry(normalize_name(module))
                        .or_default()
                        .push(name.to_string()),
                    _ => {}
                }
            }
        }
        Ok(index)
    }

    /// The `pre:` names of a module (modules or aliases), in file order.
    pub fn pre(&self, module: &str) -> &[String] {
        self.pre
            .get(&normalize_name(module))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Builds an index from already-resolved module names.
    pub fn from_pre(pre: BTreeMap<String, Vec<String>>) -> Self {
        SoftdepIndex { pre }
    }

    /// `modules.softdep` text for this index.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (module, pre) in &self.pre {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "softdep {module} pre: {}", pre.join(" "));
        }
        out
    }
}

/// The loadable modules a softdep name stands for: the module itself if
/// `modules.dep` has it, else every module with that alias (as modprobe
/// does), in alias-file order.
pub fn resolve_name(dep: &DepIndex, alias: &AliasIndex, name: &str) -> Vec<String> {
    if dep.contains(name) {
        return vec![normalize_name(name)];
    }
    alias
        .lookup(name)
        .into_iter()
        .filter(|m| dep.contains(m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real lines from /lib/modules/6.1.0-56-amd64/modules.dep (Debian 12).
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
kernel/fs/efivarfs/efivarfs.ko:
";

    // Real lines from /lib/modules/6.1.0-56-amd64/modules.alias.
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000002v* virtio_blk
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias pci:v0000106Bd00002005sv*sd*bc*sc*i* nvme
alias scsi:t-0x00* sd_mod
alias mdio:0000000000011100110010?????????? realtek
alias fs-efivarfs efivarfs
";

    #[test]
    fn names_from_paths() {
        assert_eq!(
            name_from_path("kernel/drivers/virtio/virtio_pci.ko").as_deref(),
            Some("virtio_pci")
        );
        assert_eq!(
            name_from_path("kernel/drivers/nvme/host/nvme-core.ko").as_deref(),
            Some("nvme_core")
        );
        assert_eq!(
            name_from_path("kernel/lib/crc64-rocksoft.ko.zst").as_deref(),
            Some("crc64_rocksoft")
        );
        assert_eq!(name_from_path("x/t10-pi.ko.xz").as_deref(), Some("t10_pi"));
        assert_eq!(name_from_path("modules.dep"), None);
        assert_eq!(name_from_path(".ko"), None);
        assert_eq!(normalize_name("nvme-core"), "nvme_core");
    }

    #[test]
    fn dep_parse_and_lookup_any_spelling() {
        let idx = DepIndex::parse(DEP).unwrap();
        assert_eq!(idx.entries().len(), 14);
        let core = idx.get("nvme-core").unwrap();
        assert_eq!(core.name, "nvme_core");
        assert_eq!(core.path, "kernel/drivers/nvme/host/nvme-core.ko");
        assert_eq!(core.deps.len(), 5);
        assert!(idx.contains("nvme_core"));
        assert!(idx.get("efivarfs").unwrap().deps.is_empty());
        assert!(!idx.contains("e1000e"));
    }

    #[test]
    fn dep_parse_rejects_line_without_colon() {
        let err = DepIndex::parse("kernel/a.ko\n").unwrap_err();
        assert_eq!(
            err,
            KmodError::BadDepLine {
                line: 1,
                text: "kernel/a.ko".into()
            }
        );
    }

    #[test]
    fn closure_puts_deps_first_each_once() {
        let idx = DepIndex::parse(DEP).unwrap();
        let order = idx.closure(&["nvme", "virtio_pci", "virtio-blk"]).unwrap();
        assert_eq!(
            order,
            [
                "crct10dif_common",
                "crc64",
                "crc_t10dif",
                "crc64_rocksoft",
                "t10_pi",
                "nvme_core",
                "nvme",
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_blk",
            ]
        );
        // Every module comes after each of its dependencies.
        for (i, name) in order.iter().enumerate() {
            for dep in &idx.get(name).unwrap().deps {
                let dep = name_from_path(dep).unwrap();
                let at = order.iter().position(|n| *n == dep).unwrap();
                assert!(at < i, "{dep} must load before {name}");
            }
        }
    }

    #[test]
    fn closure_unknown_module_and_cycle() {
        let idx = DepIndex::parse(DEP).unwrap();
        assert_eq!(
            idx.closure(&["e1000e"]).unwrap_err(),
            KmodError::UnknownModule {
                module: "e1000e".into()
            }
        );
        let cyc = DepIndex::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(
            cyc.closure(&["a"]),
            Err(KmodError::DependencyCycle { .. })
        ));
    }

    #[test]
    fn alias_lookup_real_modaliases() {
        let idx = AliasIndex::parse(ALIAS).unwrap();
        // QEMU's virtio-blk-pci (transitional) and the virtio device behind it.
        assert_eq!(
            idx.lookup("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"),
            ["virtio_pci"]
        );
        assert_eq!(idx.lookup("virtio:d00000002v00001AF4"), ["virtio_blk"]);
        // QEMU's NVMe controller matches by class 01/08/02.
        assert_eq!(
            idx.lookup("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"),
            ["nvme"]
        );
        assert_eq!(idx.lookup("scsi:t-0x00"), ["sd_mod"]);
        assert_eq!(
            idx.lookup("mdio:00000000000111001100101010101010"),
            ["realtek"]
        );
        assert!(idx
            .lookup("pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00")
            .is_empty());
    }

    #[test]
    fn alias_parse_rejects_garbage() {
        assert!(matches!(
            AliasIndex::parse("alias onlyone\n"),
            Err(KmodError::BadAliasLine { line: 1, .. })
        ));
        assert!(matches!(
            AliasIndex::parse("softdep a pre: b\n"),
            Err(KmodError::BadAliasLine { .. })
        ));
    }

    #[test]
    fn softdeps_pre_only_and_resolved_through_aliases() {
        // Real lines from modules.softdep, plus one with pre and post.
        let text = "# Soft dependencies extracted from modules themselves.\n\
            softdep crc_t10dif pre: crct10dif\n\
            softdep r8169 pre: realtek\n\
            softdep crc64_rocksoft pre: crc64\n\
            softdep cifs gcm\n\
            softdep x pre: a b post: c\n";
        let soft = SoftdepIndex::parse(text).unwrap();
        assert_eq!(soft.pre("crc-t10dif"), ["crct10dif"]);
        assert_eq!(soft.pre("r8169"), ["realtek"]);
        assert_eq!(soft.pre("x"), ["a", "b"]);
        assert!(soft.pre("cifs").is_empty());
        assert!(soft.pre("nvme").is_empty());

        let dep = DepIndex::parse(
            "kernel/crypto/crct10dif_common.ko:\n\
             kernel/arch/x86/crypto/crct10dif-pclmul.ko: kernel/crypto/crct10dif_common.ko\n\
             kernel/crypto/crct10dif_generic.ko: kernel/crypto/crct10dif_common.ko\n\
             kernel/lib/crc64.ko:\n",
        )
        .unwrap();
        let alias = AliasIndex::parse(
            "alias crct10dif crct10dif_pclmul\nalias crct10dif crct10dif_generic\n",
        )
        .unwrap();
        assert_eq!(
            resolve_name(&dep, &alias, "crct10dif"),
            ["crct10dif_pclmul", "crct10dif_generic"]
        );
        assert_eq!(resolve_name(&dep, &alias, "crc64"), ["crc64"]);
        assert!(resolve_name(&dep, &alias, "realtek").is_empty());

        let mut pre = BTreeMap::new();
        pre.insert(
            "crc_t10dif".to_string(),
            vec!["crct10dif_pclmul".to_string()],
        );
        let small = SoftdepIndex::from_pre(pre);
        assert_eq!(
            small.to_text(),
            "softdep crc_t10dif pre: crct10dif_pclmul\n"
        );
        assert_eq!(SoftdepIndex::parse(&small.to_text()).unwrap(), small);
    }

    #[test]
    fn filter_round_trips_through_text() {
        let dep = DepIndex::parse(DEP).unwrap();
        let alias = AliasIndex::parse(ALIAS).unwrap();
        let keep: BTreeSet<String> = dep.closure(&["virtio_blk"]).unwrap().into_iter().collect();
        let small = dep.filter(&keep);
        assert_eq!(
            small.to_text(),
            "kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        );
        let again = DepIndex::parse(&small.to_text()).unwrap();
        assert_eq!(again.entries(), small.entries());
        let small_alias = alias.filter(&keep);
        assert_eq!(
            small_alias.to_text(),
            "alias virtio:d00000002v* virtio_blk\n"
        );
        assert_eq!(
            AliasIndex::parse(&small_alias.to_text()).unwrap().aliases(),
            small_alias.aliases()
        );
    }
}
