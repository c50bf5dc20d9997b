//! What each host is told: a pure function from the cluster state to a set
//! of named config entries, each with a content hash.
//!
//! - `service/<ns>/<name>`: every Service with its VIPs, ports, mTLS mode
//!   and endpoints (the live hosts of the groups that serve it).
//! - `route/<ns>/<name>`: every Route (hosts call any service).
//! - `policy/<ns>/<name>`: the Policies of the services this host serves.
//! - `bundle`: the trust bundle.
//! - `self`: the host's own identity, group and served services.
//!
//! Everything but `self` depends only on the host's group, so hosts of one
//! group share one computed [`GroupSnapshot`]. Increments are the
//! difference between what the host holds (names and hashes) and the
//! current snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hostmesh_api::entry::make_entry;
use hostmesh_api::proto::{
    ConfigEntry, EndpointConfig, EntryKind, HealthCheckConfig, PeerTransportRule, SelfConfig,
    ServiceConfig, ServicePortConfig, TrustBundle as TrustBundleMsg,
};
use hostmesh_api::resource::{HealthCheckType, Resource};
use hostmesh_api::tls::TrustBundle;
use prost::Message;

use crate::state::ClusterState;

pub const BUNDLE_ENTRY: &str = "bundle";
pub const SELF_ENTRY: &str = "self";

/// Hex of the first 8 bytes of SHA-256 (the same everywhere).
pub fn content_hash(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    hex::encode(&d.as_ref()[..8])
}

/// The digest of a whole snapshot: of its sorted names and hashes.
pub fn digest<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<(&String, &String)> = entries.collect();
    pairs.sort();
    let mut text = String::new();
    for (n, h) in pairs {
        text.push_str(n);
        text.push('=');
        text.push_str(h);
        text.push('\n');
    }
    content_hash(text.as_bytes())
}

/// The entries every host of one group receives (all but `self`).
#[derive(Debug, Default)]
pub struct GroupSnapshot {
    pub entries: BTreeMap<String, Arc<ConfigEntry>>,
}

/// Who a host is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostContext {
    pub host_id: String,
    pub namespace: String,
    pub group: String,
    pub spiffe_id: String,
    pub trust_domain: String,
}

pub fn compute_group(
    state: &ClusterState,
    namespace: &str,
    group: &str,
    bundle: &TrustBundle,
) -> GroupSnapshot {
    let mut entries = BTreeMap::new();
    // Which groups serve which services.
    let mut servers: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for ((ns, gname), g) in &state.groups {
        for svc in &g.spec.services {
            servers
                .entry((ns.clone(), svc.clone()))
                .or_default()
                .push(gname.clone());
        }
    }
    // Endpoints per (namespace, group): live hosts of that group.
    let mut hosts_of_group: BTreeMap<(String, String), Vec<EndpointConfig>> = BTreeMap::new();
    for (host_id, wl) in &state.workloads {
        let Some(live) = state.live.get(host_id) else {
            continue;
        };
        if live.address.is_empty() {
            continue;
        }
        let ns = wl.metadata.namespace.clone();
        let labels = state
            .groups
            .get(&(ns.clone(), wl.spec.group.clone()))
            .map(|g| g.spec.labels.clone())
            .unwrap_or_else(|| wl.spec.labels.clone());
        hosts_of_group
            .entry((ns, wl.spec.group.clone()))
            .or_default()
            .push(EndpointConfig {
                host_id: host_id.clone(),
                address: live.address.clone(),
                tunnel_port: live.tunnel_port,
                quic: live.quic,
                spiffe_id: wl.spec.identity.clone(),
                labels,
                healthy_ports: live
                    .ports
                    .iter()
                    .filter(|p| p.healthy)
                    .map(|p| p.port)
                    .collect(),
            });
    }
    for ((ns, name), svc) in &state.services {
        let mut endpoints = Vec::new();
        if let Some(groups) = servers.get(&(ns.clone(), name.clone())) {
            for g in groups {
                if let Some(hosts) = hosts_of_group.get(&(ns.clone(), g.clone())) {
                    for ep in hosts {
                        let mut ep = ep.clone();
                        // Only the ports this service uses.
                        ep.healthy_ports.retain(|p| {
                            svc.spec.ports.iter().any(|sp| sp.target() == u64::from(*p))
                        });
                        endpoints.push(ep);
                    }
                }
            }
        }
        endpoints.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        let vips = [svc.spec.vip.clone(), svc.spec.vip6.clone()]
            .into_iter()
            .flatten()
            .collect();
        let config = ServiceConfig {
            namespace: ns.clone(),
            name: name.clone(),
            vips,
            ports: svc
                .spec
                .ports
                .iter()
                .map(|p| ServicePortConfig {
                    name: p.name.clone().unwrap_or_default(),
                    port: u32::try_from(p.port).unwrap_or(0),
                    target_port: u32::try_from(p.target()).unwrap_or(0),
                    protocol: p.protocol.as_str().to_string(),
                })
                .collect(),
            mtls: svc.spec.mtls.as_str().to_string(),
            endpoints,
        };
        let name = format!("service/{ns}/{name}");
        entries.insert(
            name.clone(),
            Arc::new(make_entry(name, EntryKind::Service, config.encode_to_vec())),
        );
    }
    for ((ns, name), route) in &state.routes {
        let n = format!("route/{ns}/{name}");
        let json = Resource::Route((**route).clone())
            .without_store_fields()
            .to_json();
        entries.insert(
            n.clone(),
            Arc::new(make_entry(n, EntryKind::Route, json.into_bytes())),
        );
    }
    let served: BTreeSet<String> = state
        .groups
        .get(&(namespace.to_string(), group.to_string()))
        .map(|g| g.spec.services.iter().cloned().collect())
        .unwrap_or_default();
    for ((ns, name), policy) in &state.policies {
        if ns == namespace && served.contains(&policy.spec.service) {
            let n = format!("policy/{ns}/{name}");
            let json = Resource::Policy((**policy).clone())
                .without_store_fields()
                .to_json();
            entries.insert(
                n.clone(),
                Arc::new(make_entry(n, EntryKind::Policy, json.into_bytes())),
            );
        }
    }
    entries.insert(
        BUNDLE_ENTRY.to_string(),
        Arc::new(make_entry(
            BUNDLE_ENTRY,
            EntryKind::Bundle,
            TrustBundleMsg {
                trust_domain: bundle.trust_domain.clone(),
                roots_pem: bundle.to_pem(),
            }
            .encode_to_vec(),
        )),
    );
    GroupSnapshot { entries }
}

pub fn compute_self(
    state: &ClusterState,
    host: &HostContext,
    vip_ranges: &[String],
    mesh: &crate::config::MeshConfig,
) -> ConfigEntry {
    let group = state
        .groups
        .get(&(host.namespace.clone(), host.group.clone()));
    let config = SelfConfig {
        host_id: host.host_id.clone(),
        namespace: host.namespace.clone(),
        group: host.group.clone(),
        spiffe_id: host.spiffe_id.clone(),
        labels: group.map(|g| g.spec.labels.clone()).unwrap_or_default(),
        services: group
            .map(|g| {
                g.spec
                    .services
                    .iter()
                    .map(|s| format!("{}/{s}", host.namespace))
                    .collect()
            })
            .unwrap_or_default(),
        trust_domain: host.trust_domain.clone(),
        vip_ranges: vip_ranges.to_vec(),
        health_checks: group
            .map(|g| {
                g.spec
                    .health_checks
                    .iter()
                    .map(|hc| HealthCheckConfig {
                        port: u32::try_from(hc.port).unwrap_or(0),
                        r#type: match hc.kind {
                            HealthCheckType::Tcp => "tcp".to_string(),
                            HealthCheckType::Http => "http".to_string(),
                        },
                        path: hc.path.clone().unwrap_or_default(),
                        interval_ms: hc.interval.map(|d| d.get().as_millis() as u64).unwrap_or(0),
                        timeout_ms: hc.timeout.map(|d| d.get().as_millis() as u64).unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        transport: mesh.transport.clone(),
        peer_transport: mesh
            .peer_transport
            .iter()
            .map(|r| PeerTransportRule {
                hosts: r.hosts.clone().unwrap_or_default(),
                peers: r.peers.clone(),
                transport: r.transport.clone(),
            })
            .collect(),
    };
    make_entry(SELF_ENTRY, EntryKind::SelfConfig, config.encode_to_vec())
}

/// The increment that turns what a host holds into `target`.
pub fn diff(
    held: &BTreeMap<String, String>,
    target: &BTreeMap<String, Arc<ConfigEntry>>,
) -> (Vec<ConfigEntry>, Vec<String>) {
    let mut upserts = Vec::new();
    for (name, e) in target {
        if held.get(name) != Some(&e.hash) {
            upserts.push((**e).clone());
        }
    }
    let removals = held
        .keys()
        .filter(|n| !target.contains_key(*n))
        .cloned()
        .collect();
    (upserts, removals)
}

/// The ports a host of this group serves, for health reporting.
pub fn served_target_ports(state: &ClusterState, namespace: &str, group: &str) -> Vec<u32> {
    let mut ports = BTreeSet::new();
    if let Some(g) = state
        .groups
        .get(&(namespace.to_string(), group.to_string()))
    {
        for svc in &g.spec.services {
            if let Some(s) = state.services.get(&(namespace.to_string(), svc.clone())) {
                for p in &s.spec.ports {
                    if let Ok(t) = u32::try_from(p.target()) {
                        ports.insert(t);
                    }
                }
            }
        }
    }
    ports.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LiveRecord, PortHealthRecord};
    use hostmesh_api::document::parse_documents;

    const MESH: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80, targetPort: 8080, protocol: http}], vip: 240.240.0.10}
---
apiVersion: hostmesh/v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {ports: [{port: 5432}], vip: 240.240.0.11}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: web, namespace: shop}
spec: {labels: {app: web, version: v1}, services: [web]}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: client, namespace: shop}
spec: {}
---
apiVersion: hostmesh/v1
kind: Policy
metadata: {name: web-allow, namespace: shop}
spec: {service: web, rules: [{from: [{namespace: shop}]}]}
---
apiVersion: hostmesh/v1
kind: Route
metadata: {name: web-r, namespace: shop}
spec: {service: web, rules: [{backends: [{subset: {version: v1}}]}]}
"#;

    fn workload(host: &str, group: &str) -> Arc<hostmesh_api::resource::Workload> {
        let text = format!(
            "apiVersion: hostmesh/v1\nkind: Workload\nmetadata: {{name: {host}, namespace: shop}}\nspec: {{group: {group}, identity: 'spiffe://hostmesh.local/ns/shop/sa/{group}', joinedAt: x}}\n"
        );
        match parse_documents(&text).unwrap().remove(0) {
            Resource::Workload(w) => Arc::new(w),
            _ => unreachable!(),
        }
    }

    fn state() -> ClusterState {
        let mut st = ClusterState::default();
        for r in parse_documents(MESH).unwrap() {
            let key = (r.metadata().namespace.clone(), r.metadata().name.clone());
            match r {
                Resource::Service(s) => {
                    st.services.insert(key, Arc::new(s));
                }
                Resource::WorkloadGroup(g) => {
                    st.groups.insert(key, Arc::new(g));
                }
                Resource::Policy(p) => {
                    st.policies.insert(key, Arc::new(p));
                }
                Resource::Route(r) => {
                    st.routes.insert(key, Arc::new(r));
                }
                Resource::Workload(_) => {}
            }
        }
        for (host, addr, healthy) in [("web-a", "10.0.0.2", true), ("web-b", "10.0.0.3", false)] {
            st.workloads.insert(host.to_string(), workload(host, "web"));
            st.live.insert(
                host.to_string(),
                Arc::new(LiveRecord {
                    host_id: host.to_string(),
                    namespace: "shop".into(),
                    group: "web".into(),
                    address: addr.to_string(),
                    tunnel_port: 15008,
                    ports: vec![PortHealthRecord {
                        port: 8080,
                        healthy,
                        detail: String::new(),
                    }],
                    ..LiveRecord::default()
                }),
            );
        }
        // A joined but disconnected host is no endpoint.
        st.workloads
            .insert("web-c".into(), workload("web-c", "web"));
        st
    }

    fn bundle() -> TrustBundle {
        let key = hostmesh_api::pki::generate_key().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        TrustBundle::from_pem("hostmesh.local", &cert.pem(), "t").unwrap()
    }

    fn service(g: &GroupSnapshot, name: &str) -> ServiceConfig {
        let e = g.entries.get(name).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(e.kind, EntryKind::Service as i32);
        ServiceConfig::decode(e.body.clone()).unwrap()
    }

    #[test]
    fn endpoints_are_the_live_hosts_of_serving_groups() {
        let g = compute_group(&state(), "shop", "client", &bundle());
        let web = service(&g, "service/shop/web");
        assert_eq!(web.vips, vec!["240.240.0.10"]);
        let eps: Vec<(&str, &str, Vec<u32>)> = web
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.host_id.as_str(),
                    e.address.as_str(),
                    e.healthy_ports.clone(),
                )
            })
            .collect();
        assert_eq!(
            eps,
            vec![
                ("web-a", "10.0.0.2", vec![8080]),
                ("web-b", "10.0.0.3", vec![])
            ]
        );
        assert_eq!(
            web.endpoints[0].spiffe_id,
            "spiffe://hostmesh.local/ns/shop/sa/web"
        );
        assert_eq!(
            web.endpoints[0].labels.get("version").map(String::as_str),
            Some("v1")
        );
        assert!(service(&g, "service/shop/db").endpoints.is_empty());
        assert!(g.entries.contains_key("route/shop/web-r"));
        assert!(g.entries.contains_key(BUNDLE_ENTRY));
    }

    #[test]
    fn policies_go_only_to_the_hosts_that_serve_the_service() {
        let b = bundle();
        assert!(
            !compute_group(&state(), "shop", "client", &b)
                .entries
                .contains_key("policy/shop/web-allow")
        );
        assert!(
            compute_group(&state(), "shop", "web", &b)
                .entries
                .contains_key("policy/shop/web-allow")
        );
    }

    #[test]
    fn hashes_are_stable_and_diffs_are_minimal() {
        let b = bundle();
        let st = state();
        let first = compute_group(&st, "shop", "client", &b);
        let again = compute_group(&st, "shop", "client", &b);
        let held: BTreeMap<String, String> = first
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.hash.clone()))
            .collect();
        let (up, rm) = diff(&held, &again.entries);
        assert!(up.is_empty() && rm.is_empty(), "same state, same hashes");

        // An endpoint going away changes exactly one entry.
        let mut st2 = st.clone();
        st2.live.remove("web-b");
        let next = compute_group(&st2, "shop", "client", &b);
        let (up, rm) = diff(&held, &next.entries);
        assert_eq!(
            up.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            vec!["service/shop/web"]
        );
        assert!(rm.is_empty());

        // A deleted route is a removal.
        let mut st3 = st.clone();
        st3.routes.clear();
        let (up, rm) = diff(&held, &compute_group(&st3, "shop", "client", &b).entries);
        assert!(up.is_empty());
        assert_eq!(rm, vec!["route/shop/web-r".to_string()]);
        assert_eq!(digest(held.iter()), digest(held.iter()));
    }

    #[test]
    fn self_names_the_served_services() {
        let host = HostContext {
            host_id: "web-a".into(),
            namespace: "shop".into(),
            group: "web".into(),
            spiffe_id: "spiffe://hostmesh.local/ns/shop/sa/web".into(),
            trust_domain: "hostmesh.local".into(),
        };
        let mesh = crate::config::MeshConfig {
            transport: "tcp".into(),
            peer_transport: vec![crate::config::PeerTransportRule {
                hosts: Some(vec!["10.20.0.0/16".into()]),
                peers: vec!["10.30.0.0/16".into(), "10.40.0.9".into()],
                transport: "quic".into(),
            }],
        };
        let e = compute_self(&state(), &host, &["240.240.0.0/16".to_string()], &mesh);
        assert_eq!(e.kind, EntryKind::SelfConfig as i32);
        let s = SelfConfig::decode(e.body.clone()).unwrap();
        assert_eq!(s.services, vec!["shop/web"]);
        assert_eq!(s.transport, "tcp");
        assert_eq!(
            s.peer_transport,
            vec![PeerTransportRule {
                hosts: vec!["10.20.0.0/16".into()],
                peers: vec!["10.30.0.0/16".into(), "10.40.0.9".into()],
                transport: "quic".into(),
            }]
        );
        assert_eq!(s.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(served_target_ports(&state(), "shop", "web"), vec![8080]);
    }
}
