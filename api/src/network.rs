//! Networks of host addresses as operators write them: an address
//! (`10.20.0.7`, one host) or a network (`10.20.0.0/16`). meshd's
//! `proxy.peer_transport` keys and the controller's `[[mesh.peer_transport]]`
//! rules read them the same way.

use std::net::IpAddr;

use ipnet::IpNet;

/// The most rules `[[mesh.peer_transport]]` may hold, and networks in one
/// rule's `hosts` or `peers`: every host gets all the rules. The controller
/// refuses more at start; meshd refuses an update with more.
pub const MAX_PEER_TRANSPORT_RULES: usize = 64;
pub const MAX_RULE_NETWORKS: usize = 256;

/// Parses an address or a network. Refused, with the text quoted: what is
/// neither, and a network with bits set past its prefix (the message names
/// the network that was probably meant). An IPv4-mapped IPv6 network
/// (`::ffff:10.20.0.0/112`) comes back as the IPv4 network it maps, since
/// addresses are compared in their canonical form.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpAddr>() {
        Ok(ip) => IpNet::from(ip),
        Err(_) => text.parse::<IpNet>().map_err(|_| {
            format!(
                "{text:?} is neither an address nor a network (such as \"10.20.0.0/16\" or \"10.20.0.7\")"
            )
        })?,
    };
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has bits set past its prefix; the network is {}",
            net.trunc()
        ));
    }
    Ok(unmapped(net))
}

/// An IPv4-mapped IPv6 network as the IPv4 network it maps.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_networks_are_read_and_mapped_ones_unmapped() {
        assert_eq!(
            parse_network("10.20.0.7").unwrap().to_string(),
            "10.20.0.7/32"
        );
        assert_eq!(
            parse_network("10.20.0.0/16").unwrap().to_string(),
            "10.20.0.0/16"
        );
        assert_eq!(parse_network("fd00::/64").unwrap().to_string(), "fd00::/64");
        assert_eq!(
            parse_network("::ffff:10.30.0.0/112").unwrap().to_string(),
            "10.30.0.0/16"
        );
        assert_eq!(
            parse_network("::ffff:10.30.0.9").unwrap().to_string(),
            "10.30.0.9/32"
        );
    }

    #[test]
    fn what_is_wrong_is_named() {
        let e = parse_network("10.20.0.1/16").unwrap_err();
        assert!(
            e.contains(
                "\"10.20.0.1/16\" has bits set past its prefix; the network is 10.20.0.0/16"
            ),
            "{e}"
        );
        let e = parse_network("ten.twenty").unwrap_err();
        assert!(
            e.contains("\"ten.twenty\" is neither an address nor a network"),
            "{e}"
        );
        assert!(parse_network("10.20.0.0/33").is_err());
        assert!(parse_network("").is_err());
    }
}
