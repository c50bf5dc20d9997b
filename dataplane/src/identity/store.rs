//! The state directory (`/var/lib/hostmesh`): what `meshd join` stores and
//! `meshd run` reads.
//!
//! ```text
//! key.pem       the host's private key (0600; never leaves the host)
//! cert.pem      its certificate chain, leaf first
//! bundle.pem    the trust bundle
//! host.json     host ID, group, SPIFFE ID, controller URL, CA pin
//! snapshot.pb   the last good config (static stability)
//! ```
//!
//! Every write is atomic (temporary file, fsync, rename, fsync of the
//! directory): a crash leaves the old file or the new one, never half of
//! one. Files are owned by the user meshd runs as.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("this host has not joined a mesh ({path} is missing); run `meshd join` first")]
    NotJoined { path: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Who this host is, as `meshd join` recorded it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostRecord {
    pub host_id: String,
    pub namespace: String,
    pub group: String,
    pub spiffe_id: String,
    pub trust_domain: String,
    pub controller_url: String,
    /// The `--ca-hash` used at join.
    pub ca_pin: String,
    pub joined_unix: i64,
}

/// Who files should belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Looks a user up in /etc/passwd (no NSS: meshd's user is a local system
/// user created by the package).
pub fn lookup_user(name: &str) -> Option<Owner> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd(&passwd, name)
}

fn parse_passwd(passwd: &str, name: &str) -> Option<Owner> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let user = f.next()?;
        if user != name {
            return None;
        }
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(Owner { uid, gid })
    })
}

#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
    owner: Option<Owner>,
}

pub const KEY_FILE: &str = "key.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const BUNDLE_FILE: &str = "bundle.pem";
pub const HOST_FILE: &str = "host.json";
pub const SNAPSHOT_FILE: &str = "snapshot.pb";

/// The name a file is staged under before it replaces `name`.
fn staged(name: &str) -> String {
    format!("{name}.next")
}

impl StateDir {
    pub fn new(path: impl Into<PathBuf>, owner: Option<Owner>) -> StateDir {
        StateDir {
            path: path.into(),
            owner,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the directory (0700, owned by the meshd user).
    pub fn create(&self) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.path))?;
        self.chown(&self.path)
    }

    fn chown(&self, path: &Path) -> Result<(), StateError> {
        if let Some(o) = self.owner {
            std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid)).map_err(io_err(path))?;
        }
        Ok(())
    }

    /// Writes `name` atomically with `mode`.
    pub fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), StateError> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            // The mode of an existing temp file is not reset by open.
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io_err(&tmp))?;
            f.write_all(contents).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        self.chown(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if let Ok(dir) = std::fs::File::open(&self.path) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Renames `from` to `to` within the directory, durably.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), StateError> {
        let (a, b) = (self.file(from), self.file(to));
        std::fs::rename(&a, &b).map_err(io_err(&b))?;
        if let Ok(dir) = std::fs::File::open(&self.path) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Replaces the key and the certificate as one change: both are staged
    /// as `*.next` files first, then renamed into place, key first. A crash
    /// at any point leaves either the old pair, or a staged pair that
    /// [`StateDir::finish_key_and_cert`] completes at the next start; never
    /// a key beside another key's certificate.
    pub fn replace_key_and_cert(&self, key_pem: &[u8], cert_pem: &[u8]) -> Result<(), StateError> {
        self.write(&staged(KEY_FILE), key_pem, 0o600)?;
        self.write(&staged(CERT_FILE), cert_pem, 0o644)?;
        self.rename(&staged(KEY_FILE), KEY_FILE)?;
        self.rename(&staged(CERT_FILE), CERT_FILE)
    }

    /// Completes or undoes a [`StateDir::replace_key_and_cert`] that a
    /// crash interrupted; returns what it did, if anything.
    pub fn finish_key_and_cert(&self) -> Result<Option<&'static str>, StateError> {
        let key_next = self.file(&staged(KEY_FILE)).exists();
        let cert_next = self.file(&staged(CERT_FILE)).exists();
        match (key_next, cert_next) {
            // Both staged: the new pair is complete; move it in.
            (true, true) => {
                self.rename(&staged(KEY_FILE), KEY_FILE)?;
                self.rename(&staged(CERT_FILE), CERT_FILE)?;
                Ok(Some(
                    "completed a certificate renewal interrupted before it was moved in",
                ))
            }
            // The key is in place; its certificate is still staged.
            (false, true) => {
                self.rename(&staged(CERT_FILE), CERT_FILE)?;
                Ok(Some(
                    "completed a certificate renewal interrupted between key and certificate",
                ))
            }
            // Staging was cut short: the old pair is intact.
            (true, false) => {
                let path = self.file(&staged(KEY_FILE));
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                Ok(Some(
                    "discarded a certificate renewal interrupted while staging",
                ))
            }
            (false, false) => Ok(None),
        }
    }

    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.file(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn read_text(&self, name: &str) -> Result<String, StateError> {
        let path = self.file(name);
        match self.read(name)? {
            Some(b) => String::from_utf8(b).map_err(|_| StateError::Invalid {
                path: path.display().to_string(),
                message: "not UTF-8 text".to_string(),
            }),
            None => Err(StateError::NotJoined {
                path: path.display().to_string(),
            }),
        }
    }

    pub fn host(&self) -> Result<Option<HostRecord>, StateError> {
        let path = self.file(HOST_FILE);
        match self.read(HOST_FILE)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StateError::Invalid {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }),
        }
    }

    pub fn write_host(&self, host: &HostRecord) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(host).map_err(|e| StateError::Invalid {
            path: HOST_FILE.to_string(),
            message: e.to_string(),
        })?;
        self.write(HOST_FILE, &json, 0o644)
    }

    /// Removes everything meshd stored (a re-join with --force).
    pub fn clear(&self) -> Result<(), StateError> {
        let staged_files = [staged(KEY_FILE), staged(CERT_FILE)];
        let names = [KEY_FILE, CERT_FILE, BUNDLE_FILE, HOST_FILE, SNAPSHOT_FILE]
            .into_iter()
            .chain(staged_files.iter().map(String::as_str));
        for name in names {
            let path = self.file(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_are_atomic_with_mode_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let me = Owner {
            uid: std::fs::metadata(dir.path()).unwrap().uid(),
            gid: std::fs::metadata(dir.path()).unwrap().gid(),
        };
        let state = StateDir::new(dir.path().join("s"), Some(me));
        state.create().unwrap();
        state.write(KEY_FILE, b"secret", 0o600).unwrap();
        state.write(KEY_FILE, b"secret2", 0o600).unwrap();
        let meta = std::fs::metadata(state.file(KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (me.uid, me.gid));
        assert_eq!(state.read(KEY_FILE).unwrap().unwrap(), b"secret2");
        assert_eq!(
            std::fs::metadata(state.path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let leftovers: Vec<_> = std::fs::read_dir(state.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "no temp files left behind");
    }

    #[test]
    fn a_renewal_cut_short_anywhere_leaves_a_matching_pair() {
        let setup = || {
            let dir = tempfile::tempdir().unwrap();
            let state = StateDir::new(dir.path().join("s"), None);
            state.create().unwrap();
            state.write(KEY_FILE, b"old key", 0o600).unwrap();
            state.write(CERT_FILE, b"old cert", 0o644).unwrap();
            (dir, state)
        };
        let pair = |s: &StateDir| {
            (
                s.read(KEY_FILE).unwrap().unwrap(),
                s.read(CERT_FILE).unwrap().unwrap(),
            )
        };
        let old = (b"old key".to_vec(), b"old cert".to_vec());
        let new = (b"new key".to_vec(), b"new cert".to_vec());

        // The whole replacement.
        let (_d, s) = setup();
        s.replace_key_and_cert(b"new key", b"new cert").unwrap();
        assert_eq!(pair(&s), new);
        assert_eq!(s.finish_key_and_cert().unwrap(), None);

        // Cut after staging the key only: the old pair stays.
        let (_d, s) = setup();
        s.write(&staged(KEY_FILE), b"new key", 0o600).unwrap();
        assert!(s.finish_key_and_cert().unwrap().is_some());
        assert_eq!(pair(&s), old);
        assert!(!s.file(&staged(KEY_FILE)).exists());

        // Cut after staging both: the new pair goes in.
        let (_d, s) = setup();
        s.write(&staged(KEY_FILE), b"new key", 0o600).unwrap();
        s.write(&staged(CERT_FILE), b"new cert", 0o644).unwrap();
        assert!(s.finish_key_and_cert().unwrap().is_some());
        assert_eq!(pair(&s), new);

        // Cut between the two renames: the certificate follows its key.
        let (_d, s) = setup();
        s.write(&staged(KEY_FILE), b"new key", 0o600).unwrap();
        s.write(&staged(CERT_FILE), b"new cert", 0o644).unwrap();
        s.rename(&staged(KEY_FILE), KEY_FILE).unwrap();
        assert!(s.finish_key_and_cert().unwrap().is_some());
        assert_eq!(pair(&s), new);
        let mode = std::fs::metadata(s.file(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key keeps its mode");
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nmeshd:x:998:997::/var/lib/hostmesh:/usr/sbin/nologin\n";
        assert_eq!(
            parse_passwd(passwd, "meshd"),
            Some(Owner { uid: 998, gid: 997 })
        );
        assert_eq!(parse_passwd(passwd, "nobody"), None);
    }

    #[test]
    fn a_missing_host_file_means_not_joined() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path(), None);
        assert!(state.host().unwrap().is_none());
        let e = state.read_text(CERT_FILE).unwrap_err().to_string();
        assert!(e.contains("run `meshd join` first"), "{e}");
    }
}
