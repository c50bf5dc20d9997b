//! The embedded backend: the whole store in one redb file, for a controller
//! that runs on a single machine without an etcd cluster.
//!
//! It keeps etcd's semantics so that the controller cannot tell the two
//! apart (the conformance suite checks this):
//!
//! - A store-wide revision that grows by one per committed transaction that
//!   changed something; every key carries `create_revision`, `mod_revision`
//!   and `version`.
//! - Transactions are all-or-nothing. They run one at a time (one writer,
//!   on the blocking thread pool) and each commit is fsynced before it is
//!   acknowledged (redb's `Durability::Immediate`), so an acknowledged write
//!   survives `kill -9` and power loss.
//! - A change log table (revision → the events of that revision) lets a
//!   watch start from an old revision. The last [`HISTORY_REVISIONS`]
//!   revisions are kept; [`Store::compact`] drops older ones earlier. A
//!   watch that needs a dropped revision fails with
//!   [`StoreError::Compacted`].
//! - Live changes reach watchers through an in-memory broadcast of committed
//!   batches. A watcher subscribes before it reads the log, so nothing falls
//!   between history and live delivery, and a watcher that lags behind the
//!   broadcast re-reads the log instead of losing events.
//! - Leases are persisted as (id, TTL); their deadlines live in memory. On
//!   open every lease gets a fresh full TTL (as etcd does after a leader
//!   change). A background task deletes the keys of expired leases in one
//!   transaction, so watchers see the deletes.
//!
//! The file is locked while open: a second process (or a second open in
//! this one) gets a clear error instead of a corrupted store.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::broadcast;

use crate::{
    Event, EventKind, KeyValue, LeaseId, LeaseInfo, LeaseKeeper, ListResult, Op, Precondition,
    Result, Revision, Store, StoreError, Txn, TxnOutcome, WatchBatch, WatchStream, check_txn,
};

/// How many revisions of change history are kept for watches; older ones
/// are compacted automatically.
pub const HISTORY_REVISIONS: i64 = 10_000;

/// Bumped when the on-disk layout changes incompatibly.
const FORMAT_VERSION: i64 = 1;

/// "format", "revision" (the store revision) and "compacted" (the oldest
/// revision a watch may start from).
const META: TableDefinition<'static, &str, i64> = TableDefinition::new("meta");
/// key → (create_revision, mod_revision, version, lease or 0, value).
const KV: TableDefinition<'static, &str, (i64, i64, i64, i64, &[u8])> = TableDefinition::new("kv");
/// revision → the encoded events of that revision (see [`encode_events`]).
const LOG: TableDefinition<'static, i64, &[u8]> = TableDefinition::new("log");
/// lease id → granted TTL in milliseconds.
const LEASES: TableDefinition<'static, i64, u64> = TableDefinition::new("leases");
/// (lease id, key) for every key attached to a lease, so that expiring a
/// lease does not scan the whole key space.
const LEASE_KEYS: TableDefinition<'static, (i64, &str), ()> = TableDefinition::new("lease_keys");

/// Committed batches buffered for live watchers; a watcher further behind
/// re-reads the log.
const BROADCAST_CAPACITY: usize = 1024;
/// How often the lease reaper looks for expired leases.
const LEASE_TICK: Duration = Duration::from_millis(100);
/// How much of the log one catch-up read of a watcher takes at most.
const LOG_CHUNK_REVISIONS: usize = 256;
const LOG_CHUNK_BYTES: usize = 16 << 20;
/// redb page cache; the controller's state is small.
const CACHE_BYTES: usize = 64 << 20;

/// The store in one redb file. Cheap to share behind an `Arc`; dropping it
/// (and every clone of that `Arc`) closes the file and stops its lease
/// reaper. Watch streams and lease keepers do not keep the file open: they
/// end with [`StoreError::Unavailable`] once the store is gone.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    reaper: tokio::task::AbortHandle,
}

struct Inner {
    path: PathBuf,
    db: Database,
    /// Serializes write transactions and the publication of their batches,
    /// so that watchers see batches in revision order.
    writer: Mutex<()>,
    /// The last committed revision; changed only under `writer`.
    revision: AtomicI64,
    /// How many revisions of change log to keep.
    history: i64,
    batches: broadcast::Sender<Arc<WatchBatch>>,
    leases: Mutex<HashMap<LeaseId, LiveLease>>,
}

#[derive(Clone, Copy, Debug)]
struct LiveLease {
    ttl: Duration,
    deadline: Instant,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`, creating missing parent
    /// directories. Must be called inside a Tokio runtime: the lease reaper
    /// is spawned on it.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        EmbeddedStore::open_with_history(path, HISTORY_REVISIONS)
    }

    /// [`EmbeddedStore::open`] keeping `history` revisions of change log.
    pub(crate) fn open_with_history(path: &Path, history: i64) -> Result<EmbeddedStore> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Other(format!(
                "opening embedded store {}: must be called inside a Tokio runtime",
                path.display()
            ))
        })?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Other(format!(
                    "creating directory {} for embedded store {}: {e}",
                    parent.display(),
                    path.display()
                ))
            })?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_error(path, e))?;
        let (revision, leases) = init_and_load(path, &db)?;
        let (batches, _) = broadcast::channel(BROADCAST_CAPACITY);
        let now = Instant::now();
        let live: HashMap<LeaseId, LiveLease> = leases
            .into_iter()
            .map(|(id, ttl)| {
                (
                    id,
                    LiveLease {
                        ttl,
                        deadline: now + ttl,
                    },
                )
            })
            .collect();
        tracing::info!(
            path = %path.display(),
            revision,
            leases = live.len(),
            "opened embedded store"
        );
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            db,
            writer: Mutex::new(()),
            revision: AtomicI64::new(revision),
            history: history.max(1),
            batches,
            leases: Mutex::new(live),
        });
        let reaper = runtime
            .spawn(reap_leases(Arc::downgrade(&inner)))
            .abort_handle();
        Ok(EmbeddedStore { inner, reaper })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        run_blocking(self.inner.clone(), f).await
    }

    async fn write<T, F, A>(&self, what: &'static str, f: F, after_commit: A) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T> + Send + 'static,
        A: FnOnce(&Inner, &T) + Send + 'static,
    {
        run_blocking(self.inner.clone(), move |inner| {
            inner.write_locked(what, f, after_commit)
        })
        .await
    }
}

fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
            "embedded store {} is already open in another process",
            path.display()
        )),
        DatabaseError::Storage(redb::StorageError::Corrupted(msg)) => {
            StoreError::Corrupt(format!("opening embedded store {}: {msg}", path.display()))
        }
        other => StoreError::Other(format!(
            "opening embedded store {}: {other}",
            path.display()
        )),
    }
}

/// Creates the tables of a new file, checks the format of an existing one,
/// and returns its revision and persisted leases.
fn init_and_load(path: &Path, db: &Database) -> Result<(Revision, Vec<(LeaseId, Duration)>)> {
    let ctx = |what: &str| format!("opening embedded store {}: {what}", path.display());
    let tx = db.begin_write().map_err(|e| redb_error(&ctx("write"), e))?;
    let (revision, leases) = {
        let mut meta = tx
            .open_table(META)
            .map_err(|e| redb_error(&ctx("meta"), e))?;
        tx.open_table(KV).map_err(|e| redb_error(&ctx("kv"), e))?;
        tx.open_table(LOG).map_err(|e| redb_error(&ctx("log"), e))?;
        tx.open_table(LEASE_KEYS)
            .map_err(|e| redb_error(&ctx("lease keys"), e))?;
        let lease_table = tx
            .open_table(LEASES)
            .map_err(|e| redb_error(&ctx("leases"), e))?;
        let format = get_meta(&meta, "format").map_err(|e| redb_error(&ctx("meta"), e))?;
        match format {
            None => {
                for (name, value) in [
                    ("format", FORMAT_VERSION),
                    ("revision", 1),
                    ("compacted", 0),
                ] {
                    meta.insert(name, value)
                        .map_err(|e| redb_error(&ctx("initializing"), e))?;
                }
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "embedded store {} has format version {other}; this build reads version {FORMAT_VERSION}",
                    path.display()
                )));
            }
        }
        let revision = get_meta(&meta, "revision")
            .map_err(|e| redb_error(&ctx("meta"), e))?
            .unwrap_or(1);
        let mut leases = Vec::new();
        for item in lease_table
            .iter()
            .map_err(|e| redb_error(&ctx("leases"), e))?
        {
            let (id, ttl_ms) = item.map_err(|e| redb_error(&ctx("leases"), e))?;
            leases.push((id.value(), Duration::from_millis(ttl_ms.value())));
        }
        (revision, leases)
    };
    tx.commit().map_err(|e| redb_error(&ctx("commit"), e))?;
    Ok((revision, leases))
}

fn get_meta(
    table: &impl ReadableTable<&'static str, i64>,
    name: &str,
) -> std::result::Result<Option<i64>, redb::StorageError> {
    Ok(table.get(name)?.map(|g| g.value()))
}

/// Maps any redb error to a store error that says what was being done.
fn redb_error(what: &str, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(msg) => StoreError::Corrupt(format!("{what}: {msg}")),
        other => StoreError::Other(format!("{what}: {other}")),
    }
}

async fn run_blocking<T, F>(inner: Arc<Inner>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Inner) -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(|e| StoreError::Other(format!("embedded store worker failed: {e}")))?
}

/// One write transaction in progress. Ops that change keys push their
/// events; the transaction then commits at `revision`.
struct WriteCtx<'t> {
    inner: &'t Inner,
    tx: &'t WriteTransaction,
    /// The revision this transaction gets if it changes any key.
    revision: Revision,
    events: Vec<Event>,
    /// Something other than keys changed (leases, compaction).
    dirty: bool,
}

impl WriteCtx<'_> {
    fn err(&self, what: &str, e: impl Into<redb::Error>) -> StoreError {
        redb_error(
            &format!("{what} in embedded store {}", self.inner.path.display()),
            e,
        )
    }

    fn compacted(&self) -> Result<Revision> {
        let meta = self
            .tx
            .open_table(META)
            .map_err(|e| self.err("reading", e))?;
        Ok(get_meta(&meta, "compacted")
            .map_err(|e| self.err("reading", e))?
            .unwrap_or(0))
    }

    fn current(&self, key: &str) -> Result<Option<KeyValue>> {
        let kv = self.tx.open_table(KV).map_err(|e| self.err("reading", e))?;
        let found = kv.get(key).map_err(|e| self.err("reading", e))?;
        Ok(found.map(|g| record_to_kv(key, g.value())))
    }

    fn holds(&self, condition: &Precondition, current: Option<&KeyValue>) -> bool {
        match (condition, current) {
            (Precondition::Absent, current) => current.is_none(),
            (Precondition::Present, current) => current.is_some(),
            (Precondition::ModRevision(rev), Some(kv)) => kv.mod_revision == *rev,
            (Precondition::ModRevision(_), None) => false,
        }
    }

    fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        let leases = self
            .tx
            .open_table(LEASES)
            .map_err(|e| self.err("writing", e))?;
        let mut kv = self.tx.open_table(KV).map_err(|e| self.err("writing", e))?;
        let mut lease_keys = self
            .tx
            .open_table(LEASE_KEYS)
            .map_err(|e| self.err("writing", e))?;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(id) = lease {
                        let exists = id > 0
                            && leases
                                .get(id)
                                .map_err(|e| self.err("reading lease", e))?
                                .is_some();
                        if !exists {
                            return Err(StoreError::LeaseNotFound(id));
                        }
                    }
                    let old = kv
                        .get(key.as_str())
                        .map_err(|e| self.err("reading", e))?
                        .map(|g| {
                            let (create, _, version, old_lease, _) = g.value();
                            (create, version, old_lease)
                        });
                    let (create_revision, version) = match old {
                        Some((create, version, _)) => (create, version + 1),
                        None => (self.revision, 1),
                    };
                    let lease_id = lease.unwrap_or(0);
                    if let Some((_, _, old_lease)) = old
                        && old_lease != 0
                        && old_lease != lease_id
                    {
                        lease_keys
                            .remove((old_lease, key.as_str()))
                            .map_err(|e| self.err("writing", e))?;
                    }
                    if lease_id != 0 {
                        lease_keys
                            .insert((lease_id, key.as_str()), ())
                            .map_err(|e| self.err("writing", e))?;
                    }
                    kv.insert(
                        key.as_str(),
                        (
                            create_revision,
                            self.revision,
                            version,
                            lease_id,
                            value.as_ref(),
                        ),
                    )
                    .map_err(|e| self.err("writing", e))?;
                    self.events.push(Event {
                        kind: EventKind::Put,
                        kv: KeyValue {
                            key,
                            value,
                            create_revision,
                            mod_revision: self.revision,
                            version,
                            lease,
                        },
                    });
                }
                Op::Delete { key } => {
                    let old_lease = kv
                        .remove(key.as_str())
                        .map_err(|e| self.err("deleting", e))?
                        .map(|g| g.value().3);
                    if let Some(old_lease) = old_lease {
                        if old_lease != 0 {
                            lease_keys
                                .remove((old_lease, key.as_str()))
                                .map_err(|e| self.err("deleting", e))?;
                        }
                        self.events.push(delete_event(key, self.revision));
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes a lease and every key attached to it; false if it did not
    /// exist.
    fn remove_lease(&mut self, id: LeaseId) -> Result<bool> {
        let keys: Vec<String> = {
            let lease_keys = self
                .tx
                .open_table(LEASE_KEYS)
                .map_err(|e| self.err("reading lease keys", e))?;
            let mut keys = Vec::new();
            for item in lease_keys
                .range((id, "")..)
                .map_err(|e| self.err("reading lease keys", e))?
            {
                let (k, _) = item.map_err(|e| self.err("reading lease keys", e))?;
                let (lease, key) = k.value();
                if lease != id {
                    break;
                }
                keys.push(key.to_string());
            }
            keys
        };
        let ops = keys.into_iter().map(Op::delete).collect();
        self.apply(ops)?;
        let mut leases = self
            .tx
            .open_table(LEASES)
            .map_err(|e| self.err("deleting lease", e))?;
        let existed = leases
            .remove(id)
            .map_err(|e| self.err("deleting lease", e))?
            .is_some();
        self.dirty |= existed;
        Ok(existed)
    }
}

impl Inner {
    fn lock_leases(&self) -> MutexGuard<'_, HashMap<LeaseId, LiveLease>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} in embedded store {}", self.path.display())
    }

    /// Runs one write transaction: `f` stages changes; if it changed keys,
    /// the batch goes to the log at the next revision, the transaction
    /// commits (fsynced) and the batch is published to live watchers, all
    /// under the writer lock so that revisions are published in order.
    /// `after_commit` runs under the same lock.
    fn write_locked<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>,
        after_commit: impl FnOnce(&Inner, &T),
    ) -> Result<T> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let base = self.revision.load(Ordering::SeqCst);
        let tx = self
            .db
            .begin_write()
            .map_err(|e| redb_error(&self.ctx(what), e))?;
        let mut ctx = WriteCtx {
            inner: self,
            tx: &tx,
            revision: base + 1,
            events: Vec::new(),
            dirty: false,
        };
        let out = f(&mut ctx)?;
        let WriteCtx {
            revision,
            events,
            dirty,
            ..
        } = ctx;
        let changed = !events.is_empty();
        if changed {
            self.append_log(&tx, revision, &events)
                .map_err(|e| redb_error(&self.ctx(what), e))?;
        }
        if changed || dirty {
            tx.commit().map_err(|e| redb_error(&self.ctx(what), e))?;
        } else {
            tx.abort().map_err(|e| redb_error(&self.ctx(what), e))?;
        }
        if changed {
            self.revision.store(revision, Ordering::SeqCst);
            // No receivers is not an error: nobody watches.
            let _ = self.batches.send(Arc::new(WatchBatch { revision, events }));
        }
        after_commit(self, &out);
        Ok(out)
    }

    /// Records a revision's events, moves the store revision, and keeps
    /// the log to its last `history` revisions.
    fn append_log(
        &self,
        tx: &WriteTransaction,
        revision: Revision,
        events: &[Event],
    ) -> std::result::Result<(), redb::Error> {
        let encoded = encode_events(events);
        let mut log = tx.open_table(LOG)?;
        log.insert(revision, encoded.as_slice())?;
        let mut meta = tx.open_table(META)?;
        meta.insert("revision", revision)?;
        let compacted = get_meta(&meta, "compacted")?.unwrap_or(0);
        let floor = revision - self.history + 1;
        if floor > compacted {
            log.retain_in::<i64, _>(..floor, |_, _| false)?;
            meta.insert("compacted", floor)?;
        }
        Ok(())
    }

    fn read_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        let what = self.ctx("reading");
        let tx = self.db.begin_read().map_err(|e| redb_error(&what, e))?;
        let kv = tx.open_table(KV).map_err(|e| redb_error(&what, e))?;
        let found = kv.get(key).map_err(|e| redb_error(&what, e))?;
        Ok(found.map(|g| record_to_kv(key, g.value())))
    }

    fn list(&self, prefix: &str) -> Result<ListResult> {
        let what = self.ctx("listing");
        let tx = self.db.begin_read().map_err(|e| redb_error(&what, e))?;
        let meta = tx.open_table(META).map_err(|e| redb_error(&what, e))?;
        let revision = get_meta(&meta, "revision")
            .map_err(|e| redb_error(&what, e))?
            .unwrap_or(1);
        let kv = tx.open_table(KV).map_err(|e| redb_error(&what, e))?;
        let mut kvs = Vec::new();
        for item in kv.range(prefix..).map_err(|e| redb_error(&what, e))? {
            let (k, v) = item.map_err(|e| redb_error(&what, e))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            kvs.push(record_to_kv(key, v.value()));
        }
        Ok(ListResult { kvs, revision })
    }

    /// Reads the log from `from` on, at most one chunk, keeping the events
    /// under `prefix`.
    fn read_log(&self, prefix: &str, from: Revision) -> Result<LogChunk> {
        let what = self.ctx("reading change log");
        let tx = self.db.begin_read().map_err(|e| redb_error(&what, e))?;
        let meta = tx.open_table(META).map_err(|e| redb_error(&what, e))?;
        let compacted = get_meta(&meta, "compacted")
            .map_err(|e| redb_error(&what, e))?
            .unwrap_or(0);
        if from < compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let log = tx.open_table(LOG).map_err(|e| redb_error(&what, e))?;
        let mut chunk = LogChunk {
            batches: Vec::new(),
            last: None,
            complete: true,
        };
        let (mut revisions, mut bytes) = (0usize, 0usize);
        for item in log.range(from..).map_err(|e| redb_error(&what, e))? {
            let (k, v) = item.map_err(|e| redb_error(&what, e))?;
            let revision = k.value();
            let data = v.value();
            let events: Vec<Event> = decode_events(revision, data)
                .map_err(|e| {
                    StoreError::Corrupt(format!(
                        "{what}: entry of revision {revision} is unreadable: {e}"
                    ))
                })?
                .into_iter()
                .filter(|ev| ev.kv.key.starts_with(prefix))
                .collect();
            if !events.is_empty() {
                chunk.batches.push(WatchBatch { revision, events });
            }
            chunk.last = Some(revision);
            revisions += 1;
            bytes += data.len();
            if revisions >= LOG_CHUNK_REVISIONS || bytes >= LOG_CHUNK_BYTES {
                chunk.complete = false;
                break;
            }
        }
        Ok(chunk)
    }
}

struct LogChunk {
    /// Batches with at least one event under the prefix.
    batches: Vec<WatchBatch>,
    /// The last revision read, matching or not.
    last: Option<Revision>,
    /// The log was read to its end (in this read's snapshot).
    complete: bool,
}

fn record_to_kv(
    key: &str,
    (create, modified, version, lease, value): (i64, i64, i64, i64, &[u8]),
) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value),
        create_revision: create,
        mod_revision: modified,
        version,
        lease: (lease != 0).then_some(lease),
    }
}

fn delete_event(key: String, revision: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key,
            value: Bytes::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: None,
        },
    }
}

// ------------------------------------------------------------ log encoding

/// A revision's events as bytes: `u32 count`, then per event `u8 kind`
/// (0 put, 1 delete), `u32 key length`, key, `i64` create revision,
/// version and lease (0: none), `u32 value length`, value; little endian.
/// The mod revision is the log entry's revision.
fn encode_events(events: &[Event]) -> Vec<u8> {
    let size: usize = events
        .iter()
        .map(|e| 1 + 4 + e.kv.key.len() + 24 + 4 + e.kv.value.len())
        .sum();
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for event in events {
        out.push(match event.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        out.extend_from_slice(&(event.kv.key.len() as u32).to_le_bytes());
        out.extend_from_slice(event.kv.key.as_bytes());
        out.extend_from_slice(&event.kv.create_revision.to_le_bytes());
        out.extend_from_slice(&event.kv.version.to_le_bytes());
        out.extend_from_slice(&event.kv.lease.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(event.kv.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&event.kv.value);
    }
    out
}

fn decode_events(revision: Revision, data: &[u8]) -> std::result::Result<Vec<Event>, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err(format!(
                    "truncated: wanted {n} more bytes, {} left",
                    self.0.len()
                ));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u32(&mut self) -> std::result::Result<usize, String> {
            let bytes: [u8; 4] = self.take(4)?.try_into().expect("took 4 bytes");
            Ok(u32::from_le_bytes(bytes) as usize)
        }
        fn i64(&mut self) -> std::result::Result<i64, String> {
            let bytes: [u8; 8] = self.take(8)?.try_into().expect("took 8 bytes");
            Ok(i64::from_le_bytes(bytes))
        }
    }
    let mut r = Reader(data);
    let count = r.u32()?;
    let mut events = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let kind = match r.take(1)?[0] {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            other => return Err(format!("unknown event kind {other}")),
        };
        let key_len = r.u32()?;
        let key = std::str::from_utf8(r.take(key_len)?)
            .map_err(|e| format!("key is not UTF-8: {e}"))?
            .to_string();
        let create_revision = r.i64()?;
        let version = r.i64()?;
        let lease = r.i64()?;
        let value_len = r.u32()?;
        let value = Bytes::copy_from_slice(r.take(value_len)?);
        events.push(Event {
            kind,
            kv: KeyValue {
                key,
                value,
                create_revision,
                mod_revision: revision,
                version,
                lease: (lease != 0).then_some(lease),
            },
        });
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes of trailing garbage", r.0.len()));
    }
    Ok(events)
}

// ------------------------------------------------------------------ watch

/// One watcher: catches up from the log, then follows the broadcast, and
/// falls back to the log whenever it lags or sees a gap.
struct EmbeddedWatch {
    inner: Weak<Inner>,
    prefix: String,
    live: broadcast::Receiver<Arc<WatchBatch>>,
    /// The next revision this watcher must deliver (or skip, if it does not
    /// touch the prefix).
    next: Revision,
    /// Read the log before taking live batches.
    catching_up: bool,
    pending: VecDeque<WatchBatch>,
    done: bool,
}

impl EmbeddedWatch {
    fn closed(&mut self) -> Option<Result<WatchBatch>> {
        self.done = true;
        Some(Err(StoreError::Unavailable(
            "embedded store was closed; the watch ended".to_string(),
        )))
    }

    async fn next_batch(&mut self) -> Option<Result<WatchBatch>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.catching_up {
                let Some(inner) = self.inner.upgrade() else {
                    return self.closed();
                };
                let (prefix, from) = (self.prefix.clone(), self.next);
                match run_blocking(inner, move |inner| inner.read_log(&prefix, from)).await {
                    Ok(chunk) => {
                        if let Some(last) = chunk.last {
                            self.next = last + 1;
                        }
                        self.pending.extend(chunk.batches);
                        self.catching_up = !chunk.complete;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(batch) => {
                    if batch.revision < self.next {
                        continue; // already read from the log
                    }
                    if batch.revision > self.next {
                        // Cannot happen while we keep up, but never skip:
                        // the log has what is missing.
                        self.catching_up = true;
                        continue;
                    }
                    self.next = batch.revision + 1;
                    let events: Vec<Event> = batch
                        .events
                        .iter()
                        .filter(|e| e.kv.key.starts_with(&self.prefix))
                        .cloned()
                        .collect();
                    if !events.is_empty() {
                        return Some(Ok(WatchBatch {
                            revision: batch.revision,
                            events,
                        }));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        prefix = %self.prefix,
                        missed,
                        next = self.next,
                        "embedded watcher lagged; re-reading the change log"
                    );
                    self.catching_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => return self.closed(),
            }
        }
    }
}

// ------------------------------------------------------------------ leases

struct EmbeddedLeaseKeeper {
    inner: Weak<Inner>,
    id: LeaseId,
}

#[async_trait]
impl LeaseKeeper for EmbeddedLeaseKeeper {
    async fn keep_alive(&mut self) -> Result<Duration> {
        let Some(inner) = self.inner.upgrade() else {
            return Err(StoreError::Unavailable(format!(
                "keeping lease {:x} alive: the embedded store was closed",
                self.id
            )));
        };
        let now = Instant::now();
        let mut leases = inner.lock_leases();
        match leases.get_mut(&self.id) {
            Some(lease) if lease.deadline > now => {
                lease.deadline = now + lease.ttl;
                Ok(lease.ttl)
            }
            _ => Err(StoreError::LeaseNotFound(self.id)),
        }
    }
}

/// Deletes expired leases and their keys, until the store is dropped.
async fn reap_leases(store: Weak<Inner>) {
    let mut tick = tokio::time::interval(LEASE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<LeaseId> = inner
            .lock_leases()
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let result = run_blocking(inner.clone(), move |inner| {
                inner.write_locked(
                    "expiring lease",
                    |ctx| {
                        // Revoked meanwhile, or (cannot happen: keep_alive
                        // refuses expired leases) renewed: nothing to do.
                        let still_due = ctx
                            .inner
                            .lock_leases()
                            .get(&id)
                            .is_some_and(|l| l.deadline <= Instant::now());
                        if still_due {
                            ctx.remove_lease(id)?;
                        }
                        Ok(still_due)
                    },
                    |inner, expired| {
                        if *expired {
                            inner.lock_leases().remove(&id);
                        }
                    },
                )
            })
            .await;
            match result {
                Ok(true) => tracing::debug!(lease = %format_args!("{id:x}"), "lease expired"),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    lease = %format_args!("{id:x}"),
                    error = %e,
                    "expiring lease failed; will retry"
                ),
            }
        }
    }
}

fn lease_ttl(ttl: Duration) -> Result<Duration> {
    if ttl.is_zero() {
        return Err(StoreError::Invalid(
            "lease TTL must be positive".to_string(),
        ));
    }
    // Whole seconds, rounded up, like etcd.
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(Duration::from_secs(secs))
}

// ------------------------------------------------------------------ Store

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        if key.is_empty() {
            // As etcd does.
            return Err(StoreError::Invalid("get of an empty key".to_string()));
        }
        let key = key.to_string();
        self.read(move |inner| inner.read_kv(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let prefix = prefix.to_string();
        self.read(move |inner| inner.list(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        check_txn(&txn)?;
        self.write(
            "applying transaction",
            move |ctx| {
                let mut current = Vec::with_capacity(txn.compares.len());
                let mut ok = true;
                for compare in &txn.compares {
                    let kv = ctx.current(&compare.key)?;
                    ok &= ctx.holds(&compare.condition, kv.as_ref());
                    current.push((compare.key.clone(), kv));
                }
                if !ok {
                    return Ok(TxnOutcome::Conflict { current });
                }
                ctx.apply(txn.ops)?;
                let revision = if ctx.events.is_empty() {
                    ctx.revision - 1
                } else {
                    ctx.revision
                };
                Ok(TxnOutcome::Committed { revision })
            },
            |_, _| {},
        )
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        if from < 0 {
            return Err(StoreError::Invalid(format!(
                "watch on {prefix:?} from revision {from}: revisions are positive (0: from now)"
            )));
        }
        // Subscribe before deciding where history ends, so that every batch
        // committed from now on is either in the log we read or in `live`.
        let live = self.inner.batches.subscribe();
        let next = if from == 0 {
            self.inner.revision.load(Ordering::SeqCst) + 1
        } else {
            from
        };
        // The first poll reads the log from `next` (and reports
        // `Compacted` if that is gone), then follows `live`.
        let watch = EmbeddedWatch {
            inner: Arc::downgrade(&self.inner),
            prefix: prefix.to_string(),
            live,
            next,
            catching_up: true,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            watch,
            |mut w| async move {
                let item = w.next_batch().await?;
                Some((item, w))
            },
        )))
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.inner.revision.load(Ordering::SeqCst))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.write(
            "compacting",
            move |ctx| {
                let current = ctx.revision - 1;
                if revision > current {
                    return Err(StoreError::Invalid(format!(
                        "cannot compact embedded store {} at revision {revision}: the current revision is {current}",
                        ctx.inner.path.display()
                    )));
                }
                if revision <= ctx.compacted()? {
                    return Ok(());
                }
                let mut log = ctx.tx.open_table(LOG).map_err(|e| ctx.err("compacting", e))?;
                log.retain_in::<i64, _>(..revision, |_, _| false)
                    .map_err(|e| ctx.err("compacting", e))?;
                let mut meta = ctx.tx.open_table(META).map_err(|e| ctx.err("compacting", e))?;
                meta.insert("compacted", revision)
                    .map_err(|e| ctx.err("compacting", e))?;
                ctx.dirty = true;
                Ok(())
            },
            |_, _| {},
        )
        .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = lease_ttl(ttl)?;
        self.write(
            "granting lease",
            move |ctx| {
                let mut leases = ctx
                    .tx
                    .open_table(LEASES)
                    .map_err(|e| ctx.err("granting lease", e))?;
                let id = loop {
                    let id = rand::random::<i64>() & i64::MAX;
                    let taken = leases
                        .get(id)
                        .map_err(|e| ctx.err("granting lease", e))?
                        .is_some();
                    if id != 0 && !taken {
                        break id;
                    }
                };
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                leases
                    .insert(id, ttl_ms)
                    .map_err(|e| ctx.err("granting lease", e))?;
                ctx.dirty = true;
                Ok(id)
            },
            move |inner, id| {
                inner.lock_leases().insert(
                    *id,
                    LiveLease {
                        ttl,
                        deadline: Instant::now() + ttl,
                    },
                );
            },
        )
        .await
    }

    async fn lease_keeper(&self, lease: LeaseId) -> Result<Box<dyn LeaseKeeper>> {
        let now = Instant::now();
        let alive = self
            .inner
            .lock_leases()
            .get(&lease)
            .is_some_and(|l| l.deadline > now);
        if !alive {
            return Err(StoreError::LeaseNotFound(lease));
        }
        Ok(Box::new(EmbeddedLeaseKeeper {
            inner: Arc::downgrade(&self.inner),
            id: lease,
        }))
    }

    /// Revoking a lease that does not exist (any more) succeeds: afterwards
    /// the lease and its keys are gone either way, and a retried revoke is
    /// harmless. The etcd backend does the same.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.write(
            "revoking lease",
            move |ctx| ctx.remove_lease(lease),
            move |inner, _| {
                inner.lock_leases().remove(&lease);
            },
        )
        .await
        .map(|_| ())
    }

    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>> {
        let now = Instant::now();
        Ok(self
            .inner
            .lock_leases()
            .get(&lease)
            .filter(|l| l.deadline > now)
            .map(|l| LeaseInfo {
                id: lease,
                granted_ttl: l.ttl,
                remaining: l.deadline.saturating_duration_since(now),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_encoding_round_trips() {
        let events = vec![
            Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: "a/b".to_string(),
                    value: Bytes::from_static(b"value"),
                    create_revision: 3,
                    mod_revision: 7,
                    version: 2,
                    lease: Some(42),
                },
            },
            delete_event("a/c".to_string(), 7),
        ];
        let decoded = decode_events(7, &encode_events(&events)).unwrap();
        assert_eq!(decoded, events);
    }

    #[test]
    fn truncated_log_entry_is_an_error() {
        let events = vec![delete_event("k".to_string(), 2)];
        let bytes = encode_events(&events);
        let err = decode_events(2, &bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_history_is_compacted_automatically() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(&dir.path().join("s.redb"), 5).unwrap();
        let mut last = 0;
        for i in 0..10 {
            let outcome = store
                .put(&format!("k{i}"), Bytes::from("v"), None)
                .await
                .unwrap();
            let TxnOutcome::Committed { revision } = outcome else {
                panic!("{outcome:?}")
            };
            last = revision;
        }
        // Revisions 2..=11 were written; the last 5 are kept.
        let oldest = last - 4;
        let mut gone = store.watch("", oldest - 1).await.unwrap();
        assert_eq!(
            gone.next().await,
            Some(Err(StoreError::Compacted {
                requested: oldest - 1,
                compacted: oldest
            }))
        );
        assert_eq!(gone.next().await, None);
        let mut kept = store.watch("", oldest).await.unwrap();
        for want in oldest..=last {
            assert_eq!(kept.next().await.unwrap().unwrap().revision, want);
        }
    }

    #[test]
    fn lease_ttls_round_up_to_whole_seconds() {
        assert_eq!(
            lease_ttl(Duration::from_millis(1500)).unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            lease_ttl(Duration::from_secs(3)).unwrap(),
            Duration::from_secs(3)
        );
        assert!(lease_ttl(Duration::ZERO).is_err());
    }
}
