//! Zero detection, shared by the steps that must tell zeros from data at
//! memory speed: the wipe's read-back, the snapshot (zero chunks are not
//! hashed or sent) and the restore. It only reads; it never decides what a
//! zero run means for a disk — the callers do.

/// Whether `data` is all zeros. Reads the data once (a comparison with a
/// buffer of zeros reads twice as much memory): an OR over each 4 KiB block,
/// which the compiler vectorises, stopping at the first block that is not
/// zero (data chunks are rejected in their first block).
pub fn is_zero(data: &[u8]) -> bool {
    const BLOCK: usize = 4096;
    let mut blocks = data.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = [0u64; 8];
        for words in block.chunks_exact(64) {
            for (a, w) in acc.iter_mut().zip(words.chunks_exact(8)) {
                *a |= u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]));
            }
        }
        if acc.iter().any(|&a| a != 0) {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn is_zero_finds_a_set_byte_anywhere() {
        for len in [
            0usize,
            1,
            7,
            63,
            64,
            4095,
            4096,
            4097,
            3 * 4096 + 65,
            1 << 20,
        ] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            for at in [0, len / 2, len.saturating_sub(1), 4095, 4096, 4160] {
                if at < len {
                    v[at] = 0x80;
                    assert!(!is_zero(&v), "len {len}, byte {at}");
                    v[at] = 0;
                }
            }
        }
        // Unaligned starts too.
        let v = vec![0u8; 10_000];
        assert!(is_zero(&v[3..]));
        let mut w = v.clone();
        w[9_999] = 1;
        assert!(!is_zero(&w[3..]));
    }

    #[test]
    fn is_zero_sees_one_set_bit_anywhere() {
        for len in [0, 1, 7, 8, 9, 63, 64, 4095, 4096, 4097, 3 * 4096 + 13] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data), "{len}");
            for at in 0..len {
                data[at] = 0x80;
                assert!(!is_zero(&data), "{len} bytes, bit set at {at}");
                data[at] = 0;
            }
        }
    }
}
