//! Liveness of the proxy's accept loops, for systemd's watchdog.
//!
//! A watchdog ping must mean "the proxy still works", not only "some thread
//! still runs". Each long-running accept loop (outbound, the TCP and QUIC
//! tunnel servers) runs inside [`Liveness::track`], which answers questions
//! on the same task as the loop itself. Once per watchdog period
//! [`Liveness::check_and_ask`] checks that every loop answered the last
//! question, then asks the next one: a loop whose task panicked, ended, or
//! is no longer being polled (its runtime stalled or blocked) fails the
//! check, and meshd stops pinging, so systemd restarts it. Nothing runs
//! between questions: no timers, no cost when idle.
//!
//! While meshd is stopping ([`Liveness::stopping`]) the loops end on
//! purpose (draining), so an ended loop is not a failure then.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

struct LoopState {
    name: &'static str,
    asked: AtomicU64,
    answered: AtomicU64,
    ended: AtomicBool,
    question: Notify,
}

#[derive(Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<Vec<Arc<LoopState>>>>,
    stopping: Arc<AtomicBool>,
}

impl Liveness {
    /// Runs `fut` (an accept loop) and answers liveness questions on its
    /// task until it ends.
    pub fn track<F>(&self, name: &'static str, fut: F) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()>,
    {
        let state = Arc::new(LoopState {
            name,
            asked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            question: Notify::new(),
        });
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(state.clone());
        async move {
            // Marks the loop ended however it stops, a panic included.
            struct Ended(Arc<LoopState>);
            impl Drop for Ended {
                fn drop(&mut self) {
                    self.0.ended.store(true, Ordering::Release);
                }
            }
            let _ended = Ended(state.clone());
            let mut fut = std::pin::pin!(fut);
            loop {
                tokio::select! {
                    () = &mut fut => return,
                    () = state.question.notified() => {
                        state
                            .answered
                            .store(state.asked.load(Ordering::Acquire), Ordering::Release);
                    }
                }
            }
        }
    }

    /// meshd is shutting down: loops ending is expected from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether every tracked loop answered the previous question (or ended
    /// while stopping); then asks the next one. The error names the loops
    /// that did not.
    pub fn check_and_ask(&self) -> Result<(), String> {
        let stopping = self.stopping.load(Ordering::Acquire);
        let loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        let mut failed = Vec::new();
        for l in loops.iter() {
            if l.ended.load(Ordering::Acquire) {
                if !stopping {
                    failed.push(format!("{} ended", l.name));
                }
                continue;
            }
            let asked = l.asked.load(Ordering::Acquire);
            if l.answered.load(Ordering::Acquire) < asked {
                failed.push(format!("{} did not run for a watchdog period", l.name));
            }
            l.asked.store(asked + 1, Ordering::Release);
            l.question.notify_one();
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_running_loop_answers_every_question() {
        let live = Liveness::default();
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(live.track("outbound", async move {
            let _ = rx.await;
        }));
        for _ in 0..5 {
            tokio::task::yield_now().await;
            assert_eq!(live.check_and_ask(), Ok(()));
            // Let the loop's task run and answer.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn a_loop_that_is_not_polled_fails_the_next_check() {
        let live = Liveness::default();
        // Tracked but never spawned: nothing polls it, as with a stalled
        // runtime.
        let _stalled = live.track("tunnel", std::future::pending::<()>());
        assert_eq!(live.check_and_ask(), Ok(()), "the first question");
        let e = live.check_and_ask().unwrap_err();
        assert!(e.contains("tunnel did not run"), "{e}");
    }

    #[tokio::test]
    async fn a_loop_that_ended_fails_unless_meshd_is_stopping() {
        let live = Liveness::default();
        live.track("outbound", async {}).await;
        let e = live.check_and_ask().unwrap_err();
        assert!(e.contains("outbound ended"), "{e}");
        live.stopping();
        assert_eq!(live.check_and_ask(), Ok(()));
    }

    #[tokio::test]
    async fn a_loop_that_panicked_counts_as_ended() {
        let live = Liveness::default();
        let task = tokio::spawn(live.track("quic", async { panic!("accept loop bug") }));
        assert!(task.await.is_err());
        let e = live.check_and_ask().unwrap_err();
        assert!(e.contains("quic ended"), "{e}");
    }
}
