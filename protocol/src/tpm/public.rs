//! Parsing of a marshalled `TPMT_PUBLIC` / `TPM2B_PUBLIC` (TPM 2.0 Part 2
//! §12.2), its Name, and its `SubjectPublicKeyInfo`.
//!
//! This module owns turning untrusted bytes from a node into a [`Public`]. It
//! must never panic or index out of bounds on any input: every read is
//! bounds-checked and a failure names the field and the byte offset.
//!
//! Two entry points, because the two encodings cannot be told apart reliably
//! from the bytes alone (a TPM2B size of 0x0001, 0x0008, 0x0023 or 0x0025 is
//! also a valid `TPMI_ALG_PUBLIC`): [`parse_tpmt_public`] takes a bare
//! `TPMT_PUBLIC` (what tss-esapi's `Public::marshall()` produces and what the
//! agent sends in `EkPublic::tpm_public`), [`parse_tpm2b_public`] takes one
//! behind a `u16` size (what `tpm2_readpublic -o` and TPM2_ReadPublic return).
//! Both insist that the whole input is consumed.

use super::{alg, curve, HashAlg};

/// Why a `TPMT_PUBLIC` could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TpmParseError {
    #[error("TPMT_PUBLIC truncated at {field} (offset {offset}): need {need} bytes, {have} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("TPMT_PUBLIC has {extra} trailing bytes after offset {offset}")]
    TrailingBytes { offset: usize, extra: usize },
    #[error("TPM2B_PUBLIC size {declared} does not match the {actual} bytes that follow it")]
    SizeMismatch { declared: usize, actual: usize },
    #[error("TPMT_PUBLIC {field} (offset {offset}) holds unsupported algorithm 0x{value:04x}")]
    UnsupportedAlgorithm {
        field: &'static str,
        offset: usize,
        value: u16,
    },
}

/// `TPMA_OBJECT` (Part 2 §8.3), with accessors for the flags attestation
/// looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectAttributes(pub u32);

impl ObjectAttributes {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const ST_CLEAR: u32 = 1 << 2;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    pub const ENCRYPTED_DUPLICATION: u32 = 1 << 11;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;

    fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
    pub fn fixed_tpm(self) -> bool {
        self.has(Self::FIXED_TPM)
    }
    pub fn st_clear(self) -> bool {
        self.has(Self::ST_CLEAR)
    }
    pub fn fixed_parent(self) -> bool {
        self.has(Self::FIXED_PARENT)
    }
    pub fn sensitive_data_origin(self) -> bool {
        self.has(Self::SENSITIVE_DATA_ORIGIN)
    }
    pub fn user_with_auth(self) -> bool {
        self.has(Self::USER_WITH_AUTH)
    }
    pub fn admin_with_policy(self) -> bool {
        self.has(Self::ADMIN_WITH_POLICY)
    }
    pub fn no_da(self) -> bool {
        self.has(Self::NO_DA)
    }
    pub fn encrypted_duplication(self) -> bool {
        self.has(Self::ENCRYPTED_DUPLICATION)
    }
    pub fn restricted(self) -> bool {
        self.has(Self::RESTRICTED)
    }
    pub fn decrypt(self) -> bool {
        self.has(Self::DECRYPT)
    }
    pub fn sign(self) -> bool {
        self.has(Self::SIGN)
    }
}

/// `TPMT_SYM_DEF_OBJECT` when its algorithm is not `TPM_ALG_NULL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymDef {
    pub algorithm: u16,
    pub key_bits: u16,
    pub mode: u16,
}

/// An asymmetric or KDF scheme when it is not `TPM_ALG_NULL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheme {
    pub scheme: u16,
    /// `hashAlg` of the details; `None` for schemes without one (RSAES).
    pub hash_alg: Option<u16>,
    /// ECDAA's `count`.
    pub count: Option<u16>,
}

/// `TPMS_RSA_PARMS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaParams {
    pub symmetric: Option<SymDef>,
    pub scheme: Option<Scheme>,
    pub key_bits: u16,
    /// The public exponent with the TPM's 0 already replaced by 65537.
    pub exponent: u32,
}

/// `TPMS_ECC_PARMS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EccParams {
    pub symmetric: Option<SymDef>,
    pub scheme: Option<Scheme>,
    pub curve_id: u16,
    pub kdf: Option<Scheme>,
}

/// The key: parameters and `unique` together, so they cannot disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    Rsa {
        params: RsaParams,
        modulus: Vec<u8>,
    },
    Ecc {
        params: EccParams,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC` of an RSA or ECC key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Public {
    /// `TPMI_ALG_PUBLIC`: [`alg::RSA`] or [`alg::ECC`].
    pub object_type: u16,
    pub name_alg: u16,
    pub attributes: ObjectAttributes,
    pub auth_policy: Vec<u8>,
    pub key: PublicKey,
    /// The exact `TPMT_PUBLIC` bytes, which the Name is computed over.
    marshalled: Vec<u8>,
}

/// Why a Name or SPKI could not be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublicKeyError {
    #[error("TPM object nameAlg 0x{0:04x} is not SHA-256/384/512")]
    UnsupportedNameAlg(u16),
    #[error("ECC curve 0x{0:04x} has no SubjectPublicKeyInfo encoding here (only NIST P-256)")]
    UnsupportedCurve(u16),
    #[error("ECC point coordinate is {0} bytes, more than the curve's 32")]
    BadPoint(usize),
    #[error("RSA public key rejected: {0}")]
    Rsa(String),
}

impl Public {
    /// The `TPMT_PUBLIC` bytes this was parsed from (without any TPM2B size).
    pub fn marshalled(&self) -> &[u8] {
        &self.marshalled
    }

    /// The object's Name: `nameAlg` (u16 big-endian) ‖ H_nameAlg(TPMT_PUBLIC)
    /// (Part 1 §16).
    pub fn name(&self) -> Result<Vec<u8>, PublicKeyError> {
        let hash = HashAlg::from_alg_id(self.name_alg)
            .ok_or(PublicKeyError::UnsupportedNameAlg(self.name_alg))?;
        let mut name = self.name_alg.to_be_bytes().to_vec();
        name.extend_from_slice(&hash.digest(&self.marshalled));
        Ok(name)
    }

    /// The RSA public key, for RSA objects.
    pub fn rsa_public_key(&self) -> Option<Result<rsa::RsaPublicKey, PublicKeyError>> {
        match &self.key {
            PublicKey::Rsa { params, modulus } => Some(
                rsa::RsaPublicKey::new(
                    rsa::BigUint::from_bytes_be(modulus),
                    rsa::BigUint::from(params.exponent),
                )
                .map_err(|e| PublicKeyError::Rsa(e.to_string())),
            ),
            PublicKey::Ecc { .. } => None,
        }
    }

    /// DER `SubjectPublicKeyInfo` of the key (RSA, or ECC NIST P-256), to tie
    /// this `TPMT_PUBLIC` to the `public_key_der` a node sent beside it.
    pub fn spki_der(&self) -> Result<Vec<u8>, PublicKeyError> {
        match &self.key {
            PublicKey::Rsa { .. } => {
                use rsa::pkcs8::EncodePublicKey;
                let key = self
                    .rsa_public_key()
                    .ok_or(PublicKeyError::Rsa("not an RSA key".into()))??;
                key.to_public_key_der()
                    .map(|doc| doc.as_bytes().to_vec())
                    .map_err(|e| PublicKeyError::Rsa(e.to_string()))
            }
            PublicKey::Ecc { params, x, y } => {
                if params.curve_id != curve::NIST_P256 {
                    return Err(PublicKeyError::UnsupportedCurve(params.curve_id));
                }
                // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 },
                //            BIT STRING (0 unused bits) 04 ‖ X ‖ Y }: fixed
                // lengths, so the DER header is a constant.
                const P256_SPKI_PREFIX: [u8; 27] = [
                    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
                    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
                    0x04,
                ];
                let mut der = P256_SPKI_PREFIX.to_vec();
                for coord in [x, y] {
                    // The TPM may drop leading zero bytes; SEC1 wants exactly 32.
                    let pad = 32usize
                        .checked_sub(coord.len())
                        .ok_or(PublicKeyError::BadPoint(coord.len()))?;
                    der.extend(std::iter::repeat_n(0u8, pad));
                    der.extend_from_slice(coord);
                }
                Ok(der)
            }
        }
    }
}

/// Parse a bare `TPMT_PUBLIC` (no size prefix) that must fill `bytes`.
pub fn parse_tpmt_public(bytes: &[u8]) -> Result<Public, TpmParseError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let public = parse_body(&mut r)?;
    if r.pos != bytes.len() {
        return Err(TpmParseError::TrailingBytes {
            offset: r.pos,
            extra: bytes.len() - r.pos,
        });
    }
    Ok(public)
}

/// Parse a `TPM2B_PUBLIC`: a `u16` big-endian size, then that many bytes of
/// `TPMT_PUBLIC`, and nothing after.
pub fn parse_tpm2b_public(bytes: &[u8]) -> Result<Public, TpmParseError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let declared = usize::from(r.u16("TPM2B_PUBLIC.size")?);
    let actual = bytes.len() - 2;
    if declared != actual {
        return Err(TpmParseError::SizeMismatch { declared, actual });
    }
    parse_tpmt_public(&bytes[2..])
}

fn parse_body(r: &mut Reader<'_>) -> Result<Public, TpmParseError> {
    let type_offset = r.pos;
    let object_type = r.u16("type")?;
    let name_alg = r.u16("nameAlg")?;
    let attributes = ObjectAttributes(r.u32("objectAttributes")?);
    let auth_policy = r.tpm2b("authPolicy")?.to_vec();
    let key = match object_type {
        alg::RSA => {
            let symmetric = sym_def(r, "parameters.rsaDetail.symmetric")?;
            let scheme = parse_scheme(r, "parameters.rsaDetail.scheme", rsa_scheme_shape)?;
            let key_bits = r.u16("parameters.rsaDetail.keyBits")?;
            let exponent = match r.u32("parameters.rsaDetail.exponent")? {
                0 => 65537,
                e => e,
            };
            let modulus = r.tpm2b("unique.rsa")?.to_vec();
            PublicKey::Rsa {
                params: RsaParams {
                    symmetric,
                    scheme,
                    key_bits,
                    exponent,
                },
                modulus,
            }
        }
        alg::ECC => {
            let symmetric = sym_def(r, "parameters.eccDetail.symmetric")?;
            let scheme = parse_scheme(r, "parameters.eccDetail.scheme", ecc_scheme_shape)?;
            let curve_id = r.u16("parameters.eccDetail.curveID")?;
            let kdf = parse_scheme(r, "parameters.eccDetail.kdf", kdf_scheme_shape)?;
            let x = r.tpm2b("unique.ecc.x")?.to_vec();
            let y = r.tpm2b("unique.ecc.y")?.to_vec();
            PublicKey::Ecc {
                params: EccParams {
                    symmetric,
                    scheme,
                    curve_id,
                    kdf,
                },
                x,
                y,
            }
        }
        other => {
            return Err(TpmParseError::UnsupportedAlgorithm {
                field: "type",
                offset: type_offset,
                value: other,
            })
        }
    };
    Ok(Public {
        object_type,
        name_alg,
        attributes,
        auth_policy,
        key,
        marshalled: r.buf[..r.pos].to_vec(),
    })
}

fn sym_def(r: &mut Reader<'_>, field: &'static str) -> Result<Option<SymDef>, TpmParseError> {
    let algorithm = r.u16(field)?;
    if algorithm == alg::NULL {
        return Ok(None);
    }
    Ok(Some(SymDef {
        algorithm,
        key_bits: r.u16(field)?,
        mode: r.u16(field)?,
    }))
}

/// What follows a scheme selector: nothing, a hashAlg, or hashAlg + count.
enum Shape {
    Empty,
    Hash,
    HashCount,
}

fn rsa_scheme_shape(s: u16) -> Option<Shape> {
    match s {
        alg::RSAES => Some(Shape::Empty),
        alg::RSASSA | alg::RSAPSS | alg::OAEP => Some(Shape::Hash),
        _ => None,
    }
}

fn ecc_scheme_shape(s: u16) -> Option<Shape> {
    match s {
        alg::ECDSA | alg::ECDH | alg::SM2 | alg::ECSCHNORR | alg::ECMQV => Some(Shape::Hash),
        alg::ECDAA => Some(Shape::HashCount),
        _ => None,
    }
}

fn kdf_scheme_shape(s: u16) -> Option<Shape> {
    match s {
        alg::MGF1 | alg::KDF1_SP800_56A | alg::KDF2 | alg::KDF1_SP800_108 => Some(Shape::Hash),
        _ => None,
    }
}

fn parse_scheme(
    r: &mut Reader<'_>,
    field: &'static str,
    shape_of: fn(u16) -> Option<Shape>,
) -> Result<Option<Scheme>, TpmParseError> {
    let offset = r.pos;
    let scheme = r.u16(field)?;
    if scheme == alg::NULL {
        return Ok(None);
    }
    // An unknown selector leaves the size of what follows unknown: stop.
    let shape = shape_of(scheme).ok_or(TpmParseError::UnsupportedAlgorithm {
        field,
        offset,
        value: scheme,
    })?;
    let (hash_alg, count) = match shape {
        Shape::Empty => (None, None),
        Shape::Hash => (Some(r.u16(field)?), None),
        Shape::HashCount => (Some(r.u16(field)?), Some(r.u16(field)?)),
    };
    Ok(Some(Scheme {
        scheme,
        hash_alg,
        count,
    }))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], TpmParseError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(TpmParseError::Truncated {
                field,
                offset: self.pos,
                need: n,
                have,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, TpmParseError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, TpmParseError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn tpm2b(&mut self, field: &'static str) -> Result<&'a [u8], TpmParseError> {
        let n = usize::from(self.u16(field)?);
        self.take(field, n)
    }
}
