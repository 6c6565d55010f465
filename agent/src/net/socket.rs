//! The DHCP client's socket: UDP on 0.0.0.0:68, bound to one interface.
//!
//! Owns the socket options that make DHCP work before the interface has an
//! address: SO_BINDTODEVICE (so broadcasts leave, and replies arrive, on this
//! link only, and several interfaces can each bind port 68), SO_BROADCAST
//! (to send to 255.255.255.255) and SO_REUSEADDR. Replies arrive because the
//! client sets the BROADCAST flag in every request; a unicast reply to an
//! address the interface does not have yet would be dropped by the kernel.
//! It must never be used for anything but DHCP, and holds no `unsafe`.
//!
//! Caveat: with strict reverse-path filtering (`rp_filter=1`) the kernel drops
//! broadcasts arriving on a link that has no address yet. The kernel's default
//! (0), which a ramdisk keeps, is fine; a raw AF_PACKET socket would avoid the
//! question and is the upgrade path if a site needs it.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn,
};
use tokio::net::UdpSocket;

use super::dhcp::DHCP_CLIENT_PORT;

/// A non-blocking UDP socket on 0.0.0.0:68 bound to `interface`.
/// Must be called from inside a tokio runtime.
pub fn bind_to_interface(interface: &str) -> io::Result<UdpSocket> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )?;
    // Before bind: the device binding is what lets one port-68 socket per
    // interface coexist.
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(interface))?;
    setsockopt(&fd, sockopt::Broadcast, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let [a, b, c, d] = Ipv4Addr::UNSPECIFIED.octets();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::new(a, b, c, d, DHCP_CLIENT_PORT),
    )?;
    UdpSocket::from_std(StdUdpSocket::from(fd))
}
