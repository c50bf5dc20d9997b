//! The host control loop across network-namespace hosts, with a controller
//! over real etcd: registration, the config stream, liveness, static
//! stability, rejected updates and mesh DNS.

use std::time::{Duration, Instant};

use hostmesh_tests::mesh::{MeshLab, StoreKind};

const MESH: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
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

const LEASE_TTL_S: u64 = 5;

#[test]
fn hosts_register_stream_config_survive_the_controller_and_resolve_mesh_names() {
    hostmesh_tests::require_root();
    // host 0: controller + etcd; 1, 2: web endpoints; 3: a client.
    let mut m = MeshLab::start(4, StoreKind::Etcd, LEASE_TTL_S);
    m.apply(MESH);
    m.join(1, "shop/web");
    m.join(2, "shop/web");
    m.join(3, "shop/client");
    for h in [1, 2] {
        m.app(h, 8080, &format!("web-{h}"), "127.0.0.1");
    }
    for h in [1, 2, 3] {
        m.start_meshd(h);
    }
    let (a1, a2) = (
        m.lab.host(1).addr.to_string(),
        m.lab.host(2).addr.to_string(),
    );

    // The client's config lists both endpoints, with their health.
    m.eventually(
        "both endpoints in the client's config",
        Duration::from_secs(20),
        || {
            let eps = m.endpoints(3, "shop", "web");
            if eps == vec![a1.clone(), a2.clone()] {
                Ok(())
            } else {
                Err(format!("{eps:?}"))
            }
        },
    );
    m.eventually(
        "endpoints reported healthy",
        Duration::from_secs(20),
        || {
            let config = m.config(3);
            let web = &config["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "web")
                .cloned()
                .unwrap();
            let healthy = web["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| {
                    e["healthyPorts"]
                        .as_array()
                        .is_some_and(|p| p.contains(&serde_json::json!(8080)))
                })
                .count();
            if healthy == 2 {
                Ok(())
            } else {
                Err(format!("{web}"))
            }
        },
    );
    let vip = m.config(3)["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["vips"][0]
        .as_str()
        .unwrap()
        .to_string();

    // An unmodified program resolves mesh names (getent goes through the
    // host's resolver, port 53, redirected to meshd).
    let got = m.lab.sh_ok(3, "getent hosts web.shop.mesh");
    assert_eq!(got.split_whitespace().next(), Some(vip.as_str()), "{got}");
    let got = m.lab.sh_ok(3, "getent hosts web");
    assert_eq!(
        got.split_whitespace().next(),
        Some(vip.as_str()),
        "one-label names in the host's namespace: {got}"
    );
    let missing = m.lab.sh(3, "getent hosts nope.shop.mesh");
    assert!(
        !missing.status.success(),
        "unknown mesh names do not resolve"
    );

    // Every other name goes to the host's own resolver (10.77.0.254 in its
    // resolv.conf), through meshd: the query to port 53 is redirected to
    // meshd, which forwards it with its own (exempt) sockets and caches
    // the answer.
    let upstream = upstream_dns(&m);
    let got = m.lab.sh_ok(3, "getent ahostsv4 www.example.test");
    assert_eq!(got.split_whitespace().next(), Some("10.99.0.1"), "{got}");
    let asked = || {
        std::fs::read_to_string(&upstream.1)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "www.example.test 1")
            .count()
    };
    assert_eq!(asked(), 1, "forwarded once");
    let again = m.lab.sh_ok(3, "getent ahostsv4 www.example.test");
    assert_eq!(again.split_whitespace().next(), Some("10.99.0.1"));
    assert_eq!(asked(), 1, "the second answer came from meshd's cache");
    let nx = m.lab.sh(3, "getent ahostsv4 nothing.example.invalid");
    assert!(!nx.status.success(), "the upstream's NXDOMAIN is passed on");
    let dns_metrics = m.lab.http_get(3, "http://127.0.0.1:15000/metrics").unwrap();
    for result in ["forwarded", "cache_hit", "mesh_answer", "mesh_nxdomain"] {
        let series = format!("hostmesh_meshd_dns_queries_total{{result=\"{result}\"}}");
        assert!(
            dns_metrics
                .lines()
                .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
            "{series} counted:\n{dns_metrics}"
        );
    }
    drop(upstream);

    // meshctl status: every host, in sync, with heartbeats and certificates.
    m.eventually(
        "every host ready and in sync",
        Duration::from_secs(20),
        || all_in_sync(&m, 3),
    );
    // Pushes go only to hosts whose snapshot changed: a Policy for web
    // reaches the web hosts, and the client (which does not serve web)
    // gets nothing.
    let client_version = m.config(3)["version"].clone();
    m.apply(
        "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: web-allow, namespace: shop}\nspec: {service: web, action: allow, rules: [{from: [{namespace: shop}]}]}\n",
    );
    for h in [1, 2] {
        m.eventually(
            &format!("the policy on web host {h}"),
            Duration::from_secs(20),
            || match m.config(h)["policies"].as_array().map(Vec::len) {
                Some(1) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    m.eventually(
        "every host ready and in sync after the policy",
        Duration::from_secs(20),
        || all_in_sync(&m, 3),
    );
    assert_eq!(
        m.config(3)["version"],
        client_version,
        "the client's config did not change, so it got no push"
    );
    assert_eq!(m.config(3)["policies"].as_array().map(Vec::len), Some(0));

    let st = m.status();
    for h in st["items"].as_array().unwrap() {
        assert!(h["lastHeartbeatUnixMs"].as_i64().unwrap() > 0, "{h}");
        assert!(!h["certExpiry"].as_str().unwrap().is_empty(), "{h}");
        assert_eq!(h["ackedVersion"], h["latestVersion"], "{h}");
    }

    // Killing an endpoint's meshd removes it from the others' config
    // within the lease TTL plus one push.
    m.kill_meshd(2);
    let killed = Instant::now();
    m.eventually(
        "the dead endpoint to leave the client's config",
        Duration::from_secs(LEASE_TTL_S + 10),
        || {
            let eps = m.endpoints(3, "shop", "web");
            if eps == vec![a1.clone()] {
                Ok(())
            } else {
                Err(format!("{eps:?}"))
            }
        },
    );
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(LEASE_TTL_S + 3),
        "took {took:?}; the lease TTL is {LEASE_TTL_S}s"
    );
    m.start_meshd(2);
    m.eventually(
        "the restarted endpoint back",
        Duration::from_secs(20),
        || {
            let eps = m.endpoints(3, "shop", "web");
            if eps.len() == 2 {
                Ok(())
            } else {
                Err(format!("{eps:?}"))
            }
        },
    );

    // Stopping the controller changes no host's config. (First everything
    // settles: the restarted endpoint's health arrives in a heartbeat after
    // its Hello, and that push must land before the snapshot is taken.)
    m.eventually(
        "every host in sync with both endpoints healthy",
        Duration::from_secs(20),
        || {
            all_in_sync(&m, 3)?;
            match healthy_endpoints(&m.config(3)) {
                2 => Ok(()),
                n => Err(format!("{n} healthy endpoints")),
            }
        },
    );
    let pushes_before = controller_metric(
        &m,
        "hostmesh_controller_config_pushes_total{result=\"full\"}",
    );
    let before: Vec<serde_json::Value> = (1..=3).map(|h| m.config(h)).collect();
    m.kill_controller();
    std::thread::sleep(Duration::from_secs(LEASE_TTL_S + 2));
    let after: Vec<serde_json::Value> = (1..=3).map(|h| m.config(h)).collect();
    assert_eq!(
        before, after,
        "configs must not change while the controller is gone"
    );

    // Restarting a meshd while the controller is down serves the same
    // snapshot from disk, and DNS still answers.
    assert!(m.stop_meshd(3), "meshd exits 0 on SIGTERM");
    m.start_meshd(3);
    assert_eq!(m.config(3), before[2], "the same snapshot, from disk");
    let got = m.lab.sh_ok(3, "getent hosts web.shop.mesh");
    assert_eq!(got.split_whitespace().next(), Some(vip.as_str()));

    // The controller comes back after every lease ran out (the hosts' live
    // records are gone). Hosts reconnect without a full push, and while they
    // trickle back (jittered backoff) no host is told that the endpoints of
    // those still to come are gone: the startup hold.
    m.start_controller();
    m.eventually(
        "every host reconnected and in sync",
        Duration::from_secs(50),
        || {
            let eps = m.endpoints(3, "shop", "web");
            assert_eq!(
                eps,
                vec![a1.clone(), a2.clone()],
                "the client lost an endpoint while hosts reconnected\n{}",
                m.logs()
            );
            all_in_sync(&m, 3)
        },
    );

    assert_eq!(healthy_endpoints(&m.config(3)), 2, "both still healthy");
    let metrics = m.lab.http_get(0, "http://127.0.0.1:15014/metrics").unwrap();
    let full_pushes = controller_metric(
        &m,
        "hostmesh_controller_config_pushes_total{result=\"full\"}",
    );
    assert_eq!(
        full_pushes, 0,
        "the restarted controller sent no full snapshot (before the restart: {pushes_before}):\n{metrics}"
    );
    assert!(
        controller_metric(&m, "hostmesh_controller_startup_holds_total") >= 1,
        "some host reconnected while others were missing and was held:\n{metrics}"
    );

    // An update a host cannot take is rejected, the last good config keeps
    // serving, and meshctl status shows it.
    let good_version = m.config(1)["version"].clone();
    m.apply(&MESH.replace("targetPort: 8080", "targetPort: 15008"));
    m.eventually(
        "the web hosts to reject the update",
        Duration::from_secs(20),
        || {
            let st = m.status();
            let rejected: Vec<&serde_json::Value> = st["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h["state"] == "rejected")
                .collect();
            if rejected.len() == 2
                && rejected.iter().all(|h| {
                    h["rejectReason"]
                        .as_str()
                        .unwrap()
                        .contains("meshd's own ports")
                        && h["inSync"] == false
                        && h["latestVersion"].as_u64() > h["ackedVersion"].as_u64()
                })
            {
                Ok(())
            } else {
                Err(format!("{st:#}"))
            }
        },
    );
    assert_eq!(
        m.config(1)["version"],
        good_version,
        "host 1 keeps serving its last good config"
    );
    let table = m.meshctl_ok(&["status"]);
    assert!(table.contains("rejected"), "{table}");
    // The client host, which does not serve web, took it.
    m.eventually(
        "the client to take the update",
        Duration::from_secs(20),
        || {
            let st = m.status();
            let client = st["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["group"] == "client")
                .cloned()
                .unwrap();
            if client["state"] == "ready" && client["inSync"] == true {
                Ok(())
            } else {
                Err(format!("{client}"))
            }
        },
    );
    // Fixing it brings everyone back in sync.
    m.apply(MESH);
    m.eventually(
        "all hosts in sync after the fix",
        Duration::from_secs(20),
        || all_in_sync(&m, 3),
    );
}

fn healthy_endpoints(config: &serde_json::Value) -> usize {
    config["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "web")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| {
            e["healthyPorts"]
                .as_array()
                .is_some_and(|p| p.contains(&serde_json::json!(8080)))
        })
        .count()
}

/// A counter or gauge from the controller's /metrics (0 when absent).
fn controller_metric(m: &MeshLab, series: &str) -> u64 {
    let text = m
        .lab
        .http_get(0, "http://127.0.0.1:15014/metrics")
        .unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Ok when `meshctl status` lists exactly `hosts` hosts, all ready and in
/// sync; else the status, for the failure message.
fn all_in_sync(m: &MeshLab, hosts: usize) -> Result<(), String> {
    let st = m.status();
    let items = st["items"].as_array().cloned().unwrap_or_default();
    let ready = items
        .iter()
        .filter(|h| h["state"] == "ready" && h["inSync"] == true)
        .count();
    if items.len() == hosts && ready == hosts {
        Ok(())
    } else {
        Err(format!("{st:#}"))
    }
}

/// A tiny DNS server at the lab's resolver address (10.77.0.254, on the
/// bridge): A 10.99.0.1 for names under example.test, NXDOMAIN for the
/// rest. Logs "name qtype" per query to the returned file.
fn upstream_dns(m: &MeshLab) -> (hostmesh_tests::Proc, std::path::PathBuf) {
    const SERVER: &str = r#"
import socket, struct, sys
log = open(sys.argv[1], 'a', buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('10.77.0.254', 53))
print('listening', flush=True)
while True:
    q, peer = s.recvfrom(4096)
    tid = struct.unpack('>H', q[:2])[0]
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
        i += 1 + q[i]
    qtype = struct.unpack('>H', q[i + 1:i + 3])[0]
    name = '.'.join(labels)
    log.write(f'{name} {qtype}\n')
    question = q[12:i + 5]
    if name.endswith('example.test'):
        answer = b''
        if qtype == 1:
            answer = b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 300, 4) + socket.inet_aton('10.99.0.1')
        header = struct.pack('>HHHHHH', tid, 0x8180, 1, 1 if answer else 0, 0, 0)
    else:
        answer = b''
        header = struct.pack('>HHHHHH', tid, 0x8183, 1, 0, 0, 0)
    s.sendto(header + question + answer, peer)
"#;
    let dir = m.lab.dir.path();
    let script = dir.join("dns.py");
    std::fs::write(&script, SERVER).unwrap();
    let log = dir.join("dns-queries.log");
    hostmesh_tests::run_ok(std::process::Command::new("ip").args([
        "-n",
        &m.lab.sw,
        "addr",
        "add",
        &format!("{}/24", hostmesh_tests::LAB_NAMESERVER),
        "dev",
        "br0",
    ]));
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &m.lab.sw, "python3"])
        .arg(&script)
        .arg(&log);
    let p = hostmesh_tests::Proc::spawn("upstream-dns", c, dir);
    hostmesh_tests::eventually("the upstream DNS server", Duration::from_secs(10), || {
        if p.log().contains("listening") {
            Ok(())
        } else {
            Err(p.log())
        }
    });
    (p, log)
}
