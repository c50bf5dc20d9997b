//! `make demo`: a whole mesh on this machine, for real.
//!
//! A controller on the embedded store and three hosts, each a network
//! namespace with its own meshd; a plain HTTP server on one host and a
//! plain `curl http://web.shop.mesh/` from another, carried over mutual TLS
//! through nftables capture. It prints the path, the identities on both
//! ends, the metrics and `meshctl status`, then removes everything it
//! created (also on Ctrl-C). With --keep it waits for Ctrl-C before
//! cleaning up, so the hosts can be explored.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostmesh_tests::mesh::{MeshLab, StoreKind};

const RESOURCES: &str = r#"apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
  mtls: strict
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: web, namespace: shop}
spec: {labels: {app: web, version: v1}, services: [web]}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: frontend, namespace: shop}
spec: {labels: {app: frontend}}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: ops, namespace: ops}
spec: {}
---
apiVersion: hostmesh/v1
kind: Policy
metadata: {name: web-allow, namespace: shop}
spec:
  service: web
  action: allow
  rules:
    - from: [{namespace: shop}]
"#;

const WEB: usize = 1;
const CLIENT: usize = 2;
const OPS: usize = 3;

fn step(text: &str) {
    println!("\n\x1b[1;34m==>\x1b[0m \x1b[1m{text}\x1b[0m");
}

fn show(text: &str) {
    for line in text.trim_end().lines() {
        println!("    {line}");
    }
}

static SURPRISES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Something the demo shows did not behave: said loudly, and the demo
/// exits non-zero at the end.
fn surprise(text: &str) {
    SURPRISES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    show(&format!("UNEXPECTED: {text}"));
}

fn usage() -> ! {
    eprintln!("usage: hostmesh-demo [--bin-dir DIR] [--keep]");
    std::process::exit(2);
}

fn main() {
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--keep" => keep = true,
            "--bin-dir" => match args.next() {
                Some(d) => hostmesh_tests::set_bin_dir(PathBuf::from(d)),
                None => usage(),
            },
            _ => usage(),
        }
    }
    if !std::path::Path::new("/proc/self/ns/net").exists()
        || hostmesh_tests::output(std::process::Command::new("id").arg("-u")).stdout != b"0\n"
    {
        eprintln!("hostmesh-demo: run as root (it creates network namespaces and nftables rules)");
        std::process::exit(1);
    }

    hostmesh_tests::clean_up_on_interrupt("removing the demo hosts");
    let slot: Arc<Mutex<Option<MeshLab>>> = Arc::new(Mutex::new(None));

    step("Creating 4 hosts as network namespaces on one bridge (no route to the outside)");
    let lab = MeshLab::start(4, StoreKind::Embedded, 15);
    let addrs: Vec<std::net::Ipv4Addr> = lab.lab.hosts.iter().map(|h| h.addr).collect();
    let addr = |i: usize| addrs[i];
    show(&format!(
        "controller {}   web {}   client {}   ops {}",
        addr(0),
        addr(WEB),
        addr(CLIENT),
        addr(OPS)
    ));
    show("the controller runs `mesh-controller serve` on the embedded store (redb)");
    *slot.lock().expect("lock") = Some(lab);
    let with = |f: &mut dyn FnMut(&mut MeshLab)| {
        let mut guard = slot.lock().expect("lock");
        f(guard.as_mut().expect("lab"));
    };

    with(&mut |m| {
        step("meshctl apply -f mesh.yaml");
        show(RESOURCES);
        show(&m.apply(RESOURCES));

        step("Joining hosts: meshctl token create, then meshd join on each host");
        let example = m.meshctl_ok(&["token", "create", "--group", "shop/web"]);
        show(&example);
        m.join(WEB, "shop/web");
        m.join(CLIENT, "shop/frontend");
        m.join(OPS, "ops/ops");
        show("web -> spiffe://hostmesh.local/ns/shop/sa/web");
        show("client -> spiffe://hostmesh.local/ns/shop/sa/frontend");
        show("ops -> spiffe://hostmesh.local/ns/ops/sa/ops");

        step(
            "A plain HTTP server on web (python3, port 8080, all addresses), and meshd on every host",
        );
        m.app(WEB, 8080, "hello from web, over mTLS\n", "0.0.0.0");
        for h in [WEB, CLIENT, OPS] {
            m.start_meshd(h);
        }
        m.eventually(
            "web to be a healthy endpoint",
            Duration::from_secs(30),
            || {
                let config = m.config(CLIENT);
                let ok = config["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| {
                        s["name"] == "web"
                            && s["endpoints"].as_array().is_some_and(|e| {
                                e.iter().any(|e| {
                                    e["healthyPorts"].as_array().is_some_and(|p| !p.is_empty())
                                })
                            })
                    });
                if ok {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        );
        m.wait_capture_current(CLIENT);
        show(&m.meshctl_ok(&["status"]));

        step(
            "On client: getent hosts web.shop.mesh   (the host's own resolver; port 53 is redirected to meshd)",
        );
        show(&m.lab.sh_ok(CLIENT, "getent hosts web.shop.mesh"));

        step("On client: curl -s http://web.shop.mesh/   (an unmodified program)");
        match m.curl(CLIENT, "http://web.shop.mesh/", 10) {
            Ok(body) => show(&body),
            Err(e) => {
                show(&format!("FAILED: {e}"));
                show(&m.logs());
                std::process::exit(1);
            }
        }

        step("The path it took");
        show("curl (client) -> nftables `inet hostmesh` redirects the VIP to meshd :15001");
        show(
            "  -> meshd (client) picks an endpoint, opens an HTTP/2 CONNECT stream in a pooled TLS 1.3 tunnel",
        );
        show(&format!(
            "  -> {}:15008 meshd (web): both sides verify SPIFFE IDs against the mesh CA",
            addr(WEB)
        ));
        show("  -> Policy shop/web-allow admits namespace shop -> 127.0.0.1:8080 (python)");
        // Logged when the connection closes, a moment after curl returns.
        let line = |host: usize, dir: &str| {
            m.eventually("the access log line", Duration::from_secs(5), || {
                m.meshd_log(host)
                    .lines()
                    .rev()
                    .find(|l| {
                        l.contains(&format!("\"direction\":\"{dir}\""))
                            && l.contains("\"result\":\"ok\"")
                    })
                    .map(str::to_string)
                    .ok_or_else(|| "not yet".to_string())
            })
        };
        show("access log, client meshd:");
        show(&format!("  {}", line(CLIENT, "outbound")));
        show("access log, web meshd:");
        show(&format!("  {}", line(WEB, "inbound")));

        step(
            "Metrics (meshd admin port 127.0.0.1:15000/metrics), connections by service and peer identity",
        );
        for (host, dir) in [(CLIENT, "outbound"), (WEB, "inbound")] {
            let metrics = m
                .lab
                .http_get(host, "http://127.0.0.1:15000/metrics")
                .unwrap_or_default();
            for l in metrics.lines().filter(|l| {
                (l.starts_with("hostmesh_meshd_connections_opened_total")
                    || l.starts_with("hostmesh_meshd_sent_bytes_total")
                    || l.starts_with("hostmesh_meshd_received_bytes_total"))
                    && l.contains(&format!("direction=\"{dir}\""))
            }) {
                show(l);
            }
        }

        step("Nothing gets around the mesh: plaintext from ops straight to web:8080 (strict mTLS)");
        match m.curl(OPS, &format!("http://{}:8080/", addr(WEB)), 3) {
            Ok(_) => surprise("plaintext got through"),
            Err(_) => show(
                "dropped by nftables on web (only the tunnel port 15008 is open to other hosts)",
            ),
        }
        step("And the policy: ops (namespace ops) through the mesh is refused by web's meshd");
        match m.curl(OPS, "http://web.shop.mesh/", 5) {
            Ok(body) => surprise(&format!("the policy let ops through: {body}")),
            Err(e) => show(&format!("refused: {e}")),
        }
        step("What meshd on client captures (meshd status)");
        let mut c = m.lab.cmd(CLIENT, hostmesh_tests::bin("meshd"));
        c.arg("status");
        show(&hostmesh_tests::stdout_of(&hostmesh_tests::output(&mut c)));
    });

    if keep {
        let guard = slot.lock().expect("lock");
        let m = guard.as_ref().expect("lab");
        step("The mesh keeps running; press Ctrl-C to remove it. Try:");
        for (i, name) in [(CLIENT, "client"), (WEB, "web"), (OPS, "ops")] {
            show(&format!(
                "ip netns exec {}  bash     # {name}",
                m.lab.host(i).ns
            ));
        }
        show(&format!(
            "ip netns exec {} {} --credentials {} status",
            m.lab.host(0).ns,
            hostmesh_tests::bin("meshctl").display(),
            m.admin_conf.display()
        ));
        drop(guard);
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    step("Removing everything the demo created (meshd removes its nftables table on SIGTERM)");
    let mut guard = slot.lock().expect("lock");
    if let Some(mut m) = guard.take() {
        for h in [WEB, CLIENT, OPS] {
            let clean = m.stop_meshd(h);
            let table_left = m.lab.nft_tables(h).contains("hostmesh");
            show(&format!(
                "meshd on {} stopped ({}), table inet hostmesh: {}",
                m.lab.host(h).ns,
                if clean { "exit 0" } else { "error" },
                if table_left { "still there!" } else { "gone" }
            ));
            if !clean || table_left {
                surprise("meshd did not stop cleanly");
            }
        }
    }
    drop(guard);
    let surprises = SURPRISES.load(std::sync::atomic::Ordering::SeqCst);
    if surprises > 0 {
        eprintln!("hostmesh-demo: {surprises} step(s) did not behave as shown above");
        std::process::exit(1);
    }
    show("done");
}
