//! hostmesh-meshd: the host daemon.
//!
//! `capture/` installs nftables rules that send local connections to mesh
//! services to meshd; `dns/` answers mesh names; `control/` keeps the
//! config stream with the controller; `identity::join` does `meshd join`;
//! `admin/` serves /ready, /config, /status and /metrics; [`app`] wires it
//! all. What runs per connection (`proxy/`, `tunnel/`, `sockmap/`, `mesh/`,
//! `identity/`, `workers`, `drain`) is the crate hostmesh-dataplane,
//! re-exported here under the same names; it is built for speed and this
//! crate for size (the workspace's release profile).

pub mod admin;
pub mod app;
pub mod capture;
pub mod config;
pub mod control;
pub mod dns;
pub mod health;
pub mod identity;
pub mod liveness;
pub mod memcpy;

pub use hostmesh_dataplane::{drain, mesh, proxy, sched, sockmap, tunnel, workers};
