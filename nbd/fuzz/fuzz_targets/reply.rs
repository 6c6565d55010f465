#![no_main]
//! Reply parsing: a stream of simple replies and structured chunks against
//! six requests in flight, plus the handshake parsers, on arbitrary bytes.
//! The body lives in `warden_nbd::reply::fuzz_reply` so the corpus replay
//! test runs the very same code on stable.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warden_nbd::reply::fuzz_reply(data);
});
