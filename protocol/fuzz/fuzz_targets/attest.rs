//! Fuzzes the `TPMS_ATTEST` (quote) parser: the quoted bytes come from nodes,
//! so they are untrusted. Seeded with real swtpm quotes (RSA and ECC AKs).
#![no_main]
use libfuzzer_sys::fuzz_target;
use warden_protocol::tpm::quote::parse_attest;

fuzz_target!(|data: &[u8]| {
    if let Ok(attest) = parse_attest(data) {
        for selection in &attest.quoted.pcr_select {
            let _ = selection.pcrs();
        }
    }
});
