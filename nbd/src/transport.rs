//! The byte stream under a connection, plain TCP or TLS, split into a read
//! half (owned by the connection's reader thread) and a write half (shared
//! by every thread that submits requests).
//!
//! rustls' `StreamOwned` cannot be read on one thread while written on
//! another, so for TLS both halves share the `ClientConnection` behind a
//! mutex held only for the (fast, in-memory) encrypt/decrypt steps, never
//! across a blocking socket call. Lock order is always `wire` then `conn`,
//! so the two halves cannot deadlock. This module never interprets NBD bytes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::ClientConnection;

/// Plaintext per TLS record batch: bounds the memory a large WRITE takes
/// while encrypted, and lets the reader take the lock between batches.
const TLS_CHUNK: usize = 16 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means another thread panicked mid-send; the stream is
    // then unusable anyway, and the next socket error will say so.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct TlsShared {
    conn: Mutex<ClientConnection>,
    /// The socket, for writing; holding this lock is the right to put
    /// records on the wire (in the order rustls produced them).
    wire: Mutex<TcpStream>,
}

impl TlsShared {
    /// Sends whatever rustls has queued (alerts, key updates) while nobody
    /// else is writing.
    fn flush_pending(&self) -> io::Result<()> {
        let mut wire = lock(&self.wire);
        let mut out = Vec::new();
        {
            let mut conn = lock(&self.conn);
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
        }
        wire.write_all(&out)
    }
}

/// The read half: only the connection's reader (or the handshake) reads.
pub(crate) enum ReadHalf {
    Plain(TcpStream),
    Tls {
        shared: Arc<TlsShared>,
        tcp: TcpStream,
        raw: Box<[u8]>,
        filled: usize,
        pos: usize,
    },
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(tcp) => tcp.read(buf),
            ReadHalf::Tls {
                shared,
                tcp,
                raw,
                filled,
                pos,
            } => loop {
                let (processed, wants_write) = {
                    let mut conn = lock(&shared.conn);
                    match conn.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if *pos < *filled {
                        let n = conn.read_tls(&mut &raw[*pos..*filled])?;
                        if n == 0 {
                            return Err(io::Error::other("TLS layer accepted no ciphertext"));
                        }
                        *pos += n;
                        conn.process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        (true, conn.wants_write())
                    } else {
                        (false, false)
                    }
                };
                if wants_write {
                    shared.flush_pending()?;
                }
                if processed {
                    // New plaintext may be ready; look before blocking.
                    continue;
                }
                // Only now block on the socket: no lock is held. A read
                // timeout returns here with all TLS state kept, so the
                // caller may retry.
                let n = tcp.read(raw)?;
                if n == 0 {
                    return Ok(0);
                }
                *filled = n;
                *pos = 0;
            },
        }
    }
}

/// The write half: any thread may send; each `send` is atomic on the wire.
pub(crate) struct WriteHalf {
    inner: WriteInner,
    /// A handle on the socket for `shutdown`, usable while a sender is
    /// blocked holding the write lock.
    control: TcpStream,
}

enum WriteInner {
    Plain(Mutex<TcpStream>),
    Tls(Arc<TlsShared>),
}

impl WriteHalf {
    /// Writes all parts back to back, with no other sender's bytes between.
    pub(crate) fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        match &self.inner {
            WriteInner::Plain(tcp) => {
                let mut tcp = lock(tcp);
                let total: usize = parts.iter().map(|p| p.len()).sum();
                if total <= 64 * 1024 {
                    // One segment for header + small payload.
                    let mut buf = Vec::with_capacity(total);
                    for p in parts {
                        buf.extend_from_slice(p);
                    }
                    tcp.write_all(&buf)
                } else {
                    for p in parts {
                        tcp.write_all(p)?;
                    }
                    Ok(())
                }
            }
            WriteInner::Tls(shared) => {
                let mut wire = lock(&shared.wire);
                let mut out = Vec::with_capacity(TLS_CHUNK + 1024);
                for part in parts {
                    for piece in part.chunks(TLS_CHUNK) {
                        out.clear();
                        {
                            let mut conn = lock(&shared.conn);
                            conn.writer().write_all(piece)?;
                            while conn.wants_write() {
                                conn.write_tls(&mut out)?;
                            }
                        }
                        wire.write_all(&out)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Best-effort TLS close_notify, then shuts the socket both ways so the
    /// reader thread wakes up.
    pub(crate) fn shutdown(&self) {
        if let WriteInner::Tls(shared) = &self.inner {
            lock(&shared.conn).send_close_notify();
            let _ = shared.flush_pending();
        }
        let _ = self.control.shutdown(Shutdown::Both);
    }

    /// Shuts the socket down without touching TLS state (a sender may be
    /// stuck holding the locks).
    pub(crate) fn abort(&self) {
        let _ = self.control.shutdown(Shutdown::Both);
    }
}

/// Splits a plain TCP stream.
pub(crate) fn plain(tcp: TcpStream) -> io::Result<(ReadHalf, WriteHalf)> {
    let writer = tcp.try_clone()?;
    let control = tcp.try_clone()?;
    Ok((
        ReadHalf::Plain(tcp),
        WriteHalf {
            inner: WriteInner::Plain(Mutex::new(writer)),
            control,
        },
    ))
}

/// Runs the TLS handshake on `tcp` (blocking, bounded by its timeouts) and
/// splits the result.
pub(crate) fn tls(
    mut tcp: TcpStream,
    mut conn: ClientConnection,
) -> io::Result<(ReadHalf, WriteHalf)> {
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp)?;
    }
    let wire = tcp.try_clone()?;
    let control = tcp.try_clone()?;
    let shared = Arc::new(TlsShared {
        conn: Mutex::new(conn),
        wire: Mutex::new(wire),
    });
    Ok((
        ReadHalf::Tls {
            shared: Arc::clone(&shared),
            tcp,
            raw: vec![0u8; 64 * 1024].into_boxed_slice(),
            filled: 0,
            pos: 0,
        },
        WriteHalf {
            inner: WriteInner::Tls(shared),
            control,
        },
    ))
}
