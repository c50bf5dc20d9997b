//! The end-to-end test harness: real binaries, real etcd, hosts as network
//! namespaces joined by veth pairs to a bridge that lives in a namespace of
//! its own.
//!
//! Everything a test creates is removed when the test ends, also when it
//! panics: processes are killed by their guards, namespaces and the
//! per-namespace resolv.conf are deleted by the lab's guard, and labs left
//! by a crashed earlier run are swept at the next start. Nothing here
//! touches the machine's own namespace beyond loopback: capture rules live
//! only in the test hosts, which have no route to the outside.
//!
//! Waiting is always polling with a bounded patience ([`eventually`]),
//! never a fixed sleep.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use hostmesh_registry::testing::EtcdCluster;

static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Uses binaries from `dir` (the demo's --bin-dir) instead of this build's.
pub fn set_bin_dir(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

/// Where cargo put the binaries of this build.
pub fn bin(name: &str) -> PathBuf {
    let dir = match BIN_DIR.get() {
        Some(d) => d.clone(),
        None => {
            let exe = std::env::current_exe().expect("executable path");
            let parent = exe.parent().expect("executable directory").to_path_buf();
            // Tests live in target/<profile>/deps; binaries one level up.
            if parent.ends_with("deps") {
                parent.parent().expect("target directory").to_path_buf()
            } else {
                parent
            }
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// Fails the test loudly unless running as root (namespaces, nftables).
pub fn require_root() {
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test needs root (network namespaces, nftables); run `make test` as root"
    );
}

/// Whether the running kernel is `major.minor` or later (containers share
/// it, so this holds inside them too).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Polls `check` until it returns Some, or panics after `patience` with
/// what the last attempt said.
pub fn eventually<T>(
    what: &str,
    patience: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(20);
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {patience:?} waiting for {what}; last: {last}");
                }
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Async version of [`eventually`].
pub async fn eventually_async<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(20);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                if tokio::time::Instant::now() >= deadline {
                    panic!("timed out after {patience:?} waiting for {what}; last: {last}");
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// A child process that is killed when dropped; its output goes to a file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("creating a log file");
        let err = out.try_clone().expect("cloning the log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e} ({cmd:?})"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs, without reaping it: false once it
    /// has exited (a zombie) or was reaped.
    pub fn alive(&self) -> bool {
        let Some(c) = &self.child else { return false };
        match fs::read_to_string(format!("/proc/{}/stat", c.id())) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (SIGKILL after `patience`). Returns the status.
    /// Waits for the process to exit on its own; None if it had not within
    /// `patience` (it is killed then).
    pub fn wait(&mut self, patience: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + patience;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn terminate(&mut self, patience: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + patience;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {patience:?} of SIGTERM; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ip(args: &[&str]) -> Output {
    output(Command::new("ip").args(args))
}

fn ip_ok(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Deletes every lab namespace made by process `pid` (and its
/// `/etc/netns` directory), without needing the `Lab` itself: for a Ctrl-C
/// handler that cannot wait for the thread that holds it.
pub fn remove_labs_of(pid: u32) {
    let prefix = format!("hm{pid:x}x");
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&prefix) {
            let _ = ip(&["netns", "del", name]);
            let _ = fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// On Ctrl-C: kills every child process, deletes this process's lab
/// namespaces and exits 130, whatever the main thread is doing (for the
/// demo and the benchmarks, which hold a lab for minutes). The main thread
/// must not end the process first by panicking when its children vanish:
/// the panic hook parks it once the handler has begun.
pub fn clean_up_on_interrupt(what: &'static str) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
        default_hook(info);
    }));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("no Ctrl-C handler (starting its runtime: {e})");
            return;
        }
    };
    std::thread::spawn(move || {
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        eprintln!("\ninterrupted: {what}");
        INTERRUPTED.store(true, Ordering::SeqCst);
        // Every process a lab started is a child (`ip netns exec` execs the
        // program); the namespaces go by their names, so nothing here waits
        // for the lab the main thread holds.
        let me = std::process::id().to_string();
        let _ = Command::new("pkill").args(["-KILL", "-P", &me]).status();
        remove_labs_of(std::process::id());
        std::process::exit(130);
    });
}

/// Deletes namespaces of earlier runs whose process is gone.
fn sweep_stale_labs() {
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("hm") else {
            continue;
        };
        let Some((pid_hex, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = u32::from_str_radix(pid_hex, 16) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            let _ = fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

/// One host of a lab.
#[derive(Clone, Debug)]
pub struct LabHost {
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// Hosts as network namespaces on one bridge (10.77.0.0/24, the bridge in
/// a namespace of its own). No host has a default route: nothing reaches
/// the outside.
pub struct Lab {
    pub id: String,
    pub sw: String,
    pub hosts: Vec<LabHost>,
    pub dir: tempfile::TempDir,
}

pub const LAB_NAMESERVER: &str = "10.77.0.254";

impl Lab {
    pub fn new(hosts: usize) -> Lab {
        require_root();
        sweep_stale_labs();
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}x{n:x}", std::process::id());
        let sw = format!("hm{id}sw");
        ip_ok(&["netns", "add", &sw]);
        let mut lab = Lab {
            id,
            sw: sw.clone(),
            hosts: Vec::new(),
            dir: tempfile::tempdir().expect("lab temp dir"),
        };
        ip_ok(&["-n", &sw, "link", "set", "lo", "up"]);
        ip_ok(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &sw, "link", "set", "br0", "up"]);
        for _ in 0..hosts {
            lab.add_host();
        }
        lab
    }

    /// Adds a host; returns its index.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let ns = format!("hm{}h{i}", self.id);
        let addr = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
        let (inner, outer) = (format!("v{}h{i}", self.id), format!("w{}h{i}", self.id));
        ip_ok(&["netns", "add", &ns]);
        // The host's resolver: an address nothing answers on; meshd's
        // capture redirects queries to it, and forwarding fails safely.
        let etc = format!("/etc/netns/{ns}");
        fs::create_dir_all(&etc).expect("creating /etc/netns/<ns>");
        fs::write(
            format!("{etc}/resolv.conf"),
            format!("nameserver {LAB_NAMESERVER}\n"),
        )
        .expect("writing resolv.conf");
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        ip_ok(&[
            "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer, "netns",
            &self.sw,
        ]);
        ip_ok(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
        ip_ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &self.sw, "link", "set", &outer, "master", "br0"]);
        ip_ok(&["-n", &self.sw, "link", "set", &outer, "up"]);
        self.hosts.push(LabHost { ns, addr });
        i
    }

    pub fn host(&self, i: usize) -> &LabHost {
        &self.hosts[i]
    }

    /// A command run inside host `i`.
    ///
    /// `ip netns exec` gives the command a mount namespace of its own with
    /// a fresh `/sys` for the network namespace, which has no cgroup
    /// mounts; the cgroup v2 hierarchy is mounted back at `/sys/fs/cgroup`
    /// there (in that private mount namespace only, gone with the command),
    /// so a test host looks like a real one to meshd's socket redirection.
    pub fn cmd(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns, "sh", "-c", WITH_CGROUP2])
            .arg(program);
        c
    }

    pub fn spawn(
        &self,
        i: usize,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Proc {
        let mut c = self.cmd(i, program);
        c.args(args);
        Proc::spawn(name, c, self.dir.path())
    }

    /// Runs a shell command in host `i`.
    pub fn sh(&self, i: usize, script: &str) -> Output {
        let mut c = self.cmd(i, "sh");
        c.args(["-c", script]);
        output(&mut c)
    }

    pub fn sh_ok(&self, i: usize, script: &str) -> String {
        let out = self.sh(i, script);
        if !out.status.success() {
            panic!(
                "in {}: `{script}` failed ({}):\nstdout: {}\nstderr: {}",
                self.hosts[i].ns,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Waits until something in host `i` accepts TCP on `addr`.
    pub fn wait_tcp(&self, i: usize, addr: &str, patience: Duration) {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let script = format!("exec 3<>/dev/tcp/{host}/{port}");
        eventually(
            &format!("{addr} to accept in {}", self.hosts[i].ns),
            patience,
            || {
                let out = output(self.cmd(i, "bash").args(["-c", &script]));
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).to_string())
                }
            },
        );
    }

    /// GET over HTTP inside host `i` (curl), body on success.
    pub fn http_get(&self, i: usize, url: &str) -> Result<String, String> {
        let out = output(
            self.cmd(i, "curl")
                .args(["-sS", "--fail", "--max-time", "5", url]),
        );
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    pub fn nft_tables(&self, i: usize) -> String {
        String::from_utf8_lossy(&output(self.cmd(i, "nft").args(["list", "tables"])).stdout)
            .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = fs::remove_dir_all(format!("/etc/netns/{}", h.ns));
        }
        let _ = ip(&["netns", "del", &self.sw]);
    }
}

/// Starts a single etcd member inside host `i` of a lab, on its loopback.
pub fn etcd_in(lab: &Lab, i: usize) -> Proc {
    let data = lab.dir.path().join(format!("etcd-{i}"));
    let binary = hostmesh_registry::testing::etcd_binary();
    let data = data.display().to_string();
    let p = lab.spawn(
        i,
        &format!("etcd-{i}"),
        binary,
        &[
            "--name",
            "m0",
            "--data-dir",
            &data,
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "m0=http://127.0.0.1:2380",
            "--log-level",
            "error",
        ],
    );
    lab.wait_tcp(i, "127.0.0.1:2379", Duration::from_secs(30));
    p
}

/// Extracts the first JSON value of `text` (for commands that print JSON).
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A free TCP port on loopback (bound and released: good enough for tests
/// that start one server right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A plain HTTP GET over loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {buf}"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A mesh-controller process on loopback.
pub struct ControllerProc {
    pub proc: Proc,
    pub url: String,
    pub grpc: String,
    pub metrics: String,
    pub data_dir: PathBuf,
    pub admin_conf: PathBuf,
}

impl ControllerProc {
    /// Starts `mesh-controller serve` with `store` and extra TOML, and waits
    /// until /readyz answers 200.
    pub fn start(dir: &Path, name: &str, store: &str, extra_toml: &str) -> ControllerProc {
        let mut c = ControllerProc::spawn(dir, name, store, extra_toml);
        c.wait_ready();
        c
    }

    /// Starts `mesh-controller serve` without waiting for it (call
    /// [`ControllerProc::wait_ready`]): for replicas that start at once.
    pub fn spawn(dir: &Path, name: &str, store: &str, extra_toml: &str) -> ControllerProc {
        let grpc = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let data_dir = dir.join(name);
        fs::create_dir_all(&data_dir).expect("controller data dir");
        let config = data_dir.join("controller.toml");
        fs::write(
            &config,
            format!(
                "store = {store:?}\nlisten = {grpc:?}\nmetrics_listen = {metrics:?}\ndata_dir = {:?}\n{extra_toml}\n",
                data_dir.display().to_string()
            ),
        )
        .expect("writing controller.toml");
        let mut cmd = Command::new(bin("mesh-controller"));
        cmd.args(["serve", "--config"]).arg(&config);
        let proc = Proc::spawn(name, cmd, dir);
        ControllerProc {
            proc,
            url: format!("https://{grpc}"),
            grpc,
            metrics,
            admin_conf: data_dir.join("admin.conf"),
            data_dir,
        }
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !self.proc.is_running() {
                panic!("controller {} exited:\n{}", self.proc.name, self.proc.log());
            }
            let last = match http_get(&self.metrics, "/readyz") {
                Ok((200, _)) => return,
                Ok((s, b)) => format!("{s} {b}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "controller {} not ready after 60s ({last}):\n{}",
                    self.proc.name,
                    self.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs meshctl with this controller's admin credential.
    pub fn meshctl(&self, args: &[&str]) -> Output {
        output(
            Command::new(bin("meshctl"))
                .arg("--credentials")
                .arg(&self.admin_conf)
                .args(args)
                .env_remove("HOSTMESH_CONTROLLER")
                .env_remove("HOSTMESH_CREDENTIALS"),
        )
    }

    /// meshctl that must succeed; its stdout.
    pub fn meshctl_ok(&self, args: &[&str]) -> String {
        let out = self.meshctl(args);
        if !out.status.success() {
            panic!(
                "meshctl {args:?} failed ({}):\nstdout: {}\nstderr: {}\ncontroller log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.proc.log()
            );
        }
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Direct gRPC calls, for what meshctl never does.
pub mod grpc {
    use std::path::Path;

    use hostmesh_api::proto::ListRequest;
    use hostmesh_api::proto::operator_client::OperatorClient;
    use hostmesh_api::tls::TrustBundle;
    use hostmesh_controller::admin_conf::AdminCredential;

    /// A List call that verifies the controller but presents no client
    /// certificate; returns the error status.
    pub async fn list_without_client_cert(admin_conf: &Path, url: &str) -> tonic::Status {
        hostmesh_api::tls::install_default_provider();
        let cred = AdminCredential::load(admin_conf).expect("admin.conf");
        let bundle =
            TrustBundle::from_pem(&cred.trust_domain, &cred.ca_bundle, "bundle").expect("bundle");
        let channel = hostmesh_api::connect::channel(url, bundle, None, None).expect("channel");
        let mut client = OperatorClient::new(channel);
        match client
            .list(ListRequest {
                kind: "services".into(),
                namespace: String::new(),
            })
            .await
        {
            Ok(_) => panic!("the controller answered a caller without a client certificate"),
            Err(s) => s,
        }
    }
}
pub mod container;
pub mod inproc;
pub mod mesh;
pub mod pcap;

/// `sh -c` script for [`Lab::cmd`]: mount cgroup2 if it is not there, then
/// run the program (`$0`) with its arguments.
const WITH_CGROUP2: &str = "grep -qs ' - cgroup2 ' /proc/self/mountinfo || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; exec \"$0\" \"$@\"";
