//! `bench-config`: config distribution at fleet scale (issue 4), in one
//! run on this machine.
//!
//! What it measures, and how:
//!
//! 1. **Fan-out latency.** A real single-member etcd and the release
//!    `mesh-controller` as its own process over it. Resources: Service
//!    `shop/web`, WorkloadGroup `shop/web` (serves `web`) and WorkloadGroup
//!    `shop/client` (serves nothing, so its hosts receive `web` but their
//!    own arrival changes no service). 1,000 hosts join group `client`
//!    through the Identity API with one join token of many uses, each with
//!    its own P-256 key and CSR, 16 joins in flight. Then this one process
//!    opens 1,000 `Hosts.Session` streams, each on its own TLS connection
//!    with its own host certificate, sending `Hello` (a distinct address
//!    per host), applying every `ConfigUpdate` to a `Snapshot` (which checks
//!    every entry's hash, as meshd does), acknowledging it, and sending
//!    heartbeats at the interval `SessionInfo` gives. The change: one more
//!    host (already joined to group `web`) opens its session, so `web`
//!    gains an endpoint. The write instant is when this process's own etcd
//!    watch on the controller's live-host records sees that host's record
//!    put (commit plus watch delivery, ~0.3 ms on this machine), and for
//!    each of the 1,000 streams the instant it receives the `ConfigUpdate`
//!    whose `web` entry holds the new endpoint. Reported: p50/p99/max over
//!    the streams and how many got it, repeated a few times; and the same
//!    from the new host's `Hello` (which adds the controller's lease grant
//!    and the write itself). All 1,000 streams are handled by this process
//!    on the same 2 cores as the controller and etcd, so the figures
//!    include the load generator's own queueing.
//! 2. **Controller memory per connected host.** The controller's VmRSS
//!    (from /proc) after the joins and a warm-up (16 sessions opened and
//!    closed), and again once all 1,000 sessions are established and have
//!    acknowledged their first update; (after − before) / 1,000. And once
//!    more after the changes: the first pushes to established sessions
//!    grow their buffers once, after which RSS stays flat.
//! 3. **meshd memory with a big snapshot.** One more host joins (with
//!    meshd's own join code); a snapshot of 10,000 services × 10 endpoints
//!    (100,000 endpoints, each its own address), built with the
//!    controller's entry and hash functions, is written as `snapshot.pb` in
//!    its state directory. The release `meshd` then starts with the
//!    controller unreachable, so it serves that snapshot from disk: capture
//!    and DNS off, admin/proxy ports on free loopback ports. VmRSS once
//!    `/ready` answers 200, against the same meshd with a one-service
//!    snapshot; and, in a child process that loads the same file the way
//!    meshd does, how much each step (decode, `Snapshot`, `MeshState`)
//!    allocates. When run as root it also starts meshd with capture on in a
//!    network namespace of its own (the test harness `Lab`), so the 100,000
//!    endpoints go into nftables sets, and reports that RSS and the time to
//!    ready.
//!
//! Run: `make bench-config` (builds the release binaries, raises the open
//! file limit), or after `cargo build --release -p hostmesh-controller
//! --bin mesh-controller -p hostmesh-meshd --bin meshd`:
//! `cargo run --release -p hostmesh-tests --bin bench-config`. Options:
//! `--hosts N` (1000), `--repeats N` (5), `--services N` (10000),
//! `--endpoints N` per service (10), `--no-capture`, `--keep` (keep the
//! temporary directory with the processes' logs), `--bin-dir DIR`.
//! Prints Markdown tables with the targets; exits non-zero only on errors
//! (a refused join, a broken stream, an update that fails its hash check,
//! a process that will not start), never because a target was missed.
//! Every process, temporary directory and namespace it makes is removed at
//! the end, also on error or Ctrl-C.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt;
use hostmesh_api::connect;
use hostmesh_api::entry::make_entry;
use hostmesh_api::pki;
use hostmesh_api::proto::hosts_client::HostsClient;
use hostmesh_api::proto::identity_client::IdentityClient;
use hostmesh_api::proto::operator_client::OperatorClient;
use hostmesh_api::proto::{
    self, Ack, ControllerMessage, CreateTokenRequest, EndpointConfig, Heartbeat, Hello,
    HostMessage, HostStatus, JoinRequest, Nack, PortHealth, PrepareJoinRequest, SelfConfig,
    ServiceConfig, ServicePortConfig, TrustBundleRequest, controller_message, host_message,
};
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::{self, SwappableCert, TrustBundle};
use hostmesh_controller::admin_conf::AdminCredential;
use hostmesh_controller::keys::Keys;
use hostmesh_meshd::identity::join::{JoinArgs, JoinOutcome, join};
use hostmesh_meshd::identity::store::{HostRecord, SNAPSHOT_FILE, StateDir};
use hostmesh_meshd::mesh::{HostLimits, MeshState, Snapshot};
use hostmesh_registry::EventKind;
use hostmesh_tests::{ControllerProc, EtcdCluster, Lab, Proc};
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const RESOURCES: &str = r#"apiVersion: hostmesh/v1
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
spec: {labels: {app: client}}
"#;

const WEB_ENTRY: &str = "service/shop/web";
const WARMUP_HOSTS: usize = 16;
const JOINS_IN_FLIGHT: usize = 16;
/// Sessions being set up at once (TLS handshake, Hello, first update).
const OPENING_IN_FLIGHT: usize = 64;
/// How long one change may take to reach every stream before it counts as
/// missed.
const CHANGE_PATIENCE: Duration = Duration::from_secs(30);
const TARGET_P99: Duration = Duration::from_secs(1);
const TARGET_PER_HOST_BYTES: f64 = 100_000.0;
/// Targets in decimal units, as the issue states them (100 KB, 80 MB).
const TARGET_MESHD_BYTES: f64 = 80_000_000.0;
const SNAPSHOT_VERSION: u64 = 4242;

struct Options {
    hosts: usize,
    repeats: usize,
    services: usize,
    endpoints: usize,
    capture: bool,
    keep: bool,
    bin_dir: Option<PathBuf>,
}

const USAGE: &str = "usage: bench-config [--hosts N] [--repeats N] [--services N] [--endpoints N] [--no-capture] [--keep] [--bin-dir DIR]";

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        hosts: 1000,
        repeats: 5,
        services: 10_000,
        endpoints: 10,
        capture: true,
        keep: false,
        bin_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = |range: std::ops::RangeInclusive<usize>| {
            let v = args
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
            v.parse::<usize>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| format!("{flag} {v:?}: expected {range:?}"))
        };
        match flag.as_str() {
            "--hosts" => o.hosts = number(1..=20_000)?,
            "--repeats" => o.repeats = number(1..=100)?,
            "--services" => o.services = number(1..=60_000)?,
            "--endpoints" => o.endpoints = number(1..=100)?,
            "--no-capture" => o.capture = false,
            "--keep" => o.keep = true,
            "--bin-dir" => {
                o.bin_dir =
                    Some(PathBuf::from(args.next().ok_or_else(|| {
                        format!("--bin-dir needs a value\n{USAGE}")
                    })?))
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.services * o.endpoints > 16_000_000 {
        return Err("--services x --endpoints must stay below 16 million addresses".to_string());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(MEASURE_FLAG) {
        return match measure_snapshot(&args[2..]) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench-config {MEASURE_FLAG}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-config: {e}");
            return ExitCode::from(2);
        }
    };
    tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-config: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // Dropping `run` (Ctrl-C) drops its guards: processes are killed,
        // the namespace and temporary directories removed.
        tokio::select! {
            r = run(&options) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-config: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------ small helpers

#[derive(Clone, Copy, Debug)]
struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    n: usize,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Stats {
        samples.sort_unstable();
        if samples.is_empty() {
            return Stats {
                p50: Duration::ZERO,
                p99: Duration::ZERO,
                max: Duration::ZERO,
                n: 0,
            };
        }
        let rank = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[i - 1]
        };
        Stats {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
            n: samples.len(),
        }
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// A field of /proc/PID/status in bytes (VmRSS, VmHWM).
fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .ok_or_else(|| anyhow!("{path} has no {field} line"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{path}: cannot read {line:?}"))?;
    Ok(kb * 1024)
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("{path}: field {i} is missing"))
    };
    Ok((ticks(14)? + ticks(15)?) / ticks_per_second)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn open_files_limit() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow!("/proc/self/limits has no \"Max open files\" line"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .unwrap_or_default();
    Ok(if soft == "unlimited" {
        u64::MAX
    } else {
        soft.parse()
            .with_context(|| format!("reading the open files limit from {line:?}"))?
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A plain HTTP GET on loopback, off the async threads.
async fn http_get(addr: String, path: &'static str) -> Result<(u16, String), String> {
    tokio::task::spawn_blocking(move || hostmesh_tests::http_get(&addr, path))
        .await
        .unwrap_or_else(|e| Err(format!("the HTTP probe panicked: {e}")))
}

/// A value of a Prometheus text exposition (first sample of `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn host_address(i: usize) -> Ipv4Addr {
    // 10.200.0.0/16 for the load hosts, 10.201.0.0/16 for the changes.
    let i = i as u32;
    Ipv4Addr::from(0x0ac8_0000 + i)
}

// ------------------------------------------------------------ run

struct Report {
    hosts: usize,
    join_seconds: f64,
    join_retries: u64,
    open_seconds: f64,
    ctl_cpu_open: f64,
    rss_before: u64,
    rss_after: u64,
    rss_end: u64,
    sessions_gauge: Option<f64>,
    changes: Vec<Change>,
    meshd: MeshdReport,
    failures: Vec<String>,
}

struct Change {
    from_write: Stats,
    from_hello: Stats,
    reached: usize,
    write_after_hello: Duration,
    ctl_cpu: f64,
    /// The controller's VmRSS once the change has reached every stream.
    ctl_rss: u64,
}

async fn run(o: &Options) -> anyhow::Result<()> {
    let bin_dir = match &o.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow!("this executable has no directory"))?,
    };
    for name in ["mesh-controller", "meshd"] {
        if !bin_dir.join(name).is_file() {
            bail!(
                "{} is missing: build the release binaries first (`make bench-config` does: \
                 cargo build --release -p hostmesh-controller --bin mesh-controller -p hostmesh-meshd --bin meshd)",
                bin_dir.join(name).display()
            );
        }
    }
    hostmesh_tests::set_bin_dir(bin_dir.clone());
    let need = (o.hosts + o.repeats + WARMUP_HOSTS + 256) as u64;
    let limit = open_files_limit()?;
    if limit < need {
        bail!(
            "the open files limit is {limit}, and {} streams need at least {need} (in this process and in the controller): \
             run `ulimit -n 65536` first (`make bench-config` does)",
            o.hosts
        );
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "bench-config: {} hosts, {} changes, snapshot {} services x {} endpoints; {profile} build, {} cores; binaries from {}",
        o.hosts,
        o.repeats,
        o.services,
        o.endpoints,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        bin_dir.display()
    );
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("hostmesh-bench-config-")
        .tempdir()
        .context("creating a temporary directory")?;
    let dir_path = dir.path().to_path_buf();
    let dir_guard = if o.keep {
        println!("keeping {} (logs, state) after the run", dir_path.display());
        let _ = dir.keep();
        None
    } else {
        Some(dir)
    };
    let report = fleet(o, &dir_path).await;
    drop(dir_guard);
    let report = report?;
    print_report(o, &report, started.elapsed());
    if !report.failures.is_empty() {
        bail!(
            "{} error(s) during the run; first: {}",
            report.failures.len(),
            report.failures[0]
        );
    }
    Ok(())
}

async fn fleet(o: &Options, dir: &Path) -> anyhow::Result<Report> {
    let ticks = clock_ticks();
    println!("[{:>6.1}s] starting etcd and the controller", 0.0);
    let t_all = Instant::now();
    let stamp = || t_all.elapsed().as_secs_f64();
    let etcd = EtcdCluster::start(1).await;
    let store = format!("etcd://{}", etcd.endpoint(0));
    let ctl_dir = dir.to_path_buf();
    let ctl = tokio::task::spawn_blocking(move || {
        ControllerProc::start(&ctl_dir, "controller", &store, "[log]\nformat = \"text\"\n")
    })
    .await
    .context("starting the controller")?;
    let pid = ctl.proc.pid();
    let cred = AdminCredential::load(&ctl.admin_conf)
        .with_context(|| format!("reading {}", ctl.admin_conf.display()))?;
    let bundle = TrustBundle::from_pem(&cred.trust_domain, &cred.ca_bundle, "admin.conf caBundle")
        .context("the controller's trust bundle")?;
    let url = ctl.url.clone();
    let (channel, _) = hostmesh_controller::cli::client::admin_channel(&ctl.admin_conf, None)
        .context("using the admin credential")?;
    let mut admin = OperatorClient::new(channel);
    let docs = hostmesh_api::document::parse_documents(RESOURCES)
        .map_err(|e| anyhow!("the benchmark's own resources: {e}"))?;
    admin
        .apply(hostmesh_api::document::apply_request(&docs, false))
        .await
        .map_err(|s| anyhow!("applying the resources: {}", s.message()))?;
    let client_token = create_token(&mut admin, "shop/client", o.hosts + WARMUP_HOSTS + 1).await?;
    let web_token = create_token(&mut admin, "shop/web", o.repeats).await?;
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    let _watcher = LiveWatcher::start(&etcd, events_tx.clone()).await?;

    println!(
        "[{:>6.1}s] {} hosts join (one token, {JOINS_IN_FLIGHT} joins in flight)",
        stamp(),
        o.hosts + WARMUP_HOSTS + o.repeats
    );
    let t_join = Instant::now();
    let (client_hosts, client_retries) = join_hosts(
        &url,
        &bundle,
        &client_token.token,
        o.hosts + WARMUP_HOSTS,
        0,
    )
    .await?;
    let join_seconds = t_join.elapsed().as_secs_f64();
    let (web_hosts, web_retries) =
        join_hosts(&url, &bundle, &web_token.token, o.repeats, 1 << 16).await?;
    let mut client_hosts = client_hosts;
    let warm_hosts: Vec<JoinedHost> = client_hosts.split_off(o.hosts);

    let (stop_tx, stop_rx) = watch::channel(false);

    // Warm-up: sessions opened and closed, so lazily built things (the
    // etcd lease stream, allocator caches) are in the baseline.
    println!(
        "[{:>6.1}s] warm-up: {WARMUP_HOSTS} sessions opened and closed",
        stamp()
    );
    {
        let (warm_stop_tx, warm_stop_rx) = watch::channel(false);
        let gate = Arc::new(Semaphore::new(OPENING_IN_FLIGHT));
        let base = o.hosts + o.repeats;
        let tasks: Vec<_> = warm_hosts
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                tokio::spawn(session(
                    base + i,
                    h,
                    url.clone(),
                    bundle.clone(),
                    status_for(base + i, false),
                    events_tx.clone(),
                    warm_stop_rx.clone(),
                    gate.clone(),
                ))
            })
            .collect();
        let mut ready = 0;
        while ready < WARMUP_HOSTS {
            match tokio::time::timeout(Duration::from_secs(60), events_rx.recv()).await {
                Ok(Some(Event::FirstAck)) => ready += 1,
                Ok(Some(Event::Failed { stream, error })) => {
                    bail!("warm-up session {stream} failed: {error}")
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!("the warm-up sessions did not all start within 60s"),
            }
        }
        let _ = warm_stop_tx.send(true);
        for t in tasks {
            t.await.context("a warm-up session panicked")?;
        }
        // Drain what the warm-up said on its way out.
        while events_rx.try_recv().is_ok() {}
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_before = settled_rss(pid).await?;
    println!(
        "[{:>6.1}s] controller VmRSS before the sessions: {}",
        stamp(),
        mib(rss_before as f64)
    );

    println!(
        "[{:>6.1}s] opening {} sessions ({OPENING_IN_FLIGHT} being set up at a time)",
        stamp(),
        o.hosts
    );
    let gate = Arc::new(Semaphore::new(OPENING_IN_FLIGHT));
    let cpu0 = cpu_seconds(pid, ticks)?;
    let t_open = Instant::now();
    let mut tasks = Vec::with_capacity(o.hosts + o.repeats);
    for (i, h) in client_hosts.into_iter().enumerate() {
        tasks.push(tokio::spawn(session(
            i,
            h,
            url.clone(),
            bundle.clone(),
            status_for(i, false),
            events_tx.clone(),
            stop_rx.clone(),
            gate.clone(),
        )));
    }
    let mut failures = Vec::new();
    let mut first_acks = 0;
    let open_deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while first_acks < o.hosts {
        match tokio::time::timeout_at(open_deadline, events_rx.recv()).await {
            Ok(Some(Event::FirstAck)) => {
                first_acks += 1;
                if first_acks % 250 == 0 {
                    println!(
                        "[{:>6.1}s]   {first_acks} sessions acked their first update",
                        stamp()
                    );
                }
            }
            Ok(Some(Event::Failed { stream, error })) => {
                failures.push(format!("session {stream}: {error}"));
                if failures.len() > o.hosts / 10 {
                    bail!(
                        "more than a tenth of the sessions failed; first: {}",
                        failures[0]
                    );
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("every session ended"),
            Err(_) => bail!(
                "only {first_acks} of {} sessions were established within 180s",
                o.hosts
            ),
        }
    }
    let open_seconds = t_open.elapsed().as_secs_f64();
    let ctl_cpu_open = cpu_seconds(pid, ticks)? - cpu0;
    // Let the last writes (ack records) and the fan-out of the last live
    // records settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drain_failures(&mut events_rx, &mut failures);
    let rss_after = settled_rss(pid).await?;
    let metrics = http_get(ctl.metrics.clone(), "/metrics").await;
    let sessions_gauge = metrics
        .ok()
        .and_then(|(_, body)| metric(&body, "hostmesh_controller_host_sessions"));
    println!(
        "[{:>6.1}s] controller VmRSS with {} sessions: {} ({} sessions open by its metric)",
        stamp(),
        o.hosts,
        mib(rss_after as f64),
        sessions_gauge.map_or("?".to_string(), |v| format!("{v:.0}"))
    );

    // The changes: one more `web` host per repeat.
    let mut changes = Vec::new();
    for (r, web) in web_hosts.into_iter().enumerate() {
        let stream = o.hosts + r;
        let host_id = web.host_id.clone();
        let cpu0 = cpu_seconds(pid, ticks)?;
        tasks.push(tokio::spawn(session(
            stream,
            web,
            url.clone(),
            bundle.clone(),
            status_for(r, true),
            events_tx.clone(),
            stop_rx.clone(),
            Arc::new(Semaphore::new(1)),
        )));
        let mut hello_at = None;
        let mut written_at = None;
        let mut reached: HashMap<usize, Instant> = HashMap::new();
        let deadline = tokio::time::Instant::now() + CHANGE_PATIENCE;
        while reached.len() < o.hosts || written_at.is_none() {
            match tokio::time::timeout_at(deadline, events_rx.recv()).await {
                Ok(Some(Event::HelloSent { stream: s, at })) if s == stream => hello_at = Some(at),
                Ok(Some(Event::Written { host, at })) if host == host_id => written_at = Some(at),
                Ok(Some(Event::Saw {
                    stream: s,
                    host,
                    at,
                })) if host == host_id && s < o.hosts => {
                    reached.entry(s).or_insert(at);
                }
                Ok(Some(Event::Failed { stream: s, error })) => {
                    failures.push(format!("session {s}: {error}"))
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("every session ended"),
                Err(_) => break,
            }
        }
        let ctl_cpu = cpu_seconds(pid, ticks)? - cpu0;
        let (Some(hello_at), Some(written_at)) = (hello_at, written_at) else {
            bail!(
                "change {}: the new web host's session did not start within {CHANGE_PATIENCE:?}",
                r + 1
            );
        };
        let from_write: Vec<Duration> = reached
            .values()
            .map(|at| at.saturating_duration_since(written_at))
            .collect();
        let from_hello: Vec<Duration> = reached
            .values()
            .map(|at| at.saturating_duration_since(hello_at))
            .collect();
        let change = Change {
            from_write: Stats::of(from_write),
            from_hello: Stats::of(from_hello),
            reached: reached.len(),
            write_after_hello: written_at.saturating_duration_since(hello_at),
            ctl_cpu,
            ctl_rss: proc_status_bytes(pid, "VmRSS")?,
        };
        println!(
            "[{:>6.1}s] change {}: reached {}/{} streams; from the write p50 {} p99 {} max {}",
            stamp(),
            r + 1,
            change.reached,
            o.hosts,
            ms(change.from_write.p50),
            ms(change.from_write.p99),
            ms(change.from_write.max)
        );
        changes.push(change);
        // Let the acks of this change land before the next.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drain_failures(&mut events_rx, &mut failures);
    let rss_end = settled_rss(pid).await?;

    // One more host, joined with meshd's own code, for the meshd runs.
    let meshd_state = dir.join("meshd-host");
    let record = match join(
        JoinArgs {
            controller: url.clone(),
            token: client_token.token.clone(),
            ca_pin: client_token.ca_hash.clone(),
            force: false,
            hostname: "bench-meshd".to_string(),
            state: StateDir::new(&meshd_state, None),
        },
        hostmesh_api::clock::unix_seconds(std::time::SystemTime::now()),
    )
    .await
    .context("joining the meshd host")?
    {
        JoinOutcome::Joined(r) | JoinOutcome::AlreadyJoined(r) => r,
    };

    println!(
        "[{:>6.1}s] closing the sessions, stopping the controller",
        stamp()
    );
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    drop(ctl);
    drop(etcd);

    let meshd = meshd_memory(o, dir, &meshd_state, &record, &stamp).await?;
    Ok(Report {
        hosts: o.hosts,
        join_seconds,
        join_retries: client_retries + web_retries,
        open_seconds,
        ctl_cpu_open,
        rss_before,
        rss_after,
        rss_end,
        sessions_gauge,
        changes,
        meshd,
        failures,
    })
}

/// The "instant a change is written": this process watches the
/// controller's live-host records in etcd itself and stamps each put as it
/// arrives (commit plus etcd's watch delivery, about 0.3 ms here by
/// `bench-registry`). Aborted when dropped.
struct LiveWatcher(tokio::task::JoinHandle<()>);

impl LiveWatcher {
    async fn start(
        etcd: &EtcdCluster,
        events: mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<LiveWatcher> {
        let store = etcd.shared_store().await;
        let prefix = Keys::new("/hostmesh/").live_hosts();
        let from = store.current_revision().await? + 1;
        let mut watch = store
            .watch(&prefix, from)
            .await
            .context("watching the live-host records in etcd")?;
        Ok(LiveWatcher(tokio::spawn(async move {
            while let Some(Ok(batch)) = watch.next().await {
                let at = Instant::now();
                for ev in batch.events {
                    if ev.kind != EventKind::Put {
                        continue;
                    }
                    if let Some(host) = ev.kv.key.strip_prefix(&prefix) {
                        let _ = events.send(Event::Written {
                            host: host.to_string(),
                            at,
                        });
                    }
                }
            }
        })))
    }
}

impl Drop for LiveWatcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn drain_failures(rx: &mut mpsc::UnboundedReceiver<Event>, failures: &mut Vec<String>) {
    while let Ok(ev) = rx.try_recv() {
        if let Event::Failed { stream, error } = ev {
            failures.push(format!("session {stream}: {error}"));
        }
    }
}

/// VmRSS, the median of five reads 300 ms apart.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let mut reads = Vec::new();
    for _ in 0..5 {
        reads.push(proc_status_bytes(pid, "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    reads.sort_unstable();
    Ok(reads[2])
}

async fn create_token(
    admin: &mut OperatorClient<Channel>,
    group: &str,
    uses: usize,
) -> anyhow::Result<proto::CreateTokenResponse> {
    Ok(admin
        .create_token(CreateTokenRequest {
            group: group.to_string(),
            ttl_seconds: 3600,
            uses: u32::try_from(uses).context("too many token uses")?,
            description: "bench-config".to_string(),
        })
        .await
        .map_err(|s| anyhow!("creating a join token for {group}: {}", s.message()))?
        .into_inner())
}

// ------------------------------------------------------------ joins

struct JoinedHost {
    host_id: String,
    cert: Arc<SwappableCert>,
}

/// `n` hosts join with `token`, each with its own key, JOINS_IN_FLIGHT at
/// a time. Returns them in order and how many joins were retried because
/// the controller answered "aborted" (the token changed under it).
async fn join_hosts(
    url: &str,
    bundle: &TrustBundle,
    token: &str,
    n: usize,
    first: usize,
) -> anyhow::Result<(Vec<JoinedHost>, u64)> {
    let channel =
        connect::channel(url, bundle.clone(), None, None).context("a channel to the controller")?;
    let mut identity = IdentityClient::new(channel);
    let prepared = identity
        .prepare_join(PrepareJoinRequest {
            token: token.to_string(),
        })
        .await
        .map_err(|s| anyhow!("PrepareJoin: {}", s.message()))?
        .into_inner();
    let spiffe: SpiffeId = prepared
        .spiffe_id
        .parse()
        .map_err(|e| anyhow!("PrepareJoin gave {:?}: {e}", prepared.spiffe_id))?;
    let results: Vec<anyhow::Result<(JoinedHost, u64)>> = futures::stream::iter(0..n)
        .map(|i| {
            join_one(
                identity.clone(),
                token.to_string(),
                spiffe.clone(),
                first + i,
            )
        })
        .buffered(JOINS_IN_FLIGHT)
        .collect()
        .await;
    let mut hosts = Vec::with_capacity(n);
    let mut retries = 0;
    for r in results {
        let (h, tries) = r?;
        retries += tries;
        hosts.push(h);
    }
    Ok((hosts, retries))
}

async fn join_one(
    mut identity: IdentityClient<Channel>,
    token: String,
    spiffe: SpiffeId,
    index: usize,
) -> anyhow::Result<(JoinedHost, u64)> {
    let hostname = format!("bench-host-{index}");
    let key = pki::generate_key().context("generating a host key")?;
    let csr = pki::build_csr(&key, &spiffe, &hostname).context("building a CSR")?;
    let mut retries = 0;
    let joined = loop {
        match identity
            .join(JoinRequest {
                token: token.clone(),
                csr_pem: csr.clone(),
                hostname: hostname.clone(),
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            // Many joins on one token race on its use count; the
            // controller retries 16 times and then says "aborted".
            Err(s) if s.code() == tonic::Code::Aborted && retries < 50 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(rand_ms(20))).await;
            }
            Err(s) => bail!("join of {hostname}: {:?}: {}", s.code(), s.message()),
        }
    };
    let certified = tls::certified_key(
        &joined.certificate_chain_pem,
        &key.serialize_pem(),
        &format!("the certificate of {}", joined.host_id),
    )?;
    Ok((
        JoinedHost {
            host_id: joined.host_id,
            cert: SwappableCert::new(certified),
        },
        retries,
    ))
}

fn rand_ms(max: u64) -> u64 {
    // Jitter from the clock's low bits: good enough to spread retries.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    u64::from(nanos) % max.max(1)
}

// ------------------------------------------------------------ sessions

enum Event {
    HelloSent {
        stream: usize,
        at: Instant,
    },
    /// The bench's own etcd watch saw a host's live record written.
    Written {
        host: String,
        at: Instant,
    },
    FirstAck,
    Saw {
        stream: usize,
        host: String,
        at: Instant,
    },
    Failed {
        stream: usize,
        error: String,
    },
}

fn status_for(i: usize, web: bool) -> HostStatus {
    let address = if web {
        host_address((1 << 16) + i + 1)
    } else {
        host_address(i + 1)
    };
    HostStatus {
        address: address.to_string(),
        tunnel_port: 15008,
        quic: false,
        ports: if web {
            vec![PortHealth {
                port: 8080,
                healthy: true,
                detail: String::new(),
            }]
        } else {
            Vec::new()
        },
        hostname: format!("bench-{}-{i}", if web { "web" } else { "client" }),
        meshd_version: "bench".to_string(),
    }
}

/// One host's session, held until `stop`; what happens is reported on
/// `events`. `gate` bounds how many sessions are being set up at once.
#[allow(clippy::too_many_arguments)]
async fn session(
    stream: usize,
    host: JoinedHost,
    url: String,
    bundle: TrustBundle,
    status: HostStatus,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
) {
    if let Err(error) = session_inner(stream, host, url, bundle, status, &events, stop, gate).await
    {
        let _ = events.send(Event::Failed {
            stream,
            error: format!("{error:#}"),
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn session_inner(
    stream: usize,
    host: JoinedHost,
    url: String,
    bundle: TrustBundle,
    status: HostStatus,
    events: &mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let permit = gate.acquire_owned().await.context("the gate closed")?;
    let channel = connect::channel(&url, bundle, Some(host.cert.clone()), None)
        .context("a channel to the controller")?;
    // Connect (TCP + TLS with the host certificate) before the session, so
    // that the Hello instant is not a handshake.
    IdentityClient::new(channel.clone())
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .map_err(|s| anyhow!("connecting as {}: {}", host.host_id, s.message()))?;
    let mut client = HostsClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<HostMessage>(16);
    tx.send(HostMessage {
        msg: Some(host_message::Msg::Hello(Hello {
            status: Some(status),
            version: 0,
            entries: Default::default(),
        })),
    })
    .await
    .map_err(|_| anyhow!("the request stream closed"))?;
    let _ = events.send(Event::HelloSent {
        stream,
        at: Instant::now(),
    });
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("Session: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut permit = Some(permit);
    let mut snapshot = Snapshot::default();
    let mut seen: HashSet<String> = HashSet::new();
    // Replaced by the interval SessionInfo gives.
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = msg.map_err(|s| anyhow!("the stream failed: {:?}: {}", s.code(), s.message()))?;
                let msg = match msg {
                    Some(ControllerMessage { msg: Some(m) }) => m,
                    Some(ControllerMessage { msg: None }) => continue,
                    None => bail!("the controller closed the session"),
                };
                match msg {
                    controller_message::Msg::Session(info) => {
                        let every = Duration::from_secs(u64::from(info.heartbeat_interval_seconds.clamp(1, 300)));
                        // Spread the fleet's heartbeats over the interval.
                        let offset = every.mul_f64((stream % 97) as f64 / 97.0);
                        heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    controller_message::Msg::Update(update) => {
                        let at = Instant::now();
                        for e in update.upserts.iter().filter(|e| e.name == WEB_ENTRY) {
                            if let Ok(svc) = ServiceConfig::decode(e.body.clone()) {
                                for ep in &svc.endpoints {
                                    if seen.insert(ep.host_id.clone()) {
                                        let _ = events.send(Event::Saw { stream, host: ep.host_id.clone(), at });
                                    }
                                }
                            }
                        }
                        let version = update.version;
                        let reply = match snapshot.apply(update) {
                            Ok(next) => {
                                snapshot = next;
                                host_message::Msg::Ack(Ack { version })
                            }
                            Err(e) => {
                                let _ = events.send(Event::Failed { stream, error: format!("update {version} refused: {e}") });
                                host_message::Msg::Nack(Nack { version, reason: e.to_string() })
                            }
                        };
                        tx.send(HostMessage { msg: Some(reply) }).await.map_err(|_| anyhow!("the request stream closed"))?;
                        if permit.take().is_some() {
                            let _ = events.send(Event::FirstAck);
                        }
                    }
                }
            }
            _ = heartbeat.tick() => {
                tx.send(HostMessage { msg: Some(host_message::Msg::Heartbeat(Heartbeat { status: None })) })
                    .await
                    .map_err(|_| anyhow!("the request stream closed"))?;
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                // Ending the request stream closes the session cleanly.
                return Ok(());
            }
        }
    }
}

// ------------------------------------------------------------ meshd

struct MeshdRun {
    rss: u64,
    hwm: u64,
    ready_after: Duration,
}

struct MeshdReport {
    snapshot_bytes: usize,
    services: usize,
    endpoints: usize,
    small: MeshdRun,
    big: MeshdRun,
    cost: SnapshotCost,
    capture: Result<(MeshdRun, usize), String>,
}

fn big_snapshot(
    record: &HostRecord,
    bundle_pem: &str,
    services: usize,
    per_service: usize,
) -> Snapshot {
    let td = &record.trust_domain;
    let mut entries = BTreeMap::new();
    let mut add = |e: proto::ConfigEntry| {
        entries.insert(e.name.clone(), e);
    };
    add(make_entry(
        "self",
        proto::EntryKind::SelfConfig,
        SelfConfig {
            host_id: record.host_id.clone(),
            namespace: record.namespace.clone(),
            group: record.group.clone(),
            spiffe_id: record.spiffe_id.clone(),
            labels: [("app".to_string(), "client".to_string())].into(),
            services: Vec::new(),
            trust_domain: td.clone(),
            vip_ranges: vec!["240.240.0.0/16".to_string(), "fd00:240::/96".to_string()],
            health_checks: Vec::new(),
            transport: String::new(),
            peer_transport: Vec::new(),
        }
        .encode_to_vec(),
    ));
    add(make_entry(
        "bundle",
        proto::EntryKind::Bundle,
        proto::TrustBundle {
            trust_domain: td.clone(),
            roots_pem: bundle_pem.to_string(),
        }
        .encode_to_vec(),
    ));
    for s in 0..services {
        let name = format!("svc-{s:05}");
        let endpoints = (0..per_service)
            .map(|e| {
                let h = (s * per_service + e) as u32;
                EndpointConfig {
                    host_id: format!("host-{h:07}"),
                    // 10.0.0.0/8, one address per endpoint.
                    address: Ipv4Addr::from(0x0a00_0000 + h + 1).to_string(),
                    tunnel_port: 15008,
                    quic: false,
                    spiffe_id: format!("spiffe://{td}/ns/bench/sa/{name}"),
                    labels: [
                        ("app".to_string(), name.clone()),
                        ("version".to_string(), "v1".to_string()),
                    ]
                    .into(),
                    healthy_ports: vec![8080],
                }
            })
            .collect();
        let vip = Ipv4Addr::from(0xf0f0_0000 + s as u32 + 1);
        add(make_entry(
            format!("service/bench/{name}"),
            proto::EntryKind::Service,
            ServiceConfig {
                namespace: "bench".to_string(),
                name: name.clone(),
                vips: vec![vip.to_string()],
                ports: vec![ServicePortConfig {
                    name: "http".to_string(),
                    port: 80,
                    target_port: 8080,
                    protocol: "http".to_string(),
                }],
                mtls: "strict".to_string(),
                endpoints,
            }
            .encode_to_vec(),
        ));
    }
    Snapshot {
        version: SNAPSHOT_VERSION,
        entries,
    }
}

async fn meshd_memory(
    o: &Options,
    dir: &Path,
    state: &Path,
    record: &HostRecord,
    stamp: &impl Fn() -> f64,
) -> anyhow::Result<MeshdReport> {
    let bundle_pem = std::fs::read_to_string(state.join("bundle.pem"))
        .with_context(|| format!("reading {}", state.join("bundle.pem").display()))?;
    let state_dir = StateDir::new(state, None);
    let unreachable = format!("https://127.0.0.1:{}", hostmesh_tests::free_port());
    let config = |capture: bool| -> String {
        if capture {
            // In its own namespace: default ports, capture on.
            format!(
                "state_dir = {:?}\naddress = \"10.77.0.10\"\n[controller]\nurl = \"https://10.77.0.99:15012\"\n[dns]\nenabled = false\ncapture = false\n[log]\nformat = \"text\"\n",
                state.display().to_string()
            )
        } else {
            format!(
                "state_dir = {:?}\naddress = \"127.0.0.1\"\n[controller]\nurl = {unreachable:?}\n[admin]\nlisten = \"127.0.0.1:{}\"\n[dns]\nenabled = false\ncapture = false\n[capture]\nenabled = false\n[proxy]\noutbound_port = {}\ntunnel_port = {}\n[log]\nformat = \"text\"\n",
                state.display().to_string(),
                hostmesh_tests::free_port(),
                hostmesh_tests::free_port(),
                hostmesh_tests::free_port(),
            )
        }
    };

    println!("[{:>6.1}s] meshd with a one-service snapshot", stamp());
    let small = big_snapshot(record, &bundle_pem, 1, 1);
    state_dir
        .write(SNAPSHOT_FILE, &small.encode(), 0o600)
        .context("writing the small snapshot")?;
    let small_run = run_meshd(dir, "meshd-small", &config(false)).await?;

    println!(
        "[{:>6.1}s] meshd with {} services x {} endpoints",
        stamp(),
        o.services,
        o.endpoints
    );
    let big = big_snapshot(record, &bundle_pem, o.services, o.endpoints);
    let bytes = big.encode();
    drop(big);
    state_dir
        .write(SNAPSHOT_FILE, &bytes, 0o600)
        .context("writing the big snapshot")?;
    let snapshot_bytes = bytes.len();
    drop(bytes);
    let big_run = run_meshd(dir, "meshd-big", &config(false)).await?;
    let cost = snapshot_cost(state, record).await?;

    let capture = if !o.capture {
        Err("not run (--no-capture)".to_string())
    } else if !is_root() {
        Err("not run: needs root (network namespace, nftables)".to_string())
    } else {
        println!(
            "[{:>6.1}s] meshd with capture on, in a network namespace",
            stamp()
        );
        match run_meshd_captured(&config(true)).await {
            Ok(v) => Ok(v),
            Err(e) => bail!("meshd with capture: {e:#}"),
        }
    };
    Ok(MeshdReport {
        snapshot_bytes,
        services: o.services,
        endpoints: o.services * o.endpoints,
        small: small_run,
        big: big_run,
        cost,
        capture,
    })
}

/// Starts meshd in this namespace, waits for /ready, reads its memory,
/// stops it.
async fn run_meshd(dir: &Path, name: &str, config: &str) -> anyhow::Result<MeshdRun> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let admin = config
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .map(|v| v.trim_matches('"').to_string())
        .ok_or_else(|| anyhow!("the meshd config has no admin listen address"))?;
    let mut cmd = Command::new(hostmesh_tests::bin("meshd"));
    cmd.args(["run", "--config"]).arg(&path);
    let t0 = Instant::now();
    let mut proc = Proc::spawn(name, cmd, dir);
    let deadline = t0 + Duration::from_secs(120);
    loop {
        if !proc.is_running() {
            bail!("{name} exited before it was ready:\n{}", tail(&proc.log()));
        }
        if let Ok((200, _)) = http_get(admin.clone(), "/ready").await {
            break;
        }
        if Instant::now() > deadline {
            bail!("{name} was not ready within 120s:\n{}", tail(&proc.log()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_after = t0.elapsed();
    let (_, metrics) = http_get(admin.clone(), "/metrics")
        .await
        .map_err(|e| anyhow!("{name} /metrics: {e}"))?;
    let version = metric(&metrics, "hostmesh_meshd_control_config_version");
    if version != Some(SNAPSHOT_VERSION as f64) {
        bail!(
            "{name} is not serving the snapshot from disk (config version {version:?}, expected {SNAPSHOT_VERSION}):\n{}",
            tail(&proc.log())
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = proc.pid();
    let run = MeshdRun {
        rss: settled_rss(pid).await?,
        hwm: proc_status_bytes(pid, "VmHWM")?,
        ready_after,
    };
    let _ = tokio::task::spawn_blocking(move || proc.terminate(Duration::from_secs(15))).await;
    Ok(run)
}

/// meshd with capture on, in a one-host lab: its memory and the number of
/// endpoint elements nftables holds.
async fn run_meshd_captured(config: &str) -> anyhow::Result<(MeshdRun, usize)> {
    let lab = tokio::task::spawn_blocking(|| Lab::new(1))
        .await
        .context("creating the network namespace")?;
    let path = lab.dir.path().join("meshd-capture.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let t0 = Instant::now();
    let path_text = path.display().to_string();
    let mut proc = lab.spawn(
        0,
        "meshd-capture",
        hostmesh_tests::bin("meshd"),
        &["run", "--config", &path_text],
    );
    let deadline = t0 + Duration::from_secs(180);
    loop {
        if !proc.is_running() {
            bail!("meshd exited before it was ready:\n{}", tail(&proc.log()));
        }
        let out = lab.sh(
            0,
            "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:15000/ready",
        );
        if String::from_utf8_lossy(&out.stdout).trim() == "200" {
            break;
        }
        if Instant::now() > deadline {
            bail!("meshd was not ready within 180s:\n{}", tail(&proc.log()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = proc.pid();
    let run = MeshdRun {
        rss: settled_rss(pid).await?,
        hwm: proc_status_bytes(pid, "VmHWM")?,
        ready_after,
    };
    let out = lab.sh(0, "nft -j list set inet hostmesh endpoints_v4");
    let elements = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v["nftables"].as_array().and_then(|items| {
                items
                    .iter()
                    .find_map(|i| i["set"]["elem"].as_array().map(Vec::len))
            })
        })
        .unwrap_or(0);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = proc.terminate(Duration::from_secs(30));
        drop(lab);
    })
    .await;
    Ok((run, elements))
}

/// The hidden mode the parent runs as a child process: loads a snapshot
/// file the way meshd does (decode, apply into a `Snapshot`, build the
/// `MeshState`) and prints its VmRSS after each step. Nothing is freed
/// until the end, so each step's growth is fresh allocations: the size of
/// what that step made.
const MEASURE_FLAG: &str = "--measure-snapshot";

fn measure_snapshot(args: &[String]) -> anyhow::Result<String> {
    let [path, host_id, trust_domain] = args else {
        bail!("usage: {MEASURE_FLAG} SNAPSHOT_FILE HOST_ID TRUST_DOMAIN");
    };
    let pid = std::process::id();
    let rss = || proc_status_bytes(pid, "VmRSS");
    let start = rss()?;
    let bytes =
        prost::bytes::Bytes::from(std::fs::read(path).with_context(|| format!("reading {path}"))?);
    let read = rss()?;
    let update =
        proto::ConfigUpdate::decode(bytes.clone()).with_context(|| format!("decoding {path}"))?;
    let decoded = rss()?;
    let snapshot = Snapshot::default()
        .apply(update)
        .map_err(|e| anyhow!("{path}: {e}"))?;
    let applied = rss()?;
    let limits = HostLimits {
        host_id: host_id.clone(),
        trust_domain: trust_domain.clone(),
        own_ports: vec![15000, 15001, 15008, 15053],
        address: None,
    };
    let state = MeshState::build(&snapshot, &limits, None).map_err(|e| anyhow!("{path}: {e}"))?;
    let built = rss()?;
    let endpoints: usize = state.services.values().map(|s| s.endpoints.len()).sum();
    drop(bytes);
    let kept = rss()?;
    drop((snapshot, state));
    Ok(format!(
        "start={start} read={read} decoded={decoded} snapshot={applied} state={built} kept={kept} endpoints={endpoints}"
    ))
}

/// Where the memory of the big snapshot goes, by [`measure_snapshot`].
struct SnapshotCost {
    file: u64,
    decoded: u64,
    snapshot: u64,
    state: u64,
    endpoints: u64,
}

async fn snapshot_cost(state: &Path, record: &HostRecord) -> anyhow::Result<SnapshotCost> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let file = state.join(SNAPSHOT_FILE);
    let out = Command::new(exe)
        .arg(MEASURE_FLAG)
        .arg(&file)
        .arg(&record.host_id)
        .arg(&record.trust_domain)
        .output()
        .context("running the snapshot measurement")?;
    if !out.status.success() {
        bail!(
            "the snapshot measurement failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| -> anyhow::Result<u64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("the snapshot measurement said {text:?}: no {name}"))
    };
    Ok(SnapshotCost {
        file: field("read")?.saturating_sub(field("start")?),
        decoded: field("decoded")?.saturating_sub(field("read")?),
        snapshot: field("snapshot")?.saturating_sub(field("decoded")?),
        state: field("state")?.saturating_sub(field("snapshot")?),
        endpoints: field("endpoints")?,
    })
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().rev().take(30).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

// ------------------------------------------------------------ report

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn print_report(o: &Options, r: &Report, took: Duration) {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "\n## Results ({profile} build, {cores} cores, whole run {:.0} s)\n",
        took.as_secs_f64()
    );
    println!(
        "Load average (1/5/15 min) at the end, this run's own processes included: {}\n",
        load_average()
    );

    println!(
        "Setup: {} hosts joined in {:.1} s ({:.0} joins/s, {} joins retried after \"aborted\"); {} sessions established and acked in {:.1} s, using {:.1} s of controller CPU.\n",
        o.hosts + WARMUP_HOSTS,
        r.join_seconds,
        (o.hosts + WARMUP_HOSTS) as f64 / r.join_seconds,
        r.join_retries,
        r.hosts,
        r.open_seconds,
        r.ctl_cpu_open
    );

    println!(
        "A new endpoint of `web` reaching {} host streams (target p99 ≤ 1 s):\n",
        r.hosts
    );
    println!(
        "| change | streams reached | from the write: p50 | p99 | max | from the new host's Hello: p50 | p99 | write after Hello | controller CPU | controller VmRSS after |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut all_p99 = Vec::new();
    let mut reached_all = true;
    for (i, c) in r.changes.iter().enumerate() {
        println!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {:.2} s | {} |",
            i + 1,
            c.reached,
            r.hosts,
            ms(c.from_write.p50),
            ms(c.from_write.p99),
            ms(c.from_write.max),
            ms(c.from_hello.p50),
            ms(c.from_hello.p99),
            ms(c.write_after_hello),
            c.ctl_cpu,
            mib(c.ctl_rss as f64)
        );
        all_p99.push(c.from_write.p99);
        reached_all &= c.reached == r.hosts && c.from_write.n == r.hosts;
    }
    let worst_p99 = all_p99.iter().max().copied().unwrap_or_default();
    let median_p99 = Stats::of(all_p99.clone()).p50;

    let per_host = (r.rss_after as f64 - r.rss_before as f64) / r.hosts as f64;
    // After the changes: the first pushes to established sessions grow
    // their buffers once (RSS then stays flat over further changes), and
    // each change added one session.
    let per_host_end =
        (r.rss_end as f64 - r.rss_before as f64) / (r.hosts + r.changes.len()) as f64;
    println!("\nController memory (mesh-controller VmRSS):\n");
    println!(
        "| before the sessions | with {} sessions, first update acked | after the {} changes ({} sessions) | per host, established | per host, after the changes |",
        r.hosts,
        r.changes.len(),
        r.hosts + r.changes.len()
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {:.1} KiB ({:.1} kB) | {:.1} KiB ({:.1} kB) |",
        mib(r.rss_before as f64),
        mib(r.rss_after as f64),
        mib(r.rss_end as f64),
        per_host / 1024.0,
        per_host / 1000.0,
        per_host_end / 1024.0,
        per_host_end / 1000.0
    );
    if let Some(g) = r.sessions_gauge {
        println!("\n(the controller's hostmesh_controller_host_sessions gauge read {g:.0})");
    }

    let m = &r.meshd;
    println!(
        "\nmeshd serving a snapshot from disk, controller unreachable ({} services, {} endpoints; snapshot.pb {}):\n",
        m.services,
        m.endpoints,
        mib(m.snapshot_bytes as f64)
    );
    println!("| meshd | VmRSS | VmHWM (peak) | ready after |");
    println!("|---|---:|---:|---:|");
    println!(
        "| one service, capture off | {} | {} | {} |",
        mib(m.small.rss as f64),
        mib(m.small.hwm as f64),
        ms(m.small.ready_after)
    );
    println!(
        "| big snapshot, capture off | {} | {} | {} |",
        mib(m.big.rss as f64),
        mib(m.big.hwm as f64),
        ms(m.big.ready_after)
    );
    match &m.capture {
        Ok((run, elements)) => println!(
            "| big snapshot, capture on (namespace; {} endpoint elements in nftables) | {} | {} | {} |",
            elements,
            mib(run.rss as f64),
            mib(run.hwm as f64),
            ms(run.ready_after)
        ),
        Err(why) => println!("| big snapshot, capture on | {why} | | |"),
    }

    let c = &m.cost;
    let per_endpoint = |b: u64| b as f64 / c.endpoints.max(1) as f64;
    println!(
        "\nWhere it goes: the same file loaded in a separate process the way meshd loads it, VmRSS growth per step ({} endpoints built):\n",
        c.endpoints
    );
    println!("| step | growth | per endpoint | held by meshd after start |");
    println!("|---|---:|---:|---|");
    println!(
        "| read snapshot.pb | {} | {:.0} B | yes: the entries' bodies are slices of this buffer (written back to disk after each update) |",
        mib(c.file as f64),
        per_endpoint(c.file)
    );
    println!(
        "| decode into a ConfigUpdate (entry names and hashes) | {} | {:.0} B | yes: the entries move into the Snapshot |",
        mib(c.decoded as f64),
        per_endpoint(c.decoded)
    );
    println!(
        "| apply into a Snapshot (the map of entries by name) | {} | {:.0} B | yes |",
        mib(c.snapshot as f64),
        per_endpoint(c.snapshot)
    );
    println!(
        "| build the MeshState (indexes, parsed endpoints) | {} | {:.0} B | yes |",
        mib(c.state as f64),
        per_endpoint(c.state)
    );

    let meshd_worst = match &m.capture {
        Ok((run, _)) => run.rss.max(m.big.rss),
        Err(_) => m.big.rss,
    } as f64;
    println!("\nTargets:\n");
    println!(
        "- fan-out p99 ≤ 1 s: {} — worst change p99 {}, median of the changes' p99 {}{}",
        verdict(worst_p99 <= TARGET_P99 && reached_all),
        ms(worst_p99),
        ms(median_p99),
        if reached_all {
            String::new()
        } else {
            " (some streams never got a change)".to_string()
        }
    );
    println!(
        "- controller memory per connected host ≤ 100 KB: {} — {:.1} kB once established, {:.1} kB after updates flowed (judged on the larger)",
        verdict(per_host.max(per_host_end) <= TARGET_PER_HOST_BYTES),
        per_host / 1000.0,
        per_host_end / 1000.0
    );
    println!(
        "- meshd with {} services / {} endpoints ≤ 80 MB: {} — {} ({:.0} MB)",
        m.services,
        m.endpoints,
        verdict(meshd_worst <= TARGET_MESHD_BYTES),
        mib(meshd_worst),
        meshd_worst / 1e6
    );
    if !r.failures.is_empty() {
        println!("\nErrors ({}):", r.failures.len());
        for f in r.failures.iter().take(10) {
            println!("- {f}");
        }
    }
}

/// The first three fields of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}
