//! Where the controller keeps what in the store. Every key starts with the
//! configured prefix (default `/hostmesh/`), so several meshes can share one
//! etcd.
//!
//! ```text
//! {p}resources/{Kind}/{namespace}/{name}   resource JSON (the envelope)
//! {p}vips/{ip}                             "{namespace}/{name}" of the Service holding it
//! {p}tokens/{id}                           join token record (hash of the secret only)
//! {p}ca/state                              which root issues
//! {p}ca/roots/{id}                         a root certificate and its sealed key
//! {p}hosts/live/{host-id}                  leased: address, ports, health of a connected host
//! {p}hosts/acks/{host-id}                  leased: config version the host acknowledged or rejected
//! ```

use hostmesh_api::resource::{Kind, ResourceKey};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` is normalised to start and end with '/'.
    pub fn new(prefix: &str) -> Keys {
        let trimmed = prefix.trim_matches('/');
        let prefix = if trimmed.is_empty() {
            "/".to_string()
        } else {
            format!("/{trimmed}/")
        };
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn resources(&self) -> String {
        format!("{}resources/", self.prefix)
    }

    pub fn resources_of(&self, kind: Kind) -> String {
        format!("{}resources/{}/", self.prefix, kind.as_str())
    }

    pub fn resources_in(&self, kind: Kind, namespace: &str) -> String {
        format!("{}resources/{}/{}/", self.prefix, kind.as_str(), namespace)
    }

    pub fn resource(&self, kind: Kind, namespace: &str, name: &str) -> String {
        format!(
            "{}resources/{}/{}/{}",
            self.prefix,
            kind.as_str(),
            namespace,
            name
        )
    }

    pub fn resource_key(&self, key: &ResourceKey) -> String {
        self.resource(key.kind, &key.namespace, &key.name)
    }

    /// The resource a store key names, if it is one.
    pub fn parse_resource(&self, key: &str) -> Option<ResourceKey> {
        let rest = key.strip_prefix(&self.resources())?;
        let mut parts = rest.splitn(3, '/');
        let kind = Kind::from_document(parts.next()?)?;
        let namespace = parts.next()?;
        let name = parts.next()?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(ResourceKey::new(kind, namespace, name))
    }

    pub fn vips(&self) -> String {
        format!("{}vips/", self.prefix)
    }

    pub fn vip(&self, ip: &str) -> String {
        format!("{}vips/{}", self.prefix, ip)
    }

    pub fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }

    pub fn token(&self, id: &str) -> String {
        format!("{}tokens/{}", self.prefix, id)
    }

    pub fn ca(&self) -> String {
        format!("{}ca/", self.prefix)
    }

    pub fn ca_state(&self) -> String {
        format!("{}ca/state", self.prefix)
    }

    pub fn ca_roots(&self) -> String {
        format!("{}ca/roots/", self.prefix)
    }

    pub fn ca_root(&self, id: &str) -> String {
        format!("{}ca/roots/{}", self.prefix, id)
    }

    pub fn live_hosts(&self) -> String {
        format!("{}hosts/live/", self.prefix)
    }

    pub fn live_host(&self, host_id: &str) -> String {
        format!("{}hosts/live/{}", self.prefix, host_id)
    }

    pub fn acks(&self) -> String {
        format!("{}hosts/acks/", self.prefix)
    }

    pub fn ack(&self, host_id: &str) -> String {
        format!("{}hosts/acks/{}", self.prefix, host_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(Keys::new("hostmesh").prefix(), "/hostmesh/");
        assert_eq!(Keys::new("/a/b/").prefix(), "/a/b/");
        assert_eq!(Keys::new("").prefix(), "/");
    }

    #[test]
    fn resource_keys_round_trip() {
        let keys = Keys::new("/hostmesh/");
        let k = ResourceKey::new(Kind::Route, "shop", "web-canary");
        let s = keys.resource_key(&k);
        assert_eq!(s, "/hostmesh/resources/Route/shop/web-canary");
        assert_eq!(keys.parse_resource(&s), Some(k));
        assert_eq!(keys.parse_resource("/hostmesh/resources/Bogus/a/b"), None);
        assert_eq!(keys.parse_resource("/hostmesh/vips/240.240.0.1"), None);
        assert_eq!(keys.parse_resource("/hostmesh/resources/Route/shop/"), None);
    }
}
