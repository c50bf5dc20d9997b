//! Readiness as a set of drop guards, one per start-up task (ztunnel's
//! shape): `/ready` answers 200, and systemd gets READY=1, once every guard
//! is gone.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Clone)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<String>>>,
    ready: Arc<watch::Sender<bool>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            pending: Arc::new(Mutex::new(BTreeSet::new())),
            ready: Arc::new(watch::channel(false).0),
        }
    }
}

/// Held until its task has finished starting.
pub struct TaskGuard {
    name: String,
    readiness: Readiness,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mut pending = self
            .readiness
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.remove(&self.name);
        if pending.is_empty() {
            self.readiness.ready.send_replace(true);
        }
    }
}

impl Readiness {
    pub fn register(&self, name: &str) -> TaskGuard {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        self.ready.send_replace(false);
        TaskGuard {
            name: name.to_string(),
            readiness: self.clone(),
        }
    }

    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Resolves once nothing is pending.
    pub async fn wait(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await.is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_when_every_guard_is_dropped() {
        let r = Readiness::default();
        let a = r.register("capture");
        let b = r.register("config");
        assert_eq!(r.pending(), vec!["capture", "config"]);
        drop(a);
        assert_eq!(r.pending(), vec!["config"]);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        drop(b);
        waiter.await.unwrap();
        assert!(r.pending().is_empty());
    }
}
