//! End-to-end tests over real UDP and TCP sockets on 127.0.0.1, against a
//! small fake upstream resolver started in the test. No root needed, no
//! fixed sleeps: every wait is a bounded receive.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SOA, TXT},
    },
};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
    task::JoinSet,
};

use super::{
    DnsConfig, DnsError, DnsMetrics, DnsServer, NameTable, metrics::QueryResult, server::Tuning,
};

/// How long a test waits for any single answer before failing.
const PATIENCE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A fake upstream resolver.

/// Answers on UDP and TCP (same port) and counts what it was asked:
/// `example.test` A, `nx.test` NXDOMAIN with an SOA, `big.test` TXT larger
/// than any UDP payload it is offered (so it truncates over UDP),
/// `refused.test` REFUSED, and `slow.test` never.
struct FakeUpstream {
    addr: SocketAddr,
    asked: Arc<Mutex<HashMap<(String, &'static str), usize>>>,
    _tasks: JoinSet<()>,
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let asked = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = JoinSet::new();

        let counts = asked.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(response) = fake_answer(&query, "udp", &counts) else {
                    continue;
                };
                let mut bytes = response.to_vec().unwrap();
                let limit = query
                    .edns
                    .as_ref()
                    .map_or(512, |e| usize::from(e.max_payload()));
                if bytes.len() > limit {
                    bytes = response.truncate().to_vec().unwrap();
                }
                let _ = udp.send_to(&bytes, from).await;
            }
        });

        let counts = asked.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    continue;
                };
                let counts = counts.clone();
                connections.spawn(async move {
                    let mut len = [0u8; 2];
                    while stream.read_exact(&mut len).await.is_ok() {
                        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let Ok(query) = Message::from_vec(&body) else {
                            return;
                        };
                        let Some(response) = fake_answer(&query, "tcp", &counts) else {
                            // Hold the connection open and silent.
                            std::future::pending::<()>().await;
                            return;
                        };
                        let bytes = response.to_vec().unwrap();
                        let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
                        framed.extend_from_slice(&bytes);
                        if stream.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });

        FakeUpstream {
            addr,
            asked,
            _tasks: tasks,
        }
    }

    fn asked(&self, name: &str, transport: &'static str) -> usize {
        let asked = self.asked.lock().unwrap();
        asked
            .get(&(name.to_owned(), transport))
            .copied()
            .unwrap_or(0)
    }
}

fn fake_answer(
    query: &Message,
    transport: &'static str,
    counts: &Mutex<HashMap<(String, &'static str), usize>>,
) -> Option<Message> {
    let question = query.queries.first()?;
    let name = question.name().to_lowercase().to_ascii();
    *counts
        .lock()
        .unwrap()
        .entry((name.clone(), transport))
        .or_default() += 1;

    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question.clone());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        response.set_edns(edns);
    }
    let owner = question.name().clone();
    match name.as_str() {
        "example.test." => {
            response.add_answer(Record::from_rdata(
                owner,
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        "nx.test." => {
            response.metadata.response_code = ResponseCode::NXDomain;
            let zone = Name::from_ascii("test.").unwrap();
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 3600, 600, 86400, 45);
            response.add_authority(Record::from_rdata(zone, 120, RData::SOA(soa)));
        }
        "big.test." => {
            for i in 0..40 {
                let text = format!("{i:02}-{}", "x".repeat(60));
                response.add_answer(Record::from_rdata(
                    owner.clone(),
                    60,
                    RData::TXT(TXT::new(vec![text])),
                ));
            }
        }
        "refused.test." => response.metadata.response_code = ResponseCode::Refused,
        "slow.test." => return None,
        _ => response.metadata.response_code = ResponseCode::NXDomain,
    }
    Some(response)
}

// ---------------------------------------------------------------------------
// meshd's DNS server under test, and a client.

struct Running {
    server: DnsServer,
    addr: SocketAddr,
    names: watch::Sender<Arc<NameTable>>,
    metrics: DnsMetrics,
    registry: Registry,
}

fn mesh_table() -> NameTable {
    let mut services = HashMap::new();
    services.insert(
        ("web".into(), "shop".into()),
        vec!["240.240.0.10".parse().unwrap()],
    );
    services.insert(
        ("api".into(), "shop".into()),
        vec![
            "240.240.0.11".parse().unwrap(),
            "fd00:240::11".parse().unwrap(),
        ],
    );
    NameTable {
        loaded: true,
        domain: "mesh".into(),
        own_namespace: "shop".into(),
        services,
    }
}

fn tuning() -> Tuning {
    Tuning {
        // Long enough for a loaded CI machine, short enough for the timeout tests.
        upstream_timeout: Duration::from_secs(1),
        drain: Duration::from_millis(200),
        ..Tuning::default()
    }
}

async fn start(upstreams: Vec<SocketAddr>, table: NameTable) -> Running {
    let mut registry = Registry::default();
    let metrics = DnsMetrics::new(registry.sub_registry_with_prefix("dns"));
    let (names, rx) = watch::channel(Arc::new(table));
    let config = DnsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        upstreams,
        mark: None,
        cache_entries: 128,
        mesh_ttl: 30,
    };
    let server = DnsServer::start_tuned(config, rx, metrics.clone(), tuning())
        .await
        .unwrap();
    let addrs = server.local_addrs();
    assert_eq!(addrs.len(), 1);
    assert_ne!(addrs[0].port(), 0);
    Running {
        addr: addrs[0],
        server,
        names,
        metrics,
        registry,
    }
}

fn query(name: &str, qtype: RecordType, payload: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(payload) = payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        m.set_edns(edns);
    }
    m
}

async fn udp_exchange(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buf))
        .await
        .expect("no UDP answer in time")
        .unwrap();
    assert_eq!(from, server);
    buf.truncate(n);
    buf
}

async fn udp_ask(server: SocketAddr, q: &Message) -> Message {
    let response = Message::from_vec(&udp_exchange(server, &q.to_vec().unwrap()).await).unwrap();
    assert_eq!(response.metadata.id, q.metadata.id);
    assert_eq!(response.metadata.message_type, MessageType::Response);
    response
}

async fn tcp_ask_on(stream: &mut TcpStream, q: &Message) -> Message {
    let bytes = q.to_vec().unwrap();
    let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.unwrap();
    let read = async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut body).await.unwrap();
        body
    };
    let body = tokio::time::timeout(PATIENCE, read)
        .await
        .expect("no TCP answer in time");
    let response = Message::from_vec(&body).unwrap();
    assert_eq!(response.metadata.id, q.metadata.id);
    response
}

async fn tcp_ask(server: SocketAddr, q: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    tcp_ask_on(&mut stream, q).await
}

fn addresses(response: &Message) -> Vec<String> {
    response
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(aaaa) => aaaa.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn has_soa(response: &Message, zone: &str) -> bool {
    response
        .authorities
        .iter()
        .any(|r| matches!(r.data, RData::SOA(_)) && r.name == Name::from_ascii(zone).unwrap())
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn mesh_names_are_answered_over_udp_and_tcp() {
    let dns = start(Vec::new(), mesh_table()).await;

    for response in [
        udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::A, None)).await,
        tcp_ask(
            dns.addr,
            &query("WEB.Shop.Mesh.", RecordType::A, Some(1232)),
        )
        .await,
        udp_ask(dns.addr, &query("web.", RecordType::A, None)).await,
        udp_ask(dns.addr, &query("web.shop.", RecordType::A, None)).await,
    ] {
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert_eq!(addresses(&response), vec!["240.240.0.10"]);
        assert_eq!(response.answers[0].ttl, 30);
    }

    let aaaa = udp_ask(dns.addr, &query("api.shop.mesh.", RecordType::AAAA, None)).await;
    assert_eq!(addresses(&aaaa), vec!["fd00:240::11"]);

    let nodata = udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::AAAA, None)).await;
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert!(has_soa(&nodata, "mesh."));

    let nx = tcp_ask(dns.addr, &query("nope.shop.mesh.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    assert!(has_soa(&nx, "mesh."));

    assert_eq!(dns.metrics.query_count(QueryResult::MeshAnswer), 5);
    assert_eq!(dns.metrics.query_count(QueryResult::MeshNoData), 1);
    assert_eq!(dns.metrics.query_count(QueryResult::MeshNxDomain), 1);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn forwarding_works_before_the_first_config_and_mesh_names_servfail() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], NameTable::default()).await;

    let early = udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::A, None)).await;
    assert_eq!(early.metadata.response_code, ResponseCode::ServFail);
    let forwarded = udp_ask(dns.addr, &query("example.test.", RecordType::A, None)).await;
    assert_eq!(addresses(&forwarded), vec!["192.0.2.1"]);
    // Before the config, one-label names are not ours: forwarded.
    let relative = udp_ask(dns.addr, &query("web.", RecordType::A, None)).await;
    assert_eq!(relative.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.asked("web.", "udp"), 1);
    assert_eq!(upstream.asked("web.shop.mesh.", "udp"), 0);

    dns.names.send_replace(Arc::new(mesh_table()));
    let loaded = udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::A, None)).await;
    assert_eq!(addresses(&loaded), vec!["240.240.0.10"]);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn forwarded_answers_are_relayed_and_cached() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], mesh_table()).await;

    let first = udp_ask(dns.addr, &query("Example.Test.", RecordType::A, None)).await;
    assert_eq!(first.metadata.response_code, ResponseCode::NoError);
    assert!(!first.metadata.authoritative);
    assert!(first.metadata.recursion_available);
    assert_eq!(first.queries[0].name().to_ascii(), "Example.Test.");
    assert_eq!(addresses(&first), vec!["192.0.2.1"]);
    assert_eq!(first.answers[0].ttl, 60);
    assert_eq!(upstream.asked("example.test.", "udp"), 1);

    // Same question (any case, any transport): from the cache.
    let second = tcp_ask(dns.addr, &query("example.test.", RecordType::A, None)).await;
    assert_eq!(addresses(&second), vec!["192.0.2.1"]);
    assert!(second.answers[0].ttl <= 60);
    let third = udp_ask(dns.addr, &query("EXAMPLE.test.", RecordType::A, None)).await;
    assert_eq!(addresses(&third), vec!["192.0.2.1"]);
    assert_eq!(upstream.asked("example.test.", "udp"), 1);
    assert_eq!(upstream.asked("example.test.", "tcp"), 0);

    // A different type is a different question.
    let _ = udp_ask(dns.addr, &query("example.test.", RecordType::AAAA, None)).await;
    assert_eq!(upstream.asked("example.test.", "udp"), 2);

    assert_eq!(dns.metrics.query_count(QueryResult::Forwarded), 2);
    assert_eq!(dns.metrics.query_count(QueryResult::CacheHit), 2);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn upstream_nxdomain_is_relayed_with_its_soa_and_cached() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], mesh_table()).await;

    for _ in 0..2 {
        let nx = udp_ask(dns.addr, &query("nx.test.", RecordType::A, None)).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(!nx.metadata.authoritative);
        assert!(has_soa(&nx, "test."));
    }
    assert_eq!(upstream.asked("nx.test.", "udp"), 1);

    // Names two labels long in an unknown namespace go upstream too.
    let other = udp_ask(dns.addr, &query("nothere.shop.", RecordType::A, None)).await;
    assert_eq!(other.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.asked("nothere.shop.", "udp"), 1);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn truncated_upstream_answer_is_fetched_over_tcp_and_fitted_to_the_client() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], mesh_table()).await;

    let full = tcp_ask(dns.addr, &query("big.test.", RecordType::TXT, None)).await;
    assert_eq!(full.answers.len(), 40);
    assert!(!full.metadata.truncation);
    assert_eq!(upstream.asked("big.test.", "udp"), 1);
    assert_eq!(upstream.asked("big.test.", "tcp"), 1);

    // Plain UDP: 512 bytes at most, so TC and the question only.
    let q = query("big.test.", RecordType::TXT, None);
    let plain = udp_exchange(dns.addr, &q.to_vec().unwrap()).await;
    assert!(plain.len() <= 512);
    let plain = Message::from_vec(&plain).unwrap();
    assert!(plain.metadata.truncation);
    assert!(plain.answers.is_empty());
    assert_eq!(plain.queries, q.queries);

    // EDNS with room for it: the whole answer over UDP.
    let roomy = udp_ask(dns.addr, &query("big.test.", RecordType::TXT, Some(4096))).await;
    assert!(!roomy.metadata.truncation);
    assert_eq!(roomy.answers.len(), 40);
    assert!(roomy.edns.is_some());

    // All three served by one upstream exchange.
    assert_eq!(upstream.asked("big.test.", "udp"), 1);
    assert_eq!(upstream.asked("big.test.", "tcp"), 1);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn silent_upstream_gives_servfail() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], mesh_table()).await;

    let response = udp_ask(dns.addr, &query("slow.test.", RecordType::A, None)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(upstream.asked("slow.test.", "udp"), 1);
    // A failure is not cached.
    let again = udp_ask(dns.addr, &query("slow.test.", RecordType::A, None)).await;
    assert_eq!(again.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(upstream.asked("slow.test.", "udp"), 2);

    let text = metrics_text(&dns.registry);
    assert!(
        text.contains(r#"dns_upstream_failures_total{reason="timeout"} 2"#),
        "{text}"
    );
    dns.server.shutdown().await;
}

#[tokio::test]
async fn refused_and_silent_upstreams_fall_through_to_the_next() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap(); // never reads
    let upstream = FakeUpstream::start().await;
    let dns = start(
        vec![silent.local_addr().unwrap(), upstream.addr],
        mesh_table(),
    )
    .await;

    let response = udp_ask(dns.addr, &query("example.test.", RecordType::A, None)).await;
    assert_eq!(addresses(&response), vec!["192.0.2.1"]);

    // REFUSED from the only upstream that answers: SERVFAIL to the client.
    let refused = udp_ask(dns.addr, &query("refused.test.", RecordType::A, None)).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(upstream.asked("refused.test.", "udp"), 1);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn without_upstreams_only_mesh_names_answer() {
    let dns = start(Vec::new(), mesh_table()).await;
    let other = udp_ask(dns.addr, &query("example.test.", RecordType::A, None)).await;
    assert_eq!(other.metadata.response_code, ResponseCode::ServFail);
    let mesh = udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::A, None)).await;
    assert_eq!(addresses(&mesh), vec!["240.240.0.10"]);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn malformed_packets_do_not_kill_the_server() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], mesh_table()).await;

    // A header promising a question that is cut short: FORMERR, same ID.
    let formerr = udp_exchange(
        dns.addr,
        &[
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x3f, b'a',
        ],
    )
    .await;
    let formerr = Message::from_vec(&formerr).unwrap();
    assert_eq!(formerr.metadata.id, 0x1234);
    assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);

    // Junk of every length up to a header, random bytes, a huge datagram:
    // no answer expected, and none of it may hurt the server.
    let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for len in 0..12 {
        sender.send_to(&vec![0xff; len], dns.addr).await.unwrap();
    }
    let mut noise = 0x9e37_79b9_u32;
    for len in [12usize, 13, 40, 300, 512, 4000, 65000] {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                noise.to_le_bytes()[0] & 0x7f // keep QR clear so it is parsed
            })
            .collect();
        sender.send_to(&junk, dns.addr).await.unwrap();
    }

    // TCP: a frame of junk, a frame cut short, a connection that only connects.
    let mut junk = TcpStream::connect(dns.addr).await.unwrap();
    junk.write_all(&[0x00, 0x05, 1, 2, 3, 4, 5]).await.unwrap();
    let mut cut = TcpStream::connect(dns.addr).await.unwrap();
    cut.write_all(&[0x01, 0x00, 1, 2]).await.unwrap();
    drop(cut);
    let _idle = TcpStream::connect(dns.addr).await.unwrap();

    // Still serving on both transports, including a pipelined TCP connection.
    let ok = udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::A, None)).await;
    assert_eq!(addresses(&ok), vec!["240.240.0.10"]);
    let mut stream = TcpStream::connect(dns.addr).await.unwrap();
    for name in ["web.shop.mesh.", "example.test."] {
        let ok = tcp_ask_on(&mut stream, &query(name, RecordType::A, None)).await;
        assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
    }
    assert!(dns.metrics.query_count(QueryResult::FormErr) >= 1);
    dns.server.shutdown().await;
}

#[tokio::test]
async fn metrics_are_registered_with_stable_names() {
    let upstream = FakeUpstream::start().await;
    let dns = start(vec![upstream.addr], mesh_table()).await;
    let _ = udp_ask(dns.addr, &query("web.shop.mesh.", RecordType::A, None)).await;
    let _ = udp_ask(dns.addr, &query("nope.shop.mesh.", RecordType::A, None)).await;
    let _ = udp_ask(dns.addr, &query("example.test.", RecordType::A, None)).await;
    let _ = udp_ask(dns.addr, &query("example.test.", RecordType::A, None)).await;

    let text = metrics_text(&dns.registry);
    for line in [
        r#"dns_queries_total{result="mesh_answer"} 1"#,
        r#"dns_queries_total{result="mesh_nxdomain"} 1"#,
        r#"dns_queries_total{result="forwarded"} 1"#,
        r#"dns_queries_total{result="cache_hit"} 1"#,
        r#"dns_upstream_latency_seconds_count{transport="udp"} 1"#,
        "dns_cache_entries 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    dns.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_the_ports() {
    let dns = start(Vec::new(), mesh_table()).await;
    let addr = dns.addr;
    dns.server.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
    UdpSocket::bind(addr)
        .await
        .expect("UDP port still bound after shutdown");
    TcpListener::bind(addr)
        .await
        .expect("TCP port still bound after shutdown");
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let (_tx, rx) = watch::channel(Arc::new(NameTable::default()));
    let config = DnsConfig {
        listen: vec![addr],
        ..DnsConfig::default()
    };
    let metrics = DnsMetrics::new(&mut Registry::default());
    let error = match DnsServer::start(config, rx, metrics).await {
        Ok(_) => panic!("bound a taken port"),
        Err(error) => error,
    };
    assert!(
        matches!(
            error,
            DnsError::Bind {
                transport: "UDP",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(&format!("binding DNS UDP {addr}: ")),
        "{error}"
    );
}

/// With a mark configured, start either sets it on upstream sockets (with
/// CAP_NET_ADMIN) and forwards, or fails with a clear error (without).
#[tokio::test]
async fn configured_mark_is_applied_or_start_fails_clearly() {
    let can_mark = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&probe).set_mark(0x5a).is_ok()
    };
    let upstream = FakeUpstream::start().await;
    let (_tx, rx) = watch::channel(Arc::new(mesh_table()));
    let config = DnsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        upstreams: vec![upstream.addr],
        mark: Some(0x5a),
        ..DnsConfig::default()
    };
    let metrics = DnsMetrics::new(&mut Registry::default());
    match DnsServer::start_tuned(config, rx, metrics, tuning()).await {
        Ok(server) => {
            assert!(can_mark, "started although the mark cannot be set");
            let addr = server.local_addrs()[0];
            let response = udp_ask(addr, &query("example.test.", RecordType::A, None)).await;
            assert_eq!(addresses(&response), vec!["192.0.2.1"]);
            server.shutdown().await;
        }
        Err(error) => {
            assert!(!can_mark, "failed although the mark can be set: {error}");
            assert!(
                matches!(error, DnsError::Mark { mark: 0x5a, .. }),
                "{error:?}"
            );
            assert!(error.to_string().contains("CAP_NET_ADMIN"), "{error}");
        }
    }
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}
