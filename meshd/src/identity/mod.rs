//! The host's identity and its renewal ([`hostmesh_dataplane::identity`],
//! re-exported here), and `meshd join` ([`join`]), which makes it.

pub use hostmesh_dataplane::identity::*;

pub mod join;
