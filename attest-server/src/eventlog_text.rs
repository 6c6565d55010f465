//! The event-log printer behind `wardenctl eventlog`: every event of a TCG
//! crypto-agile log with its decoded data, then the PCR values the log
//! replays to — as text for a person and as JSON for a machine, both from
//! one model so they cannot disagree.
//!
//! The field names, numbering and values follow Debian's `tpm2_eventlog`
//! (tpm2-tools 5.4, `--eventlog-version=1`), so an operator can hold the two
//! side by side: `Event` is what `tpm2_eventlog` shows, and `Decoded` is
//! what Warden decodes beyond it (device paths as text, Boot#### load
//! options, the Linux stub's tagged events, handoff tables, GPT).
//!
//! The log is untrusted bytes. This module must never panic on it: a log
//! that does not parse is an error naming the event and offset; event data
//! that does not decode is printed as hex with a `DecodeError` beside it.
//! It performs no I/O.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};
use warden_protocol::efi;
use warden_protocol::eventlog::{
    self, alg_name, parse, replay, Event, EventLog, HashAlg, ParseError, EV_NO_ACTION,
};

/// Why a log could not be rendered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The log is not a well-formed crypto-agile event log; the error names
    /// the event number and its offset.
    #[error("cannot parse the event log: {0}")]
    Parse(#[from] ParseError),
}

/// A value in the printed model: ordered like `tpm2_eventlog` prints it.
#[derive(Clone, Debug)]
enum Node {
    /// A number printed in decimal.
    Num(u64),
    /// A number printed as `0x…` in text (an address or a size that
    /// `tpm2_eventlog` prints in hex); a plain number in JSON.
    Addr(u64),
    /// Text.
    Str(String),
    /// Bytes, printed as lowercase hex.
    Hex(Vec<u8>),
    /// A boolean.
    Bool(bool),
    /// A list.
    List(Vec<Node>),
    /// Fields in print order.
    Map(Vec<(String, Node)>),
}

impl Node {
    fn to_json(&self) -> Value {
        match self {
            Node::Num(n) | Node::Addr(n) => json!(n),
            Node::Str(s) => json!(s),
            Node::Hex(b) => json!(hex::encode(b)),
            Node::Bool(b) => json!(b),
            Node::List(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }

    fn scalar_text(&self) -> Option<String> {
        Some(match self {
            Node::Num(n) => n.to_string(),
            Node::Addr(n) => format!("0x{n:x}"),
            Node::Str(s) if is_plain_word(s) => s.clone(),
            // JSON's escapes are valid in a YAML double-quoted scalar.
            Node::Str(s) => serde_json::to_string(s).unwrap_or_default(),
            Node::Hex(b) => format!("\"{}\"", hex::encode(b)),
            Node::Bool(b) => b.to_string(),
            Node::List(l) if l.is_empty() => "[]".to_string(),
            Node::Map(m) if m.is_empty() => "{}".to_string(),
            Node::List(_) | Node::Map(_) => return None,
        })
    }
}

/// Whether `s` can be written as a bare YAML scalar and read back as the
/// same string: a word like `EV_SEPARATOR` or `SecureBoot`, not a number or
/// a YAML keyword.
fn is_plain_word(s: &str) -> bool {
    let keyword = ["true", "false", "yes", "no", "on", "off", "null"]
        .iter()
        .any(|k| s.eq_ignore_ascii_case(k));
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !keyword
}

/// A small builder for ordered maps.
#[derive(Default)]
struct Fields(Vec<(String, Node)>);

impl Fields {
    fn add(&mut self, key: &str, value: Node) -> &mut Self {
        self.0.push((key.to_string(), value));
        self
    }

    fn done(self) -> Node {
        Node::Map(self.0)
    }
}

/// Writes `fields` as YAML block mappings at `indent` spaces.
fn write_map(out: &mut String, fields: &[(String, Node)], indent: usize) {
    for (key, value) in fields {
        let _ = write!(out, "{:indent$}{key}:", "");
        write_value(out, value, indent);
    }
}

/// Writes what follows `key:` (the key is already written at `indent`).
fn write_value(out: &mut String, value: &Node, indent: usize) {
    if let Some(s) = value.scalar_text() {
        let _ = writeln!(out, " {s}");
        return;
    }
    out.push('\n');
    match value {
        Node::Map(fields) => write_map(out, fields, indent + 2),
        Node::List(items) => write_list(out, items, indent),
        _ => {}
    }
}

/// Writes list items as `- …` at `indent`.
fn write_list(out: &mut String, items: &[Node], indent: usize) {
    for item in items {
        let _ = write!(out, "{:indent$}-", "");
        match item {
            Node::Map(fields) if !fields.is_empty() => {
                // The first field shares the dash's line, as YAML writers do.
                let (first, rest) = fields.split_at(1);
                if let Some((key, value)) = first.first() {
                    let _ = write!(out, " {key}:");
                    write_value(out, value, indent + 2);
                }
                write_map(out, rest, indent + 2);
            }
            other => write_value(out, other, indent),
        }
    }
}

/// The log, parsed and modelled once for both renderings.
struct Rendered {
    events: Vec<Node>,
    /// Each bank Warden replayed.
    pcrs: Banks,
    /// Each bank the log has but Warden did not replay, and why.
    not_replayed: NotReplayed,
}

fn render(log: &[u8]) -> Result<Rendered, RenderError> {
    let parsed = parse(log)?;
    let mut events = Vec::with_capacity(parsed.events.len());
    for event in &parsed.events {
        events.push(if event.number == 0 {
            spec_id_node(&parsed, event)
        } else {
            event_node(event)
        });
    }
    let (pcrs, not_replayed) = replay_banks(&parsed);
    Ok(Rendered {
        events,
        pcrs,
        not_replayed,
    })
}

fn bank_name(alg: u16) -> String {
    alg_name(alg).map_or_else(|| format!("alg_0x{alg:04x}"), str::to_string)
}

/// `(bank name, [(pcr, value)])` for each replayed bank.
type Banks = Vec<(String, Vec<(u32, Vec<u8>)>)>;
/// `(bank name, why)` for each bank not replayed.
type NotReplayed = Vec<(String, String)>;

/// Replays every bank the log lists. The PCRs shown for a bank are those
/// any event after the Spec ID event names with a digest in that bank —
/// `EV_NO_ACTION` events included — which is the set `tpm2_eventlog` shows.
fn replay_banks(log: &EventLog) -> (Banks, NotReplayed) {
    let mut pcrs = Vec::new();
    let mut not_replayed = Vec::new();
    for &(alg_id, _) in &log.spec.algorithms {
        let name = bank_name(alg_id);
        let alg = match alg_id {
            eventlog::TPM_ALG_SHA256 => HashAlg::Sha256,
            eventlog::TPM_ALG_SHA384 => HashAlg::Sha384,
            _ => {
                not_replayed.push((name, "Warden replays only sha256 and sha384".to_string()));
                continue;
            }
        };
        let values = match replay(log, alg) {
            Ok(v) => v,
            Err(e) => {
                not_replayed.push((name, e.to_string()));
                continue;
            }
        };
        let touched: BTreeSet<u32> = log
            .events
            .iter()
            .skip(1)
            .filter(|e| e.digest(alg_id).is_some())
            .map(|e| e.pcr)
            .filter(|&p| usize::try_from(p).is_ok_and(|p| p < warden_protocol::PCR_COUNT))
            .collect();
        let zeros = vec![0u8; alg.digest_len()];
        let bank = touched
            .into_iter()
            .map(|p| (p, values.get(&p).unwrap_or(&zeros).clone()))
            .collect();
        pcrs.push((name, bank));
    }
    (pcrs, not_replayed)
}

fn spec_id_node(log: &EventLog, event: &Event) -> Node {
    let spec = &log.spec;
    let algorithms = spec
        .algorithms
        .iter()
        .map(|&(alg, size)| {
            let mut f = Fields::default();
            f.add("algorithmId", Node::Str(bank_name(alg)))
                .add("digestSize", Node::Num(u64::from(size)));
            f.done()
        })
        .collect();
    let mut s = Fields::default();
    s.add("Signature", Node::Str("Spec ID Event03".to_string()))
        .add("platformClass", Node::Num(u64::from(spec.platform_class)))
        .add(
            "specVersionMinor",
            Node::Num(u64::from(spec.spec_version_minor)),
        )
        .add(
            "specVersionMajor",
            Node::Num(u64::from(spec.spec_version_major)),
        )
        .add("specErrata", Node::Num(u64::from(spec.spec_errata)))
        .add("uintnSize", Node::Num(u64::from(spec.uintn_size)))
        .add(
            "numberOfAlgorithms",
            Node::Num(spec.algorithms.len() as u64),
        )
        .add("Algorithms", Node::List(algorithms))
        .add("vendorInfoSize", Node::Num(spec.vendor_info.len() as u64));
    if !spec.vendor_info.is_empty() {
        s.add("vendorInfo", Node::Hex(spec.vendor_info.clone()));
    }
    let digest = event
        .digests
        .first()
        .map(|(_, d)| d.clone())
        .unwrap_or_default();
    let mut f = Fields::default();
    f.add("EventNum", Node::Num(event.number as u64))
        .add("PCRIndex", Node::Num(u64::from(event.pcr)))
        .add("EventType", Node::Str(event.event_type.to_string()))
        .add("Digest", Node::Hex(digest))
        .add("EventSize", Node::Num(event.data.len() as u64))
        .add("SpecID", s.done());
    f.done()
}

fn event_node(event: &Event) -> Node {
    let digests = event
        .digests
        .iter()
        .map(|(alg, d)| {
            let mut f = Fields::default();
            f.add("AlgorithmId", Node::Str(bank_name(*alg)))
                .add("Digest", Node::Hex(d.clone()));
            f.done()
        })
        .collect();
    let mut f = Fields::default();
    f.add("EventNum", Node::Num(event.number as u64))
        .add("PCRIndex", Node::Num(u64::from(event.pcr)))
        .add("EventType", Node::Str(event.event_type.to_string()))
        .add("DigestCount", Node::Num(event.digests.len() as u64))
        .add("Digests", Node::List(digests))
        .add("EventSize", Node::Num(event.data.len() as u64));
    if !event.data.is_empty() {
        let decoded = decode_event(event.event_type.0, &event.data);
        f.add("Event", decoded.shown);
        if let Some(extra) = decoded.extra {
            f.add("Decoded", extra);
        }
        if let Some(err) = decoded.error {
            f.add("DecodeError", Node::Str(err.to_string()));
        }
    }
    f.done()
}

/// What one event's data renders to.
struct DecodedData {
    /// What `tpm2_eventlog` shows as `Event`.
    shown: Node,
    /// What Warden decodes beyond it.
    extra: Option<Node>,
    /// Why the data did not decode as its type says it should.
    error: Option<efi::EfiError>,
}

impl DecodedData {
    fn shown(shown: Node) -> Self {
        DecodedData {
            shown,
            extra: None,
            error: None,
        }
    }

    /// Raw hex, plus Warden's decoding (or the reason it failed).
    fn hex_with(data: &[u8], extra: Result<Option<Node>, efi::EfiError>) -> Self {
        let (extra, error) = match extra {
            Ok(extra) => (extra, None),
            Err(e) => (None, Some(e)),
        };
        DecodedData {
            shown: Node::Hex(data.to_vec()),
            extra,
            error,
        }
    }
}

// Event types whose data this module decodes (TCG PC Client PFP).
const EV_POST_CODE: u32 = 0x1;
const EV_EVENT_TAG: u32 = 0x6;
const EV_S_CRTM_CONTENTS: u32 = 0x7;
const EV_S_CRTM_VERSION: u32 = 0x8;
const EV_IPL: u32 = 0xD;
const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
const EV_EFI_BOOT_SERVICES_DRIVER: u32 = 0x8000_0004;
const EV_EFI_RUNTIME_SERVICES_DRIVER: u32 = 0x8000_0005;
const EV_EFI_GPT_EVENT: u32 = 0x8000_0006;
const EV_EFI_ACTION: u32 = 0x8000_0007;
const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
const EV_EFI_HANDOFF_TABLES: u32 = 0x8000_0009;
const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000A;
const EV_EFI_HANDOFF_TABLES2: u32 = 0x8000_000B;
const EV_EFI_VARIABLE_BOOT2: u32 = 0x8000_000C;
const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00E0;

fn decode_event(event_type: u32, data: &[u8]) -> DecodedData {
    match event_type {
        EV_EFI_VARIABLE_DRIVER_CONFIG
        | EV_EFI_VARIABLE_BOOT
        | EV_EFI_VARIABLE_BOOT2
        | EV_EFI_VARIABLE_AUTHORITY => variable_node(data),
        // tpm2_eventlog reads a 16-byte POST code as a firmware blob, any
        // other as text.
        EV_POST_CODE if data.len() == 16 => blob_node(data, efi::parse_firmware_blob(data)),
        EV_POST_CODE => DecodedData::shown(Node::Str(String::from_utf8_lossy(data).into_owned())),
        EV_S_CRTM_CONTENTS | EV_EFI_PLATFORM_FIRMWARE_BLOB => {
            blob_node(data, efi::parse_firmware_blob(data))
        }
        EV_EFI_PLATFORM_FIRMWARE_BLOB2 => blob_node(data, efi::parse_firmware_blob2(data)),
        EV_EFI_ACTION => DecodedData::shown(Node::Str(String::from_utf8_lossy(data).into_owned())),
        EV_IPL => {
            let mut f = Fields::default();
            f.add(
                "String",
                Node::Str(String::from_utf8_lossy(data).into_owned()),
            );
            DecodedData::shown(f.done())
        }
        EV_EFI_BOOT_SERVICES_APPLICATION
        | EV_EFI_BOOT_SERVICES_DRIVER
        | EV_EFI_RUNTIME_SERVICES_DRIVER => image_load_node(data),
        EV_EFI_GPT_EVENT => {
            DecodedData::hex_with(data, efi::parse_gpt_event(data).map(|g| Some(gpt_node(&g))))
        }
        EV_NO_ACTION => {
            let extra = startup_locality(data).map(|l| {
                let mut f = Fields::default();
                f.add("StartupLocality", Node::Num(u64::from(l)));
                f.done()
            });
            DecodedData::hex_with(data, Ok(extra))
        }
        EV_EVENT_TAG => DecodedData::hex_with(
            data,
            efi::parse_tagged_event(data).map(|t| {
                let mut f = Fields::default();
                f.add("TaggedEventID", Node::Addr(u64::from(t.id)));
                match t.description() {
                    Some(d) => f.add("Description", Node::Str(d)),
                    None => f.add("TaggedEventData", Node::Hex(t.data.clone())),
                };
                Some(f.done())
            }),
        ),
        EV_EFI_HANDOFF_TABLES => DecodedData::hex_with(
            data,
            efi::parse_handoff_tables(data).map(|t| Some(tables_node(&t))),
        ),
        EV_EFI_HANDOFF_TABLES2 => DecodedData::hex_with(
            data,
            efi::parse_handoff_tables2(data).map(|t| Some(tables_node(&t))),
        ),
        EV_S_CRTM_VERSION => {
            // Firmware writes its version as a NUL-terminated UTF-16 string.
            let extra = (data.len() % 2 == 0).then(|| {
                let mut f = Fields::default();
                f.add("Version", Node::Str(efi::utf16_lossy(data)));
                f.done()
            });
            DecodedData::hex_with(data, Ok(extra))
        }
        _ => DecodedData::hex_with(data, Ok(None)),
    }
}

fn startup_locality(data: &[u8]) -> Option<u8> {
    data.strip_prefix(b"StartupLocality\0")?.first().copied()
}

fn blob_node(data: &[u8], blob: Result<efi::FirmwareBlob, efi::EfiError>) -> DecodedData {
    match blob {
        Ok(b) => {
            let mut f = Fields::default();
            if let Some(desc) = &b.description {
                f.add("BlobDescriptionSize", Node::Num(desc.len() as u64))
                    .add(
                        "BlobDescription",
                        Node::Str(String::from_utf8_lossy(desc).into_owned()),
                    );
            }
            f.add("BlobBase", Node::Addr(b.base))
                .add("BlobLength", Node::Addr(b.length));
            DecodedData::shown(f.done())
        }
        Err(e) => DecodedData::hex_with(data, Err(e)),
    }
}

fn variable_node(data: &[u8]) -> DecodedData {
    let var = match efi::parse_variable_data(data) {
        Ok(v) => v,
        Err(e) => return DecodedData::hex_with(data, Err(e)),
    };
    let mut f = Fields::default();
    f.add("VariableName", Node::Str(var.guid.to_string()))
        .add(
            "UnicodeNameLength",
            Node::Num(var.name.encode_utf16().count() as u64),
        )
        .add("VariableDataLength", Node::Num(var.data.len() as u64))
        .add("UnicodeName", Node::Str(var.name.clone()));
    if !var.data.is_empty() {
        f.add("VariableData", Node::Hex(var.data.clone()));
    }
    let (extra, error) = match variable_extra(&var) {
        Ok(extra) => (extra, None),
        Err(e) => (None, Some(e)),
    };
    DecodedData {
        shown: f.done(),
        extra,
        error,
    }
}

/// Decodes the values of the variables a person asks about: SecureBoot,
/// BootOrder, Boot####.
fn variable_extra(var: &efi::VariableData) -> Result<Option<Node>, efi::EfiError> {
    if var.guid != efi::EFI_GLOBAL_VARIABLE {
        return Ok(None);
    }
    let mut f = Fields::default();
    match var.name.as_str() {
        "SecureBoot" | "SetupMode" | "AuditMode" | "DeployedMode" if var.data.len() == 1 => {
            f.add(
                "Enabled",
                Node::Bool(var.data.first().is_some_and(|&b| b != 0)),
            );
        }
        "BootOrder" if var.data.len() % 2 == 0 => {
            let order = var
                .data
                .chunks_exact(2)
                .map(|c| Node::Str(format!("Boot{:04X}", u16::from_le_bytes([c[0], c[1]]))))
                .collect();
            f.add("BootOrder", Node::List(order));
        }
        name if is_boot_option(name) => {
            let opt = efi::parse_load_option(&var.data)?;
            f.add("Enabled", Node::Bool(opt.is_active()))
                .add(
                    "FilePathListLength",
                    Node::Num(opt.file_path_list.len() as u64),
                )
                .add("Description", Node::Str(opt.description.clone()))
                .add(
                    "DevicePath",
                    Node::Str(efi::device_path_to_text(&opt.file_path_list)?),
                );
            if !opt.optional_data.is_empty() {
                f.add("OptionalData", Node::Hex(opt.optional_data.clone()));
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(f.done()))
}

/// `Boot` followed by four hex digits.
fn is_boot_option(name: &str) -> bool {
    name.len() == 8
        && name.starts_with("Boot")
        && name
            .get(4..)
            .is_some_and(|d| d.chars().all(|c| c.is_ascii_hexdigit()))
}

fn image_load_node(data: &[u8]) -> DecodedData {
    let image = match efi::parse_image_load_event(data) {
        Ok(i) => i,
        Err(e) => return DecodedData::hex_with(data, Err(e)),
    };
    let mut f = Fields::default();
    f.add("ImageLocationInMemory", Node::Addr(image.location))
        .add("ImageLengthInMemory", Node::Num(image.length))
        .add("ImageLinkTimeAddress", Node::Addr(image.link_time_address))
        .add(
            "LengthOfDevicePath",
            Node::Num(image.device_path.len() as u64),
        )
        // tpm2_eventlog shows every byte after the fixed header.
        .add(
            "DevicePath",
            Node::Hex(
                data.get(efi::IMAGE_LOAD_EVENT_HEADER..)
                    .unwrap_or_default()
                    .to_vec(),
            ),
        );
    let (extra, error) = match efi::device_path_to_text(&image.device_path) {
        Ok(text) => {
            let mut x = Fields::default();
            x.add("DevicePath", Node::Str(text));
            (Some(x.done()), None)
        }
        Err(e) => (None, Some(e)),
    };
    DecodedData {
        shown: f.done(),
        extra,
        error,
    }
}

fn tables_node(t: &efi::HandoffTables) -> Node {
    let mut f = Fields::default();
    if let Some(desc) = &t.description {
        f.add(
            "TableDescription",
            Node::Str(String::from_utf8_lossy(desc).into_owned()),
        );
    }
    let tables = t
        .tables
        .iter()
        .map(|(guid, addr)| {
            let mut e = Fields::default();
            e.add("VendorGuid", Node::Str(guid.to_string()))
                .add("VendorTable", Node::Addr(*addr));
            e.done()
        })
        .collect();
    f.add("Tables", Node::List(tables));
    f.done()
}

fn gpt_node(g: &efi::GptEvent) -> Node {
    let partitions = g
        .partitions
        .iter()
        .map(|p| {
            let mut e = Fields::default();
            e.add("PartitionTypeGUID", Node::Str(p.type_guid.to_string()))
                .add("UniquePartitionGUID", Node::Str(p.unique_guid.to_string()))
                .add("StartingLBA", Node::Addr(p.starting_lba))
                .add("EndingLBA", Node::Addr(p.ending_lba))
                .add("Attributes", Node::Addr(p.attributes))
                .add("PartitionName", Node::Str(p.name.clone()));
            e.done()
        })
        .collect();
    let mut f = Fields::default();
    f.add("DiskGUID", Node::Str(g.disk_guid.to_string()))
        .add("Partitions", Node::List(partitions));
    f.done()
}

/// Renders `log` as `tpm2_eventlog`-style YAML text: every event (number,
/// PCR, type, digests, decoded data), then the replayed PCR values per bank.
pub fn render_text(log: &[u8]) -> Result<String, RenderError> {
    let r = render(log)?;
    let mut out = String::from("---\nversion: 1\nevents:\n");
    write_list(&mut out, &r.events, 0);
    out.push_str("pcrs:\n");
    for (bank, values) in &r.pcrs {
        let _ = writeln!(out, "  {bank}:");
        for (pcr, value) in values {
            let _ = writeln!(out, "    {pcr:<2} : 0x{}", hex::encode(value));
        }
    }
    for (bank, why) in &r.not_replayed {
        let _ = writeln!(out, "# {bank}: not replayed: {why}");
    }
    Ok(out)
}

/// Renders `log` as JSON with the same content as [`render_text`]:
/// `{"events": [...], "pcrs": {"sha256": {"0": "<hex>", ...}},
/// "not_replayed": {"sha1": "<why>"}}`. Event fields carry
/// `tpm2_eventlog`'s names; numbers are JSON numbers, bytes lowercase hex.
pub fn render_json(log: &[u8]) -> Result<Value, RenderError> {
    let r = render(log)?;
    let events: Vec<Value> = r.events.iter().map(Node::to_json).collect();
    let pcrs: Map<String, Value> = r
        .pcrs
        .iter()
        .map(|(bank, values)| {
            let values: Map<String, Value> = values
                .iter()
                .map(|(pcr, v)| (pcr.to_string(), json!(hex::encode(v))))
                .collect();
            (bank.clone(), Value::Object(values))
        })
        .collect();
    let not_replayed: Map<String, Value> = r
        .not_replayed
        .iter()
        .map(|(bank, why)| (bank.clone(), json!(why)))
        .collect();
    Ok(json!({ "events": events, "pcrs": pcrs, "not_replayed": not_replayed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_writer_nests_lists_and_maps() {
        let mut inner = Fields::default();
        inner.add("a", Node::Num(1)).add("b", Node::Hex(vec![0xab]));
        let mut outer = Fields::default();
        outer
            .add("x", Node::Str("q\"uote".into()))
            .add("w", Node::Str("EV_SEPARATOR".into()))
            .add("n", Node::Str("No".into()))
            .add("l", Node::List(vec![inner.done()]))
            .add("e", Node::List(vec![]));
        let mut s = String::new();
        write_list(&mut s, &[outer.done()], 0);
        assert_eq!(
            s,
            "- x: \"q\\\"uote\"\n  w: EV_SEPARATOR\n  n: \"No\"\n  l:\n  - a: 1\n    b: \"ab\"\n  e: []\n"
        );
    }

    #[test]
    fn boot_option_names() {
        assert!(is_boot_option("Boot000A"));
        assert!(!is_boot_option("BootOrder"));
        assert!(!is_boot_option("Boot00é"));
    }
}
