//! The download stage: fetches the image as served (HTTP, HTTPS or a local
//! file), hashes every byte it hands on, and resumes a dropped connection.
//! The hash runs on a thread of its own ([`HashStage`]), beside the receive,
//! instead of in series with it.
//!
//! It owns the network side of the image step: TLS trust for the image
//! server, `Range` resumption from the last offset that was both hashed and
//! handed to the decoder, a clean restart from byte 0 when the server ignores
//! `Range`, bounded retries with exponential backoff, and the small fetch of
//! a detached signature. It must never write to a disk and never buffer more
//! than one coalesced chunk: the bounded channel to the decoder sets its pace.

use std::io::Read;
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::digest::StreamHash;
use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use rustls::RootCertStore;
use warden_protocol::image::{DigestAlgorithm, HttpsTrust};

use super::decode::SrcMsg;
use super::{ImageError, Tuning};
use crate::client::{install_crypto_provider, PinnedCaVerifier};
use crate::config::CaPin;

/// Chunks smaller than this are gathered before being handed on, so the
/// channel carries few, large messages.
const COALESCE: usize = 256 * 1024;
/// Chunks queued for the hashing thread (each at most ~[`COALESCE`]; the
/// bytes are shared with the decoder's queue, not copied).
const HASH_QUEUE: usize = 16;
/// Largest detached signature file accepted.
const MAX_SIGNATURE: usize = 4096;

enum HashMsg {
    Data(Bytes),
    /// The download restarted from byte 0.
    Reset,
}

/// The served bytes' hash on a thread of its own: it sees exactly the bytes
/// handed on, in order ([`HashMsg::Reset`] after a restart), so its digest
/// is the same as hashing in line, while the download thread only receives.
/// Hashing is the costliest per-byte work of the stage (SHA-256 of an image
/// is ~1 s per 1.7 GB on a core with SHA-NI). The bounded queue makes a
/// slower hasher hold the download back.
struct HashStage {
    tx: Option<SyncSender<HashMsg>>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

impl HashStage {
    fn start(alg: DigestAlgorithm) -> std::io::Result<HashStage> {
        let (tx, rx) = sync_channel::<HashMsg>(HASH_QUEUE);
        let thread = std::thread::Builder::new()
            .name("image-hash".into())
            .spawn(move || {
                let mut hasher = StreamHash::new(alg);
                for msg in rx {
                    match msg {
                        HashMsg::Data(chunk) => hasher.update(&chunk),
                        HashMsg::Reset => hasher = StreamHash::new(alg),
                    }
                }
                hasher.finish()
            })?;
        Ok(HashStage {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `msg`; `false` if the hashing thread is gone.
    fn send(&self, msg: HashMsg) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok())
    }

    /// The digest of everything queued since the last reset.
    fn finish(mut self) -> Option<Vec<u8>> {
        drop(self.tx.take());
        self.thread.take().and_then(|t| t.join().ok())
    }
}

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Http {
        url: String,
        client: reqwest::Client,
    },
    File {
        url: String,
        path: std::path::PathBuf,
    },
}

impl Source {
    pub fn url(&self) -> &str {
        match self {
            Source::Http { url, .. } | Source::File { url, .. } => url,
        }
    }
}

/// Builds the source for `url`; `https://` needs `trust`.
pub fn source_for(url: &str, trust: Option<&HttpsTrust>) -> Result<Source, ImageError> {
    let bad = |reason: String| ImageError::Request {
        url: url.to_string(),
        reason,
    };
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Source::File {
            url: url.to_string(),
            path: path.into(),
        });
    }
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(bad("expected an http://, https:// or file:// URL".into()));
    }
    install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let tls = match trust {
        Some(HttpsTrust::PinnedCa(pin)) => {
            let pin = parse_pin(pin)
                .ok_or_else(|| bad(format!("bad pinned CA {pin:?}: expected sha256:<64 hex>")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(
                    url, pin, provider,
                )))
                .with_no_client_auth()
        }
        Some(HttpsTrust::CaBundlePem(pem)) => {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::CertificateDer;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| bad(format!("CA bundle: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("CA bundle: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("CA bundle holds no certificate".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None if https => {
            return Err(bad(
                "an https:// image needs https_trust (a CA bundle or a pinned CA)".into(),
            ))
        }
        // Plain HTTP: no TLS is used; the checksum is the integrity check.
        None => builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    };
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        // A stalled transfer becomes an error, then a resume.
        .read_timeout(Duration::from_secs(30))
        .user_agent(concat!("warden-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok(Source::Http {
        url: url.to_string(),
        client,
    })
}

/// The error and its sources on one line (reqwest and hyper wrap the cause
/// several times; repeats are dropped).
fn describe_reqwest(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn parse_pin(s: &str) -> Option<CaPin> {
    let hex_part = s.trim().strip_prefix("sha256:")?;
    let mut pin = [0u8; 32];
    hex::decode_to_slice(hex_part.to_ascii_lowercase(), &mut pin).ok()?;
    Some(CaPin(pin))
}

/// What the download stage saw.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub digest: Vec<u8>,
    /// Length of the image as served.
    pub len: u64,
    /// Bytes received, counting those received again after a restart.
    pub served: u64,
    pub resumes: u32,
    pub restarts: u32,
    pub elapsed: Duration,
}

/// Sent once the image's first response is good (and the signature, if any,
/// was fetched): only then may the coordinator touch the disk.
#[derive(Debug)]
pub struct Ready {
    pub signature: Option<Vec<u8>>,
}

/// Hashes and hands on bytes, tracking the resumable offset.
struct Out<'a> {
    tx: &'a SyncSender<SrcMsg>,
    url: &'a str,
    hasher: HashStage,
    /// Bytes hashed and handed on: where a resume starts.
    offset: u64,
    served: u64,
    pending: BytesMut,
}

impl Out<'_> {
    fn push(&mut self, chunk: Bytes) -> Result<(), ImageError> {
        if self.pending.len() + chunk.len() > COALESCE {
            self.flush()?;
        }
        if self.pending.is_empty() && chunk.len() >= COALESCE / 4 {
            return self.hand_on(chunk);
        }
        self.pending.extend_from_slice(&chunk);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = self.pending.split().freeze();
        self.hand_on(chunk)
    }

    fn hand_on(&mut self, chunk: Bytes) -> Result<(), ImageError> {
        if !self.hasher.send(HashMsg::Data(chunk.clone())) {
            return Err(self.hash_gone());
        }
        let n = chunk.len() as u64;
        self.tx
            .send(SrcMsg::Data(chunk))
            .map_err(|_| ImageError::Cancelled)?;
        self.offset += n;
        self.served += n;
        Ok(())
    }

    fn restart(&mut self) -> Result<(), ImageError> {
        self.pending.clear();
        if !self.hasher.send(HashMsg::Reset) {
            return Err(self.hash_gone());
        }
        self.offset = 0;
        self.tx
            .send(SrcMsg::Restart)
            .map_err(|_| ImageError::Cancelled)
    }

    fn hash_gone(&self) -> ImageError {
        ImageError::Internal {
            url: self.url.to_string(),
            reason: format!("the hashing thread stopped at offset {}", self.offset),
        }
    }

    fn http_err(&self, reason: impl Into<String>) -> ImageError {
        ImageError::Http {
            url: self.url.to_string(),
            offset: self.offset,
            reason: reason.into(),
        }
    }
}

/// Runs the download stage to the end. Blocking; call it on its own thread.
pub fn run(
    source: Source,
    alg: DigestAlgorithm,
    signature_url: Option<String>,
    tuning: Tuning,
    tx: SyncSender<SrcMsg>,
    ready: Sender<Ready>,
) -> Result<Downloaded, ImageError> {
    let start = Instant::now();
    let hasher = HashStage::start(alg).map_err(|e| ImageError::Internal {
        url: source.url().to_string(),
        reason: format!("cannot start the hashing thread: {e}"),
    })?;
    let mut out = Out {
        tx: &tx,
        url: source.url(),
        hasher,
        offset: 0,
        served: 0,
        pending: BytesMut::with_capacity(COALESCE),
    };
    let (resumes, restarts) = match &source {
        Source::File { path, url } => {
            let signature = match &signature_url {
                Some(u) => Some(fetch_small_file(u, Side::Signature)?),
                None => None,
            };
            let mut f = std::fs::File::open(path).map_err(|e| ImageError::Http {
                url: url.clone(),
                offset: 0,
                reason: format!("cannot open {}: {e}", path.display()),
            })?;
            let _ = ready.send(Ready { signature });
            loop {
                let mut buf = vec![0u8; 1024 * 1024];
                let n = f.read(&mut buf).map_err(|e| out.http_err(e.to_string()))?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                out.hand_on(Bytes::from(buf))?;
            }
            (0, 0)
        }
        Source::Http { url, client } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| out.http_err(format!("cannot start the HTTP runtime: {e}")))?;
            rt.block_on(http(client, url, signature_url, &tuning, &mut out, ready))?
        }
    };
    let len = out.offset;
    let served = out.served;
    let Some(digest) = out.hasher.finish() else {
        return Err(ImageError::Internal {
            url: source.url().to_string(),
            reason: "the hashing thread failed".into(),
        });
    };
    Ok(Downloaded {
        digest,
        len,
        served,
        resumes,
        restarts,
        elapsed: start.elapsed(),
    })
}

/// What a small side file (signature, bmap) is, for its errors.
#[derive(Debug, Clone, Copy)]
enum Side {
    Signature,
    Bmap,
}

impl Side {
    fn max(self) -> usize {
        match self {
            Side::Signature => MAX_SIGNATURE,
            Side::Bmap => super::bmap::MAX_BMAP,
        }
    }

    fn err(self, url: &str, reason: String) -> ImageError {
        let url = url.to_string();
        match self {
            Side::Signature => ImageError::Signature { url, reason },
            Side::Bmap => ImageError::Bmap { url, reason },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Signature => "signature",
            Side::Bmap => "bmap",
        }
    }
}

fn fetch_small_file(url: &str, side: Side) -> Result<Vec<u8>, ImageError> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    let data = std::fs::read(path)
        .map_err(|e| side.err(url, format!("cannot read the {}: {e}", side.name())))?;
    if data.len() > side.max() {
        return Err(side.err(
            url,
            format!("{} file is larger than {} bytes", side.name(), side.max()),
        ));
    }
    Ok(data)
}

async fn fetch_small(
    client: &reqwest::Client,
    url: &str,
    side: Side,
) -> Result<Vec<u8>, ImageError> {
    if url.starts_with("file://") {
        return fetch_small_file(url, side);
    }
    let err = |reason: String| side.err(url, reason);
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| err(describe_reqwest(&e)))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status())));
    }
    let mut data = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| err(describe_reqwest(&e)))? {
        data.extend_from_slice(&c);
        if data.len() > side.max() {
            return Err(err(format!(
                "{} file is larger than {} bytes",
                side.name(),
                side.max()
            )));
        }
    }
    Ok(data)
}

/// Fetches the bmap named by the plan, with the image source's client (and
/// so its TLS trust). Blocking.
pub fn fetch_bmap(source: &Source, url: &str) -> Result<Vec<u8>, ImageError> {
    match source {
        Source::Http { client, .. } if !url.starts_with("file://") => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Side::Bmap.err(url, format!("cannot start the HTTP runtime: {e}")))?;
            rt.block_on(fetch_small(client, url, Side::Bmap))
        }
        _ => {
            if !url.starts_with("file://") {
                return Err(Side::Bmap.err(url, "a file:// image takes a file:// bmap".into()));
            }
            fetch_small_file(url, Side::Bmap)
        }
    }
}

/// Statuses worth asking again for.
fn transient_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 429 | 502 | 503 | 504)
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    signature_url: Option<String>,
    tuning: &Tuning,
    out: &mut Out<'_>,
    ready: Sender<Ready>,
) -> Result<(u32, u32), ImageError> {
    let signature = match &signature_url {
        Some(u) => Some(fetch_small(client, u, Side::Signature).await?),
        None => None,
    };
    let mut ready = Some((ready, signature));
    let mut total: Option<u64> = None;
    let (mut resumes, mut restarts) = (0u32, 0u32);
    // Consecutive failed attempts without progress.
    let mut failures = 0u32;
    let mut last_error = String::new();
    loop {
        if failures > 0 {
            if failures > tuning.max_retries {
                return Err(
                    out.http_err(format!("gave up after {} attempts: {last_error}", failures))
                );
            }
            let backoff = tuning
                .backoff
                .saturating_mul(1 << (failures - 1).min(16))
                .min(Duration::from_secs(30));
            tracing::warn!(url, offset = out.offset, attempt = failures, ?backoff, error = %last_error, "image download interrupted; retrying");
            tokio::time::sleep(backoff).await;
        }
        let resume = out.offset > 0;
        let mut req = client.get(url);
        if resume {
            req = req.header(RANGE, format!("bytes={}-", out.offset));
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                last_error = describe_reqwest(&e);
                continue;
            }
        };
        let status = resp.status();
        match status {
            StatusCode::OK => {
                if resume {
                    tracing::warn!(
                        url,
                        offset = out.offset,
                        "server ignored the Range request; restarting from byte 0"
                    );
                    out.restart()?;
                    restarts += 1;
                }
                total = resp.content_length();
            }
            StatusCode::PARTIAL_CONTENT if resume => {
                let header = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let Some((start, t)) = parse_content_range(header) else {
                    return Err(out.http_err(format!("206 with a bad Content-Range {header:?}")));
                };
                if start != out.offset {
                    return Err(out.http_err(format!(
                        "asked to resume at {} but the server sent from {start}",
                        out.offset
                    )));
                }
                if let (Some(t), Some(known)) = (t, total) {
                    if t != known {
                        return Err(out.http_err(format!(
                            "the image changed size on the server (was {known} bytes, now {t})"
                        )));
                    }
                }
                total = total.or(t);
                resumes += 1;
                tracing::info!(url, offset = out.offset, "image download resumed");
            }
            s if transient_status(s) => {
                failures += 1;
                last_error = format!("HTTP {s}");
                continue;
            }
            s => {
                return Err(ImageError::Status {
                    url: url.to_string(),
                    status: s.as_u16(),
                })
            }
        }
        if let Some((tx, signature)) = ready.take() {
            // The coordinator may have given up; the next send will tell.
            let _ = tx.send(Ready { signature });
        }
        let before = out.offset;
        let cut = loop {
            match resp.chunk().await {
                Ok(Some(c)) => out.push(c)?,
                Ok(None) => break None,
                Err(e) => break Some(describe_reqwest(&e)),
            }
        };
        // Bytes received before a cut are good: hand them on, then resume after them.
        out.flush()?;
        if out.offset > before {
            failures = 0;
        }
        let short = total.filter(|t| out.offset < *t);
        match (cut, short) {
            (None, None) => return Ok((resumes, restarts)),
            (Some(e), _) => last_error = format!("connection lost at offset {}: {e}", out.offset),
            (None, Some(t)) => last_error = format!("body ended at offset {} of {t}", out.offset),
        }
        failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn pins() {
        assert!(parse_pin(&format!("sha256:{}", "AB".repeat(32))).is_some());
        assert!(parse_pin("sha256:00").is_none());
    }
}
