//! SHA-256 and SHA-512 of the bulk data the agent hashes: an image as it is
//! served, a disk's chunks in a snapshot, an image read back.
//!
//! These run on ring's hand-written assembly (ring is already in the agent
//! through rustls; no new crate). Where the CPU has SHA-NI both
//! `ring` and `sha2` use it and run alike; where it has not — Skylake and
//! Cascade Lake Xeons, and the emulated CPU of the QEMU tests — ring's
//! SHA-256 is ~1.4× faster than `sha2`'s portable code (109 against
//! 78 MB/s in `qemu-x86_64 -cpu qemu64` at the ramdisk's opt-level). The
//! wipe's read-back hashes through it too. Small one-off digests (records,
//! keys, config) stay on `sha2`, whose `Digest` trait the TPM and signature
//! code shares.

use ring::digest::{Context, SHA256};
use warden_protocol::image::DigestAlgorithm;

/// A streaming SHA-256.
#[derive(Clone)]
pub struct Sha256(Context);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256(Context::new(&SHA256))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finalize(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // ring's SHA-256 output is always 32 bytes.
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }

    /// SHA-256 of `data` in one call.
    pub fn digest(data: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(data);
        h.finalize()
    }
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

/// A streaming SHA-256 or SHA-512, chosen at run time (an image's checksum).
#[derive(Clone)]
pub struct StreamHash(Context);

impl StreamHash {
    pub fn new(alg: DigestAlgorithm) -> StreamHash {
        match alg {
            DigestAlgorithm::Sha256 => StreamHash::sha256(),
            DigestAlgorithm::Sha512 => StreamHash::sha512(),
        }
    }

    pub fn sha256() -> StreamHash {
        StreamHash(Context::new(&SHA256))
    }

    pub fn sha512() -> StreamHash {
        StreamHash(Context::new(&ring::digest::SHA512))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// The same digests as `sha2` for every length around the block size
    /// and for data fed in uneven pieces.
    #[test]
    fn digests_match_sha2_for_any_split() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for len in [0, 1, 55, 56, 63, 64, 65, 127, 128, 129, 4096, 10_000] {
            let d = &data[..len];
            let want256: [u8; 32] = sha2::Sha256::digest(d).into();
            assert_eq!(Sha256::digest(d), want256, "sha256 of {len} bytes");
            let mut h = Sha256::new();
            let mut s = StreamHash::sha512();
            for piece in d.chunks(37) {
                h.update(piece);
                s.update(piece);
            }
            assert_eq!(h.finalize(), want256, "sha256 of {len} bytes in pieces");
            assert_eq!(
                s.finish(),
                sha2::Sha512::digest(d).to_vec(),
                "sha512 of {len} bytes"
            );
        }
    }
}
