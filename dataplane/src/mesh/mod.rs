//! What meshd knows of the mesh, built from a [`Snapshot`] and checked
//! before use: services with their VIPs, ports and endpoints, indexed the
//! ways the data plane looks them up (by VIP, by an endpoint's real
//! address), the services this host serves, routes, policies and the trust
//! bundle.
//!
//! [`MeshState::build`] is where a bad update is caught. Besides structure
//! (addresses, ports, identities, resources that parse and validate) it
//! checks what only this host can know: a service it serves must not use
//! one of meshd's own ports here. A failed build rejects the update (a
//! NACK with the reason); the last good state keeps serving.

pub mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hostmesh_api::document::resource_from_json;
use hostmesh_api::network::{MAX_PEER_TRANSPORT_RULES, MAX_RULE_NETWORKS};
use hostmesh_api::proto::{
    ConfigEntry, EndpointConfig, EntryKind, SelfConfig, ServiceConfig,
    TrustBundle as TrustBundleMsg,
};
use hostmesh_api::resource::validate::{is_dns_label, validate};
use hostmesh_api::resource::{MtlsMode, Policy, Protocol, Resource, Route};
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::TrustBundle;
use ipnet::IpNet;
use prost::Message;

pub use snapshot::Snapshot;

/// This host, as the controller describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfInfo {
    pub host_id: String,
    pub namespace: String,
    pub group: String,
    pub spiffe_id: SpiffeId,
    pub labels: BTreeMap<String, String>,
    /// (namespace, name) of the services this host serves.
    pub services: Vec<(String, String)>,
    pub trust_domain: String,
    pub vip_ranges: Vec<IpNet>,
    pub health_checks: Vec<HealthCheck>,
    /// The mesh's tunnel transport, when it sets one.
    pub transport: Option<crate::tunnel::Transport>,
    /// The mesh's per-peer transports for this host: from the rules whose
    /// `hosts` hold [`HostLimits::address`] (or that name no hosts).
    pub peer_transport: Arc<crate::tunnel::PeerTransports>,
}

/// How to check one local port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    /// None: a TCP connect; Some(path): an HTTP GET answered 2xx or 3xx.
    pub http_path: Option<String>,
    pub interval: Option<std::time::Duration>,
    pub timeout: Option<std::time::Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    pub name: String,
    pub port: u16,
    pub target: u16,
    pub protocol: Protocol,
}

/// One endpoint, kept small: a mesh of 100,000 endpoints holds 100,000 of
/// these (72 bytes each with the `Arc` counts, and no other allocation but
/// the host id). What endpoints share is held once in their
/// [`EndpointGroup`], and which ports are healthy is a bitmask over the
/// service's target ports.
#[derive(Debug, PartialEq, Eq)]
pub struct EndpointState {
    pub host_id: Box<str>,
    pub address: IpAddr,
    pub tunnel_port: u16,
    pub quic: bool,
    pub group: Arc<EndpointGroup>,
    /// Bit i: `group.targets[i]` answered its health check on this host.
    pub healthy: u64,
}

/// What the endpoints of one service with one identity and one label set
/// have in common.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct EndpointGroup {
    pub identity: Arc<SpiffeId>,
    pub labels: Labels,
    /// The service's target ports.
    pub targets: Arc<[u16]>,
}

impl EndpointState {
    pub fn tunnel_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.tunnel_port)
    }

    pub fn identity(&self) -> &Arc<SpiffeId> {
        &self.group.identity
    }

    pub fn labels(&self) -> &Labels {
        &self.group.labels
    }

    pub fn is_healthy(&self, target: u16) -> bool {
        self.group
            .targets
            .iter()
            .position(|t| *t == target)
            .is_some_and(|i| self.healthy >> i & 1 == 1)
    }

    pub fn healthy_ports(&self) -> Vec<u16> {
        self.group
            .targets
            .iter()
            .enumerate()
            .filter(|(i, _)| self.healthy >> i & 1 == 1)
            .map(|(_, t)| *t)
            .collect()
    }
}

/// An endpoint's labels: sorted by key, one allocation for the pairs, shared
/// by every endpoint with the same set (a `BTreeMap` would spend a 544-byte
/// node on the usual two or three labels).
pub type Labels = Arc<[(Box<str>, Box<str>)]>;

/// The labels as a JSON object (for `/config`).
pub fn labels_json(labels: &Labels) -> serde_json::Map<String, serde_json::Value> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// The config entry's hash: an unchanged entry reuses this state.
    pub hash: String,
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortState>,
    pub mtls: MtlsMode,
    pub endpoints: Vec<Arc<EndpointState>>,
}

impl ServiceState {
    pub fn port(&self, port: u16) -> Option<&PortState> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn port_by_target(&self, target: u16) -> Option<&PortState> {
        self.ports.iter().find(|p| p.target == target)
    }

    pub fn fqdn(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// Where a captured connection goes.
#[derive(Clone, Debug)]
pub struct Destination {
    pub service: Arc<ServiceState>,
    /// The service port (as clients of the VIP see it).
    pub port: u16,
    /// Set when the connection was addressed to this endpoint directly.
    pub endpoint: Option<Arc<EndpointState>>,
}

/// A local port of a service this host serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedPort {
    pub services: Vec<(String, String)>,
    /// Strict when any of its services is.
    pub mtls: MtlsMode,
}

/// What only this host knows, for the checks in [`MeshState::build`].
#[derive(Clone, Debug, Default)]
pub struct HostLimits {
    pub host_id: String,
    pub trust_domain: String,
    /// meshd's own ports on this host.
    pub own_ports: Vec<u16>,
    /// The tunnel address this host reports to the controller: which of
    /// the mesh's per-pair transport rules name it.
    pub address: Option<IpAddr>,
}

#[derive(Debug, Default)]
pub struct MeshState {
    pub version: u64,
    pub me: Option<SelfInfo>,
    pub services: BTreeMap<(String, String), Arc<ServiceState>>,
    pub by_vip: HashMap<IpAddr, Arc<ServiceState>>,
    /// An endpoint's real address and target port -> its service (and the
    /// service port clients would use).
    pub by_endpoint: HashMap<SocketAddr, (Arc<ServiceState>, u16)>,
    pub served: HashMap<u16, ServedPort>,
    pub routes: Vec<Arc<Route>>,
    pub policies: Vec<Arc<Policy>>,
    pub bundle: Option<TrustBundle>,
    pub bundle_pem: String,
}

fn port16(v: u32, what: &str) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{what}: {v} is not a port number")),
    }
}

impl MeshState {
    /// Checks a snapshot and builds the state it describes. Services whose
    /// entries have not changed since `previous` are reused as they are,
    /// so an update decodes only what it changed.
    pub fn build(
        snapshot: &Snapshot,
        limits: &HostLimits,
        previous: Option<&MeshState>,
    ) -> Result<MeshState, String> {
        let mut state = MeshState {
            version: snapshot.version,
            ..MeshState::default()
        };
        let mut trust_domain = limits.trust_domain.clone();
        // `self` first: the rest is checked against it.
        if let Some(e) = snapshot.entries.get("self") {
            if e.kind != EntryKind::SelfConfig as i32 {
                return Err("entry \"self\" is not a host description".to_string());
            }
            let s = SelfConfig::decode(e.body.clone()).map_err(|err| format!("self: {err}"))?;
            let me = self_info(&s, limits)?;
            trust_domain = me.trust_domain.clone();
            state.me = Some(me);
        }
        let mut interner = Interner::default();
        for (name, entry) in &snapshot.entries {
            let kind = EntryKind::try_from(entry.kind)
                .map_err(|_| format!("entry {name:?} has an unknown kind"))?;
            match kind {
                EntryKind::Service => {
                    let reused = previous.and_then(|p| {
                        let (ns, svc) = name.strip_prefix("service/")?.split_once('/')?;
                        p.services
                            .get(&(ns.to_string(), svc.to_string()))
                            .filter(|s| s.hash == entry.hash)
                            .cloned()
                    });
                    let svc = match reused {
                        Some(s) => s,
                        None => Arc::new(
                            decode_service(entry, &trust_domain, &mut interner)
                                .map_err(|e| format!("{name}: {e}"))?,
                        ),
                    };
                    if format!("service/{}/{}", svc.namespace, svc.name) != *name {
                        return Err(format!(
                            "entry {name:?} holds service {}/{}",
                            svc.namespace, svc.name
                        ));
                    }
                    state
                        .services
                        .insert((svc.namespace.clone(), svc.name.clone()), svc);
                }
                EntryKind::Route => match decode_json(entry) {
                    Ok(r @ Resource::Route(_)) => {
                        validate(&r).map_err(|e| format!("{name}: {e}"))?;
                        if let Resource::Route(route) = r {
                            state.routes.push(Arc::new(route));
                        }
                    }
                    Ok(_) => return Err(format!("{name}: not a Route")),
                    Err(e) => return Err(format!("{name}: {e}")),
                },
                EntryKind::Policy => match decode_json(entry) {
                    Ok(r @ Resource::Policy(_)) => {
                        validate(&r).map_err(|e| format!("{name}: {e}"))?;
                        if let Resource::Policy(p) = r {
                            state.policies.push(Arc::new(p));
                        }
                    }
                    Ok(_) => return Err(format!("{name}: not a Policy")),
                    Err(e) => return Err(format!("{name}: {e}")),
                },
                EntryKind::Bundle => {
                    let b = TrustBundleMsg::decode(entry.body.clone())
                        .map_err(|e| format!("{name}: {e}"))?;
                    let bundle =
                        TrustBundle::from_pem(&b.trust_domain, &b.roots_pem, "trust bundle")
                            .map_err(|e| format!("{name}: {e}"))?;
                    if !trust_domain.is_empty() && b.trust_domain != trust_domain {
                        return Err(format!(
                            "{name}: trust domain {:?} is not this host's {trust_domain:?}",
                            b.trust_domain
                        ));
                    }
                    state.bundle_pem = b.roots_pem;
                    state.bundle = Some(bundle);
                }
                EntryKind::SelfConfig => {}
                EntryKind::Unspecified => return Err(format!("entry {name:?} has no kind")),
            }
        }
        state.index(limits)?;
        Ok(state)
    }

    fn index(&mut self, limits: &HostLimits) -> Result<(), String> {
        let ranges = self
            .me
            .as_ref()
            .map(|m| m.vip_ranges.clone())
            .unwrap_or_default();
        let mut ambiguous = Vec::new();
        for svc in self.services.values() {
            for vip in &svc.vips {
                if !ranges.is_empty() && !ranges.iter().any(|r| r.contains(vip)) {
                    return Err(format!(
                        "service {}: VIP {vip} is outside the mesh's VIP ranges",
                        svc.fqdn()
                    ));
                }
                if let Some(other) = self.by_vip.insert(*vip, svc.clone()) {
                    return Err(format!(
                        "VIP {vip} belongs to both {} and {}",
                        other.fqdn(),
                        svc.fqdn()
                    ));
                }
            }
            for ep in &svc.endpoints {
                for p in &svc.ports {
                    let addr = SocketAddr::new(ep.address, p.target);
                    match self.by_endpoint.get(&addr) {
                        Some((other, _)) if !Arc::ptr_eq(other, svc) => ambiguous.push(addr),
                        _ => {
                            self.by_endpoint.insert(addr, (svc.clone(), p.port));
                        }
                    }
                }
            }
        }
        // Two services on one address and port: only their VIPs say which
        // is meant, so the real address is not captured.
        for addr in ambiguous {
            self.by_endpoint.remove(&addr);
        }
        if let Some(me) = &self.me {
            for (ns, name) in &me.services {
                let Some(svc) = self.services.get(&(ns.clone(), name.clone())) else {
                    continue;
                };
                for p in &svc.ports {
                    if limits.own_ports.contains(&p.target) {
                        return Err(format!(
                            "service {}: target port {} is one of meshd's own ports on this host ({:?}); \
                             this host cannot serve it",
                            svc.fqdn(),
                            p.target,
                            limits.own_ports
                        ));
                    }
                    let served = self.served.entry(p.target).or_insert(ServedPort {
                        services: Vec::new(),
                        mtls: MtlsMode::Permissive,
                    });
                    served.services.push((ns.clone(), name.clone()));
                    if svc.mtls == MtlsMode::Strict {
                        served.mtls = MtlsMode::Strict;
                    }
                }
            }
        }
        Ok(())
    }

    /// Which service a connection to `dst` is for, the service port, and,
    /// when `dst` is an endpoint's real address, that endpoint: such a
    /// connection goes to the host it was addressed to, not to whichever
    /// endpoint the balancer picks.
    pub fn lookup(&self, dst: SocketAddr) -> Option<Destination> {
        if let Some(svc) = self.by_vip.get(&dst.ip()) {
            return svc.port(dst.port()).map(|p| Destination {
                service: svc.clone(),
                port: p.port,
                endpoint: None,
            });
        }
        let (svc, port) = self.by_endpoint.get(&dst)?;
        let endpoint = svc
            .endpoints
            .iter()
            .find(|e| e.address == dst.ip())
            .cloned();
        Some(Destination {
            service: svc.clone(),
            port: *port,
            endpoint,
        })
    }

    /// (service, namespace) -> VIPs: the mesh names DNS answers.
    pub fn dns_names(&self) -> HashMap<(String, String), Vec<IpAddr>> {
        self.services
            .iter()
            .map(|((ns, name), svc)| ((name.clone(), ns.clone()), svc.vips.clone()))
            .collect()
    }
}

fn self_info(s: &SelfConfig, limits: &HostLimits) -> Result<SelfInfo, String> {
    if !limits.host_id.is_empty() && s.host_id != limits.host_id {
        return Err(format!(
            "the config is for host {:?}, but this host is {:?}",
            s.host_id, limits.host_id
        ));
    }
    let spiffe_id: SpiffeId = s
        .spiffe_id
        .parse()
        .map_err(|e: hostmesh_api::spiffe::SpiffeIdError| format!("self: {e}"))?;
    let mut services = Vec::new();
    for svc in &s.services {
        let (ns, name) = svc
            .split_once('/')
            .filter(|(ns, name)| is_dns_label(ns) && is_dns_label(name))
            .ok_or_else(|| format!("self.services: {svc:?} is not NAMESPACE/NAME"))?;
        services.push((ns.to_string(), name.to_string()));
    }
    let mut vip_ranges = Vec::new();
    for r in &s.vip_ranges {
        vip_ranges.push(
            r.parse::<IpNet>()
                .map_err(|e| format!("self.vip_ranges: {r:?}: {e}"))?,
        );
    }
    let mut health_checks = Vec::new();
    for (i, hc) in s.health_checks.iter().enumerate() {
        let port = port16(hc.port, &format!("self.health_checks[{i}].port"))?;
        let http_path = match hc.r#type.as_str() {
            "tcp" => None,
            "http"
                if hc.path.starts_with('/')
                    && hc.path.len() <= 1024
                    && !hc.path.contains(['\r', '\n', ' ']) =>
            {
                Some(hc.path.clone())
            }
            "http" => {
                return Err(format!(
                    "self.health_checks[{i}].path {:?} is not a request path",
                    hc.path
                ));
            }
            other => {
                return Err(format!(
                    "self.health_checks[{i}].type {other:?} is not tcp or http"
                ));
            }
        };
        let ms = |v: u64| (v > 0).then(|| std::time::Duration::from_millis(v));
        health_checks.push(HealthCheck {
            port,
            http_path,
            interval: ms(hc.interval_ms),
            timeout: ms(hc.timeout_ms),
        });
    }
    Ok(SelfInfo {
        host_id: s.host_id.clone(),
        namespace: s.namespace.clone(),
        group: s.group.clone(),
        spiffe_id,
        labels: s.labels.clone(),
        services,
        trust_domain: s.trust_domain.clone(),
        vip_ranges,
        health_checks,
        transport: match s.transport.as_str() {
            "" => None,
            t => Some(
                crate::tunnel::Transport::parse(t)
                    .ok_or_else(|| format!("self.transport {t:?} is not tcp, quic or auto"))?,
            ),
        },
        peer_transport: Arc::new(peer_transport_for(&s.peer_transport, limits.address)?),
    })
}

/// The mesh's per-pair transport rules as they apply to the host at
/// `address`: every rule is checked (a bad one rejects the update, named),
/// and the peer networks of those that name this host are kept, ranked by
/// the rule's position: the first rule holding a peer's address decides.
fn peer_transport_for(
    rules: &[hostmesh_api::proto::PeerTransportRule],
    address: Option<IpAddr>,
) -> Result<crate::tunnel::PeerTransports, String> {
    use hostmesh_api::network::parse_network;
    if rules.len() > MAX_PEER_TRANSPORT_RULES {
        return Err(format!(
            "self.peer_transport: {} rules; at most {MAX_PEER_TRANSPORT_RULES}",
            rules.len()
        ));
    }
    let address = address.map(|a| a.to_canonical());
    let mut nets: Vec<(IpNet, crate::tunnel::Transport, u32)> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("self.peer_transport[{i}]");
        let transport = crate::tunnel::Transport::parse(&rule.transport).ok_or_else(|| {
            format!(
                "{at}.transport {:?} is not tcp, quic or auto",
                rule.transport
            )
        })?;
        if rule.peers.is_empty() {
            return Err(format!("{at}.peers names no network"));
        }
        let read = |list: &str, texts: &[String]| -> Result<Vec<IpNet>, String> {
            if texts.len() > MAX_RULE_NETWORKS {
                return Err(format!(
                    "{at}.{list}: {} networks; at most {MAX_RULE_NETWORKS}",
                    texts.len()
                ));
            }
            texts
                .iter()
                .enumerate()
                .map(|(j, t)| parse_network(t).map_err(|e| format!("{at}.{list}[{j}]: {e}")))
                .collect()
        };
        let hosts = read("hosts", &rule.hosts)?;
        let peers = read("peers", &rule.peers)?;
        let names_me =
            hosts.is_empty() || address.is_some_and(|a| hosts.iter().any(|n| n.contains(&a)));
        if names_me {
            // At most 64 rules: the index fits.
            let rank = i as u32;
            nets.extend(peers.into_iter().map(|net| (net, transport, rank)));
        }
    }
    Ok(crate::tunnel::PeerTransports::ranked(nets))
}

fn decode_json(entry: &ConfigEntry) -> Result<Resource, String> {
    let text = std::str::from_utf8(&entry.body).map_err(|_| "not UTF-8".to_string())?;
    resource_from_json(text)
}

/// Shares what many endpoints have in common within one build. The sets
/// hold the shared values themselves (looked up by content), so interning
/// copies nothing and leaves no garbage behind when the build ends.
#[derive(Default)]
struct Interner {
    ids: HashMap<Box<str>, Arc<SpiffeId>>,
    labels: std::collections::HashSet<Labels>,
    groups: std::collections::HashSet<Arc<EndpointGroup>>,
}

impl Interner {
    fn identity(&mut self, text: &str, trust_domain: &str) -> Result<Arc<SpiffeId>, String> {
        if let Some(id) = self.ids.get(text) {
            return Ok(id.clone());
        }
        let id: SpiffeId = text
            .parse()
            .map_err(|err: hostmesh_api::spiffe::SpiffeIdError| err.to_string())?;
        if !trust_domain.is_empty() && id.trust_domain() != trust_domain {
            return Err(format!(
                "identity {id} is outside trust domain {trust_domain}"
            ));
        }
        let id = Arc::new(id);
        self.ids.insert(text.into(), id.clone());
        Ok(id)
    }

    fn labels(&mut self, labels: BTreeMap<String, String>) -> Labels {
        let pairs: Vec<(Box<str>, Box<str>)> = labels
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        if let Some(l) = self.labels.get(pairs.as_slice()) {
            return l.clone();
        }
        let l: Labels = pairs.into();
        self.labels.insert(l.clone());
        l
    }

    fn group(&mut self, group: EndpointGroup) -> Arc<EndpointGroup> {
        if let Some(g) = self.groups.get(&group) {
            return g.clone();
        }
        let g = Arc::new(group);
        self.groups.insert(g.clone());
        g
    }
}

fn decode_service(
    entry: &ConfigEntry,
    trust_domain: &str,
    interner: &mut Interner,
) -> Result<ServiceState, String> {
    let s = ServiceConfig::decode(entry.body.clone()).map_err(|e| e.to_string())?;
    if !is_dns_label(&s.namespace) || !is_dns_label(&s.name) {
        return Err(format!(
            "{:?}/{:?} is not a service name",
            s.namespace, s.name
        ));
    }
    let mut vips = Vec::new();
    for v in &s.vips {
        vips.push(
            v.parse::<IpAddr>()
                .map_err(|_| format!("VIP {v:?} is not an IP address"))?,
        );
    }
    let mut ports: Vec<PortState> = Vec::new();
    for (i, p) in s.ports.iter().enumerate() {
        let port = port16(p.port, &format!("ports[{i}].port"))?;
        let target = port16(p.target_port, &format!("ports[{i}].targetPort"))?;
        let protocol = Protocol::parse(&p.protocol)
            .ok_or_else(|| format!("ports[{i}].protocol {:?} is unknown", p.protocol))?;
        if ports.iter().any(|q| q.port == port) {
            return Err(format!("port {port} appears twice"));
        }
        ports.push(PortState {
            name: p.name.clone(),
            port,
            target,
            protocol,
        });
    }
    let mtls = MtlsMode::parse(&s.mtls)
        .ok_or_else(|| format!("mtls {:?} is not strict or permissive", s.mtls))?;
    let targets: Arc<[u16]> = ports.iter().map(|p| p.target).collect();
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for (i, e) in s.endpoints.into_iter().enumerate() {
        endpoints.push(Arc::new(
            endpoint_state(e, trust_domain, &targets, interner)
                .map_err(|m| format!("endpoints[{i}]: {m}"))?,
        ));
    }
    Ok(ServiceState {
        hash: entry.hash.clone(),
        namespace: s.namespace,
        name: s.name,
        vips,
        ports,
        mtls,
        endpoints,
    })
}

fn endpoint_state(
    e: EndpointConfig,
    trust_domain: &str,
    targets: &Arc<[u16]>,
    interner: &mut Interner,
) -> Result<EndpointState, String> {
    if e.host_id.is_empty() {
        return Err("no host id".to_string());
    }
    let address: IpAddr = e
        .address
        .parse()
        .map_err(|_| format!("address {:?} is not an IP address", e.address))?;
    let tunnel_port = port16(e.tunnel_port, "tunnel port")?;
    let identity = interner.identity(&e.spiffe_id, trust_domain)?;
    let labels = interner.labels(e.labels);
    let group = interner.group(EndpointGroup {
        identity,
        labels,
        targets: targets.clone(),
    });
    let mut healthy = 0u64;
    for p in &e.healthy_ports {
        let p = port16(*p, "healthy port")?;
        // Ports the service does not use are ignored (the controller
        // sends only the service's).
        if let Some(i) = targets.iter().position(|t| *t == p) {
            healthy |= 1 << i;
        }
    }
    Ok(EndpointState {
        host_id: e.host_id.into_boxed_str(),
        address,
        tunnel_port,
        quic: e.quic,
        group,
        healthy,
    })
}

/// The state in use, read lock-free on the data path and replaced whole on
/// each accepted update; `subscribe` tells when.
pub struct MeshHandle {
    current: arc_swap::ArcSwap<MeshState>,
    version: tokio::sync::watch::Sender<u64>,
    loaded: std::sync::atomic::AtomicBool,
}

impl Default for MeshHandle {
    fn default() -> Self {
        MeshHandle {
            current: arc_swap::ArcSwap::from_pointee(MeshState::default()),
            version: tokio::sync::watch::channel(0).0,
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl MeshHandle {
    pub fn load(&self) -> Arc<MeshState> {
        self.current.load_full()
    }

    pub fn publish(&self, state: MeshState) {
        let version = state.version;
        self.current.store(Arc::new(state));
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        self.version.send_modify(|v| *v = version);
    }

    /// Whether any config (from disk or the controller) is in use.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hostmesh_api::entry::make_entry;
    use hostmesh_api::proto::{ConfigUpdate, PeerTransportRule, ServicePortConfig};

    pub(crate) fn service_entry(name: &str, svc: ServiceConfig) -> ConfigEntry {
        make_entry(name, EntryKind::Service, svc.encode_to_vec())
    }

    pub(crate) fn web_service(target: u32, mtls: &str) -> ServiceConfig {
        ServiceConfig {
            namespace: "shop".into(),
            name: "web".into(),
            vips: vec!["240.240.0.10".into()],
            ports: vec![ServicePortConfig {
                name: "http".into(),
                port: 80,
                target_port: target,
                protocol: "http".into(),
            }],
            mtls: mtls.into(),
            endpoints: vec![EndpointConfig {
                host_id: "web-1".into(),
                address: "10.0.0.2".into(),
                tunnel_port: 15008,
                quic: false,
                spiffe_id: "spiffe://hostmesh.local/ns/shop/sa/web".into(),
                labels: Default::default(),
                healthy_ports: vec![target],
            }],
        }
    }

    pub(crate) fn self_entry(host: &str, serves: &[&str]) -> ConfigEntry {
        make_entry(
            "self",
            EntryKind::SelfConfig,
            SelfConfig {
                host_id: host.into(),
                namespace: "shop".into(),
                group: "web".into(),
                spiffe_id: "spiffe://hostmesh.local/ns/shop/sa/web".into(),
                labels: Default::default(),
                services: serves.iter().map(|s| s.to_string()).collect(),
                trust_domain: "hostmesh.local".into(),
                vip_ranges: vec!["240.240.0.0/16".into()],
                health_checks: vec![],
                transport: String::new(),
                peer_transport: vec![],
            }
            .encode_to_vec(),
        )
    }

    pub(crate) fn snapshot(entries: Vec<ConfigEntry>) -> Snapshot {
        Snapshot::default()
            .apply(ConfigUpdate {
                version: 7,
                full: true,
                upserts: entries,
                removals: vec![],
            })
            .unwrap()
    }

    fn limits() -> HostLimits {
        HostLimits {
            host_id: "web-1".into(),
            trust_domain: "hostmesh.local".into(),
            own_ports: vec![15000, 15001, 15008, 15053],
            address: Some("10.20.0.5".parse().unwrap()),
        }
    }

    fn rule(hosts: &[&str], peers: &[&str], transport: &str) -> PeerTransportRule {
        PeerTransportRule {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            peers: peers.iter().map(|s| s.to_string()).collect(),
            transport: transport.into(),
        }
    }

    #[test]
    fn the_mesh_per_pair_transports_are_those_of_the_rules_naming_this_host() {
        use crate::tunnel::Transport::{Auto, Quic, Tcp};
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let rules = [
            // Not this host (10.20.0.5).
            rule(&["10.30.0.0/16"], &["10.20.0.0/16"], "quic"),
            // An exception for this host, first, so that it wins over the
            // more specific network of a later rule.
            rule(&["10.20.0.5"], &["10.30.0.0/16"], "tcp"),
            rule(&["10.20.0.0/16"], &["10.30.7.0/24", "10.40.0.9"], "quic"),
            // Same network as a rule before: the first rule wins.
            rule(&[], &["10.30.0.0/16"], "quic"),
            // Every host.
            rule(&[], &["10.30.8.0/24", "fd00::/64"], "auto"),
        ];
        let t = peer_transport_for(&rules, Some(ip("10.20.0.5"))).unwrap();
        assert_eq!(t.for_peer(ip("10.30.1.1")), Some(Tcp));
        assert_eq!(t.for_peer(ip("10.30.7.1")), Some(Tcp));
        assert_eq!(t.for_peer(ip("10.30.8.1")), Some(Tcp));
        assert_eq!(t.for_peer(ip("10.40.0.9")), Some(Quic));
        assert_eq!(t.for_peer(ip("fd00::9")), Some(Auto));
        assert_eq!(t.for_peer(ip("10.20.0.6")), None);
        // Another host in 10.20/16: no exception.
        let t = peer_transport_for(&rules, Some(ip("10.20.0.6"))).unwrap();
        assert_eq!(t.for_peer(ip("10.30.1.1")), Some(Quic));
        assert_eq!(t.for_peer(ip("10.30.7.1")), Some(Quic));
        assert_eq!(
            t.for_peer(ip("10.30.8.1")),
            Some(Quic),
            "the earlier /16 rule"
        );
        // A host in 10.30/16: the first rule, then the every-host ones.
        let t = peer_transport_for(&rules, Some(ip("::ffff:10.30.0.8"))).unwrap();
        assert_eq!(t.for_peer(ip("10.20.0.6")), Some(Quic));
        assert_eq!(t.for_peer(ip("10.30.1.1")), Some(Quic));
        assert_eq!(t.for_peer(ip("10.30.8.1")), Some(Quic));
        assert_eq!(t.for_peer(ip("fd00::9")), Some(Auto));
        assert_eq!(t.for_peer(ip("10.40.0.9")), None);
        // A host whose address is not known gets the every-host rules only.
        let t = peer_transport_for(&rules, None).unwrap();
        assert_eq!(t.for_peer(ip("10.30.1.1")), Some(Quic));
        // The /24 of the last rule comes after the /16 of the one before.
        assert_eq!(t.for_peer(ip("10.30.8.1")), Some(Quic));
        assert_eq!(t.for_peer(ip("fd00::9")), Some(Auto));
        assert_eq!(t.for_peer(ip("10.20.0.6")), None);
        assert!(
            peer_transport_for(&[], Some(ip("10.20.0.5")))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_bad_per_pair_rule_rejects_the_update_and_says_what_is_wrong() {
        let at = Some("10.20.0.5".parse().unwrap());
        let cases = [
            (
                rule(&[], &["10.30.0.0/16"], "udp"),
                "self.peer_transport[1].transport \"udp\" is not tcp, quic or auto",
            ),
            (
                rule(&["10.30.0.0/16"], &[], "quic"),
                "self.peer_transport[1].peers names no network",
            ),
            (
                rule(&["10.9.0.0/16"], &["10.30.0.1/16"], "quic"),
                "self.peer_transport[1].peers[0]: \"10.30.0.1/16\" has bits set past its prefix",
            ),
            (
                rule(&["db"], &["10.30.0.0/16"], "quic"),
                "self.peer_transport[1].hosts[0]: \"db\" is neither an address nor a network",
            ),
        ];
        for (bad, want) in cases {
            // Checked even where the rule does not name this host.
            let e = peer_transport_for(&[rule(&[], &["10.1.0.0/16"], "tcp"), bad], at).unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
        let too_many = vec![rule(&[], &["10.1.0.0/16"], "tcp"); MAX_PEER_TRANSPORT_RULES + 1];
        assert!(
            peer_transport_for(&too_many, at)
                .unwrap_err()
                .contains("65 rules; at most 64")
        );

        // Through a whole update: the build fails, naming the entry's field.
        let mut me = SelfConfig::decode(self_entry("web-1", &[]).body).unwrap();
        me.peer_transport = vec![rule(&[], &["10.30.0.0/16"], "udp")];
        let snap = snapshot(vec![make_entry(
            "self",
            EntryKind::SelfConfig,
            me.encode_to_vec(),
        )]);
        let e = MeshState::build(&snap, &limits(), None).unwrap_err();
        assert!(
            e.contains("self.peer_transport[0].transport \"udp\""),
            "{e}"
        );
    }

    #[test]
    fn indexes_vips_endpoints_and_served_ports() {
        let snap = snapshot(vec![
            self_entry("web-1", &["shop/web"]),
            service_entry("service/shop/web", web_service(8080, "strict")),
        ]);
        let st = MeshState::build(&snap, &limits(), None).unwrap();
        let d = st.lookup("240.240.0.10:80".parse().unwrap()).unwrap();
        assert_eq!((d.service.name.as_str(), d.port), ("web", 80));
        assert!(d.endpoint.is_none(), "a VIP is load-balanced");
        assert!(st.lookup("240.240.0.10:81".parse().unwrap()).is_none());
        let d = st.lookup("10.0.0.2:8080".parse().unwrap()).unwrap();
        assert_eq!((d.service.name.as_str(), d.port), ("web", 80));
        assert_eq!(
            d.endpoint.unwrap().host_id.as_ref(),
            "web-1",
            "a real address goes to that endpoint"
        );
        assert_eq!(st.served.get(&8080).unwrap().mtls, MtlsMode::Strict);
        let names = st.dns_names();
        assert_eq!(
            names
                .get(&("web".to_string(), "shop".to_string()))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_served_port_that_is_meshds_own_is_rejected() {
        let snap = snapshot(vec![
            self_entry("web-1", &["shop/web"]),
            service_entry("service/shop/web", web_service(15008, "strict")),
        ]);
        let e = MeshState::build(&snap, &limits(), None).unwrap_err();
        assert!(
            e.contains("target port 15008 is one of meshd's own ports"),
            "{e}"
        );
        // A host that only calls the service does not care.
        let snap = snapshot(vec![
            self_entry("web-1", &[]),
            service_entry("service/shop/web", web_service(15008, "strict")),
        ]);
        MeshState::build(&snap, &limits(), None).unwrap();
    }

    #[test]
    fn structural_problems_are_named() {
        let mut bad = web_service(8080, "strict");
        bad.endpoints[0].address = "not-an-ip".into();
        let snap = snapshot(vec![service_entry("service/shop/web", bad)]);
        let e = MeshState::build(&snap, &limits(), None).unwrap_err();
        assert!(
            e.contains("service/shop/web: endpoints[0]: address \"not-an-ip\""),
            "{e}"
        );

        let mut outside = web_service(8080, "strict");
        outside.vips = vec!["10.9.9.9".into()];
        let snap = snapshot(vec![
            self_entry("web-1", &[]),
            service_entry("service/shop/web", outside),
        ]);
        assert!(
            MeshState::build(&snap, &limits(), None)
                .unwrap_err()
                .contains("outside the mesh's VIP ranges")
        );

        let snap = snapshot(vec![self_entry("other-host", &[])]);
        assert!(
            MeshState::build(&snap, &limits(), None)
                .unwrap_err()
                .contains("is for host \"other-host\"")
        );

        let snap = snapshot(vec![make_entry(
            "route/shop/r",
            EntryKind::Route,
            &b"{}"[..],
        )]);
        assert!(MeshState::build(&snap, &limits(), None).is_err());
    }

    #[test]
    fn unchanged_services_are_reused_and_changed_ones_rebuilt() {
        let mut other = web_service(8080, "strict");
        other.name = "api".into();
        other.vips = vec!["240.240.0.11".into()];
        let first = snapshot(vec![
            self_entry("web-1", &[]),
            service_entry("service/shop/web", web_service(8080, "strict")),
            service_entry("service/shop/api", other.clone()),
        ]);
        let a = MeshState::build(&first, &limits(), None).unwrap();
        other.endpoints[0].healthy_ports = vec![];
        let second = snapshot(vec![
            self_entry("web-1", &[]),
            service_entry("service/shop/web", web_service(8080, "strict")),
            service_entry("service/shop/api", other),
        ]);
        let b = MeshState::build(&second, &limits(), Some(&a)).unwrap();
        let key = |n: &str| ("shop".to_string(), n.to_string());
        assert!(
            Arc::ptr_eq(&a.services[&key("web")], &b.services[&key("web")]),
            "unchanged: the same state"
        );
        assert!(
            !Arc::ptr_eq(&a.services[&key("api")], &b.services[&key("api")]),
            "changed: decoded again"
        );
        assert!(
            b.services[&key("api")].endpoints[0]
                .healthy_ports()
                .is_empty()
        );
        assert!(a.services[&key("api")].endpoints[0].is_healthy(8080));
    }

    #[test]
    fn endpoints_of_one_group_share_identity_and_labels() {
        let mut svc = web_service(8080, "strict");
        let mut second = svc.endpoints[0].clone();
        second.host_id = "web-2".into();
        second.address = "10.0.0.3".into();
        svc.endpoints.push(second);
        let st = MeshState::build(
            &snapshot(vec![service_entry("service/shop/web", svc)]),
            &limits(),
            None,
        )
        .unwrap();
        let eps = &st.services[&("shop".to_string(), "web".to_string())].endpoints;
        assert!(Arc::ptr_eq(&eps[0].group, &eps[1].group));
    }
}
