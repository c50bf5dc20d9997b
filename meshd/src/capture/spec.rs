//! The capture spec, its validation, and the normal form the ruleset is
//! rendered from (pure: no I/O).
//!
//! Everything that ends up in the nft script passes through [`plan`]: names
//! are checked against a strict identifier grammar, numbers are typed, and
//! addresses are parsed values. Nothing from the spec is ever pasted into the
//! script as text, so a bad value can make `apply` fail but can never add a
//! rule of its own.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::CaptureError;

/// The longest table name accepted (the kernel allows more; nobody needs it).
pub(crate) const MAX_TABLE_NAME_LEN: usize = 64;

/// What meshd captures and excludes on this host; the only input of
/// [`render`](super::render).
///
/// Lists may be in any order and hold duplicates: the ruleset is rendered
/// from a sorted, de-duplicated normal form, so the same content always gives
/// the same script.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CaptureSpec {
    /// Name of the one nftables table meshd owns, in family `inet`
    /// (default `hostmesh`). Letters, digits and `_`, starting with a letter.
    pub table: String,
    /// The firewall mark meshd puts on its own sockets (`SO_MARK`); packets
    /// carrying it are never captured. Must not be 0 (every packet has mark 0).
    pub mark: u32,
    /// meshd's outbound capture listener (15001). It must listen on both
    /// 127.0.0.1 and ::1: `redirect` sends IPv4 to the first, IPv6 to the
    /// second.
    pub outbound_port: u16,
    /// meshd's DNS port (15053) when DNS capture is on: UDP and TCP to port 53
    /// are redirected there (127.0.0.1 and ::1, as above).
    pub dns_port: Option<u16>,
    /// Service VIP ranges (`240.240.0.0/16`, `fd00:240::/96`): TCP to any
    /// address in them is captured. Overlaps are merged; `/0` is refused.
    pub vip_ranges: Vec<IpNet>,
    /// Real address and port of mesh endpoints on other hosts: TCP to exactly
    /// that address and port is captured.
    pub endpoints: Vec<SocketAddr>,
    /// Local target ports of the strict-mTLS services this host serves: new
    /// TCP connections to them that did not come in on `lo` are dropped.
    pub strict_ports: Vec<u16>,
    /// meshd's tunnel port (15008): never dropped, even if listed in
    /// `strict_ports`.
    pub tunnel_port: u16,
    /// TCP destination ports never captured (22, the controller's 15012).
    /// They are never dropped by strict mode either.
    pub exclude_ports: Vec<u16>,
    /// Destination addresses never captured (the controller's).
    pub exclude_addrs: Vec<IpAddr>,
}

impl CaptureSpec {
    /// SHA-256 over the whole spec: what meshd keeps of the installed spec to
    /// tell whether a new one differs, instead of a copy of a list that can
    /// hold 100,000 endpoints.
    pub fn digest(&self) -> [u8; 32] {
        struct Sha(ring::digest::Context);
        impl std::hash::Hasher for Sha {
            fn write(&mut self, bytes: &[u8]) {
                self.0.update(bytes);
            }
            // Never called by `Hash::hash`; the digest is read below.
            fn finish(&self) -> u64 {
                0
            }
        }
        let mut sha = Sha(ring::digest::Context::new(&ring::digest::SHA256));
        std::hash::Hash::hash(self, &mut sha);
        let mut out = [0u8; 32];
        out.copy_from_slice(sha.0.finish().as_ref());
        out
    }
}

/// Why a port listed in `strict_ports` gets no drop rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum NotEnforced {
    /// It is meshd's tunnel port, the one way in for mesh traffic.
    TunnelPort,
    /// It is in `exclude_ports` (SSH, the controller): meshd never touches it.
    Excluded,
}

/// The validated, normalised spec: sorted, de-duplicated, split by family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) table: String,
    pub(crate) mark: u32,
    pub(crate) outbound_port: u16,
    pub(crate) dns_port: Option<u16>,
    pub(crate) tunnel_port: u16,
    pub(crate) exclude_ports: BTreeSet<u16>,
    pub(crate) exclude_v4: BTreeSet<Ipv4Addr>,
    pub(crate) exclude_v6: BTreeSet<Ipv6Addr>,
    pub(crate) vip_v4: Vec<Ipv4Net>,
    pub(crate) vip_v6: Vec<Ipv6Net>,
    /// Sorted and de-duplicated (vectors, not sets: 100,000 endpoints fit
    /// in one allocation).
    pub(crate) endpoints_v4: Vec<(Ipv4Addr, u16)>,
    pub(crate) endpoints_v6: Vec<(Ipv6Addr, u16)>,
    /// Strict ports that get the drop rule.
    pub(crate) strict_ports: BTreeSet<u16>,
    /// Strict ports that do not, and why.
    pub(crate) strict_not_enforced: Vec<(u16, NotEnforced)>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> CaptureError {
    CaptureError::InvalidSpec {
        field,
        reason: reason.into(),
    }
}

/// Checks that `name` is safe to use as an nftables table name.
///
/// nft cannot quote identifiers, so the grammar is strict: an ASCII letter,
/// then letters, digits or `_`. (A name that is an nft keyword, like `table`,
/// passes here and is then refused by nft with a syntax error: harmless.)
pub(crate) fn validate_table_name(name: &str) -> Result<(), CaptureError> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(invalid("table", "the table name is empty"));
    };
    if name.len() > MAX_TABLE_NAME_LEN {
        return Err(invalid(
            "table",
            format!("{name:?} is longer than {MAX_TABLE_NAME_LEN} characters"),
        ));
    }
    if !first.is_ascii_alphabetic() || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            "table",
            format!(
                "{name:?} is not a safe nftables name: use an ASCII letter, then letters, digits or '_'"
            ),
        ));
    }
    Ok(())
}

fn nonzero_port(field: &'static str, port: u16) -> Result<u16, CaptureError> {
    if port == 0 {
        return Err(invalid(field, "port 0 is not a valid port"));
    }
    Ok(port)
}

/// Validates `spec` and brings it into normal form.
pub(crate) fn plan(spec: &CaptureSpec) -> Result<Plan, CaptureError> {
    validate_table_name(&spec.table)?;
    if spec.mark == 0 {
        return Err(invalid(
            "mark",
            "mark 0 is what every unmarked packet carries: exempting it would capture nothing",
        ));
    }
    let outbound_port = nonzero_port("outbound_port", spec.outbound_port)?;
    let tunnel_port = nonzero_port("tunnel_port", spec.tunnel_port)?;
    let dns_port = spec
        .dns_port
        .map(|port| nonzero_port("dns_port", port))
        .transpose()?;
    if outbound_port == tunnel_port {
        return Err(invalid(
            "outbound_port",
            format!("{outbound_port} is also the tunnel_port"),
        ));
    }
    if let Some(dns) = dns_port
        && (dns == outbound_port || dns == tunnel_port)
    {
        return Err(invalid(
            "dns_port",
            format!("{dns} is also the outbound_port or the tunnel_port"),
        ));
    }

    let exclude_ports = spec
        .exclude_ports
        .iter()
        .map(|&port| nonzero_port("exclude_ports", port))
        .collect::<Result<BTreeSet<u16>, _>>()?;

    let mut exclude_v4 = BTreeSet::new();
    let mut exclude_v6 = BTreeSet::new();
    for addr in &spec.exclude_addrs {
        match addr.to_canonical() {
            IpAddr::V4(v4) => exclude_v4.insert(v4),
            IpAddr::V6(v6) => exclude_v6.insert(v6),
        };
    }

    let mut vip_v4 = Vec::new();
    let mut vip_v6 = Vec::new();
    for range in &spec.vip_ranges {
        if range.prefix_len() == 0 {
            return Err(invalid(
                "vip_ranges",
                format!("{range} covers every address; a VIP range must be a real subnet"),
            ));
        }
        match range.trunc() {
            IpNet::V4(net) => vip_v4.push(net),
            IpNet::V6(net) => vip_v6.push(net),
        }
    }
    // Interval sets refuse overlapping elements; merge them first.
    let vip_v4 = Ipv4Net::aggregate(&vip_v4);
    let vip_v6 = Ipv6Net::aggregate(&vip_v6);

    let mut endpoints_v4 = Vec::with_capacity(spec.endpoints.len());
    let mut endpoints_v6 = Vec::new();
    for endpoint in &spec.endpoints {
        if endpoint.port() == 0 {
            return Err(invalid("endpoints", format!("{endpoint} has port 0")));
        }
        match endpoint.ip().to_canonical() {
            ip if ip.is_unspecified() => {
                return Err(invalid(
                    "endpoints",
                    format!("{endpoint} has the unspecified address"),
                ));
            }
            IpAddr::V4(v4) => endpoints_v4.push((v4, endpoint.port())),
            IpAddr::V6(v6) => endpoints_v6.push((v6, endpoint.port())),
        };
    }
    endpoints_v4.sort_unstable();
    endpoints_v4.dedup();
    endpoints_v6.sort_unstable();
    endpoints_v6.dedup();

    let mut strict_ports = BTreeSet::new();
    let mut not_enforced = BTreeSet::new();
    for &port in &spec.strict_ports {
        let port = nonzero_port("strict_ports", port)?;
        if port == tunnel_port {
            not_enforced.insert((port, NotEnforced::TunnelPort));
        } else if exclude_ports.contains(&port) {
            not_enforced.insert((port, NotEnforced::Excluded));
        } else {
            strict_ports.insert(port);
        }
    }

    Ok(Plan {
        table: spec.table.clone(),
        mark: spec.mark,
        outbound_port,
        dns_port,
        tunnel_port,
        exclude_ports,
        exclude_v4,
        exclude_v6,
        vip_v4,
        vip_v6,
        endpoints_v4,
        endpoints_v6,
        strict_ports,
        strict_not_enforced: not_enforced.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CaptureSpec {
        CaptureSpec {
            table: "hostmesh".into(),
            mark: 0x539,
            outbound_port: 15001,
            dns_port: Some(15053),
            vip_ranges: vec!["240.240.0.0/16".parse().unwrap()],
            endpoints: vec![],
            strict_ports: vec![],
            tunnel_port: 15008,
            exclude_ports: vec![22, 15012],
            exclude_addrs: vec![],
        }
    }

    fn field_of(result: Result<Plan, CaptureError>) -> &'static str {
        match result {
            Err(CaptureError::InvalidSpec { field, .. }) => field,
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn the_digest_changes_with_any_field_and_only_then() {
        assert_eq!(base().digest(), base().digest());
        let mut changed = Vec::new();
        let mut s = base();
        s.endpoints.push("10.0.0.2:8080".parse().unwrap());
        changed.push(s.clone());
        s.endpoints[0].set_port(8081);
        changed.push(s);
        let mut s = base();
        s.dns_port = None;
        changed.push(s);
        let mut s = base();
        s.strict_ports = vec![8080];
        changed.push(s);
        // A value moved from one list to the next must not hash the same.
        let mut s = base();
        s.exclude_ports = vec![22];
        s.exclude_addrs = vec![];
        s.strict_ports = vec![15012];
        changed.push(s);
        let mut digests: Vec<[u8; 32]> = changed.iter().map(CaptureSpec::digest).collect();
        digests.push(base().digest());
        let unique: BTreeSet<[u8; 32]> = digests.iter().copied().collect();
        assert_eq!(unique.len(), digests.len());
    }

    #[test]
    fn a_valid_spec_plans() {
        let plan = plan(&base()).unwrap();
        assert_eq!(plan.table, "hostmesh");
        assert_eq!(plan.exclude_ports, BTreeSet::from([22, 15012]));
        assert_eq!(
            plan.vip_v4,
            vec!["240.240.0.0/16".parse::<Ipv4Net>().unwrap()]
        );
    }

    #[test]
    fn unsafe_table_names_are_refused() {
        for name in [
            "",
            "1abc",
            "_x",
            "host mesh",
            "hostmesh{",
            "a\"b",
            "a;b",
            "a\nadd table ip x",
            "ho-stmesh",
            "hö",
            "a.b",
            "a/b",
            &"x".repeat(MAX_TABLE_NAME_LEN + 1),
        ] {
            let spec = CaptureSpec {
                table: name.into(),
                ..base()
            };
            assert_eq!(field_of(plan(&spec)), "table", "name {name:?}");
        }
        for name in ["hostmesh", "HM_2", "a", &"x".repeat(MAX_TABLE_NAME_LEN)] {
            validate_table_name(name).unwrap();
        }
    }

    #[test]
    fn mark_zero_is_refused_because_it_would_exempt_everything() {
        let spec = CaptureSpec { mark: 0, ..base() };
        assert_eq!(field_of(plan(&spec)), "mark");
    }

    #[test]
    fn zero_ports_are_refused_and_name_their_field() {
        let cases: Vec<(&str, CaptureSpec)> = vec![
            (
                "outbound_port",
                CaptureSpec {
                    outbound_port: 0,
                    ..base()
                },
            ),
            (
                "tunnel_port",
                CaptureSpec {
                    tunnel_port: 0,
                    ..base()
                },
            ),
            (
                "dns_port",
                CaptureSpec {
                    dns_port: Some(0),
                    ..base()
                },
            ),
            (
                "exclude_ports",
                CaptureSpec {
                    exclude_ports: vec![22, 0],
                    ..base()
                },
            ),
            (
                "strict_ports",
                CaptureSpec {
                    strict_ports: vec![0],
                    ..base()
                },
            ),
            (
                "endpoints",
                CaptureSpec {
                    endpoints: vec!["10.0.0.1:0".parse().unwrap()],
                    ..base()
                },
            ),
        ];
        for (field, spec) in cases {
            assert_eq!(field_of(plan(&spec)), field);
        }
    }

    #[test]
    fn meshd_ports_must_differ() {
        let spec = CaptureSpec {
            outbound_port: 15008,
            ..base()
        };
        assert_eq!(field_of(plan(&spec)), "outbound_port");
        let spec = CaptureSpec {
            dns_port: Some(15001),
            ..base()
        };
        assert_eq!(field_of(plan(&spec)), "dns_port");
    }

    #[test]
    fn a_vip_range_covering_everything_is_refused() {
        for range in ["0.0.0.0/0", "::/0"] {
            let spec = CaptureSpec {
                vip_ranges: vec![range.parse().unwrap()],
                ..base()
            };
            assert_eq!(field_of(plan(&spec)), "vip_ranges");
        }
    }

    #[test]
    fn unspecified_endpoint_addresses_are_refused() {
        for endpoint in ["0.0.0.0:80", "[::]:80", "[::ffff:0.0.0.0]:80"] {
            let spec = CaptureSpec {
                endpoints: vec![endpoint.parse().unwrap()],
                ..base()
            };
            assert_eq!(field_of(plan(&spec)), "endpoints", "{endpoint}");
        }
    }

    #[test]
    fn vip_ranges_are_truncated_and_merged() {
        let spec = CaptureSpec {
            vip_ranges: vec![
                "240.240.7.9/16".parse().unwrap(),
                "240.240.1.0/24".parse().unwrap(),
                "240.241.0.0/16".parse().unwrap(),
                "fd00:240::1/96".parse().unwrap(),
            ],
            ..base()
        };
        let plan = plan(&spec).unwrap();
        assert_eq!(
            plan.vip_v4,
            vec!["240.240.0.0/15".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(
            plan.vip_v6,
            vec!["fd00:240::/96".parse::<Ipv6Net>().unwrap()]
        );
    }

    #[test]
    fn ipv4_mapped_addresses_go_to_the_ipv4_sets() {
        let spec = CaptureSpec {
            endpoints: vec!["[::ffff:10.0.0.7]:8080".parse().unwrap()],
            exclude_addrs: vec!["::ffff:10.0.0.1".parse().unwrap()],
            ..base()
        };
        let plan = plan(&spec).unwrap();
        assert_eq!(plan.endpoints_v4, vec![(Ipv4Addr::new(10, 0, 0, 7), 8080)]);
        assert!(plan.endpoints_v6.is_empty());
        assert_eq!(
            plan.exclude_v4,
            BTreeSet::from([Ipv4Addr::new(10, 0, 0, 1)])
        );
        assert!(plan.exclude_v6.is_empty());
    }

    #[test]
    fn lists_are_sorted_and_deduplicated() {
        let spec = CaptureSpec {
            endpoints: vec![
                "10.0.0.9:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
                "10.0.0.9:80".parse().unwrap(),
            ],
            strict_ports: vec![9090, 8080, 9090],
            exclude_ports: vec![15012, 22, 22],
            ..base()
        };
        let plan = plan(&spec).unwrap();
        assert_eq!(
            plan.endpoints_v4,
            vec![
                (Ipv4Addr::new(10, 0, 0, 2), 80),
                (Ipv4Addr::new(10, 0, 0, 9), 80)
            ]
        );
        assert_eq!(plan.strict_ports, BTreeSet::from([8080, 9090]));
        assert_eq!(plan.exclude_ports, BTreeSet::from([22, 15012]));
    }

    #[test]
    fn the_tunnel_port_and_excluded_ports_are_never_dropped_in_strict_mode() {
        let spec = CaptureSpec {
            strict_ports: vec![8080, 15008, 22],
            ..base()
        };
        let plan = plan(&spec).unwrap();
        assert_eq!(plan.strict_ports, BTreeSet::from([8080]));
        assert_eq!(
            plan.strict_not_enforced,
            vec![
                (22, NotEnforced::Excluded),
                (15008, NotEnforced::TunnelPort)
            ]
        );
    }
}
