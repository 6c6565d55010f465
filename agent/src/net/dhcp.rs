//! The DHCPv4 client as a pure state machine over dhcproto messages:
//! SELECTING (DISCOVER sent) → REQUESTING (REQUEST sent for one OFFER) →
//! BOUND (ACK accepted). A NAK sends it back to SELECTING with a new xid.
//!
//! It owns message construction and the checks on every reply (xid, chaddr,
//! message type, server identifier, sane address and mask). It never touches
//! a socket, a clock or the kernel: the I/O layer in `net` feeds it bytes and
//! sends what it returns, which is what lets the tests drive it with
//! hand-built OFFERs, ACKs and NAKs. Replies are untrusted bytes from the
//! wire: anything unexpected is ignored with a reason, never a panic.

use std::net::Ipv4Addr;

use dhcproto::v4::{
    DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, CLIENT_PORT, SERVER_PORT,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// UDP port the client listens on.
pub const DHCP_CLIENT_PORT: u16 = CLIENT_PORT;
/// UDP port servers listen on.
pub const DHCP_SERVER_PORT: u16 = SERVER_PORT;

/// BOOTP's minimum message size; some relays and old servers drop shorter
/// packets, so requests are zero-padded up to it (after the END option).
const MIN_WIRE_LEN: usize = 300;

/// The parameters the client asks for (option 55).
pub const PARAMETERS: [OptionCode; 5] = [
    OptionCode::SubnetMask,
    OptionCode::Router,
    OptionCode::DomainNameServer,
    OptionCode::AddressLeaseTime,
    OptionCode::ServerIdentifier,
];

/// An OFFER the client chose to request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The offering server's identifier (option 54).
    pub server: Ipv4Addr,
    /// The offered address (`yiaddr`).
    pub address: Ipv4Addr,
}

/// What an ACK granted: everything needed to configure the interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub address: Ipv4Addr,
    /// Prefix length from the subnet mask (classful default when absent).
    pub prefix: u8,
    /// First usable router (option 3), if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6), possibly empty.
    pub dns: Vec<Ipv4Addr>,
    /// Server identifier (option 54).
    pub server: Ipv4Addr,
    /// Lease time in seconds; `u32::MAX` means infinite (RFC 2131).
    pub lease_seconds: u32,
}

/// Where the client is in the exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// DISCOVER sent, waiting for an OFFER.
    Selecting,
    /// REQUEST sent for this OFFER, waiting for ACK or NAK.
    Requesting(Offer),
    /// An ACK was accepted.
    Bound(Acked),
}

/// What the I/O layer must do after a reply was fed in.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Not for us, or not useful in this state; keep waiting.
    Ignored(String),
    /// Send this message now (a REQUEST after an OFFER, a DISCOVER after a NAK).
    Send(Box<Message>),
    /// The lease is granted; configure it.
    Bound(Acked),
}

/// One DHCP client for one interface.
#[derive(Clone, Debug)]
pub struct Client {
    mac: [u8; 6],
    xid: u32,
    secs: u16,
    state: State,
    naks: u32,
    last_nak: Option<(Ipv4Addr, String)>,
}

impl Client {
    /// A client in SELECTING for the interface with hardware address `mac`,
    /// using transaction id `xid` (the caller picks it at random).
    pub fn new(mac: [u8; 6], xid: u32) -> Self {
        Self {
            mac,
            xid,
            secs: 0,
            state: State::Selecting,
            naks: 0,
            last_nak: None,
        }
    }

    pub fn xid(&self) -> u32 {
        self.xid
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// How many NAKs restarted the exchange, and the last one's server and message.
    pub fn naks(&self) -> (u32, Option<&(Ipv4Addr, String)>) {
        (self.naks, self.last_nak.as_ref())
    }

    /// Seconds since the exchange began, for the `secs` field of later messages.
    pub fn set_elapsed_secs(&mut self, secs: u64) {
        self.secs = u16::try_from(secs).unwrap_or(u16::MAX);
    }

    /// The message to send (or re-send on a retransmission timeout) in the
    /// current state: DISCOVER while selecting, REQUEST while requesting,
    /// nothing once bound.
    pub fn outgoing(&self) -> Option<Message> {
        match &self.state {
            State::Selecting => Some(self.discover()),
            State::Requesting(offer) => Some(self.request(offer)),
            State::Bound(_) => None,
        }
    }

    /// A DISCOVER for the current transaction.
    pub fn discover(&self) -> Message {
        self.base(MessageType::Discover)
    }

    fn request(&self, offer: &Offer) -> Message {
        let mut msg = self.base(MessageType::Request);
        // SELECTING-state REQUEST (RFC 2131 4.3.2): ciaddr stays 0, the
        // chosen address and server go in options 50 and 54; it is broadcast
        // so other offering servers learn they were not chosen.
        msg.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.address));
        msg.opts_mut()
            .insert(DhcpOption::ServerIdentifier(offer.server));
        msg
    }

    fn base(&self, kind: MessageType) -> Message {
        let unspecified = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(
            self.xid,
            unspecified,
            unspecified,
            unspecified,
            unspecified,
            &self.mac,
        );
        // Without an address the kernel would drop a unicast reply to yiaddr,
        // so ask servers to broadcast.
        msg.set_flags(Flags::default().set_broadcast());
        msg.set_secs(self.secs);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut client_id = Vec::with_capacity(7);
        client_id.push(1); // hardware type: Ethernet (RFC 2132 9.14)
        client_id.extend_from_slice(&self.mac);
        opts.insert(DhcpOption::ClientIdentifier(client_id));
        opts.insert(DhcpOption::ParameterRequestList(PARAMETERS.to_vec()));
        opts.insert(DhcpOption::MaxMessageSize(1500));
        msg
    }

    /// Feeds one received datagram. Undecodable bytes are ignored.
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Step {
        match decode(bytes) {
            Ok(msg) => self.on_message(&msg),
            Err(e) => Step::Ignored(format!("undecodable DHCP message: {e}")),
        }
    }

    /// Feeds one decoded reply and moves the state machine.
    pub fn on_message(&mut self, msg: &Message) -> Step {
        if msg.opcode() != Opcode::BootReply {
            return Step::Ignored("not a BOOTREPLY".into());
        }
        if msg.xid() != self.xid {
            return Step::Ignored(format!(
                "xid {:#010x} is not ours ({:#010x})",
                msg.xid(),
                self.xid
            ));
        }
        if msg.chaddr().get(..6) != Some(&self.mac[..]) {
            return Step::Ignored("chaddr is not our MAC".into());
        }
        let Some(kind) = msg.opts().msg_type() else {
            return Step::Ignored("no DHCP message type (plain BOOTP)".into());
        };
        let server = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        match (&self.state, kind) {
            (State::Selecting, MessageType::Offer) => {
                let Some(server) = server else {
                    return Step::Ignored("OFFER without server identifier".into());
                };
                let address = msg.yiaddr();
                if !usable_host(address) {
                    return Step::Ignored(format!("OFFER of unusable address {address}"));
                }
                let offer = Offer { server, address };
                let request = self.request(&offer);
                self.state = State::Requesting(offer);
                Step::Send(Box::new(request))
            }
            (State::Requesting(offer), MessageType::Ack) => {
                if server.is_some_and(|s| s != offer.server) {
                    return Step::Ignored(format!(
                        "ACK from {} but we requested from {}",
                        server.unwrap_or(Ipv4Addr::UNSPECIFIED),
                        offer.server
                    ));
                }
                match acked(msg, offer.server) {
                    Ok(acked) => {
                        self.state = State::Bound(acked.clone());
                        Step::Bound(acked)
                    }
                    Err(why) => Step::Ignored(why),
                }
            }
            (State::Requesting(offer), MessageType::Nak) => {
                if server.is_some_and(|s| s != offer.server) {
                    return Step::Ignored("NAK from a server we did not ask".into());
                }
                let text = match msg.opts().get(OptionCode::Message) {
                    Some(DhcpOption::Message(m)) => m.clone(),
                    _ => String::new(),
                };
                self.naks = self.naks.saturating_add(1);
                self.last_nak = Some((offer.server, text));
                // Start over (RFC 2131 3.1 step 5) as a new transaction, so a
                // late reply to the refused one cannot be taken for a fresh one.
                self.xid = self.xid.wrapping_add(1);
                self.state = State::Selecting;
                Step::Send(Box::new(self.discover()))
            }
            (state, kind) => Step::Ignored(format!(
                "{kind:?} is not expected in state {}",
                state_name(state)
            )),
        }
    }
}

fn state_name(state: &State) -> &'static str {
    match state {
        State::Selecting => "SELECTING",
        State::Requesting(_) => "REQUESTING",
        State::Bound(_) => "BOUND",
    }
}

/// A unicast host address a client may configure.
fn usable_host(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

fn acked(msg: &Message, server: Ipv4Addr) -> Result<Acked, String> {
    let address = msg.yiaddr();
    if !usable_host(address) {
        return Err(format!("ACK of unusable address {address}"));
    }
    let prefix = match msg.opts().get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => {
            prefix_of(*mask).ok_or_else(|| format!("ACK with non-contiguous subnet mask {mask}"))?
        }
        _ => classful_prefix(address),
    };
    let router = match msg.opts().get(OptionCode::Router) {
        Some(DhcpOption::Router(routers)) => routers.iter().copied().find(|r| usable_host(*r)),
        _ => None,
    };
    let dns = match msg.opts().get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(list)) => {
            list.iter().copied().filter(|d| usable_host(*d)).collect()
        }
        _ => Vec::new(),
    };
    let lease_seconds = match msg.opts().get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => *secs,
        // RFC 2131 requires option 51 in an ACK; a server that leaves it out
        // means no expiry as far as we can tell.
        _ => u32::MAX,
    };
    Ok(Acked {
        address,
        prefix,
        router,
        dns,
        server,
        lease_seconds,
    })
}

/// Prefix length of a contiguous netmask; `None` for masks like 255.0.255.0.
pub fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    if bits.count_ones() != ones {
        return None;
    }
    u8::try_from(ones).ok()
}

/// RFC 1122's default mask when the server sent none.
fn classful_prefix(ip: Ipv4Addr) -> u8 {
    match ip.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Encodes a message for the wire, padded to the BOOTP minimum.
pub fn encode(msg: &Message) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
    let mut buf = Vec::with_capacity(MIN_WIRE_LEN);
    msg.encode(&mut Encoder::new(&mut buf))?;
    if buf.len() < MIN_WIRE_LEN {
        buf.resize(MIN_WIRE_LEN, 0);
    }
    Ok(buf)
}

/// Decodes a message from untrusted bytes.
pub fn decode(bytes: &[u8]) -> Result<Message, dhcproto::error::DecodeError> {
    Message::decode(&mut Decoder::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const YIADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

    /// A reply as a server would build it, answering `req`.
    fn reply(req: &Message, kind: MessageType) -> Message {
        let mut m = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            if kind == MessageType::Nak {
                Ipv4Addr::UNSPECIFIED
            } else {
                YIADDR
            },
            SERVER,
            Ipv4Addr::UNSPECIFIED,
            req.chaddr(),
        );
        m.set_opcode(Opcode::BootReply);
        m.set_flags(req.flags());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(SERVER));
        if kind == MessageType::Nak {
            o.insert(DhcpOption::Message("wrong network".into()));
        } else {
            o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 0, 254)]));
            o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                10, 0, 0, 53,
            )]));
            o.insert(DhcpOption::AddressLeaseTime(3600));
        }
        m
    }

    /// Round-trips through the wire format, as the I/O layer would.
    fn wire(m: &Message) -> Vec<u8> {
        encode(m).unwrap()
    }

    #[test]
    fn discover_carries_what_servers_need() {
        let client = Client::new(MAC, 0xdead_beef);
        let bytes = wire(&client.outgoing().unwrap());
        assert!(bytes.len() >= MIN_WIRE_LEN);
        let msg = decode(&bytes).unwrap();
        assert_eq!(msg.opcode(), Opcode::BootRequest);
        assert_eq!(msg.xid(), 0xdead_beef);
        assert_eq!(msg.chaddr(), &MAC[..]);
        assert!(msg.flags().broadcast());
        assert_eq!(msg.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(
            msg.opts().get(OptionCode::ClientIdentifier),
            Some(&DhcpOption::ClientIdentifier(vec![
                1, 0x52, 0x54, 0, 0x12, 0x34, 0x56
            ]))
        );
        assert_eq!(
            msg.opts().get(OptionCode::ParameterRequestList),
            Some(&DhcpOption::ParameterRequestList(PARAMETERS.to_vec()))
        );
    }

    #[test]
    fn offer_then_ack_binds() {
        let mut client = Client::new(MAC, 7);
        let discover = decode(&wire(&client.outgoing().unwrap())).unwrap();

        let offer = reply(&discover, MessageType::Offer);
        let Step::Send(request) = client.on_bytes(&wire(&offer)) else {
            panic!("an OFFER must produce a REQUEST");
        };
        let request = decode(&wire(&request)).unwrap();
        assert_eq!(request.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(request.xid(), 7);
        assert!(request.flags().broadcast());
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(YIADDR))
        );
        assert_eq!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        // A retransmission in REQUESTING repeats the REQUEST.
        assert_eq!(
            client.outgoing().unwrap().opts().msg_type(),
            Some(MessageType::Request)
        );

        let ack = reply(&request, MessageType::Ack);
        let Step::Bound(acked) = client.on_bytes(&wire(&ack)) else {
            panic!("an ACK must bind");
        };
        assert_eq!(
            acked,
            Acked {
                address: YIADDR,
                prefix: 24,
                router: Some(Ipv4Addr::new(10, 0, 0, 254)),
                dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
                server: SERVER,
                lease_seconds: 3600,
            }
        );
        assert!(matches!(client.state(), State::Bound(_)));
        assert!(client.outgoing().is_none());
    }

    #[test]
    fn foreign_xid_chaddr_and_requests_are_ignored() {
        let mut client = Client::new(MAC, 42);
        let discover = client.discover();

        let mut other_xid = reply(&discover, MessageType::Offer);
        other_xid.set_xid(43);
        assert!(matches!(client.on_message(&other_xid), Step::Ignored(_)));

        let mut other_mac = reply(&discover, MessageType::Offer);
        other_mac.set_chaddr(&[2, 0, 0, 0, 0, 1]);
        assert!(matches!(client.on_message(&other_mac), Step::Ignored(_)));

        // Our own broadcast DISCOVER looped back, or another client's.
        assert!(matches!(client.on_message(&discover), Step::Ignored(_)));

        // An ACK while still selecting.
        assert!(matches!(
            client.on_message(&reply(&discover, MessageType::Ack)),
            Step::Ignored(_)
        ));
        assert!(matches!(client.on_bytes(b"\x02garbage"), Step::Ignored(_)));
        assert_eq!(client.state(), &State::Selecting);
    }

    #[test]
    fn ack_from_another_server_is_ignored() {
        let mut client = Client::new(MAC, 1);
        let discover = client.discover();
        assert!(matches!(
            client.on_message(&reply(&discover, MessageType::Offer)),
            Step::Send(_)
        ));
        let mut ack = reply(&discover, MessageType::Ack);
        ack.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 9, 9)));
        assert!(matches!(client.on_message(&ack), Step::Ignored(_)));
        assert!(matches!(client.state(), State::Requesting(_)));
    }

    #[test]
    fn nak_restarts_with_a_new_transaction() {
        let mut client = Client::new(MAC, 100);
        let discover = client.discover();
        client.on_message(&reply(&discover, MessageType::Offer));
        let request = client.outgoing().unwrap();

        let Step::Send(again) = client.on_bytes(&wire(&reply(&request, MessageType::Nak))) else {
            panic!("a NAK must restart with a DISCOVER");
        };
        assert_eq!(again.opts().msg_type(), Some(MessageType::Discover));
        assert_ne!(again.xid(), 100);
        assert_eq!(client.state(), &State::Selecting);
        let (count, last) = client.naks();
        assert_eq!(count, 1);
        assert_eq!(last, Some(&(SERVER, "wrong network".to_string())));

        // The refused transaction's late ACK no longer counts.
        assert!(matches!(
            client.on_message(&reply(&request, MessageType::Ack)),
            Step::Ignored(_)
        ));
    }

    #[test]
    fn offer_without_server_id_or_with_bad_address_is_ignored() {
        let mut client = Client::new(MAC, 5);
        let discover = client.discover();
        let mut offer = reply(&discover, MessageType::Offer);
        offer.opts_mut().remove(OptionCode::ServerIdentifier);
        assert!(matches!(client.on_message(&offer), Step::Ignored(_)));
        let mut offer = reply(&discover, MessageType::Offer);
        offer.set_yiaddr(Ipv4Addr::BROADCAST);
        assert!(matches!(client.on_message(&offer), Step::Ignored(_)));
    }

    #[test]
    fn ack_defaults_and_bad_masks() {
        let mut client = Client::new(MAC, 9);
        let discover = client.discover();
        client.on_message(&reply(&discover, MessageType::Offer));
        let mut ack = reply(&discover, MessageType::Ack);
        ack.opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 0, 255, 0)));
        assert!(matches!(client.on_message(&ack), Step::Ignored(_)));

        let mut ack = reply(&discover, MessageType::Ack);
        for code in [
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::AddressLeaseTime,
        ] {
            ack.opts_mut().remove(code);
        }
        let Step::Bound(acked) = client.on_message(&ack) else {
            panic!("a minimal ACK must still bind");
        };
        assert_eq!(acked.prefix, 8); // 10/8, classful
        assert_eq!(acked.router, None);
        assert!(acked.dns.is_empty());
        assert_eq!(acked.lease_seconds, u32::MAX);
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
        assert_eq!(prefix_of(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
