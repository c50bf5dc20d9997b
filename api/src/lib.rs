//! hostmesh-api: what every part of hostmesh agrees on.
//!
//! - [`resource`]: the resource model operators write (Service,
//!   WorkloadGroup, Route, Policy) and the controller-written Workload, with
//!   validation that names the field and the bad value.
//! - [`document`]: multi-document YAML/JSON in, YAML/JSON out.
//! - [`proto`]: the gRPC API (generated at build time from `proto/`).
//! - [`spiffe`]: SPIFFE identities.
//! - [`pki`] and [`tls`]: X.509 SVID handling and the rustls verifiers that
//!   check a peer's SPIFFE identity; shared by the controller and meshd so
//!   both ends of every connection apply the same rules.
//!
//! - [`connect`]: the TLS channel to the controller that meshctl and
//!   meshd share.
//! - [`network`]: addresses and networks of hosts as operators write them.
//!
//! Nothing here touches storage; only [`connect`] opens sockets.

pub mod clock;
pub mod codec;
pub mod document;
pub mod duration;
pub mod entry;
pub mod network;
pub mod resource;
pub mod spiffe;

#[allow(unreachable_pub, clippy::all, rust_2018_idioms, missing_docs)]
pub mod proto {
    //! Generated from `proto/hostmesh/v1/hostmesh.proto`.
    tonic::include_proto!("hostmesh.v1");
}
pub mod connect;
pub mod pki;
pub mod tls;
