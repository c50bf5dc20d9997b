//! Sockets: binding the listen addresses and the UDP and TCP serve loops.
//!
//! Each UDP datagram is answered in a task of its own, at most
//! `max_udp_in_flight` at a time (further datagrams are dropped and the
//! client retries); each TCP connection gets a task, at most
//! `max_tcp_connections`, answers its queries in order, and is closed after
//! `tcp_idle` without a query. A panic in one query's task (there should be
//! none) ends that task, never a listener.
//!
//! Shutdown (explicit, or by dropping the [`DnsServer`]) stops the
//! listeners; queries in flight get `drain` to finish, then are aborted.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, watch},
    task::{JoinHandle, JoinSet},
};

use super::{
    DnsError, DnsMetrics, NameTable,
    handler::{Responder, Transport},
    metrics::QueryResult,
    upstream::{self, Upstreams},
};

/// Where to listen, where to forward, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP listen addresses (port 0: any free port, the same for
    /// UDP and TCP of one address).
    pub listen: Vec<SocketAddr>,
    /// Resolvers for non-mesh names, tried in order; empty: such names get
    /// SERVFAIL.
    pub upstreams: Vec<SocketAddr>,
    /// Firewall mark (SO_MARK) for upstream sockets, so capture rules skip
    /// them. Setting it needs CAP_NET_ADMIN.
    pub mark: Option<u32>,
    /// Forwarded answers cached at most (0: no cache).
    pub cache_entries: usize,
    /// TTL of mesh answers and of their negative answers, in seconds.
    pub mesh_ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 15053)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 15053)),
            ],
            upstreams: Vec::new(),
            mark: None,
            cache_entries: 4096,
            mesh_ttl: 30,
        }
    }
}

/// Knobs that are not configuration; tests shorten them.
#[derive(Clone, Debug)]
pub(crate) struct Tuning {
    /// Per upstream, per transport.
    pub(crate) upstream_timeout: Duration,
    pub(crate) max_udp_in_flight: usize,
    pub(crate) max_tcp_connections: usize,
    pub(crate) tcp_idle: Duration,
    pub(crate) drain: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            // Three upstreams that all time out still answer (SERVFAIL)
            // before a glibc client's 5 s timeout.
            upstream_timeout: Duration::from_millis(1500),
            max_udp_in_flight: 1024,
            max_tcp_connections: 256,
            tcp_idle: Duration::from_secs(10),
            drain: Duration::from_secs(2),
        }
    }
}

/// The running DNS server. Dropping it stops the listeners too; call
/// [`DnsServer::shutdown`] to also wait for queries in flight.
pub struct DnsServer {
    local_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds every listen address (UDP and TCP) and serves until shutdown.
    pub async fn start(
        config: DnsConfig,
        names: watch::Receiver<Arc<NameTable>>,
        metrics: DnsMetrics,
    ) -> Result<DnsServer, DnsError> {
        DnsServer::start_tuned(config, names, metrics, Tuning::default()).await
    }

    pub(crate) async fn start_tuned(
        config: DnsConfig,
        names: watch::Receiver<Arc<NameTable>>,
        metrics: DnsMetrics,
        tuning: Tuning,
    ) -> Result<DnsServer, DnsError> {
        if let Some(mark) = config.mark {
            upstream::check_mark(mark).map_err(|source| DnsError::Mark { mark, source })?;
        }

        let mut bound = Vec::new();
        for &addr in &config.listen {
            match bind_pair(addr) {
                Ok(pair) => bound.push(pair),
                Err(BindFailure { transport, source })
                    if addr.is_ipv6() && ipv6_unavailable(&source) =>
                {
                    tracing::warn!(
                        %addr,
                        transport,
                        error = %source,
                        "IPv6 is not available; not serving DNS there"
                    );
                }
                Err(BindFailure { transport, source }) => {
                    return Err(DnsError::Bind {
                        transport,
                        addr,
                        source,
                    });
                }
            }
        }
        if bound.is_empty() {
            return Err(DnsError::NoListenAddress {
                configured: config.listen.clone(),
            });
        }
        let local_addrs: Vec<SocketAddr> = bound.iter().map(|(_, _, addr)| *addr).collect();

        // Forwarding to ourselves would loop until every query times out.
        let (upstreams, ourselves): (Vec<SocketAddr>, Vec<SocketAddr>) = config
            .upstreams
            .iter()
            .partition(|u| !local_addrs.contains(u) && !config.listen.contains(u));
        for server in ourselves {
            tracing::warn!(%server, "upstream resolver is this DNS server itself; ignored");
        }
        if upstreams.is_empty() {
            tracing::warn!("no upstream resolvers: names outside the mesh will get SERVFAIL");
        }
        tracing::info!(
            listen = ?local_addrs,
            upstreams = ?upstreams,
            mark = ?config.mark,
            "serving DNS"
        );

        let responder = Arc::new(Responder::new(
            names,
            config.mesh_ttl,
            Upstreams::new(
                upstreams,
                config.mark,
                tuning.upstream_timeout,
                metrics.clone(),
            ),
            config.cache_entries,
            metrics.clone(),
        ));
        let (shutdown, _) = watch::channel(false);
        let udp_slots = Arc::new(Semaphore::new(tuning.max_udp_in_flight));
        let tcp_slots = Arc::new(Semaphore::new(tuning.max_tcp_connections));
        let mut tasks = Vec::new();
        for (udp, tcp, _) in bound {
            tasks.push(tokio::spawn(serve_udp(
                Arc::new(udp),
                responder.clone(),
                shutdown.subscribe(),
                udp_slots.clone(),
                metrics.clone(),
                tuning.drain,
            )));
            tasks.push(tokio::spawn(serve_tcp(
                tcp,
                responder.clone(),
                shutdown.subscribe(),
                tcp_slots.clone(),
                tuning.clone(),
            )));
        }
        Ok(DnsServer {
            local_addrs,
            shutdown,
            tasks,
        })
    }

    /// The addresses as bound (UDP and TCP share each one).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// Stops listening and waits (boundedly) for queries in flight.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "DNS listener task failed");
            }
        }
        tracing::info!(listen = ?self.local_addrs, "DNS stopped");
    }
}

struct BindFailure {
    transport: &'static str,
    source: io::Error,
}

/// Binds UDP and TCP on `addr`; with port 0, both on the same free port.
fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), BindFailure> {
    let udp_failure = |source| BindFailure {
        transport: "UDP",
        source,
    };
    let tcp_failure = |source| BindFailure {
        transport: "TCP",
        source,
    };
    // With port 0 the kernel's UDP choice may be taken for TCP: try a few.
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = bind_udp(addr).map_err(udp_failure)?;
        let local = udp.local_addr().map_err(udp_failure)?;
        match bind_tcp(local) {
            Ok(tcp) => return Ok((udp, tcp, local)),
            Err(error) if addr.port() == 0 && error.kind() == io::ErrorKind::AddrInUse => {
                last = Some(error)
            }
            Err(error) => return Err(tcp_failure(error)),
        }
    }
    Err(tcp_failure(last.unwrap_or_else(|| {
        io::Error::from(io::ErrorKind::AddrInUse)
    })))
}

fn new_socket(addr: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv6() {
        // [::] must not also take the IPv4 port another listen address binds.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    // A restarted meshd must not wait for old connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// An IPv6 listen address on a host without IPv6 (disabled, or no ::1).
fn ipv6_unavailable(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::AddrNotAvailable
        || error.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

/// Resolves once shutdown is requested or the server handle is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender (the DnsServer) was dropped: stop as well.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Logs and forgets finished query tasks.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(result) = tasks.try_join_next() {
        if let Err(error) = result
            && error.is_panic()
        {
            tracing::error!(%error, "a DNS query task panicked");
        }
    }
}

/// Lets tasks in flight finish within `drain`, then aborts the rest.
async fn drain(mut tasks: JoinSet<()>, drain: Duration) {
    let finished =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::debug!(
            left = tasks.len(),
            "DNS queries still in flight at shutdown; aborting them"
        );
        tasks.shutdown().await;
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    responder: Arc<Responder>,
    mut shutdown: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
    metrics: DnsMetrics,
    drain_for: Duration,
) {
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let received = tokio::select! {
            () = stopped(&mut shutdown) => break,
            received = socket.recv_from(&mut buf) => received,
        };
        reap(&mut tasks);
        let (len, client) = match received {
            Ok(received) => received,
            Err(error) => {
                // Errors here are transient (e.g. ICMP reports queued on
                // the socket, memory pressure); the socket stays usable. The
                // pause keeps a persistent error from spinning a core.
                tracing::debug!(%error, "receiving a DNS datagram");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%client, "too many DNS queries in flight; dropping one");
            metrics.query(QueryResult::Dropped);
            continue;
        };
        let packet = buf[..len].to_vec();
        let socket = socket.clone();
        let responder = responder.clone();
        tasks.spawn(async move {
            let _slot = slot;
            if let Some(response) = responder.respond(&packet, Transport::Udp).await
                && let Err(error) = socket.send_to(&response, client).await
            {
                tracing::debug!(%client, %error, "sending a DNS response");
            }
        });
    }
    drain(tasks, drain_for).await;
}

async fn serve_tcp(
    listener: TcpListener,
    responder: Arc<Responder>,
    mut shutdown: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
    tuning: Tuning,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        reap(&mut connections);
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accepting a DNS TCP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%client, "too many DNS TCP connections; closing one");
            continue;
        };
        let responder = responder.clone();
        let shutdown = shutdown.clone();
        let idle = tuning.tcp_idle;
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(stream, client, &responder, shutdown, idle).await;
        });
    }
    drain(connections, tuning.drain).await;
}

/// Answers length-prefixed queries on one connection, in order (RFC 7766).
async fn serve_connection(
    mut stream: TcpStream,
    client: SocketAddr,
    responder: &Responder,
    mut shutdown: watch::Receiver<bool>,
    idle: Duration,
) {
    loop {
        let mut length = [0u8; 2];
        let read = tokio::select! {
            () = stopped(&mut shutdown) => return,
            read = tokio::time::timeout(idle, stream.read_exact(&mut length)) => read,
        };
        if !matches!(read, Ok(Ok(_))) {
            return; // idle timeout, EOF or a reset: the client is done
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            tracing::debug!(%client, "DNS TCP query cut short");
            return;
        }
        let Some(response) = responder.respond(&query, Transport::Tcp).await else {
            // Not a query at all: this is not a DNS client.
            return;
        };
        // encode() keeps TCP responses within 65535 bytes.
        let Ok(response_length) = u16::try_from(response.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(response.len() + 2);
        framed.extend_from_slice(&response_length.to_be_bytes());
        framed.extend_from_slice(&response);
        if !matches!(
            tokio::time::timeout(idle, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            tracing::debug!(%client, "writing a DNS TCP response failed");
            return;
        }
    }
}
