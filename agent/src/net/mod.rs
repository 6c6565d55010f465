//! Network bring-up: our own DHCPv4 client (dhcproto messages, rtnetlink for
//! links, addresses and routes), and NIC inventory.
//!
//! Owns: choosing the interfaces to try, bringing them (and `lo`) up, one
//! bounded DHCP attempt on all of them at once, and configuring the first
//! interface that gets an ACK (address/prefix, default route, and
//! `/etc/resolv.conf` when `/etc` is writable). Retrying with backoff is the
//! caller's job: one call is one attempt bounded by `attempt_timeout`.
//!
//! Must never: run `ip`, a shell or busybox; touch interfaces it was not
//! asked to (or, by default, that are loopback/non-Ethernet); panic on
//! anything a network peer sends.
//!
//! Out of scope for now: lease renewal (RENEWING/REBINDING) and RELEASE.
//! Leases are long compared with one turnover, so the address simply stays
//! configured for the life of the ramdisk; the lease time is reported so the
//! workflow could act if a site hands out very short leases.
//!
//! Layout: [`dhcp`] is the pure state machine (tested on hand-built
//! messages); `socket` and `link` are the thin I/O layers; [`nic`] reads the
//! sysfs inventory.

pub mod dhcp;
pub mod link;
pub mod nic;
mod socket;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::stream::{FuturesUnordered, StreamExt};
use rtnetlink::Handle;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use warden_protocol::hello::{Lease, Nic};

use dhcp::{Acked, Client, State, Step, DHCP_SERVER_PORT};
use link::Link;

/// How to look for a lease.
#[derive(Clone, Debug)]
pub struct DhcpOptions {
    /// Interfaces to try; `None` means every non-loopback Ethernet link that
    /// is not virtual (or the virtual ones when there is nothing else).
    pub interfaces: Option<Vec<String>>,
    /// How long to wait for an answer on one attempt across all interfaces
    /// (carrier wait included).
    pub attempt_timeout: Duration,
}

/// Where the bring-up may write, and how patient it is with carrier; the
/// defaults are the node's. Tests point `resolv_conf` into a tempdir.
#[derive(Clone, Debug)]
pub struct Bringup {
    /// Where to write the DNS servers; `None` leaves DNS alone.
    pub resolv_conf: Option<PathBuf>,
    /// Longest wait for carrier before sending anyway (bounded by the attempt).
    pub carrier_wait: Duration,
}

impl Default for Bringup {
    fn default() -> Self {
        Self {
            resolv_conf: Some(PathBuf::from("/etc/resolv.conf")),
            carrier_wait: Duration::from_secs(5),
        }
    }
}

/// Why no lease was bound.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no network interface found (looked for {0})")]
    NoInterface(String),
    /// `interfaces` lists each interface tried with what happened on it,
    /// e.g. `eth0 (no OFFER), eth1 (no carrier, no OFFER)`.
    #[error("no DHCP answer on {interfaces} within {timeout:?}")]
    NoAnswer {
        interfaces: String,
        timeout: Duration,
    },
    #[error("netlink: {action}: {source}")]
    Netlink {
        /// What was being done, naming the interface.
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Brings every candidate link up, runs DHCP on all of them at once, and
/// configures address, route and DNS on the first interface that gets a lease.
pub async fn dhcp_first_lease(opts: &DhcpOptions) -> Result<Lease, NetError> {
    dhcp_first_lease_with(opts, &Bringup::default()).await
}

/// [`dhcp_first_lease`] with explicit [`Bringup`] settings.
pub async fn dhcp_first_lease_with(
    opts: &DhcpOptions,
    bringup: &Bringup,
) -> Result<Lease, NetError> {
    let deadline = Instant::now() + opts.attempt_timeout;
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| NetError::Other(format!("cannot open a netlink socket: {e}")))?;
    // The connection task drives every request on `handle`; it must not
    // outlive this call.
    let _connection = AbortOnDrop(tokio::spawn(connection));

    let links = link::list(&handle)
        .await
        .map_err(|source| NetError::Netlink {
            action: "list links".into(),
            source,
        })?;
    for lo in links.iter().filter(|l| l.loopback) {
        // Local services (and the TLS client's resolver fallbacks) expect lo;
        // failing to raise it is worth a warning, not the attempt.
        if let Err(e) = link::set_up(&handle, lo.index).await {
            tracing::warn!(interface = %lo.name, error = %e, "cannot bring loopback up");
        }
    }
    let link::Choice { chosen, skipped } =
        link::choose(&links, opts.interfaces.as_deref()).map_err(NetError::NoInterface)?;
    for (name, why) in &skipped {
        tracing::info!(interface = %name, reason = why, "not trying DHCP here");
    }
    let tried: Vec<&str> = chosen.iter().map(|l| l.name.as_str()).collect();
    tracing::info!(interfaces = ?tried, timeout = ?opts.attempt_timeout, "DHCP: trying");

    let mut attempts: FuturesUnordered<_> = chosen
        .iter()
        .map(|l| {
            let handle = handle.clone();
            async move {
                let result = attempt_on(&handle, l, deadline, bringup.carrier_wait).await;
                (l, result)
            }
        })
        .collect();
    let mut failures = Vec::new();
    let mut won = None;
    while let Some((l, result)) = attempts.next().await {
        match result {
            Ok(acked) => {
                won = Some((l, acked));
                break;
            }
            Err(why) => {
                tracing::info!(interface = %l.name, reason = %why, "DHCP: no lease");
                failures.push(format!("{} ({why})", l.name));
            }
        }
    }
    // Dropping the other attempts closes their sockets; their OFFERs expire
    // on the servers by themselves.
    drop(attempts);
    let Some((l, acked)) = won else {
        return Err(NetError::NoAnswer {
            interfaces: failures.join(", "),
            timeout: opts.attempt_timeout,
        });
    };
    configure(&handle, l, &acked, bringup).await?;
    let lease = Lease {
        interface: l.name.clone(),
        address: format!("{}/{}", acked.address, acked.prefix),
        router: acked.router.map(|r| r.to_string()),
        server: acked.server.to_string(),
        lease_seconds: acked.lease_seconds,
    };
    tracing::info!(
        interface = %lease.interface,
        address = %lease.address,
        router = ?lease.router,
        server = %lease.server,
        lease_seconds = lease.lease_seconds,
        "DHCP: bound"
    );
    Ok(lease)
}

/// Lists network interfaces under `sys_class_net` (`/sys/class/net`), loopback
/// excluded; see [`nic`] for which entries count.
pub fn list_nics(sys_class_net: &Path) -> Vec<Nic> {
    nic::list_nics(sys_class_net)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// First retransmission after 1 s, doubling up to 4 s: RFC 2131's 4 s/64 s
/// schedule is meant for busy shared networks, and a node that waits for
/// DHCP does nothing else; the whole attempt is bounded anyway.
const FIRST_RETRANSMIT: Duration = Duration::from_secs(1);
const MAX_RETRANSMIT: Duration = Duration::from_secs(4);
const CARRIER_POLL: Duration = Duration::from_millis(20);

/// One interface's DHCP exchange, until an ACK or `deadline`. The error
/// says what was (not) heard.
async fn attempt_on(
    handle: &Handle,
    l: &Link,
    deadline: Instant,
    carrier_wait: Duration,
) -> Result<Acked, String> {
    let Some(mac) = l.mac else {
        return Err("no MAC address".into());
    };
    if let Err(e) = link::set_up(handle, l.index).await {
        return Err(format!("cannot bring the link up: {e}"));
    }
    let carrier = wait_for_carrier(handle, l, deadline.min(Instant::now() + carrier_wait)).await;
    if !carrier {
        // Some drivers report carrier late or never; sending costs nothing.
        tracing::warn!(interface = %l.name, "no carrier; sending DHCP anyway");
    }
    let socket = socket::bind_to_interface(&l.name).map_err(|e| format!("socket: {e}"))?;
    let mut client = Client::new(mac, random_xid(&mac));
    let begun = Instant::now();
    let mut interval = FIRST_RETRANSMIT;
    let mut buf = vec![0u8; 1500];
    // Replies prompt an immediate send; otherwise the current message is
    // re-sent each time the retransmission timer fires.
    let mut pending = client.outgoing();
    loop {
        if let Some(msg) = pending.take() {
            send(&socket, l, &msg).await?;
        }
        let wake = deadline.min(Instant::now() + interval);
        match tokio::time::timeout_at(wake, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => match client.on_bytes(buf.get(..n).unwrap_or_default()) {
                Step::Ignored(why) => {
                    tracing::debug!(interface = %l.name, %why, "DHCP: ignored a message")
                }
                Step::Send(msg) => {
                    tracing::debug!(interface = %l.name, state = ?client.state(), "DHCP: answering");
                    pending = Some(*msg);
                    interval = FIRST_RETRANSMIT;
                }
                Step::Bound(acked) => return Ok(acked),
            },
            Ok(Err(e)) => return Err(format!("receive: {e}")),
            Err(_elapsed) => {
                if Instant::now() >= deadline {
                    return Err(describe_failure(&client, carrier));
                }
                interval = (interval * 2).min(MAX_RETRANSMIT);
                client.set_elapsed_secs(begun.elapsed().as_secs());
                pending = client.outgoing();
            }
        }
    }
}

async fn send(socket: &UdpSocket, l: &Link, msg: &dhcproto::v4::Message) -> Result<(), String> {
    let bytes = dhcp::encode(msg).map_err(|e| format!("cannot encode a DHCP message: {e}"))?;
    socket
        .send_to(&bytes, (Ipv4Addr::BROADCAST, DHCP_SERVER_PORT))
        .await
        .map_err(|e| format!("send: {e}"))?;
    tracing::debug!(interface = %l.name, kind = ?msg.opts().msg_type(), xid = msg.xid(), "DHCP: sent");
    Ok(())
}

fn describe_failure(client: &Client, carrier: bool) -> String {
    let mut why = match client.state() {
        State::Selecting => "no OFFER".to_string(),
        State::Requesting(offer) => format!(
            "OFFER of {} from {} but no ACK",
            offer.address, offer.server
        ),
        State::Bound(_) => "bound".to_string(),
    };
    if let (n @ 1.., Some((server, text))) = client.naks() {
        why.push_str(&format!("; {n} NAK(s), last from {server}: {text:?}"));
    }
    if !carrier {
        why.insert_str(0, "no carrier, ");
    }
    why
}

/// Carrier as the driver sees it right now (`netif_carrier_ok`), from
/// sysfs. The netlink `IFF_LOWER_UP` flag follows the RFC 2863 operstate,
/// which the kernel's linkwatch updates at most once a second: waiting for
/// it cost a whole second per boot on virtio-net. The queue is already
/// active once the carrier is on at open time, so sending then works.
/// Checks `ifindex` too, so a sysfs mounted for another network namespace
/// (as in the tests) is never mistaken for this one.
fn sysfs_carrier(l: &Link) -> bool {
    let dir = Path::new("/sys/class/net").join(&l.name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_string());
    matches!(read("ifindex"), Ok(i) if i == l.index.to_string())
        && matches!(read("carrier").as_deref(), Ok("1"))
}

async fn wait_for_carrier(handle: &Handle, l: &Link, until: Instant) -> bool {
    let begun = Instant::now();
    loop {
        if sysfs_carrier(l) {
            tracing::debug!(interface = %l.name, waited = ?begun.elapsed(), "carrier (sysfs)");
            return true;
        }
        match link::get(handle, l.index).await {
            Ok(Some(now)) if now.carrier => {
                tracing::debug!(interface = %l.name, waited = ?begun.elapsed(), "carrier (netlink)");
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(interface = %l.name, error = %e, "cannot read link state");
                return false;
            }
        }
        if Instant::now() + CARRIER_POLL > until {
            return false;
        }
        tokio::time::sleep(CARRIER_POLL).await;
    }
}

/// The xid only has to differ between clients and attempts, not be secret:
/// std's per-process random hasher keys plus the clock are enough, and need
/// no entropy pool that may not be ready this early in boot.
fn random_xid(mac: &[u8; 6]) -> u32 {
    let mut h = RandomState::new().build_hasher();
    mac.hash(&mut h);
    SystemTime::now().hash(&mut h);
    let [a, b, c, d, e, f, g, i] = h.finish().to_le_bytes();
    u32::from_le_bytes([a, b, c, d]) ^ u32::from_le_bytes([e, f, g, i])
}

async fn configure(
    handle: &Handle,
    l: &Link,
    acked: &Acked,
    bringup: &Bringup,
) -> Result<(), NetError> {
    link::add_address(handle, l.index, acked.address, acked.prefix)
        .await
        .map_err(|source| NetError::Netlink {
            action: format!(
                "add address {}/{} to {}",
                acked.address, acked.prefix, l.name
            ),
            source,
        })?;
    if let Some(router) = acked.router {
        link::set_default_route(handle, l.index, router)
            .await
            .map_err(|source| NetError::Netlink {
                action: format!("add default route via {router} dev {}", l.name),
                source,
            })?;
    }
    if let (Some(path), false) = (&bringup.resolv_conf, acked.dns.is_empty()) {
        // Optional: the ramdisk's /etc may be read-only, and the agent
        // connects by address or with its own resolver settings anyway.
        if let Err(e) = write_resolv_conf(path, &l.name, &acked.dns) {
            tracing::warn!(path = %path.display(), error = %e, "not writing DNS servers");
        }
    }
    Ok(())
}

fn write_resolv_conf(path: &Path, interface: &str, dns: &[Ipv4Addr]) -> std::io::Result<()> {
    let mut text = format!("# written by warden-agent from the DHCP lease on {interface}\n");
    for server in dns {
        text.push_str(&format!("nameserver {server}\n"));
    }
    // Write then rename, so a reader never sees half a file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".warden-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
