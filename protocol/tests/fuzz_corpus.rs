#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Replays the committed fuzz corpora (protocol/fuzz/corpus/<target>/, and
//! protocol/fuzz/artifacts/<target>/ when a crash was kept as a regression
//! input) through the same calls as the cargo-fuzz targets, on the stable
//! toolchain: this is how CI runs what fuzzing found without nightly.
//!
//! Keep each `replay_*` in step with protocol/fuzz/fuzz_targets/<target>.rs.
//! A panic fails the test and names the file. Each corpus must exist and
//! must hold at least one input the parser accepts — the real bytes it was
//! seeded with — so a lost or emptied corpus fails loudly.

use std::path::{Path, PathBuf};

use warden_protocol::eventlog::{self, HashAlg};
use warden_protocol::tpm::quote::{parse_attest, parse_signature};
use warden_protocol::tpm::{make_credential, parse_tpm2b_public, parse_tpmt_public};

/// A SHA-256 Name shape (0x000b ‖ 32 bytes) to bind fuzzed credentials to.
const AK_NAME: [u8; 34] = {
    let mut name = [0x11u8; 34];
    name[0] = 0x00;
    name[1] = 0x0b;
    name
};

/// fuzz_targets/eventlog.rs. True when the log parsed.
fn replay_eventlog(data: &[u8]) -> bool {
    let Ok(log) = eventlog::parse(data) else {
        return false;
    };
    for alg in [HashAlg::Sha256, HashAlg::Sha384] {
        if let Ok(pcrs) = eventlog::replay(&log, alg) {
            for mismatch in eventlog::compare(&log, alg, &pcrs, &Default::default(), &[0, 4, 7, 9])
            {
                let _ = mismatch.to_string();
            }
        }
    }
    true
}

/// fuzz_targets/attest.rs.
fn replay_attest(data: &[u8]) -> bool {
    let Ok(attest) = parse_attest(data) else {
        return false;
    };
    for selection in &attest.quoted.pcr_select {
        let _ = selection.pcrs();
    }
    true
}

/// fuzz_targets/signature.rs.
fn replay_signature(data: &[u8]) -> bool {
    let Ok(signature) = parse_signature(data) else {
        return false;
    };
    let _ = (signature.alg(), signature.hash());
    true
}

/// fuzz_targets/public.rs. True when either encoding parsed.
fn replay_public(data: &[u8]) -> bool {
    let mut parsed_any = false;
    for public in [parse_tpmt_public(data), parse_tpm2b_public(data)]
        .into_iter()
        .flatten()
    {
        let _ = public.name();
        let _ = public.spki_der();
        // The server encrypts to a node's EK: RSA-OAEP, or ECDH on the
        // node's (unchecked until then) ECC point.
        let _ = make_credential(public.marshalled(), &AK_NAME, &[0x5a; 32]);
        parsed_any = true;
    }
    parsed_any
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `replay` on every corpus and artifact file of `target`; returns
/// (corpus files, corpus files accepted by the parser).
fn replay_target(target: &str, replay: fn(&[u8]) -> bool) -> (usize, usize) {
    let corpus = files_in(&fuzz_dir().join("corpus").join(target));
    let artifacts = files_in(&fuzz_dir().join("artifacts").join(target));
    let mut accepted = 0;
    for (i, path) in corpus.iter().chain(artifacts.iter()).enumerate() {
        let data = std::fs::read(path).unwrap();
        let ok = std::panic::catch_unwind(|| replay(&data))
            .unwrap_or_else(|_| panic!("{target}: {} panics the parser", path.display()));
        if ok && i < corpus.len() {
            accepted += 1;
        }
    }
    eprintln!(
        "{target}: replayed {} corpus and {} artifact files, {accepted} parse",
        corpus.len(),
        artifacts.len()
    );
    (corpus.len(), accepted)
}

fn check(target: &str, replay: fn(&[u8]) -> bool) {
    let (files, accepted) = replay_target(target, replay);
    assert!(
        files > 0,
        "protocol/fuzz/corpus/{target}/ is missing or empty: it is committed, see protocol/fuzz/README.md"
    );
    assert!(
        accepted > 0,
        "no input in protocol/fuzz/corpus/{target}/ parses: the real seed bytes are gone"
    );
}

#[test]
fn eventlog_corpus_replays_without_panic() {
    check("eventlog", replay_eventlog);
}

#[test]
fn attest_corpus_replays_without_panic() {
    check("attest", replay_attest);
}

#[test]
fn signature_corpus_replays_without_panic() {
    check("signature", replay_signature);
}

#[test]
fn public_corpus_replays_without_panic() {
    check("public", replay_public);
}
