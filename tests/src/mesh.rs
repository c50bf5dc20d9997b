//! A whole mesh in network namespaces: host 0 runs the controller (over a
//! real etcd on its loopback, or the embedded store), the other hosts join
//! with real tokens and run real meshd processes, and tests start plain
//! apps (small Python HTTP servers) beside them.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Lab, Proc, bin, etcd_in, eventually, json, output};

/// A tiny HTTP server: GET returns the body given on its command line;
/// `/big` streams the file named by $BIG_FILE; `/echo` (POST) returns the
/// request body's length and sha256.
const APP: &str = r#"
import hashlib, http.server, os, shutil, socketserver, sys
port, body = int(sys.argv[1]), sys.argv[2].encode()
bind = sys.argv[3] if len(sys.argv) > 3 else '0.0.0.0'
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        if self.path == '/big' and os.environ.get('BIG_FILE'):
            size = os.path.getsize(os.environ['BIG_FILE'])
            self.send_response(200); self.send_header('content-length', str(size)); self.end_headers()
            with open(os.environ['BIG_FILE'], 'rb') as f: shutil.copyfileobj(f, self.wfile, 1 << 20)
            return
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers.get('content-length', '0')); h = hashlib.sha256(); left = n
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk: break
            h.update(chunk); left -= len(chunk)
        out = f'{n} {h.hexdigest()}'.encode()
        self.send_response(200); self.send_header('content-length', str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; allow_reuse_address = True
    address_family = __import__('socket').AF_INET6 if ':' in bind else __import__('socket').AF_INET
S((bind, port), H).serve_forever()
"#;

pub enum StoreKind {
    Etcd,
    Embedded,
}

pub struct MeshLab {
    pub lab: Lab,
    pub etcd: Option<Proc>,
    pub controller: Option<Proc>,
    pub admin_conf: PathBuf,
    pub meshd: Vec<Option<Proc>>,
    pub apps: Vec<Proc>,
    pub lease_ttl_s: u64,
    /// Appended to every meshd.toml (e.g. a `[proxy]` transport choice).
    pub meshd_extra: String,
    /// Appended to controller.toml (read when the controller starts).
    pub controller_extra: String,
    app_script: PathBuf,
}

pub const CONTROLLER_HOST: usize = 0;

impl MeshLab {
    /// A lab of `hosts` hosts (host 0 is the controller's).
    pub fn start(hosts: usize, store: StoreKind, lease_ttl_s: u64) -> MeshLab {
        let lab = Lab::new(hosts);
        let app_script = lab.dir.path().join("app.py");
        std::fs::write(&app_script, APP).expect("writing app.py");
        let etcd = match store {
            StoreKind::Etcd => Some(etcd_in(&lab, CONTROLLER_HOST)),
            StoreKind::Embedded => None,
        };
        let mut m = MeshLab {
            admin_conf: lab.dir.path().join("ctl/admin.conf"),
            lab,
            etcd,
            controller: None,
            meshd: (0..hosts).map(|_| None).collect(),
            apps: Vec::new(),
            lease_ttl_s,
            meshd_extra: String::new(),
            controller_extra: String::new(),
            app_script,
        };
        m.start_controller();
        m
    }

    pub fn controller_url(&self) -> String {
        format!("https://{}:15012", self.lab.host(CONTROLLER_HOST).addr)
    }

    pub fn start_controller(&mut self) {
        let dir = self.lab.dir.path().join("ctl");
        std::fs::create_dir_all(&dir).expect("controller dir");
        let store = if self.etcd.is_some() {
            "etcd://127.0.0.1:2379".to_string()
        } else {
            format!("embedded:{}", dir.join("state.redb").display())
        };
        let config = dir.join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "store = {store:?}\nlisten = \"0.0.0.0:15012\"\nmetrics_listen = \"127.0.0.1:15014\"\ndata_dir = {:?}\nadvertise_url = {:?}\n[hosts]\nlease_ttl = \"{}s\"\n[log]\nformat = \"text\"\n{}",
                dir.display().to_string(),
                self.controller_url(),
                self.lease_ttl_s,
                self.controller_extra
            ),
        )
        .expect("controller.toml");
        let conf = config.display().to_string();
        let p = self.lab.spawn(
            CONTROLLER_HOST,
            "controller",
            bin("mesh-controller"),
            &["serve", "--config", &conf],
        );
        self.controller = Some(p);
        self.wait_controller_ready();
    }

    pub fn wait_controller_ready(&mut self) {
        let lab = &self.lab;
        let ctl = &mut self.controller;
        eventually(
            "the controller to be ready",
            Duration::from_secs(60),
            || {
                if let Some(p) = ctl.as_mut()
                    && !p.is_running()
                {
                    panic!("controller exited:\n{}", p.log());
                }
                lab.http_get(CONTROLLER_HOST, "http://127.0.0.1:15014/readyz")
                    .map(|_| ())
            },
        );
    }

    /// SIGKILL the controller.
    pub fn kill_controller(&mut self) {
        if let Some(mut p) = self.controller.take() {
            p.kill();
        }
    }

    pub fn meshctl(&self, args: &[&str]) -> Output {
        let mut c = self.lab.cmd(CONTROLLER_HOST, bin("meshctl"));
        c.arg("--credentials").arg(&self.admin_conf).args(args);
        output(&mut c)
    }

    pub fn meshctl_ok(&self, args: &[&str]) -> String {
        let out = self.meshctl(args);
        if !out.status.success() {
            panic!(
                "meshctl {args:?} failed: {}\ncontroller log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.controller
                    .as_ref()
                    .map(|p| p.log())
                    .unwrap_or_default()
            );
        }
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn apply(&self, yaml: &str) -> String {
        let path = self
            .lab
            .dir
            .path()
            .join(format!("apply-{}.yaml", crate::free_port()));
        std::fs::write(&path, yaml).expect("writing yaml");
        self.meshctl_ok(&["apply", "-f", path.to_str().expect("utf-8 path")])
    }

    /// A one-use token for `group` (NS/NAME): (token, ca hash).
    pub fn token(&self, group: &str) -> (String, String) {
        let v = json(&self.meshctl_ok(&["token", "create", "--group", group, "-o", "json"]));
        (
            v["token"].as_str().expect("token").to_string(),
            v["caHash"].as_str().expect("caHash").to_string(),
        )
    }

    pub fn state_dir(&self, host: usize) -> PathBuf {
        self.lab.dir.path().join(format!("host{host}"))
    }

    /// `meshd join` on `host` with a fresh token for `group`.
    pub fn join(&self, host: usize, group: &str) {
        let (token, ca_hash) = self.token(group);
        let token_file = self.lab.dir.path().join(format!("token{host}"));
        std::fs::write(&token_file, &token).expect("token file");
        let state = self.state_dir(host).display().to_string();
        let mut c = self.lab.cmd(host, bin("meshd"));
        c.args([
            "join",
            "--controller",
            &self.controller_url(),
            "--token-file",
        ])
        .arg(&token_file)
        .args([
            "--ca-hash",
            &ca_hash,
            "--state-dir",
            &state,
            "--user",
            "root",
        ]);
        crate::run_ok(&mut c);
    }

    fn meshd_config(&self, host: usize) -> PathBuf {
        let path = self.lab.dir.path().join(format!("meshd{host}.toml"));
        std::fs::write(
            &path,
            format!(
                "state_dir = {:?}\n[log]\nformat = \"json\"\nlevel = \"info,hostmesh_meshd=debug\"\n[health]\ninterval = \"500ms\"\ntimeout = \"400ms\"\n{}\n",
                self.state_dir(host).display().to_string(),
                self.meshd_extra
            ),
        )
        .expect("meshd.toml");
        path
    }

    pub fn start_meshd(&mut self, host: usize) {
        let config = self.meshd_config(host).display().to_string();
        let p = self.lab.spawn(
            host,
            &format!("meshd{host}"),
            bin("meshd"),
            &["run", "--config", &config],
        );
        self.meshd[host] = Some(p);
        self.wait_meshd_ready(host);
    }

    pub fn wait_meshd_ready(&mut self, host: usize) {
        let lab = &self.lab;
        let p = &mut self.meshd[host];
        eventually(
            &format!("meshd on host {host} to be ready"),
            Duration::from_secs(30),
            || {
                if let Some(p) = p.as_mut()
                    && !p.is_running()
                {
                    panic!("meshd on host {host} exited:\n{}", p.log());
                }
                lab.http_get(host, "http://127.0.0.1:15000/ready")
                    .map(|_| ())
            },
        );
    }

    /// SIGTERM meshd on `host`; returns whether it exited 0.
    pub fn stop_meshd(&mut self, host: usize) -> bool {
        let mut p = self.meshd[host].take().expect("meshd running");
        p.terminate(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    }

    pub fn kill_meshd(&mut self, host: usize) {
        if let Some(mut p) = self.meshd[host].take() {
            p.kill();
        }
    }

    pub fn meshd_log(&self, host: usize) -> String {
        self.meshd[host]
            .as_ref()
            .map(|p| p.log())
            .unwrap_or_default()
    }

    /// The config meshd on `host` is using.
    pub fn config(&self, host: usize) -> Value {
        json(
            &self
                .lab
                .http_get(host, "http://127.0.0.1:15000/config")
                .expect("meshd /config"),
        )
    }

    /// Waits until the capture rules on `host` reflect the config it uses
    /// (they follow each config change a moment later).
    pub fn wait_capture_current(&self, host: usize) {
        self.eventually(
            &format!("the capture rules on host {host} to follow its config"),
            Duration::from_secs(20),
            || {
                let status = json(
                    &self
                        .lab
                        .http_get(host, "http://127.0.0.1:15000/status")
                        .map_err(|e| e.to_string())?,
                );
                let (config, captured) = (&status["config"]["version"], &status["captureVersion"]);
                if config.is_u64() && config == captured {
                    Ok(())
                } else {
                    Err(format!("config {config}, capture {captured}"))
                }
            },
        );
    }

    pub fn endpoints(&self, host: usize, ns: &str, name: &str) -> Vec<String> {
        let config = self.config(host);
        let mut out: Vec<String> = config["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["namespace"] == ns && s["name"] == name)
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["address"].as_str().map(str::to_string))
            .collect();
        out.sort();
        out
    }

    pub fn status(&self) -> Value {
        json(&self.meshctl_ok(&["status", "-o", "json"]))
    }

    /// A plain HTTP app on `host`, answering `body`.
    pub fn app(&mut self, host: usize, port: u16, body: &str, bind: &str) {
        let script = self.app_script.display().to_string();
        let port_s = port.to_string();
        let p = self.lab.spawn(
            host,
            &format!("app{host}-{port}"),
            "python3",
            &[&script, &port_s, body, bind],
        );
        self.apps.push(p);
        let probe = if bind.contains(':') {
            format!("[{bind}]")
        } else {
            bind.replace("0.0.0.0", "127.0.0.1")
        };
        self.lab
            .wait_tcp(host, &format!("{probe}:{port}"), Duration::from_secs(10));
    }

    /// An app serving a big file at /big.
    pub fn big_app(&mut self, host: usize, port: u16, file: &std::path::Path) {
        let script = self.app_script.display().to_string();
        let mut c = self.lab.cmd(host, "python3");
        c.args([script.as_str(), &port.to_string(), "big", "0.0.0.0"])
            .env("BIG_FILE", file);
        let p = Proc::spawn(&format!("bigapp{host}"), c, self.lab.dir.path());
        self.apps.push(p);
        self.lab
            .wait_tcp(host, &format!("127.0.0.1:{port}"), Duration::from_secs(10));
    }

    /// curl from `host`: Ok(body) or Err(stderr).
    pub fn curl(&self, host: usize, url: &str, max_time_s: u32) -> Result<String, String> {
        let out = output(self.lab.cmd(host, "curl").args([
            "-sS",
            "--fail",
            "--max-time",
            &max_time_s.to_string(),
            url,
        ]));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(format!(
                "{} (exit {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ))
        }
    }

    /// Everything the lab's processes logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.controller {
            s.push_str(&format!("==== controller\n{}\n", p.log()));
        }
        for (i, m) in self.meshd.iter().enumerate() {
            if let Some(p) = m {
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                s.push_str(&format!(
                    "==== meshd{i} (last 60 lines; running: {})\n{}\n",
                    p.alive(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
                let net = self.lab.sh(i, "ip route; ip -6 route; ss -ltnu");
                s.push_str(&format!(
                    "==== host {i}: routes and listeners\n{}\n",
                    String::from_utf8_lossy(&net.stdout)
                ));
            }
        }
        s
    }

    /// Polls `check` on the lab, printing all logs if it never holds.
    pub fn eventually<T>(
        &self,
        what: &str,
        patience: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            match check() {
                Ok(v) => return v,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "timed out after {patience:?} waiting for {what}; last: {e}\n{}",
                        self.logs()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
