//! Transmission replies: reading one reply message off a stream, checking it
//! against the request it answers, and assembling structured chunks into a
//! [`Completion`].
//!
//! This owns every check on what a server sends after the handshake: magic,
//! handle, lengths against the request, chunk offsets inside the request, no
//! overlapping chunks, a READ covered completely, the DONE flag. It must never
//! trust a length before checking it against the request (a hostile length
//! must not become a huge allocation) and never panic. The connection's
//! reader thread and the fuzz target drive the same functions.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

use crate::wire::{
    message_text, Bytes, Command, Errno, Extent, WireError, CHUNK_BLOCK_STATUS, CHUNK_ERR,
    CHUNK_ERROR, CHUNK_ERROR_OFFSET, CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE,
    REPLY_FLAG_DONE, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_LEN,
    STRUCTURED_REPLY_MAGIC,
};

/// Most extents accepted in one BLOCK_STATUS chunk (8 MiB of descriptors).
const MAX_EXTENTS_PER_CHUNK: u64 = 1 << 20;
/// Longest error chunk: error, message length, a 64 KiB message, an offset.
const MAX_ERROR_CHUNK: u32 = 4 + 2 + 0xffff + 8;

/// What a reply must be checked against: the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfo {
    /// The command sent.
    pub command: Command,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub length: u32,
}

/// A successful request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// WRITE, FLUSH, TRIM, WRITE_ZEROES.
    Done,
    /// READ: exactly the requested length.
    Data(Vec<u8>),
    /// BLOCK_STATUS: consecutive extents from the request's offset (they may
    /// cover less than requested; never more).
    Extents(Vec<Extent>),
}

/// An error the server reported for one request (the connection goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFailure {
    /// The protocol's error code.
    pub errno: Errno,
    /// The server's message, if any.
    pub message: String,
    /// The offset an `ERROR_OFFSET` chunk named.
    pub offset: Option<u64>,
}

/// A parsed reply header (magic included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply.
    Simple {
        /// 0 or an errno.
        error: u32,
        /// The request's handle.
        handle: u64,
    },
    /// Structured reply chunk.
    Structured {
        /// `NBD_REPLY_FLAG_*`.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's handle.
        handle: u64,
        /// Payload length.
        length: u32,
    },
}

/// Length of the whole header that starts with these four magic bytes.
pub fn reply_header_len(magic: [u8; 4]) -> Result<usize, WireError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        other => Err(WireError(format!("bad reply magic {other:#010x}"))),
    }
}

/// Parses a simple (16-byte) or structured (20-byte) reply header.
pub fn parse_reply_header(buf: &[u8]) -> Result<ReplyHeader, WireError> {
    let mut b = Bytes::new(buf, "reply header");
    match b.u32()? {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: b.u32()?,
            handle: b.u64()?,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Structured {
            flags: b.u16()?,
            kind: b.u16()?,
            handle: b.u64()?,
            length: b.u32()?,
        }),
        other => Err(WireError(format!("bad reply magic {other:#010x}"))),
    }
}

/// A structured chunk's payload, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`
    Data {
        /// Absolute offset.
        offset: u64,
        /// At least one byte.
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    Hole {
        /// Absolute offset.
        offset: u64,
        /// Non-zero.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    BlockStatus {
        /// Metadata context id.
        context: u32,
        /// (length, flags) pairs, at least one.
        descriptors: Vec<(u32, u32)>,
    },
    /// Any error chunk (bit 15 set).
    Error(ServerFailure),
}

/// Parses a structured chunk payload of type `kind`.
pub fn parse_chunk(kind: u16, payload: &[u8]) -> Result<Chunk<'_>, WireError> {
    let mut b = Bytes::new(payload, "structured reply chunk");
    match kind {
        CHUNK_NONE => {
            if !payload.is_empty() {
                return Err(WireError("NBD_REPLY_TYPE_NONE with a payload".into()));
            }
            Ok(Chunk::None)
        }
        CHUNK_OFFSET_DATA => {
            let offset = b.u64()?;
            let data = b.rest();
            if data.is_empty() {
                return Err(WireError("OFFSET_DATA chunk without data".into()));
            }
            Ok(Chunk::Data { offset, data })
        }
        CHUNK_OFFSET_HOLE => {
            let offset = b.u64()?;
            let length = b.u32()?;
            if length == 0 || b.remaining() != 0 {
                return Err(WireError(format!(
                    "OFFSET_HOLE chunk of {} bytes with hole size {length}: must be 12 bytes, size non-zero",
                    payload.len()
                )));
            }
            Ok(Chunk::Hole { offset, length })
        }
        CHUNK_BLOCK_STATUS => {
            let context = b.u32()?;
            let rest = b.rest();
            if rest.is_empty() || rest.len() % 8 != 0 {
                return Err(WireError(format!(
                    "BLOCK_STATUS chunk of {} bytes: must be 4 + a positive multiple of 8",
                    payload.len()
                )));
            }
            let mut d = Bytes::new(rest, "BLOCK_STATUS descriptor");
            let mut descriptors = Vec::with_capacity(rest.len() / 8);
            while d.remaining() > 0 {
                let length = d.u32()?;
                let flags = d.u32()?;
                if length == 0 {
                    return Err(WireError("BLOCK_STATUS descriptor of length 0".into()));
                }
                descriptors.push((length, flags));
            }
            Ok(Chunk::BlockStatus {
                context,
                descriptors,
            })
        }
        k if k & CHUNK_ERR != 0 => {
            let errno = b.u32()?;
            if errno == 0 {
                return Err(WireError("error chunk with error code 0".into()));
            }
            let msg_len = usize::from(b.u16()?);
            let message = message_text(b.take(msg_len)?);
            let offset = match k {
                CHUNK_ERROR_OFFSET => {
                    let offset = b.u64()?;
                    if b.remaining() != 0 {
                        return Err(WireError(
                            "ERROR_OFFSET chunk longer than its fields".into(),
                        ));
                    }
                    Some(offset)
                }
                // ERROR carries nothing after the message; unknown error types
                // may carry fields we do not know, which the spec lets us skip.
                _ => None,
            };
            if k != CHUNK_ERROR && k != CHUNK_ERROR_OFFSET {
                tracing::debug!(
                    kind = k,
                    "unknown error chunk type; treating it as an error"
                );
            }
            Ok(Chunk::Error(ServerFailure {
                errno: Errno(errno),
                message,
                offset,
            }))
        }
        other => Err(WireError(format!("unknown structured reply type {other}"))),
    }
}

/// Checks a chunk header against its request before its payload is read, so
/// a hostile length never becomes an allocation.
pub fn check_chunk_header(info: &RequestInfo, kind: u16, length: u32) -> Result<(), WireError> {
    let (min, max, valid_for) = match kind {
        CHUNK_NONE => (0, 0, None),
        CHUNK_OFFSET_DATA => (9, 8 + u64::from(info.length), Some(Command::Read)),
        CHUNK_OFFSET_HOLE => (12, 12, Some(Command::Read)),
        CHUNK_BLOCK_STATUS => (
            12,
            4 + 8 * u64::from(info.length).clamp(1, MAX_EXTENTS_PER_CHUNK),
            Some(Command::BlockStatus),
        ),
        k if k & CHUNK_ERR != 0 => (6, u64::from(MAX_ERROR_CHUNK), None),
        other => {
            return Err(WireError(format!(
                "unknown structured reply type {other} ({length} bytes)"
            )))
        }
    };
    if let Some(command) = valid_for {
        if info.command != command {
            return Err(WireError(format!(
                "structured reply type {kind} is not valid for {}",
                info.command
            )));
        }
    }
    let length = u64::from(length);
    if length < min || length > max {
        return Err(WireError(format!(
            "structured reply type {kind} with payload length {length} (allowed {min}..={max})"
        )));
    }
    Ok(())
}

/// Why reading a reply failed. Both kinds end the connection.
#[derive(Debug)]
pub enum ReadError {
    /// The stream failed (or ended, as `UnexpectedEof`).
    Io(io::Error),
    /// The server broke the protocol; `handle` is set when the message could
    /// be tied to a request in flight.
    Protocol {
        /// The request concerned, if known.
        handle: Option<u64>,
        /// What was wrong.
        error: WireError,
    },
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn protocol(handle: Option<u64>, reason: impl Into<String>) -> ReadError {
    ReadError::Protocol {
        handle,
        error: WireError(reason.into()),
    }
}

impl ReplyHeader {
    /// The handle of the request this message answers.
    pub fn handle(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Structured { handle, .. } => handle,
        }
    }

    /// The error for a message whose handle is not in flight.
    pub fn not_in_flight(&self) -> ReadError {
        let what = match self {
            ReplyHeader::Simple { .. } => "simple reply",
            ReplyHeader::Structured { .. } => "structured reply chunk",
        };
        protocol(
            None,
            format!(
                "{what} for handle {:#x}, which is not in flight",
                self.handle()
            ),
        )
    }
}

/// Reads the rest of a reply header whose 4 magic bytes were already read.
/// The message's payload is left on the stream for [`ReplyState::receive`].
pub fn read_header<R: Read>(r: &mut R, magic: [u8; 4]) -> Result<ReplyHeader, ReadError> {
    let len = reply_header_len(magic).map_err(|error| ReadError::Protocol {
        handle: None,
        error,
    })?;
    let mut header = [0u8; STRUCTURED_REPLY_LEN];
    header[..4].copy_from_slice(&magic);
    let header = &mut header[..len];
    r.read_exact(&mut header[4..])?;
    parse_reply_header(header).map_err(|error| ReadError::Protocol {
        handle: None,
        error,
    })
}

/// The reply to one request, as its messages arrive.
///
/// A READ's data is received straight from the stream into one buffer —
/// a caller's reused one ([`ReplyState::with_buffer`]) or, failing that,
/// one allocated at the first content chunk — so a reply costs no zero-fill
/// of fresh memory and no copy between buffers. A reused buffer is never
/// cleared: every byte of it is overwritten by data, zeroed by a hole, or
/// the reply is refused as incomplete.
#[derive(Debug, Default)]
pub struct ReplyState {
    data: Option<Vec<u8>>,
    /// Where in `data` the READ's first byte goes (a caller's aligned
    /// region inside a larger allocation); `None`: at 0, and `data` is cut
    /// to exactly the data.
    start: Option<usize>,
    /// Byte ranges of the request already covered by content or error
    /// chunks, relative to its offset: start → end.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    extents: Option<Vec<Extent>>,
    error: Option<ServerFailure>,
    chunks: u64,
}

impl ReplyState {
    /// A reply whose READ data lands in `buf` (resized to the request's
    /// length; its contents are not cleared).
    pub fn with_buffer(buf: Vec<u8>) -> ReplyState {
        ReplyState {
            data: Some(buf),
            ..ReplyState::default()
        }
    }

    /// A reply whose READ data lands in `buf[start..start + length]`: `buf`
    /// is only grown when shorter than that, never shrunk or moved
    /// otherwise, so a caller's alignment of `start` is kept.
    pub fn with_buffer_at(buf: Vec<u8>, start: usize) -> ReplyState {
        ReplyState {
            data: Some(buf),
            start: Some(start),
            ..ReplyState::default()
        }
    }

    /// The READ buffer's `len` bytes from `start`. A buffer too short for
    /// them is grown (zero-filling the new tail once); a fresh one comes
    /// zeroed from the allocator; a longer one is cut to `len` in the plain
    /// case and left as it is with a `start`.
    fn buffer(&mut self, len: usize) -> &mut [u8] {
        let start = self.start.unwrap_or(0);
        let end = start.saturating_add(len);
        let buf = self.data.get_or_insert_with(Vec::new);
        if buf.capacity() == 0 {
            *buf = vec![0u8; end];
        } else if buf.len() < end {
            buf.resize(end, 0);
        } else if self.start.is_none() && buf.len() != len {
            buf.truncate(len);
        }
        buf.get_mut(start..end).unwrap_or_default()
    }

    /// Marks `[start, end)` (relative) covered; errors on overlap.
    fn cover(&mut self, start: u64, end: u64) -> Result<(), WireError> {
        let overlaps_before = self
            .covered
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &e)| e > start);
        let overlaps_after = self.covered.range(start..end).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(WireError(format!(
                "chunk at request offset {start}..{end} overlaps an earlier chunk"
            )));
        }
        self.covered.insert(start, end);
        self.covered_bytes += end - start;
        Ok(())
    }

    /// Relative range of `[offset, offset + len)` if it lies inside `info`.
    fn inside(
        info: &RequestInfo,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<(u64, u64), WireError> {
        let start = offset.checked_sub(info.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= u64::from(info.length) => Ok((s, e)),
            _ => Err(WireError(format!(
                "{what} at offset {offset} length {len} lies outside the request"
            ))),
        }
    }

    /// The part `[s, e)` (relative, already checked inside the request and
    /// not overlapping) of the READ buffer.
    fn slice(&mut self, info: &RequestInfo, s: u64, e: u64) -> Result<&mut [u8], WireError> {
        let range = usize::try_from(s).unwrap_or(usize::MAX)..usize::try_from(e).unwrap_or(0);
        self.buffer(info.length as usize)
            .get_mut(range)
            .ok_or_else(|| WireError(format!("chunk at request offset {s}..{e} out of range")))
    }

    /// Reads the payload of the message whose header `read_header` returned
    /// — `info` is the request under its handle — and applies it.
    /// `Ok(Some(..))` when the reply is complete. Every length is checked
    /// against the request before anything is read or allocated for it.
    pub fn receive<R: Read>(
        &mut self,
        r: &mut R,
        header: ReplyHeader,
        info: &RequestInfo,
        structured: bool,
        meta_context: Option<u32>,
    ) -> Result<Option<Result<Completion, ServerFailure>>, ReadError> {
        let handle = header.handle();
        let fail = |error: WireError| ReadError::Protocol {
            handle: Some(handle),
            error,
        };
        match header {
            ReplyHeader::Simple { error, .. } => {
                if self.chunks > 0 {
                    return Err(protocol(
                        Some(handle),
                        "simple reply after structured chunks for the same request",
                    ));
                }
                if error != 0 {
                    return Ok(Some(Err(ServerFailure {
                        errno: Errno(error),
                        message: String::new(),
                        offset: None,
                    })));
                }
                match info.command {
                    Command::Read => {
                        if structured {
                            return Err(protocol(
                                Some(handle),
                                "simple reply to READ although structured replies were negotiated",
                            ));
                        }
                        r.read_exact(self.buffer(info.length as usize))?;
                        Ok(Some(Ok(Completion::Data(
                            self.data.take().unwrap_or_default(),
                        ))))
                    }
                    Command::BlockStatus => {
                        Err(protocol(Some(handle), "simple reply to BLOCK_STATUS"))
                    }
                    _ => Ok(Some(Ok(Completion::Done))),
                }
            }
            ReplyHeader::Structured {
                flags,
                kind,
                length,
                ..
            } => {
                if !structured {
                    return Err(protocol(
                        Some(handle),
                        "structured reply chunk although structured replies were not negotiated",
                    ));
                }
                check_chunk_header(info, kind, length).map_err(fail)?;
                self.chunks += 1;
                if kind == CHUNK_OFFSET_DATA {
                    // The bulk of a restore: the offset first, checked, then
                    // the data straight into its place in the buffer.
                    let mut offset = [0u8; 8];
                    r.read_exact(&mut offset)?;
                    let offset = u64::from_be_bytes(offset);
                    let len = u64::from(length).saturating_sub(8);
                    if len == 0 {
                        return Err(fail(WireError("OFFSET_DATA chunk without data".into())));
                    }
                    let (s, e) = Self::inside(info, offset, len, "OFFSET_DATA").map_err(fail)?;
                    self.cover(s, e).map_err(fail)?;
                    r.read_exact(self.slice(info, s, e).map_err(fail)?)?;
                } else {
                    // Small (checked above): NONE, HOLE, BLOCK_STATUS, errors.
                    let mut payload = vec![0u8; length as usize];
                    r.read_exact(&mut payload)?;
                    self.apply_chunk(info, flags, kind, &payload, meta_context)
                        .map_err(fail)?;
                }
                if flags & REPLY_FLAG_DONE == 0 {
                    return Ok(None);
                }
                self.finish(info).map(Some).map_err(fail)
            }
        }
    }

    /// Applies one structured chunk whose payload is in memory.
    fn apply_chunk(
        &mut self,
        info: &RequestInfo,
        flags: u16,
        kind: u16,
        payload: &[u8],
        meta_context: Option<u32>,
    ) -> Result<(), WireError> {
        match parse_chunk(kind, payload)? {
            Chunk::None => {
                if flags & REPLY_FLAG_DONE == 0 {
                    return Err(WireError(
                        "NBD_REPLY_TYPE_NONE without the DONE flag".into(),
                    ));
                }
            }
            Chunk::Data { offset, data } => {
                let (s, e) = Self::inside(info, offset, data.len() as u64, "OFFSET_DATA")?;
                self.cover(s, e)?;
                self.slice(info, s, e)?.copy_from_slice(data);
            }
            Chunk::Hole { offset, length } => {
                let (s, e) = Self::inside(info, offset, u64::from(length), "OFFSET_HOLE")?;
                self.cover(s, e)?;
                // A reused buffer holds an earlier reply's bytes.
                self.slice(info, s, e)?.fill(0);
            }
            Chunk::BlockStatus {
                context,
                descriptors,
            } => {
                if Some(context) != meta_context {
                    return Err(WireError(format!(
                        "BLOCK_STATUS for metadata context {context}, which was not negotiated"
                    )));
                }
                if self.extents.is_some() {
                    return Err(WireError(
                        "second BLOCK_STATUS chunk for the same context".into(),
                    ));
                }
                let end = info.offset + u64::from(info.length);
                let mut at = info.offset;
                let mut extents = Vec::with_capacity(descriptors.len());
                for (length, flags) in descriptors {
                    if at >= end {
                        return Err(WireError(format!(
                            "BLOCK_STATUS describes more than the {} bytes requested",
                            info.length
                        )));
                    }
                    // Some servers round the last extent up to their own
                    // granularity; keep only what was asked.
                    let length = u64::from(length).min(end - at);
                    extents.push(Extent {
                        offset: at,
                        length,
                        flags,
                    });
                    at += length;
                }
                self.extents = Some(extents);
            }
            Chunk::Error(failure) => {
                if let Some(offset) = failure.offset {
                    Self::inside(info, offset, 0, "ERROR_OFFSET")?;
                    if offset >= info.offset + u64::from(info.length) {
                        return Err(WireError(format!(
                            "ERROR_OFFSET {offset} lies outside the request"
                        )));
                    }
                }
                if self.error.is_none() {
                    self.error = Some(failure);
                }
            }
        }
        Ok(())
    }

    fn finish(
        &mut self,
        info: &RequestInfo,
    ) -> Result<Result<Completion, ServerFailure>, WireError> {
        if let Some(failure) = self.error.take() {
            return Ok(Err(failure));
        }
        match info.command {
            Command::Read => {
                if self.covered_bytes != u64::from(info.length) {
                    return Err(WireError(format!(
                        "READ reply ended after covering {} of {} bytes",
                        self.covered_bytes, info.length
                    )));
                }
                Ok(Ok(Completion::Data(self.data.take().unwrap_or_default())))
            }
            Command::BlockStatus => match self.extents.take() {
                Some(extents) => Ok(Ok(Completion::Extents(extents))),
                None => Err(WireError("BLOCK_STATUS reply ended without extents".into())),
            },
            _ => Ok(Ok(Completion::Done)),
        }
    }
}

/// One finished request of [`decode_replies`]: its handle and result.
pub type Decoded = (u64, Result<Completion, ServerFailure>);

/// Decodes a captured reply stream against requests in flight (handle `i + 1`
/// is `requests[i]`), with the connection's own code. For the fuzz target and
/// tests: returns each finished request's handle and result, or the first
/// error that would have closed the connection. Every READ receives into a
/// reused buffer (of the wrong length, full of stale bytes), as the client's
/// reads do, so a byte the reply did not cover would show.
pub fn decode_replies(
    stream: &[u8],
    requests: &[RequestInfo],
    structured: bool,
    meta_context: Option<u32>,
) -> Result<Vec<Decoded>, String> {
    let mut inflight: HashMap<u64, (RequestInfo, ReplyState)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let stale = vec![0xa5u8; (r.length as usize / 2).min(1 << 20)];
            (i as u64 + 1, (*r, ReplyState::with_buffer(stale)))
        })
        .collect();
    let mut cursor = stream;
    let mut done = Vec::new();
    while !cursor.is_empty() {
        let mut magic = [0u8; 4];
        cursor.read_exact(&mut magic).map_err(|e| e.to_string())?;
        let decoded = read_header(&mut cursor, magic).and_then(|header| {
            let Some((info, state)) = inflight.get_mut(&header.handle()) else {
                return Err(header.not_in_flight());
            };
            let info = *info;
            Ok((
                header.handle(),
                state.receive(&mut cursor, header, &info, structured, meta_context)?,
            ))
        });
        match decoded {
            Ok((_, None)) => {}
            Ok((handle, Some(result))) => {
                inflight.remove(&handle);
                done.push((handle, result));
            }
            Err(ReadError::Io(e)) => return Err(e.to_string()),
            Err(ReadError::Protocol { error, .. }) => return Err(error.0),
        }
    }
    Ok(done)
}

/// The fuzz target's body, here so `nbd/fuzz/fuzz_targets/reply.rs` and the
/// corpus replay test (`tests/fuzz_corpus.rs`) run exactly the same code.
/// Input: one mode byte (bit 0: structured replies negotiated, bit 1: the
/// `base:allocation` context is id 1), then a reply stream answering six
/// requests in flight (handles 1 to 6). The same bytes also go through the
/// handshake parsers. True when the stream decoded without a fatal error.
#[doc(hidden)]
pub fn fuzz_reply(data: &[u8]) -> bool {
    use crate::wire;
    let Some((&mode, stream)) = data.split_first() else {
        return false;
    };
    let _ = wire::parse_option_reply_header(stream);
    let _ = wire::parse_info(stream);
    let _ = wire::parse_meta_context(stream);
    let _ = wire::parse_export_name_reply(stream);
    if let Some((kind, payload)) = stream.split_first_chunk::<2>() {
        let _ = parse_chunk(u16::from_be_bytes(*kind), payload);
    }
    let requests = [
        RequestInfo {
            command: Command::Read,
            offset: 0,
            length: 4096,
        },
        RequestInfo {
            command: Command::Write,
            offset: 4096,
            length: 512,
        },
        RequestInfo {
            command: Command::Flush,
            offset: 0,
            length: 0,
        },
        RequestInfo {
            command: Command::BlockStatus,
            offset: 0,
            length: 1 << 20,
        },
        RequestInfo {
            command: Command::Read,
            offset: 1 << 20,
            length: 65536,
        },
        RequestInfo {
            command: Command::Trim,
            offset: 8192,
            length: 4096,
        },
    ];
    let structured = mode & 1 != 0;
    let meta = (mode & 2 != 0).then_some(1);
    match decode_replies(stream, &requests, structured, meta) {
        Ok(done) => {
            for (handle, result) in done {
                // What a caller would look at: every READ is exactly its
                // request's length.
                if let (Some(req), Ok(Completion::Data(d))) = (
                    requests.iter().zip(1u64..).find(|(_, h)| *h == handle),
                    &result,
                ) {
                    assert_eq!(
                        d.len(),
                        req.0.length as usize,
                        "READ reply of the wrong length"
                    );
                }
            }
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn read(offset: u64, length: u32) -> RequestInfo {
        RequestInfo {
            command: Command::Read,
            offset,
            length,
        }
    }

    #[test]
    fn data_and_hole_chunks_assemble_a_read() {
        let mut s = Vec::new();
        let mut p = 4100u64.to_be_bytes().to_vec();
        p.extend_from_slice(b"abcd");
        s.extend(chunk(0, CHUNK_OFFSET_DATA, 1, &p));
        let mut h = 4096u64.to_be_bytes().to_vec();
        h.extend_from_slice(&4u32.to_be_bytes());
        s.extend(chunk(0, CHUNK_OFFSET_HOLE, 1, &h));
        s.extend(chunk(REPLY_FLAG_DONE, CHUNK_NONE, 1, &[]));
        let out = decode_replies(&s, &[read(4096, 8)], true, None).unwrap();
        assert_eq!(
            out,
            vec![(1, Ok(Completion::Data(b"\0\0\0\0abcd".to_vec())))]
        );
    }

    /// Feeds `state` a simple reply (handle 1, no error) whose header was
    /// read already, so only `payload` is left; returns the READ's buffer.
    fn simple_read(mut state: ReplyState, info: &RequestInfo, payload: &[u8]) -> Vec<u8> {
        let mut r = payload;
        let header = ReplyHeader::Simple {
            error: 0,
            handle: 1,
        };
        let got = state.receive(&mut r, header, info, false, None).unwrap();
        let Some(Ok(Completion::Data(data))) = got else {
            panic!("{got:?}")
        };
        data
    }

    #[test]
    fn reads_land_in_the_reused_buffer_and_holes_are_cleared() {
        let info = read(4096, 16);
        let buf = vec![0xffu8; 16];
        let ptr = buf.as_ptr();
        let mut state = ReplyState::with_buffer(buf);
        let mut s = Vec::new();
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend_from_slice(b"01234567");
        s.extend(chunk(0, CHUNK_OFFSET_DATA, 1, &p));
        let mut h = 4104u64.to_be_bytes().to_vec();
        h.extend_from_slice(&8u32.to_be_bytes());
        s.extend(chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_HOLE, 1, &h));
        let mut r = s.as_slice();
        let mut result = None;
        while !r.is_empty() {
            let mut magic = [0u8; 4];
            r.read_exact(&mut magic).unwrap();
            let header = read_header(&mut r, magic).unwrap();
            result = state.receive(&mut r, header, &info, true, None).unwrap();
        }
        let Some(Ok(Completion::Data(data))) = result else {
            panic!("{result:?}")
        };
        assert_eq!(
            data.as_ptr(),
            ptr,
            "the data was received into another buffer"
        );
        assert_eq!(data, b"01234567\0\0\0\0\0\0\0\0");
        // Simple replies too.
        let data = simple_read(ReplyState::with_buffer(data), &info, b"abcdefghijklmnop");
        assert_eq!(
            (data.as_ptr(), data.as_slice()),
            (ptr, &b"abcdefghijklmnop"[..])
        );
    }

    #[test]
    fn a_region_at_offset_zero_keeps_the_rest_of_its_buffer() {
        // with_buffer_at(.., 0) must not cut a longer buffer, as the plain
        // with_buffer does: the caller's region may be the whole tail.
        let info = read(4096, 8);
        let state = ReplyState::with_buffer_at(vec![0xeeu8; 20], 0);
        let data = simple_read(state, &info, b"abcdefgh");
        assert_eq!(&data[..8], b"abcdefgh");
        assert_eq!(&data[8..], &[0xee; 12]);
    }

    #[test]
    fn incomplete_overlapping_and_outside_reads_are_refused() {
        // DONE with half the data.
        let mut p = 0u64.to_be_bytes().to_vec();
        p.extend_from_slice(b"ab");
        let s = chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 1, &p);
        let e = decode_replies(&s, &[read(0, 4)], true, None).unwrap_err();
        assert!(e.contains("covering 2 of 4"), "{e}");
        // Overlap.
        let mut s = chunk(0, CHUNK_OFFSET_DATA, 1, &p);
        s.extend(chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 1, &p));
        let e = decode_replies(&s, &[read(0, 4)], true, None).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        // Before the request.
        let e = decode_replies(
            &chunk(0, CHUNK_OFFSET_DATA, 1, &p),
            &[read(8, 4)],
            true,
            None,
        )
        .unwrap_err();
        assert!(e.contains("outside the request"), "{e}");
        // Payload longer than the request allows: refused before reading it.
        let mut big = 0u64.to_be_bytes().to_vec();
        big.extend_from_slice(&[0u8; 16]);
        let e = decode_replies(
            &chunk(0, CHUNK_OFFSET_DATA, 1, &big),
            &[read(0, 4)],
            true,
            None,
        )
        .unwrap_err();
        assert!(e.contains("payload length 24"), "{e}");
    }

    #[test]
    fn error_offset_is_kept_and_named() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        p.extend_from_slice(&512u64.to_be_bytes());
        let s = chunk(REPLY_FLAG_DONE, CHUNK_ERROR_OFFSET, 1, &p);
        let out = decode_replies(&s, &[read(0, 1024)], true, None).unwrap();
        let failure = out[0].1.clone().unwrap_err();
        assert_eq!(failure.errno, Errno::EIO);
        assert_eq!(failure.offset, Some(512));
        assert_eq!(failure.message, "bad");
    }

    #[test]
    fn block_status_extents_and_context() {
        let info = RequestInfo {
            command: Command::BlockStatus,
            offset: 1 << 20,
            length: 8192,
        };
        let mut p = 7u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 3u32), (65536, 0)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let s = chunk(REPLY_FLAG_DONE, CHUNK_BLOCK_STATUS, 1, &p);
        let out = decode_replies(&s, &[info], true, Some(7)).unwrap();
        let Ok(Completion::Extents(ext)) = &out[0].1 else {
            panic!("{out:?}")
        };
        assert_eq!(ext.len(), 2);
        assert!(ext[0].is_hole() && ext[0].is_zero());
        assert_eq!((ext[1].offset, ext[1].length), ((1 << 20) + 4096, 4096));
        let e = decode_replies(&s, &[info], true, Some(1)).unwrap_err();
        assert!(e.contains("context 7"), "{e}");
    }

    #[test]
    fn simple_replies() {
        let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&1u64.to_be_bytes());
        s.extend_from_slice(b"wxyz");
        let mut e = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        e.extend_from_slice(&28u32.to_be_bytes());
        e.extend_from_slice(&2u64.to_be_bytes());
        s.extend(e);
        let write = RequestInfo {
            command: Command::Write,
            offset: 0,
            length: 4,
        };
        let out = decode_replies(&s, &[read(0, 4), write], false, None).unwrap();
        assert_eq!(out[0], (1, Ok(Completion::Data(b"wxyz".to_vec()))));
        assert_eq!(out[1].1.clone().unwrap_err().errno, Errno::ENOSPC);
        // Unknown handle, bad magic, truncated.
        let e = decode_replies(&s, &[], false, None).unwrap_err();
        assert!(e.contains("not in flight"), "{e}");
        let e = decode_replies(b"\x01\x02\x03\x04xxxx", &[], false, None).unwrap_err();
        assert!(e.contains("magic"), "{e}");
        assert!(decode_replies(&s[..10], &[read(0, 4)], false, None).is_err());
    }
}
