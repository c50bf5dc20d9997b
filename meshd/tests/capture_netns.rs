//! Capture against the real kernel, inside network namespaces this test
//! creates (and always deletes, also when a test fails: [`Netns`] is a drop
//! guard). Nothing here runs `nft` or `ip` in the machine's own namespace:
//! every call goes through the `*_in` functions with a named namespace, or
//! through `ip netns exec`/`ip -n`.
//!
//! Sockets inside a namespace belong to a process inside it, so the checks
//! that connect and listen re-run this test binary inside the namespace
//! (`ip netns exec NS <this binary> capture_helper_entry --ignored`), told
//! by environment variables what to do; it reports on stdout lines starting
//! with `HM `. Listeners answer every connection with their tag, so the
//! client learns where its connection actually landed.
//!
//! These tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN for namespaces) and
//! fail loudly without it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostmesh_meshd::capture::{
    self, CaptureError, CaptureSpec, NetNs, VIP_ROUTE_PROTO, apply_in, cleanup_in,
    ensure_vip_routes_in, remove_in, remove_vip_routes_in, table_exists_in,
};
use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt, BufReader};

const MARK: u32 = 0x539;
/// How long a connect expected to land may take (it takes milliseconds).
const LAND_PATIENCE: Duration = Duration::from_secs(5);
/// How long a connect expected to go nowhere is given before we conclude it
/// went nowhere.
const NOWHERE_PATIENCE: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------- harness

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("Uid line in /proc/self/status");
    assert_eq!(
        euid, "0",
        "the capture namespace tests need root (network namespaces, nftables); run them as root"
    );
}

/// Runs a command to completion; panics with its stderr if it fails.
fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace that exists exactly as long as this value.
struct Netns {
    name: String,
}

impl Netns {
    fn create(tag: &str) -> Netns {
        require_root();
        let name = format!("hm-cap-{}-{tag}", std::process::id());
        // A leftover from an earlier run with a recycled pid: remove it.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn target(&self) -> NetNs {
        NetNs::Named(self.name.clone())
    }

    /// `ip -n NS args…`
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `ip netns exec NS nft args…`
    fn nft(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str(), "nft"];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// `nft -f -` with `script` inside the namespace.
    fn nft_script(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning nft");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .expect("writing the script");
        let output = child.wait_with_output().expect("waiting for nft");
        assert!(
            output.status.success(),
            "nft -f failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn table_count(&self, table: &str) -> usize {
        self.nft(&["list", "tables"])
            .lines()
            .filter(|l| l.trim() == format!("table inet {table}"))
            .count()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veths and rules in it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two hosts joined by a veth pair: A = 10.99.0.1 / fd99::1,
/// B = 10.99.0.2 / fd99::2. Neither has a default route.
struct Pair {
    a: Netns,
    b: Netns,
}

impl Pair {
    fn create(tag: &str) -> Pair {
        let a = Netns::create(&format!("{tag}a"));
        let b = Netns::create(&format!("{tag}b"));
        a.ip(&[
            "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b.name,
        ]);
        a.ip(&["addr", "add", "10.99.0.1/24", "dev", "va"]);
        a.ip(&["addr", "add", "fd99::1/64", "dev", "va", "nodad"]);
        a.ip(&["link", "set", "va", "up"]);
        b.ip(&["addr", "add", "10.99.0.2/24", "dev", "vb"]);
        b.ip(&["addr", "add", "fd99::2/64", "dev", "vb", "nodad"]);
        b.ip(&["link", "set", "vb", "up"]);
        Pair { a, b }
    }
}

fn helper_command(ns: &Netns) -> tokio::process::Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(exe)
        .args([
            "capture_helper_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

/// Listeners running inside a namespace until dropped.
struct Servers {
    _child: tokio::process::Child,
}

/// Starts listeners in `ns`: `spec` is `tag@tcp:addr` / `tag@udp:addr`
/// entries separated by commas. Returns once all are bound.
async fn serve(ns: &Netns, spec: &str) -> Servers {
    let mut child = helper_command(ns)
        .env("HM_CAPTURE_HELPER", "serve")
        .env("HM_LISTEN", spec)
        .spawn()
        .expect("starting the listener helper");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.expect("reading the helper") {
            if line == "HM ready" {
                return true;
            }
            if let Some(error) = line.strip_prefix("HM error ") {
                panic!("listener helper in {} failed: {error}", ns.name);
            }
        }
        false
    })
    .await
    .expect("listener helper did not get ready within 10 s");
    assert!(
        ready,
        "listener helper in {} exited before it was ready",
        ns.name
    );
    Servers { _child: child }
}

/// Where a connection from inside `ns` landed: `Ok(tag)` of the listener
/// that answered, or `Err(why not)`.
async fn probe(
    ns: &Netns,
    proto: &str,
    to: &str,
    mark: Option<u32>,
    patience: Duration,
) -> Result<String, String> {
    let mut cmd = helper_command(ns);
    cmd.env("HM_CAPTURE_HELPER", "connect")
        .env("HM_PROTO", proto)
        .env("HM_TO", to)
        .env("HM_PATIENCE_MS", patience.as_millis().to_string());
    if let Some(mark) = mark {
        cmd.env("HM_MARK", mark.to_string());
    }
    let output = tokio::time::timeout(patience + Duration::from_secs(10), cmd.output())
        .await
        .expect("connect helper hung")
        .expect("running the connect helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        if let Some(tag) = line.strip_prefix("HM landed ") {
            return Ok(tag.to_string());
        }
        if let Some(why) = line.strip_prefix("HM failed ") {
            return Err(why.to_string());
        }
    }
    panic!("connect helper printed no result: {stdout}");
}

async fn lands(ns: &Netns, proto: &str, to: &str, mark: Option<u32>) -> String {
    match probe(ns, proto, to, mark, LAND_PATIENCE).await {
        Ok(tag) => tag,
        Err(why) => panic!(
            "{proto} to {to} (mark {mark:?}) from {} did not land: {why}",
            ns.name
        ),
    }
}

fn spec() -> CaptureSpec {
    CaptureSpec {
        table: "hostmesh".into(),
        mark: MARK,
        outbound_port: 15001,
        dns_port: Some(15053),
        vip_ranges: vec![
            "240.240.0.0/16".parse().unwrap(),
            "fd00:240::/96".parse().unwrap(),
        ],
        endpoints: vec![],
        strict_ports: vec![],
        tunnel_port: 15008,
        exclude_ports: vec![22, 15012],
        exclude_addrs: vec![],
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- tests

#[test]
fn every_golden_script_passes_nft_check_mode() {
    // `nft -c` validates in the kernel and commits nothing; it still runs in
    // a throwaway namespace, so even a bug here could not touch the host.
    let ns = Netns::create("golden");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/capture/testdata");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("reading testdata") {
        let path = entry.expect("testdata entry").path();
        if path.extension().is_some_and(|e| e == "nft") {
            let path = path.to_str().expect("utf-8 path");
            ns.nft(&["-c", "-f", path]);
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "only {checked} golden scripts found in {}",
        dir.display()
    );
    assert_eq!(
        ns.nft(&["list", "ruleset"]).trim(),
        "",
        "check mode installed something"
    );
}

#[tokio::test]
async fn apply_replaces_stale_and_old_tables_and_remove_leaves_others_alone() {
    let ns = Netns::create("life");
    let target = ns.target();

    // Somebody else's rules, and a table left over by a crashed meshd.
    ns.nft_script(
        "table inet other {
\tset keep { type ipv4_addr; elements = { 192.0.2.1 }; }
\tchain out { type filter hook output priority 0; policy accept; tcp dport 9 counter; }
}
table ip legacy { chain pre { type nat hook prerouting priority -100; }; }
table inet hostmesh { chain stale_chain { tcp dport 1 drop; }; }
",
    );
    let others_before = (
        ns.nft(&["list", "table", "inet", "other"]),
        ns.nft(&["list", "table", "ip", "legacy"]),
    );
    assert!(table_exists_in(&target, "hostmesh").await.unwrap());

    let first = CaptureSpec {
        endpoints: vec![
            "10.0.1.5:8080".parse().unwrap(),
            "[2001:db8::5]:8080".parse().unwrap(),
        ],
        strict_ports: vec![8080],
        exclude_addrs: vec!["10.0.0.1".parse().unwrap()],
        ..spec()
    };
    apply_in(&target, &first).await.unwrap();
    assert_eq!(ns.table_count("hostmesh"), 1);
    let listing = ns.nft(&["list", "table", "inet", "hostmesh"]);
    assert!(
        !listing.contains("stale_chain"),
        "stale table not replaced:\n{listing}"
    );
    for expected in [
        "meta mark 0x00000539 return",
        "udp dport 53 redirect to :15053",
        "tcp dport 53 redirect to :15053",
        "tcp dport @exclude_ports return",
        "ip daddr @exclude_addrs_v4 return",
        "fib daddr type local return",
        "ip daddr @vip_ranges_v4 meta l4proto tcp redirect to :15001",
        "ip6 daddr @vip_ranges_v6 meta l4proto tcp redirect to :15001",
        "ip daddr . tcp dport @endpoints_v4 redirect to :15001",
        "ip6 daddr . tcp dport @endpoints_v6 redirect to :15001",
        "10.0.1.5 . 8080",
        "2001:db8::5 . 8080",
        "240.240.0.0/16",
        "fd00:240::/96",
        "type nat hook output priority -100; policy accept;",
        "type filter hook input priority filter; policy accept;",
        "iifname != \"lo\" tcp dport @strict_ports ct state new drop",
    ] {
        assert!(
            listing.contains(expected),
            "missing {expected:?} in:\n{listing}"
        );
    }

    // A config change: different endpoints, DNS off, no strict services.
    let second = CaptureSpec {
        endpoints: vec!["10.0.1.7:9090".parse().unwrap()],
        dns_port: None,
        ..spec()
    };
    apply_in(&target, &second).await.unwrap();
    assert_eq!(ns.table_count("hostmesh"), 1);
    let listing = ns.nft(&["list", "table", "inet", "hostmesh"]);
    assert!(listing.contains("10.0.1.7 . 9090"), "{listing}");
    for gone in [
        "10.0.1.5",
        "2001:db8::5",
        "dport 53",
        "hook input",
        "exclude_addrs_v4",
    ] {
        assert!(!listing.contains(gone), "{gone:?} still there:\n{listing}");
    }

    // Applying the same spec again is a no-op replacement.
    apply_in(&target, &second).await.unwrap();
    assert_eq!(ns.nft(&["list", "table", "inet", "hostmesh"]), listing);

    // A spec nft refuses (a keyword as table name): the error carries nft's
    // stderr and nothing changes.
    let err = apply_in(
        &target,
        &CaptureSpec {
            table: "table".into(),
            ..spec()
        },
    )
    .await
    .unwrap_err();
    match &err {
        CaptureError::CommandFailed { stderr, .. } => {
            assert!(stderr.contains("syntax error"), "{err}")
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    // An invalid spec never reaches nft.
    let err = apply_in(&target, &CaptureSpec { mark: 0, ..spec() })
        .await
        .unwrap_err();
    assert!(
        matches!(err, CaptureError::InvalidSpec { field: "mark", .. }),
        "{err}"
    );
    assert_eq!(ns.nft(&["list", "table", "inet", "hostmesh"]), listing);

    assert!(remove_in(&target, "hostmesh").await.unwrap());
    assert!(!table_exists_in(&target, "hostmesh").await.unwrap());
    assert!(!remove_in(&target, "hostmesh").await.unwrap());
    let others_after = (
        ns.nft(&["list", "table", "inet", "other"]),
        ns.nft(&["list", "table", "ip", "legacy"]),
    );
    assert_eq!(others_before, others_after, "another table was touched");
}

#[tokio::test]
async fn thousands_of_endpoints_apply_as_one_set() {
    let ns = Netns::create("many");
    let endpoints: Vec<SocketAddr> = (0..5000u32)
        .map(|i| SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
        .chain((1..=500u16).map(|i| SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 443))))
        .collect();
    let started = Instant::now();
    apply_in(
        &ns.target(),
        &CaptureSpec {
            endpoints,
            ..spec()
        },
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let listing = ns.nft(&["list", "table", "inet", "hostmesh"]);
    assert_eq!(listing.matches(" . 8080").count(), 5000);
    assert_eq!(listing.matches(" . 443").count(), 500);
    assert!(took < Duration::from_secs(10), "applying took {took:?}");
}

#[tokio::test]
async fn vip_routes_are_added_where_missing_and_only_ours_are_removed() {
    let ns = Netns::create("routes");
    let target = ns.target();
    // An operator's route that covers one of the ranges: left alone.
    ns.ip(&["route", "add", "10.250.0.0/16", "dev", "lo"]);

    let ranges = [
        net("240.240.0.0/16"),
        net("fd00:240::/96"),
        net("10.250.0.0/16"),
    ];
    let added = ensure_vip_routes_in(&target, &ranges).await.unwrap();
    assert_eq!(added, vec![net("240.240.0.0/16"), net("fd00:240::/96")]);

    let proto = VIP_ROUTE_PROTO.to_string();
    let v4 = ns.ip(&["-4", "route", "show", "proto", &proto]);
    let v6 = ns.ip(&["-6", "route", "show", "proto", &proto]);
    assert!(v4.contains("240.240.0.0/16 dev lo"), "{v4}");
    assert!(v4.contains("src 127.0.0.1"), "{v4}");
    assert!(v6.contains("fd00:240::/96 dev lo"), "{v6}");
    assert!(v6.contains("src ::1"), "{v6}");
    assert!(!v4.contains("10.250"), "{v4}");
    // The kernel now routes a VIP (so a connect reaches the nat hook).
    ns.ip(&["route", "get", "240.240.7.7"]);
    ns.ip(&["-6", "route", "get", "fd00:240::7"]);

    // Idempotent.
    assert_eq!(
        ensure_vip_routes_in(&target, &ranges).await.unwrap(),
        vec![]
    );

    // A changed range: our old route goes, the new one comes.
    let changed = [net("240.241.0.0/16"), net("fd00:240::/96")];
    assert_eq!(
        ensure_vip_routes_in(&target, &changed).await.unwrap(),
        vec![net("240.241.0.0/16")]
    );
    let v4 = ns.ip(&["-4", "route", "show", "proto", &proto]);
    assert!(!v4.contains("240.240.0.0/16"), "{v4}");

    assert_eq!(remove_vip_routes_in(&target).await.unwrap(), 2);
    assert_eq!(remove_vip_routes_in(&target).await.unwrap(), 0);
    assert_eq!(ns.ip(&["-4", "route", "show", "proto", &proto]).trim(), "");
    assert_eq!(ns.ip(&["-6", "route", "show", "proto", &proto]).trim(), "");
    let all = ns.ip(&["route", "show"]);
    assert!(
        all.contains("10.250.0.0/16 dev lo"),
        "operator route removed: {all}"
    );

    // With a default route there is nothing to add.
    ns.ip(&["route", "add", "default", "dev", "lo"]);
    assert_eq!(
        ensure_vip_routes_in(&target, &[net("240.240.0.0/16")])
            .await
            .unwrap(),
        vec![]
    );
}

#[tokio::test]
async fn cleanup_removes_table_and_routes_and_is_safe_when_nothing_is_there() {
    let ns = Netns::create("clean");
    let target = ns.target();
    apply_in(&target, &spec()).await.unwrap();
    ensure_vip_routes_in(&target, &spec().vip_ranges)
        .await
        .unwrap();
    let report = cleanup_in(&target, "hostmesh").await.unwrap();
    assert_eq!(
        report,
        capture::CleanupReport {
            table_removed: true,
            routes_removed: 2
        }
    );
    assert_eq!(ns.nft(&["list", "ruleset"]).trim(), "");
    let report = cleanup_in(&target, "hostmesh").await.unwrap();
    assert_eq!(report, capture::CleanupReport::default());
}

#[tokio::test]
async fn capture_redirects_vips_endpoints_and_dns_but_not_marked_or_excluded_traffic() {
    let hosts = Pair::create("cap");
    let (a, b) = (&hosts.a, &hosts.b);

    // Host B: the "remote" side, listening on the ports used below.
    let _b_servers = serve(
        b,
        "b22@tcp:[::]:22,b8080@tcp:[::]:8080,b9090@tcp:[::]:9090,b53@tcp:[::]:53,b53udp@udp:[::]:53",
    )
    .await;
    // Host A: meshd's outbound and DNS listeners, on both loopbacks.
    let _a_servers = serve(
        a,
        "outbound@tcp:127.0.0.1:15001,outbound6@tcp:[::1]:15001,\
         dns@tcp:127.0.0.1:15053,dnsudp@udp:127.0.0.1:15053,dns6udp@udp:[::1]:15053",
    )
    .await;

    // Without rules, A reaches B directly and cannot reach a VIP at all.
    assert_eq!(lands(a, "tcp", "10.99.0.2:8080", None).await, "b8080");
    assert!(
        probe(a, "tcp", "240.240.0.10:80", None, NOWHERE_PATIENCE)
            .await
            .is_err()
    );

    let target = a.target();
    let added = ensure_vip_routes_in(&target, &spec().vip_ranges)
        .await
        .unwrap();
    assert_eq!(
        added.len(),
        2,
        "A has no default route; both VIP ranges need one"
    );
    let capture = CaptureSpec {
        endpoints: vec![
            "10.99.0.2:8080".parse().unwrap(),
            "10.99.0.2:22".parse().unwrap(),
            "[fd99::2]:8080".parse().unwrap(),
        ],
        ..spec()
    };
    apply_in(&target, &capture).await.unwrap();

    // VIPs, IPv4 and IPv6, land on meshd's outbound listener.
    assert_eq!(lands(a, "tcp", "240.240.0.10:80", None).await, "outbound");
    assert_eq!(lands(a, "tcp", "240.240.99.1:5432", None).await, "outbound");
    assert_eq!(
        lands(a, "tcp", "[fd00:240::10]:80", None).await,
        "outbound6"
    );
    // So do mesh endpoints, by real address and port...
    assert_eq!(lands(a, "tcp", "10.99.0.2:8080", None).await, "outbound");
    assert_eq!(lands(a, "tcp", "[fd99::2]:8080", None).await, "outbound6");
    // ...but not other ports of the same host.
    assert_eq!(lands(a, "tcp", "10.99.0.2:9090", None).await, "b9090");
    // Port 22 is never captured, even when listed as an endpoint.
    assert_eq!(lands(a, "tcp", "10.99.0.2:22", None).await, "b22");
    assert!(
        probe(a, "tcp", "240.240.0.10:22", None, NOWHERE_PATIENCE)
            .await
            .is_err(),
        "port 22 at a VIP must not be redirected (and then goes nowhere)"
    );
    // meshd's own (marked) sockets are never captured.
    assert_eq!(lands(a, "tcp", "10.99.0.2:8080", Some(MARK)).await, "b8080");
    let marked_vip = probe(a, "tcp", "240.240.0.10:80", Some(MARK), NOWHERE_PATIENCE).await;
    assert!(
        marked_vip.is_err(),
        "marked VIP connect landed on {marked_vip:?}"
    );
    assert_eq!(
        lands(a, "tcp", "10.99.0.2:8080", Some(MARK + 1)).await,
        "outbound"
    );
    // DNS, UDP and TCP, to any resolver, goes to meshd's DNS port.
    assert_eq!(lands(a, "udp", "10.99.0.2:53", None).await, "dnsudp");
    assert_eq!(lands(a, "udp", "[fd99::2]:53", None).await, "dns6udp");
    assert_eq!(lands(a, "tcp", "10.99.0.2:53", None).await, "dns");
    // ...except meshd's own queries upstream.
    assert_eq!(lands(a, "udp", "10.99.0.2:53", Some(MARK)).await, "b53udp");
    assert_eq!(lands(a, "tcp", "10.99.0.2:53", Some(MARK)).await, "b53");

    // After removal nothing is redirected any more, and a VIP goes nowhere.
    assert!(remove_in(&target, "hostmesh").await.unwrap());
    assert_eq!(lands(a, "tcp", "10.99.0.2:8080", None).await, "b8080");
    assert_eq!(lands(a, "udp", "10.99.0.2:53", None).await, "b53udp");
    let escaped = probe(a, "tcp", "240.240.0.10:80", None, NOWHERE_PATIENCE).await;
    assert!(
        escaped.is_err(),
        "VIP connect without capture landed on {escaped:?}"
    );
    assert_eq!(remove_vip_routes_in(&target).await.unwrap(), 2);
}

#[tokio::test]
async fn strict_mode_drops_plaintext_from_other_hosts() {
    let hosts = Pair::create("strict");
    let (a, b) = (&hosts.a, &hosts.b);
    let _b_servers = serve(
        b,
        "b22@tcp:[::]:22,b8080@tcp:[::]:8080,b9090@tcp:[::]:9090,tunnel@tcp:[::]:15008",
    )
    .await;

    // B serves a strict service on 8080 and a permissive one on 9090; 22
    // and the tunnel port are listed by mistake.
    let capture = CaptureSpec {
        strict_ports: vec![8080, 22, 15008],
        ..spec()
    };
    apply_in(&b.target(), &capture).await.unwrap();

    for to in ["10.99.0.2:8080", "[fd99::2]:8080"] {
        let dropped = probe(a, "tcp", to, None, NOWHERE_PATIENCE).await;
        assert!(
            dropped.is_err(),
            "plaintext to strict {to} landed on {dropped:?}"
        );
    }
    assert_eq!(lands(a, "tcp", "10.99.0.2:9090", None).await, "b9090");
    assert_eq!(lands(a, "tcp", "10.99.0.2:15008", None).await, "tunnel");
    assert_eq!(lands(a, "tcp", "[fd99::2]:15008", None).await, "tunnel");
    assert_eq!(lands(a, "tcp", "10.99.0.2:22", None).await, "b22");
    // On B itself (over lo, as meshd's inbound proxy connects) it is open,
    // to the loopback and to the host's own address alike.
    assert_eq!(lands(b, "tcp", "127.0.0.1:8080", None).await, "b8080");
    assert_eq!(lands(b, "tcp", "10.99.0.2:8080", None).await, "b8080");

    // Permissive again: reachable.
    apply_in(&b.target(), &spec()).await.unwrap();
    assert_eq!(lands(a, "tcp", "10.99.0.2:8080", None).await, "b8080");
}

// ---------------------------------------------------------------- helper process

/// Not a test: the entry point of the helper processes the tests above start
/// inside a namespace (see the module docs). Does nothing without
/// `HM_CAPTURE_HELPER`.
#[test]
#[ignore = "helper process entry point, started by the namespace tests"]
fn capture_helper_entry() {
    match std::env::var("HM_CAPTURE_HELPER").as_deref() {
        Ok("serve") => helper_serve(),
        Ok("connect") => helper_connect(),
        _ => {}
    }
}

fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "HM {line}").expect("writing to stdout");
    out.flush().expect("flushing stdout");
}

fn helper_serve() {
    let spec = std::env::var("HM_LISTEN").expect("HM_LISTEN");
    let mut threads = Vec::new();
    for entry in spec.split(',') {
        let (tag, rest) = entry.split_once('@').expect("tag@proto:addr");
        let (proto, addr) = rest.split_once(':').expect("proto:addr");
        let addr: SocketAddr = match addr.parse() {
            Ok(addr) => addr,
            Err(e) => return report(&format!("error bad address {addr}: {e}")),
        };
        let tag = tag.to_string();
        match proto {
            "tcp" => {
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => return report(&format!("error binding tcp {addr}: {e}")),
                };
                threads.push(std::thread::spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let mut stream = stream;
                        let _ = stream.write_all(format!("{tag}\n").as_bytes());
                    }
                }));
            }
            "udp" => {
                let socket = match UdpSocket::bind(addr) {
                    Ok(s) => s,
                    Err(e) => return report(&format!("error binding udp {addr}: {e}")),
                };
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while let Ok((_, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(format!("{tag}\n").as_bytes(), from);
                    }
                }));
            }
            other => return report(&format!("error unknown protocol {other}")),
        }
    }
    report("ready");
    // Serve until the test kills this process.
    for thread in threads {
        let _ = thread.join();
    }
}

fn helper_connect() {
    let proto = std::env::var("HM_PROTO").expect("HM_PROTO");
    let to: SocketAddr = std::env::var("HM_TO")
        .expect("HM_TO")
        .parse()
        .expect("HM_TO is an address");
    let patience = Duration::from_millis(
        std::env::var("HM_PATIENCE_MS")
            .expect("HM_PATIENCE_MS")
            .parse()
            .expect("HM_PATIENCE_MS is a number"),
    );
    let mark: Option<u32> = std::env::var("HM_MARK")
        .ok()
        .map(|m| m.parse().expect("HM_MARK"));
    let deadline = Instant::now() + patience;

    let result = if proto == "udp" {
        udp_exchange(to, mark, patience)
    } else {
        tcp_exchange(to, mark, patience, deadline)
    };
    match result {
        Ok(tag) => report(&format!("landed {tag}")),
        Err(why) => report(&format!("failed {why}")),
    }
}

fn socket_for(
    to: SocketAddr,
    ty: Type,
    proto: Protocol,
    mark: Option<u32>,
) -> Result<Socket, String> {
    let socket =
        Socket::new(Domain::for_address(to), ty, Some(proto)).map_err(|e| e.to_string())?;
    if let Some(mark) = mark {
        socket.set_mark(mark).map_err(|e| format!("SO_MARK: {e}"))?;
    }
    Ok(socket)
}

fn tcp_exchange(
    to: SocketAddr,
    mark: Option<u32>,
    patience: Duration,
    deadline: Instant,
) -> Result<String, String> {
    let socket = socket_for(to, Type::STREAM, Protocol::TCP, mark)?;
    socket
        .connect_timeout(&to.into(), patience)
        .map_err(|e| format!("connect: {e}"))?;
    let mut stream: TcpStream = socket.into();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let mut banner = String::new();
    stream
        .read_to_string(&mut banner)
        .map_err(|e| format!("read: {e}"))?;
    banner
        .lines()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "connected, but no banner".to_string())
}

fn udp_exchange(to: SocketAddr, mark: Option<u32>, patience: Duration) -> Result<String, String> {
    let socket = socket_for(to, Type::DGRAM, Protocol::UDP, mark)?;
    let socket: UdpSocket = socket.into();
    socket.connect(to).map_err(|e| format!("connect: {e}"))?;
    socket
        .set_read_timeout(Some(patience))
        .map_err(|e| e.to_string())?;
    socket.send(b"query").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    reply
        .lines()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "empty reply".to_string())
}
