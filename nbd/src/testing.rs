//! Test support (feature `testing`, never in the agent's build): a
//! throw-away PKI for TLS tests against `nbdkit --tls=require`, made with
//! GnuTLS's `certtool`. One copy, shared by this crate's tests and the
//! agent's snapshot tests.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

fn certtool(args: &[&str]) -> io::Result<()> {
    let out = Command::new("certtool").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "certtool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Makes `dir/{ca-cert,ca-key,server-cert,server-key}.pem` (the names
/// nbdkit's `--tls-certificates` expects): a CA named `cn` and a server
/// certificate for `localhost` and 127.0.0.1. Returns the CA's PEM path.
pub fn make_test_pki(dir: &Path, cn: &str) -> io::Result<PathBuf> {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(
        dir.join("ca.info"),
        format!("cn = {cn}\nca\ncert_signing_key\nexpiration_days = 2\n"),
    )?;
    std::fs::write(
        dir.join("server.info"),
        "organization = Warden test\ncn = localhost\ndns_name = localhost\n\
         ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n\
         expiration_days = 2\n",
    )?;
    certtool(&["--generate-privkey", "--outfile", &p("ca-key.pem")])?;
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        &p("ca-key.pem"),
        "--template",
        &p("ca.info"),
        "--outfile",
        &p("ca-cert.pem"),
    ])?;
    certtool(&["--generate-privkey", "--outfile", &p("server-key.pem")])?;
    certtool(&[
        "--generate-certificate",
        "--load-ca-certificate",
        &p("ca-cert.pem"),
        "--load-ca-privkey",
        &p("ca-key.pem"),
        "--load-privkey",
        &p("server-key.pem"),
        "--template",
        &p("server.info"),
        "--outfile",
        &p("server-cert.pem"),
    ])?;
    Ok(dir.join("ca-cert.pem"))
}
