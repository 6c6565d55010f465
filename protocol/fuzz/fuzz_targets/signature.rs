//! Fuzzes the `TPMT_SIGNATURE` parser: quote signatures come from nodes, so
//! they are untrusted. Seeded with real swtpm RSASSA and ECDSA signatures.
#![no_main]
use libfuzzer_sys::fuzz_target;
use warden_protocol::tpm::quote::parse_signature;

fuzz_target!(|data: &[u8]| {
    if let Ok(signature) = parse_signature(data) {
        let _ = (signature.alg(), signature.hash());
    }
});
