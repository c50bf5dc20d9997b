//! The conformance suite (feature `testing`): one set of cases that every
//! [`Store`](crate::Store) backend must pass, so that the controller can
//! rely on the trait's contract and not on a backend.
//!
//! Each case is a `pub async fn` taking a fresh [`SharedStore`]; [`run_all`]
//! runs every case, each on a store from a factory, and reports every
//! failing case by name. Cases write under a namespace of their own (a
//! random prefix) and never assume the store is empty or at a given
//! revision, so the factory may hand out new connections to one shared
//! cluster. Waits are bounded (`tokio::time::timeout`, polling with a
//! patience), never fixed sleeps, except where time itself is under test
//! (lease TTLs).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::{
    Compare, Event, EventKind, KeyValue, LeaseId, MAX_TXN_OPS, MAX_VALUE_BYTES, Op, Precondition,
    Revision, SharedStore, StoreError, Txn, TxnOutcome, WatchBatch, WatchStream,
};

/// How long one watch item may take to arrive.
const WATCH_PATIENCE: Duration = Duration::from_secs(15);
/// How long one case may take in all.
const CASE_PATIENCE: Duration = Duration::from_secs(120);

type Case = fn(SharedStore) -> BoxFuture<'static, ()>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        /// Every case, by name, in the order [`run_all`] runs them.
        pub const CASES: &[(&str, Case)] = &[
            $((stringify!($name), |store| Box::pin($name(store)))),*
        ];
    };
}

cases![
    compare_and_swap_on_absent_present_and_mod_revision,
    failed_compare_applies_no_op,
    invalid_transactions_are_refused,
    list_is_by_prefix_at_one_revision,
    watch_delivers_every_change_in_order,
    watch_resumes_from_a_revision,
    watch_from_zero_sees_only_new_changes,
    watch_from_compacted_revision_fails,
    lease_expiry_deletes_keys,
    lease_kept_alive_survives_and_revoke_deletes,
    put_with_unknown_lease_fails,
    large_values_round_trip,
    concurrent_cas_increments_lose_nothing,
    racing_put_if_absent_has_one_winner,
];

/// Runs every case on a store from `factory`, one fresh store per case.
/// The factory's second value (a fixture: temp dir, cluster handle, ...)
/// is kept alive while the case runs. Panics after all cases have run,
/// naming each failed case and its message.
pub async fn run_all<F, Fut, G>(mut factory: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (SharedStore, G)>,
    G: Send + 'static,
{
    let mut failures = Vec::new();
    for (name, case) in CASES {
        let (store, guard) = factory().await;
        let backend = store.backend();
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(CASE_PATIENCE, tokio::spawn(case(store))).await;
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(join)) if join.is_panic() => {
                let payload = join.into_panic();
                Some(
                    payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".to_string()),
                )
            }
            Ok(Err(join)) => Some(format!("task failed: {join}")),
            Err(_) => Some(format!("did not finish within {CASE_PATIENCE:?}")),
        };
        tracing::info!(case = name, backend, elapsed = ?started.elapsed(), ok = failure.is_none(), "conformance case");
        if let Some(message) = failure {
            failures.push(format!("{name} ({backend}): {message}"));
        }
        drop(guard);
    }
    assert!(
        failures.is_empty(),
        "{} of {} conformance cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------------------ helpers

/// A key prefix no other case (or run) uses.
fn namespace(case: &str) -> String {
    format!("/conformance/{case}/{:016x}/", rand::random::<u64>())
}

async fn commit(store: &SharedStore, txn: Txn) -> Revision {
    let described = format!("{txn:?}");
    match store.txn(txn).await {
        Ok(TxnOutcome::Committed { revision }) => revision,
        Ok(TxnOutcome::Conflict { current }) => {
            panic!("transaction {described:.200} conflicted unexpectedly: {current:?}")
        }
        Err(e) => panic!("transaction {described:.200} failed: {e}"),
    }
}

async fn put(store: &SharedStore, key: &str, value: &str) -> Revision {
    commit(store, Txn::new().then(Op::put(key, value.to_string()))).await
}

async fn get(store: &SharedStore, key: &str) -> Option<KeyValue> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?} failed: {e}"))
}

fn conflict(
    outcome: Result<TxnOutcome, StoreError>,
    what: &str,
) -> Vec<(String, Option<KeyValue>)> {
    match outcome {
        Ok(TxnOutcome::Conflict { current }) => current,
        other => panic!("{what}: expected a conflict, got {other:?}"),
    }
}

async fn open_watch(store: &SharedStore, prefix: &str, from: Revision) -> WatchStream {
    store
        .watch(prefix, from)
        .await
        .unwrap_or_else(|e| panic!("watch {prefix:?} from {from} failed: {e}"))
}

/// The next batch, within [`WATCH_PATIENCE`].
async fn next_batch(watch: &mut WatchStream, what: &str) -> WatchBatch {
    match tokio::time::timeout(WATCH_PATIENCE, watch.next()).await {
        Ok(Some(Ok(batch))) => batch,
        Ok(Some(Err(e))) => panic!("{what}: watch failed: {e}"),
        Ok(None) => panic!("{what}: watch ended"),
        Err(_) => panic!("{what}: no watch batch within {WATCH_PATIENCE:?}"),
    }
}

/// Polls `check` until it returns true, every 50 ms, for at most
/// `patience`; returns whether it did.
async fn eventually<F, Fut>(patience: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn put_event(key: &str, value: &str, create: Revision, modified: Revision, version: i64) -> Event {
    Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: key.to_string(),
            value: Bytes::from(value.to_string()),
            create_revision: create,
            mod_revision: modified,
            version,
            lease: None,
        },
    }
}

fn delete_event(key: &str, revision: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_string(),
            value: Bytes::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: None,
        },
    }
}

/// A small deterministic generator, so that a failing sequence can be
/// replayed from the seed in the message.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ------------------------------------------------------------------ cases

/// Absent, Present and ModRevision compares decide, and a conflict reports
/// what is stored now.
pub async fn compare_and_swap_on_absent_present_and_mod_revision(store: SharedStore) {
    let ns = namespace("cas");
    let key = format!("{ns}k");

    let current = conflict(
        store
            .put(&key, Bytes::from("x"), Some(Precondition::Present))
            .await,
        "Present on a missing key",
    );
    assert_eq!(current, vec![(key.clone(), None)]);
    let current = conflict(
        store
            .put(&key, Bytes::from("x"), Some(Precondition::ModRevision(0)))
            .await,
        "ModRevision(0) on a missing key",
    );
    assert_eq!(current, vec![(key.clone(), None)]);
    assert_eq!(get(&store, &key).await, None, "a failed compare wrote");

    let r1 = match store
        .put(&key, Bytes::from("v1"), Some(Precondition::Absent))
        .await
    {
        Ok(TxnOutcome::Committed { revision }) => revision,
        other => panic!("put-if-absent on a missing key: {other:?}"),
    };
    let kv1 = get(&store, &key).await.expect("key after create");
    assert_eq!(
        (
            kv1.value.as_ref(),
            kv1.create_revision,
            kv1.mod_revision,
            kv1.version,
            kv1.lease
        ),
        (&b"v1"[..], r1, r1, 1, None),
        "a created key's revisions"
    );

    let current = conflict(
        store
            .put(&key, Bytes::from("v2"), Some(Precondition::Absent))
            .await,
        "Absent on an existing key",
    );
    assert_eq!(current, vec![(key.clone(), Some(kv1.clone()))]);

    let r2 = match store
        .put(&key, Bytes::from("v2"), Some(Precondition::Present))
        .await
    {
        Ok(TxnOutcome::Committed { revision }) => revision,
        other => panic!("Present on an existing key: {other:?}"),
    };
    assert!(r2 > r1, "revision did not grow: {r1} then {r2}");
    let kv2 = get(&store, &key).await.expect("key after update");
    assert_eq!(
        (
            kv2.value.as_ref(),
            kv2.create_revision,
            kv2.mod_revision,
            kv2.version
        ),
        (&b"v2"[..], r1, r2, 2)
    );

    let current = conflict(
        store
            .put(&key, Bytes::from("v3"), Some(Precondition::ModRevision(r1)))
            .await,
        "ModRevision with a stale revision",
    );
    assert_eq!(current, vec![(key.clone(), Some(kv2.clone()))]);

    let r3 = match store
        .put(&key, Bytes::from("v3"), Some(Precondition::ModRevision(r2)))
        .await
    {
        Ok(TxnOutcome::Committed { revision }) => revision,
        other => panic!("ModRevision with the current revision: {other:?}"),
    };
    assert!(r3 > r2);

    let current = conflict(
        store
            .delete(&key, Some(Precondition::ModRevision(r2)))
            .await,
        "delete with a stale revision",
    );
    assert_eq!(current[0].1.as_ref().map(|kv| kv.mod_revision), Some(r3));
    assert!(get(&store, &key).await.is_some(), "a failed delete deleted");

    let r4 = match store
        .delete(&key, Some(Precondition::ModRevision(r3)))
        .await
    {
        Ok(TxnOutcome::Committed { revision }) => revision,
        other => panic!("delete with the current revision: {other:?}"),
    };
    assert!(r4 > r3);
    assert_eq!(get(&store, &key).await, None);

    // Re-created: a new life with a new create revision and version 1.
    let r5 = put(&store, &key, "again").await;
    let kv5 = get(&store, &key).await.expect("re-created key");
    assert_eq!((kv5.create_revision, kv5.version), (r5, 1));
}

/// A transaction whose compares fail applies none of its ops; one that
/// succeeds applies all at one revision; deleting only missing keys does
/// not move the revision.
pub async fn failed_compare_applies_no_op(store: SharedStore) {
    let ns = namespace("atomic");
    let (a, b, c) = (format!("{ns}a"), format!("{ns}b"), format!("{ns}c"));
    let ra = put(&store, &a, "a1").await;
    put(&store, &b, "b1").await;
    let kv_a = get(&store, &a).await;
    let kv_b = get(&store, &b).await;
    let before = store.current_revision().await.expect("current revision");

    let txn = Txn::new()
        .when(Compare::mod_revision(&a, ra))
        .when(Compare::absent(&b)) // fails: b exists
        .then(Op::put(&a, "a2"))
        .then(Op::put(&c, "c1"))
        .then(Op::delete(&b));
    let current = conflict(store.txn(txn).await, "txn with one failing compare");
    assert_eq!(
        current,
        vec![(a.clone(), kv_a.clone()), (b.clone(), kv_b.clone())]
    );
    assert_eq!(get(&store, &a).await, kv_a, "a changed by a failed txn");
    assert_eq!(get(&store, &b).await, kv_b, "b changed by a failed txn");
    assert_eq!(get(&store, &c).await, None, "c written by a failed txn");
    assert_eq!(
        store.current_revision().await.unwrap(),
        before,
        "a failed txn moved the revision"
    );

    let txn = Txn::new()
        .when(Compare::mod_revision(&a, ra))
        .when(Compare::present(&b))
        .when(Compare::absent(&c))
        .then(Op::put(&a, "a2"))
        .then(Op::put(&c, "c1"))
        .then(Op::delete(&b));
    let rev = commit(&store, txn).await;
    assert_eq!(rev, before + 1, "one transaction is one revision");
    assert_eq!(
        get(&store, &a).await.map(|kv| (kv.value, kv.mod_revision)),
        Some((Bytes::from("a2"), rev))
    );
    assert_eq!(
        get(&store, &c).await.map(|kv| (kv.value, kv.mod_revision)),
        Some((Bytes::from("c1"), rev))
    );
    assert_eq!(get(&store, &b).await, None);

    let noop = commit(&store, Txn::new().then(Op::delete(format!("{ns}missing")))).await;
    assert_eq!(
        noop, rev,
        "deleting a missing key reports the current revision"
    );
    assert_eq!(
        store.current_revision().await.unwrap(),
        rev,
        "deleting a missing key moved the revision"
    );
}

/// Requests every backend refuses alike.
pub async fn invalid_transactions_are_refused(store: SharedStore) {
    let ns = namespace("invalid");
    let key = format!("{ns}k");
    let twice = Txn::new().then(Op::put(&key, "1")).then(Op::delete(&key));
    assert!(
        matches!(store.txn(twice).await, Err(StoreError::Invalid(_))),
        "a key written twice"
    );

    let huge = Txn::new().then(Op::put(&key, vec![0u8; MAX_VALUE_BYTES + 1]));
    assert!(
        matches!(store.txn(huge).await, Err(StoreError::Invalid(_))),
        "a value over the limit"
    );

    let empty = Txn::new().then(Op::put("", "x"));
    assert!(
        matches!(store.txn(empty).await, Err(StoreError::Invalid(_))),
        "an empty key"
    );
    let empty = Txn::new()
        .when(Compare::absent(""))
        .then(Op::put(&key, "x"));
    assert!(
        matches!(store.txn(empty).await, Err(StoreError::Invalid(_))),
        "a compare on an empty key"
    );
    assert!(
        matches!(store.get("").await, Err(StoreError::Invalid(_))),
        "get of an empty key"
    );

    let mut many = Txn::new();
    for i in 0..=MAX_TXN_OPS {
        many = many.then(Op::put(format!("{ns}{i}"), "x"));
    }
    assert!(
        matches!(store.txn(many).await, Err(StoreError::Invalid(_))),
        "too many ops"
    );

    let mut most = Txn::new();
    for i in 0..MAX_TXN_OPS {
        most = most.then(Op::put(format!("{ns}{i}"), "x"));
    }
    commit(&store, most).await;
    assert_eq!(store.list(&ns).await.unwrap().kvs.len(), MAX_TXN_OPS);
    assert_eq!(get(&store, &key).await, None, "a refused txn wrote");
}

/// A list returns exactly the keys starting with the prefix ("a/b/" does
/// not match "a/bc"), sorted, at the revision it reports; watching from the
/// next revision sees every later change.
pub async fn list_is_by_prefix_at_one_revision(store: SharedStore) {
    let ns = namespace("list");
    let keys = ["a/b", "a/b/1", "a/b/2", "a/bc", "a/bc/1", "b"];
    // Write out of order: listing must sort.
    for k in keys.iter().rev() {
        put(&store, &format!("{ns}{k}"), k).await;
    }
    let names = |kvs: &[KeyValue]| -> Vec<String> {
        kvs.iter()
            .map(|kv| kv.key.trim_start_matches(&ns).to_string())
            .collect()
    };
    let listed = store.list(&format!("{ns}a/b/")).await.unwrap();
    assert_eq!(names(&listed.kvs), ["a/b/1", "a/b/2"]);
    let listed = store.list(&format!("{ns}a/bc")).await.unwrap();
    assert_eq!(names(&listed.kvs), ["a/bc", "a/bc/1"]);
    let listed = store.list(&format!("{ns}a/b")).await.unwrap();
    assert_eq!(
        names(&listed.kvs),
        ["a/b", "a/b/1", "a/b/2", "a/bc", "a/bc/1"]
    );
    let all = store.list(&ns).await.unwrap();
    assert_eq!(names(&all.kvs), keys);
    for kv in &all.kvs {
        assert_eq!(
            kv.value,
            Bytes::from(kv.key.trim_start_matches(&ns).to_string())
        );
    }
    assert!(
        store
            .list(&format!("{ns}zzz"))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );

    let now = store.current_revision().await.unwrap();
    assert_eq!(all.revision, now, "a list reports the revision it reflects");
    assert!(all.kvs.iter().all(|kv| kv.mod_revision <= all.revision));

    // List, then watch from the next revision: nothing is missed.
    let after = put(&store, &format!("{ns}a/b/3"), "3").await;
    let mut watch = open_watch(&store, &ns, all.revision + 1).await;
    let batch = next_batch(&mut watch, "watch after list").await;
    assert_eq!(batch.revision, after);
    assert_eq!(
        batch.events,
        vec![put_event(&format!("{ns}a/b/3"), "3", after, after, 1)]
    );
}

/// 200 transactions (puts, deletes, multi-op) over a few keys: a watch
/// sees every change under its prefix, one batch per revision, in order,
/// with events in transaction order, and nothing else.
pub async fn watch_delivers_every_change_in_order(store: SharedStore) {
    let ns = namespace("watch-order");
    let watched = format!("{ns}w/");
    // Shares the string "…/w" but is not under "…/w/".
    let outside = format!("{ns}w");
    let keys: Vec<String> = (0..6).map(|i| format!("{watched}k{i}")).collect();
    let seed = rand::random::<u64>() | 1;
    let mut rng = XorShift(seed);
    // One watch follows the changes as they happen (consumed while the
    // writes go on); a second one reads them from history afterwards.
    let live = open_watch(&store, &watched, 0).await;
    let start = store.current_revision().await.expect("current revision") + 1;
    let (live_tx, mut live_rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = tokio::spawn(async move {
        let mut live = live;
        while let Some(item) = live.next().await {
            if live_tx.send(item).is_err() {
                break;
            }
        }
    });

    // key -> (create_revision, version)
    let mut model: BTreeMap<String, (Revision, i64)> = BTreeMap::new();
    let mut expected: Vec<WatchBatch> = Vec::new();
    for step in 0..200 {
        let value = format!("v{step}");
        let present: Vec<String> = model.keys().cloned().collect();
        let mut ops = Vec::new();
        match rng.below(10) {
            0..=4 => ops.push(Op::put(&keys[rng.below(keys.len())], value.clone())),
            5 | 6 if !present.is_empty() => {
                ops.push(Op::delete(&present[rng.below(present.len())]))
            }
            9 => ops.push(Op::put(&outside, value.clone())),
            _ => {
                // Several ops at one revision, including one outside.
                let first = rng.below(keys.len());
                let second = (first + 1 + rng.below(keys.len() - 1)) % keys.len();
                ops.push(Op::put(&keys[first], value.clone()));
                if model.contains_key(&keys[second]) {
                    ops.push(Op::delete(&keys[second]));
                } else {
                    ops.push(Op::put(&keys[second], value.clone()));
                }
                ops.push(Op::put(&outside, value.clone()));
                let third = (second + 1) % keys.len();
                if third != first {
                    ops.push(Op::put(&keys[third], format!("{value}b")));
                }
            }
        }
        let txn = Txn {
            compares: Vec::new(),
            ops: ops.clone(),
        };
        let revision = commit(&store, txn).await;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    let entry = model.entry(key.clone()).or_insert((revision, 0));
                    entry.1 += 1;
                    if key.starts_with(&watched) {
                        let value = String::from_utf8(value.to_vec()).expect("utf-8 value");
                        events.push(put_event(&key, &value, entry.0, revision, entry.1));
                    }
                }
                Op::Delete { key } => {
                    model.remove(&key);
                    if key.starts_with(&watched) {
                        events.push(delete_event(&key, revision));
                    }
                }
            }
        }
        if !events.is_empty() {
            expected.push(WatchBatch { revision, events });
        }
    }

    // Opened before the marker is written but read after: the marker is
    // both in its history and in what it follows live, and must come once.
    let mut history = open_watch(&store, &watched, start).await;
    let marker = put(&store, &format!("{watched}marker"), "m").await;
    for (name, is_live) in [("live", true), ("history", false)] {
        let mut previous = 0;
        for (i, want) in expected.iter().enumerate() {
            let what = format!(
                "{name} watch, batch {i} of {} (seed {seed})",
                expected.len()
            );
            let got = if is_live {
                match tokio::time::timeout(WATCH_PATIENCE, live_rx.recv()).await {
                    Ok(Some(Ok(batch))) => batch,
                    other => panic!("{what}: {other:?}"),
                }
            } else {
                next_batch(&mut history, &what).await
            };
            assert!(
                got.revision > previous,
                "{what}: revisions not increasing: {previous} then {}",
                got.revision
            );
            previous = got.revision;
            assert_eq!(&got, want, "{what} differs");
        }
        // Nothing stray after the last expected batch.
        let got = if is_live {
            match tokio::time::timeout(WATCH_PATIENCE, live_rx.recv()).await {
                Ok(Some(Ok(batch))) => batch,
                other => panic!("{name} watch, marker: {other:?}"),
            }
        } else {
            next_batch(&mut history, "history watch, marker").await
        };
        assert_eq!(
            got.revision, marker,
            "{name} watch: an unexpected batch after the last change (seed {seed}): {got:?}"
        );
    }
    let marker = put(&store, &format!("{watched}marker"), "m2").await;
    let got = next_batch(&mut history, "history watch, second marker").await;
    assert_eq!(
        got.revision, marker,
        "history watch: a repeated or stray batch: {got:?}"
    );
    match tokio::time::timeout(WATCH_PATIENCE, live_rx.recv()).await {
        Ok(Some(Ok(got))) => assert_eq!(
            got.revision, marker,
            "live watch: a repeated or stray batch: {got:?}"
        ),
        other => panic!("live watch, second marker: {other:?}"),
    }
    consumer.abort();
}

/// A watch stopped after revision X and a new one from X + 1 together see
/// every change exactly once.
pub async fn watch_resumes_from_a_revision(store: SharedStore) {
    let ns = namespace("watch-resume");
    let start = store.current_revision().await.unwrap() + 1;
    let mut watch = open_watch(&store, &ns, start).await;
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(put(&store, &format!("{ns}k{}", i % 3), &format!("v{i}")).await);
    }
    let mut x = 0;
    for (i, want) in revisions.iter().take(6).enumerate() {
        let batch = next_batch(&mut watch, &format!("first watch, batch {i}")).await;
        assert_eq!(batch.revision, *want);
        x = batch.revision;
    }
    drop(watch);
    for i in 10..20 {
        revisions.push(put(&store, &format!("{ns}k{}", i % 3), &format!("v{i}")).await);
    }
    let mut resumed = open_watch(&store, &ns, x + 1).await;
    for (i, want) in revisions.iter().enumerate().skip(6) {
        let batch = next_batch(&mut resumed, &format!("resumed watch, change {i}")).await;
        assert_eq!(batch.revision, *want, "resumed watch, change {i}");
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.events[0].kv.key, format!("{ns}k{}", i % 3));
        assert_eq!(batch.events[0].kv.value, Bytes::from(format!("v{i}")));
    }
    let marker = put(&store, &format!("{ns}marker"), "m").await;
    assert_eq!(next_batch(&mut resumed, "marker").await.revision, marker);
}

/// `from = 0` starts after the current revision: older changes are not
/// replayed, the first change after the call is delivered.
pub async fn watch_from_zero_sees_only_new_changes(store: SharedStore) {
    let ns = namespace("watch-zero");
    for i in 0..5 {
        put(&store, &format!("{ns}old{i}"), "old").await;
    }
    let mut watch = open_watch(&store, &ns, 0).await;
    let rev = put(&store, &format!("{ns}new"), "new").await;
    let batch = next_batch(&mut watch, "first change after watch(0)").await;
    assert_eq!(batch.revision, rev);
    assert_eq!(
        batch.events,
        vec![put_event(&format!("{ns}new"), "new", rev, rev, 1)]
    );
}

/// After compacting at C, a watch from before C fails with
/// [`StoreError::Compacted`] naming C and ends; a watch from C works.
pub async fn watch_from_compacted_revision_fails(store: SharedStore) {
    let ns = namespace("compact");
    let mut revisions = Vec::new();
    for i in 0..5 {
        revisions.push(put(&store, &format!("{ns}k{i}"), &format!("v{i}")).await);
    }
    let c = revisions[2];
    store.compact(c).await.expect("compacting");
    store
        .compact(c)
        .await
        .expect("compacting again at the same revision");
    store
        .compact(c - 1)
        .await
        .expect("compacting below an earlier compaction");
    let future = store.current_revision().await.unwrap() + 100;
    assert!(
        matches!(store.compact(future).await, Err(StoreError::Invalid(_))),
        "compacting a future revision must be refused"
    );

    let mut old = open_watch(&store, &ns, revisions[0]).await;
    match tokio::time::timeout(WATCH_PATIENCE, old.next()).await {
        Ok(Some(Err(StoreError::Compacted {
            requested,
            compacted,
        }))) => {
            assert_eq!(compacted, c, "the error names the compaction revision");
            assert_eq!(requested, revisions[0]);
        }
        other => panic!("watch from a compacted revision: expected Compacted, got {other:?}"),
    }
    match tokio::time::timeout(WATCH_PATIENCE, old.next()).await {
        Ok(None) => {}
        other => panic!("a compacted watch must end, got {other:?}"),
    }

    let mut kept = open_watch(&store, &ns, c).await;
    for (i, want) in revisions.iter().enumerate().skip(2) {
        let batch = next_batch(
            &mut kept,
            &format!("watch from the compaction revision, change {i}"),
        )
        .await;
        assert_eq!(batch.revision, *want);
    }
}

/// A key on a lease that is not kept alive disappears within TTL + 3 s,
/// all its keys in one revision that watchers see; afterwards the lease is
/// gone for keep-alive, info and puts.
pub async fn lease_expiry_deletes_keys(store: SharedStore) {
    let ns = namespace("lease-expiry");
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.expect("granting a lease");
    let mut keeper = store
        .lease_keeper(lease)
        .await
        .expect("a keeper for a new lease");
    let granted_at = tokio::time::Instant::now();
    let (k1, k2) = (format!("{ns}k1"), format!("{ns}k2"));
    let rev = commit(
        &store,
        Txn::new()
            .then(Op::put_with_lease(&k1, "1", lease))
            .then(Op::put_with_lease(&k2, "2", lease)),
    )
    .await;
    assert_eq!(get(&store, &k1).await.and_then(|kv| kv.lease), Some(lease));
    let info = store
        .lease_info(lease)
        .await
        .unwrap()
        .expect("lease info of a live lease");
    assert_eq!(info.id, lease);
    assert!(info.granted_ttl >= ttl, "granted {:?}", info.granted_ttl);
    assert!(info.remaining <= info.granted_ttl);
    let mut watch = open_watch(&store, &ns, rev + 1).await;

    let gone = eventually(ttl + Duration::from_secs(3), || {
        let (store, k1, k2) = (&store, &k1, &k2);
        async move { get(store, k1).await.is_none() && get(store, k2).await.is_none() }
    })
    .await;
    assert!(
        gone,
        "keys of an expired lease still there {:?} after the last refresh",
        granted_at.elapsed()
    );
    assert!(
        granted_at.elapsed() >= ttl - Duration::from_millis(500),
        "keys vanished after {:?}, before the TTL",
        granted_at.elapsed()
    );

    let batch = next_batch(&mut watch, "deletes of an expired lease's keys").await;
    let deleted: BTreeSet<(bool, String)> = batch
        .events
        .iter()
        .map(|e| (e.kind == EventKind::Delete, e.kv.key.clone()))
        .collect();
    assert_eq!(
        deleted,
        BTreeSet::from([(true, k1.clone()), (true, k2.clone())]),
        "one revision deletes every key of the lease"
    );

    assert_eq!(
        store.lease_info(lease).await.unwrap(),
        None,
        "info of an expired lease"
    );
    assert_eq!(
        keeper.keep_alive().await,
        Err(StoreError::LeaseNotFound(lease))
    );
    assert!(
        matches!(store.lease_keeper(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
    );
    let late = store
        .txn(Txn::new().then(Op::put_with_lease(&k1, "late", lease)))
        .await;
    assert_eq!(late, Err(StoreError::LeaseNotFound(lease)));
}

/// Keep-alives hold a lease (and its key) for twice its TTL; revoking
/// deletes its keys at once (watchers see it) and is idempotent.
pub async fn lease_kept_alive_survives_and_revoke_deletes(store: SharedStore) {
    let ns = namespace("lease-keep");
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.expect("granting a lease");
    let key = format!("{ns}k");
    let rev = commit(
        &store,
        Txn::new().then(Op::put_with_lease(&key, "v", lease)),
    )
    .await;
    let mut keeper = store.lease_keeper(lease).await.expect("a keeper");
    let until = tokio::time::Instant::now() + ttl * 2;
    while tokio::time::Instant::now() < until {
        let refreshed = keeper
            .keep_alive()
            .await
            .expect("keep-alive of a live lease");
        assert!(refreshed >= ttl, "keep-alive returned {refreshed:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            get(&store, &key).await.is_some(),
            "a kept-alive key vanished"
        );
    }
    let info = store
        .lease_info(lease)
        .await
        .unwrap()
        .expect("info of a kept-alive lease");
    assert!(info.remaining > Duration::ZERO);

    let mut watch = open_watch(&store, &ns, rev + 1).await;
    store.revoke_lease(lease).await.expect("revoking");
    assert_eq!(
        get(&store, &key).await,
        None,
        "revoke must delete the lease's keys at once"
    );
    let batch = next_batch(&mut watch, "delete by revoke").await;
    assert_eq!(batch.events.len(), 1);
    assert_eq!(
        (batch.events[0].kind, batch.events[0].kv.key.as_str()),
        (EventKind::Delete, key.as_str())
    );
    store
        .revoke_lease(lease)
        .await
        .expect("revoking twice is not an error");
    assert_eq!(
        keeper.keep_alive().await,
        Err(StoreError::LeaseNotFound(lease))
    );
    assert_eq!(store.lease_info(lease).await.unwrap(), None);
}

/// A put with a lease that was never granted fails and writes nothing.
pub async fn put_with_unknown_lease_fails(store: SharedStore) {
    let ns = namespace("lease-unknown");
    let key = format!("{ns}k");
    let unknown: LeaseId = (rand::random::<i64>() & 0x3fff_ffff_ffff_ffff) | 0x1000;
    let other = format!("{ns}other");
    let outcome = store
        .txn(
            Txn::new()
                .then(Op::put(&other, "x"))
                .then(Op::put_with_lease(&key, "v", unknown)),
        )
        .await;
    assert_eq!(outcome, Err(StoreError::LeaseNotFound(unknown)));
    assert_eq!(get(&store, &key).await, None);
    assert_eq!(
        get(&store, &other).await,
        None,
        "a failed txn wrote its other op"
    );
    assert!(
        matches!(store.lease_keeper(unknown).await, Err(StoreError::LeaseNotFound(id)) if id == unknown)
    );
    assert_eq!(store.lease_info(unknown).await.unwrap(), None);
    store
        .revoke_lease(unknown)
        .await
        .expect("revoking an unknown lease is not an error");
}

/// 1 MiB values come back intact from get, list and watch.
pub async fn large_values_round_trip(store: SharedStore) {
    let ns = namespace("large");
    let value = |seed: usize| -> Bytes {
        (0..1 << 20)
            .map(|i: usize| (i.wrapping_mul(31) ^ (i >> 9) ^ seed) as u8)
            .collect::<Vec<u8>>()
            .into()
    };
    let (v1, v2) = (value(1), value(2));
    let start = store.current_revision().await.unwrap() + 1;
    let mut watch = open_watch(&store, &ns, start).await;
    let r1 = commit(
        &store,
        Txn::new().then(Op::put(format!("{ns}a"), v1.clone())),
    )
    .await;
    let r2 = commit(
        &store,
        Txn::new().then(Op::put(format!("{ns}b"), v2.clone())),
    )
    .await;
    assert!(
        get(&store, &format!("{ns}a")).await.expect("a").value == v1,
        "get returned a different 1 MiB value"
    );
    let listed = store.list(&ns).await.expect("listing 2 MiB");
    assert_eq!(listed.kvs.len(), 2);
    assert!(
        listed.kvs[0].value == v1 && listed.kvs[1].value == v2,
        "list returned different values"
    );
    let b1 = next_batch(&mut watch, "first 1 MiB put").await;
    let b2 = next_batch(&mut watch, "second 1 MiB put").await;
    assert_eq!((b1.revision, b2.revision), (r1, r2));
    assert!(
        b1.events[0].kv.value == v1 && b2.events[0].kv.value == v2,
        "watch returned different values"
    );
    // A late watch reads them from history too.
    let mut late = open_watch(&store, &ns, r1).await;
    assert!(
        next_batch(&mut late, "history of a 1 MiB put").await.events[0]
            .kv
            .value
            == v1
    );
}

/// 8 tasks × 25 compare-and-swap increments of one counter end at exactly
/// 200: no update is lost.
pub async fn concurrent_cas_increments_lose_nothing(store: SharedStore) {
    let ns = namespace("counter");
    let key = format!("{ns}counter");
    commit(
        &store,
        Txn::new()
            .when(Compare::absent(&key))
            .then(Op::put(&key, "0")),
    )
    .await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let mut conflicts = 0u32;
                let mut current = get(&store, &key).await;
                for _ in 0..25 {
                    loop {
                        let kv = current.clone().expect("the counter exists");
                        let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                        let txn = Txn::new()
                            .when(Compare::mod_revision(&key, kv.mod_revision))
                            .then(Op::put(&key, (n + 1).to_string()));
                        match store.txn(txn).await {
                            Ok(TxnOutcome::Committed { .. }) => {
                                current = get(&store, &key).await;
                                break;
                            }
                            Ok(TxnOutcome::Conflict { current: now }) => {
                                conflicts += 1;
                                current = now.into_iter().next().and_then(|(_, kv)| kv);
                            }
                            Err(e) => panic!("increment failed: {e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.expect("an increment task panicked");
    }
    let kv = get(&store, &key).await.expect("the counter");
    assert_eq!(
        kv.value,
        Bytes::from("200"),
        "lost updates ({conflicts} conflicts seen)"
    );
    assert_eq!(kv.version, 201);
}

/// 10 tasks racing put-if-absent on one key: exactly one wins, the others
/// see its value in their conflict.
pub async fn racing_put_if_absent_has_one_winner(store: SharedStore) {
    let ns = namespace("race");
    let key = format!("{ns}leader");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let outcome = store
                    .put(
                        &key,
                        Bytes::from(format!("task{i}")),
                        Some(Precondition::Absent),
                    )
                    .await
                    .expect("put-if-absent");
                (i, outcome)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut seen_by_losers = BTreeSet::new();
    for task in tasks {
        let (i, outcome) = task.await.expect("a racing task panicked");
        match outcome {
            TxnOutcome::Committed { .. } => winners.push(i),
            TxnOutcome::Conflict { current } => {
                let kv = current[0].1.clone().expect("a loser sees the winner's key");
                seen_by_losers.insert(kv.value);
            }
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let value = Bytes::from(format!("task{}", winners[0]));
    assert_eq!(
        get(&store, &key).await.map(|kv| kv.value),
        Some(value.clone())
    );
    assert!(
        seen_by_losers.iter().all(|v| *v == value),
        "losers saw {seen_by_losers:?}"
    );
}
