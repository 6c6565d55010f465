//! Decoders for the UEFI structures that firmware (and the Linux EFI stub)
//! put in TCG event-log event data: `UEFI_VARIABLE_DATA`,
//! `UEFI_IMAGE_LOAD_EVENT` and its device path, `EFI_LOAD_OPTION`
//! (Boot####), platform-firmware blobs, handoff tables, GPT events and
//! tagged events.
//!
//! Event data is untrusted bytes from the node. Every decoder here takes a
//! `&[u8]`, checks every length against what is actually there, never
//! panics and never allocates more than the input's own length; an error
//! names the structure, the field and its offset within the event data.
//! This module performs no I/O and knows nothing of PCRs or policy: it only
//! says what the bytes mean (`eventlog` parses the log around them).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A UEFI GUID (`EFI_GUID`): the first three fields little-endian on the
/// wire, the last eight bytes as they are. Displays in the usual
/// lowercase 8-4-4-4-12 form, as `tpm2_eventlog` and efivar print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guid {
    /// First field (`Data1`).
    pub data1: u32,
    /// Second field (`Data2`).
    pub data2: u16,
    /// Third field (`Data3`).
    pub data3: u16,
    /// Last eight bytes (`Data4`).
    pub data4: [u8; 8],
}

/// `EFI_GLOBAL_VARIABLE`: SecureBoot, PK, KEK, BootOrder, Boot####, ….
pub const EFI_GLOBAL_VARIABLE: Guid = Guid {
    data1: 0x8be4_df61,
    data2: 0x93ca,
    data3: 0x11d2,
    data4: [0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c],
};

/// `EFI_IMAGE_SECURITY_DATABASE_GUID`: db, dbx, dbt, dbr.
pub const EFI_IMAGE_SECURITY_DATABASE_GUID: Guid = Guid {
    data1: 0xd719_b2cb,
    data2: 0x3d3a,
    data3: 0x4596,
    data4: [0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f],
};

/// Shim's vendor GUID: MokList, MokListX, MokListTrusted, SbatLevel.
pub const SHIM_LOCK_GUID: Guid = Guid {
    data1: 0x605d_ab50,
    data2: 0xe046,
    data3: 0x4300,
    data4: [0xab, 0xb6, 0x3d, 0xd8, 0x10, 0xdd, 0x8b, 0x23],
};

impl Guid {
    /// Decodes the 16-byte wire form.
    pub fn from_bytes(b: [u8; 16]) -> Guid {
        let [a0, a1, a2, a3, b0, b1, c0, c1, d0, d1, d2, d3, d4, d5, d6, d7] = b;
        Guid {
            data1: u32::from_le_bytes([a0, a1, a2, a3]),
            data2: u16::from_le_bytes([b0, b1]),
            data3: u16::from_le_bytes([c0, c1]),
            data4: [d0, d1, d2, d3, d4, d5, d6, d7],
        }
    }

    /// The 16-byte wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&self.data1.to_le_bytes());
        out[4..6].copy_from_slice(&self.data2.to_le_bytes());
        out[6..8].copy_from_slice(&self.data3.to_le_bytes());
        out[8..].copy_from_slice(&self.data4);
        out
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// Why event data could not be decoded: which structure, which field, at
/// which offset within the event data, and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{structure}.{field} at offset {offset:#x} of the event data: {problem}")]
pub struct EfiError {
    /// The UEFI/TCG structure being decoded, e.g. `UEFI_VARIABLE_DATA`.
    pub structure: &'static str,
    /// The field, e.g. `UnicodeName`.
    pub field: &'static str,
    /// Offset of the field within the event data.
    pub offset: usize,
    /// What was wrong.
    pub problem: EfiProblem,
}

/// What was wrong with a field; see [`EfiError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EfiProblem {
    /// The data ends inside the field (or a length claims more than is there).
    #[error("needs {needed} bytes but only {left} are left")]
    Truncated {
        /// Bytes the field needs (as the data claims it, hence `u64`).
        needed: u64,
        /// Bytes left.
        left: usize,
    },
    /// A UTF-16 string holds an unpaired surrogate.
    #[error("not valid UTF-16")]
    InvalidUtf16,
    /// A UTF-16 string has an odd byte length or no terminating NUL.
    #[error("{0}")]
    Malformed(&'static str),
}

/// A bounds-checked little-endian cursor over event data.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    structure: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], structure: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            structure,
        }
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn error(&self, field: &'static str, problem: EfiProblem) -> EfiError {
        EfiError {
            structure: self.structure,
            field,
            offset: self.pos,
            problem,
        }
    }

    /// Takes `n` bytes, where `n` may be a length the data claims (`u64`).
    fn take(&mut self, n: u64, field: &'static str) -> Result<&'a [u8], EfiError> {
        let left = self.left();
        let end = usize::try_from(n)
            .ok()
            .filter(|&n| n <= left)
            .and_then(|n| self.pos.checked_add(n));
        let bytes = end
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| self.error(field, EfiProblem::Truncated { needed: n, left }))?;
        self.pos = self.pos.saturating_add(bytes.len());
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EfiError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, EfiError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, EfiError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, EfiError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, EfiError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn guid(&mut self, field: &'static str) -> Result<Guid, EfiError> {
        Ok(Guid::from_bytes(self.array(field)?))
    }

    /// Reads `chars` UTF-16LE code units and decodes them.
    fn utf16(&mut self, chars: u64, field: &'static str) -> Result<String, EfiError> {
        let at = self.pos;
        let bytes = match chars.checked_mul(2) {
            Some(n) => self.take(n, field)?,
            None => {
                return Err(self.error(
                    field,
                    EfiProblem::Truncated {
                        needed: u64::MAX,
                        left: self.left(),
                    },
                ))
            }
        };
        decode_utf16(bytes).map_err(|problem| EfiError {
            structure: self.structure,
            field,
            offset: at,
            problem,
        })
    }

    /// Reads a NUL-terminated UTF-16LE string (the NUL is consumed, not
    /// returned).
    fn utf16_nul(&mut self, field: &'static str) -> Result<String, EfiError> {
        let rest = self.rest();
        let units = rest
            .chunks_exact(2)
            .position(|c| c == [0, 0])
            .ok_or_else(|| self.error(field, EfiProblem::Malformed("no terminating NUL")))?;
        let s = self.utf16(units as u64, field)?;
        self.take(2, field)?;
        Ok(s)
    }
}

/// Decodes UTF-16LE bytes; an odd length or unpaired surrogate is an error.
fn decode_utf16(bytes: &[u8]) -> Result<String, EfiProblem> {
    if bytes.len() % 2 != 0 {
        return Err(EfiProblem::Malformed("odd byte length for UTF-16"));
    }
    let units = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|_| EfiProblem::InvalidUtf16)
}

/// Decodes UTF-16LE text up to its first NUL (or its end), replacing what
/// is not valid. For display only; never for a policy decision.
pub fn utf16_lossy(bytes: &[u8]) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// `UEFI_VARIABLE_DATA`: the event data of `EV_EFI_VARIABLE_DRIVER_CONFIG`,
/// `EV_EFI_VARIABLE_BOOT`, `EV_EFI_VARIABLE_BOOT2` and
/// `EV_EFI_VARIABLE_AUTHORITY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VariableData {
    /// The variable's vendor GUID (`VariableName` in the TCG spec).
    pub guid: Guid,
    /// The variable's name (`UnicodeName`), UTF-16LE decoded.
    pub name: String,
    /// The variable's value (`VariableData`).
    pub data: Vec<u8>,
}

/// Decodes `UEFI_VARIABLE_DATA`: GUID, `UnicodeNameLength` u64 (in UTF-16
/// units), `VariableDataLength` u64, the name, the data. Bytes after the
/// data are ignored (firmware sometimes pads; the digest covers them
/// anyway, so they cannot hide a change).
pub fn parse_variable_data(data: &[u8]) -> Result<VariableData, EfiError> {
    let mut r = Reader::new(data, "UEFI_VARIABLE_DATA");
    let guid = r.guid("VariableName")?;
    let name_len = r.u64("UnicodeNameLength")?;
    let data_len = r.u64("VariableDataLength")?;
    let name = r.utf16(name_len, "UnicodeName")?;
    let value = r.take(data_len, "VariableData")?.to_vec();
    Ok(VariableData {
        guid,
        name,
        data: value,
    })
}

/// `EFI_LOAD_OPTION`: the value of a `Boot####` variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOption {
    /// `Attributes`; bit 0 is `LOAD_OPTION_ACTIVE`.
    pub attributes: u32,
    /// `Description`, UTF-16LE decoded, without its NUL.
    pub description: String,
    /// `FilePathList`: `FilePathListLength` bytes of device paths.
    pub file_path_list: Vec<u8>,
    /// `OptionalData`: whatever follows the file path list.
    pub optional_data: Vec<u8>,
}

impl LoadOption {
    /// Whether `LOAD_OPTION_ACTIVE` is set.
    pub fn is_active(&self) -> bool {
        self.attributes & 1 != 0
    }
}

/// Decodes an `EFI_LOAD_OPTION` (a `Boot####` variable's value).
pub fn parse_load_option(data: &[u8]) -> Result<LoadOption, EfiError> {
    let mut r = Reader::new(data, "EFI_LOAD_OPTION");
    let attributes = r.u32("Attributes")?;
    let path_len = r.u16("FilePathListLength")?;
    let description = r.utf16_nul("Description")?;
    let file_path_list = r.take(u64::from(path_len), "FilePathList")?.to_vec();
    let optional_data = r.rest().to_vec();
    Ok(LoadOption {
        attributes,
        description,
        file_path_list,
        optional_data,
    })
}

/// `UEFI_IMAGE_LOAD_EVENT`: the event data of
/// `EV_EFI_BOOT_SERVICES_APPLICATION` / `_DRIVER` and
/// `EV_EFI_RUNTIME_SERVICES_DRIVER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLoadEvent {
    /// `ImageLocationInMemory`.
    pub location: u64,
    /// `ImageLengthInMemory`.
    pub length: u64,
    /// `ImageLinkTimeAddress`.
    pub link_time_address: u64,
    /// `DevicePath`: the `LengthOfDevicePath` bytes the event declares.
    pub device_path: Vec<u8>,
}

/// Size of the fixed part of `UEFI_IMAGE_LOAD_EVENT`.
pub const IMAGE_LOAD_EVENT_HEADER: usize = 32;

/// Decodes `UEFI_IMAGE_LOAD_EVENT`. Bytes after the declared device path
/// are ignored.
pub fn parse_image_load_event(data: &[u8]) -> Result<ImageLoadEvent, EfiError> {
    let mut r = Reader::new(data, "UEFI_IMAGE_LOAD_EVENT");
    let location = r.u64("ImageLocationInMemory")?;
    let length = r.u64("ImageLengthInMemory")?;
    let link_time_address = r.u64("ImageLinkTimeAddress")?;
    let dp_len = r.u64("LengthOfDevicePath")?;
    let device_path = r.take(dp_len, "DevicePath")?.to_vec();
    Ok(ImageLoadEvent {
        location,
        length,
        link_time_address,
        device_path,
    })
}

/// One node of an `EFI_DEVICE_PATH_PROTOCOL` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePathNode {
    /// `Type` (1 hardware, 2 ACPI, 3 messaging, 4 media, 5 BBS, 0x7f end).
    pub node_type: u8,
    /// `SubType`.
    pub sub_type: u8,
    /// The node's bytes after its 4-byte header.
    pub data: Vec<u8>,
}

const END_TYPE: u8 = 0x7f;
const END_ENTIRE: u8 = 0xff;
const END_INSTANCE: u8 = 0x01;

/// Splits a device path into nodes, up to and without the End Entire node
/// (or the end of the bytes, if firmware left it out). An End Instance
/// node is kept: it separates instances.
pub fn parse_device_path(bytes: &[u8]) -> Result<Vec<DevicePathNode>, EfiError> {
    let mut r = Reader::new(bytes, "EFI_DEVICE_PATH_PROTOCOL");
    let mut nodes = Vec::new();
    while r.left() > 0 {
        let node_type = r.u8("Type")?;
        let sub_type = r.u8("SubType")?;
        let len = r.u16("Length")?;
        if len < 4 {
            // Also what guarantees progress through the loop.
            return Err(r.error("Length", EfiProblem::Malformed("node length below 4")));
        }
        let data = r.take(u64::from(len) - 4, "node data")?.to_vec();
        if node_type == END_TYPE && sub_type == END_ENTIRE {
            break;
        }
        nodes.push(DevicePathNode {
            node_type,
            sub_type,
            data,
        });
    }
    Ok(nodes)
}

/// The text form of a device path, as UEFI's DevicePathToText (and efivar,
/// which `tpm2_eventlog` uses when built with it) writes it, e.g.
/// `PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,0x1)/IPv4(0.0.0.0,0x0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)`.
pub fn device_path_to_text(bytes: &[u8]) -> Result<String, EfiError> {
    let mut out = String::new();
    for node in parse_device_path(bytes)? {
        if node.node_type == END_TYPE && node.sub_type == END_INSTANCE {
            out.push(',');
            continue;
        }
        if !out.is_empty() && !out.ends_with(',') {
            out.push('/');
        }
        out.push_str(&node.to_text());
    }
    Ok(out)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl DevicePathNode {
    /// This node's text form; a node this module does not know, or whose
    /// data is too short for its type, prints generically as
    /// `Path(type,subtype,hex)`.
    pub fn to_text(&self) -> String {
        self.known_text().unwrap_or_else(|| self.generic_text())
    }

    fn generic_text(&self) -> String {
        if self.data.is_empty() {
            format!("Path({},{})", self.node_type, self.sub_type)
        } else {
            format!(
                "Path({},{},{})",
                self.node_type,
                self.sub_type,
                hex_string(&self.data)
            )
        }
    }

    fn known_text(&self) -> Option<String> {
        let mut r = Reader::new(&self.data, "device path node");
        let text = match (self.node_type, self.sub_type) {
            // Hardware.
            (1, 1) => {
                let function = r.u8("Function").ok()?;
                let device = r.u8("Device").ok()?;
                format!("Pci(0x{device:x},0x{function:x})")
            }
            (1, 3) => {
                let mem_type = r.u32("MemoryType").ok()?;
                let start = r.u64("StartingAddress").ok()?;
                let end = r.u64("EndingAddress").ok()?;
                format!("MemoryMapped(0x{mem_type:x},0x{start:x},0x{end:x})")
            }
            (1, 4) => vendor_text("VenHw", &mut r)?,
            (1, 5) => format!("Ctrl(0x{:x})", r.u32("ControllerNumber").ok()?),
            // ACPI.
            (2, 1) => {
                let hid = r.u32("HID").ok()?;
                let uid = r.u32("UID").ok()?;
                if hid & 0xffff == 0x41d0 {
                    match hid >> 16 {
                        0x0a03 => format!("PciRoot(0x{uid:x})"),
                        0x0a08 => format!("PcieRoot(0x{uid:x})"),
                        0x0604 => format!("Floppy(0x{uid:x})"),
                        0x0301 => format!("Keyboard(0x{uid:x})"),
                        0x0501 => format!("Serial(0x{uid:x})"),
                        0x0401 => format!("ParallelPort(0x{uid:x})"),
                        n => format!("Acpi(PNP{n:04x},0x{uid:x})"),
                    }
                } else {
                    format!("Acpi(0x{hid:08x},0x{uid:x})")
                }
            }
            (2, 3) => format!("AcpiAdr(0x{:x})", r.u32("ADR").ok()?),
            // Messaging.
            (3, 2) => {
                let pun = r.u16("TargetId").ok()?;
                let lun = r.u16("Lun").ok()?;
                format!("Scsi(0x{pun:x},0x{lun:x})")
            }
            (3, 5) => {
                let port = r.u8("ParentPortNumber").ok()?;
                let interface = r.u8("InterfaceNumber").ok()?;
                format!("USB(0x{port:x},0x{interface:x})")
            }
            (3, 10) => vendor_text("VenMsg", &mut r)?,
            (3, 11) => {
                let mac = r.array::<32>("MacAddress").ok()?;
                let if_type = r.u8("IfType").ok()?;
                let size = if if_type <= 1 { 6 } else { 32 };
                format!("MAC({},0x{if_type:x})", hex_string(mac.get(..size)?))
            }
            (3, 12) => {
                let local = Ipv4Addr::from(r.array::<4>("LocalIpAddress").ok()?);
                let remote = Ipv4Addr::from(r.array::<4>("RemoteIpAddress").ok()?);
                let _local_port = r.u16("LocalPort").ok()?;
                let _remote_port = r.u16("RemotePort").ok()?;
                let protocol = r.u16("Protocol").ok()?;
                let origin = if r.u8("StaticIpAddress").ok()? != 0 {
                    "Static"
                } else {
                    "DHCP"
                };
                let mut s = format!("IPv4({remote},{},{origin},{local}", protocol_text(protocol));
                if let (Ok(gw), Ok(mask)) =
                    (r.array::<4>("GatewayIpAddress"), r.array::<4>("SubnetMask"))
                {
                    s.push_str(&format!(",{},{}", Ipv4Addr::from(gw), Ipv4Addr::from(mask)));
                }
                s.push(')');
                s
            }
            (3, 13) => {
                let local = Ipv6Addr::from(r.array::<16>("LocalIpAddress").ok()?);
                let remote = Ipv6Addr::from(r.array::<16>("RemoteIpAddress").ok()?);
                let _local_port = r.u16("LocalPort").ok()?;
                let _remote_port = r.u16("RemotePort").ok()?;
                let protocol = r.u16("Protocol").ok()?;
                let origin = match r.u8("IpAddressOrigin").ok()? {
                    0 => "Static",
                    1 => "StatelessAutoConfigure",
                    _ => "StatefulAutoConfigure",
                };
                format!(
                    "IPv6({remote},{},{origin},{local})",
                    protocol_text(protocol)
                )
            }
            (3, 18) => {
                let hba = r.u16("HBAPortNumber").ok()?;
                let pmp = r.u16("PortMultiplierPortNumber").ok()?;
                let lun = r.u16("Lun").ok()?;
                format!("Sata(0x{hba:x},0x{pmp:x},0x{lun:x})")
            }
            (3, 23) => {
                let nsid = r.u32("NamespaceId").ok()?;
                let eui = r.array::<8>("NamespaceUuid").ok()?;
                let parts: Vec<String> = eui.iter().rev().map(|b| format!("{b:02x}")).collect();
                format!("NVMe(0x{nsid:x},{})", parts.join("-"))
            }
            (3, 24) => format!("Uri({})", String::from_utf8_lossy(r.rest())),
            // Media.
            (4, 1) => {
                let number = r.u32("PartitionNumber").ok()?;
                let start = r.u64("PartitionStart").ok()?;
                let size = r.u64("PartitionSize").ok()?;
                let signature = r.array::<16>("Signature").ok()?;
                let format = r.u8("MBRType").ok()?;
                let sig_type = r.u8("SignatureType").ok()?;
                let (kind, sig) = match (format, sig_type) {
                    (1, 1) => {
                        let [a, b, c, d, ..] = signature;
                        ("MBR", format!("0x{:08x}", u32::from_le_bytes([a, b, c, d])))
                    }
                    (2, 2) => ("GPT", Guid::from_bytes(signature).to_string()),
                    _ => return None,
                };
                format!("HD({number},{kind},{sig},0x{start:x},0x{size:x})")
            }
            (4, 2) => {
                let entry = r.u32("BootEntry").ok()?;
                let start = r.u64("PartitionStart").ok()?;
                let size = r.u64("PartitionSize").ok()?;
                format!("CDROM(0x{entry:x},0x{start:x},0x{size:x})")
            }
            (4, 3) => vendor_text("VenMedia", &mut r)?,
            (4, 4) => utf16_lossy(&self.data),
            (4, 5) => format!("Media({})", r.guid("Protocol").ok()?),
            (4, 6) => format!("FvFile({})", r.guid("FvFileName").ok()?),
            (4, 7) => format!("Fv({})", r.guid("FvName").ok()?),
            (4, 8) => {
                let _reserved = r.u32("Reserved").ok()?;
                let start = r.u64("StartingOffset").ok()?;
                let end = r.u64("EndingOffset").ok()?;
                format!("Offset(0x{start:x},0x{end:x})")
            }
            _ => return None,
        };
        Some(text)
    }
}

fn vendor_text(name: &str, r: &mut Reader<'_>) -> Option<String> {
    let guid = r.guid("VendorGuid").ok()?;
    let rest = r.rest();
    Some(if rest.is_empty() {
        format!("{name}({guid})")
    } else {
        format!("{name}({guid},{})", hex_string(rest))
    })
}

fn protocol_text(protocol: u16) -> String {
    match protocol {
        6 => "TCP".to_string(),
        17 => "UDP".to_string(),
        p => format!("0x{p:x}"),
    }
}

/// `UEFI_PLATFORM_FIRMWARE_BLOB(2)`: the event data of
/// `EV_EFI_PLATFORM_FIRMWARE_BLOB(2)` (and, 16 bytes long, of
/// `EV_POST_CODE` / `EV_S_CRTM_CONTENTS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareBlob {
    /// `BlobDescription` (only the `2` form has one), as bytes.
    pub description: Option<Vec<u8>>,
    /// `BlobBase`.
    pub base: u64,
    /// `BlobLength`.
    pub length: u64,
}

/// Decodes `UEFI_PLATFORM_FIRMWARE_BLOB` (base u64, length u64).
pub fn parse_firmware_blob(data: &[u8]) -> Result<FirmwareBlob, EfiError> {
    let mut r = Reader::new(data, "UEFI_PLATFORM_FIRMWARE_BLOB");
    Ok(FirmwareBlob {
        description: None,
        base: r.u64("BlobBase")?,
        length: r.u64("BlobLength")?,
    })
}

/// Decodes `UEFI_PLATFORM_FIRMWARE_BLOB2` (description size u8,
/// description, base u64, length u64).
pub fn parse_firmware_blob2(data: &[u8]) -> Result<FirmwareBlob, EfiError> {
    let mut r = Reader::new(data, "UEFI_PLATFORM_FIRMWARE_BLOB2");
    let size = r.u8("BlobDescriptionSize")?;
    let description = r.take(u64::from(size), "BlobDescription")?.to_vec();
    Ok(FirmwareBlob {
        description: Some(description),
        base: r.u64("BlobBase")?,
        length: r.u64("BlobLength")?,
    })
}

/// `UEFI_HANDOFF_TABLE_POINTERS(2)`: the event data of
/// `EV_EFI_HANDOFF_TABLES(2)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoffTables {
    /// `TableDescription` (only the `2` form has one), as bytes.
    pub description: Option<Vec<u8>>,
    /// `(VendorGuid, VendorTable)` for each configuration table.
    pub tables: Vec<(Guid, u64)>,
}

fn parse_tables(r: &mut Reader<'_>) -> Result<Vec<(Guid, u64)>, EfiError> {
    let count = r.u64("NumberOfTables")?;
    // Each entry is 24 bytes; check the claim before allocating for it.
    let needed = count.saturating_mul(24);
    if needed > r.left() as u64 {
        return Err(r.error(
            "TableEntry",
            EfiProblem::Truncated {
                needed,
                left: r.left(),
            },
        ));
    }
    let mut tables = Vec::new();
    for _ in 0..count {
        let guid = r.guid("VendorGuid")?;
        let table = r.u64("VendorTable")?;
        tables.push((guid, table));
    }
    Ok(tables)
}

/// Decodes `UEFI_HANDOFF_TABLE_POINTERS`.
pub fn parse_handoff_tables(data: &[u8]) -> Result<HandoffTables, EfiError> {
    let mut r = Reader::new(data, "UEFI_HANDOFF_TABLE_POINTERS");
    Ok(HandoffTables {
        description: None,
        tables: parse_tables(&mut r)?,
    })
}

/// Decodes `UEFI_HANDOFF_TABLE_POINTERS2`.
pub fn parse_handoff_tables2(data: &[u8]) -> Result<HandoffTables, EfiError> {
    let mut r = Reader::new(data, "UEFI_HANDOFF_TABLE_POINTERS2");
    let size = r.u8("TableDescriptionSize")?;
    let description = r.take(u64::from(size), "TableDescription")?.to_vec();
    Ok(HandoffTables {
        description: Some(description),
        tables: parse_tables(&mut r)?,
    })
}

/// `TCG_PCClientTaggedEvent`: the event data of `EV_EVENT_TAG`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedEvent {
    /// `taggedEventID`.
    pub id: u32,
    /// `taggedEventData`.
    pub data: Vec<u8>,
}

/// The Linux EFI stub's tag for the measured kernel command line.
pub const LINUX_LOAD_OPTIONS_TAG: u32 = 0x8F3B_22ED;
/// The Linux EFI stub's tag for the measured initrd.
pub const LINUX_INITRD_TAG: u32 = 0x8F3B_22EC;

impl TaggedEvent {
    /// The tag's data as text when it is printable ASCII up to an optional
    /// trailing NUL, as the Linux EFI stub writes it
    /// (`"LOADED_IMAGE::LoadOptions"`, `"Linux initrd"`).
    pub fn description(&self) -> Option<String> {
        let text = self.data.strip_suffix(&[0]).unwrap_or(&self.data);
        if text.is_empty() || !text.iter().all(|b| (0x20..0x7f).contains(b)) {
            return None;
        }
        Some(String::from_utf8_lossy(text).into_owned())
    }
}

/// Decodes `TCG_PCClientTaggedEvent` (id u32, size u32, data).
pub fn parse_tagged_event(data: &[u8]) -> Result<TaggedEvent, EfiError> {
    let mut r = Reader::new(data, "TCG_PCClientTaggedEvent");
    let id = r.u32("taggedEventID")?;
    let size = r.u32("taggedEventDataSize")?;
    let data = r.take(u64::from(size), "taggedEventData")?.to_vec();
    Ok(TaggedEvent { id, data })
}

/// One entry of a measured GPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptPartition {
    /// `PartitionTypeGUID`.
    pub type_guid: Guid,
    /// `UniquePartitionGUID`.
    pub unique_guid: Guid,
    /// `StartingLBA`.
    pub starting_lba: u64,
    /// `EndingLBA`.
    pub ending_lba: u64,
    /// `Attributes`.
    pub attributes: u64,
    /// `PartitionName`, up to its first NUL.
    pub name: String,
}

/// `UEFI_GPT_DATA`: the event data of `EV_EFI_GPT_EVENT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptEvent {
    /// `DiskGUID` from the header.
    pub disk_guid: Guid,
    /// `SizeOfPartitionEntry` from the header.
    pub entry_size: u32,
    /// The measured partitions.
    pub partitions: Vec<GptPartition>,
}

/// Size of `UEFI_PARTITION_TABLE_HEADER` as measured.
const GPT_HEADER: u64 = 92;
/// Smallest `SizeOfPartitionEntry` the UEFI spec allows.
const GPT_ENTRY_MIN: u32 = 128;

/// Decodes `UEFI_GPT_DATA`: the 92-byte GPT header, `NumberOfPartitions`
/// u64, then that many entries of the header's `SizeOfPartitionEntry`.
pub fn parse_gpt_event(data: &[u8]) -> Result<GptEvent, EfiError> {
    let mut r = Reader::new(data, "UEFI_GPT_DATA");
    let header = r.take(GPT_HEADER, "UEFIPartitionHeader")?;
    let mut h = Reader::new(header, "UEFI_PARTITION_TABLE_HEADER");
    h.take(56, "Signature..LastUsableLBA")?;
    let disk_guid = h.guid("DiskGUID")?;
    h.take(12, "PartitionEntryLBA..NumberOfPartitionEntries")?;
    let entry_size = h.u32("SizeOfPartitionEntry")?;
    if entry_size < GPT_ENTRY_MIN {
        return Err(EfiError {
            structure: "UEFI_PARTITION_TABLE_HEADER",
            field: "SizeOfPartitionEntry",
            offset: 84,
            problem: EfiProblem::Malformed("below the 128 bytes UEFI requires"),
        });
    }
    let count = r.u64("NumberOfPartitions")?;
    let needed = count.saturating_mul(u64::from(entry_size));
    if needed > r.left() as u64 {
        return Err(r.error(
            "Partitions",
            EfiProblem::Truncated {
                needed,
                left: r.left(),
            },
        ));
    }
    let mut partitions = Vec::new();
    for _ in 0..count {
        let entry = r.take(u64::from(entry_size), "Partitions")?;
        let mut e = Reader::new(entry, "UEFI_PARTITION_ENTRY");
        partitions.push(GptPartition {
            type_guid: e.guid("PartitionTypeGUID")?,
            unique_guid: e.guid("UniquePartitionGUID")?,
            starting_lba: e.u64("StartingLBA")?,
            ending_lba: e.u64("EndingLBA")?,
            attributes: e.u64("Attributes")?,
            name: utf16_lossy(e.take(72, "PartitionName")?),
        });
    }
    Ok(GptEvent {
        disk_guid,
        entry_size,
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    fn variable(guid: Guid, name: &str, value: &[u8]) -> Vec<u8> {
        let mut out = guid.to_bytes().to_vec();
        out.extend((name.encode_utf16().count() as u64).to_le_bytes());
        out.extend((value.len() as u64).to_le_bytes());
        out.extend(utf16(name));
        out.extend(value);
        out
    }

    #[test]
    fn guid_display_and_round_trip() {
        assert_eq!(
            EFI_GLOBAL_VARIABLE.to_string(),
            "8be4df61-93ca-11d2-aa0d-00e098032b8c"
        );
        assert_eq!(
            EFI_IMAGE_SECURITY_DATABASE_GUID.to_string(),
            "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
        );
        let b = EFI_GLOBAL_VARIABLE.to_bytes();
        assert_eq!(b[..4], [0x61, 0xdf, 0xe4, 0x8b]);
        assert_eq!(Guid::from_bytes(b), EFI_GLOBAL_VARIABLE);
    }

    #[test]
    fn variable_data_decodes_and_every_truncation_names_its_field() {
        let bytes = variable(EFI_GLOBAL_VARIABLE, "SecureBoot", &[1]);
        let v = parse_variable_data(&bytes).unwrap();
        assert_eq!(v.guid, EFI_GLOBAL_VARIABLE);
        assert_eq!(v.name, "SecureBoot");
        assert_eq!(v.data, vec![1]);

        for cut in 0..bytes.len() {
            let err = parse_variable_data(&bytes[..cut]).unwrap_err();
            assert_eq!(err.structure, "UEFI_VARIABLE_DATA");
            let want = match cut {
                0..=15 => ("VariableName", 0),
                16..=23 => ("UnicodeNameLength", 16),
                24..=31 => ("VariableDataLength", 24),
                32..=51 => ("UnicodeName", 32),
                _ => ("VariableData", 52),
            };
            assert_eq!((err.field, err.offset), want, "cut at {cut}: {err}");
        }
    }

    #[test]
    fn hostile_lengths_are_errors_not_allocations() {
        let mut bytes = EFI_GLOBAL_VARIABLE.to_bytes().to_vec();
        bytes.extend(u64::MAX.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes());
        let err = parse_variable_data(&bytes).unwrap_err();
        assert_eq!(err.field, "UnicodeName");
        assert!(err.to_string().contains("offset 0x20"), "{err}");

        // An unpaired surrogate in the name.
        let mut bytes = EFI_GLOBAL_VARIABLE.to_bytes().to_vec();
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend([0x00, 0xd8]);
        assert_eq!(
            parse_variable_data(&bytes).unwrap_err().problem,
            EfiProblem::InvalidUtf16
        );

        let mut tables = 0x1000_0000_0000_0000u64.to_le_bytes().to_vec();
        tables.extend([0; 24]);
        assert_eq!(
            parse_handoff_tables(&tables).unwrap_err().field,
            "TableEntry"
        );

        // A zero-length device path node would loop forever.
        assert_eq!(
            parse_device_path(&[4, 4, 0, 0]).unwrap_err().field,
            "Length"
        );
    }

    #[test]
    fn device_paths_print_like_uefi() {
        // The kernel's image load event from an OVMF boot of a UKI.
        let dp = hex::decode(
            "0403140072f728144ab61e44b8c39ebdd7f893c7040412006b00650072006e0065006c0000007fff0400",
        )
        .unwrap();
        assert_eq!(
            device_path_to_text(&dp).unwrap(),
            "VenMedia(1428f772-b64a-441e-b8c3-9ebdd7f893c7)/kernel"
        );

        // PXE: PciRoot/Pci/MAC/IPv4.
        let mut dp = vec![2, 1, 12, 0];
        dp.extend(0x0a03_41d0u32.to_le_bytes());
        dp.extend(0u32.to_le_bytes());
        dp.extend([1, 1, 6, 0, 0, 3]);
        dp.extend([3, 11, 37, 0]);
        let mut mac = [0u8; 32];
        mac[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        dp.extend(mac);
        dp.push(1);
        dp.extend([3, 12, 27, 0]);
        dp.extend([0; 23]);
        dp.extend([0x7f, 0xff, 4, 0]);
        assert_eq!(
            device_path_to_text(&dp).unwrap(),
            "PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,0x1)/IPv4(0.0.0.0,0x0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)"
        );

        // A GPT partition and a file on it; an unknown node prints generically.
        let mut dp = vec![4, 1, 42, 0];
        dp.extend(1u32.to_le_bytes());
        dp.extend(0x800u64.to_le_bytes());
        dp.extend(0x10_0000u64.to_le_bytes());
        dp.extend(EFI_GLOBAL_VARIABLE.to_bytes());
        dp.extend([2, 2]);
        let file = utf16("\\EFI\\BOOT\\BOOTX64.EFI\0");
        dp.extend([4, 4, u8::try_from(file.len() + 4).unwrap(), 0]);
        dp.extend(file);
        dp.extend([9, 9, 5, 0, 0xab]);
        assert_eq!(
            device_path_to_text(&dp).unwrap(),
            "HD(1,GPT,8be4df61-93ca-11d2-aa0d-00e098032b8c,0x800,0x100000)/\\EFI\\BOOT\\BOOTX64.EFI/Path(9,9,ab)"
        );
    }

    #[test]
    fn load_option_from_ovmf_boot0000() {
        let data = hex::decode(
            "090100002c0055006900410070007000000004071400c9bdb87cebf8344faaea3ee4af6516a10406140021aa2c4614760345836e8ab6f46623317fff0400",
        )
        .unwrap();
        let opt = parse_load_option(&data).unwrap();
        assert!(opt.is_active());
        assert_eq!(opt.description, "UiApp");
        assert_eq!(opt.file_path_list.len(), 44);
        assert!(opt.optional_data.is_empty());
        assert_eq!(
            device_path_to_text(&opt.file_path_list).unwrap(),
            "Fv(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(462caa21-7614-4503-836e-8ab6f4662331)"
        );
        // Every truncation is an error, never a panic.
        for cut in 0..data.len() {
            if let Err(e) = parse_load_option(&data[..cut]) {
                assert_eq!(e.structure, "EFI_LOAD_OPTION");
            } else {
                panic!("cut at {cut} parsed");
            }
        }
    }

    #[test]
    fn tagged_events_from_the_linux_stub() {
        let data =
            hex::decode("ed223b8f1a0000004c4f414445445f494d4147453a3a4c6f61644f7074696f6e7300")
                .unwrap();
        let t = parse_tagged_event(&data).unwrap();
        assert_eq!(t.id, LINUX_LOAD_OPTIONS_TAG);
        assert_eq!(
            t.description().as_deref(),
            Some("LOADED_IMAGE::LoadOptions")
        );
        assert_eq!(
            parse_tagged_event(&data[..20]).unwrap_err().field,
            "taggedEventData"
        );
    }

    #[test]
    fn blobs_tables_and_gpt() {
        let mut blob2 = vec![3];
        blob2.extend(b"abc");
        blob2.extend(1u64.to_le_bytes());
        blob2.extend(2u64.to_le_bytes());
        let b = parse_firmware_blob2(&blob2).unwrap();
        assert_eq!(
            (b.description.as_deref(), b.base, b.length),
            (Some(&b"abc"[..]), 1, 2)
        );

        let mut tables = 1u64.to_le_bytes().to_vec();
        tables.extend(EFI_GLOBAL_VARIABLE.to_bytes());
        tables.extend(0xdeadu64.to_le_bytes());
        assert_eq!(
            parse_handoff_tables(&tables).unwrap().tables,
            vec![(EFI_GLOBAL_VARIABLE, 0xdead)]
        );

        let mut gpt = b"EFI PART".to_vec();
        gpt.extend([0; 48]);
        gpt.extend(EFI_GLOBAL_VARIABLE.to_bytes());
        gpt.extend([0; 12]);
        gpt.extend(128u32.to_le_bytes());
        gpt.extend([0; 4]);
        gpt.extend(1u64.to_le_bytes());
        let mut entry = EFI_IMAGE_SECURITY_DATABASE_GUID.to_bytes().to_vec();
        entry.extend(EFI_GLOBAL_VARIABLE.to_bytes());
        entry.extend(2048u64.to_le_bytes());
        entry.extend(4095u64.to_le_bytes());
        entry.extend(0u64.to_le_bytes());
        let mut name = utf16("ESP");
        name.resize(72, 0);
        entry.extend(name);
        gpt.extend(&entry);
        let g = parse_gpt_event(&gpt).unwrap();
        assert_eq!(g.disk_guid, EFI_GLOBAL_VARIABLE);
        assert_eq!(g.partitions.len(), 1);
        assert_eq!(g.partitions[0].name, "ESP");
        assert_eq!(g.partitions[0].starting_lba, 2048);
        assert_eq!(
            parse_gpt_event(&gpt[..gpt.len() - 1]).unwrap_err().field,
            "Partitions"
        );
    }
}
