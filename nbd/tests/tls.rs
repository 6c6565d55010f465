#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! STARTTLS against `nbdkit --tls=require` with a test CA made by certtool;
//! and the refusals: an nbds:// URI against a server without TLS (real and
//! scripted) never continues in plaintext, a wrong CA fails the TLS
//! handshake, and nbd:// against a TLS-only server says TLS is required.

mod common;

use std::path::Path;

use common::*;
use warden_nbd::{Client, Connection, Error, Options, ZeroFlags};

fn tls_opts(ca: &Path) -> Options {
    Options {
        ca_file: Some(ca.to_path_buf()),
        ..Options::default()
    }
}

#[test]
fn nbds_round_trip_through_nbdkit_tls_require() {
    let test = "nbds_round_trip_through_nbdkit_tls_require";
    if !have_tool("nbdkit", test) || !have_tool("certtool", test) {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let ca = warden_nbd::testing::make_test_pki(pki.path(), "Warden test CA").unwrap();
    let server = Server::nbdkit(&[
        "--tls=require",
        &format!("--tls-certificates={}", pki.path().display()),
        "memory",
        "size=64M",
    ]);
    let client = Client::connect_many(&server.uri("nbds", ""), &tls_opts(&ca), 2).unwrap();
    assert!(client.info().tls && client.info().structured_replies);
    // Enough data for many TLS records in both directions, with requests
    // from several pieces in flight at once.
    let data = pattern(40 << 20, 5);
    client.write_at(0, &data, false).unwrap();
    client
        .write_zeroes(1 << 20, 1 << 20, ZeroFlags::default())
        .unwrap();
    client.flush().unwrap();
    let back = client.read(0, data.len()).unwrap();
    assert_eq!(&back[..1 << 20], &data[..1 << 20]);
    assert!(back[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert_eq!(&back[2 << 20..], &data[2 << 20..]);
    assert!(!client.block_status(0, 64 << 20).unwrap().is_empty());
    client.close();

    // A CA that did not sign the server's certificate: the TLS handshake fails.
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = warden_nbd::testing::make_test_pki(other.path(), "Some other CA").unwrap();
    let e = Connection::connect(&server.uri("nbds", ""), &tls_opts(&wrong_ca)).unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e}");
    assert!(e.to_string().contains("TLS handshake failed"), "{e}");

    // nbd:// to a TLS-only server: refused, and the error says why.
    let e = Connection::connect(&server.uri("nbd", ""), &Options::default()).unwrap_err();
    assert!(matches!(e, Error::Handshake { .. }), "{e}");
    assert!(e.to_string().contains("requires TLS"), "{e}");
}

#[test]
fn nbds_against_a_server_without_tls_is_refused() {
    let test = "nbds_against_a_server_without_tls_is_refused";
    if !have_tool("nbdkit", test) || !have_tool("certtool", test) {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let ca = warden_nbd::testing::make_test_pki(pki.path(), "Warden test CA").unwrap();
    let server = Server::nbdkit(&["--tls=off", "memory", "size=1M"]);
    let e = Connection::connect(&server.uri("nbds", ""), &tls_opts(&ca)).unwrap_err();
    assert!(matches!(e, Error::TlsRefused { .. }), "{e}");
    assert!(
        e.to_string().contains("never falls back to plaintext"),
        "{e}"
    );
}

#[test]
fn scripted_server_refusing_starttls_gets_no_further_option() {
    let test = "scripted_server_refusing_starttls_gets_no_further_option";
    if !have_tool("certtool", test) {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let ca = warden_nbd::testing::make_test_pki(pki.path(), "Warden test CA").unwrap();
    let fake = Fake::start(|mut s| {
        greet(&mut s, true);
        let (opt, _) = read_option(&mut s).unwrap();
        assert_eq!(opt, 5, "STARTTLS must be the first option");
        opt_reply(&mut s, opt, REP_ERR_POLICY, b"no TLS here");
        assert!(
            read_option(&mut s).is_none(),
            "the client went on in plaintext"
        );
    });
    let e = Connection::connect(&fake.uri("nbds"), &tls_opts(&ca)).unwrap_err();
    assert!(matches!(e, Error::TlsRefused { .. }), "{e}");
    assert!(
        e.to_string().contains("NBD_REP_ERR_POLICY: no TLS here"),
        "{e}"
    );
    fake.join();
}

#[test]
fn nbds_without_a_ca_bundle_is_refused_before_connecting() {
    let uri = warden_nbd::Uri::parse("nbds://127.0.0.1:1/x").unwrap();
    let e = Client::connect(&uri, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("needs a CA bundle"), "{e}");
}
