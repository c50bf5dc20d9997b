//! Installs, replaces and removes meshd's nftables table (thin: the script
//! comes from [`ruleset`](super::ruleset)).

use super::CaptureError;
use super::exec::{NetNs, Tool, run};
use super::ruleset::render_plan;
use super::spec::{CaptureSpec, NotEnforced, plan, validate_table_name};

/// Validates `spec` and installs its ruleset in meshd's own namespace,
/// replacing any previous or stale table of the same name atomically.
pub async fn apply(spec: &CaptureSpec) -> Result<(), CaptureError> {
    apply_in(&NetNs::Current, spec).await
}

/// [`apply`] in the network namespace `ns`.
pub async fn apply_in(ns: &NetNs, spec: &CaptureSpec) -> Result<(), CaptureError> {
    let plan = plan(spec)?;
    for (port, why) in &plan.strict_not_enforced {
        let why = match why {
            NotEnforced::TunnelPort => "it is the tunnel port",
            NotEnforced::Excluded => "it is in exclude_ports",
        };
        tracing::warn!(port, reason = why, "strict mTLS not enforced on this port");
    }
    let script = render_plan(&plan);
    run(ns, Tool::Nft, &["-f", "-"], Some(&script))
        .await?
        .check()?;
    tracing::info!(
        table = %plan.table,
        netns = ?ns,
        vip_ranges = plan.vip_v4.len() + plan.vip_v6.len(),
        endpoints = plan.endpoints_v4.len() + plan.endpoints_v6.len(),
        strict_ports = plan.strict_ports.len(),
        dns = plan.dns_port.is_some(),
        "capture ruleset applied"
    );
    Ok(())
}

/// Removes table `inet <table>`: `Ok(true)` if one was removed, `Ok(false)`
/// if there was none. No other table is touched.
pub async fn remove(table: &str) -> Result<bool, CaptureError> {
    remove_in(&NetNs::Current, table).await
}

/// [`remove`] in the network namespace `ns`.
pub async fn remove_in(ns: &NetNs, table: &str) -> Result<bool, CaptureError> {
    validate_table_name(table)?;
    if !table_exists_in(ns, table).await? {
        tracing::debug!(table, netns = ?ns, "no capture table to remove");
        return Ok(false);
    }
    let finished = run(ns, Tool::Nft, &["delete", "table", "inet", table], None).await?;
    if !finished.success {
        // Gone between the check and the delete: someone else removed it.
        if finished.stderr.contains("No such file or directory") {
            return Ok(false);
        }
        return Err(finished.into_error());
    }
    tracing::info!(table, netns = ?ns, "capture table removed");
    Ok(true)
}

/// Whether table `inet <table>` exists.
pub async fn table_exists(table: &str) -> Result<bool, CaptureError> {
    table_exists_in(&NetNs::Current, table).await
}

/// [`table_exists`] in the network namespace `ns`.
pub async fn table_exists_in(ns: &NetNs, table: &str) -> Result<bool, CaptureError> {
    validate_table_name(table)?;
    let listing = run(ns, Tool::Nft, &["list", "tables", "inet"], None)
        .await?
        .check()?;
    Ok(lists_table(&listing.stdout, table))
}

/// Whether `nft list tables inet` output names `inet <table>` (pure).
pub(crate) fn lists_table(listing: &str, table: &str) -> bool {
    listing.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("table")
            && words.next() == Some("inet")
            && words.next() == Some(table)
            && words.next().is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_listing_is_matched_exactly() {
        let listing = "table inet filter\ntable inet hostmesh_old\ntable ip hostmesh\n";
        assert!(!lists_table(listing, "hostmesh"));
        assert!(lists_table(listing, "hostmesh_old"));
        assert!(lists_table("table inet hostmesh\n", "hostmesh"));
        assert!(!lists_table("", "hostmesh"));
    }

    #[tokio::test]
    async fn bad_names_fail_before_running_anything() {
        // nft joins its argv into one command line, so `;` in a table name
        // would start a second command: the name check is what stops it.
        // Should that check ever break, this test still cannot reach the
        // host's rules: the namespace named here does not exist.
        let nowhere = NetNs::Named("hm-cap-unit-test-does-not-exist".into());
        let err = remove_in(&nowhere, "x; list ruleset").await.unwrap_err();
        assert!(matches!(
            err,
            CaptureError::InvalidSpec { field: "table", .. }
        ));
        let err = table_exists_in(&nowhere, "").await.unwrap_err();
        assert!(matches!(
            err,
            CaptureError::InvalidSpec { field: "table", .. }
        ));
        let err = apply_in(
            &NetNs::Named("../x".into()),
            &CaptureSpec {
                table: "hostmesh".into(),
                mark: 1,
                outbound_port: 15001,
                dns_port: None,
                vip_ranges: vec![],
                endpoints: vec![],
                strict_ports: vec![],
                tunnel_port: 15008,
                exclude_ports: vec![],
                exclude_addrs: vec![],
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CaptureError::InvalidNetns { .. }));
    }
}
