//! TPM2_PCR_Extend through the facade against a real swtpm: the SHA-256 bank
//! changes exactly as SHA-256(old ‖ digest), in the extended PCR only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/swtpm.rs"]
mod swtpm;

use sha2::{Digest as _, Sha256};
use swtpm::Swtpm;
use warden_agent::tpm::{Tpm, TpmError};

#[test]
fn extend_changes_one_pcr_as_sha256_of_old_and_digest() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let before = tpm.pcr_bank_sha256().unwrap();

    let first: [u8; 32] = Sha256::digest(b"warden measured step 1").into();
    let second: [u8; 32] = Sha256::digest(b"warden measured step 2").into();
    tpm.extend_pcr_sha256(14, &first).unwrap();
    tpm.extend_pcr_sha256(14, &second).unwrap();
    let after = tpm.pcr_bank_sha256().unwrap();

    let mut expected = before[&14];
    for digest in [first, second] {
        let mut hasher = Sha256::new();
        hasher.update(expected);
        hasher.update(digest);
        expected = hasher.finalize().into();
    }
    assert_eq!(after[&14], expected);
    assert_ne!(after[&14], before[&14]);
    for index in (0..24).filter(|&i| i != 14) {
        assert_eq!(after[&index], before[&index], "PCR {index} changed");
    }
}

#[test]
fn extend_of_a_missing_pcr_names_it() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let error = tpm.extend_pcr_sha256(24, &[0; 32]).unwrap_err();
    assert!(matches!(error, TpmError::Command { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("PCR 24") && text.contains("PCR_Extend"),
        "{text}"
    );
}
