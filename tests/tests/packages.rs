//! hostmesh's packages, for real: the four packages are built from this
//! build's binaries by `packaging/build.sh` (the same script `make packages`
//! runs for release), checked with lintian and rpm, then installed into
//! booted Debian 12 systemd containers (systemd-nspawn, each in a lab
//! host's network namespace) with apt, with rpm and with the Ansible roles,
//! joined to a controller running outside the container, run under the
//! unit's hardening, crashed, upgraded, removed and purged.
//!
//! What this cannot cover (no RPM distribution root can be made here: the
//! RPMs are installed with `rpm --nodeps` into the Debian root) is written
//! down in docs/PACKAGING.md.

#![allow(clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hostmesh_tests::container::{self, Container};
use hostmesh_tests::mesh::{MeshLab, StoreKind};
use hostmesh_tests::{eventually, json, output, run_ok};
use serde_json::Value;

const MESH: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: web, namespace: shop}
spec: {labels: {app: web}, services: [web]}
"#;

const LEASE_TTL_S: u64 = 15;

/// CAP_NET_ADMIN (bit 12), as /proc/PID/status shows capability sets.
const CAP_NET_ADMIN_ONLY: &str = "0000000000001000";

struct Packages {
    meshd_deb: PathBuf,
    controller_deb: PathBuf,
    meshd_rpm: PathBuf,
    controller_rpm: PathBuf,
}

/// The four packages, built once per run from the binaries the tests use
/// (`--no-build`, light compression): the files, units and scripts are the
/// release packages' own; only the binaries' optimisation differs.
fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Packages> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        let bin_dir = hostmesh_tests::bin("meshd")
            .parent()
            .expect("binary directory")
            .to_path_buf();
        let profile = match bin_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(other) => other.to_string(),
            None => panic!("unexpected binary directory {}", bin_dir.display()),
        };
        let out = container::run_dir().join("packages");
        let started = Instant::now();
        let listing = run_ok(
            Command::new(container::repo_dir().join("packaging/build.sh"))
                .args(["--profile", &profile, "--no-build", "--fast", "--out"])
                .arg(&out)
                .env("CARGO_TARGET_DIR", container::target_dir()),
        );
        let find = |prefix: &str, suffix: &str| -> PathBuf {
            listing
                .lines()
                .map(PathBuf::from)
                .find(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    name.starts_with(prefix) && name.ends_with(suffix)
                })
                .unwrap_or_else(|| panic!("build.sh made no {prefix}*{suffix}:\n{listing}"))
        };
        let packages = Packages {
            meshd_deb: find("meshd_", ".deb"),
            controller_deb: find("mesh-controller_", ".deb"),
            meshd_rpm: find("meshd-", ".rpm"),
            controller_rpm: find("mesh-controller-", ".rpm"),
        };
        eprintln!(
            "packages test: the four packages built in {:.0?}",
            started.elapsed()
        );
        packages
    })
}

/// Boots a container in lab host `host`, named after its namespace, with
/// the lab's resolver (on the lab's link: without a default route, queries
/// to any other address could not even be sent to be captured).
fn boot(m: &MeshLab, host: usize) -> Container {
    let ns = m.lab.host(host).ns.clone();
    let c = Container::boot(container::debian_root(), &ns, &ns, m.lab.dir.path());
    c.sh_ok(&format!(
        "rm -f /etc/resolv.conf && echo 'nameserver {}' > /etc/resolv.conf",
        hostmesh_tests::LAB_NAMESERVER
    ));
    c
}

/// A field of /proc/PID/status inside the container.
fn proc_status_field(c: &Container, pid: &str, field: &str) -> String {
    let status = c.sh_ok(&format!("cat /proc/{pid}/status"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

/// The controller's view of the host at `address`: ready and in sync.
fn registered(m: &MeshLab, address: &str) -> Result<Value, String> {
    let st = m.status();
    let host = st["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["address"] == address)
        .cloned()
        .ok_or_else(|| format!("{address} not in meshctl status: {st}"))?;
    if host["state"] == "ready" && host["inSync"] == true {
        Ok(host)
    } else {
        Err(format!("{host}"))
    }
}

fn has_hostmesh_table(c: &Container) -> bool {
    c.sh_ok("nft list tables").contains("table inet hostmesh")
}

fn wait_active(c: &Container, unit: &str) {
    eventually(
        &format!("{unit} active in {}", c.name),
        Duration::from_secs(30),
        || match c.unit_property(unit, "ActiveState").as_str() {
            "active" => Ok(()),
            "failed" => panic!("{unit} failed in {}:\n{}", c.name, c.unit_journal(unit)),
            other => Err(other.to_string()),
        },
    );
}

/// The first line of `meshctl token create` output that is a `meshd join`
/// command with the token (in its environment, kept off the command line).
fn printed_join_line(printed: &str) -> String {
    printed
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("HOSTMESH_JOIN_TOKEN=") && l.contains(" meshd join "))
        .unwrap_or_else(|| panic!("no `meshd join` line in:\n{printed}"))
        .to_string()
}

/// The same .deb with another version, to exercise the upgrade path.
fn repack_deb(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join(format!("repack-{version}"));
    let _ = std::fs::remove_dir_all(&tree);
    run_ok(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).expect("control file");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&control, text).expect("writing control");
    let out = dir.join(format!("meshd_{version}_repacked.deb"));
    run_ok(
        Command::new("dpkg-deb")
            .args(["-Zgzip", "-z1", "--root-owner-group", "-b"])
            .arg(&tree)
            .arg(&out),
    );
    out
}

#[test]
fn shipped_configs_document_every_setting_with_its_default() {
    let repo = container::repo_dir();
    let meshd = std::fs::read_to_string(repo.join("packaging/config/meshd.toml"))
        .expect("packaging/config/meshd.toml");
    let parsed = hostmesh_meshd::config::MeshdConfig::from_toml(&uncomment(&meshd), "meshd.toml")
        .unwrap_or_else(|e| panic!("the uncommented meshd.toml does not parse: {e}"));
    assert_eq!(
        parsed,
        hostmesh_meshd::config::MeshdConfig::default(),
        "packaging/config/meshd.toml shows a value that is not meshd's default"
    );
    assert_documents_every_key(
        &meshd,
        &serde_json::to_value(hostmesh_meshd::config::MeshdConfig::default()).expect("json"),
        "packaging/config/meshd.toml",
    );

    let controller = std::fs::read_to_string(repo.join("packaging/config/controller.toml"))
        .expect("packaging/config/controller.toml");
    let parsed = hostmesh_controller::config::ControllerConfig::from_toml(
        &uncomment(&controller),
        "controller.toml",
    )
    .unwrap_or_else(|e| panic!("the uncommented controller.toml does not parse: {e}"));
    assert_eq!(
        parsed,
        hostmesh_controller::config::ControllerConfig::default(),
        "packaging/config/controller.toml shows a value that is not the controller's default"
    );
    assert_documents_every_key(
        &controller,
        &serde_json::to_value(hostmesh_controller::config::ControllerConfig::default())
            .expect("json"),
        "packaging/config/controller.toml",
    );
}

/// `#key = value` lines (defaults) become settings; everything else stays.
fn uncomment(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with(|c: char| c.is_ascii_lowercase()) && rest.contains(" = ") =>
            {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

/// Every setting of the built-in default appears in the shipped file, as
/// `#key = …` (a default) or `# key = …` (an example of an unset setting).
fn assert_documents_every_key(text: &str, defaults: &Value, file: &str) {
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        if let Some((key, _)) = rest.split_once(" = ")
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            documented
                .entry(section.clone())
                .or_default()
                .insert(key.to_string());
        }
    }
    let mut missing = Vec::new();
    for (key, value) in defaults.as_object().expect("a config is an object") {
        match value.as_object() {
            Some(fields) => {
                for field in fields.keys() {
                    if !documented.get(key).is_some_and(|s| s.contains(field)) {
                        missing.push(format!("[{key}] {field}"));
                    }
                }
            }
            None => {
                if !documented.get("").is_some_and(|s| s.contains(key)) {
                    missing.push(key.clone());
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{file} does not document these settings (add `#key = default`): {missing:?}"
    );
}

#[test]
fn packages_carry_the_right_files_metadata_and_scripts_and_pass_lintian() {
    let p = packages();

    // lintian: no error and no warning (overrides are in
    // packaging/deb/*/lintian-overrides, each with its reason). Its own
    // TMPDIR: lintian leaves mldbm-elf-* files behind.
    let lint_tmp = container::run_dir().join("lintian-tmp");
    std::fs::create_dir_all(&lint_tmp).expect("lintian's TMPDIR");
    let lint = output(
        Command::new("lintian")
            .env("TMPDIR", &lint_tmp)
            .args(["--fail-on", "error,warning", "--info"])
            .arg(&p.meshd_deb)
            .arg(&p.controller_deb),
    );
    assert!(
        lint.status.success(),
        "lintian found problems:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // .deb metadata, files, conffiles and maintainer scripts.
    let field = |deb: &Path, name: &str| {
        run_ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field(&p.meshd_deb, "Package"), "meshd");
    assert_eq!(field(&p.controller_deb, "Package"), "mesh-controller");
    let depends = field(&p.meshd_deb, "Depends");
    for dep in ["nftables", "iproute2", "libc6", "systemd"] {
        assert!(depends.contains(dep), "meshd Depends: {depends}");
    }
    let deb_files = |deb: &Path| -> BTreeMap<String, String> {
        run_ok(Command::new("dpkg-deb").arg("-c").arg(deb))
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                let path = cols.get(5)?.trim_start_matches('.').to_string();
                Some((path, format!("{} {}", cols[0], cols[1])))
            })
            .collect()
    };
    let files = deb_files(&p.meshd_deb);
    for (path, mode) in [
        ("/usr/bin/meshd", "-rwxr-xr-x 0/0"),
        ("/usr/lib/systemd/system/meshd.service", "-rw-r--r-- 0/0"),
        ("/usr/lib/sysusers.d/meshd.conf", "-rw-r--r-- 0/0"),
        ("/usr/lib/tmpfiles.d/meshd.conf", "-rw-r--r-- 0/0"),
        ("/etc/hostmesh/meshd.toml", "-rw-r--r-- 0/0"),
        ("/usr/share/man/man8/meshd.8.gz", "-rw-r--r-- 0/0"),
        ("/usr/share/doc/meshd/examples/meshd.toml", "-rw-r--r-- 0/0"),
        ("/usr/share/doc/meshd/copyright", "-rw-r--r-- 0/0"),
    ] {
        assert_eq!(
            files.get(path).map(String::as_str),
            Some(mode),
            "{path} in the meshd .deb: {files:#?}"
        );
    }
    let files = deb_files(&p.controller_deb);
    for path in [
        "/usr/bin/mesh-controller",
        "/usr/bin/meshctl",
        "/usr/lib/systemd/system/mesh-controller.service",
        "/usr/lib/sysusers.d/mesh-controller.conf",
        "/etc/hostmesh/controller.toml",
        "/usr/share/man/man8/mesh-controller.8.gz",
        "/usr/share/man/man1/meshctl.1.gz",
    ] {
        assert!(
            files.contains_key(path),
            "{path} in the mesh-controller .deb"
        );
    }
    let control =
        |deb: &Path, member: &str| run_ok(Command::new("dpkg-deb").arg("-I").arg(deb).arg(member));
    assert_eq!(
        control(&p.meshd_deb, "conffiles").trim(),
        "/etc/hostmesh/meshd.toml"
    );
    assert_eq!(
        control(&p.controller_deb, "conffiles").trim(),
        "/etc/hostmesh/controller.toml"
    );
    let postinst = control(&p.meshd_deb, "postinst");
    for want in [
        "systemd-sysusers",
        "systemd-tmpfiles --create meshd.conf",
        "deb-systemd-helper enable meshd.service",
        "deb-systemd-invoke try-restart meshd.service",
    ] {
        assert!(
            postinst.contains(want),
            "meshd postinst lacks {want}:\n{postinst}"
        );
    }
    assert!(
        !postinst.contains("deb-systemd-invoke start") && !postinst.contains("_dh_action=start"),
        "meshd's postinst must never start meshd (the host has not joined):\n{postinst}"
    );
    let postinst = control(&p.controller_deb, "postinst");
    assert!(
        postinst.contains("_dh_action=start"),
        "the controller starts on install:\n{postinst}"
    );
    let postrm = control(&p.meshd_deb, "postrm");
    assert!(
        postrm.contains("rm -f \"/var/lib/hostmesh/$f\""),
        "{postrm}"
    );

    // .rpm metadata, files with owners and modes, config files, scripts.
    let rpm_q =
        |rpm: &Path, args: &[&str]| run_ok(Command::new("rpm").arg("-qp").args(args).arg(rpm));
    let info = rpm_q(
        &p.meshd_rpm,
        &["--qf", "%{NAME}|%{RELEASE}|%{ARCH}|%{LICENSE}|%{URL}\n"],
    );
    assert_eq!(
        info.trim(),
        "meshd|1|x86_64|Apache-2.0|https://example.invalid/hostmesh"
    );
    let listing = rpm_q(
        &p.meshd_rpm,
        &[
            "--qf",
            "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS} %{FILENAMES}\n]",
        ],
    );
    let expected = [
        "drwxr-xr-x root:root 0 /etc/hostmesh",
        // %config(noreplace): RPMFILE_CONFIG | RPMFILE_NOREPLACE.
        "-rw-r--r-- root:root 17 /etc/hostmesh/meshd.toml",
        "-rwxr-xr-x root:root 0 /usr/bin/meshd",
        "-rw-r--r-- root:root 0 /usr/lib/systemd/system/meshd.service",
        "-rw-r--r-- root:root 0 /usr/lib/sysusers.d/meshd.conf",
        "-rw-r--r-- root:root 0 /usr/lib/tmpfiles.d/meshd.conf",
        "drwxr-xr-x root:root 0 /usr/share/doc/meshd",
        // %doc: RPMFILE_DOC.
        "-rw-r--r-- root:root 2 /usr/share/doc/meshd/PACKAGING.md",
        "drwxr-xr-x root:root 0 /usr/share/doc/meshd/examples",
        "-rw-r--r-- root:root 2 /usr/share/doc/meshd/examples/meshd.toml",
        // Man pages are documentation to rpm as well.
        "-rw-r--r-- root:root 2 /usr/share/man/man8/meshd.8.gz",
        "drwx------ meshd:meshd 0 /var/lib/hostmesh",
    ];
    let got: Vec<&str> = listing.lines().collect();
    assert_eq!(got, expected, "rpm -qpl of the meshd rpm");
    let listing = rpm_q(&p.controller_rpm, &["-l"]);
    for path in [
        "/usr/bin/mesh-controller",
        "/usr/bin/meshctl",
        "/usr/lib/systemd/system/mesh-controller.service",
        "/etc/hostmesh/controller.toml",
        "/var/lib/hostmesh/controller",
    ] {
        assert!(
            listing.lines().any(|l| l == path),
            "{path} in the mesh-controller rpm:\n{listing}"
        );
    }
    let requires = rpm_q(&p.meshd_rpm, &["-R"]);
    for dep in [
        "nftables",
        "iproute",
        "systemd",
        "shadow-utils",
        "libc.so.6()(64bit)",
    ] {
        assert!(
            requires.lines().any(|l| l.trim() == dep),
            "meshd rpm requires {dep}:\n{requires}"
        );
    }
    let scripts = rpm_q(&p.meshd_rpm, &["--scripts"]);
    for want in [
        "useradd -r -g meshd -d /var/lib/hostmesh",
        "systemctl --no-reload enable meshd.service",
        "systemctl --no-reload disable --now meshd.service",
        "/usr/bin/meshd cleanup",
        "systemctl try-restart meshd.service",
    ] {
        assert!(
            scripts.contains(want),
            "meshd rpm scripts lack {want}:\n{scripts}"
        );
    }
}

#[test]
fn deb_installs_offline_joins_with_the_printed_line_runs_hardened_and_purges_clean() {
    hostmesh_tests::require_root();
    container::prepare_debian_root();
    let p = packages();
    let m = MeshLab::start(2, StoreKind::Embedded, LEASE_TTL_S);
    m.apply(MESH);
    let host_addr = m.lab.host(1).addr.to_string();
    let c = boot(&m, 1);

    // apt installs it from the file alone: every dependency is in the root
    // (the container has no mirror).
    let deb = c.put(&p.meshd_deb, "/root");
    c.sh_ok(&format!("apt-get install -y -q {deb}"));
    assert_eq!(c.unit_property("meshd.service", "UnitFileState"), "enabled");
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "inactive");
    assert_eq!(
        c.sh_ok("getent passwd meshd | cut -d: -f6,7").trim(),
        "/var/lib/hostmesh:/usr/sbin/nologin"
    );
    assert_eq!(
        c.sh_ok("stat -c '%a %U:%G' /var/lib/hostmesh /etc/hostmesh /etc/hostmesh/meshd.toml")
            .lines()
            .collect::<Vec<_>>(),
        ["700 meshd:meshd", "755 root:root", "644 root:root"]
    );
    c.sh_ok("systemd-analyze verify --man=no meshd.service");

    // Before joining, a start is skipped (not failed): nothing to serve.
    c.sh_ok("systemctl start meshd");
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "inactive");
    assert_eq!(c.unit_property("meshd.service", "ConditionResult"), "no");

    // The join line exactly as `meshctl token create` prints it.
    let printed = m.meshctl_ok(&["token", "create", "--group", "shop/web"]);
    c.sh_ok(&printed_join_line(&printed));
    assert_eq!(
        c.sh_ok("stat -c '%a %U' /var/lib/hostmesh/key.pem").trim(),
        "600 meshd"
    );
    c.sh_ok("systemctl start meshd");
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "active");

    // It runs as meshd with CAP_NET_ADMIN and nothing else, sandboxed...
    let pid = c.unit_property("meshd.service", "MainPID");
    let uid = c.sh_ok("id -u meshd").trim().to_string();
    assert_eq!(proc_status_field(&c, &pid, "Uid"), uid);
    assert_eq!(proc_status_field(&c, &pid, "CapEff"), CAP_NET_ADMIN_ONLY);
    assert_eq!(proc_status_field(&c, &pid, "CapBnd"), CAP_NET_ADMIN_ONLY);
    assert_eq!(proc_status_field(&c, &pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status_field(&c, &pid, "Seccomp"), "2");
    // ...and capture works under those limits: its table is in place, and
    // a plain program's DNS query to port 53 is redirected to meshd, which
    // answers the mesh name with the service's VIP.
    assert!(has_hostmesh_table(&c), "{}", c.unit_journal("meshd"));
    let node = m.eventually(
        "the host registered and in sync",
        Duration::from_secs(20),
        || registered(&m, &host_addr),
    );
    assert_eq!(node["hostname"], c.name.as_str(), "{node}");
    let vip = eventually(
        "web.shop.mesh to resolve in the container",
        Duration::from_secs(20),
        || {
            let out = c.sh("getent hosts web.shop.mesh");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            match text.split_whitespace().next() {
                Some(a) if a.starts_with("240.240.") => Ok(a.to_string()),
                _ => Err(format!("{text:?}")),
            }
        },
    );
    let status = c.sh_ok("meshd status");
    assert!(status.contains("ready:       true"), "{status}");
    // Neither the mesh nor meshd.toml chooses a transport here.
    assert!(
        status.contains("transport:   tcp (this host: unset, the mesh: unset)\n"),
        "{status}"
    );
    // The unit's system call filter lets the data worker ask for its
    // scheduler slice (sched_setattr is in @system-service); custom slices
    // need Linux 6.12.
    if hostmesh_tests::kernel_at_least(6, 12) {
        assert!(
            status.contains("scheduler:   data workers' slice 100 µs"),
            "{status}"
        );
        let sched = c.sh_ok(&format!("cat /proc/{pid}/sched"));
        assert!(
            sched
                .lines()
                .any(|l| l.starts_with("se.slice") && l.trim_end().ends_with(" 100000")),
            "{sched}"
        );
    }
    // Where glibc's large copies have the slow case, meshd started itself
    // again with them mended, also under the unit's limits (the checks of
    // its user, capabilities and filter above are of the process after).
    let copies = status
        .lines()
        .find(|l| l.starts_with("copies:"))
        .unwrap_or_else(|| panic!("no copies line: {status}"));
    if hostmesh_meshd::memcpy::probe() >= 1.5 * hostmesh_meshd::memcpy::SLOW {
        assert!(copies.contains("rep movsb turned off"), "{status}");
    }
    let exposure = c.sh_ok("systemd-analyze security --no-pager meshd.service | tail -n 1");
    eprintln!(
        "packages test: meshd from the .deb serves, web.shop.mesh is {vip}; {}",
        exposure.trim()
    );

    // systemctl stop: meshd drains and removes its own table (ExecStopPost's
    // cleanup then finds nothing).
    c.sh_ok("systemctl stop meshd");
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "inactive");
    assert!(!has_hostmesh_table(&c), "the table outlived meshd");
    let journal = c.unit_journal("meshd");
    assert!(journal.contains("capture removed"), "{journal}");
    assert!(
        journal.contains("meshd: cleanup: no table inet hostmesh"),
        "{journal}"
    );

    // A crash: ExecStopPost removes the table (running as meshd, with the
    // capability), Restart=on-failure brings meshd back.
    c.sh_ok("systemctl start meshd");
    let old = c.unit_property("meshd.service", "MainPID");
    c.sh_ok("systemctl kill --signal=SIGKILL --kill-who=main meshd");
    eventually(
        "meshd restarted after SIGKILL",
        Duration::from_secs(30),
        || {
            let pid = c.unit_property("meshd.service", "MainPID");
            let state = c.unit_property("meshd.service", "ActiveState");
            if state == "active" && pid != old && pid != "0" {
                Ok(())
            } else {
                Err(format!("{state} {pid}"))
            }
        },
    );
    assert_eq!(c.unit_property("meshd.service", "NRestarts"), "1");
    let journal = c.unit_journal("meshd");
    assert!(
        journal.contains("meshd: cleanup: removed table inet hostmesh"),
        "ExecStopPost did not clean up after the crash:\n{journal}"
    );
    assert!(has_hostmesh_table(&c));

    // The watchdog: meshd keeps pinging within a 4 s WatchdogSec; a meshd
    // that hangs (SIGSTOP) is killed and restarted by systemd.
    c.sh_ok(
        "mkdir -p /run/systemd/system/meshd.service.d && printf '[Service]\\nWatchdogSec=4s\\nTimeoutAbortSec=2s\\n' > /run/systemd/system/meshd.service.d/test-watchdog.conf && systemctl daemon-reload && systemctl restart meshd",
    );
    let hung = c.unit_property("meshd.service", "MainPID");
    let mut pings = BTreeSet::new();
    eventually("three watchdog pings", Duration::from_secs(15), || {
        pings.insert(c.unit_property("meshd.service", "WatchdogTimestampMonotonic"));
        if pings.len() >= 3 {
            Ok(())
        } else {
            Err(format!("{pings:?}"))
        }
    });
    assert_eq!(c.unit_property("meshd.service", "MainPID"), hung);
    c.sh_ok("systemctl kill --signal=SIGSTOP --kill-who=main meshd");
    eventually(
        "systemd to restart the hung meshd",
        Duration::from_secs(30),
        || {
            let pid = c.unit_property("meshd.service", "MainPID");
            let state = c.unit_property("meshd.service", "ActiveState");
            if state == "active" && pid != hung && pid != "0" {
                Ok(())
            } else {
                Err(format!("{state} {pid}"))
            }
        },
    );
    let journal = c.unit_journal("meshd");
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    c.sh_ok(
        "rm -r /run/systemd/system/meshd.service.d && systemctl daemon-reload && systemctl restart meshd",
    );

    // An upgrade restarts meshd on the new package, keeps the identity.
    let before = c.unit_property("meshd.service", "MainPID");
    let host_id = c.sh_ok("cat /var/lib/hostmesh/host.json");
    let newer = repack_deb(&p.meshd_deb, "99.0.0-1", m.lab.dir.path());
    let newer = c.put(&newer, "/root");
    c.sh_ok(&format!("apt-get install -y -q {newer}"));
    assert_eq!(
        c.sh_ok("dpkg-query -W -f '${Version}' meshd").trim(),
        "99.0.0-1"
    );
    wait_active(&c, "meshd.service");
    assert_ne!(c.unit_property("meshd.service", "MainPID"), before);
    assert_eq!(c.sh_ok("cat /var/lib/hostmesh/host.json"), host_id);
    m.eventually(
        "the host back after the upgrade",
        Duration::from_secs(20),
        || registered(&m, &host_addr),
    );

    // The controller's package on the same host: it starts at install, its
    // data directory inside meshd's private state directory is reachable
    // (the unit gives it a view of its own), and root's meshctl works.
    let deb = c.put(&p.controller_deb, "/root");
    c.sh_ok(&format!("apt-get install -y -q {deb}"));
    wait_active(&c, "mesh-controller.service");
    c.sh_ok("systemd-analyze verify --man=no mesh-controller.service");
    let pid = c.unit_property("mesh-controller.service", "MainPID");
    let uid = c.sh_ok("id -u mesh-controller").trim().to_string();
    assert_eq!(proc_status_field(&c, &pid, "Uid"), uid);
    assert_eq!(proc_status_field(&c, &pid, "CapEff"), "0000000000000000");
    let st = c.sh_ok("meshctl status");
    assert!(st.contains("No hosts have joined"), "{st}");
    assert_eq!(
        c.sh_ok("stat -c '%a %U' /var/lib/hostmesh/controller/admin.conf")
            .trim(),
        "600 mesh-controller"
    );
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "active");

    // Purge: everything goes, nothing is left running or redirecting.
    c.sh_ok("apt-get purge -y -q meshd mesh-controller");
    for unit in ["meshd.service", "mesh-controller.service"] {
        assert_eq!(c.unit_property(unit, "LoadState"), "not-found", "{unit}");
    }
    assert!(!has_hostmesh_table(&c), "the table outlived the package");
    let routes = c.sh_ok("ip route show; ip -6 route show");
    assert!(
        !routes.contains("240.240.") && !routes.contains("fd00:240:"),
        "{routes}"
    );
    let left = c.sh_ok(
        "for p in /usr/bin/meshd /usr/bin/mesh-controller /usr/bin/meshctl /etc/hostmesh \
         /var/lib/hostmesh /usr/lib/systemd/system/meshd.service \
         /etc/systemd/system/multi-user.target.wants/meshd.service \
         /etc/systemd/system/multi-user.target.wants/mesh-controller.service \
         /var/cache/hostmesh; do [ -e \"$p\" ] && echo \"$p\"; done; \
         find / -xdev \\( -user meshd -o -user mesh-controller \\) -print; \
         dpkg-query -W -f '${db:Status-Status} ${Package}\\n' meshd mesh-controller 2>/dev/null | grep -v '^not-installed' || true",
    );
    assert_eq!(left.trim(), "", "left behind after purge");
    // The system users stay, as Debian packages leave them (docs/PACKAGING.md).
    c.sh_ok("getent passwd meshd mesh-controller");
}

#[test]
fn ansible_roles_reach_the_same_state_and_a_second_run_changes_nothing() {
    hostmesh_tests::require_root();
    container::prepare_debian_root();
    container::prepare_ansible();
    let p = packages();
    let m = MeshLab::start(3, StoreKind::Embedded, LEASE_TTL_S);
    m.apply(MESH);
    let node_addr = m.lab.host(1).addr.to_string();
    let venv = container::ansible_venv();
    let work = m.lab.dir.path().join("ansible");
    std::fs::create_dir_all(work.join("connection_plugins")).expect("ansible dir");
    std::fs::write(
        work.join("connection_plugins/nsenter.py"),
        container::NSENTER_CONNECTION,
    )
    .expect("writing the connection plugin");
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ansible = |program: &str| {
        let mut c = Command::new(venv.join("bin").join(program));
        c.env("PATH", &path)
            .env("ANSIBLE_HOME", work.join("home"))
            .env("XDG_CACHE_HOME", work.join("cache"))
            .env(
                "ANSIBLE_CONNECTION_PLUGINS",
                work.join("connection_plugins"),
            )
            .env("ANSIBLE_PIPELINING", "1")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("NO_COLOR", "1")
            .env_remove("ANSIBLE_CONFIG");
        c
    };

    // The roles and the example playbook are lint-clean (production profile).
    let lint = output(
        ansible("ansible-lint")
            .current_dir(container::repo_dir().join("ansible"))
            .arg("--nocolor"),
    );
    assert!(
        lint.status.success(),
        "ansible-lint:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let node = boot(&m, 1);
    let ctl = boot(&m, 2);

    // The role takes the values `meshctl token create -o json` prints.
    let token = json(&m.meshctl_ok(&["token", "create", "--group", "shop/web", "-o", "json"]));
    let secret = token["token"].as_str().expect("token").to_string();
    let vars = serde_json::json!({
        "hostmesh_meshd_controller": token["controller"],
        "hostmesh_meshd_join_token": token["token"],
        "hostmesh_meshd_ca_hash": token["caHash"],
        "hostmesh_meshd_package_file": p.meshd_deb,
        "hostmesh_controller_package_file": p.controller_deb,
        // Rendered as a [proxy.peer_transport] table, which meshd checks
        // when it starts (no such peers here).
        "hostmesh_meshd_proxy_peer_transport": {"10.99.0.0/16": "quic", "10.99.0.7": "tcp"},
        // Rendered as [[mesh.peer_transport]] tables, which the controller
        // checks when it starts.
        "hostmesh_controller_mesh_peer_transport": [
            {"hosts": ["10.99.0.0/16"], "peers": ["10.98.0.0/16", "10.97.0.7"], "transport": "quic"},
            {"peers": ["10.96.0.0/16"], "transport": "tcp"},
        ],
    });
    let vars_file = work.join("join.json");
    std::fs::write(&vars_file, vars.to_string()).expect("writing join.json");
    let inventory = work.join("inventory.yml");
    std::fs::write(
        &inventory,
        format!(
            "all:\n  vars:\n    ansible_connection: nsenter\n    ansible_python_interpreter: /usr/bin/python3\n    \
             ansible_become: false\n  children:\n    mesh_controllers:\n      hosts:\n        ctl:\n          \
             ansible_nsenter_pid: {}\n    mesh_hosts:\n      hosts:\n        node:\n          ansible_nsenter_pid: {}\n",
            ctl.pid1(),
            node.pid1()
        ),
    )
    .expect("writing the inventory");
    let playbook = container::repo_dir().join("ansible/site.yml");
    let run = |what: &str| -> BTreeMap<String, BTreeMap<String, u64>> {
        let started = Instant::now();
        let out = output(
            ansible("ansible-playbook")
                .current_dir(&work)
                .arg("-i")
                .arg(&inventory)
                .arg(&playbook)
                .arg("-e")
                .arg(format!("@{}", vars_file.display())),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{what} ansible-playbook failed:\n{text}\nnode journal:\n{}",
            node.journal_tail(30)
        );
        assert!(
            !text.contains(&secret),
            "the join token appears in Ansible's output:\n{text}"
        );
        eprintln!(
            "packages test: {what} ansible-playbook run took {:.0?}",
            started.elapsed()
        );
        play_recap(&text)
    };

    let first = run("first");
    for host in ["node", "ctl"] {
        assert!(first[host]["changed"] > 0, "{first:?}");
    }
    // The same state as the hand-made install: meshd active under its
    // hardening with its table, registered; the controller serving.
    wait_active(&node, "meshd.service");
    assert!(has_hostmesh_table(&node));
    let pid = node.unit_property("meshd.service", "MainPID");
    assert_eq!(proc_status_field(&node, &pid, "CapEff"), CAP_NET_ADMIN_ONLY);
    m.eventually(
        "the Ansible host registered",
        Duration::from_secs(20),
        || registered(&m, &node_addr),
    );
    let config = node.sh_ok("cat /etc/hostmesh/meshd.toml");
    assert!(config.starts_with("# Ansible managed"), "{config}");
    assert!(
        config.contains(
            "[proxy.peer_transport]\n\"10.99.0.0/16\" = \"quic\"\n\"10.99.0.7\" = \"tcp\"\n"
        ),
        "{config}"
    );
    let config = ctl.sh_ok("cat /etc/hostmesh/controller.toml");
    assert!(
        config.contains(
            "[[mesh.peer_transport]]\nhosts = [\"10.99.0.0/16\"]\npeers = [\"10.98.0.0/16\", \"10.97.0.7\"]\ntransport = \"quic\"\n\n[[mesh.peer_transport]]\npeers = [\"10.96.0.0/16\"]\ntransport = \"tcp\"\n"
        ),
        "{config}"
    );
    wait_active(&ctl, "mesh-controller.service");
    let st = ctl.sh_ok("meshctl status");
    assert!(st.contains("No hosts have joined"), "{st}");

    let second = run("second");
    for host in ["node", "ctl"] {
        assert_eq!(second[host]["changed"], 0, "second run: {second:?}");
        assert_eq!(second[host]["failed"], 0, "second run: {second:?}");
    }
    registered(&m, &node_addr).expect("still registered after the second run");
}

/// PLAY RECAP lines: host -> counter -> value.
fn play_recap(text: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let Some((_, recap)) = text.split_once("PLAY RECAP") else {
        panic!("no PLAY RECAP in:\n{text}");
    };
    for line in recap.lines().skip(1) {
        let Some((host, counters)) = line.split_once(" : ") else {
            continue;
        };
        let counters = counters
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect();
        out.insert(host.trim().to_string(), counters);
    }
    out
}

#[test]
fn rpm_packages_install_run_upgrade_and_erase_in_a_booted_systemd() {
    hostmesh_tests::require_root();
    container::prepare_debian_root();
    let p = packages();
    let m = MeshLab::start(2, StoreKind::Embedded, LEASE_TTL_S);
    m.apply(MESH);
    let host_addr = m.lab.host(1).addr.to_string();
    let c = boot(&m, 1);

    // rpm in a Debian root: --nodeps, since its rpm database knows none of
    // the Debian packages that satisfy the requirements. The scriptlets run
    // for real, against the container's systemd.
    let meshd_rpm = c.put(&p.meshd_rpm, "/root");
    let controller_rpm = c.put(&p.controller_rpm, "/root");
    c.sh_ok(&format!("rpm -i --nodeps {meshd_rpm} {controller_rpm}"));
    assert_eq!(
        c.sh_ok("rpm -q meshd mesh-controller --qf '%{NAME}\\n'")
            .lines()
            .collect::<Vec<_>>(),
        ["meshd", "mesh-controller"]
    );
    assert_eq!(c.unit_property("meshd.service", "UnitFileState"), "enabled");
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "inactive");
    assert_eq!(
        c.sh_ok("stat -c '%a %U:%G' /var/lib/hostmesh /var/lib/hostmesh/controller")
            .lines()
            .collect::<Vec<_>>(),
        ["700 meshd:meshd", "700 mesh-controller:mesh-controller"]
    );
    wait_active(&c, "mesh-controller.service");
    let st = c.sh_ok("meshctl status");
    assert!(st.contains("No hosts have joined"), "{st}");

    // This time the token-file form that `meshctl token create` prints.
    let printed = m.meshctl_ok(&["token", "create", "--group", "shop/web"]);
    let lines: Vec<&str> = printed
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("install -m 600 ") || l.contains("--token-file "))
        .collect();
    assert_eq!(lines.len(), 2, "the token-file form:\n{printed}");
    for line in lines {
        c.sh_ok(line);
    }
    c.sh_ok("systemctl start meshd");
    assert_eq!(c.unit_property("meshd.service", "ActiveState"), "active");
    assert!(has_hostmesh_table(&c));
    m.eventually("the rpm host registered", Duration::from_secs(20), || {
        registered(&m, &host_addr)
    });

    // An upgrade (here: the same package again) restarts meshd.
    let before = c.unit_property("meshd.service", "MainPID");
    c.sh_ok(&format!("rpm -U --replacepkgs --nodeps {meshd_rpm}"));
    wait_active(&c, "meshd.service");
    assert_ne!(c.unit_property("meshd.service", "MainPID"), before);

    // Erase: units stopped (the table goes), files gone. RPM has no purge:
    // the host's identity stays in /var/lib/hostmesh for a reinstall.
    c.sh_ok("rpm -e --nodeps meshd mesh-controller");
    for unit in ["meshd.service", "mesh-controller.service"] {
        assert_eq!(c.unit_property(unit, "LoadState"), "not-found", "{unit}");
    }
    assert!(!has_hostmesh_table(&c), "the table outlived the package");
    let left = c.sh_ok(
        "for p in /usr/bin/meshd /usr/bin/meshctl /etc/hostmesh/meshd.toml /etc/hostmesh/admin.conf \
         /etc/systemd/system/multi-user.target.wants/meshd.service; do [ -e \"$p\" ] && echo \"$p\"; done; true",
    );
    assert_eq!(left.trim(), "", "left behind after rpm -e");
    c.sh_ok("test -f /var/lib/hostmesh/host.json");
}
