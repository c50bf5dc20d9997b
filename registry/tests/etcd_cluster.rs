//! The etcd backend against a real 3-member cluster: the conformance
//! suite, and writers that keep going while the leader is killed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hostmesh_registry::conformance;
use hostmesh_registry::testing::EtcdCluster;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_stream::StreamExt;

/// Timing-sensitive tests on a 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_passes_the_conformance_suite() {
    init_logs();
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start(3).await;
    conformance::run_all(|| {
        let cluster = &cluster;
        async move { (cluster.shared_store().await, ()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_killing_the_leader() {
    init_logs();
    let _serial = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start(3).await;
    let store = cluster.shared_store().await;
    // A watcher that stays open across the kill: it must see every
    // acknowledged write, in revision order, without a gap.
    let from = store.current_revision().await.expect("current revision") + 1;
    let mut watch = store.watch("/chaos/", from).await.expect("opening a watch");
    let stop = Arc::new(AtomicBool::new(false));
    // (key, when the write was sent, when it was acknowledged)
    let (acks_tx, mut acks) = mpsc::unbounded_channel::<(String, Instant, Instant)>();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (store, stop, acks_tx) = (store.clone(), stop.clone(), acks_tx.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("/chaos/w{w}/{i:06}");
                    i += 1;
                    let sent = Instant::now();
                    match store.put(&key, Bytes::from(key.clone()), None).await {
                        Ok(outcome) => {
                            assert!(outcome.is_committed(), "{outcome:?}");
                            let _ = acks_tx.send((key, sent, Instant::now()));
                        }
                        Err(e) => failures.push(format!("{key}: {e}")),
                    }
                }
                failures
            })
        })
        .collect();
    drop(acks_tx);

    // Let the writers get going, then kill the leader under them.
    let mut acked = Vec::new();
    while acked.len() < 50 {
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .expect("writes before the kill")
            .expect("writers stopped");
        acked.push(ack);
    }
    let victim = cluster
        .leader()
        .await
        .expect("a leader among three healthy members");
    let killed_at = Instant::now();
    cluster.kill(victim);

    // Keep writing for 3 s, and at least until writes sent after the kill
    // are acknowledged again.
    let patience = killed_at + Duration::from_secs(20);
    let mut resumed_at = None;
    loop {
        let now = Instant::now();
        if resumed_at.is_some() && now >= killed_at + Duration::from_secs(3) {
            break;
        }
        assert!(
            now < patience,
            "no write sent after killing leader m{victim} was acknowledged within 20 s"
        );
        if let Ok(Some(ack)) = tokio::time::timeout(Duration::from_millis(100), acks.recv()).await {
            if ack.1 > killed_at && resumed_at.is_none() {
                resumed_at = Some(ack.2);
            }
            acked.push(ack);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for writer in writers {
        failures.extend(writer.await.expect("a writer panicked"));
    }
    while let Some(ack) = acks.recv().await {
        acked.push(ack);
    }
    let resumed_after = resumed_at.expect("writes resumed") - killed_at;
    let after = acked
        .iter()
        .filter(|(_, sent, _)| *sent > killed_at)
        .count();
    tracing::info!(
        victim,
        ?resumed_after,
        acked = acked.len(),
        after,
        "writes resumed after killing the leader"
    );
    // Requests are retried for up to 10 s, so none may fail in this outage.
    assert!(failures.is_empty(), "writes failed: {failures:?}");

    let listed = store.list("/chaos/").await.expect("listing after the kill");
    let present: HashSet<&str> = listed.kvs.iter().map(|kv| kv.key.as_str()).collect();
    let missing: Vec<&str> = acked
        .iter()
        .map(|(k, _, _)| k.as_str())
        .filter(|k| !present.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes missing after killing leader m{victim}: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );

    // The watch opened before the kill carried on through it.
    let mut unseen: HashSet<String> = acked.iter().map(|(k, _, _)| k.clone()).collect();
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !unseen.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = match tokio::time::timeout(left, watch.next()).await {
            Ok(Some(Ok(batch))) => batch,
            other => panic!(
                "the watch stopped with {} acknowledged writes unseen: {other:?}",
                unseen.len()
            ),
        };
        assert!(batch.revision > last, "revisions in order");
        last = batch.revision;
        for event in batch.events {
            unseen.remove(&event.kv.key);
        }
    }
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
