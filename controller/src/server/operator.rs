//! The operator API, for `meshctl` with the admin credential.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hostmesh_api::document::resource_from_json;
use hostmesh_api::proto::operator_server::Operator;
use hostmesh_api::proto::{
    self, ApplyRequest, ApplyResponse, ApplyResult, CaActivateRequest, CaAddRootRequest,
    CaListRequest, CaListResponse, CaRemoveRootRequest, CaRoot, CreateTokenRequest,
    CreateTokenResponse, DeleteRequest, DeleteResponse, GetRequest, ListRequest, ListResponse,
    ListTokensRequest, ListTokensResponse, RevokeTokenRequest, RevokeTokenResponse, StatusRequest,
    StatusResponse, TokenInfo, WatchEvent, WatchRequest,
};
use hostmesh_api::resource::validate::is_dns_label;
use hostmesh_api::resource::{Kind, Resource, ResourceKey};
use hostmesh_registry::{Compare, EventKind, Op, StoreError, Txn, TxnOutcome};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::require_admin;
use crate::app::Shared;
use crate::ca::{CaError, RootSummary};
use crate::metrics::Metrics;
use crate::resources::{ApplyError, decode};
use crate::tokens::{self, TokenRecord};

/// How long a CA activation waits for this replica's serving certificate
/// to come from the new root (a re-issue takes milliseconds).
const CA_SWITCH_WAIT: Duration = Duration::from_secs(5);

pub struct OperatorService {
    shared: Arc<Shared>,
}

impl OperatorService {
    pub fn new(shared: Arc<Shared>) -> OperatorService {
        OperatorService { shared }
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        require_admin(req, &self.shared.config.trust_domain).map(|_| ())
    }
}

pub(crate) fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!("store unavailable: {m}")),
        StoreError::Invalid(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::Invalid(m) => Status::invalid_argument(m),
        ApplyError::Conflict(m) => Status::aborted(m),
        ApplyError::NotFound(m) => Status::not_found(m),
        ApplyError::Store(e) => store_status(e),
    }
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::Refused(m) => Status::failed_precondition(m),
        CaError::RootNotFound(id) => Status::not_found(format!("CA root {id} not found")),
        CaError::Store(e) => store_status(e),
        other => Status::internal(other.to_string()),
    }
}

fn kind_of(text: &str) -> Result<Kind, Status> {
    Kind::from_cli(text).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{text:?} is not a kind: services, workloadgroups, routes, policies or workloads"
        ))
    })
}

fn to_proto(r: &Resource) -> proto::Resource {
    let meta = r.metadata();
    proto::Resource {
        kind: r.kind().as_str().to_string(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        json: r.to_json(),
        revision: meta.revision.unwrap_or(0),
    }
}

fn token_info(r: &TokenRecord) -> TokenInfo {
    TokenInfo {
        id: r.id.clone(),
        group: r.group.clone(),
        created_unix: r.created_unix,
        expires_unix: r.expires_unix,
        uses_total: r.uses_total,
        uses_left: r.uses_left,
        revoked: r.revoked,
        description: r.description.clone(),
    }
}

fn root_proto(r: &RootSummary) -> CaRoot {
    CaRoot {
        id: r.id.clone(),
        certificate_pem: r.certificate_pem.clone(),
        spki_sha256: r.spki_pin.clone(),
        active: r.active,
        not_after_unix: r.not_after_unix,
        last_issued_valid_until_unix: if r.issued_valid_until_unix == i64::MAX {
            0
        } else {
            r.issued_valid_until_unix
        },
        origin: r.origin.clone(),
    }
}

const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_TOKEN_USES: u32 = 10_000;

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        let mut docs = Vec::with_capacity(req.resources.len());
        for (i, r) in req.resources.iter().enumerate() {
            let doc = resource_from_json(&r.json)
                .map_err(|e| Status::invalid_argument(format!("resources[{i}]: {e}")))?;
            docs.push(doc);
        }
        let result = self.shared.resources.apply(docs, req.dry_run).await;
        Metrics::count(
            &self.shared.metrics.applies,
            if result.is_ok() { "ok" } else { "error" },
        );
        let (applied, revision) = result.map_err(apply_status)?;
        let results = applied
            .into_iter()
            .map(|a| {
                let meta = a.resource.metadata();
                ApplyResult {
                    kind: a.resource.kind().as_str().to_string(),
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                    action: a.action.as_str().to_string(),
                    revision: meta.revision.unwrap_or(0),
                    json: a.resource.to_json(),
                }
            })
            .collect();
        Ok(Response::new(ApplyResponse { results, revision }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<proto::Resource>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        let kind = kind_of(&req.kind)?;
        let key = ResourceKey::new(kind, &req.namespace, &req.name);
        let found = self
            .shared
            .resources
            .get(&key)
            .await
            .map_err(store_status)?;
        let Some(mut r) = found else {
            return Err(Status::not_found(format!("{key} not found")));
        };
        if let Resource::Workload(w) = &mut r {
            crate::sessions::fill_workload_status(&self.shared, w).await;
        }
        Ok(Response::new(to_proto(&r)))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        let kind = kind_of(&req.kind)?;
        let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        let (mut items, revision) = self
            .shared
            .resources
            .list(kind, ns)
            .await
            .map_err(store_status)?;
        for r in &mut items {
            if let Resource::Workload(w) = r {
                crate::sessions::fill_workload_status(&self.shared, w).await;
            }
        }
        Ok(Response::new(ListResponse {
            items: items.iter().map(to_proto).collect(),
            revision,
        }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        let kind = kind_of(&req.kind)?;
        let key = ResourceKey::new(kind, &req.namespace, &req.name);
        let revision = self
            .shared
            .resources
            .delete(&key)
            .await
            .map_err(apply_status)?;
        if kind == Kind::Workload {
            tracing::info!(host = %req.name, "workload deleted: its renewals and config stream are refused from now on");
        }
        Ok(Response::new(DeleteResponse {
            deleted: true,
            revision,
        }))
    }

    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        let keys = self.shared.keys.clone();
        let prefix = if req.kind.is_empty() {
            keys.resources()
        } else {
            let kind = kind_of(&req.kind)?;
            if req.namespace.is_empty() {
                keys.resources_of(kind)
            } else {
                keys.resources_in(kind, &req.namespace)
            }
        };
        let mut stream = self
            .shared
            .store
            .watch(&prefix, req.from_revision)
            .await
            .map_err(store_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut shutdown = self.shared.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                };
                let batch = match item {
                    Some(Ok(b)) => b,
                    Some(Err(StoreError::Compacted {
                        requested,
                        compacted,
                    })) => {
                        let _ = tx
                            .send(Err(Status::out_of_range(format!(
                                "revision {requested} is compacted (oldest kept {compacted}); list again and watch from its revision"
                            ))))
                            .await;
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                    None => return,
                };
                for ev in batch.events {
                    let Some(rk) = keys.parse_resource(&ev.kv.key) else {
                        continue;
                    };
                    let event = match ev.kind {
                        EventKind::Put => match decode(&ev.kv) {
                            Ok(r) => WatchEvent {
                                r#type: proto::watch_event::Type::Put as i32,
                                resource: Some(to_proto(&r)),
                                revision: batch.revision,
                            },
                            Err(_) => continue,
                        },
                        EventKind::Delete => WatchEvent {
                            r#type: proto::watch_event::Type::Delete as i32,
                            resource: Some(proto::Resource {
                                kind: rk.kind.as_str().to_string(),
                                namespace: rk.namespace,
                                name: rk.name,
                                json: String::new(),
                                revision: batch.revision,
                            }),
                            revision: batch.revision,
                        },
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        let (ns, name) = req.group.split_once('/').ok_or_else(|| {
            Status::invalid_argument(format!(
                "--group {:?}: expected NAMESPACE/NAME of a WorkloadGroup",
                req.group
            ))
        })?;
        if !is_dns_label(ns) || !is_dns_label(name) {
            return Err(Status::invalid_argument(format!(
                "--group {:?}: namespace and name must be DNS labels",
                req.group
            )));
        }
        let group_key = ResourceKey::new(Kind::WorkloadGroup, ns, name);
        if self
            .shared
            .resources
            .get(&group_key)
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(Status::failed_precondition(format!(
                "{group_key} does not exist; apply it before creating tokens for it"
            )));
        }
        let ttl = if req.ttl_seconds == 0 {
            self.shared.config.join.default_token_ttl.get()
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        if ttl < Duration::from_secs(60) || ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "--ttl {}: must be between 1m and 30d",
                humantime::format_duration(ttl)
            )));
        }
        let uses = if req.uses == 0 { 1 } else { req.uses };
        if uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "--uses {uses}: at most {MAX_TOKEN_USES}"
            )));
        }
        if req.description.len() > 256 {
            return Err(Status::invalid_argument(
                "--description: at most 256 characters",
            ));
        }
        let (id, token, hash) = tokens::generate().map_err(Status::internal)?;
        let now = self.shared.clock.now_unix();
        let record = TokenRecord {
            id: id.clone(),
            group: format!("{ns}/{name}"),
            secret_sha256: hash,
            created_unix: now,
            expires_unix: now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            uses_total: uses,
            uses_left: uses,
            revoked: false,
            description: req.description,
        };
        let value = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        let key = self.shared.keys.token(&id);
        match self
            .shared
            .store
            .txn(
                Txn::new()
                    .when(Compare::absent(&key))
                    .then(Op::put(&key, value)),
            )
            .await
            .map_err(store_status)?
        {
            TxnOutcome::Committed { .. } => {}
            TxnOutcome::Conflict { .. } => {
                return Err(Status::aborted("token id collision; try again"));
            }
        }
        tracing::info!(token = %id, group = %record.group, uses, "join token created");
        Ok(Response::new(CreateTokenResponse {
            info: Some(token_info(&record)),
            token,
            ca_hash: self.shared.ca.active_pin(),
            controller_url: self.shared.config.advertised_url(),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.admin(&req)?;
        let listed = self
            .shared
            .store
            .list(&self.shared.keys.tokens())
            .await
            .map_err(store_status)?;
        let mut tokens = Vec::new();
        for kv in listed.kvs {
            match serde_json::from_slice::<TokenRecord>(&kv.value) {
                Ok(r) => tokens.push(token_info(&r)),
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable token record"),
            }
        }
        tokens.sort_by_key(|t| t.created_unix);
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        self.admin(&req)?;
        let id = req.into_inner().id;
        let key = self.shared.keys.token(&id);
        for _ in 0..16 {
            let Some(kv) = self.shared.store.get(&key).await.map_err(store_status)? else {
                return Err(Status::not_found(format!("token {id} not found")));
            };
            let mut record: TokenRecord = serde_json::from_slice(&kv.value)
                .map_err(|e| Status::internal(format!("token {id}: {e}")))?;
            record.revoked = true;
            let value = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
            let txn = Txn::new()
                .when(Compare::mod_revision(&key, kv.mod_revision))
                .then(Op::put(&key, value));
            if self
                .shared
                .store
                .txn(txn)
                .await
                .map_err(store_status)?
                .is_committed()
            {
                tracing::info!(token = %id, "join token revoked");
                return Ok(Response::new(RevokeTokenResponse {
                    info: Some(token_info(&record)),
                }));
            }
        }
        Err(Status::aborted(format!(
            "token {id} kept changing; try again"
        )))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.admin(&req)?;
        let (hosts, revision) = crate::sessions::status(&self.shared)
            .await
            .map_err(store_status)?;
        Ok(Response::new(StatusResponse { hosts, revision }))
    }

    async fn ca_list(
        &self,
        req: Request<CaListRequest>,
    ) -> Result<Response<CaListResponse>, Status> {
        self.admin(&req)?;
        let roots = self.shared.ca.roots().iter().map(root_proto).collect();
        Ok(Response::new(CaListResponse { roots }))
    }

    async fn ca_add_root(
        &self,
        req: Request<CaAddRootRequest>,
    ) -> Result<Response<CaRoot>, Status> {
        self.admin(&req)?;
        let root = self
            .shared
            .ca
            .add_root(&*self.shared.store, &self.shared.keys)
            .await
            .map_err(ca_status)?;
        Ok(Response::new(root_proto(&root)))
    }

    async fn ca_activate(
        &self,
        req: Request<CaActivateRequest>,
    ) -> Result<Response<CaRoot>, Status> {
        self.admin(&req)?;
        let id = req.into_inner().id;
        let mut generation = self.shared.ca_generation.clone();
        generation.mark_unchanged();
        let before = self.shared.ca.roots();
        let root = self
            .shared
            .ca
            .activate(&*self.shared.store, &self.shared.keys, &id)
            .await
            .map_err(ca_status)?;
        // Return once this replica presents a certificate from the new root,
        // so that a token minted next (pinning it) joins at once here.
        if self.shared.ca.roots() != before
            && tokio::time::timeout(CA_SWITCH_WAIT, generation.changed())
                .await
                .is_err()
        {
            tracing::warn!(root = %id, "the serving certificate has not switched to the new root yet");
        }
        Ok(Response::new(root_proto(&root)))
    }

    async fn ca_remove_root(
        &self,
        req: Request<CaRemoveRootRequest>,
    ) -> Result<Response<CaListResponse>, Status> {
        self.admin(&req)?;
        let req = req.into_inner();
        self.shared
            .ca
            .remove_root(&*self.shared.store, &self.shared.keys, &req.id, req.force)
            .await
            .map_err(ca_status)?;
        let roots = self.shared.ca.roots().iter().map(root_proto).collect();
        Ok(Response::new(CaListResponse { roots }))
    }
}
