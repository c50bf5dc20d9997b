//! `make bench-dataplane`: the data plane measured side by side, in one
//! run, on network-namespace hosts over veth.
//!
//! Setups, all to the same server host (nginx answering 1 KiB, iperf3, a
//! TCP echo server):
//! - **direct**: plain TCP to the server's address (a port the mesh does
//!   not capture);
//! - **meshd tcp**: through the meshd pair, TLS 1.3 + HTTP/2 tunnels;
//! - **meshd quic**: through the meshd pair over QUIC (a second client host
//!   whose meshd uses QUIC);
//! - **haproxy**: an HAProxy mTLS pair in TCP mode, the peer a VM operator
//!   would otherwise pick: client-side TLS origination with a client
//!   certificate, server-side termination verifying it.
//!
//! For each: p50/p99 latency and requests/s on one keep-alive connection
//! (wrk), requests/s on 32 connections, new connections/s
//! (`Connection: close`), one-stream bulk throughput (iperf3), added
//! p50/p99 at a fixed 1,000 requests/s from an open-loop generator (oha,
//! latency-corrected), proxy RSS idle and under load, proxy CPU seconds per
//! 1,000 requests, and round trips of 1 byte and 1 KiB on one connection
//! (a small echo client in this binary). Everything is reported as a ratio
//! to direct, measured in the same run. Results go to a JSON file, an SVG
//! plot of latency percentiles, and (with --update-docs) docs/BENCHMARKS.md.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hostmesh_tests::mesh::{MeshLab, StoreKind};
use hostmesh_tests::{Proc, output, run_ok};
use serde_json::{Value, json};

const SERVER: usize = 1;
const CLIENT: usize = 2;
const CLIENT_QUIC: usize = 3;

struct Options {
    seconds: u64,
    /// meshd's data-plane worker threads (0: meshd's default, half the cores).
    workers: usize,
    oha: PathBuf,
    out_dir: PathBuf,
    update_docs: Option<PathBuf>,
    /// Set the hosts up, print how to reach them, wait this long, tear down
    /// (for profiling by hand); no measurements.
    hold: Option<u64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-dataplane [--bin-dir DIR] [--seconds N] [--workers N] [--oha PATH] [--out-dir DIR] [--update-docs docs/BENCHMARKS.md] [--hold SECONDS]\n       bench-dataplane echo-server PORT\n       bench-dataplane rtt-client ADDR SIZE COUNT"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo-server") => {
            return echo_server(
                args.get(1)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| usage()),
            );
        }
        Some("rtt-client") => {
            let addr = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage());
            let size = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage());
            let count = args
                .get(3)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage());
            return rtt_client(addr, size, count);
        }
        _ => {}
    }
    let mut o = Options {
        seconds: 5,
        workers: 0,
        oha: PathBuf::from("target/tools/bin/oha"),
        out_dir: PathBuf::from("target/bench"),
        update_docs: None,
        hold: None,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin-dir" => {
                hostmesh_tests::set_bin_dir(PathBuf::from(it.next().unwrap_or_else(|| usage())))
            }
            "--seconds" => {
                o.seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--workers" => {
                o.workers = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--oha" => o.oha = PathBuf::from(it.next().unwrap_or_else(|| usage())),
            "--out-dir" => o.out_dir = PathBuf::from(it.next().unwrap_or_else(|| usage())),
            "--update-docs" => {
                o.update_docs = Some(PathBuf::from(it.next().unwrap_or_else(|| usage())))
            }
            "--hold" => {
                o.hold = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            _ => usage(),
        }
    }
    for tool in ["wrk", "iperf3", "nginx", "haproxy"] {
        if output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .stdout
            .is_empty()
        {
            eprintln!(
                "bench-dataplane: {tool} is missing (apt-get install wrk iperf3 nginx-light haproxy)"
            );
            std::process::exit(1);
        }
    }
    if !o.oha.exists() {
        eprintln!(
            "bench-dataplane: {} is missing (cargo install oha --locked --root target/tools)",
            o.oha.display()
        );
        std::process::exit(1);
    }
    let o = Options {
        oha: std::fs::canonicalize(&o.oha).unwrap_or(o.oha),
        ..o
    };
    run(&o);
}

// ------------------------------------------------------------------ helpers

/// A TCP echo server (for round-trip measurements).
fn echo_server(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("echo-server: binding {port}: {e}");
        std::process::exit(1)
    });
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = stream;
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Round trips of `size` bytes on one connection; prints JSON percentiles.
fn rtt_client(addr: SocketAddr, size: usize, count: usize) {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rtt-client: connecting to {addr}: {e}");
            std::process::exit(1)
        }
    };
    let _ = s.set_nodelay(true);
    let payload = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let t = Instant::now();
        if s.write_all(&payload).is_err() || s.read_exact(&mut back).is_err() {
            eprintln!("rtt-client: connection to {addr} failed after {i} round trips");
            std::process::exit(1);
        }
        if i >= count / 10 {
            samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    println!(
        "{}",
        json!({"p50_us": pct(0.5), "p99_us": pct(0.99), "mean_us": mean})
    );
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

/// wrk's text output: requests/s and the latency distribution (µs).
fn parse_wrk(text: &str) -> (f64, BTreeMap<String, f64>) {
    let mut rps = 0.0;
    let mut pct = BTreeMap::new();
    let mut in_dist = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("Requests/sec:") {
            rps = l
                .trim_start_matches("Requests/sec:")
                .trim()
                .parse()
                .unwrap_or(0.0);
        }
        if l.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut parts = l.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(p), Some(v)) if p.ends_with('%') => {
                    if let Some(us) = parse_duration_us(v) {
                        pct.insert(p.trim_end_matches('%').to_string(), us);
                    }
                }
                _ => in_dist = false,
            }
        }
    }
    (rps, pct)
}

/// A process's RSS (KiB) and CPU seconds so far.
fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are the 14th and 15th fields; index 11 and 12 here.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (rss, cpu)
}

/// Threads of a process count too: children (nft) are not ours.
fn pids_of(procs: &[&Proc]) -> Vec<u32> {
    procs.iter().map(|p| p.pid()).collect()
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| proc_stats(*p).1).sum()
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| proc_stats(*p).0).sum()
}

// ------------------------------------------------------------------ setup

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A CA, a server and a client certificate for the HAProxy pair (PEM with
/// the key appended, as HAProxy wants).
fn haproxy_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca, ca_key);
    write(&dir.join("ca.pem"), &ca_cert.pem());
    for (name, sans) in [
        (
            "server",
            vec!["server.bench".to_string(), "10.77.0.11".to_string()],
        ),
        ("client", vec!["client.bench".to_string()]),
    ] {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &issuer).expect("sign");
        write(
            &dir.join(format!("{name}.pem")),
            &format!("{}{}", cert.pem(), key.serialize_pem()),
        );
    }
}

fn haproxy_server_cfg(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n\
         frontend http\n  bind 10.77.0.11:9443 ssl crt {d}/server.pem ca-file {d}/ca.pem verify required\n  default_backend http\n\
         backend http\n  server app 127.0.0.1:8081\n\
         frontend bulk\n  bind 10.77.0.11:9444 ssl crt {d}/server.pem ca-file {d}/ca.pem verify required\n  default_backend bulk\n\
         backend bulk\n  server app 127.0.0.1:5202\n\
         frontend echo\n  bind 10.77.0.11:9445 ssl crt {d}/server.pem ca-file {d}/ca.pem verify required\n  default_backend echo\n\
         backend echo\n  server app 127.0.0.1:7071\n"
    )
}

fn haproxy_client_cfg(dir: &Path) -> String {
    let d = dir.display();
    let server = |port: u16| {
        format!(
            "  server s1 10.77.0.11:{port} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required verifyhost server.bench sni str(server.bench)\n"
        )
    };
    format!(
        "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n\
         frontend http\n  bind 127.0.0.1:18080\n  default_backend http\nbackend http\n{}\
         frontend bulk\n  bind 127.0.0.1:15201\n  default_backend bulk\nbackend bulk\n{}\
         frontend echo\n  bind 127.0.0.1:17071\n  default_backend echo\nbackend echo\n{}",
        server(9443),
        server(9444),
        server(9445)
    )
}

fn nginx_cfg(dir: &Path) -> String {
    let d = dir.display();
    format!(
        // One process, no master: killing it (the harness kills by PID)
        // leaves no orphaned worker behind.
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n  sendfile on;\n  tcp_nodelay on;\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 8080;\n    listen 8081;\n    root {d}/www;\n  }}\n}}\n"
    )
}

const MESH: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: bench}
spec: {ports: [{port: 80, targetPort: 8080, protocol: http}], mtls: strict}
---
apiVersion: hostmesh/v1
kind: Service
metadata: {name: bulk, namespace: bench}
spec: {ports: [{port: 5201}], mtls: strict}
---
apiVersion: hostmesh/v1
kind: Service
metadata: {name: echo, namespace: bench}
spec: {ports: [{port: 7070}], mtls: strict}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: server, namespace: bench}
spec: {services: [web, bulk, echo]}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: client, namespace: bench}
spec: {}
"#;

struct Setup {
    name: &'static str,
    host: usize,
    http: String,
    bulk: (String, u16),
    echo: String,
    /// The proxy processes whose RSS and CPU count for this setup.
    proxies: Vec<u32>,
}

fn run(o: &Options) {
    hostmesh_tests::clean_up_on_interrupt("removing the benchmark hosts");
    std::fs::create_dir_all(&o.out_dir).expect("output directory");
    println!("== setting up the hosts (release binaries, network namespaces)");
    let mut m = MeshLab::start(4, StoreKind::Embedded, 15);
    let dir = m.lab.dir.path().to_path_buf();
    // Servers on the server host.
    std::fs::create_dir_all(dir.join("www")).expect("www");
    write(&dir.join("www/1k"), &"x".repeat(1024));
    write(&dir.join("nginx.conf"), &nginx_cfg(&dir));
    let nginx_conf = dir.join("nginx.conf").display().to_string();
    let nginx = m.lab.spawn(SERVER, "nginx", "nginx", &["-c", &nginx_conf]);
    m.lab
        .wait_tcp(SERVER, "127.0.0.1:8081", Duration::from_secs(10));
    let iperf_mesh = m
        .lab
        .spawn(SERVER, "iperf-mesh", "iperf3", &["-s", "-p", "5201"]);
    let iperf_direct = m
        .lab
        .spawn(SERVER, "iperf-direct", "iperf3", &["-s", "-p", "5202"]);
    let me = std::env::current_exe()
        .expect("own path")
        .display()
        .to_string();
    let echo_mesh = m
        .lab
        .spawn(SERVER, "echo-mesh", &me, &["echo-server", "7070"]);
    let echo_direct = m
        .lab
        .spawn(SERVER, "echo-direct", &me, &["echo-server", "7071"]);
    haproxy_certs(&dir);
    write(&dir.join("haproxy-server.cfg"), &haproxy_server_cfg(&dir));
    write(&dir.join("haproxy-client.cfg"), &haproxy_client_cfg(&dir));
    let hs_cfg = dir.join("haproxy-server.cfg").display().to_string();
    let hc_cfg = dir.join("haproxy-client.cfg").display().to_string();
    let mut haproxy_server =
        m.lab
            .spawn(SERVER, "haproxy-server", "haproxy", &["-f", &hs_cfg, "-db"]);
    let mut haproxy_client =
        m.lab
            .spawn(CLIENT, "haproxy-client", "haproxy", &["-f", &hc_cfg, "-db"]);
    for (p, host, addr) in [
        (&mut haproxy_server, SERVER, "10.77.0.11:9443"),
        (&mut haproxy_client, CLIENT, "127.0.0.1:18080"),
    ] {
        hostmesh_tests::eventually("HAProxy to listen", Duration::from_secs(10), || {
            if !p.is_running() {
                panic!("{} exited:\n{}", p.name, p.log());
            }
            let ok = output(m.lab.cmd(host, "bash").args([
                "-c",
                &format!("exec 3<>/dev/tcp/{}", addr.replace(':', "/")),
            ]));
            if ok.status.success() {
                Ok(())
            } else {
                Err(p.log())
            }
        });
    }

    // The mesh.
    m.apply(MESH);
    m.join(SERVER, "bench/server");
    m.join(CLIENT, "bench/client");
    m.join(CLIENT_QUIC, "bench/client");
    start_quiet_meshd(&mut m, SERVER, "tcp", o.workers);
    start_quiet_meshd(&mut m, CLIENT, "tcp", o.workers);
    start_quiet_meshd(&mut m, CLIENT_QUIC, "quic", o.workers);
    for h in [CLIENT, CLIENT_QUIC] {
        m.eventually("healthy endpoints", Duration::from_secs(30), || {
            let config = m.config(h);
            let all = config["services"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|s| {
                    s["endpoints"].as_array().is_some_and(|e| {
                        e.iter()
                            .any(|e| e["healthyPorts"].as_array().is_some_and(|p| !p.is_empty()))
                    })
                });
            if all && config["services"].as_array().is_some_and(|s| s.len() == 3) {
                Ok(())
            } else {
                Err(config.to_string())
            }
        });
        m.wait_capture_current(h);
    }
    let vips: BTreeMap<String, String> = m.config(CLIENT)["services"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["vips"][0].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let server_addr = m.lab.host(SERVER).addr.to_string();
    let meshd_pid = |m: &MeshLab, h: usize| m.meshd[h].as_ref().map(|p| p.pid()).unwrap_or(0);
    let setups = vec![
        Setup {
            name: "direct",
            host: CLIENT,
            http: format!("http://{server_addr}:8081/1k"),
            bulk: (server_addr.clone(), 5202),
            echo: format!("{server_addr}:7071"),
            proxies: vec![],
        },
        Setup {
            name: "meshd tcp",
            host: CLIENT,
            http: format!("http://{}/1k", vips["web"]),
            bulk: (vips["bulk"].clone(), 5201),
            echo: format!("{}:7070", vips["echo"]),
            proxies: vec![meshd_pid(&m, CLIENT), meshd_pid(&m, SERVER)],
        },
        Setup {
            name: "meshd quic",
            host: CLIENT_QUIC,
            http: format!("http://{}/1k", vips["web"]),
            bulk: (vips["bulk"].clone(), 5201),
            echo: format!("{}:7070", vips["echo"]),
            proxies: vec![meshd_pid(&m, CLIENT_QUIC), meshd_pid(&m, SERVER)],
        },
        Setup {
            name: "haproxy",
            host: CLIENT,
            http: "http://127.0.0.1:18080/1k".to_string(),
            bulk: ("127.0.0.1".to_string(), 15201),
            echo: "127.0.0.1:17071".to_string(),
            proxies: pids_of(&[&haproxy_client, &haproxy_server]),
        },
    ];
    if let Some(hold) = o.hold {
        for s in &setups {
            println!(
                "{}: ip netns exec {}  http {}  bulk {}:{}  echo {}  proxy pids {:?}",
                s.name,
                m.lab.host(s.host).ns,
                s.http,
                s.bulk.0,
                s.bulk.1,
                s.echo,
                s.proxies
            );
        }
        println!("holding for {hold} s, then tearing down");
        std::thread::sleep(Duration::from_secs(hold));
        return;
    }
    let secs = o.seconds;
    let mut results: Vec<Value> = Vec::new();
    for s in &setups {
        println!("== {}", s.name);
        // A first request checks the path and warms pools.
        let warm = output(m.lab.cmd(s.host, "curl").args([
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            &s.http,
        ]));
        if !warm.status.success() {
            panic!(
                "{}: {} does not answer: {}\n{}",
                s.name,
                s.http,
                String::from_utf8_lossy(&warm.stderr),
                m.logs()
            );
        }
        let rss_idle = rss_of(&s.proxies);
        let wrk = |args: &[&str]| -> (f64, BTreeMap<String, f64>) {
            let mut c = m.lab.cmd(s.host, "wrk");
            c.args(args);
            parse_wrk(&run_ok(&mut c))
        };
        let d = format!("{secs}s");
        let (rps1, lat1) = wrk(&["-t1", "-c1", "-d", &d, "--latency", &s.http]);
        let cpu_before = cpu_of(&s.proxies);
        let sampler = {
            let pids = s.proxies.clone();
            std::thread::spawn(move || {
                let mut max = 0;
                let end = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < end {
                    max = max.max(rss_of(&pids));
                    std::thread::sleep(Duration::from_millis(200));
                }
                max
            })
        };
        let (rps32, _) = wrk(&["-t2", "-c32", "-d", &d, &s.http]);
        let cpu_after = cpu_of(&s.proxies);
        let rss_load = sampler.join().unwrap_or(0);
        let requests32 = rps32 * secs as f64;
        let cpu_per_1000 = if requests32 > 0.0 {
            (cpu_after - cpu_before) / requests32 * 1000.0
        } else {
            0.0
        };
        let (conn_rate, _) = wrk(&["-t2", "-c32", "-d", &d, "-H", "Connection: close", &s.http]);
        let iperf = {
            let mut c = m.lab.cmd(s.host, "iperf3");
            c.args([
                "-c",
                &s.bulk.0,
                "-p",
                &s.bulk.1.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ]);
            let v: Value = serde_json::from_str(&run_ok(&mut c)).unwrap_or_default();
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9
        };
        let oha = {
            let mut c = m.lab.cmd(s.host, &o.oha);
            c.args([
                "-z",
                &format!("{}s", secs * 2),
                "-q",
                "1000",
                "-c",
                "16",
                "--latency-correction",
                "--no-tui",
                "--output-format",
                "json",
                &s.http,
            ]);
            let v: Value = serde_json::from_str(&run_ok(&mut c)).unwrap_or_default();
            let p = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(0.0) * 1e6;
            json!({"p50_us": p("p50"), "p90_us": p("p90"), "p99_us": p("p99"), "p99.9_us": p("p99.9"), "rps": v["summary"]["requestsPerSec"]})
        };
        let rtt = |size: usize| -> Value {
            let mut c = m.lab.cmd(s.host, &me);
            c.args(["rtt-client", &s.echo, &size.to_string(), "20000"]);
            serde_json::from_str(&run_ok(&mut c)).unwrap_or_default()
        };
        let (rtt1, rtt1k) = (rtt(1), rtt(1024));
        let r = json!({
            "setup": s.name,
            "latency1_p50_us": lat1.get("50").copied().unwrap_or(0.0),
            "latency1_p99_us": lat1.get("99").copied().unwrap_or(0.0),
            "rps_1": rps1,
            "rps_32": rps32,
            "new_conns_per_s": conn_rate,
            "bulk_gbps": iperf,
            "open_loop": oha,
            "rss_idle_kib": rss_idle,
            "rss_load_kib": rss_load,
            "cpu_s_per_1000_req": cpu_per_1000,
            "rtt_1b": rtt1,
            "rtt_1k": rtt1k,
        });
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
        results.push(r);
    }
    drop((
        nginx,
        iperf_mesh,
        iperf_direct,
        echo_mesh,
        echo_direct,
        haproxy_server,
        haproxy_client,
    ));
    let report = json!({
        "seconds_per_measurement": secs,
        "meshd_worker_threads": o.workers,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": String::from_utf8_lossy(&output(Command::new("uname").arg("-r")).stdout).trim(),
        "results": results,
    });
    let json_path = o.out_dir.join("dataplane.json");
    write(
        &json_path,
        &serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
    let svg_path = o.out_dir.join("dataplane-latency.svg");
    write(&svg_path, &svg(&results));
    let table = markdown(&results);
    println!("\n{table}");
    println!(
        "raw results: {}\nplot: {}",
        json_path.display(),
        svg_path.display()
    );
    if let Some(docs) = &o.update_docs {
        update_docs(docs, &table, &report);
        println!("updated {}", docs.display());
    }
}

fn start_quiet_meshd(m: &mut MeshLab, host: usize, transport: &str, workers: usize) {
    // Release meshd with warn-level logs and no access log: the benchmark
    // measures the proxy, not the log writer.
    let config = m.lab.dir.path().join(format!("bench-meshd{host}.toml"));
    write(
        &config,
        &format!(
            "state_dir = {:?}\n[log]\nformat = \"json\"\nlevel = \"warn\"\naccess_log = false\n[proxy]\ntransport = {transport:?}\nworker_threads = {workers}\n",
            m.state_dir(host).display().to_string()
        ),
    );
    let conf = config.display().to_string();
    let p = m.lab.spawn(
        host,
        &format!("meshd{host}"),
        hostmesh_tests::bin("meshd"),
        &["run", "--config", &conf],
    );
    m.meshd[host] = Some(p);
    m.wait_meshd_ready(host);
}

// ------------------------------------------------------------------ output

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn markdown(results: &[Value]) -> String {
    let direct = &results[0];
    let ratio = |v: f64, d: f64| {
        if d > 0.0 {
            format!("{:.2}×", v / d)
        } else {
            "-".into()
        }
    };
    let mut out = String::new();
    out.push_str("| | direct | meshd tcp | meshd quic | haproxy mTLS |\n|---|---|---|---|---|\n");
    let row = |out: &mut String,
               label: &str,
               get: &dyn Fn(&Value) -> f64,
               fmt: &dyn Fn(f64) -> String,
               show_ratio: bool| {
        out.push_str(&format!("| {label} |"));
        for r in results {
            let v = get(r);
            if show_ratio && r != direct {
                out.push_str(&format!(" {} ({}) |", fmt(v), ratio(v, get(direct))));
            } else {
                out.push_str(&format!(" {} |", fmt(v)));
            }
        }
        out.push('\n');
    };
    let us = |v: f64| format!("{v:.0} µs");
    let n = |v: f64| format!("{v:.0}");
    row(
        &mut out,
        "p50 latency, 1 keep-alive conn",
        &|r| f(r, "latency1_p50_us"),
        &us,
        true,
    );
    row(
        &mut out,
        "p99 latency, 1 keep-alive conn",
        &|r| f(r, "latency1_p99_us"),
        &us,
        true,
    );
    row(&mut out, "requests/s, 1 conn", &|r| f(r, "rps_1"), &n, true);
    row(
        &mut out,
        "requests/s, 32 conns",
        &|r| f(r, "rps_32"),
        &n,
        true,
    );
    row(
        &mut out,
        "new connections/s (Connection: close)",
        &|r| f(r, "new_conns_per_s"),
        &n,
        true,
    );
    row(
        &mut out,
        "one-stream bulk, Gbit/s",
        &|r| f(r, "bulk_gbps"),
        &|v| format!("{v:.2}"),
        true,
    );
    row(
        &mut out,
        "open loop 1000 req/s: p50",
        &|r| r["open_loop"]["p50_us"].as_f64().unwrap_or(0.0),
        &us,
        true,
    );
    row(
        &mut out,
        "open loop 1000 req/s: p99",
        &|r| r["open_loop"]["p99_us"].as_f64().unwrap_or(0.0),
        &us,
        true,
    );
    row(
        &mut out,
        "round trip 1 B, p50",
        &|r| r["rtt_1b"]["p50_us"].as_f64().unwrap_or(0.0),
        &us,
        true,
    );
    row(
        &mut out,
        "round trip 1 KiB, p50",
        &|r| r["rtt_1k"]["p50_us"].as_f64().unwrap_or(0.0),
        &us,
        true,
    );
    row(
        &mut out,
        "proxy RSS idle (both ends), MiB",
        &|r| f(r, "rss_idle_kib") / 1024.0,
        &|v| format!("{v:.1}"),
        false,
    );
    row(
        &mut out,
        "proxy RSS under load (both ends), MiB",
        &|r| f(r, "rss_load_kib") / 1024.0,
        &|v| format!("{v:.1}"),
        false,
    );
    row(
        &mut out,
        "proxy CPU s per 1000 requests (both ends)",
        &|r| f(r, "cpu_s_per_1000_req"),
        &|v| format!("{v:.4}"),
        false,
    );
    // Added latency over direct.
    out.push_str("\nAdded latency over direct (same run):\n\n| | meshd tcp | meshd quic | haproxy mTLS |\n|---|---|---|---|\n");
    let added = |out: &mut String, label: &str, get: &dyn Fn(&Value) -> f64| {
        out.push_str(&format!("| {label} |"));
        for r in &results[1..] {
            out.push_str(&format!(" {:+.0} µs |", get(r) - get(direct)));
        }
        out.push('\n');
    };
    added(&mut out, "p50, 1 keep-alive conn", &|r| {
        f(r, "latency1_p50_us")
    });
    added(&mut out, "p99, 1 keep-alive conn", &|r| {
        f(r, "latency1_p99_us")
    });
    added(&mut out, "p50 at 1000 req/s (open loop)", &|r| {
        r["open_loop"]["p50_us"].as_f64().unwrap_or(0.0)
    });
    added(&mut out, "p99 at 1000 req/s (open loop)", &|r| {
        r["open_loop"]["p99_us"].as_f64().unwrap_or(0.0)
    });
    out
}

/// Latency percentiles per setup at 1000 req/s, as an SVG line chart.
fn svg(results: &[Value]) -> String {
    let keys = ["p50_us", "p90_us", "p99_us", "p99.9_us"];
    let labels = ["p50", "p90", "p99", "p99.9"];
    let colors = ["#444444", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"];
    let max = results
        .iter()
        .flat_map(|r| {
            keys.iter()
                .map(move |k| r["open_loop"][*k].as_f64().unwrap_or(0.0))
        })
        .fold(1.0f64, f64::max);
    let (w, h, left, bottom, top) = (720.0, 420.0, 70.0, 50.0, 40.0);
    let plot_w = w - left - 180.0;
    let plot_h = h - top - bottom;
    let x = |i: usize| left + plot_w * i as f64 / (keys.len() - 1) as f64;
    let y = |v: f64| top + plot_h * (1.0 - v / (max * 1.1));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"15\">Latency at 1,000 requests/s (open loop, oha, latency-corrected), 1 KiB HTTP</text>\n"
    );
    for t in 0..=4 {
        let v = max * 1.1 * t as f64 / 4.0;
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#dddddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0} µs</text>\n",
            left + plot_w,
            left - 6.0,
            y(v) + 4.0,
            v,
            y = y(v)
        ));
    }
    for (i, l) in labels.iter().enumerate() {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{l}</text>\n",
            x(i),
            h - bottom + 20.0
        ));
    }
    for (n, r) in results.iter().enumerate() {
        let color = colors[n % colors.len()];
        let pts: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                format!(
                    "{:.1},{:.1}",
                    x(i),
                    y(r["open_loop"][*k].as_f64().unwrap_or(0.0))
                )
            })
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
        for p in &pts {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            s.push_str(&format!(
                "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n"
            ));
        }
        let ly = top + 20.0 + 20.0 * n as f64;
        s.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            left + plot_w + 20.0,
            ly - 4.0,
            left + plot_w + 40.0,
            ly,
            r["setup"].as_str().unwrap_or_default()
        ));
    }
    s.push_str("</svg>\n");
    s
}

const BEGIN: &str = "<!-- bench-dataplane:begin -->";
const END: &str = "<!-- bench-dataplane:end -->";

fn update_docs(path: &Path, table: &str, report: &Value) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!(
        "{BEGIN}\n\nMeasured by `make bench-dataplane` ({} s per measurement, {} cores, kernel {}):\n\n{table}\n![latency percentiles](bench/dataplane-latency.svg)\n\n{END}",
        report["seconds_per_measurement"],
        report["cores"],
        report["kernel"].as_str().unwrap_or_default()
    );
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{block}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{text}\n{block}\n"),
    };
    write(path, &new);
}
