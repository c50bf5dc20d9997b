//! hostmesh-registry: where the controller keeps its state.
//!
//! [`Store`] is a small, etcd-shaped key-value interface: get, list by
//! prefix, multi-key transactions with compare-and-swap on revisions, watch
//! from a revision (ordered, resumable, with an explicit "compacted, relist"
//! error), and leases whose keys vanish when they are not kept alive.
//!
//! Backends:
//! - [`embedded`]: one durable redb file for a single-machine controller.
//! - [`etcd`]: an etcd v3 cluster (tested against Debian's etcd 3.4; 3.5+
//!   supported).
//!
//! [`open_store`] picks and opens a backend from the controller's `--store`
//! flag ([`StoreUrl`]).
//!
//! The same conformance suite ([`conformance`], behind the `testing`
//! feature) runs against every backend; [`testing`] starts real etcd
//! processes for it.
//!
//! Revisions are store-wide and increase by one per committed transaction
//! that changed something, as in etcd: every key written by one
//! transaction carries the same `mod_revision`, and a watch delivers one
//! [`WatchBatch`] per revision.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

#[cfg(feature = "testing")]
pub mod conformance;
pub mod embedded;
pub mod etcd;
#[cfg(feature = "testing")]
pub mod testing;

mod open;
pub use open::{StoreUrl, StoreUrlError, open_store};

pub type Revision = i64;
pub type LeaseId = i64;

/// A key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the transaction that created the key (since its last
    /// deletion).
    pub create_revision: Revision,
    /// Revision of the transaction that last wrote the key.
    pub mod_revision: Revision,
    /// Number of writes since creation, starting at 1.
    pub version: i64,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// A condition on one key, checked atomically with a transaction's writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// The key does not exist.
    Absent,
    /// The key exists (any revision).
    Present,
    /// The key exists and was last written at exactly this revision.
    ModRevision(Revision),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub condition: Precondition,
}

impl Compare {
    pub fn absent(key: impl Into<String>) -> Compare {
        Compare {
            key: key.into(),
            condition: Precondition::Absent,
        }
    }

    pub fn present(key: impl Into<String>) -> Compare {
        Compare {
            key: key.into(),
            condition: Precondition::Present,
        }
    }

    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Compare {
        Compare {
            key: key.into(),
            condition: Precondition::ModRevision(revision),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Bytes,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn put_with_lease(key: impl Into<String>, value: impl Into<Bytes>, lease: LeaseId) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// All compares hold, then all ops apply, as one revision; or nothing does.
/// A key may appear in at most one op. Backends accept at least
/// [`MAX_TXN_OPS`] compares plus ops (etcd's default `--max-txn-ops`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// etcd's default limit on operations in one transaction.
pub const MAX_TXN_OPS: usize = 128;

/// Values larger than this are refused by every backend (etcd's default
/// request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, compare: Compare) -> Txn {
        self.compares.push(compare);
        self
    }

    pub fn then(mut self, op: Op) -> Txn {
        self.ops.push(op);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The ops applied at this revision (the current revision if the ops
    /// changed nothing, e.g. deleting absent keys only).
    Committed { revision: Revision },
    /// A compare failed; nothing was written. `current` holds, for every
    /// compared key, what is stored now (None: absent).
    Conflict {
        current: Vec<(String, Option<KeyValue>)>,
    },
}

impl TxnOutcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, TxnOutcome::Committed { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListResult {
    /// Sorted by key.
    pub kvs: Vec<KeyValue>,
    /// The store revision the listing reflects; watch from `revision + 1`
    /// to see every later change.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete: the key, an empty value, and `mod_revision` set to the
    /// deleting revision.
    pub kv: KeyValue,
}

/// The changes of one revision under the watched prefix, in the order the
/// transaction made them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// Items are in revision order with no gaps among the revisions that touch
/// the prefix. The stream survives backend reconnects (resuming after the
/// last delivered revision); it ends with [`StoreError::Compacted`] when the
/// revisions it needs are gone (relist and watch again), or with another
/// error when the backend stays unreachable.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: LeaseId,
    pub granted_ttl: Duration,
    pub remaining: Duration,
}

/// Keeps one lease alive; obtained from [`Store::lease_keeper`].
#[async_trait]
pub trait LeaseKeeper: Send {
    /// Refreshes the lease to its full TTL and returns that TTL. Fails with
    /// [`StoreError::LeaseNotFound`] once the lease has expired or been
    /// revoked; its keys are gone then.
    async fn keep_alive(&mut self) -> Result<Duration, StoreError>;
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The watch start revision has been compacted away.
    #[error(
        "revision {requested} has been compacted (oldest kept: {compacted}); relist and watch again"
    )]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The backend cannot be reached or has no leader; retrying may help.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (too large, duplicate keys, bad input);
    /// retrying will not help.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// Stored data could not be read back (corruption, format mismatch).
    #[error("store data error: {0}")]
    Corrupt(String),
    #[error("store error: {0}")]
    Other(String),
}

impl StoreError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The controller's view of its backing store. Implementations are cheap to
/// share (`Arc<dyn Store>`) and safe to call from many tasks.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "embedded", "etcd", ...
    fn backend(&self) -> &'static str;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix`, sorted, at one revision.
    async fn list(&self, prefix: &str) -> Result<ListResult>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// Changes under `prefix` from revision `from` (inclusive). `from = 0`
    /// means from the next revision on.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// The current revision of the whole store.
    async fn current_revision(&self) -> Result<Revision>;

    /// Discards history before `revision`; later watches from an older
    /// revision fail with [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<()>;

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    async fn lease_keeper(&self, lease: LeaseId) -> Result<Box<dyn LeaseKeeper>>;

    /// Deletes the lease and every key attached to it.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// None when the lease does not exist (expired or revoked).
    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>>;

    // ------------------------------------------------------------ helpers

    /// Writes one key if `condition` holds (None: unconditionally).
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        condition: Option<Precondition>,
    ) -> Result<TxnOutcome> {
        let mut txn = Txn::new().then(Op::put(key, value));
        if let Some(condition) = condition {
            txn.compares.push(Compare {
                key: key.to_string(),
                condition,
            });
        }
        self.txn(txn).await
    }

    /// Deletes one key if `condition` holds (None: unconditionally).
    async fn delete(&self, key: &str, condition: Option<Precondition>) -> Result<TxnOutcome> {
        let mut txn = Txn::new().then(Op::delete(key));
        if let Some(condition) = condition {
            txn.compares.push(Compare {
                key: key.to_string(),
                condition,
            });
        }
        self.txn(txn).await
    }
}

impl fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.backend())
    }
}

pub type SharedStore = Arc<dyn Store>;

/// Checks what every backend refuses alike, so that errors read the same.
pub(crate) fn check_txn(txn: &Txn) -> Result<()> {
    let total = txn.compares.len() + txn.ops.len();
    if total > MAX_TXN_OPS {
        return Err(StoreError::Invalid(format!(
            "transaction has {total} compares and ops; at most {MAX_TXN_OPS} are allowed"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for op in &txn.ops {
        if !seen.insert(op.key()) {
            return Err(StoreError::Invalid(format!(
                "key {:?} is written twice in one transaction",
                op.key()
            )));
        }
        if let Op::Put { value, key, .. } = op
            && value.len() > MAX_VALUE_BYTES
        {
            return Err(StoreError::Invalid(format!(
                "value of {key:?} is {} bytes; at most {MAX_VALUE_BYTES} are allowed",
                value.len()
            )));
        }
        if op.key().is_empty() {
            return Err(StoreError::Invalid("empty key".to_string()));
        }
    }
    // etcd refuses empty keys in compares too; refuse them everywhere.
    if txn.compares.iter().any(|c| c.key.is_empty()) {
        return Err(StoreError::Invalid("empty key in a compare".to_string()));
    }
    Ok(())
}
