//! Booted systemd containers for the package tests: a Debian 12 root made
//! with debootstrap once per test run, booted with `systemd-nspawn --boot`
//! inside a lab host's network namespace, each container on an overlay of
//! its own so that several share one root and leave it untouched.
//!
//! The root is built in this run's directory under `target/packages-test/`
//! and never reused by another run: CI starts clean, so a cache across runs
//! would only hide a broken recipe. Directories of earlier runs whose
//! process is gone are swept at the next start, like the labs' namespaces.
//! A container is powered off, killed if it does not stop, and its overlay
//! removed when its guard drops, also when a test panics.
//!
//! Also here: a Python venv with Ansible for the role test, and the small
//! Ansible connection plugin that reaches a container through `nsenter`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{eventually, output, require_root};

/// What debootstrap installs. The containers cannot reach a mirror, so this
/// is every runtime dependency of the packages and of the tests: systemd as
/// PID 1, what meshd runs (nft, ip), what Ansible's modules need (python3,
/// python3-apt) and rpm for the RPM smoke test. libc6 and passwd (useradd
/// for the RPM scriptlets) come with every minbase root.
pub const ROOT_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "nftables",
    "python3",
    "python3-apt",
    "rpm",
];
pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// The workspace's root directory (the repository).
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// The workspace's target directory (tests run from target/PROFILE/deps).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let mut dir = exe.parent().expect("executable directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.parent().expect("target directory").to_path_buf()
}

/// This run's directory, `target/packages-test/run-PID`. Directories of runs
/// whose process is gone are removed the first time this is called.
pub fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = target_dir().join("packages-test");
        fs::create_dir_all(&base).expect("creating target/packages-test");
        for entry in fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(pid) = name.strip_prefix("run-") else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_tree(&entry.path());
            }
        }
        let dir = base.join(format!("run-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating the run directory");
        dir
    })
    .as_path()
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest
/// first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as \ooo.
        .map(|p| {
            PathBuf::from(
                p.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Removes a directory tree that may hold mounts: a debootstrap that was
/// killed leaves /proc, /sys or a bind mount of /dev in its root, and
/// deleting through those would reach the machine's own files. Each is
/// unmounted first; if one cannot be, the tree is left alone.
pub fn remove_tree(dir: &Path) {
    for mount in mounts_under(dir) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&mount)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        let _ = fs::remove_dir_all(dir);
    } else {
        eprintln!(
            "packages test: not removing {}: still mounted below it: {left:?}",
            dir.display()
        );
    }
}

/// Runs `cmd`, its output to `log`; on failure panics with the log's tail.
pub fn run_logged(what: &str, cmd: &mut Command, log: &Path) {
    let out = fs::File::create(log).expect("creating a log file");
    let err = out.try_clone().expect("cloning the log file");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .unwrap_or_else(|e| panic!("{what}: starting {cmd:?}: {e}"));
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        panic!(
            "{what} failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

fn require_tool(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is missing: apt-get install {package} (scripts/deps.sh installs it; `make test` runs that)"
    );
}

/// The Debian 12 root every container boots from, made once per run.
/// Several tests may ask at once: one builds, the others wait. Start it
/// early with [`prepare_debian_root`] to overlap it with other work.
pub fn debian_root() -> &'static Path {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = ROOT.get_or_init(|| {
        std::panic::catch_unwind(build_debian_root).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "building the root panicked".to_string())
        })
    });
    match result {
        Ok(p) => p.as_path(),
        Err(e) => panic!("no Debian root for the containers: {e}"),
    }
}

/// Starts building the root in the background (a no-op once it is built).
pub fn prepare_debian_root() {
    std::thread::spawn(|| {
        let _ = std::panic::catch_unwind(debian_root);
    });
}

/// Set to a root made by an earlier run (or by hand, with the same
/// recipe) to skip debootstrap while working on these tests. CI never sets
/// it: every run there makes its own root.
pub const ROOT_OVERRIDE_ENV: &str = "HOSTMESH_TEST_DEBIAN_ROOT";

fn build_debian_root() -> PathBuf {
    require_root();
    require_tool("systemd-nspawn", "systemd-container");
    if let Some(dir) = std::env::var_os(ROOT_OVERRIDE_ENV) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("usr/lib/systemd/systemd").exists(),
            "{ROOT_OVERRIDE_ENV}={} is not a Debian root with systemd",
            dir.display()
        );
        eprintln!(
            "packages test: using the root in {} ({ROOT_OVERRIDE_ENV})",
            dir.display()
        );
        return dir;
    }
    require_tool("debootstrap", "debootstrap");
    let root = run_dir().join("debian-root");
    let started = Instant::now();
    remove_tree(&root);
    // setpriv --pdeathsig: if the test process dies, debootstrap gets
    // SIGTERM, on which it unmounts what it mounted in the root and exits.
    run_logged(
        "debootstrap",
        Command::new("setpriv")
            .args(["--pdeathsig", "TERM", "--", "debootstrap"])
            .arg("--variant=minbase")
            .arg(format!("--include={}", ROOT_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&root)
            .arg(MIRROR),
        &run_dir().join("debootstrap.log"),
    );
    // An empty machine-id: systemd makes one at boot, a new one per
    // container (debootstrap leaves the build host's pattern otherwise).
    fs::write(root.join("etc/machine-id"), "").expect("emptying etc/machine-id");
    // No /etc/hostname: each container is then named after its machine
    // name, not after the machine that ran debootstrap.
    let _ = fs::remove_file(root.join("etc/hostname"));
    // The downloaded .debs are not needed any more.
    let archives = root.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "deb") {
            let _ = fs::remove_file(entry.path());
        }
    }
    eprintln!(
        "packages test: Debian {SUITE} root made with debootstrap in {:.0?}",
        started.elapsed()
    );
    root
}

/// The children of `parent` that are PID 1 of their own PID namespace
/// (nspawn's helper children, while they live, are not).
fn init_children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let ppid = field("PPid:");
        let nspid = field("NSpid:");
        if ppid.first().and_then(|p| p.parse::<u32>().ok()) == Some(parent)
            && nspid.len() >= 2
            && nspid.last().map(String::as_str) == Some("1")
        {
            out.push(pid);
        }
    }
    out
}

/// PATH and locale for commands run in a container: nothing of the test
/// process's environment leaks in.
const CONTAINER_ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
    "DEBIAN_FRONTEND=noninteractive",
];

/// A booted systemd container (systemd-nspawn) in a lab host's network
/// namespace. Dropping it powers it off and removes its overlay.
pub struct Container {
    pub name: String,
    dir: PathBuf,
    nspawn: Option<Child>,
    pid1: u32,
}

impl Container {
    /// Boots `root` (through an overlay) as machine `name` in the network
    /// namespace `/run/netns/NETNS`, and waits until systemd reports the
    /// system running. `dir` holds the overlay and the console log.
    pub fn boot(root: &Path, name: &str, netns: &str, dir: &Path) -> Container {
        require_root();
        let dir = dir.join(format!("container-{name}"));
        remove_tree(&dir);
        let upper = dir.join("upper");
        fs::create_dir_all(&upper).expect("creating the overlay directory");
        let console = fs::File::create(dir.join("console.log")).expect("console log");
        let console_err = console.try_clone().expect("console log");
        // --register=no --keep-unit: there is no system bus (nor systemd) on
        // the test machine. CAP_NET_ADMIN: nft inside needs it. The overlay
        // keeps the shared root untouched; nspawn puts its work directory
        // next to `upper`, inside `dir`. --resolv-conf=off: the container
        // keeps its own /etc/resolv.conf (a file in its overlay that tests
        // may rewrite), never a bind mount of the test machine's.
        let child = Command::new("systemd-nspawn")
            .arg("--boot")
            .arg("--directory")
            .arg(root)
            .args(["--machine", name])
            .args(["--register=no", "--keep-unit", "--console=pipe"])
            .arg("--resolv-conf=off")
            .arg(format!("--network-namespace-path=/run/netns/{netns}"))
            .arg("--capability=CAP_NET_ADMIN")
            .arg(format!(
                "--overlay={}:{}:/",
                root.display(),
                upper.display()
            ))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting systemd-nspawn for {name}: {e}"));
        let nspawn_pid = child.id();
        let mut c = Container {
            name: name.to_string(),
            dir,
            nspawn: Some(child),
            pid1: 0,
        };
        c.pid1 = eventually(
            &format!("container {name} to start its PID 1"),
            Duration::from_secs(30),
            || {
                if let Some(n) = c.nspawn.as_mut()
                    && let Ok(Some(status)) = n.try_wait()
                {
                    panic!(
                        "systemd-nspawn for {name} exited ({status}):\n{}",
                        c.console_log()
                    );
                }
                match init_children_of(nspawn_pid).as_slice() {
                    [pid] => Ok(*pid),
                    other => Err(format!("children of nspawn: {other:?}")),
                }
            },
        );
        eventually(
            &format!("systemd in {name} to finish booting"),
            Duration::from_secs(60),
            || {
                let out = c.exec(&["systemctl", "is-system-running"]);
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match state.as_str() {
                    "running" | "degraded" => Ok(()),
                    _ => Err(state),
                }
            },
        );
        c
    }

    /// PID 1 of the container, as the test machine sees it.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// The container's file system, from outside.
    pub fn root_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1))
    }

    /// The command `args` run inside the container (all its namespaces,
    /// its root, a clean environment).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid1.to_string(), "-a", "env", "-i"])
            .args(CONTAINER_ENV)
            .args(args);
        c
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        output(&mut self.command(args))
    }

    /// Runs a shell script inside the container.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Runs a shell script inside the container; panics with its output
    /// (and the tail of the journal) if it fails. Returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if !out.status.success() {
            panic!(
                "in container {}: `{script}` failed ({}):\nstdout: {}\nstderr: {}\njournal (last 40 lines):\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.journal_tail(40)
            );
        }
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Copies a file from the test machine into the container (the
    /// container's /tmp is its own tmpfs: use another directory).
    pub fn put(&self, src: &Path, dest_dir: &str) -> String {
        let name = src.file_name().expect("a file name").to_string_lossy();
        let dest = format!("{}/{name}", dest_dir.trim_end_matches('/'));
        let outside = self.root_path().join(dest.trim_start_matches('/'));
        fs::copy(src, &outside)
            .unwrap_or_else(|e| panic!("copying {} into {}: {e}", src.display(), self.name));
        dest
    }

    /// The last `lines` lines of the container's journal.
    pub fn journal_tail(&self, lines: usize) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-n",
            &lines.to_string(),
        ]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// One unit's journal, messages only.
    pub fn unit_journal(&self, unit: &str) -> String {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-p", property, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn console_log(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        let _ = self
            .command(&["systemctl", "poweroff", "--no-block"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = nspawn.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                // Killing PID 1 of its PID namespace kills every process
                // in the container; then nspawn itself.
                let _ = Command::new("kill")
                    .args(["-KILL", &self.pid1.to_string()])
                    .status();
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        remove_tree(&self.dir);
    }
}

/// ansible-core and ansible-lint in a venv of this run (pinned in
/// ansible/requirements.txt), made once per run. Start it early with
/// [`prepare_ansible`].
pub fn ansible_venv() -> &'static Path {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = VENV.get_or_init(|| {
        std::panic::catch_unwind(build_ansible_venv).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "making the venv panicked".to_string())
        })
    });
    match result {
        Ok(p) => p.as_path(),
        Err(e) => panic!("no Ansible venv: {e}"),
    }
}

pub fn prepare_ansible() {
    std::thread::spawn(|| {
        let _ = std::panic::catch_unwind(ansible_venv);
    });
}

fn build_ansible_venv() -> PathBuf {
    let venv = run_dir().join("ansible-venv");
    let requirements = repo_dir().join("ansible/requirements.txt");
    // Debian's python3 (with python3-venv); the venv keeps everything
    // inside this run's directory, nothing is installed system-wide.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let log = run_dir().join("ansible-venv.log");
    run_logged(
        "python3 -m venv (apt-get install python3-venv if it is missing)",
        Command::new(python).arg("-m").arg("venv").arg(&venv),
        &log,
    );
    run_logged(
        "pip install -r ansible/requirements.txt",
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        &log,
    );
    venv
}

/// An Ansible connection plugin that runs everything inside a container
/// through `nsenter -t PID1 -a`: the test machine has no ssh into the
/// containers, and `community.general.chroot` would pull in the whole
/// `ansible` package for one small file.
pub const NSENTER_CONNECTION: &str = r#"
# Test-only Ansible connection: commands and file transfers go into a
# booted container through nsenter, entering every namespace of its PID 1.
from __future__ import annotations

import shlex
import subprocess

from ansible.errors import AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nsenter
short_description: run in a booted container through nsenter
description: Test-only. Enters every namespace of the container's PID 1.
author: hostmesh tests
options:
  pid:
    description: PID 1 of the container, as the test machine sees it.
    vars:
      - name: ansible_nsenter_pid
"""

ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
]


class Connection(ConnectionBase):
    transport = "nsenter"
    has_pipelining = True

    def _prefix(self):
        return ["nsenter", "-t", str(self.get_option("pid")), "-a", "env", "-i"] + ENV

    def _connect(self):
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        p = subprocess.Popen(
            self._prefix() + ["/bin/sh", "-c", cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = p.communicate(in_data)
        return p.returncode, out, err

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as f:
            p = subprocess.run(
                self._prefix() + ["/bin/sh", "-c", "cat > " + shlex.quote(out_path)],
                stdin=f,
                capture_output=True,
            )
        if p.returncode != 0:
            raise AnsibleError("put_file %s: %s" % (out_path, p.stderr))

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as f:
            p = subprocess.run(
                self._prefix() + ["cat", in_path], stdout=f, stderr=subprocess.PIPE
            )
        if p.returncode != 0:
            raise AnsibleError("fetch_file %s: %s" % (in_path, p.stderr))

    def close(self):
        self._connected = False
"#;
