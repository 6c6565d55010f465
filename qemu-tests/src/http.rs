//! A tiny HTTP/1.1 file server on 127.0.0.1 for the image tests and bench:
//! GET or HEAD of one file, whole or from a `Range: bytes=N-` offset; each
//! connection closes after its response. A QEMU guest on user-net reaches it
//! as `10.0.2.2:PORT`.
//!
//! It serves exactly the bytes of the file (no canned answers) and binds
//! loopback only — or, with [`serve_file_in_netns`], an address inside a
//! network namespace the caller created; it must never listen on another
//! interface of the host. Its threads live until the process ends.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// One HTTP/1.1 exchange: GET (or HEAD) of the one file, whole or from a
/// `Range: bytes=N-` offset; the connection closes after the response.
/// With `cut` = (offset, done): the first GET whose body reaches file offset
/// `offset` while `done` is false stops there and closes the connection
/// (a dropped download), and sets `done`.
fn serve_one(mut stream: TcpStream, file: &Path, cut: Option<(u64, &AtomicBool)>) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut from = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                from = value
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse::<u64>().ok());
            }
        }
    }
    let head = request.starts_with("HEAD ");
    if !(request.starts_with("GET ") || head) {
        stream.write_all(
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let mut f = std::fs::File::open(file)?;
    let total = f.metadata()?.len();
    let start = from.unwrap_or(0).min(total);
    let status = if from.is_some() {
        format!(
            "206 Partial Content\r\nContent-Range: bytes {start}-{}/{total}",
            total.saturating_sub(1)
        )
    } else {
        "200 OK".to_string()
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        total - start
    )?;
    if !head {
        f.seek(SeekFrom::Start(start))?;
        let mut len = total - start;
        if let Some((at, done)) = cut {
            if (start..total).contains(&at)
                && done
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                len = at - start;
            }
        }
        // File → TcpStream: std sends this with sendfile(2).
        std::io::copy(&mut std::io::Read::take(f, len), &mut stream)?;
    }
    Ok(())
}

/// Serves `file` on 127.0.0.1 (any path of the request gets it) for the
/// life of the process; returns the port.
pub fn serve_file(file: &Path) -> Result<u16> {
    serve(file, None).map(|(port, _)| port)
}

/// Like [`serve_file`], but the first GET that reaches file offset `cut_at`
/// sends the bytes before it and closes the connection without the rest, as
/// a flaky image server does; every later request is served whole. Returns
/// the port and a flag that turns true once the cut happened.
pub fn serve_file_cutting_once(file: &Path, cut_at: u64) -> Result<(u16, Arc<AtomicBool>)> {
    serve(file, Some(cut_at))
}

/// Like [`serve_file`], listening on `addr` inside network namespace
/// `netns` (as `ip netns` names it, e.g. a [`crate::netns::NetNs`]): a
/// thread enters the namespace only to open the listening socket, which
/// stays there wherever it is used. Returns the port.
pub fn serve_file_in_netns(file: &Path, netns: &str, addr: Ipv4Addr) -> Result<u16> {
    let path = PathBuf::from(format!("/run/netns/{netns}"));
    let listener = std::thread::scope(|s| {
        s.spawn(|| -> Result<TcpListener> {
            let ns = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {netns}"))?;
            TcpListener::bind((addr, 0)).with_context(|| format!("binding {addr}:0 in {netns}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread entering {netns} panicked"))?
    })?;
    listen(listener, file, None).map(|(port, _)| port)
}

fn serve(file: &Path, cut_at: Option<u64>) -> Result<(u16, Arc<AtomicBool>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    listen(listener, file, cut_at)
}

fn listen(
    listener: TcpListener,
    file: &Path,
    cut_at: Option<u64>,
) -> Result<(u16, Arc<AtomicBool>)> {
    let port = listener.local_addr()?.port();
    let file = file.to_path_buf();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let file = file.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                // A client that hangs up early (curl killed, a cancelled
                // download) is not the server's business.
                let _ = serve_one(stream, &file, cut_at.map(|at| (at, &*done)));
            });
        }
    });
    Ok((port, flag))
}
