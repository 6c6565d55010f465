//! One NBD connection in the transmission phase: any number of requests in
//! flight, each matched to its reply by handle.
//!
//! Callers (any thread) submit a request: it gets a fresh handle, is
//! recorded as in flight, and is written to the socket under the write lock.
//! One reader thread per connection reads every reply, checks it against the
//! request recorded under its handle (see `reply`), and hands the result to
//! the waiting [`Pending`] through a channel. A protocol violation, socket
//! error or timeout ends the connection: every request in flight then gets an
//! error naming itself, and later submits fail at once. Nothing here retries
//! or reconnects; that is the caller's policy.

use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{AtOffset, Op};
use crate::handshake;
use crate::reply::{self, Completion, ReadError, ReplyState, RequestInfo, ServerFailure};
use crate::transport::{ReadHalf, WriteHalf};
use crate::wire::{
    encode_request, BlockSizes, Command, TransmissionFlags, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
};
use crate::{Error, Uri};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// PEM file of the CA(s) that sign the server's certificate; required
    /// for `nbds://`.
    pub ca_file: Option<PathBuf>,
    /// Connect, handshake and reply timeout: a request fails (and the
    /// connection closes) when the server sends nothing for this long while
    /// requests are in flight.
    pub timeout: Duration,
    /// Ask for structured replies (and so BLOCK_STATUS). On by default; off
    /// only to exercise the simple-reply path.
    pub structured_replies: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ca_file: None,
            timeout: Duration::from_secs(30),
            structured_replies: true,
        }
    }
}

/// How the export was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// `NBD_OPT_GO` (with info replies).
    Go,
    /// `NBD_OPT_EXPORT_NAME`: the server does not know GO (or is not fixed
    /// newstyle); block sizes are the protocol defaults.
    ExportName,
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints every request honours.
    pub block_sizes: BlockSizes,
    /// Structured replies negotiated.
    pub structured_replies: bool,
    /// `base:allocation` negotiated: BLOCK_STATUS is available.
    pub base_allocation: bool,
    /// GO or EXPORT_NAME.
    pub negotiation: Negotiation,
    /// The session runs over TLS.
    pub tls: bool,
}

/// Flags for WRITE_ZEROES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// Persist before replying.
    pub fua: bool,
    /// Fail with ENOTSUP unless zeroing is faster than writing zeroes.
    pub fast_zero: bool,
    /// Keep the range allocated (no hole).
    pub no_hole: bool,
}

/// One request, as submitted to a [`Connection`]. Lengths must respect the
/// export's block sizes; `Client` splits larger ranges for you.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// READ `length` bytes.
    Read {
        /// Offset.
        offset: u64,
        /// Length, at most the maximum block size.
        length: u32,
    },
    /// WRITE `data`.
    Write {
        /// Offset.
        offset: u64,
        /// Payload, at most the maximum block size.
        data: &'a [u8],
        /// Force unit access.
        fua: bool,
    },
    /// FLUSH everything written before.
    Flush,
    /// TRIM (discard) a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Force unit access.
        fua: bool,
    },
    /// WRITE_ZEROES over a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// FUA, FAST_ZERO, NO_HOLE.
        flags: ZeroFlags,
    },
    /// BLOCK_STATUS (`base:allocation`) of a range.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
}

/// Why a connection ended, kept to answer every later request.
#[derive(Debug, Clone)]
enum Fatal {
    Protocol(String),
    Timeout(Duration),
    Lost(String),
}

impl Fatal {
    fn error(&self, server: &str, op: Op) -> Error {
        let server = server.to_owned();
        match self {
            Fatal::Protocol(reason) => Error::Protocol {
                server,
                op,
                reason: format!("{reason}; connection closed"),
            },
            Fatal::Timeout(timeout) => Error::Timeout {
                server,
                op,
                timeout: *timeout,
            },
            Fatal::Lost(reason) => Error::Disconnected {
                server,
                op,
                reason: reason.clone(),
            },
        }
    }
}

type Reply = Result<Completion, Error>;

struct Slot {
    op: Op,
    info: RequestInfo,
    reply: ReplyState,
    tx: mpsc::Sender<Reply>,
}

#[derive(Default)]
struct State {
    next_handle: u64,
    inflight: HashMap<u64, Slot>,
    /// Set once; the connection takes no more requests.
    dead: Option<Fatal>,
    closing: bool,
}

struct Shared {
    server: String,
    info: ExportInfo,
    meta_context: Option<u32>,
    timeout: Duration,
    writer: WriteHalf,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection: records why, fails every request in flight.
    fn fail_all(&self, fatal: Fatal) {
        let slots = {
            let mut st = self.state();
            if st.dead.is_none() {
                st.dead = Some(fatal.clone());
            }
            std::mem::take(&mut st.inflight)
        };
        for slot in slots.into_values() {
            // The waiter may have gone away; nothing to do then.
            let _ = slot.tx.send(Err(fatal.error(&self.server, slot.op)));
        }
    }

    fn server_error(&self, op: Op, failure: ServerFailure) -> Error {
        Error::Server {
            server: self.server.clone(),
            op,
            errno: failure.errno,
            at: AtOffset(failure.offset),
            message: failure.message,
        }
    }
}

/// A connection in the transmission phase. `Send + Sync`: share it by
/// reference between threads; each submit is independent.
pub struct Connection {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.shared.server)
            .field("info", &self.shared.info)
            .finish()
    }
}

/// A submitted request; [`Pending::wait`] for its reply.
#[must_use = "a submitted request's reply must be waited for"]
pub struct Pending<'a> {
    _conn: &'a Connection,
    op: Op,
    rx: mpsc::Receiver<Reply>,
}

impl Pending<'_> {
    /// The request, as errors name it.
    pub fn op(&self) -> Op {
        self.op
    }

    /// Blocks until the reply (or the connection's end) arrives.
    pub fn wait(self) -> Result<Completion, Error> {
        match self.rx.recv() {
            Ok(reply) => reply,
            // The reader thread always answers before it drops a sender;
            // this is only reachable if that invariant breaks.
            Err(_) => Err(Error::Disconnected {
                server: self._conn.shared.server.clone(),
                op: self.op,
                reason: "the connection's reader stopped".into(),
            }),
        }
    }
}

fn connect_tcp(uri: &Uri, timeout: Duration, server: &str) -> Result<TcpStream, Error> {
    let connect_err = |source| Error::Connect {
        server: server.to_owned(),
        source,
    };
    let addrs = (uri.host(), uri.port())
        .to_socket_addrs()
        .map_err(connect_err)?;
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        "the host name resolved to no address",
    );
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => {
                tcp.set_nodelay(true).map_err(connect_err)?;
                tcp.set_read_timeout(Some(timeout)).map_err(connect_err)?;
                tcp.set_write_timeout(Some(timeout)).map_err(connect_err)?;
                return Ok(tcp);
            }
            Err(e) => last = e,
        }
    }
    Err(connect_err(last))
}

impl Connection {
    /// Connects and runs the handshake.
    pub fn connect(uri: &Uri, opts: &Options) -> Result<Connection, Error> {
        let server = uri.to_string();
        let tls = if uri.tls() {
            let Some(ca_file) = &opts.ca_file else {
                return Err(Error::Tls {
                    server,
                    reason: "an nbds:// URI needs a CA bundle (Options::ca_file)".into(),
                });
            };
            Some(handshake::tls_config(ca_file).map_err(|reason| Error::Tls {
                server: server.clone(),
                reason,
            })?)
        } else {
            None
        };
        Self::connect_with(uri, opts, tls.as_ref())
    }

    pub(crate) fn connect_with(
        uri: &Uri,
        opts: &Options,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Connection, Error> {
        let server = uri.to_string();
        let timeout = if opts.timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            opts.timeout
        };
        let tcp = connect_tcp(uri, timeout, &server)?;
        let socket = tcp.try_clone().map_err(|source| Error::Connect {
            server: server.clone(),
            source,
        })?;
        let (read, writer, negotiated) = handshake::negotiate(tcp, uri, opts, tls, &server)?;
        // From here the reader polls: short socket timeouts let it tell an
        // idle connection (fine) from a silent server (an error).
        let poll = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        socket
            .set_read_timeout(Some(poll))
            .map_err(|source| Error::Connect {
                server: server.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            server,
            info: negotiated.info,
            meta_context: negotiated.meta_context,
            timeout,
            writer,
            state: Mutex::new(State {
                next_handle: 1,
                ..State::default()
            }),
        });
        let for_reader = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_loop(&for_reader, read))
            .map_err(|source| Error::Connect {
                server: shared.server.clone(),
                source,
            })?;
        Ok(Connection {
            shared,
            reader: Some(reader),
        })
    }

    /// What the handshake learned.
    pub fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// The server's URI, as errors name it.
    pub fn server(&self) -> &str {
        &self.shared.server
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.state().inflight.len()
    }

    fn invalid(&self, op: Op, reason: impl Into<String>) -> Error {
        Error::InvalidRequest {
            server: self.shared.server.clone(),
            op,
            reason: reason.into(),
        }
    }

    /// Checks a request against the export before anything is sent.
    fn validate<'a>(&self, req: &Request<'a>) -> Result<(Op, u16, Option<&'a [u8]>), Error> {
        let info = &self.shared.info;
        let flags = info.flags;
        let (command, offset, length, payload, fua) = match *req {
            Request::Read { offset, length } => (Command::Read, offset, length, None, false),
            Request::Write { offset, data, fua } => {
                let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
                (Command::Write, offset, length, Some(data), fua)
            }
            Request::Flush => (Command::Flush, 0, 0, None, false),
            Request::Trim {
                offset,
                length,
                fua,
            } => (Command::Trim, offset, length, None, fua),
            Request::WriteZeroes {
                offset,
                length,
                flags,
            } => (Command::WriteZeroes, offset, length, None, flags.fua),
            Request::BlockStatus { offset, length } => {
                (Command::BlockStatus, offset, length, None, false)
            }
        };
        let op = Op {
            command,
            offset,
            length: payload.map_or(u64::from(length), |d| d.len() as u64),
        };
        let mut wire_flags = 0u16;
        if fua {
            if !flags.can_fua() {
                return Err(self.invalid(op, "the server does not support FUA"));
            }
            wire_flags |= CMD_FLAG_FUA;
        }
        let writes = matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && flags.read_only() {
            return Err(self.invalid(op, "the export is read-only"));
        }
        match command {
            Command::Flush if !flags.can_flush() => {
                return Err(self.invalid(op, "the server does not support FLUSH"))
            }
            Command::Trim if !flags.can_trim() => {
                return Err(self.invalid(op, "the server does not support TRIM"))
            }
            Command::WriteZeroes if !flags.can_write_zeroes() => {
                return Err(self.invalid(op, "the server does not support WRITE_ZEROES"))
            }
            Command::BlockStatus if !info.base_allocation => {
                return Err(self.invalid(
                    op,
                    "the server did not agree to base:allocation, so BLOCK_STATUS is unavailable",
                ))
            }
            _ => {}
        }
        if let Request::WriteZeroes { flags: z, .. } = req {
            if z.fast_zero {
                if !flags.can_fast_zero() {
                    return Err(self.invalid(op, "the server does not support FAST_ZERO"));
                }
                wire_flags |= CMD_FLAG_FAST_ZERO;
            }
            if z.no_hole {
                wire_flags |= CMD_FLAG_NO_HOLE;
            }
        }
        if command == Command::Flush {
            return Ok((op, wire_flags, None));
        }
        if op.length == 0 {
            return Err(self.invalid(op, "zero-length request"));
        }
        let end = offset.checked_add(op.length);
        if end.is_none_or(|end| end > info.size) {
            return Err(self.invalid(
                op,
                format!("range ends past the export's size of {} bytes", info.size),
            ));
        }
        let sizes = &info.block_sizes;
        let min = u64::from(sizes.minimum);
        // The tail of an export whose size is not a multiple of the minimum
        // may be reached with a short request.
        let ends_at_size = end == Some(info.size);
        if offset % min != 0 || (op.length % min != 0 && !ends_at_size) {
            return Err(self.invalid(
                op,
                format!("not aligned to the server's minimum block size of {min} bytes"),
            ));
        }
        if matches!(command, Command::Read | Command::Write) && op.length > u64::from(sizes.maximum)
        {
            return Err(self.invalid(
                op,
                format!(
                    "longer than the server's maximum block size of {} bytes",
                    sizes.maximum
                ),
            ));
        }
        Ok((op, wire_flags, payload))
    }

    /// Sends one request; the reply is collected by [`Pending::wait`].
    /// Blocks only while the request (and its payload) is written.
    pub fn submit<'c>(&'c self, req: Request<'_>) -> Result<Pending<'c>, Error> {
        self.submit_with(req, None)
    }

    /// Sends a READ whose data the reader thread receives straight into
    /// `buf` (resized to `length`, not cleared), handed back as
    /// [`Completion::Data`]: reusing buffers spares each reply a fresh,
    /// zero-filled, page-faulting allocation.
    pub fn submit_read<'c>(
        &'c self,
        offset: u64,
        length: u32,
        buf: Vec<u8>,
    ) -> Result<Pending<'c>, Error> {
        self.submit_with(Request::Read { offset, length }, Some((buf, None)))
    }

    /// As [`Connection::submit_read`], but the data lands in
    /// `buf[start..start + length]` and the whole of `buf` is handed back:
    /// `buf` is grown only if shorter than that, so memory the caller
    /// aligned (for O_DIRECT) stays where it is.
    pub fn submit_read_at<'c>(
        &'c self,
        offset: u64,
        length: u32,
        buf: Vec<u8>,
        start: usize,
    ) -> Result<Pending<'c>, Error> {
        self.submit_with(Request::Read { offset, length }, Some((buf, Some(start))))
    }

    fn submit_with<'c>(
        &'c self,
        req: Request<'_>,
        buf: Option<(Vec<u8>, Option<usize>)>,
    ) -> Result<Pending<'c>, Error> {
        let (op, wire_flags, payload) = self.validate(&req)?;
        let length = u32::try_from(op.length).map_err(|_| self.invalid(op, "longer than 4 GiB"))?;
        let (tx, rx) = mpsc::channel();
        let handle = {
            let mut st = self.shared.state();
            if let Some(fatal) = &st.dead {
                return Err(fatal.error(&self.shared.server, op));
            }
            if st.closing {
                return Err(
                    Fatal::Lost("the connection is closing".into()).error(&self.shared.server, op)
                );
            }
            let handle = st.next_handle;
            st.next_handle = st.next_handle.wrapping_add(1).max(1);
            st.inflight.insert(
                handle,
                Slot {
                    op,
                    info: RequestInfo {
                        command: op.command,
                        offset: op.offset,
                        length,
                    },
                    reply: match buf {
                        None => ReplyState::default(),
                        Some((buf, None)) => ReplyState::with_buffer(buf),
                        Some((buf, Some(start))) => ReplyState::with_buffer_at(buf, start),
                    },
                    tx,
                },
            );
            handle
        };
        let header = encode_request(wire_flags, op.command, handle, op.offset, length);
        let sent = match payload {
            Some(data) => self.shared.writer.send(&[&header, data]),
            None => self.shared.writer.send(&[&header]),
        };
        if let Err(e) = sent {
            let fatal = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                Fatal::Timeout(self.shared.timeout)
            } else {
                Fatal::Lost(format!("sending the request failed: {e}"))
            };
            let error = fatal.error(&self.shared.server, op);
            self.shared.fail_all(fatal);
            // Wake the reader; the stream may hold half a request.
            self.shared.writer.abort();
            return Err(error);
        }
        Ok(Pending {
            _conn: self,
            op,
            rx,
        })
    }

    /// Submits and waits.
    pub fn call(&self, req: Request<'_>) -> Result<Completion, Error> {
        self.submit(req)?.wait()
    }

    fn shutdown(&mut self) {
        let send_disc = {
            let mut st = self.shared.state();
            let first = !st.closing;
            st.closing = true;
            first && st.dead.is_none()
        };
        if send_disc {
            let disc = encode_request(0, Command::Disconnect, 0, 0, 0);
            if let Err(e) = self.shared.writer.send(&[&disc]) {
                tracing::debug!(server = %self.shared.server, error = %e, "sending NBD_CMD_DISC failed");
            }
        }
        self.shared.writer.shutdown();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Sends NBD_CMD_DISC and closes the socket (also done on drop).
    pub fn close(mut self) {
        self.shutdown();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The reader's view of the socket: waits out the poll timeouts of the
/// socket while bytes keep coming, and gives up after `timeout` of silence.
struct Patient<'a> {
    inner: BufReader<ReadHalf>,
    shared: &'a Shared,
    last_progress: Instant,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.last_progress = Instant::now();
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if self.last_progress.elapsed() >= self.shared.timeout {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "reply stalled"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Patient<'_> {
    /// Reads the first 4 bytes of the next message. `Ok(false)`: the
    /// connection was closed by us. Idle waiting is fine with nothing in
    /// flight; with requests in flight, `timeout` of silence is fatal.
    fn next_magic(&mut self, magic: &mut [u8; 4]) -> Result<bool, Fatal> {
        let mut filled = 0;
        while filled < magic.len() {
            match self.inner.read(&mut magic[filled..]) {
                Ok(0) => {
                    let st = self.shared.state();
                    if st.closing && filled == 0 {
                        return Ok(false);
                    }
                    return Err(Fatal::Lost(format!(
                        "the server closed the connection{}",
                        if filled > 0 {
                            " in the middle of a reply"
                        } else {
                            ""
                        }
                    )));
                }
                Ok(n) => {
                    filled += n;
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    let st = self.shared.state();
                    if st.closing && st.inflight.is_empty() {
                        return Ok(false);
                    }
                    let waiting = filled > 0 || !st.inflight.is_empty();
                    if waiting && self.last_progress.elapsed() >= self.shared.timeout {
                        return Err(Fatal::Timeout(self.shared.timeout));
                    }
                    if !waiting {
                        // Idle: silence is not the server's fault.
                        self.last_progress = Instant::now();
                    }
                }
                Err(e) => {
                    let st = self.shared.state();
                    if st.closing && filled == 0 {
                        return Ok(false);
                    }
                    return Err(Fatal::Lost(format!("reading from the server failed: {e}")));
                }
            }
        }
        Ok(true)
    }
}

/// Why a failed read ends the connection (protocol errors here are not yet
/// tied to a request).
fn read_fatal(shared: &Shared, e: ReadError) -> Fatal {
    match e {
        ReadError::Io(e) if e.kind() == io::ErrorKind::TimedOut => Fatal::Timeout(shared.timeout),
        ReadError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Fatal::Lost("the server closed the connection in the middle of a reply".into())
        }
        ReadError::Io(e) => Fatal::Lost(format!("reading a reply failed: {e}")),
        ReadError::Protocol { error, .. } => Fatal::Protocol(error.0),
    }
}

fn reader_loop(shared: &Shared, read: ReadHalf) {
    let mut r = Patient {
        inner: BufReader::with_capacity(256 * 1024, read),
        shared,
        last_progress: Instant::now(),
    };
    let structured = shared.info.structured_replies;
    let fatal = loop {
        let mut magic = [0u8; 4];
        match r.next_magic(&mut magic) {
            Ok(true) => {}
            Ok(false) => break None,
            Err(fatal) => break Some(fatal),
        }
        let header = match reply::read_header(&mut r, magic) {
            Ok(header) => header,
            Err(e) => break Some(read_fatal(shared, e)),
        };
        let handle = header.handle();
        // The reply's state leaves the lock while its payload is read (a
        // READ's megabytes must not hold up submitters); only this thread
        // touches it, and it goes back unless the reply is complete.
        let taken = shared
            .state()
            .inflight
            .get_mut(&handle)
            .map(|slot| (slot.info, slot.op, std::mem::take(&mut slot.reply)));
        let Some((info, op, mut reply)) = taken else {
            break Some(read_fatal(shared, header.not_in_flight()));
        };
        let received = reply.receive(&mut r, header, &info, structured, shared.meta_context);
        let mut st = shared.state();
        match received {
            Ok(None) => match st.inflight.get_mut(&handle) {
                Some(slot) => slot.reply = reply,
                // Failed by a sender meanwhile; the connection is dead.
                None => break None,
            },
            Ok(Some(result)) => {
                let Some(slot) = st.inflight.remove(&handle) else {
                    break None;
                };
                let reply = result.map_err(|failure| shared.server_error(slot.op, failure));
                let _ = slot.tx.send(reply);
            }
            Err(ReadError::Protocol { error, .. }) => {
                if let Some(slot) = st.inflight.remove(&handle) {
                    let _ = slot.tx.send(Err(Error::Protocol {
                        server: shared.server.clone(),
                        op: slot.op,
                        reason: format!("{error}; connection closed"),
                    }));
                }
                break Some(Fatal::Protocol(format!("reply to {op}: {error}")));
            }
            Err(e @ ReadError::Io(_)) => break Some(read_fatal(shared, e)),
        }
    };
    let fatal = fatal.unwrap_or_else(|| Fatal::Lost("the connection was closed".into()));
    let closing = shared.state().closing;
    if !closing {
        tracing::warn!(server = %shared.server, reason = ?fatal, "NBD connection ended");
    }
    shared.fail_all(fatal);
    // A protocol violation ends the session hard (the spec's answer to a
    // misbehaving server); senders blocked on a full socket wake up too.
    shared.writer.abort();
}
