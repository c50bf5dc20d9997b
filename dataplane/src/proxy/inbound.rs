//! Inbound: a CONNECT from another host's meshd, whose identity the
//! tunnel's TLS has verified. The target port must be one this host serves;
//! the caller must pass the services' policies ([`super::policy`]); then
//! meshd connects to the local app (its configured app address, then the
//! host address) and splices. Refusals are HTTP statuses on the stream:
//! 404 (not served here), 403 (policy), 503 (the app does not answer).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostmesh_api::resource::Policy;
use tokio::net::TcpStream;

use super::policy::{Decision, decide};
use super::{AccessEntry, ConnLabels, DirectionLabels, ProxyMetrics};
use crate::drain::Drain;
use crate::mesh::MeshHandle;
use crate::tunnel::server::InboundRequest;
use crate::tunnel::splice::{Counters, splice};

pub struct Inbound {
    pub mesh: Arc<MeshHandle>,
    pub metrics: ProxyMetrics,
    /// Where apps listen, in the order tried.
    pub app_addresses: Vec<IpAddr>,
    pub connect_timeout: Duration,
    pub mark: Option<u32>,
    pub access_log: bool,
    pub drain: Drain,
    /// Socket redirection, when on: guards the connection to the app.
    pub sockmap: Option<Arc<crate::sockmap::Accel>>,
}

impl Inbound {
    async fn connect_app(&self, port: u16) -> Result<TcpStream, String> {
        let mut last = String::from("no app address configured");
        for ip in &self.app_addresses {
            let addr = SocketAddr::new(*ip, port);
            match tokio::time::timeout(
                self.connect_timeout,
                hostmesh_api::connect::connect_marked(addr, self.mark),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => {
                    last = format!(
                        "{addr}: no answer within {}ms",
                        self.connect_timeout.as_millis()
                    )
                }
            }
        }
        Err(last)
    }

    pub async fn handle(self: Arc<Self>, req: InboundRequest) {
        let _guard = self.drain.track();
        let started = Instant::now();
        let InboundRequest {
            peer_identity,
            peer_addr,
            authority,
            service: claimed,
            stream,
        } = req;
        let transport = stream.transport();
        let peer = peer_identity.to_string();
        let log_refusal = |code: &str, svc: &str, detail: &str| {
            AccessEntry {
                direction: "inbound",
                src: Some(peer_addr),
                dst: &authority,
                service: svc,
                src_identity: &peer,
                transport,
                duration: started.elapsed(),
                result: code,
                error: Some(detail),
                ..AccessEntry::default()
            }
            .log(self.access_log);
        };
        let Ok(target) = authority.parse::<SocketAddr>() else {
            stream.refuse(400).await;
            self.metrics.fail("inbound", "", &peer, "bad_target");
            log_refusal("bad_target", "", "CONNECT target is not ip:port");
            return;
        };
        let state = self.mesh.load();
        let Some(served) = state.served.get(&target.port()) else {
            stream.refuse(404).await;
            self.metrics.fail("inbound", "", &peer, "not_served");
            log_refusal("not_served", &claimed, "no mesh service on this port here");
            return;
        };
        // The first service on this port names the connection; policies of
        // every service on it apply.
        let (ns, name) = served.services[0].clone();
        let svc_name = format!("{name}.{ns}");
        let service_port = state
            .services
            .get(&(ns.clone(), name.clone()))
            .and_then(|s| s.port_by_target(target.port()))
            .map(|p| p.port)
            .unwrap_or(target.port());
        let policies: Vec<&Policy> = state
            .policies
            .iter()
            .filter(|p| {
                served
                    .services
                    .iter()
                    .any(|(sns, sname)| p.metadata.namespace == *sns && p.spec.service == *sname)
            })
            .map(|p| p.as_ref())
            .collect();
        if let Decision::Deny(why) = decide(policies, &peer_identity, service_port) {
            stream.refuse(403).await;
            self.metrics.fail("inbound", &svc_name, &peer, "denied");
            tracing::info!(peer = %peer, service = %svc_name, reason = %why, "inbound connection denied");
            log_refusal("denied", &svc_name, &why);
            return;
        }
        let app = match self.connect_app(target.port()).await {
            Ok(s) => s,
            Err(e) => {
                stream.refuse(503).await;
                self.metrics
                    .fail("inbound", &svc_name, &peer, "app_connect");
                log_refusal("app_unavailable", &svc_name, &e);
                return;
            }
        };
        let halves = match stream.accept().await {
            Ok(h) => h,
            Err(e) => {
                self.metrics
                    .fail("inbound", &svc_name, &peer, "stream_gone");
                log_refusal("stream_gone", &svc_name, &e);
                return;
            }
        };
        let labels = ConnLabels {
            direction: "inbound",
            service: svc_name.clone(),
            peer: peer.clone(),
        };
        self.metrics.opened.get_or_create(&labels).inc();
        let active = self.metrics.active.get_or_create_owned(&DirectionLabels {
            direction: "inbound",
        });
        active.inc();
        let counters = Arc::new(Counters::default());
        let redirect = self.sockmap.as_ref().and_then(|a| a.guard_server(&app));
        let (end, error) = splice(app, halves, counters.clone(), redirect).await;
        active.dec();
        // From the app's side: "sent" is what went back to the caller.
        let (sent, received) = self.metrics.count_close(&labels, &counters, started);
        let me = state
            .me
            .as_ref()
            .map(|m| m.spiffe_id.to_string())
            .unwrap_or_default();
        AccessEntry {
            direction: "inbound",
            src: Some(peer_addr),
            dst: &authority,
            service: &svc_name,
            endpoint: &target.to_string(),
            src_identity: &peer,
            dst_identity: &me,
            transport,
            sent,
            received,
            duration: started.elapsed(),
            result: end.as_str(),
            error: error.as_deref(),
        }
        .log(self.access_log);
    }
}
