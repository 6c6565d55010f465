//! Takes a Unified Kernel Image (a PE/COFF EFI stub with the kernel, initrd
//! and command line as sections) apart, so kexec can start what the stub
//! would have: the 6.1 kernel's kexec_file_load cannot load a UKI itself.
//!
//! Pure: bytes in, slices out. It never executes or writes anything.

use object::read::pe::PeFile64;
use object::LittleEndian as LE;

/// The three sections kexec needs, each cut to its `VirtualSize`.
#[derive(Debug, PartialEq, Eq)]
pub struct UkiSections<'a> {
    pub linux: &'a [u8],
    /// Empty when the UKI has no `.initrd`.
    pub initrd: &'a [u8],
    /// `.cmdline` as text, NULs and trailing whitespace trimmed; empty when absent.
    pub cmdline: String,
}

/// Extracts `.linux`, `.initrd` and `.cmdline` from a PE32+ image. The raw
/// data of a section is padded to the file alignment; its `VirtualSize` is
/// the real length. A section whose `VirtualSize` exceeds its raw data
/// would need zero-fill a stub does in memory — refused, as is an image
/// without `.linux` (an ordinary EFI program, such as a boot loader).
pub fn extract(image: &[u8]) -> Result<UkiSections<'_>, String> {
    let pe = PeFile64::parse(image).map_err(|e| format!("not a PE32+ image: {e}"))?;
    let mut linux = None;
    let mut initrd: &[u8] = &[];
    let mut cmdline = String::new();
    for header in pe.section_table().iter() {
        let raw = header.raw_name();
        let name = raw.split(|b| *b == 0).next().unwrap_or(raw);
        let wanted = matches!(name, b".linux" | b".initrd" | b".cmdline");
        if !wanted {
            continue;
        }
        let shown = String::from_utf8_lossy(name);
        let virtual_size = header.virtual_size.get(LE);
        let raw_size = header.size_of_raw_data.get(LE);
        if virtual_size > raw_size {
            return Err(format!(
                "section {shown}: VirtualSize {virtual_size} is larger than its {raw_size} bytes of raw data"
            ));
        }
        // pe_data is min(VirtualSize, SizeOfRawData) = VirtualSize here.
        let data = header
            .pe_data(image)
            .map_err(|e| format!("section {shown}: {e}"))?;
        match name {
            b".linux" => linux = Some(data),
            b".initrd" => initrd = data,
            _ => {
                let text = data.split(|b| *b == 0).next().unwrap_or(data);
                let text = std::str::from_utf8(text)
                    .map_err(|e| format!("section .cmdline is not UTF-8: {e}"))?;
                cmdline = text.trim_end().to_owned();
            }
        }
    }
    let linux = linux.ok_or_else(|| {
        "no .linux section: an EFI program, not a unified kernel image".to_owned()
    })?;
    if linux.is_empty() {
        return Err("section .linux is empty".to_owned());
    }
    Ok(UkiSections {
        linux,
        initrd,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_pe() {
        assert!(extract(b"MZ not really").unwrap_err().contains("PE32+"));
        assert!(extract(&[]).is_err());
    }
}
