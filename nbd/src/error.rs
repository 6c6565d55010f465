//! The client's error type. Every message names the server (its URI), and
//! for a failed request the command, offset and length, so an operator
//! reading one log line knows what failed where. It must stay small: callers
//! match on the variant to decide whether to retry, reconnect or give up.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::wire::{Command, Errno};

/// One request, as error messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// The command.
    pub command: Command,
    /// Its offset in the export.
    pub offset: u64,
    /// Its length.
    pub length: u64,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} offset {} length {}",
            self.command, self.offset, self.length
        )
    }
}

/// Where the server said the error happened, when it did (ERROR_OFFSET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtOffset(pub Option<u64>);

impl fmt::Display for AtOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(offset) => write!(f, " at offset {offset}"),
            None => Ok(()),
        }
    }
}

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    Uri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TCP connect failed.
    #[error("{server}: cannot connect: {source}")]
    Connect {
        /// The server's URI.
        server: String,
        /// The socket error.
        source: io::Error,
    },
    /// The handshake failed (server greeting, options, export choice).
    #[error("{server}: handshake failed: {reason}")]
    Handshake {
        /// The server's URI.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// `nbds://` and the server refused STARTTLS: never fall back to plaintext.
    #[error(
        "{server}: server refused TLS ({reply}); an nbds:// URI never falls back to plaintext"
    )]
    TlsRefused {
        /// The server's URI.
        server: String,
        /// The server's option reply.
        reply: String,
    },
    /// TLS could not be set up (CA bundle, certificate check, TLS handshake).
    #[error("{server}: TLS: {reason}")]
    Tls {
        /// The server's URI.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// The request cannot be sent to this export (read-only, unsupported
    /// command, misaligned, past the end); nothing was sent.
    #[error("{server}: {op}: {reason}")]
    InvalidRequest {
        /// The server's URI.
        server: String,
        /// The request.
        op: Op,
        /// Why it was not sent.
        reason: String,
    },
    /// The server answered the request with an error; the connection is fine.
    #[error("{server}: {op}: server error {errno}{at}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// The server's URI.
        server: String,
        /// The request.
        op: Op,
        /// The protocol error code.
        errno: Errno,
        /// Where it happened, if the server said.
        at: AtOffset,
        /// The server's message, if any.
        message: String,
    },
    /// The server broke the protocol; the connection was closed.
    #[error("{server}: {op}: protocol violation by the server: {reason}")]
    Protocol {
        /// The server's URI.
        server: String,
        /// The request that was waiting (or being answered).
        op: Op,
        /// What was wrong.
        reason: String,
    },
    /// No reply in time; the connection was closed.
    #[error("{server}: {op}: no reply within {timeout:?}; connection closed")]
    Timeout {
        /// The server's URI.
        server: String,
        /// The request.
        op: Op,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The connection failed or was closed while the request was pending.
    #[error("{server}: {op}: connection lost: {reason}")]
    Disconnected {
        /// The server's URI.
        server: String,
        /// The request.
        op: Op,
        /// What happened to the connection.
        reason: String,
    },
}

impl Error {
    /// The server's error code, when the server reported one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True when the connection is gone and reconnecting may help.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Error::Protocol { .. } | Error::Timeout { .. } | Error::Disconnected { .. }
        )
    }
}
