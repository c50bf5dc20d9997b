//! Authorization of an inbound connection at L4: who the caller is (its
//! verified SPIFFE ID) and which service port it wants.
//!
//! For the services behind the requested port: any matching `deny` rule
//! refuses; if the service has any `allow` policy, one of its rules must
//! match; otherwise the connection is allowed (the caller is a mesh
//! identity either way). Rules that name HTTP methods or paths cannot be
//! judged on a TCP connection, and are read the safe way, as Istio's
//! ztunnel does: such an `allow` rule never matches, such a `deny` rule
//! always does.

use hostmesh_api::resource::{Policy, PolicyAction, PolicyRule};
use hostmesh_api::spiffe::SpiffeId;

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused, naming the policy that decided.
    Deny(String),
}

fn source_matches(rule: &PolicyRule, caller: &SpiffeId) -> bool {
    if rule.from.is_empty() {
        return true;
    }
    let text = caller.to_string();
    rule.from.iter().any(|src| {
        if let Some(id) = &src.identity {
            match id.strip_suffix('*') {
                Some(prefix) => text.starts_with(prefix),
                None => *id == text,
            }
        } else if let Some(ns) = &src.namespace {
            caller.namespace() == ns
        } else {
            false
        }
    })
}

/// Some(true/false) when the destination part can be judged at L4; None
/// when it needs HTTP.
fn destination_matches(rule: &PolicyRule, service_port: u16) -> Option<bool> {
    if rule.to.is_empty() {
        return Some(true);
    }
    let mut needs_http = false;
    for op in &rule.to {
        let port_ok = op.ports.is_empty() || op.ports.contains(&u64::from(service_port));
        if !op.methods.is_empty() || !op.paths.is_empty() {
            if port_ok {
                needs_http = true;
            }
            continue;
        }
        if port_ok {
            return Some(true);
        }
    }
    if needs_http { None } else { Some(false) }
}

/// Decides for `caller` connecting to `service_port` of the service whose
/// policies are `policies` (all for that service).
pub fn decide<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    caller: &SpiffeId,
    service_port: u16,
) -> Decision {
    let mut has_allow = false;
    let mut allowed = false;
    for p in policies {
        for rule in &p.spec.rules {
            let from = source_matches(rule, caller);
            match p.spec.action {
                PolicyAction::Deny => {
                    // Needs-HTTP counts as a match for deny.
                    if from && destination_matches(rule, service_port) != Some(false) {
                        return Decision::Deny(format!(
                            "denied by Policy {}/{}",
                            p.metadata.namespace, p.metadata.name
                        ));
                    }
                }
                PolicyAction::Allow => {
                    if from && destination_matches(rule, service_port) == Some(true) {
                        allowed = true;
                    }
                }
            }
        }
        if p.spec.action == PolicyAction::Allow {
            has_allow = true;
        }
    }
    if !has_allow || allowed {
        Decision::Allow
    } else {
        Decision::Deny("no allow policy matches".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmesh_api::document::parse_documents;
    use hostmesh_api::resource::Resource;

    fn policies(yaml: &str) -> Vec<Policy> {
        parse_documents(yaml)
            .unwrap()
            .into_iter()
            .map(|r| match r {
                Resource::Policy(p) => p,
                _ => panic!("not a policy"),
            })
            .collect()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    const FRONTEND: &str = "spiffe://hostmesh.local/ns/shop/sa/frontend";
    const OPS: &str = "spiffe://hostmesh.local/ns/ops/sa/tool";
    const OTHER: &str = "spiffe://hostmesh.local/ns/shop/sa/other";

    #[test]
    fn no_policy_allows_mesh_identities() {
        assert_eq!(decide(&[], &id(OTHER), 80), Decision::Allow);
    }

    #[test]
    fn allow_policies_admit_only_what_they_name() {
        let p = policies(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: a, namespace: shop}\nspec:\n  service: web\n  rules:\n    - from: [{identity: 'spiffe://hostmesh.local/ns/shop/sa/frontend'}, {namespace: ops}]\n      to: [{ports: [80]}]\n",
        );
        assert_eq!(decide(&p, &id(FRONTEND), 80), Decision::Allow);
        assert_eq!(decide(&p, &id(OPS), 80), Decision::Allow);
        assert!(matches!(decide(&p, &id(OTHER), 80), Decision::Deny(_)));
        assert!(matches!(decide(&p, &id(FRONTEND), 443), Decision::Deny(_)));
    }

    #[test]
    fn http_only_rules_are_read_the_safe_way() {
        let allow = policies(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: a, namespace: shop}\nspec:\n  service: web\n  rules:\n    - to: [{methods: [GET]}]\n",
        );
        assert!(
            matches!(decide(&allow, &id(FRONTEND), 80), Decision::Deny(_)),
            "L7 allow never matches at L4"
        );
        let deny = policies(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: d, namespace: shop}\nspec:\n  service: web\n  action: deny\n  rules:\n    - from: [{namespace: ops}]\n      to: [{paths: ['/admin/*']}]\n",
        );
        assert_eq!(decide(&deny, &id(FRONTEND), 80), Decision::Allow);
        assert_eq!(
            decide(&deny, &id(OPS), 80),
            Decision::Deny("denied by Policy shop/d".into())
        );
    }

    #[test]
    fn deny_wins_and_wildcards_work() {
        let p = policies(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: a, namespace: shop}\nspec: {service: web, rules: [{from: [{identity: 'spiffe://hostmesh.local/ns/shop/*'}]}]}\n---\napiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: d, namespace: shop}\nspec: {service: web, action: deny, rules: [{from: [{identity: 'spiffe://hostmesh.local/ns/shop/sa/other'}]}]}\n",
        );
        assert_eq!(decide(&p, &id(FRONTEND), 80), Decision::Allow);
        assert!(matches!(decide(&p, &id(OTHER), 80), Decision::Deny(_)));
        assert!(matches!(decide(&p, &id(OPS), 80), Decision::Deny(_)));
    }
}
