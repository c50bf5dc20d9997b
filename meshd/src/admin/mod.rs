//! The admin port (127.0.0.1:15000): `/healthz`, `/ready`, `/config` (the
//! mesh config in use, JSON), `/status` (what `meshd status` prints) and
//! `/metrics` (Prometheus). It runs on the control runtime, so a slow
//! scrape never shows in request latency.

pub mod readiness;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::Control;
use crate::identity::Identity;
use crate::mesh::{MeshHandle, MeshState};
use crate::tunnel::Tunnels;
use readiness::Readiness;

pub use hostmesh_dataplane::doubling_buckets;

pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin port reads from.
pub struct AdminState {
    pub registry: Registry,
    pub mesh: Arc<MeshHandle>,
    pub control: Arc<Control>,
    pub identity: Arc<Identity>,
    pub readiness: Readiness,
    pub tunnels: Arc<Tunnels>,
    /// What nftables captures, and for which config version.
    pub capture: watch::Receiver<CaptureStatus>,
    /// Socket redirection between apps and meshd.
    pub sockmap: crate::app::SockmapStatus,
    /// This host's transport setting (meshd.toml), over the mesh's.
    pub transport: Option<crate::tunnel::Transport>,
    /// Per peer network, over both.
    pub peer_transport: Arc<crate::tunnel::PeerTransports>,
    /// The data workers' scheduler slice, in words.
    pub scheduler_slice: String,
    /// What `meshd run` did about glibc's slow copies, in words.
    pub memcpy: String,
    pub config_json: Value,
}

/// `hostmesh_meshd_sockmap_connections_total{pair, path}`, read from the
/// programs' counters at each scrape.
#[derive(Debug)]
pub struct SockmapCollector(pub Arc<crate::sockmap::Accel>);

impl prometheus_client::collector::Collector for SockmapCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Ok(c) = self.0.counters() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "sockmap_connections",
            "Connections between an app and meshd on this host, by pair (client: app to meshd's outbound port; server: meshd to the app) and path (redirect: bytes into meshd skip loopback TCP; tcp: the connecting side sent before the other end was accepted, so TCP for the connection's lifetime; fell_back: moved back to TCP by a guard; taken_out: of those, app sockets then taken out of their sockhash, plain TCP sockets again; meshd_out: and meshd's sockets after them)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (pair, path, v) in [
            ("client", "redirect", c.client_redirected),
            ("client", "tcp", c.client_tcp),
            ("server", "redirect", c.server_redirected),
            ("server", "tcp", c.server_tcp),
            ("any", "fell_back", c.fell_back),
            ("any", "taken_out", c.taken_out),
            ("any", "meshd_out", c.meshd_out),
        ] {
            let labels = [("pair", pair), ("path", path)];
            let metric = family.encode_family(&labels)?;
            prometheus_client::metrics::counter::ConstCounter::new(v).encode(metric)?;
        }
        Ok(())
    }
}

/// The capture rules in place: human lines, and the config version they
/// were built from (`None` before the first config, or with capture off).
#[derive(Clone, Debug, Default)]
pub struct CaptureStatus {
    pub version: Option<u64>,
    pub lines: Vec<String>,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::drain::wait_true(&mut shutdown) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    )
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/ready" => {
            let pending = state.readiness.pending();
            if pending.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: waiting for {}\n", pending.join(", ")),
                )
            }
        }
        "/config" => json_response(&config_json(&state.mesh.load())),
        "/status" => json_response(&status_json(state)),
        "/metrics" => {
            let mut body = String::new();
            if prometheus_client::encoding::text::encode(&mut body, &state.registry).is_err() {
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding metrics failed\n".into(),
                );
            }
            respond(StatusCode::OK, METRICS_CONTENT_TYPE, body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /healthz /ready /config /status /metrics\n".into(),
        ),
    }
}

/// The config in use, as operators read it.
pub fn config_json(st: &MeshState) -> Value {
    let services: Vec<Value> = st
        .services
        .values()
        .map(|s| {
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "vips": s.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "mtls": s.mtls.as_str(),
                "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "targetPort": p.target, "protocol": p.protocol.as_str()})).collect::<Vec<_>>(),
                "endpoints": s.endpoints.iter().map(|e| json!({
                    "hostId": &*e.host_id,
                    "address": e.address.to_string(),
                    "tunnelPort": e.tunnel_port,
                    "quic": e.quic,
                    "identity": e.identity().to_string(),
                    "labels": crate::mesh::labels_json(e.labels()),
                    "healthyPorts": e.healthy_ports(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let me = st.me.as_ref().map(|m| {
        json!({
            "hostId": m.host_id,
            "namespace": m.namespace,
            "group": m.group,
            "identity": m.spiffe_id.to_string(),
            "labels": m.labels,
            "services": m.services.iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
            "vipRanges": m.vip_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        })
    });
    let served: serde_json::Map<String, Value> = st
        .served
        .iter()
        .map(|(port, s)| {
            (
                port.to_string(),
                json!({"services": s.services.iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(), "mtls": s.mtls.as_str()}),
            )
        })
        .collect();
    json!({
        "version": st.version,
        "self": me,
        "services": services,
        "served": served,
        "routes": st.routes.iter().map(|r| hostmesh_api::resource::Resource::Route((**r).clone()).to_value()).collect::<Vec<_>>(),
        "policies": st.policies.iter().map(|p| hostmesh_api::resource::Resource::Policy((**p).clone()).to_value()).collect::<Vec<_>>(),
        "trustBundlePins": st.bundle.as_ref().map(|b| b.pins()).unwrap_or_default(),
    })
}

fn status_json(state: &AdminState) -> Value {
    let cert = state.identity.cert_info();
    let link = state.control.link().borrow().clone();
    let mesh = state.mesh.load();
    let listing = |kind: &str, list: Vec<(crate::tunnel::PeerKey, usize, usize)>| -> Vec<Value> {
        list.into_iter()
            .map(|(peer, conns, streams)| json!({"peer": peer.addr.to_string(), "identity": peer.identity.to_string(), "kind": kind, "connections": conns, "streams": streams}))
            .collect()
    };
    let mut tunnels = listing("multiplexed", state.tunnels.h2.connections());
    if let Some(d) = &state.tunnels.dedicated {
        tunnels.extend(listing("dedicated", d.connections()));
    }
    if let Some(q) = &state.tunnels.quic {
        // One QUIC connection per peer, carrying every stream to it.
        let conns = q.connections().into_iter();
        tunnels.extend(listing(
            "quic",
            conns.map(|(peer, streams)| (peer, 1, streams)).collect(),
        ));
    }
    json!({
        "host": state.identity.host(),
        "identity": state.identity.spiffe_id().to_string(),
        "certificate": {
            "notAfter": hostmesh_api::clock::rfc3339(cert.not_after_unix),
            "renewAt": hostmesh_api::clock::rfc3339(state.identity.renewal_at()),
            "serial": cert.serial_hex,
        },
        "controller": {
            "url": state.identity.controller_url(),
            "connected": link.connected,
            "lastError": link.last_error,
            "rejectedVersion": link.rejected_version,
            "rejectReason": link.reject_reason,
        },
        "config": {"version": mesh.version, "loaded": state.mesh.is_loaded(), "services": mesh.services.len()},
        "ready": state.readiness.pending().is_empty(),
        "pending": state.readiness.pending(),
        "captured": state.capture.borrow().lines.clone(),
        "captureVersion": state.capture.borrow().version,
        "tunnels": tunnels,
        "sockmap": sockmap_json(&state.sockmap),
        "transport": transport_json(state, mesh.me.as_ref()),
        "schedulerSlice": state.scheduler_slice,
        "memcpy": state.memcpy,
        "settings": state.config_json,
    })
}

/// Which transport tunnels are opened with: this host's setting, the
/// mesh's, what applies to peers no entry covers, this host's per-peer
/// entries and the mesh's per-pair rules that name this host (each most
/// specific first), and whether the mesh's can decide anything here.
fn transport_json(state: &AdminState, me: Option<&crate::mesh::SelfInfo>) -> Value {
    let choice = crate::tunnel::TransportChoice::new(&state.peer_transport, state.transport, me);
    let list = |p: &crate::tunnel::PeerTransports| {
        p.entries()
            .map(|(net, t)| json!({"network": net.to_string(), "transport": t.name()}))
            .collect::<Vec<_>>()
    };
    json!({
        "host": choice.host.map(|t| t.name()),
        "mesh": choice.mesh.map(|t| t.name()),
        "default": choice.default().name(),
        "peers": list(choice.host_peers),
        "meshPeers": list(choice.mesh_peers),
        "meshPeersApply": choice.mesh_peers_apply(),
        // Times a peer's QUIC went unanswered (and the peer was reached
        // over TCP for a while), and the peers reached over TCP now.
        "quicUnanswered": state.tunnels.quic.as_ref().map(|q| q.marked()),
        "quicOverTcp": state.tunnels.quic.as_ref().map(|q| {
            q.broken_peers().iter().map(ToString::to_string).collect::<Vec<_>>()
        }),
    })
}

fn sockmap_json(status: &crate::app::SockmapStatus) -> Value {
    let counters = status.accel.as_ref().and_then(|a| a.counters().ok());
    json!({
        "state": status.note,
        "connections": counters.map(|c| json!({
            "clientRedirected": c.client_redirected,
            "clientTcp": c.client_tcp,
            "serverRedirected": c.server_redirected,
            "serverTcp": c.server_tcp,
            "fellBack": c.fell_back,
            "takenOut": c.taken_out,
            "meshdOut": c.meshd_out,
        })),
    })
}
