//! Reading the host's resolvers from `/etc/resolv.conf`.
//!
//! A small parser of our own (the `resolv-conf` crate would be one more
//! dependency for ten lines): only `nameserver` lines matter to a
//! forwarder; `search`, `options`, `domain` and comments are ignored. Like
//! glibc and musl, at most the first three nameservers are used. Anything
//! but a plain IPv4 or IPv6 literal (e.g. the `127.1` shorthand) is skipped
//! with a warning. Link-local IPv6 nameservers may carry a zone
//! (`fe80::1%eth0` or `fe80::1%2`).

use std::{
    io::Read,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    path::Path,
};

use super::DnsError;

/// glibc's MAXNS: nameservers past the third are ignored by the C library.
const MAX_NAMESERVERS: usize = 3;
/// resolv.conf is a few lines; anything larger is not a resolv.conf.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The nameservers of a resolv.conf file, port 53, in file order. An empty
/// list means the file names none (the caller decides what that means; the
/// DNS server answers SERVFAIL for non-mesh names).
pub fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let error = |source| DnsError::ReadResolvConf {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(error)?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(parse_resolv_conf(&text, interface_index))
}

/// Parses resolv.conf text; `scope_index` maps an interface name to its
/// index for `fe80::1%eth0`.
pub(crate) fn parse_resolv_conf(
    text: &str,
    scope_index: impl Fn(&str) -> Option<u32>,
) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        // Comments start with '#' or ';' (glibc only honours them at the
        // start of a line, but neither can appear in an address).
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(address) = words.next() else {
            tracing::warn!(
                line = number + 1,
                "resolv.conf: nameserver line without an address, ignored"
            );
            continue;
        };
        match parse_nameserver(address, &scope_index) {
            Some(server) if servers.contains(&server) => {}
            Some(server) if servers.len() >= MAX_NAMESERVERS => {
                tracing::warn!(
                    line = number + 1,
                    %server,
                    "resolv.conf: more than {MAX_NAMESERVERS} nameservers; \
                     ignored, as the C library does"
                );
            }
            Some(server) => servers.push(server),
            None => tracing::warn!(
                line = number + 1,
                address,
                "resolv.conf: not an IP address, ignored"
            ),
        }
    }
    servers
}

fn parse_nameserver(
    address: &str,
    scope_index: &impl Fn(&str) -> Option<u32>,
) -> Option<SocketAddr> {
    match address.split_once('%') {
        None => address
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53)),
        Some((ip, zone)) => {
            let ip: Ipv6Addr = ip.parse().ok()?;
            let scope = match zone.parse::<u32>() {
                Ok(index) => index,
                Err(_) => scope_index(zone)?,
            };
            Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope)))
        }
    }
}

/// An interface's index from sysfs (if_nametoindex without libc's unsafe).
fn interface_index(name: &str) -> Option<u32> {
    let valid = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    if !valid {
        return None;
    }
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<SocketAddr> {
        parse_resolv_conf(text, |name| (name == "eth0").then_some(2))
    }

    #[test]
    fn nameserver_lines_ipv4_and_ipv6_in_order() {
        let text = "# generated\nsearch example.com corp\nnameserver 10.0.0.2\noptions ndots:2 timeout:1\n\
                    nameserver 2001:db8::53\n";
        assert_eq!(
            parse(text),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn comments_blank_lines_and_whitespace_are_ignored() {
        let text = "\n   \n; nameserver 1.1.1.1\n# nameserver 8.8.8.8\n\tnameserver\t192.0.2.1  # trailing\n\
                    nameserver 192.0.2.2;x\n";
        assert_eq!(
            parse(text),
            vec![
                "192.0.2.1:53".parse().unwrap(),
                "192.0.2.2:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn invalid_duplicate_and_extra_nameservers_are_skipped() {
        let text = "nameserver\nnameserver not-an-ip\nnameserver 127.1\nnameserver 192.0.2.1\n\
                    nameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\nnameserver 192.0.2.4\n\
                    nameservers 192.0.2.9\n";
        assert_eq!(
            parse(text),
            vec![
                "192.0.2.1:53".parse().unwrap(),
                "192.0.2.2:53".parse().unwrap(),
                "192.0.2.3:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn link_local_nameservers_keep_their_zone() {
        let servers =
            parse("nameserver fe80::1%eth0\nnameserver fe80::2%7\nnameserver fe80::3%nope\n");
        assert_eq!(
            servers,
            vec![
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 2)),
                SocketAddr::V6(SocketAddrV6::new("fe80::2".parse().unwrap(), 53, 0, 7)),
            ]
        );
    }

    #[test]
    fn no_nameserver_gives_an_empty_list() {
        assert!(parse("search example.com\noptions edns0\n").is_empty());
        assert!(parse("").is_empty());
    }

    #[test]
    fn reading_a_file_and_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.53\n").unwrap();
        assert_eq!(
            read_resolv_conf(&path).unwrap(),
            vec!["192.0.2.53:53".parse().unwrap()]
        );

        let missing = dir.path().join("missing.conf");
        let err = read_resolv_conf(&missing).unwrap_err().to_string();
        assert!(err.starts_with("reading upstream resolvers from "), "{err}");
        assert!(err.contains("missing.conf"), "{err}");
    }

    #[test]
    fn interface_names_cannot_escape_sysfs() {
        assert_eq!(interface_index("../../etc"), None);
        assert_eq!(interface_index(".."), None);
        assert_eq!(interface_index(""), None);
        assert!(interface_index("lo").is_some_and(|i| i > 0));
    }
}
