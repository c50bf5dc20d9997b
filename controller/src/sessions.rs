//! A host's session with the controller: one gRPC bidi stream that carries
//! registration (Hello), liveness (heartbeats keeping a store lease
//! alive), and versioned config increments with their acks and nacks.
//!
//! - The host's live record and ack record are written under a lease of
//!   `hosts.lease_ttl`; each heartbeat renews it. When heartbeats stop the
//!   records vanish and the host leaves every service's endpoints. A host
//!   that closes its stream cleanly (meshd stopping) has its lease revoked
//!   at once; a broken stream leaves the lease to run out, so a host that
//!   reconnects (to this or another replica) within the TTL does not flap.
//! - Pushes are increments against what the host says it holds (Hello
//!   carries its entry hashes), so a reconnect after a controller restart
//!   sends only what changed, not the world. At most one update is in
//!   flight per host; changes that arrive meanwhile are folded into the
//!   next one. A rejected snapshot is not re-sent until something changes.
//! - The version of an update is the store revision it was computed from,
//!   so versions from different replicas are comparable.
//! - Startup hold: for `hosts.startup_hold` after a replica starts, and only
//!   while some joined host has no live record, a host that already holds a
//!   config gets no update ([`startup_hold`]). After a control-plane outage
//!   longer than the lease TTL every live record is gone; the hosts
//!   reconnect over up to 30 s of jittered backoff, and pushing to the first
//!   ones would remove the endpoints of those still to come. Hosts keep
//!   serving what they hold meanwhile (static stability); a host with no
//!   config is served at once.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostmesh_api::proto::{
    self, ConfigEntry, ConfigUpdate, ControllerMessage, HostMessage, HostState, HostStatus,
    SessionInfo, controller_message, host_message,
};
use hostmesh_api::resource::{Workload, WorkloadPortStatus, WorkloadStatus};
use hostmesh_registry::{LeaseId, LeaseKeeper, Op, Revision, StoreError, Txn};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::app::Shared;
use crate::metrics::{Metrics, ResultLabels};
use crate::server::HostPeer;
use crate::snapshot::{self, GroupSnapshot, HostContext};
use crate::state::{AckRecord, ClusterState, LiveRecord, PortHealthRecord};

/// Group snapshots computed for one (state revision, CA generation), shared
/// by every session of that group; and when each group's content last
/// changed (its "latest version").
#[derive(Default)]
pub struct SnapshotCache {
    inner: Mutex<HashMap<(String, String), CachedGroup>>,
}

struct CachedGroup {
    revision: Revision,
    ca_generation: u64,
    snapshot: Arc<GroupSnapshot>,
    digest: String,
    /// The revision at which `digest` first appeared.
    changed_at: Revision,
}

impl SnapshotCache {
    pub fn get(
        &self,
        shared: &Shared,
        state: &ClusterState,
        ca_generation: u64,
        namespace: &str,
        group: &str,
    ) -> (Arc<GroupSnapshot>, Revision) {
        let key = (namespace.to_string(), group.to_string());
        {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = inner.get(&key)
                && c.revision == state.revision
                && c.ca_generation == ca_generation
            {
                return (c.snapshot.clone(), c.changed_at);
            }
        }
        // Computed outside the lock; two sessions may both compute, which
        // is harmless (same input, same output).
        let computed = Arc::new(snapshot::compute_group(
            state,
            namespace,
            group,
            &shared.ca.bundle(),
        ));
        let digest = snapshot::digest(computed.entries.iter().map(|(n, e)| (n, &e.hash)));
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let changed_at = match inner.get(&key) {
            Some(c) if c.digest == digest => c.changed_at.min(state.revision),
            Some(c) if c.revision > state.revision => return (c.snapshot.clone(), c.changed_at),
            _ => state.revision,
        };
        inner.insert(
            key,
            CachedGroup {
                revision: state.revision,
                ca_generation,
                snapshot: computed.clone(),
                digest,
                changed_at,
            },
        );
        (computed, changed_at)
    }
}

/// The whole snapshot for one host: its group's entries plus `self`.
fn host_target(
    shared: &Shared,
    state: &ClusterState,
    ca_generation: u64,
    host: &HostContext,
) -> (BTreeMap<String, Arc<ConfigEntry>>, Revision) {
    let (group, changed_at) =
        shared
            .snapshots
            .get(shared, state, ca_generation, &host.namespace, &host.group);
    let mut entries = group.entries.clone();
    let me = snapshot::compute_self(state, host, &shared.vip_ranges(), &shared.config.mesh);
    entries.insert(snapshot::SELF_ENTRY.to_string(), Arc::new(me));
    (entries, changed_at)
}

fn digest_of(entries: &BTreeMap<String, Arc<ConfigEntry>>) -> String {
    snapshot::digest(entries.iter().map(|(n, e)| (n, &e.hash)))
}

/// Limits on what a host may report about itself.
const MAX_PORTS: usize = 256;
const MAX_TEXT: usize = 256;
/// Until when a session of a host that already holds a config waits before
/// its first push after this replica started: the end of the hold, while it
/// lasts and some joined host has not come back; `None` once every joined
/// host has a live record or the hold is over. Pure: the caller passes the
/// clock.
pub fn startup_hold<I: PartialOrd + Copy>(
    now: I,
    hold_ends: I,
    host_holds_config: bool,
    state: &ClusterState,
) -> Option<I> {
    if !host_holds_config || now >= hold_ends {
        return None;
    }
    let missing = state
        .workloads
        .keys()
        .any(|host| !state.live.contains_key(host));
    missing.then_some(hold_ends)
}

const MAX_HELD_ENTRIES: usize = 1_000_000;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn check_status(status: &HostStatus) -> Result<(), String> {
    status
        .address
        .parse::<IpAddr>()
        .map_err(|_| format!("status.address {:?} is not an IP address", status.address))?;
    if status.tunnel_port == 0 || status.tunnel_port > 65535 {
        return Err(format!(
            "status.tunnel_port {} is not a port number",
            status.tunnel_port
        ));
    }
    if status.ports.len() > MAX_PORTS {
        return Err(format!(
            "status.ports has {} entries; at most {MAX_PORTS}",
            status.ports.len()
        ));
    }
    for (i, p) in status.ports.iter().enumerate() {
        if p.port == 0 || p.port > 65535 {
            return Err(format!(
                "status.ports[{i}].port {} is not a port number",
                p.port
            ));
        }
        if p.detail.len() > MAX_TEXT {
            return Err(format!(
                "status.ports[{i}].detail is longer than {MAX_TEXT}"
            ));
        }
    }
    if status.hostname.len() > MAX_TEXT || status.meshd_version.len() > MAX_TEXT {
        return Err("status.hostname or status.meshd_version is too long".to_string());
    }
    Ok(())
}

fn live_record(
    shared: &Shared,
    peer: &HostPeer,
    ctx: &HostContext,
    status: &HostStatus,
    lease: LeaseId,
) -> LiveRecord {
    LiveRecord {
        host_id: ctx.host_id.clone(),
        namespace: ctx.namespace.clone(),
        group: ctx.group.clone(),
        address: status.address.clone(),
        tunnel_port: status.tunnel_port,
        quic: status.quic,
        ports: status
            .ports
            .iter()
            .map(|p| PortHealthRecord {
                port: p.port,
                healthy: p.healthy,
                detail: p.detail.clone(),
            })
            .collect(),
        hostname: status.hostname.clone(),
        meshd_version: status.meshd_version.clone(),
        connected_unix: shared.clock.now_unix(),
        replica: shared.replica.clone(),
        lease,
        cert_expiry_unix: peer.cert_not_after_unix,
    }
}

async fn put_leased(
    shared: &Shared,
    key: String,
    value: Vec<u8>,
    lease: LeaseId,
) -> Result<(), StoreError> {
    shared
        .store
        .txn(Txn::new().then(Op::put_with_lease(key, value, lease)))
        .await
        .map(|_| ())
}

fn send_err(tx: &mpsc::Sender<Result<ControllerMessage, Status>>, status: Status) {
    let _ = tx.try_send(Err(status));
}

/// Runs one host's session until it ends.
pub async fn run(
    shared: Arc<Shared>,
    peer: HostPeer,
    workload: Workload,
    mut inbound: Streaming<HostMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
) {
    let ctx = HostContext {
        host_id: peer.host_id.clone(),
        namespace: workload.metadata.namespace.clone(),
        group: workload.spec.group.clone(),
        spiffe_id: peer.spiffe_id.to_string(),
        trust_domain: shared.config.trust_domain.clone(),
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(HostMessage {
            msg: Some(host_message::Msg::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            return send_err(
                &tx,
                Status::invalid_argument("the first message of a session must be Hello"),
            );
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => return send_err(&tx, Status::deadline_exceeded("no Hello within 10s")),
    };
    let Some(mut status) = hello.status else {
        return send_err(&tx, Status::invalid_argument("Hello has no status"));
    };
    if let Err(e) = check_status(&status) {
        return send_err(&tx, Status::invalid_argument(e));
    }
    if hello.entries.len() > MAX_HELD_ENTRIES {
        return send_err(
            &tx,
            Status::invalid_argument("Hello lists too many entries"),
        );
    }
    // Static stability across controller restarts: never compute from a
    // half-loaded view, nor from one older than what the host already has.
    let mut ready = shared.ready.clone();
    if tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .is_err()
    {
        return send_err(
            &tx,
            Status::unavailable("controller is still loading its state; retry"),
        );
    }
    let mut state_rx = shared.state.clone();
    let want = i64::try_from(hello.version).unwrap_or(i64::MAX);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        state_rx.wait_for(|s| s.revision >= want),
    )
    .await;

    let ttl = shared.config.hosts.lease_ttl.get();
    let lease = match shared.store.grant_lease(ttl).await {
        Ok(l) => l,
        Err(e) => return send_err(&tx, Status::unavailable(format!("store unavailable: {e}"))),
    };
    let mut keeper: Box<dyn LeaseKeeper> = match shared.store.lease_keeper(lease).await {
        Ok(k) => k,
        Err(e) => return send_err(&tx, Status::unavailable(format!("store unavailable: {e}"))),
    };
    let mut held: BTreeMap<String, String> = hello.entries.clone();
    let mut ack = AckRecord {
        acked_version: hello.version,
        acked_digest: snapshot::digest(held.iter()),
        acked_unix: shared.clock.now_unix(),
        ..AckRecord::default()
    };
    let live = live_record(&shared, &peer, &ctx, &status, lease);
    let write = async {
        put_leased(
            &shared,
            shared.keys.live_host(&ctx.host_id),
            serde_json::to_vec(&live).unwrap_or_default(),
            lease,
        )
        .await?;
        put_leased(
            &shared,
            shared.keys.ack(&ctx.host_id),
            serde_json::to_vec(&ack).unwrap_or_default(),
            lease,
        )
        .await
    };
    if let Err(e) = write.await {
        let _ = shared.store.revoke_lease(lease).await;
        return send_err(&tx, Status::unavailable(format!("store unavailable: {e}")));
    }
    let heartbeat_interval = (ttl / 3).max(Duration::from_secs(1));
    let info = ControllerMessage {
        msg: Some(controller_message::Msg::Session(SessionInfo {
            host_id: ctx.host_id.clone(),
            heartbeat_interval_seconds: u32::try_from(heartbeat_interval.as_secs()).unwrap_or(5),
            lease_ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(15),
        })),
    };
    if tx.send(Ok(info)).await.is_err() {
        let _ = shared.store.revoke_lease(lease).await;
        return;
    }
    shared.metrics.sessions.inc();
    tracing::info!(host = %ctx.host_id, group = %format!("{}/{}", ctx.namespace, ctx.group), address = %status.address, version = hello.version, "host session started");

    let mut ca_gen = shared.ca_generation.clone();
    let mut shutdown = shared.shutdown.clone();
    // (version, target hashes, digest) of the update awaiting an answer.
    let mut in_flight: Option<(u64, BTreeMap<String, String>, String)> = None;
    let mut rejected_digest: Option<String> = None;
    let mut first_push = true;
    let mut changed_since = Some(Instant::now());
    let mut deadline = tokio::time::Instant::now() + ttl;
    let mut revoke_on_exit = false;
    let hold_ends = shared.started + shared.config.hosts.startup_hold.get();
    let mut holding: Option<tokio::time::Instant> = None;
    let end: Option<Status> = loop {
        // Push when nothing is in flight and the target differs.
        if in_flight.is_none() {
            let state = state_rx.borrow().clone();
            if !state.workloads.contains_key(&ctx.host_id) {
                revoke_on_exit = true;
                break Some(Status::permission_denied(format!(
                    "host {} has been removed from the mesh; join again with a new token",
                    ctx.host_id
                )));
            }
            let generation = *ca_gen.borrow();
            let (target, _) = host_target(&shared, &state, generation, &ctx);
            let digest = digest_of(&target);
            let (upserts, removals) = snapshot::diff(&held, &target);
            let changed = !upserts.is_empty() || !removals.is_empty();
            if !changed && !first_push && rejected_digest.is_some() {
                // The desired config is back to what the host holds: the
                // rejection no longer applies.
                rejected_digest = None;
                ack.rejected_version = 0;
                ack.rejected_digest.clear();
                ack.reject_reason.clear();
                if let Err(e) = put_leased(
                    &shared,
                    shared.keys.ack(&ctx.host_id),
                    serde_json::to_vec(&ack).unwrap_or_default(),
                    lease,
                )
                .await
                {
                    tracing::warn!(host = %ctx.host_id, error = %e, "clearing a rejection failed");
                }
            }
            let was_holding = holding.is_some();
            holding = startup_hold(
                tokio::time::Instant::now(),
                hold_ends,
                !hello.entries.is_empty(),
                &state,
            );
            match (was_holding, holding) {
                (false, Some(until)) => {
                    tracing::info!(host = %ctx.host_id, hold_s = until.saturating_duration_since(tokio::time::Instant::now()).as_secs(), "startup hold: not all joined hosts are back; the host keeps its config until they are");
                    shared.metrics.startup_holds.inc();
                }
                (true, None) => {
                    tracing::info!(host = %ctx.host_id, "startup hold over; pushing");
                }
                _ => {}
            }
            if holding.is_none()
                && (changed && rejected_digest.as_deref() != Some(digest.as_str()) || first_push)
            {
                let full = first_push && hello.entries.is_empty();
                let version = u64::try_from(state.revision).unwrap_or(0);
                let kind = if full { "full" } else { "increment" };
                let update = ConfigUpdate {
                    version,
                    full,
                    upserts,
                    removals,
                };
                let hashes = target
                    .iter()
                    .map(|(n, e)| (n.clone(), e.hash.clone()))
                    .collect();
                let msg = ControllerMessage {
                    msg: Some(controller_message::Msg::Update(update)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break None;
                }
                if let Some(t) = changed_since.take() {
                    shared
                        .metrics
                        .push_latency
                        .observe(t.elapsed().as_secs_f64());
                }
                shared
                    .metrics
                    .pushes
                    .get_or_create(&ResultLabels { result: kind })
                    .inc();
                in_flight = Some((version, hashes, digest));
                first_push = false;
            }
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(HostMessage { msg: Some(m) })) => match m {
                    host_message::Msg::Ack(a) => {
                        if let Some((version, hashes, digest)) = in_flight.take() {
                            if a.version == version {
                                held = hashes;
                                rejected_digest = None;
                                ack.acked_version = version;
                                ack.acked_digest = digest;
                                ack.acked_unix = shared.clock.now_unix();
                                Metrics::count(&shared.metrics.acks, "ack");
                                if let Err(e) = put_leased(&shared, shared.keys.ack(&ctx.host_id), serde_json::to_vec(&ack).unwrap_or_default(), lease).await {
                                    tracing::warn!(host = %ctx.host_id, error = %e, "recording an ack failed");
                                }
                            } else {
                                in_flight = Some((version, hashes, digest));
                            }
                        }
                    }
                    host_message::Msg::Nack(n) => {
                        if let Some((version, _hashes, digest)) = in_flight.take()
                            && n.version == version {
                                let reason: String = n.reason.chars().take(1024).collect();
                                tracing::warn!(host = %ctx.host_id, version, reason = %reason, "host rejected a config update; it keeps its last good config");
                                Metrics::count(&shared.metrics.acks, "nack");
                                ack.rejected_version = version;
                                ack.rejected_digest = digest.clone();
                                ack.reject_reason = reason;
                                ack.rejected_unix = shared.clock.now_unix();
                                rejected_digest = Some(digest);
                                if let Err(e) = put_leased(&shared, shared.keys.ack(&ctx.host_id), serde_json::to_vec(&ack).unwrap_or_default(), lease).await {
                                    tracing::warn!(host = %ctx.host_id, error = %e, "recording a nack failed");
                                }
                            }
                    }
                    host_message::Msg::Heartbeat(hb) => {
                        if let Err(e) = keeper.keep_alive().await {
                            break Some(Status::unavailable(format!("the host's lease was lost ({e}); reconnect")));
                        }
                        deadline = tokio::time::Instant::now() + ttl;
                        if let Some(new) = hb.status
                            && new != status {
                                if let Err(e) = check_status(&new) {
                                    break Some(Status::invalid_argument(e));
                                }
                                status = new;
                                let live = live_record(&shared, &peer, &ctx, &status, lease);
                                if let Err(e) = put_leased(&shared, shared.keys.live_host(&ctx.host_id), serde_json::to_vec(&live).unwrap_or_default(), lease).await {
                                    tracing::warn!(host = %ctx.host_id, error = %e, "recording host status failed");
                                }
                            }
                    }
                    host_message::Msg::Hello(_) => break Some(Status::invalid_argument("Hello may only be the first message")),
                },
                Ok(Some(HostMessage { msg: None })) => {}
                Ok(None) => {
                    revoke_on_exit = true;
                    break None;
                }
                Err(_) => break None,
            },
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break None;
                }
                changed_since.get_or_insert_with(Instant::now);
            }
            changed = ca_gen.changed() => {
                if changed.is_err() {
                    break None;
                }
                changed_since.get_or_insert_with(Instant::now);
            }
            _ = tokio::time::sleep_until(deadline) => {
                break Some(Status::deadline_exceeded("no heartbeat within the lease TTL"));
            }
            _ = tokio::time::sleep_until(holding.unwrap_or(deadline)), if holding.is_some() => {}
            _ = wait_true(&mut shutdown) => {
                break Some(Status::unavailable("controller shutting down; reconnect"));
            }
        }
    };
    shared.metrics.sessions.dec();
    if let Some(status) = end {
        tracing::info!(host = %ctx.host_id, reason = %status.message(), "host session ended");
        send_err(&tx, status);
    } else {
        tracing::info!(host = %ctx.host_id, "host session closed");
    }
    if revoke_on_exit && let Err(e) = shared.store.revoke_lease(lease).await {
        tracing::debug!(host = %ctx.host_id, error = %e, "revoking the lease failed; it will expire");
    }
}

/// Resolves once the flag is true (or its sender is gone).
async fn wait_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.is_ok();
}

/// Fills a Workload's status from its live and ack records.
pub async fn fill_workload_status(shared: &Shared, w: &mut Workload) {
    let host = w.metadata.name.clone();
    let live = shared
        .store
        .get(&shared.keys.live_host(&host))
        .await
        .ok()
        .flatten();
    let ack = shared
        .store
        .get(&shared.keys.ack(&host))
        .await
        .ok()
        .flatten();
    let live: Option<LiveRecord> = live.and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let ack: Option<AckRecord> = ack.and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let state = match (&live, &ack) {
        (None, _) => "offline",
        (Some(_), Some(a)) if a.rejected_version > a.acked_version => "rejected",
        (Some(_), _) => "ready",
    };
    w.status = Some(WorkloadStatus {
        state: state.to_string(),
        address: live.as_ref().map(|l| l.address.clone()).unwrap_or_default(),
        ports: live
            .as_ref()
            .map(|l| {
                l.ports
                    .iter()
                    .map(|p| WorkloadPortStatus {
                        port: p.port,
                        healthy: p.healthy,
                        detail: p.detail.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        acked_version: ack.as_ref().map(|a| a.acked_version).unwrap_or(0),
        reject_reason: ack
            .as_ref()
            .map(|a| a.reject_reason.clone())
            .unwrap_or_default(),
        cert_expiry: live
            .as_ref()
            .filter(|l| l.cert_expiry_unix > 0)
            .map(|l| hostmesh_api::clock::rfc3339(l.cert_expiry_unix))
            .unwrap_or_default(),
    });
}

/// Every host: what `meshctl status` shows.
pub async fn status(shared: &Shared) -> Result<(Vec<HostState>, Revision), StoreError> {
    let (workloads, revision) = shared
        .resources
        .list(hostmesh_api::resource::Kind::Workload, None)
        .await?;
    let live: HashMap<String, LiveRecord> = shared
        .store
        .list(&shared.keys.live_hosts())
        .await?
        .kvs
        .into_iter()
        .filter_map(|kv| serde_json::from_slice::<LiveRecord>(&kv.value).ok())
        .map(|l| (l.host_id.clone(), l))
        .collect();
    let acks: HashMap<String, AckRecord> = shared
        .store
        .list(&shared.keys.acks())
        .await?
        .kvs
        .into_iter()
        .filter_map(|kv| {
            let host = kv.key.strip_prefix(&shared.keys.acks())?.to_string();
            Some((host, serde_json::from_slice::<AckRecord>(&kv.value).ok()?))
        })
        .collect();
    let state = shared.state.borrow().clone();
    let generation = *shared.ca_generation.borrow();
    let now_ms = i64::try_from(
        shared
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0);
    let mut hosts = Vec::new();
    for r in workloads {
        let hostmesh_api::resource::Resource::Workload(w) = r else {
            continue;
        };
        let host_id = w.metadata.name.clone();
        let ctx = HostContext {
            host_id: host_id.clone(),
            namespace: w.metadata.namespace.clone(),
            group: w.spec.group.clone(),
            spiffe_id: w.spec.identity.clone(),
            trust_domain: shared.config.trust_domain.clone(),
        };
        let (target, latest) = host_target(shared, &state, generation, &ctx);
        let latest_digest = digest_of(&target);
        let l = live.get(&host_id);
        let a = acks.get(&host_id);
        let last_heartbeat = match l {
            Some(l) => match shared.store.lease_info(l.lease).await {
                Ok(Some(info)) => {
                    let since = info.granted_ttl.saturating_sub(info.remaining);
                    now_ms - i64::try_from(since.as_millis()).unwrap_or(0)
                }
                _ => 0,
            },
            None => 0,
        };
        let in_sync = a.is_some_and(|a| a.acked_digest == latest_digest);
        let state_text = match (l, a) {
            (None, _) => "offline",
            (Some(_), _) if in_sync => "ready",
            // What the controller wants now is what the host refused.
            (Some(_), Some(a))
                if !a.rejected_digest.is_empty() && a.rejected_digest == latest_digest =>
            {
                "rejected"
            }
            (Some(_), _) => "syncing",
        };
        hosts.push(HostState {
            host_id,
            namespace: w.metadata.namespace.clone(),
            group: w.spec.group.clone(),
            address: l.map(|l| l.address.clone()).unwrap_or_default(),
            hostname: l
                .map(|l| l.hostname.clone())
                .filter(|h| !h.is_empty())
                .unwrap_or(w.spec.hostname.clone()),
            state: state_text.to_string(),
            acked_version: a.map(|a| a.acked_version).unwrap_or(0),
            // In sync: what the host holds is the latest. Otherwise the
            // version it would get now (the revision the state is at, or
            // when its group's content last changed, whichever is later).
            latest_version: if in_sync {
                a.map(|a| a.acked_version).unwrap_or(0)
            } else {
                u64::try_from(latest.max(state.revision)).unwrap_or(0)
            },
            in_sync,
            rejected_version: a.map(|a| a.rejected_version).unwrap_or(0),
            reject_reason: a.map(|a| a.reject_reason.clone()).unwrap_or_default(),
            last_heartbeat_unix_ms: last_heartbeat,
            cert_expiry_unix: l.map(|l| l.cert_expiry_unix).unwrap_or(0),
            ports: l
                .map(|l| {
                    l.ports
                        .iter()
                        .map(|p| proto::PortHealth {
                            port: p.port,
                            healthy: p.healthy,
                            detail: p.detail.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            meshd_version: l.map(|l| l.meshd_version.clone()).unwrap_or_default(),
        });
    }
    Ok((hosts, revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmesh_api::document::parse_documents;
    use hostmesh_api::resource::Resource;

    fn with_hosts(joined: &[&str], live: &[&str]) -> ClusterState {
        let mut st = ClusterState::default();
        for host in joined {
            let text = format!(
                "apiVersion: hostmesh/v1\nkind: Workload\nmetadata: {{name: {host}, namespace: shop}}\nspec: {{group: web, identity: 'spiffe://hostmesh.local/ns/shop/sa/web', joinedAt: x}}\n"
            );
            let Resource::Workload(w) = parse_documents(&text).unwrap().remove(0) else {
                unreachable!()
            };
            st.workloads.insert(host.to_string(), Arc::new(w));
        }
        for host in live {
            st.live.insert(
                host.to_string(),
                Arc::new(LiveRecord {
                    host_id: host.to_string(),
                    ..LiveRecord::default()
                }),
            );
        }
        st
    }

    #[test]
    fn a_host_holding_config_waits_while_joined_hosts_are_missing() {
        let st = with_hosts(&["a", "b", "c"], &["a"]);
        assert_eq!(startup_hold(10u64, 45, true, &st), Some(45));
    }

    #[test]
    fn the_hold_ends_when_every_joined_host_is_back() {
        let st = with_hosts(&["a", "b", "c"], &["a", "b", "c"]);
        assert_eq!(startup_hold(10u64, 45, true, &st), None);
    }

    #[test]
    fn the_hold_ends_at_its_deadline_even_with_hosts_missing() {
        let st = with_hosts(&["a", "b", "c"], &["a"]);
        assert_eq!(startup_hold(45u64, 45, true, &st), None);
        assert_eq!(startup_hold(46u64, 45, true, &st), None);
    }

    #[test]
    fn a_host_without_config_is_served_at_once() {
        let st = with_hosts(&["a", "b", "c"], &[]);
        assert_eq!(startup_hold(0u64, 45, false, &st), None);
    }

    #[test]
    fn a_zero_hold_holds_nothing() {
        let st = with_hosts(&["a", "b"], &[]);
        assert_eq!(startup_hold(0u64, 0, true, &st), None);
    }
}
