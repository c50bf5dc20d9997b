//! The data plane across network-namespace hosts: unmodified programs,
//! nftables capture, mTLS tunnels, strict mode, load balancing, failover,
//! a large transfer, and clean removal.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hostmesh_tests::mesh::{MeshLab, StoreKind};

const MESH: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
  mtls: strict
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: web, namespace: shop}
spec: {labels: {app: web}, services: [web]}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: client, namespace: shop}
spec: {}
"#;

const CLIENT: usize = 3;
const PLAIN: usize = 4;

/// Every test runs once per tunnel transport.
macro_rules! for_each_transport {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn tcp() {
                    super::$name("tcp")
                }
                #[test]
                fn quic() {
                    super::$name("quic")
                }
            }
        )*
    };
}

for_each_transport!(
    an_unmodified_client_reaches_a_plain_server_by_name_vip_and_address_over_mtls,
    new_connections_succeed_on_the_other_server_within_5s_after_a_server_host_dies,
    a_1gib_transfer_arrives_with_the_same_checksum,
    after_meshd_stops_its_table_is_gone_and_direct_traffic_flows,
);

/// Data workers per meshd in the TCP runs: connections are handed to three
/// threads in turn. The QUIC runs keep the default (one on 2 cores), so
/// both ways are tested end to end.
const TCP_WORKERS: usize = 3;

/// host 0: controller; 1, 2: web servers; 3: mesh client; 4: a plain host
/// with no meshd. Tunnels use `transport`.
fn lab(web_hosts: &[usize], transport: &str) -> MeshLab {
    lab_with(web_hosts, transport, |_| String::new())
}

/// [`lab`], with more of every meshd.toml from `extra` (given the lab's
/// hosts, before any meshd starts).
fn lab_with(
    web_hosts: &[usize],
    transport: &str,
    extra: impl FnOnce(&MeshLab) -> String,
) -> MeshLab {
    lab_configured(web_hosts, Some(transport), extra, |_| String::new())
}

/// [`lab_with`], with no `proxy.transport` in meshd.toml when `transport`
/// is None, and `controller` (given the lab) appended to controller.toml:
/// the controller restarts with it before any host joins.
fn lab_configured(
    web_hosts: &[usize],
    transport: Option<&str>,
    extra: impl FnOnce(&MeshLab) -> String,
    controller: impl FnOnce(&MeshLab) -> String,
) -> MeshLab {
    hostmesh_tests::require_root();
    let mut m = MeshLab::start(5, StoreKind::Embedded, 5);
    let controller_extra = controller(&m);
    if !controller_extra.is_empty() {
        m.kill_controller();
        m.controller_extra = controller_extra;
        m.start_controller();
    }
    let workers = if transport == Some("tcp") {
        TCP_WORKERS
    } else {
        0
    };
    let more = extra(&m);
    let transport = transport
        .map(|t| format!("transport = {t:?}\n"))
        .unwrap_or_default();
    m.meshd_extra = format!("[proxy]\n{transport}worker_threads = {workers}\n{more}");
    m.apply(MESH);
    for &h in web_hosts {
        m.join(h, "shop/web");
        // Listening on every address, so that only strict mode keeps
        // plaintext from other hosts out.
        m.app(h, 8080, &format!("web-{h}"), "0.0.0.0");
    }
    m.join(CLIENT, "shop/client");
    for &h in web_hosts {
        m.start_meshd(h);
    }
    m.start_meshd(CLIENT);
    let want = web_hosts.len();
    m.eventually(
        "the client to see every healthy endpoint",
        Duration::from_secs(20),
        || {
            let config = m.config(CLIENT);
            let web = config["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "web")
                .cloned()
                .unwrap_or_default();
            let healthy = web["endpoints"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .filter(|e| !e["healthyPorts"].as_array().unwrap().is_empty())
                        .count()
                })
                .unwrap_or(0);
            if healthy == want {
                Ok(())
            } else {
                Err(format!("{web}"))
            }
        },
    );
    // The client's redirects, and the servers' strict-mode drops.
    m.wait_capture_current(CLIENT);
    for &h in web_hosts {
        m.wait_capture_current(h);
    }
    m
}

fn vip(m: &MeshLab) -> String {
    m.config(CLIENT)["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["vips"][0]
        .as_str()
        .unwrap()
        .to_string()
}

fn metric(text: &str, name: &str, must_contain: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && must_contain.iter().all(|c| l.contains(c)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .map(|v| v as u64)
        .sum()
}

fn an_unmodified_client_reaches_a_plain_server_by_name_vip_and_address_over_mtls(transport: &str) {
    let m = lab(&[1, 2], transport);
    let vip = vip(&m);
    let a1 = m.lab.host(1).addr;

    // By mesh name, by VIP, and by the server's real address.
    let by_name = m
        .curl(CLIENT, "http://web.shop.mesh/", 10)
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    assert!(by_name == "web-1" || by_name == "web-2", "{by_name}");
    let by_vip = m.curl(CLIENT, &format!("http://{vip}/"), 10).unwrap();
    assert!(by_vip.starts_with("web-"), "{by_vip}");
    for _ in 0..5 {
        assert_eq!(
            m.curl(CLIENT, &format!("http://{a1}:8080/"), 10).unwrap(),
            "web-1",
            "a real address goes to that host"
        );
    }

    // Connections spread across both servers.
    let seen: HashSet<String> = (0..30)
        .map(|_| m.curl(CLIENT, "http://web.shop.mesh/", 10).unwrap())
        .collect();
    assert_eq!(
        seen,
        HashSet::from(["web-1".to_string(), "web-2".to_string()]),
        "both servers answer"
    );
    if transport == "tcp" {
        // Those 30+ connections went through every data worker of the
        // client and the servers.
        for h in [CLIENT, 1] {
            let pid = m.meshd[h].as_ref().unwrap().pid();
            let threads: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect();
            for w in 1..TCP_WORKERS {
                assert!(threads.contains(&format!("meshd-data-{w}")), "{threads:?}");
            }
        }
    }

    // On the wire between hosts there is TLS to port 15008, and none of
    // the payload in plaintext.
    let pcap = m.lab.dir.path().join("client.pcap");
    let veth = format!("w{}h{CLIENT}", m.lab.id);
    let mut dump = hostmesh_tests::Proc::spawn(
        "tcpdump",
        {
            let mut c = std::process::Command::new("ip");
            c.args([
                "netns",
                "exec",
                &m.lab.sw,
                "tcpdump",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                &veth,
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(&pcap)
            .args(["tcp", "or", "udp"]);
            c
        },
        m.lab.dir.path(),
    );
    hostmesh_tests::eventually("tcpdump to start", Duration::from_secs(10), || {
        if dump.log().contains("listening on") {
            Ok(())
        } else {
            Err(dump.log())
        }
    });
    let marker = "HOSTMESH-PLAINTEXT-MARKER-7f3a9c";
    let body = m.lab.dir.path().join("marker.txt");
    std::fs::write(&body, marker.repeat(100)).unwrap();
    let out = hostmesh_tests::output(
        m.lab
            .cmd(CLIENT, "curl")
            .args(["-sS", "--fail", "--max-time", "10", "--data-binary"])
            .arg(format!("@{}", body.display()))
            .arg("http://web.shop.mesh/"),
    );
    assert!(out.status.success(), "{}", hostmesh_tests::stderr_of(&out));
    let answer = hostmesh_tests::stdout_of(&out);
    assert!(
        answer.starts_with(&format!("{} ", marker.len() * 100)),
        "the server got the whole body: {answer}"
    );
    std::thread::sleep(Duration::from_millis(300));
    dump.terminate(Duration::from_secs(5));
    let text = hostmesh_tests::run_ok(
        std::process::Command::new("tcpdump")
            .args(["-r"])
            .arg(&pcap)
            .args(["-n", "-A"]),
    );
    assert!(!text.contains(marker), "plaintext payload seen on the wire");
    assert!(
        !text.contains("GET / HTTP") && !text.contains("POST / HTTP"),
        "plaintext HTTP seen on the wire"
    );
    assert!(
        text.contains(".15008"),
        "tunnel traffic to port 15008 expected:\n{}",
        &text[..text.len().min(2000)]
    );
    assert!(
        !text.contains(".8080:") && !text.contains(".8080 >"),
        "nothing to the app port on the wire"
    );
    // What crossed port 15008 is TLS records (TCP) or QUIC v1 packets
    // (QUIC), every byte of it, and enough of it to hold the upload.
    let capture = hostmesh_tests::pcap::read(&std::fs::read(&pcap).unwrap()).unwrap();
    let uploaded = marker.len() * 100;
    let a1_ip = std::net::IpAddr::V4(a1);
    if transport == "tcp" {
        let mut to_server = 0;
        for (flow, stream) in &capture.tcp {
            if flow.dst.1 != 15008 && flow.src.1 != 15008 {
                continue;
            }
            let records = hostmesh_tests::pcap::tls_records(stream)
                .unwrap_or_else(|e| panic!("{flow:?} is not TLS: {e}"));
            if flow.dst == (a1_ip, 15008) || flow.dst.1 == 15008 {
                to_server += records.application_bytes;
            }
        }
        assert!(
            to_server >= uploaded,
            "{to_server} bytes of TLS application data towards the servers, for an upload of {uploaded}"
        );
    } else {
        let mut to_server = 0;
        for (flow, datagrams) in &capture.udp {
            if flow.dst.1 != 15008 && flow.src.1 != 15008 {
                continue;
            }
            for d in datagrams {
                assert!(
                    hostmesh_tests::pcap::is_quic_v1(d),
                    "{flow:?}: not a QUIC v1 packet: {:02x?}",
                    &d[..d.len().min(16)]
                );
                if flow.dst.1 == 15008 {
                    to_server += d.len();
                }
            }
        }
        assert!(
            to_server >= uploaded,
            "{to_server} bytes of QUIC towards the servers, for an upload of {uploaded}"
        );
    }

    // Plaintext from a third host to the strict port is dropped; the
    // tunnel port is open.
    let plain = m.curl(PLAIN, &format!("http://{a1}:8080/"), 3);
    assert!(
        plain.is_err(),
        "plaintext to a strict port must not get through: {plain:?}"
    );
    m.lab
        .wait_tcp(PLAIN, &format!("{a1}:15008"), Duration::from_secs(5));

    // Metrics on both ends, by service and peer identity.
    let client_metrics = m
        .lab
        .http_get(CLIENT, "http://127.0.0.1:15000/metrics")
        .unwrap();
    let opened = metric(
        &client_metrics,
        "hostmesh_meshd_connections_opened_total",
        &[
            "direction=\"outbound\"",
            "service=\"web.shop\"",
            "peer=\"spiffe://hostmesh.local/ns/shop/sa/web\"",
        ],
    );
    assert!(opened >= 36, "{opened}\n{client_metrics}");
    let timed = metric(
        &client_metrics,
        "hostmesh_meshd_connection_duration_seconds_count",
        &[
            "direction=\"outbound\"",
            "service=\"web.shop\"",
            "peer=\"spiffe://hostmesh.local/ns/shop/sa/web\"",
        ],
    );
    // (The last connection may still be closing as curl returns.)
    assert!(timed >= 30, "durations by service and peer: {timed}");
    assert!(
        metric(
            &client_metrics,
            "hostmesh_meshd_sent_bytes_total",
            &["direction=\"outbound\""]
        ) >= (marker.len() * 100) as u64
    );
    let server_metrics = m.lab.http_get(1, "http://127.0.0.1:15000/metrics").unwrap();
    assert!(
        metric(
            &server_metrics,
            "hostmesh_meshd_connections_opened_total",
            &[
                "direction=\"inbound\"",
                "peer=\"spiffe://hostmesh.local/ns/shop/sa/client\""
            ]
        ) > 0,
        "{server_metrics}"
    );
    // One JSON access-log line per connection, with both identities.
    let log = m.meshd_log(CLIENT);
    let line = log
        .lines()
        .find(|l| l.contains("\"direction\":\"outbound\"") && l.contains("\"result\":\"ok\""))
        .unwrap_or_else(|| panic!("no access log line:\n{log}"));
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        entry["src_identity"],
        "spiffe://hostmesh.local/ns/shop/sa/client"
    );
    assert_eq!(
        entry["dst_identity"],
        "spiffe://hostmesh.local/ns/shop/sa/web"
    );
    assert_eq!(entry["service"], "web.shop");
    assert_eq!(entry["transport"], transport);
    assert!(entry["bytes_received"].as_u64().unwrap() > 0);
    // Pooled tunnels: far fewer handshakes than connections.
    let status = client_status(&m);
    let conns: u64 = status["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["connections"].as_u64().unwrap())
        .sum();
    assert!(conns <= 2 * 4, "tunnels are pooled: {status}");
    // The data worker got the 100 µs scheduler slice meshd asks for by
    // default, on a kernel that has custom slices (6.12 and later).
    let slice = status["schedulerSlice"].as_str().unwrap_or_default();
    if hostmesh_tests::kernel_at_least(6, 12) {
        assert_eq!(slice, "100 µs", "{status}");
    } else {
        assert!(slice.contains("Linux 6.12"), "{status}");
    }
    // Where glibc's large copies have the slow case (AMD processors with
    // fast string moves, such as the benchmark VM), meshd started itself
    // again without it; elsewhere it left them alone.
    let copies = status["memcpy"].as_str().unwrap_or_default();
    let here = hostmesh_meshd::memcpy::probe();
    let slow = hostmesh_meshd::memcpy::SLOW;
    if here >= 1.5 * slow {
        assert!(
            copies.contains("rep movsb turned off"),
            "{here:.1}x: {status}"
        );
    } else if here < slow / 1.5 {
        assert!(copies.contains("fast here"), "{here:.1}x: {status}");
    } else {
        assert!(copies.starts_with("glibc's copies: "), "{status}");
    }
    if transport == "tcp" {
        // Over TCP, dedicated connections (meshd's default), reused: the 36
        // connections above, one after another, took a few per server host
        // (one goes idle a round trip after its stream ends, when the
        // server's DONE comes, so a curl right behind may get a new one).
        let tunnels = status["tunnels"].as_array().unwrap();
        assert!(
            !tunnels.is_empty() && tunnels.iter().all(|t| t["kind"] == "dedicated"),
            "{status}"
        );
    } else {
        // Over QUIC, one connection per server host, listed as such.
        let tunnels = status["tunnels"].as_array().unwrap();
        assert!(
            (1..=2).contains(&tunnels.len())
                && tunnels
                    .iter()
                    .all(|t| t["kind"] == "quic" && t["connections"] == 1),
            "{status}"
        );
    }
}

fn new_connections_succeed_on_the_other_server_within_5s_after_a_server_host_dies(transport: &str) {
    let mut m = lab(&[1, 2], transport);
    // Warm the pool to both.
    let seen: HashSet<String> = (0..20)
        .map(|_| m.curl(CLIENT, "http://web.shop.mesh/", 10).unwrap())
        .collect();
    assert_eq!(seen.len(), 2);
    // The host dies: its processes and its link.
    m.kill_meshd(1);
    m.apps.retain_mut(|a| {
        if a.name == "app1-8080" {
            a.kill();
            false
        } else {
            true
        }
    });
    m.lab.sh_ok(1, "ip link set eth0 down");
    let died = Instant::now();
    let first_ok = m.eventually(
        "a new connection to succeed",
        Duration::from_secs(10),
        || {
            m.curl(CLIENT, "http://web.shop.mesh/", 5)
                .map(|_| Instant::now())
        },
    );
    let took = first_ok.duration_since(died);
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    for _ in 0..10 {
        assert_eq!(m.curl(CLIENT, "http://web.shop.mesh/", 5).unwrap(), "web-2");
    }
    // A connection addressed to the dead host itself fails, and the failure
    // is counted against the service and the identity that was expected
    // there.
    let a1 = m.lab.host(1).addr;
    assert!(m.curl(CLIENT, &format!("http://{a1}:8080/"), 8).is_err());
    let text = m
        .lab
        .http_get(CLIENT, "http://127.0.0.1:15000/metrics")
        .unwrap();
    assert!(
        metric(
            &text,
            "hostmesh_meshd_connection_failures_total",
            &[
                "direction=\"outbound\"",
                "service=\"web.shop\"",
                "peer=\"spiffe://hostmesh.local/ns/shop/sa/web\"",
            ],
        ) >= 1,
        "{text}"
    );
}

fn a_1gib_transfer_arrives_with_the_same_checksum(transport: &str) {
    let mut m = lab(&[1], transport);
    let big = m.lab.dir.path().join("big.bin");
    hostmesh_tests::run_ok(std::process::Command::new("sh").arg("-c").arg(format!(
        "head -c 1073741824 /dev/urandom > {}",
        big.display()
    )));
    let want = hostmesh_tests::run_ok(std::process::Command::new("sha256sum").arg(&big));
    let want = want.split_whitespace().next().unwrap().to_string();
    m.big_app(1, 9090, &big);
    m.apply(
        "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: files, namespace: shop}\nspec: {ports: [{port: 80, targetPort: 9090}]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: web, namespace: shop}\nspec: {labels: {app: web}, services: [web, files]}\n",
    );
    m.eventually(
        "files endpoint healthy at the client",
        Duration::from_secs(20),
        || {
            let config = m.config(CLIENT);
            let ok = config["services"].as_array().unwrap().iter().any(|s| {
                s["name"] == "files"
                    && s["endpoints"].as_array().is_some_and(|e| {
                        e.iter()
                            .any(|e| e["healthyPorts"].as_array().is_some_and(|p| !p.is_empty()))
                    })
            });
            if ok { Ok(()) } else { Err(format!("{config}")) }
        },
    );
    m.wait_capture_current(CLIENT);
    let started = Instant::now();
    let got = m.lab.sh_ok(
        CLIENT,
        "curl -sS --fail --max-time 300 http://files.shop.mesh/big | sha256sum",
    );
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "checksum differs"
    );
    eprintln!(
        "1 GiB through the mesh in {secs:.1}s ({:.0} MiB/s)",
        1024.0 / secs
    );
}

fn after_meshd_stops_its_table_is_gone_and_direct_traffic_flows(transport: &str) {
    let mut m = lab(&[1], transport);
    let a1 = m.lab.host(1).addr;
    assert!(m.lab.nft_tables(1).contains("inet hostmesh"));
    assert!(
        m.curl(PLAIN, &format!("http://{a1}:8080/"), 3).is_err(),
        "strict while meshd runs"
    );
    assert_eq!(
        m.curl(CLIENT, "http://web.shop.mesh/", 10).unwrap(),
        "web-1"
    );

    // SIGTERM drains: an upload in progress through the client's meshd
    // (8 MiB at 2 MB/s, about 4 s, inside the 10 s drain bound) finishes
    // intact; then the table is removed and meshd exits 0.
    let upload = m.lab.dir.path().join("upload.bin");
    hostmesh_tests::run_ok(std::process::Command::new("sh").arg("-c").arg(format!(
        "head -c 8388608 /dev/urandom > {}",
        upload.display()
    )));
    let want = hostmesh_tests::run_ok(std::process::Command::new("sha256sum").arg(&upload));
    let want = format!("8388608 {}", want.split_whitespace().next().unwrap());
    let result = m.lab.dir.path().join("upload.out");
    let _curl = m.lab.spawn(
        CLIENT,
        "upload",
        "sh",
        &[
            "-c",
            &format!(
                "curl -sS --fail --max-time 30 --limit-rate 2M --data-binary @{} http://web.shop.mesh/ > {}.part && mv {}.part {}",
                upload.display(),
                result.display(),
                result.display(),
                result.display()
            ),
        ],
    );
    m.eventually(
        "the upload to be under way through meshd",
        Duration::from_secs(10),
        || {
            let text = m
                .lab
                .http_get(CLIENT, "http://127.0.0.1:15000/metrics")
                .map_err(|e| e.to_string())?;
            match metric(&text, "hostmesh_meshd_connections_active", &["outbound"]) {
                0 => Err(text),
                _ => Ok(()),
            }
        },
    );
    let stopping = Instant::now();
    assert!(m.stop_meshd(CLIENT), "meshd exits 0 on SIGTERM");
    let stopped_in = stopping.elapsed();
    assert_eq!(
        std::fs::read_to_string(&result).unwrap_or_else(|e| format!("no result: {e}")),
        want,
        "the upload in flight at SIGTERM arrived whole"
    );
    assert!(
        stopped_in < Duration::from_secs(12),
        "drained within the bound: {stopped_in:?}"
    );
    assert!(!m.lab.nft_tables(CLIENT).contains("hostmesh"));
    // No VIP route is left behind either.
    let routes = m.lab.sh_ok(CLIENT, "ip route show proto 240");
    assert!(routes.trim().is_empty(), "{routes}");

    // The server's meshd: table removed, and direct traffic flows again.
    assert!(m.stop_meshd(1), "meshd exits 0 on SIGTERM");
    assert!(
        !m.lab.nft_tables(1).contains("hostmesh"),
        "table gone: {}",
        m.lab.nft_tables(1)
    );
    assert_eq!(
        m.curl(PLAIN, &format!("http://{a1}:8080/"), 5).unwrap(),
        "web-1",
        "direct traffic flows again"
    );
    assert_eq!(
        m.curl(CLIENT, &format!("http://{a1}:8080/"), 5).unwrap(),
        "web-1",
        "the client goes direct now"
    );
}

/// The transport of each outbound connection the client logged as
/// answered, oldest first, with the endpoint it went to.
fn logged_transports(m: &MeshLab) -> Vec<(String, String)> {
    m.meshd_log(CLIENT)
        .lines()
        .filter(|l| l.contains("\"direction\":\"outbound\"") && l.contains("\"result\":\"ok\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["endpoint"].as_str()?.to_string(),
                v["transport"].as_str()?.to_string(),
            ))
        })
        .collect()
}

#[test]
fn a_host_picks_the_transport_per_peer() {
    // Every host opens tunnels over TCP, except to host 2's address, which
    // meshd.toml sends over QUIC.
    let m = lab_with(&[1, 2], "tcp", |m| {
        format!(
            "\n[proxy.peer_transport]\n\"{}\" = \"quic\"\n",
            m.lab.host(2).addr
        )
    });
    transports_alternate(&m, ["tcp", "quic"]);
    // meshd status says what applies to whom.
    let status = client_status(&m);
    assert_eq!(status["transport"]["default"], "tcp", "{status}");
    assert_eq!(status["transport"]["host"], "tcp", "{status}");
    assert_eq!(
        status["transport"]["peers"],
        serde_json::json!([{"network": format!("{}/32", m.lab.host(2).addr), "transport": "quic"}]),
        "{status}"
    );
}

/// The client meshd's `/status` JSON.
fn client_status(m: &MeshLab) -> serde_json::Value {
    let text = m
        .lab
        .http_get(CLIENT, "http://127.0.0.1:15000/status")
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Connects to host 1 and host 2 in turn, twice, and checks that each
/// connection was logged to that host over the transport `want` gives it.
fn transports_alternate(m: &MeshLab, want: [&str; 2]) {
    for h in [1, 2, 1, 2] {
        let want = want[h - 1];
        let addr = m.lab.host(h).addr;
        let logged_before = logged_transports(m).len();
        assert_eq!(
            m.curl(CLIENT, &format!("http://{addr}:8080/"), 5).unwrap(),
            format!("web-{h}")
        );
        m.eventually(
            &format!("the connection to host {h} logged over {want}"),
            Duration::from_secs(5),
            || {
                let logged = logged_transports(m);
                match logged.get(logged_before..) {
                    Some([(endpoint, transport)])
                        if endpoint.starts_with(&format!("{addr}:")) && transport == want =>
                    {
                        Ok(())
                    }
                    _ => Err(format!("{logged:?}")),
                }
            },
        );
    }
}

#[test]
fn the_mesh_picks_the_transport_per_host_pair() {
    // No host sets a transport in meshd.toml: the controller decides. The
    // mesh says TCP; a rule naming the client's address sends its tunnels
    // to host 2 over QUIC; a rule naming only the web hosts would send
    // tunnels to host 1 over QUIC, and does not apply to the client.
    let m = lab_configured(
        &[1, 2],
        None,
        |_| String::new(),
        |m| {
            let (c, h1, h2) = (
                m.lab.host(CLIENT).addr,
                m.lab.host(1).addr,
                m.lab.host(2).addr,
            );
            format!(
                "[mesh]\ntransport = \"tcp\"\n\n[[mesh.peer_transport]]\nhosts = [\"{h1}\", \"{h2}\"]\npeers = [\"{h1}\"]\ntransport = \"quic\"\n\n[[mesh.peer_transport]]\nhosts = [\"{c}\"]\npeers = [\"{h2}\"]\ntransport = \"quic\"\n"
            )
        },
    );
    transports_alternate(&m, ["tcp", "quic"]);
    let status = client_status(&m);
    let t = &status["transport"];
    assert_eq!(t["default"], "tcp", "{status}");
    assert_eq!(t["host"], serde_json::Value::Null, "{status}");
    assert_eq!(t["mesh"], "tcp", "{status}");
    assert_eq!(t["peers"], serde_json::json!([]), "{status}");
    assert_eq!(
        t["meshPeers"],
        serde_json::json!([{"network": format!("{}/32", m.lab.host(2).addr), "transport": "quic"}]),
        "{status}"
    );
    assert_eq!(t["meshPeersApply"], true, "{status}");
    let text = m.lab.sh_ok(
        CLIENT,
        &format!("{} status", hostmesh_tests::bin("meshd").display()),
    );
    let want = format!(
        "transport:   tcp (this host: unset, the mesh: tcp); the mesh's rules for this host: to peers in {}/32 quic\n",
        m.lab.host(2).addr
    );
    assert!(text.contains(&want), "{text}");
}

#[test]
fn quic_falls_back_to_tcp_when_udp_is_blocked() {
    let m = lab(&[1], "quic");
    // Over QUIC while UDP flows. That the first connection after the lab is
    // ready succeeds is asserted by the tests above; here a failure of it
    // (seen once in CI as a refused connect, not reproduced since) is
    // reported with the lab's state and retried, since this test is about
    // what happens after.
    let mut first_failure_reported = false;
    m.eventually("a first request over QUIC", Duration::from_secs(10), || {
        m.curl(CLIENT, "http://web.shop.mesh/", 10)
            .inspect_err(|e| {
                if !std::mem::replace(&mut first_failure_reported, true) {
                    eprintln!("first request failed: {e}\n{}", m.logs());
                }
            })
            .and_then(|body| if body == "web-1" { Ok(()) } else { Err(body) })
    });
    let transports =
        |m: &MeshLab| -> Vec<String> { logged_transports(m).into_iter().map(|(_, t)| t).collect() };
    m.eventually(
        "the first connection logged",
        Duration::from_secs(5),
        || {
            if transports(&m).last().map(String::as_str) == Some("quic") {
                Ok(())
            } else {
                Err(format!("{:?}", transports(&m)))
            }
        },
    );
    // A firewall on the path drops UDP between the hosts (both ways, on the
    // client, in a table of the test's own).
    let server = m.lab.host(1).addr;
    m.lab.sh_ok(
        CLIENT,
        &format!(
            "nft add table inet testblock && nft add chain inet testblock out '{{ type filter hook output priority 0; }}' && nft add rule inet testblock out ip daddr {server} udp dport 15008 drop && nft add chain inet testblock inp '{{ type filter hook input priority 0; }}' && nft add rule inet testblock inp ip saddr {server} udp sport 15008 drop"
        ),
    );
    // The client's QUIC connection is still open as far as it knows. The
    // very next request's stream goes unanswered (2 s, twice the connect
    // timeout) and nothing else comes: the peer is marked. That request
    // fails if its bytes went with the stream (they might have reached the
    // server's app, were only the answers lost), or moves to TCP if meshd
    // had read nothing of it yet: either may happen, by when curl's
    // request lands. It must not hang.
    let before = transports(&m).len();
    let started = std::time::Instant::now();
    let first = m.curl(CLIENT, "http://web.shop.mesh/", 10);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    if let Ok(body) = &first {
        assert_eq!(body, "web-1");
    }
    let marked = |m: &MeshLab| {
        let status = client_status(m);
        (
            status["transport"]["quicUnanswered"].as_u64(),
            status["transport"]["quicOverTcp"].clone(),
        )
    };
    let server_tunnel = format!("{server}:15008");
    assert_eq!(
        marked(&m),
        (Some(1), serde_json::json!([server_tunnel])),
        "{first:?}"
    );
    // The next ones go over TCP, without trying QUIC again (which would
    // take a second and count another unanswered try).
    for _ in 0..5 {
        assert_eq!(m.curl(CLIENT, "http://web.shop.mesh/", 5).unwrap(), "web-1");
    }
    assert_eq!(marked(&m).0, Some(1));
    let want = 5 + usize::from(first.is_ok());
    m.eventually(
        "the connections over TCP logged",
        Duration::from_secs(5),
        || {
            let t = transports(&m);
            match t.get(before..) {
                Some(new) if new.len() == want && new.iter().all(|t| t == "tcp") => Ok(()),
                _ => Err(format!("{t:?}")),
            }
        },
    );
    let text = m.lab.sh_ok(
        CLIENT,
        &format!("{} status", hostmesh_tests::bin("meshd").display()),
    );
    assert!(
        text.contains(&format!(
            "quic:        unanswered 1 time since start; peers over TCP for now: {server_tunnel}\n"
        )),
        "{text}"
    );
    m.lab.sh_ok(CLIENT, "nft delete table inet testblock");
}
