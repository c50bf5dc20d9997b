//! The etcd backend against one real etcd member: the conformance suite,
//! and a watch that rides over the member being killed and restarted.

use std::time::Duration;

use bytes::Bytes;
use hostmesh_registry::etcd::{EtcdConfig, EtcdStore, EtcdTls};
use hostmesh_registry::testing::{EtcdCluster, ServerTls};
use hostmesh_registry::{
    EventKind, SharedStore, StoreError, StoreUrl, TxnOutcome, WatchBatch, conformance, open_store,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;

/// The tests here are timing-sensitive (lease TTLs, elections) and the
/// test machine has 2 cores: run them one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_conformance_suite() {
    init_logs();
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start(1).await;
    conformance::run_all(|| {
        let cluster = &cluster;
        async move { (cluster.shared_store().await, ()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_etcd_restart() {
    init_logs();
    let _serial = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start(1).await;
    let store = cluster.shared_store().await;
    let prefix = "/restart/";
    let start = store.current_revision().await.unwrap() + 1;
    let mut watch = store.watch(prefix, start).await.expect("opening the watch");
    // Consume the watch all along, so that it sees the member die.
    let (batches_tx, mut batches) = mpsc::unbounded_channel::<WatchBatch>();
    let consumer = tokio::spawn(async move {
        while let Some(item) = watch.next().await {
            let batch = item.expect("the watch must ride over the restart");
            if batches_tx.send(batch).is_err() {
                break;
            }
        }
    });

    let mut expected = Vec::new();
    for i in 0..40 {
        expected.push(put(&store, format!("{prefix}k{i:03}")).await);
    }
    let mut received = Vec::new();
    for _ in 0..20 {
        received.push(next(&mut batches).await);
    }

    cluster.kill(0);
    cluster.restart(0).await;
    for i in 40..80 {
        expected.push(put(&store, format!("{prefix}k{i:03}")).await);
    }
    while received.len() < expected.len() {
        received.push(next(&mut batches).await);
    }
    let got: Vec<(i64, String)> = received
        .iter()
        .map(|b| {
            assert_eq!(b.events.len(), 1, "{b:?}");
            assert_eq!(b.events[0].kind, EventKind::Put);
            (b.revision, b.events[0].kv.key.clone())
        })
        .collect();
    assert_eq!(
        got, expected,
        "the watch missed or repeated changes across the restart"
    );
    // And nothing after them but new changes.
    let marker = put(&store, format!("{prefix}marker")).await;
    assert_eq!(next(&mut batches).await.revision, marker.0);
    consumer.abort();
}

/// `etcds://` with a CA and a client certificate, against a member that
/// requires client certificates; without the certificate, connecting fails
/// with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_with_client_certificates_works_end_to_end() {
    init_logs();
    let _serial = SERIAL.lock().await;
    let pki = tempfile::tempdir().unwrap();
    let tls = make_pki(pki.path());
    let cluster = EtcdCluster::start_with_tls(1, tls.clone()).await;
    let url: StoreUrl = format!("etcds://{}", cluster.endpoint(0)).parse().unwrap();
    let store = open_store(&url, Some(tls.client_tls()), None)
        .await
        .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    let mut watch = store.watch("/tls/", 0).await.unwrap();
    let (revision, _) = put(&store, "/tls/k".to_string()).await;
    let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch batch over TLS")
        .expect("the watch ended")
        .expect("the watch failed");
    assert_eq!(batch.revision, revision);
    assert_eq!(
        store.get("/tls/k").await.unwrap().map(|kv| kv.value),
        Some(Bytes::from("/tls/k"))
    );

    let mut config = EtcdConfig::new([cluster.endpoint(0)]);
    config.connect_timeout = Duration::from_secs(1);
    config.tls = Some(EtcdTls {
        ca_file: tls.ca_file.clone(),
        cert_file: None,
        key_file: None,
    });
    let err = EtcdStore::connect(config)
        .await
        .expect_err("connecting without the required client certificate");
    assert!(
        matches!(&err, StoreError::Unavailable(msg) if msg.starts_with(&format!("cannot reach etcd at {}", cluster.endpoint(0)))),
        "{err}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
fn make_pki(dir: &std::path::Path) -> ServerTls {
    let name = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("hostmesh test etcd CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |cn: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = name(cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        "etcd",
        vec!["127.0.0.1".to_string(), "localhost".to_string()],
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    );
    let (client_cert, client_key) = leaf(
        "hostmesh-controller",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    let write = |file: &str, pem: &str| {
        let path = dir.join(file);
        std::fs::write(&path, pem).unwrap();
        path
    };
    ServerTls {
        ca_file: write("ca.pem", &ca_cert.pem()),
        cert_file: write("server.pem", &server_cert),
        key_file: write("server-key.pem", &server_key),
        client_cert: Some((
            write("client.pem", &client_cert),
            write("client-key.pem", &client_key),
        )),
    }
}

async fn put(store: &SharedStore, key: String) -> (i64, String) {
    match store.put(&key, Bytes::from(key.clone()), None).await {
        Ok(TxnOutcome::Committed { revision }) => (revision, key),
        other => panic!("put {key}: {other:?}"),
    }
}

async fn next(batches: &mut mpsc::UnboundedReceiver<WatchBatch>) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(40), batches.recv())
        .await
        .expect("a watch batch within 40 s")
        .expect("the watch consumer stopped")
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
