//! Config entries as they travel from the controller to hosts: a name, a
//! kind, the encoded body, and a content hash that both ends compute the
//! same way (hex of the first 8 bytes of SHA-256 over the kind and the
//! body). Hashes let a host say what it holds, and the controller send only
//! what differs.

use prost::bytes::Bytes;

use crate::proto::{ConfigEntry, EntryKind};

pub fn entry_hash(kind: i32, body: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&kind.to_be_bytes());
    ctx.update(body);
    hex::encode(&ctx.finish().as_ref()[..8])
}

/// An entry with its hash.
pub fn make_entry(name: impl Into<String>, kind: EntryKind, body: impl Into<Bytes>) -> ConfigEntry {
    let body = body.into();
    ConfigEntry {
        name: name.into(),
        hash: entry_hash(kind as i32, &body),
        kind: kind as i32,
        body,
    }
}

/// Checks that an entry names a known kind and matches its hash.
pub fn check_entry(e: &ConfigEntry) -> Result<EntryKind, String> {
    if e.name.is_empty() {
        return Err("an entry has no name".to_string());
    }
    let kind = EntryKind::try_from(e.kind)
        .ok()
        .filter(|k| *k != EntryKind::Unspecified)
        .ok_or_else(|| format!("entry {:?} has an unknown kind {}", e.name, e.kind))?;
    if entry_hash(e.kind, &e.body) != e.hash {
        return Err(format!("entry {:?} does not match its hash", e.name));
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_cover_kind_and_body() {
        let a = make_entry("x", EntryKind::Route, Bytes::from_static(b"{}"));
        assert_eq!(check_entry(&a).unwrap(), EntryKind::Route);
        let mut other_kind = a.clone();
        other_kind.kind = EntryKind::Policy as i32;
        assert!(
            check_entry(&other_kind)
                .unwrap_err()
                .contains("does not match its hash")
        );
        let mut tampered = a.clone();
        tampered.body = Bytes::from_static(b"{ }");
        assert!(check_entry(&tampered).is_err());
        let mut unknown = a;
        unknown.kind = 99;
        assert!(check_entry(&unknown).unwrap_err().contains("unknown kind"));
    }
}
