//! NBD URIs: `nbd://host[:port][/export]` and `nbds://…` (TLS required).
//! Only parsing and printing; the URI never carries credentials (the CA
//! bundle is the caller's option), and query parameters are refused rather
//! than silently ignored.

use std::fmt;

use crate::Error;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    tls: bool,
    host: String,
    port: u16,
    export: String,
}

impl Uri {
    /// Parses `nbd://host[:port][/export]` or `nbds://…`; IPv6 hosts in
    /// brackets; the export name is percent-decoded.
    pub fn parse(uri: &str) -> Result<Uri, Error> {
        let err = |reason: &str| Error::Uri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(rest) = uri.strip_prefix("nbd://") {
            (false, rest)
        } else if let Some(rest) = uri.strip_prefix("nbds://") {
            (true, rest)
        } else {
            return Err(err("the scheme must be nbd:// or nbds://"));
        };
        if rest.contains(['?', '#']) {
            return Err(err("query strings and fragments are not supported"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(err("user information is not supported"));
        }
        let (host, port) = if let Some(after) = authority.strip_prefix('[') {
            let Some(close) = after.find(']') else {
                return Err(err("unterminated [ in an IPv6 host"));
            };
            let host = &after[..close];
            match &after[close + 1..] {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(err("junk after the IPv6 host")),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("the host is empty"));
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(err("the port must be a number from 1 to 65535")),
                Ok(port) => port,
            },
        };
        let export = percent_decode(path).ok_or_else(|| err("bad %-escape in the export name"))?;
        if export.len() > crate::wire::MAX_STRING {
            return Err(err("the export name is longer than 4096 bytes"));
        }
        Ok(Uri {
            tls,
            host: host.to_owned(),
            port,
            export,
        })
    }

    /// Whether TLS is required (`nbds://`).
    pub fn tls(&self) -> bool {
        self.tls
    }
    /// Host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }
    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Export name ("" is the server's default export).
    pub fn export(&self) -> &str {
        &self.export
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "nbds" } else { "nbd" };
        if self.host.contains(':') {
            write!(
                f,
                "{scheme}://[{}]:{}/{}",
                self.host, self.port, self.export
            )
        } else {
            write!(f, "{scheme}://{}:{}/{}", self.host, self.port, self.export)
        }
    }
}

impl std::str::FromStr for Uri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Uri::parse(s)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let u = Uri::parse("nbd://10.0.2.2:10810/disk0").unwrap();
        assert_eq!(
            (u.tls(), u.host(), u.port(), u.export()),
            (false, "10.0.2.2", 10810, "disk0")
        );
        let u = Uri::parse("nbds://store.example").unwrap();
        assert_eq!((u.tls(), u.port(), u.export()), (true, DEFAULT_PORT, ""));
        let u = Uri::parse("nbd://[::1]:5000/a%20b/c").unwrap();
        assert_eq!((u.host(), u.port(), u.export()), ("::1", 5000, "a b/c"));
        assert_eq!(u.to_string(), "nbd://[::1]:5000/a b/c");
        let u = Uri::parse("nbd://[fe80::1]/x").unwrap();
        assert_eq!(u.port(), DEFAULT_PORT);
    }

    #[test]
    fn errors_name_the_uri() {
        for bad in [
            "http://h/x",
            "nbd:///x",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://h:port/x",
            "nbd://h/x?tls=on",
            "nbd://u@h/x",
            "nbd://[::1/x",
            "nbd://h/%zz",
        ] {
            let e = Uri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
