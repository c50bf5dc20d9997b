//! Health of the local ports this host serves, reported to the controller
//! (an endpoint whose port is unhealthy gets no new connections from other
//! hosts). Each port gets a TCP connect check, or the HTTP check its
//! WorkloadGroup defines (a 2xx or 3xx answer is healthy). Changes are sent
//! at once; unchanged results cost nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hostmesh_api::proto::{HostStatus, PortHealth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::mesh::{HealthCheck, MeshHandle};

#[derive(Clone, Debug)]
pub struct HealthSettings {
    /// Addresses to try, in order (the app may listen on loopback or on the
    /// host's address).
    pub app_addresses: Vec<IpAddr>,
    pub interval: Duration,
    pub timeout: Duration,
}

/// One check; Ok(detail) when healthy.
pub async fn check_port(
    addrs: &[IpAddr],
    port: u16,
    http_path: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    let mut last = String::from("no address to check");
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        match tokio::time::timeout(timeout, check_one(addr, http_path)).await {
            Ok(Ok(detail)) => return Ok(detail),
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within {}ms", timeout.as_millis()),
        }
    }
    Err(last)
}

async fn check_one(addr: SocketAddr, http_path: Option<&str>) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let Some(path) = http_path else {
        return Ok("tcp connect ok".to_string());
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hostmesh-health/1\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    // Only the status line matters.
    while got < buf.len() && !buf[..got].contains(&b'\n') {
        let n = stream
            .read(&mut buf[got..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    if (200..400).contains(&code) {
        Ok(format!("http {code}"))
    } else {
        Err(format!("http {code}"))
    }
}

/// Checks the served ports and keeps `status.ports` current.
pub async fn run(
    mesh: Arc<MeshHandle>,
    settings: HealthSettings,
    status: watch::Sender<HostStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut versions = mesh.subscribe();
    let mut last_run: HashMap<u16, Instant> = HashMap::new();
    let mut results: BTreeMap<u16, PortHealth> = BTreeMap::new();
    let mut tick = tokio::time::interval(settings.interval.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let state = mesh.load();
        let checks: HashMap<u16, HealthCheck> = state
            .me
            .as_ref()
            .map(|m| {
                m.health_checks
                    .iter()
                    .map(|c| (c.port, c.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let ports: Vec<u16> = state.served.keys().copied().collect();
        results.retain(|p, _| ports.contains(p));
        let now = Instant::now();
        let mut due = Vec::new();
        for port in ports {
            let check = checks.get(&port);
            let interval = check.and_then(|c| c.interval).unwrap_or(settings.interval);
            if last_run
                .get(&port)
                .is_none_or(|t| now.duration_since(*t) >= interval)
            {
                due.push((port, check.cloned()));
            }
        }
        let runs = due.into_iter().map(|(port, check)| {
            let addrs = settings.app_addresses.clone();
            let timeout = check
                .as_ref()
                .and_then(|c| c.timeout)
                .unwrap_or(settings.timeout);
            async move {
                let path = check.as_ref().and_then(|c| c.http_path.clone());
                (
                    port,
                    check_port(&addrs, port, path.as_deref(), timeout).await,
                )
            }
        });
        for (port, outcome) in futures::future::join_all(runs).await {
            last_run.insert(port, Instant::now());
            let (healthy, detail) = match outcome {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            };
            let previous = results.get(&port).map(|r| r.healthy);
            if previous != Some(healthy) {
                tracing::info!(port, healthy, detail = %detail, "local port health changed");
            }
            results.insert(
                port,
                PortHealth {
                    port: u32::from(port),
                    healthy,
                    detail,
                },
            );
        }
        let ports: Vec<PortHealth> = results.values().cloned().collect();
        // Only the health bit matters to the controller; details change too
        // often to be worth a message.
        let changed = {
            let current = status.borrow();
            current.ports.len() != ports.len()
                || current
                    .ports
                    .iter()
                    .zip(&ports)
                    .any(|(a, b)| a.port != b.port || a.healthy != b.healthy)
        };
        if changed {
            status.send_modify(|s| s.ports = ports);
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = versions.changed() => last_run.clear(),
            _ = crate::drain::wait_true(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_and_http_checks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if req.starts_with("GET /ok ") {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let addrs = ["127.0.0.1".parse().unwrap()];
        let t = Duration::from_secs(2);
        assert!(check_port(&addrs, port, None, t).await.is_ok());
        assert_eq!(
            check_port(&addrs, port, Some("/ok"), t).await.unwrap(),
            "http 200"
        );
        assert!(
            check_port(&addrs, port, Some("/bad"), t)
                .await
                .unwrap_err()
                .ends_with("http 503")
        );
        // A closed port.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(check_port(&addrs, closed, None, t).await.is_err());
    }
}
