//! The controller's configuration: `/etc/hostmesh/controller.toml`, with
//! command-line flags on top. Every field has a default; `validate()` runs
//! once at start-up and names the field and the bad value.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hostmesh_api::duration::Duration as Dur;
use hostmesh_api::spiffe::{DEFAULT_TRUST_DOMAIN, is_valid_trust_domain};
use hostmesh_registry::StoreUrl;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/hostmesh/controller.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/hostmesh/controller";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// `embedded:PATH`, `etcd://H:P[,H:P...]`, `etcds://...`. Empty: an
    /// embedded store in `data_dir`.
    pub store: String,
    /// Key prefix in the store.
    pub store_prefix: String,
    /// gRPC (TLS) for hosts and operators.
    pub listen: SocketAddr,
    /// Plain HTTP: /healthz, /readyz, /metrics.
    pub metrics_listen: SocketAddr,
    pub trust_domain: String,
    pub data_dir: PathBuf,
    /// The URL hosts and operators use to reach this controller (printed
    /// in join commands and written to admin.conf). Empty: derived from
    /// `listen` and the host name.
    pub advertise_url: String,
    /// Extra DNS names and IP addresses for the controller's certificate
    /// (identity is checked by SPIFFE ID; these serve other tools).
    pub server_names: Vec<String>,
    pub ca: CaConfig,
    pub mesh: MeshConfig,
    pub vip: VipConfig,
    pub hosts: HostsConfig,
    pub join: JoinConfig,
    pub etcd: EtcdConfig,
    pub log: LogConfig,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            store: String::new(),
            store_prefix: "/hostmesh/".to_string(),
            listen: "0.0.0.0:15012".parse().expect("valid"),
            metrics_listen: "0.0.0.0:15014".parse().expect("valid"),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            advertise_url: String::new(),
            server_names: Vec::new(),
            ca: CaConfig::default(),
            mesh: MeshConfig::default(),
            vip: VipConfig::default(),
            hosts: HostsConfig::default(),
            join: JoinConfig::default(),
            etcd: EtcdConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Key-encryption key sealing generated root keys in the store. Empty:
    /// `<data_dir>/ca.kek`. Every replica needs the same file.
    pub kek_file: String,
    /// Operator-supplied CA (e.g. an intermediate of the company PKI):
    /// certificate chain (issuing certificate first) and key. When set,
    /// no root is generated.
    pub cert_file: String,
    pub key_file: String,
    /// Roots to trust with an operator-supplied CA. Empty: the last
    /// certificate of `cert_file`.
    pub bundle_file: String,
    /// Lifetime of host certificates.
    pub workload_cert_ttl: Dur,
    /// Lifetime of a generated root.
    pub root_ttl: Dur,
    /// Lifetime of the admin credential written to `<data_dir>/admin.conf`.
    pub admin_cert_ttl: Dur,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            kek_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            bundle_file: String::new(),
            workload_cert_ttl: Dur::from_secs(24 * 3600),
            root_ttl: Dur::from_secs(10 * 365 * 24 * 3600),
            admin_cert_ttl: Dur::from_secs(365 * 24 * 3600),
        }
    }
}

/// Mesh-wide settings pushed to every host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Tunnel transport between hosts: "tcp", "quic", "auto" (QUIC where
    /// the peer offers it, falling back to TCP), or "" (each host's own
    /// meshd.toml decides; TCP by default).
    pub transport: String,
    /// Per pair of host networks, over `transport`: each host applies the
    /// rules whose `hosts` hold its tunnel address.
    pub peer_transport: Vec<PeerTransportRule>,
}

/// A host whose tunnel address is in one of `hosts` (every host when left
/// out) opens tunnels to peers in one of `peers` with `transport`. Rules
/// are tried in order: the first that names the host and holds the peer's
/// address decides, so exceptions go first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PeerTransportRule {
    /// None: every host. An empty list is refused rather than read as
    /// every host (a list that came out empty should not widen a rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    pub peers: Vec<String>,
    pub transport: String,
}

pub use hostmesh_api::network::{MAX_PEER_TRANSPORT_RULES, MAX_RULE_NETWORKS};

impl MeshConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let transport_ok = |t: &str| matches!(t, "tcp" | "quic" | "auto");
        if !self.transport.is_empty() && !transport_ok(&self.transport) {
            return Err(invalid(
                "mesh.transport",
                format!("{:?} is not tcp, quic or auto", self.transport),
            ));
        }
        if self.peer_transport.len() > MAX_PEER_TRANSPORT_RULES {
            return Err(invalid(
                "mesh.peer_transport",
                format!(
                    "{} rules; at most {MAX_PEER_TRANSPORT_RULES}",
                    self.peer_transport.len()
                ),
            ));
        }
        for (i, rule) in self.peer_transport.iter().enumerate() {
            let field = format!("mesh.peer_transport[{i}]");
            if !transport_ok(&rule.transport) {
                return Err(invalid(
                    &format!("{field}.transport"),
                    format!("{:?} is not tcp, quic or auto", rule.transport),
                ));
            }
            if rule.peers.is_empty() {
                return Err(invalid(
                    &format!("{field}.peers"),
                    "names no network (such as \"10.20.0.0/16\")",
                ));
            }
            if rule.hosts.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(
                    &format!("{field}.hosts"),
                    "names no host; leave `hosts` out for a rule for every host",
                ));
            }
            let hosts = rule.hosts.as_deref().unwrap_or_default();
            for (list, nets) in [("hosts", hosts), ("peers", rule.peers.as_slice())] {
                if nets.len() > MAX_RULE_NETWORKS {
                    return Err(invalid(
                        &format!("{field}.{list}"),
                        format!("{} networks; at most {MAX_RULE_NETWORKS}", nets.len()),
                    ));
                }
                let mut seen = std::collections::HashMap::with_capacity(nets.len());
                for (j, text) in nets.iter().enumerate() {
                    let at = format!("{field}.{list}[{j}]");
                    let net =
                        hostmesh_api::network::parse_network(text).map_err(|e| invalid(&at, e))?;
                    if let Some(k) = seen.insert(net, j) {
                        return Err(invalid(
                            &at,
                            format!("{text:?} is the same network as {list}[{k}]"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VipConfig {
    pub ipv4_range: String,
    pub ipv6_range: String,
}

impl Default for VipConfig {
    fn default() -> Self {
        VipConfig {
            ipv4_range: "240.240.0.0/16".to_string(),
            ipv6_range: "fd00:240::/96".to_string(),
        }
    }
}

impl VipConfig {
    pub fn v4(&self) -> Ipv4Net {
        self.ipv4_range.parse().expect("validated at start-up")
    }

    pub fn v6(&self) -> Ipv6Net {
        self.ipv6_range.parse().expect("validated at start-up")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostsConfig {
    /// A host leaves every service's endpoints this long after its last
    /// heartbeat.
    pub lease_ttl: Dur,
    /// After this replica starts, hosts that already hold a config get no
    /// update until every joined host has reconnected or this long has
    /// passed. After a control-plane outage longer than `lease_ttl` the
    /// hosts' live records are gone; pushing before they return would take
    /// healthy endpoints out of everyone's config. The default is the lease
    /// TTL plus meshd's longest reconnect backoff (30 s). `0s` turns it off.
    pub startup_hold: Dur,
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig {
            lease_ttl: Dur::from_secs(15),
            startup_hold: Dur::from_secs(45),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// Failed join attempts allowed per source address per `window`.
    pub max_failures: u32,
    pub window: Dur,
    /// Default lifetime of `meshctl token create` without --ttl.
    pub default_token_ttl: Dur,
}

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            max_failures: 5,
            window: Dur::from_secs(60),
            default_token_ttl: Dur::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    pub username: String,
    /// The password is read from this file (never from the command line).
    pub password_file: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "json" or "text".
    pub format: String,
    /// A tracing filter, e.g. "info" or "hostmesh_controller=debug".
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".to_string(),
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

impl ControllerConfig {
    pub fn from_toml(text: &str, path: &str) -> Result<ControllerConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads `path`; a missing file is an error only when `required`.
    pub fn load(path: &Path, required: bool) -> Result<ControllerConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => ControllerConfig::from_toml(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(ControllerConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn store_url(&self) -> Result<StoreUrl, ConfigError> {
        if self.store.is_empty() {
            return Ok(StoreUrl::Embedded(self.data_dir.join("state.redb")));
        }
        self.store
            .parse()
            .map_err(|e: hostmesh_registry::StoreUrlError| invalid("store", e.to_string()))
    }

    pub fn kek_path(&self) -> PathBuf {
        if self.ca.kek_file.is_empty() {
            self.data_dir.join("ca.kek")
        } else {
            PathBuf::from(&self.ca.kek_file)
        }
    }

    pub fn admin_conf_path(&self) -> PathBuf {
        self.data_dir.join("admin.conf")
    }

    /// The URL written into join commands and admin.conf.
    pub fn advertised_url(&self) -> String {
        if !self.advertise_url.is_empty() {
            return self.advertise_url.clone();
        }
        let host = if self.listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            match self.listen.ip() {
                IpAddr::V6(v6) => format!("[{v6}]"),
                IpAddr::V4(v4) => v4.to_string(),
            }
        };
        format!("https://{host}:{}", self.listen.port())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store_url()?;
        if !is_valid_trust_domain(&self.trust_domain) {
            return Err(invalid(
                "trust_domain",
                format!(
                    "{:?} may hold only lowercase letters, digits, '.', '-' and '_'",
                    self.trust_domain
                ),
            ));
        }
        if self.store_prefix.is_empty() {
            return Err(invalid("store_prefix", "must not be empty"));
        }
        let v4: Ipv4Net =
            self.vip.ipv4_range.parse().map_err(|e| {
                invalid("vip.ipv4_range", format!("{:?}: {e}", self.vip.ipv4_range))
            })?;
        if v4.prefix_len() > 30 {
            return Err(invalid(
                "vip.ipv4_range",
                format!("{v4} is too small for services"),
            ));
        }
        let v6: Ipv6Net =
            self.vip.ipv6_range.parse().map_err(|e| {
                invalid("vip.ipv6_range", format!("{:?}: {e}", self.vip.ipv6_range))
            })?;
        if v6.prefix_len() > 126 {
            return Err(invalid(
                "vip.ipv6_range",
                format!("{v6} is too small for services"),
            ));
        }
        let ttl = self.ca.workload_cert_ttl.get();
        if ttl < Duration::from_secs(600) || ttl > Duration::from_secs(90 * 24 * 3600) {
            return Err(invalid(
                "ca.workload_cert_ttl",
                format!("{} is outside 10m..90d", self.ca.workload_cert_ttl),
            ));
        }
        if self.ca.root_ttl.get() < ttl * 2 {
            return Err(invalid(
                "ca.root_ttl",
                "must be at least twice ca.workload_cert_ttl",
            ));
        }
        if self.ca.cert_file.is_empty() != self.ca.key_file.is_empty() {
            return Err(invalid(
                "ca.cert_file",
                "set both ca.cert_file and ca.key_file, or neither",
            ));
        }
        let lease = self.hosts.lease_ttl.get();
        if lease < Duration::from_secs(3) || lease > Duration::from_secs(600) {
            return Err(invalid(
                "hosts.lease_ttl",
                format!("{} is outside 3s..10m", self.hosts.lease_ttl),
            ));
        }
        if self.hosts.startup_hold.get() > Duration::from_secs(600) {
            return Err(invalid(
                "hosts.startup_hold",
                format!("{} is more than 10m", self.hosts.startup_hold),
            ));
        }
        if self.join.max_failures == 0 {
            return Err(invalid("join.max_failures", "must be at least 1"));
        }
        if self.join.window.get().is_zero() {
            return Err(invalid("join.window", "must be more than 0s"));
        }
        if !self.advertise_url.is_empty() && !self.advertise_url.starts_with("https://") {
            return Err(invalid(
                "advertise_url",
                format!("{:?} must start with https://", self.advertise_url),
            ));
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            return Err(invalid("metrics_listen", "must differ from listen"));
        }
        self.mesh.validate()?;
        if !matches!(self.log.format.as_str(), "json" | "text") {
            return Err(invalid(
                "log.format",
                format!("{:?} is not json or text", self.log.format),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ControllerConfig::default().validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_with_the_file_name() {
        let e = ControllerConfig::from_toml("lsten = \"0.0.0.0:1\"\n", "/etc/x.toml").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("/etc/x.toml:"), "{text}");
        assert!(text.contains("lsten"), "{text}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("trust_domain = \"Bad Domain\"", "trust_domain:"),
            ("[vip]\nipv4_range = \"240.240.0.0/33\"", "vip.ipv4_range:"),
            (
                "[ca]\nworkload_cert_ttl = \"1m\"",
                "ca.workload_cert_ttl: 1m is outside",
            ),
            ("[hosts]\nlease_ttl = \"1s\"", "hosts.lease_ttl:"),
            ("[hosts]\nstartup_hold = \"11m\"", "hosts.startup_hold:"),
            ("store = \"mysql://x\"", "store:"),
            ("[ca]\ncert_file = \"/x\"", "ca.cert_file:"),
        ];
        for (toml, want) in cases {
            let cfg = ControllerConfig::from_toml(toml, "t").unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{toml}: {e}");
        }
    }

    #[test]
    fn peer_transport_rules_are_read_and_what_is_wrong_is_named() {
        let text = "[mesh]\ntransport = \"tcp\"\n\n[[mesh.peer_transport]]\nhosts = [\"10.20.0.0/16\"]\npeers = [\"10.30.0.0/16\", \"10.40.0.9\"]\ntransport = \"quic\"\n\n[[mesh.peer_transport]]\npeers = [\"fd00::/64\"]\ntransport = \"auto\"\n";
        let cfg = ControllerConfig::from_toml(text, "t").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.mesh.peer_transport.len(), 2);
        assert_eq!(
            cfg.mesh.peer_transport[0].hosts,
            Some(vec!["10.20.0.0/16".to_string()])
        );
        assert_eq!(cfg.mesh.peer_transport[1].hosts, None);

        let cases = [
            (
                "[[mesh.peer_transport]]\npeers = [\"10.30.0.0/16\"]\ntransport = \"udp\"",
                "mesh.peer_transport[0].transport: \"udp\" is not tcp, quic or auto",
            ),
            (
                "[[mesh.peer_transport]]\npeers = []\ntransport = \"quic\"",
                "mesh.peer_transport[0].peers: names no network",
            ),
            (
                "[[mesh.peer_transport]]\nhosts = []\npeers = [\"10.30.0.0/16\"]\ntransport = \"quic\"",
                "mesh.peer_transport[0].hosts: names no host; leave `hosts` out",
            ),
            (
                "[[mesh.peer_transport]]\npeers = [\"10.30.0.0/16\"]\ntransport = \"quic\"\n[[mesh.peer_transport]]\nhosts = [\"10.20.0.0/16\", \"10.20.0.1/16\"]\npeers = [\"10.30.0.0/16\"]\ntransport = \"tcp\"",
                "mesh.peer_transport[1].hosts[1]: \"10.20.0.1/16\" has bits set past its prefix; the network is 10.20.0.0/16",
            ),
            (
                "[[mesh.peer_transport]]\npeers = [\"db-1\"]\ntransport = \"quic\"",
                "mesh.peer_transport[0].peers[0]: \"db-1\" is neither an address nor a network",
            ),
            (
                "[[mesh.peer_transport]]\npeers = [\"10.30.0.7\", \"10.30.0.7/32\"]\ntransport = \"quic\"",
                "mesh.peer_transport[0].peers[1]: \"10.30.0.7/32\" is the same network as peers[0]",
            ),
        ];
        for (toml, want) in cases {
            let cfg = ControllerConfig::from_toml(toml, "t").unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{toml}: {e}");
        }
        let many = "[[mesh.peer_transport]]\npeers = [\"10.0.0.0/8\"]\ntransport = \"tcp\"\n"
            .repeat(MAX_PEER_TRANSPORT_RULES + 1);
        let e = ControllerConfig::from_toml(&many, "t")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("mesh.peer_transport: 65 rules; at most 64"),
            "{e}"
        );
        // A rule without `peers` or `transport` is refused by the parse,
        // which names the file and the missing key.
        let e = ControllerConfig::from_toml(
            "[[mesh.peer_transport]]\npeers = [\"10.0.0.0/8\"]\n",
            "/etc/c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/etc/c.toml:") && e.contains("transport"),
            "{e}"
        );
    }

    #[test]
    fn advertised_url_falls_back_to_loopback_for_wildcard_listen() {
        let cfg = ControllerConfig::default();
        assert_eq!(cfg.advertised_url(), "https://127.0.0.1:15012");
        let cfg = ControllerConfig {
            listen: "10.1.2.3:15012".parse().unwrap(),
            ..ControllerConfig::default()
        };
        assert_eq!(cfg.advertised_url(), "https://10.1.2.3:15012");
    }
}
