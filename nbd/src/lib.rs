//! `warden-nbd`: a Network Block Device client for Warden's backups (issue
//! #6): the agent streams a node's disks to remote block storage and back.
//!
//! It is hand-written because no well-kept Rust NBD client offers what the
//! backup path needs: `NBD_OPT_GO` with block sizes, structured replies,
//! `BLOCK_STATUS` (to skip holes on restore), `WRITE_ZEROES` with
//! `FAST_ZERO`/`NO_HOLE`, STARTTLS, and many requests in flight over several
//! connections. The protocol is the one in NetworkBlockDevice/nbd
//! `doc/proto.md`.
//!
//! What it owns: the handshake (`handshake`), the byte stream with optional
//! TLS (`transport`), request/reply matching on a connection (`conn`), the
//! byte-range client over one or more connections (`client`), and the pure
//! parsers of everything the server sends (`wire`, `reply`; fuzzed by
//! `nbd/fuzz`). What it must never do: trust a length from the server before
//! checking it against the request, fall back to plaintext when TLS was asked
//! for, hang on a silent server (every wait is bounded by
//! [`Options::timeout`]), or panic — the agent is PID 1.
//!
//! ```no_run
//! use warden_nbd::{Client, Options, Uri, ZeroFlags};
//! # fn main() -> Result<(), warden_nbd::Error> {
//! let uri = Uri::parse("nbd://10.0.2.2:10809/backup")?;
//! let client = Client::connect_many(&uri, &Options::default(), 4)?;
//! client.write_at(0, &[1u8; 4096], false)?;
//! client.write_zeroes(4096, 1 << 20, ZeroFlags::default())?;
//! client.flush()?;
//! for extent in client.block_status(0, client.size())? {
//!     println!("{} +{} hole={}", extent.offset, extent.length, extent.is_hole());
//! }
//! client.close();
//! # Ok(()) }
//! ```

mod client;
mod conn;
mod error;
mod handshake;
pub mod reply;
#[cfg(feature = "testing")]
pub mod testing;
mod transport;
mod uri;
pub mod wire;

pub use client::Client;
pub use conn::{Connection, ExportInfo, Negotiation, Options, Pending, Request, ZeroFlags};
pub use error::{AtOffset, Error, Op};
pub use reply::Completion;
pub use uri::{Uri, DEFAULT_PORT};
pub use wire::{BlockSizes, Command, Errno, Extent, TransmissionFlags};
