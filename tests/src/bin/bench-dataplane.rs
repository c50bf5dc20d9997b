//! `make bench-dataplane`: the data plane measured side by side, in one
//! run, on network-namespace hosts over veth.
//!
//! Setups, all to the same server host (nginx answering 1 KiB, iperf3, a
//! TCP echo server):
//! - **direct**: plain TCP to the server's address (a port the mesh does
//!   not capture);
//! - **meshd tcp**: through the meshd pair over TLS 1.3 on TCP (dedicated
//!   tunnel connections by default, `--tcp-tunnels multiplexed` for the
//!   HTTP/2 tunnel);
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
//! to direct, measured in the same run: each measurement runs for every
//! setup in turn, `--rounds` times (3), the loads in slices of 1 or 2 s
//! that the setups take in turns (see [`take_turns`]), and the tables give medians of
//! per-round figures and of per-round ratios and differences; the run
//! judges the issue's targets and compares meshd with HAProxy line by line.
//! The client hosts run on one half of the cores and the server host on the
//! other (`--no-pin` to leave placement to the scheduler; see [`Pinning`]).
//! Results go to a JSON file, an SVG plot of latency percentiles, and (with
//! --update-docs) docs/BENCHMARKS.md.

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
    /// Times each measurement is repeated (setups interleaved); the tables
    /// give medians.
    rounds: usize,
    /// meshd's data-plane worker threads (0: meshd's default, half the cores).
    workers: usize,
    /// meshd's `proxy.tunnel_congestion` (None: meshd's default, the system's).
    tunnel_congestion: Option<String>,
    /// meshd's `proxy.tcp_tunnels` (None: meshd's default, dedicated).
    tcp_tunnels: Option<String>,
    /// meshd's `proxy.sockmap` (None: meshd's default, "off").
    sockmap: Option<String>,
    /// meshd's `proxy.scheduler_slice` (None: meshd's default, 100us).
    scheduler_slice: Option<String>,
    /// The test hosts' default TCP congestion control, for every socket of
    /// every setup (None: what the machine's namespace has).
    host_congestion: Option<String>,
    oha: PathBuf,
    out_dir: PathBuf,
    update_docs: Option<PathBuf>,
    /// Set the hosts up, print how to reach them, wait this long, tear down
    /// (for profiling by hand); no measurements.
    hold: Option<u64>,
    /// Give the client hosts and the server host each half of the cores
    /// (see [`Pinning`]); `--no-pin` leaves placement to the scheduler.
    pin: bool,
}

/// "CPU 1" or "CPUs 4-7", for a `taskset` CPU list.
fn cpus(list: &str) -> String {
    if list.contains('-') || list.contains(',') {
        format!("CPUs {list}")
    } else {
        format!("CPU {list}")
    }
}

/// Which cores each test host's processes run on.
///
/// The test hosts share one machine's cores. Left to the scheduler, the
/// client's tools, the proxies and the servers of both "hosts" migrate
/// between the cores, and on this VM (no guest halt-polling) a wake-up
/// that crosses to an idle core costs ~30 µs: direct's p50 on one
/// connection was 16 µs with wrk and nginx on the same core and 76 µs on
/// different ones, so latency measured where the scheduler happened to put
/// things. Pinned, the two hosts behave as two machines of half the cores
/// each: traffic between hosts crosses cores (as it crosses a NIC between
/// machines), a host's own loopback traffic does not.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pinning {
    client: String,
    server: String,
}

impl Pinning {
    /// Client hosts on the lower half of the CPUs this process may use
    /// (`Cpus_allowed_list` of /proc/self/status, e.g. "0-1" or "2,4-7"),
    /// the server on the upper half; None with fewer than two.
    fn halves(allowed: &str) -> Result<Option<Pinning>, String> {
        let mut ids = Vec::new();
        for part in allowed.trim().split(',').filter(|p| !p.is_empty()) {
            let bad = || format!("CPU list {allowed:?}: {part:?} is not a CPU or a range");
            let (from, to) = match part.split_once('-') {
                Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
                None => {
                    let n: usize = part.parse().map_err(|_| bad())?;
                    (n, n)
                }
            };
            if from > to {
                return Err(bad());
            }
            ids.extend(from..=to);
        }
        if ids.len() < 2 {
            return Ok(None);
        }
        let (client, server) = ids.split_at(ids.len() / 2);
        let list = |ids: &[usize]| {
            ids.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        Ok(Some(Pinning {
            client: list(client),
            server: list(server),
        }))
    }

    fn cpus(&self, host: usize) -> &str {
        if host == SERVER {
            &self.server
        } else {
            &self.client
        }
    }
}

/// The usage, after saying which argument was wrong.
fn bad(arg: &str, why: &str) -> ! {
    eprintln!("bench-dataplane: {arg}: {why}");
    usage()
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-dataplane [--bin-dir DIR] [--seconds N] [--rounds N] [--workers N] [--tunnel-congestion NAME] [--tcp-tunnels dedicated|multiplexed] [--sockmap auto|on|off] [--scheduler-slice DURATION] [--host-congestion NAME] [--oha PATH] [--out-dir DIR] [--update-docs docs/BENCHMARKS.md] [--no-pin] [--hold SECONDS]\n       bench-dataplane echo-server PORT\n       bench-dataplane rtt-client ADDR SIZE COUNT"
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
                    .unwrap_or_else(|| bad("echo-server", "PORT must be a port number")),
            );
        }
        Some("rtt-client") => {
            let addr = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| bad("rtt-client", "ADDR must be IP:PORT"));
            let size = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| bad("rtt-client", "SIZE must be a number of bytes above 0"));
            let count = args
                .get(3)
                .and_then(|a| a.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| bad("rtt-client", "COUNT must be a number above 0"));
            return rtt_client(addr, size, count);
        }
        _ => {}
    }
    let mut o = Options {
        seconds: 5,
        rounds: 3,
        workers: 0,
        tunnel_congestion: None,
        tcp_tunnels: None,
        scheduler_slice: None,
        sockmap: None,
        host_congestion: None,
        oha: PathBuf::from("target/tools/bin/oha"),
        out_dir: PathBuf::from("target/bench"),
        update_docs: None,
        hold: None,
        pin: true,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        // The value after `a`, or the usage naming `a`.
        let mut value = |what: &str| {
            it.next()
                .unwrap_or_else(|| bad(&a, &format!("needs {what}")))
        };
        match a.as_str() {
            "--bin-dir" => hostmesh_tests::set_bin_dir(PathBuf::from(value("a directory"))),
            "--seconds" => {
                o.seconds = positive(&a, &value("a number of seconds above 0"));
            }
            "--rounds" => o.rounds = positive(&a, &value("a number above 0")) as usize,
            "--host-congestion" => o.host_congestion = Some(value("a congestion control")),
            "--sockmap" => {
                o.sockmap = Some(one_of(&a, value("auto, on or off"), &["auto", "on", "off"]))
            }
            "--scheduler-slice" => o.scheduler_slice = Some(value("a duration")),
            "--tcp-tunnels" => {
                o.tcp_tunnels = Some(one_of(
                    &a,
                    value("dedicated or multiplexed"),
                    &["dedicated", "multiplexed"],
                ))
            }
            "--tunnel-congestion" => o.tunnel_congestion = Some(value("a congestion control")),
            "--workers" => {
                o.workers = value("a number of threads (0: meshd's default)")
                    .parse()
                    .unwrap_or_else(|_| bad(&a, "must be a number of threads (0: meshd's default)"))
            }
            "--no-pin" => o.pin = false,
            "--oha" => o.oha = PathBuf::from(value("the path of oha")),
            "--out-dir" => o.out_dir = PathBuf::from(value("a directory")),
            "--update-docs" => o.update_docs = Some(PathBuf::from(value("a file"))),
            "--hold" => o.hold = Some(positive(&a, &value("a number of seconds above 0"))),
            other => bad(other, "not an option"),
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
    if let Some(cc) = &o.host_congestion {
        // A namespace other than the machine's may only pick what the
        // machine allows; say so before building the hosts.
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_default();
        if !allowed.split_whitespace().any(|a| a == cc) {
            eprintln!(
                "bench-dataplane: --host-congestion {cc}: a test host may only use what this machine's net.ipv4.tcp_allowed_congestion_control lists ({}); the benchmark does not change machine-wide settings",
                allowed.trim()
            );
            std::process::exit(2);
        }
    }
    let o = Options {
        oha: std::fs::canonicalize(&o.oha).unwrap_or(o.oha),
        ..o
    };
    run(&o);
}

/// `value` of option `arg` as a number above 0, or the usage naming it.
fn positive(arg: &str, value: &str) -> u64 {
    match value.parse::<u64>() {
        Ok(n) if n > 0 => n,
        _ => bad(arg, &format!("{value:?} is not a number above 0")),
    }
}

/// `value` of option `arg` if it is one of `allowed`, or the usage naming it.
fn one_of(arg: &str, value: String, allowed: &[&str]) -> String {
    if allowed.contains(&value.as_str()) {
        value
    } else {
        bad(
            arg,
            &format!("{value:?} is not one of {}", allowed.join(", ")),
        )
    }
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
    let cpu = (ticks(11) + ticks(12)) / clock_ticks();
    (rss, cpu)
}

/// The kernel's clock ticks per second, in which /proc reports CPU time
/// (`getconf CLK_TCK`; 100 on every Linux this runs on, asked anyway).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
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

/// The RSS of the largest of `pids`.
fn largest_rss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| proc_stats(*p).0).max().unwrap_or(0)
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
    // The new-connections run opens ~30,000 connections a second from one
    // address to one server port, and each closed one holds its port in
    // TIME_WAIT for 60 s: with a fresh namespace's defaults (28,000 ports,
    // TIME_WAIT reused only on loopback) the second direct round found no
    // free port and fell from 24,000 to 1,000 connections/s, and even the
    // first was capped below what direct does. Reusing TIME_WAIT ports
    // (safe with TCP timestamps) and a wider port range, in these test
    // hosts' own namespaces only, as any load generator's host is tuned.
    // A new namespace starts with the machine's congestion control;
    // --host-congestion gives the test hosts another (every setup's sockets
    // alike), one of those the machine allows (checked in main).
    let congestion = o
        .host_congestion
        .as_ref()
        .map(|cc| format!("net.ipv4.tcp_congestion_control={cc}"));
    for h in [SERVER, CLIENT, CLIENT_QUIC] {
        run_ok(
            m.lab
                .cmd(h, "sysctl")
                .args([
                    "-q",
                    "-w",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=10000 65535",
                ])
                .args(&congestion),
        );
    }
    let host_congestion = run_ok(
        m.lab
            .cmd(CLIENT, "cat")
            .arg("/proc/sys/net/ipv4/tcp_congestion_control"),
    )
    .trim()
    .to_string();
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
    let extra = format!(
        "{}{}{}{}",
        o.tunnel_congestion
            .as_ref()
            .map(|c| format!("tunnel_congestion = {c:?}\n"))
            .unwrap_or_default(),
        o.tcp_tunnels
            .as_ref()
            .map(|t| format!("tcp_tunnels = {t:?}\n"))
            .unwrap_or_default(),
        o.sockmap
            .as_ref()
            .map(|m| format!("sockmap = {m:?}\n"))
            .unwrap_or_default(),
        o.scheduler_slice
            .as_ref()
            .map(|d| format!("scheduler_slice = {d:?}\n"))
            .unwrap_or_default()
    );
    start_quiet_meshd(&mut m, SERVER, "tcp", o.workers, &extra);
    start_quiet_meshd(&mut m, CLIENT, "tcp", o.workers, &extra);
    start_quiet_meshd(&mut m, CLIENT_QUIC, "quic", o.workers, &extra);
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
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pinning = if o.pin {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default();
        Pinning::halves(allowed).unwrap_or_else(|e| panic!("pinning the hosts: {e}"))
    } else {
        None
    };
    if let Some(p) = &pinning {
        for h in [CLIENT, CLIENT_QUIC, SERVER] {
            let ns = &m.lab.host(h).ns;
            let pids = run_ok(Command::new("ip").args(["netns", "pids", ns]));
            for pid in pids.split_whitespace() {
                // All threads of every process already in the host (one
                // that has exited since the listing is no matter).
                let out = output(Command::new("taskset").args(["-a", "-p", "-c", p.cpus(h), pid]));
                if !out.status.success() && Path::new("/proc").join(pid).exists() {
                    panic!(
                        "pinning {pid} in {ns} to {}: {}",
                        cpus(p.cpus(h)),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        println!(
            "== pinned: client hosts on {}, the server host on {} (--no-pin to leave placement to the scheduler)",
            cpus(&p.client),
            cpus(&p.server)
        );
    }
    // A tool run on a test host, on that host's cores when pinned.
    let tool = |host: usize, program: &str| -> Command {
        match &pinning {
            Some(p) => {
                let mut c = m.lab.cmd(host, "taskset");
                c.args(["-c", p.cpus(host), program]);
                c
            }
            None => m.lab.cmd(host, program),
        }
    };
    if let Some(hold) = o.hold {
        if let Some(p) = &pinning {
            println!("run tools with: taskset -c {} (client hosts)", p.client);
        }
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
    let rounds = o.rounds;
    // A first request checks each path and warms the pools; then each
    // proxy's idle RSS, before any load.
    let mut idle = Vec::new();
    for s in &setups {
        let warm = output(tool(s.host, "curl").args([
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
        idle.push((rss_of(&s.proxies), largest_rss_of(&s.proxies)));
    }
    type Measure<'a> = Box<dyn Fn(&Setup) -> Value + 'a>;
    let lines: Vec<(&str, Measure<'_>)> = vec![(
        "round trips of 1 B and 1 KiB on one connection",
        Box::new(|s| {
            let rtt = |size: usize| -> Value {
                let mut c = tool(s.host, &me);
                c.args(["rtt-client", &s.echo, &size.to_string(), "20000"]);
                serde_json::from_str(&run_ok(&mut c)).unwrap_or_default()
            };
            json!({"rtt_1b": rtt(1), "rtt_1k": rtt(1024)})
        }),
    )];
    // Every measurement runs for every setup, `rounds` times, before the
    // next measurement starts, in each round's order (`round_order`: no
    // setup always goes first or last, or always follows the same one).
    // Setups are compared round by round, minutes apart at most, which is
    // what keeps this VM's drift out of the ratios.
    let mut measured: Vec<Vec<Figures>> = vec![vec![serde_json::Map::new(); rounds]; setups.len()];
    let n = setups.len();
    let order: Vec<(usize, usize)> = (0..rounds)
        .flat_map(|r| round_order(n, r).into_iter().map(move |i| (i, r)))
        .collect();
    for (name, measure) in &lines {
        println!("== {name}");
        for &(i, r) in &order {
            let v = measure(&setups[i]);
            println!("   round {} {}: {v}", r + 1, setups[i].name);
            if let Value::Object(fields) = v {
                measured[i][r].extend(fields);
            }
        }
    }
    drop(lines);
    let histogram = dir.join("latency-histogram.lua");
    write(&histogram, WRK_HISTOGRAM_LUA);
    let histogram = histogram.display().to_string();
    // One 1-s wrk slice with `args`, its latencies and rate from the
    // histogram script.
    let wrk_slice = |s: &Setup, args: &[&str]| -> Result<Pooled, String> {
        let mut c = tool(s.host, "wrk");
        c.args(args).args(["-d1s", "-s", &histogram, &s.http]);
        Pooled::from_wrk(&run_ok(&mut c))
    };
    // The throughput lines also run in turns (1-s slices; bulk 2-s), each
    // setup's slices pooled: direct's one-stream bulk alone ranged from
    // 12 to 24 Gbit/s between the 5-s turns of one run on this VM, and a
    // setup that drew a slow spell moved every ratio to it
    // (docs/BENCHMARKS.md, "Throughput in turns").
    take_turns(
        "32 connections (wrk -c32), proxy CPU and peak RSS (setups in turns of 1 s)",
        &setups,
        rounds,
        secs as usize,
        &mut measured,
        |s| {
            let cpu_before = cpu_of(&s.proxies);
            let sampler = {
                let pids = s.proxies.clone();
                std::thread::spawn(move || {
                    let mut max = rss_of(&pids);
                    let end = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(100));
                        max = max.max(rss_of(&pids));
                    }
                    max
                })
            };
            let mut p = wrk_slice(s, &["-t2", "-c32"])?;
            p.cpu_s = cpu_of(&s.proxies) - cpu_before;
            p.rss_peak_kib = sampler.join().unwrap_or(0);
            Ok(p)
        },
        |p| json!({"rps_32": p.rate(), "rss_load_kib": p.rss_peak_kib, "cpu_s_per_1000_req": p.cpu_per_1000()}),
    );
    take_turns(
        "new connections (wrk -c32, Connection: close, setups in turns of 1 s)",
        &setups,
        rounds,
        secs as usize,
        &mut measured,
        |s| wrk_slice(s, &["-t2", "-c32", "-H", "Connection: close"]),
        |p| json!({"new_conns_per_s": p.rate()}),
    );
    take_turns(
        "one-stream bulk (iperf3, setups in turns of 2 s)",
        &setups,
        rounds,
        (secs as usize).div_ceil(2),
        &mut measured,
        |s| {
            let mut c = tool(s.host, "iperf3");
            c.args([
                "-c",
                &s.bulk.0,
                "-p",
                &s.bulk.1.to_string(),
                "-t",
                "2",
                "-J",
            ]);
            Pooled::from_iperf3(&run_ok(&mut c))
        },
        |p| json!({"bulk_gbps": p.gbps()}),
    );
    // The tails of the two latency lines are set by how long this VM takes
    // to wake an idle vCPU and how fast it runs right after (every request
    // crosses to the other core and back, in every setup alike), and that
    // comes and goes in spells of seconds to minutes: a setup given one
    // turn of several seconds could draw a slow spell that the next setup
    // missed (docs/BENCHMARKS.md, "The latency tails"). So within a round
    // these lines run in turns: each setup `secs` slices, the setups taking
    // turns slice by slice, every setup's samples pooled over its slices,
    // then percentiles over the pool. The same load and the same regime,
    // spread over the same minutes.
    let oha = o.oha.display().to_string();
    take_turns(
        "one keep-alive connection (wrk -c1, setups in turns of 1 s)",
        &setups,
        rounds,
        secs as usize,
        &mut measured,
        |s| wrk_slice(s, &["-t1", "-c1"]),
        |p| {
            json!({
                "latency1_p50_us": p.percentile(50.0),
                "latency1_p99_us": p.percentile(99.0),
                "rps_1": p.rate(),
            })
        },
    );
    // At a fixed rate, a slice's first request on each connection (which
    // includes opening it; HAProxy's a TLS handshake) is left out: this
    // line is the steady state, new connections have their own.
    take_turns(
        "open loop at 1000 req/s (oha, latency-corrected, setups in turns of 2 s)",
        &setups,
        rounds,
        secs as usize,
        &mut measured,
        |s| {
            let cpu_before = cpu_of(&s.proxies);
            let mut c = tool(s.host, &oha);
            c.args([
                "-z",
                "2s",
                "-q",
                "1000",
                "-c",
                "16",
                "--latency-correction",
                "--no-tui",
                "--output-format",
                "csv",
                &s.http,
            ]);
            let mut p = Pooled::from_oha_csv(&run_ok(&mut c), 2.0)?;
            p.cpu_s = cpu_of(&s.proxies) - cpu_before;
            Ok(p)
        },
        |p| {
            json!({"open_loop": {
                "p50_us": p.percentile(50.0), "p90_us": p.percentile(90.0),
                "p99_us": p.percentile(99.0), "p99.9_us": p.percentile(99.9),
                "rps": p.rate(), "requests": p.count(),
                "cpu_s_per_1000_req": p.cpu_per_1000(),
            }})
        },
    );
    // Each meshd client carried its load over its own transport: a client
    // whose QUIC went unanswered would have fallen back to TCP, and its
    // figures would be TCP's under QUIC's name.
    let faults = transport_faults(&m);
    let results: Vec<Value> = setups
        .iter()
        .zip(measured)
        .zip(idle)
        .map(|((s, rounds), idle)| {
            let rounds: Vec<Value> = rounds
                .into_iter()
                .map(|mut r| {
                    r.insert("rss_idle_kib".into(), json!(idle.0));
                    r.insert("rss_idle_largest_kib".into(), json!(idle.1));
                    Value::Object(r)
                })
                .collect();
            summarize(s.name, rounds)
        })
        .collect();
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
        "rounds": rounds,
        "meshd_worker_threads": o.workers,
        "meshd_tunnel_congestion": o.tunnel_congestion,
        "meshd_tcp_tunnels": o.tcp_tunnels,
        "meshd_sockmap": o.sockmap,
        "meshd_scheduler_slice": o.scheduler_slice,
        "host_congestion": host_congestion,
        "cores": cores,
        "pinned": pinning.as_ref().map(|p| json!({"client_cpus": p.client, "server_cpus": p.server})),
        "kernel": String::from_utf8_lossy(&output(Command::new("uname").arg("-r")).stdout).trim(),
        "transport_faults": faults,
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
    if !faults.is_empty() {
        eprintln!(
            "bench-dataplane: the run is not valid, so {} is left as it was:\n  {}",
            o.update_docs
                .as_deref()
                .unwrap_or(Path::new("no docs file"))
                .display(),
            faults.join("\n  ")
        );
        std::process::exit(1);
    }
    if let Some(docs) = &o.update_docs {
        update_docs(docs, &table, &report);
        println!("updated {}", docs.display());
    }
}

/// What is wrong with the tunnels the two meshd clients hold at the end
/// (`/status`): the TCP client must hold only TCP tunnels, the QUIC client
/// only QUIC ones, each at least one, and the QUIC client's QUIC must never
/// have gone unanswered (its streams would have gone over TCP meanwhile).
fn transport_faults(m: &MeshLab) -> Vec<String> {
    let mut faults = Vec::new();
    for (host, setup, quic) in [
        (CLIENT, "meshd tcp", false),
        (CLIENT_QUIC, "meshd quic", true),
    ] {
        let status = m
            .lab
            .http_get(host, "http://127.0.0.1:15000/status")
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()));
        if let Ok(v) = &status
            && let Some(n @ 1..) = v["transport"]["quicUnanswered"].as_u64()
        {
            faults.push(format!(
                "{setup}: its client meshd's QUIC went unanswered {n} time(s), and its streams went over TCP for a while"
            ));
        }
        let kinds: Vec<String> = match &status {
            Ok(v) => v["tunnels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["kind"].as_str().map(str::to_string))
                .collect(),
            Err(e) => {
                faults.push(format!("{setup}: its client meshd's /status: {e}"));
                continue;
            }
        };
        if let Some(fault) = tunnel_fault(setup, quic, &kinds) {
            faults.push(fault);
        }
    }
    faults
}

/// Whether a client's tunnel kinds fit its setup (`quic` or TCP).
fn tunnel_fault(setup: &str, quic: bool, kinds: &[String]) -> Option<String> {
    let wrong: Vec<&String> = kinds.iter().filter(|k| (*k == "quic") != quic).collect();
    if kinds.is_empty() {
        Some(format!(
            "{setup}: its client meshd holds no tunnel at the end of the run"
        ))
    } else if !wrong.is_empty() {
        Some(format!(
            "{setup}: its client meshd holds tunnels of kind {wrong:?} (all: {kinds:?}); its figures are not {}'s",
            if quic { "QUIC" } else { "TCP" }
        ))
    } else {
        None
    }
}

fn start_quiet_meshd(
    m: &mut MeshLab,
    host: usize,
    transport: &str,
    workers: usize,
    proxy_extra: &str,
) {
    // Release meshd with warn-level logs and no access log: the benchmark
    // measures the proxy, not the log writer.
    let config = m.lab.dir.path().join(format!("bench-meshd{host}.toml"));
    write(
        &config,
        &format!(
            "state_dir = {:?}\n[log]\nformat = \"json\"\nlevel = \"warn\"\naccess_log = false\n[proxy]\ntransport = {transport:?}\nworker_threads = {workers}\n{proxy_extra}",
            m.state_dir(host).display().to_string(),
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

type Figures = serde_json::Map<String, Value>;

/// The order of the `n` setups in round `r`: each round starts one setup
/// later, and every other round goes through them backwards. A setup's
/// figures can depend on which one ran just before it (meshd over TCP and
/// over QUIC share the server's meshd, which one leaves busy and another
/// idle; docs/BENCHMARKS.md, "Rounds"), so no setup always follows the
/// same one.
fn round_order(n: usize, r: usize) -> Vec<usize> {
    (0..n)
        .map(|k| {
            if r.is_multiple_of(2) {
                (r + k) % n
            } else {
                (r + n - k) % n
            }
        })
        .collect()
}

/// One latency line in turns: in every round each setup runs `slices`
/// slices, the setups taking turns slice by slice in the round's order
/// (`round_order`, as the other lines'); each setup's slices are pooled
/// and `figures` turns the pool into that round's figures.
fn take_turns(
    label: &str,
    setups: &[Setup],
    rounds: usize,
    slices: usize,
    measured: &mut [Vec<Figures>],
    slice: impl Fn(&Setup) -> Result<Pooled, String>,
    figures: impl Fn(&Pooled) -> Value,
) {
    println!("== {label}");
    let n = setups.len();
    for r in 0..rounds {
        let turns = round_order(n, r);
        let mut pooled = vec![Pooled::default(); n];
        for _ in 0..slices.max(1) {
            for &i in &turns {
                let one = slice(&setups[i]).unwrap_or_else(|e| panic!("{}: {e}", setups[i].name));
                pooled[i].add(one);
            }
        }
        for &i in &turns {
            let v = figures(&pooled[i]);
            println!("   round {} {}: {v}", r + 1, setups[i].name);
            if let (Value::Object(fields), Some(round)) = (v, measured[i].get_mut(r)) {
                round.extend(fields);
            }
        }
    }
}

/// wrk's `done` hook: the run's requests and length, then every latency it
/// recorded (µs) with how often, one line each.
const WRK_HISTOGRAM_LUA: &str = r#"done = function(summary, latency, requests)
  io.write(string.format("hm-requests %d %d\n", summary.requests, summary.duration))
  for i = 1, #latency do
    local v, c = latency(i)
    io.write(string.format("hm-latency %d %d\n", v, c))
  end
end
"#;

/// Latencies pooled over slices, as (µs, how many) pairs, and how many
/// requests were answered in how long.
#[derive(Clone, Default, Debug)]
struct Pooled {
    latency_us: Vec<(f64, u64)>,
    answered: u64,
    seconds: f64,
    /// Bits received (bulk).
    bits: f64,
    /// The proxies' CPU seconds over the slices.
    cpu_s: f64,
    /// The proxies' highest RSS seen (KiB).
    rss_peak_kib: u64,
}

impl Pooled {
    /// wrk's output with [`WRK_HISTOGRAM_LUA`] as its script.
    fn from_wrk(text: &str) -> Result<Pooled, String> {
        let mut out = Pooled::default();
        let mut summary = false;
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let tag = f.next();
            if !matches!(tag, Some("hm-requests" | "hm-latency")) {
                continue;
            }
            let (a, b) = match (
                f.next().map(str::parse::<u64>),
                f.next().map(str::parse::<u64>),
            ) {
                (Some(Ok(a)), Some(Ok(b))) => (a, b),
                _ => return Err(format!("wrk's output: {line:?} is not two counts")),
            };
            if tag == Some("hm-requests") {
                summary = true;
                out.answered += a;
                out.seconds += b as f64 / 1e6;
            } else {
                out.latency_us.push((a as f64, b));
            }
        }
        if !summary {
            return Err("wrk's output has no summary from the histogram script".into());
        }
        if out.latency_us.is_empty() {
            return Err("wrk recorded no latency".into());
        }
        Ok(out)
    }

    /// oha's `--output-format csv` over `seconds`: a header, then one line
    /// per answered request with its duration in seconds (from the time it
    /// was due, with `--latency-correction`) and the time spent connecting
    /// ("DNS+dialup", 0 on a connection already open). Requests that opened
    /// their connection count for the rate, not for the latencies.
    fn from_oha_csv(csv: &str, seconds: f64) -> Result<Pooled, String> {
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .ok_or("oha's CSV has no header")?
            .split(',')
            .collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| h.trim() == name)
                .ok_or_else(|| format!("oha's CSV has no {name:?} column in {header:?}"))
        };
        let (duration, dialup, status) = (
            column("request-duration")?,
            column("DNS+dialup")?,
            column("status")?,
        );
        let mut out = Pooled {
            seconds,
            ..Pooled::default()
        };
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split(',').collect();
            let number = |k: usize| -> Result<f64, String> {
                fields
                    .get(k)
                    .and_then(|f| f.trim().parse::<f64>().ok())
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| {
                        format!(
                            "oha's CSV line {}: {line:?} has no number in column {}",
                            n + 2,
                            header[k]
                        )
                    })
            };
            let code = number(status)?;
            if !(200.0..300.0).contains(&code) {
                return Err(format!("oha's CSV line {}: status {code}", n + 2));
            }
            out.answered += 1;
            if number(dialup)? == 0.0 {
                out.latency_us.push((number(duration)? * 1e6, 1));
            }
        }
        if out.latency_us.is_empty() {
            return Err("oha answered no request on an open connection".into());
        }
        Ok(out)
    }

    /// iperf3's `-J` report: what the receiver got, and over how long.
    fn from_iperf3(json: &str) -> Result<Pooled, String> {
        let v: Value =
            serde_json::from_str(json).map_err(|e| format!("iperf3's report is not JSON: {e}"))?;
        if let Some(e) = v["error"].as_str() {
            return Err(format!("iperf3: {e}"));
        }
        let got = &v["end"]["sum_received"];
        match (got["bytes"].as_f64(), got["seconds"].as_f64()) {
            (Some(bytes), Some(seconds)) if seconds > 0.0 => Ok(Pooled {
                bits: bytes * 8.0,
                seconds,
                ..Pooled::default()
            }),
            _ => Err(format!(
                "iperf3's report has no bytes and seconds received: {got}"
            )),
        }
    }

    fn add(&mut self, other: Pooled) {
        self.latency_us.extend(other.latency_us);
        self.answered += other.answered;
        self.seconds += other.seconds;
        self.bits += other.bits;
        self.cpu_s += other.cpu_s;
        self.rss_peak_kib = self.rss_peak_kib.max(other.rss_peak_kib);
    }

    /// The proxies' CPU seconds per 1,000 answered requests.
    fn cpu_per_1000(&self) -> f64 {
        if self.answered > 0 {
            self.cpu_s / self.answered as f64 * 1000.0
        } else {
            0.0
        }
    }

    /// Bits received per second, in Gbit/s.
    fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bits / self.seconds / 1e9
        } else {
            0.0
        }
    }

    fn count(&self) -> u64 {
        self.latency_us.iter().map(|&(_, c)| c).sum()
    }

    /// Answered requests per second.
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.answered as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// The nearest-rank percentile: the smallest latency with at least
    /// `q`% of the requests at or below it; 0 for none.
    fn percentile(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let mut sorted = self.latency_us.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let rank = ((q / 100.0 * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (v, c) in sorted {
            seen += c;
            if seen >= rank {
                return v;
            }
        }
        0.0
    }
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The same shape as the rounds, each number the median over them.
fn median_of(values: &[Value]) -> Value {
    match values.first() {
        Some(Value::Object(first)) => Value::Object(
            first
                .keys()
                .map(|k| {
                    let column: Vec<Value> = values.iter().map(|v| v[k].clone()).collect();
                    (k.clone(), median_of(&column))
                })
                .collect(),
        ),
        Some(Value::Number(_)) => json!(median(values.iter().filter_map(Value::as_f64).collect())),
        Some(other) => other.clone(),
        None => Value::Null,
    }
}

/// One setup's figures: each the median over the rounds, except the peak
/// RSS under load, the highest of any round; every round is kept.
fn summarize(name: &str, rounds: Vec<Value>) -> Value {
    let mut out = median_of(&rounds);
    if let Value::Object(o) = &mut out {
        let peak = rounds
            .iter()
            .map(|r| f(r, "rss_load_kib"))
            .fold(0.0, f64::max);
        o.insert("rss_load_kib".into(), json!(peak));
        o.insert("setup".into(), json!(name));
        o.insert("rounds".into(), Value::Array(rounds));
    }
    out
}

fn rounds_of(r: &Value) -> Vec<&Value> {
    match r["rounds"].as_array() {
        Some(a) if !a.is_empty() => a.iter().collect(),
        _ => vec![r],
    }
}

/// `op(a, b)` for each round, a and b measured minutes apart at most.
fn paired(a: &Value, b: &Value, get: fn(&Value) -> f64, op: fn(f64, f64) -> f64) -> Vec<f64> {
    rounds_of(a)
        .into_iter()
        .zip(rounds_of(b))
        .map(|(x, y)| op(get(x), get(y)))
        .filter(|v| v.is_finite())
        .collect()
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

fn diff(a: f64, b: f64) -> f64 {
    a - b
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

/// One line of the table.
struct Row {
    label: &'static str,
    get: fn(&Value) -> f64,
    fmt: fn(f64) -> String,
    better: Better,
    /// Shown as a ratio to direct (not for the proxies' own RSS and CPU).
    ratio: bool,
    /// A latency, also shown as added to direct's.
    latency: bool,
}

fn us(v: f64) -> String {
    format!("{v:.0} µs")
}

fn rows() -> Vec<Row> {
    use Better::{Higher, Lower};
    let n = |v: f64| format!("{v:.0}");
    let row = |label, get, fmt, better, ratio| Row {
        label,
        get,
        fmt,
        better,
        ratio,
        latency: false,
    };
    let lat = |label, get| Row {
        label,
        get,
        fmt: us,
        better: Lower,
        ratio: true,
        latency: true,
    };
    vec![
        lat("p50 latency, 1 keep-alive conn", |r| {
            f(r, "latency1_p50_us")
        }),
        lat("p99 latency, 1 keep-alive conn", |r| {
            f(r, "latency1_p99_us")
        }),
        row("requests/s, 1 conn", |r| f(r, "rps_1"), n, Higher, true),
        row("requests/s, 32 conns", |r| f(r, "rps_32"), n, Higher, true),
        row(
            "new connections/s (Connection: close)",
            |r| f(r, "new_conns_per_s"),
            n,
            Higher,
            true,
        ),
        row(
            "one-stream bulk, Gbit/s",
            |r| f(r, "bulk_gbps"),
            |v| format!("{v:.2}"),
            Higher,
            true,
        ),
        lat("open loop 1000 req/s: p50", |r| {
            f(&r["open_loop"], "p50_us")
        }),
        lat("open loop 1000 req/s: p99", |r| {
            f(&r["open_loop"], "p99_us")
        }),
        lat("round trip 1 B, p50", |r| f(&r["rtt_1b"], "p50_us")),
        lat("round trip 1 KiB, p50", |r| f(&r["rtt_1k"], "p50_us")),
        row(
            "proxy RSS idle (both ends), MiB",
            |r| f(r, "rss_idle_kib") / 1024.0,
            |v| format!("{v:.1}"),
            Lower,
            false,
        ),
        row(
            "proxy RSS under load (both ends), MiB",
            |r| f(r, "rss_load_kib") / 1024.0,
            |v| format!("{v:.1}"),
            Lower,
            false,
        ),
        row(
            "proxy CPU s per 1000 requests (both ends)",
            |r| f(r, "cpu_s_per_1000_req"),
            |v| format!("{v:.4}"),
            Lower,
            false,
        ),
        row(
            "proxy CPU s per 1000 requests at 1000 req/s (both ends)",
            |r| f(&r["open_loop"], "cpu_s_per_1000_req"),
            |v| format!("{v:.4}"),
            Lower,
            false,
        ),
    ]
}

/// "median (min to max)" over the rounds, or just the value for one round.
fn spread(v: &[f64], fmt: &dyn Fn(f64) -> String) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() < 2 {
        fmt(median(v.to_vec()))
    } else {
        format!("{} ({} to {})", fmt(median(v.to_vec())), fmt(lo), fmt(hi))
    }
}

fn markdown(results: &[Value]) -> String {
    let by_name = |n: &str| results.iter().find(|r| r["setup"] == n);
    let (Some(direct), Some(tcp)) = (by_name("direct"), by_name("meshd tcp")) else {
        return "no results\n".into();
    };
    let haproxy = by_name("haproxy");
    let n_rounds = rounds_of(direct).len();
    let mut out = String::new();
    out.push_str(&format!(
        "Each figure is the median of {n_rounds} round(s); a ratio is the median of the per-round ratios to direct.\n\n"
    ));
    out.push_str("| | direct | meshd tcp | meshd quic | haproxy mTLS |\n|---|---|---|---|---|\n");
    let rows = rows();
    for row in &rows {
        out.push_str(&format!("| {} |", row.label));
        for r in results {
            let v = (row.get)(r);
            if row.ratio && r != direct {
                let q = median(paired(r, direct, row.get, ratio));
                out.push_str(&format!(" {} ({q:.2}×) |", (row.fmt)(v)));
            } else {
                out.push_str(&format!(" {} |", (row.fmt)(v)));
            }
        }
        out.push('\n');
    }
    // Added latency: per round, the setup's figure minus direct's.
    let signed = |v: f64| format!("{v:+.0} µs");
    out.push_str(&format!(
        "\nAdded latency over direct (median of the {n_rounds} per-round differences, lowest to highest in brackets):\n\n| | meshd tcp | meshd quic | haproxy mTLS |\n|---|---|---|---|\n"
    ));
    for row in rows.iter().filter(|r| r.latency) {
        out.push_str(&format!("| {} |", row.label));
        for r in results.iter().filter(|r| *r != direct) {
            out.push_str(&format!(
                " {} |",
                spread(&paired(r, direct, row.get, diff), &signed)
            ));
        }
        out.push('\n');
    }
    // The issue's targets, for the meshd pair over TCP (the default) and
    // over QUIC.
    for setup in ["meshd tcp", "meshd quic"] {
        if let Some(pair) = by_name(setup) {
            out.push_str(&targets(setup, pair, direct));
        }
    }
    if let Some(haproxy) = haproxy {
        out.push_str(&haproxy_comparison("meshd tcp", tcp, haproxy, &rows));
        if let Some(quic) = by_name("meshd quic") {
            out.push_str(&haproxy_comparison("meshd quic", quic, haproxy, &rows));
        }
    }
    out
}

/// The issue's targets for the meshd pair `name` (`pair`), round by round
/// against `direct`.
fn targets(name: &str, pair: &Value, direct: &Value) -> String {
    let n_rounds = rounds_of(direct).len();
    let signed = |v: f64| format!("{v:+.0} µs");
    let mut out = format!(
        "\nTargets for {name} (median of {n_rounds} rounds; lowest to highest in brackets; rounds that met it):\n\n| target | measured | rounds met | |\n|---|---|---|---|\n"
    );
    let x = |v: f64| format!("{v:.2}×");
    let lat = |p: fn(&Value) -> f64| paired(pair, direct, p, diff);
    let rat = |p: fn(&Value) -> f64| paired(pair, direct, p, ratio);
    let own = |p: fn(&Value) -> f64| rounds_of(pair).into_iter().map(p).collect::<Vec<f64>>();
    type Format<'a> = &'a dyn Fn(f64) -> String;
    let targets: Vec<(&str, Vec<f64>, Format<'_>, Better, f64)> = vec![
        (
            "added p50 latency, 1 connection ≤ 40 µs",
            lat(|r| f(r, "latency1_p50_us")),
            &signed,
            Better::Lower,
            40.0,
        ),
        (
            "added p99 latency, 1 connection ≤ 200 µs",
            lat(|r| f(r, "latency1_p99_us")),
            &signed,
            Better::Lower,
            200.0,
        ),
        (
            "round trip 1 B ≤ 3× direct",
            rat(|r| f(&r["rtt_1b"], "p50_us")),
            &x,
            Better::Lower,
            3.0,
        ),
        (
            "round trip 1 KiB ≤ 3× direct",
            rat(|r| f(&r["rtt_1k"], "p50_us")),
            &x,
            Better::Lower,
            3.0,
        ),
        (
            "requests/s on 32 connections ≥ 0.5× direct",
            rat(|r| f(r, "rps_32")),
            &x,
            Better::Higher,
            0.5,
        ),
        (
            "new connections/s ≥ 0.4× direct",
            rat(|r| f(r, "new_conns_per_s")),
            &x,
            Better::Higher,
            0.4,
        ),
        (
            "one-stream bulk ≥ 0.4× direct",
            rat(|r| f(r, "bulk_gbps")),
            &x,
            Better::Higher,
            0.4,
        ),
        // vCPU per 1,000 requests/s is CPU seconds per 1,000 requests:
        // judged under load (32 connections) and at 1,000 requests/s (the
        // open loop, where fewer requests share each wake-up).
        (
            "CPU s per 1,000 requests (both ends), 32 connections ≤ 0.03",
            own(|r| f(r, "cpu_s_per_1000_req")),
            &|v| format!("{v:.4}"),
            Better::Lower,
            0.03,
        ),
        (
            "CPU s per 1,000 requests (both ends), at 1,000 req/s ≤ 0.03",
            own(|r| f(&r["open_loop"], "cpu_s_per_1000_req")),
            &|v| format!("{v:.4}"),
            Better::Lower,
            0.03,
        ),
        // Per meshd: the larger of the pair's two.
        (
            "idle RSS of each meshd ≤ 10 MB",
            own(|r| f(r, "rss_idle_largest_kib") * 1024.0 / 1e6),
            &|v| format!("{v:.2} MB"),
            Better::Lower,
            10.0,
        ),
    ];
    let meets = |v: f64, better: Better, limit: f64| match better {
        Better::Lower => v <= limit,
        Better::Higher => v >= limit,
    };
    for (label, values, fmt, better, limit) in &targets {
        let met = values
            .iter()
            .filter(|v| meets(**v, *better, *limit))
            .count();
        let verdict = if meets(median(values.clone()), *better, *limit) {
            "met"
        } else {
            "**missed**"
        };
        out.push_str(&format!(
            "| {label} | {} | {met} of {} | {verdict} |\n",
            spread(values, fmt),
            values.len()
        ));
    }
    out
}

/// The meshd pair `name` (`tcp`) against the HAProxy pair, line by line
/// and round by round. Within 3% of each other counts as level: no line
/// here repeats more closely than that.
fn haproxy_comparison(name: &str, tcp: &Value, haproxy: &Value, rows: &[Row]) -> String {
    let mut out = format!(
        "\n{name} against the HAProxy pair (rounds in which meshd was better; level: medians within 3%):\n\n| | {name} | haproxy mTLS | meshd better in | |\n|---|---|---|---|---|\n",
    );
    let (mut ahead, mut level, mut behind) = (0, 0, 0);
    for row in rows {
        let better = |a: f64, b: f64| match row.better {
            Better::Lower => a < b,
            Better::Higher => a > b,
        };
        let pairs: Vec<(f64, f64)> = rounds_of(tcp)
            .into_iter()
            .zip(rounds_of(haproxy))
            .map(|(a, b)| ((row.get)(a), (row.get)(b)))
            .collect();
        let wins = pairs.iter().filter(|(a, b)| better(*a, *b)).count();
        let (m, h) = ((row.get)(tcp), (row.get)(haproxy));
        let close = (m - h).abs() <= 0.03 * m.abs().max(h.abs());
        let verdict = if close {
            level += 1;
            "level"
        } else if better(m, h) && wins * 2 > pairs.len() {
            ahead += 1;
            "ahead"
        } else if better(h, m) && wins * 2 < pairs.len() {
            behind += 1;
            "**behind**"
        } else {
            level += 1;
            "level (mixed rounds)"
        };
        out.push_str(&format!(
            "| {} | {} | {} | {wins} of {} | {verdict} |\n",
            row.label,
            (row.fmt)(m),
            (row.fmt)(h),
            pairs.len()
        ));
    }
    out.push_str(&format!(
        "\n{name} against HAProxy: ahead on {ahead} of {} lines, level on {level}, behind on {behind}.\n",
        rows.len()
    ));
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
        "{BEGIN}\n\nMeasured by `make bench-dataplane` ({} s per measurement, {} rounds with the setups interleaved, {} cores, {}, TCP congestion control {}{}, kernel {}):\n\n{table}\n![latency percentiles](bench/dataplane-latency.svg)\n\n{END}",
        report["seconds_per_measurement"],
        report["rounds"],
        report["cores"],
        match report["pinned"].as_object() {
            Some(p) => format!(
                "client hosts pinned to {} and the server host to {}",
                cpus(p["client_cpus"].as_str().unwrap_or_default()),
                cpus(p["server_cpus"].as_str().unwrap_or_default())
            ),
            None => "hosts not pinned".to_string(),
        },
        report["host_congestion"].as_str().unwrap_or_default(),
        {
            let notes: Vec<String> = [
                ("meshd's tunnels", "meshd_tunnel_congestion"),
                ("meshd's proxy.tcp_tunnels", "meshd_tcp_tunnels"),
                ("meshd's proxy.sockmap", "meshd_sockmap"),
                ("meshd's proxy.scheduler_slice", "meshd_scheduler_slice"),
            ]
            .iter()
            .filter_map(|(what, key)| report[*key].as_str().map(|v| format!("{what}: {v}")))
            .collect();
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            }
        },
        report["kernel"].as_str().unwrap_or_default()
    );
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{block}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{text}\n{block}\n"),
    };
    write(path, &new);
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounds_change_who_goes_first_and_who_follows_whom() {
        use super::round_order;
        use std::collections::HashSet;
        assert_eq!(round_order(4, 0), [0, 1, 2, 3]);
        assert_eq!(round_order(4, 1), [1, 0, 3, 2]);
        assert_eq!(round_order(4, 2), [2, 3, 0, 1]);
        // Every round runs each setup once; over three rounds each setup
        // comes after at least two different setups (the turns repeat
        // cyclically, so the last of a round also precedes the first).
        let rounds: Vec<Vec<usize>> = (0..3).map(|r| round_order(4, r)).collect();
        for order in &rounds {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
        }
        for setup in 0..4 {
            let before: HashSet<usize> = rounds
                .iter()
                .map(|o| {
                    let at = o.iter().position(|&i| i == setup).unwrap();
                    o[(at + 3) % 4]
                })
                .collect();
            assert!(before.len() >= 2, "setup {setup} always follows {before:?}");
        }
        assert_eq!(round_order(1, 5), [0]);
    }

    #[test]
    fn pinning_splits_the_allowed_cpus_in_halves() {
        use super::{CLIENT, CLIENT_QUIC, Pinning, SERVER, cpus};
        assert_eq!(Pinning::halves("0"), Ok(None));
        assert_eq!(Pinning::halves(""), Ok(None));
        let two = Pinning::halves("0-1\n").unwrap().unwrap();
        assert_eq!(
            (two.cpus(CLIENT), two.cpus(CLIENT_QUIC), two.cpus(SERVER)),
            ("0", "0", "1")
        );
        let eight = Pinning::halves("0-7").unwrap().unwrap();
        assert_eq!(
            (eight.client.as_str(), eight.server.as_str()),
            ("0,1,2,3", "4,5,6,7")
        );
        let odd = Pinning::halves("2,4-5").unwrap().unwrap();
        assert_eq!((odd.client.as_str(), odd.server.as_str()), ("2", "4,5"));
        assert!(Pinning::halves("0-x").unwrap_err().contains("\"0-x\""));
        assert!(Pinning::halves("3-1").is_err());
        assert_eq!(
            (cpus("1").as_str(), cpus("4,5").as_str()),
            ("CPU 1", "CPUs 4,5")
        );
    }

    use super::*;

    fn round(p50: f64, rps32: f64, bulk: f64, rss: f64) -> Value {
        json!({
            "latency1_p50_us": p50, "latency1_p99_us": p50 * 4.0, "rps_1": 1e6 / p50,
            "rps_32": rps32, "new_conns_per_s": rps32 / 2.0, "bulk_gbps": bulk,
            "open_loop": {"p50_us": p50, "p90_us": p50, "p99_us": p50, "p99.9_us": p50, "cpu_s_per_1000_req": 0.05},
            "rtt_1b": {"p50_us": p50}, "rtt_1k": {"p50_us": p50},
            "rss_idle_kib": rss, "rss_idle_largest_kib": rss / 2.0 + 500.0,
            "rss_load_kib": rss, "cpu_s_per_1000_req": 0.02,
        })
    }

    #[test]
    fn open_loop_pools_slices_and_leaves_out_the_requests_that_opened_a_connection() {
        use super::Pooled;
        let header = "request-start,DNS,DNS+dialup,Response-delay,request-duration,bytes,status\n";
        let a = Pooled::from_oha_csv(
            &format!(
                "{header}0.001,0.00002,0.00015,0.0014,0.0015,1024,200\n0.002,0,0,0.0001,0.000100,1024,200\n0.003,0,0,0.0003,0.000300,1024,200\n"
            ),
            1.0,
        )
        .unwrap();
        assert_eq!((a.answered, a.count()), (3, 2));
        let mut pooled = a;
        pooled.add(
            Pooled::from_oha_csv(
                &format!("{header}0.001,0,0,0.0002,0.000200,1024,200\n\n"),
                1.0,
            )
            .unwrap(),
        );
        // 100, 200, 300 µs: the 1,500-µs request that connected is not among them.
        assert_eq!(
            (
                pooled.percentile(50.0).round(),
                pooled.percentile(99.0).round()
            ),
            (200.0, 300.0)
        );
        assert_eq!((pooled.rate(), pooled.count()), (2.0, 3));
    }

    #[test]
    fn wrk_histograms_pool_by_count() {
        use super::Pooled;
        let one = "Running 1s test @ http://x/\n  1 threads and 1 connections\nhm-requests 10 1000000\nhm-latency 90 8\nhm-latency 400 2\n";
        let two = "hm-requests 10 1000000\nhm-latency 100 10\n";
        let mut p = Pooled::from_wrk(one).unwrap();
        p.add(Pooled::from_wrk(two).unwrap());
        assert_eq!((p.count(), p.rate()), (20, 10.0));
        // 8 × 90, 10 × 100, 2 × 400: the median is 100, the 91st percentile 400.
        assert_eq!(p.percentile(50.0), 100.0);
        assert_eq!(p.percentile(90.0), 100.0);
        assert_eq!(p.percentile(91.0), 400.0);
        assert_eq!(p.percentile(0.0), 90.0);
        assert_eq!(Pooled::default().percentile(99.0), 0.0);
        fails_saying(Pooled::from_wrk("Requests/sec: 5\n"), "no summary");
        fails_saying(Pooled::from_wrk("hm-requests 1 x\n"), "two counts");
        fails_saying(Pooled::from_wrk("hm-requests 0 1000000\n"), "no latency");
    }

    fn fails_saying(r: Result<Pooled, String>, words: &str) {
        match r {
            Err(e) => assert!(e.contains(words), "{e:?} does not say {words:?}"),
            Ok(p) => panic!("{p:?} where an error saying {words:?} was due"),
        }
    }

    #[test]
    fn bulk_slices_pool_bytes_over_seconds_and_bad_reports_say_why() {
        let report = |bytes: u64, seconds: f64| {
            json!({"end": {"sum_received": {"bytes": bytes, "seconds": seconds}}}).to_string()
        };
        // 2 s at 20 Gbit/s and 1 s at 8 Gbit/s: 16 Gbit/s over the 3 s (all
        // the bits over all the time), not 14, the mean of the two rates.
        let mut p = Pooled::from_iperf3(&report(5_000_000_000, 2.0)).unwrap();
        p.add(Pooled::from_iperf3(&report(1_000_000_000, 1.0)).unwrap());
        assert!((p.gbps() - 16.0).abs() < 1e-9, "{}", p.gbps());
        fails_saying(
            Pooled::from_iperf3(r#"{"error": "unable to connect to server"}"#),
            "unable to connect",
        );
        fails_saying(Pooled::from_iperf3("iperf3: error"), "not JSON");
        fails_saying(
            Pooled::from_iperf3(&report(100, 0.0)),
            "no bytes and seconds",
        );
    }

    #[test]
    fn slices_pool_requests_cpu_and_the_highest_rss() {
        let mut p = Pooled::from_wrk("hm-requests 1000 1000000\nhm-latency 100 1000\n").unwrap();
        p.cpu_s = 0.5;
        p.rss_peak_kib = 9000;
        let mut q = Pooled::from_wrk("hm-requests 3000 2000000\nhm-latency 90 3000\n").unwrap();
        q.cpu_s = 0.25;
        q.rss_peak_kib = 8000;
        p.add(q);
        // 4,000 requests in 3 s, not 1,250 (the mean of 1,000 and 1,500).
        assert!((p.rate() - 4000.0 / 3.0).abs() < 1e-9, "{}", p.rate());
        assert_eq!(p.answered, 4000);
        assert_eq!(p.cpu_s, 0.75);
        assert_eq!(p.rss_peak_kib, 9000);
    }

    #[test]
    fn open_loop_csv_errors_name_what_is_wrong() {
        use super::Pooled;
        let header = "request-start,DNS,DNS+dialup,Response-delay,request-duration,bytes,status\n";
        let parse = |csv: &str| Pooled::from_oha_csv(csv, 1.0).unwrap_err();
        assert!(parse("").contains("no header"));
        let e = parse("request-start,status\n0.1,200\n");
        assert!(e.contains("\"request-duration\""), "{e}");
        let e = parse(&format!("{header}0.1,0,0,0.1,0.1,0,503\n"));
        assert!(e.contains("line 2: status 503"), "{e}");
        let e = parse(&format!("{header}0.1,0,0,0.1,soon,0,200\n"));
        assert!(e.contains("request-duration"), "{e}");
        let e = parse(&format!("{header}0.1,0,0.2,0.1,0.3,0,200\n"));
        assert!(e.contains("no request on an open connection"), "{e}");
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn summaries_take_medians_of_nested_figures_and_the_peak_rss() {
        let s = summarize(
            "x",
            vec![
                round(100.0, 10.0, 1.0, 900.0),
                round(300.0, 30.0, 3.0, 1000.0),
                round(200.0, 20.0, 2.0, 950.0),
            ],
        );
        assert_eq!(f(&s, "latency1_p50_us"), 200.0);
        assert_eq!(f(&s["open_loop"], "p50_us"), 200.0);
        assert_eq!(f(&s, "rss_load_kib"), 1000.0);
        assert_eq!(s["setup"], "x");
        assert_eq!(s["rounds"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn ratios_and_differences_pair_rounds() {
        // Direct drifts by 2x between rounds; the proxy is always 1.5x it.
        let direct = summarize(
            "direct",
            vec![round(100.0, 0.0, 0.0, 0.0), round(200.0, 0.0, 0.0, 0.0)],
        );
        let proxy = summarize(
            "p",
            vec![round(150.0, 0.0, 0.0, 0.0), round(300.0, 0.0, 0.0, 0.0)],
        );
        let get: fn(&Value) -> f64 = |r| f(r, "latency1_p50_us");
        assert_eq!(paired(&proxy, &direct, get, ratio), vec![1.5, 1.5]);
        assert_eq!(paired(&proxy, &direct, get, diff), vec![50.0, 100.0]);
        // A zero denominator is left out rather than reported as infinite.
        let bulk: fn(&Value) -> f64 = |r| f(r, "bulk_gbps");
        assert!(paired(&proxy, &direct, bulk, ratio).is_empty());
    }

    #[test]
    fn the_tables_judge_targets_and_haproxy_round_by_round() {
        let direct = summarize(
            "direct",
            vec![
                round(100.0, 1000.0, 10.0, 0.0),
                round(100.0, 1000.0, 10.0, 0.0),
                round(100.0, 1000.0, 10.0, 0.0),
            ],
        );
        // 30 µs added, 0.6x on 32 connections, bulk 0.3x in two rounds of three.
        let tcp = summarize(
            "meshd tcp",
            vec![
                round(130.0, 600.0, 3.0, 18000.0),
                round(130.0, 600.0, 5.0, 18000.0),
                round(130.0, 600.0, 3.0, 18000.0),
            ],
        );
        let quic = summarize("meshd quic", vec![round(140.0, 500.0, 3.0, 20000.0); 3]);
        // HAProxy: slower on latency, faster on bulk in every round.
        let haproxy = summarize("haproxy", vec![round(150.0, 600.0, 6.0, 30000.0); 3]);
        let md = markdown(&[direct, tcp, quic, haproxy]);
        assert!(md.contains("| added p50 latency, 1 connection ≤ 40 µs | +30 µs (+30 µs to +30 µs) | 3 of 3 | met |"), "{md}");
        assert!(
            md.contains(
                "| one-stream bulk ≥ 0.4× direct | 0.30× (0.30× to 0.50×) | 1 of 3 | **missed** |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| requests/s, 32 conns | 1000 | 600 (0.60×) | 500 (0.50×) | 600 (0.60×) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| p50 latency, 1 keep-alive conn | 130 µs | 150 µs | 3 of 3 | ahead |"),
            "{md}"
        );
        assert!(
            md.contains("| one-stream bulk, Gbit/s | 3.00 | 6.00 | 0 of 3 | **behind** |"),
            "{md}"
        );
        assert!(
            md.contains("| requests/s, 32 conns | 600 | 600 | 0 of 3 | level |"),
            "{md}"
        );
        // The larger meshd: 9,500 KiB = 9.73 MB over TCP, 10,500 KiB over QUIC.
        let (tcp_targets, quic_targets) = md
            .split_once("Targets for meshd quic")
            .expect("targets for both pairs");
        assert!(tcp_targets.contains("Targets for meshd tcp"), "{md}");
        assert!(
            tcp_targets.contains(
                "| idle RSS of each meshd ≤ 10 MB | 9.73 MB (9.73 MB to 9.73 MB) | 3 of 3 | met |"
            ),
            "{md}"
        );
        assert!(
            quic_targets.contains(
                "| idle RSS of each meshd ≤ 10 MB | 10.75 MB (10.75 MB to 10.75 MB) | 0 of 3 | **missed** |"
            ),
            "{md}"
        );
        // CPU judged under load and at the fixed rate.
        assert!(
            tcp_targets.contains("| CPU s per 1,000 requests (both ends), 32 connections ≤ 0.03 | 0.0200 (0.0200 to 0.0200) | 3 of 3 | met |"),
            "{md}"
        );
        assert!(
            tcp_targets.contains("| CPU s per 1,000 requests (both ends), at 1,000 req/s ≤ 0.03 | 0.0500 (0.0500 to 0.0500) | 0 of 3 | **missed** |"),
            "{md}"
        );
        // QUIC against HAProxy too: 0.5x on 32 connections, behind.
        let quic_vs_haproxy = md
            .split_once("meshd quic against the HAProxy pair")
            .expect("QUIC compared with HAProxy")
            .1;
        assert!(
            quic_vs_haproxy.contains("| requests/s, 32 conns | 500 | 600 | 0 of 3 | **behind** |"),
            "{md}"
        );
    }

    #[test]
    fn a_client_holding_tunnels_of_the_other_transport_makes_the_run_invalid() {
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(tunnel_fault("meshd quic", true, &kinds(&["quic"])), None);
        assert_eq!(
            tunnel_fault("meshd tcp", false, &kinds(&["dedicated", "multiplexed"])),
            None
        );
        let fault = tunnel_fault("meshd quic", true, &kinds(&["quic", "dedicated"])).unwrap();
        assert!(
            fault.contains("[\"dedicated\"]") && fault.contains("not QUIC's"),
            "{fault}"
        );
        let fault = tunnel_fault("meshd tcp", false, &kinds(&["quic"])).unwrap();
        assert!(fault.contains("not TCP's"), "{fault}");
        let fault = tunnel_fault("meshd tcp", false, &[]).unwrap();
        assert!(fault.contains("no tunnel"), "{fault}");
    }
}
