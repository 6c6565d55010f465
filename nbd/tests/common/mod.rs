//! Shared test helpers: real servers (nbdkit, qemu-nbd) on 127.0.0.1 ports
//! picked free, each owned by the test that started it and killed on drop;
//! and the server side of a scripted fake NBD server for misbehaviour tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use warden_nbd::Uri;

/// True when `tool` is on PATH. Otherwise: with WARDEN_REQUIRE_TOOLS=1 the
/// test fails; without, it prints SKIPPED and the caller returns.
pub fn have_tool(tool: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    if !found {
        if std::env::var("WARDEN_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!(
                "{test}: `{tool}` is not installed and WARDEN_REQUIRE_TOOLS=1 (run scripts/setup)"
            );
        }
        eprintln!("SKIPPED {test}: `{tool}` is not installed (run scripts/setup)");
    }
    found
}

/// A port nobody listens on right now (the server may still lose a race
/// for it; `Server::start` retries).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process listening on 127.0.0.1:`port`, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Starts `program` with `args(port)` and waits until the port accepts.
    pub fn start(program: &str, args: impl Fn(u16) -> Vec<String>) -> Server {
        for _attempt in 0..5 {
            let port = free_port();
            let mut child = Command::new(program)
                .args(args(port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("{program} exited early ({status}); retrying on another port");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Server { child, port };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{program} did not listen on port {port} within 20 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("{program} failed to start five times");
    }

    /// nbdkit in the foreground on 127.0.0.1 with `rest` (filters, plugin,
    /// parameters).
    pub fn nbdkit(rest: &[&str]) -> Server {
        let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
        Server::start("nbdkit", move |port| {
            let mut a = vec![
                "-f".to_string(),
                "--exit-with-parent".into(),
                "-i".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ];
            a.extend(rest.iter().cloned());
            a
        })
    }

    /// qemu-nbd serving a raw file as `export`, persistent, up to 8 clients.
    pub fn qemu_nbd(file: &Path, export: &str, extra: &[&str]) -> Server {
        let file = file.to_str().unwrap().to_string();
        let export = export.to_string();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Server::start("qemu-nbd", move |port| {
            let mut a = vec![
                "-f".to_string(),
                "raw".into(),
                "-b".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-x".into(),
                export.clone(),
                "-t".into(),
                "-e".into(),
                "8".into(),
            ];
            a.extend(extra.iter().cloned());
            a.push(file.clone());
            a
        })
    }

    pub fn uri(&self, scheme: &str, export: &str) -> Uri {
        Uri::parse(&format!("{scheme}://127.0.0.1:{}/{export}", self.port)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the server side of the protocol, for scripted fake servers ----

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const SIMPLE: u32 = 0x6744_6698;
pub const STRUCTURED: u32 = 0x668e_33ef;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
/// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES
pub const FLAGS: u16 = 1 | 4 | 8 | 32 | 64;

/// A fake server accepting one connection and running `script` on it.
pub struct Fake {
    pub port: u16,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    pub fn start(script: impl FnOnce(TcpStream) + Send + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            script(stream);
        });
        Fake {
            port,
            thread: Some(thread),
        }
    }

    pub fn uri(&self, scheme: &str) -> Uri {
        Uri::parse(&format!("{scheme}://127.0.0.1:{}/fake", self.port)).unwrap()
    }

    /// Joins the script thread; its panics (failed server-side asserts)
    /// fail the test.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

pub fn read_u32(s: &mut TcpStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

/// Greeting and client flags. `fixed`: advertise fixed newstyle.
pub fn greet(s: &mut TcpStream, fixed: bool) {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(if fixed { 3u16 } else { 0u16 }).to_be_bytes());
    s.write_all(&g).unwrap();
    let cflags = read_u32(s);
    assert!(cflags <= 3, "client flags {cflags:#x}");
}

/// Reads one option: (option, data); None at EOF.
pub fn read_option(s: &mut TcpStream) -> Option<(u32, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), IHAVEOPT);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).ok()?;
    Some((opt, data))
}

pub fn opt_reply(s: &mut TcpStream, opt: u32, reply: u32, data: &[u8]) {
    let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&reply.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r).unwrap();
}

/// How the fake negotiates.
#[derive(Clone, Copy)]
pub struct Hs {
    pub go: bool,
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
}

impl Default for Hs {
    fn default() -> Self {
        Hs {
            go: true,
            structured: true,
            size: 1 << 20,
            flags: FLAGS,
        }
    }
}

/// Answers options until the client enters transmission. Returns the
/// export name the client chose.
pub fn handshake(s: &mut TcpStream, hs: Hs) -> String {
    greet(s, true);
    loop {
        let (opt, data) = read_option(s).expect("client hung up during the handshake");
        match opt {
            1 => {
                // EXPORT_NAME: size, flags, 124 zeroes (NO_ZEROES was offered,
                // the client accepted it, so no zeroes).
                let mut r = hs.size.to_be_bytes().to_vec();
                r.extend_from_slice(&hs.flags.to_be_bytes());
                s.write_all(&r).unwrap();
                return String::from_utf8(data).unwrap();
            }
            8 if hs.structured => opt_reply(s, opt, REP_ACK, &[]),
            10 if hs.structured => {
                let mut ctx = 1u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(b"base:allocation");
                opt_reply(s, opt, REP_META_CONTEXT, &ctx);
                opt_reply(s, opt, REP_ACK, &[]);
            }
            7 if hs.go => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&hs.size.to_be_bytes());
                info.extend_from_slice(&hs.flags.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info);
                opt_reply(s, opt, REP_ACK, &[]);
                let len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                return String::from_utf8(data[4..4 + len].to_vec()).unwrap();
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[]),
        }
    }
}

#[derive(Debug)]
pub struct Req {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
    pub data: Vec<u8>,
}

/// Reads one request (with its WRITE payload); None at EOF.
pub fn read_request(s: &mut TcpStream) -> Option<Req> {
    let mut h = [0u8; 28];
    s.read_exact(&mut h).ok()?;
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x2560_9513);
    let req = Req {
        flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
        cmd: u16::from_be_bytes(h[6..8].try_into().unwrap()),
        handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
        data: Vec::new(),
    };
    if req.cmd == 1 {
        let mut data = vec![0u8; req.len as usize];
        s.read_exact(&mut data).ok()?;
        return Some(Req { data, ..req });
    }
    Some(req)
}

pub fn simple_reply(s: &mut TcpStream, handle: u64, error: u32, data: &[u8]) {
    let mut r = SIMPLE.to_be_bytes().to_vec();
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r).unwrap();
}

pub fn chunk(s: &mut TcpStream, flags: u16, kind: u16, handle: u64, payload: &[u8]) {
    let mut r = STRUCTURED.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    r.extend_from_slice(payload);
    s.write_all(&r).unwrap();
}

/// A deterministic, non-repeating test pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
