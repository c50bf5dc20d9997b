//! `bench-registry`: how fast the controller stores applies and tells
//! watchers about them, on the embedded store and on etcd, in one run
//! (issue 2).
//!
//! For each backend — the embedded redb store in a temporary directory,
//! and a real single-member etcd started for the run — it measures:
//!
//! - **fsync**: a 4 KiB write plus `fdatasync` in the directory the store
//!   lives in, because both backends wait for one per commit (redb
//!   `Durability::Immediate` on every transaction; etcd on its WAL per raft
//!   batch) and that bounds everything below.
//! - **Raw store**: `Store::put` latency and put → watch-event latency
//!   straight on the backend, no controller, to separate the store's cost
//!   from the controller's.
//! - **Applies per second** through the controller's Operator API with the
//!   admin credential (mTLS, as `meshctl apply` does): single-Service
//!   applies, each changing a label so that every one is a real write
//!   ("configured"). First one client in sequence, then 16 clients at once,
//!   each on its own TLS connection and updating its own Service (so they
//!   never conflict on a compare-and-swap), for a few seconds each.
//! - **Watch latency**: with an `Operator.Watch` stream open, the time from
//!   sending an apply to receiving its `WatchEvent`, over ~500 applies made
//!   one after another.
//!
//! The controller runs in this process (`Controller::start` on port 0) on a
//! two-worker runtime, so the clients' TLS and protobuf work shares the
//! machine's cores with it; etcd is its own process. Everything listens on
//! loopback and is removed at the end, also on error or Ctrl-C.
//!
//! Run: `cargo run --release -p hostmesh-tests --bin bench-registry`
//! (`make bench-registry`). Options: `--seconds S` per throughput run
//! (default 5), `--samples N` per latency series (default 500),
//! `--clients N` for the concurrent run (default 16), `--only
//! embedded|etcd`. It prints Markdown tables and exits non-zero only when
//! something fails (an apply refused, a watch that ends or stays silent),
//! never because a number is slow.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use futures::StreamExt;
use hostmesh_api::proto::operator_client::OperatorClient;
use hostmesh_api::proto::{self, ApplyRequest, WatchRequest};
use hostmesh_controller::app::Controller;
use hostmesh_controller::config::ControllerConfig;
use hostmesh_registry::SharedStore;
use hostmesh_registry::embedded::EmbeddedStore;
use hostmesh_tests::EtcdCluster;
use tonic::transport::Channel;

/// Latency samples thrown away first (connections, caches, the watch
/// being registered).
const WARMUP: usize = 20;
/// How long one latency sample may take before the run fails.
const SAMPLE_PATIENCE: Duration = Duration::from_secs(10);
const FSYNC_SAMPLES: usize = 200;
const NAMESPACE: &str = "bench";
const WATCHED: &str = "watched";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Embedded,
    Etcd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Etcd => "etcd",
        }
    }
}

struct Options {
    seconds: Duration,
    samples: usize,
    clients: usize,
    backends: Vec<Backend>,
}

const USAGE: &str =
    "usage: bench-registry [--seconds S] [--samples N] [--clients N] [--only embedded|etcd]";

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        seconds: Duration::from_secs(5),
        samples: 500,
        clients: 16,
        backends: vec![Backend::Embedded, Backend::Etcd],
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--seconds" => {
                let v = value()?;
                let s: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && *s <= 600.0)
                    .ok_or_else(|| format!("--seconds {v:?}: expected a number in (0, 600]"))?;
                o.seconds = Duration::from_secs_f64(s);
            }
            "--samples" => {
                let v = value()?;
                o.samples = v
                    .parse()
                    .ok()
                    .filter(|n| (10..=100_000).contains(n))
                    .ok_or_else(|| format!("--samples {v:?}: expected 10..=100000"))?;
            }
            "--clients" => {
                let v = value()?;
                o.clients = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| format!("--clients {v:?}: expected 1..=256"))?;
            }
            "--only" => {
                let v = value()?;
                o.backends = match v.as_str() {
                    "embedded" => vec![Backend::Embedded],
                    "etcd" => vec![Backend::Etcd],
                    _ => return Err(format!("--only {v:?}: expected embedded or etcd")),
                };
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-registry: {e}");
            return ExitCode::from(2);
        }
    };
    hostmesh_api::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-registry: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // Dropping `run` on Ctrl-C drops its guards: the controller's
        // tasks, etcd and the temporary directories.
        tokio::select! {
            r = run(&options) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // The in-process controller leaves tasks behind; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-registry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// p50, p99 and max of a series.
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
        // Nearest rank.
        let rank = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[i - 1]
        };
        if samples.is_empty() {
            return Stats {
                p50: Duration::ZERO,
                p99: Duration::ZERO,
                max: Duration::ZERO,
                n: 0,
            };
        }
        Stats {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
            n: samples.len(),
        }
    }

    fn p50_p99(&self) -> String {
        format!("{} / {}", ms(self.p50), ms(self.p99))
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

struct Throughput {
    applies: u64,
    elapsed: Duration,
    latency: Stats,
}

impl Throughput {
    fn per_second(&self) -> f64 {
        self.applies as f64 / self.elapsed.as_secs_f64()
    }
}

struct BackendResult {
    backend: Backend,
    fsync: Stats,
    raw_put: Stats,
    raw_watch: Stats,
    sequential: Throughput,
    concurrent: Throughput,
    watch_ack: Stats,
    watch_event: Stats,
}

async fn run(o: &Options) -> anyhow::Result<()> {
    println!(
        "bench-registry: {} s per throughput run, {} latency samples, {} concurrent clients; {} cores",
        o.seconds.as_secs_f64(),
        o.samples,
        o.clients,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut results = Vec::new();
    for &backend in &o.backends {
        println!("\n== {}", backend.name());
        results.push(bench_backend(backend, o).await?);
    }
    print_report(o, &results);
    Ok(())
}

async fn bench_backend(backend: Backend, o: &Options) -> anyhow::Result<BackendResult> {
    let dir = tempfile::Builder::new()
        .prefix("hostmesh-bench-registry-")
        .tempdir()
        .context("creating a temporary directory")?;
    // etcd keeps its data in its own temporary directory; the fsync probe
    // runs where that directory is (both are under the same temp root).
    let etcd = match backend {
        Backend::Embedded => None,
        Backend::Etcd => {
            println!("starting a 1-member etcd");
            Some(EtcdCluster::start(1).await)
        }
    };

    println!("fsync probe ({FSYNC_SAMPLES} x 4 KiB write + fdatasync)");
    let probe = dir.path().join("fsync-probe");
    let fsync = tokio::task::spawn_blocking(move || {
        // Write back what earlier work left dirty (a build just before the
        // run, the previous backend), so the probe times this disk's flush
        // rather than someone else's writeback.
        let _ = std::process::Command::new("sync").status();
        fsync_probe(&probe)
    })
    .await
    .context("the fsync probe panicked")??;

    println!("raw store: {} puts with a watch open", o.samples);
    let (raw_put, raw_watch) = {
        let store: SharedStore = match &etcd {
            None => {
                let path = dir.path().join("raw.redb");
                Arc::new(
                    EmbeddedStore::open(&path)
                        .with_context(|| format!("opening {}", path.display()))?,
                )
            }
            Some(cluster) => cluster.shared_store().await,
        };
        raw_store(&store, o.samples)
            .await
            .with_context(|| format!("raw {} store", backend.name()))?
    };

    let store_url = match &etcd {
        None => format!("embedded:{}", dir.path().join("state.redb").display()),
        Some(cluster) => format!("etcd://{}", cluster.endpoint(0)),
    };
    let config = ControllerConfig {
        store: store_url,
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        metrics_listen: "127.0.0.1:0".parse().expect("a socket address"),
        data_dir: dir.path().join("ctl"),
        ..ControllerConfig::default()
    };
    println!("starting the controller in-process");
    let ctl = Controller::start(config, hostmesh_api::clock::system())
        .await
        .context("starting the controller")?;
    tokio::time::timeout(Duration::from_secs(30), ctl.wait_ready())
        .await
        .map_err(|_| anyhow!("the controller did not load its state within 30s"))?;
    let result = bench_controller(&dir.path().join("ctl/admin.conf"), o).await;
    ctl.shutdown().await;
    let (sequential, concurrent, watch_ack, watch_event) = result?;
    drop(etcd);
    Ok(BackendResult {
        backend,
        fsync,
        raw_put,
        raw_watch,
        sequential,
        concurrent,
        watch_ack,
        watch_event,
    })
}

/// Write 4 KiB at the start of a file and `fdatasync`, repeatedly.
fn fsync_probe(path: &Path) -> anyhow::Result<Stats> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::with_capacity(FSYNC_SAMPLES);
    for i in 0..FSYNC_SAMPLES + 10 {
        let t0 = Instant::now();
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&block))
            .and_then(|_| file.sync_data())
            .with_context(|| format!("writing and syncing {}", path.display()))?;
        if i >= 10 {
            samples.push(t0.elapsed());
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(Stats::of(samples))
}

/// Put latency and put → watch-event latency on a bare store.
async fn raw_store(store: &SharedStore, samples: usize) -> anyhow::Result<(Stats, Stats)> {
    let prefix = "/bench-raw/";
    let from = store.current_revision().await? + 1;
    let mut watch = store.watch(prefix, from).await?;
    let mut put_lat = Vec::with_capacity(samples);
    let mut event_lat = Vec::with_capacity(samples);
    for i in 0..samples + WARMUP {
        let key = format!("{prefix}k{}", i % 16);
        let value = Bytes::from(format!("value-{i}"));
        let t0 = Instant::now();
        let put = async {
            let r = store.put(&key, value, None).await;
            (r, t0.elapsed())
        };
        let event = async {
            loop {
                match watch.next().await {
                    Some(Ok(batch)) if batch.events.iter().any(|e| e.kv.key == key) => {
                        return Ok(t0.elapsed());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(anyhow!("the watch failed: {e}")),
                    None => return Err(anyhow!("the watch ended")),
                }
            }
        };
        let ((put, put_took), event) =
            tokio::join!(put, tokio::time::timeout(SAMPLE_PATIENCE, event));
        let outcome = put.with_context(|| format!("putting {key}"))?;
        if !outcome.is_committed() {
            bail!("an unconditional put of {key} did not commit: {outcome:?}");
        }
        let event_took = event.map_err(|_| {
            anyhow!("no watch event for {key} within {SAMPLE_PATIENCE:?} after its put")
        })??;
        if i >= WARMUP {
            put_lat.push(put_took);
            event_lat.push(event_took);
        }
    }
    Ok((Stats::of(put_lat), Stats::of(event_lat)))
}

fn service_json(name: &str, generation: u64) -> String {
    serde_json::json!({
        "apiVersion": "hostmesh/v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"generation": generation.to_string()},
        },
        "spec": {
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}],
        },
    })
    .to_string()
}

/// Applies one Service; fails unless it was really written.
async fn apply_service(
    client: &mut OperatorClient<Channel>,
    name: &str,
    generation: u64,
) -> anyhow::Result<i64> {
    let response = client
        .apply(ApplyRequest {
            resources: vec![proto::Resource {
                json: service_json(name, generation),
                ..Default::default()
            }],
            dry_run: false,
        })
        .await
        .map_err(|s| {
            anyhow!(
                "applying Service {NAMESPACE}/{name}: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    match response.results.first().map(|r| r.action.as_str()) {
        Some("created" | "configured") => Ok(response.revision),
        other => bail!("applying Service {NAMESPACE}/{name} did not write it (action {other:?})"),
    }
}

fn admin_client(admin_conf: &Path) -> anyhow::Result<OperatorClient<Channel>> {
    let (channel, _) = hostmesh_controller::cli::client::admin_channel(admin_conf, None)
        .with_context(|| format!("using the admin credential {}", admin_conf.display()))?;
    Ok(OperatorClient::new(channel))
}

/// Every apply gets a label value never used before, so none is a no-op.
static GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

async fn apply_for(
    mut client: OperatorClient<Channel>,
    service: String,
    until: Instant,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let t0 = Instant::now();
        apply_service(&mut client, &service, next_generation()).await?;
        latencies.push(t0.elapsed());
    }
    Ok((latencies.len() as u64, latencies))
}

async fn bench_controller(
    admin_conf: &Path,
    o: &Options,
) -> anyhow::Result<(Throughput, Throughput, Stats, Stats)> {
    let services: Vec<String> = (0..o.clients).map(|i| format!("svc-{i}")).collect();
    // Create everything once, and warm the connection up.
    let mut client = admin_client(admin_conf)?;
    for name in services.iter().chain(std::iter::once(&WATCHED.to_string())) {
        apply_service(&mut client, name, next_generation()).await?;
    }
    for _ in 0..WARMUP {
        apply_service(&mut client, &services[0], next_generation()).await?;
    }

    println!("applies, 1 client, {:.0} s", o.seconds.as_secs_f64().ceil());
    let t0 = Instant::now();
    let (applies, latencies) =
        apply_for(client.clone(), services[0].clone(), t0 + o.seconds).await?;
    let sequential = Throughput {
        applies,
        elapsed: t0.elapsed(),
        latency: Stats::of(latencies),
    };

    println!(
        "applies, {} clients on their own connections, {:.0} s",
        o.clients,
        o.seconds.as_secs_f64().ceil()
    );
    let mut clients = Vec::with_capacity(o.clients);
    for name in &services {
        let mut c = admin_client(admin_conf)?;
        // Connect (TLS handshake) before the clock starts.
        apply_service(&mut c, name, next_generation()).await?;
        clients.push((c, name.clone()));
    }
    let t0 = Instant::now();
    let until = t0 + o.seconds;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(c, name)| tokio::spawn(apply_for(c, name, until)))
        .collect();
    let mut applies = 0;
    let mut latencies = Vec::new();
    for t in tasks {
        let (n, mut l) = t.await.context("an apply client panicked")??;
        applies += n;
        latencies.append(&mut l);
    }
    let concurrent = Throughput {
        applies,
        elapsed: t0.elapsed(),
        latency: Stats::of(latencies),
    };

    println!("watch latency, {} applies", o.samples);
    let (watch_ack, watch_event) = watch_latency(admin_conf, o.samples).await?;
    Ok((sequential, concurrent, watch_ack, watch_event))
}

/// With a Watch stream open, applies `watched` again and again; for each,
/// the time until the apply was answered and until its event arrived.
async fn watch_latency(admin_conf: &Path, samples: usize) -> anyhow::Result<(Stats, Stats)> {
    let mut watcher = admin_client(admin_conf)?;
    let mut applier = admin_client(admin_conf)?;
    let mut stream = watcher
        .watch(WatchRequest {
            kind: "services".to_string(),
            namespace: NAMESPACE.to_string(),
            from_revision: 0,
        })
        .await
        .map_err(|s| anyhow!("opening the watch: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut acks = Vec::with_capacity(samples);
    let mut events = Vec::with_capacity(samples);
    for i in 0..samples + WARMUP {
        let generation = next_generation();
        let want = generation.to_string();
        let t0 = Instant::now();
        let apply = async {
            let r = apply_service(&mut applier, WATCHED, generation).await;
            (r, t0.elapsed())
        };
        let event = async {
            loop {
                let ev = stream
                    .message()
                    .await
                    .map_err(|s| anyhow!("the watch failed: {:?}: {}", s.code(), s.message()))?
                    .ok_or_else(|| anyhow!("the controller ended the watch"))?;
                let Some(r) = ev.resource else { continue };
                if r.name != WATCHED {
                    continue;
                }
                let doc: serde_json::Value = serde_json::from_str(&r.json).with_context(|| {
                    format!("the watch event's resource is not JSON: {}", r.json)
                })?;
                if doc["metadata"]["labels"]["generation"].as_str() == Some(want.as_str()) {
                    return Ok::<_, anyhow::Error>(t0.elapsed());
                }
            }
        };
        let ((applied, ack_took), event) =
            tokio::join!(apply, tokio::time::timeout(SAMPLE_PATIENCE, event));
        applied?;
        let event_took = event.map_err(|_| {
            anyhow!("no watch event within {SAMPLE_PATIENCE:?} of applying generation {generation}")
        })??;
        if i >= WARMUP {
            acks.push(ack_took);
            events.push(event_took);
        }
    }
    Ok((Stats::of(acks), Stats::of(events)))
}

fn print_report(o: &Options, results: &[BackendResult]) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("\n## Results ({profile} build, {cores} cores)\n");
    println!(
        "Load average (1/5/15 min) at the end, this run's own processes included: {}\n",
        load_average()
    );
    println!(
        "Through the controller (Operator API, admin mTLS; single-Service applies, each a real write):\n"
    );
    println!(
        "| backend | applies/s, 1 client | apply p50 / p99, 1 client | applies/s, {n} clients | apply p50 / p99, {n} clients | apply answered p50 / p99 | apply → WatchEvent p50 / p99 (max) |",
        n = o.clients
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} ({}) |",
            r.backend.name(),
            r.sequential.per_second(),
            r.sequential.latency.p50_p99(),
            r.concurrent.per_second(),
            r.concurrent.latency.p50_p99(),
            r.watch_ack.p50_p99(),
            r.watch_event.p50_p99(),
            ms(r.watch_event.max),
        );
    }
    println!("\nThe store alone (no controller), and this disk:\n");
    println!(
        "| backend | put p50 / p99 | put → watch event p50 / p99 (max) | 4 KiB write + fdatasync p50 / p99 |"
    );
    println!("|---|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {} | {} ({}) | {} |",
            r.backend.name(),
            r.raw_put.p50_p99(),
            r.raw_watch.p50_p99(),
            ms(r.raw_watch.max),
            r.fsync.p50_p99(),
        );
    }
    println!("\nSamples:");
    for r in results {
        println!(
            "- {}: {} + {} applies in {:.1} + {:.1} s; {} watch samples; {} raw puts; {} fsyncs",
            r.backend.name(),
            r.sequential.applies,
            r.concurrent.applies,
            r.sequential.elapsed.as_secs_f64(),
            r.concurrent.elapsed.as_secs_f64(),
            r.watch_event.n,
            r.raw_put.n,
            r.fsync.n,
        );
    }
}

/// The first three fields of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}
