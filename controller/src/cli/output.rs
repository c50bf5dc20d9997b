//! meshctl's output: aligned tables for people, YAML and JSON for tools.

use hostmesh_api::clock::rfc3339;
use hostmesh_api::proto::{self, CaRoot, CreateTokenResponse, HostState, TokenInfo};
use hostmesh_api::resource::{Kind, Resource};
use serde_json::json;

use super::{CliError, Format};

pub fn decode(r: &proto::Resource) -> Result<Resource, CliError> {
    hostmesh_api::document::resource_from_json(&r.json).map_err(|e| {
        CliError(format!(
            "the controller sent an unreadable {} {}/{}: {e}",
            r.kind, r.namespace, r.name
        ))
    })
}

/// Columns padded to their widest cell, two spaces apart.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn labels(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "<none>".to_string();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".to_string()
    } else {
        s
    }
}

pub fn table(kind: Kind, items: &[Resource]) -> String {
    match kind {
        Kind::Service => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .filter_map(|r| match r {
                    Resource::Service(s) => Some(vec![
                        s.metadata.namespace.clone(),
                        s.metadata.name.clone(),
                        [s.spec.vip.clone(), s.spec.vip6.clone()]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>()
                            .join(","),
                        s.spec
                            .ports
                            .iter()
                            .map(|p| format!("{}:{}/{}", p.port, p.target(), p.protocol.as_str()))
                            .collect::<Vec<_>>()
                            .join(","),
                        s.spec.mtls.as_str().to_string(),
                    ]),
                    _ => None,
                })
                .collect();
            render(&["NAMESPACE", "NAME", "VIP", "PORTS", "MTLS"], &rows)
        }
        Kind::WorkloadGroup => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .filter_map(|r| match r {
                    Resource::WorkloadGroup(g) => Some(vec![
                        g.metadata.namespace.clone(),
                        g.metadata.name.clone(),
                        g.identity_name().to_string(),
                        or_none(g.spec.services.join(",")),
                        labels(&g.spec.labels),
                    ]),
                    _ => None,
                })
                .collect();
            render(
                &["NAMESPACE", "NAME", "IDENTITY", "SERVICES", "LABELS"],
                &rows,
            )
        }
        Kind::Route => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .filter_map(|r| match r {
                    Resource::Route(rt) => Some(vec![
                        rt.metadata.namespace.clone(),
                        rt.metadata.name.clone(),
                        rt.spec.service.clone(),
                        rt.spec.rules.len().to_string(),
                    ]),
                    _ => None,
                })
                .collect();
            render(&["NAMESPACE", "NAME", "SERVICE", "RULES"], &rows)
        }
        Kind::Policy => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .filter_map(|r| match r {
                    Resource::Policy(p) => Some(vec![
                        p.metadata.namespace.clone(),
                        p.metadata.name.clone(),
                        p.spec.service.clone(),
                        format!("{:?}", p.spec.action).to_lowercase(),
                        p.spec.rules.len().to_string(),
                    ]),
                    _ => None,
                })
                .collect();
            render(&["NAMESPACE", "NAME", "SERVICE", "ACTION", "RULES"], &rows)
        }
        Kind::Workload => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .filter_map(|r| match r {
                    Resource::Workload(w) => {
                        let st = w.status.clone().unwrap_or_default();
                        Some(vec![
                            w.metadata.namespace.clone(),
                            w.metadata.name.clone(),
                            w.spec.group.clone(),
                            or_none(st.address),
                            or_none(st.state),
                            or_none(w.spec.hostname.clone()),
                        ])
                    }
                    _ => None,
                })
                .collect();
            render(
                &["NAMESPACE", "NAME", "GROUP", "ADDRESS", "STATE", "HOSTNAME"],
                &rows,
            )
        }
    }
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

pub fn token_created(resp: &CreateTokenResponse, controller: &str, format: Format) -> String {
    let info = resp.info.clone().unwrap_or_default();
    // The token goes in the environment, not on the command line where
    // `ps` would show it to every user of the host.
    let join = format!(
        "HOSTMESH_JOIN_TOKEN={} meshd join --controller {} --ca-hash {}",
        shell_quote(&resp.token),
        shell_quote(controller),
        resp.ca_hash
    );
    let join_file = format!(
        "meshd join --controller {} --token-file /etc/hostmesh/join-token --ca-hash {}",
        shell_quote(controller),
        resp.ca_hash
    );
    match format {
        Format::Json => {
            let v = json!({
                "id": info.id,
                "token": resp.token,
                "group": info.group,
                "caHash": resp.ca_hash,
                "controller": controller,
                "expires": rfc3339(info.expires_unix),
                "uses": info.uses_total,
                "joinCommand": join,
            });
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        Format::Yaml => {
            let v = json!({
                "id": info.id, "token": resp.token, "group": info.group, "caHash": resp.ca_hash,
                "controller": controller, "expires": rfc3339(info.expires_unix), "uses": info.uses_total,
                "joinCommand": join,
            });
            serde_saphyr::to_string(&v).unwrap_or_default()
        }
        Format::Table => format!(
            "Join token {} for {} (uses: {}, expires {}). The token is shown only now.\n\n\
             On the host, as root:\n\n  {join}\n\n\
             or, with the token in a file of mode 0600 (out of the environment too):\n\n  \
             install -m 600 /dev/null /etc/hostmesh/join-token && echo {} > /etc/hostmesh/join-token\n  {join_file}\n\n\
             then: systemctl start meshd\n",
            info.id,
            info.group,
            info.uses_total,
            rfc3339(info.expires_unix),
            shell_quote(&resp.token),
        ),
    }
}

pub fn tokens(tokens: &[TokenInfo], format: Format) -> String {
    let items: Vec<serde_json::Value> = tokens
        .iter()
        .map(|t| {
            json!({"id": t.id, "group": t.group, "created": rfc3339(t.created_unix), "expires": rfc3339(t.expires_unix),
                   "usesTotal": t.uses_total, "usesLeft": t.uses_left, "revoked": t.revoked, "description": t.description})
        })
        .collect();
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&json!({ "items": items })).unwrap_or_default() + "\n"
        }
        Format::Yaml => serde_saphyr::to_string(&json!({ "items": items })).unwrap_or_default(),
        Format::Table if tokens.is_empty() => "No join tokens.\n".to_string(),
        Format::Table => {
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.group.clone(),
                        format!("{}/{}", t.uses_left, t.uses_total),
                        rfc3339(t.expires_unix),
                        if t.revoked {
                            "revoked".into()
                        } else {
                            "active".into()
                        },
                        or_none(t.description.clone()),
                    ]
                })
                .collect();
            render(
                &[
                    "ID",
                    "GROUP",
                    "USES LEFT",
                    "EXPIRES",
                    "STATE",
                    "DESCRIPTION",
                ],
                &rows,
            )
        }
    }
}

fn host_json(h: &HostState) -> serde_json::Value {
    json!({
        "hostId": h.host_id, "namespace": h.namespace, "group": h.group, "address": h.address,
        "hostname": h.hostname, "state": h.state, "ackedVersion": h.acked_version,
        "latestVersion": h.latest_version, "inSync": h.in_sync, "rejectedVersion": h.rejected_version,
        "rejectReason": h.reject_reason, "lastHeartbeatUnixMs": h.last_heartbeat_unix_ms,
        "certExpiry": if h.cert_expiry_unix > 0 { rfc3339(h.cert_expiry_unix) } else { String::new() },
        "meshdVersion": h.meshd_version,
        "ports": h.ports.iter().map(|p| json!({"port": p.port, "healthy": p.healthy, "detail": p.detail})).collect::<Vec<_>>(),
    })
}

pub fn status(hosts: &[HostState], format: Format) -> String {
    match format {
        Format::Json => {
            let items: Vec<_> = hosts.iter().map(host_json).collect();
            serde_json::to_string_pretty(&json!({ "items": items })).unwrap_or_default() + "\n"
        }
        Format::Yaml => {
            let items: Vec<_> = hosts.iter().map(host_json).collect();
            serde_saphyr::to_string(&json!({ "items": items })).unwrap_or_default()
        }
        Format::Table if hosts.is_empty() => "No hosts have joined.\n".to_string(),
        Format::Table => {
            let now_ms = hostmesh_api::clock::unix_seconds(std::time::SystemTime::now()) * 1000;
            let rows: Vec<Vec<String>> = hosts
                .iter()
                .map(|h| {
                    let heartbeat = if h.last_heartbeat_unix_ms > 0 {
                        format!(
                            "{}s ago",
                            ((now_ms - h.last_heartbeat_unix_ms) / 1000).max(0)
                        )
                    } else {
                        "-".to_string()
                    };
                    let version = format!(
                        "{}/{}{}",
                        h.acked_version,
                        h.latest_version,
                        if h.in_sync { "" } else { " (behind)" }
                    );
                    let mut state = h.state.clone();
                    if !h.reject_reason.is_empty() && h.state == "rejected" {
                        state = format!("rejected v{}: {}", h.rejected_version, h.reject_reason);
                    }
                    vec![
                        h.host_id.clone(),
                        format!("{}/{}", h.namespace, h.group),
                        or_none(h.address.clone()),
                        version,
                        heartbeat,
                        if h.cert_expiry_unix > 0 {
                            rfc3339(h.cert_expiry_unix)
                        } else {
                            "-".into()
                        },
                        state,
                    ]
                })
                .collect();
            render(
                &[
                    "HOST",
                    "GROUP",
                    "ADDRESS",
                    "VERSION (ACKED/LATEST)",
                    "HEARTBEAT",
                    "CERT EXPIRES",
                    "STATE",
                ],
                &rows,
            )
        }
    }
}

pub fn roots(roots: &[CaRoot], format: Format) -> String {
    let items: Vec<serde_json::Value> = roots
        .iter()
        .map(|r| {
            json!({"id": r.id, "active": r.active, "pin": r.spki_sha256, "notAfter": rfc3339(r.not_after_unix),
                   "issuedValidUntil": if r.last_issued_valid_until_unix > 0 { rfc3339(r.last_issued_valid_until_unix) } else { String::new() },
                   "origin": r.origin})
        })
        .collect();
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&json!({ "items": items })).unwrap_or_default() + "\n"
        }
        Format::Yaml => serde_saphyr::to_string(&json!({ "items": items })).unwrap_or_default(),
        Format::Table => {
            let rows: Vec<Vec<String>> = roots
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        if r.active {
                            "issuing".into()
                        } else {
                            "trusted".into()
                        },
                        rfc3339(r.not_after_unix),
                        if r.last_issued_valid_until_unix > 0 {
                            rfc3339(r.last_issued_valid_until_unix)
                        } else {
                            "-".into()
                        },
                        r.spki_sha256.clone(),
                    ]
                })
                .collect();
            render(
                &["ID", "STATE", "EXPIRES", "ITS CERTS VALID UNTIL", "PIN"],
                &rows,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let out = render(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(out, "A    BB\nxxx  y\n");
    }

    #[test]
    fn tokens_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("hm1.abc.def"), "hm1.abc.def");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
