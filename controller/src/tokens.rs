//! Join tokens: `hm1.<id>.<secret>`.
//!
//! The id (12 hex digits) names the record in the store; the secret (32
//! random bytes, hex) is shown once at creation and stored only as its
//! SHA-256. A token is bound to one WorkloadGroup, expires, and counts its
//! uses; the count is taken with compare-and-swap together with creating
//! the host's Workload, so two hosts racing for the last use cannot both
//! win. Every failure looks the same to the caller (see `identity.rs`).

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

pub const TOKEN_VERSION: &str = "hm1";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// A token as the host presents it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("join token is malformed: expected hm1.<12 hex digits>.<64 hex digits>")]
pub struct MalformedToken;

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl PresentedToken {
    pub fn parse(text: &str) -> Result<PresentedToken, MalformedToken> {
        let mut parts = text.trim().split('.');
        let (Some(version), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedToken);
        };
        if version != TOKEN_VERSION
            || !is_lower_hex(id, ID_BYTES * 2)
            || !is_lower_hex(secret, SECRET_BYTES * 2)
        {
            return Err(MalformedToken);
        }
        Ok(PresentedToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

/// A new token: (id, full token text, hash of the secret).
pub fn generate() -> Result<(String, String, String), String> {
    let rng = SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id).map_err(|_| "no randomness".to_string())?;
    rng.fill(&mut secret)
        .map_err(|_| "no randomness".to_string())?;
    let id = hex::encode(id);
    let secret = hex::encode(secret);
    let hash = hash_secret(&secret);
    Ok((id.clone(), format!("{TOKEN_VERSION}.{id}.{secret}"), hash))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// What the store holds for a token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    /// "namespace/name" of the WorkloadGroup.
    pub group: String,
    pub secret_sha256: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
    #[serde(default)]
    pub description: String,
}

/// Why a presented token was refused (logged by the controller, never told
/// to the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    WrongSecret,
    Expired,
    Revoked,
    UsedUp,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "unknown token id",
            TokenRefusal::WrongSecret => "wrong secret",
            TokenRefusal::Expired => "expired",
            TokenRefusal::Revoked => "revoked",
            TokenRefusal::UsedUp => "used up",
        }
    }
}

/// Checks a presented token against its record at `now_unix`.
pub fn check(
    record: Option<&TokenRecord>,
    presented: &PresentedToken,
    now_unix: i64,
) -> Result<(), TokenRefusal> {
    let Some(record) = record else {
        return Err(TokenRefusal::Unknown);
    };
    let presented_hash = hash_secret(&presented.secret);
    if !constant_time_eq(presented_hash.as_bytes(), record.secret_sha256.as_bytes()) {
        return Err(TokenRefusal::WrongSecret);
    }
    if record.revoked {
        return Err(TokenRefusal::Revoked);
    }
    if now_unix >= record.expires_unix {
        return Err(TokenRefusal::Expired);
    }
    if record.uses_left == 0 {
        return Err(TokenRefusal::UsedUp);
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(now: i64) -> (TokenRecord, PresentedToken) {
        let (id, text, hash) = generate().unwrap();
        let rec = TokenRecord {
            id,
            group: "shop/web".into(),
            secret_sha256: hash,
            created_unix: now,
            expires_unix: now + 3600,
            uses_total: 2,
            uses_left: 2,
            revoked: false,
            description: String::new(),
        };
        (rec, PresentedToken::parse(&text).unwrap())
    }

    #[test]
    fn generated_tokens_parse_and_check() {
        let (rec, tok) = record(1000);
        assert_eq!(tok.id, rec.id);
        assert_eq!(check(Some(&rec), &tok, 1000), Ok(()));
        assert!(
            !format!("{tok:?}").contains(&tok.secret),
            "Debug must not print the secret"
        );
    }

    #[test]
    fn refusals_are_distinguished_for_the_log() {
        let (rec, tok) = record(1000);
        assert_eq!(check(None, &tok, 1000), Err(TokenRefusal::Unknown));
        let wrong = PresentedToken {
            secret: "0".repeat(64),
            ..tok.clone()
        };
        assert_eq!(
            check(Some(&rec), &wrong, 1000),
            Err(TokenRefusal::WrongSecret)
        );
        assert_eq!(check(Some(&rec), &tok, 4600), Err(TokenRefusal::Expired));
        let revoked = TokenRecord {
            revoked: true,
            ..rec.clone()
        };
        assert_eq!(
            check(Some(&revoked), &tok, 1000),
            Err(TokenRefusal::Revoked)
        );
        let used = TokenRecord {
            uses_left: 0,
            ..rec
        };
        assert_eq!(check(Some(&used), &tok, 1000), Err(TokenRefusal::UsedUp));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "hm1",
            "hm2.aaaaaaaaaaaa.".to_string().as_str(),
            "hm1.AAAAAAAAAAAA.x",
            "hm1.aaaaaaaaaaaa.bb.cc",
        ] {
            assert!(PresentedToken::parse(bad).is_err(), "{bad}");
        }
        let ok = format!("hm1.{}.{}", "a".repeat(12), "b".repeat(64));
        assert!(PresentedToken::parse(&ok).is_ok());
        assert!(
            PresentedToken::parse(&format!(" {ok}\n")).is_ok(),
            "whitespace from a file is trimmed"
        );
    }
}
