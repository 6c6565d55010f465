//! The fixed-newstyle handshake, from the server's greeting to the
//! transmission phase: STARTTLS first for `nbds://` (and nothing else if the
//! server refuses it — no downgrade), structured replies, the
//! `base:allocation` meta context, then `NBD_OPT_GO` asking for block sizes,
//! or `NBD_OPT_EXPORT_NAME` when the server does not know GO.
//!
//! It runs once per connection on the caller's thread, with the socket's
//! timeouts bounding every read. It never sends a request before the server
//! has answered the previous option, and never continues in plaintext once
//! TLS was asked for.

use std::io::{self, Read};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::transport::{self, ReadHalf, WriteHalf};
use crate::wire::{
    self, encode_option, parse_export_name_reply, parse_info, parse_meta_context,
    parse_option_reply_header, put_string, reply_name, BlockSizes, Info, TransmissionFlags,
    CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, CLISERV_MAGIC, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
    IHAVEOPT, INFO_BLOCK_SIZE, NBDMAGIC, OPTION_REPLY_LEN, OPT_EXPORT_NAME, OPT_GO,
    OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR, REP_ERR_TLS_REQD,
    REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT,
};
use crate::{Error, ExportInfo, Negotiation, Options, Uri};

/// The metadata context BLOCK_STATUS reports.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest option reply payload accepted (info, context names, messages).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the handshake settled.
pub(crate) struct Negotiated {
    pub(crate) info: ExportInfo,
    pub(crate) meta_context: Option<u32>,
}

/// Loads the caller's CA bundle into a rustls client config (ring provider).
pub(crate) fn tls_config(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read CA bundle {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("bad PEM in CA bundle {}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "CA bundle {} holds no certificate",
            ca_file.display()
        ));
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

struct Hs<'a> {
    r: ReadHalf,
    w: WriteHalf,
    server: &'a str,
}

impl Hs<'_> {
    fn fail(&self, reason: impl Into<String>) -> Error {
        Error::Handshake {
            server: self.server.to_owned(),
            reason: reason.into(),
        }
    }

    fn io_fail(&self, step: &str, e: &io::Error) -> Error {
        let why = match e.kind() {
            io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                "the server did not answer in time".to_owned()
            }
            _ => e.to_string(),
        };
        self.fail(format!("{step}: {why}"))
    }

    fn read_exact(&mut self, buf: &mut [u8], step: &str) -> Result<(), Error> {
        self.r.read_exact(buf).map_err(|e| self.io_fail(step, &e))
    }

    fn send(&self, bytes: &[u8], step: &str) -> Result<(), Error> {
        self.w.send(&[bytes]).map_err(|e| self.io_fail(step, &e))
    }

    fn send_option(&self, option: u32, data: &[u8], step: &str) -> Result<(), Error> {
        let bytes = encode_option(option, data).map_err(|e| self.fail(format!("{step}: {e}")))?;
        self.send(&bytes, step)
    }

    /// Reads one option reply to `option`: (reply type, payload).
    fn option_reply(&mut self, option: u32, step: &str) -> Result<(u32, Vec<u8>), Error> {
        let mut header = [0u8; OPTION_REPLY_LEN];
        self.read_exact(&mut header, step)?;
        let h =
            parse_option_reply_header(&header).map_err(|e| self.fail(format!("{step}: {e}")))?;
        if h.option != option {
            return Err(self.fail(format!(
                "{step}: reply names option {} but {option} was sent",
                h.option
            )));
        }
        if h.length > MAX_OPTION_REPLY {
            return Err(self.fail(format!(
                "{step}: {} of {} bytes is too long",
                reply_name(h.reply),
                h.length
            )));
        }
        let mut payload = vec![0u8; h.length as usize];
        self.read_exact(&mut payload, step)?;
        Ok((h.reply, payload))
    }

    fn refused(&self, step: &str, reply: u32, payload: &[u8]) -> Error {
        let message = wire::message_text(payload);
        let hint = if reply == REP_ERR_TLS_REQD {
            " (the server requires TLS: use an nbds:// URI)"
        } else {
            ""
        };
        if message.is_empty() {
            self.fail(format!("{step}: {}{hint}", reply_name(reply)))
        } else {
            self.fail(format!("{step}: {}{hint}: {message}", reply_name(reply)))
        }
    }
}

/// Runs the handshake on a connected socket.
pub(crate) fn negotiate(
    tcp: TcpStream,
    uri: &Uri,
    opts: &Options,
    tls: Option<&Arc<ClientConfig>>,
    server: &str,
) -> Result<(ReadHalf, WriteHalf, Negotiated), Error> {
    let tcp_for_tls = tcp.try_clone().map_err(|e| Error::Connect {
        server: server.to_owned(),
        source: e,
    })?;
    let (r, w) = transport::plain(tcp).map_err(|e| Error::Connect {
        server: server.to_owned(),
        source: e,
    })?;
    let mut hs = Hs { r, w, server };

    let mut greeting = [0u8; 18];
    hs.read_exact(&mut greeting[..16], "reading the server greeting")?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
    let second = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(hs.fail(format!("not an NBD server (greeting {magic:#018x})")));
    }
    if second == CLISERV_MAGIC {
        return Err(hs.fail("oldstyle server: it has no named exports and is not supported"));
    }
    if second != IHAVEOPT {
        return Err(hs.fail(format!("unknown greeting {second:#018x}")));
    }
    hs.read_exact(&mut greeting[16..18], "reading the handshake flags")?;
    let hflags = u16::from_be_bytes([greeting[16], greeting[17]]);
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0u32;
    if fixed {
        cflags |= CLIENT_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= CLIENT_NO_ZEROES;
    }
    hs.send(&cflags.to_be_bytes(), "sending the client flags")?;

    if let Some(config) = tls {
        if !fixed {
            return Err(Error::TlsRefused {
                server: server.to_owned(),
                reply: "the server does not speak fixed newstyle, so it cannot do STARTTLS".into(),
            });
        }
        hs.send_option(OPT_STARTTLS, &[], "NBD_OPT_STARTTLS")?;
        let (reply, payload) = hs.option_reply(OPT_STARTTLS, "NBD_OPT_STARTTLS")?;
        if reply != REP_ACK {
            let message = wire::message_text(&payload);
            return Err(Error::TlsRefused {
                server: server.to_owned(),
                reply: if message.is_empty() {
                    reply_name(reply)
                } else {
                    format!("{}: {message}", reply_name(reply))
                },
            });
        }
        let name = ServerName::try_from(uri.host().to_owned()).map_err(|e| Error::Tls {
            server: server.to_owned(),
            reason: format!("bad server name {:?}: {e}", uri.host()),
        })?;
        let conn = ClientConnection::new(Arc::clone(config), name).map_err(|e| Error::Tls {
            server: server.to_owned(),
            reason: e.to_string(),
        })?;
        let (r, w) = transport::tls(tcp_for_tls, conn).map_err(|e| Error::Tls {
            server: server.to_owned(),
            reason: format!("TLS handshake failed: {e}"),
        })?;
        hs.r = r;
        hs.w = w;
        tracing::debug!(server, "TLS established");
    }

    let mut structured = false;
    let mut meta_context = None;
    if fixed && opts.structured_replies {
        hs.send_option(OPT_STRUCTURED_REPLY, &[], "NBD_OPT_STRUCTURED_REPLY")?;
        let (reply, payload) = hs.option_reply(OPT_STRUCTURED_REPLY, "NBD_OPT_STRUCTURED_REPLY")?;
        match reply {
            REP_ACK => structured = true,
            REP_ERR_TLS_REQD => {
                return Err(hs.refused("NBD_OPT_STRUCTURED_REPLY", reply, &payload))
            }
            r if r & REP_ERR != 0 => {
                tracing::debug!(server, reply = %reply_name(r), "no structured replies")
            }
            r => {
                return Err(hs.fail(format!(
                    "NBD_OPT_STRUCTURED_REPLY: unexpected {}",
                    reply_name(r)
                )))
            }
        }
    }
    if structured {
        let mut data = Vec::new();
        put_string(&mut data, uri.export()).map_err(|e| hs.fail(e.0))?;
        data.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut data, BASE_ALLOCATION).map_err(|e| hs.fail(e.0))?;
        hs.send_option(OPT_SET_META_CONTEXT, &data, "NBD_OPT_SET_META_CONTEXT")?;
        loop {
            let (reply, payload) =
                hs.option_reply(OPT_SET_META_CONTEXT, "NBD_OPT_SET_META_CONTEXT")?;
            match reply {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    let (id, name) = parse_meta_context(&payload)
                        .map_err(|e| hs.fail(format!("NBD_OPT_SET_META_CONTEXT: {e}")))?;
                    if name != BASE_ALLOCATION {
                        return Err(hs.fail(format!(
                            "NBD_OPT_SET_META_CONTEXT: server selected {name:?}, which was not asked for"
                        )));
                    }
                    meta_context = Some(id);
                }
                r if r & REP_ERR != 0 => {
                    // Not fatal: BLOCK_STATUS is then simply unavailable.
                    tracing::debug!(server, reply = %reply_name(r), "no base:allocation");
                    break;
                }
                r => {
                    return Err(hs.fail(format!(
                        "NBD_OPT_SET_META_CONTEXT: unexpected {}",
                        reply_name(r)
                    )))
                }
            }
        }
    }

    let mut export: Option<(u64, TransmissionFlags)> = None;
    let mut block_sizes = BlockSizes::default();
    let mut negotiation = Negotiation::Go;
    let mut use_export_name = !fixed;
    if fixed {
        let mut data = Vec::new();
        put_string(&mut data, uri.export()).map_err(|e| hs.fail(e.0))?;
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        hs.send_option(OPT_GO, &data, "NBD_OPT_GO")?;
        loop {
            let (reply, payload) = hs.option_reply(OPT_GO, "NBD_OPT_GO")?;
            match reply {
                REP_ACK => break,
                REP_INFO => {
                    match parse_info(&payload).map_err(|e| hs.fail(format!("NBD_OPT_GO: {e}")))? {
                        Info::Export { size, flags } => export = Some((size, flags)),
                        Info::BlockSize(sizes) => block_sizes = sizes,
                        Info::Other(_) => {}
                    }
                }
                REP_ERR_UNSUP => {
                    use_export_name = true;
                    break;
                }
                r if r & REP_ERR != 0 => {
                    return Err(hs.refused(
                        &format!("NBD_OPT_GO for export {:?}", uri.export()),
                        r,
                        &payload,
                    ))
                }
                r => return Err(hs.fail(format!("NBD_OPT_GO: unexpected {}", reply_name(r)))),
            }
        }
        if !use_export_name && export.is_none() {
            return Err(hs.fail("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"));
        }
    }
    if use_export_name {
        negotiation = Negotiation::ExportName;
        block_sizes = BlockSizes::default();
        hs.send_option(
            OPT_EXPORT_NAME,
            uri.export().as_bytes(),
            "NBD_OPT_EXPORT_NAME",
        )?;
        let mut reply = [0u8; 10 + 124];
        let len = if no_zeroes { 10 } else { reply.len() };
        let step = format!(
            "NBD_OPT_EXPORT_NAME {:?} (a server closes the connection when the export does not exist or needs TLS)",
            uri.export()
        );
        hs.read_exact(&mut reply[..len], &step)?;
        export = Some(parse_export_name_reply(&reply[..10]).map_err(|e| hs.fail(e.0))?);
    }
    let Some((size, flags)) = export else {
        return Err(hs.fail("the server sent no export size"));
    };
    let info = ExportInfo {
        size,
        flags,
        block_sizes,
        structured_replies: structured,
        base_allocation: meta_context.is_some(),
        negotiation,
        tls: tls.is_some(),
    };
    tracing::debug!(
        server,
        size,
        flags = flags.0,
        min = block_sizes.minimum,
        preferred = block_sizes.preferred,
        max = block_sizes.maximum,
        structured,
        ?negotiation,
        "NBD handshake done"
    );
    Ok((hs.r, hs.w, Negotiated { info, meta_context }))
}
