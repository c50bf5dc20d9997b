//! `meshctl`, the operator CLI. Exit code 0 on success; otherwise one line
//! on stderr saying what failed, and a non-zero code.

pub mod client;
pub mod output;

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hostmesh_api::document::{DocumentError, parse_documents};
use hostmesh_api::proto;
use hostmesh_api::proto::operator_client::OperatorClient;
use hostmesh_api::resource::{DEFAULT_NAMESPACE, Kind, Resource};
use tonic::Code;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about = "Operate a hostmesh service mesh")]
pub struct Cli {
    /// Controller URL (default: the one in the credential file).
    #[arg(long, global = true, env = "HOSTMESH_CONTROLLER")]
    pub controller: Option<String>,
    /// Admin credential file (default: /etc/hostmesh/admin.conf).
    #[arg(long, global = true, env = "HOSTMESH_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Give up on a call after this long.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<hostmesh_api::duration::Duration>()
        .map(|d| d.get())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or update resources from YAML (one or many documents).
    Apply {
        /// File to read, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Validate and show what would change, storing nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'o', long = "output")]
        output: Option<Format>,
    },
    /// Show resources.
    Get(GetArgs),
    /// Delete a resource, or every resource in a file.
    Delete {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'n', long = "namespace", default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        file: Option<String>,
    },
    /// Join tokens for hosts.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Every host: address, group, config version, heartbeat, certificate.
    Status {
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: Format,
    },
    /// The certificate authority's roots (rotation).
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// services, workloadgroups, routes, policies or workloads.
    pub kind: String,
    pub name: Option<String>,
    /// Namespace; without it a listing shows every namespace and a single
    /// get looks in "default".
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    #[arg(short = 'o', long = "output", default_value = "table")]
    pub output: Format,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print the `meshd join` command that uses it.
    Create {
        /// NAMESPACE/NAME of the WorkloadGroup the host joins.
        #[arg(long)]
        group: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: Format,
    },
    List {
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: Format,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    List {
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: Format,
    },
    /// Add a new root: trusted at once, issuing only after `activate`.
    AddRoot,
    /// Issue from this root from now on; the previous stays trusted.
    Activate { id: String },
    /// Stop trusting a root (refused while its certificates may be valid).
    RemoveRoot {
        id: String,
        #[arg(long)]
        force: bool,
    },
}

/// An error for the one stderr line.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<client::ClientError> for CliError {
    fn from(e: client::ClientError) -> CliError {
        CliError(e.to_string())
    }
}

fn status_error(url: &str, s: tonic::Status) -> CliError {
    match s.code() {
        Code::Unavailable
            if s.message().contains("transport") || s.message().contains("connect") =>
        {
            CliError(format!(
                "cannot reach the controller at {url}: {}",
                s.message()
            ))
        }
        Code::Unknown if s.message().contains("transport") => CliError(format!(
            "cannot reach the controller at {url}: {}",
            s.message()
        )),
        _ => CliError(s.message().to_string()),
    }
}

fn read_input(file: &str) -> Result<String, CliError> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError(format!("reading standard input: {e}")))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).map_err(|e| CliError(format!("reading {file}: {e}")))
    }
}

fn parse_file(file: &str) -> Result<Vec<Resource>, CliError> {
    let text = read_input(file)?;
    let name = if file == "-" { "<stdin>" } else { file };
    parse_documents(&text).map_err(|e: DocumentError| CliError(format!("{name}: {e}")))
}

struct Ctx {
    client: OperatorClient<Channel>,
    url: String,
    timeout: Duration,
}

impl Ctx {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }
}

/// Runs a parsed command; returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    let credentials = client::find_credentials(cli.credentials.as_deref())?;
    let (channel, url) = client::admin_channel(&credentials, cli.controller.as_deref())?;
    let client = OperatorClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut ctx = Ctx {
        client,
        url,
        timeout: cli.timeout,
    };
    match cli.command {
        Command::Apply {
            file,
            dry_run,
            output,
        } => apply(&mut ctx, &file, dry_run, output).await,
        Command::Get(args) => get(&mut ctx, args).await,
        Command::Delete {
            kind,
            name,
            namespace,
            file,
        } => delete(&mut ctx, kind, name, namespace, file).await,
        Command::Token(t) => token(&mut ctx, t).await,
        Command::Status { output } => status(&mut ctx, output).await,
        Command::Ca(c) => ca(&mut ctx, c).await,
    }
}

async fn apply(
    ctx: &mut Ctx,
    file: &str,
    dry_run: bool,
    output: Option<Format>,
) -> Result<String, CliError> {
    let docs = parse_file(file)?;
    let req = hostmesh_api::document::apply_request(&docs, dry_run);
    let resp = ctx
        .client
        .apply(ctx.request(req))
        .await
        .map_err(|s| status_error(&ctx.url, s))?
        .into_inner();
    let stored: Vec<Resource> = resp
        .results
        .iter()
        .filter_map(|r| hostmesh_api::document::resource_from_json(&r.json).ok())
        .collect();
    Ok(match output {
        Some(Format::Yaml) => hostmesh_api::document::list_to_yaml(&stored),
        Some(Format::Json) => hostmesh_api::document::list_to_json_pretty(&stored) + "\n",
        _ => {
            let suffix = if dry_run { " (dry run)" } else { "" };
            resp.results
                .iter()
                .map(|r| {
                    format!(
                        "{} {}/{} {}{suffix}\n",
                        r.kind, r.namespace, r.name, r.action
                    )
                })
                .collect()
        }
    })
}

fn kind_arg(text: &str) -> Result<Kind, CliError> {
    Kind::from_cli(text).ok_or_else(|| {
        CliError(format!(
            "{text:?} is not a kind: services (svc), workloadgroups (wg), routes, policies or workloads (wl)"
        ))
    })
}

async fn get(ctx: &mut Ctx, args: GetArgs) -> Result<String, CliError> {
    let kind = kind_arg(&args.kind)?;
    match &args.name {
        Some(name) => {
            let ns = args
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
            let req = proto::GetRequest {
                kind: kind.as_str().to_string(),
                namespace: ns,
                name: name.clone(),
            };
            let r = ctx
                .client
                .get(ctx.request(req))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            let resource = output::decode(&r)?;
            Ok(match args.output {
                Format::Yaml => hostmesh_api::document::to_yaml(&resource),
                Format::Json => hostmesh_api::document::to_json_pretty(&resource) + "\n",
                Format::Table => output::table(kind, &[resource]),
            })
        }
        None => {
            let req = proto::ListRequest {
                kind: kind.as_str().to_string(),
                namespace: args.namespace.clone().unwrap_or_default(),
            };
            let resp = ctx
                .client
                .list(ctx.request(req))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            let items: Vec<Resource> = resp
                .items
                .iter()
                .map(output::decode)
                .collect::<Result<_, _>>()?;
            Ok(match args.output {
                Format::Yaml => hostmesh_api::document::list_to_yaml(&items),
                Format::Json => hostmesh_api::document::list_to_json_pretty(&items) + "\n",
                Format::Table if items.is_empty() => format!("No {} found.\n", kind.as_str()),
                Format::Table => output::table(kind, &items),
            })
        }
    }
}

async fn delete(
    ctx: &mut Ctx,
    kind: Option<String>,
    name: Option<String>,
    namespace: String,
    file: Option<String>,
) -> Result<String, CliError> {
    let targets: Vec<(Kind, String, String)> = match (file, kind, name) {
        (Some(f), _, _) => parse_file(&f)?
            .iter()
            .map(|r| {
                (
                    r.kind(),
                    r.metadata().namespace.clone(),
                    r.metadata().name.clone(),
                )
            })
            .collect(),
        (None, Some(k), Some(n)) => vec![(kind_arg(&k)?, namespace, n)],
        _ => return Err(CliError("delete needs KIND NAME, or -f FILE".to_string())),
    };
    let mut out = String::new();
    let mut failures = Vec::new();
    for (kind, ns, name) in targets {
        let req = proto::DeleteRequest {
            kind: kind.as_str().to_string(),
            namespace: ns.clone(),
            name: name.clone(),
        };
        match ctx.client.delete(ctx.request(req)).await {
            Ok(_) => out.push_str(&format!("{kind} {ns}/{name} deleted\n")),
            Err(s) => failures.push(status_error(&ctx.url, s).0),
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        // What was deleted is still worth saying, on stdout.
        print_partial(&out);
        Err(CliError(failures.join("; ")))
    }
}

#[allow(clippy::print_stdout)]
fn print_partial(out: &str) {
    print!("{out}");
}

async fn token(ctx: &mut Ctx, cmd: TokenCommand) -> Result<String, CliError> {
    match cmd {
        TokenCommand::Create {
            group,
            ttl,
            uses,
            description,
            output,
        } => {
            let req = proto::CreateTokenRequest {
                group,
                ttl_seconds: ttl.as_secs(),
                uses,
                description,
            };
            let resp = ctx
                .client
                .create_token(ctx.request(req))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            let controller = if resp.controller_url.is_empty() {
                ctx.url.clone()
            } else {
                resp.controller_url.clone()
            };
            Ok(output::token_created(&resp, &controller, output))
        }
        TokenCommand::List { output } => {
            let resp = ctx
                .client
                .list_tokens(ctx.request(proto::ListTokensRequest {}))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            Ok(output::tokens(&resp.tokens, output))
        }
        TokenCommand::Revoke { id } => {
            ctx.client
                .revoke_token(ctx.request(proto::RevokeTokenRequest { id: id.clone() }))
                .await
                .map_err(|s| status_error(&ctx.url, s))?;
            Ok(format!("token {id} revoked\n"))
        }
    }
}

async fn status(ctx: &mut Ctx, format: Format) -> Result<String, CliError> {
    let resp = ctx
        .client
        .status(ctx.request(proto::StatusRequest {}))
        .await
        .map_err(|s| status_error(&ctx.url, s))?
        .into_inner();
    Ok(output::status(&resp.hosts, format))
}

async fn ca(ctx: &mut Ctx, cmd: CaCommand) -> Result<String, CliError> {
    match cmd {
        CaCommand::List { output } => {
            let resp = ctx
                .client
                .ca_list(ctx.request(proto::CaListRequest {}))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            Ok(output::roots(&resp.roots, output))
        }
        CaCommand::AddRoot => {
            let r = ctx
                .client
                .ca_add_root(ctx.request(proto::CaAddRootRequest {}))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            Ok(format!(
                "root {} added (trusted, not issuing); hosts receive it with their next config push.\n\
                 When every host shows in sync in `meshctl status`, run: meshctl ca activate {}\n",
                r.id, r.id
            ))
        }
        CaCommand::Activate { id } => {
            let r = ctx
                .client
                .ca_activate(ctx.request(proto::CaActivateRequest { id }))
                .await
                .map_err(|s| status_error(&ctx.url, s))?
                .into_inner();
            Ok(format!(
                "root {} now issues; hosts move to it as they renew (at half their certificate lifetime).\n\
                 Copy the re-issued admin.conf from the controller's data directory to operators.\n",
                r.id
            ))
        }
        CaCommand::RemoveRoot { id, force } => {
            ctx.client
                .ca_remove_root(ctx.request(proto::CaRemoveRootRequest {
                    id: id.clone(),
                    force,
                }))
                .await
                .map_err(|s| status_error(&ctx.url, s))?;
            Ok(format!("root {id} removed from the trust bundle\n"))
        }
    }
}
