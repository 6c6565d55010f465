//! Reference values: the digests the ramdisk's kernel and initrd put into
//! the TPM event log when they are booted, so an attestation policy can
//! require them (`reference-values.json`, docs/reference-values.md).
//!
//! Owns the three digests and how they are computed:
//! - PCR 4, `EV_EFI_BOOT_SERVICES_APPLICATION`: the firmware measures the
//!   EFI-stub kernel as a PE/COFF image, i.e. its Authenticode SHA-256
//!   (headers without the checksum and the certificate-table entry, the
//!   sections in file order, trailing data without the signature). That
//!   digest comes from the `authenticode` crate (Google's, on the `object`
//!   crate we already use); nothing here re-implements PE parsing. It is
//!   the digest of the file as shipped — what a machine that loads
//!   `vmlinuz` itself (PXE/HTTP boot, a boot manager) logs, and the digest
//!   Debian signed. QEMU's direct kernel boot (`-kernel`) is different: it
//!   rewrites setup-header fields (loader type, heap end, command-line
//!   pointer, initrd address and size) before OVMF measures the image, so
//!   that digest depends on the initrd's size and the guest's RAM;
//!   [`qemu_direct_boot_image`] reproduces QEMU 7.2's rewrite.
//! - PCR 9, `EV_EVENT_TAG` "Linux initrd": the Linux EFI stub (6.1
//!   `efi_load_initrd`) hashes the initrd exactly as loaded — the file's bytes.
//! - PCR 9, `EV_EVENT_TAG` "LOADED_IMAGE::LoadOptions": the stub
//!   (`efi_convert_cmdline`) hashes the loaded image's `LoadOptions` buffer
//!   as received, `LoadOptionsSize` bytes, before any parsing. Loaders that
//!   hand over a NUL-terminated UTF-16 string (OVMF's direct kernel boot,
//!   the UEFI boot manager) therefore get the terminator hashed too; OVMF's
//!   `-kernel`/`-initrd` path also appends ` initrd=initrd` to the text.
//!
//! It must never guess: a kernel that is not a PE image is an error, not a
//! reference value, and nothing here depends on the host or the time (the
//! JSON is part of the reproducible build).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `format` of the file; bump it when a key changes meaning.
pub const FORMAT: &str = "warden-reference-values/1";
/// The PCR the firmware measures boot applications (the kernel) into.
pub const KERNEL_PCR: u32 = 4;
/// The PCR the Linux EFI stub measures LoadOptions and the initrd into.
pub const STUB_PCR: u32 = 9;
/// TCG event type names, as `tpm2_eventlog` and the server print them.
pub const EV_EFI_BOOT_SERVICES_APPLICATION: &str = "EV_EFI_BOOT_SERVICES_APPLICATION";
pub const EV_EVENT_TAG: &str = "EV_EVENT_TAG";
/// The stub's tagged-event texts (event data: tag id, length, this text, NUL).
pub const INITRD_TAG: &str = "Linux initrd";
pub const LOAD_OPTIONS_TAG: &str = "LOADED_IMAGE::LoadOptions";
/// What OVMF's QEMU direct kernel boot appends to `-append` when `-initrd`
/// is given (X86QemuLoadImageLib), so the stub's generic initrd loader
/// finds it.
pub const QEMU_INITRD_SUFFIX: &str = " initrd=initrd";
/// Guest RAM the QEMU reference value in the JSON is computed for (the
/// test harness's default node).
pub const QEMU_DEFAULT_MEMORY_MIB: u64 = 1024;
/// q35's ACPI data area at the top of low RAM (QEMU `acpi_data_size`):
/// QEMU keeps the initrd below it.
const QEMU_ACPI_DATA_SIZE: u64 = 0x20000 + 0x8000;
/// The `EV_EFI_ACTION` text edk2 measures into PCR 4 at ReadyToBoot.
pub const CALLING_EFI_APPLICATION: &str = "Calling EFI Application from Boot Option";

/// One sentence for `cmdline_rule.how`.
pub const CMDLINE_HOW: &str = "SHA-256 of the kernel command line exactly as the boot loader passes it in LoadOptions: UTF-16LE code units followed by one UTF-16 NUL (two zero bytes); under QEMU direct kernel boot through OVMF that text is the -append string followed by \" initrd=initrd\".";

/// Why reference values could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("kernel image {name} is not a PE/COFF (EFI stub) image: {reason}")]
    NotPe { name: String, reason: String },
    #[error("kernel image {name}: PE offsets out of bounds, no Authenticode digest")]
    Authenticode { name: String },
    #[error("kernel image {name} has no Linux boot protocol 2.12+ setup header (HdrS)")]
    NotBzImage { name: String },
    #[error(
        "initrd of {size} bytes does not fit below {limit:#x} in {memory_mib} MiB of guest RAM"
    )]
    InitrdTooLarge {
        size: u64,
        limit: u64,
        memory_mib: u64,
    },
}

/// The PE/COFF Authenticode SHA-256 of an EFI image (PE32 or PE32+): the
/// digest UEFI firmware logs for `EV_EFI_BOOT_SERVICES_APPLICATION`.
/// `name` only labels errors.
pub fn authenticode_sha256(name: &str, image: &[u8]) -> Result<[u8; 32], ReferenceError> {
    use object::read::pe::{PeFile32, PeFile64};
    let not_pe = |reason: String| ReferenceError::NotPe {
        name: name.to_string(),
        reason,
    };
    let mut hasher = Sha256::new();
    let digest = match object::FileKind::parse(image) {
        Ok(object::FileKind::Pe64) => {
            let pe = PeFile64::parse(image).map_err(|e| not_pe(e.to_string()))?;
            authenticode::authenticode_digest(&pe, &mut hasher)
        }
        Ok(object::FileKind::Pe32) => {
            let pe = PeFile32::parse(image).map_err(|e| not_pe(e.to_string()))?;
            authenticode::authenticode_digest(&pe, &mut hasher)
        }
        Ok(kind) => return Err(not_pe(format!("it is {kind:?}"))),
        Err(e) => return Err(not_pe(e.to_string())),
    };
    digest.map_err(|_| ReferenceError::Authenticode {
        name: name.to_string(),
    })?;
    Ok(hasher.finalize().into())
}

/// The kernel image exactly as OVMF receives it from QEMU 7.2 (q35, no SEV)
/// for `-kernel vmlinuz -initrd <initrd_size bytes> -m <memory_mib>`:
/// QEMU's `x86_load_linux` patches the bzImage setup header, and OVMF
/// measures the patched image. Only modern kernels (boot protocol ≥ 2.12,
/// any x86-64 EFI-stub kernel) are handled; others are an error.
pub fn qemu_direct_boot_image(
    name: &str,
    vmlinuz: &[u8],
    initrd_size: u64,
    memory_mib: u64,
) -> Result<Vec<u8>, ReferenceError> {
    let not_bz = || ReferenceError::NotBzImage {
        name: name.to_string(),
    };
    let mut image = vmlinuz.to_vec();
    let header = image.get(0x1f1..0x260).ok_or_else(not_bz)?;
    let protocol = u16::from_le_bytes([header[0x206 - 0x1f1], header[0x207 - 0x1f1]]);
    if &header[0x202 - 0x1f1..0x206 - 0x1f1] != b"HdrS" || protocol < 0x20c {
        return Err(not_bz());
    }
    let le32 = |at: usize| {
        u32::from_le_bytes([
            header[at - 0x1f1],
            header[at + 1 - 0x1f1],
            header[at + 2 - 0x1f1],
            header[at + 3 - 0x1f1],
        ])
    };
    let initrd_addr_max = u64::from(le32(0x22c));
    // q35: RAM from 2.75 GiB up is split at 2 GiB below/above 4 GiB.
    let ram = memory_mib << 20;
    let below_4g = if ram >= 0xb000_0000 { 0x8000_0000 } else { ram };
    let limit = below_4g.saturating_sub(QEMU_ACPI_DATA_SIZE);
    let initrd_max = if initrd_addr_max >= limit {
        limit.saturating_sub(1)
    } else {
        initrd_addr_max
    };
    let too_large = || ReferenceError::InitrdTooLarge {
        size: initrd_size,
        limit: initrd_max,
        memory_mib,
    };
    // Real-mode code at 0x10000, command line at 0x20000 (protocol ≥ 2.02).
    let (real_addr, cmdline_addr): (u32, u32) = (0x1_0000, 0x2_0000);
    image[0x210] = 0xb0; // type_of_loader: QEMU
    image[0x211] |= 0x80; // loadflags: CAN_USE_HEAP
    let heap_end = u16::try_from(cmdline_addr - real_addr - 0x200).map_err(|_| not_bz())?;
    image[0x224..0x226].copy_from_slice(&heap_end.to_le_bytes());
    image[0x228..0x22c].copy_from_slice(&cmdline_addr.to_le_bytes());
    if initrd_size > 0 {
        if initrd_size >= initrd_max {
            return Err(too_large());
        }
        let addr = u32::try_from((initrd_max - initrd_size) & !4095).map_err(|_| too_large())?;
        let size = u32::try_from(initrd_size).map_err(|_| too_large())?;
        image[0x218..0x21c].copy_from_slice(&addr.to_le_bytes());
        image[0x21c..0x220].copy_from_slice(&size.to_le_bytes());
    }
    Ok(image)
}

/// The digest of the stub's "Linux initrd" event: the initrd's bytes.
pub fn initrd_digest(initrd: &[u8]) -> [u8; 32] {
    Sha256::digest(initrd).into()
}

/// The digest of the stub's "LOADED_IMAGE::LoadOptions" event for a boot
/// whose loader passes `cmdline` as NUL-terminated UTF-16 load options
/// (see [`CMDLINE_HOW`]). For QEMU `-kernel … -initrd … -append A` through
/// OVMF, pass [`qemu_direct_boot_load_options`]`(A, true)`.
pub fn cmdline_digest(cmdline: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for unit in cmdline.encode_utf16() {
        hasher.update(unit.to_le_bytes());
    }
    hasher.update([0u8, 0u8]);
    hasher.finalize().into()
}

/// The load options OVMF builds for QEMU's direct kernel boot from
/// `-append append` (with `-initrd`: plus [`QEMU_INITRD_SUFFIX`]).
pub fn qemu_direct_boot_load_options(append: &str, with_initrd: bool) -> String {
    if with_initrd {
        format!("{append}{QEMU_INITRD_SUFFIX}")
    } else {
        append.to_string()
    }
}

/// `PCR := SHA-256(PCR || digest)`, the TPM's extend.
pub fn extend(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(pcr);
    hasher.update(digest);
    hasher.finalize().into()
}

/// PCR 4 after an OVMF direct kernel boot: the kernel image, then edk2's
/// ReadyToBoot action ([`CALLING_EFI_APPLICATION`]), then the separator
/// (four zero bytes), extended in that order from zero — the order the
/// event log shows for OVMF 2022.11 with `-kernel`.
pub fn ovmf_direct_boot_pcr4(kernel_authenticode: &[u8; 32]) -> [u8; 32] {
    let action: [u8; 32] = Sha256::digest(CALLING_EFI_APPLICATION.as_bytes()).into();
    let separator: [u8; 32] = Sha256::digest([0u8; 4]).into();
    [kernel_authenticode, &action, &separator]
        .into_iter()
        .fold([0u8; 32], |pcr, d| extend(&pcr, d))
}

/// PCR 9 after the Linux 6.1 EFI stub ran: LoadOptions first (when there
/// were any), then the initrd; nothing else extends PCR 9 before the kernel.
pub fn stub_pcr9(load_options: &[u8; 32], initrd: &[u8; 32]) -> [u8; 32] {
    extend(&extend(&[0u8; 32], load_options), initrd)
}

/// `kernel` in `reference-values.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KernelReference {
    /// File name in the output directory.
    pub file: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// PE/COFF Authenticode SHA-256 of the file: the event digest in PCR 4
    /// when firmware loads the file itself (network boot, boot manager).
    pub authenticode_sha256: String,
    pub pcr: u32,
    pub event_type: String,
    /// The event digest under QEMU direct kernel boot, which patches the
    /// image first ([`qemu_direct_boot_image`]).
    pub qemu_direct_boot: QemuDirectBoot,
}

/// `kernel.qemu_direct_boot`: QEMU `-kernel vmlinuz -initrd <this initrd>`
/// on q35 with `memory_mib` of RAM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QemuDirectBoot {
    pub machine: String,
    pub memory_mib: u64,
    pub authenticode_sha256: String,
}

/// `initrd` in `reference-values.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InitrdReference {
    pub file: String,
    pub sha256: String,
    pub pcr: u32,
    pub event_type: String,
    pub tag: String,
    /// The event digest in PCR 9 (equal to `sha256`: the stub hashes the bytes).
    pub event_digest: String,
}

/// `cmdline_rule` in `reference-values.json`: the command line is chosen at
/// boot, so the file carries the rule, not a digest ([`cmdline_digest`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CmdlineRule {
    pub pcr: u32,
    pub event_type: String,
    pub tag: String,
    pub how: String,
    /// What OVMF's QEMU direct kernel boot appends to `-append` with `-initrd`.
    pub qemu_direct_boot_suffix: String,
}

/// The whole `reference-values.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValues {
    pub format: String,
    pub kernel: KernelReference,
    pub initrd: InitrdReference,
    pub cmdline_rule: CmdlineRule,
}

impl ReferenceValues {
    /// Computes the reference values of a kernel image and an initrd, named
    /// `kernel_file` and `initrd_file` in the output directory.
    pub fn compute(
        kernel_file: &str,
        kernel: &[u8],
        initrd_file: &str,
        initrd: &[u8],
    ) -> Result<ReferenceValues, ReferenceError> {
        let initrd_sha = hex::encode(initrd_digest(initrd));
        let initrd_len = u64::try_from(initrd.len()).unwrap_or(u64::MAX);
        let qemu_image =
            qemu_direct_boot_image(kernel_file, kernel, initrd_len, QEMU_DEFAULT_MEMORY_MIB)?;
        Ok(ReferenceValues {
            format: FORMAT.to_string(),
            kernel: KernelReference {
                file: kernel_file.to_string(),
                sha256: hex::encode(Sha256::digest(kernel)),
                authenticode_sha256: hex::encode(authenticode_sha256(kernel_file, kernel)?),
                pcr: KERNEL_PCR,
                event_type: EV_EFI_BOOT_SERVICES_APPLICATION.to_string(),
                qemu_direct_boot: QemuDirectBoot {
                    machine: "q35".to_string(),
                    memory_mib: QEMU_DEFAULT_MEMORY_MIB,
                    authenticode_sha256: hex::encode(authenticode_sha256(
                        kernel_file,
                        &qemu_image,
                    )?),
                },
            },
            initrd: InitrdReference {
                file: initrd_file.to_string(),
                sha256: initrd_sha.clone(),
                pcr: STUB_PCR,
                event_type: EV_EVENT_TAG.to_string(),
                tag: INITRD_TAG.to_string(),
                event_digest: initrd_sha,
            },
            cmdline_rule: CmdlineRule {
                pcr: STUB_PCR,
                event_type: EV_EVENT_TAG.to_string(),
                tag: LOAD_OPTIONS_TAG.to_string(),
                how: CMDLINE_HOW.to_string(),
                qemu_direct_boot_suffix: QEMU_INITRD_SUFFIX.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Debian kernel the ramdisk ships and the fixture log was made with.
    const KERNEL: &str = "/boot/vmlinuz-6.1.0-56-amd64";
    /// PCR 4 `EV_EFI_BOOT_SERVICES_APPLICATION` digest in
    /// protocol/tests/data/ovmf-swtpm-6.1.eventlog (event 10): a QEMU
    /// direct boot, so the digest of a patched image (initrd size unknown).
    const FIXTURE_PCR4_APP: &str =
        "63482d095362c06ab79ea8df33339a180e3bd735442fad22881d4bb08699d27a";
    const FIXTURE_PCRS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../protocol/tests/data/ovmf-swtpm-6.1.pcrs.json"
    );

    fn fixture_pcr(index: u32) -> String {
        let text = std::fs::read_to_string(FIXTURE_PCRS).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["values"][index.to_string()]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn hex32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn kernel_or_skip(test: &str) -> Option<Vec<u8>> {
        match std::fs::read(KERNEL) {
            Ok(image) => Some(image),
            Err(e) => {
                // Loud: these tests tie our digests to real firmware.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: {test}: {KERNEL}: {e} (install linux-image-amd64: scripts/setup)"
                );
                None
            }
        }
    }

    /// Our digest of the file is the one Debian signed: the messageDigest
    /// inside the kernel's own Authenticode signature.
    #[test]
    fn debian_kernel_authenticode_is_the_signed_digest() {
        let Some(image) = kernel_or_skip("debian_kernel_authenticode_is_the_signed_digest") else {
            return;
        };
        let digest = authenticode_sha256(KERNEL, &image).unwrap();
        let pe = object::read::pe::PeFile64::parse(&image[..]).unwrap();
        let signed: Vec<Vec<u8>> = authenticode::AttributeCertificateIterator::new(&pe)
            .unwrap()
            .unwrap()
            .map(|c| {
                c.unwrap()
                    .get_authenticode_signature()
                    .unwrap()
                    .digest()
                    .to_vec()
            })
            .collect();
        assert_eq!(signed, vec![digest.to_vec()]);
        assert_eq!(
            hex::encode(digest),
            "6b1bf35c3bee9918250f593a6fff889c75c1e239cd2fe9e5bb0cd3de9dcb8e51"
        );
        // A signed kernel: the plain file hash is a different thing.
        assert_ne!(Sha256::digest(&image)[..], digest[..]);
    }

    /// Captured on this machine: QEMU 7.2 q35 -m 1024 + OVMF 2022.11 +
    /// swtpm, `-kernel /boot/vmlinuz-6.1.0-56-amd64 -initrd` a 924604-byte
    /// busybox initrd; PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION digest.
    #[test]
    fn qemu_direct_boot_digest_matches_a_real_boot() {
        let Some(image) = kernel_or_skip("qemu_direct_boot_digest_matches_a_real_boot") else {
            return;
        };
        let patched = qemu_direct_boot_image(KERNEL, &image, 924_604, 1024).unwrap();
        assert_eq!(
            hex::encode(authenticode_sha256(KERNEL, &patched).unwrap()),
            "878cca3d5784df1eeca315108cda023c07df95db6725601d475425373794b0d5"
        );
        // Only the setup header changes.
        let changed: Vec<usize> = (0..image.len())
            .filter(|&i| image[i] != patched[i])
            .collect();
        assert!(
            changed.iter().all(|i| (0x210..0x22c).contains(i)),
            "{changed:x?}"
        );
        // The fixture log's boot (another initrd) measured yet another
        // digest, and its PCR 4 is that digest plus the two fixed events.
        assert_eq!(
            hex::encode(ovmf_direct_boot_pcr4(&hex32(FIXTURE_PCR4_APP))),
            fixture_pcr(KERNEL_PCR)
        );
        assert!(matches!(
            qemu_direct_boot_image(KERNEL, &image, 2 << 30, 1024),
            Err(ReferenceError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn fixture_pcr9_is_the_two_stub_events() {
        // Event digests of events 21 and 22 of the fixture log.
        let load_options =
            hex32("f71274a9610aa132cdae4f997a1dbbd1ebc6c9b9475c17ff324e5223fbc002bf");
        let initrd = hex32("b1d46b2b2131e44ec927ae2eddba799c3e83e43ffe0eafc459745d0ccd83b028");
        assert_eq!(
            hex::encode(stub_pcr9(&load_options, &initrd)),
            fixture_pcr(STUB_PCR)
        );
    }

    /// The LoadOptions digest of the same real boot as above, whose
    /// `-append` was `console=ttyS0 quiet warden.test=1`.
    #[test]
    fn cmdline_digest_matches_a_real_boot() {
        let options = qemu_direct_boot_load_options("console=ttyS0 quiet warden.test=1", true);
        assert_eq!(
            hex::encode(cmdline_digest(&options)),
            "971a41af8375f47e0ce15772cdfbb21d53fe33cdd13168bc2db70a6068d34f5b"
        );
    }

    #[test]
    fn cmdline_digest_is_utf16le_with_terminator() {
        // "ab" -> 61 00 62 00 00 00
        let expected: [u8; 32] = Sha256::digest([0x61, 0, 0x62, 0, 0, 0]).into();
        assert_eq!(cmdline_digest("ab"), expected);
        // Outside the BMP: a surrogate pair, little-endian units.
        let expected: [u8; 32] = Sha256::digest([0x3d, 0xd8, 0x00, 0xde, 0, 0]).into();
        assert_eq!(cmdline_digest("\u{1F600}"), expected);
        assert_eq!(
            qemu_direct_boot_load_options("console=ttyS0", true),
            "console=ttyS0 initrd=initrd"
        );
        assert_eq!(qemu_direct_boot_load_options("quiet", false), "quiet");
    }

    #[test]
    fn non_pe_kernel_is_an_error_naming_it() {
        let err = authenticode_sha256("vmlinuz", b"fake kernel").unwrap_err();
        assert!(err.to_string().contains("vmlinuz"), "{err}");
        let elf = std::fs::read("/proc/self/exe").unwrap();
        assert!(matches!(
            authenticode_sha256("self", &elf),
            Err(ReferenceError::NotPe { .. })
        ));
    }

    #[test]
    fn json_is_stable_and_round_trips() {
        let Some(image) = kernel_or_skip("json_is_stable_and_round_trips") else {
            return;
        };
        let a = ReferenceValues::compute("vmlinuz", &image, "initrd", b"x").unwrap();
        let b = ReferenceValues::compute("vmlinuz", &image, "initrd", b"x").unwrap();
        let ja = serde_json::to_string(&a).unwrap();
        assert_eq!(ja, serde_json::to_string(&b).unwrap());
        let back: ReferenceValues = serde_json::from_str(&ja).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            a.kernel.authenticode_sha256,
            hex::encode(authenticode_sha256(KERNEL, &image).unwrap())
        );
        assert_ne!(
            a.kernel.qemu_direct_boot.authenticode_sha256,
            a.kernel.authenticode_sha256
        );
        assert_eq!(a.initrd.event_digest, hex::encode(Sha256::digest(b"x")));
    }
}
