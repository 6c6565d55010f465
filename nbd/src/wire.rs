//! The NBD wire format: magic numbers, option and command codes, request
//! encoding, and the pure parsers for everything a server sends during the
//! handshake (option replies, `NBD_REP_INFO`, `NBD_REP_META_CONTEXT`, the
//! `NBD_OPT_EXPORT_NAME` reply).
//!
//! Every parser takes `&[u8]`, checks every length before it reads, and
//! returns a [`WireError`] instead of panicking: the bytes come from the
//! network and these functions are fuzzed. Nothing here does I/O.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second magic (not supported: no named exports).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply (fixed newstyle).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag answering [`FLAG_FIXED_NEWSTYLE`].
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag answering [`FLAG_NO_ZEROES`].
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options (handshake phase).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during the handshake.
pub const OPT_ABORT: u32 = 2;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Choose an export, with information replies, and enter transmission.
pub const OPT_GO: u32 = 7;
/// Ask for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Select metadata contexts for BLOCK_STATUS.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success, no more replies to this option.
pub const REP_ACK: u32 = 1;
/// Option reply: information about the export (`NBD_OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Option reply: one selected metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply.
pub const REP_ERR: u32 = 1 << 31;
/// The server does not know the option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// The server requires TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag: force unit access (persist before replying).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): allocate, do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (WRITE_ZEROES): fail fast with ENOTSUP unless zeroing is cheap.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk types.
pub const CHUNK_NONE: u16 = 0;
/// Data at an offset.
pub const CHUNK_OFFSET_DATA: u16 = 1;
/// A run of zeroes at an offset.
pub const CHUNK_OFFSET_HOLE: u16 = 2;
/// Block status descriptors of one metadata context.
pub const CHUNK_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const CHUNK_ERR: u16 = 1 << 15;
/// Error for the whole request.
pub const CHUNK_ERROR: u16 = CHUNK_ERR | 1;
/// Error at an offset inside the request.
pub const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERR | 2;

/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Length of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header (magic included).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header (magic included).
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;

/// Longest string the protocol allows (export names, error messages).
pub const MAX_STRING: usize = 4096;

/// What was wrong with bytes from the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn bad(reason: impl Into<String>) -> WireError {
    WireError(reason.into())
}

/// Transmission commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_DISC`
    Disconnect,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`
    BlockStatus,
}

impl Command {
    /// The command's code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disconnect => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
        })
    }
}

/// An error code from the server, named as the protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u32);

impl Errno {
    /// `EPERM`: write or trim on a read-only export.
    pub const EPERM: Errno = Errno(1);
    /// `EIO`: the backing store failed.
    pub const EIO: Errno = Errno(5);
    /// `ENOMEM`
    pub const ENOMEM: Errno = Errno(12);
    /// `EINVAL`: bad request (flags, alignment, range).
    pub const EINVAL: Errno = Errno(22);
    /// `ENOSPC`: out of space, or a write past the end.
    pub const ENOSPC: Errno = Errno(28);
    /// `EOVERFLOW`
    pub const EOVERFLOW: Errno = Errno(75);
    /// `ENOTSUP`: e.g. FAST_ZERO that would be slow.
    pub const ENOTSUP: Errno = Errno(95);
    /// `ESHUTDOWN`: the server is going away.
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The symbolic name, if the protocol defines this value.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => return None,
        })
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "error {}", self.0),
        }
    }
}

/// The export's transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    fn has(self, bit: u16) -> bool {
        self.0 & (1 << bit) != 0
    }
    /// `NBD_FLAG_READ_ONLY`
    pub fn read_only(self) -> bool {
        self.has(1)
    }
    /// `NBD_FLAG_SEND_FLUSH`
    pub fn can_flush(self) -> bool {
        self.has(2)
    }
    /// `NBD_FLAG_SEND_FUA`
    pub fn can_fua(self) -> bool {
        self.has(3)
    }
    /// `NBD_FLAG_SEND_TRIM`
    pub fn can_trim(self) -> bool {
        self.has(5)
    }
    /// `NBD_FLAG_SEND_WRITE_ZEROES`
    pub fn can_write_zeroes(self) -> bool {
        self.has(6)
    }
    /// `NBD_FLAG_CAN_MULTI_CONN`: flushes are visible across connections.
    pub fn can_multi_conn(self) -> bool {
        self.has(8)
    }
    /// `NBD_FLAG_SEND_FAST_ZERO`
    pub fn can_fast_zero(self) -> bool {
        self.has(11)
    }
}

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`), or the
/// protocol's defaults when it sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every request's offset and length are multiples of this.
    pub minimum: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred: u32,
    /// Largest READ or WRITE payload.
    pub maximum: u32,
    /// Whether the server sent these (false: protocol defaults).
    pub advertised: bool,
}

impl Default for BlockSizes {
    /// Without `NBD_INFO_BLOCK_SIZE` the protocol says: any alignment, and
    /// payloads of at most 32 MiB.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
            advertised: false,
        }
    }
}

/// One run of `base:allocation` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Absolute offset in the export.
    pub offset: u64,
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Raw status flags ([`STATE_HOLE`], [`STATE_ZERO`]).
    pub flags: u32,
}

impl Extent {
    /// Not allocated on the server.
    pub fn is_hole(&self) -> bool {
        self.flags & STATE_HOLE != 0
    }
    /// Reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }
}

/// A bounds-checked big-endian reader over a byte slice.
pub(crate) struct Bytes<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Bytes { buf, what }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(bad(format!(
                "{} truncated: needed {n} more bytes, {} left",
                self.what,
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Encodes a transmission request header.
pub fn encode_request(
    flags: u16,
    command: Command,
    handle: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&command.code().to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&length.to_be_bytes());
    out
}

/// Encodes an option request (`IHAVEOPT`, option, length, data).
pub fn encode_option(option: u32, data: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = u32::try_from(data.len()).map_err(|_| bad("option data longer than 4 GiB"))?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

/// Appends a protocol string with its 32-bit length prefix.
pub fn put_string(out: &mut Vec<u8>, s: &str) -> Result<(), WireError> {
    let len = u32::try_from(s.len())
        .ok()
        .filter(|&n| n as usize <= MAX_STRING);
    let Some(len) = len else {
        return Err(bad(format!(
            "string of {} bytes exceeds the protocol's {MAX_STRING}",
            s.len()
        )));
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// An option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Payload length that follows.
    pub length: u32,
}

/// Parses a 20-byte option reply header.
pub fn parse_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, WireError> {
    let mut b = Bytes::new(buf, "option reply header");
    let magic = b.u64()?;
    if magic != OPT_REPLY_MAGIC {
        return Err(bad(format!("bad option reply magic {magic:#018x}")));
    }
    Ok(OptionReplyHeader {
        option: b.u32()?,
        reply: b.u32()?,
        length: b.u32()?,
    })
}

/// Name of an option reply type, for messages.
pub fn reply_name(reply: u32) -> String {
    match reply {
        1 => "NBD_REP_ACK".into(),
        2 => "NBD_REP_SERVER".into(),
        3 => "NBD_REP_INFO".into(),
        4 => "NBD_REP_META_CONTEXT".into(),
        x if x == REP_ERR | 1 => "NBD_REP_ERR_UNSUP".into(),
        x if x == REP_ERR | 2 => "NBD_REP_ERR_POLICY".into(),
        x if x == REP_ERR | 3 => "NBD_REP_ERR_INVALID".into(),
        x if x == REP_ERR | 4 => "NBD_REP_ERR_PLATFORM".into(),
        x if x == REP_ERR | 5 => "NBD_REP_ERR_TLS_REQD".into(),
        x if x == REP_ERR | 6 => "NBD_REP_ERR_UNKNOWN (no such export)".into(),
        x if x == REP_ERR | 7 => "NBD_REP_ERR_SHUTDOWN".into(),
        x if x == REP_ERR | 8 => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        x if x == REP_ERR | 9 => "NBD_REP_ERR_TOO_BIG".into(),
        x => format!("option reply {x:#x}"),
    }
}

/// Payload of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_BLOCK_SIZE`, validated.
    BlockSize(BlockSizes),
    /// A type this client does not use (name, description, ...).
    Other(u16),
}

/// Parses and validates an `NBD_REP_INFO` payload.
pub fn parse_info(payload: &[u8]) -> Result<Info, WireError> {
    let mut b = Bytes::new(payload, "NBD_REP_INFO");
    match b.u16()? {
        INFO_EXPORT => {
            let size = b.u64()?;
            let flags = TransmissionFlags(b.u16()?);
            if b.remaining() != 0 {
                return Err(bad("NBD_INFO_EXPORT longer than 12 bytes"));
            }
            Ok(Info::Export { size, flags })
        }
        INFO_BLOCK_SIZE => {
            let minimum = b.u32()?;
            let preferred = b.u32()?;
            let maximum = b.u32()?;
            if b.remaining() != 0 {
                return Err(bad("NBD_INFO_BLOCK_SIZE longer than 14 bytes"));
            }
            validate_block_sizes(minimum, preferred, maximum).map(Info::BlockSize)
        }
        other => Ok(Info::Other(other)),
    }
}

fn validate_block_sizes(
    minimum: u32,
    preferred: u32,
    maximum: u32,
) -> Result<BlockSizes, WireError> {
    let sizes = format!("minimum {minimum}, preferred {preferred}, maximum {maximum}");
    if !minimum.is_power_of_two() || minimum > 64 * 1024 {
        return Err(bad(format!(
            "NBD_INFO_BLOCK_SIZE {sizes}: minimum must be a power of two up to 64 KiB"
        )));
    }
    if !preferred.is_power_of_two() || preferred < minimum {
        return Err(bad(format!(
            "NBD_INFO_BLOCK_SIZE {sizes}: preferred must be a power of two, at least the minimum"
        )));
    }
    if maximum < minimum || (maximum != u32::MAX && maximum % minimum != 0) {
        return Err(bad(format!(
            "NBD_INFO_BLOCK_SIZE {sizes}: maximum must be a multiple of the minimum"
        )));
    }
    Ok(BlockSizes {
        minimum,
        preferred,
        // A server may say "no limit" (u32::MAX); round it to a multiple of
        // the minimum so split requests stay aligned.
        maximum: maximum - maximum % minimum,
        advertised: true,
    })
}

/// Parses an `NBD_REP_META_CONTEXT` payload: (context id, name).
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String), WireError> {
    let mut b = Bytes::new(payload, "NBD_REP_META_CONTEXT");
    let id = b.u32()?;
    let name = b.rest();
    if name.len() > MAX_STRING {
        return Err(bad("NBD_REP_META_CONTEXT name longer than 4096 bytes"));
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| bad("NBD_REP_META_CONTEXT name is not UTF-8"))?
        .to_owned();
    Ok((id, name))
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME` (size, flags; the 124 zero
/// bytes, if any, are read and ignored by the caller).
pub fn parse_export_name_reply(buf: &[u8]) -> Result<(u64, TransmissionFlags), WireError> {
    let mut b = Bytes::new(buf, "NBD_OPT_EXPORT_NAME reply");
    Ok((b.u64()?, TransmissionFlags(b.u16()?)))
}

/// Lossy text of a server-supplied message, capped so a hostile server
/// cannot grow our error messages without bound.
pub fn message_text(bytes: &[u8]) -> String {
    let capped = &bytes[..bytes.len().min(MAX_STRING)];
    String::from_utf8_lossy(capped).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = encode_request(CMD_FLAG_FUA, Command::Write, 0x0102, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 1, 0, 1]);
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 0x0102);
        assert_eq!(u64::from_be_bytes(r[16..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_be_bytes(r[24..28].try_into().unwrap()), 512);
    }

    #[test]
    fn info_block_size_validated() {
        let mut p = vec![0, 3];
        for v in [512u32, 4096, 32 << 20] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            parse_info(&p).unwrap(),
            Info::BlockSize(BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20,
                advertised: true
            })
        );
        // Minimum not a power of two.
        p[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_info(&p).is_err());
        // Truncated.
        assert!(parse_info(&[0, 3, 0]).is_err());
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn info_export_and_unknown() {
        let mut p = vec![0, 0];
        p.extend_from_slice(&(1u64 << 30).to_be_bytes());
        p.extend_from_slice(&0x0105u16.to_be_bytes());
        match parse_info(&p).unwrap() {
            Info::Export { size, flags } => {
                assert_eq!(size, 1 << 30);
                assert!(flags.can_multi_conn() && flags.can_flush() && !flags.read_only());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_info(&[0, 2, b'x']).unwrap(), Info::Other(2));
    }

    #[test]
    fn option_reply_magic_checked() {
        let mut h = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
        let parsed = parse_option_reply_header(&h).unwrap();
        assert_eq!((parsed.option, parsed.reply, parsed.length), (7, 1, 0));
        h[0] ^= 1;
        assert!(parse_option_reply_header(&h)
            .unwrap_err()
            .0
            .contains("magic"));
    }

    #[test]
    fn errno_names() {
        assert_eq!(Errno(5).to_string(), "EIO");
        assert_eq!(Errno(28).to_string(), "ENOSPC");
        assert_eq!(Errno(22).to_string(), "EINVAL");
        assert_eq!(Errno(4242).to_string(), "error 4242");
    }
}
