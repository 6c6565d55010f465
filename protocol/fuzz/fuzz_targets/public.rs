//! Fuzzes the `TPMT_PUBLIC` / `TPM2B_PUBLIC` parsers and what the server
//! computes from a parsed key (its Name, SubjectPublicKeyInfo and a
//! MakeCredential to it): EK and AK public areas come from nodes, so they are
//! untrusted. Seeded with real swtpm EKs (RSA 2048, ECC P-256, ECC P-384) and
//! AKs (RSA, ECC).
#![no_main]
use libfuzzer_sys::fuzz_target;
use warden_protocol::tpm::{make_credential, parse_tpm2b_public, parse_tpmt_public};

/// A SHA-256 Name shape (0x000b ‖ 32 bytes) to bind fuzzed credentials to.
const AK_NAME: [u8; 34] = {
    let mut name = [0x11u8; 34];
    name[0] = 0x00;
    name[1] = 0x0b;
    name
};

fuzz_target!(|data: &[u8]| {
    for public in [parse_tpmt_public(data), parse_tpm2b_public(data)]
        .into_iter()
        .flatten()
    {
        let _ = public.name();
        let _ = public.spki_der();
        // The server encrypts to a node's EK: RSA-OAEP, or ECDH on the
        // node's (unchecked until then) ECC point.
        let _ = make_credential(public.marshalled(), &AK_NAME, &[0x5a; 32]);
    }
});
