//! The blocking, thread-safe client most callers want: one or several
//! connections to one export, byte-range operations split at the server's
//! block size limits and spread over the connections, all pieces in flight
//! at once.
//!
//! Several connections are opened only when the server advertises
//! `CAN_MULTI_CONN` (otherwise a FLUSH on one connection would not cover
//! writes sent on another). This layer never retries: a failed piece fails
//! the call, after every other piece of it has been answered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::conn::{Connection, ExportInfo, Options, Pending, Request, ZeroFlags};
use crate::error::Op;
use crate::reply::Completion;
use crate::wire::{Command, Extent};
use crate::{handshake, Error, Uri};

/// Largest READ/WRITE/WRITE_ZEROES piece, whatever the server allows: bounds
/// the memory one reply takes (qemu's client uses the same limit).
const MAX_PIECE: u32 = 32 << 20;
/// Largest TRIM and BLOCK_STATUS range: no payload, so the server's maximum
/// block size does not apply; kept under 2 GiB as qemu does.
const MAX_RANGE: u32 = i32::MAX as u32;
/// Most bytes of READ buffers kept for reuse (a few pieces per worker of a
/// restore); a buffer that does not fit is freed.
const POOL_BYTES: usize = 64 << 20;

/// A client of one export over one or more connections.
#[derive(Debug)]
pub struct Client {
    conns: Vec<Connection>,
    next: AtomicUsize,
    /// READ buffers handed back after their data was copied out: the next
    /// reply lands in memory that is already mapped and initialised instead
    /// of a fresh allocation to zero-fill and fault in.
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Client {
    /// One connection.
    pub fn connect(uri: &Uri, opts: &Options) -> Result<Client, Error> {
        Self::connect_many(uri, opts, 1)
    }

    /// Up to `n` connections: the first, then `n - 1` more if the server
    /// advertises `CAN_MULTI_CONN`. Every connection must report the same
    /// export size and flags.
    pub fn connect_many(uri: &Uri, opts: &Options, n: usize) -> Result<Client, Error> {
        let tls = match (uri.tls(), &opts.ca_file) {
            (true, Some(ca_file)) => {
                Some(handshake::tls_config(ca_file).map_err(|reason| Error::Tls {
                    server: uri.to_string(),
                    reason,
                })?)
            }
            (true, None) => {
                return Err(Error::Tls {
                    server: uri.to_string(),
                    reason: "an nbds:// URI needs a CA bundle (Options::ca_file)".into(),
                })
            }
            (false, _) => None,
        };
        let first = Connection::connect_with(uri, opts, tls.as_ref())?;
        let info = *first.info();
        let n = if info.flags.can_multi_conn() {
            n.max(1)
        } else {
            1
        };
        let mut conns = vec![first];
        while conns.len() < n {
            let conn = Connection::connect_with(uri, opts, tls.as_ref())?;
            let other = conn.info();
            if other.size != info.size || other.flags != info.flags {
                return Err(Error::Handshake {
                    server: uri.to_string(),
                    reason: format!(
                        "connection {} reports size {} flags {:#x}, the first reported size {} flags {:#x}",
                        conns.len() + 1,
                        other.size,
                        other.flags.0,
                        info.size,
                        info.flags.0
                    ),
                });
            }
            conns.push(conn);
        }
        tracing::debug!(server = %uri, connections = conns.len(), size = info.size, "NBD client connected");
        Ok(Client {
            conns,
            next: AtomicUsize::new(0),
            pool: Mutex::new(Vec::new()),
        })
    }

    /// What the handshake learned (the same on every connection).
    pub fn info(&self) -> &ExportInfo {
        self.conns[0].info()
    }

    /// The export size in bytes.
    pub fn size(&self) -> u64 {
        self.info().size
    }

    /// The connections, for pipelining by hand.
    pub fn connections(&self) -> &[Connection] {
        &self.conns
    }

    /// The next connection, round robin.
    pub fn connection(&self) -> &Connection {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    /// Largest aligned piece under `limit` and the server's maximum.
    fn piece_len(&self, limit: u32) -> u32 {
        let sizes = self.info().block_sizes;
        let max = sizes.maximum.min(limit);
        let min = sizes.minimum.max(1);
        (max - max % min).max(min)
    }

    fn take_buffer(&self) -> Vec<u8> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.pop().unwrap_or_default()
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let kept: usize = pool.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= POOL_BYTES {
            pool.push(buf);
        }
    }

    /// Waits for every pending piece (so none outlives the call); returns
    /// the results in order.
    fn wait_all(pending: Vec<Result<Pending<'_>, Error>>) -> Vec<Result<Completion, Error>> {
        pending
            .into_iter()
            .map(|p| p.and_then(Pending::wait))
            .collect()
    }

    /// Reads `buf.len()` bytes at `offset`. Each piece is received into a
    /// reused buffer and copied once into `buf`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let piece = self.piece_len(MAX_PIECE) as usize;
        let pending: Vec<_> = buf
            .chunks(piece)
            .enumerate()
            .map(|(i, chunk)| {
                self.connection().submit_read(
                    offset + (i * piece) as u64,
                    len32(chunk.len()),
                    self.take_buffer(),
                )
            })
            .collect();
        let mut first_err = None;
        for ((i, chunk), result) in buf
            .chunks_mut(piece)
            .enumerate()
            .zip(Self::wait_all(pending))
        {
            match result {
                Ok(Completion::Data(data)) if data.len() == chunk.len() => {
                    chunk.copy_from_slice(&data);
                    self.give_buffer(data);
                }
                Ok(_) => {
                    first_err.get_or_insert(
                        self.wrong_read_reply(offset + (i * piece) as u64, chunk.len()),
                    );
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads `len` bytes at `offset` into `buf[start..start + len]` and
    /// hands `buf` back. Where `len` is one piece, the reply is received
    /// straight into `buf` — no copy — and `buf` is grown only if shorter
    /// than `start + len`, so a region the caller aligned for O_DIRECT
    /// stays aligned. A longer read is split as [`Client::read_at`] does.
    /// On error the buffer is dropped.
    pub fn read_into(
        &self,
        offset: u64,
        mut buf: Vec<u8>,
        start: usize,
        len: usize,
    ) -> Result<Vec<u8>, Error> {
        let end = start.saturating_add(len);
        let piece = self.piece_len(MAX_PIECE) as usize;
        if len > piece {
            if buf.len() < end {
                buf.resize(end, 0);
            }
            self.read_at(offset, buf.get_mut(start..end).unwrap_or_default())?;
            return Ok(buf);
        }
        match self
            .connection()
            .submit_read_at(offset, len32(len), buf, start)?
            .wait()?
        {
            Completion::Data(data) if data.len() >= end => Ok(data),
            _ => Err(self.wrong_read_reply(offset, len)),
        }
    }

    /// A READ of `len` bytes at `offset` answered with something other
    /// than that many bytes of data.
    fn wrong_read_reply(&self, offset: u64, len: usize) -> Error {
        Error::Protocol {
            server: self.conns[0].server().to_owned(),
            op: Op {
                command: Command::Read,
                offset,
                length: len as u64,
            },
            reason: "reply of the wrong kind or length".into(),
        }
    }

    /// Reads `len` bytes at `offset` into a new buffer.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        let piece = self.piece_len(MAX_PIECE) as usize;
        let pending: Vec<_> = data
            .chunks(piece)
            .enumerate()
            .map(|(i, chunk)| {
                self.connection().submit(Request::Write {
                    offset: offset + (i * piece) as u64,
                    data: chunk,
                    fua,
                })
            })
            .collect();
        Self::wait_all(pending)
            .into_iter()
            .try_for_each(|r| r.map(drop))
    }

    fn ranged(
        &self,
        offset: u64,
        len: u64,
        limit: u32,
        make: impl Fn(u64, u32) -> Request<'static>,
    ) -> Result<(), Error> {
        let piece = u64::from(self.piece_len(limit));
        let mut pending = Vec::new();
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = piece.min(end - at);
            pending.push(self.connection().submit(make(at, len32_u64(n))));
            at += n;
        }
        Self::wait_all(pending)
            .into_iter()
            .try_for_each(|r| r.map(drop))
    }

    /// WRITE_ZEROES over `[offset, offset + len)`.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), Error> {
        self.ranged(offset, len, MAX_PIECE, |offset, length| {
            Request::WriteZeroes {
                offset,
                length,
                flags,
            }
        })
    }

    /// TRIM `[offset, offset + len)`.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        self.ranged(offset, len, MAX_RANGE, |offset, length| Request::Trim {
            offset,
            length,
            fua,
        })
    }

    /// FLUSH: everything written (and answered) before is persistent. One
    /// flush covers every connection: there is more than one only with
    /// `CAN_MULTI_CONN`, whose meaning is exactly that.
    pub fn flush(&self) -> Result<(), Error> {
        self.conns[0].call(Request::Flush).map(drop)
    }

    /// `base:allocation` extents covering exactly `[offset, offset + len)`
    /// (adjacent extents with the same flags merged).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let piece = u64::from(self.piece_len(MAX_RANGE));
        let end = offset.saturating_add(len);
        let mut at = offset;
        let mut out: Vec<Extent> = Vec::new();
        while at < end {
            let length = len32_u64(piece.min(end - at));
            let op = Op {
                command: Command::BlockStatus,
                offset: at,
                length: u64::from(length),
            };
            let extents = match self
                .connection()
                .call(Request::BlockStatus { offset: at, length })?
            {
                Completion::Extents(e) if !e.is_empty() => e,
                _ => {
                    return Err(Error::Protocol {
                        server: self.conns[0].server().to_owned(),
                        op,
                        reason: "BLOCK_STATUS reply without extents".into(),
                    })
                }
            };
            for e in extents {
                at = e.offset + e.length;
                match out.last_mut() {
                    Some(last)
                        if last.flags == e.flags && last.offset + last.length == e.offset =>
                    {
                        last.length += e.length
                    }
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Sends NBD_CMD_DISC on every connection and closes them.
    pub fn close(self) {
        for conn in self.conns {
            conn.close();
        }
    }
}

/// A piece length, already bounded by a u32 piece size.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn len32_u64(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
