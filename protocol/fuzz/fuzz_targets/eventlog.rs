//! Fuzzes the TCG event-log parser, replay and comparison: event logs come
//! from nodes, so they are untrusted bytes. Seed the corpus with the real log
//! (`protocol/tests/data/ovmf-swtpm-6.1.eventlog`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use warden_protocol::eventlog::{compare, parse, replay, HashAlg};

fuzz_target!(|data: &[u8]| {
    if let Ok(log) = parse(data) {
        for alg in [HashAlg::Sha256, HashAlg::Sha384] {
            if let Ok(pcrs) = replay(&log, alg) {
                for mismatch in compare(&log, alg, &pcrs, &Default::default(), &[0, 4, 7, 9]) {
                    let _ = mismatch.to_string();
                }
            }
        }
    }
});
