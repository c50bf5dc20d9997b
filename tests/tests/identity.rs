//! Host identity end to end, with real TLS handshakes: join with tokens,
//! the CA pin, renewal, revocation and CA rotation. The controller runs
//! in-process (ports 0, an injected clock where time matters); meshd's own
//! join and renewal code is used as the host side.

use std::path::Path;
use std::time::{Duration, SystemTime};

use hostmesh_api::clock::{ManualClock, SharedClock};
use hostmesh_api::pki::{self, CertInfo};
use hostmesh_api::proto::identity_client::IdentityClient;
use hostmesh_api::proto::operator_client::OperatorClient;
use hostmesh_api::proto::{self, JoinRequest, PrepareJoinRequest};
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::TrustBundle;
use hostmesh_controller::config::ControllerConfig;
use hostmesh_meshd::identity::Identity;
use hostmesh_meshd::identity::join::{JoinArgs, JoinError, JoinOutcome, join};
use hostmesh_meshd::identity::store::{Owner, StateDir};
use tonic::transport::Channel;

const GROUPS: &str = "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80, targetPort: 8080}]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: web, namespace: shop}\nspec: {services: [web]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: db, namespace: shop}\nspec: {identity: database}\n";

use hostmesh_tests::inproc::Mesh;

async fn mesh_with(clock: SharedClock, tweak: impl FnOnce(&mut ControllerConfig)) -> Mesh {
    hostmesh_tests::inproc::mesh_with(clock, GROUPS, tweak).await
}

async fn mesh() -> Mesh {
    mesh_with(hostmesh_api::clock::system(), |_| {}).await
}

async fn token(m: &mut Mesh, group: &str, uses: u32, ttl_s: u64) -> proto::CreateTokenResponse {
    m.token(group, uses, ttl_s).await
}

fn args(m: &Mesh, token: &str, pin: &str, state: &Path) -> JoinArgs {
    m.join_args(token, pin, state)
}

async fn joins_metric(m: &Mesh, result: &str) -> u64 {
    let addr = m.ctl.metrics_addr.to_string();
    let (_, body) =
        tokio::task::spawn_blocking(move || hostmesh_tests::http_get(&addr, "/metrics").unwrap())
            .await
            .unwrap();
    body.lines()
        .find(|l| {
            l.starts_with("hostmesh_controller_joins_total{")
                && l.contains(&format!("result=\"{result}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn unauthenticated(e: &JoinError) -> bool {
    e.to_string().contains("join token is not valid")
}

#[tokio::test]
async fn a_host_joins_and_its_certificate_is_accepted_as_its_identity() {
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let state = m.dir.path().join("host");
    let outcome = join(args(&m, &t.token, &t.ca_hash, &state), 0)
        .await
        .unwrap();
    let JoinOutcome::Joined(host) = outcome else {
        panic!("not joined")
    };
    assert_eq!(host.spiffe_id, "spiffe://hostmesh.local/ns/shop/sa/web");
    assert!(host.host_id.starts_with("web-"), "{}", host.host_id);

    // The key never left: the certificate is for the key on disk.
    let key_pem = std::fs::read_to_string(state.join("key.pem")).unwrap();
    let chain = pki::certs_from_pem(
        &std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        "cert",
    )
    .unwrap();
    let info = CertInfo::parse(&chain[0]).unwrap();
    use rcgen::PublicKeyData;
    assert_eq!(
        info.spki_pin,
        pki::sha256_pin(
            &rcgen::KeyPair::from_pem(&key_pem)
                .unwrap()
                .subject_public_key_info()
        )
    );
    assert_eq!(info.common_name.as_deref(), Some(host.host_id.as_str()));
    assert_eq!(
        info.not_after_unix - info.not_before_unix,
        24 * 3600 + 300,
        "24h (+5m backdate)"
    );

    // The controller created the Workload.
    let wl = m
        .admin
        .get(proto::GetRequest {
            kind: "workload".into(),
            namespace: "shop".into(),
            name: host.host_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(wl.json.contains("\"group\":\"web\""), "{}", wl.json);

    // An mTLS call with the issued certificate, accepted as that identity:
    // a renewal answers with a certificate for the same host and identity.
    let identity = hostmesh_tests::inproc::load_identity(&state);
    identity
        .renew(identity.controller_channel().unwrap())
        .await
        .unwrap();
    let renewed = identity.cert_info();
    assert_eq!(renewed.spiffe_id, info.spiffe_id);
    assert_eq!(renewed.common_name, info.common_name);
    assert_ne!(renewed.serial_hex, info.serial_hex);

    // Joining again changes nothing without --force.
    let again = join(args(&m, &t.token, &t.ca_hash, &state), 0)
        .await
        .unwrap();
    assert!(matches!(again, JoinOutcome::AlreadyJoined(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshd_join_on_a_joined_host_says_so_and_changes_nothing_without_force() {
    let mut m = mesh().await;
    let first = token(&mut m, "shop/web", 1, 3600).await;
    let second = token(&mut m, "shop/web", 1, 3600).await;
    let state = m.dir.path().join("host");
    let files = ["key.pem", "cert.pem", "bundle.pem", "host.json"];
    let url = m.url.clone();
    let meshd_join = |t: &proto::CreateTokenResponse, force: bool| {
        let mut c = std::process::Command::new(hostmesh_tests::bin("meshd"));
        c.args(["join", "--controller", &url, "--ca-hash", &t.ca_hash])
            .arg("--state-dir")
            .arg(&state)
            .args(["--user", "root", "--token-file", "-"])
            .env_remove("HOSTMESH_JOIN_TOKEN");
        if force {
            c.arg("--force");
        }
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{}\n", t.token).as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = tokio::task::block_in_place(|| meshd_join(&first, false));
    assert!(out.status.success(), "{}", hostmesh_tests::stderr_of(&out));
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(state.join(f)).unwrap())
        .collect();

    let out = tokio::task::block_in_place(|| meshd_join(&second, false));
    let said = hostmesh_tests::stderr_of(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("has already joined") && said.contains("--force"),
        "{said}"
    );
    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(state.join(f)).unwrap())
        .collect();
    assert!(before == after, "the state files did not change");
    let uses_left = |list: &proto::ListTokensResponse| {
        list.tokens
            .iter()
            .find(|t| Some(&t.id) == second.info.as_ref().map(|i| &i.id))
            .map(|t| t.uses_left)
    };
    let list = m.tokens().await;
    assert_eq!(uses_left(&list), Some(1), "the second token was not spent");

    // With --force it joins again: a new key, a new host.
    let out = tokio::task::block_in_place(|| meshd_join(&second, true));
    assert!(out.status.success(), "{}", hostmesh_tests::stderr_of(&out));
    assert_ne!(std::fs::read(state.join("key.pem")).unwrap(), before[0]);
    assert_ne!(std::fs::read(state.join("host.json")).unwrap(), before[3]);
}

#[tokio::test]
async fn a_host_certificate_cannot_make_operator_calls() {
    let mut m = mesh().await;
    let identity = m.joined_host("shop/web", &m.dir.path().join("host")).await;
    // The host's own mTLS channel to the controller (the one it renews and
    // streams on) is refused every operator call.
    let mut op = OperatorClient::new(identity.controller_channel().unwrap());
    let apply = op
        .apply(proto::ApplyRequest {
            resources: vec![proto::Resource {
                json: r#"{"apiVersion":"hostmesh/v1","kind":"Service","metadata":{"name":"evil","namespace":"shop"},"spec":{"ports":[{"port":81}]}}"#.into(),
                ..Default::default()
            }],
            dry_run: false,
        })
        .await
        .unwrap_err();
    let list = op
        .list(proto::ListRequest {
            kind: "workloads".into(),
            namespace: String::new(),
        })
        .await
        .unwrap_err();
    let host_id = identity.host().host_id.clone();
    let delete = op
        .delete(proto::DeleteRequest {
            kind: "workload".into(),
            namespace: "shop".into(),
            name: host_id.clone(),
        })
        .await
        .unwrap_err();
    let token = op
        .create_token(proto::CreateTokenRequest {
            group: "shop/web".into(),
            ttl_seconds: 60,
            uses: 1,
            description: String::new(),
        })
        .await
        .unwrap_err();
    for e in [&apply, &list, &delete, &token] {
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
    // Nothing of it happened.
    let wl = m
        .admin
        .get(proto::GetRequest {
            kind: "workload".into(),
            namespace: "shop".into(),
            name: host_id,
        })
        .await;
    assert!(wl.is_ok(), "the host's Workload is still there");
    let svc = m
        .admin
        .get(proto::GetRequest {
            kind: "service".into(),
            namespace: "shop".into(),
            name: "evil".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(svc.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn key_file_mode_and_owner() {
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let state = m.dir.path().join("host");
    // "nobody" exists on every Debian machine; meshd join chowns to the
    // user meshd runs as.
    let nobody = hostmesh_meshd::identity::store::lookup_user("nobody").expect("user nobody");
    let mut a = args(&m, &t.token, &t.ca_hash, &state);
    a.state = StateDir::new(
        &state,
        Some(Owner {
            uid: nobody.uid,
            gid: nobody.gid,
        }),
    );
    join(a, 0).await.unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let key = std::fs::metadata(state.join("key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert_eq!((key.uid(), key.gid()), (nobody.uid, nobody.gid));
    let dir = std::fs::metadata(&state).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    assert_eq!(dir.uid(), nobody.uid);
}

#[tokio::test]
async fn expired_used_up_and_revoked_tokens_are_refused_alike() {
    let clock = ManualClock::new(SystemTime::now());
    let mut m = mesh_with(clock.clone(), |_| {}).await;
    let expiring = token(&mut m, "shop/web", 5, 60).await;
    let once = token(&mut m, "shop/web", 1, 3600).await;
    let revoked = token(&mut m, "shop/web", 5, 3600).await;
    m.admin
        .revoke_token(proto::RevokeTokenRequest {
            id: revoked.info.clone().unwrap().id,
        })
        .await
        .unwrap();

    join(
        args(&m, &once.token, &once.ca_hash, &m.dir.path().join("h1")),
        0,
    )
    .await
    .unwrap();
    let used_up = join(
        args(&m, &once.token, &once.ca_hash, &m.dir.path().join("h2")),
        0,
    )
    .await
    .unwrap_err();
    let rev = join(
        args(
            &m,
            &revoked.token,
            &revoked.ca_hash,
            &m.dir.path().join("h3"),
        ),
        0,
    )
    .await
    .unwrap_err();
    clock.advance(Duration::from_secs(120));
    let expired = join(
        args(
            &m,
            &expiring.token,
            &expiring.ca_hash,
            &m.dir.path().join("h4"),
        ),
        0,
    )
    .await
    .unwrap_err();
    let unknown_secret = format!("{}{}", &once.token[..once.token.len() - 4], "0000");
    let wrong = join(
        args(&m, &unknown_secret, &once.ca_hash, &m.dir.path().join("h5")),
        0,
    )
    .await
    .unwrap_err();
    // A token id that never existed, and a token that is not even shaped
    // like one.
    let no_such_id = join(
        args(
            &m,
            &format!("hm1.000000000000.{}", "0".repeat(64)),
            &once.ca_hash,
            &m.dir.path().join("h6"),
        ),
        0,
    )
    .await
    .unwrap_err();
    let malformed = join(
        args(&m, "hm1.zz", &once.ca_hash, &m.dir.path().join("h7")),
        0,
    )
    .await
    .unwrap_err();
    // The same words every time: nothing tells which check failed, nor
    // whether the token id exists.
    for e in [&used_up, &rev, &expired, &wrong, &no_such_id, &malformed] {
        assert!(unauthenticated(e), "{e}");
        assert_eq!(e.to_string(), used_up.to_string());
    }
    assert!(
        !m.dir.path().join("h2/key.pem").exists(),
        "a refused join stores nothing"
    );
    let list = m.tokens().await;
    let left: Vec<u32> = list.tokens.iter().map(|t| t.uses_left).collect();
    assert!(left.contains(&0), "the one-use token is used up: {left:?}");
    assert!(list.tokens.iter().any(|t| t.revoked));
}

#[tokio::test]
async fn two_hosts_racing_for_the_last_use_one_wins() {
    let mut m = mesh().await;
    for round in 0..5 {
        let t = token(&mut m, "shop/web", 1, 3600).await;
        let a = join(
            args(
                &m,
                &t.token,
                &t.ca_hash,
                &m.dir.path().join(format!("r{round}a")),
            ),
            0,
        );
        let b = join(
            args(
                &m,
                &t.token,
                &t.ca_hash,
                &m.dir.path().join(format!("r{round}b")),
            ),
            0,
        );
        let (ra, rb) = tokio::join!(a, b);
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|x| **x).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = match (ra, rb) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            _ => unreachable!("exactly one won"),
        };
        assert!(unauthenticated(&loser), "{loser}");
    }
    let workloads = m
        .admin
        .list(proto::ListRequest {
            kind: "workloads".into(),
            namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(workloads.items.len(), 5);
}

#[tokio::test]
async fn many_joins_on_one_token_spend_exactly_its_uses() {
    // An Ansible run with many forks sharing one token: every use goes to
    // exactly one host, nobody is told "aborted", the rest are refused.
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 20, 3600).await;
    let joins = (0..24).map(|i| {
        join(
            args(
                &m,
                &t.token,
                &t.ca_hash,
                &m.dir.path().join(format!("many{i}")),
            ),
            0,
        )
    });
    let results = futures::future::join_all(joins).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(ok, 20, "refused: {refused:?}");
    for (e, r) in results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .zip(&refused)
    {
        assert!(unauthenticated(e), "{r}");
    }
    let ids: std::collections::BTreeSet<String> = results
        .iter()
        .filter_map(|r| match r {
            Ok(JoinOutcome::Joined(h)) => Some(h.host_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 20, "every host got its own id");
    let list = m.tokens().await;
    assert_eq!(list.tokens[0].uses_left, 0);
}

#[tokio::test]
async fn a_wrong_ca_hash_stops_before_the_token_is_sent() {
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let refused_before = joins_metric(&m, "refused").await;
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let e = join(args(&m, &t.token, &wrong, &m.dir.path().join("h")), 0)
        .await
        .unwrap_err();
    assert!(matches!(e, JoinError::PinMismatch { .. }), "{e}");
    assert!(e.to_string().contains("refusing to send the token"), "{e}");
    // The controller never saw the token: no refusal counted, and the
    // one-use token still works.
    assert_eq!(joins_metric(&m, "refused").await, refused_before);
    assert_eq!(joins_metric(&m, "ok").await, 0);
    join(args(&m, &t.token, &t.ca_hash, &m.dir.path().join("h")), 0)
        .await
        .unwrap();
}

/// The identity RPCs with a channel that trusts the pinned CA, as meshd
/// join builds it.
async fn identity_client(m: &Mesh) -> IdentityClient<Channel> {
    let cred = hostmesh_controller::admin_conf::AdminCredential::load(
        &m.dir.path().join("ctl/admin.conf"),
    )
    .unwrap();
    let bundle = TrustBundle::from_pem(&cred.trust_domain, &cred.ca_bundle, "bundle").unwrap();
    IdentityClient::new(hostmesh_api::connect::channel(&m.url, bundle, None, None).unwrap())
}

#[tokio::test]
async fn a_csr_for_another_groups_identity_is_refused() {
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let mut client = identity_client(&m).await;
    let prepared = client
        .prepare_join(PrepareJoinRequest {
            token: t.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prepared.spiffe_id, "spiffe://hostmesh.local/ns/shop/sa/web");
    let key = pki::generate_key().unwrap();
    let other: SpiffeId = "spiffe://hostmesh.local/ns/shop/sa/database"
        .parse()
        .unwrap();
    let csr = pki::build_csr(&key, &other, "evil").unwrap();
    let e = client
        .join(JoinRequest {
            token: t.token.clone(),
            csr_pem: csr,
            hostname: "evil".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("asks for identity spiffe://hostmesh.local/ns/shop/sa/database"),
        "{}",
        e.message()
    );
    // The token was not spent on the refused request.
    join(args(&m, &t.token, &t.ca_hash, &m.dir.path().join("h")), 0)
        .await
        .unwrap();
}

#[tokio::test]
async fn brute_forcing_tokens_is_rate_limited() {
    let mut m = mesh_with(hostmesh_api::clock::system(), |c| c.join.max_failures = 3).await;
    let good = token(&mut m, "shop/web", 1, 3600).await;
    let mut client = identity_client(&m).await;
    for i in 0..3 {
        let guess = format!("hm1.{:012x}.{}", i, "0".repeat(64));
        let e = client
            .prepare_join(PrepareJoinRequest { token: guess })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    // Past the limit even a good token is refused from this address.
    let e = client
        .prepare_join(PrepareJoinRequest {
            token: good.token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("too many failed join attempts from 127.0.0.1"),
        "{}",
        e.message()
    );
    assert!(joins_metric(&m, "rate_limited").await >= 1);
}

#[tokio::test]
async fn renewal_happens_at_half_life_by_the_injected_clock() {
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let state = m.dir.path().join("host");
    join(args(&m, &t.token, &t.ca_hash, &state), 0)
        .await
        .unwrap();
    let host_clock = ManualClock::new(SystemTime::now());
    let identity =
        Identity::load(StateDir::new(&state, None), host_clock.clone(), None, None).unwrap();
    let first = identity.cert_info();
    let due = identity.renewal_at();
    let lifetime = first.not_after_unix - first.not_before_unix;
    assert!(
        due >= first.not_before_unix + lifetime / 2
            && due <= first.not_before_unix + lifetime * 6 / 10
    );

    // Just before: nothing happens.
    host_clock.set(hostmesh_api::clock::from_unix_seconds(due - 1));
    assert!(
        !identity
            .renew_if_due(identity.controller_channel().unwrap())
            .await
            .unwrap()
    );
    assert_eq!(identity.cert_info().serial_hex, first.serial_hex);
    // At the time: a new certificate, for a new key, in use and on disk.
    host_clock.set(hostmesh_api::clock::from_unix_seconds(due));
    assert!(
        identity
            .renew_if_due(identity.controller_channel().unwrap())
            .await
            .unwrap()
    );
    let second = identity.cert_info();
    assert_ne!(second.serial_hex, first.serial_hex);
    assert_ne!(second.spki_pin, first.spki_pin, "a fresh key each renewal");
    let on_disk = pki::certs_from_pem(
        &std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        "c",
    )
    .unwrap();
    assert_eq!(
        CertInfo::parse(&on_disk[0]).unwrap().serial_hex,
        second.serial_hex
    );
    let next = identity.renewal_at();
    let life = second.not_after_unix - second.not_before_unix;
    assert!(
        next >= second.not_before_unix + life / 2 && next <= second.not_before_unix + life * 6 / 10,
        "the next renewal is scheduled from the new certificate"
    );
}

#[tokio::test]
async fn a_deleted_workload_cannot_renew_or_stream() {
    let mut m = mesh().await;
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let state = m.dir.path().join("host");
    let JoinOutcome::Joined(host) = join(args(&m, &t.token, &t.ca_hash, &state), 0)
        .await
        .unwrap()
    else {
        panic!()
    };
    m.admin
        .delete(proto::DeleteRequest {
            kind: "workload".into(),
            namespace: "shop".into(),
            name: host.host_id.clone(),
        })
        .await
        .unwrap();
    let identity = hostmesh_tests::inproc::load_identity(&state);
    let e = identity
        .renew(identity.controller_channel().unwrap())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("has been removed from the mesh"),
        "{e}"
    );
    // The config stream is refused too.
    let mut hosts =
        hostmesh_api::proto::hosts_client::HostsClient::new(identity.controller_channel().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let e = hosts.session(tokio_stream_of(rx)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

fn tokio_stream_of(
    rx: tokio::sync::mpsc::Receiver<proto::HostMessage>,
) -> impl futures::Stream<Item = proto::HostMessage> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

#[tokio::test]
async fn ca_rotation_keeps_both_roots_during_the_overlap_and_drops_the_old_after() {
    let clock = ManualClock::new(SystemTime::now());
    let mut m = mesh_with(clock.clone(), |_| {}).await;
    let t = token(&mut m, "shop/web", 2, 3600).await;
    let old_host = m.dir.path().join("old");
    join(args(&m, &t.token, &t.ca_hash, &old_host), 0)
        .await
        .unwrap();
    let old_id = hostmesh_tests::inproc::load_identity(&old_host);
    let old_issuer = old_id.cert_info().issuer;

    // 1. Add a root: trusted, not issuing.
    let added = m
        .admin
        .ca_add_root(proto::CaAddRootRequest {})
        .await
        .unwrap()
        .into_inner();
    let roots = m
        .admin
        .ca_list(proto::CaListRequest {})
        .await
        .unwrap()
        .into_inner()
        .roots;
    assert_eq!(roots.len(), 2);
    // Hosts learn the new bundle before it issues (meshd gets it on its
    // config stream; here the host fetches it over its trusted channel).
    let bundle_pem = identity_client(&m)
        .await
        .get_trust_bundle(proto::TrustBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .roots_pem;
    assert!(
        old_id.set_bundle(&bundle_pem).unwrap(),
        "the bundle changed"
    );
    // 2. Activate it: new certificates come from it; the old host still
    //    works with its old certificate (both roots trusted).
    m.admin
        .ca_activate(proto::CaActivateRequest {
            id: added.id.clone(),
        })
        .await
        .unwrap();
    hostmesh_tests::eventually_async(
        "the controller to serve from the new root",
        Duration::from_secs(10),
        || {
            let old_id = &old_id;
            let old_issuer = old_issuer.clone();
            async move {
                // The old host renews with its old certificate; what it gets is
                // issued by the new root.
                old_id
                    .renew(old_id.controller_channel().map_err(|e| e.to_string())?)
                    .await
                    .map_err(|e| e.to_string())?;
                let now = old_id.cert_info().issuer;
                if now == old_issuer {
                    Err("still the old issuer".into())
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
    let old_root = roots.iter().find(|r| r.id != added.id).unwrap().id.clone();
    // A second host joins under the new root with a pin for it.
    let new_host = m.dir.path().join("new");
    let fresh = token(&mut m, "shop/web", 1, 3600).await;
    assert_eq!(
        fresh.ca_hash, added.spki_sha256,
        "tokens pin the active root"
    );
    join(args(&m, &fresh.token, &fresh.ca_hash, &new_host), 0)
        .await
        .unwrap();

    // 3. Removing the old root is refused while its certificates may live.
    let e = m
        .admin
        .ca_remove_root(proto::CaRemoveRootRequest {
            id: old_root.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("stay valid until"), "{}", e.message());
    // After the last of them has expired it goes.
    clock.advance(Duration::from_secs(24 * 3600 + 600));
    let after = m
        .admin
        .ca_remove_root(proto::CaRemoveRootRequest {
            id: old_root.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.roots.len(), 1);
    assert_eq!(after.roots[0].id, added.id);
    // (Checked in-process: the controller's clock is 24h ahead of real
    // time now, so its freshly issued serving certificate is "not yet
    // valid" for a real-time TLS client.)
    let bundle = m.ctl.shared.ca.bundle();
    assert_eq!(
        bundle.roots_der.len(),
        1,
        "the old root is no longer trusted"
    );
}

/// An operator's offline root and an intermediate it signed for hostmesh,
/// as PEM: (intermediate cert, intermediate key, root cert).
fn operator_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let ca_params = |cn: &str, constraint: BasicConstraints| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(constraint);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root = ca_params("Example Corp Root", BasicConstraints::Unconstrained)
        .self_signed(&root_key)
        .unwrap();
    let issuer = rcgen::Issuer::new(
        ca_params("Example Corp Root", BasicConstraints::Unconstrained),
        root_key,
    );
    let int_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate = ca_params("hostmesh intermediate", BasicConstraints::Constrained(0))
        .signed_by(&int_key, &issuer)
        .unwrap();
    (intermediate.pem(), int_key.serialize_pem(), root.pem())
}

#[tokio::test]
async fn an_operator_supplied_intermediate_issues_and_its_root_is_the_bundle() {
    let (int_pem, int_key, root_pem) = operator_pki();
    let pki_dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = pki_dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    // The chain file: the issuing certificate first, then its root.
    let chain_file = write("hostmesh-ca.pem", &format!("{int_pem}{root_pem}"));
    let key_file = write("hostmesh-ca.key", &int_key);
    let bundle_file = write("root.pem", &root_pem);
    let mut m = mesh_with(hostmesh_api::clock::system(), |c| {
        c.ca.cert_file = chain_file.clone();
        c.ca.key_file = key_file.clone();
        c.ca.bundle_file = bundle_file.clone();
    })
    .await;

    // The CA hash a join pins is the operator's root.
    let t = token(&mut m, "shop/web", 1, 3600).await;
    let root_der = pki::certs_from_pem(&root_pem, "root").unwrap();
    let root_info = CertInfo::parse(&root_der[0]).unwrap();
    assert_eq!(
        t.ca_hash, root_info.spki_pin,
        "the join pins the operator root"
    );

    let state = m.dir.path().join("host");
    join(args(&m, &t.token, &t.ca_hash, &state), 0)
        .await
        .unwrap();
    // The host holds leaf + intermediate, and trusts exactly the root.
    let chain = pki::certs_from_pem(
        &std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        "cert",
    )
    .unwrap();
    assert_eq!(chain.len(), 2, "leaf and intermediate, never the root");
    let int_der = pki::certs_from_pem(&int_pem, "int").unwrap();
    assert_eq!(chain[1], int_der[0]);
    let bundle = pki::certs_from_pem(
        &std::fs::read_to_string(state.join("bundle.pem")).unwrap(),
        "bundle",
    )
    .unwrap();
    assert_eq!(bundle, root_der);
    let leaf = CertInfo::parse(&chain[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id.map(|s| s.to_string()).as_deref(),
        Some("spiffe://hostmesh.local/ns/shop/sa/web")
    );

    // A real mTLS call: the controller verifies the host's chain up to the
    // operator root and renews it from the intermediate.
    let identity = hostmesh_tests::inproc::load_identity(&state);
    identity
        .renew(identity.controller_channel().unwrap())
        .await
        .unwrap();
    assert_ne!(identity.cert_info().serial_hex, leaf.serial_hex);

    // Roots are the operator's business: the controller will not generate
    // one next to them.
    let e = m
        .admin
        .ca_add_root(proto::CaAddRootRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let roots = m
        .admin
        .ca_list(proto::CaListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(roots.roots.len(), 1);
    assert_eq!(roots.roots[0].origin, "external");
}

#[tokio::test]
async fn a_generated_root_key_is_sealed_in_the_store() {
    let m = mesh().await;
    let dir = m.dir.path();
    // What the store holds under ca/: the root certificate in the clear,
    // its key only sealed with the key-encryption key (which lives in a
    // file on the controller host, not in the store).
    let prefix = m.ctl.shared.config.store_prefix.clone();
    let listed = m.ctl.shared.store.list(&prefix).await.unwrap();
    let ca: Vec<_> = listed
        .kvs
        .iter()
        .filter(|kv| kv.key.contains("/ca/"))
        .collect();
    assert!(!ca.is_empty(), "the CA lives in the store");
    let everything: Vec<u8> = listed.kvs.iter().flat_map(|kv| kv.value.to_vec()).collect();
    let text = String::from_utf8_lossy(&everything);
    assert!(text.contains("BEGIN CERTIFICATE"), "the root certificate");
    assert!(
        !text.contains("PRIVATE KEY"),
        "no private key in the clear in the store"
    );
    let kek = std::fs::read(dir.join("ctl/ca.kek")).unwrap();
    assert!(
        !everything
            .windows(kek.len().min(16))
            .any(|w| w == &kek[..kek.len().min(16)]),
        "nor the key-encryption key"
    );
}
