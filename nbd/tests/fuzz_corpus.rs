#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]
//! Replays the committed fuzz corpus (nbd/fuzz/corpus/reply/, and
//! nbd/fuzz/artifacts/reply/ when a crash was kept as a regression input)
//! through `warden_nbd::reply::fuzz_reply`, the very body of the cargo-fuzz
//! target, on the stable toolchain. A panic fails the test and names the
//! file; an empty corpus, or one where nothing decodes, fails loudly.

use std::path::{Path, PathBuf};

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn reply_corpus_replays_without_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files_in(&fuzz.join("corpus").join("reply"));
    let artifacts = files_in(&fuzz.join("artifacts").join("reply"));
    assert!(
        !corpus.is_empty(),
        "nbd/fuzz/corpus/reply/ is missing or empty: it is committed, see nbd/fuzz/README.md"
    );
    let mut accepted = 0;
    for (i, path) in corpus.iter().chain(artifacts.iter()).enumerate() {
        let data = std::fs::read(path).unwrap();
        let ok = std::panic::catch_unwind(|| warden_nbd::reply::fuzz_reply(&data))
            .unwrap_or_else(|_| panic!("{} panics the reply parser", path.display()));
        if ok && i < corpus.len() {
            accepted += 1;
        }
    }
    eprintln!(
        "reply: replayed {} corpus and {} artifact files, {accepted} decode",
        corpus.len(),
        artifacts.len()
    );
    assert!(
        accepted >= 4,
        "only {accepted} corpus inputs decode: the seeds are gone (run fuzz/seed.py)"
    );
}

/// Truncations and single-byte flips of every seed: a cheap stand-in for
/// fuzzing that runs everywhere. None may panic.
#[test]
fn mutated_seeds_do_not_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/reply");
    for path in files_in(&dir) {
        let seed = std::fs::read(&path).unwrap();
        for cut in 0..seed.len() {
            let _ = warden_nbd::reply::fuzz_reply(&seed[..cut]);
        }
        for i in 0..seed.len().min(200) {
            for bit in 0..8 {
                let mut m = seed.clone();
                m[i] ^= 1 << bit;
                let r = std::panic::catch_unwind(|| warden_nbd::reply::fuzz_reply(&m));
                assert!(
                    r.is_ok(),
                    "{} with byte {i} bit {bit} flipped panics",
                    path.display()
                );
            }
        }
    }
}
