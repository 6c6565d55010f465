#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! The client against qemu-nbd (run in the foreground as a child, killed at
//! the end) serving a sparse raw file on 127.0.0.1: handshake with GO, block
//! sizes, round trips checked against the backing file, BLOCK_STATUS holes.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::*;
use warden_nbd::{Client, Negotiation, Options, ZeroFlags};

const MIB: u64 = 1 << 20;

#[test]
fn qemu_nbd_round_trips_and_holes() {
    if !have_tool("qemu-nbd", "qemu_nbd_round_trips_and_holes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let file = File::create(&path).unwrap();
    file.set_len(64 * MIB).unwrap();
    let seeded = pattern(MIB as usize, 31);
    file.write_all_at(&seeded, 16 * MIB).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let server = Server::qemu_nbd(
        &path,
        "disk0",
        &["--discard=unmap", "--cache=none", "--aio=threads"],
    );
    let client = Client::connect_many(&server.uri("nbd", "disk0"), &Options::default(), 4).unwrap();
    let info = *client.info();
    eprintln!(
        "qemu-nbd: {info:?}, {} connection(s)",
        client.connections().len()
    );
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.negotiation, Negotiation::Go);
    assert!(info.structured_replies && info.base_allocation);
    assert!(
        info.block_sizes.advertised,
        "qemu-nbd answers NBD_INFO_BLOCK_SIZE"
    );

    let extents = client.block_status(0, 64 * MIB).unwrap();
    eprintln!("extents: {extents:?}");
    let at = |off: u64| {
        *extents
            .iter()
            .find(|e| e.offset <= off && off < e.offset + e.length)
            .unwrap()
    };
    assert!(at(0).is_hole() && at(0).is_zero(), "{extents:?}");
    assert!(!at(16 * MIB).is_hole(), "{extents:?}");
    assert!(at(40 * MIB).is_hole(), "{extents:?}");
    // Reads of holes come back as OFFSET_HOLE chunks and must read as zero.
    let back = client.read(15 * MIB, 3 * MIB as usize).unwrap();
    assert!(back[..MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(&back[MIB as usize..2 * MIB as usize], &seeded[..]);
    assert!(back[2 * MIB as usize..].iter().all(|&b| b == 0));

    let data = pattern(9 * MIB as usize, 32);
    client.write_at(32 * MIB, &data, false).unwrap();
    client
        .write_zeroes(33 * MIB, MIB, ZeroFlags::default())
        .unwrap();
    client.trim(16 * MIB, MIB, false).unwrap();
    client.flush().unwrap();
    let file = File::open(&path).unwrap();
    let mut on_disk = vec![0u8; data.len()];
    file.read_exact_at(&mut on_disk, 32 * MIB).unwrap();
    let mut expect = data.clone();
    expect[MIB as usize..2 * MIB as usize].fill(0);
    assert_eq!(on_disk, expect);
    assert_eq!(client.read(32 * MIB, data.len()).unwrap(), expect);
    // discard=unmap punched the trimmed megabyte out.
    assert!(client.block_status(16 * MIB, MIB).unwrap()[0].is_hole());
    client.close();
}
