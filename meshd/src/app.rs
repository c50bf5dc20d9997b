//! Putting meshd together. `main` parses flags, builds the two runtimes and
//! calls [`Meshd::start`]; tests do the same in-process.
//!
//! Two runtimes keep control work off the data path (ztunnel's layout): the
//! data workers (current-thread runtimes, `workers.rs`) run the outbound
//! listener, the tunnel server and client, and DNS; the control runtime (one thread) runs
//! the controller session, certificate renewal, health checks, capture
//! updates and the admin port.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hostmesh_api::clock::SharedClock;
use hostmesh_api::proto::HostStatus;
use ipnet::IpNet;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::admin::readiness::{Readiness, TaskGuard};
use crate::admin::{self, AdminState, CaptureStatus};
use crate::capture::{self, CaptureSpec};
use crate::config::{MeshdConfig, SockmapMode, TcpTunnels};
use crate::control::{self, Control, ControlMetrics};
use crate::dns::{DnsConfig, DnsMetrics, DnsServer, NameTable};
use crate::drain::{self, DrainTrigger};
use crate::health::{self, HealthSettings};
use crate::identity::Identity;
use crate::identity::store::{StateDir, lookup_user};
use crate::liveness::Liveness;
use crate::mesh::{HostLimits, MeshHandle, MeshState};
use crate::proxy::ProxyMetrics;
use crate::proxy::inbound::Inbound;
use crate::proxy::lb::{Balancer, OutlierSettings};
use crate::proxy::outbound::{self, Outbound};
use crate::sockmap::{self, Accel};
use crate::tunnel::dedicated::DedicatedPool;
use crate::tunnel::hbone::{Pool, PoolSettings};
use crate::tunnel::quic::QuicPool;
use crate::tunnel::server::{self as tunnel_server, ServerSettings};
use crate::tunnel::{TlsConfigs, Tunnels};
use crate::workers::Workers;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the runtimes are, and knobs tests need.
pub struct Runtimes {
    /// The first data worker: the accept loops, DNS, and connections.
    pub data: Handle,
    /// Further data workers (current-thread runtimes on their own threads)
    /// that take connections from the accept loops in turn.
    pub workers: Vec<Handle>,
    pub control: Handle,
    /// The scheduler slice the data workers got (`proxy.scheduler_slice`),
    /// as `meshd status` shows it.
    pub data_slice: String,
    /// What `meshd run` did about glibc's slow copies
    /// ([`crate::memcpy`]), in words.
    pub memcpy: String,
}

pub struct Meshd {
    pub admin_addr: SocketAddr,
    pub outbound_addrs: Vec<SocketAddr>,
    pub tunnel_addr: SocketAddr,
    pub dns_addrs: Vec<SocketAddr>,
    pub readiness: Readiness,
    pub mesh: Arc<MeshHandle>,
    pub identity: Arc<Identity>,
    pub control: Arc<Control>,
    pub pool: Arc<Pool>,
    /// What the systemd watchdog checks before each ping.
    pub liveness: Liveness,
    config: MeshdConfig,
    drain: DrainTrigger,
    shutdown: watch::Sender<bool>,
    dns: Option<DnsServer>,
    /// Held until meshd is dropped (after the drain): the redirected
    /// connections need the programs and maps to the end.
    _sockmap: Option<Arc<Accel>>,
}

/// Socket redirection as set up at start, and why not if it is not.
#[derive(Clone, Debug)]
pub struct SockmapStatus {
    pub accel: Option<Arc<Accel>>,
    pub note: String,
}

/// Sets up socket redirection per `proxy.sockmap`: a failure is an error
/// with "on", a warning (and loopback TCP) with "auto".
fn start_sockmap(config: &MeshdConfig, app_addresses: &[IpAddr]) -> anyhow::Result<SockmapStatus> {
    let mode = config.proxy.sockmap;
    if mode == SockmapMode::Off {
        return Ok(SockmapStatus {
            accel: None,
            note: "off: proxy.sockmap = \"off\"".to_string(),
        });
    }
    let settings = sockmap::Settings {
        mark: config.capture.mark,
        outbound_port: config.proxy.outbound_port,
        app_addresses: app_addresses.to_vec(),
        cgroup: None,
    };
    match Accel::start(&settings) {
        Ok(accel) => {
            tracing::info!(cgroup = %accel.cgroup().display(), "socket redirection on: bytes between apps and meshd skip loopback TCP");
            Ok(SockmapStatus {
                note: format!("on (cgroup {})", accel.cgroup().display()),
                accel: Some(Arc::new(accel)),
            })
        }
        Err(e) if mode == SockmapMode::On => {
            Err(anyhow::Error::new(e)
                .context("setting up socket redirection (proxy.sockmap = \"on\")"))
        }
        Err(e) => {
            tracing::warn!(error = %e, "socket redirection unavailable; apps reach meshd over loopback TCP (proxy.sockmap = \"off\" silences this)");
            Ok(SockmapStatus {
                accel: None,
                note: format!("off: {e}"),
            })
        }
    }
}

/// The local address of the route towards `url`'s host: the address other
/// hosts most likely reach this one on.
pub async fn address_towards(url: &str) -> Option<IpAddr> {
    let (host, port) = hostmesh_api::connect::parse_url(url).ok()?;
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .ok()?
        .next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(target).ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn bind_outbound(port: u16) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = vec![
        TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding the outbound listener 127.0.0.1:{port}"))?,
    ];
    // IPv6 capture redirects to ::1; a host without IPv6 loopback only
    // loses IPv6 capture.
    match TcpListener::bind(("::1", port)).await {
        Ok(l) => listeners.push(l),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 outbound listener; IPv6 connections are not captured")
        }
    }
    Ok(listeners)
}

fn capture_spec(
    config: &MeshdConfig,
    state: &MeshState,
    controller: Option<SocketAddr>,
) -> CaptureSpec {
    let vip_ranges: Vec<IpNet> = state
        .me
        .as_ref()
        .map(|m| m.vip_ranges.clone())
        .unwrap_or_default();
    let my_services: Vec<(String, String)> = state
        .me
        .as_ref()
        .map(|m| m.services.clone())
        .unwrap_or_default();
    let mut endpoints: Vec<SocketAddr> = state
        .by_endpoint
        .iter()
        .filter(|(_, (svc, _))| !my_services.contains(&(svc.namespace.clone(), svc.name.clone())))
        .map(|(addr, _)| *addr)
        .collect();
    endpoints.sort();
    let mut strict_ports: Vec<u16> = state
        .served
        .iter()
        .filter(|(_, s)| s.mtls == hostmesh_api::resource::MtlsMode::Strict)
        .map(|(p, _)| *p)
        .collect();
    strict_ports.sort_unstable();
    let mut exclude_ports = config.capture.exclude_ports.clone();
    let mut exclude_addrs = config.capture.exclude_addrs.clone();
    if let Some(c) = controller {
        exclude_ports.push(c.port());
        exclude_addrs.push(c.ip());
    }
    exclude_ports.sort_unstable();
    exclude_ports.dedup();
    exclude_addrs.sort();
    exclude_addrs.dedup();
    CaptureSpec {
        table: config.capture.table.clone(),
        mark: config.capture.mark,
        outbound_port: config.proxy.outbound_port,
        dns_port: (config.dns.enabled && config.dns.capture)
            .then(|| config.dns.listen.first().map(|a| a.port()))
            .flatten(),
        vip_ranges,
        endpoints,
        strict_ports,
        tunnel_port: config.proxy.tunnel_port,
        exclude_ports,
        exclude_addrs,
    }
}

impl Meshd {
    pub async fn start(
        config: MeshdConfig,
        clock: SharedClock,
        rt: Runtimes,
    ) -> anyhow::Result<Meshd> {
        config.validate()?;
        hostmesh_api::tls::install_default_provider();
        let owner = lookup_user("meshd");
        let state_dir = StateDir::new(config.state_dir.clone(), owner);
        let mark = config.capture.enabled.then_some(config.capture.mark);
        let url_override =
            (!config.controller.url.is_empty()).then(|| config.controller.url.clone());
        let identity = Identity::load(state_dir.clone(), clock.clone(), url_override, mark)
            .context("loading this host's identity")?;
        let host = identity.host().clone();
        tracing::info!(host = %host.host_id, identity = %host.spiffe_id, controller = %identity.controller_url(), "starting meshd");

        let mut registry = Registry::with_prefix("hostmesh_meshd");
        let proxy_metrics = ProxyMetrics::new(&mut registry);
        let control_metrics = ControlMetrics::new(registry.sub_registry_with_prefix("control"));
        let dns_metrics = DnsMetrics::new(registry.sub_registry_with_prefix("dns"));
        let readiness = Readiness::default();
        let config_ready = readiness.register("config");
        let capture_ready = readiness.register("capture");
        let listeners_ready = readiness.register("listeners");

        let controller_addr = match hostmesh_api::connect::parse_url(identity.controller_url()) {
            Ok((h, p)) => tokio::net::lookup_host((h.as_str(), p))
                .await
                .ok()
                .and_then(|mut a| a.next()),
            Err(_) => None,
        };
        let address = if config.address.is_empty() {
            address_towards(identity.controller_url())
                .await
                .context("finding this host's address (set `address` in meshd.toml)")?
        } else {
            config.address.parse()?
        };
        let status = HostStatus {
            address: address.to_string(),
            tunnel_port: u32::from(config.proxy.tunnel_port),
            quic: false,
            ports: Vec::new(),
            hostname: if config.hostname.is_empty() {
                hostname()
            } else {
                config.hostname.clone()
            },
            meshd_version: VERSION.to_string(),
        };
        let (status_tx, status_rx) = watch::channel(status);

        let mesh = Arc::new(MeshHandle::default());
        let limits = HostLimits {
            host_id: host.host_id.clone(),
            trust_domain: host.trust_domain.clone(),
            own_ports: config.own_ports(),
            address: Some(address),
        };
        let control = Control::new(
            identity.clone(),
            state_dir.clone(),
            limits,
            mesh.clone(),
            status_rx,
            control_metrics,
        );
        if control.load_persisted().is_some() {
            drop(config_ready);
        } else {
            // Ready once the controller's first update is in use.
            let mut versions = mesh.subscribe();
            let mesh2 = mesh.clone();
            rt.control.spawn(async move {
                let _ = versions.wait_for(|_| mesh2.is_loaded()).await.is_ok();
                drop(config_ready);
            });
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (drain_trigger, drain) = drain::new();
        let liveness = Liveness::default();

        // DNS answers from the first instant: forwarding needs no config.
        let names = watch::channel(Arc::new(if mesh.is_loaded() {
            name_table(&mesh.load())
        } else {
            NameTable::default()
        }));
        let dns = if config.dns.enabled {
            let upstreams = if config.dns.upstreams.is_empty() {
                match crate::dns::read_resolv_conf(&config.dns.resolv_conf) {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!(error = %e, "no upstream resolvers; only mesh names will resolve");
                        Vec::new()
                    }
                }
            } else {
                config.dns.upstreams.clone()
            };
            let dns_config = DnsConfig {
                listen: config.dns.listen.clone(),
                upstreams,
                mark,
                cache_entries: config.dns.cache_entries,
                mesh_ttl: u32::try_from(config.dns.ttl.get().as_secs()).unwrap_or(30),
            };
            let names_rx = names.1.clone();
            let dns = rt
                .data
                .spawn(async move { DnsServer::start(dns_config, names_rx, dns_metrics).await })
                .await
                .context("starting DNS")?
                .context("starting DNS")?;
            Some(dns)
        } else {
            None
        };
        let dns_addrs = dns.as_ref().map(|d| d.local_addrs()).unwrap_or_default();

        // Tunnels.
        let tls = TlsConfigs::new(identity.clone()).context("building tunnel TLS")?;
        rt.control.spawn(tls.clone().follow());
        let pool_settings = PoolSettings {
            connect_timeout: config.proxy.connect_timeout.get(),
            max_connections: config.proxy.max_connections_per_peer,
            mark,
            congestion: config.proxy.tunnel_congestion.clone(),
            ..PoolSettings::default()
        };
        let pool = Arc::new(Pool::new(tls.clone(), pool_settings.clone()));
        let dedicated = match config.proxy.tcp_tunnels {
            TcpTunnels::Dedicated => Some(Arc::new(DedicatedPool::new(tls.clone(), pool_settings))),
            TcpTunnels::Multiplexed => None,
        };
        {
            let pool = pool.clone();
            let dedicated = dedicated.clone();
            rt.data.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(30));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let closed = pool.sweep() + dedicated.as_ref().map_or(0, |d| d.sweep());
                    if closed > 0 {
                        tracing::debug!(closed, "idle tunnel connections closed");
                    }
                }
            });
        }
        let quic_pool = {
            let identity = identity.clone();
            let timeout = config.proxy.connect_timeout.get();
            rt.data
                .spawn(async move { QuicPool::new(identity, mark, timeout) })
                .await?
                .context("opening the QUIC client socket")?
        };
        let tunnels = Arc::new(Tunnels {
            h2: pool.clone(),
            dedicated,
            quic: Some(Arc::new(quic_pool)),
        });
        let balancer = Arc::new(Balancer::new(OutlierSettings::default()));
        let app_addresses = if config.proxy.app_address == address {
            vec![address]
        } else {
            vec![config.proxy.app_address, address]
        };
        let sockmap = if config.capture.enabled {
            start_sockmap(&config, &app_addresses)?
        } else {
            SockmapStatus {
                accel: None,
                note: "off: capture is disabled".to_string(),
            }
        };
        let peer_transport = Arc::new(config.proxy.peer_transports()?);
        let outbound = Arc::new(Outbound {
            sockmap: sockmap.accel.clone(),
            mesh: mesh.clone(),
            tunnels: tunnels.clone(),
            transport: config.proxy.transport,
            peer_transport: peer_transport.clone(),
            balancer: balancer.clone(),
            metrics: proxy_metrics.clone(),
            me: identity.spiffe_id().clone(),
            access_log: config.log.access_log,
        });
        let inbound = Arc::new(Inbound {
            sockmap: sockmap.accel.clone(),
            mesh: mesh.clone(),
            metrics: proxy_metrics.clone(),
            app_addresses: app_addresses.clone(),
            connect_timeout: config.proxy.connect_timeout.get(),
            mark,
            access_log: config.log.access_log,
            drain: drain.clone(),
        });
        let tunnel_listener = {
            let port = config.proxy.tunnel_port;
            let std =
                bind_dual_stack(port).with_context(|| format!("binding the tunnel port {port}"))?;
            rt.data
                .spawn(async move { TcpListener::from_std(std) })
                .await??
        };
        let tunnel_addr = tunnel_listener.local_addr()?;
        let workers = Workers::new(rt.data.clone(), rt.workers.clone());
        let outbound_listeners = {
            let port = config.proxy.outbound_port;
            rt.data
                .spawn(async move { bind_outbound(port).await })
                .await??
        };
        let outbound_addrs: Vec<SocketAddr> = outbound_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        for l in outbound_listeners {
            rt.data.spawn(liveness.track(
                "outbound accept loop",
                outbound::serve(l, outbound.clone(), workers.clone(), drain.clone()),
            ));
        }
        let handler: tunnel_server::Handler = {
            let inbound = inbound.clone();
            Arc::new(move |req| {
                let inbound = inbound.clone();
                Box::pin(async move { inbound.handle(req).await })
            })
        };
        rt.data.spawn(liveness.track(
            "tunnel accept loop",
            tunnel_server::serve(
                tunnel_listener,
                workers.clone(),
                tls.clone(),
                ServerSettings {
                    congestion: config.proxy.tunnel_congestion.clone(),
                    offer_dedicated: config.proxy.tcp_tunnels == TcpTunnels::Dedicated,
                    ..ServerSettings::default()
                },
                handler.clone(),
                drain.clone(),
                proxy_metrics.handshake_failures.clone(),
            ),
        ));
        if config.proxy.quic_listen {
            let socket = crate::tunnel::quic::udp_socket(config.proxy.tunnel_port, mark)
                .with_context(|| {
                    format!(
                        "binding the QUIC tunnel port udp/{}",
                        config.proxy.tunnel_port
                    )
                })?;
            let endpoint = rt
                .data
                .spawn({
                    let identity = identity.clone();
                    async move { crate::tunnel::quic::server_endpoint(&identity, socket) }
                })
                .await?
                .context("starting the QUIC tunnel server")?;
            // Certificates rotate through the shared resolver; a new trust
            // bundle needs a new server config.
            {
                let endpoint = endpoint.clone();
                let identity = identity.clone();
                let mut changes = identity.changes();
                rt.control.spawn(async move {
                    while changes.changed().await.is_ok() {
                        match crate::tunnel::quic::server_config(&identity) {
                            Ok(c) => endpoint.set_server_config(Some(c)),
                            Err(e) => {
                                tracing::error!(error = %e, "rebuilding the QUIC TLS config failed")
                            }
                        }
                    }
                });
            }
            rt.data.spawn(liveness.track(
                "QUIC tunnel accept loop",
                tunnel_server::serve_quic(
                    endpoint,
                    handler,
                    drain.clone(),
                    proxy_metrics.handshake_failures.clone(),
                ),
            ));
            status_tx.send_modify(|s| s.quic = true);
        }
        drop(listeners_ready);

        // Capture: the table goes in now (replacing a stale one), and
        // follows every config change.
        let (capture_tx, capture_rx) = watch::channel(CaptureStatus::default());

        if config.capture.enabled {
            let state = mesh.load();
            let spec = capture_spec(&config, &state, controller_addr);
            capture::apply(&spec)
                .await
                .context("installing the nftables capture rules")?;
            if config.capture.vip_routes
                && !spec.vip_ranges.is_empty()
                && let Err(e) = capture::ensure_vip_routes(&spec.vip_ranges).await
            {
                tracing::warn!(error = %e, "adding routes for the VIP ranges failed");
            }
            let loaded = mesh.is_loaded();
            capture_tx.send_replace(CaptureStatus {
                version: loaded.then_some(state.version),
                lines: capture::describe(&spec),
            });
            tracing::info!(table = %spec.table, "capture installed");
            if let Some(accel) = &sockmap.accel
                && let Err(e) = accel.set_vip_ranges(&spec.vip_ranges)
            {
                tracing::warn!(error = %e, "setting the VIP ranges of socket redirection failed; VIP connections use TCP");
            }
            // Not ready until the rules reflect a config from the
            // controller (or the persisted one): before that, no VIP is
            // captured and a client would be refused.
            let pending = (!loaded).then_some(capture_ready);
            rt.control.spawn(follow_capture(
                config.clone(),
                mesh.clone(),
                controller_addr,
                (spec, sockmap.accel.clone()),
                capture_tx,
                pending,
                shutdown_rx.clone(),
            ));
        } else {
            capture_tx.send_replace(CaptureStatus {
                version: None,
                lines: vec!["capture disabled (capture.enabled = false)".to_string()],
            });
            drop(capture_ready);
        }

        // Names and load-balancer state follow the config.
        {
            let mesh2 = mesh.clone();
            let names_tx = names.0;
            let balancer = balancer.clone();
            let mut versions = mesh.subscribe();
            rt.control.spawn(async move {
                while versions.changed().await.is_ok() {
                    let state = mesh2.load();
                    names_tx.send_replace(Arc::new(name_table(&state)));
                    let live: std::collections::HashSet<String> = state
                        .services
                        .values()
                        .flat_map(|s| s.endpoints.iter().map(|e| e.host_id.to_string()))
                        .collect();
                    balancer.retain(|h| live.contains(h));
                }
            });
        }

        rt.control.spawn(health::run(
            mesh.clone(),
            HealthSettings {
                app_addresses,
                interval: config.health.interval.get(),
                timeout: config.health.timeout.get(),
            },
            status_tx,
            shutdown_rx.clone(),
        ));
        rt.control.spawn(control.clone().run(shutdown_rx.clone()));
        rt.control
            .spawn(control::renew_loop(identity.clone(), shutdown_rx.clone()));

        let admin_listener = {
            let addr = config.admin.listen;
            rt.control
                .spawn(async move { TcpListener::bind(addr).await })
                .await?
                .with_context(|| format!("binding the admin port {}", config.admin.listen))?
        };
        let admin_addr = admin_listener.local_addr()?;
        if let Some(accel) = &sockmap.accel {
            registry.register_collector(Box::new(admin::SockmapCollector(accel.clone())));
        }
        let admin_state = Arc::new(AdminState {
            registry,
            mesh: mesh.clone(),
            control: control.clone(),
            identity: identity.clone(),
            readiness: readiness.clone(),
            tunnels: tunnels.clone(),
            capture: capture_rx,
            sockmap: sockmap.clone(),
            transport: config.proxy.transport,
            peer_transport,
            scheduler_slice: rt.data_slice.clone(),
            memcpy: rt.memcpy.clone(),
            config_json: serde_json::to_value(&config).unwrap_or_default(),
        });
        rt.control
            .spawn(admin::serve(admin_listener, admin_state, shutdown_rx));
        Ok(Meshd {
            admin_addr,
            outbound_addrs,
            tunnel_addr,
            dns_addrs,
            readiness,
            mesh,
            identity,
            control,
            pool,
            config,
            drain: drain_trigger,
            shutdown: shutdown_tx,
            dns,
            liveness,
            _sockmap: sockmap.accel,
        })
    }

    /// SIGTERM: stop accepting, let open connections finish (bounded),
    /// close the controller session (the host leaves its services at once),
    /// remove the capture table and routes.
    pub async fn shutdown(self) {
        self.liveness.stopping();
        tracing::info!(open = self.drain.active(), "draining");
        self.drain.start();
        let left = self
            .drain
            .wait_idle(self.config.proxy.drain_timeout.get())
            .await;
        if left > 0 {
            tracing::warn!(connections = left, "drain timeout: closing the rest");
        }
        let _ = self.shutdown.send(true);
        if let Some(dns) = self.dns {
            dns.shutdown().await;
        }
        if self.config.capture.enabled {
            match capture::remove(&self.config.capture.table).await {
                Ok(_) => tracing::info!("capture removed"),
                Err(e) => {
                    tracing::error!(error = %e, "removing the capture table failed; run `meshd cleanup`")
                }
            }
            if let Err(e) = capture::remove_vip_routes().await {
                tracing::warn!(error = %e, "removing VIP routes failed");
            }
        }
        // Give the session a moment to close cleanly.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn name_table(state: &MeshState) -> NameTable {
    NameTable {
        loaded: true,
        domain: "mesh".to_string(),
        own_namespace: state
            .me
            .as_ref()
            .map(|m| m.namespace.clone())
            .unwrap_or_default(),
        services: state.dns_names(),
    }
}

/// The tunnel listener: IPv6 wildcard accepting IPv4 too where possible.
fn bind_dual_stack(port: u16) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
        Ok(s)
    });
    let socket = match v6 {
        Ok(s) => s,
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0u8; 4], port)).into())?;
            s
        }
    };
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn follow_capture(
    config: MeshdConfig,
    mesh: Arc<MeshHandle>,
    controller: Option<SocketAddr>,
    // The rules in place, and socket redirection (its VIP ranges follow
    // the rules').
    (installed, sockmap): (CaptureSpec, Option<Arc<Accel>>),
    status: watch::Sender<CaptureStatus>,
    mut first_config: Option<TaskGuard>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut versions = mesh.subscribe();
    let mut digest = installed.digest();
    let mut vip_ranges = installed.vip_ranges;
    loop {
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            _ = crate::drain::wait_true(&mut shutdown) => return,
        }
        let state = mesh.load();
        let spec = capture_spec(&config, &state, controller);
        let new_digest = spec.digest();
        if new_digest == digest {
            status.send_modify(|s| s.version = Some(state.version));
            first_config.take();
            continue;
        }
        match capture::apply(&spec).await {
            Ok(()) => {
                if config.capture.vip_routes
                    && spec.vip_ranges != vip_ranges
                    && !spec.vip_ranges.is_empty()
                    && let Err(e) = capture::ensure_vip_routes(&spec.vip_ranges).await
                {
                    tracing::warn!(error = %e, "adding routes for the VIP ranges failed");
                }
                status.send_replace(CaptureStatus {
                    version: Some(state.version),
                    lines: capture::describe(&spec),
                });
                tracing::info!(version = state.version, endpoints = spec.endpoints.len(), strict_ports = ?spec.strict_ports, "capture rules updated");
                if let Some(accel) = &sockmap
                    && let Err(e) = accel.set_vip_ranges(&spec.vip_ranges)
                {
                    tracing::warn!(error = %e, "updating the VIP ranges of socket redirection failed; new ranges use TCP");
                }
                digest = new_digest;
                vip_ranges = spec.vip_ranges;
                first_config.take();
            }
            Err(e) => {
                tracing::error!(error = %e, "updating the capture rules failed; the previous rules stay")
            }
        }
    }
}
