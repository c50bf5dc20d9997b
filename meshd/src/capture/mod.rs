//! Traffic capture: the nftables rules that send this host's connections to
//! mesh services through meshd, and the strict-mode rules that keep
//! plaintext from other hosts away from mesh services.
//!
//! # What it installs
//!
//! Exactly one nftables table, `inet hostmesh` (the name is configurable),
//! and, on hosts that need them, routes for the VIP ranges
//! ([`ensure_vip_routes`]). Nothing else: no rule in any other table, no
//! change to the machine's own firewall.
//!
//! * `chain output` (`type nat hook output priority -100`), in this order:
//!   1. packets from meshd's own sockets (`meta mark == spec.mark`) return:
//!      meshd's upstream connections are never captured (no loops);
//!   2. DNS, UDP and TCP to port 53 on any address, IPv4 and IPv6, is
//!      redirected to meshd's DNS port (when DNS capture is on);
//!   3. never captured: TCP to `exclude_ports` (SSH, the controller's port),
//!      anything to `exclude_addrs` (the controller), anything to this
//!      host's own addresses (`fib daddr type local`);
//!   4. TCP to the VIP ranges is redirected to the outbound port;
//!   5. TCP to the real address and port of a mesh endpoint is redirected
//!      to the outbound port.
//!
//!   Addresses, ports and endpoints live in named sets, so a host that can
//!   reach thousands of endpoints still has a dozen rules.
//! * `chain input` (`type filter hook input priority filter`), only when
//!   some service this host serves is in strict mTLS mode: new TCP
//!   connections to those services' local ports that did not arrive on `lo`
//!   are dropped, so other hosts reach them only through meshd's tunnel.
//!   The tunnel port and `exclude_ports` are never dropped, even if listed.
//!
//! `redirect` sends IPv4 to 127.0.0.1 and IPv6 to ::1: meshd's outbound and
//! DNS listeners must listen on both loopbacks, or captured IPv6 traffic
//! (including DNS to an IPv6 resolver) finds nobody.
//!
//! # How
//!
//! A pure core and a thin shell, as STYLE.md asks. [`render`] is a pure
//! function from a [`CaptureSpec`] to the complete nft script (golden-tested
//! in `testdata/`); [`describe`] turns the same spec into the lines `meshd
//! status` shows. [`apply`] pipes the script to one `nft -f -`: the script
//! starts with `add table` + `delete table`, so in one kernel transaction
//! any previous or crash-leftover table is removed and the new one
//! installed. There is never a moment without rules, and a failing script
//! changes nothing. Every config change re-applies the whole table the
//! same way. [`remove`] deletes the table on shutdown and in `meshd
//! cleanup`; [`cleanup`] removes table and routes together.
//!
//! Everything taken from the spec is validated before it reaches the script
//! (ports non-zero, the mark non-zero, the table name a plain identifier,
//! addresses parsed): no text is interpolated unchecked. That matters on
//! the command line too: nft joins its arguments into one command string,
//! so a table name with a `;` would be a second command. Commands run
//! without a shell, under `LC_ALL=C`, with a deadline. The `*_in` variants
//! run them inside a named network namespace (`ip netns exec`); tests use
//! only those, so they never touch the machine's own rules.
//!
//! # Safety lessons built in
//!
//! Users of Istio, Consul and Kuma lost SSH, DNS and reboots to capture
//! rules. Here:
//!
//! * SSH and the controller are never captured (`exclude_ports`,
//!   `exclude_addrs`), nor is meshd's own traffic (the mark). Strict mode
//!   never drops an excluded port or the tunnel port. A mark of 0 is refused:
//!   exempting it would exempt everything silently.
//! * Everything captured is listed by `meshd status` ([`describe`]).
//! * No redirect outlives meshd: the table is removed on stop and by `meshd
//!   cleanup` (the unit's `ExecStopPost`), and a stale table is replaced at
//!   start. The VIP routes carry protocol [`VIP_ROUTE_PROTO`] so cleanup
//!   finds them after a crash and never removes anyone else's route.
//! * A packet that escapes capture goes nowhere: VIP routes point at `lo`
//!   with a loopback source (`routes.rs` explains why that shape).
//! * meshd owns one table and never flushes the ruleset or touches another
//!   table, so it coexists with firewalld, ufw, Docker or hand-written rules.
//!
//! # Limitations
//!
//! * meshd's own traffic is exempted by mark only. Another program that
//!   rewrites the mark of meshd's packets in an earlier output hook (mangle,
//!   priority -150) would defeat the exemption.
//! * Only TCP is captured (besides DNS); UDP to a VIP goes nowhere.
//! * VIP routes are added only where `ip route get` finds no route at all;
//!   with a default route, VIP traffic that escapes capture follows it (240/4
//!   is reserved and dropped by routers).
//! * On a host with IPv6 disabled, adding a route for an IPv6 VIP range
//!   fails (with `ip`'s error); leave IPv6 ranges out of the spec there.
//! * The ruleset is nft script text fed to the `nft` binary, not the JSON
//!   API of the `nftables` crate: the text is what operators read in `nft
//!   list ruleset`, and the golden files compare it directly.
//! * A table name that is an nft keyword (`table`, `filter`…) passes the
//!   name check and is then refused by nft with a syntax error.

mod exec;
mod nft;
mod routes;
mod ruleset;
mod spec;

pub use exec::NetNs;
pub use nft::{apply, apply_in, remove, remove_in, table_exists, table_exists_in};
pub use routes::{
    VIP_ROUTE_PROTO, ensure_vip_routes, ensure_vip_routes_in, remove_vip_routes,
    remove_vip_routes_in,
};
pub use ruleset::{describe, render, try_render, validate};
pub use spec::CaptureSpec;

use std::time::Duration;

/// The default table name (family `inet`).
pub const DEFAULT_TABLE: &str = "hostmesh";

/// Why capture could not be set up or removed. Every variant says what was
/// being done; command failures carry the command's own stderr.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The spec has a value that must not reach the ruleset.
    #[error("invalid capture spec: {field}: {reason}")]
    InvalidSpec {
        /// The [`CaptureSpec`] field at fault.
        field: &'static str,
        /// What is wrong with it, quoting the value.
        reason: String,
    },
    /// The network namespace name is not a plain name.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidNetns {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `nft` or `ip` is not installed.
    #[error("{tool} not found: install the {package} package")]
    ToolNotFound {
        /// The missing program.
        tool: &'static str,
        /// The Debian/RHEL package that provides it.
        package: &'static str,
    },
    /// Starting or talking to the command failed.
    #[error("running `{command}`: {source}")]
    Io {
        /// The command line.
        command: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The deadline it missed.
        timeout: Duration,
    },
    /// The command ran and failed; nft and ip say why on stderr.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line (for `nft -f -` the script went to stdin).
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The command's output could not be understood.
    #[error("unexpected output from `{command}`: {detail}")]
    UnexpectedOutput {
        /// The command line.
        command: String,
        /// What was unexpected.
        detail: String,
    },
}

/// What [`cleanup`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Whether the capture table existed and was removed.
    pub table_removed: bool,
    /// How many VIP routes were removed.
    pub routes_removed: usize,
}

/// Removes everything capture installs: the table and the VIP routes. For
/// shutdown and `meshd cleanup`; safe to run when nothing is installed.
/// Both removals are attempted even if the first fails; the first error is
/// returned.
pub async fn cleanup(table: &str) -> Result<CleanupReport, CaptureError> {
    cleanup_in(&NetNs::Current, table).await
}

/// [`cleanup`] in the network namespace `ns`.
pub async fn cleanup_in(ns: &NetNs, table: &str) -> Result<CleanupReport, CaptureError> {
    let table_removed = remove_in(ns, table).await;
    let routes_removed = remove_vip_routes_in(ns).await;
    match (table_removed, routes_removed) {
        (Ok(table_removed), Ok(routes_removed)) => Ok(CleanupReport {
            table_removed,
            routes_removed,
        }),
        (Err(error), routes) => {
            if let Err(other) = routes {
                tracing::error!(error = %other, "removing VIP routes failed too");
            }
            Err(error)
        }
        (Ok(_), Err(error)) => Err(error),
    }
}
