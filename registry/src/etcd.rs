//! The etcd backend: the store in an etcd v3 cluster (3.4 and later), for a
//! controller that runs replicated or that shares etcd with other systems.
//!
//! [`Store`] is etcd-shaped, so most calls map one to one: a transaction is
//! one etcd Txn (compares on `version`/`mod_revision`, and on failure one
//! Range per compared key so that a conflict reports what is stored now); a
//! list is one prefix Range at one revision; leases are etcd leases.
//!
//! What this module adds is riding over a cluster member going away:
//!
//! - Requests that fail because a member is unreachable, has no leader or
//!   timed out are retried with jittered backoff for up to
//!   [`RETRY_BUDGET`]; the client balances over every endpoint, so a retry
//!   usually lands on a live member. See [`EtcdStore::txn`] for why retrying
//!   writes is safe for this store's callers.
//! - A watch is pinned to the member it was opened on. When that stream
//!   breaks, [`EtcdStore::watch`]'s stream opens a new one from the
//!   revision after the last one it received (or that a progress
//!   notification vouched for), so callers see no gap and no duplicate. It
//!   gives up only after [`WATCH_RECONNECT_BUDGET`] without a working
//!   stream.
//! - A lease keeper re-opens its keep-alive stream when it breaks.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions,
    EventType, GetOptions, Identity, KvClient, LeaseClient, PutOptions, TlsOptions, Txn as EtcdTxn,
    TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use tonic::Code;

use crate::{
    Event, EventKind, KeyValue, LeaseId, LeaseInfo, LeaseKeeper, ListResult, Op, Precondition,
    Result, Revision, Store, StoreError, Txn, TxnOutcome, WatchBatch, WatchStream, check_txn,
};

/// How long a request is retried while the cluster is unreachable or has
/// no leader (a leader election takes about 2 s with default settings).
pub const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// How long a watch keeps trying to re-open a broken stream before it ends
/// with [`StoreError::Unavailable`].
pub const WATCH_RECONNECT_BUDGET: Duration = Duration::from_secs(30);
/// etcd refuses keep-alive pings more often than every 5 s
/// (`--grpc-keepalive-min-time`) with a GOAWAY.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses may carry many values of up to [`crate::MAX_VALUE_BYTES`]
/// (a list, or a watch catching up); tonic's default limit is 4 MiB.
const MAX_RESPONSE_BYTES: usize = 512 << 20;
/// etcd raises shorter TTLs to its minimum (1.5 election timeouts, 1.5 s
/// by default); asking for it explicitly keeps `lease_info` honest.
const MIN_LEASE_TTL_SECS: i64 = 2;

/// Where the etcd cluster is and how to authenticate to it.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `host:port` (or `http://host:port`, `https://host:port`) of every
    /// member the client may use.
    pub endpoints: Vec<String>,
    /// TLS (HTTPS) to the members; None: plain HTTP.
    pub tls: Option<EtcdTls>,
    /// etcd user authentication (both or neither).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Bound on opening a TCP (and TLS) connection to one member, and on
    /// the initial probe of the cluster.
    pub connect_timeout: Duration,
    /// Bound on waiting for the answer to one attempt of a request;
    /// retries follow within [`RETRY_BUDGET`]. A write sent to a follower
    /// just as the leader dies is lost with the leader and waits this long
    /// before it is retried, so keep it a small multiple of etcd's election
    /// timeout.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Plain HTTP to `endpoints`, no authentication, a 5 s connect
    /// timeout and a 3 s request timeout (etcd's default election timeout
    /// is 1 s).
    pub fn new<I, S>(endpoints: I) -> EtcdConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// PEM files for TLS to etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates.
    pub ca_file: PathBuf,
    /// Client certificate and key, when etcd requires client certificates
    /// (`--client-cert-auth`); both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// etcd user and password.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The store in an etcd cluster. Cheap to clone; clones share one
/// connection pool.
#[derive(Clone)]
pub struct EtcdStore {
    /// For messages: "127.0.0.1:2379,127.0.0.1:22379".
    endpoints: String,
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    request_timeout: Duration,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        StoreError::Invalid(format!(
            "reading etcd TLS {what} from {}: {e}",
            path.display()
        ))
    })
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions> {
    let mut options =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem("CA", &tls.ca_file)?));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read_pem("client certificate", cert)?,
                read_pem("client key", key)?,
            ));
        }
        (None, None) => {}
        (Some(cert), None) => {
            return Err(StoreError::Invalid(format!(
                "etcd TLS client certificate {} is set without a key file",
                cert.display()
            )));
        }
        (None, Some(key)) => {
            return Err(StoreError::Invalid(format!(
                "etcd TLS client key {} is set without a certificate file",
                key.display()
            )));
        }
    }
    Ok(options)
}

/// `host:port` → `http://host:port` or `https://host:port`; refuses a
/// scheme that contradicts the TLS setting.
fn endpoint_url(endpoint: &str, tls: bool) -> Result<String> {
    let endpoint = endpoint.trim();
    if endpoint.is_empty() {
        return Err(StoreError::Invalid("empty etcd endpoint".to_string()));
    }
    match (endpoint.split_once("://"), tls) {
        (None, false) => Ok(format!("http://{endpoint}")),
        (None, true) => Ok(format!("https://{endpoint}")),
        (Some(("http", _)), false) | (Some(("https", _)), true) => Ok(endpoint.to_string()),
        (Some(("http", _)), true) => Err(StoreError::Invalid(format!(
            "etcd endpoint {endpoint} is plain http:// but TLS is configured"
        ))),
        (Some(("https", _)), false) => Err(StoreError::Invalid(format!(
            "etcd endpoint {endpoint} is https:// but no TLS CA is configured"
        ))),
        (Some((scheme, _)), _) => Err(StoreError::Invalid(format!(
            "etcd endpoint {endpoint} has unknown scheme {scheme:?}; expected host:port"
        ))),
    }
}

impl EtcdStore {
    /// Connects to the cluster and checks that it answers (a linearizable
    /// read, so a cluster without quorum counts as unreachable), within
    /// `connect_timeout`.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "connecting to etcd: no endpoints given".to_string(),
            ));
        }
        let urls = config
            .endpoints
            .iter()
            .map(|e| endpoint_url(e, config.tls.is_some()))
            .collect::<Result<Vec<_>>>()?;
        let endpoints = config.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        match (&config.username, &config.password) {
            (Some(user), Some(password)) => {
                options = options
                    .with_user(user.clone(), password.clone())
                    .with_auto_token_refresh(true);
            }
            (None, None) => {}
            (Some(user), None) => {
                return Err(StoreError::Invalid(format!(
                    "etcd user {user:?} is set without a password"
                )));
            }
            (None, Some(_)) => {
                return Err(StoreError::Invalid(
                    "an etcd password is set without a user name".to_string(),
                ));
            }
        }
        let client = Client::connect(&urls, Some(options))
            .await
            .map_err(|e| connect_error(&endpoints, map_error("connecting", e)))?;
        let store = EtcdStore {
            endpoints: endpoints.clone(),
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
            request_timeout: config.request_timeout,
        };
        // connect() dials lazily: probe, retrying within connect_timeout
        // (a member may be down; the balancer picks another on retry).
        store
            .retry("probing", config.connect_timeout, || {
                let mut kv = store.kv.clone();
                async move {
                    kv.get("\0", Some(GetOptions::new().with_count_only()))
                        .await
                        .map_err(|e| map_error("probing", e))
                }
            })
            .await
            .map_err(|e| connect_error(&endpoints, e))?;
        tracing::info!(endpoints = %endpoints, "connected to etcd");
        Ok(store)
    }

    /// Runs `call` until it succeeds, fails with a non-retryable error, or
    /// `budget` is spent.
    async fn retry<T, F, Fut>(&self, what: &str, budget: Duration, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if !e.is_retryable() || started.elapsed() + delay > budget {
                        return Err(e);
                    }
                    tracing::debug!(
                        endpoints = %self.endpoints,
                        error = %e,
                        retry_in = ?delay,
                        "{what} failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn what(&self, action: impl fmt::Display) -> String {
        format!("{action} on etcd at {}", self.endpoints)
    }
}

/// Says which cluster could not be connected to.
fn connect_error(endpoints: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(msg) => {
            StoreError::Unavailable(format!("cannot reach etcd at {endpoints}: {msg}"))
        }
        StoreError::Invalid(msg) => {
            StoreError::Invalid(format!("connecting to etcd at {endpoints}: {msg}"))
        }
        StoreError::Other(msg) => {
            StoreError::Other(format!("connecting to etcd at {endpoints}: {msg}"))
        }
        other => other,
    }
}

/// Maps an etcd client error to a store error; connection trouble, no
/// leader and timeouts become [`StoreError::Unavailable`] (retryable).
fn map_error(what: &str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let msg = format!(
                "{what}: {} ({:?})",
                with_causes(status.message(), &status),
                status.code()
            );
            match status.code() {
                Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => {
                    StoreError::Unavailable(msg)
                }
                // tonic reports a broken HTTP/2 connection (GOAWAY, reset,
                // broken pipe) as Internal; etcd itself does not use it for
                // request errors.
                Code::Internal | Code::Aborted => StoreError::Unavailable(msg),
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    StoreError::Invalid(msg)
                }
                _ => StoreError::Other(msg),
            }
        }
        E::TransportError(e) => StoreError::Unavailable(format!(
            "{what}: {}",
            with_causes(&format!("transport error: {e}"), &e)
        )),
        E::IoError(e) => {
            StoreError::Unavailable(format!("{what}: {}", with_causes(&e.to_string(), &e)))
        }
        E::WatchError(e) | E::LeaseKeepAliveError(e) => {
            StoreError::Unavailable(format!("{what}: stream closed: {e}"))
        }
        E::InvalidArgs(e) => StoreError::Invalid(format!("{what}: {e}")),
        E::InvalidUri(e) => StoreError::Invalid(format!("{what}: invalid endpoint: {e}")),
        E::Utf8Error(e) => StoreError::Corrupt(format!("{what}: {e}")),
        other => StoreError::Other(format!("{what}: {other}")),
    }
}

/// `top` followed by ": cause" for each of the error's sources (tonic
/// hides why a connection failed, e.g. a certificate problem, in them),
/// skipping a cause that repeats the text before it.
fn with_causes(top: &str, e: &dyn std::error::Error) -> String {
    let mut out = top.to_string();
    let mut last = top.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
            last = text;
        }
        source = cause.source();
    }
    out
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == Code::NotFound && s.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        _ => false,
    }
}

fn convert_kv(kv: etcd_client::KeyValue) -> Result<KeyValue> {
    let (create_revision, mod_revision, version, lease) = (
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let (key, value) = kv.into_key_value();
    let key = String::from_utf8(key).map_err(|e| {
        StoreError::Corrupt(format!(
            "etcd returned key {:?} that is not UTF-8",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })?;
    Ok(KeyValue {
        key,
        value: Bytes::from(value),
        create_revision,
        mod_revision,
        version,
        lease: (lease != 0).then_some(lease),
    })
}

/// A [`Precondition`] as an etcd compare. A missing key has version 0 and
/// mod_revision 0 in etcd compares, so "exists at revision r" must not be
/// a plain `mod_revision == r` when r <= 0.
fn compare(c: &crate::Compare) -> EtcdCompare {
    let key = c.key.as_bytes().to_vec();
    match c.condition {
        Precondition::Absent => EtcdCompare::version(key, CompareOp::Equal, 0),
        Precondition::Present => EtcdCompare::version(key, CompareOp::Greater, 0),
        Precondition::ModRevision(rev) if rev > 0 => {
            EtcdCompare::mod_revision(key, CompareOp::Equal, rev)
        }
        // Never true: versions are not negative.
        Precondition::ModRevision(_) => EtcdCompare::version(key, CompareOp::Less, 0),
    }
}

fn build_txn(txn: &Txn) -> EtcdTxn {
    let ops: Vec<TxnOp> = txn
        .ops
        .iter()
        .map(|op| match op {
            Op::Put { key, value, lease } => TxnOp::put(
                key.as_bytes().to_vec(),
                value.to_vec(),
                lease.map(|id| PutOptions::new().with_lease(id)),
            ),
            Op::Delete { key } => TxnOp::delete(key.as_bytes().to_vec(), None),
        })
        .collect();
    if txn.compares.is_empty() {
        return EtcdTxn::new().and_then(ops);
    }
    let compares: Vec<EtcdCompare> = txn.compares.iter().map(compare).collect();
    let reads: Vec<TxnOp> = txn
        .compares
        .iter()
        .map(|c| TxnOp::get(c.key.as_bytes().to_vec(), None))
        .collect();
    EtcdTxn::new().when(compares).and_then(ops).or_else(reads)
}

fn lease_secs(ttl: Duration) -> Result<i64> {
    if ttl.is_zero() {
        return Err(StoreError::Invalid(
            "lease TTL must be positive".to_string(),
        ));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .max(MIN_LEASE_TTL_SECS))
}

fn secs(n: i64) -> Duration {
    Duration::from_secs(u64::try_from(n).unwrap_or(0))
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let what = self.what(format_args!("get {key:?}"));
        let mut resp = self
            .retry(&what, RETRY_BUDGET, || {
                let (mut kv, key, what) = (self.kv.clone(), key.to_string(), what.clone());
                async move { kv.get(key, None).await.map_err(|e| map_error(&what, e)) }
            })
            .await?;
        resp.take_kvs()
            .into_iter()
            .next()
            .map(convert_kv)
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let what = self.what(format_args!("list {prefix:?}"));
        let mut resp = self
            .retry(&what, RETRY_BUDGET, || {
                let (mut kv, prefix, what) = (self.kv.clone(), prefix.to_string(), what.clone());
                async move {
                    kv.get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                        .map_err(|e| map_error(&what, e))
                }
            })
            .await?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Other(format!("{what}: the response has no header")))?;
        let kvs = resp
            .take_kvs()
            .into_iter()
            .map(convert_kv)
            .collect::<Result<Vec<_>>>()?;
        Ok(ListResult { kvs, revision })
    }

    /// Retries: a write that fails ambiguously (the connection broke after
    /// the request left) may or may not have been applied, and which one
    /// cannot be known in general. It is retried anyway, because for the
    /// transactions this store's callers make that is safe:
    /// - with compares (compare-and-swap), a retry of an applied write finds
    ///   the compares failing and reports [`TxnOutcome::Conflict`] with the
    ///   current values, which the caller already handles by re-reading
    ///   (where it finds its own write); a retry of a write that was not
    ///   applied simply applies it;
    /// - without compares, the ops are puts and deletes of fixed values, so
    ///   applying them twice leaves the same keys and values (one extra
    ///   revision, which watchers see as a repeated put).
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        check_txn(&txn)?;
        for op in &txn.ops {
            if let Op::Put {
                lease: Some(id), ..
            } = op
                && *id <= 0
            {
                return Err(StoreError::LeaseNotFound(*id));
            }
        }
        let what = self.what(format_args!(
            "transaction ({} compares, {} ops, first key {:?})",
            txn.compares.len(),
            txn.ops.len(),
            txn.ops
                .first()
                .map(Op::key)
                .or(txn.compares.first().map(|c| c.key.as_str()))
                .unwrap_or("")
        ));
        let first_lease = txn.ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        });
        let request = build_txn(&txn);
        let resp = self
            .retry(&what, RETRY_BUDGET, || {
                let (mut kv, request, what) = (self.kv.clone(), request.clone(), what.clone());
                async move {
                    kv.txn(request).await.map_err(|e| match first_lease {
                        Some(id) if is_lease_not_found(&e) => StoreError::LeaseNotFound(id),
                        _ => map_error(&what, e),
                    })
                }
            })
            .await?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Other(format!("{what}: the response has no header")))?;
        if resp.succeeded() {
            return Ok(TxnOutcome::Committed { revision });
        }
        let reads = resp.op_responses();
        if reads.len() != txn.compares.len() {
            return Err(StoreError::Other(format!(
                "{what}: etcd answered a failed transaction with {} reads for {} compares",
                reads.len(),
                txn.compares.len()
            )));
        }
        let mut current = Vec::with_capacity(reads.len());
        for (c, read) in txn.compares.iter().zip(reads) {
            let kv = match read {
                TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                other => {
                    return Err(StoreError::Other(format!(
                        "{what}: expected a read for {:?}, got {other:?}",
                        c.key
                    )));
                }
            };
            current.push((c.key.clone(), kv.map(convert_kv).transpose()?));
        }
        Ok(TxnOutcome::Conflict { current })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        if from < 0 {
            return Err(StoreError::Invalid(format!(
                "watch on {prefix:?} from revision {from}: revisions are positive (0: from now)"
            )));
        }
        // "From now" must mean now for the cluster, not for whichever member
        // the watch lands on: a lagging follower would start before changes
        // already acknowledged. A (linearizable) read pins the revision.
        let from = if from == 0 {
            self.current_revision().await? + 1
        } else {
            from
        };
        let mut watch = EtcdWatch {
            client: self.watch.clone(),
            prefix: prefix.to_string(),
            what: self.what(format_args!("watch {prefix:?}")),
            request_timeout: self.request_timeout,
            next: from,
            stream: None,
            pending: VecDeque::new(),
            failing_since: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            done: false,
        };
        // Open now, so that a watch from 0 sees every change made after this
        // call returns; the stream pins `next` from the created response.
        let what = watch.what.clone();
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match watch.open().await {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay();
                    if !e.is_retryable() || started.elapsed() + delay > RETRY_BUDGET {
                        if matches!(e, StoreError::Compacted { .. }) {
                            // Reported as the stream's first item, as for
                            // a compaction noticed later.
                            return Ok(Box::pin(futures::stream::iter([Err(e)])));
                        }
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "opening {what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        Ok(Box::pin(futures::stream::unfold(
            watch,
            |mut w| async move {
                let item = w.next_batch().await?;
                Some((item, w))
            },
        )))
    }

    async fn current_revision(&self) -> Result<Revision> {
        let what = self.what("reading the current revision");
        let resp = self
            .retry(&what, RETRY_BUDGET, || {
                let (mut kv, what) = (self.kv.clone(), what.clone());
                async move {
                    kv.get("\0", Some(GetOptions::new().with_count_only()))
                        .await
                        .map_err(|e| map_error(&what, e))
                }
            })
            .await?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Other(format!("{what}: the response has no header")))
    }

    /// Physical compaction (returns once the history is gone). Compacting
    /// at or below an earlier compaction succeeds without doing anything;
    /// compacting a future revision is [`StoreError::Invalid`].
    async fn compact(&self, revision: Revision) -> Result<()> {
        let what = self.what(format_args!("compact at revision {revision}"));
        self.retry(&what, RETRY_BUDGET, || {
            let (mut kv, what) = (self.kv.clone(), what.clone());
            async move {
                match kv
                    .compact(revision, Some(CompactionOptions::new().with_physical()))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(etcd_client::Error::GRpcStatus(s))
                        if s.code() == Code::OutOfRange && s.message().contains("compacted") =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(map_error(&what, e)),
                }
            }
        })
        .await
    }

    /// etcd grants at least 2 s (its minimum TTL) and whole seconds
    /// (rounded up). A grant retried after an ambiguous failure may leave an
    /// unused lease behind; it has no keys and expires on its own.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = lease_secs(ttl)?;
        let what = self.what(format_args!("grant a lease of {ttl} s"));
        let resp = self
            .retry(&what, RETRY_BUDGET, || {
                let (mut lease, what) = (self.lease.clone(), what.clone());
                async move {
                    lease
                        .grant(ttl, None)
                        .await
                        .map_err(|e| map_error(&what, e))
                }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Other(format!("{what}: {}", resp.error())));
        }
        Ok(resp.id())
    }

    async fn lease_keeper(&self, lease: LeaseId) -> Result<Box<dyn LeaseKeeper>> {
        let info = self
            .lease_info(lease)
            .await?
            .ok_or(StoreError::LeaseNotFound(lease))?;
        let mut keeper = EtcdLeaseKeeper {
            client: self.lease.clone(),
            id: lease,
            what: self.what(format_args!("keep lease {lease:x} alive")),
            request_timeout: self.request_timeout,
            granted_ttl: info.granted_ttl,
        };
        // Refresh once now, so that an unknown lease is reported here.
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match keeper.refresh_once().await.map(|_| ()) {
                Ok(()) => return Ok(Box::new(keeper)),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if !e.is_retryable() || started.elapsed() + delay > RETRY_BUDGET {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "{} failed; retrying", keeper.what);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Revoking a lease that does not exist (any more) succeeds: afterwards
    /// the lease and its keys are gone either way, and a revoke retried
    /// after an ambiguous failure must not fail. The embedded backend does
    /// the same.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let what = self.what(format_args!("revoke lease {lease:x}"));
        self.retry(&what, RETRY_BUDGET, || {
            let (mut client, what) = (self.lease.clone(), what.clone());
            async move {
                match client.revoke(lease).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_lease_not_found(&e) => Ok(()),
                    Err(e) => Err(map_error(&what, e)),
                }
            }
        })
        .await
    }

    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>> {
        let what = self.what(format_args!("read lease {lease:x}"));
        let resp = self
            .retry(&what, RETRY_BUDGET, || {
                let (mut client, what) = (self.lease.clone(), what.clone());
                async move {
                    match client.time_to_live(lease, None).await {
                        Ok(resp) => Ok(Some(resp)),
                        Err(e) if is_lease_not_found(&e) => Ok(None),
                        Err(e) => Err(map_error(&what, e)),
                    }
                }
            })
            .await?;
        Ok(resp.filter(|r| r.ttl() >= 0).map(|r| LeaseInfo {
            id: lease,
            granted_ttl: secs(r.granted_ttl()),
            remaining: secs(r.ttl()),
        }))
    }
}

// ------------------------------------------------------------------ watch

/// One logical watch over as many etcd watch streams as it takes.
struct EtcdWatch {
    client: WatchClient,
    prefix: String,
    what: String,
    request_timeout: Duration,
    /// The first revision not yet received: where a new stream starts. 0
    /// only until the first stream is created ("from now").
    next: Revision,
    stream: Option<etcd_client::WatchStream>,
    pending: VecDeque<WatchBatch>,
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    backoff: Backoff,
    done: bool,
}

enum Received {
    /// Events or progress: keep reading.
    Progress,
    /// The stream broke: open another.
    Broken(StoreError),
    /// The watch is over (compacted, or refused for good).
    Fatal(StoreError),
}

impl EtcdWatch {
    /// Opens a stream from `next` and waits for etcd to confirm it.
    async fn open(&mut self) -> Result<()> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if self.next > 0 {
            options = options.with_start_revision(self.next);
        }
        let mut stream = self
            .client
            .clone()
            .watch(self.prefix.clone(), Some(options))
            .await
            .map_err(|e| map_error(&self.what, e))?;
        let first = tokio::time::timeout(self.request_timeout, stream.message()).await;
        let resp = match first {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "{}: etcd did not confirm the watch within {:?}",
                    self.what, self.request_timeout
                )));
            }
            Ok(Err(e)) => return Err(map_error(&self.what, e)),
            Ok(Ok(None)) => {
                return Err(StoreError::Unavailable(format!(
                    "{}: etcd closed the stream before confirming the watch",
                    self.what
                )));
            }
            Ok(Ok(Some(resp))) => resp,
        };
        if resp.created() && !resp.canceled() && self.next == 0 {
            let revision = resp.header().map(|h| h.revision()).ok_or_else(|| {
                StoreError::Other(format!("{}: created response has no header", self.what))
            })?;
            self.next = revision + 1;
        }
        match self.receive(resp) {
            Received::Progress => {}
            Received::Broken(e) | Received::Fatal(e) => return Err(e),
        }
        tracing::debug!(prefix = %self.prefix, from = self.next, "etcd watch stream open");
        self.stream = Some(stream);
        self.failing_since = None;
        Ok(())
    }

    /// Takes one response: queues its events, one batch per revision.
    fn receive(&mut self, resp: etcd_client::WatchResponse) -> Received {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Received::Fatal(StoreError::Compacted {
                    requested: self.next,
                    compacted: resp.compact_revision(),
                });
            }
            let reason = resp.cancel_reason();
            if reason.contains("no leader") || reason.is_empty() {
                return Received::Broken(StoreError::Unavailable(format!(
                    "{}: etcd canceled the watch ({reason})",
                    self.what
                )));
            }
            return Received::Fatal(StoreError::Other(format!(
                "{}: etcd canceled the watch: {reason}",
                self.what
            )));
        }
        if resp.events().is_empty() {
            // Created or progress notification: every event up to the
            // header revision has been sent, so a new stream may start
            // after it. (Only timed notifications are asked for: on etcd
            // before 3.4.24/3.5.8 a requested one could be out of step with
            // the events, etcd issue #15220.)
            if !resp.created()
                && let Some(header) = resp.header()
            {
                self.next = self.next.max(header.revision() + 1);
            }
            return Received::Progress;
        }
        // Without fragmenting (not requested), etcd never splits one
        // revision over two responses, but one response may hold several
        // revisions.
        for event in resp.events() {
            let Some(kv) = event.kv() else {
                return Received::Broken(StoreError::Other(format!(
                    "{}: etcd sent an event without a key",
                    self.what
                )));
            };
            let revision = kv.mod_revision();
            if revision < self.next {
                continue; // already received on an earlier stream
            }
            let event = match event.event_type() {
                EventType::Put => match convert_kv(kv.clone()) {
                    Ok(kv) => Event {
                        kind: EventKind::Put,
                        kv,
                    },
                    Err(e) => return Received::Fatal(e),
                },
                EventType::Delete => match String::from_utf8(kv.key().to_vec()) {
                    Ok(key) => Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key,
                            value: Bytes::new(),
                            create_revision: 0,
                            mod_revision: revision,
                            version: 0,
                            lease: None,
                        },
                    },
                    Err(_) => {
                        return Received::Fatal(StoreError::Corrupt(format!(
                            "{}: etcd sent a delete of a key that is not UTF-8",
                            self.what
                        )));
                    }
                },
            };
            match self.pending.back_mut() {
                Some(batch) if batch.revision == revision => batch.events.push(event),
                _ => self.pending.push_back(WatchBatch {
                    revision,
                    events: vec![event],
                }),
            }
        }
        if let Some(last) = self.pending.back() {
            self.next = self.next.max(last.revision + 1);
        }
        Received::Progress
    }

    async fn next_batch(&mut self) -> Option<Result<WatchBatch>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            let Some(stream) = self.stream.as_mut() else {
                let failing_since = *self.failing_since.get_or_insert_with(Instant::now);
                let delay = self.backoff.next_delay();
                if failing_since.elapsed() + delay > WATCH_RECONNECT_BUDGET {
                    self.done = true;
                    return Some(Err(StoreError::Unavailable(format!(
                        "{}: could not re-open the watch for {:?}; giving up",
                        self.what, WATCH_RECONNECT_BUDGET
                    ))));
                }
                tokio::time::sleep(delay).await;
                match self.open().await {
                    Ok(()) => {}
                    Err(e) if e.is_retryable() => {
                        tracing::debug!(error = %e, "re-opening {} failed", self.what);
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            let broken = match stream.message().await {
                Ok(Some(resp)) => match self.receive(resp) {
                    Received::Progress => {
                        self.backoff.reset();
                        continue;
                    }
                    Received::Broken(e) => e,
                    Received::Fatal(e) => {
                        self.done = true;
                        self.stream = None;
                        return Some(Err(e));
                    }
                },
                Ok(None) => {
                    StoreError::Unavailable(format!("{}: etcd closed the stream", self.what))
                }
                Err(e) => map_error(&self.what, e),
            };
            tracing::info!(
                prefix = %self.prefix,
                resume_from = self.next,
                error = %broken,
                "etcd watch stream broke; re-opening"
            );
            self.stream = None;
        }
    }
}

// ------------------------------------------------------------------ leases

/// Keeps one lease alive with a short-lived keep-alive stream per refresh:
/// open, send one keep-alive (etcd-client sends it on open), read its
/// answer, close. A stream held open per lease would cost the controller
/// about 17 KB per connected host (tonic's encode and decode buffers, the
/// HTTP/2 stream, the request channel) to save one stream setup per
/// heartbeat; etcd-client cannot send keep-alives for several leases on
/// one stream, which is what etcd's own Go client does instead.
struct EtcdLeaseKeeper {
    client: LeaseClient,
    id: LeaseId,
    what: String,
    request_timeout: Duration,
    granted_ttl: Duration,
}

impl EtcdLeaseKeeper {
    fn lease_error(&self, e: etcd_client::Error) -> StoreError {
        if is_lease_not_found(&e) {
            StoreError::LeaseNotFound(self.id)
        } else {
            map_error(&self.what, e)
        }
    }

    /// One keep-alive on a stream of its own: etcd-client sends the request
    /// when the stream opens and reads etcd's answer (refusing a TTL of 0,
    /// "lease not found"); the stream is dropped at once, so that an idle
    /// keeper holds no HTTP/2 stream and its buffers between refreshes.
    /// etcd resets a refreshed lease to its granted TTL, which is what this
    /// returns.
    async fn refresh_once(&mut self) -> Result<Duration> {
        let answer =
            tokio::time::timeout(self.request_timeout, self.client.keep_alive(self.id)).await;
        match answer {
            Ok(Ok(_)) => Ok(self.granted_ttl),
            Ok(Err(e)) => Err(self.lease_error(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "{}: no keep-alive answer within {:?}",
                self.what, self.request_timeout
            ))),
        }
    }
}

#[async_trait]
impl LeaseKeeper for EtcdLeaseKeeper {
    async fn keep_alive(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match self.refresh_once().await {
                Ok(ttl) => return Ok(ttl),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if !e.is_retryable() || started.elapsed() + delay > RETRY_BUDGET {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "{} failed; retrying", self.what);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

// ------------------------------------------------------------------ backoff

/// Exponential backoff with "equal jitter": each delay is uniformly drawn
/// from [d/2, d], d doubling up to `max`, so that clients retrying after
/// the same failure spread out.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        let capped = b.next_delay();
        assert!(capped >= Duration::from_millis(500), "{capped:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn endpoints_get_the_scheme_of_the_tls_setting() {
        assert_eq!(endpoint_url("h:2379", false).unwrap(), "http://h:2379");
        assert_eq!(endpoint_url("h:2379", true).unwrap(), "https://h:2379");
        assert_eq!(
            endpoint_url("https://h:2379", true).unwrap(),
            "https://h:2379"
        );
        assert!(endpoint_url("http://h:2379", true).is_err());
        assert!(endpoint_url("https://h:2379", false).is_err());
        assert!(endpoint_url("unix://x", false).is_err());
        assert!(endpoint_url(" ", false).is_err());
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut config = EtcdConfig::new(["h:2379"]);
        config.username = Some("root".to_string());
        config.password = Some("hunter2".to_string());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("root"), "{shown}");
        let creds = EtcdCredentials {
            username: "root".to_string(),
            password: "hunter2".to_string(),
        };
        assert!(!format!("{creds:?}").contains("hunter2"));
    }

    #[test]
    fn lease_ttls_are_whole_seconds_and_at_least_the_minimum() {
        assert_eq!(lease_secs(Duration::from_millis(300)).unwrap(), 2);
        assert_eq!(lease_secs(Duration::from_millis(2500)).unwrap(), 3);
        assert_eq!(lease_secs(Duration::from_secs(10)).unwrap(), 10);
        assert!(lease_secs(Duration::ZERO).is_err());
    }

    #[tokio::test]
    async fn connecting_to_nothing_names_the_endpoints() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("127.0.0.1:{port}");
        let mut config = EtcdConfig::new([endpoint.clone()]);
        config.connect_timeout = Duration::from_millis(300);
        let err = EtcdStore::connect(config).await.unwrap_err();
        match err {
            StoreError::Unavailable(msg) => assert!(
                msg.starts_with(&format!("cannot reach etcd at {endpoint}: ")),
                "{msg}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mod_revision_compare_on_missing_key_never_matches() {
        // etcd compares a missing key's mod_revision as 0, so ModRevision(0)
        // must not become `mod_revision == 0`.
        let c = compare(&crate::Compare::mod_revision("k", 0));
        let shown = format!("{c:?}");
        assert!(shown.contains("Version"), "{shown}");
    }
}
