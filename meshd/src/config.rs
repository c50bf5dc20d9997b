//! meshd's configuration: `/etc/hostmesh/meshd.toml`. The file is optional
//! and so is every field: the controller's address, the host's identity
//! and its certificates come from what `meshd join` stored in the state
//! directory. `validate()` runs once at start-up and names the field.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hostmesh_api::duration::Duration as Dur;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/hostmesh/meshd.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hostmesh";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshdConfig {
    /// Keys, certificates, host identity and the last good config.
    pub state_dir: PathBuf,
    /// The address other hosts reach this host on. Empty: the local
    /// address of the route towards the controller.
    pub address: String,
    /// Reported to the controller; empty: the kernel's host name.
    pub hostname: String,
    pub controller: ControllerSection,
    pub admin: AdminSection,
    pub dns: DnsSection,
    pub capture: CaptureSection,
    pub proxy: ProxySection,
    pub health: HealthSection,
    pub log: LogSection,
}

impl Default for MeshdConfig {
    fn default() -> Self {
        MeshdConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            address: String::new(),
            hostname: String::new(),
            controller: ControllerSection::default(),
            admin: AdminSection::default(),
            dns: DnsSection::default(),
            capture: CaptureSection::default(),
            proxy: ProxySection::default(),
            health: HealthSection::default(),
            log: LogSection::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSection {
    /// Overrides the URL stored at join (e.g. after moving the controller).
    pub url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub listen: SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:15000".parse().expect("valid"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    pub enabled: bool,
    /// Where meshd answers; nftables sends local port-53 queries here.
    pub listen: Vec<SocketAddr>,
    /// Redirect local processes' port-53 queries to meshd.
    pub capture: bool,
    /// Resolvers for non-mesh names; empty: those of `resolv_conf`.
    pub upstreams: Vec<SocketAddr>,
    pub resolv_conf: PathBuf,
    pub cache_entries: usize,
    /// TTL of mesh answers.
    pub ttl: Dur,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            enabled: true,
            listen: vec![
                "127.0.0.1:15053".parse().expect("valid"),
                "[::1]:15053".parse().expect("valid"),
            ],
            capture: true,
            upstreams: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            cache_entries: 4096,
            ttl: Dur::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSection {
    /// Install nftables capture (off: only explicit proxy use).
    pub enabled: bool,
    pub table: String,
    /// Firewall mark on meshd's own sockets, so its traffic is never
    /// captured.
    pub mark: u32,
    /// Never captured: SSH by default (the controller's port is added).
    pub exclude_ports: Vec<u16>,
    pub exclude_addrs: Vec<IpAddr>,
    /// Add a route for the VIP ranges when the host has none.
    pub vip_routes: bool,
}

impl Default for CaptureSection {
    fn default() -> Self {
        CaptureSection {
            enabled: true,
            table: "hostmesh".to_string(),
            mark: 0x4d5348,
            exclude_ports: vec![22],
            exclude_addrs: Vec::new(),
            vip_routes: true,
        }
    }
}

pub use crate::tunnel::Transport;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub outbound_port: u16,
    pub tunnel_port: u16,
    /// Which transport to open tunnels with; unset: the mesh's setting
    /// (controller `[mesh] transport`), else TCP.
    pub transport: Option<Transport>,
    /// Accept QUIC tunnels on UDP `tunnel_port`.
    pub quic_listen: bool,
    /// The transport for tunnels to particular peers, over `transport`:
    /// keys are peer tunnel addresses or networks ("10.20.0.0/16",
    /// "10.20.0.7"), values tcp, quic or auto; the most specific network
    /// holding a peer's address decides. For a path where UDP is blocked
    /// or lossy, or one that carries many concurrent connections (QUIC
    /// batches them; docs/BENCHMARKS.md, "Many connections").
    pub peer_transport: BTreeMap<String, Transport>,
    /// Where the local apps listen (meshd connects there for inbound).
    pub app_address: IpAddr,
    pub connect_timeout: Dur,
    /// Open connections get this long to finish at shutdown.
    pub drain_timeout: Dur,
    /// HTTP/2 tunnel connections per peer host at most (`tcp_tunnels =
    /// "multiplexed"`, and peers that only offer HTTP/2).
    pub max_connections_per_peer: usize,
    /// Data-plane workers, each a thread with its own runtime that takes
    /// connections in turn (0: half the cores this process may use, at
    /// least 1 and at most 4; see `data_workers`).
    pub worker_threads: usize,
    /// TCP congestion control for tunnel sockets, both ends (unset: the
    /// system's, `net.ipv4.tcp_congestion_control`). Tunnels are long-lived
    /// and carry every connection between two hosts; with BBR and no `fq`
    /// qdisc the kernel paces each tunnel segment with a timer of its own,
    /// on the sending core (docs/BENCHMARKS.md: "cubic" here carried one
    /// stream 20-50% faster on a host whose default is BBR). Must be one
    /// the kernel offers (`net.ipv4.tcp_available_congestion_control`).
    pub tunnel_congestion: Option<String>,
    /// How tunnels over TCP carry application connections: "dedicated"
    /// (the default) gives each its own TLS connection to the peer, kept
    /// open and reused for the next one (no handshake per connection once
    /// warm, less CPU per byte; as many tunnel connections as concurrent
    /// app connections); "multiplexed" carries them all as HTTP/2 streams
    /// over at most `max_connections_per_peer` connections. Peers that
    /// only offer HTTP/2 get HTTP/2 either way (docs/ARCHITECTURE.md).
    pub tcp_tunnels: TcpTunnels,
    /// Socket redirection between apps and meshd on this host (eBPF
    /// sockmap, `dataplane/src/sockmap`): "off" (the default) keeps loopback
    /// TCP; "auto" uses it when the kernel and meshd's privileges allow and
    /// says why not otherwise; "on" makes a failure to set it up an error.
    /// Off by default: it needs CAP_BPF, which meshd.service does not grant
    /// unless told to, and it is experimental (`dataplane/src/sockmap`, Limits;
    /// figures in docs/BENCHMARKS.md).
    pub sockmap: SockmapMode,
    /// The scheduler slice each data worker thread asks the kernel for
    /// (Linux 6.12+; older kernels keep their default and `meshd status`
    /// says so). Short slices get a woken worker onto its core sooner when
    /// an app is running there; its share of the CPU is unchanged. "0s"
    /// leaves the kernel's default; otherwise 100us to 100ms
    /// (dataplane/src/sched.rs; figures in docs/BENCHMARKS.md, "Scheduler
    /// slice").
    pub scheduler_slice: Dur,
}

/// `proxy.tcp_tunnels`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TcpTunnels {
    #[default]
    Dedicated,
    Multiplexed,
}

/// `proxy.sockmap`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SockmapMode {
    Auto,
    On,
    #[default]
    Off,
}

impl ProxySection {
    /// The number of data workers: the configured one, else chosen
    /// from the CPUs available to this process (affinity and cgroup quota).
    /// meshd shares the host with the apps it proxies; on a 2-core host one
    /// worker did more per CPU second than two (docs/BENCHMARKS.md, "Data
    /// plane": 11% less CPU per request, 5% more requests/s on 32
    /// connections), since a second worker mostly adds wake-ups and lock
    /// hand-offs between threads.
    pub fn data_workers(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        auto_workers(cores)
    }
}

/// The congestion controls the kernel offers, if it says.
fn available_congestion() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").ok()
}

fn check_congestion(cc: &str, available: Option<&str>) -> Result<(), ConfigError> {
    let field = "proxy.tunnel_congestion";
    if cc.is_empty()
        || cc.len() > 15
        || !cc
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            field,
            format!("{cc:?} is not a congestion control name (1-15 of a-z, 0-9, '_')"),
        ));
    }
    if let Some(list) = available
        && !list.split_whitespace().any(|a| a == cc)
    {
        return Err(invalid(
            field,
            format!(
                "{cc:?} is not offered by this kernel (it offers: {}; `modprobe tcp_{cc}` may add it)",
                list.trim()
            ),
        ));
    }
    Ok(())
}

fn auto_workers(cores: usize) -> usize {
    (cores / 2).clamp(1, 4)
}

impl ProxySection {
    /// `peer_transport`, checked.
    pub fn peer_transports(&self) -> Result<crate::tunnel::PeerTransports, ConfigError> {
        crate::tunnel::PeerTransports::new(
            self.peer_transport.iter().map(|(k, &t)| (k.as_str(), t)),
        )
        .map_err(|e| invalid("proxy.peer_transport", e))
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            outbound_port: 15001,
            tunnel_port: 15008,
            transport: None,
            quic_listen: true,
            peer_transport: BTreeMap::new(),
            app_address: "127.0.0.1".parse().expect("valid"),
            connect_timeout: Dur::from_secs(1),
            drain_timeout: Dur::from_secs(10),
            max_connections_per_peer: 4,
            worker_threads: 0,
            tunnel_congestion: None,
            tcp_tunnels: TcpTunnels::Dedicated,
            sockmap: SockmapMode::Off,
            scheduler_slice: Dur(Duration::from_micros(100)),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub interval: Dur,
    pub timeout: Dur,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            interval: Dur::from_secs(5),
            timeout: Dur::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// "json" or "text".
    pub format: String,
    pub level: String,
    /// One JSON line per proxied connection.
    pub access_log: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: "json".to_string(),
            level: "info".to_string(),
            access_log: true,
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

impl MeshdConfig {
    pub fn from_toml(text: &str, path: &str) -> Result<MeshdConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads `path`; a missing file is an error only when `required`.
    pub fn load(path: &Path, required: bool) -> Result<MeshdConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => MeshdConfig::from_toml(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(MeshdConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Ports meshd itself listens on; no mesh service may use them on this
    /// host.
    pub fn own_ports(&self) -> Vec<u16> {
        let mut ports = vec![
            self.proxy.outbound_port,
            self.proxy.tunnel_port,
            self.admin.listen.port(),
        ];
        if self.dns.enabled {
            ports.extend(self.dns.listen.iter().map(|a| a.port()));
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.address.is_empty() && self.address.parse::<IpAddr>().is_err() {
            return Err(invalid(
                "address",
                format!("{:?} is not an IP address", self.address),
            ));
        }
        if !self.controller.url.is_empty() && !self.controller.url.starts_with("https://") {
            return Err(invalid(
                "controller.url",
                format!("{:?} must start with https://", self.controller.url),
            ));
        }
        for (field, port) in [
            ("proxy.outbound_port", self.proxy.outbound_port),
            ("proxy.tunnel_port", self.proxy.tunnel_port),
        ] {
            if port == 0 {
                return Err(invalid(field, "0 is not a port number"));
            }
        }
        if self.proxy.outbound_port == self.proxy.tunnel_port {
            return Err(invalid(
                "proxy.tunnel_port",
                "must differ from proxy.outbound_port",
            ));
        }
        if self.dns.enabled && self.dns.listen.is_empty() {
            return Err(invalid(
                "dns.listen",
                "needs at least one address when dns.enabled",
            ));
        }
        if self.dns.capture && !self.dns.enabled {
            return Err(invalid("dns.capture", "needs dns.enabled"));
        }
        if self.dns.cache_entries > 1_000_000 {
            return Err(invalid("dns.cache_entries", "at most 1000000"));
        }
        if self.capture.mark == 0 {
            return Err(invalid(
                "capture.mark",
                "must not be 0 (unmarked packets carry 0)",
            ));
        }
        let table_ok = !self.capture.table.is_empty()
            && self.capture.table.len() <= 32
            && self
                .capture
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !table_ok {
            return Err(invalid(
                "capture.table",
                format!(
                    "{:?} must be 1-32 letters, digits, '_' or '-'",
                    self.capture.table
                ),
            ));
        }
        if self.proxy.connect_timeout.get() < Duration::from_millis(50) {
            return Err(invalid("proxy.connect_timeout", "must be at least 50ms"));
        }
        if self.proxy.max_connections_per_peer == 0 || self.proxy.max_connections_per_peer > 64 {
            return Err(invalid("proxy.max_connections_per_peer", "must be 1..=64"));
        }
        if self.proxy.worker_threads > 256 {
            return Err(invalid("proxy.worker_threads", "at most 256"));
        }
        let slice = self.proxy.scheduler_slice.get();
        if !slice.is_zero()
            && !(hostmesh_dataplane::sched::MIN_SLICE..=hostmesh_dataplane::sched::MAX_SLICE)
                .contains(&slice)
        {
            return Err(invalid(
                "proxy.scheduler_slice",
                format!(
                    "{} is outside 100us..100ms (\"0s\" leaves the kernel's default)",
                    self.proxy.scheduler_slice
                ),
            ));
        }
        if let Some(cc) = &self.proxy.tunnel_congestion {
            check_congestion(cc, available_congestion().as_deref())?;
        }
        self.proxy.peer_transports()?;
        let interval = self.health.interval.get();
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(300) {
            return Err(invalid(
                "health.interval",
                format!("{} is outside 100ms..5m", self.health.interval),
            ));
        }
        if self.health.timeout.get() >= interval {
            return Err(invalid(
                "health.timeout",
                "must be shorter than health.interval",
            ));
        }
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
    #[test]
    fn data_workers_follow_the_cores_unless_set() {
        assert_eq!(
            [1, 2, 3, 4, 8, 16, 64].map(auto_workers),
            [1, 1, 1, 2, 4, 4, 4]
        );
        let mut proxy = ProxySection {
            worker_threads: 3,
            ..ProxySection::default()
        };
        assert_eq!(proxy.data_workers(), 3);
        proxy.worker_threads = 0;
        assert!((1..=4).contains(&proxy.data_workers()));
    }

    use super::*;

    #[test]
    fn peer_transports_are_read_checked_and_named_when_wrong() {
        let cfg = MeshdConfig::from_toml(
            "[proxy]\ntransport = \"tcp\"\n\n[proxy.peer_transport]\n\"10.20.0.0/16\" = \"quic\"\n\"10.20.0.7\" = \"tcp\"\n",
            "t",
        )
        .unwrap();
        cfg.validate().unwrap();
        let t = cfg.proxy.peer_transports().unwrap();
        assert_eq!(
            t.for_peer("10.20.1.1".parse().unwrap()),
            Some(Transport::Quic)
        );
        assert_eq!(
            t.for_peer("10.20.0.7".parse().unwrap()),
            Some(Transport::Tcp)
        );
        assert_eq!(t.for_peer("10.30.0.1".parse().unwrap()), None);
        // A network that is not one: validate names the field and the key.
        let cfg =
            MeshdConfig::from_toml("[proxy.peer_transport]\n\"db-1\" = \"quic\"\n", "t").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("proxy.peer_transport") && e.contains("\"db-1\""),
            "{e}"
        );
        // A transport that is not one is refused when the file is read,
        // with the line and what is accepted.
        let e = MeshdConfig::from_toml("[proxy.peer_transport]\n\"10.0.0.0/8\" = \"udp\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"10.0.0.0/8\" = \"udp\"")
                && e.contains("expected one of `tcp`, `quic`, `auto`"),
            "{e}"
        );
    }

    #[test]
    fn tunnel_congestion_names_are_checked_against_the_kernel() {
        let offered = Some("reno bbr cubic\n");
        assert!(check_congestion("cubic", offered).is_ok());
        let e = check_congestion("vegas", offered).unwrap_err().to_string();
        assert!(
            e.contains("proxy.tunnel_congestion") && e.contains("reno bbr cubic"),
            "{e}"
        );
        let e = check_congestion("Cubic!", offered).unwrap_err().to_string();
        assert!(e.contains("not a congestion control name"), "{e}");
        assert!(check_congestion("", None).is_err());
        // Without the list (no /proc), a well-formed name is taken.
        assert!(check_congestion("vegas", None).is_ok());
        let cfg = MeshdConfig::from_toml("[proxy]\ntunnel_congestion = \"reno\"\n", "t").unwrap();
        assert_eq!(cfg.proxy.tunnel_congestion.as_deref(), Some("reno"));
        cfg.validate().unwrap();
    }

    #[test]
    fn an_empty_file_is_a_valid_config() {
        let cfg = MeshdConfig::from_toml("", "t").unwrap();
        assert_eq!(cfg, MeshdConfig::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = MeshdConfig::from_toml("[proxy]\noutbond_port = 1\n", "/etc/hostmesh/meshd.toml")
            .unwrap_err();
        assert!(e.to_string().contains("outbond_port"), "{e}");
        for (text, want) in [
            ("address = \"nope\"", "address:"),
            ("[proxy]\ntunnel_port = 15001", "proxy.tunnel_port:"),
            ("[capture]\ntable = \"bad name\"", "capture.table:"),
            (
                "[health]\ninterval = \"1s\"\ntimeout = \"2s\"",
                "health.timeout:",
            ),
            ("[controller]\nurl = \"http://x\"", "controller.url:"),
            (
                "[proxy]\nscheduler_slice = \"50us\"",
                "proxy.scheduler_slice:",
            ),
            (
                "[proxy]\nscheduler_slice = \"1s\"",
                "proxy.scheduler_slice:",
            ),
        ] {
            let e = MeshdConfig::from_toml(text, "t")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_scheduler_slice_is_100us_unless_set_and_0s_leaves_the_kernels() {
        let cfg = MeshdConfig::from_toml("", "t").unwrap();
        assert_eq!(cfg.proxy.scheduler_slice.get(), Duration::from_micros(100));
        for (text, want) in [
            ("0s", Duration::ZERO),
            ("100ms", Duration::from_millis(100)),
            ("250us", Duration::from_micros(250)),
        ] {
            let cfg =
                MeshdConfig::from_toml(&format!("[proxy]\nscheduler_slice = \"{text}\"\n"), "t")
                    .unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.proxy.scheduler_slice.get(), want);
        }
        let e = MeshdConfig::from_toml("[proxy]\nscheduler_slice = \"99us\"\n", "t")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("99us is outside 100us..100ms"), "{e}");
    }

    #[test]
    fn sockmap_takes_auto_on_or_off() {
        let cfg = MeshdConfig::from_toml("", "t").unwrap();
        assert_eq!(cfg.proxy.sockmap, SockmapMode::Off);
        for (text, want) in [("on", SockmapMode::On), ("auto", SockmapMode::Auto)] {
            let cfg =
                MeshdConfig::from_toml(&format!("[proxy]\nsockmap = {text:?}\n"), "t").unwrap();
            assert_eq!(cfg.proxy.sockmap, want);
        }
        let e = MeshdConfig::from_toml("[proxy]\nsockmap = \"yes\"\n", "/etc/hostmesh/meshd.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sockmap") && e.contains("yes"), "{e}");
    }
}
