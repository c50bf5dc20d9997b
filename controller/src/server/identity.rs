//! Host identity: the trust bundle for pinning, join with a token, and
//! renewal with the current certificate.
//!
//! Join failures all read the same to the caller ("join token is not
//! valid"), whether the id is unknown, the secret wrong, or the token
//! expired, revoked or used up, so the answer tells an attacker nothing;
//! the controller logs the real reason (never the secret). Failed attempts
//! count against the source address; past the limit every attempt from it
//! is refused until the window passes.

use std::sync::Arc;

use hostmesh_api::clock::rfc3339;
use hostmesh_api::proto::identity_server::Identity;
use hostmesh_api::proto::{
    JoinRequest, JoinResponse, PrepareJoinRequest, PrepareJoinResponse, RenewRequest,
    RenewResponse, TrustBundle as TrustBundleMsg, TrustBundleRequest,
};
use hostmesh_api::resource::{Kind, Object, ObjectMeta, Resource, ResourceKey, WorkloadSpec};
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_registry::{Compare, Op, Txn, TxnOutcome};
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Request, Response, Status};

use super::operator::store_status;
use super::{peer_of, require_host};
use crate::app::Shared;
use crate::ca::CaError;
use crate::metrics::Metrics;
use crate::tokens::{self, PresentedToken, TokenRecord};

pub struct IdentityService {
    shared: Arc<Shared>,
    /// Joins on one token take turns in this controller (striped by token
    /// id), so an Ansible run of many forks sharing a token does not spend
    /// its compare-and-swap attempts racing itself. The CAS still guards
    /// the use count against other controllers.
    join_turns: Box<[tokio::sync::Mutex<()>]>,
}

/// How many join lanes: tokens that hash to one lane take turns.
const JOIN_TURNS: usize = 64;

/// Compare-and-swap attempts on a token's use count before giving up.
const JOIN_ATTEMPTS: u32 = 16;

impl IdentityService {
    pub fn new(shared: Arc<Shared>) -> IdentityService {
        IdentityService {
            shared,
            join_turns: (0..JOIN_TURNS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn join_turn(&self, token_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        token_id.hash(&mut h);
        &self.join_turns[(h.finish() % JOIN_TURNS as u64) as usize]
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(
            self.shared
                .clock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(i64::MAX)
    }

    /// Refuses callers over the failure limit.
    fn check_rate(&self, ip: std::net::IpAddr, now_ms: i64) -> Result<(), Status> {
        if let Err(wait) = self.shared.limiter.check(ip, now_ms) {
            Metrics::count(&self.shared.metrics.joins, "rate_limited");
            tracing::warn!(%ip, "join refused: too many failed attempts");
            return Err(Status::resource_exhausted(format!(
                "too many failed join attempts from {ip}; try again in {}s",
                wait.as_secs().max(1)
            )));
        }
        Ok(())
    }

    /// Counts a failure against `ip` and gives the uniform answer.
    fn refuse(&self, ip: std::net::IpAddr, now_ms: i64, reason: &str, token_id: &str) -> Status {
        self.shared.limiter.record_failure(ip, now_ms);
        Metrics::count(&self.shared.metrics.joins, "refused");
        tracing::warn!(%ip, token = token_id, reason, "join refused");
        Status::unauthenticated(INVALID_TOKEN)
    }

    /// Reads and checks a presented token; on success its record, the
    /// store entry (for CAS), and its group with the SPIFFE ID it gives.
    async fn genuine_token(
        &self,
        ip: std::net::IpAddr,
        now_ms: i64,
        presented: &PresentedToken,
    ) -> Result<
        (
            TokenRecord,
            hostmesh_registry::KeyValue,
            hostmesh_api::resource::WorkloadGroup,
            SpiffeId,
        ),
        Status,
    > {
        let shared = &self.shared;
        let token_key = shared.keys.token(&presented.id);
        let kv = shared.store.get(&token_key).await.map_err(store_status)?;
        let record: Option<TokenRecord> = match &kv {
            Some(kv) => Some(
                serde_json::from_slice(&kv.value)
                    .map_err(|e| Status::internal(format!("token record {}: {e}", presented.id)))?,
            ),
            None => None,
        };
        if let Err(refusal) = tokens::check(record.as_ref(), presented, shared.clock.now_unix()) {
            return Err(self.refuse(ip, now_ms, refusal.as_str(), &presented.id));
        }
        let (Some(kv), Some(record)) = (kv, record) else {
            return Err(self.refuse(ip, now_ms, "unknown token id", &presented.id));
        };
        // The token is genuine: from here on errors may be specific.
        let Some((ns, group_name)) = record.group.split_once('/') else {
            return Err(Status::internal(format!(
                "token {} has a bad group {:?}",
                record.id, record.group
            )));
        };
        let group_key = ResourceKey::new(Kind::WorkloadGroup, ns, group_name);
        let group = match shared
            .resources
            .get(&group_key)
            .await
            .map_err(store_status)?
        {
            Some(Resource::WorkloadGroup(g)) => g,
            _ => {
                return Err(Status::failed_precondition(format!(
                    "{group_key}, the group of this token, no longer exists"
                )));
            }
        };
        let spiffe = SpiffeId::new(&shared.config.trust_domain, ns, group.identity_name())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok((record, kv, group, spiffe))
    }

    fn bundle_msg(&self) -> TrustBundleMsg {
        let bundle = self.shared.ca.bundle();
        TrustBundleMsg {
            trust_domain: bundle.trust_domain.clone(),
            roots_pem: bundle.to_pem(),
        }
    }
}

/// The one answer every failed token check gets.
const INVALID_TOKEN: &str = "join token is not valid (unknown, expired, revoked or used up); ask the operator for a new one";

fn csr_status(e: CaError) -> Status {
    match e {
        CaError::BadCsr(m) => Status::invalid_argument(format!("certificate request refused: {m}")),
        CaError::Refused(m) => Status::failed_precondition(m),
        other => Status::internal(other.to_string()),
    }
}

fn new_host_id(group: &str) -> Result<String, Status> {
    let mut b = [0u8; 4];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Status::internal("no randomness"))?;
    // Keep the whole id a DNS label (<= 63).
    let prefix: String = group.chars().take(54).collect();
    Ok(format!("{prefix}-{}", hex::encode(b)))
}

const MAX_HOSTNAME: usize = 253;

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_trust_bundle(
        &self,
        _req: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleMsg>, Status> {
        Ok(Response::new(self.bundle_msg()))
    }

    async fn prepare_join(
        &self,
        req: Request<PrepareJoinRequest>,
    ) -> Result<Response<PrepareJoinResponse>, Status> {
        let ip = peer_of(&req)?.remote.ip();
        let now_ms = self.now_ms();
        self.check_rate(ip, now_ms)?;
        let Ok(presented) = PresentedToken::parse(&req.into_inner().token) else {
            return Err(self.refuse(ip, now_ms, "malformed token", ""));
        };
        let (record, _, group, spiffe) = self.genuine_token(ip, now_ms, &presented).await?;
        Ok(Response::new(PrepareJoinResponse {
            spiffe_id: spiffe.to_string(),
            namespace: group.metadata.namespace.clone(),
            group: record
                .group
                .split_once('/')
                .map(|(_, g)| g.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let ip = peer_of(&req)?.remote.ip();
        let now_ms = self.now_ms();
        self.check_rate(ip, now_ms)?;
        let shared = &self.shared;
        let req = req.into_inner();
        let Ok(presented) = PresentedToken::parse(&req.token) else {
            return Err(self.refuse(ip, now_ms, "malformed token", ""));
        };
        if req.hostname.len() > MAX_HOSTNAME {
            return Err(Status::invalid_argument(format!(
                "hostname is longer than {MAX_HOSTNAME} characters"
            )));
        }
        let token_key = shared.keys.token(&presented.id);
        let turn = self.join_turn(&presented.id).lock().await;
        let mut csr_checked_for = None;
        for attempt in 0..JOIN_ATTEMPTS {
            if attempt > 0 {
                // Another controller used the token meanwhile: back off a
                // random 1..2^attempt ms (at most 64 ms) before reading it
                // again, so the contenders spread out.
                let cap = 1u64 << attempt.min(6);
                tokio::time::sleep(std::time::Duration::from_millis(
                    1 + rand::random::<u64>() % cap,
                ))
                .await;
            }
            let (mut record, kv, group, spiffe) =
                self.genuine_token(ip, now_ms, &presented).await?;
            let ns = group.metadata.namespace.clone();
            let ns = ns.as_str();
            let group_name = group.metadata.name.clone();
            let group_name = group_name.as_str();
            // Check the CSR before spending a use of the token (once per
            // identity the token gives; it changes only if its group does).
            if csr_checked_for.as_ref() != Some(&spiffe) {
                crate::ca::check_csr(&req.csr_pem, &spiffe).map_err(csr_status)?;
                csr_checked_for = Some(spiffe.clone());
            }
            let host_id = new_host_id(group_name)?;
            let workload = Resource::Workload(Object::new(
                Kind::Workload,
                ObjectMeta::new(ns, &host_id),
                WorkloadSpec {
                    group: group_name.to_string(),
                    identity: spiffe.to_string(),
                    hostname: req.hostname.clone(),
                    labels: group.spec.labels.clone(),
                    joined_at: rfc3339(shared.clock.now_unix()),
                    token_id: record.id.clone(),
                },
            ));
            record.uses_left -= 1;
            let workload_key = shared.keys.resource(Kind::Workload, ns, &host_id);
            let txn = Txn::new()
                .when(Compare::mod_revision(&token_key, kv.mod_revision))
                .when(Compare::absent(&workload_key))
                .then(Op::put(
                    &token_key,
                    serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?,
                ))
                .then(Op::put(
                    &workload_key,
                    workload.without_store_fields().to_json(),
                ));
            match shared.store.txn(txn).await.map_err(store_status)? {
                TxnOutcome::Committed { .. } => {}
                // Someone else used the token meanwhile: check it again.
                TxnOutcome::Conflict { .. } => continue,
            }
            drop(turn);
            let issued = shared
                .ca
                .issue_for_csr(&req.csr_pem, &spiffe, &host_id)
                .map_err(csr_status)?;
            Metrics::count(&shared.metrics.joins, "ok");
            tracing::info!(host = %host_id, group = %record.group, token = %record.id, %ip, "host joined");
            return Ok(Response::new(JoinResponse {
                host_id,
                namespace: ns.to_string(),
                group: group_name.to_string(),
                spiffe_id: spiffe.to_string(),
                certificate_chain_pem: issued.chain_pem,
                trust_bundle: Some(self.bundle_msg()),
            }));
        }
        Err(Status::aborted(
            "the token kept changing under concurrent joins; try again",
        ))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let shared = &self.shared;
        let host = require_host(&req, &shared.config.trust_domain)?;
        let csr = req.into_inner().csr_pem;
        let key = ResourceKey::new(Kind::Workload, host.spiffe_id.namespace(), &host.host_id);
        let workload = match shared.resources.get(&key).await.map_err(store_status)? {
            Some(Resource::Workload(w)) => w,
            _ => {
                Metrics::count(&shared.metrics.renewals, "refused");
                tracing::warn!(host = %host.host_id, "renewal refused: the host's Workload was deleted");
                return Err(Status::permission_denied(format!(
                    "host {} has been removed from the mesh; it must join again with a new token",
                    host.host_id
                )));
            }
        };
        if workload.spec.identity != host.spiffe_id.to_string() {
            Metrics::count(&shared.metrics.renewals, "refused");
            return Err(Status::permission_denied(format!(
                "host {} is registered as {}, not {}",
                host.host_id, workload.spec.identity, host.spiffe_id
            )));
        }
        let issued = shared
            .ca
            .issue_for_csr(&csr, &host.spiffe_id, &host.host_id)
            .map_err(csr_status)?;
        Metrics::count(&shared.metrics.renewals, "ok");
        tracing::info!(host = %host.host_id, not_after = %rfc3339(issued.not_after_unix), "certificate renewed");
        Ok(Response::new(RenewResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle: Some(self.bundle_msg()),
        }))
    }
}
