//! `mesh-controller`: parses the command line and runs the controller.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hostmesh_controller::app::Controller;
use hostmesh_controller::config::{ControllerConfig, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(name = "mesh-controller", version, about = "The hostmesh controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the controller API.
    Serve(ServeArgs),
    /// Print the effective configuration (file plus flags) and exit.
    Config(ServeArgs),
}

#[derive(Parser, Clone)]
struct ServeArgs {
    /// Config file (default /etc/hostmesh/controller.toml, if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// embedded:PATH | etcd://H:P[,H:P...] | etcds://H:P[,...]
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[arg(long)]
    trust_domain: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URL hosts use to reach this controller (for join commands).
    #[arg(long)]
    advertise_url: Option<String>,
}

fn load(args: &ServeArgs) -> Result<ControllerConfig, String> {
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let mut config = ControllerConfig::load(&path, required).map_err(|e| e.to_string())?;
    if let Some(s) = &args.store {
        config.store = s.clone();
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(l) = args.metrics_listen {
        config.metrics_listen = l;
    }
    if let Some(t) = &args.trust_domain {
        config.trust_domain = t.clone();
    }
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(u) = &args.advertise_url {
        config.advertise_url = u.clone();
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn init_logging(config: &ControllerConfig) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colour only on a terminal: the journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    hostmesh_api::tls::install_default_provider();
    let cli = Cli::parse();
    let (args, serve) = match cli.command {
        Command::Serve(a) => (a, true),
        Command::Config(a) => (a, false),
    };
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-controller: {e}");
            return ExitCode::from(2);
        }
    };
    if !serve {
        print!("{}", toml::to_string_pretty(&config).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-controller: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let controller = match Controller::start(config, hostmesh_api::clock::system()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mesh-controller: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        controller.wait_ready().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        if let Some(interval) = sd_notify::watchdog_enabled() {
            // Pings only while the runtime serves: a ping task that runs
            // proves the scheduler is alive, and the metrics port answering
            // proves the listeners are.
            let metrics = controller.metrics_addr;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval / 2).await;
                    let alive =
                        tokio::time::timeout(interval / 4, tokio::net::TcpStream::connect(metrics))
                            .await;
                    if matches!(alive, Ok(Ok(_))) {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    } else {
                        tracing::error!(
                            "the metrics port does not answer; not pinging the watchdog"
                        );
                    }
                }
            });
        }
        tracing::info!("ready");
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mesh-controller: installing the SIGTERM handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down");
        controller.shutdown().await;
        ExitCode::SUCCESS
    })
}
