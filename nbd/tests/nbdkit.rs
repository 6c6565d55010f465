#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! The client against real nbdkit servers on 127.0.0.1: the `memory` and
//! `file` plugins, the `blocksize-policy` filter (block sizes honoured) and
//! the `error` filter (server errors mapped with their offset). Each test
//! starts its own server and kills it at the end.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use common::*;
use warden_nbd::{Client, Completion, Errno, Error, Negotiation, Options, Request, ZeroFlags};

const MIB: u64 = 1 << 20;

#[test]
fn memory_plugin_handshake_and_round_trips() {
    if !have_tool("nbdkit", "memory_plugin_handshake_and_round_trips") {
        return;
    }
    let server = Server::nbdkit(&["memory", "size=64M"]);
    let client = Client::connect(&server.uri("nbd", ""), &Options::default()).unwrap();
    let info = *client.info();
    eprintln!("nbdkit memory: {info:?}");
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.negotiation, Negotiation::Go);
    assert!(info.structured_replies && info.base_allocation);
    assert!(info.flags.can_flush() && info.flags.can_trim() && info.flags.can_write_zeroes());
    assert!(!info.flags.read_only());

    // Larger than one request: split at the maximum and pipelined.
    let data = pattern(40 * MIB as usize + 4096, 1);
    client.write_at(MIB, &data, false).unwrap();
    assert_eq!(client.read(MIB, data.len()).unwrap(), data);
    if info.flags.can_fua() {
        client.write_at(0, &[9u8; 4096], true).unwrap();
        assert_eq!(client.read(0, 4096).unwrap(), vec![9u8; 4096]);
    }
    client
        .write_zeroes(2 * MIB, MIB, ZeroFlags::default())
        .unwrap();
    client
        .write_zeroes(
            4 * MIB,
            MIB,
            ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            },
        )
        .unwrap();
    let back = client.read(MIB, 5 * MIB as usize).unwrap();
    assert_eq!(&back[..MIB as usize], &data[..MIB as usize]);
    assert!(back[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(
        &back[2 * MIB as usize..3 * MIB as usize],
        &data[2 * MIB as usize..3 * MIB as usize]
    );
    assert!(back[3 * MIB as usize..4 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        &back[4 * MIB as usize..],
        &data[4 * MIB as usize..5 * MIB as usize]
    );
    if info.flags.can_fast_zero() {
        // The memory plugin zeroes cheaply; either it does, or it says
        // ENOTSUP, which is exactly FAST_ZERO's contract.
        let fast = ZeroFlags {
            fast_zero: true,
            ..ZeroFlags::default()
        };
        match client.write_zeroes(10 * MIB, MIB, fast) {
            Ok(()) => assert!(client
                .read(10 * MIB, MIB as usize)
                .unwrap()
                .iter()
                .all(|&b| b == 0)),
            Err(e) => assert_eq!(e.errno(), Some(Errno::ENOTSUP), "{e}"),
        }
    }
    client.trim(20 * MIB, 4 * MIB, false).unwrap();
    client.flush().unwrap();

    // The memory plugin is sparse: untouched space is a hole, data is not.
    let extents = client.block_status(0, info.size).unwrap();
    assert_eq!(extents.first().unwrap().offset, 0);
    let last = extents.last().unwrap();
    assert_eq!(last.offset + last.length, info.size);
    let at = |off: u64| {
        *extents
            .iter()
            .find(|e| e.offset <= off && off < e.offset + e.length)
            .unwrap()
    };
    assert!(at(50 * MIB).is_hole(), "{extents:?}");
    assert!(!at(MIB + 4096).is_hole(), "{extents:?}");
    client.close();
}

#[test]
fn many_requests_in_flight_from_many_threads() {
    if !have_tool("nbdkit", "many_requests_in_flight_from_many_threads") {
        return;
    }
    let server = Server::nbdkit(&["memory", "size=32M"]);
    let client = Client::connect(&server.uri("nbd", ""), &Options::default()).unwrap();
    let conn = client.connection();
    // One thread, 64 requests submitted before any reply is read.
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(64 * 1024, i)).collect();
    let pending: Vec<_> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            conn.submit(Request::Write {
                offset: i as u64 * 65536,
                data: b,
                fua: false,
            })
            .unwrap()
        })
        .collect();
    for p in pending {
        assert_eq!(p.wait().unwrap(), Completion::Done);
    }
    // Eight threads reading and writing at once on the same connection.
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let blocks = &blocks;
            let client = &client;
            scope.spawn(move || {
                for round in 0..16u64 {
                    let i = ((t * 16 + round) % 64) as usize;
                    let got = conn
                        .call(Request::Read {
                            offset: i as u64 * 65536,
                            length: 65536,
                        })
                        .unwrap();
                    assert_eq!(got, Completion::Data(blocks[i].clone()));
                    let mine = pattern(4096, 1000 + t);
                    let offset = 8 * MIB + t * MIB + round * 4096;
                    client.write_at(offset, &mine, false).unwrap();
                    assert_eq!(client.read(offset, 4096).unwrap(), mine);
                }
            });
        }
    });
    assert_eq!(conn.in_flight(), 0);
    client.close();
}

#[test]
fn multi_conn_spreads_requests_over_connections() {
    if !have_tool("nbdkit", "multi_conn_spreads_requests_over_connections") {
        return;
    }
    // The multi-conn filter makes the advertisement explicit whatever the
    // plugin's default.
    let server = Server::nbdkit(&[
        "--filter=multi-conn",
        "memory",
        "size=64M",
        "multi-conn-mode=emulate",
    ]);
    let client = Client::connect_many(&server.uri("nbd", ""), &Options::default(), 4).unwrap();
    assert!(client.info().flags.can_multi_conn());
    assert_eq!(client.connections().len(), 4);
    let data = pattern(16 * MIB as usize, 7);
    // 16 MiB in 4 MiB... whatever the maximum: pieces go round robin.
    client.write_at(0, &data, false).unwrap();
    client.flush().unwrap();
    assert_eq!(client.read(0, data.len()).unwrap(), data);
    // Each connection sees what the others wrote.
    for (i, conn) in client.connections().iter().enumerate() {
        let got = conn
            .call(Request::Read {
                offset: i as u64 * MIB,
                length: 4096,
            })
            .unwrap();
        assert_eq!(
            got,
            Completion::Data(data[i * MIB as usize..i * MIB as usize + 4096].to_vec())
        );
    }
    client.close();

    // Without the advertisement, one connection only.
    let single = Server::nbdkit(&[
        "--filter=multi-conn",
        "memory",
        "size=1M",
        "multi-conn-mode=disable",
    ]);
    let client = Client::connect_many(&single.uri("nbd", ""), &Options::default(), 4).unwrap();
    assert!(!client.info().flags.can_multi_conn());
    assert_eq!(client.connections().len(), 1);
    client.close();
}

#[test]
fn block_sizes_are_honoured() {
    if !have_tool("nbdkit", "block_sizes_are_honoured") {
        return;
    }
    // The policy filter advertises the sizes and errors any request that
    // breaks them, so a passing round trip proves the client split and
    // aligned its requests.
    let server = Server::nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "size=16M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=262144",
        "blocksize-error-policy=error",
    ]);
    let client = Client::connect(&server.uri("nbd", ""), &Options::default()).unwrap();
    let sizes = client.info().block_sizes;
    eprintln!("advertised: {sizes:?}");
    assert!(sizes.advertised);
    assert_eq!(
        (sizes.minimum, sizes.preferred, sizes.maximum),
        (4096, 65536, 262144)
    );
    let data = pattern(3 * MIB as usize, 3);
    client.write_at(4096, &data, false).unwrap();
    assert_eq!(client.read(4096, data.len()).unwrap(), data);
    let e = client.read(512, 4096).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e}");
    assert!(e.to_string().contains("minimum block size of 4096"), "{e}");
    client.close();
}

#[test]
fn simple_replies_when_structured_replies_are_off() {
    if !have_tool("nbdkit", "simple_replies_when_structured_replies_are_off") {
        return;
    }
    let server = Server::nbdkit(&["memory", "size=8M"]);
    let opts = Options {
        structured_replies: false,
        ..Options::default()
    };
    let client = Client::connect(&server.uri("nbd", ""), &opts).unwrap();
    assert!(!client.info().structured_replies);
    let data = pattern(3 * MIB as usize, 11);
    client.write_at(0, &data, false).unwrap();
    assert_eq!(client.read(0, data.len()).unwrap(), data);
    client.close();
}

#[test]
fn file_plugin_round_trips_match_the_backing_file() {
    if !have_tool("nbdkit", "file_plugin_round_trips_match_the_backing_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let file = File::create(&path).unwrap();
    file.set_len(32 * MIB).unwrap();
    // Data at 4 MiB..4 MiB + 256 KiB; the rest is a hole.
    let seeded = pattern(256 * 1024, 21);
    file.write_all_at(&seeded, 4 * MIB).unwrap();
    file.sync_all().unwrap();
    let server = Server::nbdkit(&["file", &format!("file={}", path.display())]);
    let client = Client::connect(&server.uri("nbd", ""), &Options::default()).unwrap();
    assert_eq!(client.size(), 32 * MIB);

    // BLOCK_STATUS reports the sparse layout.
    let extents = client.block_status(0, 32 * MIB).unwrap();
    eprintln!("extents: {extents:?}");
    let at = |off: u64| {
        extents
            .iter()
            .find(|e| e.offset <= off && off < e.offset + e.length)
            .unwrap()
    };
    assert!(at(0).is_hole() && at(0).is_zero());
    assert!(!at(4 * MIB).is_hole());
    assert!(at(20 * MIB).is_hole());
    assert_eq!(client.read(4 * MIB, seeded.len()).unwrap(), seeded);

    // Writes, zeroes and trims land in the file.
    let data = pattern(MIB as usize, 22);
    client
        .write_at(8 * MIB, &data, client.info().flags.can_fua())
        .unwrap();
    client
        .write_zeroes(8 * MIB + 4096, 8192, ZeroFlags::default())
        .unwrap();
    client.trim(4 * MIB, 64 * 1024, false).unwrap();
    client.flush().unwrap();
    let mut on_disk = vec![0u8; MIB as usize];
    let mut f = OpenOptions::new().read(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(8 * MIB)).unwrap();
    f.read_exact(&mut on_disk).unwrap();
    let mut expect = data.clone();
    expect[4096..4096 + 8192].fill(0);
    assert_eq!(on_disk, expect);
    // The file plugin punches a hole for TRIM: it reads back as zeroes.
    let mut trimmed = vec![1u8; 64 * 1024];
    f.read_exact_at(&mut trimmed, 4 * MIB).unwrap();
    assert!(trimmed.iter().all(|&b| b == 0));
    assert!(client.block_status(4 * MIB, 64 * 1024).unwrap()[0].is_zero());
    client.close();
}

#[test]
fn error_filter_errors_are_mapped_with_their_offset() {
    if !have_tool("nbdkit", "error_filter_errors_are_mapped_with_their_offset") {
        return;
    }
    let server = Server::nbdkit(&[
        "--filter=error",
        "memory",
        "size=8M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
    ]);
    let client = Client::connect(&server.uri("nbd", ""), &Options::default()).unwrap();
    let e = client.read(3 * MIB, 65536).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EIO), "{e}");
    let text = e.to_string();
    assert!(text.contains("READ offset 3145728 length 65536"), "{text}");
    assert!(text.contains("server error EIO"), "{text}");
    let e = client.write_at(MIB, &[1u8; 4096], false).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::ENOSPC), "{e}");
    assert!(
        e.to_string().contains("WRITE offset 1048576 length 4096"),
        "{e}"
    );
    // Errors do not end the connection.
    client.flush().unwrap();
    client.close();
}
