//! meshd's tunnel in-process, with identities issued by a real controller
//! (in-process, ports 0) and real TLS 1.3 handshakes on loopback: the
//! HTTP/2 CONNECT pool on one side, the tunnel server on the other, the
//! splice at both ends, as meshd wires them.
//!
//! What the data-plane tests in namespaces cannot show directly: a host
//! that answers for another group's service is refused, a host of another
//! mesh (another CA, the same trust domain) is refused, the server learns
//! the caller's verified identity, half-close crosses the tunnel, and
//! certificates rotate under an open stream without dropping it, and the
//! app's first bytes sent with the request arrive once, in order, and
//! never through a stream the caller gave up on. The same for dedicated
//! connections (one stream at a time, reused), with their fallback to
//! HTTP/2 and the replacement of connections the server closed while idle.
//! And over QUIC: the same identity checks and stream semantics, and the
//! fall back to TCP when a peer's UDP goes unanswered, from the start or
//! under an open connection (a UDP relay the test cuts, each way, as a
//! firewall dropping UDP would), without sending the app's bytes twice,
//! and without giving up on a peer that is only slow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use hostmesh_api::pki::CertInfo;
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::{self, CaptureServerVerifier};
use hostmesh_meshd::identity::Identity;
use hostmesh_meshd::tunnel::dedicated::DedicatedPool;
use hostmesh_meshd::tunnel::hbone::{Pool, PoolSettings};
use hostmesh_meshd::tunnel::quic::{self, QuicPool};
use hostmesh_meshd::tunnel::server::{self, Handler, InboundRequest, ServerSettings};
use hostmesh_meshd::tunnel::splice::{Counters, splice};
use hostmesh_meshd::tunnel::{
    ALPN_HBONE, PeerKey, Stream, TlsConfigs, Transport, TunnelError, Tunnels,
};
use hostmesh_tests::inproc::{Mesh, mesh_with};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const GROUPS: &str = "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80, targetPort: 8080}]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: web, namespace: shop}\nspec: {services: [web]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: api, namespace: shop}\nspec: {}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: client, namespace: shop}\nspec: {}\n";

async fn mesh() -> Mesh {
    hostmesh_api::tls::install_default_provider();
    mesh_with(hostmesh_api::clock::system(), GROUPS, |_| {}).await
}

/// An app that echoes what it reads and closes its side after the
/// caller's EOF.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A tunnel server for `host`, delivering every accepted CONNECT to its
/// authority (as the inbound proxy does) and reporting the caller's
/// verified identity.
struct TunnelServer {
    addr: SocketAddr,
    callers: mpsc::UnboundedReceiver<SpiffeId>,
    handshake_failures: Counter,
}

async fn tunnel_server(host: Arc<Identity>) -> TunnelServer {
    tunnel_server_with(host, ServerSettings::default()).await
}

async fn tunnel_server_with(host: Arc<Identity>, settings: ServerSettings) -> TunnelServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    tunnel_server_on(host, listener, settings).await
}

/// Delivers every accepted CONNECT to its authority (refusing with 502
/// when nothing listens there) and reports the caller's verified identity.
fn delivering(tx: mpsc::UnboundedSender<SpiffeId>) -> Handler {
    Arc::new(move |req: InboundRequest| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(req.peer_identity.clone());
            let Ok(app) = TcpStream::connect(&req.authority).await else {
                req.stream.refuse(502).await;
                return;
            };
            if let Ok(halves) = req.stream.accept().await {
                splice(app, halves, Arc::new(Counters::default()), None).await;
            }
        }
        .boxed()
    })
}

async fn tunnel_server_on(
    host: Arc<Identity>,
    listener: TcpListener,
    settings: ServerSettings,
) -> TunnelServer {
    let tls = TlsConfigs::new(host).unwrap();
    tokio::spawn(tls.clone().follow());
    let addr = listener.local_addr().unwrap();
    let (tx, callers) = mpsc::unbounded_channel();
    let handler = delivering(tx);
    let handshake_failures = Counter::default();
    let (trigger, drain) = hostmesh_meshd::drain::new();
    tokio::spawn({
        let failures = handshake_failures.clone();
        async move {
            // Held for as long as the server runs.
            let _trigger = trigger;
            server::serve(
                listener,
                hostmesh_meshd::workers::Workers::new(
                    tokio::runtime::Handle::current(),
                    Vec::new(),
                ),
                tls,
                settings,
                handler,
                drain,
                failures,
            )
            .await
        }
    });
    TunnelServer {
        addr,
        callers,
        handshake_failures,
    }
}

fn new_pool(host: Arc<Identity>) -> (Pool, Arc<TlsConfigs>) {
    let tls = TlsConfigs::new(host).unwrap();
    tokio::spawn(tls.clone().follow());
    (Pool::new(tls.clone(), PoolSettings::default()), tls)
}

/// What an app's socket on the client side sees: a local TCP connection
/// spliced to a tunnel stream to `app` behind `server`, expecting the
/// server to be `expect`.
async fn connect_through(
    pool: &Pool,
    server: SocketAddr,
    expect: &SpiffeId,
    app: SocketAddr,
) -> Result<TcpStream, TunnelError> {
    connect_with_early(pool, server, expect, app, &[]).await
}

/// [`connect_through`], the app having sent `early` before the stream was
/// opened (the outbound proxy reads it first and sends it with the
/// request).
async fn connect_with_early(
    pool: &Pool,
    server: SocketAddr,
    expect: &SpiffeId,
    app: SocketAddr,
    early: &[Bytes],
) -> Result<TcpStream, TunnelError> {
    let key = peer(server, expect);
    let stream = pool.open(&key, &app.to_string(), "web.shop", early).await?;
    Ok(spliced(Stream::H2(stream)).await)
}

/// The tunnel server at `server`, expected to be `expect`.
fn peer(server: SocketAddr, expect: &SpiffeId) -> PeerKey {
    PeerKey {
        addr: server,
        identity: Arc::new(expect.clone()),
    }
}

/// The app's end of a local TCP connection spliced to `stream`.
async fn spliced(stream: Stream) -> TcpStream {
    let (halves, guard) = stream.into_halves();
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(local.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = local.accept().await.unwrap();
    tokio::spawn(async move {
        splice(accepted, halves, Arc::new(Counters::default()), None).await;
        drop(guard);
    });
    client
}

async fn round_trip(s: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    s.write_all(payload).await.unwrap();
    let mut got = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("an answer in time")
        .unwrap();
    got
}

/// The certificate a server presents now, from a fresh handshake.
async fn presented_serial(server: SocketAddr, client: &Identity) -> String {
    let verifier = Arc::new(CaptureServerVerifier::default());
    let config = tls::client_config(verifier.clone(), Some(client.cert()), &[ALPN_HBONE]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server).await.unwrap();
    let _tls = connector
        .connect(tls::server_name_for(client.spiffe_id()), tcp)
        .await
        .expect("handshake");
    let chain = verifier.captured();
    CertInfo::parse(&chain[0]).unwrap().serial_hex
}

/// A web host serving an echo app behind its tunnel server, and a client
/// host, both joined to one mesh (returned too: it holds their state).
async fn web_and_client() -> (Mesh, Arc<Identity>, Arc<Identity>, SocketAddr, TunnelServer) {
    let mut m = mesh().await;
    let web = m.joined_host("shop/web", &m.dir.path().join("web")).await;
    let client = m
        .joined_host("shop/client", &m.dir.path().join("client"))
        .await;
    let app = echo_app().await;
    let srv = tunnel_server(web.clone()).await;
    (m, web, client, app, srv)
}

/// A tunnel server for `web` with its own `handler`.
async fn server_with(web: Arc<Identity>, handler: Handler) -> SocketAddr {
    let tls = TlsConfigs::new(web).unwrap();
    tokio::spawn(tls.clone().follow());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, drain) = hostmesh_meshd::drain::new();
    tokio::spawn(async move {
        // Held for as long as the server runs.
        let _trigger = trigger;
        server::serve(
            listener,
            hostmesh_meshd::workers::Workers::new(tokio::runtime::Handle::current(), Vec::new()),
            tls,
            ServerSettings::default(),
            handler,
            drain,
            Counter::default(),
        )
        .await
    });
    addr
}

/// A server slower to answer than a caller waits (its app takes a second
/// to connect to), reporting whether it could still accept.
async fn slow_server(
    web: Arc<Identity>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<(), String>>) {
    let (tx, accepted) = mpsc::unbounded_channel();
    let handler: Handler = Arc::new(move |req: InboundRequest| {
        let tx = tx.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(req.stream.accept().await.map(|_| ()));
        }
        .boxed()
    });
    (server_with(web, handler).await, accepted)
}

/// A caller opening a stream through a [`slow_server`] stops waiting in
/// time and says so; the server, when it gets to answering, must not
/// deliver (the caller is free to try elsewhere). Returns how the server
/// found out.
async fn gives_up_in_time<T>(
    open: impl std::future::Future<Output = Result<T, TunnelError>>,
    accepted: &mut mpsc::UnboundedReceiver<Result<(), String>>,
) -> String {
    let started = std::time::Instant::now();
    let err = open.await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("no answer to CONNECT"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let late = tokio::time::timeout(Duration::from_secs(5), accepted.recv())
        .await
        .expect("the server to get to its answer")
        .expect("a result");
    late.unwrap_err()
}

#[tokio::test]
async fn bytes_cross_both_ways_with_half_close_and_the_server_knows_the_caller() {
    let (_mesh, web, client, app, mut srv) = web_and_client().await;
    let (pool, _) = new_pool(client.clone());

    let mut s = connect_through(&pool, srv.addr, web.spiffe_id(), app)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
    // Half-close: the client finishes sending; the app sees EOF, sends the
    // rest of its answer and closes; the client reads it all, then EOF.
    s.write_all(b" and goodbye").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("EOF after the app closed")
        .unwrap();
    assert_eq!(rest, b" and goodbye");

    let caller = srv.callers.recv().await.unwrap();
    assert_eq!(&caller, client.spiffe_id(), "the verified caller identity");

    // Ten more connections ride the same pooled TLS connection.
    for i in 0..10u8 {
        let mut s = connect_through(&pool, srv.addr, web.spiffe_id(), app)
            .await
            .unwrap();
        assert_eq!(round_trip(&mut s, &[i; 100]).await, vec![i; 100]);
    }
    assert_eq!(pool.handshakes(), 1, "one TLS handshake for 11 streams");
}

#[tokio::test]
async fn a_host_of_another_group_cannot_answer_for_the_service() {
    another_group_cannot_answer(Via::Tcp).await;
}

#[tokio::test]
async fn over_quic_a_host_of_another_group_cannot_answer_for_the_service() {
    another_group_cannot_answer(Via::Quic).await;
}

async fn another_group_cannot_answer(via: Via) {
    let mut m = mesh().await;
    let web = m.joined_host("shop/web", &m.dir.path().join("web")).await;
    let api = m.joined_host("shop/api", &m.dir.path().join("api")).await;
    let client = m
        .joined_host("shop/client", &m.dir.path().join("client"))
        .await;
    let app = echo_app().await;
    // The api host listens where a web endpoint is expected (a stale
    // endpoint address reused, or a host lying in its registration).
    let impostor = via.server(api.clone()).await;
    let client = via.client(client.clone());
    let err = client
        .connect(impostor.addr, web.spiffe_id(), app)
        .await
        .expect_err("the api host must not pass for web");
    assert_eq!(err.kind(), "handshake", "{err}");
    assert!(
        err.to_string().contains(&web.spiffe_id().to_string()),
        "the error names who was expected: {err}"
    );
    if let Client::Quic(q) = &client {
        // A refused identity is not a blocked path: QUIC stays in use for
        // the peer (TCP would only meet the same check).
        assert!(!q.is_broken(impostor.addr));
    }
    // The same host is fine where its own identity is expected.
    let mut s = client
        .connect(impostor.addr, api.spiffe_id(), app)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"ok").await, b"ok");
}

#[tokio::test]
async fn a_host_of_another_mesh_with_the_same_trust_domain_is_refused() {
    another_mesh_is_refused(Via::Tcp).await;
}

#[tokio::test]
async fn over_quic_a_host_of_another_mesh_with_the_same_trust_domain_is_refused() {
    another_mesh_is_refused(Via::Quic).await;
}

async fn another_mesh_is_refused(via: Via) {
    let mut ours = mesh().await;
    let mut theirs = mesh().await;
    let web = ours
        .joined_host("shop/web", &ours.dir.path().join("web"))
        .await;
    let our_client = ours
        .joined_host("shop/client", &ours.dir.path().join("client"))
        .await;
    // Same trust domain, same names, another CA.
    let foreign_client = theirs
        .joined_host("shop/client", &theirs.dir.path().join("client"))
        .await;
    let foreign_web = theirs
        .joined_host("shop/web", &theirs.dir.path().join("web"))
        .await;
    assert_eq!(foreign_web.spiffe_id(), web.spiffe_id());
    let app = echo_app().await;

    // A foreign client is refused by our server, which counts it.
    let srv = via.server(web.clone()).await;
    let err = via
        .client(foreign_client)
        .connect(srv.addr, web.spiffe_id(), app)
        .await
        .expect_err("a certificate of another CA must be refused");
    assert!(
        matches!(err.kind(), "handshake" | "protocol"),
        "{}: {err}",
        err.kind()
    );
    hostmesh_tests::eventually_async(
        "the server to count the failed handshake",
        Duration::from_secs(5),
        || async {
            match srv.handshake_failures.get() {
                0 => Err("0".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    // And our client refuses their server, although it shows the SPIFFE ID
    // it expects.
    let foreign_srv = via.server(foreign_web).await;
    let ours = via.client(our_client);
    let err = ours
        .connect(foreign_srv.addr, web.spiffe_id(), app)
        .await
        .expect_err("a server of another CA must be refused");
    assert_eq!(err.kind(), "handshake", "{err}");
    // Our own server lets our client through.
    let mut s = ours.connect(srv.addr, web.spiffe_id(), app).await.unwrap();
    assert_eq!(round_trip(&mut s, b"ours").await, b"ours");
}

#[tokio::test]
async fn certificates_rotate_under_an_open_stream_without_dropping_it() {
    let (_mesh, web, client, app, srv) = web_and_client().await;
    let (pool, _client_tls) = new_pool(client.clone());

    let mut open = connect_through(&pool, srv.addr, web.spiffe_id(), app)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut open, b"before").await, b"before");
    let old_serial = web.cert_info().serial_hex;
    assert_eq!(presented_serial(srv.addr, &client).await, old_serial);

    // Both hosts renew (new keys, new certificates) while the stream is open.
    for host in [&web, &client] {
        let channel = host.controller_channel().unwrap();
        host.renew(channel).await.unwrap();
    }
    let new_serial = web.cert_info().serial_hex;
    assert_ne!(new_serial, old_serial);

    // The open stream carries on.
    assert_eq!(round_trip(&mut open, b"after").await, b"after");
    // New handshakes present the new certificate, once the configs follow.
    hostmesh_tests::eventually_async(
        "the server to present its renewed certificate",
        Duration::from_secs(5),
        || async {
            let serial = presented_serial(srv.addr, &client).await;
            if serial == new_serial {
                Ok(())
            } else {
                Err(serial)
            }
        },
    )
    .await;
    // And new streams work, on a fresh pool too (a fresh handshake with the
    // client's new certificate).
    let (fresh, _) = new_pool(client.clone());
    let mut s = connect_through(&fresh, srv.addr, web.spiffe_id(), app)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"new").await, b"new");
    assert_eq!(round_trip(&mut open, b"still").await, b"still");
}

#[tokio::test]
async fn idle_connections_are_closed_and_departed_peers_forgotten() {
    let (_mesh, web, client, app, srv) = web_and_client().await;
    let tls = TlsConfigs::new(client.clone()).unwrap();
    let pool = Pool::new(
        tls,
        PoolSettings {
            idle_timeout: Duration::from_millis(300),
            ..PoolSettings::default()
        },
    );
    let mut busy = connect_through(&pool, srv.addr, web.spiffe_id(), app)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut busy, b"x").await, b"x");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.sweep(), 0, "a connection carrying a stream stays");
    assert_eq!(pool.connections().len(), 1);

    // The stream ends; after the idle timeout the connection goes, and
    // with it the peer.
    drop(busy);
    hostmesh_tests::eventually_async(
        "the idle connection to be swept",
        Duration::from_secs(5),
        || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match pool.sweep() {
                1 => Ok(()),
                n => Err(format!("swept {n}")),
            }
        },
    )
    .await;
    assert!(
        pool.connections().is_empty(),
        "{:?}",
        pool.connections().len()
    );
    // A new stream dials again.
    let mut again = connect_through(&pool, srv.addr, web.spiffe_id(), app)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut again, b"y").await, b"y");
    assert_eq!(pool.handshakes(), 2);
}

#[tokio::test]
async fn the_apps_first_bytes_go_with_the_request_and_arrive_once_in_order() {
    let (_mesh, web, client, app, _srv) = web_and_client().await;
    let srv = tunnel_server(web.clone()).await;
    let (pool, _) = new_pool(client.clone());
    let early = [
        Bytes::from_static(b"GET / "),
        Bytes::from_static(b"HTTP/1.1\r\n"),
    ];
    // Refused (nothing listens there): the bytes went nowhere, and the
    // caller still has them for the next endpoint.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    match connect_with_early(&pool, srv.addr, web.spiffe_id(), closed, &early).await {
        Err(TunnelError::Refused { status: 502, .. }) => {}
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let mut s = connect_with_early(&pool, srv.addr, web.spiffe_id(), app, &early)
        .await
        .unwrap();
    // The echo app saw the early bytes once, then what followed.
    assert_eq!(round_trip(&mut s, b"Host: web\r\n").await, b"GET / HTTP/");
    let mut seen = Vec::new();
    s.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut seen))
        .await
        .expect("EOF after the app closed")
        .unwrap();
    // The rest follows in order, and nothing twice.
    assert_eq!(seen, b"1.1\r\nHost: web\r\n");
    assert_eq!(pool.handshakes(), 1);
}

#[tokio::test]
async fn early_bytes_of_a_stream_the_caller_gave_up_on_never_reach_the_app() {
    let (_mesh, web, client, _app, _srv) = web_and_client().await;
    let (addr, mut accepted) = slow_server(web.clone()).await;
    let ctls = TlsConfigs::new(client.clone()).unwrap();
    let pool = Pool::new(
        ctls,
        PoolSettings {
            connect_timeout: Duration::from_millis(200),
            ..PoolSettings::default()
        },
    );
    let key = PeerKey {
        addr,
        identity: Arc::new(web.spiffe_id().clone()),
    };
    let why = gives_up_in_time(
        pool.open(
            &key,
            "127.0.0.1:9",
            "web.shop",
            &[Bytes::from_static(b"POST /pay")],
        ),
        &mut accepted,
    )
    .await;
    assert!(why.contains("reset") || why.contains("gone"), "{why}");
}

/// Tunnel clients as meshd builds them by default: dedicated connections
/// first, HTTP/2 for peers without them.
fn dedicated_tunnels(host: Arc<Identity>, settings: PoolSettings) -> Tunnels {
    let tls = TlsConfigs::new(host).unwrap();
    tokio::spawn(tls.clone().follow());
    Tunnels {
        h2: Arc::new(Pool::new(tls.clone(), settings.clone())),
        dedicated: Some(Arc::new(DedicatedPool::new(tls, settings))),
        quic: None,
    }
}

fn dedicated(t: &Tunnels) -> &DedicatedPool {
    t.dedicated.as_deref().unwrap()
}

/// [`connect_with_early`] through `tunnels` over TCP; says which kind of
/// stream it got.
async fn open_via(
    tunnels: &Tunnels,
    server: SocketAddr,
    expect: &SpiffeId,
    app: SocketAddr,
    early: &[Bytes],
) -> Result<(TcpStream, &'static str), TunnelError> {
    open_over(tunnels, Transport::Tcp, server, expect, app, early).await
}

/// [`open_via`] with the transport `mode` chosen for the peer, which offers
/// QUIC unless `mode` is TCP.
async fn open_over(
    tunnels: &Tunnels,
    mode: Transport,
    server: SocketAddr,
    expect: &SpiffeId,
    app: SocketAddr,
    early: &[Bytes],
) -> Result<(TcpStream, &'static str), TunnelError> {
    let key = peer(server, expect);
    let stream = tunnels
        .open(
            &key,
            mode != Transport::Tcp,
            mode,
            &app.to_string(),
            "web.shop",
            early,
        )
        .await?;
    let kind = match &stream {
        Stream::Dedicated(_) => "dedicated",
        Stream::H2(_) => "h2",
        Stream::Quic(_) => "quic",
    };
    Ok((spliced(stream).await, kind))
}

/// Waits until the dedicated pool lists `conns` connections to its one
/// peer, none carrying a stream, and gives the server's DONE time to come
/// (a connection is taken again only once its DONE has been read).
async fn idle_soon(t: &Tunnels, conns: usize) {
    hostmesh_tests::eventually_async("idle connections", Duration::from_secs(10), || async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        match dedicated(t).connections().first() {
            Some((_, c, 0)) if *c == conns => Ok(()),
            other => Err(format!("{:?}", other.map(|c| (c.1, c.2)))),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Half-closes `s` and reads what is left, to EOF.
async fn finish(mut s: TcpStream) -> Vec<u8> {
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("EOF after the app closed")
        .unwrap();
    rest
}

#[tokio::test]
async fn dedicated_connections_carry_one_stream_at_a_time_and_are_reused() {
    let (_mesh, web, client, app, mut srv) = web_and_client().await;
    let t = dedicated_tunnels(client.clone(), PoolSettings::default());

    let (mut s, kind) = open_via(&t, srv.addr, web.spiffe_id(), app, &[])
        .await
        .unwrap();
    assert_eq!(kind, "dedicated");
    assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
    // Half-close crosses, and the rest of the answer follows.
    s.write_all(b" and goodbye").await.unwrap();
    assert_eq!(finish(s).await, b" and goodbye");
    let caller = srv.callers.recv().await.unwrap();
    assert_eq!(&caller, client.spiffe_id(), "the verified caller identity");

    // One after another, streams take the same connection: a large one
    // (many frames, both ways) too.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for i in 0..5u8 {
        idle_soon(&t, 1).await;
        let (mut s, _) = open_via(&t, srv.addr, web.spiffe_id(), app, &[])
            .await
            .unwrap();
        assert_eq!(round_trip(&mut s, &[i; 100]).await, vec![i; 100]);
        if i == 4 {
            assert_eq!(round_trip(&mut s, &big).await, big);
        }
        assert!(finish(s).await.is_empty());
    }
    assert_eq!(
        dedicated(&t).handshakes(),
        1,
        "one TLS handshake for 6 streams"
    );

    // Three at once need three connections (after the first, new ones)...
    idle_soon(&t, 1).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (s, _) = open_via(&t, srv.addr, web.spiffe_id(), app, &[])
            .await
            .unwrap();
        open.push(s);
    }
    assert_eq!(dedicated(&t).handshakes(), 3);
    let listed = dedicated(&t).connections();
    assert_eq!((listed[0].1, listed[0].2), (3, 3), "connections, streams");
    for mut s in open {
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        assert!(finish(s).await.is_empty());
    }
    // ...which then stay, idle, for the next ones.
    idle_soon(&t, 3).await;
    let (mut s, _) = open_via(&t, srv.addr, web.spiffe_id(), app, &[])
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"y").await, b"y");
    assert_eq!(dedicated(&t).handshakes(), 3);
    assert_eq!(t.h2.handshakes(), 0, "HTTP/2 unused");
}

#[tokio::test]
async fn a_refused_dedicated_stream_drops_its_early_bytes_and_the_next_one_works() {
    let (_mesh, web, client, app, srv) = web_and_client().await;
    let t = dedicated_tunnels(client.clone(), PoolSettings::default());
    let early = [
        Bytes::from_static(b"GET / "),
        Bytes::from_static(b"HTTP/1.1\r\n"),
    ];
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    match open_via(&t, srv.addr, web.spiffe_id(), closed, &early).await {
        Err(TunnelError::Refused { status: 502, .. }) => {}
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let (mut s, kind) = open_via(&t, srv.addr, web.spiffe_id(), app, &early)
        .await
        .unwrap();
    assert_eq!(kind, "dedicated");
    assert_eq!(round_trip(&mut s, b"Host: web\r\n").await, b"GET / HTTP/");
    assert_eq!(finish(s).await, b"1.1\r\nHost: web\r\n", "in order, once");
    // The refusal closed its connection; the next stream dialled anew.
    assert_eq!(dedicated(&t).handshakes(), 2);
}

#[tokio::test]
async fn a_peer_that_offers_only_http2_gets_http2() {
    let (_mesh, web, client, app, _srv) = web_and_client().await;
    let old = tunnel_server_with(
        web.clone(),
        ServerSettings {
            offer_dedicated: false,
            ..ServerSettings::default()
        },
    )
    .await;
    let t = dedicated_tunnels(client.clone(), PoolSettings::default());
    for i in 0..3u8 {
        let (mut s, kind) = open_via(&t, old.addr, web.spiffe_id(), app, &[])
            .await
            .unwrap();
        assert_eq!(kind, "h2", "stream {i}");
        assert_eq!(round_trip(&mut s, b"z").await, b"z");
    }
    assert!(dedicated(&t).h2_only(old.addr));
    assert_eq!(dedicated(&t).handshakes(), 1, "asked once, then remembered");
    assert_eq!(t.h2.handshakes(), 1);
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_replaced_without_failing_a_stream() {
    let (_mesh, web, client, app, _srv) = web_and_client().await;
    let srv = tunnel_server_with(
        web.clone(),
        ServerSettings {
            dedicated_idle: Duration::from_millis(200),
            ..ServerSettings::default()
        },
    )
    .await;
    let t = dedicated_tunnels(client.clone(), PoolSettings::default());
    let (mut s, _) = open_via(&t, srv.addr, web.spiffe_id(), app, &[])
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"a").await, b"a");
    assert!(finish(s).await.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (mut s, _) = open_via(
        &t,
        srv.addr,
        web.spiffe_id(),
        app,
        &[Bytes::from_static(b"b")],
    )
    .await
    .unwrap();
    assert_eq!(round_trip(&mut s, b"c").await, b"b", "the early byte first");
    assert_eq!(finish(s).await, b"c");
    assert_eq!(dedicated(&t).handshakes(), 2);
}

#[tokio::test]
async fn idle_dedicated_connections_are_swept_and_departed_peers_forgotten() {
    let (_mesh, web, client, app, srv) = web_and_client().await;
    let t = dedicated_tunnels(
        client.clone(),
        PoolSettings {
            idle_timeout: Duration::from_millis(300),
            ..PoolSettings::default()
        },
    );
    let (mut busy, _) = open_via(&t, srv.addr, web.spiffe_id(), app, &[])
        .await
        .unwrap();
    assert_eq!(round_trip(&mut busy, b"x").await, b"x");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        dedicated(&t).sweep(),
        0,
        "a connection carrying a stream stays"
    );
    assert!(finish(busy).await.is_empty());
    hostmesh_tests::eventually_async(
        "the idle connection to be swept",
        Duration::from_secs(5),
        || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match dedicated(&t).sweep() {
                1 => Ok(()),
                n => Err(format!("swept {n}")),
            }
        },
    )
    .await;
    assert!(dedicated(&t).connections().is_empty());
}

#[tokio::test]
async fn early_bytes_of_a_dedicated_stream_the_caller_gave_up_on_never_reach_the_app() {
    let (_mesh, web, client, _app, _srv) = web_and_client().await;
    let (addr, mut accepted) = slow_server(web.clone()).await;
    let t = dedicated_tunnels(
        client.clone(),
        PoolSettings {
            connect_timeout: Duration::from_millis(200),
            ..PoolSettings::default()
        },
    );
    let key = PeerKey {
        addr,
        identity: Arc::new(web.spiffe_id().clone()),
    };
    let why = gives_up_in_time(
        t.open(
            &key,
            false,
            Transport::Tcp,
            "127.0.0.1:9",
            "web.shop",
            &[Bytes::from_static(b"POST /pay")],
        ),
        &mut accepted,
    )
    .await;
    assert!(why.contains("closed the connection"), "{why}");
}

#[tokio::test]
async fn a_connection_is_reused_only_once_the_server_has_delivered_the_whole_stream() {
    let (_mesh, web, client, _app, srv) = web_and_client().await;
    // An app that answers at once and closes its side, then reads what it
    // was sent only a second later (into a small receive buffer).
    let listener = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.listen(16).unwrap()
    };
    let slow_reader = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"ok").await;
                let _ = s.shutdown().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    let t = dedicated_tunnels(client.clone(), PoolSettings::default());
    let (mut s, _) = open_via(&t, srv.addr, web.spiffe_id(), slow_reader, &[])
        .await
        .unwrap();
    // Far more than the app's socket holds while it does not read, less
    // than all the sockets on the way hold: the caller's side of the
    // stream ends at once, the server's only once the app reads.
    let upload = vec![1u8; 6 << 20];
    let (mut r, mut w) = s.split();
    let (sent, answer) = tokio::join!(
        async {
            w.write_all(&upload).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        }
    );
    let () = sent;
    assert_eq!(answer, b"ok");
    drop(s);
    // The caller's side is done; the server's is not (its app has not read
    // the upload yet), so the connection waits for DONE.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next stream must not queue behind the rest of that upload: it
    // gets a connection of its own at once.
    let started = std::time::Instant::now();
    let (mut s2, _) = open_via(&t, srv.addr, web.spiffe_id(), slow_reader, &[])
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let mut got = Vec::new();
    s2.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), s2.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"ok");
    assert_eq!(dedicated(&t).handshakes(), 2);
    // Once the server has delivered it all (DONE), the first connection is
    // idle again, beside the second.
    idle_soon(&t, 2).await;
}

#[tokio::test]
async fn an_idle_connection_found_dead_on_use_takes_the_others_with_it_and_a_new_one_is_dialled() {
    let (_mesh, web, client, app, _srv) = web_and_client().await;
    // A server whose fourth stream finds its connection dead (as after a
    // restart: closed without an answer); the others are served.
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler: Handler = {
        let seen = seen.clone();
        Arc::new(move |req: InboundRequest| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 3 {
                    return; // dropped unanswered: its connection closes
                }
                let app = TcpStream::connect(&req.authority).await.unwrap();
                if let Ok(halves) = req.stream.accept().await {
                    splice(app, halves, Arc::new(Counters::default()), None).await;
                }
            }
            .boxed()
        })
    };
    let addr = server_with(web.clone(), handler).await;
    let t = dedicated_tunnels(client.clone(), PoolSettings::default());
    let mut three = Vec::new();
    for _ in 0..3 {
        three.push(
            open_via(&t, addr, web.spiffe_id(), app, &[])
                .await
                .unwrap()
                .0,
        );
    }
    for mut s in three {
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        assert!(finish(s).await.is_empty());
    }
    idle_soon(&t, 3).await;
    let (mut s, kind) = open_via(&t, addr, web.spiffe_id(), app, &[Bytes::from_static(b"a")])
        .await
        .expect("the stream succeeds on a new connection");
    assert_eq!(kind, "dedicated");
    assert_eq!(round_trip(&mut s, b"b").await, b"a");
    assert_eq!(finish(s).await, b"b");
    assert_eq!(dedicated(&t).handshakes(), 4, "one new connection");
    // The other idle ones were dropped with the dead one: one is left.
    idle_soon(&t, 1).await;
}

// QUIC: the same checks and semantics as over TCP.

/// A QUIC tunnel server for `host` on a loopback UDP port, delivering like
/// [`tunnel_server`].
async fn quic_server(host: Arc<Identity>) -> TunnelServer {
    let (tx, callers) = mpsc::unbounded_channel();
    let handshake_failures = Counter::default();
    let addr = quic_server_with(host, delivering(tx), handshake_failures.clone());
    TunnelServer {
        addr,
        callers,
        handshake_failures,
    }
}

/// A QUIC tunnel server for `host` with its own `handler`.
fn quic_server_with(host: Arc<Identity>, handler: Handler, failures: Counter) -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let endpoint = quic::server_endpoint(&host, socket).unwrap();
    let (trigger, drain) = hostmesh_meshd::drain::new();
    tokio::spawn(async move {
        // Held for as long as the server runs.
        let _trigger = trigger;
        server::serve_quic(endpoint, handler, drain, failures).await
    });
    addr
}

fn quic_pool(host: Arc<Identity>, connect_timeout: Duration) -> QuicPool {
    QuicPool::new(host, None, connect_timeout).unwrap()
}

/// [`connect_with_early`] over QUIC.
async fn quic_through(
    pool: &QuicPool,
    server: SocketAddr,
    expect: &SpiffeId,
    app: SocketAddr,
    early: &[Bytes],
) -> Result<TcpStream, TunnelError> {
    let key = peer(server, expect);
    let stream = pool.open(&key, &app.to_string(), "web.shop", early).await?;
    Ok(spliced(Stream::Quic(stream)).await)
}

/// Which tunnel a test goes through: the HTTP/2 pool over TCP, or QUIC.
#[derive(Clone, Copy, Debug)]
enum Via {
    Tcp,
    Quic,
}

/// A tunnel client of either kind.
enum Client {
    Tcp(Pool),
    Quic(QuicPool),
}

impl Via {
    async fn server(self, host: Arc<Identity>) -> TunnelServer {
        match self {
            Via::Tcp => tunnel_server(host).await,
            Via::Quic => quic_server(host).await,
        }
    }

    fn client(self, host: Arc<Identity>) -> Client {
        match self {
            Via::Tcp => Client::Tcp(new_pool(host).0),
            Via::Quic => Client::Quic(quic_pool(host, Duration::from_secs(2))),
        }
    }
}

impl Client {
    async fn connect(
        &self,
        server: SocketAddr,
        expect: &SpiffeId,
        app: SocketAddr,
    ) -> Result<TcpStream, TunnelError> {
        match self {
            Client::Tcp(pool) => connect_through(pool, server, expect, app).await,
            Client::Quic(pool) => quic_through(pool, server, expect, app, &[]).await,
        }
    }
}

#[tokio::test]
async fn over_quic_bytes_cross_both_ways_with_half_close_and_the_server_knows_the_caller() {
    let (_mesh, web, client, app, _tcp) = web_and_client().await;
    let mut srv = quic_server(web.clone()).await;
    let pool = quic_pool(client.clone(), Duration::from_secs(2));
    let early = [Bytes::from_static(b"early ")];
    let mut s = quic_through(&pool, srv.addr, web.spiffe_id(), app, &early)
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"hello").await, b"early");
    s.write_all(b" and goodbye").await.unwrap();
    // The rest of the echo, in order and once, then EOF after the app saw
    // the half-close and closed.
    assert_eq!(finish(s).await, b" hello and goodbye");
    let caller = srv.callers.recv().await.unwrap();
    assert_eq!(&caller, client.spiffe_id(), "the verified caller identity");
    // Ten more streams, five at once, on the same QUIC connection.
    let mut open = Vec::new();
    for i in 0..10u8 {
        let mut s = quic_through(&pool, srv.addr, web.spiffe_id(), app, &[])
            .await
            .unwrap();
        assert_eq!(round_trip(&mut s, &[i; 100]).await, vec![i; 100]);
        open.push(s);
        if open.len() == 5 {
            for s in open.drain(..) {
                assert!(finish(s).await.is_empty());
            }
        }
    }
    assert_eq!(pool.handshakes(), 1, "one QUIC handshake for 11 streams");
    // A refusal comes back as the peer's status.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    match quic_through(&pool, srv.addr, web.spiffe_id(), closed, &[]).await {
        Err(TunnelError::Refused { status: 502, .. }) => {}
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// A UDP path to a QUIC server that a test can cut, each way on its own,
/// as a firewall that starts dropping UDP would: what clients send to
/// `addr` goes on to the server, and the server's answers back to the
/// client that sent last (the tests have one). A TCP tunnel server for the
/// same host listens on the same port number, as meshd's do on 15008.
struct CuttablePath {
    addr: SocketAddr,
    to_server: Arc<AtomicBool>,
    to_client: Arc<AtomicBool>,
    _tcp: TunnelServer,
}

impl CuttablePath {
    fn cut(&self) {
        self.to_server.store(true, Ordering::SeqCst);
        self.to_client.store(true, Ordering::SeqCst);
    }
}

async fn cuttable_path(host: Arc<Identity>, quic_server: SocketAddr) -> CuttablePath {
    // A UDP port whose TCP twin is free too.
    let (front, listener) = loop {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(l) = TcpListener::bind(front.local_addr().unwrap()).await {
            break (Arc::new(front), l);
        }
    };
    let addr = front.local_addr().unwrap();
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(quic_server).await.unwrap();
    let (to_server, to_client) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (client_tx, mut client_rx) = tokio::sync::watch::channel(None::<SocketAddr>);
    tokio::spawn({
        let (front, back, cut) = (front.clone(), back.clone(), to_server.clone());
        async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                client_tx.send_replace(Some(from));
                if !cut.load(Ordering::SeqCst) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        }
    });
    tokio::spawn({
        let cut = to_client.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client_rx.borrow_and_update();
                if let Some(to) = to
                    && !cut.load(Ordering::SeqCst)
                {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        }
    });
    let tcp = tunnel_server_on(host, listener, ServerSettings::default()).await;
    CuttablePath {
        addr,
        to_server,
        to_client,
        _tcp: tcp,
    }
}

/// An app that reports every chunk it reads, from any connection.
async fn recording_app() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let _ = tx.send(buf[..n].to_vec());
                }
            });
        }
    });
    (addr, rx)
}

/// Everything `app` has read within `wait`.
async fn recorded(app: &mut mpsc::UnboundedReceiver<Vec<u8>>, wait: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(wait, app.recv()).await {
        all.extend(chunk);
    }
    all
}

/// The connect timeout of the tunnels in [`QuicLab`]: a CONNECT goes
/// unanswered after twice that.
const TIMEOUT: Duration = Duration::from_millis(300);

/// A web host (an echo app, a QUIC tunnel server, a TCP tunnel server)
/// behind a [`CuttablePath`], and a client's tunnels with QUIC.
struct QuicLab {
    _mesh: Mesh,
    web: Arc<Identity>,
    app: SocketAddr,
    path: CuttablePath,
    t: Tunnels,
    q: Arc<QuicPool>,
}

impl QuicLab {
    /// With `handler` for the QUIC server (None: delivering, as meshd).
    async fn new(handler: Option<Handler>) -> QuicLab {
        let (mesh, web, client, app, _tcp) = web_and_client().await;
        let srv = match handler {
            Some(h) => quic_server_with(web.clone(), h, Counter::default()),
            None => quic_server(web.clone()).await.addr,
        };
        let path = cuttable_path(web.clone(), srv).await;
        let mut t = dedicated_tunnels(
            client.clone(),
            PoolSettings {
                connect_timeout: TIMEOUT,
                ..PoolSettings::default()
            },
        );
        let q = Arc::new(quic_pool(client, TIMEOUT));
        t.quic = Some(q.clone());
        QuicLab {
            _mesh: mesh,
            web,
            app,
            path,
            t,
            q,
        }
    }

    /// A stream to `app` with the app's first bytes `early`, over QUIC if
    /// the tunnels can; says which kind it got.
    async fn open(
        &self,
        app: SocketAddr,
        early: &[Bytes],
    ) -> Result<(TcpStream, &'static str), TunnelError> {
        let expect = self.web.spiffe_id();
        open_over(&self.t, Transport::Quic, self.path.addr, expect, app, early).await
    }

    /// [`QuicLab::open`] that must fail; its error.
    async fn refused(&self, app: SocketAddr, early: &[Bytes]) -> TunnelError {
        self.open(app, early)
            .await
            .map(|(_, kind)| kind)
            .unwrap_err()
    }

    /// Opens the QUIC connection with a stream to the echo app, which is
    /// returned after a round trip.
    async fn warm(&self) -> TcpStream {
        let (mut s, kind) = self.open(self.app, &[]).await.unwrap();
        assert_eq!(kind, "quic");
        assert_eq!(round_trip(&mut s, b"warm").await, b"warm");
        s
    }
}

#[tokio::test]
async fn when_udp_stops_under_an_open_quic_connection_the_next_streams_go_over_tcp_at_once() {
    let lab = QuicLab::new(None).await;
    lab.warm().await;
    lab.path.cut();
    // The connection is open as far as QUIC knows. The stream's CONNECT,
    // with the app's first bytes, goes unanswered and nothing else comes:
    // the peer is marked. The bytes are not sent again over TCP (had only
    // the answers been lost, the peer's app would have them already).
    let started = Instant::now();
    let early = [Bytes::from_static(b"GET / HTTP/1.1\r\n")];
    let err = lab.refused(lab.app, &early).await;
    assert!(
        err.to_string().contains("nothing else came from the peer"),
        "{err}"
    );
    assert!(started.elapsed() >= TIMEOUT * 2, "{:?}", started.elapsed());
    assert!(lab.q.is_broken(lab.path.addr));
    assert_eq!(
        (lab.q.marked(), lab.q.broken_peers()),
        (1, vec![lab.path.addr])
    );
    // The next streams go over TCP at once, without asking QUIC again.
    let dials = lab.q.dials();
    for _ in 0..2 {
        let (s, kind) = lab.open(lab.app, &early).await.unwrap();
        assert_eq!(kind, "dedicated");
        assert_eq!(finish(s).await, b"GET / HTTP/1.1\r\n");
    }
    assert_eq!((lab.q.dials(), lab.q.handshakes()), (dials, 1));
}

#[tokio::test]
async fn a_stream_that_sent_nothing_yet_is_carried_over_tcp_when_its_connect_goes_unanswered() {
    let lab = QuicLab::new(None).await;
    lab.warm().await;
    lab.path.cut();
    // Nothing of the app's yet (a server-first protocol, or bytes not yet
    // sent): nothing can be delivered twice, so this same stream moves.
    let (mut s, kind) = lab.open(lab.app, &[]).await.unwrap();
    assert_eq!(kind, "dedicated");
    assert_eq!(round_trip(&mut s, b"over tcp").await, b"over tcp");
    assert!(lab.q.is_broken(lab.path.addr));
}

#[tokio::test]
async fn when_only_the_peers_answers_are_lost_the_apps_first_bytes_reach_it_once() {
    let lab = QuicLab::new(None).await;
    let (recorder, mut seen) = recording_app().await;
    lab.warm().await;
    // A firewall that drops only what comes back.
    lab.path.to_client.store(true, Ordering::SeqCst);
    let err = lab
        .refused(recorder, &[Bytes::from_static(b"POST /pay")])
        .await;
    assert!(err.to_string().contains("no answer to CONNECT"), "{err}");
    // The peer got the stream and delivered the bytes; the caller did not
    // send them again over TCP.
    assert_eq!(
        recorded(&mut seen, Duration::from_secs(1)).await,
        b"POST /pay"
    );
    assert!(lab.q.is_broken(lab.path.addr));
}

#[tokio::test]
async fn a_slow_peer_on_a_working_path_keeps_its_quic_connection() {
    let slow = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // The peer answers for `slow` only after the caller has given up (an
    // app whose backlog is full), and at once for the others.
    let (tx, _callers) = mpsc::unbounded_channel();
    let deliver = delivering(tx);
    let handler: Handler = Arc::new(move |req: InboundRequest| {
        let deliver = deliver.clone();
        async move {
            if req.authority == slow.to_string() {
                tokio::time::sleep(Duration::from_secs(3)).await;
                req.stream.refuse(503).await;
            } else {
                deliver(req).await;
            }
        }
        .boxed()
    });
    let lab = QuicLab::new(Some(handler)).await;
    let mut open = lab.warm().await;
    let err = lab.refused(slow, &[Bytes::from_static(b"x")]).await;
    assert!(err.to_string().contains("no answer to CONNECT"), "{err}");
    assert!(!err.to_string().contains("nothing else"), "{err}");
    // The peer's packets kept coming: not marked, and the connection and
    // the stream already open on it carry on.
    assert!(!lab.q.is_broken(lab.path.addr));
    assert_eq!(lab.q.marked(), 0);
    assert_eq!(round_trip(&mut open, b"still here").await, b"still here");
    let (mut s, kind) = lab.open(lab.app, &[]).await.unwrap();
    assert_eq!(kind, "quic");
    assert_eq!(round_trip(&mut s, b"new").await, b"new");
    assert_eq!(lab.q.handshakes(), 1);
}

#[tokio::test]
async fn a_peer_whose_udp_never_answers_is_reached_over_tcp_from_the_first_stream() {
    let lab = QuicLab::new(None).await;
    lab.path.cut();
    // No handshake: nothing of the stream was sent, so it goes over TCP,
    // the app's first bytes with it.
    let (s, kind) = lab
        .open(lab.app, &[Bytes::from_static(b"first")])
        .await
        .unwrap();
    assert_eq!(kind, "dedicated");
    assert_eq!(finish(s).await, b"first");
    assert!(lab.q.is_broken(lab.path.addr));
    assert_eq!((lab.q.dials(), lab.q.handshakes()), (1, 0));
    // Once the path is open again QUIC is not tried until the mark expires
    // (5 minutes), so streams keep to TCP.
    lab.path.to_server.store(false, Ordering::SeqCst);
    lab.path.to_client.store(false, Ordering::SeqCst);
    idle_soon(&lab.t, 1).await;
    let (mut s, kind) = lab.open(lab.app, &[]).await.unwrap();
    assert_eq!(kind, "dedicated");
    assert_eq!(round_trip(&mut s, b"tcp").await, b"tcp");
    assert_eq!(lab.q.dials(), 1);
}
