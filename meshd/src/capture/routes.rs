//! Routes for the VIP ranges, on hosts that have none.
//!
//! A `connect()` to a VIP runs a route lookup before any packet exists; with
//! no route the call fails with ENETUNREACH and the nat output hook never
//! sees it. So on a host without a route for a VIP range (typically one
//! without a default route) meshd adds
//!
//! ```text
//! ip -4 route add 240.240.0.0/16 dev lo proto 240 src 127.0.0.1
//! ip -6 route add fd00:240::/96  dev lo proto 240 src ::1
//! ```
//!
//! Why this shape: `dev lo` keeps anything that escapes capture (a marked
//! socket, UDP, a moment without the table) on the host; the loopback source
//! makes sure it can never be sent on a wire either (the kernel refuses
//! loopback sources off `lo` and drops them as martians on the way in), so an
//! escaped IPv4 packet is dropped and IPv6 fails at once with "network
//! unreachable". It is a plain unicast route, not `local`: a `local` route
//! would make every wildcard listener on the host answer for the VIPs, and
//! `unreachable`/`blackhole` routes fail the `connect()` before capture.
//! Protocol 240 marks the routes as meshd's: removal deletes exactly the
//! routes with that protocol in the main table and nothing else.
//!
//! A range that already has a route (a default route, or an operator's) is
//! left alone. A range the kernel refuses with another error than "network
//! unreachable" (an operator's `unreachable`, `prohibit` or `blackhole`
//! route) is left alone too, with a warning: that is a deliberate choice of
//! whoever runs the host.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::CaptureError;
use super::exec::{NetNs, Tool, run};

/// The routing protocol number meshd's VIP routes carry (`proto 240`): how
/// meshd recognises its own routes, after a crash too. Not assigned to
/// anything in `/etc/iproute2/rt_protos`.
pub const VIP_ROUTE_PROTO: u8 = 240;

/// Adds a route for each VIP range the kernel has no route for, and removes
/// routes meshd added earlier for ranges no longer configured. Returns the
/// routes it added.
///
/// On an error, routes added before it stay in place;
/// [`remove_vip_routes`] removes them (it goes by protocol, not by memory).
pub async fn ensure_vip_routes(ranges: &[IpNet]) -> Result<Vec<IpNet>, CaptureError> {
    ensure_vip_routes_in(&NetNs::Current, ranges).await
}

/// [`ensure_vip_routes`] in the network namespace `ns`.
pub async fn ensure_vip_routes_in(
    ns: &NetNs,
    ranges: &[IpNet],
) -> Result<Vec<IpNet>, CaptureError> {
    let ranges = normalize(ranges)?;

    // Stale routes first: one of ours for an old, wider range would
    // otherwise make a new range look routed and then vanish.
    for (family, route) in list_ours(ns).await? {
        let still_wanted = route.dst_net().is_some_and(|dst| ranges.contains(&dst));
        if !still_wanted {
            delete(ns, family, &route).await?;
        }
    }

    let mut added = Vec::new();
    for range in ranges {
        let lookup = run(ns, Tool::Ip, &route_get_args(range), None).await?;
        match classify_lookup(lookup.success, &lookup.stderr) {
            Lookup::Routed => {
                tracing::debug!(%range, netns = ?ns, "VIP range already routed");
            }
            Lookup::Refused(reason) => {
                tracing::warn!(
                    %range, netns = ?ns, %reason,
                    "the host refuses routes to this VIP range; not adding one: connections to these VIPs will fail"
                );
            }
            Lookup::NoRoute => {
                run(ns, Tool::Ip, &add_args(range), None).await?.check()?;
                tracing::info!(%range, netns = ?ns, proto = VIP_ROUTE_PROTO, "added route for VIP range");
                added.push(range);
            }
        }
    }
    Ok(added)
}

/// Removes every route with protocol [`VIP_ROUTE_PROTO`] from the main
/// table, IPv4 and IPv6; returns how many. Safe to call when there are none
/// (after a crash, from `meshd cleanup`).
pub async fn remove_vip_routes() -> Result<usize, CaptureError> {
    remove_vip_routes_in(&NetNs::Current).await
}

/// [`remove_vip_routes`] in the network namespace `ns`.
pub async fn remove_vip_routes_in(ns: &NetNs) -> Result<usize, CaptureError> {
    let mut removed = 0;
    for (family, route) in list_ours(ns).await? {
        if delete(ns, family, &route).await? {
            removed += 1;
        }
    }
    Ok(removed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn of(range: &IpNet) -> Family {
        match range {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// Truncates and merges the ranges; refuses `/0`, which would be a default
/// route into `lo` (pure).
pub(crate) fn normalize(ranges: &[IpNet]) -> Result<Vec<IpNet>, CaptureError> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for range in ranges {
        if range.prefix_len() == 0 {
            return Err(CaptureError::InvalidSpec {
                field: "vip_ranges",
                reason: format!("{range} covers every address; a VIP range must be a real subnet"),
            });
        }
        match range.trunc() {
            IpNet::V4(net) => v4.push(net),
            IpNet::V6(net) => v6.push(net),
        }
    }
    Ok(Ipv4Net::aggregate(&v4)
        .into_iter()
        .map(IpNet::V4)
        .chain(Ipv6Net::aggregate(&v6).into_iter().map(IpNet::V6))
        .collect())
}

/// `ip route get` for the range's first address (pure).
pub(crate) fn route_get_args(range: IpNet) -> Vec<String> {
    vec![
        Family::of(&range).flag().to_string(),
        "route".to_string(),
        "get".to_string(),
        range.network().to_string(),
    ]
}

/// `ip route add` for one of meshd's VIP routes (pure).
pub(crate) fn add_args(range: IpNet) -> Vec<String> {
    let (flag, src) = match range {
        IpNet::V4(_) => ("-4", "127.0.0.1"),
        IpNet::V6(_) => ("-6", "::1"),
    };
    [
        flag,
        "route",
        "add",
        &range.to_string(),
        "dev",
        "lo",
        "proto",
        &VIP_ROUTE_PROTO.to_string(),
        "src",
        src,
        "table",
        "main",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

/// What `ip route get` said about a range.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Some route covers it: connects reach the output hook.
    Routed,
    /// ENETUNREACH: no route at all; meshd adds one.
    NoRoute,
    /// Another error: an `unreachable`/`prohibit`/`blackhole`/`throw` route
    /// put there on purpose.
    Refused(String),
}

/// Classifies `ip route get` (run with `LC_ALL=C`) (pure).
pub(crate) fn classify_lookup(success: bool, stderr: &str) -> Lookup {
    if success {
        Lookup::Routed
    } else if stderr.contains("Network is unreachable") {
        Lookup::NoRoute
    } else {
        Lookup::Refused(stderr.trim().to_string())
    }
}

/// One of meshd's routes as `ip -j route show` prints it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub(crate) struct ShownRoute {
    pub(crate) dst: String,
    #[serde(default)]
    pub(crate) dev: Option<String>,
}

impl ShownRoute {
    /// The destination as a network (`ip` prints host routes without `/32`).
    pub(crate) fn dst_net(&self) -> Option<IpNet> {
        self.dst
            .parse::<IpNet>()
            .ok()
            .or_else(|| self.dst.parse::<std::net::IpAddr>().ok().map(IpNet::from))
    }
}

/// Parses `ip -j route show …` output, checking every value that will be
/// passed back to `ip` (pure).
pub(crate) fn parse_routes(json: &str) -> Result<Vec<ShownRoute>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let routes: Vec<ShownRoute> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON route list: {e}"))?;
    for route in &routes {
        let dst_ok = route.dst == "default" || route.dst_net().is_some();
        if !dst_ok {
            return Err(format!("unexpected route destination {:?}", route.dst));
        }
        if let Some(dev) = &route.dev {
            let dev_ok = !dev.is_empty()
                && dev.len() <= 15
                && dev.chars().all(|c| c.is_ascii_graphic() && c != '/');
            if !dev_ok {
                return Err(format!("unexpected device name {dev:?}"));
            }
        }
    }
    Ok(routes)
}

/// `ip route del` for one of meshd's routes; the `proto` makes the kernel
/// refuse to delete anything that is not ours (pure).
pub(crate) fn del_args(family: Family, route: &ShownRoute) -> Vec<String> {
    let mut args = vec![
        family.flag().to_string(),
        "route".to_string(),
        "del".to_string(),
        route.dst.clone(),
    ];
    if let Some(dev) = &route.dev {
        args.extend(["dev".to_string(), dev.clone()]);
    }
    args.extend(
        ["proto", &VIP_ROUTE_PROTO.to_string(), "table", "main"]
            .iter()
            .map(|s| (*s).to_string()),
    );
    args
}

/// meshd's routes (protocol 240, main table), both families.
async fn list_ours(ns: &NetNs) -> Result<Vec<(Family, ShownRoute)>, CaptureError> {
    let proto = VIP_ROUTE_PROTO.to_string();
    let mut ours = Vec::new();
    for family in [Family::V4, Family::V6] {
        let args = [
            family.flag(),
            "-j",
            "route",
            "show",
            "table",
            "main",
            "proto",
            &proto,
        ];
        let shown = run(ns, Tool::Ip, &args, None).await?.check()?;
        let routes =
            parse_routes(&shown.stdout).map_err(|detail| CaptureError::UnexpectedOutput {
                command: shown.command.clone(),
                detail,
            })?;
        ours.extend(routes.into_iter().map(|route| (family, route)));
    }
    Ok(ours)
}

/// Deletes one of meshd's routes; `Ok(false)` if it was already gone.
async fn delete(ns: &NetNs, family: Family, route: &ShownRoute) -> Result<bool, CaptureError> {
    let finished = run(ns, Tool::Ip, &del_args(family, route), None).await?;
    if !finished.success {
        // ESRCH: removed by someone else in the meantime.
        if finished.stderr.contains("No such process") {
            return Ok(false);
        }
        return Err(finished.into_error());
    }
    tracing::info!(dst = %route.dst, netns = ?ns, "removed VIP route");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_are_normalised_and_a_default_route_is_refused() {
        let ranges = normalize(&[
            net("fd00:240::7/96"),
            net("240.240.3.0/24"),
            net("240.240.0.0/16"),
        ])
        .unwrap();
        assert_eq!(ranges, vec![net("240.240.0.0/16"), net("fd00:240::/96")]);
        for bad in ["0.0.0.0/0", "::/0"] {
            let err = normalize(&[net(bad)]).unwrap_err();
            assert!(matches!(
                err,
                CaptureError::InvalidSpec {
                    field: "vip_ranges",
                    ..
                }
            ));
        }
    }

    #[test]
    fn routes_go_to_lo_with_a_loopback_source_and_our_protocol() {
        assert_eq!(
            add_args(net("240.240.0.0/16")).join(" "),
            "-4 route add 240.240.0.0/16 dev lo proto 240 src 127.0.0.1 table main"
        );
        assert_eq!(
            add_args(net("fd00:240::/96")).join(" "),
            "-6 route add fd00:240::/96 dev lo proto 240 src ::1 table main"
        );
        assert_eq!(
            route_get_args(net("fd00:240::/96")).join(" "),
            "-6 route get fd00:240::"
        );
    }

    #[test]
    fn only_network_unreachable_means_no_route() {
        assert_eq!(classify_lookup(true, ""), Lookup::Routed);
        assert_eq!(
            classify_lookup(false, "RTNETLINK answers: Network is unreachable\n"),
            Lookup::NoRoute
        );
        assert_eq!(
            classify_lookup(false, "RTNETLINK answers: No route to host\n"),
            Lookup::Refused("RTNETLINK answers: No route to host".into())
        );
        assert!(matches!(
            classify_lookup(false, "RTNETLINK answers: Permission denied"),
            Lookup::Refused(_)
        ));
    }

    #[test]
    fn shown_routes_are_parsed_and_checked() {
        let json = r#"[{"dst":"240.240.0.0/16","dev":"lo","scope":"link","prefsrc":"127.0.0.1","flags":[]},
                      {"dst":"10.1.2.3","dev":"eth0","flags":[]},{"dst":"default","flags":[]}]"#;
        let routes = parse_routes(json).unwrap();
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].dev.as_deref(), Some("lo"));
        assert_eq!(routes[2].dev, None);
        assert_eq!(routes[1].dst_net(), Some(net("10.1.2.3/32")));
        assert_eq!(routes[2].dst_net(), None);
        assert_eq!(parse_routes("").unwrap(), vec![]);
        assert_eq!(parse_routes("[]\n").unwrap(), vec![]);
        assert!(parse_routes("not json").is_err());
        assert!(parse_routes(r#"[{"dst":"240.240.0.0/16 table 5"}]"#).is_err());
        assert!(parse_routes(r#"[{"dst":"1.2.3.0/24","dev":"a b"}]"#).is_err());
    }

    #[test]
    fn deletion_names_our_protocol() {
        let route = ShownRoute {
            dst: "fd00:240::/96".into(),
            dev: Some("lo".into()),
        };
        assert_eq!(
            del_args(Family::V6, &route).join(" "),
            "-6 route del fd00:240::/96 dev lo proto 240 table main"
        );
    }
}
