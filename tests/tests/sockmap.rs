//! Socket redirection (dataplane/src/sockmap) between apps and meshd, on real
//! network-namespace hosts with the real kernel programs: request and
//! answer arrive byte for byte, redirection is really in use (the
//! programs' counters), and `proxy.sockmap = "off"` (the default) keeps
//! plain TCP.
//!
//! The two streaming checks go through the guards (dataplane/src/sockmap,
//! `Guard`): a stream both ways, which goes back to TCP and takes the app
//! sockets out of their sockhashes; one that lasts long enough for meshd's
//! sockets to leave theirs too; and an app that writes without ever
//! reading. Before the guards kept receivers' queues under a quarter of
//! their buffers, a direction sent back to TCP could wait on a zero TCP
//! window for the sender's probe timer (seconds), and before app sockets
//! left their sockhashes a blocking `recv` could fail with EAGAIN (the
//! kernel's sockmap read path returns it when woken without data); the
//! stream check caught both, 1 to 3 times in 24 runs three at a time.

use std::time::Duration;

use hostmesh_tests::mesh::{MeshLab, StoreKind};
use serde_json::Value;

const SERVER: usize = 1;
const CLIENT: usize = 2;

const MESH: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: echo, namespace: lab}
spec:
  ports: [{name: echo, port: 80, targetPort: 7070}]
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: echo, namespace: lab}
spec: {labels: {app: echo}, services: [echo]}
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: client, namespace: lab}
spec: {}
"#;

/// A threaded echo server: every byte back, then the half-close.
const ECHO: &str = r#"
import socket, sys, threading
def serve(c):
    with c:
        while True:
            d = c.recv(262144)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)
# "v6": listen on :: (dual stack), so connections from IPv4 addresses are
# IPv4-mapped IPv6 sockets, as many servers' are.
v6 = len(sys.argv) > 2 and sys.argv[2] == "v6"
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if v6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::" if v6 else "0.0.0.0", int(sys.argv[1])))
s.listen(128)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connections that each send pseudo-random bytes in chunks of random
/// sizes while reading the echo, plus a ping-pong of small messages; any
/// byte out of place fails. Prints one line per connection.
const CHECK: &str = r#"
import hashlib, random, socket, sys, threading, time
vip, conns, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Spread each stream over at least this many seconds (0: as fast as it goes).
secs = float(sys.argv[4]) if len(sys.argv) > 4 else 0
failures = []
def one(i):
    rnd = random.Random(i)
    s = socket.create_connection((vip, 80), timeout=60)
    # Ping-pong first: request and answer, byte for byte.
    for n in range(300):
        msg = bytes([rnd.randrange(256) for _ in range(rnd.randrange(1, 300))])
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            part = s.recv(len(msg) - len(got))
            if not part:
                failures.append(f"conn {i}: closed in ping-pong {n}"); return
            got += part
        if got != msg:
            failures.append(f"conn {i}: ping-pong {n} answered {got[:20]!r}, sent {msg[:20]!r}"); return
    if total == 0:
        print(f"conn {i}: ok", flush=True)
        return
    # Then a stream both ways at once.
    sent, recv = hashlib.sha256(), hashlib.sha256()
    received = [0]
    def reader():
        while True:
            d = s.recv(262144)
            if not d:
                return
            recv.update(d)
            received[0] += len(d)
    t = threading.Thread(target=reader)
    t.start()
    left = total
    t0 = time.time()
    while left > 0:
        while secs and total - left > total * (time.time() - t0) / secs:
            time.sleep(0.005)
        n = min(left, rnd.choice([1, 7, 100, 1500, 16384, 65536, 200000]))
        chunk = rnd.randbytes(n)
        sent.update(chunk)
        s.sendall(chunk)
        left -= n
    s.shutdown(socket.SHUT_WR)
    t.join(120)
    if received[0] != total or sent.digest() != recv.digest():
        failures.append(f"conn {i}: {received[0]} of {total} bytes back, same bytes: {sent.digest() == recv.digest()}")
    else:
        print(f"conn {i}: ok", flush=True)
threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
for f in failures: print(f, flush=True)
sys.exit(1 if failures else 0)
"#;

/// Writes for a few seconds to the echo service without ever reading, then
/// prints the bytes waiting in its socket (`ss -m`'s r) and how many it
/// managed to send.
const FLOOD: &str = r#"
import re, socket, subprocess, sys, time
s = socket.create_connection((sys.argv[1], 80))
s.setblocking(False)
buf, sent, t0 = b"x" * 65536, 0, time.time()
while time.time() - t0 < 3:
    try:
        sent += s.send(buf)
    except BlockingIOError:
        time.sleep(0.001)
time.sleep(0.5)
port = s.getsockname()[1]
out = subprocess.run(["ss", "-tmnH", "sport", "= :%d" % port], capture_output=True, text=True).stdout
m = re.search(r"skmem:\(r(\d+),", out)
print("sent", sent, "queued", m.group(1) if m else "?", flush=True)
"#;

fn lab(extra: &str) -> (MeshLab, String) {
    lab_with(extra, "v4")
}

/// `echo_family`: "v4", or "v6" for an echo server listening on `::`.
fn lab_with(extra: &str, echo_family: &str) -> (MeshLab, String) {
    hostmesh_tests::require_root();
    let mut m = MeshLab::start(3, StoreKind::Embedded, 5);
    m.meshd_extra = extra.to_string();
    m.apply(MESH);
    m.join(SERVER, "lab/echo");
    m.join(CLIENT, "lab/client");
    let echo = m.lab.dir.path().join("echo.py");
    std::fs::write(&echo, ECHO).unwrap();
    let p = m.lab.spawn(
        SERVER,
        "echo",
        "python3",
        &[echo.to_str().unwrap(), "7070", echo_family],
    );
    m.apps.push(p);
    m.lab
        .wait_tcp(SERVER, "127.0.0.1:7070", Duration::from_secs(10));
    m.start_meshd(SERVER);
    m.start_meshd(CLIENT);
    m.eventually(
        "the client to see the echo endpoint healthy",
        Duration::from_secs(20),
        || {
            let config = m.config(CLIENT);
            let healthy = config["services"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["name"] == "echo"
                        && s["endpoints"].as_array().is_some_and(|e| {
                            e.iter().any(|e| {
                                e["healthyPorts"].as_array().is_some_and(|p| !p.is_empty())
                            })
                        })
                });
            if healthy {
                Ok(())
            } else {
                Err(format!("{config}"))
            }
        },
    );
    m.wait_capture_current(CLIENT);
    let vip = m.config(CLIENT)["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap()["vips"][0]
        .as_str()
        .unwrap()
        .to_string();
    (m, vip)
}

fn sockmap_status(m: &MeshLab, host: usize) -> Value {
    let text = m
        .lab
        .http_get(host, "http://127.0.0.1:15000/status")
        .expect("meshd status");
    hostmesh_tests::json(&text)["sockmap"].clone()
}

fn count(status: &Value, field: &str) -> u64 {
    status["connections"][field].as_u64().unwrap_or(0)
}

fn script(m: &MeshLab, name: &str, text: &str) -> String {
    let path = m.lab.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn requests_and_answers_arrive_byte_for_byte_by_redirect() {
    let (m, vip) = lab("[proxy]\nsockmap = \"on\"\n");
    for host in [CLIENT, SERVER] {
        let s = sockmap_status(&m, host);
        assert!(
            s["state"].as_str().unwrap_or("").starts_with("on"),
            "host {host}: {s}"
        );
    }
    let check = script(&m, "check.py", CHECK);
    let out = m.lab.sh(CLIENT, &format!("python3 {check} {vip} 8 0"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}\n{}", m.logs());
    assert_eq!(text.matches(": ok").count(), 8, "{text}");

    // The bytes really went by redirect, at both ends.
    let client = sockmap_status(&m, CLIENT);
    let server = sockmap_status(&m, SERVER);
    assert!(count(&client, "clientRedirected") >= 8, "{client}");
    assert!(count(&server, "serverRedirected") >= 1, "{server}");
    let metrics = m
        .lab
        .http_get(CLIENT, "http://127.0.0.1:15000/metrics")
        .unwrap();
    assert!(
        metrics.contains(
            "hostmesh_meshd_sockmap_connections_total{pair=\"client\",path=\"redirect\"}"
        ),
        "{metrics}"
    );
}

/// A stream both ways at once, through the guards: each connection starts
/// redirected (the ping-pong), goes back to TCP for the bulk, and its app
/// sockets leave their sockhashes.
#[test]
fn streams_both_ways_arrive_whole_and_in_order() {
    stream_both_ways("8 8000000", &["fellBack", "takenOut"]);
}

/// A stream both ways that lasts past [`Retire::GRACE`] after going back
/// to TCP, so meshd's sockets leave their sockhashes too, in the middle of
/// it: every byte still arrives, in order.
///
/// [`Retire::GRACE`]: hostmesh_meshd::sockmap::Retire::GRACE
#[test]
fn streams_keep_their_bytes_when_meshd_sockets_leave_their_sockhashes() {
    let secs = hostmesh_meshd::sockmap::Retire::GRACE.as_secs() + 3;
    stream_both_ways(
        &format!("4 24000000 {secs}"),
        &["fellBack", "takenOut", "meshdOut"],
    );
}

/// A server listening on `::` accepts IPv6 sockets (IPv4-mapped), which
/// the programs never put in a sockhash: meshd's bytes to it go by TCP,
/// and once a stream trips a guard meshd's own socket leaves its sockhash
/// without the app's having been in one.
#[test]
fn a_server_on_ipv6_any_gets_its_stream_whole_and_meshd_socket_leaves() {
    let secs = hostmesh_meshd::sockmap::Retire::GRACE.as_secs() + 1;
    let m = stream_both_ways_with(
        "v6",
        &format!("4 8000000 {secs}"),
        &["fellBack", "meshdOut"],
    );
    let server = sockmap_status(&m, SERVER);
    assert_eq!(count(&server, "serverRedirected"), 0, "{server}");
    assert_eq!(count(&server, "takenOut"), 0, "{server}");
}

/// Runs CHECK with `args` (connections, bytes, seconds) from the client
/// and then wants each of `counters` at least 1 on both hosts.
fn stream_both_ways(args: &str, counters: &[&str]) {
    stream_both_ways_with("v4", args, counters);
}

fn stream_both_ways_with(echo_family: &str, args: &str, counters: &[&str]) -> MeshLab {
    let (m, vip) = lab_with("[proxy]\nsockmap = \"on\"\n", echo_family);
    let check = script(&m, "check.py", CHECK);
    let out = m.lab.sh(CLIENT, &format!("python3 {check} {vip} {args}"));
    assert!(
        out.status.success(),
        "{}{}\n==== echo server\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.apps[0].log(),
        m.logs()
    );
    for host in [CLIENT, SERVER] {
        let s = sockmap_status(&m, host);
        for c in counters {
            assert!(count(&s, c) >= 1, "host {host}: {c}: {s}");
        }
    }
    m
}

#[test]
fn an_app_that_never_reads_cannot_pile_up_kernel_memory() {
    let (m, vip) = lab("[proxy]\nsockmap = \"on\"\n");
    let flood = script(&m, "flood.py", FLOOD);
    let out = m.lab.sh_ok(CLIENT, &format!("python3 {flood} {vip}"));
    let mut words = out.split_whitespace();
    let field = |words: &mut std::str::SplitWhitespace<'_>, name: &str| -> u64 {
        assert_eq!(words.next(), Some(name), "{out}");
        words
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let sent = field(&mut words, "sent");
    let queued = field(&mut words, "queued");
    // Unchecked, 3 s of this queued 1 GB in the app's socket. With the
    // guards, meshd waits while a quarter of the app's receive buffer is
    // full, then (the app still not reading) goes back to TCP, whose
    // window stops the writes as it would without the mesh.
    assert!(
        queued <= 8 << 20,
        "{queued} bytes wait in the app's socket ({out})"
    );
    assert!(
        sent <= 256 << 20,
        "the app sent {sent} bytes without reading ({out})"
    );
    let client = sockmap_status(&m, CLIENT);
    let server = sockmap_status(&m, SERVER);
    assert!(
        count(&client, "fellBack") + count(&server, "fellBack") >= 1,
        "{client} {server}"
    );
    // And the service still answers others.
    let check = script(&m, "check.py", CHECK);
    m.lab.sh_ok(CLIENT, &format!("python3 {check} {vip} 2 0"));
}

#[test]
fn sockmap_off_keeps_loopback_tcp() {
    let (m, vip) = lab("[proxy]\nsockmap = \"off\"\n");
    let s = sockmap_status(&m, CLIENT);
    assert!(s["state"].as_str().unwrap_or("").starts_with("off"), "{s}");
    assert!(s["connections"].is_null(), "{s}");
    let check = script(&m, "check.py", CHECK);
    m.lab
        .sh_ok(CLIENT, &format!("python3 {check} {vip} 2 1000000"));
}
