//! Fuzzes the `TPMT_PUBLIC` / `TPM2B_PUBLIC` parsers and what the server
//! computes from a parsed key (its Name and SubjectPublicKeyInfo): EK and AK
//! public areas come from nodes, so they are untrusted. Seeded with real
//! swtpm EKs (RSA 2048, ECC P-256) and AKs (RSA, ECC).
#![no_main]
use libfuzzer_sys::fuzz_target;
use warden_protocol::tpm::{parse_tpm2b_public, parse_tpmt_public};

fuzz_target!(|data: &[u8]| {
    for public in [parse_tpmt_public(data), parse_tpm2b_public(data)]
        .into_iter()
        .flatten()
    {
        let _ = public.name();
        let _ = public.spki_der();
    }
});
