//! meshd's side of the config stream.
//!
//! At start the last good snapshot is read from the state directory and put
//! in use before the controller is even tried: a host keeps serving with
//! what it had when the controller is gone, also across its own restart.
//! Then a session is held with the controller: Hello (this host's status
//! and the names and hashes of what it holds, so only differences come
//! back), then updates, each applied to a copy, checked, and either put in
//! use, written to disk and acknowledged, or rejected with the reason while
//! the last good state keeps serving. Heartbeats keep the host's lease and
//! report health changes at once.
//!
//! Reconnects back off exponentially with full jitter (0.5 s doubling to
//! 30 s), so a fleet does not stampede a controller that comes back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostmesh_api::proto::hosts_client::HostsClient;
use hostmesh_api::proto::{
    Ack, ConfigUpdate, EntryKind, Heartbeat, Hello, HostMessage, HostStatus, Nack,
    controller_message, host_message,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::Identity;
use crate::identity::store::{SNAPSHOT_FILE, StateDir};
use crate::mesh::{HostLimits, MeshHandle, MeshState, Snapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug)]
pub struct ControlMetrics {
    pub updates: Family<ResultLabel, Counter>,
    pub connected: Gauge,
    pub version: Gauge,
    pub reconnects: Counter,
}

impl ControlMetrics {
    pub fn new(registry: &mut Registry) -> ControlMetrics {
        let m = ControlMetrics {
            updates: Family::default(),
            connected: Gauge::default(),
            version: Gauge::default(),
            reconnects: Counter::default(),
        };
        registry.register(
            "config_updates",
            "Config updates by result (accepted, rejected)",
            m.updates.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while a session with the controller is up",
            m.connected.clone(),
        );
        registry.register(
            "config_version",
            "Version of the config in use",
            m.version.clone(),
        );
        registry.register(
            "controller_reconnects",
            "Sessions with the controller started",
            m.reconnects.clone(),
        );
        m
    }
}

/// What `meshd status` and /ready say about the controller link.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkState {
    pub connected: bool,
    pub last_error: String,
    /// The last update this host rejected, and why.
    pub rejected_version: u64,
    pub reject_reason: String,
}

pub struct Control {
    identity: Arc<Identity>,
    state_dir: StateDir,
    limits: HostLimits,
    mesh: Arc<MeshHandle>,
    snapshot: Mutex<Snapshot>,
    status: watch::Receiver<HostStatus>,
    link: watch::Sender<LinkState>,
    metrics: ControlMetrics,
}

impl Control {
    pub fn new(
        identity: Arc<Identity>,
        state_dir: StateDir,
        limits: HostLimits,
        mesh: Arc<MeshHandle>,
        status: watch::Receiver<HostStatus>,
        metrics: ControlMetrics,
    ) -> Arc<Control> {
        Arc::new(Control {
            identity,
            state_dir,
            limits,
            mesh,
            snapshot: Mutex::new(Snapshot::default()),
            status,
            link: watch::channel(LinkState::default()).0,
            metrics,
        })
    }

    pub fn link(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts the snapshot from the state directory in use, if there is a
    /// usable one. Returns its version.
    pub fn load_persisted(&self) -> Option<u64> {
        let bytes = match self.state_dir.read(SNAPSHOT_FILE) {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the last good config failed; starting without it");
                return None;
            }
        };
        let snap = match Snapshot::decode(prost::bytes::Bytes::from(bytes)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "the last good config on disk is unreadable; starting without it");
                return None;
            }
        };
        match MeshState::build(&snap, &self.limits, None) {
            Ok(state) => {
                let version = snap.version;
                self.use_state(snap, state);
                tracing::info!(
                    version,
                    "serving the last good config from disk until the controller answers"
                );
                Some(version)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the last good config on disk no longer checks out; starting without it");
                None
            }
        }
    }

    fn use_state(&self, snap: Snapshot, state: MeshState) {
        if !state.bundle_pem.is_empty()
            && let Err(e) = self.identity.set_bundle(&state.bundle_pem)
        {
            tracing::warn!(error = %e, "the trust bundle in the config is unusable");
        }
        self.metrics
            .version
            .set(i64::try_from(snap.version).unwrap_or(i64::MAX));
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snap;
        self.mesh.publish(state);
    }

    /// Applies one update; Ok(()) to acknowledge, Err(reason) to reject.
    pub fn apply_update(&self, update: ConfigUpdate) -> Result<(), String> {
        let next = {
            let current = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
            current.apply(update).map_err(|e| e.to_string())?
        };
        // Services whose entries did not change keep their built state.
        let previous = self.mesh.load();
        let state = MeshState::build(&next, &self.limits, Some(&previous))?;
        drop(previous);
        if let Err(e) = self.state_dir.write(SNAPSHOT_FILE, &next.encode(), 0o600) {
            // Serving the new config matters more than keeping it on disk;
            // the next update tries again.
            tracing::warn!(error = %e, "could not save the config to disk");
        }
        self.use_state(next, state);
        Ok(())
    }

    /// Holds sessions with the controller until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            self.metrics.reconnects.inc();
            let result = tokio::select! {
                r = self.session() => r,
                _ = crate::drain::wait_true(&mut shutdown) => return,
            };
            self.metrics.connected.set(0);
            let message = match result {
                Ok(()) => "the controller closed the session".to_string(),
                Err(e) => e,
            };
            self.link.send_modify(|l| {
                l.connected = false;
                l.last_error = message.clone();
            });
            let wait = backoff.next(started.elapsed(), rand::random::<u64>());
            tracing::warn!(error = %message, retry_in_ms = wait.as_millis() as u64, "controller session ended");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::drain::wait_true(&mut shutdown) => return,
            }
        }
    }

    async fn session(&self) -> Result<(), String> {
        let channel = self
            .identity
            .controller_channel()
            .map_err(|e| e.to_string())?;
        let mut client = HostsClient::new(channel)
            .max_decoding_message_size(512 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel::<HostMessage>(16);
        let snap = self.snapshot();
        let mut status_rx = self.status.clone();
        let status = status_rx.borrow_and_update().clone();
        let hello = HostMessage {
            msg: Some(host_message::Msg::Hello(Hello {
                status: Some(status),
                version: snap.version,
                entries: snap.hashes(),
            })),
        };
        tx.send(hello)
            .await
            .map_err(|_| "session closed".to_string())?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_changed = false;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let msg = msg.map_err(|s| describe(&s))?;
                    let Some(msg) = msg else { return Ok(()) };
                    match msg.msg {
                        Some(controller_message::Msg::Session(info)) => {
                            let every = Duration::from_secs(u64::from(info.heartbeat_interval_seconds.clamp(1, 300)));
                            heartbeat = tokio::time::interval(every);
                            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            self.metrics.connected.set(1);
                            self.link.send_modify(|l| {
                                l.connected = true;
                                l.last_error.clear();
                            });
                            tracing::info!(host = %info.host_id, heartbeat_s = every.as_secs(), "connected to the controller");
                        }
                        Some(controller_message::Msg::Update(update)) => {
                            let reply = self.handle_update(update);
                            tx.send(reply).await.map_err(|_| "session closed".to_string())?;
                        }
                        None => {}
                    }
                }
                changed = status_rx.changed() => {
                    if changed.is_err() {
                        return Err("status source gone".to_string());
                    }
                    status_changed = true;
                    heartbeat.reset_immediately();
                }
                _ = heartbeat.tick() => {
                    let status = status_changed.then(|| status_rx.borrow().clone());
                    status_changed = false;
                    let hb = HostMessage { msg: Some(host_message::Msg::Heartbeat(Heartbeat { status })) };
                    tx.send(hb).await.map_err(|_| "session closed".to_string())?;
                }
            }
        }
    }

    fn handle_update(&self, update: ConfigUpdate) -> HostMessage {
        let has_bundle = update
            .upserts
            .iter()
            .any(|e| e.kind == EntryKind::Bundle as i32);
        let (version, upserts, removals, full) = (
            update.version,
            update.upserts.len(),
            update.removals.len(),
            update.full,
        );
        match self.apply_update(update) {
            Ok(()) => {
                self.metrics
                    .updates
                    .get_or_create(&ResultLabel { result: "accepted" })
                    .inc();
                tracing::info!(
                    version,
                    upserts,
                    removals,
                    full,
                    bundle = has_bundle,
                    "config update accepted"
                );
                HostMessage {
                    msg: Some(host_message::Msg::Ack(Ack { version })),
                }
            }
            Err(reason) => {
                self.metrics
                    .updates
                    .get_or_create(&ResultLabel { result: "rejected" })
                    .inc();
                tracing::warn!(version, reason = %reason, "config update rejected; keeping the last good config");
                self.link.send_modify(|l| {
                    l.rejected_version = version;
                    l.reject_reason = reason.clone();
                });
                HostMessage {
                    msg: Some(host_message::Msg::Nack(Nack { version, reason })),
                }
            }
        }
    }
}

fn describe(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::PermissionDenied => {
            format!("the controller refused this host: {}", s.message())
        }
        tonic::Code::Unavailable => format!("controller unavailable: {}", s.message()),
        _ => format!("{:?}: {}", s.code(), s.message()),
    }
}

/// Keeps the host certificate fresh: checks when renewal is due and renews,
/// retrying with backoff on failure.
pub async fn renew_loop(identity: Arc<Identity>, mut shutdown: watch::Receiver<bool>) {
    let mut retry = Duration::from_secs(5);
    loop {
        let channel = identity.controller_channel();
        let outcome = match channel {
            Ok(ch) => identity.renew_if_due(ch).await,
            Err(e) => Err(e),
        };
        let wait = match outcome {
            Ok(renewed) => {
                retry = Duration::from_secs(5);
                if renewed {
                    Duration::from_secs(1)
                } else {
                    let due = identity.renewal_at()
                        - hostmesh_api::clock::unix_seconds(std::time::SystemTime::now());
                    Duration::from_secs(u64::try_from(due.clamp(1, 60)).unwrap_or(60))
                }
            }
            Err(e) => {
                if identity.is_expired() {
                    tracing::error!(error = %e, "the host certificate has expired; this host must join again (meshd join --force)");
                } else {
                    tracing::warn!(error = %e, "certificate renewal failed; retrying");
                }
                let w = retry;
                retry = (retry * 2).min(Duration::from_secs(300));
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = crate::drain::wait_true(&mut shutdown) => return,
        }
    }
}

/// Reconnect backoff: exponential from 0.5 s to 30 s with full jitter (a
/// wait anywhere in `[0, ceiling)`), so a fleet that lost its controller at
/// one instant comes back spread out. A session that lasted more than 30 s
/// starts the next backoff from the bottom. Pure: the caller passes the
/// session's length and a random number.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    ceiling: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        let base = Duration::from_millis(500);
        Backoff {
            base,
            max: Duration::from_secs(30),
            ceiling: base,
        }
    }
}

impl Backoff {
    /// The wait before the next attempt, after a session that lasted
    /// `session` ended; `random` is uniformly distributed.
    pub fn next(&mut self, session: Duration, random: u64) -> Duration {
        if session > self.max {
            self.ceiling = self.base;
        }
        let ceiling_ms = (self.ceiling.as_millis() as u64).max(1);
        let wait = Duration::from_millis(random % ceiling_ms);
        self.ceiling = (self.ceiling * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    const SHORT: Duration = Duration::from_secs(1);

    #[test]
    fn the_ceiling_doubles_from_half_a_second_to_thirty() {
        let mut b = Backoff::default();
        // 239,999 % ceiling is the largest wait each ceiling allows (240,000
        // is a multiple of every ceiling here).
        let ceilings: Vec<u64> = (0..10)
            .map(|_| b.next(SHORT, 239_999).as_millis() as u64 + 1)
            .collect();
        assert_eq!(ceilings[0], 500);
        assert_eq!(ceilings[1], 1000);
        assert_eq!(ceilings[5], 16000);
        assert!(ceilings[6..].iter().all(|&c| c == 30000), "{ceilings:?}");
    }

    #[test]
    fn waits_are_jittered_over_the_whole_range() {
        let mut b = Backoff::default();
        for _ in 0..6 {
            b.next(SHORT, 0);
        }
        // With the ceiling at 30 s, the random number picks anywhere below.
        let waits: Vec<Duration> = [0u64, 7_777, 29_999]
            .iter()
            .map(|&r| b.clone().next(SHORT, r))
            .collect();
        assert_eq!(
            waits,
            [
                Duration::ZERO,
                Duration::from_millis(7_777),
                Duration::from_millis(29_999)
            ]
        );
    }

    #[test]
    fn a_long_session_resets_the_backoff() {
        let mut b = Backoff::default();
        for _ in 0..8 {
            b.next(SHORT, 0);
        }
        let wait = b.next(Duration::from_secs(31), u64::MAX);
        assert!(wait < Duration::from_millis(500), "{wait:?}");
    }
}
