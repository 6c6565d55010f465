//! `TPM2_MakeCredential` in software (TPM 2.0 Part 1 §24, Part 3 §12.6).
//!
//! This module owns wrapping a short secret so that only the TPM holding a
//! given Endorsement Key, and only for a loaded object with a given Name (the
//! Attestation Key), can recover it with `TPM2_ActivateCredential`. It must
//! never hold or log the seed or the credential beyond the call, and never
//! talk to a TPM.
//!
//! The construction, for an EK with nameAlg H and symmetric AES-k-CFB:
//!
//! ```text
//! RSA EK:
//!   seed       = random, |H| bytes
//!   secret     = RSA-OAEP(H, label "IDENTITY\0")(EK, seed)
//! ECC EK (Part 1 §24.4 with Annex C.6.1, one-pass ECDH, NIST P-256 or P-384):
//!   (d, Q)     = ephemeral key pair on the EK's curve
//!   Z          = x-coordinate of d·EK, full curve width
//!   seed       = KDFe(H, Z, "IDENTITY\0", Q.x, EK.x, 8·|H|)
//!   secret     = TPMS_ECC_POINT Q (u16 |x| ‖ x ‖ u16 |y| ‖ y)
//! then, for both:
//! symKey       = KDFa(H, seed, "STORAGE", objectName, "", k)
//! encIdentity  = AES-k-CFB(symKey, IV = 0)( u16 |credential| ‖ credential )
//! HMACkey      = KDFa(H, seed, "INTEGRITY", "", "", 8·|H|)
//! outerHMAC    = HMAC-H(HMACkey, encIdentity ‖ objectName)
//! credentialBlob = u16 |H| ‖ outerHMAC ‖ encIdentity
//! ```
//!
//! [`Credential`] holds `credentialBlob` and `secret` WITHOUT the outer
//! `TPM2B` size of `TPM2B_ID_OBJECT` / `TPM2B_ENCRYPTED_SECRET`: exactly what
//! tss-esapi's `IdObject::try_from(Vec<u8>)` and
//! `EncryptedSecret::try_from(Vec<u8>)` take. (The inner TPM2B_DIGEST size of
//! the HMAC is part of `id_object`.)

use p256::elliptic_curve::{
    self,
    sec1::{FromEncodedPoint, ModulusSize, ToEncodedPoint},
    CurveArithmetic, FieldBytes, FieldBytesSize, NonZeroScalar,
};
use rand_core::CryptoRngCore;

use super::public::{EccParams, Public, PublicKey, PublicKeyError, TpmParseError};
use super::{alg, curve, parse_tpmt_public, HashAlg};

/// The largest credential `TPM2_MakeCredential` accepts: a `TPM2B_DIGEST`
/// holds at most `sizeof(TPMU_HA)` = 64 bytes.
pub const MAX_CREDENTIAL: usize = 64;

/// Why a credential could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("EK TPMT_PUBLIC: {0}")]
    Parse(#[from] TpmParseError),
    #[error("EK public key: {0}")]
    PublicKey(#[from] PublicKeyError),
    /// Not returned any more (ECC EKs on NIST P-256/P-384 are supported);
    /// kept so existing matches still compile.
    #[error("EK is not of a key type MakeCredential supports here")]
    EccUnsupported,
    #[error("EK ECC curve 0x{0:04x} is not NIST P-256 (0x0003) or P-384 (0x0004)")]
    UnsupportedCurve(u16),
    #[error("EK ECC public point is not a valid point of curve 0x{0:04x}")]
    BadEccPoint(u16),
    #[error("KDFe output of {0} bits is not a positive multiple of 8")]
    KdfeBits(u32),
    #[error("EK nameAlg 0x{0:04x} is not SHA-256/384/512")]
    UnsupportedNameAlg(u16),
    #[error("EK attributes 0x{0:08x} are not those of a restricted decryption (storage) key")]
    NotStorageKey(u32),
    #[error("EK symmetric algorithm {0} is not AES-128/256-CFB")]
    UnsupportedSymmetric(String),
    #[error("credential is {0} bytes; at most {MAX_CREDENTIAL} fit in a TPM2B_DIGEST")]
    CredentialTooLong(usize),
    #[error("object name is {0} bytes; a Name is a u16 algorithm then a digest")]
    BadObjectName(usize),
    #[error("KDFa output of {0} bits is not a positive multiple of 8")]
    KdfBits(u32),
    #[error("RSA-OAEP encryption of the seed to the EK failed: {0}")]
    Rsa(#[source] rsa::Error),
}

/// The two buffers `TPM2_ActivateCredential` takes, each without its outer
/// `TPM2B` size (see the module doc).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// `TPM2B_ID_OBJECT.credential`: u16 |H| ‖ outerHMAC ‖ encIdentity.
    pub id_object: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET.secret`: the OAEP ciphertext of the seed
    /// (RSA EK), or the marshalled ephemeral `TPMS_ECC_POINT` (ECC EK).
    pub encrypted_secret: Vec<u8>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("id_object_len", &self.id_object.len())
            .field("encrypted_secret_len", &self.encrypted_secret.len())
            .finish()
    }
}

impl Credential {
    /// `id_object` with its `TPM2B_ID_OBJECT` size prefix (as tpm2-tools
    /// writes it).
    pub fn id_object_tpm2b(&self) -> Vec<u8> {
        with_size(&self.id_object)
    }

    /// `encrypted_secret` with its `TPM2B_ENCRYPTED_SECRET` size prefix.
    pub fn encrypted_secret_tpm2b(&self) -> Vec<u8> {
        with_size(&self.encrypted_secret)
    }
}

fn with_size(inner: &[u8]) -> Vec<u8> {
    // Both are bounded far below 64 KiB (an RSA-16384 ciphertext is 2 KiB).
    let len = u16::try_from(inner.len()).unwrap_or(u16::MAX);
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(inner);
    out
}

/// Convenience: [`make_credential_with_rng`] on a bare marshalled EK
/// `TPMT_PUBLIC` (as the agent sends it), with the operating system's RNG.
pub fn make_credential(
    ek_tpmt_public: &[u8],
    object_name: &[u8],
    credential: &[u8],
) -> Result<Credential, CredentialError> {
    let ek = parse_tpmt_public(ek_tpmt_public)?;
    make_credential_with_rng(&ek, object_name, credential, &mut rand_core::OsRng)
}

/// `TPM2_MakeCredential(handle = ek, credential, objectName)` for an RSA EK
/// or an ECC EK on NIST P-256 or P-384.
///
/// `object_name` is the Name of the key the credential is bound to (the AK:
/// [`Public::name`] of its `TPMT_PUBLIC`); `credential` is at most 64 bytes.
pub fn make_credential_with_rng<R: CryptoRngCore + ?Sized>(
    ek: &Public,
    object_name: &[u8],
    credential: &[u8],
    rng: &mut R,
) -> Result<Credential, CredentialError> {
    let hash = HashAlg::from_alg_id(ek.name_alg)
        .ok_or(CredentialError::UnsupportedNameAlg(ek.name_alg))?;
    // The TPM refuses anything but a restricted decryption key (TPM_RC_TYPE);
    // fail here with a clearer message than a failed activation later.
    if !(ek.attributes.restricted() && ek.attributes.decrypt()) {
        return Err(CredentialError::NotStorageKey(ek.attributes.0));
    }
    let symmetric = match &ek.key {
        PublicKey::Rsa { params, .. } => params.symmetric,
        PublicKey::Ecc { params, .. } => params.symmetric,
    };
    let sym_bytes = match symmetric {
        Some(s)
            if s.algorithm == alg::AES && s.mode == alg::CFB && matches!(s.key_bits, 128 | 256) =>
        {
            usize::from(s.key_bits / 8)
        }
        other => return Err(CredentialError::UnsupportedSymmetric(format!("{other:?}"))),
    };
    if credential.len() > MAX_CREDENTIAL {
        return Err(CredentialError::CredentialTooLong(credential.len()));
    }
    if object_name.len() < 2 {
        return Err(CredentialError::BadObjectName(object_name.len()));
    }
    let (seed, encrypted_secret) = match &ek.key {
        PublicKey::Rsa { .. } => {
            let ek_key = ek
                .rsa_public_key()
                .ok_or(CredentialError::EccUnsupported)??;
            let mut seed = vec![0u8; hash.size()];
            rng.fill_bytes(&mut seed);
            let encrypted_secret = oaep_encrypt(hash, &ek_key, &seed, rng)?;
            (seed, encrypted_secret)
        }
        PublicKey::Ecc { params, x, y } => ecc_seed(hash, params, x, y, rng)?,
    };

    let sym_key = kdfa(hash, &seed, b"STORAGE", object_name, &[], bits(sym_bytes))?;
    // `credential.len()` ≤ 64 was checked above.
    let mut enc_identity = with_size(credential);
    cfb_encrypt(&sym_key, &mut enc_identity);

    let hmac_key = kdfa(hash, &seed, b"INTEGRITY", &[], &[], bits(hash.size()))?;
    let outer_hmac = hash.hmac(&hmac_key, &[&enc_identity, object_name]);

    let mut id_object = with_size(&outer_hmac);
    id_object.extend_from_slice(&enc_identity);
    Ok(Credential {
        id_object,
        encrypted_secret,
    })
}

/// The seed and the encrypted secret for an ECC EK: one-pass ECDH with an
/// ephemeral key on the EK's curve, the seed derived with KDFe (Part 1
/// §24.4, Annex C.6.1).
fn ecc_seed<R: CryptoRngCore + ?Sized>(
    hash: HashAlg,
    params: &EccParams,
    ek_x: &[u8],
    ek_y: &[u8],
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), CredentialError> {
    let mut rng = RngRef(rng);
    let Ecdh {
        z,
        ephemeral_x: eph_x,
        ephemeral_y: eph_y,
    } = match params.curve_id {
        curve::NIST_P256 => ecdh::<p256::NistP256>(params.curve_id, ek_x, ek_y, &mut rng)?,
        curve::NIST_P384 => ecdh::<p384::NistP384>(params.curve_id, ek_x, ek_y, &mut rng)?,
        other => return Err(CredentialError::UnsupportedCurve(other)),
    };
    // partyVInfo is the EK's x exactly as its public area carries it: that is
    // what the TPM hashes on its side.
    let seed = kdfe(hash, &z, b"IDENTITY", &eph_x, ek_x, bits(hash.size()))?;
    let mut secret = with_size(&eph_x);
    secret.extend_from_slice(&with_size(&eph_y));
    Ok((seed, secret))
}

/// One ephemeral ECDH, each value at the curve's full width.
struct Ecdh {
    /// The shared point's x.
    z: Vec<u8>,
    ephemeral_x: Vec<u8>,
    ephemeral_y: Vec<u8>,
}

/// Ephemeral ECDH against the EK's public point. The EK point is checked to
/// lie on the curve first: it comes from the node.
fn ecdh<C>(
    curve_id: u16,
    ek_x: &[u8],
    ek_y: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Ecdh, CredentialError>
where
    C: CurveArithmetic,
    C::AffinePoint: FromEncodedPoint<C> + ToEncodedPoint<C>,
    FieldBytesSize<C>: ModulusSize,
{
    use elliptic_curve::group::{Curve as _, Group as _};
    let bad_point = || CredentialError::BadEccPoint(curve_id);
    let x = left_pad::<C>(ek_x).ok_or_else(bad_point)?;
    let y = left_pad::<C>(ek_y).ok_or_else(bad_point)?;
    let encoded = elliptic_curve::sec1::EncodedPoint::<C>::from_affine_coordinates(&x, &y, false);
    let ek_point: Option<C::AffinePoint> = C::AffinePoint::from_encoded_point(&encoded).into();
    let ek_point = C::ProjectivePoint::from(ek_point.ok_or_else(bad_point)?);

    let ephemeral = NonZeroScalar::<C>::random(rng);
    let shared = (ek_point * *ephemeral).to_affine().to_encoded_point(false);
    let public = (C::ProjectivePoint::generator() * *ephemeral)
        .to_affine()
        .to_encoded_point(false);
    // Neither is the identity (prime-order curve, non-zero scalar, valid
    // point), so both have coordinates; say so rather than panic if not.
    match (shared.x(), public.x(), public.y()) {
        (Some(z), Some(x), Some(y)) => Ok(Ecdh {
            z: z.to_vec(),
            ephemeral_x: x.to_vec(),
            ephemeral_y: y.to_vec(),
        }),
        _ => Err(bad_point()),
    }
}

/// A big-endian coordinate (the TPM may drop leading zero bytes) at the
/// curve's full width, or `None` when it is longer.
fn left_pad<C: elliptic_curve::Curve>(v: &[u8]) -> Option<FieldBytes<C>> {
    let mut out = FieldBytes::<C>::default();
    let pad = out.len().checked_sub(v.len())?;
    out.get_mut(pad..)?.copy_from_slice(v);
    Some(out)
}

/// KDFe (Part 1 §11.4.10.3, SP 800-56A concatenation KDF with H): the first
/// `bits` bits of H(\[i\]₃₂ ‖ Z ‖ label ‖ 0x00 ‖ partyUInfo ‖ partyVInfo),
/// i = 1, 2, ….
///
/// `label` is given without its terminating NUL; one is appended unless the
/// label already ends in one. `bits` must be a positive multiple of 8.
pub fn kdfe(
    hash: HashAlg,
    z: &[u8],
    label: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, CredentialError> {
    if bits == 0 || bits % 8 != 0 {
        return Err(CredentialError::KdfeBits(bits));
    }
    let want = usize::try_from(bits / 8).map_err(|_| CredentialError::KdfeBits(bits))?;
    let nul: &[u8] = if label.last() == Some(&0) { &[] } else { &[0] };
    let mut out = Vec::with_capacity(want + hash.size());
    let mut counter: u32 = 1;
    while out.len() < want {
        let mut block = counter.to_be_bytes().to_vec();
        for part in [z, label, nul, party_u, party_v] {
            block.extend_from_slice(part);
        }
        out.extend_from_slice(&hash.digest(&block));
        counter += 1;
    }
    out.truncate(want);
    Ok(out)
}

fn bits(bytes: usize) -> u32 {
    u32::try_from(bytes * 8).unwrap_or(0)
}

fn oaep_encrypt<R: CryptoRngCore + ?Sized>(
    hash: HashAlg,
    key: &rsa::RsaPublicKey,
    seed: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, CredentialError> {
    // The label includes its terminating NUL (Part 1 §24.4, "IDENTITY").
    const LABEL: &str = "IDENTITY\0";
    let padding = match hash {
        HashAlg::Sha256 => rsa::Oaep::new_with_label::<sha2::Sha256, _>(LABEL),
        HashAlg::Sha384 => rsa::Oaep::new_with_label::<sha2::Sha384, _>(LABEL),
        HashAlg::Sha512 => rsa::Oaep::new_with_label::<sha2::Sha512, _>(LABEL),
    };
    let mut rng = RngRef(rng);
    key.encrypt(&mut rng, padding, seed)
        .map_err(CredentialError::Rsa)
}

/// Lets a `?Sized` RNG reference be passed where `rsa` wants a sized one.
struct RngRef<'a, R: CryptoRngCore + ?Sized>(&'a mut R);

impl<R: CryptoRngCore + ?Sized> rand_core::RngCore for RngRef<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

impl<R: CryptoRngCore + ?Sized> rand_core::CryptoRng for RngRef<'_, R> {}

/// AES-CFB (full-block feedback) with a zero IV, in place; the key length
/// (16 or 32 bytes) picks AES-128 or AES-256.
fn cfb_encrypt(key: &[u8], buf: &mut [u8]) {
    use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
    let iv = [0u8; 16];
    if let Ok(c) = cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv) {
        c.encrypt(buf);
    } else if let Ok(c) = cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv) {
        c.encrypt(buf);
    }
}

/// KDFa (Part 1 §11.4.10.2, SP 800-108 counter mode with HMAC-H):
/// the first `bits` bits of
/// HMAC(key, \[i\]₃₂ ‖ label ‖ 0x00 ‖ contextU ‖ contextV ‖ \[bits\]₃₂), i = 1, 2, ….
///
/// `label` is given without its terminating NUL; one is appended unless the
/// label already ends in one (as the TCG reference implementation does).
/// `bits` must be a positive multiple of 8.
pub fn kdfa(
    hash: HashAlg,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, CredentialError> {
    if bits == 0 || bits % 8 != 0 {
        return Err(CredentialError::KdfBits(bits));
    }
    let want = usize::try_from(bits / 8).map_err(|_| CredentialError::KdfBits(bits))?;
    let nul: &[u8] = if label.last() == Some(&0) { &[] } else { &[0] };
    let mut out = Vec::with_capacity(want + hash.size());
    let mut counter: u32 = 1;
    while out.len() < want {
        out.extend_from_slice(&hash.hmac(
            key,
            &[
                &counter.to_be_bytes(),
                label,
                nul,
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        ));
        counter += 1;
    }
    out.truncate(want);
    Ok(out)
}
