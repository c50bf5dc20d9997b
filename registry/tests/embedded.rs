//! The embedded backend against the conformance suite, plus what only a
//! file-backed store has to prove: acknowledged writes survive `kill -9`,
//! state survives a reopen, and the file cannot be opened twice.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hostmesh_registry::embedded::EmbeddedStore;
use hostmesh_registry::testing::EmbeddedFixture;
use hostmesh_registry::{
    Op, SharedStore, Store, StoreError, Txn, TxnOutcome, WatchBatch, WatchStream, conformance,
};

/// Set (to a store path) in the child process of
/// `acknowledged_writes_survive_kill_9`.
const CHILD_STORE_ENV: &str = "HOSTMESH_REGISTRY_CRASH_CHILD_STORE";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_conformance_suite() {
    init_logs();
    conformance::run_all(|| async {
        let fixture = EmbeddedFixture::new();
        (fixture.store.clone(), fixture)
    })
    .await;
}

/// A watcher that falls more than the live broadcast buffer behind reads
/// what it missed from the change log: nothing lost, nothing repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_rereads_the_log_and_loses_nothing() {
    init_logs();
    let fixture = EmbeddedFixture::new();
    let store = fixture.store.clone();
    let mut watch = store.watch("lag/", 0).await.unwrap();
    let first = commit(&store, "lag/first").await;
    // Reading one batch moves the watcher from history to live following.
    assert_eq!(next(&mut watch).await.revision, first);
    let mut expected = Vec::new();
    for i in 0..1200 {
        // Unwatched changes in between, so that filtering is exercised too.
        if i % 4 == 0 {
            commit(&store, &format!("other/{i}")).await;
        }
        expected.push(commit(&store, &format!("lag/{i:05}")).await);
    }
    for (i, want) in expected.iter().enumerate() {
        let batch = next(&mut watch).await;
        assert_eq!(batch.revision, *want, "change {i}");
        assert_eq!(batch.events[0].kv.key, format!("lag/{i:05}"));
    }
    let last = commit(&store, "lag/last").await;
    assert_eq!(
        next(&mut watch).await.revision,
        last,
        "a repeated or stray batch"
    );
}

async fn commit(store: &SharedStore, key: &str) -> i64 {
    match store.put(key, Bytes::from("v"), None).await {
        Ok(TxnOutcome::Committed { revision }) => revision,
        other => panic!("put {key}: {other:?}"),
    }
}

async fn next(watch: &mut WatchStream) -> WatchBatch {
    match tokio::time::timeout(Duration::from_secs(15), watch.next()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("expected a watch batch, got {other:?}"),
    }
}

/// Opens `path`, retrying briefly while a just-dropped store in this
/// process finishes closing (its background task may hold it a moment).
async fn reopen(path: &Path) -> EmbeddedStore {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match EmbeddedStore::open(path) {
            Ok(store) => return store,
            Err(StoreError::Unavailable(msg)) if Instant::now() < deadline => {
                assert!(msg.contains("already open"), "{msg}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopening {}: {e}", path.display()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_of_a_locked_file_fails_with_a_clear_message() {
    init_logs();
    let EmbeddedFixture { store, path, dir } = EmbeddedFixture::new();
    let err = EmbeddedStore::open(&path).expect_err("a second open of an open store");
    assert_eq!(
        err,
        StoreError::Unavailable(format!(
            "embedded store {} is already open in another process",
            path.display()
        ))
    );
    drop(store);
    let _again = reopen(&path).await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_revision_and_leases_survive_a_reopen() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/store.redb");
    let (revision, lease) = {
        let store = EmbeddedStore::open(&path).expect("creating the store and its directories");
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.put("a", Bytes::from("1"), None).await.unwrap();
        let outcome = store
            .txn(
                Txn::new()
                    .then(Op::put_with_lease("b", "2", lease))
                    .then(Op::put("c", "3")),
            )
            .await
            .unwrap();
        let TxnOutcome::Committed { revision } = outcome else {
            panic!("{outcome:?}")
        };
        (revision, lease)
    };
    let store = reopen(&path).await;
    assert_eq!(store.current_revision().await.unwrap(), revision);
    let listed = store.list("").await.unwrap();
    assert_eq!(listed.revision, revision);
    let keys: Vec<_> = listed.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert_eq!(listed.kvs[1].lease, Some(lease));
    let info = store
        .lease_info(lease)
        .await
        .unwrap()
        .expect("a persisted lease");
    assert_eq!(info.granted_ttl, Duration::from_secs(60));
    assert!(
        info.remaining > Duration::from_secs(55),
        "a reopened lease gets a fresh TTL"
    );
    // History survives too: a watch from the first revision replays it.
    let next = store.put("d", Bytes::from("4"), None).await.unwrap();
    assert!(matches!(next, TxnOutcome::Committed { revision: r } if r == revision + 1));
}

/// The child process of `acknowledged_writes_survive_kill_9`: writes keys
/// until killed, printing each one after its write is acknowledged.
#[test]
#[ignore = "run by acknowledged_writes_survive_kill_9 as its child process"]
fn crash_child_writer() {
    let path =
        std::env::var_os(CHILD_STORE_ENV).expect("run by acknowledged_writes_survive_kill_9");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(Path::new(&path)).expect("opening the store in the child");
        let mut out = std::io::stdout().lock();
        let started = Instant::now();
        for i in 0u64.. {
            // Bounded, in case the parent dies without killing us.
            assert!(started.elapsed() < Duration::from_secs(60), "never killed");
            let key = format!("crash/{i:08}");
            let value = Bytes::from(format!("value of {key}"));
            let outcome = store
                .put(&key, value, None)
                .await
                .expect("write in the child");
            assert!(outcome.is_committed());
            writeln!(out, "ack {key}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_STORE_ENV, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the child writer");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 200 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(key) = line.strip_prefix("ack ") {
                    acked.push(key.to_string());
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("child acknowledged only {} writes: {e}", acked.len());
            }
        }
    }

    // While the child holds the file, another process cannot open it.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let err = EmbeddedStore::open(&path).expect_err("open while another process has it");
        assert!(
            err.to_string().contains(&format!(
                "embedded store {} is already open in another process",
                path.display()
            )),
            "{err}"
        );
    });

    child.kill().expect("SIGKILL the child");
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the child must have been killed, not exited: {status}"
    );
    // Acks written before the kill are still in the pipe.
    reader.join().unwrap();
    acked.extend(
        lines
            .try_iter()
            .filter_map(|l| l.strip_prefix("ack ").map(str::to_string)),
    );

    runtime.block_on(async {
        let store = EmbeddedStore::open(&path).expect("reopening after kill -9");
        let listed = store.list("crash/").await.unwrap();
        let present: std::collections::HashSet<&str> =
            listed.kvs.iter().map(|kv| kv.key.as_str()).collect();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|k| !present.contains(k.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged writes lost after kill -9, first: {:?}",
            missing.len(),
            acked.len(),
            missing.first()
        );
        for kv in &listed.kvs {
            assert_eq!(kv.value, Bytes::from(format!("value of {}", kv.key)));
        }
        assert!(store.current_revision().await.unwrap() > acked.len() as i64);
    });
}

/// Logs to the test output; `RUST_LOG=hostmesh_registry=debug` for detail.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
