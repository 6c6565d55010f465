//! Links, addresses and routes over rtnetlink: list links, bring them up,
//! watch carrier, add the leased address and the default route.
//!
//! Owns every change the agent makes to the kernel's network configuration,
//! and nothing else: it never spawns `ip` or a shell, never deletes an
//! address or route it did not add, and only touches the links the caller
//! names. Netlink sockets belong to the network namespace of the thread that
//! opened them, which is what lets the tests run this inside a namespace.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// What the DHCP bring-up needs to know about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address, when it is a 6-byte Ethernet one.
    pub mac: Option<[u8; 6]>,
    /// rtnetlink's link kind (`veth`, `bridge`, …); physical NICs have none.
    pub kind: Option<String>,
    pub loopback: bool,
    /// ARPHRD_ETHER: the only link type DHCP runs on here.
    pub ether: bool,
    /// Carrier (IFF_LOWER_UP).
    pub carrier: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut name = String::new();
        let mut mac = None;
        let mut kind = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name.clone_from(n),
                LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        let flags = msg.header.flags;
        Self {
            index: msg.header.index,
            name,
            mac,
            kind,
            loopback: flags.contains(LinkFlags::Loopback)
                || msg.header.link_layer_type == LinkLayerType::Loopback,
            ether: msg.header.link_layer_type == LinkLayerType::Ether,
            carrier: flags.contains(LinkFlags::LowerUp),
        }
    }
}

/// The links DHCP will run on, and (for the log) the ones left out and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub chosen: Vec<Link>,
    pub skipped: Vec<(String, &'static str)>,
}

/// Every link in this network namespace.
pub async fn list(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(msgs.iter().map(Link::from_message).collect())
}

/// One link, fresh (for carrier polling).
pub async fn get(handle: &Handle, index: u32) -> Result<Option<Link>, rtnetlink::Error> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs.first().map(Link::from_message))
}

/// `ip link set dev INDEX up`.
pub async fn set_up(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// Adds (or refreshes) `address/prefix` on the link; the kernel adds the
/// subnet route with it.
pub async fn add_address(
    handle: &Handle,
    index: u32,
    address: Ipv4Addr,
    prefix: u8,
) -> Result<(), rtnetlink::Error> {
    // replace: a second attempt after a partial failure must not hit EEXIST.
    handle
        .address()
        .add(index, IpAddr::V4(address), prefix)
        .replace()
        .execute()
        .await
}

/// Sets the main table's IPv4 default route to `router` via the link.
pub async fn set_default_route(
    handle: &Handle,
    index: u32,
    router: Ipv4Addr,
) -> Result<(), rtnetlink::Error> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(router)
        .output_interface(index)
        .protocol(RouteProtocol::Dhcp)
        .build();
    handle.route().add(route).replace().execute().await
}

/// Picks the links to run DHCP on. `wanted = None` means every Ethernet link
/// that is not loopback and not virtual; when there is no physical one, the
/// virtual ones are used rather than nothing (a namespace or container has
/// only veths), the same rule as the NIC inventory. The error is what was
/// looked for, for [`super::NetError::NoInterface`].
pub fn choose(links: &[Link], wanted: Option<&[String]>) -> Result<Choice, String> {
    let mut skipped = Vec::new();
    let mut chosen = Vec::new();
    match wanted {
        Some(names) => {
            for name in names {
                match links.iter().find(|l| &l.name == name) {
                    None => skipped.push((name.clone(), "does not exist")),
                    Some(l) if l.loopback => skipped.push((name.clone(), "is loopback")),
                    Some(l) if !l.ether || l.mac.is_none() => {
                        skipped.push((name.clone(), "is not an Ethernet link"))
                    }
                    Some(l) => chosen.push(l.clone()),
                }
            }
            if chosen.is_empty() {
                return Err(names.join(", "));
            }
        }
        None => {
            let mut virtual_ = Vec::new();
            for l in links {
                if l.loopback {
                    continue;
                }
                if !l.ether || l.mac.is_none() {
                    skipped.push((l.name.clone(), "is not an Ethernet link"));
                } else if l.kind.is_some() {
                    virtual_.push(l.clone());
                } else {
                    chosen.push(l.clone());
                }
            }
            if chosen.is_empty() {
                chosen = virtual_;
            } else {
                skipped.extend(virtual_.into_iter().map(|l| (l.name, "is virtual")));
            }
            if chosen.is_empty() {
                return Err("any non-loopback Ethernet link".into());
            }
        }
    }
    Ok(Choice { chosen, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some([2, 0, 0, 0, 0, u8::try_from(index).unwrap()]),
            kind: kind.map(Into::into),
            loopback: false,
            ether: true,
            carrier: false,
        }
    }

    fn lo() -> Link {
        Link {
            loopback: true,
            ether: false,
            mac: None,
            ..link(1, "lo", None)
        }
    }

    fn names(links: &[Link]) -> Vec<&str> {
        links.iter().map(|l| l.name.as_str()).collect()
    }

    #[test]
    fn default_prefers_physical_links() {
        let links = [
            lo(),
            link(2, "eth0", None),
            link(3, "veth0", Some("veth")),
            link(4, "eth1", None),
        ];
        let Choice { chosen, skipped } = choose(&links, None).unwrap();
        assert_eq!(names(&chosen), ["eth0", "eth1"]);
        assert_eq!(skipped, [("veth0".to_string(), "is virtual")]);
    }

    #[test]
    fn default_falls_back_to_virtual_links() {
        let mut tunnel = link(3, "sit0", Some("sit"));
        tunnel.ether = false;
        let links = [lo(), link(2, "veth0", Some("veth")), tunnel];
        let Choice { chosen, skipped } = choose(&links, None).unwrap();
        assert_eq!(names(&chosen), ["veth0"]);
        assert_eq!(skipped, [("sit0".to_string(), "is not an Ethernet link")]);
        assert!(choose(&[lo()], None).is_err());
    }

    #[test]
    fn named_links_must_exist() {
        let links = [lo(), link(2, "eth0", None)];
        let wanted = vec!["eth0".to_string(), "eth9".to_string()];
        let Choice { chosen, skipped } = choose(&links, Some(&wanted)).unwrap();
        assert_eq!(names(&chosen), ["eth0"]);
        assert_eq!(skipped, [("eth9".to_string(), "does not exist")]);
        let err = choose(&links, Some(&["eth9".to_string(), "lo".to_string()])).unwrap_err();
        assert_eq!(err, "eth9, lo");
    }
}
