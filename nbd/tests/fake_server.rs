#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! The client against scripted servers on 127.0.0.1 that speak only part of
//! the protocol (EXPORT_NAME only, simple replies only) or break it (wrong
//! magic, unknown handle, short read, closing mid-reply, silence, refusing
//! STARTTLS). Each must end in a clear error naming the server and request —
//! never a hang or a panic.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use warden_nbd::{
    Client, Command, Completion, Connection, Errno, Error, Negotiation, Options, Request,
};

fn opts() -> Options {
    Options {
        timeout: Duration::from_secs(2),
        ..Options::default()
    }
}

#[test]
fn export_name_fallback_when_go_is_unknown() {
    let fake = Fake::start(|mut s| {
        let name = handshake(
            &mut s,
            Hs {
                go: false,
                structured: false,
                ..Hs::default()
            },
        );
        assert_eq!(name, "fake");
        // Serve one READ and one WRITE with simple replies, then DISC.
        let r = read_request(&mut s).unwrap();
        assert_eq!((r.cmd, r.offset, r.len), (0, 4096, 512));
        simple_reply(&mut s, r.handle, 0, &[7u8; 512]);
        let w = read_request(&mut s).unwrap();
        assert_eq!((w.cmd, w.offset, w.data.len()), (1, 0, 3));
        simple_reply(&mut s, w.handle, 0, &[]);
        let d = read_request(&mut s).unwrap();
        assert_eq!(d.cmd, 2, "expected NBD_CMD_DISC on close");
    });
    let client = Client::connect(&fake.uri("nbd"), &opts()).unwrap();
    let info = *client.info();
    assert_eq!(info.negotiation, Negotiation::ExportName);
    assert_eq!(info.size, 1 << 20);
    assert!(!info.structured_replies && !info.base_allocation);
    assert!(!info.block_sizes.advertised);
    assert_eq!(client.read(4096, 512).unwrap(), vec![7u8; 512]);
    client.write_at(0, b"abc", false).unwrap();
    // BLOCK_STATUS needs base:allocation: refused locally, nothing sent.
    let e = client.block_status(0, 4096).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e}");
    client.close();
    fake.join();
}

#[test]
fn non_fixed_newstyle_server_goes_straight_to_export_name() {
    let fake = Fake::start(|mut s| {
        greet(&mut s, false);
        let (opt, name) = read_option(&mut s).unwrap();
        assert_eq!((opt, name.as_slice()), (1, &b"fake"[..]));
        let mut r = (8192u64).to_be_bytes().to_vec();
        r.extend_from_slice(&FLAGS.to_be_bytes());
        r.extend_from_slice(&[0u8; 124]);
        s.write_all(&r).unwrap();
        let d = read_request(&mut s).unwrap();
        assert_eq!(d.cmd, 2);
    });
    let conn = Connection::connect(&fake.uri("nbd"), &opts()).unwrap();
    assert_eq!(conn.info().size, 8192);
    assert_eq!(conn.info().negotiation, Negotiation::ExportName);
    conn.close();
    fake.join();
}

#[test]
fn replies_out_of_order_are_matched_by_handle() {
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        let reqs: Vec<Req> = (0..8).map(|_| read_request(&mut s).unwrap()).collect();
        // Answer in reverse, each READ in two chunks: a hole and data.
        for r in reqs.iter().rev() {
            let half = u64::from(r.len / 2);
            let mut hole = r.offset.to_be_bytes().to_vec();
            hole.extend_from_slice(&(r.len / 2).to_be_bytes());
            chunk(&mut s, 0, 2, r.handle, &hole);
            let mut data = (r.offset + half).to_be_bytes().to_vec();
            data.extend(std::iter::repeat_n((r.offset / 4096) as u8, half as usize));
            chunk(&mut s, 1, 1, r.handle, &data);
        }
        assert_eq!(read_request(&mut s).unwrap().cmd, 2);
    });
    let conn = Connection::connect(&fake.uri("nbd"), &opts()).unwrap();
    let pending: Vec<_> = (0..8u64)
        .map(|i| {
            conn.submit(Request::Read {
                offset: i * 4096,
                length: 4096,
            })
            .unwrap()
        })
        .collect();
    assert_eq!(conn.in_flight(), 8);
    for (i, p) in pending.into_iter().enumerate() {
        let Completion::Data(data) = p.wait().unwrap() else {
            panic!("not data")
        };
        assert!(data[..2048].iter().all(|&b| b == 0));
        assert!(data[2048..].iter().all(|&b| b == i as u8));
    }
    conn.close();
    fake.join();
}

/// Runs `misbehave` after the handshake and one request; returns the error
/// the client's READ got.
fn read_error_after(
    misbehave: impl FnOnce(&mut std::net::TcpStream, Req) + Send + 'static,
) -> Error {
    let fake = Fake::start(move |mut s| {
        handshake(&mut s, Hs::default());
        let r = read_request(&mut s).unwrap();
        misbehave(&mut s, r);
        // Keep the socket open until the client gives up, so an error can
        // only come from the client's own checks or timeout.
        let _ = read_request(&mut s);
    });
    let conn = Connection::connect(&fake.uri("nbd"), &opts()).unwrap();
    let err = conn
        .call(Request::Read {
            offset: 8192,
            length: 4096,
        })
        .unwrap_err();
    // The connection is dead now: later requests fail at once, clearly.
    let again = conn.call(Request::Flush).unwrap_err();
    assert!(again.is_connection_lost(), "{again}");
    conn.close();
    fake.join();
    let text = err.to_string();
    assert!(text.contains("127.0.0.1"), "error names the server: {text}");
    assert!(
        text.contains("READ offset 8192 length 4096"),
        "error names the request: {text}"
    );
    err
}

#[test]
fn wrong_magic_is_a_protocol_error() {
    let e = read_error_after(|s, _| s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).unwrap());
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("bad reply magic 0xdeadbeef"), "{e}");
}

#[test]
fn unknown_handle_is_a_protocol_error() {
    let e = read_error_after(|s, r| simple_reply(s, r.handle + 1000, 0, &[]));
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("not in flight"), "{e}");
}

#[test]
fn chunk_outside_the_request_is_a_protocol_error() {
    let e = read_error_after(|s, r| {
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[1u8; 16]);
        chunk(s, 1, 1, r.handle, &data);
    });
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("outside the request"), "{e}");
}

#[test]
fn short_reply_then_close_is_a_lost_connection() {
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        let r = read_request(&mut s).unwrap();
        // Header promises 4104 bytes of payload; send 100 and hang up.
        let mut h = STRUCTURED.to_be_bytes().to_vec();
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&r.handle.to_be_bytes());
        h.extend_from_slice(&4104u32.to_be_bytes());
        h.extend_from_slice(&[0u8; 100]);
        s.write_all(&h).unwrap();
    });
    let conn = Connection::connect(&fake.uri("nbd"), &opts()).unwrap();
    let e = conn
        .call(Request::Read {
            offset: 0,
            length: 4096,
        })
        .unwrap_err();
    assert!(matches!(e, Error::Disconnected { .. }), "{e}");
    assert!(e.to_string().contains("middle of a reply"), "{e}");
    conn.close();
    fake.join();
}

#[test]
fn silent_server_times_out() {
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        let _r = read_request(&mut s).unwrap();
        // Say nothing; wait for the client to give up and hang up.
        let _ = read_request(&mut s);
    });
    let conn = Connection::connect(
        &fake.uri("nbd"),
        &Options {
            timeout: Duration::from_millis(500),
            ..Options::default()
        },
    )
    .unwrap();
    let e = conn.call(Request::Flush).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("FLUSH"), "{e}");
    conn.close();
    fake.join();
}

#[test]
fn server_errors_are_named_and_the_connection_goes_on() {
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        let w = read_request(&mut s).unwrap();
        simple_reply(&mut s, w.handle, 28, &[]);
        let r = read_request(&mut s).unwrap();
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&(4u16).to_be_bytes());
        e.extend_from_slice(b"disk");
        e.extend_from_slice(&(r.offset + 512).to_be_bytes());
        chunk(&mut s, 1, 0x8002, r.handle, &e);
        let f = read_request(&mut s).unwrap();
        simple_reply(&mut s, f.handle, 0, &[]);
        assert_eq!(read_request(&mut s).unwrap().cmd, 2);
    });
    let conn = Connection::connect(&fake.uri("nbd"), &opts()).unwrap();
    let e = conn
        .call(Request::Write {
            offset: 0,
            data: &[1u8; 512],
            fua: false,
        })
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::ENOSPC));
    assert!(
        e.to_string()
            .contains("WRITE offset 0 length 512: server error ENOSPC"),
        "{e}"
    );
    let e = conn
        .call(Request::Read {
            offset: 4096,
            length: 1024,
        })
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EIO));
    assert!(e.to_string().contains("EIO at offset 4608: disk"), "{e}");
    conn.call(Request::Flush).unwrap();
    conn.close();
    fake.join();
}

#[test]
fn unsupported_and_misaligned_requests_are_refused_locally() {
    let fake = Fake::start(|mut s| {
        handshake(
            &mut s,
            Hs {
                flags: 1 | 2, // HAS_FLAGS | READ_ONLY
                size: 128 << 20,
                ..Hs::default()
            },
        );
        assert_eq!(
            read_request(&mut s).unwrap().cmd,
            2,
            "nothing but DISC may arrive"
        );
    });
    let client = Client::connect(&fake.uri("nbd"), &opts()).unwrap();
    for e in [
        client.write_at(0, &[0u8; 512], false).unwrap_err(),
        client.flush().unwrap_err(),
        client.trim(0, 512, false).unwrap_err(),
        client.read(client.size() - 512, 1024).unwrap_err(),
    ] {
        assert!(matches!(e, Error::InvalidRequest { .. }), "{e}");
    }
    let e = client
        .connection()
        .call(Request::Read {
            offset: 0,
            length: 64 << 20,
        })
        .unwrap_err();
    assert!(e.to_string().contains("maximum block size"), "{e}");
    assert!(matches!(
        e,
        Error::InvalidRequest {
            op: warden_nbd::Op {
                command: Command::Read,
                ..
            },
            ..
        }
    ));
    client.close();
    fake.join();
}

#[test]
fn reused_read_buffers_never_show_stale_bytes() {
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        // First READ: all data, so the client's pooled buffer is left full
        // of 0xee.
        let r = read_request(&mut s).unwrap();
        let mut data = r.offset.to_be_bytes().to_vec();
        data.extend(vec![0xeeu8; r.len as usize]);
        chunk(&mut s, 1, 1, r.handle, &data);
        // Second READ of the same range, into that buffer: a hole over the
        // first half, data over the second.
        let r = read_request(&mut s).unwrap();
        let half = r.len / 2;
        let mut hole = r.offset.to_be_bytes().to_vec();
        hole.extend_from_slice(&half.to_be_bytes());
        chunk(&mut s, 0, 2, r.handle, &hole);
        let mut data = (r.offset + u64::from(half)).to_be_bytes().to_vec();
        data.extend(vec![0x11u8; (r.len - half) as usize]);
        chunk(&mut s, 1, 1, r.handle, &data);
        let _ = read_request(&mut s);
    });
    let client = Client::connect(&fake.uri("nbd"), &opts()).unwrap();
    let mut buf = vec![0u8; 4096];
    client.read_at(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xee));
    client.read_at(8192, &mut buf).unwrap();
    assert!(
        buf[..2048].iter().all(|&b| b == 0),
        "the hole reads as zero"
    );
    assert!(buf[2048..].iter().all(|&b| b == 0x11));
    client.close();
    fake.join();
}

#[test]
fn a_small_read_after_a_large_one_gets_exactly_its_bytes() {
    // The pooled buffer of the first READ is longer than the second needs:
    // the second must still get exactly its own length back.
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        for fill in [0x11u8, 0x22] {
            let r = read_request(&mut s).unwrap();
            let mut data = r.offset.to_be_bytes().to_vec();
            data.extend(vec![fill; r.len as usize]);
            chunk(&mut s, 1, 1, r.handle, &data);
        }
        let _ = read_request(&mut s);
    });
    let client = Client::connect(&fake.uri("nbd"), &opts()).unwrap();
    let mut big = vec![0u8; 65536];
    client.read_at(0, &mut big).unwrap();
    assert!(big.iter().all(|&b| b == 0x11));
    let small = client.read(4096, 600).unwrap();
    assert_eq!(small, vec![0x22u8; 600]);
    client.close();
    fake.join();
}

#[test]
fn read_into_lands_in_place_and_leaves_the_rest_of_the_buffer() {
    let fake = Fake::start(|mut s| {
        handshake(&mut s, Hs::default());
        // A hole over the first quarter, data over the rest.
        let r = read_request(&mut s).unwrap();
        let quarter = r.len / 4;
        let mut hole = r.offset.to_be_bytes().to_vec();
        hole.extend_from_slice(&quarter.to_be_bytes());
        chunk(&mut s, 0, 2, r.handle, &hole);
        let mut data = (r.offset + u64::from(quarter)).to_be_bytes().to_vec();
        data.extend(vec![0x5au8; (r.len - quarter) as usize]);
        chunk(&mut s, 1, 1, r.handle, &data);
        let _ = read_request(&mut s);
    });
    let client = Client::connect(&fake.uri("nbd"), &opts()).unwrap();
    // 100 bytes before and 60 after the 4096 read stay as they were.
    let buf = vec![0xeeu8; 100 + 4096 + 60];
    let ptr = buf.as_ptr();
    let buf = client.read_into(8192, buf, 100, 4096).unwrap();
    assert_eq!(
        buf.as_ptr(),
        ptr,
        "the reply was received into another buffer"
    );
    assert_eq!(buf.len(), 100 + 4096 + 60, "the buffer was resized");
    assert!(
        buf[..100].iter().all(|&b| b == 0xee),
        "bytes before the read changed"
    );
    assert!(
        buf[100..1124].iter().all(|&b| b == 0),
        "the hole reads as zero"
    );
    assert!(buf[1124..4196].iter().all(|&b| b == 0x5a));
    assert!(
        buf[4196..].iter().all(|&b| b == 0xee),
        "bytes after the read changed"
    );
    client.close();
    fake.join();
}

#[test]
fn oversized_and_overlapping_data_chunks_are_protocol_errors() {
    // A length far past the request: refused from the header, before any
    // payload is read (or allocated).
    let e = read_error_after(|s, r| {
        let mut h = STRUCTURED.to_be_bytes().to_vec();
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&r.handle.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&h).unwrap();
    });
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("payload length 4294967295"), "{e}");
    let e = read_error_after(|s, r| {
        let mut data = (r.offset + 1024).to_be_bytes().to_vec();
        data.extend_from_slice(&[1u8; 2048]);
        chunk(s, 0, 1, r.handle, &data);
        let mut data = (r.offset + 2048).to_be_bytes().to_vec();
        data.extend_from_slice(&[2u8; 2048]);
        chunk(s, 1, 1, r.handle, &data);
    });
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("overlaps"), "{e}");
}
