//! Test support (feature `testing`): real etcd processes and an embedded
//! store in a temporary directory, for this crate's tests and for other
//! crates' integration tests.
//!
//! [`EtcdCluster`] starts `etcd` members on free loopback ports, each with
//! its own data directory, waits until every member answers (polling with
//! a bounded patience, never a fixed sleep), can SIGKILL and restart a
//! member, and kills every process when dropped, also when the test
//! panics. Everything here panics on failure: it is test code, and a test
//! that cannot get its etcd must fail loudly, never pass by skipping.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use tempfile::TempDir;

use crate::SharedStore;
use crate::embedded::EmbeddedStore;
use crate::etcd::{EtcdConfig, EtcdStore, EtcdTls};

/// How long a (re)started member may take to answer.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// A temporary embedded store.
pub struct EmbeddedFixture {
    pub store: SharedStore,
    pub path: PathBuf,
    /// Removed on drop (after the store, which is declared first).
    pub dir: TempDir,
}

impl EmbeddedFixture {
    /// A fresh store in a new temporary directory. Needs a Tokio runtime.
    pub fn new() -> EmbeddedFixture {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let path = dir.path().join("store.redb");
        let store = EmbeddedStore::open(&path)
            .unwrap_or_else(|e| panic!("opening embedded store {}: {e}", path.display()));
        EmbeddedFixture {
            store: Arc::new(store),
            path,
            dir,
        }
    }
}

impl Default for EmbeddedFixture {
    fn default() -> EmbeddedFixture {
        EmbeddedFixture::new()
    }
}

/// TLS on the client port of test etcd members (peers stay plain HTTP).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The CA that signed `cert_file` (and the client certificates).
    pub ca_file: PathBuf,
    /// The members' certificate and key; valid for 127.0.0.1.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, members require client certificates signed by `ca_file`
    /// (`--client-cert-auth`) and the harness uses this one (cert, key).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ServerTls {
    /// What a client of these members needs.
    pub fn client_tls(&self) -> EtcdTls {
        EtcdTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.client_cert.as_ref().map(|(cert, _)| cert.clone()),
            key_file: self.client_cert.as_ref().map(|(_, key)| key.clone()),
        }
    }
}

struct Member {
    name: String,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The end of this member's etcd output.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(8192);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }
}

/// Real etcd processes forming one cluster on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<ServerTls>,
}

impl EtcdCluster {
    /// Starts `members` etcd processes as one new cluster and waits until
    /// each answers a linearizable read.
    pub async fn start(members: usize) -> EtcdCluster {
        EtcdCluster::start_with(members, None).await
    }

    /// Like [`EtcdCluster::start`], with TLS on the client port.
    pub async fn start_with_tls(members: usize, tls: ServerTls) -> EtcdCluster {
        EtcdCluster::start_with(members, Some(tls)).await
    }

    async fn start_with(members: usize, tls: Option<ServerTls>) -> EtcdCluster {
        assert!(members > 0, "an etcd cluster needs at least one member");
        // Hold every listener until all ports are chosen, so that no two
        // are the same; etcd binds them right after.
        let listeners: Vec<TcpListener> = (0..members * 2)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| {
                l.local_addr()
                    .expect("local address of a bound socket")
                    .port()
            })
            .collect();
        drop(listeners);
        let token = format!("hostmesh-test-{:x}", rand::random::<u64>());
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                dir: tempfile::Builder::new()
                    .prefix("hostmesh-etcd-")
                    .tempdir()
                    .expect("creating a temporary directory"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            tls,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        let all: Vec<usize> = (0..cluster.members.len()).collect();
        cluster.wait_ready(&all).await;
        cluster
    }

    /// `127.0.0.1:PORT` of every member, dead or alive.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    pub fn endpoint(&self, member: usize) -> String {
        self.members[member].endpoint()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// What a client needs for TLS to these members (None: plain HTTP).
    pub fn client_tls(&self) -> Option<EtcdTls> {
        self.tls.as_ref().map(ServerTls::client_tls)
    }

    /// An [`EtcdStore`] over every member.
    pub async fn store(&self) -> EtcdStore {
        let mut config = EtcdConfig::new(self.endpoints());
        config.connect_timeout = Duration::from_secs(10);
        config.tls = self.client_tls();
        EtcdStore::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test etcd cluster: {e}"))
    }

    /// Same as [`EtcdCluster::store`], shared.
    pub async fn shared_store(&self) -> SharedStore {
        Arc::new(self.store().await)
    }

    /// SIGKILLs a member and waits for it to be gone.
    pub fn kill(&mut self, member: usize) {
        let m = &mut self.members[member];
        let mut child = m
            .child
            .take()
            .unwrap_or_else(|| panic!("etcd member {} is not running", m.name));
        child
            .kill()
            .unwrap_or_else(|e| panic!("killing etcd member {}: {e}", m.name));
        let _ = child.wait();
        tracing::info!(member = %m.name, "killed etcd member");
    }

    /// Starts a killed member again with its data directory and ports, and
    /// waits until it answers.
    pub async fn restart(&mut self, member: usize) {
        assert!(
            self.members[member].child.is_none(),
            "etcd member {} is still running",
            self.members[member].name
        );
        self.spawn(member);
        self.wait_ready(&[member]).await;
    }

    /// The member that is the raft leader now, if the live members agree
    /// on one.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let Ok(mut client) = member_client(&m.endpoint(), self.tls.as_ref()).await else {
                continue;
            };
            if let Ok(status) = client.status().await {
                let me = status.header().map(|h| h.member_id());
                if me.is_some() && me == Some(status.leader()) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// The output etcd wrote so far (its end), for diagnostics.
    pub fn log(&self, member: usize) -> String {
        self.members[member].log_tail()
    }

    fn spawn(&mut self, i: usize) {
        let binary = etcd_binary();
        let m = &mut self.members[i];
        let log = File::create(m.log_path())
            .unwrap_or_else(|e| panic!("creating {}: {e}", m.log_path().display()));
        let log_err = log.try_clone().expect("duplicating a file handle");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let data_dir = m.dir.path().join("data");
        let mut command = Command::new(binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert_file)
                .arg("--key-file")
                .arg(&tls.key_file)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_file);
            if tls.client_cert.is_some() {
                command.arg("--client-cert-auth");
            }
        }
        let child = command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--quota-backend-bytes", &(256u64 << 20).to_string()])
            .args([
                "--logger",
                "zap",
                "--log-level",
                "warn",
                "--log-outputs",
                "stderr",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        tracing::info!(member = %m.name, endpoint = %m.endpoint(), pid = child.id(), "started etcd member");
        m.child = Some(child);
    }

    /// Waits until each of `members` answers a linearizable read (so it has
    /// a leader and a quorum), failing with their output if one exits or
    /// the patience runs out.
    async fn wait_ready(&mut self, members: &[usize]) {
        let deadline = Instant::now() + STARTUP_PATIENCE;
        for &i in members {
            loop {
                let m = &mut self.members[i];
                if let Some(child) = m.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    m.child = None;
                    panic!(
                        "etcd member {} exited during startup ({status}); its output:\n{}",
                        m.name,
                        m.log_tail()
                    );
                }
                match probe(&m.endpoint(), self.tls.as_ref()).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => panic!(
                        "etcd member {} did not become ready within {STARTUP_PATIENCE:?} (last error: {e}); its output:\n{}",
                        m.name,
                        m.log_tail()
                    ),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

async fn member_client(endpoint: &str, tls: Option<&ServerTls>) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    let url = match tls {
        None => format!("http://{endpoint}"),
        Some(tls) => {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
            };
            let mut config =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
            if let Some((cert, key)) = &tls.client_cert {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(config);
            format!("https://{endpoint}")
        }
    };
    Client::connect([url], Some(options))
        .await
        .map_err(|e| e.to_string())
}

async fn probe(endpoint: &str, tls: Option<&ServerTls>) -> Result<(), String> {
    let mut client = member_client(endpoint, tls).await?;
    client
        .get("\0", Some(GetOptions::new().with_count_only()))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The etcd binary: from PATH, or installed once with apt-get (the test
/// machines run as root); panics if neither works.
pub fn etcd_binary() -> &'static Path {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BINARY.get_or_init(|| {
        if let Some(path) = find_on_path("etcd") {
            return Ok(path);
        }
        tracing::warn!("etcd is not on PATH; trying `apt-get install -y etcd-server`");
        let installed = Command::new("apt-get")
            .args(["install", "-y", "etcd-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output();
        match installed {
            Ok(out) if out.status.success() => find_on_path("etcd").ok_or_else(|| {
                "apt-get installed etcd-server but etcd is still not on PATH".to_string()
            }),
            Ok(out) => Err(format!(
                "apt-get install -y etcd-server failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => Err(format!("running apt-get install -y etcd-server: {e}")),
        }
    });
    match found {
        Ok(path) => path,
        Err(e) => panic!(
            "these tests need a real etcd (Debian package etcd-server, 3.4 or later) and none could be found or installed: {e}"
        ),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
