//! Graceful shutdown: a drain signal every listener watches (stop
//! accepting) and a count of open connections to wait on, with a bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// Held by listeners and connections.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    active: Arc<Active>,
}

/// Held by whoever decides to shut down.
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    active: Arc<Active>,
}

/// Counts one open connection until dropped.
pub struct ConnGuard {
    active: Arc<Active>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.active.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.active.idle.notify_waiters();
        }
    }
}

pub fn new() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    let active = Arc::new(Active {
        count: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    (
        DrainTrigger {
            signal: tx,
            active: active.clone(),
        },
        Drain { signal: rx, active },
    )
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves when draining starts.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|d| *d).await.is_ok();
    }

    pub fn track(&self) -> ConnGuard {
        self.active.count.fetch_add(1, Ordering::AcqRel);
        ConnGuard {
            active: self.active.clone(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// A receiver that turns true when draining starts.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.clone()
    }
}

impl DrainTrigger {
    pub fn start(&self) {
        let _ = self.signal.send(true);
    }

    pub fn active(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// Waits until no connection is open or `timeout` passes; returns how
    /// many were still open.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.active.idle.notified();
            let n = self.active.count.load(Ordering::Acquire);
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active.count.load(Ordering::Acquire);
            }
        }
    }
}

/// Resolves once the flag turns true (or its sender is gone). Unlike
/// `wait_for` it holds no borrow of the value, so futures using it in
/// `select!` stay `Send`.
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.is_ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_connections_then_times_out() {
        let (trigger, drain) = new();
        let g1 = drain.track();
        let g2 = drain.track();
        trigger.start();
        assert!(drain.is_draining());
        drop(g1);
        let waiter = tokio::spawn(async move { trigger.wait_idle(Duration::from_secs(5)).await });
        drop(g2);
        assert_eq!(waiter.await.unwrap(), 0);
        let (trigger, drain) = new();
        let _held = drain.track();
        assert_eq!(trigger.wait_idle(Duration::from_millis(20)).await, 1);
    }
}
