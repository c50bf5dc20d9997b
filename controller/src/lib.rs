//! hostmesh-controller: the `mesh-controller` binary (certificate
//! authority, join tokens, resource storage, per-host config streams) and
//! the `meshctl` operator CLI.
//!
//! Layout: [`app`] wires the parts; [`resources`] stores resources
//! (validation, VIPs, CAS); [`ca`] and [`tokens`] are identity; [`state`]
//! follows the store; [`snapshot`] computes what each host needs (pure);
//! [`sessions`] streams it; [`server`] is the gRPC surface; [`cli`] is
//! meshctl.

pub mod admin_conf;
pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod ratelimit;
pub mod resources;
pub mod server;
pub mod sessions;
pub mod snapshot;
pub mod state;
pub mod tokens;
pub mod vip;
