//! Putting the controller together: store, CA, state view, gRPC and
//! metrics ports. `main` parses flags and calls [`Controller::start`];
//! tests do the same in-process with port 0.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hostmesh_api::clock::SharedClock;
use hostmesh_api::pki::CertInfo;
use hostmesh_api::proto::hosts_server::HostsServer;
use hostmesh_api::proto::identity_server::IdentityServer;
use hostmesh_api::proto::operator_server::OperatorServer;
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::{self, Expect, SpiffeClientVerifier, SwappableCert};
use hostmesh_registry::SharedStore;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin_conf::{self, AdminCredential};
use crate::ca::{CaSettings, CertificateAuthority, ExternalCa};
use crate::config::ControllerConfig;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::ratelimit::FailureLimiter;
use crate::resources::Resources;
use crate::server::{self, SwappableServerConfig};
use crate::sessions::SnapshotCache;
use crate::state::{self, ClusterState};

/// What every request handler shares.
pub struct Shared {
    pub config: ControllerConfig,
    pub store: SharedStore,
    pub keys: Keys,
    pub resources: Resources,
    pub ca: Arc<CertificateAuthority>,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub ready: watch::Receiver<bool>,
    /// Bumped after the CA view changed (rotation), so sessions push the
    /// new bundle.
    pub ca_generation: watch::Receiver<u64>,
    pub limiter: FailureLimiter,
    pub clock: SharedClock,
    pub metrics: Metrics,
    pub snapshots: SnapshotCache,
    pub shutdown: watch::Receiver<bool>,
    /// "hostname/pid", recorded in host live records.
    pub replica: String,
    /// When this replica started: the origin of `hosts.startup_hold`.
    pub started: tokio::time::Instant,
}

impl Shared {
    pub fn vip_ranges(&self) -> Vec<String> {
        vec![
            self.config.vip.ipv4_range.clone(),
            self.config.vip.ipv6_range.clone(),
        ]
    }
}

pub struct Controller {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    grpc_task: tokio::task::JoinHandle<()>,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Controller {
    pub async fn start(config: ControllerConfig, clock: SharedClock) -> anyhow::Result<Controller> {
        config.validate()?;
        tls::install_default_provider();
        create_private_dir(&config.data_dir)?;
        let store_url = config.store_url()?;
        let store = open_store(&config, &store_url).await?;
        tracing::info!(store = %store_url, "store opened");
        let keys = Keys::new(&config.store_prefix);
        let settings = CaSettings {
            trust_domain: config.trust_domain.clone(),
            workload_ttl: config.ca.workload_cert_ttl.get(),
            root_ttl: config.ca.root_ttl.get(),
        };
        let external = (!config.ca.cert_file.is_empty()).then(|| ExternalCa {
            cert_file: config.ca.cert_file.clone().into(),
            key_file: config.ca.key_file.clone().into(),
            bundle_file: (!config.ca.bundle_file.is_empty())
                .then(|| config.ca.bundle_file.clone().into()),
        });
        let ca = CertificateAuthority::bootstrap(
            &*store,
            &keys,
            settings,
            &config.kek_path(),
            external,
            clock.clone(),
        )
        .await
        .context("starting the certificate authority")?;

        let (state_rx, ready_rx) = state::start(store.clone(), keys.clone());
        let mut registry = Registry::with_prefix("hostmesh_controller");
        let metrics = Metrics::new(&mut registry);
        let registry = Arc::new(registry);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (ca_gen_tx, ca_gen_rx) = watch::channel(0u64);

        let grpc_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the gRPC port {}", config.listen))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let metrics_listener = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("binding the metrics port {}", config.metrics_listen))?;
        let metrics_addr = metrics_listener.local_addr()?;

        let resources = Resources::new(
            store.clone(),
            keys.clone(),
            config.vip.v4(),
            config.vip.v6(),
        );
        let limiter = FailureLimiter::new(config.join.max_failures, config.join.window.get());
        let shared = Arc::new(Shared {
            config: config.clone(),
            store: store.clone(),
            keys: keys.clone(),
            resources,
            ca: ca.clone(),
            state: state_rx.clone(),
            ready: ready_rx.clone(),
            ca_generation: ca_gen_rx,
            limiter,
            clock: clock.clone(),
            metrics,
            snapshots: SnapshotCache::default(),
            shutdown: shutdown_rx.clone(),
            replica: format!("{}/{}", hostname(), std::process::id()),
            started: tokio::time::Instant::now(),
        });

        // The controller's own certificate and the admin credential.
        let server_cert = SwappableCert::new(issue_server_cert(&shared, grpc_addr)?);
        let tls_config = SwappableServerConfig::new(server_tls(&shared, server_cert.clone())?);
        refresh_admin_credential(&shared, grpc_addr)?;

        tokio::spawn(follow_ca(
            shared.clone(),
            server_cert.clone(),
            tls_config.clone(),
            grpc_addr,
            ca_gen_tx,
        ));

        let incoming = server::tls_incoming(grpc_listener, tls_config);
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .add_service(
                OperatorServer::new(server::operator::OperatorService::new(shared.clone()))
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(256 * 1024 * 1024),
            )
            .add_service(
                IdentityServer::new(server::identity::IdentityService::new(shared.clone()))
                    .max_decoding_message_size(1024 * 1024),
            )
            .add_service(
                HostsServer::new(server::hosts::HostsService::new(shared.clone()))
                    .max_decoding_message_size(16 * 1024 * 1024)
                    .max_encoding_message_size(256 * 1024 * 1024),
            );
        let mut stop = shutdown_rx.clone();
        let grpc_task = tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        tokio::spawn(crate::http::serve(
            metrics_listener,
            registry,
            ready_rx.clone(),
            shutdown_rx.clone(),
        ));
        {
            let shared = shared.clone();
            let mut state = state_rx.clone();
            tokio::spawn(async move {
                while state.changed().await.is_ok() {
                    let rev = state.borrow().revision;
                    shared.metrics.state_revision.set(rev);
                }
            });
        }
        tracing::info!(%grpc_addr, %metrics_addr, trust_domain = %config.trust_domain, "controller serving");
        Ok(Controller {
            grpc_addr,
            metrics_addr,
            shared,
            shutdown_tx,
            grpc_task,
        })
    }

    /// Waits until the store view is loaded.
    pub async fn wait_ready(&self) {
        let mut ready = self.shared.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Stops accepting, ends host sessions (their leases are left to
    /// expire so hosts can move to another replica without flapping), and
    /// waits a bounded time for the rest.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.grpc_task).await;
    }
}

async fn open_store(
    config: &ControllerConfig,
    url: &hostmesh_registry::StoreUrl,
) -> anyhow::Result<SharedStore> {
    let etcd = &config.etcd;
    let tls = (!etcd.ca_file.is_empty()).then(|| hostmesh_registry::etcd::EtcdTls {
        ca_file: etcd.ca_file.clone().into(),
        cert_file: (!etcd.cert_file.is_empty()).then(|| etcd.cert_file.clone().into()),
        key_file: (!etcd.key_file.is_empty()).then(|| etcd.key_file.clone().into()),
    });
    let credentials = if etcd.username.is_empty() {
        None
    } else {
        let password = std::fs::read_to_string(&etcd.password_file)
            .with_context(|| format!("reading etcd.password_file {:?}", etcd.password_file))?;
        Some(hostmesh_registry::etcd::EtcdCredentials {
            username: etcd.username.clone(),
            password: password.trim_end_matches('\n').to_string(),
        })
    };
    hostmesh_registry::open_store(url, tls, credentials)
        .await
        .with_context(|| format!("opening the store {url}"))
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let mut perms = std::fs::metadata(dir)?.permissions();
    if perms.mode() & 0o077 != 0 {
        perms.set_mode(0o700);
        std::fs::set_permissions(dir, perms)
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    Ok(())
}

/// The controller's serving certificate: its SPIFFE ID (what hosts and
/// meshctl check) plus DNS and IP names for other tools.
fn issue_server_cert(
    shared: &Shared,
    grpc_addr: SocketAddr,
) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let id = SpiffeId::controller(&shared.config.trust_domain);
    let mut dns = vec!["localhost".to_string()];
    let host = hostname();
    if host != "localhost" && is_dns_name(&host) {
        dns.push(host);
    }
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
    if !grpc_addr.ip().is_unspecified() && !ips.contains(&grpc_addr.ip()) {
        ips.push(grpc_addr.ip());
    }
    for name in &shared.config.server_names {
        match name.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.contains(name) => dns.push(name.clone()),
            Err(_) => {}
        }
    }
    let ttl = shared.config.ca.workload_cert_ttl.get();
    let (issued, key_pem) =
        shared
            .ca
            .issue_with_new_key(&id, "hostmesh-controller", &dns, &ips, ttl)?;
    Ok(tls::certified_key(
        &issued.chain_pem,
        &key_pem,
        "controller certificate",
    )?)
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn server_tls(shared: &Shared, cert: Arc<SwappableCert>) -> anyhow::Result<rustls::ServerConfig> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        shared.ca.bundle(),
        Expect::TrustDomain,
        false,
    ));
    Ok(tls::server_config(cert, verifier, &[tls::ALPN_H2])?)
}

/// Writes `<data_dir>/admin.conf` when it is missing or no longer fits the
/// CA (new bundle, issued by a retired root, or expiring within 30 days).
fn refresh_admin_credential(shared: &Shared, grpc_addr: SocketAddr) -> anyhow::Result<()> {
    let path = shared.config.admin_conf_path();
    let bundle_pem = shared.ca.bundle().to_pem();
    let url = if shared.config.advertise_url.is_empty() && shared.config.listen.port() == 0 {
        // Tests bind port 0: write the port actually bound.
        format!("https://127.0.0.1:{}", grpc_addr.port())
    } else {
        shared.config.advertised_url()
    };
    let active_subject = shared
        .ca
        .roots()
        .into_iter()
        .find(|r| r.active)
        .and_then(|r| hostmesh_api::pki::certs_from_pem(&r.certificate_pem, "root").ok())
        .and_then(|c| CertInfo::parse(&c[0]).ok())
        .map(|i| i.subject)
        .unwrap_or_default();
    if let Ok(existing) = AdminCredential::load(&path) {
        let still_good = existing.ca_bundle == bundle_pem
            && existing.controller == url
            && hostmesh_api::pki::certs_from_pem(&existing.certificate, "admin")
                .ok()
                .and_then(|c| CertInfo::parse(&c[0]).ok())
                .is_some_and(|info| {
                    info.issuer == active_subject
                        && info.not_after_unix > shared.clock.now_unix() + 30 * 24 * 3600
                });
        if still_good {
            return Ok(());
        }
    }
    let id = SpiffeId::admin(&shared.config.trust_domain);
    let (issued, key_pem) = shared.ca.issue_with_new_key(
        &id,
        "admin",
        &[],
        &[],
        shared.config.ca.admin_cert_ttl.get(),
    )?;
    let cred = AdminCredential {
        api_version: hostmesh_api::resource::API_VERSION.to_string(),
        kind: admin_conf::KIND.to_string(),
        controller: url,
        trust_domain: shared.config.trust_domain.clone(),
        ca_bundle: bundle_pem,
        certificate: issued.chain_pem,
        key: key_pem,
    };
    cred.write(&path)?;
    tracing::info!(path = %path.display(), "wrote the admin credential");
    Ok(())
}

/// Follows CA changes made by any replica: reloads the roots, re-issues
/// the serving certificate and admin credential, and tells sessions to
/// push the new bundle. Also renews the serving certificate at half-life.
async fn follow_ca(
    shared: Arc<Shared>,
    server_cert: Arc<SwappableCert>,
    tls_config: SwappableServerConfig,
    grpc_addr: SocketAddr,
    generation: watch::Sender<u64>,
) {
    let mut state = shared.state.clone();
    let mut seen = state.borrow().ca_revision;
    // The roots the serving certificate and the pushed bundle reflect. A
    // rotation made through this replica already updated the CA's view (so
    // `reload` finds nothing new); comparing with what was acted on catches
    // both cases.
    let mut acted_on = shared.ca.roots();
    let mut shutdown = shared.shutdown.clone();
    let renew_every = shared.config.ca.workload_cert_ttl.get() / 2;
    let mut renew = tokio::time::interval(renew_every);
    renew.tick().await;
    loop {
        let mut reissue = false;
        let mut roots_changed = false;
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let rev = state.borrow().ca_revision;
                if rev == seen {
                    continue;
                }
                seen = rev;
                if let Err(e) = shared.ca.reload(&*shared.store, &shared.keys).await {
                    tracing::error!(error = %e, "reloading the CA failed");
                }
                let roots = shared.ca.roots();
                if roots != acted_on {
                    acted_on = roots;
                    reissue = true;
                    roots_changed = true;
                }
            }
            _ = renew.tick() => reissue = true,
            _ = shutdown.changed() => return,
        }
        if reissue {
            match issue_server_cert(&shared, grpc_addr) {
                Ok(key) => server_cert.replace(key),
                Err(e) => {
                    tracing::error!(error = %e, "re-issuing the controller certificate failed")
                }
            }
            match server_tls(&shared, server_cert.clone()) {
                Ok(cfg) => tls_config.replace(cfg),
                Err(e) => tracing::error!(error = %e, "rebuilding the TLS config failed"),
            }
            if let Err(e) = refresh_admin_credential(&shared, grpc_addr) {
                tracing::error!(error = %e, "refreshing admin.conf failed");
            }
        }
        // After the serving certificate: whoever waits on the generation
        // (sessions, a rotation call) sees a controller that already
        // presents the new chain.
        if roots_changed {
            generation.send_modify(|g| *g += 1);
            tracing::info!("CA roots changed; pushing the new trust bundle");
        }
    }
}
