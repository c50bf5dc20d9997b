//! `make demo` itself: the demo binary runs to the end and exits 0 (it
//! exits non-zero when a step does not behave as it says), and Ctrl-C in
//! the middle removes everything it made: its namespaces and its processes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostmesh_tests::{Proc, bin, eventually, output, require_root};

fn demo() -> Command {
    let mut c = Command::new(bin("hostmesh-demo"));
    let dir = bin("meshd").parent().expect("bin dir").to_path_buf();
    c.arg("--bin-dir").arg(dir);
    c
}

/// Namespaces a process made (labs are named after their process).
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = output(Command::new("ip").args(["netns", "list"]));
    let prefix = format!("hm{pid:x}x");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn children_of(pid: u32) -> Vec<u32> {
    let out = output(Command::new("pgrep").args(["-P", &pid.to_string()]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Those of `pids` that still run (not gone, not a zombie).
fn still_running(pids: &[u32]) -> Vec<String> {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let state = rest.split_whitespace().next()?;
            (state != "Z").then(|| stat.trim().to_string())
        })
        .collect()
}

#[test]
fn the_demo_carries_a_request_over_mtls_and_cleans_up() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn("demo", demo(), dir.path());
    let pid = p.pid();
    let status = p.wait(Duration::from_secs(180));
    let log = p.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "the demo failed ({status:?}):\n{log}"
    );
    assert!(log.contains("hello from web, over mTLS"), "{log}");
    assert!(!log.contains("UNEXPECTED"), "{log}");
    assert_eq!(namespaces_of(pid), Vec::<String>::new(), "{log}");
}

#[test]
fn ctrl_c_in_the_middle_removes_the_hosts_and_processes() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = demo();
    cmd.stdin(Stdio::null());
    let mut p = Proc::spawn("demo-interrupted", cmd, dir.path());
    let pid = p.pid();
    // Interrupt once meshd runs on the hosts.
    eventually(
        "the demo to start meshd on its hosts",
        Duration::from_secs(120),
        || {
            if p.log().contains("meshd on every host") && !children_of(pid).is_empty() {
                Ok(())
            } else {
                Err(p.log())
            }
        },
    );
    assert!(!namespaces_of(pid).is_empty());
    let children = children_of(pid);
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let started = Instant::now();
    let status = p.wait(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "exit code after Ctrl-C:\n{}",
        p.log()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(namespaces_of(pid), Vec::<String>::new(), "{}", p.log());
    eventually(
        "no process of the demo left",
        Duration::from_secs(5),
        || match still_running(&children) {
            s if s.is_empty() => Ok(()),
            s => Err(s.join("\n")),
        },
    );
}
