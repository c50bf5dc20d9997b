//! `meshd`: parses the command line and runs one of join, run, status,
//! cleanup.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hostmesh_meshd::app::{Meshd, Runtimes};
use hostmesh_meshd::config::{DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, MeshdConfig};
use hostmesh_meshd::identity::join::{self, JoinArgs, JoinOutcome};
use hostmesh_meshd::identity::store::{StateDir, lookup_user};

#[derive(Parser)]
#[command(name = "meshd", version, about = "The hostmesh host daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a mesh: make a key, get a certificate with a join token.
    Join {
        /// https://HOST:PORT of the controller.
        #[arg(long)]
        controller: String,
        /// The join token (visible in `ps`; prefer --token-file or
        /// HOSTMESH_JOIN_TOKEN).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the join token; `-` reads it from standard input.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// sha256:HEX of the controller's CA, as `meshctl token create`
        /// prints it.
        #[arg(long)]
        ca_hash: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Join again although this host has joined already.
        #[arg(long)]
        force: bool,
        /// The user meshd runs as; it will own the state files.
        #[arg(long, default_value = "meshd")]
        user: String,
    },
    /// Run the daemon.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Show what the local meshd is doing (from its admin port).
    Status {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the capture table and routes (ExecStopPost; safe after a
    /// crash).
    Cleanup {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load_config(path: Option<&PathBuf>, state_dir: Option<&PathBuf>) -> Result<MeshdConfig, String> {
    let (path, required) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let mut config = MeshdConfig::load(&path, required).map_err(|e| e.to_string())?;
    if let Some(s) = state_dir {
        config.state_dir = s.clone();
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn init_logging(config: &MeshdConfig) {
    // `Targets` (a level per module) rather than EnvFilter: no regex engine
    // in the daemon, which keeps its resident size down. RUST_LOG, read
    // once here, overrides the configured level.
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone());
    let filter: tracing_subscriber::filter::Targets = spec.parse().unwrap_or_else(|e| {
        eprintln!("meshd: log level {spec:?}: {e}; using info");
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    let registry = tracing_subscriber::registry().with(filter);
    if config.log.format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
}

fn main() -> ExitCode {
    hostmesh_api::tls::install_default_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Join {
            controller,
            token,
            token_file,
            ca_hash,
            state_dir,
            force,
            user,
        } => run_join(
            controller, token, token_file, ca_hash, state_dir, force, user,
        ),
        Command::Run { config, state_dir } => run_daemon(config, state_dir),
        Command::Status { admin, json } => run_status(admin, json),
        Command::Cleanup { config } => run_cleanup(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn current_thread() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

#[allow(clippy::too_many_arguments)]
fn run_join(
    controller: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_hash: String,
    state_dir: PathBuf,
    force: bool,
    user: String,
) -> Result<(), String> {
    let token = match (token, token_file) {
        (Some(t), _) => t,
        (None, Some(f)) => {
            let read = if f.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&f)
            };
            let t = read.map_err(|e| format!("reading join token from {}: {e}", f.display()))?;
            if t.trim().is_empty() {
                return Err(format!(
                    "reading join token from {}: file is empty",
                    f.display()
                ));
            }
            t
        }
        (None, None) => match std::env::var("HOSTMESH_JOIN_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t,
            _ => {
                return Err(
                    "no join token: use --token-file FILE, HOSTMESH_JOIN_TOKEN, or --token"
                        .to_string(),
                );
            }
        },
    };
    let owner = lookup_user(&user);
    if owner.is_none() && user != "root" {
        eprintln!(
            "meshd: note: user {user:?} does not exist; the state files stay owned by the current user"
        );
    }
    let args = JoinArgs {
        controller,
        token,
        ca_pin: ca_hash,
        force,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        state: StateDir::new(state_dir.clone(), owner),
    };
    let now = hostmesh_api::clock::unix_seconds(std::time::SystemTime::now());
    let outcome = current_thread()?
        .block_on(join::join(args, now))
        .map_err(|e| e.to_string())?;
    match outcome {
        JoinOutcome::AlreadyJoined(h) => eprintln!(
            "meshd: this host has already joined as {} ({}) in {}; nothing changed (use --force to join again)",
            h.host_id,
            h.spiffe_id,
            state_dir.display()
        ),
        JoinOutcome::Joined(h) => eprintln!(
            "meshd: joined as {} ({}, group {}/{}); start the daemon with: systemctl start meshd",
            h.host_id, h.spiffe_id, h.namespace, h.group
        ),
    }
    Ok(())
}

fn run_daemon(config_path: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<(), String> {
    // First, while this is the only thread: where glibc's large copies are
    // slow, this starts meshd again with them mended (memcpy.rs).
    let memcpy = hostmesh_meshd::memcpy::avoid_slow_copies();
    let config = load_config(config_path.as_ref(), state_dir.as_ref())?;
    init_logging(&config);
    let memcpy = hostmesh_meshd::memcpy::describe(&memcpy);
    tracing::info!("{memcpy}");
    // Data workers are current-thread runtimes: this thread drives the
    // first (accept loops, DNS, connections), and each further worker has
    // its own thread; connections are handed to them in turn (workers.rs).
    // Measured on one worker: 20% less CPU per request and 10% more
    // requests/s on 32 connections than tokio's multi-thread scheduler
    // (docs/BENCHMARKS.md).
    let workers = config.proxy.data_workers();
    let slice = config.proxy.scheduler_slice.get();
    let data = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the data runtime: {e}"))?;
    let worker_threads =
        hostmesh_meshd::workers::WorkerThreads::start(workers.saturating_sub(1), slice)
            .map_err(|e| format!("starting the data worker threads: {e}"))?;
    let worker_handles = worker_threads.handles();
    let worker_handles_for_watchdog = worker_handles.clone();
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the control runtime: {e}"))?;
    let control_handle = control.handle().clone();
    let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
    let control_thread = std::thread::Builder::new()
        .name("meshd-control".into())
        .spawn(move || {
            control.block_on(async {
                let _ = control_stopped.await;
            });
        })
        .map_err(|e| format!("starting the control thread: {e}"))?;
    // This thread is the first data worker; each further one asks for the
    // same slice on its own thread (dataplane/src/sched.rs). Asked for only
    // now, after the control thread has started: threads inherit a custom
    // slice, and control work, which holds up no request, keeps the
    // kernel's.
    let data_slice = match hostmesh_meshd::sched::request_slice(slice) {
        Ok(got) => {
            tracing::info!(slice = %got, "data workers' scheduler slice");
            got.to_string()
        }
        Err(e) => {
            tracing::warn!(error = %e, "the data workers keep the kernel's scheduler slice");
            format!("the kernel's default: {e}")
        }
    };
    let result = data.block_on(async move {
        let meshd = Meshd::start(
            config,
            hostmesh_api::clock::system(),
            Runtimes {
                data: tokio::runtime::Handle::current(),
                workers: worker_handles,
                control: control_handle.clone(),
                data_slice,
                memcpy,
            },
        )
        .await
        .map_err(|e| format!("{e:#}"))?;
        let readiness = meshd.readiness.clone();
        tokio::spawn(async move {
            readiness.wait().await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::info!("ready");
        });
        if let Some(interval) = sd_notify::watchdog_enabled() {
            tokio::spawn(watchdog(
                interval,
                control_handle,
                worker_handles_for_watchdog,
                meshd.liveness.clone(),
            ));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        meshd.shutdown().await;
        tracing::info!("stopped");
        Ok::<(), String>(())
    });
    worker_threads.stop();
    let _ = stop_control.send(());
    let _ = control_thread.join();
    result
}

/// Pings systemd's watchdog only while the proxy works: this task runs on
/// the first data worker, every accept loop answered the last liveness
/// question (it is still being polled: `liveness.rs`), and a round trip
/// through the control runtime and through every other data worker comes
/// back.
async fn watchdog(
    interval: Duration,
    control: tokio::runtime::Handle,
    workers: Vec<tokio::runtime::Handle>,
    liveness: hostmesh_meshd::liveness::Liveness,
) {
    let every = interval / 2;
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = liveness.check_and_ask() {
            tracing::error!(problem = %e, "the proxy is not running; not pinging the watchdog");
            continue;
        }
        // A round trip through the control runtime and every other data
        // worker (a wedged worker would strand the connections it holds).
        let probes = std::iter::once(("the control runtime", &control))
            .chain(workers.iter().map(|w| ("a data worker", w)))
            .map(|(name, rt)| async move {
                tokio::time::timeout(every, rt.spawn(async {}))
                    .await
                    .map_err(|_| name)
            });
        match futures::future::try_join_all(probes).await {
            Ok(_) => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Err(name) => {
                tracing::error!("{name} did not answer; not pinging the watchdog");
            }
        }
    }
}

/// The `tunnels:` line of `meshd status`: per kind of tunnel, the peers,
/// connections and streams in `/status`'s list.
fn tunnels_line(tunnels: &[serde_json::Value]) -> String {
    let mut kinds: std::collections::BTreeMap<&str, (usize, u64, u64)> = Default::default();
    for t in tunnels {
        let k = kinds
            .entry(t["kind"].as_str().unwrap_or("unknown"))
            .or_default();
        k.0 += 1;
        k.1 += t["connections"].as_u64().unwrap_or(0);
        k.2 += t["streams"].as_u64().unwrap_or(0);
    }
    if kinds.is_empty() {
        return "none".to_string();
    }
    kinds
        .iter()
        .map(|(kind, (peers, conns, streams))| {
            format!(
                "{kind}: {}, {}, {}",
                counted(*peers as u64, "peer"),
                counted(*conns, "connection"),
                counted(*streams, "stream")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// "1 peer", "2 peers".
fn counted(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn run_status(admin: std::net::SocketAddr, json: bool) -> Result<(), String> {
    let body = current_thread()?.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(admin),
        )
        .await
        .map_err(|_| format!("meshd's admin port {admin} does not answer"))?
        .map_err(|e| format!("meshd's admin port {admin}: {e} (is meshd running?)"))?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .map_err(|_| "meshd's admin port did not finish answering".to_string())?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok::<String, String>(body)
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("unreadable status from meshd: {e}"))?;
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&v).unwrap_or_default();
    } else {
        let s = |p: &str| {
            v.pointer(p)
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .unwrap_or_default()
        };
        out.push_str(&format!(
            "host:        {} ({})\n",
            s("/host/hostId"),
            s("/identity")
        ));
        out.push_str(&format!("ready:       {} {}\n", s("/ready"), s("/pending")));
        out.push_str(&format!(
            "controller:  {} connected={} {}\n",
            s("/controller/url"),
            s("/controller/connected"),
            s("/controller/lastError")
        ));
        out.push_str(&format!(
            "config:      version {} ({} services)\n",
            s("/config/version"),
            s("/config/services")
        ));
        if s("/controller/rejectedVersion") != "0" {
            out.push_str(&format!(
                "rejected:    version {}: {}\n",
                s("/controller/rejectedVersion"),
                s("/controller/rejectReason")
            ));
        }
        out.push_str(&format!(
            "certificate: valid until {}, renews at {}\n",
            s("/certificate/notAfter"),
            s("/certificate/renewAt")
        ));
        out.push_str("captured:\n");
        if let Some(lines) = v.pointer("/captured").and_then(|c| c.as_array()) {
            for l in lines {
                out.push_str(&format!("  {}\n", l.as_str().unwrap_or_default()));
            }
        }
        if let Some(tunnels) = v.pointer("/tunnels").and_then(|c| c.as_array()) {
            out.push_str(&format!("tunnels:     {}\n", tunnels_line(tunnels)));
        }
        if v.pointer("/sockmap/state").is_some() {
            out.push_str(&format!("sockmap:     {}", s("/sockmap/state")));
            if v.pointer("/sockmap/connections/clientRedirected").is_some() {
                out.push_str(&format!(
                    " (redirected: {} client, {} server; TCP: {} client, {} server; moved back to TCP: {}, of which plain TCP sockets again: {} app's, {} meshd's)",
                    s("/sockmap/connections/clientRedirected"),
                    s("/sockmap/connections/serverRedirected"),
                    s("/sockmap/connections/clientTcp"),
                    s("/sockmap/connections/serverTcp"),
                    s("/sockmap/connections/fellBack"),
                    s("/sockmap/connections/takenOut"),
                    s("/sockmap/connections/meshdOut")
                ));
            }
            out.push('\n');
        }
        if v.pointer("/transport/default").is_some() {
            let setting = |p: &str| match v.pointer(p).and_then(serde_json::Value::as_str) {
                Some(t) => t.to_string(),
                None => "unset".to_string(),
            };
            out.push_str(&format!(
                "transport:   {} (this host: {}, the mesh: {})",
                s("/transport/default"),
                setting("/transport/host"),
                setting("/transport/mesh")
            ));
            let peers = |p: &str| -> Vec<String> {
                v.pointer(p)
                    .and_then(serde_json::Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|p| {
                                format!(
                                    "{} {}",
                                    p["network"].as_str().unwrap_or_default(),
                                    p["transport"].as_str().unwrap_or_default()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let host_peers = peers("/transport/peers");
            if !host_peers.is_empty() {
                out.push_str(&format!("; to peers in {}", host_peers.join(", ")));
            }
            let mesh_peers = peers("/transport/meshPeers");
            if !mesh_peers.is_empty() {
                let applies = v
                    .pointer("/transport/meshPeersApply")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                out.push_str(&format!(
                    "; the mesh's rules for this host: to peers in {}{}",
                    mesh_peers.join(", "),
                    if applies {
                        ""
                    } else {
                        " (not used: this host sets its own transport)"
                    }
                ));
            }
            out.push('\n');
            let unanswered = v
                .pointer("/transport/quicUnanswered")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            if unanswered > 0 {
                let over_tcp: Vec<&str> = v
                    .pointer("/transport/quicOverTcp")
                    .and_then(serde_json::Value::as_array)
                    .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
                    .unwrap_or_default();
                out.push_str(&format!(
                    "quic:        unanswered {} since start; peers over TCP for now: {}\n",
                    counted(unanswered, "time"),
                    if over_tcp.is_empty() {
                        "none".to_string()
                    } else {
                        over_tcp.join(", ")
                    }
                ));
            }
        }
        if v.pointer("/schedulerSlice").is_some() {
            out.push_str(&format!(
                "scheduler:   data workers' slice {}\n",
                s("/schedulerSlice")
            ));
        }
        if v.pointer("/memcpy").is_some() {
            out.push_str(&format!("copies:      {}\n", s("/memcpy")));
        }
    }
    print_out(&out);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_out(s: &str) {
    println!("{}", s.trim_end());
}

fn run_cleanup(config_path: Option<PathBuf>) -> Result<(), String> {
    let config = load_config(config_path.as_ref(), None)?;
    current_thread()?.block_on(async {
        let removed = hostmesh_meshd::capture::remove(&config.capture.table)
            .await
            .map_err(|e| e.to_string())?;
        let routes = hostmesh_meshd::capture::remove_vip_routes()
            .await
            .map_err(|e| e.to_string())?;
        eprintln!(
            "meshd: cleanup: {} table inet {}, removed {routes} VIP route(s)",
            if removed { "removed" } else { "no" },
            config.capture.table
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn the_tunnels_line_sums_each_kind() {
        assert_eq!(super::tunnels_line(&[]), "none");
        let tunnels = [
            json!({"peer": "10.0.0.1:15008", "kind": "dedicated", "connections": 3, "streams": 1}),
            json!({"peer": "10.0.0.2:15008", "kind": "dedicated", "connections": 2, "streams": 0}),
            json!({"peer": "10.0.0.3:15008", "kind": "quic", "connections": 1, "streams": 7}),
        ];
        assert_eq!(
            super::tunnels_line(&tunnels),
            "dedicated: 2 peers, 5 connections, 1 stream; quic: 1 peer, 1 connection, 7 streams"
        );
    }
}
