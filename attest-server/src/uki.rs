//! Builds a Unified Kernel Image: systemd's EFI stub with the kernel, the
//! initrd, the command line and an os-release appended as PE sections
//! (`.linux`, `.initrd`, `.cmdline`, `.osrel`), the layout systemd-stub
//! reads. The server builds one per start because the command line carries
//! the server's URL and CA pin, which only it knows.
//!
//! Written by hand: no maintained crate edits an existing PE image (the
//! `object` crate writes new images only, and `ukify` is Python and not in
//! Debian 12). What this does is small and checked: the new section headers
//! must fit in the space the stub leaves before its first section, the stub
//! must be an unsigned PE32+ image (a signature would no longer cover it),
//! and the result is deterministic (no time stamps), so its digest — which
//! firmware measures into PCR 4 — is the same for the same inputs. It never
//! touches the stub's own sections.

/// What can make a UKI impossible to build.
#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("EFI stub: {0}")]
    Stub(String),
    #[error("section {name}: {reason}")]
    Section { name: String, reason: String },
}

const PE32_PLUS: u16 = 0x20b;
const SECTION_HEADER: usize = 40;
/// IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ.
const DATA_READ: u32 = 0x4000_0040;

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn write_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn write_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The offsets of a PE32+ image's headers that this module edits.
struct Layout {
    coff: usize,
    optional: usize,
    sections: usize,
    count: usize,
    size_of_headers: usize,
    section_align: u64,
    file_align: u64,
}

fn layout(stub: &[u8]) -> Result<Layout, UkiError> {
    let bad = |why: &str| UkiError::Stub(why.to_string());
    if stub.get(..2) != Some(b"MZ") {
        return Err(bad("no MZ header (not a PE image)"));
    }
    let pe = read_u32(stub, 0x3c).ok_or_else(|| bad("truncated DOS header"))? as usize;
    if stub.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Err(bad("no PE signature at the offset e_lfanew names"));
    }
    let coff = pe + 4;
    let count = read_u16(stub, coff + 2).ok_or_else(|| bad("truncated COFF header"))? as usize;
    let optional_size =
        read_u16(stub, coff + 16).ok_or_else(|| bad("truncated COFF header"))? as usize;
    let optional = coff + 20;
    if read_u16(stub, optional) != Some(PE32_PLUS) {
        return Err(bad("not a PE32+ (64-bit) image"));
    }
    let field =
        |at: usize| read_u32(stub, optional + at).ok_or_else(|| bad("truncated optional header"));
    let section_align = u64::from(field(32)?);
    let file_align = u64::from(field(36)?);
    let size_of_headers = field(60)? as usize;
    if section_align == 0 || file_align == 0 {
        return Err(bad("zero section or file alignment"));
    }
    // Data directory 4 is the certificate table: a signed stub would be
    // silently unsigned by any edit.
    let directories = field(108)?;
    if directories > 4 && field(112 + 4 * 8 + 4)? != 0 {
        return Err(bad(
            "is signed (has a certificate table); sign the UKI after building it instead",
        ));
    }
    let sections = optional + optional_size;
    if sections + count * SECTION_HEADER > size_of_headers || size_of_headers > stub.len() {
        return Err(bad("section table lies outside the headers"));
    }
    Ok(Layout {
        coff,
        optional,
        sections,
        count,
        size_of_headers,
        section_align,
        file_align,
    })
}

/// Appends `sections` (name, contents) to `stub`, each at the next aligned
/// virtual address after the stub's own image, and returns the new image.
pub fn build(stub: &[u8], sections: &[(&str, &[u8])]) -> Result<Vec<u8>, UkiError> {
    let l = layout(stub)?;
    let first_raw = (0..l.count)
        .filter_map(|i| read_u32(stub, l.sections + i * SECTION_HEADER + 20))
        .filter(|&p| p != 0)
        .min()
        .map_or(l.size_of_headers, |p| p as usize);
    let room_end = first_raw.min(l.size_of_headers);
    let table_end = l.sections + (l.count + sections.len()) * SECTION_HEADER;
    if table_end > room_end {
        return Err(UkiError::Stub(format!(
            "no room for {} more section headers ({} bytes of headers, the table would end at {table_end})",
            sections.len(),
            room_end
        )));
    }
    let mut next_va = 0u64;
    for i in 0..l.count {
        let at = l.sections + i * SECTION_HEADER;
        let (Some(vsize), Some(va)) = (read_u32(stub, at + 8), read_u32(stub, at + 12)) else {
            return Err(UkiError::Stub("truncated section table".into()));
        };
        next_va = next_va.max(u64::from(va) + u64::from(vsize));
    }
    let size_of_image = read_u32(stub, l.optional + 56)
        .ok_or_else(|| UkiError::Stub("truncated optional header".into()))?;
    next_va = align_up(next_va.max(u64::from(size_of_image)), l.section_align);

    // The stub ends with a COFF symbol table that no section maps; drop it
    // (as objcopy does) so the new sections follow the stub's without a gap
    // — bytes in a gap would be outside the Authenticode digest.
    let mut raw_end = l.size_of_headers as u64;
    for i in 0..l.count {
        let at = l.sections + i * SECTION_HEADER;
        let (Some(size), Some(ptr)) = (read_u32(stub, at + 16), read_u32(stub, at + 20)) else {
            return Err(UkiError::Stub("truncated section table".into()));
        };
        if size > 0 {
            raw_end = raw_end.max(u64::from(ptr) + u64::from(size));
        }
    }
    let raw_end = usize::try_from(raw_end)
        .ok()
        .filter(|&e| e <= stub.len())
        .ok_or_else(|| UkiError::Stub("a section's raw data lies beyond the file".into()))?;
    let mut out = stub[..raw_end].to_vec();
    // PointerToSymbolTable and NumberOfSymbols: nothing is left to point at.
    write_u32(&mut out, l.coff + 8, 0);
    write_u32(&mut out, l.coff + 12, 0);
    let mut count = l.count;
    for (name, data) in sections {
        let section_err = |reason: &str| UkiError::Section {
            name: (*name).to_string(),
            reason: reason.to_string(),
        };
        if name.is_empty() || name.len() > 8 || !name.is_ascii() {
            return Err(section_err("a section name is 1 to 8 ASCII bytes"));
        }
        let raw_at = align_up(out.len() as u64, l.file_align);
        let raw_size = align_up(data.len() as u64, l.file_align);
        let too_big = || section_err("the image would exceed 4 GiB");
        let fields = [
            u32::try_from(data.len()).map_err(|_| too_big())?,
            u32::try_from(next_va).map_err(|_| too_big())?,
            u32::try_from(raw_size).map_err(|_| too_big())?,
            u32::try_from(raw_at).map_err(|_| too_big())?,
        ];
        out.resize(usize::try_from(raw_at).map_err(|_| too_big())?, 0);
        out.extend_from_slice(data);
        out.resize(
            usize::try_from(raw_at + raw_size).map_err(|_| too_big())?,
            0,
        );

        let at = l.sections + count * SECTION_HEADER;
        out[at..at + SECTION_HEADER].fill(0);
        out[at..at + name.len()].copy_from_slice(name.as_bytes());
        for (i, v) in fields.iter().enumerate() {
            write_u32(&mut out, at + 8 + 4 * i, *v);
        }
        write_u32(&mut out, at + 36, DATA_READ);
        count += 1;
        next_va = align_up(next_va + data.len() as u64, l.section_align);
    }
    let count = u16::try_from(count).map_err(|_| UkiError::Stub("too many sections".into()))?;
    write_u16(&mut out, l.coff + 2, count);
    let size_of_image =
        u32::try_from(next_va).map_err(|_| UkiError::Stub("image exceeds 4 GiB".into()))?;
    write_u32(&mut out, l.optional + 56, size_of_image);
    // The checksum is optional for EFI images and no firmware checks it;
    // a stale one would be wrong, zero says "not computed".
    write_u32(&mut out, l.optional + 64, 0);
    Ok(out)
}

/// A section of a PE image, as [`sections`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_address: u32,
    pub data: Vec<u8>,
}

/// The sections of a PE32+ image with their contents (`VirtualSize` bytes
/// of the raw data, as systemd-stub reads them).
pub fn sections(image: &[u8]) -> Result<Vec<Section>, UkiError> {
    let l = layout(image)?;
    let mut out = Vec::with_capacity(l.count);
    for i in 0..l.count {
        let at = l.sections + i * SECTION_HEADER;
        let header = image
            .get(at..at + SECTION_HEADER)
            .ok_or_else(|| UkiError::Stub("truncated section table".into()))?;
        let name_bytes = &header[..8];
        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(8);
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        let field = |o: usize| read_u32(header, o).unwrap_or(0);
        let (vsize, va, raw_size, raw_at) = (field(8), field(12), field(16), field(20));
        let len = vsize.min(raw_size) as usize;
        let data = image
            .get(raw_at as usize..raw_at as usize + len)
            .ok_or_else(|| UkiError::Section {
                name: name.clone(),
                reason: format!("raw data at {raw_at}+{len} lies beyond the file"),
            })?
            .to_vec();
        out.push(Section {
            name,
            virtual_address: va,
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

    fn stub() -> Option<Vec<u8>> {
        match std::fs::read(STUB) {
            Ok(b) => Some(b),
            Err(e) => {
                assert!(
                    std::env::var_os("WARDEN_REQUIRE_TOOLS").is_none(),
                    "{STUB}: {e} (install systemd-boot-efi: scripts/setup)"
                );
                eprintln!("SKIPPED: {STUB}: {e}");
                None
            }
        }
    }

    #[test]
    fn appended_sections_read_back_and_keep_the_stub_intact() {
        let Some(stub) = stub() else { return };
        let before = sections(&stub).unwrap();
        let kernel = vec![0xaa; 5000];
        let uki = build(
            &stub,
            &[
                (".osrel", b"ID=warden\n"),
                (".cmdline", b"console=ttyS0"),
                (".linux", &kernel),
            ],
        )
        .unwrap();
        let after = sections(&uki).unwrap();
        assert_eq!(after.len(), before.len() + 3);
        assert_eq!(
            &after[..before.len()],
            &before[..],
            "stub sections unchanged"
        );
        let by_name = |n: &str| after.iter().find(|s| s.name == n).unwrap();
        assert_eq!(by_name(".cmdline").data, b"console=ttyS0");
        assert_eq!(by_name(".linux").data, kernel);
        // Each new section starts past the previous one, aligned.
        let vas: Vec<u32> = after[before.len()..]
            .iter()
            .map(|s| s.virtual_address)
            .collect();
        assert!(vas.windows(2).all(|w| w[0] < w[1]), "{vas:?}");
        let last = before.iter().map(|s| s.virtual_address).max().unwrap();
        assert!(vas[0] > last);
        // No gap between the stub's sections and the new ones: every byte
        // after the headers belongs to a section (what Authenticode hashes).
        let pe = read_u32(&uki, 0x3c).unwrap() as usize;
        let opt = pe + 24;
        let table = opt + read_u16(&uki, pe + 20).unwrap() as usize;
        let mut raw: Vec<(u32, u32)> = (0..after.len())
            .map(|i| {
                let at = table + i * SECTION_HEADER;
                (
                    read_u32(&uki, at + 20).unwrap(),
                    read_u32(&uki, at + 16).unwrap(),
                )
            })
            .filter(|&(_, size)| size > 0)
            .collect();
        raw.sort();
        assert!(raw.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0), "{raw:?}");
        let (last_at, last_size) = raw.last().copied().unwrap();
        assert_eq!((last_at + last_size) as usize, uki.len());
        assert_eq!(read_u32(&uki, pe + 12), Some(0), "no symbol table left");
        // Deterministic: the same inputs give the same bytes.
        let again = build(
            &stub,
            &[
                (".osrel", b"ID=warden\n"),
                (".cmdline", b"console=ttyS0"),
                (".linux", &kernel),
            ],
        )
        .unwrap();
        assert_eq!(uki, again);
    }

    #[test]
    fn objdump_agrees_with_the_layout() {
        let Some(stub) = stub() else { return };
        let uki = build(&stub, &[(".cmdline", b"x=1"), (".initrd", &[7u8; 1234])]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.efi");
        std::fs::write(&path, &uki).unwrap();
        let out = match std::process::Command::new("objdump")
            .arg("-h")
            .arg(&path)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                assert!(
                    std::env::var_os("WARDEN_REQUIRE_TOOLS").is_none(),
                    "objdump: {e}"
                );
                eprintln!("SKIPPED: objdump: {e}");
                return;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let line = text.lines().find(|l| l.contains(".initrd")).unwrap();
        let size = line.split_whitespace().nth(2).unwrap();
        assert_eq!(u64::from_str_radix(size, 16).unwrap(), 1234, "{line}");
    }

    #[test]
    fn refuses_what_is_not_an_unsigned_pe32_plus() {
        assert!(matches!(build(b"not a PE", &[]), Err(UkiError::Stub(_))));
        let Some(mut stub) = stub() else { return };
        assert!(matches!(
            build(&stub, &[("much-too-long", b"")]),
            Err(UkiError::Section { .. })
        ));
        // A certificate table (data directory 4) present: refused.
        let pe = read_u32(&stub, 0x3c).unwrap() as usize;
        let cert = pe + 24 + 112 + 4 * 8;
        write_u32(&mut stub, cert, 0x1000);
        write_u32(&mut stub, cert + 4, 0x10);
        let err = build(&stub, &[]).unwrap_err().to_string();
        assert!(err.contains("signed"), "{err}");
    }
}
