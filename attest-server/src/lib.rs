//! The Warden attestation server and its admin client.
//!
//! This crate owns the server side of the protocol in `warden-protocol`:
//! its PKI ([`pki`]), its records ([`db`]), its HTTP API ([`api`]), start-up
//! ([`server`]) and the client behind `wardenctl` ([`client`]). The
//! binaries in `src/bin/` only parse flags and call into here. Nothing in
//! this crate may trust an identity the agent asserts: node ids are derived
//! from the submitted EK ([`ek`]).

pub mod api;
pub mod attest_api;
pub mod auth;
pub mod boot;
pub mod client;
pub mod db;
pub mod ek;
pub mod enroll;
pub mod eventlog_text;
pub mod keys;
pub mod metrics;
pub mod nonces;
pub mod openapi;
pub mod pki;
pub mod quarantine;
pub mod server;
pub mod turnover;
pub mod turnover_api;
pub mod uki;
pub mod verify;
pub mod watch;
