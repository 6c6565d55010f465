//! Which shared libraries an ELF program needs, and where the dynamic loader
//! will look for them in the ramdisk.
//!
//! Owns reading `DT_NEEDED` and `PT_INTERP` with the `object` crate and the
//! recursive resolution of sonames against the loader's library directories.
//! It must never run the program or `ldd` (that executes code from the
//! inputs), and never write anything.
//!
//! Placement: each library goes into the ramdisk at `DIR/SONAME` for the
//! first library directory that has it on the host — the path the loader
//! itself would try first — with the bytes of the real file behind any
//! symlinks. The interpreter goes at its `PT_INTERP` path. On Debian 12's
//! merged /usr that gives `/lib/x86_64-linux-gnu/*.so*` and
//! `/lib64/ld-linux-x86-64.so.2` as plain files, which glibc's loader finds
//! without `/etc/ld.so.cache`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use object::elf::{FileHeader64, DT_NEEDED, DT_RPATH, DT_RUNPATH};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::Endianness;

/// glibc's search path on Debian amd64, in order (see `ld.so --help`),
/// plus `/lib64` where some distributions put libraries.
pub const DEFAULT_LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
    "/lib64",
    "/usr/lib64",
];

/// Why a program's libraries could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a 64-bit ELF file, or a malformed one.
    #[error("{path}: not a usable 64-bit ELF file: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// No library directory has this soname.
    #[error("{soname} (needed by {needed_by}) is in none of the library directories {dirs:?}")]
    NotFound {
        soname: String,
        needed_by: String,
        dirs: Vec<PathBuf>,
    },
}

/// What one ELF file asks of the dynamic loader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`; `None` if static.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` sonames, in header order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH` (or, without one, `DT_RPATH`) directories, in order.
    pub runpath: Vec<String>,
}

/// Reads `PT_INTERP` and `DT_NEEDED` from ELF bytes (64-bit only: the
/// ramdisk is x86_64). `path` is only used in errors.
pub fn inspect(data: &[u8], path: &Path) -> Result<ElfDeps, ElfError> {
    let parse = |e: object::read::Error| ElfError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let header = FileHeader64::<Endianness>::parse(data).map_err(parse)?;
    let endian = header.endian().map_err(parse)?;
    let mut deps = ElfDeps::default();
    for segment in header.program_headers(endian, data).map_err(parse)? {
        if let Some(interp) = segment.interpreter(endian, data).map_err(parse)? {
            deps.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data).map_err(parse)?;
    if let Some((dynamic, link)) = sections.dynamic(endian, data).map_err(parse)? {
        let strings = sections.strings(endian, data, link).map_err(parse)?;
        let (mut runpath, mut rpath) = (Vec::new(), Vec::new());
        for entry in dynamic {
            let tag = entry.tag32(endian);
            if !matches!(tag, Some(DT_NEEDED | DT_RUNPATH | DT_RPATH)) {
                continue;
            }
            let value = entry.string(endian, strings).map_err(parse)?;
            let value = String::from_utf8_lossy(value).into_owned();
            let split = || {
                value
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
            };
            match tag {
                Some(DT_NEEDED) => deps.needed.push(value.clone()),
                Some(DT_RUNPATH) => runpath.extend(split()),
                _ => rpath.extend(split()),
            }
        }
        // The loader ignores DT_RPATH when DT_RUNPATH is present.
        deps.runpath = if runpath.is_empty() { rpath } else { runpath };
    }
    Ok(deps)
}

/// One file to put in the ramdisk for the loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibFile {
    /// Absolute path inside the ramdisk.
    pub dest: String,
    /// The host file whose bytes go there (symlinks resolved).
    pub source: PathBuf,
}

/// Every library (and interpreter) that `programs` and the `dlopen`ed
/// `extra_sonames` need, recursively, sorted by destination.
pub fn resolve_closure(
    programs: &[PathBuf],
    extra_sonames: &[&str],
    lib_dirs: &[PathBuf],
) -> Result<Vec<LibFile>, ElfError> {
    let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut seen_sonames: BTreeSet<String> = BTreeSet::new();
    // (host file to inspect, how to name it in errors)
    let mut queue: VecDeque<PathBuf> = programs.iter().cloned().collect();

    for soname in extra_sonames {
        if seen_sonames.insert(soname.to_string()) {
            let lib = find(soname, "the ramdisk's dlopen list", lib_dirs)?;
            queue.push_back(lib.source.clone());
            out.insert(lib.dest, lib.source);
        }
    }

    let mut inspected: BTreeSet<PathBuf> = BTreeSet::new();
    while let Some(path) = queue.pop_front() {
        if !inspected.insert(path.clone()) {
            continue;
        }
        let data = std::fs::read(&path).map_err(|source| ElfError::Read {
            path: path.clone(),
            source,
        })?;
        let deps = inspect(&data, &path)?;
        if let Some(interp) = deps.interpreter {
            let source = canonical(Path::new(&interp))?;
            queue.push_back(source.clone());
            out.insert(interp, source);
        }
        // An object's own run path is searched before the system directories
        // (`$ORIGIN` is expanded against its host directory, which is also
        // where it lands in the ramdisk — except for /init itself).
        let origin = path
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut dirs: Vec<PathBuf> = deps
            .runpath
            .iter()
            .map(|d| PathBuf::from(d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin)))
            .collect();
        dirs.extend(lib_dirs.iter().cloned());
        for soname in deps.needed {
            if soname.contains('/') {
                // A path, not a soname: the loader opens it as is.
                let source = canonical(Path::new(&soname))?;
                queue.push_back(source.clone());
                out.insert(soname, source);
            } else if seen_sonames.insert(soname.clone()) {
                let lib = find(&soname, &path.display().to_string(), &dirs)?;
                queue.push_back(lib.source.clone());
                out.insert(lib.dest, lib.source);
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(dest, source)| LibFile { dest, source })
        .collect())
}

fn canonical(path: &Path) -> Result<PathBuf, ElfError> {
    std::fs::canonicalize(path).map_err(|source| ElfError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn find(soname: &str, needed_by: &str, lib_dirs: &[PathBuf]) -> Result<LibFile, ElfError> {
    for dir in lib_dirs {
        let candidate = dir.join(soname);
        if candidate.is_file() {
            return Ok(LibFile {
                dest: candidate.display().to_string(),
                source: canonical(&candidate)?,
            });
        }
    }
    Err(ElfError::NotFound {
        soname: soname.to_string(),
        needed_by: needed_by.to_string(),
        dirs: lib_dirs.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> Vec<PathBuf> {
        DEFAULT_LIB_DIRS.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn inspects_a_real_dynamic_binary() {
        let path = Path::new("/usr/bin/swtpm");
        let data = std::fs::read(path).expect("swtpm is installed by scripts/setup");
        let deps = inspect(&data, path).unwrap();
        assert_eq!(
            deps.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(
            deps.needed.iter().any(|n| n == "libc.so.6"),
            "{:?}",
            deps.needed
        );
        assert!(
            deps.needed
                .iter()
                .any(|n| n.starts_with("libswtpm_libtpms")),
            "{:?}",
            deps.needed
        );
        assert_eq!(deps.runpath, ["/usr/lib/x86_64-linux-gnu/swtpm"]);
    }

    #[test]
    fn static_binary_needs_nothing() {
        let path = Path::new("/bin/busybox");
        let data = std::fs::read(path).expect("busybox-static is installed by scripts/setup");
        assert_eq!(inspect(&data, path).unwrap(), ElfDeps::default());
    }

    #[test]
    fn not_elf_is_an_error_naming_the_file() {
        let err = inspect(b"#!/bin/sh\n", Path::new("/x/init")).unwrap_err();
        assert!(err.to_string().contains("/x/init"), "{err}");
    }

    #[test]
    fn closure_of_swtpm_with_tcti_plugins() {
        let libs = resolve_closure(
            &[PathBuf::from("/usr/bin/swtpm")],
            &["libtss2-tcti-device.so.0", "libtss2-tcti-swtpm.so.0"],
            &dirs(),
        )
        .unwrap();
        let dests: Vec<&str> = libs.iter().map(|l| l.dest.as_str()).collect();
        for want in [
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
            "/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0",
            // Needed by libtss2-tcti-*, not by swtpm: proves the recursion.
            "/lib/x86_64-linux-gnu/libtss2-mu.so.0",
            // Found through swtpm's DT_RUNPATH only.
            "/usr/lib/x86_64-linux-gnu/swtpm/libswtpm_libtpms.so.0",
        ] {
            assert!(dests.contains(&want), "{want} missing from {dests:?}");
        }
        let mut sorted = dests.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, dests, "sorted, each once");
        for lib in &libs {
            let meta = std::fs::symlink_metadata(&lib.source).unwrap();
            assert!(
                meta.is_file(),
                "{} is not the real file",
                lib.source.display()
            );
            let data = std::fs::read(&lib.source).unwrap();
            inspect(&data, &lib.source).unwrap();
        }
    }

    #[test]
    fn missing_soname_names_who_needs_it() {
        let err = resolve_closure(&[], &["libdoesnotexist.so.9"], &dirs()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("libdoesnotexist.so.9") && msg.contains("dlopen"),
            "{msg}"
        );
    }
}
