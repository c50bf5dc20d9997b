//! Mesh names: the table meshd is given, and the pure lookup that decides
//! what a question about a name gets.
//!
//! [`NameTable`] is what the rest of meshd hands over on each config
//! change. [`MeshIndex`] is the same data prepared for lookups (lower-cased
//! keys, the domain split into labels, the set of namespaces); building it
//! is a pure function of the table, and so is [`MeshIndex::lookup`], which
//! the tests exercise without sockets.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, rdata::SOA};

/// The mesh domain used while no table names one.
pub(crate) const DEFAULT_DOMAIN: &str = "mesh";

/// What meshd knows about mesh names; replaced as a whole on each config change.
#[derive(Clone, Debug, Default)]
pub struct NameTable {
    /// false until the first mesh config has loaded.
    pub loaded: bool,
    /// The mesh domain, "mesh".
    pub domain: String,
    /// The host's own namespace, for one-label names.
    pub own_namespace: String,
    /// (service, namespace) -> VIPs (IPv4 and/or IPv6).
    pub services: HashMap<(String, String), Vec<IpAddr>>,
}

/// What a question gets, as far as mesh names are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MeshLookup {
    /// Not a mesh name: forward it upstream.
    Forward,
    /// A name under the mesh domain, but no config has loaded yet: SERVFAIL.
    NotLoaded,
    /// A question under the mesh domain we do not serve (a class other than
    /// IN, a zone transfer): REFUSED.
    Refused,
    /// NOERROR with these addresses (never empty, already filtered by type).
    Addresses(Vec<IpAddr>),
    /// NOERROR with the zone's SOA as the answer (SOA or ANY at the apex).
    ApexSoa,
    /// The name exists but has no record of this type: NOERROR, SOA in authority.
    NoData,
    /// No such name under the mesh domain: NXDOMAIN, SOA in authority.
    NxDomain,
}

/// A [`NameTable`] prepared for lookups.
#[derive(Debug)]
pub(crate) struct MeshIndex {
    loaded: bool,
    /// Lower-cased labels of the domain, e.g. `[b"mesh"]`.
    domain_labels: Vec<Vec<u8>>,
    /// The domain as a fully qualified name, owner of the SOA.
    domain_name: Name,
    own_namespace: String,
    /// (service, namespace), lower-cased -> VIPs without duplicates.
    services: HashMap<(String, String), Vec<IpAddr>>,
    namespaces: HashSet<String>,
}

impl MeshIndex {
    pub(crate) fn new(table: &NameTable) -> MeshIndex {
        let parsed = parse_domain(&table.domain);
        if parsed.is_none() && !table.domain.is_empty() {
            tracing::warn!(
                domain = %table.domain,
                "mesh domain is not a valid DNS name; using {DEFAULT_DOMAIN:?}"
            );
        }
        let (domain_labels, domain_name) = parsed
            .or_else(|| parse_domain(DEFAULT_DOMAIN))
            // Parsing the constant cannot fail; the root keeps this total.
            .unwrap_or_else(|| (Vec::new(), Name::root()));
        let mut services: HashMap<(String, String), Vec<IpAddr>> = HashMap::new();
        let mut namespaces = HashSet::new();
        for ((service, namespace), vips) in &table.services {
            let key = (service.to_ascii_lowercase(), namespace.to_ascii_lowercase());
            namespaces.insert(key.1.clone());
            let entry = services.entry(key).or_default();
            for vip in vips {
                if !entry.contains(vip) {
                    entry.push(*vip);
                }
            }
        }
        MeshIndex {
            loaded: table.loaded,
            domain_labels,
            domain_name,
            own_namespace: table.own_namespace.to_ascii_lowercase(),
            services,
            namespaces,
        }
    }

    /// Decides what a question for `qname` of `qtype`/`qclass` gets.
    /// Case-insensitive; a name with or without the trailing dot is the same.
    pub(crate) fn lookup(&self, qname: &Name, qtype: RecordType, qclass: DNSClass) -> MeshLookup {
        let labels: Vec<Vec<u8>> = qname.iter().map(|l| l.to_ascii_lowercase()).collect();
        let zone_len = self.domain_labels.len();
        // An empty domain (never built, but cheap to rule out) would capture every name.
        let in_zone = zone_len > 0
            && labels.len() >= zone_len
            && labels[labels.len() - zone_len..] == self.domain_labels[..];

        if in_zone {
            if !self.loaded {
                return MeshLookup::NotLoaded;
            }
            if qclass != DNSClass::IN || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
                return MeshLookup::Refused;
            }
            return match &labels[..labels.len() - zone_len] {
                [] => match qtype {
                    RecordType::SOA | RecordType::ANY => MeshLookup::ApexSoa,
                    _ => MeshLookup::NoData,
                },
                // `<ns>.mesh` exists (names below it do) but holds no records.
                [namespace] if self.has_namespace(namespace) => MeshLookup::NoData,
                [service, namespace] => match self.service(service, namespace) {
                    Some(vips) => addresses(vips, qtype),
                    None => MeshLookup::NxDomain,
                },
                _ => MeshLookup::NxDomain,
            };
        }

        // Relative names: answered only for services that exist, so
        // everything else (search-list attempts, real two-label domains)
        // still reaches the upstream resolvers.
        if !self.loaded || qclass != DNSClass::IN {
            return MeshLookup::Forward;
        }
        let found = match labels.as_slice() {
            [service] => self.service(service, self.own_namespace.as_bytes()),
            [service, namespace] if self.has_namespace(namespace) => {
                self.service(service, namespace)
            }
            _ => None,
        };
        match found {
            Some(_) if matches!(qtype, RecordType::AXFR | RecordType::IXFR) => MeshLookup::Refused,
            Some(vips) => addresses(vips, qtype),
            None => MeshLookup::Forward,
        }
    }

    /// The zone's SOA record; its TTL and minimum are both `ttl`, so negative
    /// answers are cached for `ttl` (RFC 2308: the lower of the two).
    pub(crate) fn soa(&self, ttl: u32) -> Record {
        let mname = self
            .domain_name
            .prepend_label("meshd")
            .unwrap_or_else(|_| self.domain_name.clone());
        let rname = self
            .domain_name
            .prepend_label("hostmaster")
            .unwrap_or_else(|_| self.domain_name.clone());
        let soa = SOA::new(mname, rname, 1, 3600, 600, 86400, ttl);
        Record::from_rdata(self.domain_name.clone(), ttl, RData::SOA(soa))
    }

    fn has_namespace(&self, namespace: &[u8]) -> bool {
        std::str::from_utf8(namespace).is_ok_and(|ns| self.namespaces.contains(ns))
    }

    fn service(&self, service: &[u8], namespace: &[u8]) -> Option<&[IpAddr]> {
        let service = std::str::from_utf8(service).ok()?;
        let namespace = std::str::from_utf8(namespace).ok()?;
        self.services
            .get(&(service.to_owned(), namespace.to_owned()))
            .map(Vec::as_slice)
    }
}

/// The records of `vips` that answer `qtype`.
fn addresses(vips: &[IpAddr], qtype: RecordType) -> MeshLookup {
    let matching: Vec<IpAddr> = vips
        .iter()
        .copied()
        .filter(|ip| match qtype {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            RecordType::ANY => true,
            _ => false,
        })
        .collect();
    if matching.is_empty() {
        MeshLookup::NoData
    } else {
        MeshLookup::Addresses(matching)
    }
}

/// "Mesh." / "mesh" / ".mesh." -> lower-cased labels and the FQDN.
fn parse_domain(domain: &str) -> Option<(Vec<Vec<u8>>, Name)> {
    let trimmed = domain.trim().trim_matches('.').to_ascii_lowercase();
    if trimmed.is_empty() || trimmed.split('.').any(str::is_empty) {
        return None;
    }
    let name = Name::from_ascii(format!("{trimmed}.")).ok()?;
    let labels = name.iter().map(|l| l.to_ascii_lowercase()).collect();
    Some((labels, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn table() -> NameTable {
        let mut services = HashMap::new();
        services.insert(
            ("web".to_owned(), "shop".to_owned()),
            vec!["240.240.0.10".parse().unwrap()],
        );
        services.insert(
            ("api".to_owned(), "shop".to_owned()),
            vec![
                "240.240.0.11".parse().unwrap(),
                "fd00:240::11".parse().unwrap(),
            ],
        );
        services.insert(
            ("db".to_owned(), "Ops".to_owned()),
            vec!["240.240.0.12".parse().unwrap()],
        );
        NameTable {
            loaded: true,
            domain: "mesh".to_owned(),
            own_namespace: "shop".to_owned(),
            services,
        }
    }

    fn lookup(t: &NameTable, qname: &str, qtype: RecordType) -> MeshLookup {
        MeshIndex::new(t).lookup(&name(qname), qtype, DNSClass::IN)
    }

    fn v4(s: &str) -> MeshLookup {
        MeshLookup::Addresses(vec![IpAddr::from_str(s).unwrap()])
    }

    #[test]
    fn full_name_answers_a_record() {
        assert_eq!(
            lookup(&table(), "web.shop.mesh.", RecordType::A),
            v4("240.240.0.10")
        );
    }

    #[test]
    fn names_are_case_insensitive_with_or_without_trailing_dot() {
        let t = table();
        assert_eq!(
            lookup(&t, "WEB.Shop.MESH.", RecordType::A),
            v4("240.240.0.10")
        );
        assert_eq!(
            lookup(&t, "web.shop.mesh", RecordType::A),
            v4("240.240.0.10")
        );
        // Namespace spelled with capitals in the table.
        assert_eq!(
            lookup(&t, "db.ops.mesh.", RecordType::A),
            v4("240.240.0.12")
        );
    }

    #[test]
    fn one_label_name_resolves_in_own_namespace() {
        let t = table();
        assert_eq!(lookup(&t, "web.", RecordType::A), v4("240.240.0.10"));
        assert_eq!(lookup(&t, "Web", RecordType::A), v4("240.240.0.10"));
        // db lives in another namespace: not ours to answer.
        assert_eq!(lookup(&t, "db.", RecordType::A), MeshLookup::Forward);
        assert_eq!(lookup(&t, "localhost.", RecordType::A), MeshLookup::Forward);
    }

    #[test]
    fn two_label_name_resolves_only_in_known_namespaces() {
        let t = table();
        assert_eq!(lookup(&t, "db.ops.", RecordType::A), v4("240.240.0.12"));
        assert_eq!(lookup(&t, "web.shop", RecordType::A), v4("240.240.0.10"));
        // Known namespace but no such service, and an unknown namespace:
        // both are left to the upstream resolvers.
        assert_eq!(
            lookup(&t, "nothere.shop.", RecordType::A),
            MeshLookup::Forward
        );
        assert_eq!(
            lookup(&t, "example.com.", RecordType::A),
            MeshLookup::Forward
        );
        // Three labels outside the domain are never mesh names.
        assert_eq!(
            lookup(&t, "web.shop.example.", RecordType::A),
            MeshLookup::Forward
        );
    }

    #[test]
    fn unknown_names_under_the_domain_are_nxdomain() {
        let t = table();
        assert_eq!(
            lookup(&t, "nope.shop.mesh.", RecordType::A),
            MeshLookup::NxDomain
        );
        assert_eq!(
            lookup(&t, "web.nope.mesh.", RecordType::A),
            MeshLookup::NxDomain
        );
        assert_eq!(
            lookup(&t, "a.web.shop.mesh.", RecordType::A),
            MeshLookup::NxDomain
        );
        assert_eq!(
            lookup(&t, "nope.mesh.", RecordType::A),
            MeshLookup::NxDomain
        );
    }

    #[test]
    fn missing_record_type_is_nodata() {
        let t = table();
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::AAAA),
            MeshLookup::NoData
        );
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::MX),
            MeshLookup::NoData
        );
        assert_eq!(lookup(&t, "web.", RecordType::AAAA), MeshLookup::NoData);
        // Namespace node and apex exist but hold no addresses.
        assert_eq!(lookup(&t, "shop.mesh.", RecordType::A), MeshLookup::NoData);
        assert_eq!(lookup(&t, "mesh.", RecordType::A), MeshLookup::NoData);
        assert_eq!(lookup(&t, "mesh.", RecordType::SOA), MeshLookup::ApexSoa);
    }

    #[test]
    fn dual_stack_service_answers_both_families() {
        let t = table();
        assert_eq!(
            lookup(&t, "api.shop.mesh.", RecordType::AAAA),
            MeshLookup::Addresses(vec!["fd00:240::11".parse().unwrap()])
        );
        assert_eq!(
            lookup(&t, "api.shop.mesh.", RecordType::ANY),
            MeshLookup::Addresses(vec![
                "240.240.0.11".parse().unwrap(),
                "fd00:240::11".parse().unwrap()
            ])
        );
    }

    #[test]
    fn not_loaded_is_servfail_under_domain_and_forward_elsewhere() {
        let t = NameTable::default();
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::A),
            MeshLookup::NotLoaded
        );
        assert_eq!(
            lookup(&t, "anything.mesh.", RecordType::AAAA),
            MeshLookup::NotLoaded
        );
        assert_eq!(lookup(&t, "web.", RecordType::A), MeshLookup::Forward);
        assert_eq!(
            lookup(&t, "example.com.", RecordType::A),
            MeshLookup::Forward
        );
        let mut not_yet = table();
        not_yet.loaded = false;
        assert_eq!(
            lookup(&not_yet, "web.shop.mesh.", RecordType::A),
            MeshLookup::NotLoaded
        );
        assert_eq!(lookup(&not_yet, "web.", RecordType::A), MeshLookup::Forward);
    }

    #[test]
    fn other_classes_and_zone_transfers_are_refused_under_the_domain() {
        let index = MeshIndex::new(&table());
        assert_eq!(
            index.lookup(&name("web.shop.mesh."), RecordType::A, DNSClass::CH),
            MeshLookup::Refused
        );
        assert_eq!(
            index.lookup(&name("mesh."), RecordType::AXFR, DNSClass::IN),
            MeshLookup::Refused
        );
        assert_eq!(
            index.lookup(&name("version.bind."), RecordType::TXT, DNSClass::CH),
            MeshLookup::Forward
        );
    }

    #[test]
    fn custom_and_odd_domains() {
        let mut t = table();
        t.domain = ".Mesh.Internal.".to_owned();
        assert_eq!(
            lookup(&t, "web.shop.mesh.internal.", RecordType::A),
            v4("240.240.0.10")
        );
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::A),
            MeshLookup::Forward
        );
        // An empty or invalid domain falls back to "mesh".
        t.domain = String::new();
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::A),
            v4("240.240.0.10")
        );
        t.domain = "a..b".to_owned();
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::A),
            v4("240.240.0.10")
        );
    }

    #[test]
    fn root_and_non_utf8_labels_are_handled() {
        let t = table();
        assert_eq!(lookup(&t, ".", RecordType::NS), MeshLookup::Forward);
        let odd = Name::from_labels(vec![&b"\xff\xfe"[..], b"shop", b"mesh"]).unwrap();
        assert_eq!(
            MeshIndex::new(&t).lookup(&odd, RecordType::A, DNSClass::IN),
            MeshLookup::NxDomain
        );
    }

    #[test]
    fn duplicate_vips_are_answered_once() {
        let mut t = table();
        t.services.insert(
            ("web".to_owned(), "SHOP".to_owned()),
            vec!["240.240.0.10".parse().unwrap()],
        );
        assert_eq!(
            lookup(&t, "web.shop.mesh.", RecordType::A),
            v4("240.240.0.10")
        );
    }

    #[test]
    fn soa_carries_the_negative_ttl() {
        let soa = MeshIndex::new(&table()).soa(30);
        assert_eq!(soa.name, name("mesh."));
        assert_eq!(soa.ttl, 30);
        match &soa.data {
            RData::SOA(s) => assert_eq!(s.minimum, 30),
            other => panic!("not an SOA: {other:?}"),
        }
    }
}
