//! The Warden agent: PID 1 of the Warden ramdisk.
//!
//! Module boundaries follow the data flow of ARCHITECTURE.md: `init` (mounts,
//! reaping, halting), `coldplug` (kernel modules), `net` (DHCP), `tpm`,
//! `eventlog`, `disk` (inventory), `client` (talks to the server over pinned
//! TLS) and `workflow` (the state machine that runs one boot). `config` reads
//! the kernel command line or host flags; `console` prints the `WARDEN {json}`
//! lines.

pub mod client;
pub mod coldplug;
pub mod config;
pub mod console;
pub mod digest;
pub mod disk;
pub mod eventlog;
pub mod handoff;
pub mod image;
pub mod init;
pub mod measured;
pub mod net;
pub mod snapshot;
pub mod telemetry;
pub mod tpm;
pub mod wipe;
pub mod workflow;
pub mod zeros;
