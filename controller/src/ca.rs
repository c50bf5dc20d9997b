//! The mesh certificate authority.
//!
//! Two modes:
//! - **Generated** (default): at first start a controller makes an ECDSA
//!   P-256 root and stores it in the registry, its key sealed with
//!   AES-256-GCM under a key-encryption key (KEK) read from a file on the
//!   controller host. Replicas starting at once race on a create-if-absent
//!   of `ca/state`; the loser adopts the winner's root, so one mesh has one
//!   root. Roots can be rotated: `add` (trusted, not issuing), `activate`
//!   (issuing; the previous one is retired but still trusted), `remove`
//!   (refused while a certificate it issued may still be valid).
//! - **External**: the operator supplies an issuing certificate and key
//!   (e.g. an intermediate of their PKI) and the roots to trust. Nothing is
//!   generated or stored; rotation is done by replacing the files.
//!
//! Host certificates are X.509 SVIDs: one URI SAN (the SPIFFE ID), the host
//! ID as subject CN, ECDSA P-256, digitalSignature, serverAuth+clientAuth,
//! lifetime `ca.workload_cert_ttl` (capped by the issuer's own expiry).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use hostmesh_api::clock::SharedClock;
use hostmesh_api::pki::{self, CertInfo};
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::TrustBundle;
use hostmesh_registry::{Compare, Op, Store, StoreError, Txn, TxnOutcome};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType,
};
use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::keys::Keys;

/// Largest CSR accepted (a P-256 CSR is well under 1 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Issued certificates start this long before "now", for clock skew.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("key-encryption key {path}: {message}")]
    Kek { path: String, message: String },
    #[error("CA files: {0}")]
    External(String),
    #[error("certificate request: {0}")]
    BadCsr(String),
    #[error("{0}")]
    Refused(String),
    #[error("CA root {0} not found")]
    RootNotFound(String),
    #[error("CA data in the store: {0}")]
    Corrupt(String),
    #[error("signing: {0}")]
    Signing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

// ---------------------------------------------------------------- KEK

/// The key-encryption key: 32 random bytes, hex in a file of mode 0600.
#[derive(Clone)]
pub struct Kek {
    key: [u8; 32],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads the KEK at `path`, or creates it (atomically, without ever
    /// replacing a file another process created first) when `create`.
    pub fn load_or_create(path: &Path, create: bool) -> Result<Kek, CaError> {
        let err = |message: String| CaError::Kek {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => return Kek::parse(&text).map_err(err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        if !create {
            return Err(err(
                "missing, but the registry already holds a CA sealed with a key-encryption key; \
                 copy this file from a controller that has it (every replica needs the same one)"
                    .to_string(),
            ));
        }
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| err("no randomness".to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let tmp = dir.join(format!(".ca.kek.{}", std::process::id()));
        write_private_file(&tmp, format!("{}\n", hex::encode(key)).as_bytes())
            .map_err(|e| err(e.to_string()))?;
        // hard_link fails if `path` exists: whoever links first wins, and
        // everyone then reads the winner's key.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Kek { key }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                Kek::parse(&text).map_err(err)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    fn parse(text: &str) -> Result<Kek, String> {
        let bytes = hex::decode(text.trim()).map_err(|_| "not hex".to_string())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "must hold 32 bytes as 64 hex characters".to_string())?;
        Ok(Kek { key })
    }

    fn less_safe_key(&self) -> aead::LessSafeKey {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &self.key)
            .expect("32 bytes is an AES-256 key");
        aead::LessSafeKey::new(unbound)
    }

    /// base64(nonce || ciphertext || tag); `aad` binds it to its root id.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<String, CaError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CaError::Signing("no randomness".to_string()))?;
        let mut data = plaintext.to_vec();
        self.less_safe_key()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad.as_bytes()),
                &mut data,
            )
            .map_err(|_| CaError::Signing("sealing failed".to_string()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, CaError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| CaError::Corrupt(format!("sealed key of root {aad} is not base64")))?;
        if raw.len() < aead::NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err(CaError::Corrupt(format!(
                "sealed key of root {aad} is too short"
            )));
        }
        let (nonce, rest) = raw.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).expect("length checked");
        let mut data = rest.to_vec();
        let plain = self
            .less_safe_key()
            .open_in_place(nonce, aead::Aad::from(aad.as_bytes()), &mut data)
            .map_err(|_| {
                CaError::Refused(format!(
                    "cannot unseal the key of CA root {aad}: it was sealed with another key-encryption key; \
                     copy ca.kek from the controller that created the CA"
                ))
            })?;
        Ok(plain.to_vec())
    }
}

/// Writes a file readable by its owner only (0600), replacing atomically.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------- records

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct RootRecord {
    id: String,
    certificate_pem: String,
    /// None for roots known only by certificate (external).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_key: Option<String>,
    origin: String,
    created_unix: i64,
    /// When it started issuing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    activated_unix: Option<i64>,
    /// When it stopped issuing (a newer root was activated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired_unix: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct StateRecord {
    active: String,
}

/// What `meshctl ca list` shows of a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootSummary {
    pub id: String,
    pub certificate_pem: String,
    pub spki_pin: String,
    pub active: bool,
    pub not_after_unix: i64,
    /// After this no certificate it issued is valid (0: it never issued).
    pub issued_valid_until_unix: i64,
    pub origin: String,
}

// ---------------------------------------------------------------- the CA

#[derive(Clone, Debug)]
pub struct CaSettings {
    pub trust_domain: String,
    pub workload_ttl: Duration,
    pub root_ttl: Duration,
}

/// An operator-supplied CA.
#[derive(Clone, Debug)]
pub struct ExternalCa {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub bundle_file: Option<PathBuf>,
}

struct Signer {
    root_id: String,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate and what follows it up to (not including)
    /// the root, appended to every issued leaf.
    chain: Vec<CertificateDer<'static>>,
    not_after_unix: i64,
}

struct View {
    bundle: TrustBundle,
    roots: Vec<RootSummary>,
    signer: Arc<Signer>,
}

enum Mode {
    Generated { kek: Kek },
    External,
}

pub struct CertificateAuthority {
    settings: CaSettings,
    clock: SharedClock,
    mode: Mode,
    view: RwLock<Arc<View>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.settings.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A certificate issued for a CSR.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then the issuing chain (not the root).
    pub chain_pem: String,
    pub not_after_unix: i64,
    pub serial_hex: String,
}

fn corrupt(e: impl std::fmt::Display) -> CaError {
    CaError::Corrupt(e.to_string())
}

impl CertificateAuthority {
    /// Loads (or, on an empty store, creates) the CA.
    pub async fn bootstrap(
        store: &dyn Store,
        keys: &Keys,
        settings: CaSettings,
        kek_path: &Path,
        external: Option<ExternalCa>,
        clock: SharedClock,
    ) -> Result<Arc<CertificateAuthority>, CaError> {
        if let Some(ext) = external {
            let view = load_external(&ext, &settings)?;
            return Ok(Arc::new(CertificateAuthority {
                settings,
                clock,
                mode: Mode::External,
                view: RwLock::new(Arc::new(view)),
            }));
        }
        let existing = store.get(&keys.ca_state()).await?;
        let kek = Kek::load_or_create(kek_path, existing.is_none())?;
        if existing.is_none() {
            let (record, _) = generate_root(&kek, &settings, clock.now_unix(), true)?;
            let txn = Txn::new()
                .when(Compare::absent(keys.ca_state()))
                .then(Op::put(keys.ca_root(&record.id), to_json(&record)?))
                .then(Op::put(
                    keys.ca_state(),
                    to_json(&StateRecord {
                        active: record.id.clone(),
                    })?,
                ));
            match store.txn(txn).await? {
                TxnOutcome::Committed { .. } => {
                    tracing::info!(root = %record.id, "generated the mesh CA root")
                }
                TxnOutcome::Conflict { .. } => {
                    tracing::info!("another controller created the CA first; using its root")
                }
            }
        }
        let ca = CertificateAuthority {
            view: RwLock::new(Arc::new(
                load_generated(store, keys, &kek, &settings, clock.now_unix()).await?,
            )),
            settings,
            clock,
            mode: Mode::Generated { kek },
        };
        Ok(Arc::new(ca))
    }

    /// Re-reads the roots from the store (after another replica rotated).
    pub async fn reload(&self, store: &dyn Store, keys: &Keys) -> Result<bool, CaError> {
        let Mode::Generated { kek } = &self.mode else {
            return Ok(false);
        };
        let view = load_generated(store, keys, kek, &self.settings, self.clock.now_unix()).await?;
        let changed = {
            let current = self.view();
            current.roots != view.roots
        };
        if changed && let Ok(mut slot) = self.view.write() {
            *slot = Arc::new(view);
        }
        Ok(changed)
    }

    fn view(&self) -> Arc<View> {
        match self.view.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.settings.trust_domain
    }

    pub fn bundle(&self) -> TrustBundle {
        self.view().bundle.clone()
    }

    pub fn roots(&self) -> Vec<RootSummary> {
        self.view().roots.clone()
    }

    /// The pin of the active root (what `--ca-hash` is checked against).
    pub fn active_pin(&self) -> String {
        let view = self.view();
        view.roots
            .iter()
            .find(|r| r.active)
            .map(|r| r.spki_pin.clone())
            .unwrap_or_default()
    }

    pub fn workload_ttl(&self) -> Duration {
        self.settings.workload_ttl
    }

    /// Checks that `csr_pem` asks for exactly `expect` and nothing else,
    /// then issues a host certificate with `host_id` as common name.
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        expect: &SpiffeId,
        host_id: &str,
    ) -> Result<Issued, CaError> {
        let public_key = check_csr(csr_pem, expect)?;
        self.issue(
            &public_key,
            expect,
            host_id,
            &[],
            &[],
            self.settings.workload_ttl,
        )
    }

    /// A key and certificate for the controller itself or the admin
    /// credential.
    pub fn issue_with_new_key(
        &self,
        id: &SpiffeId,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(Issued, String), CaError> {
        let key = pki::generate_key().map_err(|e| CaError::Signing(e.to_string()))?;
        let issued = self.issue(&key, id, common_name, dns_names, ips, ttl)?;
        Ok((issued, key.serialize_pem()))
    }

    fn issue(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let view = self.view();
        let signer = &view.signer;
        let now = self.clock.now();
        let now_unix = hostmesh_api::clock::unix_seconds(now);
        let not_after_unix = (now_unix + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
            .min(signer.not_after_unix);
        if not_after_unix <= now_unix + 60 {
            return Err(CaError::Refused(format!(
                "CA root {} expires too soon to issue; rotate the CA",
                signer.root_id
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        let uri = rcgen::string::Ia5String::try_from(id.to_string())
            .map_err(|e| CaError::Signing(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in dns_names {
            let dns = rcgen::string::Ia5String::try_from(name.as_str())
                .map_err(|e| CaError::Refused(format!("server name {name:?}: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = time::OffsetDateTime::from(now - BACKDATE);
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after_unix)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let serial = random_serial()?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(public_key, &signer.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(signer.chain.iter().cloned());
        Ok(Issued {
            chain_pem: pki::certs_to_pem(&chain),
            not_after_unix,
            serial_hex: hex::encode(serial),
        })
    }

    fn require_generated(&self) -> Result<&Kek, CaError> {
        match &self.mode {
            Mode::Generated { kek } => Ok(kek),
            Mode::External => Err(CaError::Refused(
                "the CA is operator-supplied (ca.cert_file); rotate it by replacing the CA files and restarting the controllers"
                    .to_string(),
            )),
        }
    }

    /// Adds a new generated root: trusted from now on, not issuing yet.
    pub async fn add_root(&self, store: &dyn Store, keys: &Keys) -> Result<RootSummary, CaError> {
        let kek = self.require_generated()?;
        let (record, summary) = generate_root(kek, &self.settings, self.clock.now_unix(), false)?;
        let txn = Txn::new()
            .when(Compare::absent(keys.ca_root(&record.id)))
            .then(Op::put(keys.ca_root(&record.id), to_json(&record)?));
        store.txn(txn).await?;
        self.reload(store, keys).await?;
        tracing::info!(root = %record.id, "added a CA root (trusted, not issuing)");
        Ok(summary)
    }

    /// Makes `id` the issuing root; the previous one is retired (still
    /// trusted until removed).
    pub async fn activate(
        &self,
        store: &dyn Store,
        keys: &Keys,
        id: &str,
    ) -> Result<RootSummary, CaError> {
        self.require_generated()?;
        for _ in 0..10 {
            let state_kv = store
                .get(&keys.ca_state())
                .await?
                .ok_or_else(|| CaError::Corrupt("ca/state is missing".to_string()))?;
            let state: StateRecord = serde_json::from_slice(&state_kv.value).map_err(corrupt)?;
            let target_kv = store
                .get(&keys.ca_root(id))
                .await?
                .ok_or_else(|| CaError::RootNotFound(id.to_string()))?;
            let mut target: RootRecord =
                serde_json::from_slice(&target_kv.value).map_err(corrupt)?;
            if state.active == id {
                self.reload(store, keys).await?;
                return self.summary(id);
            }
            let now = self.clock.now_unix();
            target.activated_unix = Some(now);
            target.retired_unix = None;
            let mut txn = Txn::new()
                .when(Compare::mod_revision(
                    keys.ca_state(),
                    state_kv.mod_revision,
                ))
                .when(Compare::mod_revision(
                    keys.ca_root(id),
                    target_kv.mod_revision,
                ))
                .then(Op::put(
                    keys.ca_state(),
                    to_json(&StateRecord {
                        active: id.to_string(),
                    })?,
                ))
                .then(Op::put(keys.ca_root(id), to_json(&target)?));
            if let Some(old_kv) = store.get(&keys.ca_root(&state.active)).await? {
                let mut old: RootRecord = serde_json::from_slice(&old_kv.value).map_err(corrupt)?;
                old.retired_unix = Some(now);
                txn = txn
                    .when(Compare::mod_revision(
                        keys.ca_root(&state.active),
                        old_kv.mod_revision,
                    ))
                    .then(Op::put(keys.ca_root(&state.active), to_json(&old)?));
            }
            if store.txn(txn).await?.is_committed() {
                self.reload(store, keys).await?;
                tracing::info!(root = %id, previous = %state.active, "activated a CA root");
                return self.summary(id);
            }
        }
        Err(CaError::Refused(
            "the CA state kept changing; try again".to_string(),
        ))
    }

    /// Removes a root from the trust bundle. Refused for the active root,
    /// and (unless `force`) while a certificate it issued may still be valid.
    pub async fn remove_root(
        &self,
        store: &dyn Store,
        keys: &Keys,
        id: &str,
        force: bool,
    ) -> Result<(), CaError> {
        self.require_generated()?;
        let summary = self.summary(id)?;
        if summary.active {
            return Err(CaError::Refused(format!(
                "root {id} is the active root; activate another root first"
            )));
        }
        let now = self.clock.now_unix();
        if !force && summary.issued_valid_until_unix > now {
            return Err(CaError::Refused(format!(
                "root {id} issued certificates that stay valid until {} ({}s from now); wait, or use --force",
                hostmesh_api::clock::rfc3339(summary.issued_valid_until_unix),
                summary.issued_valid_until_unix - now
            )));
        }
        let kv = store
            .get(&keys.ca_root(id))
            .await?
            .ok_or_else(|| CaError::RootNotFound(id.to_string()))?;
        let txn = Txn::new()
            .when(Compare::mod_revision(keys.ca_root(id), kv.mod_revision))
            .then(Op::delete(keys.ca_root(id)));
        if !store.txn(txn).await?.is_committed() {
            return Err(CaError::Refused(format!(
                "root {id} changed meanwhile; try again"
            )));
        }
        self.reload(store, keys).await?;
        tracing::info!(root = %id, "removed a CA root from the trust bundle");
        Ok(())
    }

    fn summary(&self, id: &str) -> Result<RootSummary, CaError> {
        self.view()
            .roots
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| CaError::RootNotFound(id.to_string()))
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, CaError> {
    serde_json::to_vec(v).map_err(corrupt)
}

fn random_serial() -> Result<[u8; 16], CaError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CaError::Signing("no randomness".to_string()))?;
    // Positive, and a fixed 16-byte length.
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(b)
}

/// A new root and its store record. `active` marks it issuing from now.
fn generate_root(
    kek: &Kek,
    settings: &CaSettings,
    now_unix: i64,
    active: bool,
) -> Result<(RootRecord, RootSummary), CaError> {
    let key = pki::generate_key().map_err(|e| CaError::Signing(e.to_string()))?;
    let id = root_id(&key.subject_public_key_info());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "hostmesh");
    dn.push(
        DnType::OrganizationalUnitName,
        settings.trust_domain.as_str(),
    );
    dn.push(DnType::CommonName, format!("hostmesh root CA {id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(now_unix - BACKDATE.as_secs() as i64)
            .map_err(corrupt)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(
        now_unix + i64::try_from(settings.root_ttl.as_secs()).unwrap_or(i64::MAX / 2),
    )
    .map_err(corrupt)?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    let record = RootRecord {
        id: id.clone(),
        certificate_pem: cert.pem(),
        sealed_key: Some(kek.seal(&id, key.serialize_pem().as_bytes())?),
        origin: "generated".to_string(),
        created_unix: now_unix,
        activated_unix: active.then_some(now_unix),
        retired_unix: None,
    };
    let info = CertInfo::parse(cert.der()).map_err(corrupt)?;
    let summary = RootSummary {
        id,
        certificate_pem: record.certificate_pem.clone(),
        spki_pin: info.spki_pin,
        active,
        not_after_unix: info.not_after_unix,
        issued_valid_until_unix: 0,
        origin: record.origin.clone(),
    };
    Ok((record, summary))
}

/// A short stable id for a root: the first 16 hex digits of its SPKI hash.
fn root_id(spki_der: &[u8]) -> String {
    let pin = pki::sha256_pin(spki_der);
    pin.trim_start_matches("sha256:")[..16].to_string()
}

async fn load_generated(
    store: &dyn Store,
    keys: &Keys,
    kek: &Kek,
    settings: &CaSettings,
    _now_unix: i64,
) -> Result<View, CaError> {
    let state_kv = store
        .get(&keys.ca_state())
        .await?
        .ok_or_else(|| CaError::Corrupt("ca/state is missing".to_string()))?;
    let state: StateRecord = serde_json::from_slice(&state_kv.value).map_err(corrupt)?;
    let listed = store.list(&keys.ca_roots()).await?;
    let mut records = Vec::new();
    for kv in listed.kvs {
        let record: RootRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| CaError::Corrupt(format!("{}: {e}", kv.key)))?;
        records.push(record);
    }
    let active = records
        .iter()
        .find(|r| r.id == state.active)
        .ok_or_else(|| {
            CaError::Corrupt(format!(
                "active root {} is not among the roots",
                state.active
            ))
        })?;
    let sealed = active
        .sealed_key
        .as_deref()
        .ok_or_else(|| CaError::Corrupt(format!("active root {} has no key", active.id)))?;
    let key_pem = String::from_utf8(kek.open(&active.id, sealed)?).map_err(corrupt)?;
    let key = KeyPair::from_pem(&key_pem).map_err(corrupt)?;
    let issuer = Issuer::from_ca_cert_pem(&active.certificate_pem, key).map_err(corrupt)?;
    let active_der =
        pki::certs_from_pem(&active.certificate_pem, "active CA root").map_err(corrupt)?;
    let active_info = CertInfo::parse(&active_der[0]).map_err(corrupt)?;
    let signer = Signer {
        root_id: active.id.clone(),
        issuer,
        chain: Vec::new(),
        not_after_unix: active_info.not_after_unix,
    };
    let mut roots = Vec::new();
    let mut bundle_der = Vec::new();
    // Oldest first, so the bundle reads in the order roots were created.
    records.sort_by_key(|r| (r.created_unix, r.id.clone()));
    for r in &records {
        let der = pki::certs_from_pem(&r.certificate_pem, &format!("CA root {}", r.id))
            .map_err(corrupt)?;
        let info = CertInfo::parse(&der[0]).map_err(corrupt)?;
        let is_active = r.id == state.active;
        let issued_valid_until_unix = match (r.activated_unix, r.retired_unix) {
            (None, _) => 0,
            // Still issuing: certificates it issues stay valid a TTL ahead.
            (Some(_), None) if is_active => i64::MAX,
            (Some(_), retired) => {
                retired.unwrap_or(0)
                    + i64::try_from(settings.workload_ttl.as_secs()).unwrap_or(0)
                    + BACKDATE.as_secs() as i64
            }
        };
        roots.push(RootSummary {
            id: r.id.clone(),
            certificate_pem: r.certificate_pem.clone(),
            spki_pin: info.spki_pin,
            active: is_active,
            not_after_unix: info.not_after_unix,
            issued_valid_until_unix,
            origin: r.origin.clone(),
        });
        bundle_der.extend(der);
    }
    let bundle =
        TrustBundle::from_der(&settings.trust_domain, bundle_der, "CA roots").map_err(corrupt)?;
    Ok(View {
        bundle,
        roots,
        signer: Arc::new(signer),
    })
}

fn load_external(ext: &ExternalCa, settings: &CaSettings) -> Result<View, CaError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| CaError::External(format!("reading {}: {e}", p.display())))
    };
    let cert_pem = read(&ext.cert_file)?;
    let key_pem = read(&ext.key_file)?;
    let chain = pki::certs_from_pem(&cert_pem, &ext.cert_file.display().to_string())
        .map_err(|e| CaError::External(e.to_string()))?;
    let issuing_info = CertInfo::parse(&chain[0]).map_err(CaError::External)?;
    if !issuing_info.is_ca {
        return Err(CaError::External(format!(
            "{}: the first certificate is not a CA certificate",
            ext.cert_file.display()
        )));
    }
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        CaError::External(format!(
            "{}: not a PKCS#8 private key (convert with `openssl pkcs8 -topk8 -nocrypt`): {e}",
            ext.key_file.display()
        ))
    })?;
    if pki::sha256_pin(&key.subject_public_key_info()) != issuing_info.spki_pin {
        return Err(CaError::External(format!(
            "{} does not hold the key of the first certificate in {}",
            ext.key_file.display(),
            ext.cert_file.display()
        )));
    }
    let issuer =
        Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| CaError::External(e.to_string()))?;
    let bundle_der = match &ext.bundle_file {
        Some(path) => pki::certs_from_pem(&read(path)?, &path.display().to_string())
            .map_err(|e| CaError::External(e.to_string()))?,
        None => vec![chain[chain.len() - 1].clone()],
    };
    // The chain sent with leaves: the issuing certificate and intermediates,
    // without anything that is itself a trusted root.
    let root_pins: Vec<String> = bundle_der
        .iter()
        .filter_map(|c| CertInfo::parse(c).ok().map(|i| i.spki_pin))
        .collect();
    let sent_chain: Vec<CertificateDer<'static>> = chain
        .iter()
        .filter(|c| {
            CertInfo::parse(c)
                .map(|i| !root_pins.contains(&i.spki_pin))
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    let mut roots = Vec::new();
    for (i, der) in bundle_der.iter().enumerate() {
        let info = CertInfo::parse(der).map_err(CaError::External)?;
        roots.push(RootSummary {
            id: root_id_from_pin(&info.spki_pin, i),
            certificate_pem: pki::certs_to_pem(std::slice::from_ref(der)),
            spki_pin: info.spki_pin,
            active: i == 0,
            not_after_unix: info.not_after_unix,
            issued_valid_until_unix: i64::MAX,
            origin: "external".to_string(),
        });
    }
    let bundle = TrustBundle::from_der(&settings.trust_domain, bundle_der, "CA bundle")
        .map_err(|e| CaError::External(e.to_string()))?;
    Ok(View {
        bundle,
        roots,
        signer: Arc::new(Signer {
            root_id: "external".to_string(),
            issuer,
            chain: sent_chain,
            not_after_unix: issuing_info.not_after_unix,
        }),
    })
}

fn root_id_from_pin(pin: &str, index: usize) -> String {
    let hex = pin.trim_start_matches("sha256:");
    hex.get(..16)
        .map(str::to_string)
        .unwrap_or_else(|| format!("root{index}"))
}

/// Checks a CSR: size, signature, a P-256 key, exactly one SAN which is the
/// URI `expect`, and no CA request. Returns its public key.
pub fn check_csr(csr_pem: &str, expect: &SpiffeId) -> Result<rcgen::PublicKey, CaError> {
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(CaError::BadCsr(format!(
            "{} bytes; at most {MAX_CSR_BYTES} are accepted",
            csr_pem.len()
        )));
    }
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        CaError::BadCsr(format!(
            "not a valid PKCS#10 request with a good signature: {e}"
        ))
    })?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::BadCsr("the key must be ECDSA P-256".to_string()));
    }
    // rcgen infers the key type from the signature algorithm; re-encoding
    // the key as P-256 and comparing with the request's own SPKI catches a
    // P-384 key signed with SHA-256.
    let raw_spki = spki_of_csr_pem(csr_pem)?;
    if csr.public_key.subject_public_key_info() != raw_spki {
        return Err(CaError::BadCsr("the key must be ECDSA P-256".to_string()));
    }
    if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err(CaError::BadCsr(
            "the request asks for a CA certificate".to_string(),
        ));
    }
    let mut uris = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) => uris.push(u.as_str().to_string()),
            other => {
                return Err(CaError::BadCsr(format!(
                    "the request asks for a {} subject alternative name; only the SPIFFE ID {expect} is allowed",
                    san_kind(other)
                )));
            }
        }
    }
    match uris.as_slice() {
        [one] if one == &expect.to_string() => Ok(csr.public_key),
        [one] => Err(CaError::BadCsr(format!(
            "the request asks for identity {one}, but this host may only have {expect}"
        ))),
        [] => Err(CaError::BadCsr(format!(
            "the request has no SPIFFE ID; it must ask for {expect}"
        ))),
        _ => Err(CaError::BadCsr(format!(
            "the request asks for {} identities; it must ask for exactly {expect}",
            uris.len()
        ))),
    }
}

fn san_kind(san: &SanType) -> &'static str {
    match san {
        SanType::DnsName(_) => "DNS",
        SanType::IpAddress(_) => "IP address",
        SanType::Rfc822Name(_) => "email",
        SanType::URI(_) => "URI",
        _ => "non-URI",
    }
}

fn spki_of_csr_pem(csr_pem: &str) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509CertificationRequest};
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CaError::BadCsr(format!("not PEM: {e}")))?;
    let (_, req) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    Ok(req.certification_request_info.subject_pki.raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmesh_api::clock::{Clock, ManualClock};
    use hostmesh_registry::embedded::EmbeddedStore;
    use std::time::SystemTime;

    fn settings() -> CaSettings {
        CaSettings {
            trust_domain: "hostmesh.local".to_string(),
            workload_ttl: Duration::from_secs(24 * 3600),
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }

    fn web() -> SpiffeId {
        "spiffe://hostmesh.local/ns/shop/sa/web".parse().unwrap()
    }

    #[test]
    fn kek_seals_and_refuses_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = Kek::load_or_create(&dir.path().join("a"), true).unwrap();
        let b = Kek::load_or_create(&dir.path().join("b"), true).unwrap();
        let sealed = a.seal("root1", b"secret").unwrap();
        assert_eq!(a.open("root1", &sealed).unwrap(), b"secret");
        assert!(a.open("root2", &sealed).is_err(), "aad binds the root id");
        let e = b.open("root1", &sealed).unwrap_err().to_string();
        assert!(e.contains("sealed with another key-encryption key"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Loading again gives the same key.
        let again = Kek::load_or_create(&dir.path().join("a"), false).unwrap();
        assert_eq!(again.open("root1", &sealed).unwrap(), b"secret");
    }

    #[test]
    fn a_missing_kek_is_not_created_when_the_store_has_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let e = Kek::load_or_create(&dir.path().join("k"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("copy this file from a controller"), "{e}");
    }

    #[test]
    fn csrs_for_other_identities_or_extra_names_are_refused() {
        let key = pki::generate_key().unwrap();
        let other: SpiffeId = "spiffe://hostmesh.local/ns/shop/sa/db".parse().unwrap();
        let csr = pki::build_csr(&key, &other, "h").unwrap();
        let e = check_csr(&csr, &web()).unwrap_err().to_string();
        assert!(
            e.contains("asks for identity spiffe://hostmesh.local/ns/shop/sa/db"),
            "{e}"
        );

        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(rcgen::string::Ia5String::try_from(web().to_string()).unwrap()),
            SanType::DnsName(rcgen::string::Ia5String::try_from("evil.example").unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let e = check_csr(&csr, &web()).unwrap_err().to_string();
        assert!(e.contains("DNS subject alternative name"), "{e}");

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = pki::build_csr(&p384, &web(), "h").unwrap();
        assert!(
            check_csr(&csr, &web())
                .unwrap_err()
                .to_string()
                .contains("P-256")
        );

        assert!(check_csr("garbage", &web()).is_err());
    }

    #[tokio::test]
    async fn issues_svids_and_rotates_roots() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let keys = Keys::new("/t/");
        let clock = ManualClock::new(SystemTime::now());
        let ca = CertificateAuthority::bootstrap(
            &store,
            &keys,
            settings(),
            &dir.path().join("kek"),
            None,
            clock.clone(),
        )
        .await
        .unwrap();
        let key = pki::generate_key().unwrap();
        let csr = pki::build_csr(&key, &web(), "x").unwrap();
        let issued = ca.issue_for_csr(&csr, &web(), "web-0001").unwrap();
        let chain = pki::certs_from_pem(&issued.chain_pem, "t").unwrap();
        let info = CertInfo::parse(&chain[0]).unwrap();
        assert_eq!(info.spiffe_id, Some(web()));
        assert_eq!(info.common_name.as_deref(), Some("web-0001"));
        assert!(!info.is_ca);
        assert_eq!(info.not_after_unix - clock.now_unix(), 24 * 3600);
        let first_root = ca.roots()[0].id.clone();

        // Rotation: add, activate, old still trusted, removal refused until
        // its certificates have expired.
        let added = ca.add_root(&store, &keys).await.unwrap();
        assert!(!added.active);
        assert_eq!(ca.bundle().roots_der.len(), 2);
        ca.activate(&store, &keys, &added.id).await.unwrap();
        let issued2 = ca.issue_for_csr(&csr, &web(), "web-0001").unwrap();
        let info2 =
            CertInfo::parse(&pki::certs_from_pem(&issued2.chain_pem, "t").unwrap()[0]).unwrap();
        assert_ne!(info2.issuer, info.issuer, "issued by the new root");
        let e = ca
            .remove_root(&store, &keys, &first_root, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("stay valid until"), "{e}");
        assert!(
            ca.remove_root(&store, &keys, &added.id, false)
                .await
                .is_err(),
            "active root"
        );
        clock.advance(Duration::from_secs(24 * 3600 + 600));
        ca.remove_root(&store, &keys, &first_root, false)
            .await
            .unwrap();
        assert_eq!(ca.bundle().roots_der.len(), 1);

        // A second CA over the same store and KEK adopts the same roots.
        let again = CertificateAuthority::bootstrap(
            &store,
            &keys,
            settings(),
            &dir.path().join("kek"),
            None,
            clock.clone(),
        )
        .await
        .unwrap();
        assert_eq!(again.roots(), ca.roots());
    }
}
