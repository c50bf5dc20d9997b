//! Each controller replica's in-memory view of the store: every resource,
//! every connected host's live record, and the CA's revision. Built by
//! listing and then watching three prefixes (resources, live hosts, CA);
//! published as immutable snapshots on a `watch` channel, so readers never
//! lock and config computation always sees one consistent state.
//!
//! The store stays the source of truth: this view only decides what to
//! push. Writes (apply, join, acks) go to the store, and come back here
//! through the watch, on every replica alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hostmesh_api::resource::{Kind, Policy, Resource, Route, Service, Workload, WorkloadGroup};
use hostmesh_registry::{EventKind, KeyValue, Revision, SharedStore, StoreError, WatchBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::keys::Keys;
use crate::resources::decode;

/// A connected host as its session records it (leased: it disappears when
/// the host stops heartbeating).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LiveRecord {
    pub host_id: String,
    pub namespace: String,
    pub group: String,
    pub address: String,
    pub tunnel_port: u32,
    #[serde(default)]
    pub quic: bool,
    #[serde(default)]
    pub ports: Vec<PortHealthRecord>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub meshd_version: String,
    pub connected_unix: i64,
    /// The controller replica holding the session.
    #[serde(default)]
    pub replica: String,
    pub lease: i64,
    #[serde(default)]
    pub cert_expiry_unix: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortHealthRecord {
    pub port: u32,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What a host acknowledged or rejected last (leased with its session).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AckRecord {
    pub acked_version: u64,
    #[serde(default)]
    pub acked_digest: String,
    #[serde(default)]
    pub acked_unix: i64,
    #[serde(default)]
    pub rejected_version: u64,
    #[serde(default)]
    pub rejected_digest: String,
    #[serde(default)]
    pub reject_reason: String,
    #[serde(default)]
    pub rejected_unix: i64,
}

type NsName = (String, String);

#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// The highest store revision this state reflects.
    pub revision: Revision,
    pub services: BTreeMap<NsName, Arc<Service>>,
    pub groups: BTreeMap<NsName, Arc<WorkloadGroup>>,
    pub routes: BTreeMap<NsName, Arc<Route>>,
    pub policies: BTreeMap<NsName, Arc<Policy>>,
    /// Keyed by host ID (the Workload's name; unique mesh-wide).
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub live: BTreeMap<String, Arc<LiveRecord>>,
    /// Changes whenever anything under `ca/` changes.
    pub ca_revision: Revision,
}

impl ClusterState {
    fn apply_resource(&mut self, key: &str, keys: &Keys, kv: Option<&KeyValue>) {
        let Some(rk) = keys.parse_resource(key) else {
            return;
        };
        let nsn = (rk.namespace.clone(), rk.name.clone());
        let decoded = match kv.map(decode) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                tracing::warn!(key, error = %e, "ignoring an unreadable resource in the store");
                None
            }
        };
        match (rk.kind, decoded) {
            (Kind::Service, Some(Resource::Service(s))) => {
                self.services.insert(nsn, Arc::new(s));
            }
            (Kind::WorkloadGroup, Some(Resource::WorkloadGroup(g))) => {
                self.groups.insert(nsn, Arc::new(g));
            }
            (Kind::Route, Some(Resource::Route(r))) => {
                self.routes.insert(nsn, Arc::new(r));
            }
            (Kind::Policy, Some(Resource::Policy(p))) => {
                self.policies.insert(nsn, Arc::new(p));
            }
            (Kind::Workload, Some(Resource::Workload(w))) => {
                self.workloads.insert(rk.name, Arc::new(w));
            }
            (Kind::Service, _) => {
                self.services.remove(&nsn);
            }
            (Kind::WorkloadGroup, _) => {
                self.groups.remove(&nsn);
            }
            (Kind::Route, _) => {
                self.routes.remove(&nsn);
            }
            (Kind::Policy, _) => {
                self.policies.remove(&nsn);
            }
            (Kind::Workload, _) => {
                self.workloads.remove(&rk.name);
            }
        }
    }

    fn apply_live(&mut self, key: &str, keys: &Keys, kv: Option<&KeyValue>) {
        let Some(host) = key.strip_prefix(&keys.live_hosts()) else {
            return;
        };
        match kv.map(|kv| serde_json::from_slice::<LiveRecord>(&kv.value)) {
            Some(Ok(rec)) => {
                self.live.insert(host.to_string(), Arc::new(rec));
            }
            Some(Err(e)) => {
                tracing::warn!(key, error = %e, "ignoring an unreadable live record");
                self.live.remove(host);
            }
            None => {
                self.live.remove(host);
            }
        }
    }
}

/// Which part of the store a watcher follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Resources,
    Live,
    Ca,
}

enum Update {
    /// A full listing replaces that part.
    Relisted(Part, Vec<KeyValue>, Revision),
    Batch(Part, WatchBatch),
}

/// Starts following the store. The receiver's first value is an empty state
/// with revision 0; `ready` turns true once every part has been listed.
pub fn start(
    store: SharedStore,
    keys: Keys,
) -> (watch::Receiver<Arc<ClusterState>>, watch::Receiver<bool>) {
    let (state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let (update_tx, mut update_rx) = mpsc::channel::<Update>(1024);
    for part in [Part::Resources, Part::Live, Part::Ca] {
        let prefix = match part {
            Part::Resources => keys.resources(),
            Part::Live => keys.live_hosts(),
            Part::Ca => keys.ca(),
        };
        tokio::spawn(follow(store.clone(), prefix, part, update_tx.clone()));
    }
    drop(update_tx);
    tokio::spawn(async move {
        let mut state = ClusterState::default();
        let mut listed = [false; 3];
        while let Some(first) = update_rx.recv().await {
            let mut updates = vec![first];
            // Coalesce whatever is already queued into one published state.
            while let Ok(more) = update_rx.try_recv() {
                updates.push(more);
                if updates.len() >= 4096 {
                    break;
                }
            }
            for u in updates {
                match u {
                    Update::Relisted(part, kvs, rev) => {
                        listed[part as usize] = true;
                        match part {
                            Part::Resources => {
                                state.services.clear();
                                state.groups.clear();
                                state.routes.clear();
                                state.policies.clear();
                                state.workloads.clear();
                                for kv in &kvs {
                                    state.apply_resource(&kv.key, &keys, Some(kv));
                                }
                            }
                            Part::Live => {
                                state.live.clear();
                                for kv in &kvs {
                                    state.apply_live(&kv.key, &keys, Some(kv));
                                }
                            }
                            Part::Ca => state.ca_revision = rev,
                        }
                        state.revision = state.revision.max(rev);
                    }
                    Update::Batch(part, batch) => {
                        for ev in &batch.events {
                            let kv = (ev.kind == EventKind::Put).then_some(&ev.kv);
                            match part {
                                Part::Resources => state.apply_resource(&ev.kv.key, &keys, kv),
                                Part::Live => state.apply_live(&ev.kv.key, &keys, kv),
                                Part::Ca => state.ca_revision = batch.revision,
                            }
                        }
                        state.revision = state.revision.max(batch.revision);
                    }
                }
            }
            if state_tx.send(Arc::new(state.clone())).is_err() {
                break;
            }
            if listed.iter().all(|l| *l) {
                let _ = ready_tx.send(true);
            }
        }
    });
    (state_rx, ready_rx)
}

/// Lists a prefix and then watches it, relisting after compaction and
/// retrying (with backoff) while the store is unreachable.
async fn follow(store: SharedStore, prefix: String, part: Part, tx: mpsc::Sender<Update>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listed = match store.list(&prefix).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "listing the store failed; retrying");
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let from = listed.revision + 1;
        if tx
            .send(Update::Relisted(part, listed.kvs, listed.revision))
            .await
            .is_err()
        {
            return;
        }
        let mut stream = match store.watch(&prefix, from).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "watching the store failed; relisting");
                tokio::time::sleep(jittered(backoff)).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            match item {
                Ok(batch) => {
                    if tx.send(Update::Batch(part, batch)).await.is_err() {
                        return;
                    }
                }
                Err(StoreError::Compacted { .. }) => {
                    tracing::info!(prefix, "watch history compacted; relisting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(prefix, error = %e, "watch failed; relisting");
                    tokio::time::sleep(jittered(backoff)).await;
                    break;
                }
            }
        }
    }
}

fn jittered(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + rand::random::<u64>() % (ms / 2 + 1))
}
