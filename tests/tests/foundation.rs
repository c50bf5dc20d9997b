//! The foundation end to end: controllers over real etcd, driven by the
//! real `meshctl`.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use hostmesh_meshd::identity::Identity;
use hostmesh_meshd::identity::store::StateDir;
use hostmesh_tests::{ControllerProc, EtcdCluster, bin, json, output, stderr_of, stdout_of};

const EVERY_KIND: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop, labels: {tier: front}}
spec:
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: http}
  mtls: strict
  vip: 240.240.0.10
---
apiVersion: hostmesh/v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  ports: [{port: 5432}]
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: web, namespace: shop}
spec:
  identity: web
  labels: {app: web, version: v1}
  services: [web]
---
apiVersion: hostmesh/v1
kind: Route
metadata: {name: web-canary, namespace: shop}
spec:
  service: web
  rules:
    - match: {pathPrefix: /api, headers: {x-canary: "1"}, methods: [GET]}
      backends: [{subset: {version: v2}, weight: 100}]
      timeout: 2s
      retries: {attempts: 3, perTryTimeout: 500ms, on: [5xx, reset, connect-failure]}
    - backends: [{subset: {version: v1}, weight: 90}, {subset: {version: v2}, weight: 10}]
---
apiVersion: hostmesh/v1
kind: Policy
metadata: {name: web-allow, namespace: shop}
spec:
  service: web
  action: allow
  rules:
    - from: [{identity: "spiffe://hostmesh.local/ns/shop/sa/frontend"}, {namespace: ops}]
      to: [{methods: [GET], paths: ["/api/*"], ports: [80]}]
"#;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn apply_get_round_trip_and_atomic_refusal_over_etcd() {
    let rt = rt();
    let etcd = rt.block_on(EtcdCluster::start(1));
    let dir = tempfile::tempdir().unwrap();
    let store = format!("etcd://{}", etcd.endpoints().join(","));
    let ctl = ControllerProc::start(dir.path(), "ctl", &store, "");

    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, EVERY_KIND).unwrap();
    let out = ctl.meshctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    for line in [
        "Service shop/web created",
        "Service shop/db created",
        "WorkloadGroup shop/web created",
        "Route shop/web-canary created",
        "Policy shop/web-allow created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Applying the same file again changes nothing.
    let again = ctl.meshctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(again.matches("unchanged").count(), 5, "{again}");

    // get -o yaml of every kind, applied back, is unchanged; and it holds
    // what was applied, field for field (apart from the allocated VIP and
    // the store's revision).
    let applied = hostmesh_api::document::parse_documents(EVERY_KIND).unwrap();
    let mut compared = 0;
    for kind in ["services", "workloadgroups", "routes", "policies"] {
        let yaml = ctl.meshctl_ok(&["get", kind, "-o", "yaml"]);
        for got in hostmesh_api::document::parse_documents(&yaml).unwrap() {
            let want = applied
                .iter()
                .find(|r| r.key() == got.key())
                .unwrap_or_else(|| panic!("{} was not applied", got.key()));
            let mut got_json = json(&got.without_store_fields().to_json());
            let want_json = json(&want.to_json());
            if want_json["kind"] == "Service"
                && want_json["spec"].get("vip").is_none_or(|v| v.is_null())
            {
                got_json["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("vip")
                    .expect("an allocated VIP");
            }
            assert_eq!(
                got_json,
                want_json,
                "{} differs after the round trip",
                got.key()
            );
            compared += 1;
        }
        let path = dir.path().join(format!("{kind}.yaml"));
        std::fs::write(&path, &yaml).unwrap();
        let back = ctl.meshctl_ok(&["apply", "-f", path.to_str().unwrap()]);
        assert!(
            !back.contains("created") && !back.contains("configured"),
            "{kind}: {back}"
        );
        let as_json = ctl.meshctl_ok(&["get", kind, "-o", "json"]);
        let items = json(&as_json)["items"].as_array().cloned().unwrap();
        assert!(!items.is_empty(), "{kind}");
    }
    assert_eq!(compared, applied.len(), "every applied resource came back");
    let web = json(&ctl.meshctl_ok(&["get", "service", "web", "-n", "shop", "-o", "json"]));
    assert_eq!(web["spec"]["vip"], "240.240.0.10");
    assert_eq!(web["spec"]["ports"][0]["targetPort"], 8080);
    let db = json(&ctl.meshctl_ok(&["get", "service", "db", "-n", "shop", "-o", "json"]));
    let db_vip = db["spec"]["vip"].as_str().unwrap().to_string();
    assert!(db_vip.starts_with("240.240."), "allocated VIP {db_vip}");
    let route = json(&ctl.meshctl_ok(&["get", "route", "web-canary", "-n", "shop", "-o", "json"]));
    assert_eq!(
        route["spec"]["rules"][0]["retries"]["perTryTimeout"],
        "500ms"
    );

    // One bad document refuses the whole apply, naming the field.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: fine, namespace: shop}\nspec: {ports: [{port: 81}]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: also-fine, namespace: shop}\nspec: {services: [fine]}\n---\napiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: broken, namespace: shop}\nspec:\n  ports:\n    - {port: 80}\n    - {port: 70000}\n",
    )
    .unwrap();
    let out = ctl.meshctl(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert_eq!(
        err.trim(),
        format!(
            "meshctl: error: {}: document 3: Service shop/broken: spec.ports[1].port: 70000 is not a port number",
            bad.display()
        )
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let names = ctl.meshctl_ok(&["get", "services", "-n", "shop", "-o", "json"]);
    assert!(
        !names.contains("\"fine\""),
        "nothing of a refused apply is stored: {names}"
    );
    let groups = ctl.meshctl_ok(&["get", "workloadgroups", "-n", "shop", "-o", "json"]);
    assert!(!groups.contains("also-fine"), "{groups}");

    // The server refuses too (a client that skips local checks), e.g. a
    // VIP outside the range, and a Route to a missing service.
    let server_side = dir.path().join("server.yaml");
    std::fs::write(
        &server_side,
        "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: x, namespace: shop}\nspec: {ports: [{port: 1}], vip: 10.0.0.1}\n",
    )
    .unwrap();
    let out = ctl.meshctl(&["apply", "-f", server_side.to_str().unwrap()]);
    assert!(
        stderr_of(&out).contains("spec.vip: 10.0.0.1 is outside the service range 240.240.0.0/16"),
        "{}",
        stderr_of(&out)
    );
    // Valid documents, one Route to a Service that is nowhere: refused by
    // the server's reference check, and none of the apply is stored.
    std::fs::write(
        &server_side,
        "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: kept-out, namespace: shop}\nspec: {ports: [{port: 82}]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: kept-out, namespace: shop}\nspec: {services: [kept-out]}\n---\napiVersion: hostmesh/v1\nkind: Route\nmetadata: {name: r, namespace: shop}\nspec: {service: nope, rules: [{backends: [{weight: 1}]}]}\n",
    )
    .unwrap();
    let out = ctl.meshctl(&["apply", "-f", server_side.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("spec.service: Service shop/nope does not exist"),
        "{}",
        stderr_of(&out)
    );
    for kind in ["service", "workloadgroup"] {
        let out = ctl.meshctl(&["get", kind, "kept-out", "-n", "shop"]);
        assert!(!out.status.success(), "{kind} kept-out was stored");
    }
    // A VIP that another Service holds, over etcd.
    std::fs::write(
        &server_side,
        "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: squatter, namespace: shop}\nspec: {ports: [{port: 1}], vip: 240.240.0.10}\n",
    )
    .unwrap();
    let out = ctl.meshctl(&["apply", "-f", server_side.to_str().unwrap()]);
    assert_eq!(
        stderr_of(&out).trim(),
        "meshctl: error: Service shop/squatter: spec.vip: 240.240.0.10 is already allocated to Service shop/web"
    );

    // Delete, with the VIP freed for reuse.
    ctl.meshctl_ok(&["delete", "service", "db", "-n", "shop"]);
    let out = ctl.meshctl(&["get", "service", "db", "-n", "shop"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("Service shop/db not found"),
        "{}",
        stderr_of(&out)
    );
}

/// One etcd member, and what controller replicas over it share: the store
/// URL and a config naming one key-encryption key file (every replica needs
/// the same one for the shared CA).
fn replicas_setup() -> (
    tokio::runtime::Runtime,
    EtcdCluster,
    tempfile::TempDir,
    String,
    String,
) {
    let rt = rt();
    let etcd = rt.block_on(EtcdCluster::start(1));
    let dir = tempfile::tempdir().unwrap();
    let store = format!("etcd://{}", etcd.endpoints().join(","));
    let kek = dir.path().join("ca.kek");
    let extra = format!("[ca]\nkek_file = {:?}\n", kek.display().to_string());
    (rt, etcd, dir, store, extra)
}

#[test]
fn two_replicas_over_one_etcd_store_every_service_once_with_unique_vips() {
    let (rt, etcd, dir, store, extra) = replicas_setup();
    let a = ControllerProc::start(dir.path(), "a", &store, &extra);
    let b = ControllerProc::start(dir.path(), "b", &store, &extra);

    let mut yaml = String::new();
    for i in 0..200 {
        yaml.push_str(&format!(
            "---\napiVersion: hostmesh/v1\nkind: Service\nmetadata: {{name: s{i}, namespace: load}}\nspec: {{ports: [{{port: 80}}]}}\n"
        ));
    }
    let file = dir.path().join("many.yaml");
    std::fs::write(&file, yaml).unwrap();
    // The same 200 Services through both replicas at once.
    let spawn = |c: &ControllerProc| {
        Command::new(bin("meshctl"))
            .arg("--credentials")
            .arg(&c.admin_conf)
            .args(["apply", "-f", file.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (spawn(&a), spawn(&b));
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    assert!(oa.status.success(), "{}", stderr_of(&oa));
    assert!(ob.status.success(), "{}", stderr_of(&ob));
    let created =
        stdout_of(&oa).matches("created").count() + stdout_of(&ob).matches("created").count();
    assert_eq!(
        created, 200,
        "each Service created exactly once across both replicas"
    );

    for c in [&a, &b] {
        let list = json(&c.meshctl_ok(&["get", "services", "-n", "load", "-o", "json"]));
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 200);
        let vips: HashSet<&str> = items
            .iter()
            .map(|s| s["spec"]["vip"].as_str().unwrap())
            .collect();
        assert_eq!(vips.len(), 200, "no duplicate VIP");
    }
    // The store holds exactly one reservation per VIP.
    let reservations = rt.block_on(async {
        let store = etcd.shared_store().await;
        store.list("/hostmesh/vips/").await.unwrap().kvs.len()
    });
    assert_eq!(reservations, 200);

    // Different Services through each replica at once: still unique.
    let mut ya = String::new();
    let mut yb = String::new();
    for i in 0..100 {
        ya.push_str(&format!("---\napiVersion: hostmesh/v1\nkind: Service\nmetadata: {{name: a{i}, namespace: split}}\nspec: {{ports: [{{port: 80}}]}}\n"));
        yb.push_str(&format!("---\napiVersion: hostmesh/v1\nkind: Service\nmetadata: {{name: b{i}, namespace: split}}\nspec: {{ports: [{{port: 80}}]}}\n"));
    }
    let (fa, fb) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    std::fs::write(&fa, ya).unwrap();
    std::fs::write(&fb, yb).unwrap();
    let ta = {
        let (cred, f) = (a.admin_conf.clone(), fa.clone());
        std::thread::spawn(move || {
            output(
                Command::new(bin("meshctl"))
                    .arg("--credentials")
                    .arg(cred)
                    .args(["apply", "-f"])
                    .arg(f),
            )
        })
    };
    let tb = {
        let (cred, f) = (b.admin_conf.clone(), fb.clone());
        std::thread::spawn(move || {
            output(
                Command::new(bin("meshctl"))
                    .arg("--credentials")
                    .arg(cred)
                    .args(["apply", "-f"])
                    .arg(f),
            )
        })
    };
    assert!(ta.join().unwrap().status.success());
    assert!(tb.join().unwrap().status.success());
    let list = json(&a.meshctl_ok(&["get", "services", "-o", "json"]));
    let vips: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spec"]["vip"].as_str().unwrap())
        .collect();
    let unique: HashSet<&&str> = vips.iter().collect();
    assert_eq!(vips.len(), 400);
    assert_eq!(
        unique.len(),
        400,
        "no duplicate VIP across concurrent replicas"
    );
    // Both replicas share one CA.
    let ca_a = json(&a.meshctl_ok(&["ca", "list", "-o", "json"]));
    let ca_b = json(&b.meshctl_ok(&["ca", "list", "-o", "json"]));
    assert_eq!(ca_a, ca_b);
    assert_eq!(ca_a["items"].as_array().unwrap().len(), 1);

    // One CA and one token store in practice: a token minted on a, pinning
    // the shared root, is spent through b; the certificate b issues is then
    // accepted by a for a renewal.
    let group = dir.path().join("group.yaml");
    std::fs::write(
        &group,
        "apiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: web, namespace: load}\nspec: {labels: {app: web}, services: [s0]}\n",
    )
    .unwrap();
    a.meshctl_ok(&["apply", "-f", group.to_str().unwrap()]);
    let minted = json(&a.meshctl_ok(&["token", "create", "--group", "load/web", "-o", "json"]));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, minted["token"].as_str().unwrap()).unwrap();
    let state = dir.path().join("host");
    hostmesh_tests::eventually(
        "a join through replica b with a's token",
        Duration::from_secs(10),
        || {
            let out = output(
                Command::new(bin("meshd"))
                    .args(["join", "--controller", &b.url, "--token-file"])
                    .arg(&token_file)
                    .args(["--ca-hash", minted["caHash"].as_str().unwrap()])
                    .arg("--state-dir")
                    .arg(&state)
                    .args(["--user", "root", "--force"]),
            );
            if out.status.success() {
                Ok(())
            } else {
                Err(stderr_of(&out))
            }
        },
    );
    let identity = Identity::load(
        StateDir::new(&state, None),
        hostmesh_api::clock::system(),
        Some(a.url.clone()),
        None,
    )
    .unwrap();
    let issued_by_b = identity.cert_info().serial_hex;
    rt.block_on(hostmesh_tests::eventually_async(
        "a renewal through replica a with b's certificate",
        Duration::from_secs(10),
        || async {
            let channel = identity.controller_channel().map_err(|e| e.to_string())?;
            identity.renew(channel).await.map_err(|e| e.to_string())
        },
    ));
    assert_ne!(identity.cert_info().serial_hex, issued_by_b);
}

#[test]
fn meshctl_without_the_admin_credential_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(
        dir.path(),
        "ctl",
        &format!("embedded:{}", dir.path().join("state.redb").display()),
        "",
    );
    // No credential anywhere: meshctl says where it looked.
    let out = output(
        Command::new(bin("meshctl"))
            .args([
                "--credentials",
                "/nonexistent/admin.conf",
                "get",
                "services",
            ])
            .env_remove("HOSTMESH_CREDENTIALS"),
    );
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("reading credentials /nonexistent/admin.conf"),
        "{}",
        stderr_of(&out)
    );

    // A credential whose certificate is not the admin's (here: the admin
    // credential of a different mesh) is refused by the TLS layer or the
    // server, never served.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ControllerProc::start(
        other_dir.path(),
        "other",
        &format!("embedded:{}", other_dir.path().join("state.redb").display()),
        "",
    );
    let out = output(
        Command::new(bin("meshctl"))
            .arg("--credentials")
            .arg(&other.admin_conf)
            .args(["--controller", &ctl.url, "get", "services"]),
    );
    assert!(!out.status.success(), "{}", stdout_of(&out));

    // The server itself refuses a caller without a client certificate.
    let rt = rt();
    let status = rt.block_on(hostmesh_tests::grpc::list_without_client_cert(
        &ctl.admin_conf,
        &ctl.url,
    ));
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("admin credential"),
        "{}",
        status.message()
    );
}

#[test]
fn replicas_starting_at_once_share_one_root_tokens_and_stable_vips() {
    let (rt, _etcd, dir, store, extra) = replicas_setup();
    // Both start before either is ready: they race to create the root.
    let mut a = ControllerProc::spawn(dir.path(), "a", &store, &extra);
    let mut b = ControllerProc::spawn(dir.path(), "b", &store, &extra);
    a.wait_ready();
    b.wait_ready();
    let ca_a = json(&a.meshctl_ok(&["ca", "list", "-o", "json"]));
    let ca_b = json(&b.meshctl_ok(&["ca", "list", "-o", "json"]));
    assert_eq!(ca_a["items"].as_array().unwrap().len(), 1, "{ca_a}");
    assert_eq!(ca_a, ca_b, "one root, not two");

    // A one-use token, raced for by two hosts through different replicas:
    // exactly one wins, every round.
    let resources = dir.path().join("mesh.yaml");
    std::fs::write(
        &resources,
        "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\napiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: web, namespace: shop}\nspec: {services: [web]}\n",
    )
    .unwrap();
    a.meshctl_ok(&["apply", "-f", resources.to_str().unwrap()]);
    for round in 0..4 {
        let minted = json(&a.meshctl_ok(&[
            "token", "create", "--group", "shop/web", "--uses", "1", "-o", "json",
        ]));
        let token = minted["token"].as_str().unwrap().to_string();
        let pin = minted["caHash"].as_str().unwrap().to_string();
        let joins = [&a, &b].map(|c| {
            let args = hostmesh_meshd::identity::join::JoinArgs {
                controller: c.url.clone(),
                token: token.clone(),
                ca_pin: pin.clone(),
                force: false,
                hostname: format!("race-{round}"),
                state: StateDir::new(dir.path().join(format!("r{round}-{}", c.proc.name)), None),
            };
            hostmesh_meshd::identity::join::join(args, 0)
        });
        let [ra, rb] = rt
            .block_on(futures::future::join_all(joins))
            .try_into()
            .unwrap();
        assert_eq!(
            [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count(),
            1,
            "round {round}: {ra:?} / {rb:?}"
        );
    }
    let workloads = json(&b.meshctl_ok(&["get", "workloads", "-o", "json"]));
    assert_eq!(workloads["items"].as_array().unwrap().len(), 4);

    // VIPs survive a replica restart: the same addresses, and re-applying
    // changes nothing.
    let vip_before =
        json(&a.meshctl_ok(&["get", "service", "web", "-n", "shop", "-o", "json"]))["spec"]["vip"]
            .clone();
    a.proc.kill();
    b.proc.kill();
    let a = ControllerProc::start(dir.path(), "a", &store, &extra);
    let vip_after =
        json(&a.meshctl_ok(&["get", "service", "web", "-n", "shop", "-o", "json"]))["spec"]["vip"]
            .clone();
    assert_eq!(vip_before, vip_after);
    let again = a.meshctl_ok(&["apply", "-f", resources.to_str().unwrap()]);
    assert_eq!(again.matches("unchanged").count(), 2, "{again}");
}
