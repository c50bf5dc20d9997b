//! Large memory copies where `rep movsb` is slow.
//!
//! glibc copies blocks of a few KiB and up with `rep movsb` on processors
//! that advertise fast string moves (ERMS/FSRM). On AMD Zen processors that
//! instruction runs at a small fraction of its speed when the destination
//! lies less than about 64 bytes past the source, modulo 4 KiB (glibc bug
//! 30994): on the benchmark VM a 16 KiB copy ran at 3 GB/s instead of
//! 90 (docs/BENCHMARKS.md, "Copies that rep movsb makes slow"). A tunnel
//! copies every byte it carries at least once in user space (rustls copies
//! plaintext into each record it seals and out of each it opens), between
//! buffers whose distance is whatever the allocator made it, so a share of
//! those copies hit the slow case.
//!
//! `meshd run` measures it when it starts: the same 16 KiB copy with the
//! destination 16 and 2,048 bytes past the source (modulo 4 KiB). Where
//! the near one is [`SLOW`] times slower or worse, meshd executes itself
//! again (same binary, arguments and process ID) with glibc's
//! `glibc.cpu.x86_rep_movsb_threshold` tunable raised above any copy it
//! makes, so glibc copies with vector loops instead. An operator who sets
//! that tunable in `GLIBC_TUNABLES` keeps their value. `meshd status` says
//! which of these happened and what was measured.

use std::time::{Duration, Instant};

/// How much slower the near copy must be to act.
pub const SLOW: f64 = 4.0;
/// The tunable meshd sets, and the value: larger than any copy meshd
/// makes, so `rep movsb` is never chosen.
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
const VALUE: usize = 1 << 30;
/// Set on the second start: the ratio the first one measured.
const MARKER: &str = "HOSTMESH_MEMCPY_REEXEC";

const LEN: usize = 16 * 1024;

/// How the near copy compared with the far one: the ratio of their
/// fastest times.
pub fn probe() -> f64 {
    let mut buf = vec![1u8; 2 * LEN + 8192];
    let align = buf.as_ptr().align_offset(64);
    let src = align;
    let near = src + LEN + 16;
    let far = src + LEN + 2048;
    let copy = |buf: &mut Vec<u8>, dst: usize| -> Duration {
        let (from, to) = buf.split_at_mut(src + LEN);
        let from = &from[src..];
        let to = &mut to[dst - src - LEN..][..LEN];
        let start = Instant::now();
        for _ in 0..16 {
            std::hint::black_box(&mut *to).copy_from_slice(std::hint::black_box(from));
        }
        start.elapsed()
    };
    copy(&mut buf, near);
    copy(&mut buf, far);
    let (mut best_near, mut best_far) = (Duration::MAX, Duration::MAX);
    for _ in 0..16 {
        best_near = best_near.min(copy(&mut buf, near));
        best_far = best_far.min(copy(&mut buf, far));
    }
    best_near.as_secs_f64() / best_far.as_secs_f64().max(1e-9)
}

/// What `meshd run` did about it, for `meshd status`.
pub fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Fast(r) => format!(
            "glibc's copies: fast here (a copy just past its source took {r:.1}x the time of one far from it)"
        ),
        Outcome::Avoided { before, after } => format!(
            "glibc's copies: rep movsb turned off ({TUNABLE}={VALUE}, set by meshd: a copy just past its source took {before:.1}x the time of one far from it, now {after:.1}x)"
        ),
        Outcome::Operator(v) => format!("glibc's copies: {TUNABLE} set by the operator ({v})"),
        Outcome::NotApplied(why) => format!("glibc's copies: slow case not avoided: {why}"),
        Outcome::NotX86 => "glibc's copies: not measured (not x86-64)".to_string(),
    }
}

pub enum Outcome {
    /// The near copy was not [`SLOW`]er: nothing done.
    Fast(f64),
    /// meshd runs with the tunable it set: the ratio measured before and
    /// after.
    Avoided {
        before: f64,
        after: f64,
    },
    /// `GLIBC_TUNABLES` already set the threshold: left as it is.
    Operator(String),
    /// Slow, but meshd could not start itself again.
    NotApplied(String),
    NotX86,
}

/// The value of the threshold in a `GLIBC_TUNABLES` string, if set.
pub fn threshold_in(tunables: &str) -> Option<&str> {
    tunables
        .split(':')
        .find_map(|t| t.strip_prefix(TUNABLE)?.strip_prefix('='))
}

/// `GLIBC_TUNABLES` with the threshold added to what was there.
pub fn with_threshold(tunables: Option<&str>) -> String {
    match tunables {
        Some(t) if !t.is_empty() => format!("{t}:{TUNABLE}={VALUE}"),
        _ => format!("{TUNABLE}={VALUE}"),
    }
}

/// Called first by `meshd run`, while it has one thread: measures and, in
/// the slow case, executes meshd again with the tunable (does not return
/// then).
pub fn avoid_slow_copies() -> Outcome {
    if !cfg!(target_arch = "x86_64") {
        return Outcome::NotX86;
    }
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    if let Ok(r) = std::env::var(MARKER) {
        let r = r.parse().unwrap_or(f64::NAN);
        if tunables.as_deref().and_then(threshold_in).is_none() {
            return Outcome::NotApplied("glibc did not keep GLIBC_TUNABLES".to_string());
        }
        let after = probe();
        if after >= SLOW {
            return Outcome::NotApplied(format!(
                "glibc did not take {TUNABLE}: a copy just past its source took {r:.1}x the time of one far from it, and still {after:.1}x"
            ));
        }
        return Outcome::Avoided { before: r, after };
    }
    if let Some(v) = tunables.as_deref().and_then(threshold_in) {
        return Outcome::Operator(v.to_string());
    }
    let ratio = probe();
    if ratio < SLOW {
        return Outcome::Fast(ratio);
    }
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "meshd".into());
    // The binary's own path, so that the process keeps its name (executing
    // /proc/self/exe would name it "exe"); that link if it cannot be read.
    let exe = std::fs::read_link("/proc/self/exe")
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let err = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", with_threshold(tunables.as_deref()))
        .env(MARKER, format!("{ratio:.1}"))
        .exec();
    Outcome::NotApplied(format!(
        "starting again with {TUNABLE} set: {err} (a copy just past its source took {ratio:.1}x the time of one far from it)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_found_and_added_beside_other_tunables() {
        assert_eq!(
            threshold_in("glibc.cpu.x86_rep_movsb_threshold=4096"),
            Some("4096")
        );
        assert_eq!(
            threshold_in("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=0"),
            Some("0")
        );
        assert_eq!(threshold_in("glibc.cpu.x86_rep_movsb_threshold_x=1"), None);
        assert_eq!(threshold_in("glibc.malloc.arena_max=2"), None);
        assert_eq!(threshold_in(""), None);
        assert_eq!(with_threshold(None), format!("{TUNABLE}={VALUE}"));
        assert_eq!(with_threshold(Some("")), format!("{TUNABLE}={VALUE}"));
        let both = with_threshold(Some("glibc.malloc.arena_max=2"));
        assert_eq!(threshold_in(&both), Some("1073741824"));
        assert!(both.starts_with("glibc.malloc.arena_max=2:"));
    }

    /// Run by the test below in a child process, with the tunable set.
    #[test]
    #[ignore = "run by with_the_tunable_meshd_sets_no_copy_is_slow"]
    fn probe_in_child() {
        #[allow(clippy::print_stdout)]
        {
            println!("ratio={}", probe());
        }
    }

    /// The tunable meshd starts itself with takes the slow case away (on
    /// a machine that has it, such as the benchmark VM: 25-31x without,
    /// 0.95x with).
    #[test]
    fn with_the_tunable_meshd_sets_no_copy_is_slow() {
        let r = probe();
        assert!(r.is_finite() && r > 0.0, "{r}");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "memcpy::tests::probe_in_child",
                "--ignored",
                "--nocapture",
            ])
            .env("GLIBC_TUNABLES", with_threshold(None))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let child: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("ratio="))
            .unwrap_or_else(|| panic!("no ratio from the child: {text}"))
            .parse()
            .unwrap();
        assert!(
            child < SLOW,
            "with {} a copy just past its source still took {child:.1}x (without: {r:.1}x)",
            with_threshold(None)
        );
    }
}
