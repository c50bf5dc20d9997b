//! The config a host holds: named entries from the controller, kept encoded
//! (a few hundred bytes per endpoint), with a version. Applying an
//! increment is a pure function; the result is checked (see
//! [`super::MeshState::build`]) before it replaces the last good one.

use std::collections::BTreeMap;

use hostmesh_api::entry::check_entry;
use hostmesh_api::proto::{ConfigEntry, ConfigUpdate};
use prost::Message;
use prost::bytes::Bytes;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    pub entries: BTreeMap<String, ConfigEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("update {version}: {message}")]
    BadUpdate { version: u64, message: String },
    #[error("stored snapshot: {0}")]
    Decode(String),
}

impl Snapshot {
    /// The snapshot `update` turns this one into. Every entry is checked
    /// against its hash and kind, so corruption or a controller bug is
    /// caught before anything is used. Entries move out of the update; the
    /// bodies are shared, not copied.
    pub fn apply(&self, update: ConfigUpdate) -> Result<Snapshot, SnapshotError> {
        let version = update.version;
        let bad = |message: String| SnapshotError::BadUpdate { version, message };
        // Versions are store revisions, so they only grow. An increment
        // older than what this host holds comes from a controller replica
        // that is behind: taking it would roll the config back. A full
        // snapshot is the controller's deliberate reset and is taken.
        if !update.full && version < self.version {
            return Err(bad(format!(
                "is older than the config in use (version {}): a controller replica behind the store? keeping the newer config",
                self.version
            )));
        }
        let mut entries = if update.full {
            BTreeMap::new()
        } else {
            self.entries.clone()
        };
        for name in &update.removals {
            if entries.remove(name).is_none() && !update.full {
                return Err(bad(format!(
                    "removes {name:?}, which this host does not have"
                )));
            }
        }
        for e in update.upserts {
            check_entry(&e).map_err(bad)?;
            entries.insert(e.name.clone(), e);
        }
        Ok(Snapshot { version, entries })
    }

    pub fn hashes(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|(n, e)| (n.clone(), e.hash.clone()))
            .collect()
    }

    /// Encoded for the state directory: a full update.
    pub fn encode(&self) -> Vec<u8> {
        ConfigUpdate {
            version: self.version,
            full: true,
            upserts: self.entries.values().cloned().collect(),
            removals: Vec::new(),
        }
        .encode_to_vec()
    }

    /// Decodes what [`Snapshot::encode`] wrote. The entries' bodies are
    /// slices of `bytes`, not copies.
    pub fn decode(bytes: Bytes) -> Result<Snapshot, SnapshotError> {
        let update =
            ConfigUpdate::decode(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        Snapshot::default()
            .apply(update)
            .map_err(|e| SnapshotError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmesh_api::entry::make_entry;
    use hostmesh_api::proto::{EntryKind, TrustBundle};

    pub(crate) fn entry(name: &str, roots: &str) -> ConfigEntry {
        let body = TrustBundle {
            trust_domain: "td".into(),
            roots_pem: roots.into(),
        };
        make_entry(name, EntryKind::Bundle, body.encode_to_vec())
    }

    #[test]
    fn increments_apply_and_round_trip() {
        let s0 = Snapshot::default();
        let s1 = s0
            .apply(ConfigUpdate {
                version: 5,
                full: true,
                upserts: vec![entry("a", "1"), entry("b", "2")],
                removals: vec![],
            })
            .unwrap();
        let s2 = s1
            .apply(ConfigUpdate {
                version: 6,
                full: false,
                upserts: vec![entry("a", "3")],
                removals: vec!["b".into()],
            })
            .unwrap();
        assert_eq!(s2.version, 6);
        assert_eq!(s2.entries.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(Snapshot::decode(Bytes::from(s2.encode())).unwrap(), s2);
    }

    #[test]
    fn an_increment_older_than_the_config_in_use_is_refused_a_full_one_is_not() {
        let s = Snapshot::default()
            .apply(ConfigUpdate {
                version: 9,
                full: true,
                upserts: vec![entry("a", "1")],
                removals: vec![],
            })
            .unwrap();
        let older = ConfigUpdate {
            version: 7,
            full: false,
            upserts: vec![entry("a", "0")],
            removals: vec![],
        };
        let e = s.apply(older.clone()).unwrap_err().to_string();
        assert!(
            e.contains("older than the config in use (version 9)"),
            "{e}"
        );
        let same = ConfigUpdate {
            version: 9,
            upserts: vec![],
            ..older.clone()
        };
        assert_eq!(
            s.apply(same).unwrap(),
            s,
            "an empty increment at the same version"
        );
        let reset = ConfigUpdate {
            full: true,
            ..older
        };
        assert_eq!(s.apply(reset).unwrap().version, 7);
    }

    #[test]
    fn bad_increments_are_refused() {
        let mut tampered = entry("a", "1");
        tampered.hash = "0000".into();
        let e = Snapshot::default()
            .apply(ConfigUpdate {
                version: 1,
                full: false,
                upserts: vec![tampered],
                removals: vec![],
            })
            .unwrap_err();
        assert!(e.to_string().contains("does not match its hash"), "{e}");
        let e = Snapshot::default()
            .apply(ConfigUpdate {
                version: 2,
                full: false,
                upserts: vec![],
                removals: vec!["x".into()],
            })
            .unwrap_err();
        assert!(e.to_string().contains("does not have"), "{e}");
    }
}
