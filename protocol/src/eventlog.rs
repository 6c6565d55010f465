//! The TCG PC Client crypto-agile event log: parsing, PCR replay, and a
//! comparison against quoted PCR values that a person can act on.
//!
//! The log is what firmware (and the kernel's EFI stub) claims it measured;
//! the TPM's PCRs are what was actually extended. Replaying the log and
//! comparing with a quote tells the server whether the claims are complete
//! and honest, and — when they are not — which PCR and which events to look
//! at.
//!
//! The input is untrusted bytes from the node. This module must never panic,
//! index without a bounds check, or allocate an amount the input chooses
//! beyond the input's own length; it performs no I/O.
//!
//! Format (TCG PC Client Platform Firmware Profile, "crypto agile" log; all
//! integers little-endian):
//! - event 0 is a `TCG_PCClientPCREvent` in the old SHA-1 layout (`pcrIndex`
//!   u32, `eventType` u32, `digest[20]`, `eventSize` u32, event) whose event
//!   is a `TCG_EfiSpecIDEvent` (signature `"Spec ID Event03\0"`) listing the
//!   algorithms and their digest sizes;
//! - every later event is a `TCG_PCR_EVENT2`: `pcrIndex` u32, `eventType`
//!   u32, `TPML_DIGEST_VALUES` (count u32, then `hashAlg` u16 + digest whose
//!   size the Spec ID event gives), `eventSize` u32, event.
//!
//! Legacy SHA-1-only logs (TPM 1.2 format, no Spec ID event) are rejected
//! with [`Problem::NotCryptoAgile`]: every TPM 2.0 firmware Warden targets
//! writes the crypto-agile format, and without a SHA-1 implementation in
//! this crate such a log could not be replayed anyway.

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256, Sha384};

/// `TPM_ALG_SHA1`.
pub const TPM_ALG_SHA1: u16 = 0x0004;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000B;
/// `TPM_ALG_SHA384`.
pub const TPM_ALG_SHA384: u16 = 0x000C;
/// `TPM_ALG_SHA512`.
pub const TPM_ALG_SHA512: u16 = 0x000D;
/// `TPM_ALG_SM3_256`.
pub const TPM_ALG_SM3_256: u16 = 0x0012;

/// Not extended into any PCR (Spec ID, StartupLocality, …).
pub const EV_NO_ACTION: u32 = 0x3;
/// Marks the end of the pre-OS phase for a PCR.
pub const EV_SEPARATOR: u32 = 0x4;
/// The event data is `"StartupLocality\0"` followed by the locality byte.
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";

/// Most digests one event may carry and most algorithms the Spec ID event
/// may list: real logs have 1–4 banks; the cap bounds what a hostile log
/// can make us allocate per event.
pub const MAX_ALGORITHMS: usize = 8;
/// Largest digest size accepted in the Spec ID event (SHA-512 / SHA3-512).
pub const MAX_DIGEST_SIZE: u16 = 64;

/// Size of the smallest header a crypto-agile event has (`pcrIndex`,
/// `eventType`, digest count). A run of at least this many zero bytes after
/// the last event cannot be an event (a count of 0 is rejected) and is taken
/// as the padding firmware tables carry; a shorter zero tail is ambiguous
/// with a truncated event and is reported as truncation.
const EVENT2_HEADER: usize = 12;

/// The name the TCG specifications give an event type, if it is a known one.
pub fn event_type_name(event_type: u32) -> Option<&'static str> {
    Some(match event_type {
        0x0 => "EV_PREBOOT_CERT",
        0x1 => "EV_POST_CODE",
        0x2 => "EV_UNUSED",
        0x3 => "EV_NO_ACTION",
        0x4 => "EV_SEPARATOR",
        0x5 => "EV_ACTION",
        0x6 => "EV_EVENT_TAG",
        0x7 => "EV_S_CRTM_CONTENTS",
        0x8 => "EV_S_CRTM_VERSION",
        0x9 => "EV_CPU_MICROCODE",
        0xA => "EV_PLATFORM_CONFIG_FLAGS",
        0xB => "EV_TABLE_OF_DEVICES",
        0xC => "EV_COMPACT_HASH",
        0xD => "EV_IPL",
        0xE => "EV_IPL_PARTITION_DATA",
        0xF => "EV_NONHOST_CODE",
        0x10 => "EV_NONHOST_CONFIG",
        0x11 => "EV_NONHOST_INFO",
        0x12 => "EV_OMIT_BOOT_DEVICE_EVENTS",
        0x8000_0000 => "EV_EFI_EVENT_BASE",
        0x8000_0001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x8000_0002 => "EV_EFI_VARIABLE_BOOT",
        0x8000_0003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x8000_0005 => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        0x8000_0006 => "EV_EFI_GPT_EVENT",
        0x8000_0007 => "EV_EFI_ACTION",
        0x8000_0008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x8000_0009 => "EV_EFI_HANDOFF_TABLES",
        0x8000_000A => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000_000B => "EV_EFI_HANDOFF_TABLES2",
        0x8000_000C => "EV_EFI_VARIABLE_BOOT2",
        0x8000_000D => "EV_EFI_GPT_EVENT2",
        0x8000_0010 => "EV_EFI_HCRTM_EVENT",
        0x8000_00E0 => "EV_EFI_VARIABLE_AUTHORITY",
        0x8000_00E1 => "EV_EFI_SPDM_FIRMWARE_BLOB",
        0x8000_00E2 => "EV_EFI_SPDM_FIRMWARE_CONFIG",
        _ => return None,
    })
}

/// The short name of a TPM hash algorithm, if it is a known one.
pub fn alg_name(alg: u16) -> Option<&'static str> {
    Some(match alg {
        TPM_ALG_SHA1 => "sha1",
        TPM_ALG_SHA256 => "sha256",
        TPM_ALG_SHA384 => "sha384",
        TPM_ALG_SHA512 => "sha512",
        TPM_ALG_SM3_256 => "sm3_256",
        _ => return None,
    })
}

/// Displays an algorithm id by name, or as `alg 0x1234` when unknown.
struct AlgDisplay(u16);

impl fmt::Display for AlgDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match alg_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "alg {:#06x}", self.0),
        }
    }
}

/// An event type as the log carries it; [`EventType::name`] gives the TCG
/// name. Displays as the name, or `EV_UNKNOWN(0x…)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventType(pub u32);

impl EventType {
    /// The TCG name, if known.
    pub fn name(self) -> Option<&'static str> {
        event_type_name(self.0)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "EV_UNKNOWN({:#x})", self.0),
        }
    }
}

/// The contents of the `TCG_EfiSpecIDEvent` that opens a crypto-agile log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecId {
    /// 0 = client, 1 = server.
    pub platform_class: u32,
    /// Spec version the firmware claims (2.0 for TPM 2.0 logs).
    pub spec_version_major: u8,
    /// Minor spec version.
    pub spec_version_minor: u8,
    /// Spec errata level.
    pub spec_errata: u8,
    /// 1 = 32-bit UINTN, 2 = 64-bit.
    pub uintn_size: u8,
    /// `(algorithmId, digestSize)` for each bank the log carries.
    pub algorithms: Vec<(u16, u16)>,
    /// Opaque vendor bytes.
    pub vendor_info: Vec<u8>,
}

impl SpecId {
    /// Digest size the log uses for `alg`, if the log carries that bank.
    pub fn digest_size(&self, alg: u16) -> Option<u16> {
        self.algorithms
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, size)| *size)
    }
}

/// One event of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the log; the Spec ID event is number 0.
    pub number: usize,
    /// Byte offset of the event's first byte in the log.
    pub offset: usize,
    /// PCR the event was extended into (or, for `EV_NO_ACTION`, is about).
    pub pcr: u32,
    /// The event type.
    pub event_type: EventType,
    /// `(hashAlg, digest)` in log order. Event 0 carries its SHA-1-layout
    /// 20-byte digest field as `TPM_ALG_SHA1`.
    pub digests: Vec<(u16, Vec<u8>)>,
    /// The event data.
    pub data: Vec<u8>,
}

impl Event {
    /// This event's digest for `alg`, if it carries one.
    pub fn digest(&self, alg: u16) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, d)| d.as_slice())
    }

    /// The locality of a `StartupLocality` `EV_NO_ACTION` event, which sets
    /// PCR 0's value at TPM startup; `None` for any other event.
    pub fn startup_locality(&self) -> Option<u8> {
        if self.event_type.0 != EV_NO_ACTION {
            return None;
        }
        let rest = self.data.strip_prefix(STARTUP_LOCALITY_SIGNATURE)?;
        rest.first().copied()
    }
}

/// A parsed crypto-agile event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLog {
    /// What the Spec ID event (event 0) says.
    pub spec: SpecId,
    /// All events, the Spec ID event first.
    pub events: Vec<Event>,
}

/// Why an event log could not be parsed: which event, where, and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event {event} at offset {offset:#x}: {problem}")]
pub struct ParseError {
    /// Number of the event being parsed (0 = the Spec ID event).
    pub event: usize,
    /// Byte offset of that event's first byte.
    pub offset: usize,
    /// What was wrong.
    pub problem: Problem,
}

/// What was wrong with an event; see [`ParseError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The log ends inside a field.
    #[error("{field} needs {needed} bytes at offset {at:#x} but only {left} are left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Its offset in the log.
        at: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes the log (or the enclosing event) has left.
        left: usize,
    },
    /// `eventSize` is larger than what follows it.
    #[error("event size {size} exceeds the {left} bytes left")]
    EventTooLarge {
        /// The claimed size.
        size: u32,
        /// Bytes left in the log after the size field.
        left: usize,
    },
    /// The first event is not an `EV_NO_ACTION` "Spec ID Event03".
    #[error(
        "not a crypto-agile log: the first event is not an EV_NO_ACTION \"Spec ID Event03\" \
         event (legacy SHA-1-only logs are not supported)"
    )]
    NotCryptoAgile,
    /// The Spec ID event lists no algorithms, or more than [`MAX_ALGORITHMS`].
    #[error("the Spec ID event lists {0} algorithms; 1 to {MAX_ALGORITHMS} are accepted")]
    AlgorithmCount(u32),
    /// An algorithm appears twice in the Spec ID event.
    #[error("the Spec ID event lists {} twice", AlgDisplay(*.0))]
    DuplicateAlgorithm(u16),
    /// A digest size of 0 or above [`MAX_DIGEST_SIZE`] in the Spec ID event.
    #[error("the Spec ID event gives {} a digest size of {size}; 1 to {MAX_DIGEST_SIZE} are accepted", AlgDisplay(*.alg))]
    DigestSize {
        /// The algorithm.
        alg: u16,
        /// Its claimed size.
        size: u16,
    },
    /// An event carries no digests, or more than [`MAX_ALGORITHMS`].
    #[error("the event carries {0} digests; 1 to {MAX_ALGORITHMS} are accepted")]
    DigestCount(u32),
    /// An event's digest uses an algorithm the Spec ID event did not list,
    /// so its size (and everything after it) is unknown.
    #[error("digest algorithm {} is not listed in the Spec ID event", AlgDisplay(*.0))]
    UnknownAlgorithm(u16),
}

/// A bounds-checked little-endian cursor over a byte slice. `base` is the
/// slice's offset in the whole log, so errors name log offsets.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Problem> {
        let truncated = Problem::Truncated {
            field,
            at: self.base.saturating_add(self.pos),
            needed: n,
            left: self.left(),
        };
        let end = self.pos.checked_add(n).ok_or(truncated.clone())?;
        let bytes = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Problem> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Problem> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, Problem> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, Problem> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// Reads `eventSize` and then that many bytes of event data.
    fn event_data(&mut self) -> Result<&'a [u8], Problem> {
        let size = self.u32("eventSize")?;
        let left = self.left();
        match usize::try_from(size) {
            Ok(n) if n <= left => self.take(n, "event data"),
            _ => Err(Problem::EventTooLarge { size, left }),
        }
    }
}

/// Parses a crypto-agile TCG event log (e.g. the bytes of
/// `/sys/kernel/security/tpm0/binary_bios_measurements`).
///
/// A run of zero bytes after the last event (firmware log areas are padded)
/// is ignored. Anything else that is not a well-formed event is an error
/// naming the event number and offset.
pub fn parse(log: &[u8]) -> Result<EventLog, ParseError> {
    let mut r = Reader::new(log, 0);
    let at_event = |event: usize, offset: usize| {
        move |problem: Problem| ParseError {
            event,
            offset,
            problem,
        }
    };

    let (first, spec) = parse_spec_id_event(&mut r).map_err(at_event(0, 0))?;
    let mut events = vec![first];

    loop {
        let rest = r.rest();
        if rest.is_empty() || (rest.len() >= EVENT2_HEADER && rest.iter().all(|&b| b == 0)) {
            break;
        }
        let number = events.len();
        let offset = r.pos;
        let event = parse_event2(&mut r, &spec, number).map_err(at_event(number, offset))?;
        events.push(event);
    }
    Ok(EventLog { spec, events })
}

fn parse_spec_id_event(r: &mut Reader<'_>) -> Result<(Event, SpecId), Problem> {
    let pcr = r.u32("pcrIndex")?;
    let event_type = r.u32("eventType")?;
    let digest = r.take(20, "SHA-1 digest")?.to_vec();
    let data_offset = r.pos.saturating_add(4);
    let data = r.event_data()?;
    if event_type != EV_NO_ACTION || !data.starts_with(SPEC_ID_SIGNATURE) {
        return Err(Problem::NotCryptoAgile);
    }

    let mut d = Reader::new(data, data_offset);
    d.take(SPEC_ID_SIGNATURE.len(), "signature")?;
    let platform_class = d.u32("platformClass")?;
    let spec_version_minor = d.u8("specVersionMinor")?;
    let spec_version_major = d.u8("specVersionMajor")?;
    let spec_errata = d.u8("specErrata")?;
    let uintn_size = d.u8("uintnSize")?;
    let count = d.u32("numberOfAlgorithms")?;
    let n = usize::try_from(count)
        .ok()
        .filter(|n| (1..=MAX_ALGORITHMS).contains(n))
        .ok_or(Problem::AlgorithmCount(count))?;
    let mut algorithms: Vec<(u16, u16)> = Vec::with_capacity(n);
    for _ in 0..n {
        let alg = d.u16("algorithmId")?;
        let size = d.u16("digestSize")?;
        if size == 0 || size > MAX_DIGEST_SIZE {
            return Err(Problem::DigestSize { alg, size });
        }
        if algorithms.iter().any(|(a, _)| *a == alg) {
            return Err(Problem::DuplicateAlgorithm(alg));
        }
        algorithms.push((alg, size));
    }
    let vendor_size = d.u8("vendorInfoSize")?;
    let vendor_info = d.take(usize::from(vendor_size), "vendorInfo")?.to_vec();

    let event = Event {
        number: 0,
        offset: 0,
        pcr,
        event_type: EventType(event_type),
        digests: vec![(TPM_ALG_SHA1, digest)],
        data: data.to_vec(),
    };
    let spec = SpecId {
        platform_class,
        spec_version_major,
        spec_version_minor,
        spec_errata,
        uintn_size,
        algorithms,
        vendor_info,
    };
    Ok((event, spec))
}

fn parse_event2(r: &mut Reader<'_>, spec: &SpecId, number: usize) -> Result<Event, Problem> {
    let offset = r.pos;
    let pcr = r.u32("pcrIndex")?;
    let event_type = r.u32("eventType")?;
    let count = r.u32("digest count")?;
    let n = usize::try_from(count)
        .ok()
        .filter(|n| (1..=MAX_ALGORITHMS).contains(n))
        .ok_or(Problem::DigestCount(count))?;
    let mut digests = Vec::with_capacity(n);
    for _ in 0..n {
        let alg = r.u16("hashAlg")?;
        let size = spec
            .digest_size(alg)
            .ok_or(Problem::UnknownAlgorithm(alg))?;
        digests.push((alg, r.take(usize::from(size), "digest")?.to_vec()));
    }
    let data = r.event_data()?.to_vec();
    Ok(Event {
        number,
        offset,
        pcr,
        event_type: EventType(event_type),
        digests,
        data,
    })
}

/// A PCR bank this module can replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// `TPM_ALG_SHA256`.
    Sha256,
    /// `TPM_ALG_SHA384`.
    Sha384,
}

impl HashAlg {
    /// The TPM algorithm id.
    pub fn alg_id(self) -> u16 {
        match self {
            HashAlg::Sha256 => TPM_ALG_SHA256,
            HashAlg::Sha384 => TPM_ALG_SHA384,
        }
    }

    /// Digest (and PCR) size in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
        }
    }

    /// Short name, as in `pcr-sha256`.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
        }
    }

    /// The digest of `data` in this bank.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha256 => Sha256::digest(data).to_vec(),
            HashAlg::Sha384 => Sha384::digest(data).to_vec(),
        }
    }

    /// `H(pcr || digest)`: what `TPM2_PCR_Extend` stores.
    fn extend(self, pcr: &[u8], digest: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha256 => Sha256::new()
                .chain_update(pcr)
                .chain_update(digest)
                .finalize()
                .to_vec(),
            HashAlg::Sha384 => Sha384::new()
                .chain_update(pcr)
                .chain_update(digest)
                .finalize()
                .to_vec(),
        }
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a log could not be replayed for a bank.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The Spec ID event does not list the bank.
    #[error("the event log has no {alg} bank (its Spec ID event lists {listed})")]
    NoBank {
        /// The bank asked for.
        alg: HashAlg,
        /// The banks the log has, by name.
        listed: String,
    },
    /// The Spec ID event gives the bank a size the algorithm does not have.
    #[error("the event log's Spec ID event gives {alg} a digest size of {size}, not {expected}")]
    BankSize {
        /// The bank.
        alg: HashAlg,
        /// The size the log claims.
        size: u16,
        /// The algorithm's real size.
        expected: usize,
    },
    /// An extending event has no digest (or a wrong-sized one) for the bank.
    #[error("event {number} at offset {offset:#x} ({event_type}, PCR {pcr}) has no {alg} digest of {len} bytes")]
    MissingDigest {
        /// The event number.
        number: usize,
        /// Its offset in the log.
        offset: usize,
        /// Its type.
        event_type: EventType,
        /// The PCR it extends.
        pcr: u32,
        /// The bank.
        alg: HashAlg,
        /// The digest length the bank needs.
        len: usize,
    },
    /// An event extends a PCR a PC Client TPM does not have.
    #[error("event {number} at offset {offset:#x} ({event_type}) extends PCR {pcr}, which a PC Client TPM does not have")]
    NoSuchPcr {
        /// The event number.
        number: usize,
        /// Its offset in the log.
        offset: usize,
        /// Its type.
        event_type: EventType,
        /// The PCR index it names.
        pcr: u32,
    },
    /// A StartupLocality event came after PCR 0 had been extended; PCR 0's
    /// initial value would then be ambiguous.
    #[error("event {number} at offset {offset:#x}: StartupLocality event after PCR 0 was already extended")]
    LateStartupLocality {
        /// The event number.
        number: usize,
        /// Its offset in the log.
        offset: usize,
    },
}

/// Replays `log` into the `alg` bank: PCRs start at zero (PCR 0 at the
/// locality of a `StartupLocality` event, if present), and every event
/// other than `EV_NO_ACTION` extends its PCR with its `alg` digest.
///
/// Only PCRs the log touches are in the map.
pub fn replay(log: &EventLog, alg: HashAlg) -> Result<BTreeMap<u32, Vec<u8>>, ReplayError> {
    let len = alg.digest_len();
    match log.spec.digest_size(alg.alg_id()) {
        None => {
            let listed: Vec<String> = log
                .spec
                .algorithms
                .iter()
                .map(|(a, _)| AlgDisplay(*a).to_string())
                .collect();
            return Err(ReplayError::NoBank {
                alg,
                listed: listed.join(", "),
            });
        }
        Some(size) if usize::from(size) != len => {
            return Err(ReplayError::BankSize {
                alg,
                size,
                expected: len,
            })
        }
        Some(_) => {}
    }

    let mut pcrs: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    // Event 0 is the Spec ID event itself (EV_NO_ACTION); skip it so its
    // SHA-1-layout digest is never mistaken for a measurement.
    for event in log.events.iter().skip(1) {
        if event.event_type.0 == EV_NO_ACTION {
            if let Some(locality) = event.startup_locality() {
                if pcrs.contains_key(&0) {
                    return Err(ReplayError::LateStartupLocality {
                        number: event.number,
                        offset: event.offset,
                    });
                }
                let mut initial = vec![0u8; len];
                if let Some(last) = initial.last_mut() {
                    *last = locality;
                }
                pcrs.insert(0, initial);
            }
            continue;
        }
        if usize::try_from(event.pcr).map_or(true, |p| p >= crate::PCR_COUNT) {
            return Err(ReplayError::NoSuchPcr {
                number: event.number,
                offset: event.offset,
                event_type: event.event_type,
                pcr: event.pcr,
            });
        }
        let digest = event
            .digest(alg.alg_id())
            .filter(|d| d.len() == len)
            .ok_or(ReplayError::MissingDigest {
                number: event.number,
                offset: event.offset,
                event_type: event.event_type,
                pcr: event.pcr,
                alg,
                len,
            })?;
        let pcr = pcrs.entry(event.pcr).or_insert_with(|| vec![0u8; len]);
        *pcr = alg.extend(pcr, digest);
    }
    Ok(pcrs)
}

/// One event that extended a mismatching PCR, as [`Mismatch`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtendingEvent {
    /// The event number.
    pub number: usize,
    /// Its type.
    pub event_type: EventType,
    /// The bank compared.
    pub alg: HashAlg,
    /// Its digest in that bank, lowercase hex (empty if it had none).
    pub digest: String,
}

impl fmt::Display for ExtendingEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {}", self.number, self.event_type)?;
        if self.digest.is_empty() {
            write!(f, " (no {} digest)", self.alg)?;
        } else {
            write!(f, " {} {}", self.alg, self.digest)?;
        }
        Ok(())
    }
}

/// A PCR whose replayed value differs from the quoted one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The PCR index.
    pub pcr: u32,
    /// The bank compared.
    pub alg: HashAlg,
    /// What the log replays to, lowercase hex.
    pub replayed: String,
    /// What the TPM quoted, lowercase hex; `None` if the quote lacks it.
    pub quoted: Option<String>,
    /// Every event that extended this PCR, in log order.
    pub events: Vec<ExtendingEvent>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PCR {}: the event log replays to {} {}, ",
            self.pcr, self.alg, self.replayed
        )?;
        match &self.quoted {
            Some(q) => write!(f, "the TPM quoted {q}")?,
            None => write!(f, "the TPM quote does not include it")?,
        }
        if self.events.is_empty() {
            return write!(f, "; no event in the log extends PCR {}", self.pcr);
        }
        write!(f, "; events extending PCR {}: ", self.pcr)?;
        for (i, e) in self.events.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Compares `replayed` (from [`replay`] of `log` in bank `alg`) with
/// `quoted` for each PCR in `pcrs`, and explains every difference.
///
/// Takes the log too (beyond the replayed map) so that each [`Mismatch`] can
/// list the events that extended the PCR — the part a person acts on. A PCR
/// the log never touches replays as all zeros; note that PCRs 17–22 reset to
/// all ones, so they belong in no comparison against a firmware log.
pub fn compare(
    log: &EventLog,
    alg: HashAlg,
    replayed: &BTreeMap<u32, Vec<u8>>,
    quoted: &BTreeMap<u32, Vec<u8>>,
    pcrs: &[u32],
) -> Vec<Mismatch> {
    let zeros = vec![0u8; alg.digest_len()];
    let mut out = Vec::new();
    for &pcr in pcrs {
        let expected = replayed.get(&pcr).unwrap_or(&zeros);
        let got = quoted.get(&pcr);
        if got == Some(expected) {
            continue;
        }
        let events = log
            .events
            .iter()
            .skip(1)
            .filter(|e| e.pcr == pcr && e.event_type.0 != EV_NO_ACTION)
            .map(|e| ExtendingEvent {
                number: e.number,
                event_type: e.event_type,
                alg,
                digest: e.digest(alg.alg_id()).map(hex::encode).unwrap_or_default(),
            })
            .collect();
        out.push(Mismatch {
            pcr,
            alg,
            replayed: hex::encode(expected),
            quoted: got.map(hex::encode),
            events,
        });
    }
    out
}

/// Serializes `log` back to the crypto-agile byte format [`parse`] reads
/// (event 0 in the SHA-1 layout, every other event as `TCG_PCR_EVENT2`).
/// `encode(&parse(b)?)` gives back `b` without its zero padding.
///
/// Tools and tests use it to build logs that differ from a real one in a
/// known way (an edited event, a Secure Boot variable changed, an extra
/// event) — after editing `data`, recompute the digests with
/// [`HashAlg::digest`] when the event's digest is the hash of its data.
pub fn encode(log: &EventLog) -> Vec<u8> {
    let mut out = Vec::new();
    for event in &log.events {
        out.extend_from_slice(&event.pcr.to_le_bytes());
        out.extend_from_slice(&event.event_type.0.to_le_bytes());
        if event.number == 0 {
            let mut digest = [0u8; 20];
            if let Some((_, d)) = event.digests.first() {
                let n = d.len().min(20);
                digest[..n].copy_from_slice(&d[..n]);
            }
            out.extend_from_slice(&digest);
        } else {
            let count = u32::try_from(event.digests.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_le_bytes());
            for (alg, digest) in &event.digests {
                out.extend_from_slice(&alg.to_le_bytes());
                out.extend_from_slice(digest);
            }
        }
        let size = u32::try_from(event.data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&event.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a crypto-agile log with a sha256-only Spec ID event.
    fn spec_id_event(algs: &[(u16, u16)]) -> Vec<u8> {
        let mut data = SPEC_ID_SIGNATURE.to_vec();
        data.extend_from_slice(&0u32.to_le_bytes());
        data.extend_from_slice(&[0, 2, 0, 2]);
        data.extend_from_slice(&u32::try_from(algs.len()).unwrap().to_le_bytes());
        for (a, s) in algs {
            data.extend_from_slice(&a.to_le_bytes());
            data.extend_from_slice(&s.to_le_bytes());
        }
        data.push(0);
        let mut out = Vec::new();
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        out.extend_from_slice(&[0u8; 20]);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&data);
        out
    }

    fn event2(pcr: u32, ty: u32, digests: &[(u16, &[u8])], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&pcr.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&u32::try_from(digests.len()).unwrap().to_le_bytes());
        for (a, d) in digests {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(d);
        }
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    fn sha256(b: &[u8]) -> Vec<u8> {
        Sha256::digest(b).to_vec()
    }

    #[test]
    fn startup_locality_sets_pcr0_initial_value() {
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        let mut loc = STARTUP_LOCALITY_SIGNATURE.to_vec();
        loc.push(3);
        log.extend(event2(0, EV_NO_ACTION, &[(TPM_ALG_SHA256, &[0; 32])], &loc));
        let d = sha256(b"crtm");
        log.extend(event2(0, 0x8, &[(TPM_ALG_SHA256, &d)], b"v1"));
        let parsed = parse(&log).unwrap();
        assert_eq!(parsed.events[1].startup_locality(), Some(3));
        let pcrs = replay(&parsed, HashAlg::Sha256).unwrap();
        let mut initial = vec![0u8; 32];
        initial[31] = 3;
        let want = sha256(&[initial, d].concat());
        assert_eq!(pcrs[&0], want);
        assert_eq!(pcrs.len(), 1);
    }

    #[test]
    fn late_startup_locality_is_an_error() {
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        log.extend(event2(0, 0x8, &[(TPM_ALG_SHA256, &[1; 32])], b""));
        let mut loc = STARTUP_LOCALITY_SIGNATURE.to_vec();
        loc.push(3);
        log.extend(event2(0, EV_NO_ACTION, &[(TPM_ALG_SHA256, &[0; 32])], &loc));
        let parsed = parse(&log).unwrap();
        assert!(matches!(
            replay(&parsed, HashAlg::Sha256),
            Err(ReplayError::LateStartupLocality { number: 2, .. })
        ));
    }

    #[test]
    fn sha384_bank_replays_and_missing_digest_names_the_event() {
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32), (TPM_ALG_SHA384, 48)]);
        let d256 = sha256(b"a");
        let d384 = Sha384::digest(b"a").to_vec();
        log.extend(event2(
            4,
            0x8000_0003,
            &[(TPM_ALG_SHA256, &d256), (TPM_ALG_SHA384, &d384)],
            b"",
        ));
        log.extend(event2(5, 0x8000_0007, &[(TPM_ALG_SHA256, &d256)], b"x"));
        let parsed = parse(&log).unwrap();
        let err = replay(&parsed, HashAlg::Sha384).unwrap_err();
        assert!(matches!(
            err,
            ReplayError::MissingDigest {
                number: 2,
                pcr: 5,
                ..
            }
        ));
        assert!(err.to_string().contains("event 2 at offset"), "{err}");
        assert!(err.to_string().contains("EV_EFI_ACTION"), "{err}");

        // Only the first two events: sha384 replays.
        let first_end = parsed.events[2].offset;
        let parsed = parse(&log[..first_end]).unwrap();
        let pcrs = replay(&parsed, HashAlg::Sha384).unwrap();
        let want = Sha384::new()
            .chain_update([0u8; 48])
            .chain_update(&d384)
            .finalize()
            .to_vec();
        assert_eq!(pcrs[&4], want);
    }

    #[test]
    fn missing_bank_is_an_error() {
        let log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        let parsed = parse(&log).unwrap();
        let err = replay(&parsed, HashAlg::Sha384).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the event log has no sha384 bank (its Spec ID event lists sha256)"
        );
    }

    #[test]
    fn legacy_log_is_rejected_clearly() {
        // A TPM 1.2-style first event: EV_S_CRTM_VERSION with a SHA-1 digest.
        let mut log = Vec::new();
        log.extend_from_slice(&0u32.to_le_bytes());
        log.extend_from_slice(&0x8u32.to_le_bytes());
        log.extend_from_slice(&[7u8; 20]);
        log.extend_from_slice(&2u32.to_le_bytes());
        log.extend_from_slice(&[0, 0]);
        let err = parse(&log).unwrap_err();
        assert_eq!(err.problem, Problem::NotCryptoAgile);
        assert_eq!((err.event, err.offset), (0, 0));
    }

    #[test]
    fn hostile_counts_and_algorithms_are_rejected() {
        // Digest count far beyond the cap.
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        let off = log.len();
        let mut ev = event2(0, 1, &[(TPM_ALG_SHA256, &[0; 32])], b"");
        ev[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        log.extend(ev);
        let err = parse(&log).unwrap_err();
        assert_eq!(err.problem, Problem::DigestCount(u32::MAX));
        assert_eq!((err.event, err.offset), (1, off));

        // A digest algorithm the Spec ID event did not announce.
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        log.extend(event2(0, 1, &[(TPM_ALG_SHA1, &[0; 20])], b""));
        assert_eq!(
            parse(&log).unwrap_err().problem,
            Problem::UnknownAlgorithm(TPM_ALG_SHA1)
        );

        // Spec ID event with absurd digest size / duplicate algorithm.
        assert_eq!(
            parse(&spec_id_event(&[(TPM_ALG_SHA256, 0xFFFF)]))
                .unwrap_err()
                .problem,
            Problem::DigestSize {
                alg: TPM_ALG_SHA256,
                size: 0xFFFF
            }
        );
        assert_eq!(
            parse(&spec_id_event(&[
                (TPM_ALG_SHA256, 32),
                (TPM_ALG_SHA256, 32)
            ]))
            .unwrap_err()
            .problem,
            Problem::DuplicateAlgorithm(TPM_ALG_SHA256)
        );
        assert_eq!(
            parse(&spec_id_event(&[])).unwrap_err().problem,
            Problem::AlgorithmCount(0)
        );
    }

    #[test]
    fn zero_padding_is_tolerated_but_a_short_zero_tail_is_truncation() {
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        log.extend(event2(0, 1, &[(TPM_ALG_SHA256, &[9; 32])], b""));
        let mut padded = log.clone();
        padded.extend([0u8; 4096]);
        assert_eq!(parse(&padded).unwrap(), parse(&log).unwrap());

        let mut short = log.clone();
        short.extend([0u8; 4]);
        let err = parse(&short).unwrap_err();
        assert_eq!((err.event, err.offset), (2, log.len()));
        assert!(matches!(err.problem, Problem::Truncated { .. }));
    }

    #[test]
    fn pcr_beyond_23_is_a_replay_error() {
        let mut log = spec_id_event(&[(TPM_ALG_SHA256, 32)]);
        log.extend(event2(1000, 1, &[(TPM_ALG_SHA256, &[9; 32])], b""));
        let parsed = parse(&log).unwrap();
        assert!(matches!(
            replay(&parsed, HashAlg::Sha256),
            Err(ReplayError::NoSuchPcr { pcr: 1000, .. })
        ));
    }

    #[test]
    fn event_type_names() {
        assert_eq!(
            EventType(0x8000_00E0).to_string(),
            "EV_EFI_VARIABLE_AUTHORITY"
        );
        assert_eq!(EventType(0xA).to_string(), "EV_PLATFORM_CONFIG_FLAGS");
        assert_eq!(EventType(0x1234).to_string(), "EV_UNKNOWN(0x1234)");
    }
}
