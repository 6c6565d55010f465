//! TPM 2.0 structures and credential protection, in software, with no TPM.
//!
//! This module owns what the attestation server needs to enrol a node's
//! Attestation Key without a TPM or libtss2: parsing a marshalled
//! `TPMT_PUBLIC` ([`public`]), computing TPM object Names, and
//! `TPM2_MakeCredential` ([`credential`]: KDFa, the seed, the identity and its
//! integrity HMAC, TPM 2.0 Part 1 §24). It must never talk to a TPM, do I/O or
//! hold a private key: the node's TPM is the only party that can undo what is
//! built here.
//!
//! Algorithm identifiers stay raw `u16` `TPM_ALG_ID`s at the edge (the constants
//! in [`alg`]) so an unknown value is reported with its number, not lost.

pub mod credential;
pub mod public;
pub mod quote;

pub use credential::{
    kdfa, kdfe, make_credential, make_credential_with_rng, Credential, CredentialError,
};
pub use public::{
    parse_tpm2b_public, parse_tpmt_public, EccParams, ObjectAttributes, Public, PublicKey,
    PublicKeyError, RsaParams, Scheme, SymDef, TpmParseError,
};
pub use quote::{
    parse_attest, parse_signature, verify_quote, Attest, ClockInfo, PcrSelection, QuoteError,
    QuoteInfo, Signature, VerifiedQuote,
};

/// `TPM_ALG_ID` values (TPM 2.0 Part 2 §6.3) this module recognises.
pub mod alg {
    pub const RSA: u16 = 0x0001;
    pub const SHA1: u16 = 0x0004;
    pub const HMAC: u16 = 0x0005;
    pub const AES: u16 = 0x0006;
    pub const MGF1: u16 = 0x0007;
    pub const KEYEDHASH: u16 = 0x0008;
    pub const XOR: u16 = 0x000A;
    pub const SHA256: u16 = 0x000B;
    pub const SHA384: u16 = 0x000C;
    pub const SHA512: u16 = 0x000D;
    pub const NULL: u16 = 0x0010;
    pub const SM3_256: u16 = 0x0012;
    pub const SM4: u16 = 0x0013;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAES: u16 = 0x0015;
    pub const RSAPSS: u16 = 0x0016;
    pub const OAEP: u16 = 0x0017;
    pub const ECDSA: u16 = 0x0018;
    pub const ECDH: u16 = 0x0019;
    pub const ECDAA: u16 = 0x001A;
    pub const SM2: u16 = 0x001B;
    pub const ECSCHNORR: u16 = 0x001C;
    pub const ECMQV: u16 = 0x001D;
    pub const KDF1_SP800_56A: u16 = 0x0020;
    pub const KDF2: u16 = 0x0021;
    pub const KDF1_SP800_108: u16 = 0x0022;
    pub const ECC: u16 = 0x0023;
    pub const SYMCIPHER: u16 = 0x0025;
    pub const CAMELLIA: u16 = 0x0026;
    pub const CFB: u16 = 0x0043;
}

/// `TPM_ECC_CURVE` values (TPM 2.0 Part 2 §6.4).
pub mod curve {
    pub const NIST_P256: u16 = 0x0003;
    pub const NIST_P384: u16 = 0x0004;
}

/// A hash algorithm this module can compute (SHA-1 and SM3 are not carried).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// The hash for a `TPM_ALG_ID`, or `None` when it is not one we compute.
    pub fn from_alg_id(id: u16) -> Option<Self> {
        match id {
            alg::SHA256 => Some(Self::Sha256),
            alg::SHA384 => Some(Self::Sha384),
            alg::SHA512 => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The `TPM_ALG_ID` of this hash.
    pub fn alg_id(self) -> u16 {
        match self {
            Self::Sha256 => alg::SHA256,
            Self::Sha384 => alg::SHA384,
            Self::Sha512 => alg::SHA512,
        }
    }

    /// Digest size in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Self::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Self::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Self::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    /// HMAC over the concatenation of `parts`, keyed with `key`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<D>(key: &[u8], parts: &[&[u8]]) -> Vec<u8>
        where
            D: sha2::Digest + hmac::digest::core_api::BlockSizeUser,
        {
            use hmac::Mac;
            // SimpleHmac accepts keys of any length, so this cannot fail.
            let Ok(mut mac) = <hmac::SimpleHmac<D> as hmac::digest::KeyInit>::new_from_slice(key)
            else {
                return Vec::new();
            };
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Sha256 => run::<sha2::Sha256>(key, parts),
            Self::Sha384 => run::<sha2::Sha384>(key, parts),
            Self::Sha512 => run::<sha2::Sha512>(key, parts),
        }
    }
}
