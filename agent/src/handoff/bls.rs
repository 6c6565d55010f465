//! Boot Loader Specification type #1 entries (`/loader/entries/*.conf`):
//! parsing one entry's text, and the order that picks the default.
//!
//! Pure: text in, values out. It never reads a disk and never decides
//! whether a kernel exists (the caller does, and names the path).

use std::cmp::Ordering;

/// The keys of one entry the handoff uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlsEntry {
    /// The entry's file name without `.conf` (the spec's entry id).
    pub id: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub machine_id: Option<String>,
    pub sort_key: Option<String>,
    /// The kernel, as a path from the root of the partition the entry is on.
    pub linux: Option<String>,
    /// Initrds in the order given (the kernel gets them concatenated).
    pub initrd: Vec<String>,
    /// `options` lines, each as written; joined with spaces for the kernel.
    pub options: Vec<String>,
    pub architecture: Option<String>,
    /// `efi`: a type #1 entry for an EFI program, which kexec cannot start.
    pub efi: Option<String>,
}

impl BlsEntry {
    /// The kernel command line: every `options` line, joined with one space.
    pub fn cmdline(&self) -> String {
        self.options.join(" ")
    }

    /// Why this entry cannot be kexec'ed on this machine, if it cannot.
    pub fn unusable(&self) -> Option<String> {
        if let Some(arch) = &self.architecture {
            // The spec names architectures as UEFI does (x64, aa64, …).
            let ours = arch.eq_ignore_ascii_case(std::env::consts::ARCH)
                || (arch.eq_ignore_ascii_case("x64") && cfg!(target_arch = "x86_64"))
                || (arch.eq_ignore_ascii_case("aa64") && cfg!(target_arch = "aarch64"));
            if !ours {
                return Some(format!("architecture {arch} is not this machine's"));
            }
        }
        if self.linux.is_none() {
            return Some(match &self.efi {
                Some(efi) => format!("it starts the EFI program {efi}, not a Linux kernel"),
                None => "it has no `linux` key".to_owned(),
            });
        }
        None
    }
}

/// Parses one entry. `id` is its file name without `.conf`. Unknown keys
/// are ignored, as the spec asks; a key given twice keeps its last value,
/// except `initrd` and `options`, which may repeat.
pub fn parse_entry(id: &str, text: &str) -> BlsEntry {
    let mut entry = BlsEntry {
        id: id.to_owned(),
        ..BlsEntry::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((k, v)) => (k, v.trim()),
            None => (line, ""),
        };
        let value = value.to_owned();
        match key {
            "title" => entry.title = Some(value),
            "version" => entry.version = Some(value),
            "machine-id" => entry.machine_id = Some(value),
            "sort-key" => entry.sort_key = Some(value),
            "linux" => entry.linux = Some(value),
            "initrd" => entry.initrd.push(value),
            "options" => entry.options.push(value),
            "architecture" => entry.architecture = Some(value),
            "efi" => entry.efi = Some(value),
            _ => {}
        }
    }
    entry
}

/// The spec's menu order, first = default: entries with a `sort-key` come
/// first, ordered by it (increasing), then `machine-id` (increasing), then
/// `version` (decreasing: newest first); entries without one come after,
/// ordered by file name (decreasing, by version comparison: newest first).
/// The file name breaks every remaining tie, so the order is total and the
/// choice never depends on directory order.
pub fn menu_order(a: &BlsEntry, b: &BlsEntry) -> Ordering {
    let by_id = || version_cmp(&b.id, &a.id);
    match (&a.sort_key, &b.sort_key) {
        (Some(x), Some(y)) => x
            .cmp(y)
            .then_with(|| a.machine_id.cmp(&b.machine_id))
            .then_with(|| {
                version_cmp(
                    b.version.as_deref().unwrap_or(""),
                    a.version.as_deref().unwrap_or(""),
                )
            })
            .then_with(by_id),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => by_id(),
    }
}

/// Version comparison in the spirit of the UAPI version format (and
/// `strverscmp`): runs of digits compare as numbers, runs of letters as
/// text, `~` sorts before anything (even the end: `1.0~rc1` < `1.0`), and
/// other separators only separate. `6.1.10` > `6.1.9`.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    let is_sep = |c: u8| !c.is_ascii_alphanumeric() && c != b'~';
    loop {
        while let [c, rest @ ..] = a {
            if !is_sep(*c) {
                break;
            }
            a = rest;
        }
        while let [c, rest @ ..] = b {
            if !is_sep(*c) {
                break;
            }
            b = rest;
        }
        match (a.first(), b.first()) {
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let digits = x.is_ascii_digit();
                if digits != y.is_ascii_digit() {
                    // A number sorts after letters: 1.0a < 1.0.1.
                    return if digits {
                        Ordering::Greater
                    } else {
                        Ordering::Less
                    };
                }
                let (ra, rest_a) = split_run(a, digits);
                let (rb, rest_b) = split_run(b, digits);
                let ord = if digits {
                    let (na, nb) = (strip_zeros(ra), strip_zeros(rb));
                    na.len().cmp(&nb.len()).then_with(|| na.cmp(nb))
                } else {
                    ra.cmp(rb)
                };
                if ord != Ordering::Equal {
                    return ord;
                }
                a = rest_a;
                b = rest_b;
            }
        }
    }
}

/// The leading run of digits (or of letters) of `s`, and the rest.
fn split_run(s: &[u8], digits: bool) -> (&[u8], &[u8]) {
    let n = s
        .iter()
        .position(|c| c.is_ascii_digit() != digits || !c.is_ascii_alphanumeric())
        .unwrap_or(s.len());
    s.split_at(n)
}

fn strip_zeros(r: &[u8]) -> &[u8] {
    let z = r.iter().position(|c| *c != b'0').unwrap_or(r.len());
    r.split_at(z).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_keys_and_joins_options() {
        let e = parse_entry(
            "tenant-6.1",
            "# comment\ntitle  Tenant OS\nversion 6.1.0\nlinux /vmlinuz\ninitrd /a.img\ninitrd /b.img\n\
             options root=/dev/sda2  ro\noptions console=ttyS0\nunknown-key x\nsort-key tenant\n",
        );
        assert_eq!(e.title.as_deref(), Some("Tenant OS"));
        assert_eq!(e.linux.as_deref(), Some("/vmlinuz"));
        assert_eq!(e.initrd, ["/a.img", "/b.img"]);
        assert_eq!(e.cmdline(), "root=/dev/sda2  ro console=ttyS0");
        assert_eq!(e.sort_key.as_deref(), Some("tenant"));
        assert!(e.unusable().is_none());
        let efi = parse_entry("x", "efi /EFI/x.efi\n");
        assert!(efi.unusable().unwrap().contains("/EFI/x.efi"));
        let arm = parse_entry("y", "linux /k\narchitecture aa64\n");
        if cfg!(target_arch = "x86_64") {
            assert!(arm.unusable().unwrap().contains("aa64"));
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_cmp("6.1.10", "6.1.9"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-56", "6.1.0-9"), Ordering::Greater);
        assert_eq!(version_cmp("1.0~rc1", "1.0"), Ordering::Less);
        assert_eq!(version_cmp("001", "1"), Ordering::Equal);
        assert_eq!(version_cmp("a", "b"), Ordering::Less);
        assert_eq!(version_cmp("1.0a", "1.0.1"), Ordering::Less);
    }

    #[test]
    fn menu_order_is_deterministic() {
        let e = |id: &str, text: &str| parse_entry(id, text);
        let mut entries = [
            e("linux-6.1.9", "linux /k"),
            e("linux-6.1.10", "linux /k"),
            e("b", "linux /k\nsort-key tenant\nversion 5"),
            e("a", "linux /k\nsort-key tenant\nversion 10"),
            e("c", "linux /k\nsort-key aaa\nversion 1"),
        ];
        entries.sort_by(menu_order);
        let ids: Vec<_> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b", "linux-6.1.10", "linux-6.1.9"]);
        // Any input order gives the same result.
        entries.reverse();
        entries.sort_by(menu_order);
        assert_eq!(entries[0].id, "c");
    }
}
