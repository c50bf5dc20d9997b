#![allow(unsafe_code)]
//! The scheduler slice the data workers ask the kernel for
//! (`proxy.scheduler_slice`), through `sched_setattr(2)`.
//!
//! Since Linux 6.12 the fair scheduler (EEVDF) lets a thread ask for a
//! slice of its own, 100 µs to 100 ms, in `sched_attr.sched_runtime`: a
//! shorter slice gives the thread an earlier deadline each time it wakes,
//! so it is picked sooner, and it is preempted sooner when it runs long.
//! It changes when a thread runs, not how much: its share of the CPU is
//! still set by its weight (nice). That is the shape of a proxy's work, a
//! few µs to tens of µs per wake-up, each one holding up a request: with
//! the kernel's default slice (0.7–2.8 ms, scaled by the core count) a
//! worker woken while an app runs on its core may wait for that app's
//! slice to end. Measured (docs/BENCHMARKS.md, "Scheduler slice"): at a
//! fixed 1,000 requests/s on 16 connections, 100 µs took 10–14 µs (15–19%)
//! off meshd's added p50, 6–12% off its p90 and 2–8% off its p99, with
//! requests/s, bulk and CPU per request unchanged.
//!
//! Kernels before 6.12 take the call and ignore the field; that is found
//! by reading the slice back ([`Slice::Ignored`]). Only threads under the
//! fair policy are touched: one an operator moved to a real-time or batch
//! policy keeps it.

use std::time::Duration;

/// `struct sched_attr` (include/uapi/linux/sched/types.h), version 1.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

const SCHED_OTHER: u32 = 0;
/// The bounds the kernel clamps a requested slice to.
pub const MIN_SLICE: Duration = Duration::from_micros(100);
pub const MAX_SLICE: Duration = Duration::from_millis(100);

/// What asking for a slice came to on the calling thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The kernel reports this slice for the thread now.
    Set(Duration),
    /// The kernel took the call but kept its default (before Linux 6.12).
    Ignored,
    /// The thread runs under another policy (the number is the kernel's);
    /// left as it is.
    OtherPolicy(u32),
    /// No slice was asked for (`proxy.scheduler_slice = "0s"`): the
    /// kernel's default, which it reports as this.
    Default(Duration),
}

impl std::fmt::Display for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slice::Set(d) => write!(f, "{} µs", d.as_micros()),
            Slice::Ignored => f.write_str("the kernel's default (custom slices need Linux 6.12)"),
            Slice::OtherPolicy(p) => write!(
                f,
                "the kernel's default (the thread runs under scheduling policy {p}, not the fair one)"
            ),
            // Kernels before 6.12 report no slice for a fair thread.
            Slice::Default(d) if d.is_zero() => {
                f.write_str("the kernel's default (proxy.scheduler_slice = \"0s\")")
            }
            Slice::Default(d) => write!(
                f,
                "the kernel's default, {} µs (proxy.scheduler_slice = \"0s\")",
                d.as_micros()
            ),
        }
    }
}

fn get_attr() -> Result<SchedAttr, std::io::Error> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is a writable `struct sched_attr` of `size` bytes
    // that outlives the call; pid 0 is the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

fn set_attr(attr: &SchedAttr) -> Result<(), std::io::Error> {
    // SAFETY: `attr` is a valid `struct sched_attr` whose `size` field
    // holds its length; the kernel only reads it. pid 0 is this thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, attr as *const SchedAttr, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for `slice` on the calling thread (zero: the kernel's default,
/// also for a thread that inherited another) and says what it came to. Nice, policy and flags stay as they
/// were; an error names the system call that failed.
pub fn request_slice(slice: Duration) -> Result<Slice, String> {
    let mut attr = get_attr()
        .map_err(|e| format!("reading this thread's scheduling attributes (sched_getattr): {e}"))?;
    if attr.policy != SCHED_OTHER {
        return Ok(Slice::OtherPolicy(attr.policy));
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    if slice.is_zero() {
        // Threads inherit a custom slice from the thread that starts them:
        // zero puts this one back on the kernel's default.
        attr.runtime = 0;
        set_attr(&attr).map_err(|e| {
            format!("going back to the kernel's scheduler slice (sched_setattr): {e}")
        })?;
        let now = get_attr()
            .map_err(|e| format!("reading back the scheduler slice (sched_getattr): {e}"))?;
        return Ok(Slice::Default(Duration::from_nanos(now.runtime)));
    }
    let wanted = slice.clamp(MIN_SLICE, MAX_SLICE);
    let before = attr.runtime;
    attr.runtime = wanted.as_nanos() as u64;
    set_attr(&attr).map_err(|e| {
        format!(
            "asking for a {} µs scheduler slice (sched_setattr): {e}",
            wanted.as_micros()
        )
    })?;
    let after = get_attr()
        .map_err(|e| format!("reading back the scheduler slice (sched_getattr): {e}"))?
        .runtime;
    // Before 6.12 the kernel reports 0 for a fair thread (or whatever it
    // reported before the call, unchanged) whatever was asked.
    if after == wanted.as_nanos() as u64 {
        Ok(Slice::Set(wanted))
    } else if after == 0 || after == before {
        Ok(Slice::Ignored)
    } else {
        Ok(Slice::Set(Duration::from_nanos(after)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own, so that the test runner's threads keep
    /// their slice.
    fn on_a_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread")
    }

    #[test]
    fn the_attribute_layout_is_the_kernels() {
        // SCHED_ATTR_SIZE_VER1 in include/uapi/linux/sched.h.
        assert_eq!(std::mem::size_of::<SchedAttr>(), 56);
    }

    #[test]
    fn a_slice_is_set_read_back_and_leaves_nice_alone() {
        let (outcome, nice_before, nice_after, second) = on_a_thread(|| {
            // A nice value of its own, to see that asking keeps it (on
            // Linux, PRIO_PROCESS with who = 0 is the calling thread).
            // SAFETY: plain integers; raising one's own nice needs no
            // privilege.
            let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 7) };
            assert_eq!(r, 0, "setpriority: {}", std::io::Error::last_os_error());
            let before = get_attr().expect("getattr").nice;
            let outcome = request_slice(Duration::from_micros(250)).expect("request");
            let after = get_attr().expect("getattr").nice;
            let second = request_slice(Duration::from_micros(10)).expect("request clamped");
            (outcome, before, after, second)
        });
        assert_eq!((nice_before, nice_after), (7, 7));
        match outcome {
            Slice::Set(d) => {
                assert_eq!(d, Duration::from_micros(250));
                // Below the kernel's floor: clamped to it, and said so.
                assert_eq!(second, Slice::Set(MIN_SLICE));
            }
            // A kernel before 6.12: the call is taken, the slice is not.
            Slice::Ignored => assert_eq!(second, Slice::Ignored),
            other => panic!("a fair thread got {other:?}"),
        }
    }

    #[test]
    fn threads_inherit_a_slice_and_zero_puts_one_back_on_the_kernels_default() {
        let (set, inherited, reset, then) = on_a_thread(|| {
            let set = request_slice(Duration::from_micros(300)).expect("request");
            let (inherited, reset, then) = std::thread::spawn(|| {
                let inherited = get_attr().expect("getattr").runtime;
                let reset = request_slice(Duration::ZERO).expect("reset");
                (inherited, reset, get_attr().expect("getattr").runtime)
            })
            .join()
            .expect("child");
            (set, inherited, reset, then)
        });
        assert!(matches!(reset, Slice::Default(_)), "{reset:?}");
        assert!(reset.to_string().contains("kernel's default"), "{reset}");
        if set == Slice::Set(Duration::from_micros(300)) {
            assert_eq!(inherited, 300_000);
            assert_ne!(then, 300_000, "{reset}");
            assert_eq!(reset, Slice::Default(Duration::from_nanos(then)));
        }
    }
}
