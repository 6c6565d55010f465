//! The image step against a real HTTP/1.1 server on 127.0.0.1 (written here,
//! so faults can be injected: Range on/off, a connection cut at an offset, a
//! truncated file, 404, 500) and real targets: sparse files, and a loop
//! device when this host allows one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::Signer;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256, Sha512};
use warden_agent::image::{write_image, ImageError, Tuning};
use warden_protocol::image::{
    Checksum, DiskFormat, ImageFormat, ImageRequest, SignatureRequest, SignatureStatus,
};

const MIB: usize = 1024 * 1024;
const TARGET_SIZE: u64 = 16 * MIB as u64;
/// The backup-GPT region the step clears: 33 sectors of up to 4 KiB.
const GPT_BACKUP: usize = 33 * 4096;

// ---------------------------------------------------------------- server

#[derive(Clone, Default)]
struct Route {
    body: Arc<Vec<u8>>,
    /// Honour `Range: bytes=N-` with a 206.
    range: bool,
    /// Close the connection after this many body bytes, on the first GET only.
    cut_once_at: Option<usize>,
    status: Option<u16>,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    /// Per path: the Range header of each request ("" when none).
    log: HashMap<String, Vec<String>>,
}

struct Server {
    base: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        Server { base, state }
    }

    fn add(&self, path: &str, route: Route) -> String {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_string(), route);
        format!("{}{path}", self.base)
    }

    fn requests(&self, path: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .log
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

fn serve(conn: TcpStream, st: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_from: Option<usize> = None;
    let mut range_header = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range_header = v.trim().to_string();
                range_from = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse().ok());
            }
        }
    }
    let route = {
        let mut s = st.lock().unwrap();
        s.log.entry(path.clone()).or_default().push(range_header);
        let r = s.routes.get(&path).cloned();
        // The cut happens once.
        if let Some(r) = s.routes.get_mut(&path) {
            r.cut_once_at = None;
        }
        r
    };
    let mut w = conn;
    let Some(route) = route else {
        return w.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    if let Some(status) = route.status {
        let msg = format!(
            "HTTP/1.1 {status} Oops\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!"
        );
        return w.write_all(msg.as_bytes());
    }
    let total = route.body.len();
    let (head, start) = match range_from {
        Some(from) if route.range && from < total => (
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{total}\r\nConnection: close\r\n\r\n",
                total - from,
                total - 1
            ),
            from,
        ),
        _ => (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nAccept-Ranges: {}\r\nConnection: close\r\n\r\n",
                if route.range { "bytes" } else { "none" }),
            0,
        ),
    };
    w.write_all(head.as_bytes())?;
    let end = match route.cut_once_at {
        Some(cut) if cut > start => cut.min(total),
        _ => total,
    };
    for chunk in route.body[start..end].chunks(64 * 1024) {
        w.write_all(chunk)?;
    }
    w.flush()?;
    // Dropping the stream closes it; on a cut the client sees a short body.
    Ok(())
}

// ---------------------------------------------------------------- images

/// A 6 MiB + change disk image: protective MBR and a GPT header at LBA 1
/// (so "bootable" means something), random and zero regions, an unaligned tail.
fn make_image(seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut img = vec![0u8; 6 * MIB + 3 * 4096 + 1000];
    img[446] = 0x00;
    img[450] = 0xee; // protective MBR partition type
    img[510] = 0x55;
    img[511] = 0xaa;
    img[512..520].copy_from_slice(b"EFI PART");
    rng.fill_bytes(&mut img[1024..64 * 1024]);
    // Data after the first MiB, then a 2 MiB hole, then data to the end.
    rng.fill_bytes(&mut img[MIB..2 * MIB + 12345]);
    let n = img.len();
    rng.fill_bytes(&mut img[4 * MIB + 4096..n]);
    img
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

fn sha256(data: &[u8]) -> Checksum {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------- targets

/// A sparse file target; `garbage` fills the boot regions with 0xEE first
/// (so a test can see they were cleared).
fn sparse_target(dir: &Path, name: &str, garbage: bool) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(TARGET_SIZE).unwrap();
    if garbage {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![0xee; MIB], 0).unwrap();
        f.write_all_at(&vec![0xee; GPT_BACKUP], TARGET_SIZE - GPT_BACKUP as u64)
            .unwrap();
    }
    p
}

fn tuning() -> Tuning {
    Tuning {
        backoff: Duration::from_millis(10),
        buffer_size: MIB,
        buffers: 3,
        ..Tuning::default()
    }
}

fn request(url: &str, checksum: Checksum, target: &Path) -> ImageRequest {
    ImageRequest {
        url: url.to_string(),
        checksum,
        signature: None,
        https_trust: None,
        target: target.to_str().unwrap().to_string(),
        target_reads_zero: false,
        verify_after_write: false,
        bmap: None,
    }
}

/// The target starts with exactly the image, and the rest is zeros (the
/// backup GPT region was cleared, the middle was never touched).
fn assert_holds(target: &Path, img: &[u8]) {
    let got = std::fs::read(target).unwrap();
    assert_eq!(got.len() as u64, TARGET_SIZE);
    assert!(
        got[..img.len()] == *img,
        "target {} differs from the image: sha256 {} vs {}",
        target.display(),
        hex::encode(Sha256::digest(&got[..img.len()])),
        hex::encode(Sha256::digest(img))
    );
    assert!(got[img.len()..].iter().all(|&b| b == 0));
}

/// Neither GPT copy nor the MBR survives: first MiB and last 33 × 4 KiB are zero.
fn assert_not_bootable(target: &Path) {
    let got = std::fs::read(target).unwrap();
    assert!(
        got[..MIB].iter().all(|&b| b == 0),
        "first MiB of {} is not zero",
        target.display()
    );
    assert!(
        got[got.len() - GPT_BACKUP..].iter().all(|&b| b == 0),
        "backup GPT region of {} is not zero",
        target.display()
    );
}

// ---------------------------------------------------------------- tests

#[test]
fn every_format_writes_the_exact_image() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(1);
    for (name, served, format) in [
        ("raw", img.clone(), ImageFormat::Raw),
        ("gz", gz(&img), ImageFormat::Gzip),
        ("xz", xz(&img), ImageFormat::Xz),
        ("zst", zst(&img), ImageFormat::Zstd),
    ] {
        // The file name says nothing: detection is by magic bytes.
        let url = srv.add(
            &format!("/img-{name}"),
            Route {
                body: Arc::new(served.clone()),
                range: true,
                ..Route::default()
            },
        );
        let target = sparse_target(dir.path(), name, true);
        let mut req = request(&url, sha256(&served), &target);
        req.verify_after_write = true;
        let rec = write_image(&req, &tuning()).unwrap();
        assert_eq!(rec.format, format, "{name}");
        assert_eq!(rec.image_bytes, img.len() as u64);
        assert_eq!(rec.bytes_served, served.len() as u64);
        assert_eq!(
            rec.bytes_written,
            img.len() as u64,
            "{name}: zeros are written when the target may not read as zero"
        );
        assert_eq!(rec.zero_bytes_skipped, 0);
        assert_eq!(rec.resumes, 0);
        assert_eq!(rec.restarts, 0);
        assert!(rec.verified_after_write);
        assert_eq!(rec.digest, req.checksum.to_string());
        assert_eq!(rec.signature, SignatureStatus::NotRequired);
        assert_holds(&target, &img);
        println!(
            "{name}: {}",
            String::from_utf8(rec.canonical_json()).unwrap()
        );
    }
}

#[test]
fn sha512_checksum_and_file_source() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(2);
    let served = zst(&img);
    let src = dir.path().join("image.bin");
    std::fs::write(&src, &served).unwrap();
    let target = sparse_target(dir.path(), "t", false);
    let sum: Checksum = format!("sha512:{}", hex::encode(Sha512::digest(&served)))
        .parse()
        .unwrap();
    let req = request(&format!("file://{}", src.display()), sum, &target);
    let rec = write_image(&req, &tuning()).unwrap();
    assert!(rec.digest.starts_with("sha512:"));
    assert_holds(&target, &img);
}

#[test]
fn a_cut_connection_resumes_with_range() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(3);
    for (name, served) in [("raw", img.clone()), ("zst", zst(&img))] {
        let cut = served.len() / 3 + 17;
        let path = format!("/cut-{name}");
        let url = srv.add(
            &path,
            Route {
                body: Arc::new(served.clone()),
                range: true,
                cut_once_at: Some(cut),
                ..Route::default()
            },
        );
        let target = sparse_target(dir.path(), name, true);
        let rec = write_image(&request(&url, sha256(&served), &target), &tuning()).unwrap();
        assert_eq!(rec.resumes, 1, "{name}");
        assert_eq!(rec.restarts, 0);
        assert_eq!(
            rec.bytes_served,
            served.len() as u64,
            "{name}: nothing downloaded twice"
        );
        let log = srv.requests(&path);
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[0], "");
        // Resumed exactly where the cut left off (the client hashed and
        // handed on every byte it received before the cut).
        assert_eq!(log[1], format!("bytes={cut}-"));
        assert_holds(&target, &img);
    }
}

#[test]
fn no_range_support_restarts_cleanly() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(4);
    for (name, served) in [("raw", img.clone()), ("gz", gz(&img))] {
        let path = format!("/norange-{name}");
        let url = srv.add(
            &path,
            Route {
                body: Arc::new(served.clone()),
                range: false,
                cut_once_at: Some(served.len() / 2),
                ..Route::default()
            },
        );
        let target = sparse_target(dir.path(), name, true);
        let mut req = request(&url, sha256(&served), &target);
        req.verify_after_write = true;
        let rec = write_image(&req, &tuning()).unwrap();
        assert_eq!(rec.restarts, 1, "{name}");
        assert_eq!(rec.resumes, 0);
        assert!(
            rec.bytes_served > served.len() as u64,
            "{name}: the first half was downloaded twice"
        );
        assert_eq!(srv.requests(&path).len(), 2);
        assert_holds(&target, &img);
    }
}

#[test]
fn wrong_checksum_fails_and_leaves_nothing_bootable() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(5);
    let served = xz(&img);
    let url = srv.add(
        "/wrong.img",
        Route {
            body: Arc::new(served.clone()),
            range: true,
            ..Route::default()
        },
    );
    let target = sparse_target(dir.path(), "t", true);
    let wrong = sha256(b"some other image");
    let err = write_image(&request(&url, wrong.clone(), &target), &tuning()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Checksum { .. }), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains(&wrong.to_string()), "{msg}");
    assert!(msg.contains(&sha256(&served).to_string()), "{msg}");
    assert_not_bootable(&target);
    // The body was written (the MBR/GPT head was not): the image is there
    // but cannot boot.
    let got = std::fs::read(&target).unwrap();
    assert!(got[MIB..2 * MIB] == img[MIB..2 * MIB]);
}

#[test]
fn truncated_image_fails_and_leaves_nothing_bootable() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(6);
    for (name, served) in [("raw", img.clone()), ("zst", zst(&img))] {
        let short = served[..served.len() * 2 / 3].to_vec();
        let url = srv.add(
            &format!("/trunc-{name}"),
            Route {
                body: Arc::new(short),
                range: true,
                ..Route::default()
            },
        );
        let target = sparse_target(dir.path(), name, true);
        let err = write_image(&request(&url, sha256(&served), &target), &tuning()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::Checksum { .. }), "{name}: {msg}");
        assert!(
            msg.contains(&url) && msg.contains(&sha256(&served).to_string()),
            "{msg}"
        );
        assert_not_bootable(&target);
    }
}

#[test]
fn http_errors_are_named_and_leave_the_target_untouched() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let url500 = srv.add(
        "/broken",
        Route {
            status: Some(500),
            ..Route::default()
        },
    );
    let url404 = format!("{}/missing.raw", srv.base);
    for (url, status) in [(url404, 404u16), (url500, 500)] {
        let target = sparse_target(dir.path(), &status.to_string(), true);
        let err = write_image(&request(&url, sha256(b"x"), &target), &tuning()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ImageError::Status { status: s, .. } if s == status),
            "{msg}"
        );
        assert!(
            msg.contains(&url) && msg.contains(&status.to_string()),
            "{msg}"
        );
        // Nothing was written: the 0xEE garbage is still there.
        let got = std::fs::read(&target).unwrap();
        assert!(got[..MIB].iter().all(|&b| b == 0xee));
    }
}

#[test]
fn signature_good_and_bad() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(7);
    let served = zst(&img);
    let sum = sha256(&served);
    let url = srv.add(
        "/signed.img",
        Route {
            body: Arc::new(served.clone()),
            range: true,
            ..Route::default()
        },
    );
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let other = ed25519_dalek::SigningKey::from_bytes(&[43u8; 32]);
    let good = key.sign(sum.hex().as_bytes()).to_bytes().to_vec();
    let bad = other.sign(sum.hex().as_bytes()).to_bytes().to_vec();
    let good_url = srv.add(
        "/signed.img.sig",
        Route {
            body: Arc::new(good),
            ..Route::default()
        },
    );
    let bad_url = srv.add(
        "/signed.img.badsig",
        Route {
            body: Arc::new(bad),
            ..Route::default()
        },
    );
    let public_key = hex::encode(key.verifying_key().as_bytes());

    let target = sparse_target(dir.path(), "good", true);
    let mut req = request(&url, sum.clone(), &target);
    req.signature = Some(SignatureRequest {
        public_key: public_key.clone(),
        url: good_url,
    });
    let rec = write_image(&req, &tuning()).unwrap();
    assert_eq!(rec.signature, SignatureStatus::Verified);
    assert_holds(&target, &img);

    let target = sparse_target(dir.path(), "bad", true);
    let mut req = request(&url, sum.clone(), &target);
    req.signature = Some(SignatureRequest {
        public_key: public_key.clone(),
        url: bad_url.clone(),
    });
    let err = write_image(&req, &tuning()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Signature { .. }), "{msg}");
    assert!(msg.contains(&bad_url) && msg.contains(&sum.hex()), "{msg}");
    assert_not_bootable(&target);

    // A missing signature file stops the step before the disk is touched.
    let target = sparse_target(dir.path(), "nosig", true);
    let mut req = request(&url, sum, &target);
    req.signature = Some(SignatureRequest {
        public_key,
        url: format!("{}/nope.sig", srv.base),
    });
    let err = write_image(&req, &tuning()).unwrap_err();
    assert!(
        err.to_string().contains("nope.sig") && err.to_string().contains("404"),
        "{err}"
    );
    let got = std::fs::read(&target).unwrap();
    assert!(got[..MIB].iter().all(|&b| b == 0xee));
}

/// The scheme docs/image.md tells operators to use, produced with openssl.
#[test]
fn signature_made_with_openssl() {
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .output()
            .map(|o| (o.status.success(), o))
    };
    if !matches!(openssl(&["version"]), Ok((true, _))) {
        if std::env::var("WARDEN_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("openssl is required (WARDEN_REQUIRE_QEMU=1) but not available");
        }
        eprintln!("SKIPPED signature_made_with_openssl: no openssl on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let img = make_image(8);
    let served = gz(&img);
    std::fs::write(d("image.raw.gz"), &served).unwrap();
    let sum = sha256(&served);
    std::fs::write(d("image.digest"), sum.hex()).unwrap();
    let run = |args: &[&str]| {
        let (ok, o) = openssl(args).unwrap();
        assert!(
            ok,
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["genpkey", "-algorithm", "ed25519", "-out", &d("key.pem")]);
    run(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        &d("key.pem"),
        "-rawin",
        "-in",
        &d("image.digest"),
        "-out",
        &d("image.sig"),
    ]);
    run(&[
        "pkey",
        "-in",
        &d("key.pem"),
        "-pubout",
        "-outform",
        "DER",
        "-out",
        &d("pub.der"),
    ]);
    let der = std::fs::read(d("pub.der")).unwrap();
    let public_key = hex::encode(&der[der.len() - 32..]);
    let target = sparse_target(dir.path(), "t", true);
    let mut req = request(&format!("file://{}", d("image.raw.gz")), sum, &target);
    req.signature = Some(SignatureRequest {
        public_key,
        url: format!("file://{}", d("image.sig")),
    });
    let rec = write_image(&req, &tuning()).unwrap();
    assert_eq!(rec.signature, SignatureStatus::Verified);
    assert_holds(&target, &img);
}

#[test]
fn target_reads_zero_skips_zero_runs() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(9);
    let served = zst(&img);
    let url = srv.add(
        "/sparse.img",
        Route {
            body: Arc::new(served.clone()),
            range: true,
            ..Route::default()
        },
    );
    // A fresh sparse file reads as zero everywhere.
    let target = sparse_target(dir.path(), "t", false);
    let mut req = request(&url, sha256(&served), &target);
    req.target_reads_zero = true;
    req.verify_after_write = true;
    let rec = write_image(&req, &tuning()).unwrap();
    assert!(rec.bytes_written < img.len() as u64, "{rec:?}");
    assert!(rec.zero_bytes_skipped >= MIB as u64, "{rec:?}");
    assert_eq!(rec.bytes_written + rec.zero_bytes_skipped, img.len() as u64);
    assert_holds(&target, &img);
}

#[test]
fn image_larger_than_target_fails() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut img = make_image(10);
    img.resize(TARGET_SIZE as usize + 4096, 1);
    let served = zst(&img);
    let url = srv.add(
        "/big.img",
        Route {
            body: Arc::new(served.clone()),
            range: true,
            ..Route::default()
        },
    );
    let target = sparse_target(dir.path(), "t", true);
    let err = write_image(&request(&url, sha256(&served), &target), &tuning()).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains(target.to_str().unwrap()), "{err}");
    assert_not_bootable(&target);
}

// ---------------------------------------------------------------- loop device

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn loop_device_target() {
    let require = std::env::var("WARDEN_REQUIRE_QEMU").as_deref() == Ok("1");
    let dir = tempfile::tempdir().unwrap();
    let backing = sparse_target(dir.path(), "backing", true);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", backing.to_str().unwrap()])
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            if require {
                panic!("loop device required (WARDEN_REQUIRE_QEMU=1) but losetup failed: {why}");
            }
            eprintln!(
                "SKIPPED loop_device_target: losetup failed ({why}); needs root and loop devices"
            );
            return;
        }
    };
    let _guard = Loop(dev.clone());
    let srv = Server::start();
    let img = make_image(11);
    let served = xz(&img);
    let url = srv.add(
        "/loop.img",
        Route {
            body: Arc::new(served.clone()),
            range: true,
            cut_once_at: Some(served.len() / 2),
            ..Route::default()
        },
    );
    let mut req = request(&url, sha256(&served), Path::new(&dev));
    req.verify_after_write = true;
    let rec = write_image(&req, &tuning()).unwrap();
    assert!(rec.direct_io, "a loop device accepts O_DIRECT");
    assert_eq!(rec.resumes, 1);
    drop(_guard);
    assert_holds(&backing, &img);

    // A failure on the block device clears the boot regions there too.
    let dev2 = String::from_utf8(
        std::process::Command::new("losetup")
            .args(["-f", "--show", backing.to_str().unwrap()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let _guard2 = Loop(dev2.clone());
    let err =
        write_image(&request(&url, sha256(b"nope"), Path::new(&dev2)), &tuning()).unwrap_err();
    assert!(matches!(err, ImageError::Checksum { .. }), "{err}");
    drop(_guard2);
    assert_not_bootable(&backing);
}

/// `qemu-img convert -O qcow2 ARGS` of `img`; None (after saying so) when
/// qemu-img is missing and tools are not required.
fn qcow2_of(img: &[u8], args: &[&str]) -> Option<Vec<u8>> {
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("WARDEN_REQUIRE_TOOLS").is_none(),
            "qemu-img is required (WARDEN_REQUIRE_TOOLS=1) but missing"
        );
        eprintln!("SKIPPED: qemu-img not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let out = dir.path().join("out.qcow2");
    std::fs::write(&raw, img).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .args(args)
        .arg(&raw)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {args:?}");
    Some(std::fs::read(&out).unwrap())
}

#[test]
fn qcow2_streams_plain_compressed_and_inside_zstd() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(11);
    let cases = [
        ("plain", vec![], false),
        ("deflate", vec!["-c"], false),
        (
            "zstd-clusters",
            vec!["-c", "-o", "compression_type=zstd"],
            false,
        ),
        ("4k-clusters", vec!["-o", "cluster_size=4096"], false),
        ("plain-in-zst", vec![], true),
    ];
    for (name, args, outer_zst) in cases {
        let Some(q) = qcow2_of(&img, &args) else {
            return;
        };
        let served = if outer_zst { zst(&q) } else { q };
        let path = format!("/q-{name}");
        // Cut once in the middle: the resume must land in the qcow2 stream
        // exactly where it left off.
        let url = srv.add(
            &path,
            Route {
                body: Arc::new(served.clone()),
                range: true,
                cut_once_at: Some(served.len() / 2 + 5),
                ..Route::default()
            },
        );
        for reads_zero in [false, true] {
            let target = sparse_target(dir.path(), &format!("{name}-{reads_zero}"), !reads_zero);
            let mut req = request(&url, sha256(&served), &target);
            req.verify_after_write = true;
            req.target_reads_zero = reads_zero;
            let rec = write_image(&req, &tuning()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(rec.disk_format, DiskFormat::Qcow2, "{name}");
            let container = if outer_zst {
                ImageFormat::Zstd
            } else {
                ImageFormat::Raw
            };
            assert_eq!(rec.format, container, "{name}");
            // qemu-img rounds the virtual size up to whole sectors.
            assert_eq!(
                rec.image_bytes,
                (img.len() as u64).div_ceil(512) * 512,
                "{name}"
            );
            assert!(rec.verified_after_write);
            // The first GET is cut once (the first pass), then resumed.
            assert_eq!(rec.resumes, u32::from(!reads_zero), "{name}");
            assert_eq!(rec.bytes_served, served.len() as u64, "{name}");
            if reads_zero {
                assert!(rec.zero_bytes_skipped >= MIB as u64, "{name}: {rec:?}");
            } else {
                assert_eq!(rec.zero_bytes_skipped, 0, "{name}");
            }
            assert_holds(&target, &img);
        }
    }
}

#[test]
fn corrupt_qcow2_fails_and_leaves_nothing_bootable() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(12);
    let Some(mut q) = qcow2_of(&img, &["-c"]) else {
        return;
    };
    // Point the L1 entry past the end of the file (the checksum is of the
    // garbled file, so only the decoder can notice).
    let l1 = u64::from_be_bytes(q[40..48].try_into().unwrap()) as usize;
    let beyond = (q.len() as u64 + (1 << 16)) & !0xffff;
    q[l1..l1 + 8].copy_from_slice(&beyond.to_be_bytes());
    let url = srv.add(
        "/q-bad",
        Route {
            body: Arc::new(q.clone()),
            range: true,
            ..Route::default()
        },
    );
    let target = sparse_target(dir.path(), "qbad", true);
    let e = write_image(&request(&url, sha256(&q), &target), &tuning()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains("qcow2"), "{msg}");
    assert_not_bootable(&target);
}

/// Writes `img` as a sparse file (only non-zero 4 KiB blocks allocated) and
/// returns `bmaptool create`'s bmap of it; None (after saying so) when
/// bmaptool is missing and tools are not required.
fn bmap_of(dir: &Path, img: &[u8]) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    if std::process::Command::new("bmaptool")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("WARDEN_REQUIRE_TOOLS").is_none(),
            "bmaptool is required (WARDEN_REQUIRE_TOOLS=1) but missing"
        );
        eprintln!("SKIPPED: bmaptool (bmap-tools) not installed");
        return None;
    }
    let path = dir.join("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(img.len() as u64).unwrap();
    for (i, block) in img.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * 4096) as u64).unwrap();
        }
    }
    drop(f);
    let out = std::process::Command::new("bmaptool")
        .arg("create")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "bmaptool create: {out:?}");
    Some(out.stdout)
}

fn bmap_request(url: &str, bmap: &[u8]) -> warden_protocol::image::BmapRequest {
    warden_protocol::image::BmapRequest {
        url: url.to_string(),
        checksum: sha256(bmap),
    }
}

#[test]
fn bmap_writes_mapped_ranges_and_checks_them() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(21);
    let Some(bmap) = bmap_of(dir.path(), &img) else {
        return;
    };
    let served = zst(&img);
    let url = srv.add(
        "/b.zst",
        Route {
            body: Arc::new(served.clone()),
            range: true,
            ..Route::default()
        },
    );
    let bmap_url = srv.add(
        "/b.bmap",
        Route {
            body: Arc::new(bmap.clone()),
            ..Route::default()
        },
    );
    let mapped: u64 = img
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum();
    for reads_zero in [false, true] {
        let target = sparse_target(dir.path(), &format!("bm-{reads_zero}"), !reads_zero);
        let mut req = request(&url, sha256(&served), &target);
        req.bmap = Some(bmap_request(&bmap_url, &bmap));
        req.verify_after_write = true;
        req.target_reads_zero = reads_zero;
        let rec = write_image(&req, &tuning()).unwrap();
        assert_eq!(rec.bmap_mapped_bytes, Some(mapped));
        assert!(rec.verified_after_write);
        if reads_zero {
            assert!(rec.zero_bytes_skipped >= img.len() as u64 - mapped - MIB as u64);
        }
        assert_holds(&target, &img);
    }
}

#[test]
fn bmap_mismatches_fail_safe() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(22);
    let Some(bmap) = bmap_of(dir.path(), &img) else {
        return;
    };
    let bmap_url = srv.add(
        "/m.bmap",
        Route {
            body: Arc::new(bmap.clone()),
            ..Route::default()
        },
    );

    // The image changed inside a mapped range after the bmap was made: the
    // served checksum is right, the range checksum is not.
    let mut changed = img.clone();
    changed[MIB + 100] ^= 0xff;
    let url = srv.add(
        "/changed",
        Route {
            body: Arc::new(changed.clone()),
            range: true,
            ..Route::default()
        },
    );
    let target = sparse_target(dir.path(), "changed", true);
    let mut req = request(&url, sha256(&changed), &target);
    req.bmap = Some(bmap_request(&bmap_url, &bmap));
    let e = write_image(&req, &tuning()).unwrap_err();
    assert!(matches!(e, ImageError::BmapRange { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("bmap range 256-") && msg.contains(&url),
        "{msg}"
    );
    assert_not_bootable(&target);

    // The bmap is not the one the plan named: refused before anything is written.
    let url = srv.add(
        "/img",
        Route {
            body: Arc::new(img.clone()),
            range: true,
            ..Route::default()
        },
    );
    let target = sparse_target(dir.path(), "wrongbmap", true);
    let before = std::fs::read(&target).unwrap();
    let mut req = request(&url, sha256(&img), &target);
    req.bmap = Some(bmap_request(&bmap_url, b"some other bmap"));
    let e = write_image(&req, &tuning()).unwrap_err();
    assert!(matches!(e, ImageError::Bmap { .. }), "{e}");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    assert!(std::fs::read(&target).unwrap() == before, "target touched");

    // Data the bmap calls free space is not the image: written as zeros.
    let mut extra = img.clone();
    let hole = 3 * MIB; // inside make_image's 2 MiB hole
    extra[hole..hole + 4096].fill(0xab);
    let url = srv.add(
        "/extra",
        Route {
            body: Arc::new(extra.clone()),
            range: true,
            ..Route::default()
        },
    );
    let target = sparse_target(dir.path(), "extra", true);
    let mut req = request(&url, sha256(&extra), &target);
    req.bmap = Some(bmap_request(&bmap_url, &bmap));
    write_image(&req, &tuning()).unwrap();
    assert_holds(&target, &img);
}
