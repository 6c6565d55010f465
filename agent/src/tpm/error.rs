//! Errors of the TPM facade, and the one place that turns a tss-esapi error
//! into words: the TPM response code's meaning plus the raw code, so a person
//! can look it up.
//!
//! Nothing here talks to a TPM.

use tss_esapi::constants::response_code::Tss2ResponseCode;

/// Why a TPM operation failed. Every variant names the TCTI it went through.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string does not parse, or the TPM behind it cannot be reached.
    #[error("cannot open TPM through TCTI {tcti:?}: {reason}")]
    Open { tcti: String, reason: String },
    /// A TPM command (or a tss-esapi step around it) failed.
    #[error("TPM {operation} through TCTI {tcti:?} failed: {reason}")]
    Command {
        tcti: String,
        operation: &'static str,
        reason: String,
    },
    /// The TPM works but has no SHA-256 PCR bank covering PCRs 0–23; Warden
    /// attests the SHA-256 bank only.
    #[error("TPM behind TCTI {tcti:?} has no usable SHA-256 PCR bank: {reason}")]
    NoSha256Bank { tcti: String, reason: String },
}

/// Describes a tss-esapi error: the meaning of the response code, which layer
/// of the TSS stack produced it, and the raw code.
pub(super) fn describe(error: tss_esapi::Error) -> String {
    match error {
        tss_esapi::Error::WrapperError(kind) => format!("tss-esapi: {kind}"),
        tss_esapi::Error::Tss2Error(rc) => match raw_code(rc) {
            Some(raw) => describe_raw(raw),
            None => rc.to_string(),
        },
    }
}

/// Whether the TPM itself answered with an error (as opposed to the TSS
/// stack or the transport failing): the TPM's own layer, or its code relayed
/// by a resource manager. "The TPM says no" is an answer about the TPM;
/// anything else says nothing about it.
pub(super) fn is_tpm_answer(error: &tss_esapi::Error) -> bool {
    match error {
        tss_esapi::Error::WrapperError(_) => false,
        tss_esapi::Error::Tss2Error(rc) => {
            raw_code(*rc).is_some_and(|raw| matches!((raw >> 16) & 0xff, 0 | 12))
        }
    }
}

/// tss-esapi 7.7 keeps the raw `TSS2_RC` private; its `Display` is the only
/// way out ("Response code value: 0x…").
fn raw_code(rc: Tss2ResponseCode) -> Option<u32> {
    let shown = match rc {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(code) => code.to_string(),
        Tss2ResponseCode::FormatOne(code) => code.to_string(),
    };
    let hex = shown.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// Decodes a raw `TSS2_RC` (TSS 2.0 Overview, "Response Code Layers").
pub(super) fn describe_raw(raw: u32) -> String {
    let layer = (raw >> 16) & 0xff;
    let low = raw & 0xffff;
    match layer {
        // tss-esapi 7.7 knows the TPM's own codes, not the TSS layers above it.
        0 => format!(
            "{} (TPM response code {raw:#x})",
            Tss2ResponseCode::from(raw)
        ),
        12 => format!(
            "{} (TPM response code {low:#x}, relayed by the resource manager as {raw:#x})",
            Tss2ResponseCode::from(low)
        ),
        _ => format!(
            "{}: {} (TSS response code {raw:#x})",
            layer_name(layer),
            base_rc_meaning(low)
        ),
    }
}

fn layer_name(layer: u32) -> &'static str {
    match layer {
        6 => "TSS feature API",
        7 => "ESAPI",
        8 => "SAPI",
        9 => "TSS marshalling",
        10 => "TCTI (transport to the TPM)",
        11 => "resource manager",
        _ => "unknown TSS layer",
    }
}

/// `TSS2_BASE_RC_*` from tss2_common.h, as far as the agent can meet them.
fn base_rc_meaning(code: u32) -> &'static str {
    match code {
        1 => "general failure",
        2 => "not implemented",
        3 => "bad context",
        4 => "ABI mismatch",
        5 => "NULL pointer where one is not allowed",
        6 => "buffer too small",
        7 => "function called in the wrong order",
        8 => "cannot connect to the next lower layer",
        9 => "timed out; try again",
        10 => "I/O error (is the TPM there, and is the TCTI address right?)",
        11 => "a parameter has a bad value",
        12 => "operation not permitted",
        13 => "sessions given that the command does not use",
        16 => "a parameter has the wrong size",
        17 => "malformed response from the TPM",
        19 => "response too short",
        20 => "unknown or unusable TCTI (is the TCTI library installed?)",
        21 => "not supported",
        22 => "bad TCTI structure",
        23 => "out of memory",
        24 => "invalid ESYS_TR handle",
        27 => "the TPM's response HMAC did not verify",
        49 => "no TPM found",
        _ => "unlisted TSS error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_io_error_says_layer_and_meaning() {
        let text = describe_raw(0x000a_000a);
        assert!(text.contains("TCTI"), "{text}");
        assert!(text.contains("I/O error"), "{text}");
        assert!(text.contains("0xa000a"), "{text}");
    }

    #[test]
    fn tpm_code_keeps_raw_value_and_meaning() {
        // TPM_RC_HANDLE for handle 1 (format one): 0x18b.
        let text = describe_raw(0x18b);
        assert!(text.contains("0x18b"), "{text}");
        assert!(text.contains("handle"), "{text}");
    }

    #[test]
    fn only_the_tpm_layer_is_an_answer_from_the_tpm() {
        let tss = |raw: u32| tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(raw));
        // TPM_RC_VALUE for parameter 1, from the TPM and via a resource manager.
        assert!(is_tpm_answer(&tss(0x1c4)));
        assert!(is_tpm_answer(&tss(0x000c_01c4)));
        // TCTI I/O error: the TPM said nothing.
        assert!(!is_tpm_answer(&tss(0x000a_000a)));
    }

    #[test]
    fn raw_code_round_trips_through_tss_esapi() {
        for raw in [0x18b_u32, 0x101, 0x000a_000a, 0x0009_0008] {
            assert_eq!(raw_code(Tss2ResponseCode::from(raw)), Some(raw));
        }
    }
}
