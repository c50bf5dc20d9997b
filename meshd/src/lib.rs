//! hostmesh-meshd: the host daemon.
//!
//! `capture/` installs nftables rules that send local connections to mesh
//! services to meshd; `proxy/` carries them (outbound: pick an endpoint;
//! inbound: check and deliver); `tunnel/` is the mTLS transport between
//! hosts; `dns/` answers mesh names; `control/` keeps the config stream
//! with the controller; `mesh/` is the config in use; `identity/` holds and
//! renews the host certificate and does `meshd join`; `admin/` serves
//! /ready, /config, /status and /metrics; [`app`] wires it all.

pub mod admin;
pub mod app;
pub mod capture;
pub mod config;
pub mod control;
pub mod dns;
pub mod drain;
pub mod health;
pub mod identity;
pub mod liveness;
pub mod mesh;
pub mod proxy;
pub mod sockmap;
pub mod tunnel;
pub mod workers;
