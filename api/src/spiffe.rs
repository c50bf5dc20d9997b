//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`.
//!
//! Every host certificate carries exactly one such URI SAN. The controller
//! uses the same form for itself (`ns/hostmesh-system/sa/controller`) and
//! for the operator's admin credential (`ns/hostmesh-system/sa/admin`).

use std::fmt;
use std::str::FromStr;

use crate::resource::validate::is_dns_label;

/// The namespace of the mesh's own identities.
pub const SYSTEM_NAMESPACE: &str = "hostmesh-system";
pub const CONTROLLER_NAME: &str = "controller";
pub const ADMIN_NAME: &str = "admin";
pub const DEFAULT_TRUST_DOMAIN: &str = "hostmesh.local";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<name>: {reason}"
)]
pub struct SpiffeIdError {
    pub input: String,
    pub reason: &'static str,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, name: &str) -> Result<SpiffeId, SpiffeIdError> {
        let id = SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        // Round-trip through the parser so both constructors check the same.
        id.to_string().parse()
    }

    pub fn controller(trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, CONTROLLER_NAME)
            .expect("the controller identity is well-formed for a valid trust domain")
    }

    pub fn admin(trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, ADMIN_NAME)
            .expect("the admin identity is well-formed for a valid trust domain")
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_system(&self) -> bool {
        self.namespace == SYSTEM_NAMESPACE
    }
}

/// A trust domain is a lowercase DNS-like name (SPIFFE: letters, digits,
/// dots, dashes and underscores).
pub fn is_valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<SpiffeId, SpiffeIdError> {
        let err = |reason| SpiffeIdError {
            input: input.to_string(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("has no path"))?;
        if !is_valid_trust_domain(td) {
            return Err(err(
                "the trust domain may hold only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", name] => {
                if !is_dns_label(ns) {
                    return Err(err("the namespace is not a DNS label"));
                }
                if !is_dns_label(name) {
                    return Err(err("the service account is not a DNS label"));
                }
                Ok(SpiffeId {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(err("the path must be /ns/<namespace>/sa/<name>")),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_canonical_form() {
        let id: SpiffeId = "spiffe://hostmesh.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "hostmesh.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.name(), "web");
        assert_eq!(id.to_string(), "spiffe://hostmesh.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_malformed_ids_with_a_reason() {
        for bad in [
            "http://x/ns/a/sa/b",
            "spiffe://Upper/ns/a/sa/b",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/ns/A/sa/b",
            "spiffe://td",
        ] {
            let e = bad.parse::<SpiffeId>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
