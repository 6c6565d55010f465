//! Writes the tenant's image onto a disk: fast, verified, resumable, and
//! never half-bootable.
//!
//! Three stages on their own threads, joined by bounded channels so the
//! slowest sets the pace and memory stays bounded (`Tuning`):
//! `source` (HTTP(S)/file, hashes the bytes as served, resumes with Range)
//! → `decode` (format by magic bytes, decompression, cut into extents)
//! → the writer here (O_DIRECT, zero runs skipped only on a target known to
//! read as zero). The first MiB of the image is held in memory and written
//! last, only after the checksum (and signature) matched; until then the
//! target's first MiB and backup GPT are zeros, and any failure zeros them
//! again. This module must never leave a target that could boot a partial
//! or unverified image, and never hold the image in RAM.
//!
//! Blocking: from async code call [`write_image`] inside
//! `tokio::task::spawn_blocking` (the download stage runs its own runtime).

pub mod bmap;
pub mod decode;
pub mod qcow2;
pub mod source;
pub mod target;

use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use crate::digest::Sha256;
use warden_protocol::image::{ImageRecord, ImageRequest, SignatureRequest, SignatureStatus};

use bmap::MappedRange;
use decode::{clamp, AlignedBuf, DecodeError, Extent};
use target::{Target, TargetError, HEAD, HEAD_BYTES};

/// Knobs that are the agent's business, not the plan's.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Consecutive failed attempts (without progress) before giving up.
    pub max_retries: u32,
    /// First retry delay; doubled on each further failure.
    pub backoff: Duration,
    /// Size of each decode/write buffer.
    pub buffer_size: usize,
    /// Number of decode/write buffers: with `buffer_size`, the bulk of the
    /// step's memory.
    pub buffers: usize,
    /// Chunks (≤ 256 KiB each, as served) queued between download and decode.
    pub source_queue: usize,
    /// Bytes a qcow2 image may make the decoder hold while its tables or
    /// clusters arrive out of order (`qcow2` module doc); images made by
    /// `qemu-img convert` need none.
    pub qcow2_hold: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            max_retries: 5,
            backoff: Duration::from_millis(500),
            buffer_size: 4 * 1024 * 1024,
            buffers: 4,
            source_queue: 16,
            qcow2_hold: 64 * 1024 * 1024,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn status_reason(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// Why the image step failed. Every variant names the URL; the target has
/// been left without a bootable header (see the module doc).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {url}: bad request: {reason}")]
    Request { url: String, reason: String },
    #[error("image {url}: download failed at offset {offset}: {reason}")]
    Http {
        url: String,
        offset: u64,
        reason: String,
    },
    #[error("image {url}: HTTP {status} {}", status_reason(*status))]
    Status { url: String, status: u16 },
    #[error(
        "image {url}: checksum mismatch after {len} bytes served: expected {expected}, got {got}"
    )]
    Checksum {
        url: String,
        len: u64,
        expected: String,
        got: String,
    },
    #[error("image signature {url}: {reason}")]
    Signature { url: String, reason: String },
    #[error("image bmap {url}: {reason}")]
    Bmap { url: String, reason: String },
    #[error("image {url}: bmap range {first}-{last} (offset {offset}) decoded to sha256:{got}, the bmap says sha256:{expected}")]
    BmapRange {
        url: String,
        first: u64,
        last: u64,
        offset: u64,
        expected: String,
        got: String,
    },
    #[error("image {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: DecodeError,
    },
    #[error(
        "image {url} does not fit {target}: it reaches offset {end}, the target holds {size} bytes"
    )]
    TooLarge {
        url: String,
        target: String,
        end: u64,
        size: u64,
    },
    #[error("image {url}: {source}")]
    Target {
        url: String,
        #[source]
        source: TargetError,
    },
    #[error("image {url}: read-back of {target} from offset {offset} differs: expected sha256:{expected}, got sha256:{got}")]
    Verify {
        url: String,
        target: String,
        offset: u64,
        expected: String,
        got: String,
    },
    /// A later stage stopped; its own error is the one reported.
    #[error("image step cancelled")]
    Cancelled,
    #[error("image {url}: internal error: {reason}")]
    Internal { url: String, reason: String },
}

/// A parsed ed25519 public key, with the signature's URL.
struct SigCheck {
    key: ed25519_dalek::VerifyingKey,
    url: String,
}

fn parse_signature_request(url: &str, sig: &SignatureRequest) -> Result<SigCheck, ImageError> {
    let bad = |reason: String| ImageError::Request {
        url: url.to_string(),
        reason,
    };
    let mut raw = [0u8; 32];
    hex::decode_to_slice(sig.public_key.trim().to_ascii_lowercase(), &mut raw).map_err(|_| {
        bad("signature public_key: expected 64 hex digits (a raw ed25519 key)".into())
    })?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
        .map_err(|e| bad(format!("signature public_key: {e}")))?;
    Ok(SigCheck {
        key,
        url: sig.url.clone(),
    })
}

/// The 64 signature bytes from a file holding them raw, as hex, or as base64.
fn signature_bytes(data: &[u8]) -> Option<[u8; 64]> {
    if let Ok(raw) = <[u8; 64]>::try_from(data) {
        return Some(raw);
    }
    let text = std::str::from_utf8(data).ok()?;
    let text: String = text.split_whitespace().collect();
    let mut out = [0u8; 64];
    if hex::decode_to_slice(text.to_ascii_lowercase(), &mut out).is_ok() {
        return Some(out);
    }
    use base64::Engine as _;
    let v = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    <[u8; 64]>::try_from(v.as_slice()).ok()
}

/// Checks `signature` over the digest's lowercase hex text (docs/image.md).
fn verify_signature(
    check: &SigCheck,
    signature: &[u8],
    digest_hex: &str,
) -> Result<(), ImageError> {
    let err = |reason: String| ImageError::Signature {
        url: check.url.clone(),
        reason,
    };
    let bytes = signature_bytes(signature).ok_or_else(|| {
        err(format!(
            "expected 64 bytes of ed25519 signature (raw, hex or base64), got {} bytes",
            signature.len()
        ))
    })?;
    let sig = ed25519_dalek::Signature::from_bytes(&bytes);
    check
        .key
        .verify_strict(digest_hex.as_bytes(), &sig)
        .map_err(|_| {
            err(format!(
                "does not verify with key {} over the image digest {digest_hex}",
                hex::encode(check.key.as_bytes())
            ))
        })
}

/// The writer stage's state.
struct Writer<'a> {
    url: &'a str,
    target: &'a Target,
    zeros: &'a AlignedBuf,
    /// The image's first MiB, held back until everything verified.
    head: AlignedBuf,
    skip_zeros: bool,
    /// The ranges that are the image: the bmap's, or one range over all.
    /// Bytes outside them are written as zeros (or skipped).
    ranges: &'a [MappedRange],
    /// The range the next bytes fall in or before.
    range_idx: usize,
    /// SHA-256 of the current range so far (when it has a checksum).
    range_hash: Option<Sha256>,
    /// SHA-256 of the mapped bytes, for verify-after-write.
    hash: Option<Sha256>,
    /// Decoded bytes seen since the last restart (extents arrive in order).
    len: u64,
    written: u64,
    skipped: u64,
    next_report: u64,
}

const REPORT_EVERY: u64 = 512 * 1024 * 1024;

/// One range over every offset: the image without a bmap.
const WHOLE: MappedRange = MappedRange {
    start: 0,
    end: u64::MAX,
    first_block: 0,
    last_block: u64::MAX,
    sha256: None,
};

impl Writer<'_> {
    fn target_err(&self, source: TargetError) -> ImageError {
        ImageError::Target {
            url: self.url.to_string(),
            source,
        }
    }

    fn advance(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        if offset != self.len {
            return Err(ImageError::Internal {
                url: self.url.to_string(),
                reason: format!("extent at {offset} while expecting {}", self.len),
            });
        }
        let end = offset + len;
        if end > self.target.size() {
            return Err(ImageError::TooLarge {
                url: self.url.to_string(),
                target: self.target.path().to_string(),
                end,
                size: self.target.size(),
            });
        }
        self.len = end;
        if end >= self.next_report {
            crate::telemetry::progress("image", "decoded", end, None);
            tracing::info!(
                url = self.url,
                target = self.target.path(),
                decoded = end,
                written = self.written,
                skipped = self.skipped,
                "image progress"
            );
            self.next_report = end + REPORT_EVERY;
        }
        Ok(())
    }

    /// Splits `offset..offset + len` at range edges: calls `f(start, end,
    /// mapped)` for each piece in order, and checks each range's checksum
    /// as its last byte goes by (`bytes` feeds the hashers).
    fn pieces(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Self, u64, u64, bool) -> Result<(), ImageError>,
        bytes: impl Fn(u64, u64, &mut dyn FnMut(&[u8])),
    ) -> Result<(), ImageError> {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let Some(r) = self.ranges.get(self.range_idx).cloned() else {
                f(self, at, end, false)?;
                break;
            };
            if at < r.start {
                let to = end.min(r.start);
                f(self, at, to, false)?;
                at = to;
                continue;
            }
            let to = end.min(r.end);
            if let Some(h) = &mut self.range_hash {
                bytes(at, to, &mut |b| h.update(b));
            }
            if let Some(h) = &mut self.hash {
                bytes(at, to, &mut |b| h.update(b));
            }
            f(self, at, to, true)?;
            at = to;
            if at == r.end {
                self.finish_range(&r)?;
            }
        }
        Ok(())
    }

    /// The range ends: compare its checksum, move to the next one.
    fn finish_range(&mut self, r: &MappedRange) -> Result<(), ImageError> {
        if let (Some(h), Some(expected)) = (self.range_hash.take(), r.sha256) {
            let got: [u8; 32] = h.finalize();
            if got != expected {
                return Err(ImageError::BmapRange {
                    url: self.url.to_string(),
                    first: r.first_block,
                    last: r.last_block,
                    offset: r.start,
                    expected: hex::encode(expected),
                    got: hex::encode(got),
                });
            }
        }
        self.range_idx += 1;
        self.range_hash = self
            .ranges
            .get(self.range_idx)
            .and_then(|r| r.sha256)
            .map(|_| Sha256::new());
        Ok(())
    }

    fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.advance(offset, data.len() as u64)?;
        let slice =
            |a: u64, b: u64| &data[clamp(a - offset, data.len())..clamp(b - offset, data.len())];
        self.pieces(
            offset,
            data.len() as u64,
            |w, a, b, mapped| {
                if mapped {
                    w.put_data(a, slice(a, b))
                } else {
                    w.put_zeros(a, b - a)
                }
            },
            |a, b, feed| feed(slice(a, b)),
        )
    }

    fn zeros(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.advance(offset, len)?;
        let zeros = self.zeros;
        self.pieces(
            offset,
            len,
            |w, a, b, _| w.put_zeros(a, b - a),
            |a, b, feed| {
                let mut left = b - a;
                while left > 0 {
                    let n = clamp(left, zeros.len());
                    feed(&zeros.as_slice()[..n]);
                    left -= n as u64;
                }
            },
        )
    }

    fn put_data(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let mut data = data;
        let mut offset = offset;
        if offset < HEAD {
            let n = clamp(HEAD - offset, data.len());
            let at = clamp(offset, HEAD_BYTES);
            self.head.as_mut_slice()[at..at + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            offset += n as u64;
        }
        if !data.is_empty() {
            self.target
                .write_at(data, offset)
                .map_err(|e| self.target_err(e))?;
            self.written += data.len() as u64;
        }
        Ok(())
    }

    fn put_zeros(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        let (mut offset, mut len) = (offset, len);
        if offset < HEAD {
            let n = clamp((HEAD - offset).min(len), HEAD_BYTES);
            let at = clamp(offset, HEAD_BYTES);
            self.head.as_mut_slice()[at..at + n].fill(0);
            offset += n as u64;
            len -= n as u64;
        }
        if len == 0 {
            return Ok(());
        }
        if self.skip_zeros {
            self.skipped += len;
        } else {
            self.target
                .write_zeros(self.zeros, offset, len)
                .map_err(|e| self.target_err(e))?;
            self.written += len;
        }
        Ok(())
    }

    fn restart(&mut self) {
        self.head.as_mut_slice().fill(0);
        self.len = 0;
        self.next_report = 0;
        self.range_idx = 0;
        self.range_hash = self
            .ranges
            .first()
            .and_then(|r| r.sha256)
            .map(|_| Sha256::new());
        if self.hash.is_some() {
            self.hash = Some(Sha256::new());
        }
    }

    /// The runs of one decoded buffer: data from `buf`, zeros as zeros.
    fn split(
        &mut self,
        offset: u64,
        buf: &[u8],
        runs: &[(usize, usize, bool)],
    ) -> Result<(), ImageError> {
        for &(s, e, zero) in runs {
            let at = offset + s as u64;
            if zero {
                self.zeros(at, (e - s) as u64)?;
            } else {
                let data = buf.get(s..e).ok_or_else(|| ImageError::Internal {
                    url: self.url.to_string(),
                    reason: format!(
                        "decoded run {s}..{e} at offset {offset} is outside its {}-byte buffer",
                        buf.len()
                    ),
                })?;
                self.data(at, data)?;
            }
        }
        Ok(())
    }

    fn run(mut self, rx: Receiver<Extent>, pool: Sender<AlignedBuf>) -> Result<Self, ImageError> {
        self.restart();
        for extent in rx {
            match extent {
                Extent::Data { offset, buf } => {
                    let r = self.data(offset, buf.as_slice());
                    // The decoder may be gone already; the buffer is then just freed.
                    let _ = pool.send(buf);
                    r?;
                }
                Extent::Split { offset, buf, runs } => {
                    let r = self.split(offset, buf.as_slice(), &runs);
                    let _ = pool.send(buf);
                    r?;
                }
                Extent::Zeros { offset, len } => self.zeros(offset, len)?,
                Extent::Restart => self.restart(),
            }
        }
        Ok(self)
    }
}

/// Fetches, checks (digest as served, then format) and parses the bmap.
fn load_bmap(
    src: &source::Source,
    req: &warden_protocol::image::BmapRequest,
) -> Result<bmap::Bmap, ImageError> {
    let err = |reason: String| ImageError::Bmap {
        url: req.url.clone(),
        reason,
    };
    let data = source::fetch_bmap(src, &req.url)?;
    let mut h = crate::digest::StreamHash::new(req.checksum.algorithm);
    h.update(&data);
    let got = h.finish();
    if got != req.checksum.digest {
        return Err(err(format!(
            "checksum mismatch: expected {}, got {}:{}",
            req.checksum,
            req.checksum.algorithm.name(),
            hex::encode(got)
        )));
    }
    bmap::parse(&data).map_err(err)
}

/// Names the calling thread (its `comm`), so that `top -H`, a profile or
/// `bench-image` tells the pipeline's stages apart; a failure only loses
/// the name.
fn name_thread(name: &std::ffi::CStr) {
    let _ = nix::sys::prctl::set_name(name);
}

fn joined<T>(url: &str, h: std::thread::ScopedJoinHandle<'_, T>) -> Result<T, ImageError> {
    h.join().map_err(|_| ImageError::Internal {
        url: url.to_string(),
        reason: "a pipeline thread panicked".into(),
    })
}

/// Downloads, verifies and writes `req.url` onto `req.target`. Blocking.
///
/// On success the whole image is on the target, flushed, its first MiB
/// written last, and the partition table re-read. On failure the target's
/// first MiB and its last 33 × 4 KiB (both GPT copies) are zeros — unless
/// the failure came before anything was written (bad request, unreachable
/// server, HTTP error status, signature file missing), in which case the
/// target is untouched.
pub fn write_image(req: &ImageRequest, tuning: &Tuning) -> Result<ImageRecord, ImageError> {
    let start = Instant::now();
    let url = req.url.as_str();
    let sig_check = req
        .signature
        .as_ref()
        .map(|s| parse_signature_request(url, s))
        .transpose()?;
    if tuning.buffer_size == 0 || tuning.buffer_size % decode::ALIGN != 0 || tuning.buffers < 2 {
        return Err(ImageError::Request {
            url: url.to_string(),
            reason: format!(
                "tuning: need ≥ 2 buffers of a non-zero multiple of {} bytes",
                decode::ALIGN
            ),
        });
    }
    let src = source::source_for(url, req.https_trust.as_ref())?;
    let bmap = req.bmap.as_ref().map(|b| load_bmap(&src, b)).transpose()?;
    let whole = [WHOLE];
    let ranges: &[MappedRange] = match &bmap {
        Some(b) => &b.ranges,
        None => &whole,
    };
    let target = Target::open(&req.target).map_err(|source| ImageError::Target {
        url: url.to_string(),
        source,
    })?;
    let zeros = AlignedBuf::zeroed(HEAD_BYTES);
    let tgt_err = |source| ImageError::Target {
        url: url.to_string(),
        source,
    };
    // Fail safe: whatever went wrong, leave nothing that can boot.
    let fail = |e: ImageError| -> ImageError {
        if let Err(clear) = target.clear_boot_regions(&zeros) {
            tracing::error!(target = req.target, error = %clear, "cannot clear the boot regions after a failed image write");
        }
        tracing::error!(url, target = req.target, error = %e, "image write failed; first MiB and GPT copies cleared");
        e
    };
    tracing::info!(
        url,
        target = req.target,
        size = target.size(),
        direct_io = target.direct_io(),
        "image write starting"
    );

    let outcome = std::thread::scope(|s| {
        let (src_tx, src_rx) = std::sync::mpsc::sync_channel(tuning.source_queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let alg = req.checksum.algorithm;
        let sig_url = sig_check.as_ref().map(|c| c.url.clone());
        let t = *tuning;
        let dl = s.spawn(move || {
            name_thread(c"image-download");
            source::run(src, alg, sig_url, t, src_tx, ready_tx)
        });
        let Ok(ready) = ready_rx.recv() else {
            // Nothing was written: the download failed before its first good response.
            drop(src_rx);
            return Err(match joined(url, dl) {
                Ok(Ok(_)) => ImageError::Internal {
                    url: url.to_string(),
                    reason: "the download ended without starting".into(),
                },
                Ok(Err(e)) | Err(e) => e,
            });
        };
        if let Err(e) = target.clear_boot_regions(&zeros) {
            drop(src_rx);
            let _ = joined(url, dl);
            return Err(fail(tgt_err(e)));
        }
        let (pool_tx, pool_rx) = decode::pool(tuning.buffers, tuning.buffer_size);
        let (ext_tx, ext_rx) = std::sync::mpsc::sync_channel(tuning.buffers);
        let skip = req.target_reads_zero;
        let hold = tuning.qcow2_hold;
        let dec = s.spawn(move || {
            name_thread(c"image-decode");
            decode::run(src_rx, pool_rx, ext_tx, skip, hold)
        });
        let writer = Writer {
            url,
            target: &target,
            zeros: &zeros,
            head: AlignedBuf::zeroed(HEAD_BYTES),
            skip_zeros: req.target_reads_zero,
            ranges,
            range_idx: 0,
            range_hash: None,
            hash: req.verify_after_write.then(Sha256::new),
            len: 0,
            written: 0,
            skipped: 0,
            next_report: 0,
        };
        let wr = s.spawn(move || {
            name_thread(c"image-write");
            writer.run(ext_rx, pool_tx)
        });
        let w = joined(url, wr);
        let d = joined(url, dec);
        let dl = joined(url, dl);
        Ok((ready, dl, d, w))
    });
    let (ready, dl, dec, wr) = outcome?;

    // The first real cause wins: a download failure explains a decoder's
    // early end, a checksum mismatch explains a decoder's garbage, and a
    // writer failure explains why the others were cancelled.
    let downloaded = match dl {
        Ok(Ok(d)) => Some(d),
        Ok(Err(ImageError::Cancelled)) => None,
        Ok(Err(e)) | Err(e) => return Err(fail(e)),
    };
    if let Some(d) = &downloaded {
        if d.digest != req.checksum.digest {
            return Err(fail(ImageError::Checksum {
                url: url.to_string(),
                len: d.len,
                expected: req.checksum.to_string(),
                got: format!(
                    "{}:{}",
                    req.checksum.algorithm.name(),
                    hex::encode(&d.digest)
                ),
            }));
        }
    }
    let writer = match wr {
        Ok(Ok(w)) => w,
        Ok(Err(e)) | Err(e) => return Err(fail(e)),
    };
    let decoded = match dec {
        Ok(Ok(d)) => d,
        Ok(Err(source)) => {
            return Err(fail(ImageError::Decode {
                url: url.to_string(),
                source,
            }))
        }
        Err(e) => return Err(fail(e)),
    };
    let Some(downloaded) = downloaded else {
        return Err(fail(ImageError::Internal {
            url: url.to_string(),
            reason: "the download was cancelled though no stage failed".into(),
        }));
    };
    if let Some(b) = &bmap {
        if decoded.len != b.image_size {
            return Err(fail(ImageError::Bmap {
                url: req.bmap.as_ref().map(|r| r.url.clone()).unwrap_or_default(),
                reason: format!(
                    "the bmap's ImageSize is {} but the image decodes to {} bytes",
                    b.image_size, decoded.len
                ),
            }));
        }
    }
    if decoded.len != writer.len {
        return Err(fail(ImageError::Internal {
            url: url.to_string(),
            reason: format!("decoded {} bytes but wrote {}", decoded.len, writer.len),
        }));
    }
    let digest_hex = hex::encode(&downloaded.digest);
    let signature = match (&sig_check, &ready.signature) {
        (Some(check), Some(sig)) => {
            verify_signature(check, sig, &digest_hex).map_err(fail)?;
            SignatureStatus::Verified
        }
        (Some(check), None) => {
            return Err(fail(ImageError::Signature {
                url: check.url.clone(),
                reason: "signature required but not fetched".into(),
            }))
        }
        (None, _) => SignatureStatus::NotRequired,
    };
    target.sync().map_err(|e| fail(tgt_err(e)))?;

    // Verify the body before the head makes the disk bootable: the hash
    // covers the mapped ranges (all of the image without a bmap), the held
    // head from memory and the rest read back from disk.
    let head_len = clamp(writer.len, HEAD_BYTES);
    let verify_start = Instant::now();
    if let Some(expected) = writer.hash.clone() {
        let expected = hex::encode(expected.finalize());
        let mut h = Sha256::new();
        let mut buf = AlignedBuf::zeroed(tuning.buffer_size);
        for r in ranges {
            let end = r.end.min(writer.len);
            let mut at = r.start.min(end);
            if at < HEAD.min(end) {
                let to = HEAD.min(end);
                h.update(&writer.head.as_slice()[clamp(at, HEAD_BYTES)..clamp(to, HEAD_BYTES)]);
                at = to;
            }
            while at < end {
                let n = clamp(end - at, buf.capacity());
                buf.set_len(n);
                target
                    .read_at(buf.as_mut_slice(), at)
                    .map_err(|e| fail(tgt_err(e)))?;
                h.update(buf.as_slice());
                at += n as u64;
            }
        }
        let got = hex::encode(h.finalize());
        if got != expected {
            return Err(fail(ImageError::Verify {
                url: url.to_string(),
                target: req.target.clone(),
                offset: HEAD.min(writer.len),
                expected,
                got,
            }));
        }
    }
    target
        .write_at(&writer.head.as_slice()[..head_len], 0)
        .map_err(|e| fail(tgt_err(e)))?;
    target.sync().map_err(|e| fail(tgt_err(e)))?;
    if req.verify_after_write {
        let mut back = AlignedBuf::zeroed(head_len);
        target
            .read_at(back.as_mut_slice(), 0)
            .map_err(|e| fail(tgt_err(e)))?;
        if back.as_slice() != &writer.head.as_slice()[..head_len] {
            return Err(fail(ImageError::Verify {
                url: url.to_string(),
                target: req.target.clone(),
                offset: 0,
                expected: hex::encode(Sha256::digest(&writer.head.as_slice()[..head_len])),
                got: hex::encode(Sha256::digest(back.as_slice())),
            }));
        }
    }
    let verify_ms = if req.verify_after_write {
        ms(verify_start.elapsed())
    } else {
        0
    };
    // The image is complete and durable; a refused re-read is reported but
    // does not undo it.
    target.reread_partitions().map_err(tgt_err)?;

    let record = ImageRecord {
        url: url.to_string(),
        target: req.target.clone(),
        format: decoded.format,
        disk_format: decoded.disk_format,
        image_bytes: writer.len,
        bytes_served: downloaded.served,
        bytes_written: writer.written + head_len as u64,
        zero_bytes_skipped: writer.skipped,
        bmap_mapped_bytes: bmap.as_ref().map(bmap::Bmap::mapped_bytes),
        digest: format!("{}:{digest_hex}", req.checksum.algorithm.name()),
        signature,
        resumes: downloaded.resumes,
        restarts: downloaded.restarts,
        verified_after_write: req.verify_after_write,
        direct_io: target.direct_io(),
        download_ms: ms(downloaded.elapsed),
        verify_ms,
        total_ms: ms(start.elapsed()),
        ca_sha256: req.trusted_ca_sha256(),
    };
    tracing::info!(url, target = req.target, format = %record.format, image_bytes = record.image_bytes, written = record.bytes_written, skipped = record.zero_bytes_skipped, resumes = record.resumes, restarts = record.restarts, total_ms = record.total_ms, "image written");
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;

    #[test]
    fn signature_formats() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let digest = "ab".repeat(32);
        let sig = sk.sign(digest.as_bytes()).to_bytes();
        let check = SigCheck {
            key: sk.verifying_key(),
            url: "file:///sig".into(),
        };
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig) + "\n";
        for form in [
            sig.to_vec(),
            hex::encode(sig).into_bytes(),
            b64.into_bytes(),
        ] {
            verify_signature(&check, &form, &digest).unwrap();
        }
        let e = verify_signature(&check, &sig, &"cd".repeat(32)).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        assert!(verify_signature(&check, b"short", &digest).is_err());
    }
}
