//! Storing resources: apply (validate everything, then write in
//! compare-and-swap transactions), get, list and delete.
//!
//! An apply is checked as a whole before anything is written: every
//! document on its own, then its references against the store plus the
//! rest of the apply. Only then are transactions built. Each written
//! resource is guarded by a compare on its revision (or its absence), and
//! each new VIP by a create-if-absent of `vips/<ip>` in the same
//! transaction, so two controllers applying at once can never store a
//! Service twice or hand one VIP to two Services: the loser's transaction
//! fails, and it re-reads and tries again. Applies larger than one
//! transaction (etcd's 128-op limit) are written in chunks of whole
//! resources; a chunk that conflicts is retried alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bytes::Bytes;
use hostmesh_api::document::resource_from_json;
use hostmesh_api::resource::validate::{validate, validate_references};
use hostmesh_api::resource::{Kind, Resource, ResourceKey, Service};
use hostmesh_registry::{
    Compare, KeyValue, MAX_TXN_OPS, Op, Revision, SharedStore, StoreError, Txn, TxnOutcome,
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::keys::Keys;
use crate::vip;

/// Attempts per chunk before an apply gives up on conflicts.
const MAX_ATTEMPTS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request is wrong; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// A precondition (metadata.revision) no longer holds.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Applied {
    /// As stored, with `metadata.revision` set.
    pub resource: Resource,
    pub action: Action,
}

#[derive(Clone, Debug)]
pub struct Resources {
    store: SharedStore,
    keys: Keys,
    vip4: Ipv4Net,
    vip6: Ipv6Net,
}

/// A stored resource with its revision set.
pub fn decode(kv: &KeyValue) -> Result<Resource, StoreError> {
    let text = std::str::from_utf8(&kv.value)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", kv.key)))?;
    let mut r =
        resource_from_json(text).map_err(|e| StoreError::Corrupt(format!("{}: {e}", kv.key)))?;
    r.metadata_mut().revision = Some(kv.mod_revision);
    Ok(r)
}

fn encode(r: &Resource) -> Bytes {
    Bytes::from(r.without_store_fields().to_json())
}

/// What one resource of an apply will do.
struct Plan {
    resource: Resource,
    current: Option<KeyValue>,
    action: Action,
    compares: Vec<Compare>,
    ops: Vec<Op>,
}

impl Resources {
    pub fn new(store: SharedStore, keys: Keys, vip4: Ipv4Net, vip6: Ipv6Net) -> Resources {
        Resources {
            store,
            keys,
            vip4,
            vip6,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>, StoreError> {
        match self.store.get(&self.keys.resource_key(key)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Every resource of `kind` (in `namespace`, or all), sorted by
    /// namespace and name.
    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<(Vec<Resource>, Revision), StoreError> {
        let prefix = match namespace {
            Some(ns) => self.keys.resources_in(kind, ns),
            None => self.keys.resources_of(kind),
        };
        let listed = self.store.list(&prefix).await?;
        let mut out = Vec::with_capacity(listed.kvs.len());
        for kv in &listed.kvs {
            out.push(decode(kv)?);
        }
        Ok((out, listed.revision))
    }

    /// Validates and stores `docs`; all or nothing for invalid input.
    pub async fn apply(
        &self,
        docs: Vec<Resource>,
        dry_run: bool,
    ) -> Result<(Vec<Applied>, Revision), ApplyError> {
        self.check_batch(&docs)?;
        let mut applied = Vec::with_capacity(docs.len());
        let mut revision = 0;
        // Services first, so that a chunk with a Route never precedes the
        // chunk that stores its Service.
        let mut ordered = docs;
        ordered.sort_by_key(|r| r.kind());
        // Reference checks see the whole apply, before anything is written.
        self.check_references(&ordered).await?;
        if ordered.len() > RESOURCES_PER_TXN && !dry_run {
            // An apply larger than one transaction is planned whole first,
            // so that what planning can refuse (a VIP taken by a Service
            // outside the apply, two documents asking for one VIP, a stale
            // metadata.revision) is refused before the first chunk is
            // written. What remains is a concurrent writer changing the
            // store between chunks; see docs/RESOURCES.md.
            self.plan(&ordered).await?;
        }
        for chunk in chunk_for_txn(ordered) {
            let (mut done, rev) = self.apply_chunk(chunk, dry_run).await?;
            revision = revision.max(rev);
            applied.append(&mut done);
        }
        if revision == 0 {
            revision = self.store.current_revision().await?;
        }
        Ok((applied, revision))
    }

    fn check_batch(&self, docs: &[Resource]) -> Result<(), ApplyError> {
        if docs.is_empty() {
            return Err(ApplyError::Invalid(
                "nothing to apply: no resources in the input".to_string(),
            ));
        }
        let mut seen = HashSet::new();
        for doc in docs {
            if !doc.kind().operator_writable() {
                return Err(ApplyError::Invalid(format!(
                    "{}: Workloads are written by the controller when hosts join; use `meshctl token create` and `meshd join`",
                    doc.key()
                )));
            }
            validate(doc).map_err(|e| ApplyError::Invalid(e.to_string()))?;
            if !seen.insert(doc.key()) {
                return Err(ApplyError::Invalid(format!(
                    "{} appears twice in one apply",
                    doc.key()
                )));
            }
            if let Resource::Service(s) = doc {
                self.check_vip_ranges(s)?;
            }
        }
        Ok(())
    }

    fn check_vip_ranges(&self, s: &Service) -> Result<(), ApplyError> {
        let what = format!("Service {}/{}", s.metadata.namespace, s.metadata.name);
        if let Some(v) = &s.spec.vip {
            let ip: Ipv4Addr = v.parse().map_err(|_| {
                ApplyError::Invalid(format!("{what}: spec.vip: {v:?} is not an IPv4 address"))
            })?;
            if !vip::usable_v4(&self.vip4, ip) {
                return Err(ApplyError::Invalid(format!(
                    "{what}: spec.vip: {ip} is outside the service range {} (or is its network or broadcast address)",
                    self.vip4
                )));
            }
        }
        if let Some(v) = &s.spec.vip6 {
            let ip: Ipv6Addr = v.parse().map_err(|_| {
                ApplyError::Invalid(format!("{what}: spec.vip6: {v:?} is not an IPv6 address"))
            })?;
            if !vip::usable_v6(&self.vip6, ip) {
                return Err(ApplyError::Invalid(format!(
                    "{what}: spec.vip6: {ip} is outside the service range {}",
                    self.vip6
                )));
            }
        }
        Ok(())
    }

    async fn check_references(&self, docs: &[Resource]) -> Result<(), ApplyError> {
        let needs = docs.iter().any(|d| {
            matches!(
                d,
                Resource::Route(_) | Resource::Policy(_) | Resource::WorkloadGroup(_)
            )
        });
        if !needs {
            return Ok(());
        }
        let (stored, _) = self.list(Kind::Service, None).await?;
        let mut catalog: BTreeMap<(String, String), Service> = BTreeMap::new();
        for r in stored {
            if let Resource::Service(s) = r {
                catalog.insert((s.metadata.namespace.clone(), s.metadata.name.clone()), s);
            }
        }
        for d in docs {
            if let Resource::Service(s) = d {
                catalog.insert(
                    (s.metadata.namespace.clone(), s.metadata.name.clone()),
                    s.clone(),
                );
            }
        }
        for d in docs {
            validate_references(d, &catalog).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    async fn apply_chunk(
        &self,
        chunk: Vec<Resource>,
        dry_run: bool,
    ) -> Result<(Vec<Applied>, Revision), ApplyError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let plans = self.plan(&chunk).await?;
            let mut txn = Txn::new();
            for p in &plans {
                txn.compares.extend(p.compares.iter().cloned());
                txn.ops.extend(p.ops.iter().cloned());
            }
            if dry_run || txn.ops.is_empty() {
                let rev = if txn.ops.is_empty() {
                    0
                } else {
                    self.store.current_revision().await?
                };
                let out = plans
                    .into_iter()
                    .map(|p| {
                        let mut resource = p.resource;
                        resource.metadata_mut().revision =
                            p.current.as_ref().map(|kv| kv.mod_revision);
                        Applied {
                            resource,
                            action: p.action,
                        }
                    })
                    .collect();
                return Ok((out, rev));
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    let out = plans
                        .into_iter()
                        .map(|p| {
                            let mut resource = p.resource;
                            let rev = if p.action == Action::Unchanged {
                                p.current
                                    .as_ref()
                                    .map(|kv| kv.mod_revision)
                                    .unwrap_or(revision)
                            } else {
                                revision
                            };
                            resource.metadata_mut().revision = Some(rev);
                            Applied {
                                resource,
                                action: p.action,
                            }
                        })
                        .collect();
                    return Ok((out, revision));
                }
                TxnOutcome::Conflict { .. } if attempt < MAX_ATTEMPTS => {
                    // Another writer got there first: re-read and re-plan.
                    let jitter = rand::random::<u64>() % (5 * u64::from(attempt.min(10)) + 1);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                TxnOutcome::Conflict { .. } => {
                    return Err(ApplyError::Conflict(
                        "the resources kept changing under concurrent writers; try again"
                            .to_string(),
                    ));
                }
            }
        }
    }

    /// Reads what is stored and decides, per resource, what to write.
    async fn plan(&self, chunk: &[Resource]) -> Result<Vec<Plan>, ApplyError> {
        let store_keys: Vec<String> = chunk
            .iter()
            .map(|r| self.keys.resource_key(&r.key()))
            .collect();
        let currents =
            futures::future::try_join_all(store_keys.iter().map(|k| self.store.get(k))).await?;
        let has_service = chunk.iter().any(|r| matches!(r, Resource::Service(_)));
        let mut owners: HashMap<IpAddr, String> = HashMap::new();
        if has_service {
            for kv in self.store.list(&self.keys.vips()).await?.kvs {
                let ip_text = kv.key.trim_start_matches(&self.keys.vips()).to_string();
                if let Ok(ip) = ip_text.parse::<IpAddr>() {
                    owners.insert(ip, String::from_utf8_lossy(&kv.value).to_string());
                }
            }
        }
        let mut plans = Vec::with_capacity(chunk.len());
        for (doc, current) in chunk.iter().zip(currents) {
            plans.push(self.plan_one(doc, current, &mut owners)?);
        }
        Ok(plans)
    }

    fn plan_one(
        &self,
        doc: &Resource,
        current: Option<KeyValue>,
        owners: &mut HashMap<IpAddr, String>,
    ) -> Result<Plan, ApplyError> {
        let key = doc.key();
        let store_key = self.keys.resource_key(&key);
        if let Some(want) = doc.metadata().revision {
            let have = current.as_ref().map(|kv| kv.mod_revision);
            if have != Some(want) {
                return Err(ApplyError::Conflict(match have {
                    Some(h) => format!(
                        "{key} has changed since revision {want} (it is now at {h}); get it again and re-apply"
                    ),
                    None => format!(
                        "{key} was deleted since revision {want}; remove metadata.revision to create it again"
                    ),
                }));
            }
        }
        let stored = match &current {
            Some(kv) => Some(decode(kv)?),
            None => None,
        };
        let mut resource = doc.without_store_fields();
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        if let Resource::Service(svc) = &mut resource {
            let stored_svc = match &stored {
                Some(Resource::Service(s)) => Some(s),
                _ => None,
            };
            self.plan_vips(svc, stored_svc, owners, &mut compares, &mut ops)?;
        }
        let action = match &stored {
            None => Action::Created,
            Some(s) if s.without_store_fields() == resource => Action::Unchanged,
            Some(_) => Action::Configured,
        };
        if action != Action::Unchanged {
            compares.push(match &current {
                Some(kv) => Compare::mod_revision(&store_key, kv.mod_revision),
                None => Compare::absent(&store_key),
            });
            ops.push(Op::put(&store_key, encode(&resource)));
        }
        Ok(Plan {
            resource,
            current,
            action,
            compares,
            ops,
        })
    }

    /// Fills in the Service's VIPs and adds the reservations to write.
    fn plan_vips(
        &self,
        svc: &mut Service,
        stored: Option<&Service>,
        owners: &mut HashMap<IpAddr, String>,
        compares: &mut Vec<Compare>,
        ops: &mut Vec<Op>,
    ) -> Result<(), ApplyError> {
        let me = format!("{}/{}", svc.metadata.namespace, svc.metadata.name);
        let what = format!("Service {me}");
        // IPv4: requested, else kept, else allocated.
        let old4 = stored
            .and_then(|s| s.spec.vip.as_deref())
            .and_then(|v| v.parse::<IpAddr>().ok());
        let new4: IpAddr = match &svc.spec.vip {
            Some(v) => v.parse().map_err(|_| {
                ApplyError::Invalid(format!("{what}: spec.vip: {v:?} is not an IPv4 address"))
            })?,
            None => match old4 {
                Some(ip) => ip,
                None => {
                    let taken: HashSet<IpAddr> = owners.keys().copied().collect();
                    let ip = vip::choose_v4(&self.vip4, &taken, &me).ok_or_else(|| {
                        ApplyError::Invalid(format!("{what}: no free VIP left in {}", self.vip4))
                    })?;
                    IpAddr::V4(ip)
                }
            },
        };
        svc.spec.vip = Some(new4.to_string());
        self.reserve(&what, "spec.vip", &me, new4, old4, owners, compares, ops)?;
        // IPv6 only when asked for.
        let old6 = stored
            .and_then(|s| s.spec.vip6.as_deref())
            .and_then(|v| v.parse::<IpAddr>().ok());
        match &svc.spec.vip6 {
            Some(v) => {
                let new6: IpAddr = v.parse().map_err(|_| {
                    ApplyError::Invalid(format!("{what}: spec.vip6: {v:?} is not an IPv6 address"))
                })?;
                self.reserve(&what, "spec.vip6", &me, new6, old6, owners, compares, ops)?;
            }
            None => {
                if let Some(old) = old6 {
                    ops.push(Op::delete(self.keys.vip(&old.to_string())));
                    owners.remove(&old);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &self,
        what: &str,
        field: &str,
        me: &str,
        new: IpAddr,
        old: Option<IpAddr>,
        owners: &mut HashMap<IpAddr, String>,
        compares: &mut Vec<Compare>,
        ops: &mut Vec<Op>,
    ) -> Result<(), ApplyError> {
        match owners.get(&new) {
            Some(owner) if owner != me => {
                return Err(ApplyError::Invalid(format!(
                    "{what}: {field}: {new} is already allocated to Service {owner}"
                )));
            }
            Some(_) => {}
            None => {
                let key = self.keys.vip(&new.to_string());
                compares.push(Compare::absent(&key));
                ops.push(Op::put(key, Bytes::from(me.to_string())));
                owners.insert(new, me.to_string());
            }
        }
        if let Some(old) = old
            && old != new
            && owners.get(&old).is_some_and(|o| o == me)
        {
            ops.push(Op::delete(self.keys.vip(&old.to_string())));
            owners.remove(&old);
        }
        Ok(())
    }

    /// Deletes a resource (and a Service's VIP reservations). Returns the
    /// deleting revision, or NotFound.
    pub async fn delete(&self, key: &ResourceKey) -> Result<Revision, ApplyError> {
        let store_key = self.keys.resource_key(key);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&store_key).await? else {
                return Err(ApplyError::NotFound(format!("{key} not found")));
            };
            let mut txn = Txn::new()
                .when(Compare::mod_revision(&store_key, kv.mod_revision))
                .then(Op::delete(&store_key));
            match decode(&kv)? {
                Resource::Service(s) => {
                    for v in [s.spec.vip, s.spec.vip6].into_iter().flatten() {
                        if let Ok(ip) = v.parse::<IpAddr>() {
                            txn = txn.then(Op::delete(self.keys.vip(&ip.to_string())));
                        }
                    }
                }
                Resource::Workload(_) => {
                    // The host's live and ack records go with it; its
                    // session, wherever it is, sees the deletion and ends.
                    txn = txn
                        .then(Op::delete(self.keys.live_host(&key.name)))
                        .then(Op::delete(self.keys.ack(&key.name)));
                }
                _ => {}
            }
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok(revision);
            }
        }
        Err(ApplyError::Conflict(format!(
            "{key} kept changing; try again"
        )))
    }
}

/// Resources per store transaction in the worst case (a Service with both
/// VIPs: 4 compares and 3 ops, rounded up to 8).
const RESOURCES_PER_TXN: usize = {
    let n = MAX_TXN_OPS / 8;
    if n == 0 { 1 } else { n }
};

/// Splits an apply into chunks whose transactions stay within etcd's op
/// limit: a resource needs at most 2 compares and 3 ops for itself and its
/// VIPs (4 + 3 with an IPv6 VIP).
fn chunk_for_txn(docs: Vec<Resource>) -> Vec<Vec<Resource>> {
    let per_chunk = RESOURCES_PER_TXN;
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    for d in docs {
        current.push(d);
        if current.len() == per_chunk {
            chunks.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmesh_api::document::parse_documents;
    use hostmesh_registry::embedded::EmbeddedStore;
    use std::sync::Arc;

    fn resources(dir: &std::path::Path) -> Resources {
        let store: SharedStore = Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap());
        Resources::new(
            store,
            Keys::new("/t/"),
            "240.240.0.0/16".parse().unwrap(),
            "fd00:240::/96".parse().unwrap(),
        )
    }

    fn svc(name: &str, extra: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{port: 80}}]{extra}}}\n"
        ))
        .unwrap()
        .remove(0)
    }

    fn vip_of(r: &Resource) -> String {
        match r {
            Resource::Service(s) => s.spec.vip.clone().unwrap(),
            _ => panic!("not a service"),
        }
    }

    #[tokio::test]
    async fn allocates_keeps_and_refuses_vips() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let (applied, _) = res.apply(vec![svc("web", "")], false).await.unwrap();
        assert_eq!(applied[0].action, Action::Created);
        let vip = vip_of(&applied[0].resource);
        // Re-applying the same document keeps the VIP and changes nothing.
        let (again, _) = res.apply(vec![svc("web", "")], false).await.unwrap();
        assert_eq!(again[0].action, Action::Unchanged);
        assert_eq!(vip_of(&again[0].resource), vip);
        // Someone else asking for it is refused.
        let e = res
            .apply(vec![svc("api", &format!(", vip: {vip}"))], false)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("Service shop/api: spec.vip: {vip} is already allocated to Service shop/web")
        );
        let e = res
            .apply(vec![svc("api", ", vip: 10.0.0.1")], false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.vip: 10.0.0.1 is outside the service range 240.240.0.0/16"),
            "{e}"
        );
        // Deleting frees it.
        res.delete(&ResourceKey::new(Kind::Service, "shop", "web"))
            .await
            .unwrap();
        res.apply(vec![svc("api", &format!(", vip: {vip}"))], false)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_invalid_document_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let route = parse_documents(
            "apiVersion: hostmesh/v1\nkind: Route\nmetadata: {name: r, namespace: shop}\nspec: {service: missing, rules: [{backends: [{weight: 1}]}]}\n",
        )
        .unwrap()
        .remove(0);
        let e = res
            .apply(vec![svc("web", ""), route], false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("Service shop/missing does not exist"), "{e}");
        let (list, _) = res.list(Kind::Service, None).await.unwrap();
        assert!(list.is_empty(), "nothing of a refused apply is stored");
    }

    #[tokio::test]
    async fn a_stale_revision_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let (applied, _) = res.apply(vec![svc("web", "")], false).await.unwrap();
        let mut stale = applied[0].resource.clone();
        res.apply(vec![svc("web", ", mtls: permissive")], false)
            .await
            .unwrap();
        if let Resource::Service(s) = &mut stale {
            s.spec.mtls = hostmesh_api::resource::MtlsMode::Strict;
        }
        let e = res.apply(vec![stale], false).await.unwrap_err();
        assert!(matches!(e, ApplyError::Conflict(_)), "{e}");
    }

    #[tokio::test]
    async fn large_applies_are_chunked_and_every_vip_is_unique() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let docs: Vec<Resource> = (0..60).map(|i| svc(&format!("s{i}"), "")).collect();
        let (applied, _) = res.apply(docs, false).await.unwrap();
        let vips: HashSet<String> = applied.iter().map(|a| vip_of(&a.resource)).collect();
        assert_eq!(vips.len(), 60);
    }

    #[tokio::test]
    async fn a_large_apply_whose_last_service_asks_for_a_taken_vip_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let (applied, _) = res.apply(vec![svc("owner", "")], false).await.unwrap();
        let taken = vip_of(&applied[0].resource);
        // 40 Services: three transactions' worth; the last one collides.
        let mut docs: Vec<Resource> = (0..39).map(|i| svc(&format!("s{i:02}"), "")).collect();
        docs.push(svc("zz-last", &format!(", vip: {taken}")));
        let e = res.apply(docs, false).await.unwrap_err().to_string();
        assert!(
            e.contains("Service shop/zz-last: spec.vip") && e.contains("already allocated"),
            "{e}"
        );
        let (stored, _) = res.list(Kind::Service, None).await.unwrap();
        assert_eq!(stored.len(), 1, "only the earlier Service: {stored:?}");

        // Two documents of one large apply asking for the same VIP.
        let mut docs: Vec<Resource> = (0..30).map(|i| svc(&format!("t{i:02}"), "")).collect();
        docs.push(svc("dup-a", ", vip: 240.240.9.9"));
        docs.push(svc("dup-b", ", vip: 240.240.9.9"));
        let e = res.apply(docs, false).await.unwrap_err().to_string();
        assert!(e.contains("240.240.9.9 is already allocated"), "{e}");
        let (stored, _) = res.list(Kind::Service, None).await.unwrap();
        assert_eq!(stored.len(), 1);
    }

    #[tokio::test]
    async fn workloads_cannot_be_applied() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let wl = parse_documents(
            "apiVersion: hostmesh/v1\nkind: Workload\nmetadata: {name: web-1, namespace: shop}\nspec: {group: web, identity: x, joinedAt: now}\n",
        )
        .unwrap()
        .remove(0);
        let e = res.apply(vec![wl], false).await.unwrap_err().to_string();
        assert!(e.contains("Workloads are written by the controller"), "{e}");
    }
}
