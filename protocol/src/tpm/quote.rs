//! Verification of a TPM2 quote (`TPM2_Quote`, TPM 2.0 Part 3 §18.4) in
//! software: parsing the signed `TPMS_ATTEST` and the `TPMT_SIGNATURE` (Part 2
//! §10.12, §11.3.4), checking the signature with the node's Attestation Key,
//! and tying the quote to a fresh nonce and to a set of SHA-256 PCR values.
//!
//! This module owns turning untrusted quote bytes from a node into a
//! [`VerifiedQuote`] or a person-readable [`QuoteError`]. It must never panic
//! or index out of bounds on any input, never talk to a TPM, and never accept
//! a quote whose PCR digest it has not recomputed itself.
//!
//! What it does NOT do, because it needs state across quotes: check that
//! `resetCount`/`restartCount` in [`ClockInfo`] did not go backwards since the
//! previous quote of the same node. That is the caller's (the server's) job,
//! with the values returned in [`VerifiedQuote::clock_info`].

use std::collections::BTreeMap;

use super::{alg, curve, HashAlg, Public, PublicKey, PublicKeyError};

/// `TPM_GENERATED_VALUE`: the magic a TPM puts first in everything it signs,
/// and refuses to sign when it comes from outside (Part 2 §6.2).
pub const TPM_GENERATED_VALUE: u32 = 0xFF54_4347;
/// `TPM_ST_ATTEST_QUOTE` (Part 2 §6.9).
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

/// Why a quote was rejected. Each check of [`verify_quote`] has its own
/// variant so the operator can tell a replay from a changed boot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuoteError {
    #[error("{structure} truncated at {field} (offset {offset}): need {need} bytes, {have} left")]
    Truncated {
        structure: &'static str,
        field: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("{structure} has {extra} trailing bytes after offset {offset}")]
    TrailingBytes {
        structure: &'static str,
        offset: usize,
        extra: usize,
    },
    #[error("TPMS_ATTEST is not TPM-generated: magic is 0x{magic:08x}, not 0xff544347 (TPM_GENERATED_VALUE)")]
    NotTpmGenerated { magic: u32 },
    #[error("TPMS_ATTEST type is 0x{found:04x}, not TPM_ST_ATTEST_QUOTE (0x8018)")]
    WrongAttestType { found: u16 },
    #[error(
        "TPMT_SIGNATURE sigAlg 0x{alg:04x} is not supported (only RSASSA 0x0014 and ECDSA 0x0018)"
    )]
    UnsupportedSignatureAlg { alg: u16 },
    #[error("attestation key is not a restricted signing key (restricted={restricted}, sign={sign}, decrypt={decrypt}): a TPM would sign forged TPMS_ATTEST bytes with it")]
    AkNotRestrictedSigning {
        restricted: bool,
        sign: bool,
        decrypt: bool,
    },
    #[error("attestation key unusable: {0}")]
    AkKey(#[from] PublicKeyError),
    #[error("quote signature algorithm 0x{sig_alg:04x} does not fit the attestation key type 0x{key_type:04x}")]
    SignatureAlgMismatch { key_type: u16, sig_alg: u16 },
    #[error("quote signature hash algorithm is 0x{hash:04x}, not SHA-256 (0x000b)")]
    SignatureHashNotSha256 { hash: u16 },
    #[error("quote signature does not verify with the attestation key: {reason}")]
    BadSignature { reason: String },
    #[error("quote extraData {found} is not the nonce the server issued ({expected}): stale or replayed quote")]
    NonceMismatch { expected: String, found: String },
    #[error("quote selects {count} PCR banks; exactly one (SHA-256) is required")]
    PcrBankCount { count: usize },
    #[error("quote selects PCR bank 0x{hash:04x}, not SHA-256 (0x000b)")]
    PcrBankNotSha256 { hash: u16 },
    #[error("quote does not cover PCRs {pcrs:?} of the SHA-256 bank, which the values sent with it include")]
    PcrsNotQuoted { pcrs: Vec<u32> },
    #[error("quote covers SHA-256 PCRs {pcrs:?} but no value was supplied for them")]
    PcrValuesMissing { pcrs: Vec<u32> },
    #[error("SHA-256 PCR {pcr} value is {len} bytes, not 32")]
    BadPcrValue { pcr: u32, len: usize },
    #[error("quote pcrDigest {quoted} does not match SHA-256 over the sha256 bank PCRs {pcrs:?} supplied ({computed}): the PCR values were changed or are not the ones quoted")]
    PcrDigestMismatch {
        pcrs: Vec<u32>,
        quoted: String,
        computed: String,
    },
    #[error("quote clockInfo.safe is {safe}, not 1: the TPM clock may have gone backwards, so the quote cannot be ordered")]
    ClockNotSafe { safe: u8 },
}

/// `TPMS_CLOCK_INFO` (Part 2 §10.11.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered, since its last TPM2_Clear.
    pub clock: u64,
    /// TPM resets (power cycles, reboots) since TPM2_Clear.
    pub reset_count: u32,
    /// TPM2_Shutdown(STATE)/Startup(STATE) pairs since the last reset.
    pub restart_count: u32,
    /// `TPMI_YES_NO`: 1 when `clock` cannot have been reported lower before.
    pub safe: u8,
}

/// One `TPMS_PCR_SELECTION` of a `TPML_PCR_SELECTION` (Part 2 §10.6.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrSelection {
    /// The bank's `TPM_ALG_ID`.
    pub hash: u16,
    /// The raw `pcrSelect` bitmap: bit i of byte j selects PCR 8j+i.
    pub select: Vec<u8>,
}

impl PcrSelection {
    /// The selected PCR indices, ascending.
    pub fn pcrs(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (j, byte) in (0u32..).zip(self.select.iter()) {
            for i in 0..8u32 {
                if byte & (1 << i) != 0 {
                    out.push(8 * j + i);
                }
            }
        }
        out
    }
}

/// `TPMS_QUOTE_INFO` (Part 2 §10.12.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteInfo {
    pub pcr_select: Vec<PcrSelection>,
    pub pcr_digest: Vec<u8>,
}

/// A `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE` (Part 2 §10.12.12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attest {
    /// The signer's qualified Name (not checked here: it is the AK's
    /// hierarchy-qualified Name, which needs the parents' Names).
    pub qualified_signer: Vec<u8>,
    /// The caller's `qualifyingData`: our nonce.
    pub extra_data: Vec<u8>,
    pub clock_info: ClockInfo,
    /// Vendor-specific; recorded, not interpreted.
    pub firmware_version: u64,
    pub quoted: QuoteInfo,
}

/// A parsed `TPMT_SIGNATURE` (Part 2 §11.3.4) of a supported scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signature {
    /// `TPM_ALG_RSASSA`: PKCS#1 v1.5.
    Rsassa { hash: u16, sig: Vec<u8> },
    /// `TPM_ALG_ECDSA`: r and s as big-endian integers, leading zeros possibly
    /// dropped.
    Ecdsa { hash: u16, r: Vec<u8>, s: Vec<u8> },
}

impl Signature {
    /// The `sigAlg`.
    pub fn alg(&self) -> u16 {
        match self {
            Self::Rsassa { .. } => alg::RSASSA,
            Self::Ecdsa { .. } => alg::ECDSA,
        }
    }

    /// The hash algorithm the signature was made over.
    pub fn hash(&self) -> u16 {
        match self {
            Self::Rsassa { hash, .. } | Self::Ecdsa { hash, .. } => *hash,
        }
    }
}

/// What a verified quote proves, for the caller to record and compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// The caller must check that `reset_count`/`restart_count` did not go
    /// backwards since this node's previous verified quote (this function has
    /// no memory).
    pub clock_info: ClockInfo,
    pub firmware_version: u64,
    /// The SHA-256 PCRs the quote covers, ascending.
    pub pcrs: Vec<u32>,
}

const ATTEST: &str = "TPMS_ATTEST";
const SIGNATURE: &str = "TPMT_SIGNATURE";

/// Parse a marshalled `TPMS_ATTEST` that must be a quote and fill `bytes`.
pub fn parse_attest(bytes: &[u8]) -> Result<Attest, QuoteError> {
    let mut r = Reader::new(ATTEST, bytes);
    let magic = r.u32("magic")?;
    if magic != TPM_GENERATED_VALUE {
        return Err(QuoteError::NotTpmGenerated { magic });
    }
    let attest_type = r.u16("type")?;
    if attest_type != TPM_ST_ATTEST_QUOTE {
        return Err(QuoteError::WrongAttestType { found: attest_type });
    }
    let qualified_signer = r.tpm2b("qualifiedSigner")?.to_vec();
    let extra_data = r.tpm2b("extraData")?.to_vec();
    let clock_info = ClockInfo {
        clock: r.u64("clockInfo.clock")?,
        reset_count: r.u32("clockInfo.resetCount")?,
        restart_count: r.u32("clockInfo.restartCount")?,
        safe: r.u8("clockInfo.safe")?,
    };
    let firmware_version = r.u64("firmwareVersion")?;
    let count = r.u32("attested.quote.pcrSelect.count")?;
    // No capacity from `count`: it is untrusted; truncation stops the loop.
    let mut pcr_select = Vec::new();
    for _ in 0..count {
        let hash = r.u16("attested.quote.pcrSelect.pcrSelections.hash")?;
        let size = usize::from(r.u8("attested.quote.pcrSelect.pcrSelections.sizeofSelect")?);
        let select = r
            .take("attested.quote.pcrSelect.pcrSelections.pcrSelect", size)?
            .to_vec();
        pcr_select.push(PcrSelection { hash, select });
    }
    let pcr_digest = r.tpm2b("attested.quote.pcrDigest")?.to_vec();
    r.finish()?;
    Ok(Attest {
        qualified_signer,
        extra_data,
        clock_info,
        firmware_version,
        quoted: QuoteInfo {
            pcr_select,
            pcr_digest,
        },
    })
}

/// Parse a marshalled `TPMT_SIGNATURE` (RSASSA or ECDSA) that must fill
/// `bytes`.
pub fn parse_signature(bytes: &[u8]) -> Result<Signature, QuoteError> {
    let mut r = Reader::new(SIGNATURE, bytes);
    let sig_alg = r.u16("sigAlg")?;
    let sig = match sig_alg {
        alg::RSASSA => Signature::Rsassa {
            hash: r.u16("signature.rsassa.hash")?,
            sig: r.tpm2b("signature.rsassa.sig")?.to_vec(),
        },
        alg::ECDSA => Signature::Ecdsa {
            hash: r.u16("signature.ecdsa.hash")?,
            r: r.tpm2b("signature.ecdsa.signatureR")?.to_vec(),
            s: r.tpm2b("signature.ecdsa.signatureS")?.to_vec(),
        },
        other => return Err(QuoteError::UnsupportedSignatureAlg { alg: other }),
    };
    r.finish()?;
    Ok(sig)
}

/// Verify a quote made by `ak` over the SHA-256 PCRs in `pcr_values`
/// (index → 32-byte value) and bound to `expected_nonce`.
///
/// Checks, in order, each failing with its own [`QuoteError`]: the AK is a
/// restricted signing key (so the TPM refuses to sign anything that starts
/// with `TPM_GENERATED_VALUE` unless it built it); the signature parses, fits
/// the key type and uses SHA-256 (checked before the signature maths so a
/// SHA-384 quote says so instead of "does not verify"); the signature verifies
/// over `attest_bytes`; magic and type; `extraData == expected_nonce`; the
/// selection is exactly one SHA-256 bank covering exactly the PCRs of
/// `pcr_values`; `pcrDigest` equals SHA-256 of the selected values in
/// ascending index order; `clockInfo.safe == 1`.
///
/// Reset/restart-count monotonicity across quotes is the caller's job, with
/// [`VerifiedQuote::clock_info`].
pub fn verify_quote(
    ak: &Public,
    attest_bytes: &[u8],
    signature_bytes: &[u8],
    expected_nonce: &[u8],
    pcr_values: &BTreeMap<u32, Vec<u8>>,
) -> Result<VerifiedQuote, QuoteError> {
    let attrs = ak.attributes;
    if !(attrs.restricted() && attrs.sign() && !attrs.decrypt()) {
        return Err(QuoteError::AkNotRestrictedSigning {
            restricted: attrs.restricted(),
            sign: attrs.sign(),
            decrypt: attrs.decrypt(),
        });
    }

    let signature = parse_signature(signature_bytes)?;
    if signature.hash() != alg::SHA256 {
        return Err(QuoteError::SignatureHashNotSha256 {
            hash: signature.hash(),
        });
    }
    verify_signature(ak, &signature, attest_bytes)?;

    let attest = parse_attest(attest_bytes)?;
    if attest.extra_data != expected_nonce {
        return Err(QuoteError::NonceMismatch {
            expected: hex::encode(expected_nonce),
            found: hex::encode(&attest.extra_data),
        });
    }

    let selection = match attest.quoted.pcr_select.as_slice() {
        [one] => one,
        other => return Err(QuoteError::PcrBankCount { count: other.len() }),
    };
    if selection.hash != alg::SHA256 {
        return Err(QuoteError::PcrBankNotSha256 {
            hash: selection.hash,
        });
    }
    let pcrs = selection.pcrs();
    let not_quoted: Vec<u32> = pcr_values
        .keys()
        .filter(|i| !pcrs.contains(i))
        .copied()
        .collect();
    if !not_quoted.is_empty() {
        return Err(QuoteError::PcrsNotQuoted { pcrs: not_quoted });
    }
    let no_value: Vec<u32> = pcrs
        .iter()
        .filter(|i| !pcr_values.contains_key(i))
        .copied()
        .collect();
    if !no_value.is_empty() {
        return Err(QuoteError::PcrValuesMissing { pcrs: no_value });
    }

    // `pcrs` is ascending, which is the order the TPM concatenates in.
    let mut concat = Vec::with_capacity(pcrs.len() * 32);
    for (pcr, value) in pcr_values {
        if value.len() != HashAlg::Sha256.size() {
            return Err(QuoteError::BadPcrValue {
                pcr: *pcr,
                len: value.len(),
            });
        }
        concat.extend_from_slice(value);
    }
    let computed = HashAlg::Sha256.digest(&concat);
    if computed != attest.quoted.pcr_digest {
        return Err(QuoteError::PcrDigestMismatch {
            pcrs,
            quoted: hex::encode(&attest.quoted.pcr_digest),
            computed: hex::encode(computed),
        });
    }

    if attest.clock_info.safe != 1 {
        return Err(QuoteError::ClockNotSafe {
            safe: attest.clock_info.safe,
        });
    }

    Ok(VerifiedQuote {
        clock_info: attest.clock_info,
        firmware_version: attest.firmware_version,
        pcrs,
    })
}

/// Check `signature` (already known to be over SHA-256) over `message`.
/// Verifies with `ring` (the same crate rustls uses): an RSA-2048 check
/// costs ~20 µs there against ~380 µs in the `rsa` crate, and this runs for
/// every attestation the server receives.
fn verify_signature(ak: &Public, signature: &Signature, message: &[u8]) -> Result<(), QuoteError> {
    let mismatch = || QuoteError::SignatureAlgMismatch {
        key_type: ak.object_type,
        sig_alg: signature.alg(),
    };
    match (&ak.key, signature) {
        (PublicKey::Rsa { params, modulus }, Signature::Rsassa { sig, .. }) => {
            // ring wants both integers big-endian without leading zeros.
            let e = params.exponent.to_be_bytes();
            let skip = e.iter().take_while(|&&b| b == 0).count();
            let n_skip = modulus.iter().take_while(|&&b| b == 0).count();
            let key = ring::signature::RsaPublicKeyComponents {
                n: modulus.get(n_skip..).unwrap_or_default(),
                e: e.get(skip..).unwrap_or_default(),
            };
            key.verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .map_err(|_| QuoteError::BadSignature {
                    reason: "RSASSA-PKCS1-v1_5-SHA256 signature does not verify".into(),
                })
        }
        (PublicKey::Ecc { params, x, y }, Signature::Ecdsa { r, s, .. }) => {
            if params.curve_id != curve::NIST_P256 {
                return Err(PublicKeyError::UnsupportedCurve(params.curve_id).into());
            }
            // SEC1 uncompressed point; the TPM may drop leading zero bytes.
            let mut sec1 = vec![0x04];
            for coord in [x, y] {
                sec1.extend_from_slice(
                    &left_pad_32(coord).ok_or(PublicKeyError::BadPoint(coord.len()))?,
                );
            }
            let scalar = |v: &[u8], which: &str| {
                left_pad_32(v).ok_or_else(|| QuoteError::BadSignature {
                    reason: format!("ECDSA {which} is {} bytes, more than P-256's 32", v.len()),
                })
            };
            let mut fixed = scalar(r, "r")?.to_vec();
            fixed.extend_from_slice(&scalar(s, "s")?);
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                &sec1,
            )
            .verify(message, &fixed)
            .map_err(|_| QuoteError::BadSignature {
                reason:
                    "ECDSA-P256-SHA256 signature does not verify (or the key is not a P-256 point)"
                        .into(),
            })
        }
        _ => Err(mismatch()),
    }
}

/// A big-endian integer of at most 32 bytes as a P-256 field element, or
/// `None` when it is longer.
fn left_pad_32(v: &[u8]) -> Option<p256::FieldBytes> {
    let pad = 32usize.checked_sub(v.len())?;
    let mut out = p256::FieldBytes::default();
    out.get_mut(pad..)?.copy_from_slice(v);
    Some(out)
}

struct Reader<'a> {
    structure: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(structure: &'static str, buf: &'a [u8]) -> Self {
        Self {
            structure,
            buf,
            pos: 0,
        }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], QuoteError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let out = rest.get(..n).ok_or(QuoteError::Truncated {
            structure: self.structure,
            field,
            offset: self.pos,
            need: n,
            have: rest.len(),
        })?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], QuoteError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, QuoteError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, QuoteError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, QuoteError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, QuoteError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn tpm2b(&mut self, field: &'static str) -> Result<&'a [u8], QuoteError> {
        let n = usize::from(self.u16(field)?);
        self.take(field, n)
    }

    fn finish(&self) -> Result<(), QuoteError> {
        if self.pos != self.buf.len() {
            return Err(QuoteError::TrailingBytes {
                structure: self.structure,
                offset: self.pos,
                extra: self.buf.len() - self.pos,
            });
        }
        Ok(())
    }
}
